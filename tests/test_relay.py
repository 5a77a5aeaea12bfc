"""How the outbox relay paces its batches, without a broker: a batch whose confirms are
slow is overtaken by the next one, at most two wait at once, no row goes out twice, and a
batch confirmed quickly keeps the rows behind it for one batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from node import runner
from node.network import create_network
from node.runner import RunningNode
from node.service import Node, now_ms
from node.transport import Outgoing, PublishResult, Transport
from tests.netutil import certificate
from tests.test_network import until


class SlowConfirms:
    """A broker that confirms a publish only when the test opens its gate."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gates: list[asyncio.Event] = []

    async def publish(self, items: Sequence[Outgoing]) -> list[PublishResult]:
        self.calls.append([i.message_id for i in items])
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return [PublishResult(confirmed=True) for _ in items]


@dataclass
class Relay:
    running: RunningNode
    broker: SlowConfirms
    issue: Callable[[int], str]  # issues certificate n, returns its message id

    @property
    def node(self) -> Node:
        assert self.running.node is not None
        return self.running.node


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    running = RunningNode(network.configs["ZA"])
    node = Node.open(network.configs["ZA"])
    node.on_outbox = running._wake.set
    broker = SlowConfirms()
    running.node, running.transport = node, broker  # type: ignore[assignment]

    def issue(n: int) -> str:
        return node.issue(certificate(f"ZA-2026-{n:06d}", "ZA", "IN")).message_id or ""

    task = asyncio.create_task(running._relay())
    yield Relay(running, broker, issue)
    task.cancel()
    for gate in broker.gates:
        gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    node.close()


async def test_a_batch_slow_to_confirm_is_overtaken_and_nothing_goes_twice(
        relay: Relay) -> None:
    first = relay.issue(1)
    await until(lambda: len(relay.broker.calls) == 1)
    second = relay.issue(2)
    await until(lambda: len(relay.broker.calls) == 2)  # while the first still waits
    assert relay.broker.calls == [[first], [second]]
    for gate in relay.broker.gates:
        gate.set()
    await until(lambda: not relay.node.store.due(now_ms(), 10))
    await asyncio.sleep(0.3)  # the relay polls again meanwhile
    assert relay.broker.calls == [[first], [second]]


async def test_at_most_two_batches_wait_for_their_confirms(relay: Relay) -> None:
    relay.issue(1)
    await until(lambda: len(relay.broker.calls) == 1)
    relay.issue(2)
    await until(lambda: len(relay.broker.calls) == 2)
    third = relay.issue(3)
    await asyncio.sleep(0.3)
    assert len(relay.broker.calls) == 2
    relay.broker.gates[0].set()
    await until(lambda: len(relay.broker.calls) == 3)
    assert relay.broker.calls[2] == [third]


async def test_rows_behind_a_batch_confirmed_in_time_wait_and_go_together(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "RELAY_OVERTAKE_SECONDS", 10.0)
    relay.issue(1)
    await until(lambda: len(relay.broker.calls) == 1)
    behind = [relay.issue(2), relay.issue(3)]
    await asyncio.sleep(0.3)
    assert len(relay.broker.calls) == 1
    relay.broker.gates[0].set()
    await until(lambda: len(relay.broker.calls) == 2)
    assert relay.broker.calls[1] == behind



async def test_the_shutdown_drain_waits_for_rows_the_relay_has_under_way(
        relay: Relay) -> None:
    sent = relay.issue(1)
    await until(lambda: len(relay.broker.calls) == 1)
    drain = asyncio.create_task(relay.running._drain())
    await asyncio.sleep(0.3)
    assert not drain.done()  # the row is the relay's, waiting for its confirm
    relay.broker.gates[0].set()
    await asyncio.wait_for(drain, 5)
    assert not relay.node.store.due(now_ms(), 10)  # marked sent: not sent again at start
    assert relay.broker.calls == [[sent]]


async def test_an_unexpected_failure_does_not_stop_the_relay(relay: Relay) -> None:
    publish = relay.broker.publish
    failures = []

    async def fail_once(items: Sequence[Outgoing]) -> list[PublishResult]:
        if not failures:
            failures.append(items)
            raise RuntimeError("a bug in the publishing path")
        return await publish(items)
    relay.broker.publish = fail_once  # type: ignore[method-assign]
    sent = relay.issue(1)
    await until(lambda: len(relay.broker.calls) == 1)  # tried again after the failure
    relay.broker.gates[0].set()
    await until(lambda: not relay.node.store.due(now_ms(), 10))
    assert [m for call in relay.broker.calls for m in call] == [sent]


async def test_batches_nacked_together_renew_the_publishing_channel_once() -> None:
    class Channel:
        def __init__(self) -> None:
            self.close_callbacks: set[object] = set()
            self.closed = 0

        async def get_exchange(self, name: str, ensure: bool) -> str:
            await asyncio.sleep(0.01)  # the renewals overlap here
            return name

        async def close(self) -> None:
            self.closed += 1

    class Connection:
        is_closed = False

        def __init__(self) -> None:
            self.opened: list[Channel] = []

        async def channel(self, **_: object) -> Channel:
            self.opened.append(Channel())
            return self.opened[-1]

    transport = Transport(["amqp://unused/"], "ZA")
    connection, nacking = Connection(), Channel()
    transport._connection, transport._publish_channel = connection, nacking  # type: ignore[assignment]
    transport._connected.set()
    await asyncio.gather(transport._renew_publishing(nacking),  # type: ignore[arg-type]
                         transport._renew_publishing(nacking))  # type: ignore[arg-type]
    assert len(connection.opened) == 1
    assert transport._publish_channel is connection.opened[0]
    assert nacking.closed == 1


async def test_messages_without_an_inbox_are_logged_per_recipient_not_per_message(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new Participant whose node has not started: each of its messages came back
    unroutable at every retry, and each was logged, every 30 s: 5,000 certificates made
    10,000 warnings a minute. Now one line per recipient, again only every minute."""
    import structlog

    monkeypatch.setattr(runner, "UNROUTABLE_RETRY_MS", 20)
    calls: list[int] = []

    async def no_inbox(items: Sequence[Outgoing]) -> list[PublishResult]:
        calls.append(len(items))
        return [PublishResult(confirmed=False, returned=True) for _ in items]
    relay.broker.publish = no_inbox  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        for n in range(30):
            relay.issue(n)
        await until(lambda: sum(calls) >= 90)  # every message returned three times or more
    said = [e for e in logs if e["event"].startswith("unroutable")]
    assert len(said) == 1, len(said)
    assert said[0]["recipient"] == "IN" and 1 <= said[0]["messages"] <= 30


async def test_an_outage_is_logged_once_not_every_second(relay: Relay) -> None:
    """With rows due and the broker away, the relay said 'broker unavailable; outbox
    waits' every second: an hour's outage wrote 3,600 lines saying the same, burying the
    rest of the log. Now once, again only every minute, and once more when it moves."""
    import structlog

    from node.transport import TransportUnavailable

    publish = relay.broker.publish
    down = asyncio.Event()

    async def away(items: Sequence[Outgoing]) -> list[PublishResult]:
        if not down.is_set():
            raise TransportUnavailable("not connected to a broker")
        return await publish(items)
    relay.broker.publish = away  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        sent = relay.issue(1)
        await asyncio.sleep(3.5)  # three or four tries, a second apart
        down.set()
        await until(lambda: len(relay.broker.calls) == 1)
        relay.broker.gates[0].set()
        await until(lambda: not relay.node.store.due(now_ms(), 10))
    waits = [e for e in logs if e["event"] == "broker unavailable; outbox waits"]
    assert len(waits) == 1 and waits[0]["tries"] == 1, waits
    (moving,) = [e for e in logs if e["event"] == "outbox moving again"]
    assert moving["tries"] >= 3
    assert relay.broker.calls == [[sent]]
