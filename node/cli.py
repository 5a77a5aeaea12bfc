"""``kpnode``: the command line of a kpx node.

Readable tables for people, ``--json`` for machines; on bad input a one-line error on
stderr and a non-zero exit (1: refused or invalid input, 2: usage, 3: environment such as
a missing configuration or registry).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from node import deploy, registrytool, simulate, tokens
from node.chair import RegistryEditError, RegistryJsonError, sign_registry_file
from node.config import ConfigError, default_authority, load_config, node_directory
from node.evidence import Entry, unsupported_records, verify_chain
from node.jsontext import JsonTextError, parse_json
from node.keyfile import read_signing_key, write_signing_key
from node.logs import configure_logging
from node.machine import (
    DAYS_AHEAD_AT_ISSUE,
    Record,
    Refusal,
    Side,
    State,
    calendar_problems,
    day_of,
)
from node.network import init_node
from node.registry import (
    key_fault_remedy,
    open_registry_frame,
    unverified_registry_version,
    utc_text,
)
from node.service import CommandRefused, Node, RegistryFileError, now_ms
from node.status import held_key_ids, running_pid
from node.store import StoreError, UnreadableRecord
from node.terminal import at_least_one, complain, emit, emit_list, fail, printable, table
from node.views import (
    carats,
    history_json,
    parse_amount,
    parse_date,
    partner_filter,
    record_json,
    record_note,
    usd,
)
from protocol import (
    Certificate,
    Line,
    ProtocolError,
    Reason,
    ValidationError,
    key_id,
    validate_certificate,
)


class UserError(Exception):
    """Bad input from the user: printed as one line, exit 1."""


class UsageError(Exception):
    """The command line does not parse (argparse's error): exit 2, with ``--json`` on
    stdout too, as every other failure."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its subcommands' too, whose usage errors reach :func:`main`."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(self.prog, message)


EXIT_REFUSED, EXIT_USAGE, EXIT_ENVIRONMENT = 1, 2, 3


RECORD_HEADERS = ("side", "number", "partner", "state", "carats", "US$", "expires", "note")


def record_row(record: Record) -> list[object]:
    note = record_note(record)
    c = record.certificate
    return [record.side, record.number, record.partner, record.state,
            carats(c.carats_hundredths), usd(c.usd_cents), c.expires_on.isoformat(), note]


# -- input parsing ----------------------------------------------------------------------


def read_json(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        return parse_json(text)
    except JsonTextError as exc:
        raise UserError(f"{path}: {exc}") from None


def read_certificate(path: str) -> Certificate:
    return validate_certificate(read_json(path))


def decimal_amount(text: str, what: str, *, zero: bool = False) -> int:
    try:
        return parse_amount(text, what, zero=zero)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def received_lines(args: argparse.Namespace, record: Record) -> tuple[Line, ...] | None:
    """What arrived, from --line HS=CARATS:USD options or --carats/--value on a one-line
    certificate; ``None`` means 'exactly as declared'."""
    if args.line:
        if args.carats or args.value:
            raise UserError("use either --line or --carats/--value, not both")
        lines = []
        for spec in args.line:
            try:
                hs, amounts = spec.split("=", 1)
                ct, value = amounts.split(":", 1)
            except ValueError:
                raise UserError(f"--line {spec!r}: expected HS=CARATS:USD") from None
            # HS=0:0 names a declared line that did not arrive; every declared line must
            # be named (machine.arrived_lines), none signed as not arrived by omission
            lines.append(Line(hs_code=hs.strip(),
                              carats_hundredths=decimal_amount(ct, "carats", zero=True),
                              usd_cents=decimal_amount(value, "value", zero=True)))
        return tuple(lines)
    if not (args.carats or args.value):
        return None
    declared = record.certificate.lines
    if len(declared) != 1:
        raise UserError(f"{record.number} has {len(declared)} HS lines: give each with "
                        "--line HS=CARATS:USD")
    (line,) = declared
    return (Line(hs_code=line.hs_code,
                 carats_hundredths=decimal_amount(args.carats, "--carats")
                 if args.carats else line.carats_hundredths,
                 usd_cents=decimal_amount(args.value, "--value")
                 if args.value else line.usd_cents),)


def node_dir(args: argparse.Namespace) -> Path:
    return node_directory(args.dir)


def open_node(args: argparse.Namespace) -> Node:
    return Node.open(load_config(node_dir(args)))


# -- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    try:
        chair = bytes.fromhex(args.chair_key) if args.chair_key else b""
    except ValueError:
        raise UserError(f"--chair-key must be hex, not {args.chair_key!r}") from None
    try:
        config = init_node(node_dir(args), args.participant, authority=args.authority,
                           broker_urls=args.broker or (), chair_public_key=chair)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    public = bytes(config.signing_key().verify_key)
    data = {"directory": str(config.directory), "participant": config.participant,
            "authority": config.authority, "public_key": public.hex(),
            "key_id": key_id(public).hex()}
    emit(args, data, "\n".join([
        f"Created node {config.participant} in {config.directory}",
        f"  authority   {config.authority}",
        f"  public key  {public.hex()}",
        f"  key id      {key_id(public).hex()}",
        "Next: send the public key to the KP Chair to be put in the registry; put the",
        f"Chair-signed registry at {config.registry_path}"
        + ("" if chair else " and the Chair's public key in node.toml"),
        f"then run: kpnode run --dir {config.directory}",
    ]))


def cmd_run(args: argparse.Namespace) -> None:
    from node.runner import run_until_signalled
    from node.transport import TransportUnavailable

    config = load_config(node_dir(args))
    try:
        asyncio.run(run_until_signalled(config))
    except TransportUnavailable as exc:
        # Only at start: once running, the node rides out broker outages by itself.
        fail(args, EXIT_ENVIRONMENT, f"cannot start: {exc}")


def cmd_validate(args: argparse.Namespace) -> None:
    certificate = read_certificate(args.certificate)
    refusal = None
    checked = "against this node's registry"
    if args.dir or os.environ.get("KPX_NODE_DIR") or Path("node.toml").exists():
        node = open_node(args)
        try:
            refusal = node.check_issue(certificate)
        finally:
            node.close()
    else:
        # No registry here, but the calendar needs none: 'valid' for an expired
        # certificate, which issue then refused, misled.
        checked = "in form and dates only; give --dir to check it against a registry"
        problems = calendar_problems(certificate, day_of(now_ms()), DAYS_AHEAD_AT_ISSUE)
        if problems:
            refusal = Refusal(str(problems[0].reason), "; ".join(p.message for p in problems),
                              certificate=certificate.number, problems=tuple(problems))
    if refusal is not None:
        raise CommandRefused(refusal)
    emit(args, {"valid": True, "number": certificate.number, "checked": checked},
         f"{certificate.number}: valid ({checked})")


def cmd_issue(args: argparse.Namespace) -> None:
    certificate = read_certificate(args.certificate)
    with_node(args, lambda node: show_records(args, [node.issue(certificate)], "issued"))


def cmd_replace(args: argparse.Namespace) -> None:
    certificate = read_certificate(args.certificate)
    with_node(args, lambda node: show_records(
        args, [node.replace(args.number, certificate, args.reason)], "replacement issued"))


def cmd_cancel(args: argparse.Namespace) -> None:
    with_node(args, lambda node: show_records(
        args, [node.cancel(args.number, args.reason)], "cancelled"))


def cmd_confirm(args: argparse.Namespace) -> None:
    def run(node: Node) -> None:
        record = node.store.get(Side.IMPORT, args.number)
        lines = received_lines(args, record) if record else None
        received_on = None
        if args.received_on:
            try:
                received_on = parse_date(args.received_on)
            except ValueError:
                raise UserError("--received-on must be a date YYYY-MM-DD") from None
        confirmed = node.confirm(args.number, lines=lines, parcels=args.parcels,
                                 received_on=received_on, remarks=args.remarks or "")
        show_records(args, [confirmed], "confirmed")
    with_node(args, run)


def cmd_list(args: argparse.Namespace) -> None:
    states = [State(s) for s in args.state or []]
    side = Side(args.side) if args.side else None
    try:
        partner = partner_filter(args.partner) if args.partner else None
    except ValueError as exc:
        raise UserError(f"--partner: {exc}") from None
    with_node(args, lambda node: emit_list(
        args, node.store.each_record(side=side, states=states, partner=partner,
                                     last=args.last),
        record_row, RECORD_HEADERS, record_json, "no certificates"))


def cmd_show(args: argparse.Namespace) -> None:
    def run(node: Node) -> None:
        records = node.find(args.number)
        if not records:
            raise UserError(f"no certificate {args.number} at this node")
        history = history_json(node.store, args.number, records)
        data = {"records": [record_json(r) for r in records], "history": history}
        parts = [table([record_row(r) for r in records], RECORD_HEADERS)]
        for r in records:
            parts += discrepancy_lines(r)
            if r.rejection_text:
                parts.append(f"  {r.side} note: {printable(r.rejection_text, one_line=True)}")
            if r.certificate.remarks:
                parts.append(f"  certificate remarks: "
                             f"{printable(r.certificate.remarks, one_line=True)}")
            if r.confirmation is not None and r.confirmation.remarks:
                parts.append(f"  received {r.confirmation.received_on.isoformat()}, importer's "
                             f"remarks: {printable(r.confirmation.remarks, one_line=True)}")
        parts.append("")
        parts.append(table([[h["seq"], h["direction"], h["kind"], h["from"], h["to"],
                             h["message_id"], str(h["frame_sha256"])[:16]] for h in history],
                           ("#", "dir", "kind", "from", "to", "message id", "frame sha256")))
        emit(args, data, "\n".join(parts))
    with_node(args, run)


def _anchor(text: str) -> tuple[int, bytes]:
    """``SEQ:HASH`` as verify-log prints its head: an entry's number and its hash in hex."""
    seq, _, digest = text.partition(":")
    try:
        found = (int(seq), bytes.fromhex(digest))
    except ValueError:
        found = (0, b"")
    if not seq.isdigit() or found[0] < 1 or len(found[1]) != 32:
        raise argparse.ArgumentTypeError(
            f"an anchor is SEQ:HASH as verify-log printed it (e.g. 12:3f…, 64 hex digits), "
            f"not {text[:80]!r}")
    return found


def _registry_version(frame: bytes) -> str:
    try:
        return str(unverified_registry_version(frame))
    except ProtocolError:
        return "?"


def cmd_verify_log(args: argparse.Namespace) -> None:
    def run(node: Node) -> None:
        keys = [bytes(k.verify_key) for k in node.signing_keys]
        former = node.config.former_chair_public_keys
        unverified = []
        for frame in node.store.registry_frames():
            try:
                registry = open_registry_frame(frame, node.config.chair_public_key, former)
            except ProtocolError as exc:
                # A Chair key missing from former_chair_public_keys (the first of two
                # rotations, say): a fault to report, with what to do, not a crash.
                unverified.append(
                    f"registry version {_registry_version(frame)} in the database does not "
                    f"verify ({exc}): list every key the Chair signed with before, not only "
                    "the last, in former_chair_public_keys")
                continue
            keys += [k.public_key for p in registry.update.participants
                     for a in p.authorities for k in a.keys]
        # The log is read twice, as it streams from the database, and never held whole:
        # after a few years a node logs hundreds of thousands of frames, and a list of
        # them took most of a gigabyte. Only what the anchors and the head need is kept;
        # the records are read once, as they stream, too.
        anchored = {seq for seq, _ in args.anchor}
        hashes: dict[int, bytes] = {}
        count, last = 0, None
        def walked() -> Iterator[Entry]:
            nonlocal count, last
            for entry in node.store.evidence():
                count, last = count + 1, entry
                if entry.seq in anchored:
                    hashes[entry.seq] = bytes(entry.hash)
                yield entry
        records = 0
        def counted() -> Iterator[Record]:
            nonlocal records
            for record in node.store.each_record():
                records += 1
                yield record
        with node.store.snapshot():  # the records and both reads of one instant
            faults = unverified + [str(f) for f in verify_chain(
                walked(), keys, node.config.chair_public_key, former)]
            faults += unsupported_records(counted(), node.store.evidence(),
                                          today=day_of(node.clock()))
            faults += node.store.column_mismatches()
        for seq, digest in args.anchor:
            if seq not in hashes:
                faults.append(f"entry {seq}: the anchor's entry is not in the log (it was "
                              "cut short or rewritten)")
            elif hashes[seq] != digest:
                faults.append(f"entry {seq}: its hash {hashes[seq].hex()} is not the "
                              f"anchor's {digest.hex()}: the log up to it was rewritten")
        head = {"seq": last.seq, "hash": bytes(last.hash).hex()} if last else None
        data = {"entries": count, "records": records, "ok": not faults,
                "faults": faults, "head": head}
        text = (f"evidence log OK: {count} entries, chain and every signature "
                f"verified, and it backs all {records} records"
                if not faults else "evidence log FAILED:\n" + "\n".join(f"  {f}" for f in faults))
        if head is not None:
            # The chain is plain SHA-256: whoever holds the database can rewrite it and hash
            # it anew. Only a head kept elsewhere shows that, by --anchor.
            text += (f"\nhead: {head['seq']}:{head['hash']} (keep it outside this machine; "
                     "--anchor with it shows any rewrite of the log up to it)")
        emit(args, data, text)
        if faults:
            raise SystemExit(EXIT_REFUSED)
    with_node(args, run)


def _new_passphrase() -> str:
    import getpass

    from node.keyfile import passphrase_from_environment

    if os.environ.get("KPX_KEY_PASSPHRASE") or os.environ.get("KPX_KEY_PASSPHRASE_FILE"):
        found = passphrase_from_environment()
        assert found is not None
        return found
    if not sys.stdin.isatty():
        raise UserError("set KPX_KEY_PASSPHRASE or KPX_KEY_PASSPHRASE_FILE, or run from a "
                        "terminal to be asked for the passphrase")
    first = getpass.getpass("new passphrase: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the passphrases differ; nothing changed")
    return first


def cmd_key_new(args: argparse.Namespace) -> None:
    from nacl.signing import SigningKey

    from node.config import KEYS_DIR
    from node.keyfile import is_encrypted, passphrase_from_environment, require_passphrase_of

    config = load_config(node_dir(args))
    encrypted = [p for p in config.key_files() if is_encrypted(p)]
    passphrase = None
    if encrypted:
        # A plain key beside encrypted ones would lie on disk in the clear; one under
        # another passphrase would keep the node from starting.
        passphrase = passphrase_from_environment()
        if passphrase is None:
            # exit 3, as for issue or run without it: the environment lacks it
            raise ConfigError(f"this node's keys are encrypted ({encrypted[0]}): set "
                            "KPX_KEY_PASSPHRASE or KPX_KEY_PASSPHRASE_FILE to their "
                            "passphrase, or run from a terminal; nothing was written")
        require_passphrase_of(encrypted, passphrase)
    elif args.encrypt:
        passphrase = _new_passphrase()
    folder = config.path(KEYS_DIR)
    folder.mkdir(mode=0o700, exist_ok=True)
    key = SigningKey.generate()
    public = bytes(key.verify_key)
    path = folder / f"{key_id(public).hex()}.key"
    write_signing_key(path, key, passphrase=passphrase)
    # add-key's default authority is CODE-KPA: a node that signs as another needs its key
    # listed there, or it never signs with it (and none at all once the old key ends).
    authority = ("" if config.authority == default_authority(config.participant)
                 else f" --authority {config.authority}")
    emit(args, {"key_file": str(path), "public_key": public.hex(),
                "key_id": key_id(public).hex(), "authority": config.authority},
         "\n".join([
        f"New key written to {path}",
        f"  public key  {public.hex()}",
        "Next: the KP Chair adds it with 'kpnode registry add-key "
        f"{config.participant} --key {public.hex()}{authority} --valid-from WHEN' and "
        "publishes;",
        "restart a running 'kpnode run' (it reads keys/ at start); it then signs with it",
        "from WHEN on, by itself. Then the Chair ends the old key",
        "('kpnode registry end-key --key OLD --at LATER') once partners hold the new one.",
    ]))


def cmd_key_encrypt(args: argparse.Namespace) -> None:
    from node.keyfile import (
        encrypt_key_file,
        is_encrypted,
        lacks_public_key,
        require_passphrase_of,
    )

    config = load_config(node_dir(args))
    paths = [p for p in config.key_files() if p.exists()]
    todo = [p for p in paths if not is_encrypted(p)]
    # Encrypted before the public key was kept in the file: written anew with it, so that
    # commands that only read need no passphrase for them either.
    older = [p for p in paths if is_encrypted(p) and lacks_public_key(p)]
    if not todo and not older:
        raise UserError("every key file of this node is encrypted already")
    passphrase = _new_passphrase()
    # Refused rather than re-encrypting the others: that would need their passphrase too,
    # and a node whose keys open with different ones cannot start.
    require_passphrase_of(paths, passphrase)
    for path in todo:  # all of them readable first: a refusal half-way left some encrypted
        read_signing_key(path)
    for path in [*todo, *older]:
        encrypt_key_file(path, passphrase)
    emit(args, {"encrypted": [str(p) for p in todo], "rewritten": [str(p) for p in older]},
         "; ".join([*(["encrypted " + ", ".join(str(p) for p in todo)] if todo else []),
                    *([f"wrote {', '.join(str(p) for p in older)} anew with its public key "
                       "in the clear"] if older else [])])
         + "; the node needs KPX_KEY_PASSPHRASE (or KPX_KEY_PASSPHRASE_FILE, or a terminal) "
         "to start and to sign")


def cmd_key_show(args: argparse.Namespace) -> None:
    def run(node: Node) -> None:
        now = node.clock()
        current = bytes(node.signing_key(now).verify_key)
        fault = node.context(now).key_fault  # then no key signs: the fallback cannot either
        # `kpnode run` reads its keys when it starts: what these files say it signs with is
        # what it will sign with once restarted, not necessarily what it signs with now.
        pid = running_pid(node.config.directory)
        held = held_key_ids(node.config.directory) if pid is not None else None
        rows = []
        for k in node.signing_keys:
            public = bytes(k.verify_key)
            owner = node.registry.key_owner(key_id(public))
            if owner is None:
                state = "not in the registry"
            elif (owner.participant, owner.authority.id) != (node.me, node.config.authority):
                # never signs here (a file copied from another node, or node.toml's
                # authority not the one the registry lists it for): 'valid' misled
                state = (f"a key of {owner.participant}/{owner.authority.id}, not of "
                         f"{node.me}/{node.config.authority} ({Reason.KEY_WRONG_SENDER})")
            else:
                try:
                    node.registry.public_key_for(key_id(public), now)
                    state = "valid"
                except ProtocolError as exc:
                    state = str(exc.reason)
                    if exc.reason == Reason.KEY_NOT_VALID_NOW and owner.key.valid_from > now:
                        # a rotation's successor, not a lapsed key
                        state = f"valid from {utc_text(owner.key.valid_from)}"
                if owner.key.valid_until is not None:
                    state += f", ends {day_of(owner.key.valid_until)}"
            rows.append({"key_id": key_id(public).hex(), "public_key": public.hex(),
                         "registry": state, "signing": public == current and fault is None,
                         "held_by_running_node": None if held is None else
                         key_id(public).hex() in held})
        text = table([[r["key_id"], r["registry"],
                       ("yes" if r["held_by_running_node"] is not False else
                        "yes, once the node restarts") if r["signing"] else ""]
                      for r in rows], ("key id", "registry", "signs now"))
        if unheld := [str(r["key_id"]) for r in rows if r["held_by_running_node"] is False]:
            text += (f"\nthe running node (pid {pid}) does not hold key(s) {', '.join(unheld)}:"
                     " it reads its keys at start; restart it to sign with one made since")
        if fault is not None:
            text += (f"\nno key of this node is valid now ({fault.reason}): it refuses to "
                     "issue, replace, cancel or confirm, and partners refuse the answers it "
                     f"still signs; "
                     f"{key_fault_remedy(fault, node.registry, node.me, current, now)} "
                     "(deploy/RUNBOOK.md, "
                     "\"After your key is revoked\")")
        emit(args, rows, text)
    with_node(args, run)


def cmd_chair_init(args: argparse.Namespace) -> None:
    from nacl.signing import SigningKey

    directory = node_dir(args)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "chair.key"
    if path.exists():
        raise UserError(f"{path} exists already; not overwriting the Chair's key")
    key = SigningKey.generate()
    write_signing_key(path, key)
    public = bytes(key.verify_key).hex()
    emit(args, {"key_file": str(path), "public_key": public},
         f"Chair key written to {path}\n  public key {public}\n"
         "Give the public key to every node (chair_public_key in node.toml).")


def cmd_chair_sign(args: argparse.Namespace) -> None:
    key = read_signing_key(Path(args.key))
    version = sign_registry_file(Path(args.registry), key, Path(args.out), now_ms())
    emit(args, {"version": version, "out": args.out},
         f"registry version {version} signed into {args.out}")


def cmd_backup(args: argparse.Namespace) -> None:
    from node.backup import backup

    config = load_config(node_dir(args))
    out = Path(args.out)
    members = backup(config, out)
    emit(args, {"archive": str(out), "members": members},
         f"backup of {config.participant} written to {out} ({', '.join(members)}); it holds "
         "the node's private key: keep it like the key")


def cmd_restore(args: argparse.Namespace) -> None:
    from node.backup import restore

    config = restore(Path(args.archive), node_dir(args))
    emit(args, {"directory": str(config.directory), "participant": config.participant},
         f"restored {config.participant} into {config.directory}; check it with "
         f"'kpnode verify-log --dir {config.directory}', then start it")


def with_node(args: argparse.Namespace, action: Callable[[Node], None]) -> None:
    node = open_node(args)
    try:
        action(node)
    finally:
        node.close()


def discrepancy_lines(record: Record) -> list[str]:
    return [f"  discrepancy {d.field}: declared {d.declared}, received {d.received}"
            for d in record.discrepancies]


def show_records(args: argparse.Namespace, records: Sequence[Record], verb: str | None) -> None:
    if verb and len(records) == 1:
        r = records[0]
        # A confirmation is signed and final: what differs from the certificate is said
        # with it, not only by a later `show`.
        text = "\n".join([f"{r.number}: {verb} ({r.side} {r.partner}, state {r.state})",
                          *discrepancy_lines(r)])
    else:
        text = table([record_row(r) for r in records], RECORD_HEADERS) if records else \
            "no certificates"
    data: Any = [record_json(r) for r in records]
    emit(args, data[0] if verb and len(data) == 1 else data, text)


# -- the parser -------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="node directory (default: $KPX_NODE_DIR or .)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    # the same options for the KP Chair's commands, whose directory is the Chair's
    chair_common = argparse.ArgumentParser(add_help=False)
    chair_common.add_argument("--dir", help="the Chair's directory (default: $KPX_NODE_DIR "
                              "or .)")
    chair_common.add_argument("--json", action="store_true", help="machine-readable output")
    # typed as its base, whose subparser actions the commands' modules take
    p: argparse.ArgumentParser = _Parser(
        prog="kpnode", description="A kpx node: signed KP certificates between national "
        "authorities over RabbitMQ.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], None], help_: str,
            parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_,
                            parents=[common] if parents is None else parents)
        sp.set_defaults(handler=handler)
        return sp

    sp = add("init", cmd_init, "create a node directory with a new key and node.toml", [])
    sp.add_argument("--participant", required=True, help="two-letter code, e.g. ZA or EU")
    sp.add_argument("--dir", help="the node directory to create (default: $KPX_NODE_DIR "
                    "or .)")
    sp.add_argument("--authority", help="issuing authority id (default CODE-KPA)")
    sp.add_argument("--broker", action="append", help="AMQP URL (repeat for a cluster)")
    sp.add_argument("--chair-key", help="the KP Chair's public key, hex")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    add("run", cmd_run, "run the node until SIGTERM/SIGINT")
    sp = add("validate", cmd_validate, "check a certificate JSON file; sends nothing")
    sp.add_argument("certificate", help="certificate JSON file, or - for stdin")
    sp = add("issue", cmd_issue, "validate, sign and queue a certificate for its importer")
    sp.add_argument("certificate", help="certificate JSON file, or - for stdin")
    sp = add("confirm", cmd_confirm, "confirm an import: what arrived (default: as declared)")
    sp.add_argument("number")
    sp.add_argument("--carats", help="carats received (one-line certificates), e.g. 2500.00")
    sp.add_argument("--value", help="US$ value received (one-line certificates)")
    sp.add_argument("--line", action="append", help="HS=CARATS:USD, once for every declared "
                    "HS line (HS=0:0 for one that did not arrive)")
    sp.add_argument("--parcels", type=int, help="number of parcels received")
    sp.add_argument("--received-on", help="date of receipt YYYY-MM-DD (default today)")
    sp.add_argument("--remarks", help="remarks signed into the confirmation")
    sp = add("cancel", cmd_cancel, "cancel an exported certificate before confirmation")
    sp.add_argument("number")
    sp.add_argument("--reason", required=True, help="why (signed into the cancellation)")
    sp = add("replace", cmd_replace, "issue a certificate replacing one issued in error")
    sp.add_argument("number", help="the certificate to replace")
    sp.add_argument("certificate", help="the new certificate's JSON file")
    sp.add_argument("--reason", required=True, help="why (signed into the replacement)")
    sp = add("show", cmd_show, "one certificate: both sides' view and its signed history")
    sp.add_argument("number")
    sp = add("list", cmd_list, "list certificates")
    sp.add_argument("--state", action="append", choices=[s.value for s in State],
                    help="only in this state (repeatable)")
    sp.add_argument("--partner", help="only with this partner's two-letter code")
    sp.add_argument("--side", choices=[s.value for s in Side], help="only exports or imports")
    sp.add_argument("--last", type=at_least_one, metavar="N",
                    help="only the N made last (still oldest first)")
    sp = add("verify-log", cmd_verify_log, "re-check the evidence log's chain and "
             "signatures")
    sp.add_argument("--anchor", type=_anchor, action="append", default=[],
                    metavar="SEQ:HASH", help="a head an earlier verify-log printed, kept "
                    "elsewhere: fails unless the log still holds that entry with that hash "
                    "(repeatable)")
    sp = add("backup", cmd_backup, "archive the node's database (online), config, registry "
             "and key")
    sp.add_argument("--out", required=True, help="the archive to write (.tar.gz)")
    sp = add("restore", cmd_restore, "unpack a backup into an empty node directory")
    sp.add_argument("archive", help="the .tar.gz 'kpnode backup' wrote; --dir must be a "
                    "new or empty directory")
    chair = sub.add_parser("chair", help="the KP Chair's tools: key and registry")
    chair_sub = chair.add_subparsers(dest="chair_command", required=True, metavar="COMMAND")
    sp = chair_sub.add_parser("init", help="create the Chair's key", parents=[chair_common])
    sp.set_defaults(handler=cmd_chair_init)
    sp = chair_sub.add_parser(
        "sign-registry", help="sign a registry JSON file (low level: see description)",
        description="Sign a registry JSON file as it is, version included. It keeps no "
                    "record of what was signed before: 'kpnode registry publish' is the "
                    "way to publish, since it refuses a version already published (two "
                    "different frames of one version would split the network: every "
                    "node keeps the first it gets).",
        parents=[chair_common])
    sp.add_argument("registry", help="registry JSON")
    sp.add_argument("--key", required=True, help="the Chair's key file")
    sp.add_argument("--out", required=True, help="where to write the signed registry")
    sp.set_defaults(handler=cmd_chair_sign)
    sp = add("demo", cmd_demo, "start a broker and three nodes, close loops, print them", [])
    sp.add_argument("--certificates", type=int, default=3, help="per direction (default 3)")
    sp.add_argument("--keep", help="keep the network's directories here")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    key = sub.add_parser("key", help="the node's signing keys: rotation and encryption")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="COMMAND")
    sp = key_sub.add_parser("new", help="make a key for a rotation (keys/KEYID.key)",
                            description="make a key for a rotation (keys/KEYID.key)",
                            parents=[common])
    sp.add_argument("--encrypt", action="store_true", help="encrypt it with a passphrase "
                    "(on a node whose keys are encrypted it always is, with theirs)")
    sp.set_defaults(handler=cmd_key_new)
    sp = key_sub.add_parser("encrypt", help="encrypt the node's key files with a passphrase",
                            description="encrypt the node's key files with a passphrase",
                            parents=[common])
    sp.set_defaults(handler=cmd_key_encrypt)
    sp = key_sub.add_parser("show", help="the node's keys, their registry state, which signs",
                            description="the node's keys, their registry state, which signs",
                            parents=[common])
    sp.set_defaults(handler=cmd_key_show)
    simulate.register(sub, common)
    registrytool.register(sub, chair_common)
    from node.opscli import register as register_operator_commands  # it imports this module
    register_operator_commands(sub, common)
    deploy.register(sub, common)
    tokens.register(sub, common)
    return p


def cmd_demo(args: argparse.Namespace) -> None:
    from node.demo import run_demo
    from node.interrupt import sigterm_as_interrupt
    from node.localbroker import BrokerError
    from node.runner import InboxTaken
    from node.transport import TransportUnavailable

    try:
        with sigterm_as_interrupt():
            code = asyncio.run(run_demo(args.certificates, args.keep, as_json=args.json))
    except InboxTaken as exc:
        fail(args, EXIT_ENVIRONMENT, f"cannot run the demo here: {exc}")
    except (TransportUnavailable, BrokerError) as exc:  # no broker to be had, or none answers
        fail(args, EXIT_ENVIRONMENT, f"the demo needs a broker: {exc}")
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(given)
    except UsageError as exc:  # a script that asked for JSON reads why on stdout
        # argparse takes '--js' for '--json' too
        asked_json = any(len(a) > 3 and "--json".startswith(a) for a in given)
        fail(argparse.Namespace(json=asked_json), EXIT_USAGE, f"error: {exc.message}",
             prog=exc.prog)
    configure_logging(default_level="INFO" if args.command == "run" else "WARNING")
    try:
        args.handler(args)
    except ValidationError as exc:
        fail(args, EXIT_REFUSED, f"{exc.text}:", problems=exc.problems)
    except CommandRefused as exc:
        refusal = exc.refusal
        if refusal.problems:  # each with its field path, as 'validate' lists them
            fail(args, EXIT_REFUSED, f"refused: {refusal.reason}:", reason=refusal.reason,
                 problems=refusal.problems)
        fail(args, EXIT_REFUSED, f"refused: {refusal}", reason=refusal.reason)
    except registrytool.BrokerUnreachable as exc:
        fail(args, EXIT_ENVIRONMENT, str(exc))
    except ProtocolError as exc:
        fail(args, EXIT_REFUSED, str(exc), reason=exc.reason)
    except (UserError, registrytool.ChairError, RegistryEditError) as exc:
        fail(args, EXIT_REFUSED, str(exc))
    except (ConfigError, RegistryFileError, StoreError, UnreadableRecord,
            RegistryJsonError) as exc:
        fail(args, EXIT_ENVIRONMENT, str(exc))
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_REFUSED) from None
    except OSError as exc:  # a path that is a file, a directory we may not write ...
        where = f"{exc.filename}: " if exc.filename else ""
        fail(args, EXIT_ENVIRONMENT, f"{where}{exc.strerror or exc}")
    except sqlite3.Error as exc:  # e.g. a read-only database, met mid-command
        fail(args, EXIT_ENVIRONMENT, f"the node's database: {exc}")
    except UnicodeError as exc:  # an argument, a KPX_* variable or a file read as text
        reason = getattr(exc, "reason", None) or type(exc).__name__
        fail(args, EXIT_REFUSED, f"text that is not valid UTF-8 ({reason}): check this "
             "command's arguments, its KPX_* variables and the files it reads")
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # after a hang-up, stderr may be gone
            complain("interrupted")
        raise SystemExit(130) from None


if __name__ == "__main__":
    # `python -m node.cli` runs this file as __main__; the commands' modules import
    # node.cli, a second copy whose UserError this copy's main would not catch.
    from node.cli import main as cli_main

    cli_main()
