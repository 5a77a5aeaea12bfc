"""``kpnode status``: the state of one node's exchange, from its store and its broker.

:func:`build_status` is pure: given what was gathered (records, outbox, registry, what the
broker said), it returns the JSON-ready status, with the problems an operator must act on
listed first. :func:`gather_status` is the thin shell that reads the store and asks the
broker (a broker that does not answer is reported, not a crash); :func:`render_status`
is the screen for people.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from node.brokerclient import connect_any, queue_info
from node.config import HELD_KEYS, LOCK_NAME, NOT_CONSUMING, NodeConfig
from node.deadletters import DeadLetter, DeadLetterQueue
from node.machine import (
    OPEN_STATES,
    OVERDUE_WITHIN_DAYS,
    Record,
    Side,
    State,
    day_of,
    is_overdue,
)
from node.registry import (
    Registry,
    key_fault_remedy,
    own_key_fault,
    signing_key_choice,
    utc_instant,
)
from node.service import Node, now_ms
from node.store import Store, read_apart
from node.terminal import printable, table
from node.transport import TransportUnavailable, dead_letter_queue, inbox_queue
from protocol import RegistryKey
from protocol.frame import Signer
from protocol.keys import key_id

#: open loops are counted by days since the certificate's date of issue
AGE_BUCKETS: tuple[tuple[str, int | None], ...] = (
    ("0-1d", 1), ("2-7d", 7), ("8-30d", 30), ("31d+", None))
#: warn this long before the node's own key stops being valid in the registry
KEY_WARNING_DAYS = 30
LATEST_DEAD_LETTERS = 5
DAY_MS = 86_400_000


def age_bucket(days: int) -> str:
    for name, limit in AGE_BUCKETS:
        if limit is None or days <= limit:
            return name
    raise AssertionError("the last bucket is open")


def loops_by_age(records: Sequence[Record], today: date) -> dict[str, int]:
    """Open loops per age bucket (every bucket present, zero or not)."""
    counts = dict.fromkeys((name for name, _ in AGE_BUCKETS), 0)
    for r in records:
        if r.state in OPEN_STATES:
            counts[age_bucket(max(0, (today - r.certificate.issued_on).days))] += 1
    return counts


@dataclass(frozen=True, slots=True)
class BrokerView:
    """What the broker said, or why it could not be asked."""

    reachable: bool
    url: str | None = None
    error: str | None = None
    inbox_messages: int | None = None
    inbox_consumers: int | None = None
    inbox_exists: bool = True
    dead_letters: int | None = None
    #: the dead letters looked at, oldest first (their count is ``dead_letters``)
    letters: tuple[DeadLetter, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Pending:
    """Outbox messages not yet confirmed by the broker, for one recipient."""

    recipient: str
    messages: int
    oldest_ms: int
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Unanswered:
    """Certificates to one partner sent again for want of a receipt, still without one."""

    partner: str
    certificates: int
    oldest_ms: int  # when the oldest of them was issued


def _loop(r: Record, today: date) -> dict[str, Any]:
    return {"number": r.number, "side": str(r.side), "partner": r.partner, "state": str(r.state),
            "issued_on": r.certificate.issued_on.isoformat(),
            "expires_on": r.certificate.expires_on.isoformat(),
            "days_left": (r.certificate.expires_on - today).days}


def _iso(ms: int | None) -> str | None:
    return None if ms is None else utc_instant(ms).isoformat(timespec="seconds")


def build_status(*, participant: str, authority: str, now: int, running_pid: int | None,
                 registry: Registry, own_public_key: bytes, records: Sequence[Record],
                 partner_counts: Mapping[tuple[str, str, str], int],
                 outbox: Sequence[Pending], broker: BrokerView,
                 unanswered: Sequence[Unanswered] = (),
                 store_ok: bool = True, unheld_keys: Sequence[str] = (),
                 not_consuming: str | None = None,
                 after_restart: tuple[str, bytes] | None = None,
                 other_public_keys: Sequence[bytes] = ()) -> dict[str, Any]:
    """The status of one node, JSON-ready. ``records`` are the open and expired loops
    (the rest only counts, through ``partner_counts``). ``own_public_key`` is the key the
    running node signs with; ``after_restart`` the key file (name, public key) it would
    sign with once restarted, when that is another (made since it started);
    ``other_public_keys`` the node's other keys, among which a rotation's successor;
    ``not_consuming`` why the running node does not consume its inbox, as it says;
    ``unanswered`` the certificates per partner sent again and still without a receipt."""
    today = day_of(now)
    problems: list[dict[str, str]] = []

    def problem(level: str, text: str) -> None:
        problems.append({"level": level, "text": text})

    if running_pid is None:
        problem("error", "the node is not running: start it with 'kpnode run'")
    elif unheld_keys:
        problem("warning", f"key file(s) the running node does not hold "
                f"({', '.join(unheld_keys)}): it reads its keys at start, so it cannot "
                "sign with them until it is restarted (this view reads keys/ as it is now)")
    if running_pid is not None and not_consuming:
        # The inbox's one consumer, if any, is then another's: its count says nothing wrong.
        problem("error", f"the running node does not consume {inbox_queue(participant)}: "
                f"{not_consuming}. Another node for {participant} (a restored copy?) "
                "has it, or this node's own earlier connection until the broker notices it "
                "is gone (a minute or three); stop the other node")
    if not store_ok:
        problem("error", "the node's database cannot be written")
    if not broker.reachable:
        problem("error", f"broker unreachable: {broker.error}")
    elif not broker.inbox_exists:
        problem("error", f"no {inbox_queue(participant)} on the broker: the node has never "
                "connected to it")
    elif broker.inbox_consumers == 0:
        problem("error", f"nobody consumes {inbox_queue(participant)}: messages to this node "
                "wait in the broker")
    elif broker.inbox_consumers is not None and broker.inbox_consumers > 1:
        # A node holds one consumer: another one takes some of its messages into a database
        # that is not this one, and answers partners from what that database knows.
        problem("error", f"{broker.inbox_consumers} consumers on {inbox_queue(participant)}: "
                f"another process (a second {participant} node, a restored copy) consumes "
                "this node's inbox; stop it (just after a broken connection, the old "
                "consumer may linger until the broker notices, a minute or two)")

    open_loops = [r for r in records if r.state in OPEN_STATES]
    overdue = sorted((r for r in open_loops if is_overdue(r, today)),
                     key=lambda r: (r.certificate.expires_on, r.number))
    expired = sorted((r for r in records if r.state is State.EXPIRED),
                     key=lambda r: (r.certificate.expires_on, r.number))
    if overdue:
        problem("warning", f"{len(overdue)} open loop(s) expire within "
                f"{OVERDUE_WITHIN_DAYS} days or have expired: chase the partner")
    if expired:
        problem("warning", f"{len(expired)} certificate(s) expired without confirmation")

    backlog = sum(p.messages for p in outbox)
    oldest = min((p.oldest_ms for p in outbox), default=None)
    for p in outbox:
        if p.last_error:
            problem("warning", f"{p.messages} message(s) to {p.recipient} not sent: "
                    f"{p.last_error}")

    for u in unanswered:
        # Sent and confirmed by the broker, so the outbox is empty and nothing else warns:
        # a partner's node down for days looked like a quiet day.
        problem("warning", f"{u.certificates} certificate(s) to {u.partner} without a "
                f"receipt though sent again (the oldest issued "
                f"{max(0, now - u.oldest_ms) // 1000} s ago): no receipt reached this "
                f"node. Most often {u.partner}'s node is down or not consuming its inbox, "
                f"where they wait (ask its operator); else this node refuses or does not "
                "take its receipts (see the dead letters and whether this node consumes)")

    dead_count = broker.dead_letters
    if dead_count:
        problem("warning", f"{dead_count} message(s) in the dead-letter queue: see "
                "'kpnode dead-letters list'")

    own_id = key_id(own_public_key)
    owner = registry.key_owner(own_id)
    fault = own_key_fault(registry, participant, authority, own_public_key, now)
    key: dict[str, Any] = {"key_id": own_id.hex(), "in_registry": owner is not None,
                           "fault": None if fault is None else str(fault.reason),
                           "after_restart": None if after_restart is None
                           else key_id(after_restart[1]).hex()}
    # A key file made since the node started that could sign: a restart is the remedy.
    restart_cures = after_restart is not None and own_key_fault(
        registry, participant, authority, after_restart[1], now) is None
    if owner is not None:
        until = owner.key.valid_until
        key.update(authority=owner.authority.id, valid_from=_iso(owner.key.valid_from),
                   valid_until=_iso(until), revoked_at=_iso(owner.key.revoked_at),
                   days_left=None if until is None else (until - now) // DAY_MS)
    if fault is not None and restart_cures:
        assert after_restart is not None
        problem("error", f"the running node's key cannot sign: {fault.text} "
                f"({fault.reason}); partners refuse what it signs. Restart 'kpnode run': "
                f"it reads keys/ at start, and would sign with {after_restart[0]} (key "
                f"{key_id(after_restart[1]).hex()}), which the registry holds valid")
    elif fault is not None:
        # The key a node signs with is its newest valid one: none of its keys is valid.
        problem("error", f"this node's key cannot sign: {fault.text} ({fault.reason}); "
                "partners refuse what it signs and it refuses to issue, confirm, cancel or "
                f"replace: {key_fault_remedy(fault, registry, participant, own_public_key, now)}")
    successor = None if owner is None or owner.key.valid_until is None else _successor(
        registry, participant, authority, other_public_keys, now)
    if successor is not None:
        key["next"] = {"key_id": key_id(successor.public_key).hex(),
                       "valid_from": _iso(successor.valid_from)}
    if fault is None and owner is not None and owner.key.valid_until is not None \
            and owner.key.valid_until - now <= KEY_WARNING_DAYS * DAY_MS:
        ends = owner.key.valid_until
        if successor is None and restart_cures:
            assert after_restart is not None
            # The successor is valid already, in a key file made since the node started.
            problem("warning", f"this node's key stops being valid on {_iso(ends)}; its "
                    f"successor {after_restart[0]} (key {key_id(after_restart[1]).hex()}) "
                    "is valid already: restart 'kpnode run', which reads keys/ at start, "
                    "to sign with it")
        elif successor is None:
            problem("warning", f"this node's key stops being valid on {_iso(ends)}: ask "
                    "the Chair for a registry with its successor")
        elif successor.valid_from > ends:
            problem("warning", f"this node's key stops being valid on {_iso(ends)} and its "
                    f"successor {key_id(successor.public_key).hex()} only from "
                    f"{_iso(successor.valid_from)}: no key of this node signs in between; "
                    "ask the Chair to move the one or the other")

    own_standing = registry.standing(participant)
    if own_standing is not None:
        # The node runs and answers as usual; only the next certificate shows it otherwise.
        problem("error", f"{participant} may not trade under the Scheme in registry version "
                f"{registry.version} ({own_standing}): this node refuses to issue, and "
                "certificates to or from it are refused; the Chair's registry decides")
    partners: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"exports": {}, "imports": {}, "open": 0})
    for (partner, side, state), n in sorted(partner_counts.items()):
        entry = partners[partner]
        entry["exports" if side == Side.EXPORT else "imports"][state] = n
        if state in OPEN_STATES:
            entry["open"] += n
    partner_rows = []
    for code, entry in sorted(partners.items()):
        standing = registry.standing(code)
        partner_rows.append({"partner": code, **entry,
                             "standing": "active" if standing is None else str(standing)})
        if standing is not None and entry["open"]:
            problem("warning", f"{entry['open']} open loop(s) with {code}, which may not "
                    f"trade ({standing})")

    letters = broker.letters[-LATEST_DEAD_LETTERS:]
    level = ("error" if any(p["level"] == "error" for p in problems)
             else "warning" if problems else "ok")
    return {
        "participant": participant, "authority": authority, "generated_at": _iso(now),
        "health": level, "problems": problems,
        "node": {"running": running_pid is not None, "pid": running_pid, "store_ok": store_ok},
        "broker": {"reachable": broker.reachable, "url": broker.url, "error": broker.error,
                   "inbox": None if not broker.reachable or not broker.inbox_exists else {
                       "queue": inbox_queue(participant), "messages": broker.inbox_messages,
                       "consumers": broker.inbox_consumers}},
        "dead_letters": {"queue": dead_letter_queue(participant), "count": dead_count,
                         "by_reason": dict(Counter(d.reason for d in broker.letters)),
                         "latest": [d.json() for d in reversed(letters)]},
        "outbox": {"backlog": backlog,
                   "oldest_age_seconds": None if oldest is None else (now - oldest) // 1000,
                   "by_recipient": [{"recipient": p.recipient, "messages": p.messages,
                                     "oldest_age_seconds": (now - p.oldest_ms) // 1000,
                                     "attempts": p.attempts, "last_error": p.last_error}
                                    for p in outbox]},
        "unanswered": [{"partner": u.partner, "certificates": u.certificates,
                        "oldest_age_seconds": max(0, now - u.oldest_ms) // 1000}
                       for u in unanswered],
        "open_loops": {"total": len(open_loops), "by_age": loops_by_age(open_loops, today),
                       "by_state": dict(Counter(str(r.state) for r in open_loops))},
        "overdue": [_loop(r, today) for r in overdue],
        "expired": [_loop(r, today) for r in expired],
        "partners": partner_rows,
        "registry": {"version": registry.version,
                     "participants": len(registry.update.participants),
                     "embargoed_origins": list(registry.update.embargoed_origins)},
        "key": key,
    }


#: what a failing check of the running node's own (``/readyz``) means, for the status it
#: serves: the broker's and the database's view from outside cannot show these
NOT_READY = {
    "broker_connected": "the running node is not connected to a broker (it reconnects by "
                        "itself; its outbox waits)",
    "consuming": "the running node does not consume its inbox: another connection holds "
                 "the inbox's claim (its own earlier one until the broker notices it is "
                 "gone, or a second node for this Participant); messages to it wait",
    "store_writable": "the running node's database refuses to commit: deliveries are "
                      "held unacknowledged",
    "clock_agrees": "the running node's wall clock jumped ahead of the time it measured: it "
                    "holds deliveries and expires nothing until the clock is set right "
                    "(or for at most 10 minutes)",
    "publishing_allowed": "the broker blocks the running node's publishes (a resource "
                          "alarm: low on disk or memory): nothing leaves its outbox",
}


#: checks that fail whenever the node has no broker connection: said by broker_connected
#: alone then, their words (another connection's claim, a resource alarm) being untrue
NEED_A_CONNECTION = ("consuming", "publishing_allowed")


def not_ready(checks: Mapping[str, bool]) -> list[str]:
    """The running node's failing checks (``/readyz``), in words, for people."""
    disconnected = checks.get("broker_connected") is False
    return [NOT_READY.get(name, f"{name}: failing") for name, ok in checks.items()
            if not ok and not (disconnected and name in NEED_A_CONNECTION)]


def with_readiness(status: Mapping[str, Any], checks: Mapping[str, bool]) -> dict[str, Any]:
    """``status`` as the running node serves it: its own checks (``/readyz``) under
    ``node.ready``, each failing one an error (see :func:`not_ready`). Counted from
    outside, a consumer its broken connection left behind looked like the node consuming,
    and a held delivery like nothing at all."""
    problems = [{"level": "error", "text": text}
                for text in not_ready(checks)] + list(status["problems"])
    level = ("error" if any(p["level"] == "error" for p in problems)
             else "warning" if problems else "ok")
    return {**status, "health": level, "problems": problems,
            "node": {**status["node"], "ready": dict(checks)}}


def _successor(registry: Registry, participant: str, authority: str,
               public_keys: Sequence[bytes], now: int) -> RegistryKey | None:
    """The node's key that the registry lists for this authority from a later time (a
    rotation under way): the first to become valid, not revoked by then."""
    found = []
    for public in public_keys:
        owner = registry.key_owner(key_id(public))
        if owner is None or (owner.participant, owner.authority.id) != (participant,
                                                                        authority):
            continue
        k = owner.key
        if k.valid_from > now and (k.revoked_at is None or k.revoked_at > k.valid_from) \
                and (k.valid_until is None or k.valid_until > k.valid_from):
            found.append(k)
    return min(found, key=lambda k: k.valid_from, default=None)


# -- the shell ------------------------------------------------------------------------


def held_key_ids(directory: Path) -> set[str] | None:
    """The ids of the keys the running node holds, as it wrote them into its lock file at
    start; None when it has not (yet) or cannot be read."""
    try:
        lines = (directory / LOCK_NAME).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines[1:]:
        word, _, ids = line.partition(" ")
        if word == HELD_KEYS:
            return set(ids.split())
    return None


def not_consuming(directory: Path) -> str | None:
    """Why the running node does not consume its inbox, as it wrote into its lock file
    (another connection holds the inbox's claim); None when it has not."""
    try:
        lines = (directory / LOCK_NAME).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines[1:]:
        word, _, why = line.partition(" ")
        if word == NOT_CONSUMING:
            return why or "it says so"
    return None


def keys_not_held(config: NodeConfig, keys: Sequence[Signer]) -> list[str]:
    """Which of ``keys`` (read from the files now) the running node does not hold: made,
    or copied in, since it started. Compared by key id, not by the files' times, which a
    copy keeps and a re-encryption changes."""
    held = held_key_ids(config.directory)
    if held is None:
        return []
    files = config.key_files()
    return [files[i].name if i < len(files) else key_id(bytes(k.verify_key)).hex()
            for i, k in enumerate(keys) if key_id(bytes(k.verify_key)).hex() not in held]


def running_pid(directory: Path) -> int | None:
    """The pid of the ``kpnode run`` holding this directory's lock, or None."""
    path = directory / LOCK_NAME
    try:
        handle = path.open("r")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            first = handle.readline().strip()
            return int(first) if first.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def store_writable(node: Node, timeout_ms: int = 1000) -> bool:
    """Can the node's database take a write now? Waits at most ``timeout_ms`` for another
    writer, then says no rather than hang. It writes (the schema version it already has) and
    rolls back: on a file that is immutable or on a read-only mount, ``BEGIN IMMEDIATE``
    alone succeeds and only a write is refused."""
    db = node.store.db
    previous = int(db.execute("PRAGMA busy_timeout").fetchone()[0])
    db.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            db.execute(f"PRAGMA user_version={version}")
        finally:
            db.execute("ROLLBACK")
        return True
    except sqlite3.Error:
        return False
    finally:
        db.execute(f"PRAGMA busy_timeout={previous}")


async def look_at_broker(config: NodeConfig, *, letters: bool = True) -> BrokerView:
    try:
        connection, url = await connect_any(config.broker_urls)
    except TransportUnavailable as exc:
        return BrokerView(reachable=False, error=str(exc))
    async with connection:
        inbox = await queue_info(connection, inbox_queue(config.participant))
        dead = await queue_info(connection, dead_letter_queue(config.participant))
    found: tuple[DeadLetter, ...] = ()
    if letters and dead is not None and dead.messages:
        with contextlib.suppress(TransportUnavailable):
            async with DeadLetterQueue(config, limit=1000) as queue:
                found = tuple(await queue.letters())
    return BrokerView(reachable=True, url=url, inbox_exists=inbox is not None,
                      inbox_messages=inbox.messages if inbox else None,
                      inbox_consumers=inbox.consumers if inbox else None,
                      # the count leaves out letters another command held while it was
                      # taken; those read since are there as well
                      dead_letters=max(dead.messages, len(found)) if dead else 0,
                      letters=found)


def read_store(store: Store) -> dict[str, Any]:
    """What the status says of the records and the outbox, read from ``store``."""
    return {
        "records": store.records(states=[*OPEN_STATES, State.EXPIRED]),
        "partner_counts": store.partner_counts(),
        "outbox": [Pending(*row) for row in store.outbox_summary()],
        "unanswered": [Unanswered(*row) for row in store.unanswered_summary()],
    }


async def gather_status(node: Node, *, served: bool = False) -> dict[str, Any]:
    """The status document. ``served`` (by the HTTP API and the console, which anyone with
    a monitor token may poll) counts the dead letters without reading them: reading takes
    each off the queue until the read ends, so an operator's replay or discard meanwhile
    would not find it. It also reads the store apart (:func:`read_apart`): at a hub's size
    the open and expired loops take some 80 ms to read, which the running node's event
    loop would otherwise spend on each poll instead of its deliveries."""
    config = node.config
    stored = (await read_apart(config.database_path, read_store) if served
              else read_store(node.store))
    store_ok = store_writable(node)
    broker = await look_at_broker(config, letters=not served)
    pid = running_pid(config.directory)
    now = now_ms()
    files_key = bytes(node.signing_key(now).verify_key)
    own, after_restart = running_key(node, now) if pid else (files_key, None)
    return build_status(participant=config.participant, authority=config.authority,
                        now=now, running_pid=pid, registry=node.registry,
                        own_public_key=own,
                        broker=broker, store_ok=store_ok,
                        unheld_keys=keys_not_held(config, node.signing_keys)
                        if pid else (), after_restart=after_restart,
                        not_consuming=not_consuming(config.directory) if pid else None,
                        other_public_keys=[bytes(k.verify_key) for k in node.signing_keys
                                           if bytes(k.verify_key) != own],
                        **stored)


def running_key(node: Node, now: int) -> tuple[bytes, tuple[str, bytes] | None]:
    """The public key the running node signs with (of those it read at start, as it wrote
    them into its lock file), and the key file (name, public key) it would sign with once
    restarted when that is another one. ``kpnode status`` reads keys/ as it is now: a key
    made since the start is not the running node's, whatever the registry says of it."""
    files_choice = node.signing_key(now)
    chosen = bytes(files_choice.verify_key)
    held = held_key_ids(node.config.directory)
    if held is None:
        return chosen, None
    keys = [bytes(k.verify_key) for k in node.signing_keys
            if key_id(bytes(k.verify_key)).hex() in held]
    if chosen in keys:
        return chosen, None
    if not keys:
        # None of the files it read at start is there any more (the key file node.toml
        # names overwritten with a new key, say): the registry has their public halves.
        keys = [owner.key.public_key for kid in sorted(held) if _is_hex(kid)
                and (owner := node.registry.key_owner(bytes.fromhex(kid))) is not None]
        if not keys:
            return chosen, None
    choice = signing_key_choice(node.registry, node.me, node.config.authority, keys, now)
    files = node.config.key_files()
    index = node.signing_keys.index(files_choice)
    name = files[index].name if index < len(files) else key_id(chosen).hex()
    return keys[choice or 0], (name, chosen)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


# -- the screen -----------------------------------------------------------------------


def render_status(s: dict[str, Any]) -> str:
    lines = [f"kpx node {s['participant']} ({s['authority']}) at {s['generated_at']}: "
             f"{s['health'].upper()}"]
    for p in s["problems"]:
        lines.append(f"  {'!!' if p['level'] == 'error' else ' !'} {p['text']}")
    node = s["node"]
    lines.append("")
    running = f"running, pid {node['pid']}" if node["running"] else "NOT RUNNING"
    lines.append(f"node      {running}; database "
                 f"{'writable' if node['store_ok'] else 'NOT WRITABLE'}")
    b = s["broker"]
    if not b["reachable"]:
        lines.append(f"broker    UNREACHABLE: {b['error']}")
    elif b["inbox"] is None:
        lines.append(f"broker    {b['url']}: no inbox queue yet")
    else:
        lines.append(f"broker    {b['url']}: {b['inbox']['queue']} holds "
                     f"{b['inbox']['messages']} message(s), {b['inbox']['consumers']} "
                     "consumer(s)")
    o = s["outbox"]
    oldest = f", oldest {o['oldest_age_seconds']} s" if o["backlog"] else ""
    lines.append(f"outbox    {o['backlog']} message(s) waiting{oldest}")
    for p in o["by_recipient"]:
        lines.append(f"            to {p['recipient']}: {p['messages']}, attempts "
                     f"{p['attempts']}{', ' + p['last_error'] if p['last_error'] else ''}")
    for u in s["unanswered"]:
        lines.append(f"            {u['certificates']} certificate(s) to {u['partner']} sent "
                     f"again, no receipt yet (oldest issued {u['oldest_age_seconds']} s ago)")
    d = s["dead_letters"]
    count = "?" if d["count"] is None else d["count"]
    lines.append(f"dead      {count} in {d['queue']}"
                 + (" — " + ", ".join(printable(f"{r} x{n}", one_line=True)
                                      for r, n in d["by_reason"].items())
                    if d["by_reason"] else ""))
    for letter in d["latest"]:
        lines.append(f"            {letter['id']}  "
                     + printable(f"{letter['reason']}: {letter['text'][:70]}", one_line=True))
    ol = s["open_loops"]
    lines.append(f"open      {ol['total']} loop(s) by age since issue: "
                 + ", ".join(f"{k} {v}" for k, v in ol["by_age"].items()))
    r = s["registry"]
    k = s["key"]
    key_text = ("NOT IN THE REGISTRY" if not k["in_registry"] else
                f"CANNOT SIGN ({k['fault']})" if k["fault"] else
                f"valid until {k['valid_until'] or 'further notice'}"
                + (f" ({k['days_left']} days)" if k.get("days_left") is not None else ""))
    lines.append(f"registry  version {r['version']}, {r['participants']} Participants")
    if k.get("next"):
        key_text += f"; {k['next']['key_id']} takes over from {k['next']['valid_from']}"
    lines.append(f"key       {k['key_id']} {key_text}"
                 + (f"; {k['after_restart']} once the node restarts"
                    if k.get("after_restart") else ""))
    for title, rows in (("overdue (expiring within 7 days, or past)", s["overdue"]),
                        ("expired without confirmation", s["expired"])):
        if rows:
            lines += ["", title + ":", table(
                [[x["number"], x["side"], x["partner"], x["state"], x["expires_on"],
                  x["days_left"]] for x in rows[:20]],
                ("number", "side", "partner", "state", "expires", "days left"))]
            if len(rows) > 20:
                lines.append(f"... and {len(rows) - 20} more (--json lists all)")
    if s["partners"]:
        def states(counts: dict[str, int]) -> str:
            return " ".join(f"{st} {n}" for st, n in sorted(counts.items())) or "-"
        lines += ["", table([[p["partner"], p["standing"], p["open"], states(p["exports"]),
                              states(p["imports"])] for p in s["partners"]],
                            ("partner", "standing", "open", "exports", "imports"))]
    return "\n".join(lines)


async def watch(node: Node, interval: float, show: Any) -> None:
    """Refresh until interrupted; ``show`` prints one status."""
    while True:
        show(await gather_status(node))
        await asyncio.sleep(interval)
