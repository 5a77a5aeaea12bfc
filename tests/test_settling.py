"""What the transport tells the broker is what happened, without a broker: an ack covers
only the deliveries decided (never one still in hand, as AMQP's 'multiple' would), a
delivery of a closed channel settles nothing on the new one, a publish the broker did not
confirm is never reported as sent, and a node that stops decides and acks every delivery
it took in."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aio_pika.exceptions import DeliveryError
from pamqp.commands import Basic

from node import runner
from node.network import create_network
from node.runner import RunningNode
from node.service import Node
from node.transport import Delivery, Outgoing, Transport
from tests.netutil import certificate
from tests.test_network import until


class Channel:
    """A consumer channel as the broker keeps it: the delivery tags not yet settled, and
    what each basic.ack settles (with ``multiple``, every tag up to its own)."""

    def __init__(self, tags: Sequence[int], *, closed: bool = False) -> None:
        self.unsettled = set(tags)
        self.acked: set[int] = set()
        self.closed = closed

    def settle(self, tag: int, *, multiple: bool, ack: bool) -> None:
        if self.closed:
            raise ConnectionError("channel closed")
        if tag not in self.unsettled:
            # PRECONDITION_FAILED - unknown delivery tag: the broker closes the channel,
            # and every delivery in hand goes back to the queue
            self.closed = True
            raise ConnectionError(f"unknown delivery tag {tag}")
        settled = {t for t in self.unsettled if t <= tag} if multiple else {tag}
        self.unsettled -= settled
        if ack:
            self.acked |= settled


class Message:
    def __init__(self, channel: Channel, tag: int, body: bytes | None = None) -> None:
        self.channel = channel
        self.delivery_tag = tag
        self.body = b"frame %d" % tag if body is None else body
        self.message_id = f"m{tag}"
        self.user_id = None
        self.headers: dict[str, Any] = {}
        self.redelivered = False

    async def ack(self, multiple: bool = False) -> None:
        self.channel.settle(self.delivery_tag, multiple=multiple, ack=True)

    async def reject(self, requeue: bool = True) -> None:
        self.channel.settle(self.delivery_tag, multiple=False, ack=False)


def consuming(tags: Sequence[int], generation: int = 0) -> tuple[Transport, Channel,
                                                                 dict[int, Delivery]]:
    """A transport whose current channel has delivered ``tags``, none settled yet."""
    transport = Transport(["amqp://unused/"], "ZA")
    transport._generation = generation
    channel = Channel(tags)
    transport._outstanding = set(tags)
    message: Any
    deliveries = {}
    for tag in tags:
        message = Message(channel, tag)
        deliveries[tag] = Delivery(message, generation)
    return transport, channel, deliveries


async def test_acking_a_batch_never_acks_an_older_delivery_still_in_hand() -> None:
    transport, channel, d = consuming([1, 2, 3])
    await transport.ack([d[2], d[3]])  # 1 is still being decided
    assert channel.acked == {2, 3}
    assert channel.unsettled == {1}
    await transport.ack([d[1]])
    assert channel.acked == {1, 2, 3}


async def test_acking_a_batch_with_a_gap_never_acks_the_delivery_in_the_gap() -> None:
    transport, channel, d = consuming([1, 2, 3, 4])
    await transport.ack([d[1], d[3]])  # 2 and 4 are still in hand
    assert channel.acked == {1, 3}
    await transport.ack([d[4]])
    assert channel.acked == {1, 3, 4}
    assert channel.unsettled == {2}


async def test_a_delivery_of_a_closed_channel_settles_nothing_on_the_new_one() -> None:
    """After a reconnect the new channel numbers its deliveries from 1 again: a delivery
    of the old channel rejected (its batch failed) must not count as settling the new
    channel's delivery of the same number, or a later 'multiple' ack covers that one
    while it is still in hand."""
    transport, channel, d = consuming([1, 2, 3], generation=1)
    old: Any = Message(Channel([1], closed=True), 1)
    stale = Delivery(old, generation=0)
    await transport.reject(stale, requeue=True)
    await transport.ack([stale])
    assert channel.unsettled == {1, 2, 3}
    await transport.ack([d[2], d[3]])
    assert channel.acked == {2, 3}
    assert channel.unsettled == {1}


async def test_a_failed_batch_hands_back_only_the_deliveries_it_had_not_settled() -> None:
    """The batch handler raised after it had handed one delivery back already (a refused
    message whose dead-letter copy could not be made): the rest go back after a pause,
    but the one settled must not be rejected a second time, which closes the channel."""
    transport, channel, d = consuming([1, 2, 3])

    async def on_batch(batch: list[Delivery]) -> None:
        await transport.reject(batch[0], requeue=True)
        raise RuntimeError("a fault once the first delivery was handed back")
    transport._on_batch = on_batch
    for tag in (1, 2, 3):
        transport._pending.put_nowait(d[tag])
    batches = asyncio.create_task(transport._batches())
    try:
        await until(lambda: not channel.unsettled or channel.closed)
    finally:
        batches.cancel()
    assert not channel.closed
    assert channel.unsettled == set() and channel.acked == set()


class Exchange:
    """An exchange whose publish ends as the test says."""

    def __init__(self, outcome: BaseException | None) -> None:
        self.outcome = outcome

    async def publish(self, *_: Any, **__: Any) -> None:
        if self.outcome is not None:
            raise self.outcome


@pytest.mark.parametrize("outcome", [
    DeliveryError(None, Basic.Nack(delivery_tag=1)),  # a full quorum queue, reject-publish
    TimeoutError(),  # no confirm in time: a blocked or silent broker
    ConnectionError("connection reset"),
])
async def test_a_publish_the_broker_did_not_confirm_is_never_reported_sent(
        outcome: BaseException) -> None:
    """Reported confirmed, the relay would mark the outbox row sent and never send it
    again: a receipt or confirmation lost for good, the loop open on the other side."""
    transport = Transport(["amqp://unused/"], "ZA")
    exchange: Any = Exchange(outcome)
    result = await transport._publish_one(
        exchange, Outgoing(message_id="m1", recipient="IN", body=b"frame", kind="receipt"))
    assert not result.confirmed
    assert result.error


class Inbox:
    """The broker's side of the node's consumer: delivers bursts of one frame (after the
    first, duplicates the node acks) until the consumer is cancelled."""

    def __init__(self, transport: Transport, channel: Channel, frame: bytes) -> None:
        self.transport, self.channel, self.frame = transport, channel, frame
        self.cancelled = False
        self.tags = 0

    async def cancel(self, consumer_tag: str, timeout: float | None = None) -> None:
        self.cancelled = True

    def burst(self, count: int) -> None:
        for _ in range(count):
            self.tags += 1
            message: Any = Message(self.channel, self.tags, self.frame)
            self.channel.unsettled.add(self.tags)
            self.transport._outstanding.add(self.tags)
            self.transport._pending.put_nowait(Delivery(message, 0))

    async def stream(self) -> None:
        while not self.cancelled:
            self.burst(10)
            await asyncio.sleep(0.005)


async def test_a_node_that_stops_decides_and_acks_every_delivery_it_took_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliveries received but not yet decided when the node stops go back to the queue
    when the channel closes, each return counted towards the delivery limit: a node
    stopped a few times in a busy hour dead-lettered messages it never read. Stopping
    cancels the consumer, then decides and acks what came before the cancel."""
    monkeypatch.setattr(runner, "DRAIN_SECONDS", 1.0)
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za = Node.open(network.configs["ZA"])
    za.issue(certificate("ZA-2026-0001", "ZA", "IN"))
    (row,) = za.store.due(2**62, 10)
    za.close()
    running = RunningNode(network.configs["IN"])
    running.node = Node.open(network.configs["IN"])
    transport = running.transport = Transport(["amqp://unused/"], "IN")
    channel = Channel([])
    inbox = Inbox(transport, channel, row.frame)
    inbox_queue: Any = inbox
    transport._inbox, transport._consumer_tag = inbox_queue, "ctag"
    await transport.consume(running._on_batch)
    streaming = asyncio.create_task(inbox.stream())
    try:
        await until(lambda: len(channel.acked) >= 50)
        inbox.burst(50)  # just in, not yet handed over, as the stop begins
        await running.stop()
    finally:
        streaming.cancel()
    assert len(channel.acked) == inbox.tags
    assert channel.unsettled == set()
