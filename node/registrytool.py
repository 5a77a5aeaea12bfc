"""``kpnode registry ...``: the KP Chair keeps the Participant registry and publishes it.

The Chair's directory (``--dir``) holds ``chair.key`` (from ``kpnode chair init`` or
``registry init``), ``registry.json`` — the draft, always carrying the version it will be
published under — ``registry.kpx``, the newest signed registry, and ``published/``, every
version ever signed. Each edit is one command that checks the change against the protocol's
own validation (:mod:`node.chair`) before writing the draft; ``publish`` signs the draft,
writes it to file and sends it to every node over the broker's ``kpx.registry`` fanout, then
moves the draft on to the next version. Nodes accept only a newer version signed by the
Chair, store it and apply it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from node.chair import (
    RegistryEditError,
    add_key,
    add_participant,
    embargo,
    end_key,
    registry_from_json,
    registry_to_json,
    revoke_key,
    set_status,
    sign_registry,
)
from node.config import CONFIG_NAME, default_authority, node_directory
from node.files import write_whole
from node.jsontext import JsonTextError, parse_json
from node.keyfile import read_signing_key, write_signing_key
from node.registry import utc_text
from node.service import now_ms
from node.terminal import emit
from protocol import (
    ParticipantStatus,
    ProtocolError,
    RegistryUpdate,
    decode_body,
    key_id,
    parse_frame,
)
from protocol.keys import KEY_ID_SIZE

DRAFT = "registry.json"
SIGNED = "registry.kpx"
PUBLISHED = "published"
CHAIR_KEY = "chair.key"
#: the Chair's public key in hex: what every node.toml and `deploy definitions` need
CHAIR_PUBLIC = "chair.pub"
#: the Chair's keys of before each rotation of its key (KEYID.key): out of use, kept
FORMER_CHAIR_KEYS = "former-chair-keys"


class ChairError(Exception):
    """A one-line reason the Chair's command cannot be carried out."""


class BrokerUnreachable(ChairError):
    """The signed registry could not be handed to the broker (exit 3, like the node's
    other commands that need a service they cannot reach)."""


#: ms since 1970 are taken from 2001-09-09 (13 digits) on: '20261231' is a date without
#: its dashes, not 20,261 seconds after 1970, and a key ending then would be long expired.
MIN_MS_INSTANT = 10**12


def parse_instant(text: str) -> int:
    """``now``, ms since the epoch (13 digits), a date (midnight UTC) or an ISO 8601
    instant → ms."""
    if text == "now":
        return now_ms()
    if text.isdigit():
        if not MIN_MS_INSTANT <= int(text) < 10**14:
            raise ChairError(f"{text!r}: write a date as 2026-12-31, or ms since 1970 "
                             "(13 digits)")
        return int(text)
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                raise ChairError(f"{text!r}: give a time zone (e.g. Z or +02:00)")
    except ValueError:
        raise ChairError(f"{text!r} is not a date, an ISO 8601 instant or ms") from None
    return int(moment.timestamp() * 1000)


def parse_public_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ChairError(f"public key {text!r} is not hex") from None
    if len(key) != 32:
        raise ChairError("a public key is 32 bytes (64 hex characters)")
    return key


def listed_key(update: RegistryUpdate, text: str) -> bytes:
    """The public key ``text`` names in the draft: the key itself (64 hex digits) or its
    key id (32), which is how 'registry show' and 'kpnode key show' name keys."""
    if len(text.strip()) not in (2 * KEY_ID_SIZE, 64):
        raise ChairError(f"{text!r} is neither a public key (64 hex characters) nor a key "
                         f"id ({2 * KEY_ID_SIZE}, as 'registry show' prints it)")
    if len(text.strip()) != 2 * KEY_ID_SIZE:
        return parse_public_key(text)
    try:
        wanted = bytes.fromhex(text)
    except ValueError:
        raise ChairError(f"key id {text!r} is not hex") from None
    for p in update.participants:
        for a in p.authorities:
            for k in a.keys:
                if key_id(k.public_key) == wanted:
                    return k.public_key
    raise ChairError(f"no key with id {wanted.hex()} in the registry draft")


def _iso(ms: int | None) -> str:
    return "-" if ms is None else utc_text(ms)


class ChairDirectory:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def draft_path(self) -> Path:
        return self.directory / DRAFT

    def key(self) -> SigningKey:
        return read_signing_key(self.directory / CHAIR_KEY)

    def make_key(self) -> SigningKey:
        """A new Chair key, with its public half in chair.pub beside it."""
        key = SigningKey.generate()
        write_signing_key(self.directory / CHAIR_KEY, key)
        write_whole(self.directory / CHAIR_PUBLIC, bytes(key.verify_key).hex() + "\n", mode=0o644)
        return key

    def load(self) -> RegistryUpdate:
        try:
            data = parse_json(self.draft_path.read_bytes())
        except FileNotFoundError:  # exit 3, as a node's missing node.toml or registry
            from node.config import ConfigError

            raise ConfigError(f"no {DRAFT} in {self.directory}: run 'kpnode registry init' "
                              "first (or give the Chair's directory with --dir)") from None
        except JsonTextError as exc:
            raise ChairError(f"{self.draft_path}: {exc}") from None
        return registry_from_json(data)

    def save(self, update: RegistryUpdate) -> None:
        write_whole(self.draft_path, json.dumps(registry_to_json(update), indent=2) + "\n",
                    mode=0o644)


def chair_directory(given: str | None) -> ChairDirectory:
    """The Chair's directory named by ``--dir`` or ``$KPX_NODE_DIR``; never a node's.

    The Chair's signed registry has the node's file name (registry.kpx): published into a
    node's directory, say through a ``KPX_NODE_DIR`` set for the node's own commands, it
    replaced the node's registry with one the node cannot verify, and the node would not
    start again."""
    directory = node_directory(given)
    if (directory / CONFIG_NAME).exists():
        raise ChairError(f"{directory} is a node's directory (it holds {CONFIG_NAME}); the "
                         "Chair's registry tool keeps a directory of its own: give it with "
                         "--dir")
    return ChairDirectory(directory)


def summary(update: RegistryUpdate) -> dict[str, Any]:
    return {
        "version": update.version,
        "embargoed_origins": list(update.embargoed_origins),
        "participants": [{
            "code": p.code, "name": p.name, "status": str(p.status),
            "authorities": [{
                "id": a.id, "name": a.name,
                "keys": [{"public_key": k.public_key.hex(),
                          "key_id": key_id(k.public_key).hex(),
                          "valid_from": k.valid_from, "valid_until": k.valid_until,
                          "revoked_at": k.revoked_at} for k in a.keys]}
                for a in p.authorities]}
            for p in update.participants],
    }


def render(update: RegistryUpdate) -> str:
    lines = [f"registry draft, to be published as version {update.version}",
             "embargoed origins: " + (", ".join(update.embargoed_origins) or "none"), ""]
    for p in update.participants:
        lines.append(f"{p.code}  {p.name}  [{p.status}]")
        for a in p.authorities:
            lines.append(f"    {a.id}  {a.name}")
            for k in a.keys:
                state = "revoked " + _iso(k.revoked_at) if k.revoked_at is not None else (
                    f"valid {_iso(k.valid_from)} .. {_iso(k.valid_until)}")
                lines.append(f"        key {key_id(k.public_key).hex()}  {state}")
    return "\n".join(lines)


# -- commands ------------------------------------------------------------------------


def _edit(args: argparse.Namespace, change: Callable[[RegistryUpdate], RegistryUpdate],
          done: str) -> None:
    chair = chair_directory(args.dir)
    try:
        update = change(chair.load())
    except RegistryEditError as exc:
        raise ChairError(str(exc)) from None
    chair.save(update)
    emit(args, summary(update), f"{done} (draft of version {update.version}; "
          "'kpnode registry publish' to send it)")


def cmd_rotate_chair_key(args: argparse.Namespace) -> None:
    """A new Chair key; the old one kept out of use in former-chair-keys/."""
    chair = chair_directory(args.dir)
    old = bytes(chair.key().verify_key)  # a missing or exposed key file: refused here
    former = chair.directory / FORMER_CHAIR_KEYS
    former.mkdir(mode=0o700, exist_ok=True)
    kept = former / f"{key_id(old).hex()}.key"
    # Every key the Chair had before, the oldest first: registries each signed are still
    # in the nodes' databases and logs, and verify only while it stays listed.
    earlier = sorted((p for p in former.glob("*.key") if p != kept),
                     key=lambda p: p.stat().st_mtime)
    formers = [*(bytes(read_signing_key(p).verify_key).hex() for p in earlier), old.hex()]
    # The old key is kept in former-chair-keys/ before the new one takes its name, and the
    # new one takes it in one rename: moved away first, a rotation stopped in between
    # (Ctrl-C, kill -9) left no chair.key, and the Chair could sign nothing.
    with contextlib.suppress(FileExistsError):  # kept there by a rotation stopped since
        os.link(chair.directory / CHAIR_KEY, kept)
    fresh = chair.directory / (CHAIR_KEY + ".new")  # never printed, never given out
    fresh.unlink(missing_ok=True)
    key = SigningKey.generate()
    write_signing_key(fresh, key)
    os.replace(fresh, chair.directory / CHAIR_KEY)
    new = bytes(key.verify_key)
    write_whole(chair.directory / CHAIR_PUBLIC, new.hex() + "\n", mode=0o644)
    listed = ", ".join(f'"{k}"' for k in formers)
    emit(args, {"chair_public_key": new.hex(), "former_chair_public_key": old.hex(),
                "former_chair_public_keys": formers, "former_key_file": str(kept)},
         f"New Chair key; the old one is kept, out of use, in {kept}.\n"
         f"  new Chair public key     {new.hex()}\n"
         f"  former Chair public key  {old.hex()}\n"
         "Next, in this order (deploy/RUNBOOK.md, 'Rotating the Chair's key'):\n"
         "  1. give the new public key to every node's operator out of band, as the first;\n"
         "  2. each sets in node.toml, and restarts 'kpnode run':\n"
         f"       chair_public_key = \"{new.hex()}\"\n"
         f"       former_chair_public_keys = [{listed}]\n"
         "     (every former key, not only the last: each verifies the registries it signed);\n"
         "  3. 'kpnode registry publish' signs the next version with the new key. Nodes\n"
         "     take registries from the new key only: one not yet reconfigured holds it as\n"
         "     a dead letter, and takes it from registry.kpx or a --resend once it is.")


def cmd_init(args: argparse.Namespace) -> None:
    chair = chair_directory(args.dir)
    directory = chair.directory
    directory.mkdir(parents=True, exist_ok=True)
    if chair.draft_path.exists():
        raise ChairError(f"{chair.draft_path} exists already")
    if not (directory / CHAIR_KEY).exists():
        chair.make_key()
    public = bytes(chair.key().verify_key).hex()
    try:
        listed = (directory / CHAIR_PUBLIC).read_text().strip()
    except (OSError, UnicodeDecodeError):
        listed = None
    # missing for a Chair key from before chair.pub; empty or other when an init was
    # stopped while it wrote it (Ctrl-C, kill -9, a full disk)
    if listed != public:
        write_whole(directory / CHAIR_PUBLIC, public + "\n", mode=0o644)
    # A draft lost (deleted, not restored with the rest) where versions were signed: an
    # empty version 1 was written, which publish refused, and whose advice (a higher
    # version) signed a registry without a Participant, every certificate then refused.
    # The draft starts from the newest signed registry instead, as publish leaves it.
    draft = RegistryUpdate(version=1, participants=())
    newest = newest_signed(directory)
    if newest is not None:
        try:
            signed = decode_body(parse_frame(newest[1].read_bytes()).body).payload
        except (OSError, ProtocolError) as exc:
            raise ChairError(f"{newest[1]} is no registry to start the draft from: {exc}"
                             ) from None
        if not isinstance(signed, RegistryUpdate):
            raise ChairError(f"{newest[1]} is no registry to start the draft from")
        draft = RegistryUpdate(version=signed.version + 1, participants=signed.participants,
                               embargoed_origins=signed.embargoed_origins)
    chair.save(draft)
    started = (f"\n  draft of version {draft.version}, from the signed {newest[1]}"
               if newest is not None else "")
    emit(args, {"directory": str(directory), "chair_public_key": public,
                "version": draft.version},
          f"Chair directory ready in {directory}\n  Chair public key {public}{started}\n"
          "Give it to every node (chair_public_key in node.toml).")


def cmd_show(args: argparse.Namespace) -> None:
    update = chair_directory(args.dir).load()
    emit(args, summary(update), render(update))


def cmd_add_participant(args: argparse.Namespace) -> None:
    code = args.code.upper()
    authority = args.authority or default_authority(code)
    _edit(args, lambda u: add_participant(
        u, code, args.name, authority, args.authority_name or f"{args.name} KP authority",
        parse_public_key(args.key), parse_instant(args.valid_from)),
        f"added {code} with authority {authority}")


def cmd_add_key(args: argparse.Namespace) -> None:
    code = args.code.upper()
    authority = args.authority or default_authority(code)
    until = parse_instant(args.valid_until) if args.valid_until else None
    _edit(args, lambda u: add_key(u, code, authority, parse_public_key(args.key),
                                  parse_instant(args.valid_from), until, args.authority_name),
          f"added a key to {authority}")


def cmd_end_key(args: argparse.Namespace) -> None:
    at = parse_instant(args.at)
    _edit(args, lambda u: end_key(u, listed_key(u, args.key), at, now_ms()),
          f"key ends at {_iso(at)}")


def cmd_revoke_key(args: argparse.Namespace) -> None:
    at = parse_instant(args.at)
    _edit(args, lambda u: revoke_key(u, listed_key(u, args.key), at),
          f"key revoked from {_iso(at)}")


def _status_command(status: ParticipantStatus) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        code = args.code.upper()
        _edit(args, lambda u: set_status(u, code, status), f"{code} is now {status}")
    return run


def cmd_embargo(args: argparse.Namespace) -> None:
    origin = args.origin.upper()
    _edit(args, lambda u: embargo(u, origin, not args.lift),
          f"origin {origin} {'no longer ' if args.lift else ''}embargoed")


def newest_signed(directory: Path) -> tuple[int, Path] | None:
    """The newest version the Chair has signed, and the file that holds it: in
    ``published/``, or ``registry.kpx`` (which ``kpnode deploy network`` signs as version 1
    without a copy in ``published/``), read without its signature: the Chair's own file,
    perhaps signed by a former key."""
    found = []
    for path in (directory / PUBLISHED).glob("registry-v*.kpx"):
        digits = path.name.removeprefix("registry-v").removesuffix(".kpx")
        if digits.isascii() and digits.isdigit():
            found.append((int(digits), path))
    try:
        payload = decode_body(parse_frame((directory / SIGNED).read_bytes()).body).payload
    except (OSError, ProtocolError):
        pass
    else:
        if isinstance(payload, RegistryUpdate):
            found.append((payload.version, directory / SIGNED))
    # the first of equal versions: the file in published/ is the record
    return max(found, key=lambda f: f[0], default=None)


def _stopped_publish(path: Path, draft: RegistryUpdate, key: SigningKey) -> bytes | None:
    """The frame at ``path`` if the Chair's current key signed it over exactly ``draft``:
    a publish that was stopped before it moved the draft on; else None."""
    from node.registry import open_registry_frame

    try:
        frame = path.read_bytes()
        signed = open_registry_frame(frame, bytes(key.verify_key)).update
    except (OSError, ProtocolError):
        return None
    return frame if signed == draft else None


def cmd_publish(args: argparse.Namespace) -> None:
    from node.brokerurl import broker_url_problem
    from node.registry import open_registry_frame

    # Refused before anything is signed or written: a version once signed stays on record.
    urls = list(args.broker or ())
    if args.password_file:
        # The password from a file, never on the command line (every local user sees a
        # process's arguments).
        from node.config import ConfigError
        from node.deploy import broker_url, read_password

        if not urls:
            raise ChairError("--password-file needs --broker")
        password = read_password(Path(args.password_file))  # a ConfigError: exit 3
        try:
            urls = [broker_url(url, args.user, password) for url in urls]
        except ConfigError as exc:
            raise ChairError(f"--broker: {exc}") from None
    for url in urls:
        if (problem := broker_url_problem(url)) is not None:
            raise ChairError(f"--broker: {problem}")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ChairError(f"--out: no directory {Path(args.out).resolve().parent}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_file():
        raise ChairError(f"--out: {args.out} is not a file")
    chair = chair_directory(args.dir)
    signed = chair.directory / SIGNED
    outputs = []
    if args.resend:
        # The same bytes again, never a second signature over a version: nodes handed the
        # file and nodes reached through the broker must hold one and the same frame.
        if not args.broker and not args.out:
            raise ChairError("--resend needs --broker or --out: where to send it")
        try:
            frame = signed.read_bytes()
        except FileNotFoundError:
            raise ChairError(f"nothing signed yet: no {signed}") from None
        try:
            version = open_registry_frame(frame, bytes(chair.key().verify_key)).version
        except ProtocolError:
            raise ChairError(f"{signed} was signed by a former Chair key (before 'kpnode "
                             "registry rotate-chair-key'): nodes take no such registry any "
                             "more; publish the next version instead") from None
    else:
        update = chair.load()
        version = update.version
        published = chair.directory / PUBLISHED
        on_record = published / f"registry-v{version:06d}.kpx"
        newest = newest_signed(chair.directory)
        # A publish stopped after it signed (Ctrl-C, kill -9) left the version on record
        # with the draft not moved on: the rerun finishes it with the same frame.
        finished = (_stopped_publish(newest[1], update, chair.key())
                    if newest is not None and newest[0] == version else None)
        if finished is None and newest is not None and version <= newest[0]:
            # A draft set back (restored from a backup, edited by hand): a second, other
            # frame for a version nodes may hold already would split the network, and a
            # lower one every node ignores (versions only move forward), so a suspension
            # or a revocation in it would never take effect.
            raise ChairError(f"version {version} is not above version {newest[0]}, signed "
                             f"already ({newest[1]}); set the draft's version to "
                             f"{newest[0] + 1} or above")
        if finished is not None:
            frame = finished
        else:
            try:
                frame = sign_registry(update, chair.key(), now_ms())
            except RegistryEditError as exc:
                raise ChairError(str(exc)) from None
        published.mkdir(exist_ok=True)
        # each whole or not at all: a file cut short was still counted as signed (so the
        # rerun was refused), and an empty registry.kpx was resent as 'signed by a
        # former Chair key'
        if not on_record.exists():
            write_whole(on_record, frame, mode=0o644)
        write_whole(signed, frame, mode=0o644)
        outputs.append(str(signed))
        # The draft moves on as soon as the version is signed and on record, whether or not
        # the broker takes it: a retry resends these bytes (--resend), it does not re-sign.
        chair.save(update.__class__(version=version + 1, participants=update.participants,
                                    embargoed_origins=update.embargoed_origins))
    if args.out:
        Path(args.out).write_bytes(frame)
        outputs.append(args.out)
    sent_to = None
    if urls:
        sent_to = asyncio.run(_send(urls, frame, version, outputs,
                                    from_file=bool(args.password_file)))
    where = " and ".join([*outputs, *([f"every node through {sent_to}"] if sent_to else [])])
    emit(args, {"version": version, "files": outputs, "broker": sent_to},
          f"registry version {version} {'sent again' if args.resend else 'signed and published'}"
          f" to {where}")


async def _send(urls: list[str], frame: bytes, version: int, outputs: list[str], *,
                from_file: bool = False) -> str:
    from node.brokerclient import amqp_library_logs_quiet
    from node.brokerurl import redact, why_connect_failed
    from node.transport import publish_registry

    errors = []
    for url in urls:
        try:
            with amqp_library_logs_quiet():
                await publish_registry(url, frame)
            return redact(url)
        except Exception as exc:  # any broker failure: try the next endpoint, then report
            why = why_connect_failed(url, exc)
            if "NOT_FOUND" in why and "kpx.registry" in why:
                why = ("no node has run against this broker yet, so it has no kpx.registry "
                       "exchange to publish to: start the nodes (or import the broker "
                       "definitions) first")
            errors.append(f"{redact(url)}: {why}")
    written = f" (written to {', '.join(outputs)})" if outputs else ""
    # as it was given: a password read from a file stays off the command line (ps)
    again = ("--resend --password-file FILE --broker TEMPLATE" if from_file
             else "--resend --broker URL")
    raise BrokerUnreachable(
        f"registry version {version} is signed{written} but could not be sent to the "
        f"broker: {'; '.join(errors).rstrip('.')}. Send it again with 'kpnode registry "
        f"publish {again}', or hand the file to the nodes")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    """``kpnode registry ...``; ``--dir`` is the Chair's directory."""
    registry = sub.add_parser("registry", help="the KP Chair: edit and publish the registry")
    rsub = registry.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], None],
            help_: str) -> argparse.ArgumentParser:
        sp = rsub.add_parser(name, help=help_, description=help_, parents=[common])
        sp.set_defaults(handler=handler)
        return sp

    add("init", cmd_init, "create the Chair's key (if missing) and an empty registry draft "
        "(or, with the draft lost, one from the newest signed registry)")
    add("show", cmd_show, "the draft: Participants, authorities, keys, embargoes")
    sp = add("add-participant", cmd_add_participant, "add a Participant with its first key")
    sp.add_argument("code")
    sp.add_argument("--name", required=True)
    sp.add_argument("--key", required=True, help="the node's public key, hex "
                    "(printed by 'kpnode init')")
    sp.add_argument("--authority", help="issuing authority id (default CODE-KPA)")
    sp.add_argument("--authority-name", help="the authority's name (default: "
                    "'NAME KP authority')")
    sp.add_argument("--valid-from", default="now", help="date, ISO instant or ms (default now)")
    sp = add("add-key", cmd_add_key, "add a key (rotation) or an authority with its key")
    sp.add_argument("code")
    sp.add_argument("--key", required=True, help="public key, hex ('kpnode key new')")
    sp.add_argument("--authority", help="authority id (default CODE-KPA)")
    sp.add_argument("--authority-name", help="add the authority with this name")
    sp.add_argument("--valid-from", default="now", help="WHEN it may sign from: a date, "
                    "ISO instant or ms (default now)")
    sp.add_argument("--valid-until", help="WHEN it lapses (default: until 'end-key')")
    sp = add("end-key", cmd_end_key, "let a key lapse at a time (end of a rotation)")
    sp.add_argument("--key", required=True, help="public key, hex, or its key id ('registry "
                    "show')")
    sp.add_argument("--at", required=True, help="WHEN it lapses: a date, ISO instant or ms")
    sp = add("revoke-key", cmd_revoke_key, "revoke a key: refused from --at (default now)")
    sp.add_argument("--key", required=True, help="public key, hex, or its key id ('registry "
                    "show')")
    sp.add_argument("--at", default="now", help="WHEN: a date, ISO instant or ms "
                    "(default now)")
    for name, status, text in (
            ("suspend", ParticipantStatus.SUSPENDED, "suspend a Participant"),
            ("reactivate", ParticipantStatus.ACTIVE, "reactivate a suspended Participant"),
            ("withdraw", ParticipantStatus.WITHDRAWN, "record a Participant's withdrawal")):
        sp = add(name, _status_command(status), text)
        sp.add_argument("code")
    sp = add("embargo", cmd_embargo, "embargo an origin (--lift to end it)")
    sp.add_argument("origin")
    sp.add_argument("--lift", action="store_true")
    add("rotate-chair-key", cmd_rotate_chair_key, "make a new Chair key and keep the old "
        "one out of use (then reconfigure every node, then publish)")
    sp = add("publish", cmd_publish, "sign the draft as the next version; write it and send "
             "it to every node")
    sp.add_argument("--broker", action="append", help="AMQP URL (repeat for a cluster); "
                    "without it only files are written")
    sp.add_argument("--password-file", help="the broker user's password file: --broker is "
                    "then a template, amqp://{user}:{password}@host:5672/kpx, filled in "
                    "with it (a password on the command line is visible to every local user)")
    sp.add_argument("--user", default="kpx-chair",
                    help="broker user for {user} (default kpx-chair)")
    sp.add_argument("--out", help="also write the signed registry here")
    sp.add_argument("--resend", action="store_true", help="send the last signed version "
                    "again (to --broker, --out) without signing anything")
