"""The bad-input catalogue, end to end: an attacker or a broken peer publishes with a raw
AMQP client straight onto the importer's inbox, between good certificates.

For every case the importer dead-letters the message with the reason code in the
``x-kpx-reason`` header, answers with a signed rejection when (and only when) the sender is
authentic, changes no record, keeps running, and the good loops around it still close. The
table in protocol/SPEC.md ("Bad-input catalogue") lists the same cases and codes;
``test_spec_table_lists_every_case`` keeps the two in step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from nacl.signing import SigningKey

from node.chair import embargo, revoke_key, set_status, sign_registry
from node.machine import Side, State
from node.network import create_network
from node.runner import RunningNode
from node.transport import dead_letter_queue
from protocol import (
    BROADCAST,
    CHAIR,
    Envelope,
    ParticipantStatus,
    Rejection,
    decode_body,
    parse_frame,
    seal,
)
from protocol.codec import pack
from protocol.frame import seal_body
from tests.netutil import certificate, certificate_json
from tests.test_network import fresh_codes, publish_raw, state, until

SPEC = Path(__file__).resolve().parent.parent / "protocol" / "SPEC.md"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    reason: str
    #: the sender is authentic, so a signed rejection goes back to it
    answered: bool


#: every case of the catalogue: (name as in SPEC.md, reason code, answered with a rejection)
CASES = [
    Case("garbage bytes", "frame.malformed", False),
    Case("truncated frame", "frame.truncated", False),
    Case("oversize frame", "frame.too_large", False),
    Case("bad signature", "signature.invalid", False),
    Case("unknown key", "key.unknown", False),
    Case("revoked key", "key.revoked", False),
    Case("key of another Participant", "key.wrong_sender", True),
    Case("addressed to another Participant", "message.not_for_us", True),
    Case("stale registry version", "registry.stale", False),
    Case("registry not signed by the Chair", "key.wrong_sender", True),
    Case("from a suspended Participant", "participant.suspended", True),
    Case("to a non-Participant", "body.schema", True),
    Case("embargoed origin", "origin.embargoed", True),
    Case("expired certificate", "certificate.expired", True),
    Case("certificate dated ahead", "field.bad_date", False),
    Case("float amount", "body.schema", True),
    Case("negative amount", "body.schema", True),
    Case("zero amount", "body.schema", True),
    Case("unknown HS code", "body.schema", True),
    Case("schema violation", "body.schema", True),
    Case("receipt for an unknown certificate", "certificate.unknown", True),
]


def envelope(sender: str, recipient: str, payload: Any, kind: str = "certificate",
             message_id: str | None = None) -> dict[str, Any]:
    return {"message_id": message_id or uuid.uuid4().hex, "kind": kind, "sender": sender,
            "recipient": recipient, "created_at": 1, "in_reply_to": None, "payload": payload}


def signed(key: SigningKey, env: dict[str, Any]) -> bytes:
    return seal_body(pack(env), key)


@pytest.mark.broker
async def test_every_bad_input_is_dead_lettered_and_answered_only_when_authentic(
        amqp_url: str, tmp_path: Path) -> None:
    imp, good, peer, revoked, suspended = fresh_codes(5)
    network = create_network(tmp_path, [imp, good, peer, revoked, suspended], [amqp_url])
    keys = {c: cfg.signing_key() for c, cfg in network.configs.items()}
    update = network.registry
    update = revoke_key(update, bytes(keys[revoked].verify_key), 0)
    update = set_status(update, suspended, ParticipantStatus.SUSPENDED)
    update = embargo(update, "CF", True)
    update = dataclasses.replace(update, version=2)
    network.publish_registry(update)

    importer_run = RunningNode(network.configs[imp])
    exporter_run = RunningNode(network.configs[good])
    await importer_run.start()
    await exporter_run.start()
    try:
        importer, exporter = importer_run.node, exporter_run.node
        assert importer is not None and exporter is not None
        assert importer.registry.version == 2

        def cert(number: str, **changes: Any) -> dict[str, Any]:
            return certificate_json(f"{peer}-{number}", peer, imp, **changes)

        def with_line(**line: Any) -> dict[str, Any]:
            c = cert(uuid.uuid4().hex[:8])
            c["lines"][0].update(line)
            return c

        good_frame = signed(keys[peer], envelope(peer, imp, cert("OK")))
        past = date.today() - timedelta(days=400)
        builders: dict[str, Callable[[], bytes]] = {
            "garbage bytes": lambda: b"\x00\xffnot a frame at all" * 3,
            "truncated frame": lambda: good_frame[:-20],
            "oversize frame": lambda: good_frame[:4] + b"\0" * (300 * 1024),
            "bad signature": lambda: good_frame[:-1] + bytes([good_frame[-1] ^ 1]),
            "unknown key": lambda: signed(SigningKey.generate(),
                                          envelope(peer, imp, cert("u"))),
            "revoked key": lambda: signed(keys[revoked],
                                          envelope(revoked, imp, certificate_json(
                                              f"{revoked}-1", revoked, imp))),
            "key of another Participant": lambda: signed(keys[peer], envelope(
                good, imp, certificate_json(f"{good}-X", good, imp))),
            "addressed to another Participant": lambda: signed(
                keys[peer], envelope(peer, good, certificate_json(f"{peer}-A", peer, good))),
            "stale registry version": lambda: sign_registry(
                dataclasses.replace(update, version=1), network.chair_key, 1),
            # sealed by hand: the Chair's tool refuses to sign with a Participant's key
            "registry not signed by the Chair": lambda: seal(Envelope(
                sender=CHAIR, recipient=BROADCAST, created_at=1,
                payload=dataclasses.replace(update, version=9)), keys[peer]),
            "from a suspended Participant": lambda: signed(keys[suspended], envelope(
                suspended, imp, certificate_json(f"{suspended}-1", suspended, imp))),
            "to a non-Participant": lambda: signed(keys[peer], envelope(
                peer, imp, certificate_json(f"{peer}-N", peer, "QQ"))),
            "embargoed origin": lambda: signed(keys[peer], envelope(
                peer, imp, cert("E", origins=["CF"]))),
            "expired certificate": lambda: signed(keys[peer], envelope(peer, imp, cert(
                "X", issued_on=(past - timedelta(days=10)).isoformat(),
                expires_on=past.isoformat()))),
            "certificate dated ahead": lambda: signed(keys[peer], envelope(peer, imp, cert(
                "A", issued_on=(date.today() + timedelta(days=3)).isoformat(),
                expires_on=(date.today() + timedelta(days=90)).isoformat()))),
            "float amount": lambda: signed(keys[peer], envelope(
                peer, imp, with_line(carats_hundredths=2500.5))),
            "negative amount": lambda: signed(keys[peer], envelope(
                peer, imp, with_line(usd_cents=-100))),
            "zero amount": lambda: signed(keys[peer], envelope(
                peer, imp, with_line(carats_hundredths=0))),
            "unknown HS code": lambda: signed(keys[peer], envelope(
                peer, imp, with_line(hs_code="7102.99"))),
            "schema violation": lambda: signed(keys[peer], envelope(
                peer, imp, {**cert("S"), "smuggled": "field"})),
            "receipt for an unknown certificate": lambda: signed(keys[peer], envelope(
                peer, imp, {"certificate": f"{imp}-404", "certificate_digest": b"\1" * 32},
                kind="receipt")),
        }
        assert set(builders) == {c.name for c in CASES}
        bodies = {name: build() for name, build in builders.items()}

        records_before = importer.store.counts()
        exporter.issue(certificate(f"{good}-1", good, imp))
        for name, body in bodies.items():
            await publish_raw(amqp_url, imp, body, f"case-{name}")
        exporter.issue(certificate(f"{good}-2", good, imp))
        # a replay of a good message id: the original answer again, one record, no dead letter
        await publish_raw(amqp_url, imp, good_frame, "replay-1")
        await publish_raw(amqp_url, imp, good_frame, "replay-2")

        reasons = await read_dead_letters(amqp_url, imp, len(bodies))
        by_body = {body: name for name, body in bodies.items()}
        found = {by_body.get(body, "?"): reason for body, reason in reasons}
        assert found == {c.name: c.reason for c in CASES}

        # good messages around the bad ones still flow, and the loops close
        for number in (f"{good}-1", f"{good}-2"):
            await until(lambda number=number: state(importer, Side.IMPORT, number)
                        is State.RECEIVED)
            importer.confirm(number)
            await until(lambda number=number: state(exporter, Side.EXPORT, number)
                        is State.CONFIRMED)
        assert state(importer, Side.IMPORT, f"{peer}-OK") is State.RECEIVED

        # answered exactly where the sender is authentic, each with its reason
        expected = sorted(c.reason for c in CASES if c.answered)
        await until(lambda: sorted(r.reason for r in rejections_sent(importer)) == expected)
        # no bad case left a record anywhere but in the rejected state
        bad_numbers = {n for n, s in all_records(importer).items()
                       if not n.startswith(good) and n != f"{peer}-OK"}
        assert all(all_records(importer)[n] is State.REJECTED for n in bad_numbers)
        assert sum(n for (side, st), n in importer.store.counts().items()
                   if st != State.REJECTED) == 3 + sum(records_before.values())
        assert importer_run.transport is not None and importer_run.transport.connected
        # held back, not refused: the one case refused for now only
        held = importer_run.metrics.messages_in.labels(kind="certificate", outcome="held")
        assert held._value.get() == sum(1 for c in CASES if c.reason == "field.bad_date")
    finally:
        await exporter_run.stop()
        await importer_run.stop()


def all_records(node: Any) -> dict[str, State]:
    return {r.number: r.state for r in node.store.records(side=Side.IMPORT)}


def rejections_sent(node: Any) -> list[Rejection]:
    found = []
    for e in node.store.evidence():
        if e.direction != "out":
            continue  # what came in may be the invalid message itself
        payload = decode_body(parse_frame(e.frame).body).payload
        if isinstance(payload, Rejection):
            found.append(payload)
    return found


async def read_dead_letters(amqp_url: str, code: str, count: int,
                            timeout: float = 30.0) -> list[tuple[bytes, str]]:
    """Take ``count`` messages off the node's dead-letter queue: (body, x-kpx-reason)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(dead_letter_queue(code))
        found: list[tuple[bytes, str]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < count:
            message = await queue.get(fail=False)
            if message is None:
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"only {len(found)} of {count} dead letters: "
                                         f"{[r for _, r in found]}")
                await asyncio.sleep(0.1)
                continue
            headers = message.headers or {}
            found.append((message.body, str(headers.get("x-kpx-reason"))))
            await message.ack()
        await asyncio.sleep(0.5)
        extra = await queue.get(fail=False)
        assert extra is None, f"more dead letters than bad inputs: {extra.headers}"
        return found


def test_spec_table_lists_every_case() -> None:
    """protocol/SPEC.md's catalogue has one row per case, with the same reason code."""
    text = SPEC.read_text()
    section = text[text.index("Bad-input catalogue\n"):]
    rows = re.findall(r"^\| ([^|]+?) \| `([a-z_.]+)` \| (yes|no) \|", section, re.MULTILINE)
    assert {(n, r, a == "yes") for n, r, a in rows} == {
        (c.name, c.reason, c.answered) for c in CASES}
