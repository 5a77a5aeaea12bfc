"""Shared pytest fixtures."""

from __future__ import annotations

import asyncio
import itertools
import os
import string
import time
from collections.abc import Iterator

import aio_pika
import pytest

from node.localbroker import ENV_URL, broker_url
from node.nodeprocess import NodeProcess
from node.transport import EXCHANGES, dead_letter_queue, inbox_queue

# Tests date certificates and arrivals by date.today(), the machine's local day, while nodes
# judge dates by the UTC day: east of UTC, between local and UTC midnight, a confirmation
# dated "today" is a day ahead of its node and refused. The session runs in UTC; tests of
# other zones set TZ themselves (and undo it).
os.environ["TZ"] = "UTC"
time.tzset()

# --- Real-broker harness ------------------------------------------------------------------
# One RabbitMQ for the whole session: the broker named by KPX_AMQP_URL, else a container
# when a Docker engine answers, else a private local rabbitmq-server (node/localbroker.py).
# Tests that need it take `amqp_url` and are marked `@pytest.mark.broker`. Tests that need a
# broker of their own (restarts, clusters) start a `LocalBroker` themselves.
#
# A broker named by KPX_AMQP_URL may have served an earlier session, whose queues carry the
# same Participant codes (tests.netutil.fresh_codes hands out the same ones every session)
# and may still hold its messages. The session starts by deleting them, so such a broker
# must serve tests only. The kpx exchanges are deleted too: nodes declare them again.


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with broker_url() as url:
        if os.environ.get(ENV_URL, "").strip():
            asyncio.run(delete_participant_queues(url))
        yield url


async def delete_participant_queues(url: str) -> None:
    """Delete every kpx inbox and dead-letter queue of a two-letter code, left or not, and
    the kpx exchanges (an older kpx may have declared one with another type)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for exchange, _ in EXCHANGES:
            await channel.exchange_delete(exchange)
        for a, b in itertools.product(string.ascii_uppercase, repeat=2):
            for name in (inbox_queue(a + b), dead_letter_queue(a + b)):
                try:
                    await channel.queue_delete(name)
                except aio_pika.exceptions.AMQPError:
                    channel = await connection.channel()  # the broker closed the old one


# --- Other fixtures below ------------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[list[NodeProcess]]:
    """Node processes a test starts; each is closed (killed if need be) at its end."""
    made: list[NodeProcess] = []
    yield made
    for p in made:
        p.close()
