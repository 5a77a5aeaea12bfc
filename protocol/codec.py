"""Canonical msgpack: the exact bytes a body is signed as.

One value has exactly one encoding: maps with their keys sorted by UTF-8 bytes, every
integer in its shortest msgpack form, text as ``str`` and bytes as ``bin``, no floats, no
extension types. Decoding is strict — duplicate keys, trailing bytes and non-canonical
encodings are refused — so two different byte strings never carry the same message, and
a signature can never be moved onto a re-encoded copy.
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack

from protocol.errors import ProtocolError
from protocol.messages import Envelope
from protocol.reasons import Reason
from protocol.schema import parse_envelope

_CONTAINERS = (dict, list, tuple)

#: SPEC §6.1 rule 7: arrays and maps nest at most this deep.
MAX_DEPTH = 1024
#: msgpack's pure-Python fallback (no C extension: MSGPACK_PUREPYTHON set, an interpreter
#: without a wheel) recurses once per nesting level and turns a RecursionError into a
#: StackError: under the default recursion limit of 1000 it refused bodies 1000-1024 deep,
#: which rule 7 allows (vector ``schema/nesting-1024``). The limit only grows, and only then.
_FALLBACK = msgpack.Unpacker.__module__ == "msgpack.fallback"
if _FALLBACK:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 2 * MAX_DEPTH + 500))


def canonical(value: Any) -> Any:
    """``value`` with every map's keys in canonical (UTF-8 byte) order."""
    # Exact types, as msgpack's strict_types packs them; leaves are not recursed into,
    # since this runs on every message a node signs or checks.
    if type(value) is dict:
        # Keys are text, and UTF-8 preserves code-point order: sorting the str keys is
        # sorting their UTF-8 bytes, without encoding each one. Keys are unique, so the
        # pairs never compare their values.
        return {k: canonical(v) if type(v) in _CONTAINERS else v
                for k, v in sorted(value.items())}
    if type(value) in (list, tuple):
        return [canonical(v) if type(v) in _CONTAINERS else v for v in value]
    return value


def pack(value: Any) -> bytes:
    """Canonical msgpack encoding of a wire value (maps, arrays, str, bytes, int, nil)."""
    packed: bytes = msgpack.packb(canonical(value), use_bin_type=True, strict_types=True)
    return packed


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"extension type {code} is not allowed")


def _no_timestamps(values: list[Any]) -> None:
    # msgpack decodes ext type -1 itself (as a Timestamp) instead of calling ext_hook;
    # the container hooks catch it, so *every* extension value is refused the same way.
    for value in values:
        if isinstance(value, msgpack.Timestamp):
            raise ValueError("extension type -1 (timestamp) is not allowed")


def _checked_list(values: list[Any]) -> list[Any]:
    _no_timestamps(values)
    return values


def _pairs_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    for key, value in pairs:
        if not isinstance(key, str):
            raise ValueError("map keys must be strings")
        _no_timestamps([value])
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate map key")
    return result


def unpack(data: bytes) -> Any:
    """Strictly decode one msgpack value; any fault is :class:`ProtocolError` ``body.malformed``.

    Refused here: anything but exactly one well-formed value, invalid UTF-8, a map key that
    is not a string, a duplicate key, any extension value, nesting deeper than 1024.
    """
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_pairs_without_duplicates,
            list_hook=_checked_list,
            ext_hook=_refuse_ext,
            timestamp=0,
        )
        _no_timestamps([value])
    # msgpack signals bad input through several exception types (ExtraData, FormatError,
    # StackError, ValueError, UnicodeDecodeError, TypeError for unhashable keys ...); all
    # of them mean the same thing to us.
    except Exception as exc:
        raise ProtocolError(Reason.BODY_MALFORMED, f"body is not valid msgpack: {exc}") from exc
    if _FALLBACK:
        _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Rule 7 for msgpack's pure-Python fallback, which has no limit of its own. The C
    extension stops at 1024 open containers itself (its stack size; the vectors
    ``decode/nesting-1025`` and ``schema/nesting-1024`` hold it to that), so the hot path
    does not walk every body twice."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if type(item) is dict else item if type(item) is list else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise ProtocolError(Reason.BODY_MALFORMED, f"containers nest deeper than {MAX_DEPTH}")
        stack.extend((child, depth + 1) for child in children
                     if type(child) is dict or type(child) is list)


def encode_body(envelope: Envelope) -> bytes:
    return pack(envelope.to_wire())


def decode_body(body: bytes) -> Envelope:
    """Body bytes → :class:`Envelope`; raises :class:`ProtocolError` on any fault."""
    envelope = parse_envelope(unpack(body))
    if encode_body(envelope) != body:
        raise ProtocolError(Reason.BODY_MALFORMED, "body is not in canonical msgpack form")
    return envelope
