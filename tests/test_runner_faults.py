"""The running node without a broker: its sweep and its dead-lettering survive faults."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node import runner
from node.clockwatch import HOLD_AT_MOST_MS, ClockWatch
from node.machine import Side, State
from node.network import create_network
from node.runner import RunningNode
from node.service import Node, now_ms
from node.transport import Delivery as BrokerDelivery
from protocol import Envelope, Receipt, parse_frame, seal
from tests.netutil import certificate


async def test_the_sweep_survives_a_fault_of_any_kind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One unexpected exception used to end the sweep task for good: no expiry and no
    resend until the node was restarted."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    node = Node.open(network.configs["ZA"])
    try:
        node.issue(certificate("ZA-2026-0001", "ZA", "IN", issued_on="2020-01-01",
                               expires_on="2099-01-01"))
        later = now_ms() + 100 * 365 * 86_400_000
        node.clock = lambda: later  # past the certificate's expiry: the sweep has work
        original = Node.expire_overdue
        faults = [RuntimeError("a bug, once")]

        def expire_overdue(self: Node, unreadable: Any = None) -> list[object]:
            if faults:
                raise faults.pop()
            return original(self, unreadable)  # type: ignore[return-value]
        monkeypatch.setattr(Node, "expire_overdue", expire_overdue)
        monkeypatch.setattr(runner, "SWEEP_SECONDS", 0.02)
        running = RunningNode(network.configs["ZA"])
        running.node = node
        task = asyncio.create_task(running._sweep())
        for _ in range(200):
            record = node.store.get(Side.EXPORT, "ZA-2026-0001")
            if record is not None and record.state is State.EXPIRED:
                break
            await asyncio.sleep(0.02)
        assert not task.done()
        assert not faults
        assert node.store.get(Side.EXPORT, "ZA-2026-0001").state is State.EXPIRED  # type: ignore[union-attr]
        task.cancel()
    finally:
        node.close()


async def test_a_record_changed_outside_kpx_stops_neither_the_sweep_nor_the_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One open record kpx could not read (edited in SQLite by hand) failed every sweep:
    no certificate expired and none was sent again, for as long as it stayed; and every
    /metrics scrape answered 500, the readiness gauges with it. The others now go on, and
    the unreadable ones are counted and logged."""
    import structlog

    from node.httpserver import refresh_gauges

    network = create_network(tmp_path, ["ZA", "IN"], [])
    node = Node.open(network.configs["ZA"])
    try:
        for n in (1, 2):
            node.issue(certificate(f"ZA-2026-000{n}", "ZA", "IN", issued_on="2020-01-01",
                                   expires_on="2099-01-01"))
        with node.store.transaction():
            node.store.db.execute("UPDATE certificates SET certificate=x'00' "
                                  "WHERE number='ZA-2026-0001'")
        later = now_ms() + 100 * 365 * 86_400_000
        node.clock = lambda: later  # past both certificates' expiry
        monkeypatch.setattr(runner, "SWEEP_SECONDS", 0.02)
        running = RunningNode(network.configs["ZA"])
        running.node = node
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(running._sweep())
            for _ in range(200):
                record = node.store.get(Side.EXPORT, "ZA-2026-0002")
                if record is not None and record.state is State.EXPIRED:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
        assert node.store.get(Side.EXPORT, "ZA-2026-0002").state is State.EXPIRED  # type: ignore[union-attr]
        said = [e for e in logs if e["event"].startswith("records kpx cannot read")]
        assert said and said[0]["count"] == 1 and "ZA-2026-0001" in said[0]["first"]
        assert not [e for e in logs if e["event"].startswith("sweep failed")]
        await refresh_gauges(running)  # raised before: every scrape a 500
        exposition = running.metrics.exposition().decode()
        assert "kpx_unreadable_records 1.0" in exposition
        assert 'kpx_expired_certificates{side="export"} 1.0' in exposition
    finally:
        node.close()


async def test_a_record_changed_outside_kpx_is_logged_once_not_every_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep runs every 5 s: it said 'records kpx cannot read' each time, 17,000
    errors a day for one row edited by hand, as the relay's outage lines did before
    8b41b26. Once, again when what cannot be read changes, and hourly while it lasts."""
    import structlog

    network = create_network(tmp_path, ["ZA", "IN"], [])
    node = Node.open(network.configs["ZA"])
    try:
        for n, expires_on in ((1, "2099-01-01"), (2, "2099-01-01"), (3, "2200-01-01")):
            node.issue(certificate(f"ZA-2026-000{n}", "ZA", "IN", issued_on="2020-01-01",
                                   expires_on=expires_on))
        with node.store.transaction():
            node.store.db.execute("UPDATE certificates SET certificate=x'00' "
                                  "WHERE number='ZA-2026-0001'")
        later = now_ms() + 100 * 365 * 86_400_000
        node.clock = lambda: later  # past the first two's expiry, not the third's
        monkeypatch.setattr(runner, "SWEEP_SECONDS", 0.01)
        running = RunningNode(network.configs["ZA"])
        running.node = node

        def said(logs: list[Any]) -> list[Any]:
            return [e for e in logs if e["event"].startswith("records kpx cannot read")]
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(running._sweep())
            await asyncio.sleep(0.5)  # dozens of sweeps
            assert len(said(logs)) == 1, len(said(logs))
            with node.store.transaction():  # a second one: what is unreadable changed
                node.store.db.execute("UPDATE certificates SET certificate=x'00', "
                                      "expires_on='2020-02-01' WHERE number='ZA-2026-0003'")
            await asyncio.sleep(0.3)
            task.cancel()
        assert [e["count"] for e in said(logs)] == [1, 2]
    finally:
        node.close()


class DeadLetterQueueDown:
    """A transport whose dead-letter publishes fail ``failures`` times (a full queue that
    nacks, a timeout), recording what is acknowledged, rejected and dead-lettered."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.acked: list[bytes] = []
        self.requeued: list[bytes] = []
        self.dead: list[bytes] = []

    async def ack(self, deliveries: list[BrokerDelivery]) -> None:
        self.acked += [d.body for d in deliveries]

    async def reject(self, delivery: BrokerDelivery, *, requeue: bool = True) -> None:
        assert requeue
        self.requeued.append(delivery.body)

    async def dead_letter(self, body: bytes, **_: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise TimeoutError("the dead-letter queue did not confirm")
        self.dead.append(body)


def delivery(body: bytes, tag: int) -> BrokerDelivery:
    message: Any = SimpleNamespace(body=body, message_id=None, user_id=None, headers={},
                                   redelivered=False, delivery_tag=tag)
    return BrokerDelivery(message, generation=0)


@pytest.mark.parametrize("failures", [1, 100])
async def test_a_dead_letter_queue_that_fails_neither_stalls_the_inbox_nor_loses_a_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
    """A failed dead-letter publish once left the whole batch unacknowledged (holding its
    prefetch slots until a reconnect) and, delivered again as a duplicate, the refused
    message never reached the dead-letter queue. Now it is tried again; if that fails, a
    message kept in the evidence log is acknowledged and one kept nowhere is left to the
    broker."""
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za, india = (Node.open(network.configs[c]) for c in ("ZA", "IN"))
    try:
        unknown = seal(Envelope(sender="ZA", recipient="IN", created_at=now_ms(),
                                payload=Receipt(certificate="IN-2026-0404",
                                                certificate_digest=bytes(32))),
                       za.signing_key())
        garbage = b"not a kpx frame"
        india.issue(certificate("IN-2026-0001", "IN", "ZA"))
        (good,) = [r.frame for r in india.store.due(2**62, 10)]
        accepted = seal(Envelope(sender="ZA", recipient="IN", created_at=now_ms(),
                                 payload=Receipt(certificate="IN-2026-0001",
                                                 certificate_digest=parse_frame(good).digest)),
                        za.signing_key())
        transport = DeadLetterQueueDown(failures)
        running = RunningNode(network.configs["IN"])
        running.node, running.transport = india, transport  # type: ignore[assignment]
        await running._on_batch([delivery(unknown, 1), delivery(garbage, 2),
                                 delivery(accepted, 3)])
        if failures < runner.DEAD_LETTER_ATTEMPTS:  # tried again: both copies made
            assert transport.dead == [unknown, garbage]
            assert transport.acked == [unknown, garbage, accepted]
            assert transport.requeued == []
        else:
            assert transport.acked == [unknown, accepted]  # its frame is in the evidence log
            assert transport.requeued == [garbage]  # kept nowhere else: the broker keeps it
            assert any(e.frame == unknown for e in india.store.evidence())
    finally:
        za.close()
        india.close()


async def test_a_refused_message_delivered_again_gets_its_dead_letter_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused and committed, then the node stopped (kill -9, a lost connection, a dead-
    letter queue that failed three times) before the copy was made: delivered again it was
    a duplicate and acknowledged, so it never reached the dead-letter queue, `kpnode
    dead-letters list` or `status`. It is copied now, with its first reason, and not
    answered or counted as a rejection twice."""
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za, india = (Node.open(network.configs[c]) for c in ("ZA", "IN"))
    try:
        unknown = seal(Envelope(sender="ZA", recipient="IN", created_at=now_ms(),
                                payload=Receipt(certificate="IN-2026-0404",
                                                certificate_digest=bytes(32))),
                       za.signing_key())
        running = RunningNode(network.configs["IN"])
        running.node = india
        running.transport = DeadLetterQueueDown(100)  # type: ignore[assignment]
        await running._on_batch([delivery(unknown, 1)])
        assert running.transport.dead == []  # type: ignore[attr-defined]
        rejections = len(india.store.due(2**62, 10))
        running.transport = transport = DeadLetterQueueDown(0)  # type: ignore[assignment]
        reasons: list[str] = []
        real = transport.dead_letter

        async def dead_letter(body: bytes, **kwargs: Any) -> None:
            reasons.append(kwargs["reason"])
            await real(body, **kwargs)
        transport.dead_letter = dead_letter  # type: ignore[method-assign]
        await running._on_batch([delivery(unknown, 2)])
        assert transport.dead == [unknown] and transport.acked == [unknown]
        assert reasons == ["certificate.unknown"]
        assert len(india.store.due(2**62, 10)) == rejections  # the one answer, sent again
        text = running.metrics.exposition().decode()
        assert 'kpx_rejections_total{reason="certificate.unknown"} 1.0' in text
        assert 'kpx_messages_in_total{kind="receipt",outcome="duplicate"} 1.0' in text
    finally:
        za.close()
        india.close()


async def test_a_refusal_decided_while_stopping_is_not_acknowledged_without_its_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopping node tries a dead-letter copy once; when that try failed, a message kept
    in the evidence log was acknowledged all the same and never came again to be copied."""
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za, india = (Node.open(network.configs[c]) for c in ("ZA", "IN"))
    try:
        unknown = seal(Envelope(sender="ZA", recipient="IN", created_at=now_ms(),
                                payload=Receipt(certificate="IN-2026-0404",
                                                certificate_digest=bytes(32))),
                       za.signing_key())
        transport = DeadLetterQueueDown(1)  # one failure, which a running node would retry
        running = RunningNode(network.configs["IN"])
        running.node, running.transport = india, transport  # type: ignore[assignment]
        running._stopping = True  # deliveries in hand are decided while stopping
        await running._on_batch([delivery(unknown, 1)])
        assert (transport.dead, transport.acked, transport.requeued) == ([], [], [unknown])
    finally:
        za.close()
        india.close()


async def _no_wait(_: float) -> None:
    return None


def test_a_clock_jump_is_held_briefly_and_a_lasting_one_is_taken_for_a_correction() -> None:
    """A review found the first watch holding deliveries for good after a virtual machine's
    pause (its boot clock does not count it; NTP then steps the wall clock): a jump is
    held while it lasts, but never longer than HOLD_AT_MOST_MS of measured time."""
    minute = 60_000
    watch = ClockWatch(wall_at_start_ms=1_000_000, elapsed_at_start_ms=0)
    assert watch.check(1_000_000 + 5 * minute, 5 * minute)  # both moved alike
    year = 365 * 24 * 60 * minute
    assert not watch.check(1_000_000 + 5 * minute + year, 5 * minute + 1000)  # set ahead
    assert watch.check(1_000_000 + 6 * minute, 6 * minute)  # set right again
    paused = 30 * minute  # a pause the measured clock did not see, then an NTP step
    for at in range(7, 7 + HOLD_AT_MOST_MS // minute):
        assert not watch.check(1_000_000 + at * minute + paused, at * minute), at
    at = 7 + HOLD_AT_MOST_MS // minute
    assert watch.check(1_000_000 + at * minute + paused, at * minute)  # a correction
    assert watch.check(1_000_000 + (at + 60) * minute + paused, (at + 60) * minute)
