"""A Participant's desk: its authority's staff, issuing and confirming at one node.

A :class:`Desk` runs next to a node (in the simulation's process, or in a node process,
:mod:`node.simworker`): it issues its planned certificates on time and confirms each
arriving shipment after its planned delay, as :func:`node.trade.plan_trade` drew it. The
plan travels to a node process as a JSON file (:func:`write_desk_plan`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from node.machine import Record, Refusal, Side, State
from node.service import Arrival, Node, now_ms
from node.trade import Shipment, received_as
from node.wait import wait_set
from protocol import (
    Certificate,
    validate_certificate,
)

log = structlog.get_logger("kpx.simulate")



@dataclass(frozen=True, slots=True)
class PlannedArrival:
    """How an importer will answer a certificate: after a delay, maybe with a discrepancy."""

    confirm_delay_ms: int
    discrepancy: str | None


@dataclass
class Answered:
    """When an exporter's node committed a certificate's receipt and its import
    confirmation (its commit, not the evidence's stamp: that is the instant the node began
    the batch, before the batch's other messages and the fsync were done), and its issue:
    a batch of issues shares one stamp, its start, so the last batch's own work is in its
    commit only."""

    receipt_at: int | None = None
    confirmation_at: int | None = None
    issued_at: int | None = None


@dataclass(frozen=True, slots=True)
class RefusedCommand:
    """A desk's command its node refused: the loop it was for cannot close as planned, and
    nothing in the plan will move it on (the desk does not try again)."""

    #: "issue" (the exporter's node refused it) or "confirm" (the importer's)
    command: str
    number: str
    #: the Participant whose node refused it
    by: str
    #: the node's refusal: its reason code and text
    why: str

    def __str__(self) -> str:
        return f"{self.command} {self.number}: {self.why}"

    def to_json(self) -> dict[str, str]:
        return {"command": self.command, "number": self.number, "by": self.by,
                "why": self.why}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RefusedCommand:
        return cls(command=str(data["command"]), number=str(data["number"]),
                   by=str(data["by"]), why=str(data["why"]))


@dataclass
class DeskStats:
    issued: int = 0
    confirmed: int = 0
    refused: list[RefusedCommand] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"issued": self.issued, "confirmed": self.confirmed,
                "refused": [str(r) for r in self.refused[:20]],
                "refused_count": len(self.refused)}


class Desk:
    """One authority's staff at its node: issues its planned certificates on time and
    confirms each arriving certificate after its planned delay.

    It finds arrivals by reading the node's store for import records it has not seen yet,
    which also covers a desk on a store that another process commits to (``scripts/soak.py``
    runs nodes apart from their desks). When the node runs in this process it says when it
    committed (:attr:`Node.on_records`), and the desk looks at once; otherwise it looks every
    ``POLL_SECONDS``. Polling every 20 ms instead cost 7 % of a 2-core machine for ten idle
    nodes.
    """

    POLL_SECONDS = 1.0
    #: commands committed together, as a back office submitting its queue would
    BATCH = 200

    def __init__(self, node: Node, exports: Sequence[tuple[int, Certificate]],
                 arrivals: Mapping[str, PlannedArrival]) -> None:
        self.node = node
        self.exports = sorted(exports, key=lambda e: e[0])
        self.arrivals = arrivals
        self.stats = DeskStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_rowid = 0
        self._wake = asyncio.Event()
        #: why a desk task ended before it was stopped (a bug, a store fault), else None:
        #: the run would otherwise wait its whole timeout for loops nobody works on
        self.failure: str | None = None
        #: called once when that happens (the node process then ends, so the run sees it)
        self.on_failure: Callable[[str], None] | None = None
        #: called for each command the node refused, as it happens: the simulation stops
        #: waiting for that loop (a node process tells its parent through this)
        self.on_refused: Callable[[RefusedCommand], None] | None = None
        #: per certificate this desk issued: when its node committed the receipt and the
        #: import confirmation (ms; see :attr:`Answered`), heard through ``on_records``
        self.answered: dict[str, Answered] = {}
        node.on_records = self._noticed

    def start(self, start_at_ms: int) -> None:
        self._tasks = [asyncio.create_task(self._issue(start_at_ms), name="desk-issue"),
                       asyncio.create_task(self._confirm(), name="desk-confirm")]
        for task in self._tasks:
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None or self.failure is not None:
            return
        exc = task.exception()
        self.failure = f"{task.get_name()} failed: {type(exc).__name__}: {exc}"
        log.error("desk failed", task=task.get_name(), exc_info=exc)
        if self.on_failure is not None:
            self.on_failure(self.failure)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # a task that failed raises it again here; it is reported as self.failure
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _issue(self, start_at_ms: int) -> None:
        pending = deque(self.exports)
        while pending:
            wait = (start_at_ms + pending[0][0] - now_ms()) / 1000
            if wait > 0:
                await asyncio.sleep(wait)
            now = now_ms()
            batch: list[Certificate] = []
            while pending and start_at_ms + pending[0][0] <= now and len(batch) < self.BATCH:
                batch.append(pending.popleft()[1])
            self.stats.issued += self._tally("issue", [c.number for c in batch],
                                             self.node.issue_many(batch))
            await asyncio.sleep(0)  # let the relay and the consumer run in between

    def _noticed(self, records: Sequence[Record]) -> None:
        at = self.node.committed_at or now_ms()
        for r in records:
            if r.side is Side.IMPORT and r.state is State.RECEIVED:
                self._wake.set()
            elif r.side is Side.EXPORT and r.state is State.ISSUED:
                issued = self.answered.setdefault(r.number, Answered())
                if issued.issued_at is None:
                    issued.issued_at = at
            elif r.side is Side.EXPORT and r.state in (State.DELIVERED, State.CONFIRMED):
                answered = self.answered.setdefault(r.number, Answered())
                if answered.receipt_at is None:  # a confirmation says it arrived, too
                    answered.receipt_at = at
                if r.state is State.CONFIRMED and answered.confirmation_at is None:
                    answered.confirmation_at = at

    def _new_arrivals(self) -> list[str]:
        """Import records committed since the last look. Read-only SQL on the node's own
        connection, between its transactions (same thread): cheaper than loading records."""
        rows = self.node.store.db.execute(
            "SELECT rowid, number, state FROM certificates WHERE rowid > ? AND side = ?",
            (self._last_rowid, str(Side.IMPORT))).fetchall()
        if rows:
            self._last_rowid = max(int(r[0]) for r in rows)
        return [str(r[1]) for r in rows if r[2] == str(State.RECEIVED)]

    async def _confirm(self) -> None:
        due: list[tuple[int, str]] = []
        while True:
            self._wake.clear()
            now = now_ms()
            for number in self._new_arrivals():
                planned = self.arrivals.get(number, PlannedArrival(0, None))
                heapq.heappush(due, (now + planned.confirm_delay_ms, number))
            while due and due[0][0] <= now:
                batch: list[str] = []
                while due and due[0][0] <= now and len(batch) < self.BATCH:
                    batch.append(heapq.heappop(due)[1])
                self._confirm_batch(batch)
                await asyncio.sleep(0)
            if self._wake.is_set():
                continue  # more arrived while confirming
            wait = self.POLL_SECONDS
            if due:
                wait = min(wait, max(0.0, (due[0][0] - now_ms()) / 1000))
            await wait_set(self._wake, wait)

    def _confirm_batch(self, numbers: Sequence[str]) -> None:
        arrivals = []
        for number in numbers:
            record = self.node.store.get(Side.IMPORT, number)
            if record is None or record.state is not State.RECEIVED:
                continue  # cancelled or replaced meanwhile: nothing to confirm
            planned = self.arrivals.get(number, PlannedArrival(0, None))
            lines, parcels = received_as(record.certificate, planned.discrepancy)
            arrivals.append(Arrival(number, lines=lines, parcels=parcels))
        self.stats.confirmed += self._tally("confirm", [a.number for a in arrivals],
                                            self.node.confirm_many(arrivals))

    def _tally(self, command: str, numbers: Sequence[str],
               outcomes: Sequence[Record | Refusal]) -> int:
        """Note the refused commands of a batch; returns how many went through."""
        done = 0
        for number, outcome in zip(numbers, outcomes, strict=True):
            if isinstance(outcome, Refusal):
                refused = RefusedCommand(command, number, self.node.me, str(outcome))
                self.stats.refused.append(refused)
                log.warning(f"{command} refused", number=number, refusal=str(outcome))
                if self.on_refused is not None:
                    self.on_refused(refused)
            else:
                done += 1
        return done


def desk_plan(code: str, shipments: Sequence[Shipment]
              ) -> tuple[list[tuple[int, Certificate]], dict[str, PlannedArrival]]:
    exports = [(s.at_ms, s.certificate) for s in shipments if s.exporter == code]
    arrivals = {s.number: PlannedArrival(s.confirm_delay_ms, s.discrepancy)
                for s in shipments if s.importer == code}
    return exports, arrivals


PLAN_FILE = "simulation-plan.json"
ANSWERED_FILE = "simulation-answered.json"


def write_desk_plan(directory: Path, code: str, shipments: Sequence[Shipment]) -> Path:
    """The plan of one desk, for a node in its own process (:mod:`node.simworker`)."""
    exports, arrivals = desk_plan(code, shipments)
    path = directory / PLAN_FILE
    path.write_text(json.dumps({
        "exports": [[at, c.to_wire()] for at, c in exports],
        "arrivals": {n: [a.confirm_delay_ms, a.discrepancy] for n, a in arrivals.items()},
    }))
    return path


def read_desk_plan(directory: Path
                   ) -> tuple[list[tuple[int, Certificate]], dict[str, PlannedArrival]]:
    data = json.loads((directory / PLAN_FILE).read_text())
    exports = [(int(at), validate_certificate(wire)) for at, wire in data["exports"]]
    arrivals = {str(n): PlannedArrival(int(d), None if k is None else str(k))
                for n, (d, k) in data["arrivals"].items()}
    return exports, arrivals


def write_answered(directory: Path, answered: Mapping[str, Answered]) -> Path:
    """What a desk in a node process heard (:attr:`Desk.answered`), for the simulation to
    read after the process ended: a file, since the JSON lines on stdout have a length
    limit a large run's would pass. An in-process run leaves one beside each store too, so
    that a kept network gives the report's latency again in either mode."""
    path = directory / ANSWERED_FILE
    path.write_text(json.dumps({n: [a.receipt_at, a.confirmation_at, a.issued_at]
                                for n, a in answered.items()}))
    return path


def read_answered(directory: Path) -> dict[str, Answered]:
    """:func:`write_answered`'s file; empty when there is none (a process that died). A
    network kept before issues were timed has two instants a certificate, not three."""
    try:
        data = json.loads((directory / ANSWERED_FILE).read_text())
    except (OSError, ValueError):
        return {}

    def instant(times: Sequence[int | None], i: int) -> int | None:
        at = times[i] if i < len(times) else None
        return None if at is None else int(at)
    return {str(n): Answered(receipt_at=instant(t, 0), confirmation_at=instant(t, 1),
                             issued_at=instant(t, 2))
            for n, t in data.items()}
