"""The node's dead-letter queue (``kpx.dead.CODE``): browse it, replay or discard a message.

Nothing is lost while browsing. Messages are taken with ``basic.get`` without
acknowledgement and held on one channel; closing the channel hands back every message
not explicitly acknowledged, in place. Only two acts remove a message, and each is
written to the evidence log first (an operator record, see :mod:`node.evidence`; a
replay whose publish fails gets a second one, ``dead_letter.replay_failed``):

* **replay**: the frame is published again to this node's own inbox (publisher
  confirms, mandatory), so it is parsed, verified and decided like any other message;
  only once the broker confirmed it is the dead letter acknowledged. A message the node
  had already decided (a refused certificate, say) gets its original answer again (one it
  refused comes back here with its first reason) — a
  duplicate is never processed twice; one refused before it could be read (unknown key,
  bad signature, a bug that crashed processing) is decided afresh, e.g. after a registry
  update or a fix;
* **discard**: acknowledged away, with the operator's reason; the evidence record keeps
  the frame verbatim, so even a discarded message can be read years later.

Quorum queues count every hand-back as a delivery attempt (``x-delivery-count``). The
dead-letter queue has no delivery limit (see :func:`node.transport.declare_topology`), so
browsing only raises that count; a policy that set a limit on ``kpx.dead.*`` would make
browsing lossy, and the operator runbook forbids one.

A dead letter's id is the first 16 hex digits of the SHA-256 of its bytes: stable across
browsing, the same at every look, and a prefix of at least 6 digits is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import PublishError

from node.brokerclient import connect_any
from node.config import NodeConfig
from node.evidence import OPERATOR, operator_record
from node.machine import Refusal, admit
from node.service import Node, certificate_of, now_ms
from node.transport import (
    CONTENT_TYPE,
    EXCHANGE,
    PUBLISH_TIMEOUT,
    TransportUnavailable,
    dead_letter_queue,
    inbox_queue,
)
from protocol import ProtocolError, decode_body, new_message_id, parse_frame

log = structlog.get_logger("kpx.deadletters")

#: how many dead letters one look holds at most (the count from the broker is exact)
BROWSE_LIMIT = 10_000
MIN_ID_PREFIX = 6
#: how long ``find`` waits for letters another command holds while it reads the queue
FIND_PATIENCE_SECONDS = 5.0


class DeadLetterError(Exception):
    """An operator's dead-letter request that cannot be done (unknown id ...)."""


def dead_letter_id(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What a dead letter says about itself: the node's reason, or the broker's."""

    id: str
    reason: str
    text: str
    #: authentic sender when the node could tell (it signs rejections to them), else None
    sender: str | None
    message_id: str | None
    #: milliseconds since the epoch, when known
    dead_lettered_at: int | None
    size: int
    #: what the frame claims, decoded without trusting it (``None`` if it does not parse)
    claimed: dict[str, Any] | None

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "text": self.text, "sender": self.sender,
                "message_id": self.message_id, "dead_lettered_at": self.dead_lettered_at,
                "size": self.size, "claimed": self.claimed}


def describe(body: bytes, headers: Mapping[str, Any], message_id: str | None = None,
             timestamp: datetime | None = None, *, published_by: str | None = None,
             own_user: str | None = None) -> DeadLetter:
    """A dead letter from its bytes and AMQP headers. Pure.

    The node's own dead letters carry ``x-kpx-reason``/``x-kpx-text`` (and the
    ``x-kpx-sender``/``x-kpx-message-id`` it established); those the broker moved here
    after the delivery limit carry ``x-death``: the node failed on them every time.

    Every Participant's broker user may publish to the dead-letter exchange, so those
    headers are only the node's own when ``published_by`` (the AMQP user-id, which the
    broker checks) is the node's ``own_user``. Where the node has a broker user of its own
    and another one published the message, the headers are shown as unverified and no
    sender is taken from them."""
    reason = _text(headers.get("x-kpx-reason"))
    text = _text(headers.get("x-kpx-text")) or ""
    sender = _text(headers.get("x-kpx-sender")) or None
    if reason is not None and own_user is not None and published_by != own_user:
        text = (f"[unverified: these headers were set by {published_by or 'an unnamed user'}, "
                f"not by this node] {text}")
        sender = None
    at = _text(headers.get("x-kpx-dead-at"))
    # ASCII digits only ('²' is a digit to str.isdigit), and an instant a date can hold
    at_ms = int(at) if at is not None and at.isascii() and at.isdigit() \
        and len(at) <= 15 else None
    if reason is None:
        deaths = headers.get("x-death")
        death = deaths[0] if isinstance(deaths, list | tuple) and deaths else {}
        why = _text(death.get("reason")) if isinstance(death, Mapping) else None
        reason = f"broker.{why}" if why else "unknown"
        count = headers.get("x-delivery-count")
        text = ("the node failed to process it on every delivery"
                + (f" ({count} attempts)" if isinstance(count, int) else "")
                if why == "delivery_limit" else f"dead-lettered by the broker ({why})")
        when = death.get("time") if isinstance(death, Mapping) else None
        if isinstance(when, datetime):
            at_ms = int(when.replace(tzinfo=when.tzinfo or UTC).timestamp() * 1000)
    if at_ms is None and timestamp is not None:
        at_ms = int(timestamp.replace(tzinfo=timestamp.tzinfo or UTC).timestamp() * 1000)
    return DeadLetter(
        id=dead_letter_id(body), reason=reason, text=text,
        sender=sender,
        message_id=_text(headers.get("x-kpx-message-id")) or message_id,
        dead_lettered_at=at_ms, size=len(body), claimed=claimed(body))


#: the AMQP user-id a message reached the inbox with, kept when it is dead-lettered and
#: replayed (the node publishes both under its own user-id)
USER_ID_HEADER = "x-kpx-user-id"
REPLAYED_HEADER = "x-kpx-replayed"


def publisher_of(user_id: str | None, headers: Mapping[str, Any],
                 own_user: str | None) -> str | None:
    """The broker user that published a message the node finds in its inbox or
    dead-letter queue. Pure.

    Dead-lettering and replay are published under the node's own user-id, which only the
    node's credentials can do (the broker checks it); their ``x-kpx-user-id`` header then
    names the original publisher. So a replayed message meets ``check_broker_user``
    exactly as it first did: an authentic partner's is admitted, a borrowed login's is
    refused again. A message the broker itself dead-lettered keeps its publisher's id."""
    if own_user is None or user_id != own_user:
        return user_id
    if REPLAYED_HEADER not in headers and USER_ID_HEADER not in headers:
        return user_id
    return _text(headers.get(USER_ID_HEADER)) or None


def claimed(body: bytes) -> dict[str, Any] | None:
    """The envelope's routing fields as the frame states them, not verified."""
    try:
        frame = parse_frame(body)
        envelope = decode_body(frame.body)
    except ProtocolError:
        return None
    return {"kind": str(envelope.kind), "sender": envelope.sender,
            "recipient": envelope.recipient, "message_id": envelope.message_id,
            "in_reply_to": envelope.in_reply_to, "created_at": envelope.created_at,
            "certificate": certificate_of(envelope), "key_id": frame.key_id.hex()}


def verdict_now(node: Node, body: bytes) -> str:
    """What the node's checks say of the frame today (signature, key, registry, address):
    'admissible' or the refusal — what a replay would meet first."""
    outcome = admit(node.context(), body)
    if isinstance(outcome, Refusal):
        return f"refused: {outcome.reason}: {outcome.text}"
    return "admissible (signature verifies, addressed to this node)"


@dataclass(slots=True)
class Held:
    letter: DeadLetter
    message: AbstractIncomingMessage


class DeadLetterQueue:
    """``async with DeadLetterQueue(config) as q``: one look at the queue; every message
    not replayed or discarded goes back when the block ends."""

    def __init__(self, config: NodeConfig, *, limit: int = BROWSE_LIMIT) -> None:
        self.config = config
        self.limit = limit
        self.queue_name = dead_letter_queue(config.participant)
        self.depth = 0
        self.url = ""
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._held: list[Held] = []
        self._drained = False

    async def __aenter__(self) -> DeadLetterQueue:
        self._connection, self.url = await connect_any(self.config.broker_urls)
        try:
            self._channel = await self._connection.channel(publisher_confirms=True,
                                                           on_return_raises=True)
            try:
                queue = await self._channel.declare_queue(self.queue_name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                raise TransportUnavailable(f"no queue {self.queue_name} on the broker: has "
                                           "this node ever run against it?") from None
            self.depth = int(queue.declaration_result.message_count or 0)
            self._queue = queue
        except BaseException:
            await self._connection.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # Closing the channel returns every message taken and not acknowledged.
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _take_one(self) -> Held | None:
        if self._drained or len(self._held) >= self.limit:
            return None
        message = await self._queue.get(no_ack=False, fail=False, timeout=PUBLISH_TIMEOUT)
        if message is None:
            self._drained = True
            return None
        held = Held(describe(message.body, dict(message.headers or {}), message.message_id,
                             message.timestamp, published_by=message.user_id,
                             own_user=self.config.broker_user), message)
        self._held.append(held)
        return held

    async def letters(self) -> list[DeadLetter]:
        """Every dead letter (up to the limit), oldest first."""
        while await self._take_one() is not None:
            pass
        return [h.letter for h in self._held]

    async def find(self, wanted: str) -> Held:
        wanted = wanted.strip().lower()
        if len(wanted) < MIN_ID_PREFIX:
            raise DeadLetterError(f"give at least {MIN_ID_PREFIX} digits of the dead letter's "
                                  "id (see 'kpnode dead-letters list')")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIND_PATIENCE_SECONDS
        while True:
            await self.letters()  # all of them: a prefix must be unique
            matches = {h.letter.id: h for h in self._held if h.letter.id.startswith(wanted)}
            if matches or len(self._held) >= self.limit or loop.time() > deadline:
                break
            # Another command reading the queue (kpnode status, dead-letters list) holds
            # its letters until it ends; they come back then.
            self._drained = False
            await asyncio.sleep(0.25)
        if not matches:
            raise DeadLetterError(f"no dead letter {wanted} in {self.queue_name}")
        if len(matches) > 1:
            raise DeadLetterError(f"{wanted} matches {len(matches)} dead letters: give more "
                                  "digits")
        return next(h for h in self._held if h.letter.id in matches)

    async def replay(self, node: Node, held: Held, reason: str) -> int:
        """Record the replay, publish the frame to this node's inbox, then remove the dead
        letter. Returns the evidence entry's sequence number. Recorded first, so that no
        replay goes unrecorded whatever stops the command; a publish that fails is then
        recorded too (``dead_letter.replay_failed``), and the dead letter stays."""
        assert self._channel is not None
        if not reason.strip():
            raise DeadLetterError("a replay needs a --reason")
        seq = record_action(node, "dead_letter.replay", held, reason)
        exchange = await self._channel.get_exchange(EXCHANGE, ensure=False)
        message = aio_pika.Message(
            held.message.body, content_type=CONTENT_TYPE, message_id=held.letter.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=self.config.broker_user,
            headers={REPLAYED_HEADER: held.letter.id,
                     USER_ID_HEADER: publisher_of(held.message.user_id,
                                                  dict(held.message.headers or {}),
                                                  self.config.broker_user) or ""})
        try:
            await exchange.publish(message, routing_key=self.config.participant,
                                   mandatory=True, timeout=PUBLISH_TIMEOUT)
        except PublishError:
            self._record_failure(node, held, seq, "no inbox on the broker")
            raise DeadLetterError(f"{inbox_queue(self.config.participant)} does not exist on "
                                  "the broker; start the node once, then replay") from None
        except BaseException as exc:
            self._record_failure(node, held, seq,
                                 f"not confirmed by the broker (it may have taken it): "
                                 f"{type(exc).__name__}: {exc}"[:1000])
            raise
        copies = await self._remove_copies(held)
        log.info("dead letter replayed", dead_letter=held.letter.id,
                 message_id=held.letter.message_id, reason=held.letter.reason, evidence=seq,
                 copies=copies)
        return seq

    async def _remove_copies(self, held: Held) -> int:
        """Acknowledge ``held`` and every other copy of its bytes this look holds (the
        same id): a replay stopped between the broker's confirm and the acknowledgement
        (Ctrl-C, kill -9, the broker gone) left the dead letter in place beside the copy
        the node dead-letters again, and a replay or discard of that id then took one of
        the two, saying it was done while the other stayed listed. Only copies one and
        the same broker user published: a replay is judged by that user. Returns how
        many."""
        def publisher(h: Held) -> str | None:
            return publisher_of(h.message.user_id, dict(h.message.headers or {}),
                                self.config.broker_user)
        copies = [h for h in self._held if h is held or (
            h.letter.id == held.letter.id and publisher(h) == publisher(held))]
        for copy in copies:
            await copy.message.ack()
            self._held.remove(copy)
        return len(copies)

    @staticmethod
    def _record_failure(node: Node, held: Held, replay_seq: int, why: str) -> None:
        """Follow a replay entry with its failure; should that write fail too, say so
        (the replay's own error is the one the operator needs, and it is raised)."""
        try:
            record_action(node, "dead_letter.replay_failed", held, why)
        except Exception as exc:
            log.error("a failed replay could not be recorded as failed; the evidence log "
                      "shows its replay entry only", dead_letter=held.letter.id,
                      evidence=replay_seq, why=why, error=f"{type(exc).__name__}: {exc}")

    async def discard(self, node: Node, held: Held, reason: str) -> int:
        if not reason.strip():
            raise DeadLetterError("a discard needs a --reason")
        seq = record_action(node, "dead_letter.discard", held, reason)
        copies = await self._remove_copies(held)
        log.info("dead letter discarded", dead_letter=held.letter.id,
                 message_id=held.letter.message_id, reason=reason, evidence=seq,
                 copies=copies)
        return seq


def operator_name() -> str:
    """Who acts: ``KPX_OPERATOR`` if set (a shared service account), else the login."""
    try:
        return os.environ.get("KPX_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def record_action(node: Node, action: str, held: Held, reason: str) -> int:
    """Write the operator's act to the evidence log (committed before the broker sees it);
    returns the entry's sequence number."""
    letter = held.letter
    now = now_ms()
    record = operator_record(
        action, operator_name(), now, reason=reason, dead_letter=letter.id,
        dead_letter_reason=letter.reason, dead_letter_text=letter.text,
        message_id=letter.message_id, sender=letter.sender, frame=held.message.body)
    with node.store.transaction():
        return node.store.append_evidence(OPERATOR, record, new_message_id(), None, now)
