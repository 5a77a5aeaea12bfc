"""What the HTTP API and the web console share: the node, its tokens, where status and
statistics come from, how a call is recorded as evidence, and how a refusal maps to HTTP."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from node.evidence import OPERATOR, operator_record
from node.machine import Refusal
from node.service import Node, now_ms
from node.stats import Quarter, quarterly_report
from node.status import gather_status, not_ready
from node.store import read_apart
from node.tokens import Principal, Tokens
from protocol import Reason, new_message_id

StatusProvider = Callable[[], Awaitable[Mapping[str, Any]]]
StatisticsProvider = Callable[[Quarter], Mapping[str, Any]]
DeadLetterDepth = Callable[[], Awaitable[int | None]]
ClockAgrees = Callable[[], bool]
#: the running node's own checks, as /readyz answers them
Readiness = Callable[[], Mapping[str, bool]]

#: why the API and the console sign nothing while the running node distrusts its clock
CLOCK_DISAGREES = ("the node's wall clock has jumped ahead of the time it measured since it "
                   "started (see /readyz, clock_agrees); nothing is issued, confirmed or "
                   "cancelled until the clock is set right or the node takes the jump for a "
                   "correction")


def _clock_trusted() -> bool:
    return True

log = structlog.get_logger("kpx.web")


@dataclass(slots=True)
class AnonymousBudget:
    """How many calls without a working token are chained into the evidence log: at most
    ``per_window`` in each ``window_seconds``. The others are counted, and the next call
    recorded says how many were left out before it.

    Authenticated calls are always recorded: a token names who is accountable. Anyone who
    can reach the port can make anonymous calls, and without a bound could grow a permanent,
    hash-chained log (and fill the disk) at will."""

    per_window: int = 60
    window_seconds: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    _window_start: float = -math.inf
    _recorded: int = 0
    _left_out: int = 0

    def admit(self) -> int | None:
        """None when this call is to be left out (it is counted); otherwise record it,
        with the number of calls left out since the last one recorded."""
        now = self.clock()
        if now - self._window_start >= self.window_seconds:
            self._window_start, self._recorded = now, 0
        if self._recorded >= self.per_window:
            if self._left_out == 0:
                log.warning("anonymous calls beyond the evidence log's budget are counted, "
                            "not recorded, until the window ends",
                            per_window=self.per_window, window_seconds=self.window_seconds)
            self._left_out += 1
            return None
        self._recorded += 1
        left_out, self._left_out = self._left_out, 0
        return left_out


@dataclass(slots=True)
class WebContext:
    node: Node
    tokens: Tokens
    #: the node's status document (``GET /api/v1/status``); default ``kpnode status``'s
    status: StatusProvider | None = None
    #: a quarter's figures; default ``kpnode stats``'s report
    statistics: StatisticsProvider | None = None
    #: messages waiting in the broker's dead-letter queue, or None when unknown
    dead_letter_depth: DeadLetterDepth | None = None
    #: False while the running node holds deliveries because its wall clock jumped
    #: ahead (node.clockwatch): a certificate signed then would carry that time
    clock_agrees: ClockAgrees = _clock_trusted
    #: the running node's /readyz checks; None where nothing runs (tests, tools)
    readiness: Readiness | None = None
    #: bounds the evidence entries of calls made without a working token
    anonymous: AnonymousBudget = field(default_factory=AnonymousBudget)
    extra: dict[str, Any] = field(default_factory=dict)

    async def status_document(self) -> Mapping[str, Any]:
        if self.status is not None:
            return await self.status()
        return await gather_status(self.node, served=True)

    def not_ready(self) -> list[str]:
        """What keeps the running node from exchanging, in words (empty when ready)."""
        return not_ready(self.readiness() if self.readiness is not None else {})

    async def figures(self, quarter: Quarter) -> Mapping[str, Any]:
        if self.statistics is not None:
            return self.statistics(quarter)
        # A hub's quarter is thousands of certificates, each parsed: about half a second
        # at 5,000, during which the event loop took no delivery and answered no probe.
        me = self.node.me
        return await read_apart(self.node.store.path, lambda store: quarterly_report(
            me, store.records(issued_between=(quarter.first_day, quarter.last_day)),
            quarter))

    def record_call(self, principal: Principal | None, method: str, path: str, status: int,
                    *, certificate: str | None = None, idempotency_key: str | None = None,
                    via: str = "api") -> None:
        """Chain the call into the evidence log as an operator entry: who (the token's name,
        or ``anonymous`` when it had none that worked), what, with which outcome. Anonymous
        calls only within :class:`AnonymousBudget`; an entry that follows calls left out
        carries their number as ``left_out``. An entry that cannot be written is logged,
        never raised: it must not change the answer."""
        extra: dict[str, int] = {}
        if principal is None:
            left_out = self.anonymous.admit()
            if left_out is None:
                return
            if left_out:
                extra["left_out"] = left_out
            path = bounded_path(path)
        at = now_ms()
        entry = operator_record(f"{via}.call", principal.name if principal else ANONYMOUS, at,
                                role=str(principal.role) if principal else None,
                                method=method, path=path, status=status,
                                certificate=certificate, idempotency_key=idempotency_key,
                                **extra)
        store = self.node.store
        try:
            with store.transaction():
                store.append_evidence(OPERATOR, entry, new_message_id(), None, at)
        except Exception as exc:
            # The answer stands: the action, if any, has happened (a 500 or 503 would say
            # otherwise), and a refusal keeps its own reason. The node's log keeps what the
            # evidence log could not.
            log.error("call not recorded in the evidence log", error=str(exc), via=via,
                      principal=principal.name if principal else ANONYMOUS, method=method,
                      path=path, status=status)


ANONYMOUS = "anonymous"
#: the longest path an anonymous call writes into the evidence log as it was sent
ANONYMOUS_PATH_CHARS = 200


def bounded_path(path: str) -> str:
    """``path`` as sent, or its start and a SHA-256 of the whole when it is long.

    The anonymous budget bounds how many entries strangers add to a log kept for years;
    this bounds their size, which the request line (up to 8 KiB) would otherwise set."""
    if len(path) <= ANONYMOUS_PATH_CHARS:
        return path
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{path[:ANONYMOUS_PATH_CHARS]}… ({len(path)} characters, sha256 {digest})"
WEB_CONTEXT = web.AppKey("kpx_web_context", WebContext)

#: refusals a client can fix by changing the request itself
_VALIDATION_PREFIXES = ("field.", "body.")


def refusal_status(refusal: Refusal) -> int:
    """The HTTP status of a refused command: 404 no such certificate, 409 the state machine
    refused it in the certificate's current state, 400 the request's content is invalid,
    422 valid but not allowed under the Scheme's rules (a suspended partner, an embargo),
    503 this node has no key that may sign now (nothing done; the same request succeeds
    once the operator has a valid key, so it is no refusal of the request itself)."""
    if refusal.reason == Reason.CERTIFICATE_UNKNOWN:
        return 404
    if refusal.reason.startswith("key."):
        return 503
    if refusal.reason in (Reason.CERTIFICATE_WRONG_STATE, Reason.CERTIFICATE_DUPLICATE_NUMBER):
        return 409
    if refusal.reason.startswith(_VALIDATION_PREFIXES):
        return 400
    return 422


def refusal_problems(refusal: Refusal) -> list[dict[str, str]]:
    if refusal.problems:
        return [p.to_wire() for p in refusal.problems]
    return [{"path": "", "reason": refusal.reason, "message": refusal.text}]


def quarter_of(day: dt.date) -> Quarter:
    return Quarter(day.year, (day.month - 1) // 3 + 1)
