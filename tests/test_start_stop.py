"""Starting and stopping a node costs the inbox nothing, and stopping is bounded."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog.testing

from node import runner
from node.config import ConfigError, load_config
from node.network import LocalNetwork, create_network
from node.runner import RunningNode
from node.service import Node
from node.transport import dead_letter_queue, declare_topology, inbox_queue
from protocol import Receipt
from tests.netutil import certificate, queue_depth
from tests.tcpproxy import proxied
from tests.test_network import fresh_codes, until

pytestmark = pytest.mark.broker


async def waiting_in_an_inbox(amqp_url: str, tmp_path: Path,
                              count: int) -> tuple[LocalNetwork, str]:
    """A network of two whose importer has ``count`` certificates waiting in its inbox,
    not yet started; returns the network and the importer's code."""
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await declare_topology(await connection.channel(), im, 5)
    async with RunningNode(network.configs[ex]) as exporter:
        assert exporter.node is not None
        exporter.node.issue_many([certificate(f"{ex}-W{i:05d}", ex, im)
                                  for i in range(count)])
        await until(lambda: not exporter.node.store.backlog(), 60)  # type: ignore[union-attr]
    return network, im


async def test_stop_is_bounded_when_the_broker_stops_answering(
        amqp_url: str, tmp_path: Path) -> None:
    """SIGTERM while the broker no longer answers (a partition, a half-open connection):
    stop() waited for the broker's answer to basic.cancel until the heartbeat gave up,
    some three minutes, by when a supervisor has killed the node."""
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    async with proxied(amqp_url) as (proxy, through):
        config = dataclasses.replace(network.configs[ex], broker_urls=(through,))
        running = RunningNode(config)
        await running.start()
        proxy.hold()
        started = time.monotonic()
        await asyncio.wait_for(running.stop(), 40)
        took = time.monotonic() - started
    assert took < 2 * runner.DRAIN_SECONDS
    assert running._lock.file is not None and running._lock.file.closed


async def test_stop_is_bounded_while_a_refused_message_waits_for_its_dead_letter_copy(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused delivery's dead-letter copy waits for the broker's confirm, three tries
    of up to 30 s; stop() waited for that batch without a bound, so with a broker that
    stopped answering it took 92 s, and a supervisor's SIGKILL would have ended it."""
    monkeypatch.setattr(runner, "DRAIN_SECONDS", 2.0)
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    sender = Node.open(network.configs[ex])
    refused = sender.context().seal(im, Receipt(certificate=f"{im}-NONE",
                                                certificate_digest=bytes(32)))
    sender.close()
    async with proxied(amqp_url) as (proxy, through):
        config = dataclasses.replace(network.configs[im], broker_urls=(through,))
        running = RunningNode(config)
        await running.start()
        assert running.node is not None
        decide = running.node.handle_batch
        decided = asyncio.Event()

        def then_the_broker_goes_silent(deliveries: Any) -> Any:
            proxy.hold()
            decided.set()
            return decide(deliveries)
        running.node.handle_batch = then_the_broker_goes_silent  # type: ignore[method-assign]
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.default_exchange.publish(
                aio_pika.Message(refused.frame, delivery_mode=2), routing_key=inbox_queue(im))
        await asyncio.wait_for(decided.wait(), 10)
        await asyncio.sleep(0.5)  # decided; its dead-letter copy now waits on the silence
        started = time.monotonic()
        stopping = asyncio.create_task(running.stop())
        done, _ = await asyncio.wait({stopping}, timeout=20)
        took = time.monotonic() - started
        proxy.release()
        await stopping
    assert done, f"stop() still running after {took:.0f} s"
    assert running._lock.file is not None and running._lock.file.closed
    # Not acknowledged: the broker delivers it again, and then it is copied (a second copy
    # when the first one did reach the broker before it fell silent).
    async with RunningNode(network.configs[im]):
        for _ in range(100):
            if await queue_depth(amqp_url, dead_letter_queue(im)) >= 1:
                break
            await asyncio.sleep(0.2)
    assert await queue_depth(amqp_url, dead_letter_queue(im)) >= 1


async def test_a_start_that_fails_leaves_the_inbox_untouched(
        amqp_url: str, tmp_path: Path) -> None:
    """start() consumed the inbox before it bound the HTTP port: a port in use made it fail
    with up to `prefetch` deliveries in hand, and RabbitMQ 3.10 counts each return towards
    the delivery limit. A supervisor restarting the node six times dead-lettered 256
    valid certificates, never read."""
    network, im = await waiting_in_an_inbox(amqp_url, tmp_path, 300)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    config = dataclasses.replace(network.configs[im], http_host="127.0.0.1",
                                 http_port=taken.getsockname()[1])
    try:
        for _ in range(4):
            with pytest.raises(ConfigError):
                await RunningNode(config).start()
    finally:
        taken.close()
    assert await queue_depth(amqp_url, dead_letter_queue(im)) == 0
    assert await queue_depth(amqp_url, inbox_queue(im)) == 300
    # and the node, started right, takes every one of them
    async with RunningNode(network.configs[im]) as importer:
        assert importer.node is not None
        await until(lambda: len(importer.node.store.records()) == 300, 60)  # type: ignore[union-attr]


async def test_stopping_while_deliveries_stream_in_returns_none_of_them_unread(
        amqp_url: str, tmp_path: Path) -> None:
    """stop() dropped the deliveries received but not yet handed over: back in the queue
    when the channel closed, each with its delivery count raised, so a node stopped and
    started a few times in a busy hour pushed messages it never read towards the
    dead-letter queue."""
    network, im = await waiting_in_an_inbox(amqp_url, tmp_path, 4000)
    for _ in range(4):
        running = RunningNode(network.configs[im])
        await running.start()
        await asyncio.sleep(0.1)
        await running.stop()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(inbox_queue(im), passive=True)
        returned = 0
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            returned += int(bool(message.headers.get("x-delivery-count")))
            # left unacknowledged: closing the channel returns them
    assert returned == 0


async def test_a_second_node_for_a_participant_does_not_start_beside_the_first(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restored copy started while the original ran (or a second host given the same
    node) consumed the same inbox: the broker shared the Participant's messages out
    between two databases, each holding half of the evidence. It now waits a while for
    the other consumer to go (one a dead host left goes by itself), then refuses."""
    import shutil

    monkeypatch.setattr(runner, "INBOX_TAKEN_WAIT_SECONDS", 2.0)
    code, partner = fresh_codes(2)
    network = create_network(tmp_path / "net", [code, partner], [amqp_url])
    original = RunningNode(network.configs[code])
    await original.start()
    copy_dir = tmp_path / "restored"
    shutil.copytree(network.configs[code].directory, copy_dir)
    copy = load_config(copy_dir)
    assert copy.database_path.parent == copy_dir  # its own database, as a restored copy
    try:
        second = RunningNode(copy)
        with pytest.raises(runner.InboxTaken, match=f"another node for {code} is running"):
            await second.start()
        assert original.transport is not None
        assert (await original.transport.inbox_depth())[1] == 1  # the original alone
    finally:
        await original.stop()
    third = RunningNode(copy)  # the original gone, the copy takes over
    await third.start()
    await third.stop()


async def test_two_copies_started_at_the_same_moment_do_not_both_consume(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both saw no consumer on the inbox and both started: the broker shared the
    Participant's messages out between two databases. Only one now gets the claim
    (an exclusive queue); the other waits for it and refuses."""
    import shutil

    monkeypatch.setattr(runner, "INBOX_TAKEN_WAIT_SECONDS", 3.0)
    code, partner = fresh_codes(2)
    network = create_network(tmp_path / "net", [code, partner], [amqp_url])
    shutil.copytree(network.configs[code].directory, tmp_path / "restored")
    nodes = [RunningNode(network.configs[code]), RunningNode(load_config(tmp_path / "restored"))]
    results = await asyncio.gather(*(n.start() for n in nodes), return_exceptions=True)
    started = [n for n, result in zip(nodes, results, strict=True) if result is None]
    try:
        assert len(started) == 1, results
        refusal = next(r for r in results if r is not None)
        assert isinstance(refusal, runner.InboxTaken), refusal
        assert f"another node for {code} is running" in str(refusal)
        assert started[0].transport is not None
        assert (await started[0].transport.inbox_depth())[1] == 1
    finally:
        for node in started:
            await node.stop()


async def test_a_reconnect_does_not_consume_while_another_connection_holds_the_claim(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that got the claim while the original was away (a broker restart drops every
    connection) keeps it: the original, back, publishes but does not consume until the
    claim is free (its own stale connection, which the broker drops in time, or a copy
    stopped by the operator)."""
    from node import transport as transport_module
    from node.transport import Transport, claim_queue

    monkeypatch.setattr(transport_module, "CLAIM_RETRY_SECONDS", 0.3)
    code = fresh_codes(1)[0]

    async def handler(batch: list[Any]) -> None:
        return None

    # A wait past the broker's window for dropping a dead connection is another node's
    # doing, and an error; before, most often the node's own earlier connection: a warning.
    monkeypatch.setattr(transport_module, "DEAD_CONNECTION_SECONDS", 1.0)
    holder, waiting = Transport([amqp_url], code), Transport([amqp_url], code)
    try:
        await holder.connect()
        await holder.consume(handler)
        await waiting.connect()
        with structlog.testing.capture_logs() as logs:
            await waiting.consume(handler)
            await asyncio.sleep(0.5)
            said = [(entry["log_level"], entry["event"]) for entry in logs
                    if "claim" in entry["event"]]
            assert [level for level, _ in said] == ["warning"]
            await asyncio.sleep(1.5)  # past the window, a few retries
        said = [(entry["log_level"], entry["event"]) for entry in logs
                if "claim" in entry["event"]]
        assert [level for level, _ in said] == ["warning", "error"]  # the error once
        assert "another node for this Participant" in said[1][1]
        assert holder.consuming and not waiting.consuming
        assert (await waiting.inbox_depth())[1] == 1
        assert await waiting.claim_inbox() is False
        await holder.close()
        await until(lambda: waiting.consuming, 10)
        assert (await waiting.inbox_depth())[1] == 1
        assert await waiting.claim_inbox() is True
        assert (await waiting.queue_depth(claim_queue(code)))[1] == 0  # nothing uses it
    finally:
        await holder.close()
        await waiting.close()


async def _waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   answers: list[Any]) -> tuple[RunningNode, list[str]]:
    """A starting node whose inbox looks give ``answers`` in turn (the last one for ever);
    what it asked, in order."""
    monkeypatch.setattr(runner, "INBOX_SETTLE_SECONDS", 2.5)
    monkeypatch.setattr(runner, "INBOX_TAKEN_WAIT_SECONDS", 6.0)
    code, partner = fresh_codes(2)
    network = create_network(tmp_path, [code, partner], ["amqp://unused/"])
    calls: list[str] = []

    class Broker:
        async def inbox_depth(self) -> tuple[int, int]:
            calls.append("depth")
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            if isinstance(answer, BaseException):
                raise answer
            return answer  # type: ignore[no-any-return]

        async def connect(self, timeout: float = 60.0) -> None:
            calls.append("connect")

        async def claim_inbox(self) -> bool:
            return True

    node = RunningNode(network.configs[code])
    node.transport = Broker()  # type: ignore[assignment]
    return node, calls


async def test_a_broker_lost_while_waiting_for_the_inbox_is_waited_for_not_fatal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker restart while the starting node waited for another consumer to go (the
    very thing that clears a stale consumer) ended the start at once: exit 3, 'not
    connected to a broker'. It now waits for the reconnect and looks again, and starts
    once the inbox has stayed free for a while."""
    from node.transport import TransportUnavailable

    node, calls = await _waiting(tmp_path, monkeypatch, [
        (0, 1), TransportUnavailable("not connected to a broker"), (0, 0)])
    started = time.monotonic()
    await asyncio.wait_for(node._wait_for_inbox_free(), 10)
    assert calls[:3] == ["depth", "depth", "connect"]
    assert time.monotonic() - started >= 2.5  # the inbox stayed free that long


async def test_a_consumer_gone_for_a_moment_is_not_taken_for_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker restart drops the running original's consumer too: a copy waiting for the
    inbox saw it free before the original had reconnected, and started beside it (two of
    seven tries). The inbox must stay free a while first; here the original comes back."""
    from node.transport import TransportUnavailable

    node, _ = await _waiting(tmp_path, monkeypatch, [
        (0, 1), TransportUnavailable("not connected to a broker"), (0, 0), (0, 1)])
    with pytest.raises(runner.InboxTaken, match="another node for"):
        await asyncio.wait_for(node._wait_for_inbox_free(), 15)


async def test_an_inbox_that_cannot_be_looked_at_fails_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No such queue (a locked-down broker not provisioned for the node), or no access:
    the wait retried it silently for 200 s."""
    from aiormq.exceptions import ChannelNotFoundEntity

    from node.transport import TransportUnavailable

    node, _ = await _waiting(tmp_path, monkeypatch, [
        ChannelNotFoundEntity("NOT_FOUND - no queue 'kpx.inbox.QA'")])
    started = time.monotonic()
    with pytest.raises(TransportUnavailable, match=r"could not look at kpx\.inbox"):
        await node._wait_for_inbox_free()
    assert time.monotonic() - started < 1


async def test_a_claim_that_cannot_be_taken_is_named_not_the_inbox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim the broker refused for another reason (a kpx.claim.CODE declared with other
    arguments) ended the start with 'could not look at kpx.inbox.CODE': the operator went
    looking at a queue that was fine."""
    from aiormq.exceptions import ChannelPreconditionFailed

    from node.transport import TransportUnavailable

    node, _ = await _waiting(tmp_path, monkeypatch, [(0, 0)])

    async def refused() -> bool:
        raise ChannelPreconditionFailed("PRECONDITION_FAILED - inequivalent arg 'durable'")
    node.transport.claim_inbox = refused  # type: ignore[union-attr,method-assign]
    with pytest.raises(TransportUnavailable, match=r"could not look at kpx\.claim\..*"
                                                    "PRECONDITION_FAILED"):
        await node._wait_for_inbox_free()


async def test_a_reconnect_after_stop_consuming_does_not_consume_again(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graceful stop cancels the consumer, then waits up to 10 s for the batch in hand
    and up to 10 s for the outbox. A reconnect meanwhile (a broker restart, a channel
    error) consumed the inbox again: up to a prefetch of deliveries taken in, then handed
    back as the node closed, each return counting towards the delivery limit. A node
    waiting for its claim (see Transport.claim_inbox) consumed once the claim came free."""
    from node import transport as transport_module
    from node.transport import Transport

    monkeypatch.setattr(transport_module, "CLAIM_RETRY_SECONDS", 0.3)
    code, other = fresh_codes(2)

    async def handler(batch: list[Any]) -> None:
        return None

    stopped = Transport([amqp_url], code)
    try:
        await stopped.connect()
        await stopped.consume(handler)
        assert stopped.consuming
        await stopped.stop_consuming()
        old = stopped._connection
        assert old is not None
        stopped._reconnect(old, "a test")
        await until(lambda: stopped.connected and stopped._connection is not old, 20)
        await asyncio.sleep(0.5)
        assert not stopped.consuming
        assert (await stopped.inbox_depth())[1] == 0
    finally:
        await stopped.close()

    holder, waiting = Transport([amqp_url], other), Transport([amqp_url], other)
    try:
        await holder.connect()
        await holder.consume(handler)
        await waiting.connect()
        await waiting.consume(handler)
        await asyncio.sleep(0.5)
        assert not waiting.consuming
        await waiting.stop_consuming()
        await holder.close()  # the claim comes free
        old = waiting._connection
        assert old is not None
        waiting._reconnect(old, "a test")
        await until(lambda: waiting.connected and waiting._connection is not old, 20)
        await asyncio.sleep(1.0)
        assert not waiting.consuming
        assert (await waiting.inbox_depth())[1] == 0
    finally:
        await holder.close()
        await waiting.close()


async def test_kpnode_status_says_when_the_running_node_waits_for_its_claim(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that took the claim while the original reconnected consumes the inbox; the
    original publishes but does not consume. `kpnode status` on the original counted one
    consumer on the inbox (the copy's) and reported nothing wrong."""
    from aiormq.exceptions import ChannelLockedResource

    from node import transport as transport_module
    from node.status import gather_status
    from node.transport import claim_queue

    monkeypatch.setattr(transport_module, "CLAIM_RETRY_SECONDS", 0.3)
    code, partner = fresh_codes(2)
    network = create_network(tmp_path, [code, partner], [amqp_url])
    original = RunningNode(network.configs[code])
    await original.start()
    copy = await aio_pika.connect(amqp_url)
    try:
        assert original.transport is not None and original.node is not None
        status = await gather_status(original.node, served=True)
        assert not [p for p in status["problems"] if p["level"] == "error"], status["problems"]
        old = original.transport._connection
        assert old is not None
        # The original reconnects only once the copy holds the claim (a reconnect quicker
        # than the copy would take the claim back).
        gate, set_up = asyncio.Event(), original.transport._set_up

        async def gated(connection: Any) -> None:
            await gate.wait()
            await set_up(connection)

        monkeypatch.setattr(original.transport, "_set_up", gated)
        original.transport._reconnect(old, "a test")
        deadline = time.monotonic() + 10
        while True:  # the copy takes the claim as soon as the old connection lets go
            channel = await copy.channel()
            try:
                await channel.declare_queue(claim_queue(code), exclusive=True)
                break
            except ChannelLockedResource:  # a refused declare closes its channel
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        inbox = await channel.declare_queue(inbox_queue(code), passive=True)

        async def ignore(message: Any) -> None:
            return None

        await inbox.consume(ignore)
        gate.set()
        transport = original.transport
        await until(lambda: transport.connected and transport._connection is not old, 20)
        await asyncio.sleep(1.0)
        assert not transport.consuming
        status = await gather_status(original.node, served=True)
        errors = [p["text"] for p in status["problems"] if p["level"] == "error"]
        assert any(f"does not consume {inbox_queue(code)}" in e for e in errors), errors
        await copy.close()  # the copy stops: the original consumes again
        await until(lambda: transport.consuming, 10)
        for _ in range(50):  # the copy's consumer may be counted a moment longer
            status = await gather_status(original.node, served=True)
            errors = [p["text"] for p in status["problems"] if p["level"] == "error"]
            if not errors:
                break
            await asyncio.sleep(0.2)
        assert not errors, errors
    finally:
        await copy.close()
        await original.stop()


async def test_a_claim_queue_no_connection_holds_does_not_lock_the_node_out(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kpx.claim.CODE declared not exclusive (by hand in the management UI, or by the
    node's broker user, which may configure it) refuses every exclusive declare as
    RESOURCE_LOCKED, like a claim another node holds, and a durable one outlives broker
    restarts: every start waited 200 s and exited 3 ('another node for CODE is running'),
    with no such node to stop, and a running node never consumed again after a reconnect.
    No node holds a claim that is not exclusive: it is removed, and the claim taken."""
    from node.transport import Transport, claim_queue

    monkeypatch.setattr(runner, "INBOX_TAKEN_WAIT_SECONDS", 3.0)
    code, partner = fresh_codes(2)
    network = create_network(tmp_path, [code, partner], [amqp_url])
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await (await connection.channel()).declare_queue(claim_queue(code), durable=True)
    node = RunningNode(network.configs[code])
    try:
        await node.start()
        try:
            assert node.transport is not None and node.transport.consuming
            assert await node.transport.claim_inbox() is True
            other = Transport([amqp_url], code)  # a real holder is still respected
            try:
                await other.connect()
                assert await other.claim_inbox() is False
            finally:
                await other.close()
        finally:
            await node.stop()
    finally:
        # Durable: left behind, it would outlive this session on a reused KPX_AMQP_URL
        # broker, whose later sessions hand out the same codes.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            await (await connection.channel()).queue_delete(claim_queue(code))
