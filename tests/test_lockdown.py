"""A broker loaded with the generated definitions locks each node into its own lane.

A private broker of this module's own (the definitions replace its permissions), three
Participants provisioned by ``kpnode deploy``'s own code, nodes running with their own
restricted users, and a raw AMQP client holding one node's credentials trying what an
intruder with them would try.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import AMQPError

from node.config import load_config
from node.deadletters import DeadLetterQueue
from node.deploy import Provisioned, password_file, provision, read_password
from node.localbroker import LocalBroker, ensure_rabbitmq_installed
from node.machine import Side, State
from node.runner import RunningNode
from node.service import Delivery, Node, Verdict, broker_user_for
from node.transport import (
    DEAD_LETTER_EXCHANGE,
    EXCHANGE,
    REGISTRY_EXCHANGE,
    claim_queue,
    dead_letter_queue,
    inbox_queue,
)
from protocol.codec import pack
from protocol.frame import seal_body
from tests.netutil import certificate, certificate_json

pytestmark = pytest.mark.broker

CODES = ("ZA", "EU", "IN")
TEMPLATE = "amqp://{user}:{password}@127.0.0.1:%d/kpx"


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    ensure_rabbitmq_installed()
    with LocalBroker() as b:
        yield b


@pytest.fixture(scope="module")
def deployed(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    done = provision(tmp_path_factory.mktemp("lockdown"), CODES,
                     [TEMPLATE % broker.amqp_port])
    broker.import_definitions(done.definitions)
    return done


def url_of(deployed: Provisioned, user: str, port: int) -> str:
    password = read_password(password_file(deployed.passwords, user))
    return f"amqp://{user}:{password}@127.0.0.1:{port}/kpx"


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def as_za(deployed: Provisioned, broker: LocalBroker
                ) -> AsyncIterator[Callable[[Callable[[AbstractChannel], Awaitable[object]]],
                                            Awaitable[str | None]]]:
    """Run one action on a fresh channel logged in as kpx-za; the broker's refusal text,
    or None when it let the action through."""
    connection = await aio_pika.connect(url_of(deployed, "kpx-za", broker.amqp_port))

    async def attempt(action: Callable[[AbstractChannel], Awaitable[object]]) -> str | None:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await action(channel)
        except AMQPError as exc:
            return str(exc)
        finally:
            if not channel.is_closed:
                await channel.close()
        return None

    async with connection:
        yield attempt


def message(body: bytes, user_id: str | None) -> aio_pika.Message:
    return aio_pika.Message(body, user_id=user_id,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def test_credentials_read_only_their_own_inbox(as_za) -> None:  # type: ignore[no-untyped-def]
    def consume(name: str) -> Callable[[AbstractChannel], Awaitable[object]]:
        async def action(channel: AbstractChannel) -> None:
            queue = await channel.get_queue(name, ensure=False)
            await queue.get(fail=False)
        return action

    assert await as_za(consume(inbox_queue("ZA"))) is None
    assert await as_za(consume(dead_letter_queue("ZA"))) is None
    for other in (inbox_queue("IN"), dead_letter_queue("IN"), inbox_queue("EU")):
        refusal = await as_za(consume(other))
        assert refusal is not None and "ACCESS_REFUSED" in refusal, other


async def test_credentials_cannot_publish_as_another_user(as_za) -> None:  # type: ignore[no-untyped-def]
    def publish(exchange: str, routing_key: str, user_id: str | None
                ) -> Callable[[AbstractChannel], Awaitable[object]]:
        async def action(channel: AbstractChannel) -> None:
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(message(b"x", user_id), routing_key=routing_key)
        return action

    # Its own user_id passes (to a route without a queue, so nothing is delivered).
    assert await as_za(publish(EXCHANGE, "QQ", "kpx-za")) is None
    refusal = await as_za(publish(EXCHANGE, "IN", "kpx-in"))
    assert refusal is not None and "PRECONDITION_FAILED" in refusal
    assert "kpx-in" in refusal
    # The registry fanout reaches every inbox: only the Chair's user may write to it.
    refusal = await as_za(publish(REGISTRY_EXCHANGE, "", "kpx-za"))
    assert refusal is not None and "ACCESS_REFUSED" in refusal
    refusal = await as_za(publish("", inbox_queue("IN"), "kpx-za"))  # the default exchange
    assert refusal is not None and "ACCESS_REFUSED" in refusal
    # Dead letters: under its own code only, so it cannot fill another's dead-letter queue.
    assert await as_za(publish(DEAD_LETTER_EXCHANGE, "ZA", "kpx-za")) is None
    for other in ("IN", "#", "*"):
        refusal = await as_za(publish(DEAD_LETTER_EXCHANGE, other, "kpx-za"))
        assert refusal is not None and "ACCESS_REFUSED" in refusal, other


async def test_credentials_cannot_declare_bind_or_delete(as_za) -> None:  # type: ignore[no-untyped-def]
    attempts: dict[str, Callable[[AbstractChannel], Awaitable[object]]] = {
        "declare a new queue": lambda ch: ch.declare_queue("kpx.inbox.ZZ", durable=True),
        "re-declare its own inbox": lambda ch: ch.declare_queue(
            inbox_queue("ZA"), durable=True, arguments={"x-queue-type": "quorum"}),
        "declare an exchange": lambda ch: ch.declare_exchange("kpx.mine", durable=True),
        "delete another's inbox": lambda ch: ch.queue_delete(inbox_queue("IN")),
        "delete its own inbox": lambda ch: ch.queue_delete(inbox_queue("ZA")),
        "delete an exchange": lambda ch: ch.exchange_delete(EXCHANGE),
    }

    async def bind_to_another_route(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(inbox_queue("ZA"), ensure=False)
        await queue.bind(EXCHANGE, routing_key="IN")  # would copy IN's traffic to ZA

    async def purge_another(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(inbox_queue("IN"), ensure=False)
        await queue.purge()

    attempts["bind its inbox to another's route"] = bind_to_another_route
    attempts["purge another's inbox"] = purge_another
    for what, action in attempts.items():
        refusal = await as_za(action)
        assert refusal is not None and "ACCESS_REFUSED" in refusal, what


async def test_loops_close_and_a_borrowed_key_is_refused(
        deployed: Provisioned, broker: LocalBroker, tmp_path: Path) -> None:
    configs = {code: load_config(path) for code, path in deployed.node_dirs().items()}
    assert all(c.broker_user == broker_user_for(c.participant) and not c.declare_topology
               and c.check_broker_user for c in configs.values())
    async with AsyncExitStack() as stack:
        nodes: dict[str, Node] = {}
        for code in CODES:
            running = RunningNode(configs[code])
            await running.start()
            stack.push_async_callback(running.stop)
            assert running.node is not None
            nodes[code] = running.node
        # Loops close with every node on its own restricted user.
        numbers = [("ZA-2026-0001", "ZA", "IN"), ("IN-2026-0001", "IN", "EU"),
                   ("EU-2026-0001", "EU", "ZA")]
        for number, exporter, importer in numbers:
            nodes[exporter].issue(certificate(number, exporter, importer))
        await until(lambda: all(_state(nodes[i], Side.IMPORT, n) is State.RECEIVED
                                for n, _, i in numbers))
        for number, _, importer in numbers:
            nodes[importer].confirm(number)
        await until(lambda: all(_state(nodes[e], Side.EXPORT, n) is State.CONFIRMED
                                for n, e, _ in numbers))

        # ZA's broker credentials with IN's signing key: a frame that verifies as IN's but
        # comes from ZA's login. EU refuses it and dead-letters it with the reason.
        forged = []
        for i, user_id in enumerate(("kpx-za", None)):
            number = f"IN-2026-09{i:02d}"
            envelope = {"message_id": f"{i}" * 32, "kind": "certificate", "sender": "IN",
                        "recipient": "EU", "created_at": 1, "in_reply_to": None,
                        "payload": certificate_json(number, "IN", "EU")}
            forged.append((number, seal_body(pack(envelope), nodes["IN"].signing_key())))
            connection = await aio_pika.connect(url_of(deployed, "kpx-za", broker.amqp_port))
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(EXCHANGE, ensure=False)
                await exchange.publish(message(forged[-1][1], user_id), routing_key="EU")
        dead = await _dead_letters(url_of(deployed, "kpx-eu", broker.amqp_port), "EU", 2)
        assert sorted(d.body for d in dead) == sorted(f for _, f in forged)
        assert {(d.headers or {}).get("x-kpx-reason") for d in dead} == {
            "message.broker_user_mismatch"}
        for number, _ in forged:
            assert nodes["EU"].store.get(Side.IMPORT, number) is None


async def test_a_replayed_dead_letter_meets_the_broker_user_check_as_it_first_did(
        deployed: Provisioned, broker: LocalBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay publishes under the node's own user-id; the user-id the message first came
    with travels in a header only the node's own login can set. Before, every replay on a
    node with check_broker_user failed as message.broker_user_mismatch."""
    configs = {code: load_config(path) for code, path in deployed.node_dirs().items()}
    stuck = "IN-2026-0777"
    original = Node._handle

    def handle(self: Node, ctx: object, delivery: Delivery) -> Verdict:
        if bug and stuck.encode() in delivery.body:
            raise RuntimeError("a bug this certificate triggers every time")
        return original(self, ctx, delivery)  # type: ignore[arg-type]
    bug = True
    monkeypatch.setattr(Node, "_handle", handle)
    async with AsyncExitStack() as stack:
        nodes: dict[str, Node] = {}
        for code in ("EU", "IN"):
            running = RunningNode(configs[code])
            await running.start()
            stack.push_async_callback(running.stop)
            assert running.node is not None
            nodes[code] = running.node
        eu = nodes["EU"]
        nodes["IN"].issue(certificate(stuck, "IN", "EU"))  # dead-lettered by the broker
        # IN's signature on ZA's login: dead-lettered by EU itself
        envelope = {"message_id": "7" * 32, "kind": "certificate", "sender": "IN",
                    "recipient": "EU", "created_at": 1, "in_reply_to": None,
                    "payload": certificate_json("IN-2026-0778", "IN", "EU")}
        borrowed = seal_body(pack(envelope), nodes["IN"].signing_key())
        connection = await aio_pika.connect(url_of(deployed, "kpx-za", broker.amqp_port))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            await exchange.publish(message(borrowed, "kpx-za"), routing_key="EU")

        async def letters() -> list[str]:
            async with DeadLetterQueue(configs["EU"]) as queue:
                return sorted(d.reason for d in await queue.letters())
        deadline = time.monotonic() + 60
        while await letters() != ["broker.delivery_limit", "message.broker_user_mismatch"]:
            assert time.monotonic() < deadline, await letters()
            await asyncio.sleep(0.2)
        bug = False
        async with DeadLetterQueue(configs["EU"]) as queue:
            for letter in await queue.letters():
                await queue.replay(eu, await queue.find(letter.id), "test")
        await until(lambda: _state(eu, Side.IMPORT, stuck) is State.RECEIVED)
        (again,) = await _dead_letters(url_of(deployed, "kpx-eu", broker.amqp_port), "EU", 1)
        assert again.body == borrowed
        assert (again.headers or {}).get("x-kpx-reason") == "message.broker_user_mismatch"
        assert (again.headers or {}).get("x-kpx-user-id") == "kpx-za"
        assert _state(eu, Side.IMPORT, "IN-2026-0778") is None


def _state(node: Node, side: Side, number: str) -> State | None:
    record = node.store.get(side, number)
    return record.state if record else None


async def _dead_letters(url: str, code: str, count: int,
                        timeout: float = 30.0) -> list[AbstractIncomingMessage]:
    """Take ``count`` messages off a dead-letter queue (acknowledged: they are read)."""
    found: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(dead_letter_queue(code), ensure=False)
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            got = await queue.get(fail=False)
            if got is None:
                await asyncio.sleep(0.1)
                continue
            await got.ack()
            found.append(got)
    return found



async def test_a_claim_the_user_may_not_declare_is_reported_not_raised(
        deployed: Provisioned, broker: LocalBroker) -> None:
    """`kpnode simulate` holds an exclusive queue per Participant; with a broker user whose
    permissions cover only kpx's own queues it died with a traceback (ACCESS_REFUSED)."""
    from node.brokerclient import exclusive_claim

    url = url_of(deployed, "kpx-za", broker.amqp_port)
    async with exclusive_claim([url], ["kpx.simulation.ZA"]) as unclaimed:
        assert unclaimed == ["kpx.simulation.ZA"]


async def test_a_node_user_may_hold_its_own_claim_and_no_other(
        as_za, deployed: Provisioned) -> None:  # type: ignore[no-untyped-def]
    """The claim keeps a second node for a Participant from consuming beside the first;
    definitions that let no node declare it would leave only the racy consumer count.
    Another Participant's claim stays out of reach, or ZA could keep IN from consuming."""
    configs = {code: load_config(path) for code, path in deployed.node_dirs().items()}
    own = lambda ch: ch.declare_queue(claim_queue("ZA"), exclusive=True)  # noqa: E731
    assert await as_za(own) is None
    assert await as_za(lambda ch: ch.queue_delete(claim_queue("ZA"))) is None  # let go
    refusal = await as_za(lambda ch: ch.declare_queue(claim_queue("IN"), exclusive=True))
    assert refusal is not None and "ACCESS_REFUSED" in refusal
    running = RunningNode(configs["ZA"])
    await running.start()
    try:
        assert running.transport is not None and running.transport.consuming
        assert await running.transport.claim_inbox() is True  # held, not merely allowed
        refusal = await as_za(own)  # another connection of the same user
        assert refusal is not None and "RESOURCE_LOCKED" in refusal
    finally:
        await running.stop()
