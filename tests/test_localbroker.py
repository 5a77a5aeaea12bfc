"""The broker harness gives a real RabbitMQ that does what the node relies on.

Quorum queues, persistent messages, publisher confirms and mandatory routing must work on
whatever broker ``amqp_url`` hands out; a ``LocalBroker`` must keep durable data across
``restart()``, which the fault tests build on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pamqp.commands import Basic
from pamqp.common import FieldTable

from node.localbroker import RABBITMQ_SERVER, LocalBroker

pytestmark = pytest.mark.broker

QUORUM: FieldTable = {"x-queue-type": "quorum"}


async def publish_persistent(url: str, queue_name: str, body: bytes) -> object:
    """Publish with confirms, mandatory: returns the broker's confirmation frame."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   message_id=uuid.uuid4().hex)
        confirmation = await channel.default_exchange.publish(
            message, routing_key=queue_name, mandatory=True)
        assert confirmation is not None
        return confirmation


async def consume_one(url: str, queue_name: str) -> bytes:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
        async with asyncio.timeout(30), queue.iterator() as messages:
            async for message in messages:
                async with message.process():  # acks on leaving the block
                    return message.body
        raise AssertionError("queue iterator ended without a message")


async def test_quorum_queue_round_trip_with_confirms(amqp_url: str) -> None:
    queue_name = f"kpx-harness-{uuid.uuid4().hex[:8]}"
    body = b"KP certificate ZA-2024-000001"
    confirmation = await publish_persistent(amqp_url, queue_name, body)
    assert isinstance(confirmation, Basic.Ack)

    assert await consume_one(amqp_url, queue_name) == body

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
        assert queue.declaration_result.message_count == 0  # acked, so gone
        await queue.delete(if_unused=False, if_empty=False)


async def count_then_consume(url: str, queue_name: str) -> tuple[int, bytes]:
    """Message count from a passive declare (exact, unlike the ``list_queues`` statistics,
    which lag by up to 5 s), then the message itself."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
    return count, await consume_one(url, queue_name)


async def count_then_consume_after_restart(url: str, queue_name: str,
                                           deadline_s: float = 60.0) -> tuple[int, bytes]:
    """Retry while the quorum queue elects its leader again after the node came back."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await count_then_consume(url, queue_name)
        except (aio_pika.exceptions.AMQPError, TimeoutError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_a_second_test_session_on_the_same_broker_stops_before_deleting_anything(
        amqp_url: str) -> None:
    """Two sessions given one KPX_AMQP_URL deleted each other's queues as they started and
    failed each other's tests: a lost inbox, a closed channel, a stuck outbox, each read as
    a fault of kpx. The second one now stops at once (exit 3) and says why."""
    import os
    import subprocess
    import sys

    from node.transport import inbox_queue
    from tests.conftest import SESSION_CLAIMED_EXIT

    inbox = inbox_queue("QS")  # a queue this session's start would delete
    await publish_persistent(amqp_url, inbox, b"kept")
    second = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         f"{__file__}::test_quorum_queue_round_trip_with_confirms"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
        env={**os.environ, "KPX_AMQP_URL": amqp_url})
    assert second.returncode == SESSION_CLAIMED_EXIT, second.stdout + second.stderr
    assert "another test session is using the broker" in second.stdout + second.stderr
    assert await consume_one(amqp_url, inbox) == b"kept"  # nothing of ours deleted


def test_a_claim_that_fails_leaves_no_thread_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's claim runs in a thread of its own. A broker that refused it, or took
    the connection and never answered, left that thread and its loop running (the attempt
    too, which could still claim the broker after the session had given up on it)."""
    import socket
    import threading

    from tests import conftest

    monkeypatch.setattr(conftest, "CLAIM_SECONDS", 1.0)
    before = set(threading.enumerate())  # this session's own claim among them, maybe
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: the connection is refused
        with (pytest.raises((ConnectionError, aio_pika.exceptions.AMQPConnectionError)),
              conftest.one_session_at_a_time(
                  f"amqp://guest:guest@127.0.0.1:{refusing.getsockname()[1]}/")):
            pass
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # takes the connection, never answers
        with (pytest.raises(TimeoutError),
              conftest.one_session_at_a_time(
                  f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/")):
            pass
    assert [t for t in set(threading.enumerate()) - before
            if t.name == conftest.CLAIM_THREAD] == []


@pytest.mark.skipif(not RABBITMQ_SERVER.exists(),
                    reason="needs a local rabbitmq-server (scripts/test installs it when "
                           "neither KPX_AMQP_URL nor Docker is there)")
def test_local_broker_restart_keeps_durable_messages() -> None:
    queue_name = "kpx-restart-check"
    body = b"survives a broker restart"
    with LocalBroker() as broker:
        url_before = broker.url
        confirmation = asyncio.run(publish_persistent(broker.url, queue_name, body))
        assert isinstance(confirmation, Basic.Ack)

        broker.restart()

        assert broker.running
        # A store outage must not let the broker take deliveries back every 30 minutes.
        assert broker.ctl("eval", "application:get_env(rabbit, consumer_timeout).").strip() \
            == "{ok,604800000}"
        assert broker.url == url_before  # same ports after a restart
        listed = broker.ctl("list_queues", "--quiet", "--no-table-headers", "name", "type")
        assert listed.split() == [queue_name, "quorum"]
        count, received = asyncio.run(count_then_consume_after_restart(broker.url, queue_name))
        assert (count, received) == (1, body)
        directory = broker.directory
    assert not broker.running
    assert not directory.exists()


def test_the_exit_hook_removes_a_directory_the_instance_made(tmp_path: Path) -> None:
    """A second Ctrl-C during close() (after the stop, before the removal) left
    /tmp/kpx-broker-* with its Erlang cookie behind: the exit hook, which stopped the
    broker, now removes the directory too, when the instance made it."""
    made = LocalBroker()
    given = LocalBroker(tmp_path / "given")
    assert made.directory.is_dir() and given.directory.is_dir()
    made._stop_at_exit()
    given._stop_at_exit()
    assert not made.directory.exists()
    assert given.directory.is_dir()


def test_an_interrupted_stop_still_ends_the_epmd_the_broker_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C (or SIGTERM) landing in `rabbitmqctl stop` ended the server but cut
    the shutdown short before its epmd, which then ran on under init for good; the exit
    hook skipped it too, the server being gone."""
    broker = LocalBroker(tmp_path / "b")
    ended: list[str] = []
    monkeypatch.setattr(broker, "_stop_epmd", lambda: ended.append("epmd"))

    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt
    monkeypatch.setattr(broker, "ctl", interrupted)
    broker._pid = 2**22 + 12345  # no such process: the server is gone by now
    with pytest.raises(KeyboardInterrupt):
        broker._shutdown(graceful=True)
    assert ended == ["epmd"]
    broker._pid = None
    broker._stop_at_exit()
    assert ended == ["epmd", "epmd"]


def test_a_container_broker_gets_the_settings_every_kpx_broker_needs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Docker answers, the demo's and the tests' broker is a container: it ran with
    RabbitMQ's 30-minute consumer_timeout, not the week every kpx broker has (DURABILITY.md),
    so deliveries held through a full disk went back and towards the delivery limit."""
    import sys
    import types

    from node import localbroker

    made: list[Any] = []

    class Container:
        def __init__(self, image: str, **_: object) -> None:
            self.env: dict[str, str] = {}
            made.append(self)

        def with_env(self, key: str, value: str) -> Container:
            self.env[key] = value
            return self

        def start(self) -> None: ...
        def stop(self) -> None: ...
        def get_container_host_ip(self) -> str: return "127.0.0.1"
        def get_exposed_port(self, port: int) -> int: return 49152

    fake = types.ModuleType("testcontainers.community.rabbitmq")
    fake.RabbitMqContainer = Container  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "testcontainers.community.rabbitmq", fake)
    with localbroker._container_url() as url:
        assert url == "amqp://guest:guest@127.0.0.1:49152/"
    (container,) = made
    assert container.env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] == (
        "-rabbit consumer_timeout 604800000")
