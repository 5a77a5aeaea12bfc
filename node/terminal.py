"""What ``kpnode`` prints: JSON for machines, text for an operator's terminal.

Much of what the text shows was written by someone else: a partner's rejection text or
cancellation reason, a dead letter's headers, a broker's error. A terminal obeys control
characters, so such text could clear the screen, rewrite a line with a carriage return,
hide what follows, or set the window title. :func:`printable` shows every control and
bidirectional-override character as an escape instead; :func:`emit` and :func:`table` apply
it to all text output, so no command has to remember to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from protocol import Problem

#: C0 controls but tab and newline, DEL and the C1 controls, and the Unicode marks and
#: overrides that reorder text on screen (a "Trojan Source" line)
_CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_CONTROLS}]")
_UNSAFE_OR_LINE_BREAK = re.compile(f"[{_CONTROLS}\t\n\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` safe to write to a terminal: control characters shown as ``\\x1b`` and the
    like. ``one_line`` escapes tabs and line breaks too, for a value inside a line or a
    table cell (a partner's text must not start a line that looks like the node's)."""
    return (_UNSAFE_OR_LINE_BREAK if one_line else _UNSAFE).sub(_escape, text)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Columns padded to their widest cell; every cell :func:`printable` on one line."""
    cells = ([[printable(str(h), one_line=True) for h in headers]]
             + [[printable(str(c), one_line=True) for c in row] for row in rows])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def at_least_one(text: str) -> int:
    """An argparse ``type`` for a count that must be a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """A command's result: ``data`` as JSON with ``--json``, else ``text`` for people."""
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else printable(text))


def emit_list(args: argparse.Namespace, items: Iterable[Any],
              row: Callable[[Any], Sequence[object]], headers: Sequence[str],
              json_of: Callable[[Any], Any], empty: str) -> None:
    """:func:`emit` of a list that may be long (``kpnode list`` of a node's years): with
    ``--json`` each item is written as it comes, the same text ``json.dumps`` of the whole
    list gives; for people only the table's cells are held, not the items. Holding every
    item, its JSON and the text at once took a gigabyte for 60,000 certificates."""
    if args.json:
        # Spooled to a file, not to stdout: an item that fails midway (a record kpx cannot
        # read) must leave stdout to the error's own JSON line (fail), not glued to the
        # start of a list; the memory stays that of one item.
        with tempfile.TemporaryFile("w+", encoding="utf-8") as out:
            first = True
            for item in items:
                text = json.dumps(json_of(item), indent=2, sort_keys=True)
                out.write(("[\n" if first else ",\n") + textwrap.indent(text, "  "))
                first = False
            out.write("[]\n" if first else "\n]\n")
            out.seek(0)
            shutil.copyfileobj(out, sys.stdout)
        return
    rows = [row(item) for item in items]
    print(printable(table(rows, headers) if rows else empty))


def complain(text: str, prog: str = "kpnode") -> None:
    """Why a command failed, on stderr (the text may quote a partner or a broker)."""
    # continuation lines indented: quoted text cannot start a line that looks like ours
    print(f"{prog}: {printable(text)}".replace("\n", "\n  "), file=sys.stderr)


def fail(args: argparse.Namespace, code: int, text: str, *, reason: str | None = None,
         problems: Sequence[Problem] = (), prog: str = "kpnode") -> NoReturn:
    """End a command that failed: why on stderr, for people; with ``--json`` also on
    stdout, for the script that asked for JSON and would otherwise read nothing. One
    line, as ``status --watch --json`` writes one document a line."""
    complain(text, prog)
    for problem in problems:
        print(printable(f"  {problem}  [{problem.reason}]"), file=sys.stderr)
    if getattr(args, "json", False):
        with contextlib.suppress(OSError):
            print(json.dumps({"ok": False, "exit_code": code, "error": text.rstrip(":"),
                              "reason": None if reason is None else str(reason),
                              "problems": [p.to_wire() for p in problems]},
                             sort_keys=True), flush=True)
    raise SystemExit(code) from None
