"""Reading JSON that a person or another program wrote.

A hand-edited file or a request body can be wrong in more ways than ``json.loads`` reports
as ``JSONDecodeError``: bytes that are not UTF-8, a number with more digits than Python
converts, nesting deep enough to exhaust the recursion limit, a key given twice in one
object (``json.loads`` keeps the last, so ``{"parcels": 3, "parcels": 300}`` would be
taken as 300 without a word; the wire format refuses it too). Each of those must become
one clear error for the operator, never a traceback, so every reader of such JSON goes
through :func:`parse_json`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JsonTextError", "parse_json"]


class JsonTextError(ValueError):
    """The text is not JSON we can read; the message says why, without the text."""


class _DuplicateKey(Exception):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return found


def parse_json(text: str | bytes) -> Any:
    """The value ``text`` holds, or :class:`JsonTextError` saying what is wrong with it."""
    try:
        return json.loads(text, object_pairs_hook=_object)
    except _DuplicateKey as exc:
        key = str(exc.args[0])
        key = key if len(key) <= 60 else key[:59] + "…"
        raise JsonTextError(f"not JSON kpx accepts: the key {key!r} appears twice in one "
                            "object") from None
    except json.JSONDecodeError as exc:
        raise JsonTextError(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise JsonTextError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError:  # Python's limit on the digits of an integer
        raise JsonTextError("a number with too many digits") from None
    except RecursionError:
        raise JsonTextError("nested too deeply") from None
