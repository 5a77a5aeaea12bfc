"""Faults a node must ride out: poison messages, a store that cannot commit, lost
receipts, and shutdown in the middle of work. Real broker, nodes in-process unless the
test needs a process (SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import io
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import pytest
import structlog

from node.logs import configure_logging
from node.machine import Side, State
from node.metrics import NodeMetrics
from node.network import create_network
from node.runner import DRAIN_SECONDS, RunningNode, run_until_signalled
from node.service import Delivery, Node, Verdict
from node.status import BrokerView, build_status, read_store, render_status
from node.store import StoreError
from node.transport import (
    EXCHANGE,
    PublishResult,
    Transport,
    TransportUnavailable,
    dead_letter_queue,
    inbox_queue,
)
from tests.netutil import carry, certificate, queue_depth
from tests.test_network import fresh_codes, state, until

pytestmark = pytest.mark.broker


async def test_poison_message_is_dead_lettered_after_the_delivery_limit_and_rest_flows(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    poison = b"KPX\x01" + b"\xee" * 200  # the bytes this node's code cannot survive
    original = Node._handle
    tries = []

    def handle(self: Node, ctx: object, delivery: Delivery) -> Verdict:
        if delivery.body == poison:
            tries.append(delivery)
            raise RuntimeError("a bug this message triggers every time")
        return original(self, ctx, delivery)  # type: ignore[arg-type]
    monkeypatch.setattr(Node, "_handle", handle)

    async with RunningNode(network.configs[importer_code]) as importer, \
            RunningNode(network.configs[exporter_code]) as exporter:
        assert importer.node is not None and exporter.node is not None
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            x = await channel.get_exchange(EXCHANGE)
            await x.publish(aio_pika.Message(poison, message_id="poison-0001",
                                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                            routing_key=importer_code)
        for i in range(20):
            exporter.node.issue(certificate(f"{exporter_code}-P{i}", exporter_code,
                                            importer_code))
        await until(lambda: len(importer.node.store.records()) == 20)  # type: ignore[union-attr]
        dead = dead_letter_queue(importer_code)
        deadline = time.monotonic() + 30
        while await queue_depth(amqp_url, dead) < 1:
            assert time.monotonic() < deadline, "poison message never dead-lettered"
            await asyncio.sleep(0.2)
        assert await queue_depth(amqp_url, inbox_queue(importer_code)) == 0
        # set aside only once the broker's delivery limit ran out, not at the first failure
        # (a fault of a moment would dead-letter a message that needed only another try)
        assert len(tries) > network.configs[importer_code].delivery_limit
        await until(lambda: all(
            state(exporter.node, Side.EXPORT, f"{exporter_code}-P{i}")  # type: ignore[arg-type]
            is State.DELIVERED for i in range(20)))


async def test_a_refused_message_is_not_acked_into_a_dead_letter_queue_that_is_gone(
        amqp_url: str, tmp_path: Path) -> None:
    """An operator deleted the dead-letter queue (to empty it) while the node ran: the copy
    of a refused message has nowhere to go. Published without 'mandatory' the broker would
    confirm it and drop it, and the node would ack a message kept nowhere; it stays in the
    inbox instead, and reaches the dead-letter queue once there is one again."""
    code = fresh_codes(1)[0]
    network = create_network(tmp_path, [code], [amqp_url])
    garbage = b"not a kpx frame, from nobody"
    async with RunningNode(network.configs[code]):
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.queue_delete(dead_letter_queue(code))
            await channel.default_exchange.publish(
                aio_pika.Message(garbage, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=inbox_queue(code))
        await asyncio.sleep(1.5)  # refused, its copy tried and returned as unroutable
    async with RunningNode(network.configs[code]):  # declares its dead-letter queue again
        await until_async(lambda: queue_depth(amqp_url, dead_letter_queue(code)), 1)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        copy = await (await channel.declare_queue(dead_letter_queue(code), passive=True)
                      ).get(no_ack=True)
        assert copy is not None and copy.body == garbage


async def until_async(depth: Callable[[], Awaitable[int]], at_least: int,
                      timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while await depth() < at_least:
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_store_that_cannot_commit_holds_deliveries_and_recovers(
        amqp_url: str, tmp_path: Path) -> None:
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    async with RunningNode(network.configs[importer_code]) as importer, \
            RunningNode(network.configs[exporter_code]) as exporter:
        assert importer.node is not None and exporter.node is not None
        importer.node.store.db.execute("PRAGMA busy_timeout=100")
        # Another process takes the database's write lock and keeps it: commits fail.
        blocker = sqlite3.connect(network.configs[importer_code].database_path,
                                  isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            for i in range(10):
                exporter.node.issue(certificate(f"{exporter_code}-S{i}", exporter_code,
                                                importer_code))
            await until(lambda: not importer.store_ok, 20)
            await asyncio.sleep(1.0)
            # held, not acknowledged, not requeued, not dead-lettered
            assert await queue_depth(amqp_url, dead_letter_queue(importer_code)) == 0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await until(lambda: len(importer.node.store.records()) == 10)  # type: ignore[union-attr]
        assert importer.store_ok
        await until(lambda: all(
            state(exporter.node, Side.EXPORT, f"{exporter_code}-S{i}")  # type: ignore[arg-type]
            is State.DELIVERED for i in range(10)))
        assert await queue_depth(amqp_url, dead_letter_queue(importer_code)) == 0


@contextlib.asynccontextmanager
async def running_pair(amqp_url: str, tmp_path: Path
                       ) -> AsyncIterator[tuple[str, str, RunningNode, RunningNode]]:
    """A fresh exporter and importer, both running in this process: (exporter code,
    importer code, exporter, importer)."""
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    async with RunningNode(network.configs[importer_code]) as importer, \
            RunningNode(network.configs[exporter_code]) as exporter:
        yield exporter_code, importer_code, exporter, importer


async def test_a_record_edited_outside_kpx_sets_aside_only_the_messages_that_need_it(
        amqp_url: str, tmp_path: Path) -> None:
    """An unreadable row was taken for a store fault: the node held every delivery of the
    batch unacknowledged for good and called its store unwritable. Now only the message
    that needs the row is dead-lettered; everything else flows."""
    async with running_pair(amqp_url, tmp_path) as (exporter_code, importer_code,
                                                    exporter, importer):
        assert importer.node is not None and exporter.node is not None
        damaged = f"{exporter_code}-D1"
        exporter.node.issue(certificate(damaged, exporter_code, importer_code))
        await until(lambda: state(exporter.node, Side.EXPORT,  # type: ignore[arg-type]
                                  damaged) is State.DELIVERED)
        with contextlib.closing(sqlite3.connect(exporter.config.database_path)) as db, db:
            db.execute("UPDATE certificates SET state = 'LOST' WHERE number = ?", (damaged,))
        importer.node.confirm(damaged)
        for i in range(5):
            exporter.node.issue(certificate(f"{exporter_code}-F{i}", exporter_code,
                                            importer_code))
        await until(lambda: all(state(importer.node, Side.IMPORT,  # type: ignore[arg-type]
                                      f"{exporter_code}-F{i}") is State.RECEIVED
                                for i in range(5)))
        for i in range(5):
            importer.node.confirm(f"{exporter_code}-F{i}")
        await until(lambda: all(
            state(exporter.node, Side.EXPORT, f"{exporter_code}-F{i}")  # type: ignore[arg-type]
            is State.CONFIRMED for i in range(5)))
        deadline = time.monotonic() + 30
        while await queue_depth(amqp_url, dead_letter_queue(exporter_code)) < 1:
            assert time.monotonic() < deadline, "the confirmation was never set aside"
            await asyncio.sleep(0.2)
        assert exporter.store_ok


class _FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_log_that_cannot_be_written_does_not_stop_the_node(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full log disk or a log pipe whose reader exited made every log call raise: the
    node rolled back each batch (it logs inside the transaction), took it for a poison
    message, and then stopped taking deliveries for good while its status said OK."""
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    monkeypatch.setattr(sys, "stderr", _FullDisk())
    configure_logging(json_logs=True, level="INFO")
    root = logging.getLogger()
    try:
        async with RunningNode(network.configs[importer_code]) as importer, \
                RunningNode(network.configs[exporter_code]) as exporter:
            assert importer.node is not None and exporter.node is not None
            for i in range(20):
                exporter.node.issue(certificate(f"{exporter_code}-L{i}", exporter_code,
                                                importer_code))
            await until(lambda: all(
                state(exporter.node, Side.EXPORT, f"{exporter_code}-L{i}")  # type: ignore[arg-type]
                is State.DELIVERED for i in range(20)))
            assert importer.store_ok
        assert await queue_depth(amqp_url, dead_letter_queue(importer_code)) == 0
    finally:
        root.handlers = [h for h in root.handlers if not getattr(h, "_kpx_handler", False)]
        structlog.reset_defaults()


async def test_a_batch_whose_handling_fails_goes_back_to_the_broker(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliveries of a batch whose handler raised were left unsettled on a live channel,
    where the broker never redelivers them: those loops waited for a restart. Handed back
    at once, a fault of half a second dead-lettered them all (each return counts towards
    the delivery limit of 5): they go back after a pause that grows."""
    original = RunningNode._on_batch
    failing_until = [0.0]

    async def on_batch(self: RunningNode, deliveries: list[object]) -> None:
        if time.monotonic() < failing_until[0]:
            raise RuntimeError("a fault outside the per-message handling, for a moment")
        await original(self, deliveries)  # type: ignore[arg-type]
    monkeypatch.setattr(RunningNode, "_on_batch", on_batch)
    async with running_pair(amqp_url, tmp_path) as (exporter_code, importer_code,
                                                    exporter, importer):
        assert importer.node is not None and exporter.node is not None
        failing_until[0] = time.monotonic() + 0.5
        for i in range(5):
            exporter.node.issue(certificate(f"{exporter_code}-B{i}", exporter_code,
                                            importer_code))
        await until(lambda: all(
            state(exporter.node, Side.EXPORT, f"{exporter_code}-B{i}")  # type: ignore[arg-type]
            is State.DELIVERED for i in range(5)), 30)
        assert await queue_depth(amqp_url, dead_letter_queue(importer_code)) == 0


async def test_a_clock_set_a_year_ahead_expires_and_refuses_nothing(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash hunt set an importer's clock a year ahead for six seconds: its sweep expired
    every received import for good, and certificates arriving meanwhile were refused as
    expired on both sides. While the wall clock is ahead of the time measured, the node now
    holds deliveries and expires nothing; set right, it goes on."""
    monkeypatch.setattr("node.runner.SWEEP_SECONDS", 0.1)
    async with running_pair(amqp_url, tmp_path) as (exporter_code, importer_code,
                                                    exporter, importer):
        assert importer.node is not None and exporter.node is not None
        held = f"{exporter_code}-C1"
        exporter.node.issue(certificate(held, exporter_code, importer_code))
        await until(lambda: state(importer.node, Side.IMPORT,  # type: ignore[arg-type]
                                  held) is State.RECEIVED)
        right = importer.node.clock
        importer.node.clock = lambda: right() + 365 * 86_400_000
        late = f"{exporter_code}-C2"
        exporter.node.issue(certificate(late, exporter_code, importer_code))
        await asyncio.sleep(2.0)  # sweeps run, the new certificate waits in the inbox
        assert not importer.clock_ok
        assert state(importer.node, Side.IMPORT, held) is State.RECEIVED
        assert importer.node.store.get(Side.IMPORT, late) is None
        importer.node.clock = right
        await until(lambda: state(importer.node, Side.IMPORT,  # type: ignore[arg-type]
                                  late) is State.RECEIVED)
        assert importer.clock_ok
        assert state(importer.node, Side.IMPORT, held) is State.RECEIVED
        # the importer's receipt is on its way: waited for, not expected at once
        await until(lambda: state(exporter.node, Side.EXPORT,  # type: ignore[arg-type]
                                  late) is State.DELIVERED)


def test_an_empty_or_newer_database_is_refused_not_taken_as_a_fresh_one(
        tmp_path: Path) -> None:
    """A database truncated to 0 bytes (or restored from an archive that held one) was
    opened as a new, empty store: 'kpnode list' said 'no certificates', and 'issue' gave a
    number out a second time. One written by a newer kpx was opened and written too."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    config = network.configs["ZA"]
    za = Node.open(config)
    za.issue(certificate("ZA-E1", "ZA", "IN"))
    za.close()
    path = config.database_path
    kept = path.read_bytes()
    path.write_bytes(b"")
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\).*kpnode restore"):
        Node.open(config)
    listed = subprocess.run([sys.executable, "-m", "node.cli", "list", "--dir",
                             str(config.directory)], capture_output=True, text=True)
    assert listed.returncode == 3 and "is empty (0 bytes)" in listed.stderr
    assert path.read_bytes() == b""  # nothing written into it
    path.write_bytes(kept)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema version 99; this kpx knows up to"):
        Node.open(config)


def test_a_damaged_database_is_a_store_fault_not_a_poison_message(tmp_path: Path) -> None:
    """A damaged file ("database disk image is malformed") raised SQLite's bare
    DatabaseError, which the running node took for a fault of the message: every delivery
    was requeued up to the delivery limit and dead-lettered. As a StoreError, deliveries
    are held unacknowledged until the store is repaired."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    za, india = Node.open(network.configs["ZA"]), Node.open(network.configs["IN"])
    za.issue_many([certificate(f"ZA-D{i}", "ZA", "IN") for i in range(300)])
    za.close()
    path = network.configs["ZA"].database_path
    size = path.stat().st_size
    with path.open("r+b") as f:  # a disk's damage: every page but the first two overwritten
        for offset in range(8192, size, 4096):
            f.seek(offset + 100)
            f.write(b"\xff" * 200)
    za = Node.open(network.configs["ZA"])
    try:
        with pytest.raises(StoreError, match="malformed"):
            za.issue(certificate("ZA-D300", "ZA", "IN"))
        india.issue(certificate("IN-D1", "IN", "ZA"))
        with pytest.raises(StoreError, match="malformed"):
            carry(india, {"ZA": za})  # what the runner holds instead of rejecting
    finally:
        za.close()
        india.close()


def test_unanswered_certificate_is_resent_with_the_same_bytes_and_backoff(
        tmp_path: Path) -> None:
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    now = [1_800_000_000_000]
    nodes = {c: Node.open(cfg) for c, cfg in network.configs.items()}
    za = nodes["ZA"]
    za.clock = lambda: now[0]
    za.issue(certificate("ZA-R1", "ZA", "IN"))
    (sent,) = za.store.due(now[0], 10)
    with za.store.transaction():
        # a broker outage first: failed attempts must not stretch the resend wait (eight
        # of them once made it 256 hours)
        for _ in range(8):
            za.store.mark_failed(sent.seq, "TransportUnavailable", now[0])
        za.store.mark_published([sent.seq], now[0])  # "published", but the receipt is lost
    hour = 3_600_000
    assert za.resend_unanswered(hour) == []
    now[0] += hour
    assert za.resend_unanswered(hour) == [sent.message_id]
    (again,) = za.store.due(now[0], 10)
    assert (again.message_id, again.frame) == (sent.message_id, sent.frame)
    with za.store.transaction():
        za.store.mark_published([again.seq], now[0])
    now[0] += hour
    assert za.resend_unanswered(hour) == []  # second wait is twice as long
    now[0] += hour
    assert za.resend_unanswered(hour) == [sent.message_id]
    # the importer answers the resend like the original; the loop goes on
    carry(za, nodes)
    carry(nodes["IN"], nodes)
    assert za.store.get(Side.EXPORT, "ZA-R1").state is State.DELIVERED  # type: ignore[union-attr]
    assert za.resend_unanswered(hour) == []
    for n in nodes.values():
        n.close()


def test_a_partner_that_does_not_answer_is_named_in_status_and_metrics(
        tmp_path: Path) -> None:
    """The importer's node is down for hours: the certificates reached its inbox, so the
    exporter's outbox was empty and its status said OK, with resends going out hourly.
    Once a certificate was sent again without a receipt, status and /metrics say so."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    hour = 3_600_000
    now = [1_800_000_000_000]
    nodes = {c: Node.open(cfg) for c, cfg in network.configs.items()}
    za = nodes["ZA"]
    za.clock = lambda: now[0]
    broker = BrokerView(reachable=True, inbox_messages=0, inbox_consumers=1, dead_letters=0)

    def status() -> dict[str, object]:
        return build_status(participant="ZA", authority=za.config.authority, now=now[0],
                            running_pid=1, registry=za.registry,
                            own_public_key=bytes(za.signing_key(now[0]).verify_key),
                            broker=broker, **read_store(za.store))

    def gauge() -> bytes:
        metrics = NodeMetrics()
        metrics.set_unanswered(za.store.unanswered_summary())
        return metrics.exposition()

    inbox: list[bytes] = []  # IN's inbox on the broker, while IN's node is down

    def published() -> None:
        rows = za.store.due(now[0], 10)
        with za.store.transaction():
            za.store.mark_published([r.seq for r in rows], now[0])
        inbox.extend(r.frame for r in rows)

    try:
        for n in ("ZA-U1", "ZA-U2"):
            za.issue(certificate(n, "ZA", "IN"))
        published()
        assert za.store.unanswered_summary() == []  # sent once: not yet overdue
        assert status()["health"] == "ok"
        now[0] += hour
        assert len(za.resend_unanswered(hour)) == 2
        published()
        s = status()
        assert s["health"] == "warning"
        assert s["unanswered"] == [{"partner": "IN", "certificates": 2,
                                    "oldest_age_seconds": 3600}]
        assert any("2 certificate(s) to IN without a receipt though sent again" in p["text"]
                   for p in s["problems"])  # type: ignore[attr-defined]
        assert "certificate(s) to IN sent again, no receipt yet" in render_status(s)
        assert b'kpx_unanswered_certificates{partner="IN"} 2.0' in gauge()
        # IN's node is back: it answers, and the warning and the gauge go
        nodes["IN"].handle_batch([Delivery(frame) for frame in inbox])
        carry(nodes["IN"], nodes)
        assert status()["unanswered"] == [] and status()["health"] == "ok"
        assert b"kpx_unanswered_certificates{" not in gauge()
    finally:
        for n in nodes.values():
            n.close()


def test_a_clock_stepped_back_delays_no_resend_or_retry_by_the_step(tmp_path: Path) -> None:
    """A clock that ran a day ahead is corrected (NTP, a VM restored from a snapshot): the
    outbox held times from the future, and a certificate sent then waited 25 hours for its
    resend, a failed publish a day for its retry."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    hour, day = 3_600_000, 86_400_000
    now = [1_800_000_000_000 + day]  # a day ahead
    za = Node.open(network.configs["ZA"])
    za.clock = lambda: now[0]
    try:
        za.issue(certificate("ZA-C1", "ZA", "IN"))
        za.issue(certificate("ZA-C2", "ZA", "IN"))
        sent, failed = za.store.due(now[0], 10)
        with za.store.transaction():
            za.store.mark_published([sent.seq], now[0])
            za.store.mark_failed(failed.seq, "TransportUnavailable", now[0] + 60_000)
        now[0] -= day  # corrected
        assert za.resend_unanswered(hour) == []  # noticed: the send is taken as now
        assert [r.message_id for r in za.store.due(now[0], 10)] == [failed.message_id]
        now[0] += hour
        assert za.resend_unanswered(hour) == [sent.message_id]  # an hour, not 25
    finally:
        za.close()


def test_overdue_loops_expire_on_both_sides(tmp_path: Path) -> None:
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    nodes = {c: Node.open(cfg) for c, cfg in network.configs.items()}
    nodes["ZA"].issue(certificate("ZA-E1", "ZA", "IN"))
    carry(nodes["ZA"], nodes)
    carry(nodes["IN"], nodes)
    later = time.time_ns() // 1_000_000 + 61 * 86_400_000  # past the 60-day validity
    for n in nodes.values():
        n.clock = lambda: later
        assert [r.number for r in n.expire_overdue()] == ["ZA-E1"]
    assert nodes["ZA"].store.get(Side.EXPORT, "ZA-E1").state is State.EXPIRED  # type: ignore[union-attr]
    assert nodes["IN"].store.get(Side.IMPORT, "ZA-E1").state is State.EXPIRED  # type: ignore[union-attr]
    for n in nodes.values():
        n.close()


def imported(database: Path) -> int:
    """Certificates a running node's database holds so far (0 while it is being made)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM certificates").fetchone()[0])
    except sqlite3.Error:
        return 0


async def test_sigterm_mid_burst_exits_zero_in_bound_and_loses_nothing(
        amqp_url: str, tmp_path: Path) -> None:
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    exporter_dir = network.configs[exporter_code].directory
    importer_dir = network.configs[importer_code].directory
    kpnode = [sys.executable, "-m", "node.cli"]
    importer = subprocess.Popen([*kpnode, "run", "--dir", str(importer_dir)],
                                stderr=subprocess.DEVNULL)
    exporter = subprocess.Popen([*kpnode, "run", "--dir", str(exporter_dir)],
                                stderr=subprocess.DEVNULL)
    count = 300
    try:
        issuer = Node.open(network.configs[exporter_code])
        for i in range(count):
            issuer.issue(certificate(f"{exporter_code}-T{i:04d}", exporter_code, importer_code))
        issuer.close()
        # Mid-burst: the importer has taken some. A fixed wait sent SIGTERM, on a busy
        # machine, while the processes were still importing Python (exit -15).
        await until(lambda: imported(network.configs[importer_code].database_path) > 0, 60)
        started = time.monotonic()
        importer.send_signal(signal.SIGTERM)
        exporter.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 60) for p in (importer, exporter)]
        took = time.monotonic() - started
    finally:
        for p in (importer, exporter):
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    assert took < DRAIN_SECONDS + 5
    # both come back; every certificate arrives exactly once
    async with RunningNode(network.configs[importer_code]) as im, \
            RunningNode(network.configs[exporter_code]) as ex:
        assert im.node is not None and ex.node is not None
        await until(lambda: len(im.node.store.records()) == count, 60)  # type: ignore[union-attr]
        await until(lambda: all(r.state is State.DELIVERED
                                for r in ex.node.store.records()), 60)  # type: ignore[union-attr]
        assert len(ex.node.store.records()) == count
    out = subprocess.run([*kpnode, "list", "--dir", str(importer_dir), "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert sorted(r["number"] for r in json.loads(out)) == [
        f"{exporter_code}-T{i:04d}" for i in range(count)]


async def test_stop_with_the_broker_gone_keeps_the_outbox_and_frees_the_directory(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    number = f"{exporter_code}-GONE1"
    running = RunningNode(network.configs[exporter_code])
    await running.start()
    assert running.node is not None and running.transport is not None

    async def gone(self: Transport, items: object) -> list[PublishResult]:
        raise TransportUnavailable("not connected to a broker")
    monkeypatch.setattr(Transport, "publish", gone)
    running.node.issue(certificate(number, exporter_code, importer_code))
    await running.stop()  # the drain meets no broker: it must still close everything
    monkeypatch.undo()

    async with RunningNode(network.configs[importer_code]) as importer, \
            RunningNode(network.configs[exporter_code]) as exporter:  # the lock was freed
        assert importer.node is not None and exporter.node is not None
        await until(lambda: state(exporter.node, Side.EXPORT, number)  # type: ignore[arg-type]
                    is State.DELIVERED, 30)


async def test_a_running_node_keeps_its_start_up_objects_out_of_full_collections(
        amqp_url: str, tmp_path: Path) -> None:
    """``kpnode run`` freezes what is alive once the node runs, so a full garbage collection
    (a pause of every message in hand) walks only what came later."""
    (code,) = fresh_codes(1)
    network = create_network(tmp_path, [code], [amqp_url])
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    task = asyncio.create_task(run_until_signalled(network.configs[code], signals=()))
    try:
        await until(lambda: gc.get_freeze_count() > 0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()


def test_kpnode_run_stops_at_once_when_told_to_while_it_waits_for_a_broker(
        tmp_path: Path) -> None:
    """SIGTERM (a supervisor's stop) while the node still waited for a broker at start was
    ignored for up to a minute: compose's 30 s grace then ended in SIGKILL."""
    (code,) = fresh_codes(1)
    network = create_network(tmp_path, [code], ["amqp://guest:guest@127.0.0.1:1/"])
    directory = network.configs[code].directory
    node = subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--dir",
                             str(directory)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while "broker connection failed" not in (line := node.stdout.readline()):  # type: ignore[union-attr]
            assert line and time.monotonic() < deadline, "the node never tried the broker"
        started = time.monotonic()
        node.send_signal(signal.SIGTERM)
        assert node.wait(10) == 0
        assert time.monotonic() - started < 5
    finally:
        if node.poll() is None:
            node.kill()
        node.communicate()


def test_kpnode_run_without_a_broker_says_so_in_one_line_without_the_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A node started while no broker answers gives up after its wait (60 s; 0.5 s here),
    with one line naming the brokers it tried, their passwords masked, and exit 3, for its
    supervisor (compose: restart unless-stopped) to start it again."""
    from node import cli

    (code,) = fresh_codes(1)
    network = create_network(tmp_path, [code], [f"amqp://kpx-{code.lower()}:s3cret@127.0.0.1:1/",
                                                "amqp://kpx-b:0ther@127.0.0.1:2/"])
    connect = Transport.connect

    async def quick(self: Transport, timeout: float = 60.0) -> None:
        await connect(self, timeout=0.5)
    monkeypatch.setattr(Transport, "connect", quick)
    # cli.main would point structlog at this test's captured stderr, closed after it, for
    # every later test in the session: the log set-up is not what is tested here.
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    expected = (f"kpnode: cannot start: no broker answered at amqp://kpx-{code.lower()}:***@"
                "127.0.0.1:1/, amqp://kpx-b:***@127.0.0.1:2/ within 0.5 s (last attempt: amqp://")
    for _ in range(2):  # the second start finds the node directory free again
        with pytest.raises(SystemExit) as exited:
            cli.main(["run", "--dir", str(network.configs[code].directory)])
        assert exited.value.code == cli.EXIT_ENVIRONMENT
        out, err = capsys.readouterr()
        (said,) = [s for s in err.splitlines() if s.startswith("kpnode:")]
        assert said.startswith(expected) and "Connect call failed" in said, said
        assert "Traceback" not in err
        assert not any(p in out + err for p in ("s3cret", "0ther"))  # logs included
