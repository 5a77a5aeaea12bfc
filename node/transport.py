"""The node's AMQP shell (aio-pika): bytes in, bytes out, no business logic.

Topology, one set per Participant CODE (``declare_topology``; in a locked-down broker the
operator loads it from definitions instead and nodes only check it exists)::

    exchange kpx (direct, durable) ──CODE──▶ quorum queue kpx.inbox.CODE
    exchange kpx.registry (fanout, durable) ──▶ every kpx.inbox.CODE
        x-delivery-limit N, dead-lettered at least once to
    exchange kpx.dlx (topic, durable) ───CODE──▶ quorum queue kpx.dead.CODE
    exclusive queue kpx.claim.CODE, declared by the consuming node on its connection

Why these settings (RabbitMQ 3.10): quorum queues replicate and fsync before confirming;
they have no delivery limit by default, so a poison message would loop for ever;
at-least-once dead-lettering needs ``overflow=reject-publish``, else it silently
degrades to at-most-once.

Connection handling is our own small supervisor rather than aio-pika's robust connection,
because a node may be given several broker endpoints (a cluster) and must move to the
next one when its broker goes away; after any reconnect, deliveries from the old channel
are never acknowledged (that would fail): the broker redelivers them and the node's inbox
de-duplicates. A channel the broker closes, or a consumer it cancels (a deleted queue),
while the connection stays up would leave the node unable to publish or deaf for good
(aio-pika's plain channels do not recover); either makes the supervisor reconnect and set
everything up again. Publishing is pipelined: all frames of a batch are in flight at once on one
confirming channel, each resolved by its own confirm, return or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import DeliveryError, PublishError

from node.brokerurl import redact, why_connect_failed

log = structlog.get_logger("kpx.transport")

EXCHANGE = "kpx"
DEAD_LETTER_EXCHANGE = "kpx.dlx"
#: fanout: the Chair publishes a registry update once, every inbox gets a copy
REGISTRY_EXCHANGE = "kpx.registry"
CONTENT_TYPE = "application/x-kpx-frame"
PUBLISH_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
#: how long shutdown waits for the broker to answer a basic.cancel or a connection.close:
#: a broker that stopped answering (a partition, a half-open TCP connection) would
#: otherwise hold the node until the heartbeat gives up, some three minutes
SHUTDOWN_STEP_TIMEOUT = 2.0
#: how often a node whose claim another connection holds tries again (see _await_claim)
CLAIM_RETRY_SECONDS = 5.0
#: how long the broker may take to drop a connection whose node is gone (its heartbeat gives
#: up, some three minutes): a consumer or claim held longer than this is another node's
DEAD_CONNECTION_SECONDS = 200.0
NACKED = "nacked by the broker"


def inbox_queue(code: str) -> str:
    return f"kpx.inbox.{code}"


def dead_letter_queue(code: str) -> str:
    return f"kpx.dead.{code}"


def claim_queue(code: str) -> str:
    """The exclusive queue a consuming node holds on its connection. The broker lets one
    connection at a time hold an exclusive queue, so two nodes for one Participant cannot
    both consume its inbox: counting the inbox's consumers shows none to both when they
    start at the same moment, and quorum queues do not enforce exclusive consumers."""
    return f"kpx.claim.{code}"


#: every exchange of the topology and its type (the deploy definitions reuse this list)
EXCHANGES: tuple[tuple[str, aio_pika.ExchangeType], ...] = (
    (EXCHANGE, aio_pika.ExchangeType.DIRECT),
    # topic, not direct: only a topic exchange lets the broker check routing keys per user
    # (topic permissions), so a node's user files dead letters under its own code only
    (DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.TOPIC),
    (REGISTRY_EXCHANGE, aio_pika.ExchangeType.FANOUT),
)


def dead_letter_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum"}


def inbox_arguments(code: str, delivery_limit: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": code,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_topology(channel: AbstractChannel, code: str, delivery_limit: int) -> None:
    """Declare the exchanges and this Participant's inbox and dead-letter queue."""
    exchanges = {name: await channel.declare_exchange(name, kind, durable=True)
                 for name, kind in EXCHANGES}
    dead = await channel.declare_queue(dead_letter_queue(code), durable=True,
                                       arguments=dead_letter_arguments())
    await dead.bind(exchanges[DEAD_LETTER_EXCHANGE], routing_key=code)
    inbox = await channel.declare_queue(inbox_queue(code), durable=True,
                                        arguments=inbox_arguments(code, delivery_limit))
    await inbox.bind(exchanges[EXCHANGE], routing_key=code)
    await inbox.bind(exchanges[REGISTRY_EXCHANGE])


async def connect(url: str, timeout: float = CONNECT_TIMEOUT) -> AbstractConnection:
    """``aio_pika.connect``, except that a connection that fails to open is closed.
    aio-pika leaves it unclosed for its ``__del__``, which collected outside a running
    loop cannot schedule the close: a coroutine never awaited (a RuntimeWarning)."""
    connection = aio_pika.Connection(make_url(url))
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection


async def publish_registry(url: str, frame: bytes, *, user_id: str | None = None) -> None:
    """The Chair's side: one registry-update frame to every node's inbox, confirmed."""
    connection = await connect(url, timeout=CONNECT_TIMEOUT)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            REGISTRY_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True, passive=True)
        await exchange.publish(
            aio_pika.Message(frame, content_type=CONTENT_TYPE, type="registry_update",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=user_id),
            routing_key="", timeout=PUBLISH_TIMEOUT)


class TransportUnavailable(Exception):
    """No broker connection now; the caller keeps its work and tries later."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    message_id: str
    recipient: str
    body: bytes
    kind: str


@dataclass(frozen=True, slots=True)
class PublishResult:
    confirmed: bool
    #: unroutable: the broker has no inbox bound for the recipient
    returned: bool = False
    error: str | None = None


class Delivery:
    """One message taken from the inbox, not yet acknowledged."""

    __slots__ = ("_generation", "_message", "body", "delivery_count", "headers", "message_id",
                 "redelivered", "user_id")

    def __init__(self, message: AbstractIncomingMessage, generation: int) -> None:
        self._message = message
        self._generation = generation
        self.body: bytes = message.body
        self.message_id: str | None = message.message_id
        self.user_id: str | None = message.user_id
        self.headers: dict[str, Any] = dict(message.headers or {})
        self.redelivered: bool = bool(message.redelivered)
        count = self.headers.get("x-delivery-count")
        self.delivery_count: int | None = count if isinstance(count, int) else None


OnBatch = Callable[[list[Delivery]], Awaitable[None]]


class Transport:
    """One node's connection to the broker: publish, consume, dead-letter."""

    def __init__(self, urls: Sequence[str], participant: str, *, prefetch: int = 256,
                 delivery_limit: int = 5, declare: bool = True,
                 broker_user: str | None = None) -> None:
        if not urls:
            raise ValueError("at least one broker URL is needed")
        self.urls = list(urls)
        self.participant = participant
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.declare = declare
        self.broker_user = broker_user
        self._connection: AbstractConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._consume_channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._inbox: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        self._connected = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._on_batch: OnBatch | None = None
        self._max_batch = 256
        self._max_wait = 0.010
        self._pending: asyncio.Queue[Delivery] = asyncio.Queue()
        self._batcher: asyncio.Task[None] | None = None
        self._current_url: str | None = None
        #: why the last attempt to connect failed: a refused login looks like an outage
        #: otherwise, and sends supervisors into a restart loop
        self._last_failure: str | None = None
        #: the last set-up that failed on a broker that answered, until one succeeds
        self._set_up_failure: str | None = None
        #: delivery tags of the current consumer channel not yet acked or rejected
        self._outstanding: set[int] = set()
        #: batches in a row whose handler raised (their hand-back waits longer each time)
        self._failed_batches = 0
        #: connection closes under way (strong references: the loop keeps only weak ones)
        self._closers: set[asyncio.Task[None]] = set()
        #: one publishing-channel renewal at a time (see _renew_publishing)
        self._renewing = asyncio.Lock()
        #: waits for a claim another connection holds, then consumes (see _await_claim)
        self._claim_waiter: asyncio.Task[None] | None = None
        #: the broker user may not declare the claim: said once, not at every reconnect
        self._claim_refusal_said = False
        #: told True when the node waits for another connection to let go of the claim
        #: (it does not consume meanwhile), False once it no longer waits (it consumes, or
        #: the connection went: the next one claims anew)
        self.on_claim_wait: Callable[[bool], None] | None = None
        #: stop_consuming was called: a reconnect (or a claim come free) must not consume
        #: again, or the deliveries it took in would go back as the node closes
        self._consuming_stopped = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def consuming(self) -> bool:
        return self.connected and self._consumer_tag is not None

    @property
    def publishing_blocked(self) -> bool:
        """Whether the broker has blocked this connection (AMQP ``connection.blocked``): a
        broker low on disk or memory (a resource alarm) stops reading from every connection
        that publishes, so nothing this node sends leaves it and no confirm comes, while
        the connection stays up and the consumer keeps its deliveries."""
        # aiormq keeps no public record of it: it holds ``__connection_unblocked`` clear
        # while blocked. Should that change, nothing counts as blocked, as before.
        amqp = getattr(getattr(self._connection, "transport", None), "connection", None)
        unblocked = getattr(amqp, "_Connection__connection_unblocked", None)
        return (self.connected and isinstance(unblocked, asyncio.Event)
                and not unblocked.is_set())

    @property
    def url(self) -> str | None:
        return self._current_url

    async def connect(self, timeout: float = 60.0) -> None:
        """Connect (trying every URL) and declare or check the topology."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="amqp-supervisor")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            last, urls = self._last_failure, ", ".join(redact(u) for u in self.urls)
            if self._set_up_failure is not None:
                # It answered: 'no broker answered' sent operators looking at the network
                # for what is a missing or differently declared queue.
                # Not the only word, though, when a later attempt failed otherwise (the
                # broker restarted to load definitions, and still away).
                since = (f"; last attempt: {last}" if last and last != self._set_up_failure
                         else "")
                raise TransportUnavailable(
                    f"the broker answered but the node could not set up its queues within "
                    f"{timeout:g} s ({self._set_up_failure}){since}") from None
            raise TransportUnavailable(
                f"no broker answered at {urls} within {timeout:g} s"
                + (f" (last attempt: {last})" if last else "")) from None

    async def close(self) -> None:
        self._closing = True
        for task in (self._claim_waiter, self._batcher, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._connection is not None:
            self._track_closer(self._connection.close())
        if self._closers:
            # Not cancelled when the broker does not answer in time: a close cut short
            # leaves the connection half open. It finishes, or fails, on its own.
            await asyncio.wait(set(self._closers), timeout=SHUTDOWN_STEP_TIMEOUT)
        self._connected.clear()

    def _track_closer(self, closing: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(closing)
        self._closers.add(task)
        # its outcome is of no interest (a broker already gone, a second close), but
        # retrieved, so that asyncio does not log it as never retrieved
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        task.add_done_callback(self._closers.discard)

    # -- connection supervision ----------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        index = 0
        unanswered = 0  # members tried in a row without an answer
        while not self._closing:
            url = self.urls[index % len(self.urls)]
            index += 1
            try:
                connection = await connect(url, timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                self._last_failure = f"{redact(url)}: {why_connect_failed(url, exc)}"
                log.warning("broker connection failed", url=redact(url),
                            error=why_connect_failed(url, exc))
                unanswered += 1
                if unanswered % len(self.urls) == 0:
                    # A whole round without an answer, wherever in the list it began.
                    await asyncio.sleep(min(10.0, 0.25 * 2 ** attempt))
                    attempt += 1
                continue
            unanswered = 0
            lost = asyncio.Event()
            connection.close_callbacks.add(lambda *_, lost=lost: lost.set())
            try:
                await self._set_up(connection)
            except asyncio.CancelledError:
                # Closed during set-up: self._connection may not name this one yet, so
                # close() would leave it open (and aio-pika's __del__ closes it too late).
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.close())
                raise
            except Exception as exc:
                # Kept for connect()'s error: a queue declared with other arguments, or a
                # missing one, is the reason the node never connects, not a silent broker.
                self._last_failure = f"{redact(url)}: set-up failed: {exc}"
                self._set_up_failure = self._last_failure
                log.error("broker set-up failed", url=redact(url), error=str(exc))
                with contextlib.suppress(Exception):
                    await connection.close()
                await asyncio.sleep(min(10.0, 0.25 * 2 ** attempt))
                attempt += 1
                continue
            attempt = 0
            self._set_up_failure = None
            self._current_url = url
            self._connected.set()
            log.info("broker connected", url=redact(url), participant=self.participant)
            await lost.wait()
            self._connected.clear()
            self._tell_claim_wait(False)
            self._generation += 1
            if not self._closing:
                log.warning("broker connection lost; reconnecting", url=redact(url))
                index -= 1  # try the same broker first, then the others

    async def _set_up(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if self.declare:
            await declare_topology(channel, self.participant, self.delivery_limit)
        self._exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        self._dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        self._connection = connection
        self._publish_channel = channel
        self._watch_publishing(connection, channel)
        if self._on_batch is not None and not self._consuming_stopped:
            await self._start_consumer()

    def _watch_publishing(self, connection: AbstractConnection, channel: AbstractChannel
                          ) -> None:
        def closed(*_: object) -> None:
            if channel is self._publish_channel:  # not one replaced on purpose
                self._reconnect(connection, "publishing channel closed")
        channel.close_callbacks.add(closed)

    async def _renew_publishing(self, nacking: AbstractChannel | None) -> None:
        """Publish on a fresh channel from now on. RabbitMQ 3.10 registers a channel as
        a quorum queue's publisher (overflow=reject-publish) on its first publish; one
        that registered while the queue was electing a new leader (a cluster member lost)
        can be left nacking every publish to that queue for good. Nacks are otherwise
        rare, so after any nack the next attempt goes out on a new channel. Batches
        published at once (the relay's overtaking) may all meet nacks: the first renews
        the channel they used (``nacking``), the others find it renewed already."""
        async with self._renewing:
            connection, old = self._connection, self._publish_channel
            if (connection is None or connection.is_closed or not self.connected
                    or old is not nacking):
                return
            try:
                # A broker that stopped answering would hold the relay until the heartbeat
                # gives up, some three minutes.
                channel = await asyncio.wait_for(
                    connection.channel(publisher_confirms=True, on_return_raises=True),
                    CONNECT_TIMEOUT)
            except TimeoutError:
                raise TransportUnavailable("the broker did not open a publishing channel "
                                           f"within {CONNECT_TIMEOUT:g} s") from None
            self._exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            self._dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
            self._publish_channel = channel
            self._watch_publishing(connection, channel)
        log.warning("publish nacked by the broker; publishing on a new channel")
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()

    def _reconnect(self, connection: AbstractConnection, why: str) -> None:
        """A channel closed, or the broker cancelled our consumer, on a connection that
        is still open: nothing would ever consume or confirm on it again (aio-pika's
        known pitfall). Close the connection, so the supervisor sets everything up anew."""
        if self._closing or connection is not self._connection or connection.is_closed:
            return
        log.warning("broker channel lost; reconnecting", reason=why)
        self._track_closer(connection.close())

    # -- publishing ------------------------------------------------------------------

    async def publish(self, items: Sequence[Outgoing]) -> list[PublishResult]:
        """Publish all items at once; one result each, in order. Never raises for a single
        message's failure; raises TransportUnavailable when not connected at all."""
        exchange, channel = self._exchange, self._publish_channel
        if not self.connected or exchange is None:
            raise TransportUnavailable("not connected to a broker")
        results = list(await asyncio.gather(*(self._publish_one(exchange, i) for i in items)))
        if any(r.error and r.error.startswith(NACKED) for r in results):
            with contextlib.suppress(Exception):
                await self._renew_publishing(channel)
        return results

    async def _publish_one(self, exchange: AbstractExchange, item: Outgoing) -> PublishResult:
        message = aio_pika.Message(
            item.body, message_id=item.message_id, type=item.kind, content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=self.broker_user,
        )
        try:
            await exchange.publish(message, routing_key=item.recipient, mandatory=True,
                                   timeout=PUBLISH_TIMEOUT)
        except PublishError:
            return PublishResult(confirmed=False, returned=True, error="unroutable")
        except DeliveryError as exc:
            return PublishResult(confirmed=False, error=f"{NACKED}: {exc}")
        except TimeoutError:
            # str(TimeoutError()) is empty: 'TimeoutError: ' was all the operator read
            why = (": the broker blocks this node's publishes (a resource alarm: it is low "
                   "on disk or memory)" if self.publishing_blocked else "")
            return PublishResult(confirmed=False, error="not confirmed by the broker within "
                                 f"{PUBLISH_TIMEOUT:g} s{why}")
        except Exception as exc:
            return PublishResult(confirmed=False, error=f"{type(exc).__name__}: {exc}")
        return PublishResult(confirmed=True)

    async def dead_letter(self, body: bytes, *, reason: str, text: str,
                          headers: Mapping[str, str] = {}) -> None:
        """Put a copy of a refused message, with the reason, on this node's dead-letter queue.
        Returns once the broker confirmed it; raises otherwise (then do not ack the original)."""
        dlx = self._dlx
        if not self.connected or dlx is None:
            raise TransportUnavailable("not connected to a broker")
        message = aio_pika.Message(
            body, content_type=CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"x-kpx-reason": reason, "x-kpx-text": text, **headers},
            user_id=self.broker_user,
        )
        await dlx.publish(message, routing_key=self.participant, mandatory=True,
                          timeout=PUBLISH_TIMEOUT)

    # -- consuming -------------------------------------------------------------------

    async def consume(self, on_batch: OnBatch, *, max_batch: int = 256,
                      max_wait: float = 0.010) -> None:
        """Hand inbox deliveries to ``on_batch`` in batches; the caller acks or rejects."""
        self._on_batch = on_batch
        self._consuming_stopped = False
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._batcher = asyncio.create_task(self._batches(), name="amqp-batcher")
        if self.connected:
            await self._start_consumer()

    async def claim_inbox(self) -> bool | None:
        """Hold :func:`claim_queue` on the current connection: True when it holds it (a
        second claim on the same connection is a no-op), False when another connection
        does, None when the broker user may not declare it (definitions made before
        claims existed): then only the inbox's consumer count guards it."""
        if self._connection is None or not self.connected:
            raise TransportUnavailable("not connected to a broker")
        return await self._claim(self._connection)

    async def _claim(self, connection: AbstractConnection) -> bool | None:
        name = claim_queue(self.participant)
        held = await self._declare_claim(connection, name)
        if held is False and await self._remove_stray_claim(connection, name):
            held = await self._declare_claim(connection, name)
        return held

    async def _remove_stray_claim(self, connection: AbstractConnection, name: str) -> bool:
        """A claim queue that is not exclusive (declared by hand, or by this broker user,
        which may configure it) refuses an exclusive declare as RESOURCE_LOCKED, as a
        claim another connection holds does, and a durable one outlives broker restarts:
        the node would wait for a holder that does not exist. No node holds such a queue
        (a passive declare of another connection's exclusive queue is refused as well,
        and none can be declared while it exists): delete it. True when worth claiming
        again."""
        from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

        channel = await connection.channel()  # a refused declare closes its channel
        try:
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            await channel.queue_delete(name)
        except ChannelLockedResource:
            return False  # held, exclusively, by another connection
        except ChannelNotFoundEntity:
            return True  # gone meanwhile
        except Exception as exc:
            log.warning("could not look at or remove the inbox's claim", queue=name,
                        error=str(exc))
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        log.warning("removed a claim queue no connection held (declared not exclusive, by "
                    "hand?); it locked every node for this Participant out", queue=name,
                    messages=result.message_count, consumers=result.consumer_count)
        return True

    async def _declare_claim(self, connection: AbstractConnection, name: str
                             ) -> bool | None:
        from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource

        channel = await connection.channel()  # a refused declare closes its channel
        try:
            await channel.declare_queue(name, exclusive=True, auto_delete=True)
        except ChannelLockedResource:
            return False
        except ChannelAccessRefused:
            if not self._claim_refusal_said:
                self._claim_refusal_said = True
                log.warning("the broker user may not declare the inbox's claim; two nodes "
                            "for this Participant started at the same moment could both "
                            "consume. Load definitions from `kpnode deploy definitions` of "
                            "this version, which permit it", queue=name)
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return True

    async def _start_consumer(self) -> None:
        assert self._connection is not None
        connection = self._connection
        self._consumer_tag = None  # one of a closed connection: not consuming until claimed
        if await self._claim(connection) is False:
            # A warning, not yet an error: after a network blip the holder is most often
            # this node's own earlier connection, which the broker drops in time.
            log.warning("another connection holds the inbox's claim: this node's own earlier "
                        "connection until the broker notices it is gone (within about three "
                        "minutes), or another node for this Participant. Not consuming until "
                        "it is free", queue=claim_queue(self.participant),
                        retry_seconds=CLAIM_RETRY_SECONDS)
            self._claim_waiter = asyncio.create_task(self._await_claim(connection),
                                                     name="amqp-claim")
            self._tell_claim_wait(True)
            return
        await self._consume_inbox()

    async def _await_claim(self, connection: AbstractConnection) -> None:
        """Try the claim again now and then; consume once it is held. A connection that
        goes meanwhile ends the wait: the supervisor sets everything up anew."""
        def ended() -> bool:
            return (self._closing or self._consuming_stopped
                    or connection is not self._connection or not self.connected)

        started = time.monotonic()
        said = False
        while not ended():
            await asyncio.sleep(CLAIM_RETRY_SECONDS)
            if ended():
                return
            try:
                if await self._claim(connection) is False:
                    waited = time.monotonic() - started
                    if not said and waited > DEAD_CONNECTION_SECONDS:
                        said = True
                        log.error("another node for this Participant holds the inbox's "
                                  "claim: the broker would have dropped this node's own "
                                  "earlier connection by now. Not consuming until it is "
                                  "free; stop the other node", queue=claim_queue(
                                      self.participant), waited_seconds=round(waited))
                    continue
                await self._consume_inbox()
            except Exception as exc:
                self._reconnect(connection, f"could not start consuming: {exc}")
                return
            log.info("the inbox's claim is free; consuming",
                     queue=claim_queue(self.participant))
            return

    async def _consume_inbox(self) -> None:
        assert self._connection is not None
        generation = self._generation
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        if self.declare:
            inbox = await channel.declare_queue(
                inbox_queue(self.participant), durable=True,
                arguments=inbox_arguments(self.participant, self.delivery_limit))
        else:
            inbox = await channel.declare_queue(inbox_queue(self.participant), passive=True)

        self._outstanding = set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            if isinstance(message.delivery_tag, int):
                self._outstanding.add(message.delivery_tag)
            await self._pending.put(Delivery(message, generation))

        self._consume_channel = channel
        self._inbox = inbox
        connection = self._connection

        def closed(*_: object) -> None:
            if channel is self._consume_channel:
                self._reconnect(connection, "consuming channel closed")
        channel.close_callbacks.add(closed)
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(
            lambda *_: self._reconnect(connection, "consumer cancelled by the broker"))
        self._consumer_tag = await inbox.consume(on_message, no_ack=False)
        self._tell_claim_wait(False)
        if self._consuming_stopped:  # stop_consuming came while this was under way
            await self.stop_consuming()

    def _tell_claim_wait(self, waiting: bool) -> None:
        if self.on_claim_wait is not None:
            try:
                self.on_claim_wait(waiting)
            except Exception:  # only a report: never the reason not to consume
                log.exception("could not report the wait for the inbox's claim")

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        last_done = float("-inf")
        while True:
            batch = [await self._pending.get()]
            try:
                await self._one_batch(loop, batch, last_done)
            finally:
                for _ in batch:
                    self._pending.task_done()
            last_done = loop.time()

    async def _one_batch(self, loop: asyncio.AbstractEventLoop, batch: list[Delivery],
                         last_done: float) -> None:
        """Fill ``batch`` (in place: the caller counts what it took) and hand it over."""
        queued = self._pending.qsize()
        busy = queued > 0 or loop.time() - last_done < self._max_wait
        if busy and queued < self._max_batch - 1:
            # Deliveries are streaming in: a moment for more of them, so that one
            # commit covers them all. A delivery after a quiet spell goes at once.
            await asyncio.sleep(self._max_wait)
        while len(batch) < self._max_batch and not self._pending.empty():
            batch.append(self._pending.get_nowait())
        current = [d for d in batch if d._generation == self._generation]
        if len(current) < len(batch):
            log.info("dropping deliveries from a closed channel; the broker redelivers",
                     count=len(batch) - len(current))
        if current and self._on_batch is not None:
            try:
                await self._on_batch(current)
                self._failed_batches = 0
            except Exception:
                # Left unsettled on a live channel they would never come back (the broker
                # redelivers only when the channel closes): hand the unsettled ones back,
                # but not at once: each return counts towards the delivery limit, and a
                # fault of a moment would otherwise dead-letter the batch in milliseconds.
                self._failed_batches += 1
                delay = min(0.5 * 2 ** (self._failed_batches - 1), 30.0)
                log.exception("batch handler failed; its deliveries go back to the broker",
                              after_seconds=delay)
                await asyncio.sleep(delay)
                for delivery in current:
                    if delivery._message.delivery_tag in self._outstanding:
                        await self.reject(delivery, requeue=True)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries from the current channel; older ones are left to the
        broker, which redelivers them after the reconnect."""
        current = [d for d in deliveries if d._generation == self._generation]
        if not current:
            return
        tags = [t for d in current if isinstance(t := d._message.delivery_tag, int)]
        try:
            # One basic.ack for the whole batch, but only when it covers exactly the
            # oldest outstanding deliveries: 'multiple' acks everything up to the tag.
            lowest = min(self._outstanding, default=None)
            if (len(tags) == len(current) > 1 and tags == sorted(tags)
                    and tags[0] == lowest and tags[-1] - tags[0] + 1 == len(tags)):
                await current[-1]._message.ack(multiple=True)
            else:
                for d in current:
                    await d._message.ack()
            self._outstanding.difference_update(tags)
        except Exception as exc:
            log.warning("ack failed; the broker will redeliver", error=str(exc))

    async def reject(self, delivery: Delivery, *, requeue: bool = True) -> None:
        if delivery._generation != self._generation:
            return
        with contextlib.suppress(Exception):
            await delivery._message.reject(requeue=requeue)
        if isinstance(delivery._message.delivery_tag, int):
            self._outstanding.discard(delivery._message.delivery_tag)

    async def stop_consuming(self) -> None:
        """Stop taking new deliveries (graceful shutdown). Those already received are still
        handed over in batches: await :meth:`settled`. Dropped unacknowledged, they would
        go back to the queue when the channel closes, and in RabbitMQ 3.10 each such return
        counts towards the delivery limit — a node restarted a few times would dead-letter
        messages it never looked at."""
        self._consuming_stopped = True
        waiter, self._claim_waiter = self._claim_waiter, None
        if waiter is not None and waiter is not asyncio.current_task():
            # Awaited: cancelled half-way through its basic.consume, it would leave a
            # consumer this method does not know of.
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiter
        if self._inbox is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._inbox.cancel(self._consumer_tag, timeout=SHUTDOWN_STEP_TIMEOUT)
        self._consumer_tag = None

    async def settled(self) -> None:
        """Return once every delivery received so far has been handed over and its batch
        handler has returned."""
        await self._pending.join()

    # -- observation -----------------------------------------------------------------

    async def queue_depth(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, by passive declare."""
        if self._connection is None or not self.connected:
            raise TransportUnavailable("not connected to a broker")
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def inbox_depth(self) -> tuple[int, int]:
        return await self.queue_depth(inbox_queue(self.participant))

    async def dead_letter_depth(self) -> int:
        return (await self.queue_depth(dead_letter_queue(self.participant)))[0]
