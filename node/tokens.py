"""API tokens: who may call a node's HTTP API and web console, and in which role.

Tokens live in ``tokens.json`` in the node directory (mode 0600), hashed: the file says who
may log in but cannot be used to log in. A token is 256 random bits, so a plain SHA-256 is
enough (no password stretching needed) and comparisons are constant-time. The file is
re-read when it changes, so ``kpnode token add`` takes effect on a running node at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from node.files import write_whole
from node.jsontext import parse_json
from node.terminal import emit, table
from protocol.schema import encodable

TOKENS_NAME = "tokens.json"
TOKEN_PREFIX = "kpx_"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class Role(StrEnum):
    #: issues, confirms, cancels and replaces certificates
    OFFICER = "officer"
    #: reads everything, changes nothing
    MONITOR = "monitor"


class TokenError(Exception):
    """Bad token name, unknown token, or an unreadable tokens file."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a call: the token's name and its role."""

    name: str
    role: Role

    @property
    def may_act(self) -> bool:
        return self.role is Role.OFFICER


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, directory: Path) -> None:
        self.path = directory / TOKENS_NAME
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[dict[str, Any]] = []

    def entries(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, []
            return []
        # the inode too: every write is a new file, and two writes within one clock tick
        # can leave the same time and size (a revoke read as nothing changed)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = parse_json(self.path.read_bytes())
                entries = data["tokens"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TokenError(f"{self.path}: unreadable tokens file: {exc}") from exc
            if not isinstance(entries, list):
                raise TokenError(f"{self.path}: 'tokens' must be a list")
            for i, entry in enumerate(entries):
                # A hand-edited file: every use of an entry below trusts these three.
                # The name goes into the evidence log with every call the token makes, so
                # it must be text that can be written (a lone surrogate cannot); names
                # written by hand before 'token add' had its rule stay valid.
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                        and entry["name"] and encodable(entry["name"])
                        and isinstance(entry.get("sha256"), str)
                        and entry.get("role") in {r.value for r in Role}):
                    raise TokenError(f"{self.path}: entry {i} needs a name (UTF-8 text), a "
                                     f"sha256 and a role ({', '.join(r.value for r in Role)})")
            self._stamp, self._entries = stamp, entries
        return self._entries

    def authenticate(self, token: str) -> Principal | None:
        if not token.isascii():  # issued tokens are ASCII; header bytes may be anything
            return None
        return self.holder_of(token_hash(token))

    def holder_of(self, digest: str) -> Principal | None:
        """Who holds the token with this hash now, with the role it has now: None once it
        is revoked. A console session asks on every request, so it ends with its token."""
        found: Principal | None = None
        for entry in self.entries():
            # no early exit: the time taken does not say how many entries were compared
            if hmac.compare_digest(str(entry.get("sha256", "")), digest):
                found = Principal(str(entry["name"]), Role(entry["role"]))
        return found

    def add(self, name: str, role: Role, now_ms: int) -> str:
        """A new token for ``name``; returned once, only its hash is kept."""
        if not NAME.fullmatch(name):
            raise TokenError(f"token name {name!r}: use letters, digits and ._@- "
                             "(at most 64)")
        with self._changing() as entries:
            if any(e["name"] == name for e in entries):
                raise TokenError(f"a token named {name!r} exists already; revoke it first")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            self._write([*entries, {"name": name, "role": str(role),
                                    "sha256": token_hash(token), "created_at": now_ms}])
        return token

    def revoke(self, name: str) -> None:
        with self._changing() as entries:
            kept = [e for e in entries if e["name"] != name]
            if len(kept) == len(entries):
                raise TokenError(f"no token named {name!r}")
            self._write(kept)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[dict[str, Any]]]:
        """The entries as they are now, under a lock for the read-modify-write: two
        commands at once each wrote back what it had read, so a revoke could be undone by
        an add and a token reported as made could be missing."""
        lock = self.path.with_name(TOKENS_NAME + ".lock")
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._stamp = None  # read afresh: another process may have written
            yield self.entries()
        finally:
            os.close(fd)  # releases the lock

    def _write(self, entries: list[dict[str, Any]]) -> None:
        # a temporary file of its own: a shared name let one writer rename another's
        # half-written file into place
        write_whole(self.path, json.dumps({"tokens": entries}, indent=2))
        self._stamp = None


# -- kpnode token ... ---------------------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    token = sub.add_parser("token", help="API and console tokens: add, list, revoke")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    text = "create a token (printed once)"
    sp = token_sub.add_parser("add", parents=[common], help=text, description=text)
    sp.add_argument("name", help="who holds it, e.g. customs-system or j.doe")
    sp.add_argument("--role", required=True, choices=[r.value for r in Role],
                    help="an officer may issue, replace, cancel and confirm; a monitor "
                    "only reads")
    sp.set_defaults(handler=_cmd_add)
    text = "the tokens' names and roles"
    sp = token_sub.add_parser("list", parents=[common], help=text, description=text)
    sp.set_defaults(handler=_cmd_list)
    text = "remove a token (its sessions end at once)"
    sp = token_sub.add_parser("revoke", parents=[common], help=text, description=text)
    sp.add_argument("name", help="the name it was added under")
    sp.set_defaults(handler=_cmd_revoke)


def _tokens(args: argparse.Namespace) -> Tokens:
    from node.cli import node_dir
    from node.config import CONFIG_NAME, ConfigError

    directory = node_dir(args)
    if not (directory / CONFIG_NAME).exists():  # tokens need no key or registry yet
        raise ConfigError(f"{directory} is not a node directory (no {CONFIG_NAME})")
    return Tokens(directory)


def _cmd_add(args: argparse.Namespace) -> None:
    from node.cli import UserError
    from node.service import now_ms

    try:
        token = _tokens(args).add(args.name, Role(args.role), now_ms())
    except TokenError as exc:
        raise UserError(str(exc)) from None
    emit(args, {"name": args.name, "role": args.role, "token": token},
         f"token for {args.name} ({args.role}); shown once, keep it secret:\n{token}")


def _cmd_list(args: argparse.Namespace) -> None:
    from node.cli import UserError

    try:
        entries = _tokens(args).entries()
    except TokenError as exc:
        raise UserError(str(exc)) from None
    rows = [[e["name"], e["role"]] for e in entries]
    emit(args, [{"name": e["name"], "role": e["role"], "created_at": e.get("created_at")}
                for e in entries],
         table(rows, ("name", "role")) if rows else "no tokens")


def _cmd_revoke(args: argparse.Namespace) -> None:
    from node.cli import UserError

    try:
        _tokens(args).revoke(args.name)
    except TokenError as exc:
        raise UserError(str(exc)) from None
    emit(args, {"revoked": args.name}, f"token {args.name} revoked")
