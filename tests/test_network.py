"""Three nodes on a real RabbitMQ: loops close, refusals come back, nothing is doubled.

Each test provisions its own network (fresh Participant codes, so queues never collide)
on the session's broker and runs the nodes in-process with :class:`RunningNode`.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aio_pika
import pytest

from node.machine import Side, State
from node.network import LocalNetwork, create_network
from node.runner import RunningNode
from node.service import CommandRefused, Node
from node.transport import EXCHANGE
from protocol import ParticipantStatus, RegistryUpdate, Rejection, decode_body, parse_frame
from protocol.codec import pack
from protocol.frame import seal_body
from tests.netutil import certificate, certificate_json, fresh_codes

pytestmark = pytest.mark.broker

async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def state(node: Node, side: Side, number: str) -> State | None:
    record = node.store.get(side, number)
    return record.state if record else None


class Net:
    def __init__(self, network: LocalNetwork, stack: AsyncExitStack) -> None:
        self.network = network
        self.stack = stack
        self.running: dict[str, RunningNode] = {}

    async def start(self, code: str) -> Node:
        running = RunningNode(self.network.configs[code])
        await running.start()
        self.running[code] = running
        self.stack.push_async_callback(running.stop)
        assert running.node is not None
        return running.node

    async def stop(self, code: str) -> None:
        await self.running.pop(code).stop()

    def node(self, code: str) -> Node:
        node = self.running[code].node
        assert node is not None
        return node


@pytest.fixture
async def net(amqp_url: str, tmp_path: Path) -> AsyncIterator[Net]:
    codes = fresh_codes(3)
    outsider = fresh_codes(1)[0]
    network = create_network(tmp_path, codes, [amqp_url],
                             others=[(outsider, ParticipantStatus.SUSPENDED)])
    async with AsyncExitStack() as stack:
        n = Net(network, stack)
        n.codes = codes  # type: ignore[attr-defined]
        n.outsider = outsider  # type: ignore[attr-defined]
        yield n


async def publish_raw(amqp_url: str, recipient: str, body: bytes, message_id: str) -> None:
    """What an attacker or a broken peer could do: put bytes straight on the exchange."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body, message_id=message_id,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=recipient)


async def test_loop_closes_on_both_sides_with_identical_evidence(net: Net) -> None:
    za, india, eu = net.codes  # type: ignore[attr-defined]
    nodes = {c: await net.start(c) for c in (za, india, eu)}
    numbers = []
    for i, (exporter, importer) in enumerate(itertools.permutations((za, india, eu), 2)):
        number = f"{exporter}-2026-{i:04d}"
        nodes[exporter].issue(certificate(number, exporter, importer,
                                          issuing_authority=f"{exporter}-KPA"))
        numbers.append((number, exporter, importer))
    await until(lambda: all(state(nodes[i], Side.IMPORT, n) is State.RECEIVED
                            for n, _, i in numbers))
    await until(lambda: all(state(nodes[e], Side.EXPORT, n) is State.DELIVERED
                            for n, e, _ in numbers))
    for number, _, importer in numbers:
        nodes[importer].confirm(number)
    await until(lambda: all(state(nodes[e], Side.EXPORT, n) is State.CONFIRMED
                            for n, e, _ in numbers))
    for number, exporter, importer in numbers:
        ours = {e.frame for e in nodes[exporter].store.evidence(number)}
        theirs = {e.frame for e in nodes[importer].store.evidence(number)}
        assert ours == theirs and len(ours) == 3  # certificate, receipt, confirmation
        assert (nodes[exporter].store.get(Side.EXPORT, number).confirmation
                == nodes[importer].store.get(Side.IMPORT, number).confirmation)


async def test_rejections_reach_the_exporter_with_their_reason(net: Net, amqp_url: str) -> None:
    za, india, _ = net.codes  # type: ignore[attr-defined]
    outsider = net.outsider  # type: ignore[attr-defined]
    exporter = await net.start(za)
    importer = await net.start(india)
    # Importer not a Participant in good standing: refused at issue, nothing sent.
    with pytest.raises(CommandRefused, match=r"participant\.suspended"):
        exporter.issue(certificate(f"{za}-1", za, outsider))
    with pytest.raises(CommandRefused, match=r"participant\.unknown"):
        exporter.issue(certificate(f"{za}-2", za, "QQ"))
    # Invalid content, signed by the exporter's own key: the importer rejects it, signed.
    bad = certificate_json(f"{za}-3", za, india)
    bad["lines"][0]["carats_hundredths"] = -5
    envelope = {"message_id": "b" * 32, "kind": "certificate", "sender": za,
                "recipient": india, "created_at": 1, "in_reply_to": None, "payload": bad}
    await publish_raw(amqp_url, india, seal_body(pack(envelope), exporter.signing_key()),
                      "b" * 32)
    # Duplicate number: the same number issued again as a new message.
    exporter.issue(certificate(f"{za}-4", za, india))
    await until(lambda: state(exporter, Side.EXPORT, f"{za}-4") is State.DELIVERED)
    exporter.store.db.execute("DELETE FROM certificates WHERE number=?", (f"{za}-4",))
    exporter.issue(certificate(f"{za}-4", za, india))
    await until(lambda: state(exporter, Side.EXPORT, f"{za}-4") is State.REJECTED)
    record = exporter.store.get(Side.EXPORT, f"{za}-4")
    assert record is not None and record.rejection_reason == "certificate.duplicate_number"

    def rejections() -> list[Rejection]:
        found = []
        for e in exporter.store.evidence():
            payload = decode_body(parse_frame(e.frame).body).payload
            if e.direction == "in" and isinstance(payload, Rejection):
                found.append(payload)
        return found
    await until(lambda: any(r.reason == "body.schema" for r in rejections()))
    (schema,) = [r for r in rejections() if r.reason == "body.schema"]
    assert [(p.path, p.reason) for p in schema.problems] == [
        ("payload.lines[0].carats_hundredths", "field.not_positive")]
    assert importer.store.get(Side.IMPORT, f"{za}-3") is None


async def test_registry_disagreement_rejects_on_receipt(net: Net) -> None:
    za, india, _ = net.codes  # type: ignore[attr-defined]
    # The importer already knows what the exporter does not: ZA is suspended.
    base = net.network.registry
    suspended = RegistryUpdate(version=2, participants=tuple(
        p if p.code != za else type(p)(code=p.code, name=p.name,
                                        status=ParticipantStatus.SUSPENDED,
                                        authorities=p.authorities)
        for p in base.participants))
    from node.chair import sign_registry
    net.network.configs[india].registry_path.write_bytes(
        sign_registry(suspended, net.network.chair_key, 1))
    exporter = await net.start(za)
    importer = await net.start(india)
    assert importer.registry.version == 2 and exporter.registry.version == 1
    exporter.issue(certificate(f"{za}-10", za, india))
    await until(lambda: state(exporter, Side.EXPORT, f"{za}-10") is State.REJECTED)
    record = exporter.store.get(Side.EXPORT, f"{za}-10")
    assert record is not None and record.rejection_reason == "participant.suspended"
    assert state(importer, Side.IMPORT, f"{za}-10") is State.REJECTED


async def test_cancel_and_replace_propagate(net: Net) -> None:
    za, india, _ = net.codes  # type: ignore[attr-defined]
    exporter, importer = await net.start(za), await net.start(india)
    exporter.issue(certificate(f"{za}-20", za, india))
    exporter.issue(certificate(f"{za}-21", za, india))
    await until(lambda: state(importer, Side.IMPORT, f"{za}-21") is State.RECEIVED)
    exporter.cancel(f"{za}-20", "issued in error")
    exporter.replace(f"{za}-21", certificate(f"{za}-22", za, india, parcels=5), "parcels")
    await until(lambda: state(importer, Side.IMPORT, f"{za}-22") is State.RECEIVED)
    await until(lambda: state(importer, Side.IMPORT, f"{za}-20") is State.CANCELLED)
    old = importer.store.get(Side.IMPORT, f"{za}-21")
    assert old is not None and (old.state, old.replaced_by) == (State.REPLACED, f"{za}-22")
    new = importer.store.get(Side.IMPORT, f"{za}-22")
    assert new is not None and new.replaces == f"{za}-21"
    await until(lambda: state(exporter, Side.EXPORT, f"{za}-22") is State.DELIVERED)


async def test_same_frame_twice_gives_one_record_and_the_original_answer(
        net: Net, amqp_url: str) -> None:
    za, india, _ = net.codes  # type: ignore[attr-defined]
    exporter, importer = await net.start(za), await net.start(india)
    record = exporter.issue(certificate(f"{za}-30", za, india))
    await until(lambda: state(exporter, Side.EXPORT, f"{za}-30") is State.DELIVERED)
    frame = exporter.store.evidence_frame(record.message_id)
    assert frame is not None
    await publish_raw(amqp_url, india, frame, record.message_id)

    def receipt_sends() -> list[tuple[int, bytes]]:
        rows = importer.store.db.execute(
            "SELECT attempts, frame FROM outbox WHERE kind='receipt'").fetchall()
        return [(int(a), bytes(f)) for a, f in rows]
    # The duplicate is answered with the original receipt: the same row, sent again.
    await until(lambda: [a for a, _ in receipt_sends()] == [2])
    ((_, receipt),) = receipt_sends()
    assert [e.frame for e in exporter.store.evidence(f"{za}-30") if e.direction == "in"] == [
        receipt]
    assert len(importer.store.records(side=Side.IMPORT)) == 1
    assert len([e for e in importer.store.evidence(f"{za}-30") if e.direction == "in"]) == 1


async def test_certificates_wait_for_a_stopped_importer(net: Net) -> None:
    za, india, _ = net.codes  # type: ignore[attr-defined]
    await net.start(india)  # declares its inbox, then goes away
    await net.stop(india)
    exporter = await net.start(za)
    for i in range(20):
        exporter.issue(certificate(f"{za}-4{i:02d}", za, india))
    await until(lambda: not exporter.store.backlog())  # all confirmed into the queue
    assert all(state(exporter, Side.EXPORT, f"{za}-4{i:02d}") is State.ISSUED
               for i in range(20))
    importer = await net.start(india)
    await until(lambda: len(importer.store.records(side=Side.IMPORT)) == 20)
    for i in range(20):
        importer.confirm(f"{za}-4{i:02d}")
    await until(lambda: all(state(exporter, Side.EXPORT, f"{za}-4{i:02d}") is State.CONFIRMED
                            for i in range(20)))


async def test_kpnode_run_issue_and_verify_log_as_a_user_would(net: Net) -> None:
    za, india, _ = net.codes  # type: ignore[attr-defined]
    importer = await net.start(india)
    za_dir = net.network.configs[za].directory
    cert = za_dir / "cert.json"
    import json
    cert.write_text(json.dumps(certificate_json(f"{za}-50", za, india)))
    kpnode = [sys.executable, "-m", "node.cli"]
    # issue while the node is not running: queued, sent when it starts
    issued = subprocess.run([*kpnode, "issue", str(cert), "--dir", str(za_dir)],
                            capture_output=True, text=True, check=False)
    assert issued.returncode == 0, issued.stderr
    run = subprocess.Popen([*kpnode, "run", "--dir", str(za_dir)],
                           stderr=subprocess.PIPE, text=True)
    try:
        await until(lambda: state(importer, Side.IMPORT, f"{za}-50") is State.RECEIVED)
        importer.confirm(f"{za}-50")
        shown: dict[str, object] = {}

        def confirmed() -> bool:
            out = subprocess.run([*kpnode, "show", f"{za}-50", "--dir", str(za_dir), "--json"],
                                 capture_output=True, text=True, check=True).stdout
            shown.update(json.loads(out))
            return shown["records"][0]["state"] == "confirmed"  # type: ignore[index]
        await until(confirmed)
    finally:
        run.terminate()
        _, err = await asyncio.to_thread(run.communicate, timeout=30)
    assert run.returncode == 0, err
    ok = subprocess.run([*kpnode, "verify-log", "--dir", str(za_dir)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    # change one byte of one logged frame: verify-log must notice
    import sqlite3
    db = sqlite3.connect(za_dir / "node.sqlite3")
    seq, frame = db.execute("SELECT seq, frame FROM evidence ORDER BY seq DESC").fetchone()
    db.execute("UPDATE evidence SET frame=? WHERE seq=?",
               (frame[:30] + bytes([frame[30] ^ 1]) + frame[31:], seq))
    db.commit()
    db.close()
    bad = subprocess.run([*kpnode, "verify-log", "--dir", str(za_dir)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and f"entry {seq}" in bad.stdout


async def test_unroutable_message_stays_in_the_outbox_until_the_inbox_exists(net: Net) -> None:
    za, india, _ = net.codes  # type: ignore[attr-defined]
    exporter = await net.start(za)  # india has never run: no inbox on the broker yet
    exporter.issue(certificate(f"{za}-60", za, india))

    def backlog_error() -> str | None:
        rows = exporter.store.backlog()
        return rows[0].last_error if rows else None
    await until(lambda: (backlog_error() or "").startswith("unroutable"))
    assert state(exporter, Side.EXPORT, f"{za}-60") is State.ISSUED
    exporter.store.db.execute("UPDATE outbox SET next_attempt_at=0")  # skip the 30 s wait
    importer = await net.start(india)
    await until(lambda: state(importer, Side.IMPORT, f"{za}-60") is State.RECEIVED)
    await until(lambda: state(exporter, Side.EXPORT, f"{za}-60") is State.DELIVERED)
    assert exporter.store.backlog() == []
