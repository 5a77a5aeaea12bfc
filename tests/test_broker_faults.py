"""The broker goes away under running nodes: a restart, a cluster member lost, a consumer
cancelled. The nodes reconnect by themselves and nothing is lost or doubled.

The restart and cluster tests start brokers of their own (:class:`LocalBroker`), and stop
only those; the nodes are real ``kpnode run`` processes that are never restarted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import sqlite3
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractConnection

from node.httpserver import GAUGES
from node.localbroker import LocalBroker
from node.machine import Side, State
from node.network import create_network
from node.nodeprocess import NodeProcess
from node.runner import RunningNode
from node.transport import Transport, TransportUnavailable, connect, inbox_queue
from tests.faultnet import (
    burst,
    check,
    confirm,
    count,
    issue,
    logged_events,
    logged_in,
    stop_all,
    verify_log,
)
from tests.netutil import certificate
from tests.test_crash import start
from tests.test_network import fresh_codes, state, until

pytestmark = pytest.mark.broker

BURST = 1_000


@pytest.fixture
async def own_broker() -> AsyncIterator[LocalBroker]:
    broker = LocalBroker()
    await asyncio.to_thread(broker.start)
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.close)


async def run_burst_through_fault(tmp_path: Path, urls: list[str],
                                  processes: list[NodeProcess], fault: object,
                                  ) -> float:
    """Two nodes, a burst of BURST loops issued over 10 s, ``fault()`` (blocking) once 200
    have arrived. Returns the seconds from the fault's end until the importer recorded the
    next certificate (0 when the exchange went on during the fault and had finished)."""
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], urls)
    cfg = network.configs
    exporter, importer = NodeProcess(cfg[ex].directory), NodeProcess(cfg[im].directory)
    processes += [exporter, importer]
    await start(importer, exporter)
    shipments = burst(ex, im, BURST)
    issuing = asyncio.create_task(asyncio.to_thread(issue, cfg[ex], shipments, BURST / 10))
    await until(lambda: count(cfg[im], Side.IMPORT) >= 200, 60)
    assert not issuing.done()  # the fault comes mid-burst
    await asyncio.to_thread(fault)  # type: ignore[arg-type]
    after = count(cfg[im], Side.IMPORT)
    back = time.monotonic()
    await until(lambda: count(cfg[im], Side.IMPORT) > after or after == BURST, 60)
    recovered = time.monotonic() - back
    await issuing
    await until(lambda: count(cfg[ex], Side.EXPORT, State.DELIVERED) == BURST, 120)
    await asyncio.to_thread(confirm, cfg[im], shipments)
    await until(lambda: count(cfg[ex], Side.EXPORT, State.CONFIRMED) == BURST, 120)
    # the same processes all along: they reconnected by themselves
    assert [p.starts for p in (exporter, importer)] == [1, 1]
    assert await asyncio.to_thread(stop_all, [exporter, importer]) == [0, 0]
    report = check(cfg, shipments)
    assert report.failures == []
    assert (report.closed, report.open) == (BURST, 0)
    for code in (ex, im):
        received, distinct = logged_in(cfg[code])
        assert received == distinct
        result = verify_log(cfg[code].directory)
        assert (result["exit"], result["ok"]) == (0, True), result
    return recovered


@pytest.mark.slow
async def test_broker_restart_mid_burst_nodes_reconnect_and_finish(
        own_broker: LocalBroker, tmp_path: Path, processes: list[NodeProcess],
        record_property: Callable[[str, object], None]) -> None:
    started = time.monotonic()
    recovered = await run_burst_through_fault(tmp_path, [own_broker.url], processes,
                                              own_broker.restart)
    record_property("recovery_seconds_after_broker_restart", round(recovered, 2))
    print(f"\nkpx: broker restart: deliveries resumed {recovered:.1f} s after the broker was "
          f"back; whole test {time.monotonic() - started:.0f} s")


@pytest.fixture
async def cluster() -> AsyncIterator[list[LocalBroker]]:
    first = LocalBroker()
    members = [first, first.sibling(), first.sibling()]
    try:
        await asyncio.gather(*(asyncio.to_thread(b.start) for b in members))
        for other in members[1:]:
            await asyncio.to_thread(other.join_cluster, first)
        yield members
    finally:
        await asyncio.gather(*(asyncio.to_thread(b.close) for b in members))


def quorum_members(broker: LocalBroker, queue: str) -> int:
    for line in broker.ctl("list_queues", "name", "members", "--quiet").splitlines():
        name, _, members = line.partition("\t")
        if name == queue:
            return members.count("@")
    return 0


@pytest.mark.slow
async def test_cluster_member_stopped_mid_burst_exchange_continues(
        cluster: list[LocalBroker], tmp_path: Path, processes: list[NodeProcess],
        record_property: Callable[[str, object], None]) -> None:
    first = cluster[0]
    urls = [b.url for b in cluster]

    def stop_first() -> None:
        # every inbox is a quorum queue replicated on all three members
        queues = [line.split("\t")[0] for line in first.ctl(
            "list_queues", "name", "--quiet").splitlines() if line.startswith("kpx.inbox.")]
        assert queues and all(quorum_members(first, q) == 3 for q in queues)
        first.stop()  # the member the nodes are connected to, leader of their queues

    recovered = await run_burst_through_fault(tmp_path, urls, processes, stop_first)
    record_property("recovery_seconds_after_cluster_member_lost", round(recovered, 2))
    for node in processes:  # each moved on to another member of the cluster
        moved = [e["url"] for e in logged_events(node.log_path, "broker connected")]
        assert f":{first.amqp_port}/" in moved[0]
        assert any(f":{b.amqp_port}/" in moved[-1] for b in cluster[1:]), moved
    print(f"\nkpx: cluster member stopped: deliveries resumed {recovered:.1f} s later")


async def test_consumer_cancelled_by_the_broker_is_restored(
        amqp_url: str, tmp_path: Path) -> None:
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    async with RunningNode(network.configs[importer_code]) as importer, \
            RunningNode(network.configs[exporter_code]) as exporter:
        assert importer.node is not None and exporter.node is not None
        # An operator deletes the inbox (or a cluster move cancels the consumer): the
        # broker sends basic.cancel while the connection stays up.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(inbox_queue(importer_code))
            # the node notices, reconnects, declares its inbox again and consumes from it
            deadline = time.monotonic() + 30
            while await consumers(connection, inbox_queue(importer_code)) != 1:
                assert time.monotonic() < deadline, "the consumer was never restored"
                await asyncio.sleep(0.2)
        number = f"{exporter_code}-C0001"
        exporter.node.issue(certificate(number, exporter_code, importer_code))
        await until(lambda: state(importer.node, Side.IMPORT, number)  # type: ignore[arg-type]
                    is State.RECEIVED, 60)
        await until(lambda: state(exporter.node, Side.EXPORT, number)  # type: ignore[arg-type]
                    is State.DELIVERED, 60)


@pytest.mark.parametrize("closed", ["consuming", "publishing"])
async def test_a_channel_the_broker_closes_is_set_up_again(
        amqp_url: str, tmp_path: Path, closed: str) -> None:
    """The broker closes a channel on a channel error while the connection stays up; aio-
    pika's plain channels do not come back, so a node that missed it stayed deaf (its
    consuming channel) or could publish nothing (its publishing channel) until restarted,
    every loop with it waiting. The node reconnects and sets both up again."""
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    async with RunningNode(network.configs[importer_code]) as importer, \
            RunningNode(network.configs[exporter_code]) as exporter:
        assert importer.node is not None and exporter.node is not None
        transport = (importer if closed == "consuming" else exporter).transport
        assert transport is not None
        channel = (transport._consume_channel if closed == "consuming"
                   else transport._publish_channel)
        assert channel is not None
        underlay = await channel.get_underlay_channel()
        if closed == "consuming":  # PRECONDITION_FAILED: unknown delivery tag
            await underlay.basic_ack(999_999)
        else:  # NOT_FOUND: no such exchange
            with contextlib.suppress(Exception):
                await underlay.basic_publish(b"x", exchange="kpx.no-such-exchange",
                                             routing_key="x")
        await until(lambda: channel.is_closed, 10)
        number = f"{exporter_code}-H0001"
        exporter.node.issue(certificate(number, exporter_code, importer_code))
        await until(lambda: state(importer.node, Side.IMPORT, number)  # type: ignore[arg-type]
                    is State.RECEIVED, 60)
        await until(lambda: state(exporter.node, Side.EXPORT, number)  # type: ignore[arg-type]
                    is State.DELIVERED, 60)


async def consumers(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """Consumers on ``queue`` now; 0 when it does not exist."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return 0
    count = int(declared.declaration_result.consumer_count or 0)
    await channel.close()
    return count


async def test_a_node_closed_while_setting_up_leaves_no_connection_open(amqp_url: str) -> None:
    """The broker answered but set-up hung (a declare blocked), the node gave up waiting and
    closed: the connection it was setting up used to stay open, unknown to close()."""
    opened: list[AbstractConnection] = []

    class Hanging(Transport):
        async def _set_up(self, connection: AbstractConnection) -> None:
            opened.append(connection)
            await connection.channel()
            await asyncio.Event().wait()

    transport = Hanging([amqp_url], fresh_codes(1)[0])
    with pytest.raises(TransportUnavailable):
        await transport.connect(timeout=2.0)
    assert len(opened) == 1 and not opened[0].is_closed
    await transport.close()
    assert opened[0].is_closed


def test_a_failed_broker_connect_leaves_no_connection_to_the_garbage_collector() -> None:
    """aio-pika drops a connection that failed to open without closing it. Collected later,
    while its loop is open but not current (a command's own asyncio.run came between), its
    __del__ could not schedule the close: 'coroutine Connection.close was never awaited'.
    Every refused connect of 'kpnode status', a Chair's publish or the node's reconnect
    loop left one."""
    loop = asyncio.new_event_loop()
    policy = asyncio.get_event_loop_policy()

    def attempt() -> str:
        # Neither pytest.raises nor pytest's log capture (aiormq logs the error with its
        # traceback) may keep the failed connection alive past the collection below.
        logging.disable(logging.CRITICAL)
        try:
            loop.run_until_complete(connect("amqp://guest:guest@127.0.0.1:1/", timeout=2.0))
        except OSError as exc:
            return type(exc).__name__
        finally:
            logging.disable(logging.NOTSET)
        return "connected"

    try:
        assert attempt() == "AMQPConnectionError"
        policy.set_event_loop(None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
    finally:
        loop.close()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


async def test_another_process_holding_the_database_does_not_freeze_the_node(
        amqp_url: str, tmp_path: Path) -> None:
    """A `sqlite3` shell left inside a transaction on the node's database: SQLite waited
    for the lock on the event loop's thread, 30 s at a time, so health checks, the API
    and the broker connection all froze for as long as the lock was held."""
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [amqp_url])
    config = dataclasses.replace(network.configs[importer_code], http_port=0)
    async with RunningNode(config) as importer, \
            RunningNode(network.configs[exporter_code]) as exporter:
        assert importer.node is not None and exporter.node is not None
        assert importer.http is not None
        number = f"{exporter_code}-L0001"
        locker = sqlite3.connect(config.database_path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            exporter.node.issue(certificate(number, exporter_code, importer_code))
            longest, last, started = 0.0, time.monotonic(), time.monotonic()
            async with aiohttp.ClientSession() as http:
                while time.monotonic() - started < 4.0:
                    async with http.get(f"{importer.http.url}/healthz") as answer:
                        assert answer.status == 200
                    await asyncio.sleep(0.05)
                    longest, last = max(longest, time.monotonic() - last), time.monotonic()
            assert longest < 2.0, f"the event loop stalled {longest:.1f} s"
            assert state(importer.node, Side.IMPORT, number) is None  # held, not lost
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await until(lambda: state(importer.node, Side.IMPORT, number)  # type: ignore[arg-type]
                    is State.RECEIVED, 30)
        await until(lambda: state(exporter.node, Side.EXPORT, number)  # type: ignore[arg-type]
                    is State.DELIVERED, 30)


async def test_a_refused_login_is_named_when_the_node_gives_up(amqp_url: str) -> None:
    """A wrong password was reported as 'no broker answered', like an outage."""
    parts = urlsplit(amqp_url)
    wrong = urlunsplit(parts._replace(netloc=f"guest:wrong@{parts.hostname}:{parts.port}"))
    transport = Transport([wrong], fresh_codes(1)[0])
    try:
        with pytest.raises(TransportUnavailable) as failed:
            await transport.connect(timeout=3.0)
    finally:
        await transport.close()
    assert "ACCESS_REFUSED" in str(failed.value) and "wrong" not in str(failed.value)


async def test_a_queue_declared_otherwise_is_named_when_the_node_gives_up(
        amqp_url: str) -> None:
    """An inbox left with other arguments (another tool's, an older kpx's) failed every
    set-up, and the node gave up with 'no broker answered', the cause only in its log."""
    import aio_pika

    from node.transport import inbox_queue

    code = fresh_codes(1)[0]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(inbox_queue(code), durable=True)
        transport = Transport([amqp_url], code)
        try:
            with pytest.raises(TransportUnavailable) as failed:
                await transport.connect(timeout=3.0)
        finally:
            await transport.close()
            await channel.queue_delete(inbox_queue(code))
    assert "set-up failed" in str(failed.value)
    assert "PRECONDITION_FAILED" in str(failed.value), str(failed.value)
    # it answered: not an outage, and not said to be one
    assert "no broker answered" not in str(failed.value)
    assert str(failed.value).startswith("the broker answered but the node could not set up")


async def test_a_lost_member_is_followed_by_the_whole_list_before_the_node_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Of three cluster members the node used the second, and lost it: it tries the second
    again, then the third and the first, and waits only after that round. It used to wait
    at the end of the list, so the first member, perhaps the one still up, came after a
    pause."""
    import node.transport as transport_module

    attempts: list[tuple[str, float]] = []
    answered: list[Up] = []

    class Up:
        def __init__(self) -> None:
            self.close_callbacks: set[Callable[..., object]] = set()
            self.is_closed = False

        async def close(self) -> None:
            self.is_closed = True

    async def fake_connect(url: str, timeout: float = 0) -> Up:
        attempts.append((url, time.monotonic()))
        if len(attempts) == 2:  # the second member answers once
            answered.append(Up())
            return answered[-1]
        raise ConnectionRefusedError(url)

    class NoSetUp(Transport):
        async def _set_up(self, connection: AbstractConnection) -> None:
            pass

    monkeypatch.setattr(transport_module, "connect", fake_connect)
    urls = ["amqp://one/", "amqp://two/", "amqp://three/"]
    transport = NoSetUp(urls, "ZA")
    try:
        await transport.connect(timeout=5.0)
        assert transport.url == "amqp://two/"
        for lost in list(answered[0].close_callbacks):
            lost()
        while len(attempts) < 6:
            await asyncio.sleep(0.02)
    finally:
        await transport.close()
    names = [u.split("//")[1].rstrip("/") for u, _ in attempts]
    assert names[:6] == ["one", "two", "two", "three", "one", "two"]
    times = [t for _, t in attempts]
    assert times[4] - times[2] < 0.2, "a pause inside the round after the loss"
    assert times[5] - times[4] >= 0.2, "no pause after a whole round without an answer"


async def test_a_set_up_failure_does_not_hide_a_broker_gone_since(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker answered once but the inbox was missing, and was then restarted (to load
    the definitions, say) and stayed away: connect() gave up naming only the old set-up
    failure, as if the broker still answered; the last attempt, refused, went unsaid."""
    import node.transport as transport_module

    class Up:
        def __init__(self) -> None:
            self.close_callbacks: set[Callable[..., object]] = set()

        async def close(self) -> None:
            pass

    calls: list[str] = []

    async def fake_connect(url: str, timeout: float = 0) -> Up:
        calls.append(url)
        if len(calls) == 1:
            return Up()
        raise ConnectionRefusedError(111, "Connection refused")

    class Missing(Transport):
        async def _set_up(self, connection: AbstractConnection) -> None:
            raise RuntimeError("NOT_FOUND - no queue 'kpx.inbox.ZA'")

    monkeypatch.setattr(transport_module, "connect", fake_connect)
    transport = Missing(["amqp://one/"], "ZA")
    try:
        with pytest.raises(TransportUnavailable) as failed:
            await transport.connect(timeout=1.0)
    finally:
        await transport.close()
    assert len(calls) >= 2
    text = str(failed.value)
    assert "NOT_FOUND" in text, text  # why it never connected, still said
    assert "last attempt" in text and "refused" in text.split("last attempt")[1], text


async def test_a_broker_that_blocks_publishing_is_not_called_ready(
        own_broker: LocalBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker low on disk or memory blocks every connection that publishes (a resource
    alarm): nothing the node sends leaves it, and its confirms never come. /readyz said
    ready and kpx_broker_connected 1 throughout, and 30 s later the outbox's error read
    'TimeoutError: ', which tells the operator nothing."""
    monkeypatch.setattr("node.transport.PUBLISH_TIMEOUT", 2.0)
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [own_broker.url])
    exporter = RunningNode(dataclasses.replace(network.configs[ex], http_port=0))
    importer = RunningNode(network.configs[im])
    await exporter.start()
    await importer.start()
    try:
        assert exporter.node is not None and importer.node is not None
        assert exporter.http is not None
        url = exporter.http.url

        async def readyz() -> tuple[int, dict[str, bool]]:
            async with aiohttp.ClientSession() as session, \
                    session.get(url + "/readyz") as response:
                return response.status, (await response.json())["checks"]

        async def metric(name: str) -> str:
            exporter.http.app[GAUGES].read_at = float("-inf")  # no 5 s cache here
            async with aiohttp.ClientSession() as session, \
                    session.get(url + "/metrics") as response:
                text = await response.text()
            return next(line.split()[1] for line in text.splitlines()
                        if line.split(" ")[0] == name)

        assert await readyz() == (200, {"broker_connected": True, "consuming": True,
                                        "store_writable": True, "clock_agrees": True,
                                        "publishing_allowed": True})
        await asyncio.to_thread(own_broker.ctl, "set_disk_free_limit", "100000GB")
        exporter.node.issue(certificate(f"{ex}-1", ex, im))  # its publish meets the alarm
        await until(lambda: any(r.last_error for r in exporter.node.store.backlog()),  # type: ignore[union-attr]
                    20)
        error = exporter.node.store.backlog()[0].last_error or ""
        assert "not confirmed by the broker within 2 s" in error, error
        assert "blocks" in error and "disk or memory" in error, error
        status, checks = await readyz()
        assert status == 503 and checks["publishing_allowed"] is False
        assert checks["broker_connected"] is True
        assert await metric("kpx_publishing_allowed") == "0.0"

        await asyncio.to_thread(own_broker.ctl, "set_disk_free_limit", "50MB")
        await until(lambda: state(importer.node, Side.IMPORT, f"{ex}-1")  # type: ignore[arg-type]
                    is State.RECEIVED, 60)
        assert (await readyz())[0] == 200
        assert await metric("kpx_publishing_allowed") == "1.0"
    finally:
        await importer.stop()
        await exporter.stop()
