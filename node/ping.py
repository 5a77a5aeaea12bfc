"""``kpnode ping PARTNER``: a signed ping through the running node, and its signed pong.

The ping is queued in the node's outbox like any message (so it travels the very path
certificates take: the relay, the broker, the partner's inbox, its verification), and the
running node records the partner's pong in the evidence log once it has verified its
signature. This command only watches the log for it. Times are the node's own clock:
``round_trip_ms`` from the broker's confirm of the ping to the pong's commit, and
``total_ms`` from the ping's commit (including the relay's pick-up).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from node.service import Node, now_ms
from node.status import running_pid
from protocol import Pong, ProtocolError, Reason, Rejection, decode_body, parse_frame


class PingFailed(Exception):
    """No answer, or a refused ping; the message says which and what is known."""


class NodeNotRunning(Exception):
    """The pong comes back to the node's inbox: someone must be consuming it."""


@dataclass(frozen=True, slots=True)
class PingResult:
    partner: str
    ping_message_id: str
    answer: str  # "pong" | "rejection"
    answer_message_id: str
    signed_by_key: str
    total_ms: int
    round_trip_ms: int | None
    rejection: str | None = None

    def json(self) -> dict[str, Any]:
        return {"partner": self.partner, "ping_message_id": self.ping_message_id,
                "answer": self.answer, "answer_message_id": self.answer_message_id,
                "signed_by_key": self.signed_by_key, "total_ms": self.total_ms,
                "round_trip_ms": self.round_trip_ms, "rejection": self.rejection}


async def ping_partner(node: Node, partner: str, timeout: float = 10.0,
                       poll: float = 0.05) -> PingResult:
    partner = partner.strip().upper()
    if partner == node.me:
        raise PingFailed("a node does not ping itself; 'kpnode status' shows its health")
    if node.registry.standing(partner) is Reason.PARTICIPANT_UNKNOWN:
        raise PingFailed(f"{partner} is not a Participant in registry version "
                         f"{node.registry.version}")
    if running_pid(node.config.directory) is None:
        raise NodeNotRunning("the node is not running: the pong comes back to its inbox, so "
                             "start 'kpnode run' first")
    store = node.store
    seen = store.last_evidence_seq()
    nonce = os.urandom(16)
    sealed = node.ping(partner, nonce)
    ping_id = sealed.envelope.message_id
    queued = sealed.envelope.created_at
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for entry in store.evidence_after(seen):
            seen = entry.seq
            if entry.direction != "in":
                continue
            try:
                frame = parse_frame(entry.frame)
                envelope = decode_body(frame.body)
            except ProtocolError:
                continue
            if envelope.in_reply_to != ping_id or envelope.sender != partner:
                continue
            payload = envelope.payload
            if isinstance(payload, Pong) and payload.nonce != nonce:
                continue
            if not isinstance(payload, Pong | Rejection):
                continue
            sent = store.sent_at(ping_id)
            published = sent[0] if sent else None
            return PingResult(
                partner=partner, ping_message_id=ping_id,
                answer="pong" if isinstance(payload, Pong) else "rejection",
                answer_message_id=envelope.message_id, signed_by_key=frame.key_id.hex(),
                total_ms=entry.recorded_at - queued,
                round_trip_ms=None if published is None else entry.recorded_at - published,
                rejection=f"{payload.reason}: {payload.text}"
                if isinstance(payload, Rejection) else None)
        if asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(poll)
    sent = store.sent_at(ping_id)
    if sent is not None and sent[0] is None:
        with store.transaction():
            store.withdraw(ping_id)
        raise PingFailed(f"no pong from {partner} within {timeout:g} s: the ping never left "
                         f"this node ({sent[1] or 'the relay had not sent it'}); it was "
                         "withdrawn from the outbox")
    took = now_ms() - queued
    raise PingFailed(f"no pong from {partner} within {timeout:g} s ({took} ms): the broker "
                     f"took the ping (message {ping_id}); {partner}'s node is down or behind, "
                     "or could not verify it and dead-lettered it unanswered (a key of this "
                     f"node its registry does not list yet: {partner}'s 'kpnode dead-letters "
                     "list' shows it)")
