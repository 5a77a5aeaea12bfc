"""How the consumer groups inbox deliveries into batches (one commit each), without a broker:
a delivery after a quiet spell is handed over at once, deliveries streaming in wait a
moment for each other, and a full batch never waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from node.transport import Delivery, Transport

#: far longer than the test's own waits, so a batch that waited cannot pass for one that did not
MAX_WAIT = 2.0


def delivery(n: int) -> Delivery:
    message: Any = SimpleNamespace(body=b"frame %d" % n, message_id=f"m{n}", user_id=None,
                                   headers={}, redelivered=False, delivery_tag=n)
    return Delivery(message, generation=0)


@pytest.fixture
async def consumer() -> AsyncIterator[tuple[Transport, list[list[bytes]]]]:
    transport = Transport(["amqp://unused/"], "ZA")
    batches: list[list[bytes]] = []

    async def on_batch(batch: list[Delivery]) -> None:
        batches.append([d.body for d in batch])

    transport._on_batch = on_batch
    transport._max_batch = 4
    transport._max_wait = MAX_WAIT
    task = asyncio.create_task(transport._batches())
    yield transport, batches
    task.cancel()


async def test_a_delivery_after_a_quiet_spell_is_handed_over_at_once(
        consumer: tuple[Transport, list[list[bytes]]]) -> None:
    transport, batches = consumer
    await transport._pending.put(delivery(1))
    await asyncio.sleep(0.1)
    assert batches == [[b"frame 1"]]


async def test_deliveries_streaming_in_are_gathered_into_one_batch(
        consumer: tuple[Transport, list[list[bytes]]]) -> None:
    transport, batches = consumer
    await transport._pending.put(delivery(1))
    await asyncio.sleep(0.1)
    # Right after a batch, the inbox is busy: the next delivery waits for the ones behind it.
    await transport._pending.put(delivery(2))
    await asyncio.sleep(0.1)
    await transport._pending.put(delivery(3))
    assert batches == [[b"frame 1"]]
    for _ in range(int(MAX_WAIT * 20) + 20):
        if len(batches) == 2:
            break
        await asyncio.sleep(0.1)
    assert batches == [[b"frame 1"], [b"frame 2", b"frame 3"]]


async def test_a_full_batch_goes_without_waiting(
        consumer: tuple[Transport, list[list[bytes]]]) -> None:
    transport, batches = consumer
    for n in range(5):
        transport._pending.put_nowait(delivery(n))
    await asyncio.sleep(0.1)
    assert batches == [[b"frame 0", b"frame 1", b"frame 2", b"frame 3"]]
