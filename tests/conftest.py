"""Shared pytest fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import string
import threading
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


#: held, exclusively, by the test session that uses a broker
SESSION_CLAIM = "kpx.tests.session"
#: pytest's exit code when the broker serves another session already
SESSION_CLAIMED_EXIT = 3
#: how long the session waits for its claim: the broker's answer takes milliseconds
CLAIM_SECONDS = 60.0
#: the name of the thread that holds the claim
CLAIM_THREAD = "kpx-test-session-claim"


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with broker_url() as url, one_session_at_a_time(url):
        if os.environ.get(ENV_URL, "").strip():
            asyncio.run(delete_participant_queues(url))
        yield url


@contextlib.contextmanager
def one_session_at_a_time(url: str) -> Iterator[None]:
    """Hold :data:`SESSION_CLAIM` for the session. Two sessions on one broker (two
    terminals given the same KPX_AMQP_URL) failed each other's tests in ways that looked
    like kpx's faults: each deletes every kpx queue and exchange as it starts, and the
    tests reuse the same Participant codes. The second now stops at once, and says why.
    The claim is an exclusive queue on a connection of its own, in a thread of its own:
    the tests' event loops come and go, and it must outlive each of them."""
    from aiormq.exceptions import ChannelLockedResource

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=CLAIM_THREAD, daemon=True)
    thread.start()

    async def claim() -> aio_pika.abc.AbstractConnection:
        # bounded here, in the claim's own loop: a broker that takes the connection but
        # never answers is given up on there, the attempt ended, not left running on
        async with asyncio.timeout(CLAIM_SECONDS):
            connection = await aio_pika.connect(url)
            try:
                channel = await connection.channel()
                await channel.declare_queue(SESSION_CLAIM, exclusive=True, auto_delete=True)
            except BaseException:
                await connection.close()
                raise
        return connection

    claiming = asyncio.run_coroutine_threadsafe(claim(), loop)
    connection: aio_pika.abc.AbstractConnection | None = None
    try:
        try:
            connection = claiming.result(CLAIM_SECONDS + 15)  # should claim() not end
        except ChannelLockedResource:
            pytest.exit(f"another test session is using the broker at {ENV_URL}: each "
                        "deletes the kpx queues as it starts and the tests share Participant "
                        "codes, so they would fail each other's tests. Wait for it to end, or "
                        "give this session a broker (or vhost) of its own",
                        returncode=SESSION_CLAIMED_EXIT)
        yield
    finally:
        # Every way out ends the thread and its loop: a broker that refused the claim or
        # never answered, Ctrl-C while claiming (no claim is made after it), pytest.exit,
        # the session's end. They were left running on all but the last.
        claiming.cancel()
        if connection is not None:
            with contextlib.suppress(Exception):  # a broker slow or gone: at most 10 s
                asyncio.run_coroutine_threadsafe(connection.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():  # a loop still running cannot be closed
            loop.close()


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
