"""The relay keeps each recipient's messages in order and publishes nothing twice because
its own store was busy."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from pathlib import Path

import aio_pika
import pytest

from node import runner
from node.machine import Side, State
from node.network import create_network
from node.runner import RunningNode
from node.service import Node
from node.store import Store
from node.transport import TransportUnavailable, declare_topology, inbox_queue
from tests.netutil import certificate, queue_depth
from tests.tcpproxy import proxied
from tests.test_network import fresh_codes, state, until


def test_a_row_waiting_for_its_retry_holds_back_later_rows_to_its_recipient(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    with store.transaction():
        store.db.executemany(
            "INSERT INTO outbox (message_id, recipient, kind, frame, created_at, "
            "next_attempt_at) VALUES (?, ?, ?, x'00', 0, ?)",
            [("cert", "IN", "certificate", 5_000),   # failed, retried at 5 s
             ("cancel", "IN", "cancellation", 0),
             ("other", "EU", "certificate", 0)])
    assert [r.message_id for r in store.due(1_000, 10)] == ["other"]
    assert [r.message_id for r in store.due(5_000, 10)] == ["cert", "cancel", "other"]
    store.close()


def test_a_row_already_sent_holds_back_nothing_whatever_its_retry_time(
        tmp_path: Path) -> None:
    """Only a row still waiting for its retry holds back the rows behind it: one sent long
    ago whose retry time a clock running ahead wrote (then stepped back) must not keep a
    recipient's later messages waiting for as long as the step."""
    store = Store(tmp_path / "node.db")
    with store.transaction():
        store.db.executemany(
            "INSERT INTO outbox (message_id, recipient, kind, frame, created_at, "
            "next_attempt_at, published_at) VALUES (?, ?, ?, x'00', 0, ?, ?)",
            [("cert", "IN", "certificate", 3_600_000, 500),  # sent after a failed try
             ("cancel", "IN", "cancellation", 0, None)])
    assert [r.message_id for r in store.due(1_000, 10)] == ["cancel"]
    store.close()


def attempts(node: Node, message_id: str) -> int:
    row = node.store.db.execute("SELECT attempts FROM outbox WHERE message_id=?",
                                (message_id,)).fetchone()
    return int(row[0])


@pytest.mark.broker
async def test_a_cancellation_does_not_overtake_its_certificate_after_a_failed_publish(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each outbox row backed off on its own, so the cancellation of a certificate whose
    publish had failed (here: no inbox yet for a new Participant; a nack or a timeout does
    the same) reached the importer first. The importer refused it as naming an unknown
    certificate, then took the certificate as open: cancelled at one end, received at the
    other, for good."""
    monkeypatch.setattr(runner, "UNROUTABLE_RETRY_MS", 3_000)
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    number = f"{ex}-O1"
    async with RunningNode(network.configs[ex]) as exporter:
        node = exporter.node
        assert node is not None
        cert_id = node.issue(certificate(number, ex, im)).message_id
        await until(lambda: attempts(node, cert_id) == 1)  # unroutable: no inbox yet
        await asyncio.sleep(1.5)
        node.cancel(number, "issued in error")
        cancel_id = node.store.db.execute(
            "SELECT message_id FROM outbox WHERE kind='cancellation'").fetchone()[0]
        # Both fail once more, and the cancellation's next try would come first.
        await until(lambda: attempts(node, cancel_id) == 1)
        await until(lambda: attempts(node, cert_id) == 2)
        connection = await aio_pika.connect(amqp_url)  # the importer's inbox appears
        async with connection:
            await declare_topology(await connection.channel(), im, 5)
        await until(lambda: not node.store.backlog(), 20)
        async with RunningNode(network.configs[im]) as importer:
            assert importer.node is not None
            await until(lambda: state(importer.node, Side.IMPORT, number)  # type: ignore[arg-type]
                        is State.CANCELLED, 20)
            await asyncio.sleep(1.0)  # the answers travel back
            assert state(node, Side.EXPORT, number) is State.CANCELLED
            refused = importer.node.store.db.execute(
                "SELECT count(*) FROM inbox WHERE outcome != 'accepted'").fetchone()[0]
            assert refused == 0


@pytest.mark.broker
async def test_a_store_locked_after_the_confirm_does_not_make_the_relay_publish_again(
        amqp_url: str, tmp_path: Path) -> None:
    """The broker confirmed the row but marking it sent could not commit (another process
    held the write lock): the row stayed due and went out again every second or so for as
    long as the lock lasted, each copy answered again by the receiver."""
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    connection = await aio_pika.connect(amqp_url)
    async with connection:  # the importer's inbox, with no consumer: we count what arrives
        await declare_topology(await connection.channel(), im, 5)
    async with RunningNode(network.configs[ex]) as exporter:
        assert exporter.node is not None
        cli = Node.open(network.configs[ex])  # `kpnode issue` beside `kpnode run`
        cli.issue(certificate(f"{ex}-L1", ex, im))
        cli.close()
        # The running node finds the row at its next look (within 0.25 s) and publishes it;
        # by then the write lock is taken.
        blocker = sqlite3.connect(network.configs[ex].database_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # a sqlite3 shell, a backup, a VACUUM
        try:
            await asyncio.sleep(4.0)
            copies = await queue_depth(amqp_url, inbox_queue(im))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await until(lambda: not exporter.node.store.backlog(), 10)  # type: ignore[union-attr]
        after = await queue_depth(amqp_url, inbox_queue(im))
    assert (copies, after) == (1, 1)


@pytest.mark.broker
async def test_renewing_the_publishing_channel_gives_up_on_a_broker_that_stopped_answering(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a nack the relay opens a new publishing channel; on a broker that no longer
    answered (a partition, a half-open connection) it waited for it until the heartbeat
    gave up, some three minutes, with the relay's batch in hand."""
    from node import transport as transport_module
    monkeypatch.setattr(transport_module, "CONNECT_TIMEOUT", 1.0)
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    async with proxied(amqp_url) as (proxy, through):
        config = dataclasses.replace(network.configs[ex], broker_urls=(through,))
        async with RunningNode(config) as running:
            transport = running.transport
            assert transport is not None
            proxy.hold()
            started = time.monotonic()
            with pytest.raises(TransportUnavailable):
                await asyncio.wait_for(
                    transport._renew_publishing(transport._publish_channel), 20)
            assert time.monotonic() - started < 5
            proxy.release()
