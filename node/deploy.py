"""``kpnode deploy ...``: turn a registry into a locked-down broker and nodes that use it.

* ``deploy definitions`` — RabbitMQ definitions (:mod:`node.definitions`) from the
  Chair-signed registry file, with one password per broker user kept in a file of its own
  (mode 0600) and reused on every later run, so regenerating after a registry change only
  adds users. Passwords are never printed.
* ``deploy configure`` — point one node directory at the locked-down broker: its URLs with
  its own user and password, the validated ``user_id``, ``declare_topology = false`` and
  the ``user_id`` check on receipt.
* ``deploy network`` — a whole small network in one directory (the Chair, its registry,
  nodes, definitions): what ``docker-compose.yml``'s bootstrap runs and the container-free
  topology test runs, so both use the same generated files. Does nothing but regenerate the
  definitions when the directory is provisioned already.
* ``deploy publish-registry`` — the Chair sends a signed registry to every inbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from node.brokerurl import broker_url_problem
from node.chair import registry_to_json
from node.config import (
    CONFIG_NAME,
    DEFAULT_DELIVERY_LIMIT,
    ConfigError,
    NodeConfig,
    load_config,
    write_config,
)
from node.definitions import (
    DEFAULT_VHOST,
    broker_definitions,
    broker_users,
    password_hash,
)
from node.files import read_secret, write_whole
from node.jsontext import parse_json
from node.network import create_network
from node.registry import Registry, open_registry_frame, unverified_registry_version
from node.registrytool import CHAIR_PUBLIC
from node.service import broker_user_for
from node.terminal import at_least_one, emit, table
from protocol import ProtocolError, Reason
from protocol.schema import PARTICIPANT_CODE

PASSWORD_SUFFIX = ".password"


def password_file(directory: Path, user: str) -> Path:
    return directory / f"{user}{PASSWORD_SUFFIX}"


def ensure_password(directory: Path, user: str) -> str:
    """The user's password from its file, created (mode 0600, random) on first use."""
    import secrets

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = password_file(directory, user)
    if path.exists():
        return read_password(path)
    # Written under another name and linked: made first and written after, a command
    # stopped in between (Ctrl-C, kill -9, a full disk) left an empty file, which every
    # later run refused ('password file ... is empty').
    password = secrets.token_urlsafe(24)
    try:
        write_whole(path, password + "\n", exclusive=True)
    except FileExistsError:  # another run made it meanwhile: that one stands
        return read_password(path)
    return password


def read_password(path: Path) -> str:
    """A broker user's password from its file (:func:`node.files.read_secret`)."""
    password = read_secret(path, "password file").strip()
    if not password:
        raise ConfigError(f"password file {path} is empty")
    return password


def broker_url(template: str, user: str, password: str) -> str:
    """``amqp://{user}:{password}@host:5672/kpx`` with the placeholders filled in,
    percent-encoded: a '/', '@' or ':' in a password chosen by hand would otherwise change
    which host the URL names."""
    if not re.search(r"://\{user\}:\{password\}@[^/?#]", template):
        # The password anywhere else (a host, a path) would be shown wherever the URL is.
        raise ConfigError(f"broker URL template {template!r} must look like "
                          "amqp://{user}:{password}@host:5672/vhost")
    url = (template.replace("{user}", urllib.parse.quote(user, safe=""))
           .replace("{password}", urllib.parse.quote(password, safe="")))
    if (problem := broker_url_problem(url)) is not None:
        raise ConfigError(f"broker URL template: {problem}")
    return url


def read_registry(path: Path, chair_public_key: bytes) -> Registry:
    try:
        frame = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read registry {path}: {exc.strerror}") from exc
    try:
        return open_registry_frame(frame, chair_public_key)
    except ProtocolError as exc:
        hint = ""
        if exc.reason == Reason.KEY_UNKNOWN:
            # Between 'registry rotate-chair-key' and the next publish, registry.kpx is
            # still the former key's.
            hint = (" (after a rotation of the Chair's key, the registry is the former "
                    "key's until 'kpnode registry publish' signs the next version: publish "
                    "first)")
        raise ConfigError(f"{path}: {exc}{hint}") from exc


def check_vhost(vhost: str) -> None:
    """Refuse an empty (or blank) virtual host: the broker refuses to import definitions
    for it, and nodes' URLs could not name it anyway."""
    if not vhost.strip():
        raise ConfigError("--vhost must name a virtual host, not be empty (default "
                          f"{DEFAULT_VHOST!r})")


def write_definitions(registry: Registry, out: Path, passwords: Path, *,
                      vhost: str = DEFAULT_VHOST, delivery_limit: int = 5) -> dict[str, Any]:
    """Write the definitions file (readable by the broker, it holds only salted hashes)
    and any missing password file; returns the document. Refused when ``out`` holds users
    already whose password files are not in ``passwords``: new passwords for them would
    lock them out of the broker once imported."""
    check_vhost(vhost)
    users = broker_users(registry.update)
    try:
        earlier = {str(u["name"]) for u in json.loads(out.read_text())["users"]}
    except (OSError, ValueError, KeyError, TypeError):
        earlier = set()  # nothing written before (or nothing readable): nobody to keep
    if lost := sorted(u for u in users
                      if u in earlier and not password_file(passwords, u).exists()):
        raise ConfigError(
            f"{out} already has broker users {', '.join(lost)} whose password files are not "
            f"in {passwords}: new passwords would lock them out of the broker once "
            "imported. Give --passwords the directory that holds them ('deploy network' "
            "keeps them in chair/broker-passwords)")
    hashes = {user: password_hash(ensure_password(passwords, user)) for user in users}
    document = broker_definitions(registry.update, hashes, vhost=vhost,
                                  delivery_limit=delivery_limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.chmod(0o644)
    tmp.replace(out)
    return document


def configure_node(config: NodeConfig, urls: Sequence[str], password: str) -> NodeConfig:
    """Lock-down settings for one node; node.toml then holds a password."""
    user = broker_user_for(config.participant)
    locked = dataclasses.replace(
        config, broker_urls=tuple(broker_url(u, user, password) for u in urls),
        broker_user=user, declare_topology=False, check_broker_user=True)
    write_config(locked)  # mode 0600, as every node.toml
    return locked


# -- the commands -----------------------------------------------------------------------


def _hex_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"--chair-key must be hex, not {text!r}") from None
    if len(key) != 32:
        raise ConfigError("--chair-key must be 32 bytes (64 hex characters)")
    return key


def cmd_definitions(args: argparse.Namespace) -> None:

    registry = read_registry(Path(args.registry), _hex_key(args.chair_key))
    out = Path(args.out)
    passwords = Path(args.passwords) if args.passwords else out.parent / "passwords"
    document = write_definitions(registry, out, passwords, vhost=args.vhost,
                                 delivery_limit=args.delivery_limit)
    rows = [[p["user"], p["configure"], p["write"], p["read"],
             password_file(passwords, p["user"])] for p in document["permissions"]]
    emit(args, {"definitions": str(out), "registry_version": registry.version,
                 "vhost": args.vhost, "passwords": str(passwords),
                 "permissions": document["permissions"]},
          f"definitions for registry version {registry.version} written to {out}\n"
          + table(rows, ("user", "configure", "write", "read", "password file")))


def cmd_configure(args: argparse.Namespace) -> None:
    from node.cli import node_dir

    # node.toml as written, without KPX_* overrides: they belong to this shell, not the file.
    config = load_config(node_dir(args), environ={})
    password = read_password(Path(args.password_file))
    locked = configure_node(config, args.broker, password)
    emit(args, {"directory": str(locked.directory), "broker_user": locked.broker_user},
          f"{locked.participant}: logs in as {locked.broker_user}, declares nothing, checks "
          f"the user_id of every message ({locked.directory / CONFIG_NAME})")


@dataclasses.dataclass(frozen=True, slots=True)
class Provisioned:
    base: Path
    created: bool
    chair_public_key: bytes
    registry: Registry
    definitions: Path
    passwords: Path

    @property
    def chair_dir(self) -> Path:
        return self.base / "chair"

    def node_dirs(self) -> dict[str, Path]:
        return {p.parent.name: p.parent for p in sorted(self.base.glob(f"*/{CONFIG_NAME}"))}


#: Written before ``deploy network`` makes anything and removed once all is made: what it
#: names is taken away again by the next run (no key of it has left the machine yet).
UNFINISHED = ".kpx-provisioning"


@contextlib.contextmanager
def _undone_unless_finished(base: Path, entries: Sequence[Path]) -> Iterator[None]:
    """Make ``entries`` (each new, or an empty directory) in the block, or none of them:
    a failure removes what the block made; a kill, before the next run starts over."""
    unfinished = base / UNFINISHED
    if unfinished.exists():  # an earlier run was stopped part-way: start it over
        try:
            earlier = parse_json(unfinished.read_bytes())
            made, emptied = ([base / _entry_name(n) for n in earlier[k]]
                             for k in ("made", "emptied"))
            _take_away(made, emptied)
        except ConfigError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{unfinished}: an earlier 'deploy network' stopped part-way "
                              f"and its record is unreadable ({exc}); empty {base} and run "
                              "it again") from exc
    in_use = [p for p in entries if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
    if in_use:
        raise ConfigError(f"{', '.join(map(str, in_use))}: exists already; 'deploy network' "
                          "provisions a new network into an empty directory")
    made = [p for p in entries if not p.exists()]
    emptied = [p for p in entries if p.exists()]
    unfinished.write_text(json.dumps({"made": [p.name for p in made],
                                      "emptied": [p.name for p in emptied]}) + "\n")
    try:
        yield
    except BaseException:
        _take_away(made, emptied)
        unfinished.unlink(missing_ok=True)
        raise
    unfinished.unlink(missing_ok=True)


def _entry_name(name: object) -> str:
    """A name ``deploy network`` makes in its directory, and nothing else, so that a record
    edited by hand cannot send the clean-up elsewhere."""
    if not (isinstance(name, str) and (name in ("chair", "broker")
                                       or PARTICIPANT_CODE.fullmatch(name))):
        raise ValueError(f"{name!r} is not an entry deploy network makes")
    return name


def _take_away(made: Sequence[Path], emptied: Sequence[Path]) -> None:
    for path in made:
        shutil.rmtree(path, ignore_errors=True)  # refuses a symbolic link: kept, then in use
    for path in emptied:
        if path.is_symlink():  # swapped in since: emptying it would empty its target
            raise ConfigError(f"{path} is a symbolic link now; not emptying it. Empty "
                              f"{path.parent} by hand and run 'deploy network' again")
        for child in path.iterdir() if path.is_dir() else ():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def provision(base: Path, codes: Sequence[str], broker_templates: Sequence[str], *,
              vhost: str | None = None, delivery_limit: int = 5) -> Provisioned:
    """The Chair (key, registry.json, signed registry.kpx, chair.pub), one locked-down node
    directory per code, the broker definitions and password files. On a directory that is
    provisioned already it only regenerates the definitions from the Chair's registry."""
    if vhost is not None:  # before anything is made: refused later, a network is half made
        check_vhost(vhost)
    base.mkdir(parents=True, exist_ok=True)
    with _only_run(base):
        return _provision(base, codes, broker_templates, vhost=vhost,
                          delivery_limit=delivery_limit)


@contextlib.contextmanager
def _only_run(base: Path) -> Iterator[None]:
    """One ``deploy network`` at a time in ``base``: a second one would take the first's
    unfinished record for a killed run's and remove what the first is still making."""
    fd = os.open(base, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another 'deploy network' is running in {base}; wait for it "
                              "to end") from None
        yield
    finally:
        os.close(fd)  # and the lock with it


def _provision(base: Path, codes: Sequence[str], broker_templates: Sequence[str], *,
               vhost: str | None, delivery_limit: int) -> Provisioned:
    chair_dir = base / "chair"
    passwords = chair_dir / "broker-passwords"
    unfinished = base / UNFINISHED
    created = unfinished.exists() or not (chair_dir / "registry.kpx").exists()
    if created:
        for template in broker_templates:  # before anything is written
            broker_url(template, "", "")
        if not codes:
            again = (f" (a run in {base} stopped part-way: this one starts it over)"
                     if unfinished.exists() else "")
            raise ConfigError(f"name at least one Participant to provision{again}")
        entries = [chair_dir, *(base / code for code in codes), base / "broker"]
        with _undone_unless_finished(base, entries):
            network = create_network(base, codes, ())
            # The draft `kpnode registry` edits carries the version it is published under.
            draft = dataclasses.replace(network.registry, version=network.registry.version + 1)
            (chair_dir / "registry.json").write_text(
                json.dumps(registry_to_json(draft), indent=2) + "\n")
            for code, config in network.configs.items():
                configure_node(config, broker_templates,
                               ensure_password(passwords, broker_user_for(code)))
    out = base / "broker" / "definitions.json"
    if not created:
        vhost = _same_as_provisioned(base, codes, broker_templates, vhost, out, passwords)
    try:
        chair_public = bytes.fromhex((chair_dir / CHAIR_PUBLIC).read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{chair_dir / CHAIR_PUBLIC}: {exc}") from exc
    registry = read_registry(chair_dir / "registry.kpx", chair_public)
    write_definitions(registry, out, passwords,
                      vhost=DEFAULT_VHOST if vhost is None else vhost,
                      delivery_limit=delivery_limit)
    return Provisioned(base, created, chair_public, registry, out, passwords)


def _same_as_provisioned(base: Path, codes: Sequence[str], broker_templates: Sequence[str],
                         vhost: str | None, definitions: Path, passwords: Path) -> str:
    """The vhost a rerun writes the definitions for: the one provisioned. A rerun only
    regenerates the definitions, so options that differ from the first run are refused:
    accepted, they said nothing (a Participant not added) or split the network (broker
    definitions for one vhost, nodes configured for another)."""
    provisioned = sorted(p.name for p in base.iterdir() if (p / CONFIG_NAME).is_file())
    # Fewer is fine: compose reruns the first run's list after others have joined.
    if missing := [c for c in codes if c not in provisioned]:
        raise ConfigError(
            f"{', '.join(missing)} not provisioned in {base} (it holds "
            f"{', '.join(provisioned)}): a rerun only regenerates the broker definitions and "
            "adds no Participant; to add one, see deploy/RUNBOOK.md, 'Joining a new "
            "Participant'")
    # A node named in this run, else any: all were provisioned alike (joined ones later).
    config = (load_config(base / next((c for c in codes if c in provisioned),
                                      provisioned[0]), environ={}) if provisioned else None)
    try:
        before = str(json.loads(definitions.read_text())["vhosts"][0]["name"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        # No definitions to read: the vhost the nodes' broker URLs name
        path = urllib.parse.urlsplit(config.broker_urls[0]).path if config else ""
        before = urllib.parse.unquote(path[1:]) if len(path) > 1 else (vhost or DEFAULT_VHOST)
    if vhost is not None and vhost != before:
        raise ConfigError(f"{base} is provisioned for vhost {before!r}, and its nodes' "
                          f"node.toml name it: a rerun does not move them to {vhost!r}")
    if config is not None and broker_templates:
        user = broker_user_for(config.participant)
        password = read_password(password_file(passwords, user))
        if tuple(broker_url(t, user, password) for t in broker_templates) \
                != config.broker_urls:
            raise ConfigError(f"{base}'s nodes use other broker URLs than --broker gives; a "
                              "rerun does not change them: run 'kpnode deploy configure' "
                              "for each node instead")
    return before


def cmd_network(args: argparse.Namespace) -> None:
    from node.cli import UserError

    codes = [c.strip() for c in args.participants.split(",") if c.strip()]
    bad = [c for c in codes if not PARTICIPANT_CODE.fullmatch(c)]
    if bad:
        raise UserError(f"--participants: not a two-letter code: {', '.join(bad)}")
    repeated = sorted({c for c in codes if codes.count(c) > 1})
    if repeated:  # before anything is written: a half-made network is not made again
        raise UserError(f"--participants: {', '.join(repeated)} given more than once")
    done = provision(Path(args.dir), codes, args.broker, vhost=args.vhost,
                     delivery_limit=args.delivery_limit)
    nodes = sorted(done.node_dirs())
    emit(args, {"directory": str(done.base), "created": done.created, "nodes": nodes,
                 "registry_version": done.registry.version,
                 "definitions": str(done.definitions),
                 "chair_public_key": done.chair_public_key.hex(),
                 "passwords": str(done.passwords)},
          f"{'provisioned' if done.created else 'already provisioned'} {done.base}: nodes "
          f"{', '.join(nodes)}, registry version {done.registry.version}\n"
          f"  broker definitions  {done.definitions}\n"
          f"  broker passwords    {done.passwords} (keep secret)\n"
          f"  Chair public key    {done.chair_public_key.hex()}")


def cmd_publish_registry(args: argparse.Namespace) -> None:
    from yarl import URL

    from node.brokerclient import amqp_library_logs_quiet
    from node.brokerurl import redact, why_connect_failed
    from node.transport import publish_registry

    path = Path(args.registry)
    try:
        frame = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read registry {path}: {exc.strerror}") from exc
    # Every node dead-letters what is not a registry: check before it reaches their inboxes.
    try:
        version = (read_registry(path, _hex_key(args.chair_key)).version if args.chair_key
                   else unverified_registry_version(frame))
    except ProtocolError as exc:
        raise ConfigError(f"{path} is not a signed registry: {exc}") from exc
    url = args.broker
    if args.password_file:
        url = broker_url(url, args.user, read_password(Path(args.password_file)))
    elif (problem := broker_url_problem(url)) is not None:
        raise ConfigError(f"--broker: {problem}")
    try:
        # The broker vouches for the login as user_id; nodes skip the check for the Chair,
        # whose signature is the proof, so any login that may write kpx.registry will do.
        with amqp_library_logs_quiet():  # the reason is said once, below, in words
            asyncio.run(publish_registry(url, frame, user_id=URL(url).user or None))
    except Exception as exc:
        raise ConfigError(f"registry not published to {redact(url)}: "
                          f"{why_connect_failed(url, exc)}") from exc
    emit(args, {"published": str(path), "version": version,
                 "signature_checked": bool(args.chair_key)},
          f"registry {path} (version {version}) published to every inbox"
          + ("" if args.chair_key else "; its signature is checked by each node"))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    """Add ``kpnode deploy ...`` to the CLI."""
    deploy = sub.add_parser("deploy", help="a locked-down broker and the nodes that use it")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True, metavar="COMMAND")
    json_only = argparse.ArgumentParser(add_help=False)
    json_only.add_argument("--json", action="store_true", help="machine-readable output")

    def topology(sp: argparse.ArgumentParser, vhost: str | None = DEFAULT_VHOST) -> None:
        sp.add_argument("--vhost", default=vhost, help="virtual host (default kpx)")
        sp.add_argument("--delivery-limit", type=at_least_one,
                        default=DEFAULT_DELIVERY_LIMIT,
                        help="deliveries before an inbox message is dead-lettered (1 or more; "
                        f"default {DEFAULT_DELIVERY_LIMIT}, as node.toml's delivery_limit)")

    help_ = "RabbitMQ definitions (users, permissions, queues, policies) from the registry"
    sp = dsub.add_parser("definitions", help=help_, description=help_, parents=[json_only])
    sp.add_argument("--registry", required=True, help="the Chair-signed registry file")
    sp.add_argument("--chair-key", required=True, help="the Chair's public key, hex")
    sp.add_argument("--out", required=True, help="definitions JSON to write")
    sp.add_argument("--passwords", help="directory of the users' password files, mode 0600 "
                    "(default: passwords/ next to --out); existing ones are kept")
    topology(sp)
    sp.set_defaults(handler=cmd_definitions)

    help_ = "point a node at a locked-down broker with its own user and password"
    sp = dsub.add_parser("configure", help=help_, description=help_, parents=[common])
    sp.add_argument("--broker", action="append", required=True,
                    help="URL with {user} and {password}, e.g. "
                    "amqp://{user}:{password}@broker:5672/kpx (repeat for a cluster)")
    sp.add_argument("--password-file", required=True, help="this node's broker password")
    sp.set_defaults(handler=cmd_configure)

    help_ = "provision a Chair, a registry, nodes and broker definitions in one directory"
    sp = dsub.add_parser("network", help=help_, description=help_, parents=[json_only])
    sp.add_argument("--dir", required=True, help="directory of the whole network")
    sp.add_argument("--participants", default="", help="comma-separated codes, e.g. ZA,EU,IN")
    sp.add_argument("--broker", action="append", required=True,
                    help="node broker URL with {user} and {password} (repeat for a cluster)")
    topology(sp, vhost=None)  # a rerun keeps the one provisioned
    sp.set_defaults(handler=cmd_network)

    help_ = "publish a Chair-signed registry to every node's inbox"
    sp = dsub.add_parser("publish-registry", help=help_, description=help_, parents=[json_only])
    sp.add_argument("registry", help="the Chair-signed registry file")
    sp.add_argument("--broker", required=True,
                    help="AMQP URL; {user} and {password} are filled in with --password-file")
    sp.add_argument("--user", default="kpx-chair", help="broker user (default kpx-chair)")
    sp.add_argument("--password-file", help="the broker user's password file")
    sp.add_argument("--chair-key", help="check the registry against this public key first")
    sp.set_defaults(handler=cmd_publish_registry)
