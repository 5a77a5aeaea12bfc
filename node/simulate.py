"""``kpnode simulate``: a network of Participants trading rough diamonds on one broker.

The simulation provisions a Chair, N nodes and a signed registry (:func:`node.network.
create_network`), starts every node — by default each in its own OS process
(:mod:`node.simworker`), or all in this process with ``--in-process`` — and lets each
Participant's *desk* (its authority's staff, here a coroutine next to the node) issue its
planned certificates on time and confirm each arriving shipment after a random delay, a
configurable share of them with a discrepancy (a parcel short, carats or value off).

The trade has the shape of the Kimberley Process' (design brief §1): a few trading hubs
(the EU, the UAE, India, Israel ...) and producers (Botswana, Russia, South Africa ...)
carry most of it, many small partners a little; a year's world volume is on the order of
60,000 certificates averaging about 2,800 carats and US$ 500,000 each. ``--certificates``
draws that many from the same distribution, issued at ``--rate`` per second.

At the end it reads every node's own records and evidence log and checks the invariants:
every certificate's loop is closed as planned (the plan confirms every one, so a loop
rejected, cancelled or still open when the wait ends is a failure), both sides hold equal
records and the same signed frames, the discrepancies are the planned ones on both sides,
and the mirror statistics of every pair of partners agree. It prints a report (``--json``
for machines) and exits 1 when an invariant fails.

Latency (issue → receipt, issue → confirmation) is timed from each certificate's planned
instant — the run's start instant plus the certificate's planned offset — to when the
exporter's node recorded the answer, so the time a certificate waited for its desk to wake
and for the node's other work (most in bursts) counts. The start instant is chosen here,
sent to every desk (``{"start_at_ms": T}`` to a node process) and given to the analysis;
nodes stamp their evidence with the same wall clock (:func:`node.service.now_ms`) on the
same machine. A certificate its desk issued before its planned instant is timed from its
issue, so no latency is negative. ``planned → issue`` is the desk's lag alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import structlog

from node.interrupt import sigterm_as_interrupt
from node.machine import OPEN_STATES, Discrepancy, Record, Refusal, Side, State, discrepancies
from node.network import LocalNetwork, create_network
from node.service import Arrival, Node, now_ms
from node.stats import mirror_statistics
from node.store import Store
from node.wait import wait_set
from protocol import (
    Certificate,
    ImportConfirmation,
    Kind,
    Line,
    Party,
    ProtocolError,
    decode_body,
    parse_frame,
    validate_certificate,
)
from protocol.schema import PARTICIPANT_CODE

log = structlog.get_logger("kpx.simulate")

# -- the Participants and the shape of their trade ---------------------------------------

HUB, PRODUCER, PARTNER = "hub", "producer", "partner"


@dataclass(frozen=True, slots=True)
class Participant:
    code: str
    name: str
    role: str
    #: relative weight as exporter and as importer; a pair trades in proportion to the
    #: exporter's export weight times the importer's import weight
    exports: float
    imports: float


#: Sixty Participants of the Scheme, the hubs and large producers first, so ``--participants
#: 10`` already has the shape: a few hubs and producers that carry most certificates.
#: Weights are rough shares of certificates, not official statistics.
PARTICIPANTS: tuple[Participant, ...] = tuple(Participant(*p) for p in (
    ("EU", "European Union", HUB, 22.0, 20.0),
    ("AE", "United Arab Emirates", HUB, 18.0, 18.0),
    ("IN", "India", HUB, 10.0, 16.0),
    ("BW", "Botswana", PRODUCER, 8.0, 3.0),
    ("IL", "Israel", HUB, 6.0, 6.0),
    ("RU", "Russian Federation", PRODUCER, 6.0, 1.0),
    ("ZA", "South Africa", PRODUCER, 5.0, 3.0),
    ("CN", "China", HUB, 3.0, 6.0),
    ("US", "United States", HUB, 3.0, 6.0),
    ("AO", "Angola", PRODUCER, 3.0, 0.3),
    ("CA", "Canada", PRODUCER, 3.0, 0.5),
    ("NA", "Namibia", PRODUCER, 2.0, 0.5),
    ("CD", "DR Congo", PRODUCER, 3.0, 0.2),
    ("CH", "Switzerland", HUB, 2.0, 2.0),
    ("SG", "Singapore", PARTNER, 1.0, 1.5),
    ("TH", "Thailand", PARTNER, 0.6, 1.2),
    ("ZW", "Zimbabwe", PRODUCER, 1.5, 0.2),
    ("AU", "Australia", PRODUCER, 1.0, 0.5),
    ("SL", "Sierra Leone", PRODUCER, 1.0, 0.2),
    ("LS", "Lesotho", PRODUCER, 1.0, 0.1),
    ("GB", "United Kingdom", PARTNER, 1.0, 1.5),
    ("JP", "Japan", PARTNER, 0.2, 1.5),
    ("TR", "Turkey", PARTNER, 0.4, 1.0),
    ("LB", "Lebanon", PARTNER, 0.5, 0.5),
    ("TZ", "Tanzania", PRODUCER, 0.6, 0.1),
    ("GN", "Guinea", PRODUCER, 0.5, 0.1),
    ("LR", "Liberia", PRODUCER, 0.4, 0.1),
    ("GH", "Ghana", PRODUCER, 0.4, 0.1),
    ("CI", "Côte d'Ivoire", PRODUCER, 0.3, 0.1),
    ("GY", "Guyana", PRODUCER, 0.3, 0.1),
    ("BR", "Brazil", PRODUCER, 0.3, 0.2),
    ("CF", "Central African Republic", PRODUCER, 0.2, 0.05),
    ("CG", "Republic of the Congo", PRODUCER, 0.2, 0.05),
    ("CM", "Cameroon", PRODUCER, 0.2, 0.05),
    ("TG", "Togo", PRODUCER, 0.1, 0.05),
    ("ML", "Mali", PARTNER, 0.1, 0.05),
    ("BF", "Burkina Faso", PARTNER, 0.1, 0.05),
    ("MZ", "Mozambique", PRODUCER, 0.2, 0.05),
    ("KR", "Republic of Korea", PARTNER, 0.1, 0.5),
    ("TW", "Chinese Taipei", PARTNER, 0.2, 0.5),
    ("LK", "Sri Lanka", PARTNER, 0.3, 0.5),
    ("AM", "Armenia", PARTNER, 0.3, 0.5),
    ("BY", "Belarus", PARTNER, 0.2, 0.3),
    ("UA", "Ukraine", PARTNER, 0.1, 0.2),
    ("MU", "Mauritius", PARTNER, 0.3, 0.3),
    ("PA", "Panama", PARTNER, 0.2, 0.2),
    ("MX", "Mexico", PARTNER, 0.1, 0.3),
    ("NO", "Norway", PARTNER, 0.05, 0.1),
    ("NZ", "New Zealand", PARTNER, 0.05, 0.1),
    ("VN", "Viet Nam", PARTNER, 0.2, 0.4),
    ("MY", "Malaysia", PARTNER, 0.1, 0.3),
    ("ID", "Indonesia", PARTNER, 0.1, 0.2),
    ("KH", "Cambodia", PARTNER, 0.05, 0.1),
    ("LA", "Lao PDR", PARTNER, 0.05, 0.1),
    ("BD", "Bangladesh", PARTNER, 0.05, 0.1),
    ("KZ", "Kazakhstan", PARTNER, 0.1, 0.1),
    ("KG", "Kyrgyzstan", PARTNER, 0.05, 0.05),
    ("VE", "Venezuela", PRODUCER, 0.1, 0.05),
    ("QA", "Qatar", PARTNER, 0.1, 0.3),
    ("BH", "Bahrain", PARTNER, 0.05, 0.2),
))
BY_CODE = {p.code: p for p in PARTICIPANTS}
MAX_PARTICIPANTS = len(PARTICIPANTS)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Bounds on a simulation's size and pace: beyond them the plan alone would take hours to
# build or days to run, which is a typo rather than a wish. A million certificates is
# some sixteen years of the world's trade.
MAX_CERTIFICATES = 1_000_000
MAX_PLAN_SECONDS = 7 * 86_400
MAX_CONFIRM_DELAY = 3_600
PRODUCERS = tuple(p.code for p in PARTICIPANTS if p.role == PRODUCER)

#: KP world figures the generator is calibrated on (design brief §1)
WORLD_CERTIFICATES_PER_YEAR = 60_000
MEAN_CARATS = 2_800
MEAN_USD = 500_000
CARATS_SIGMA = 1.5  # lognormal spread of a shipment's carats: many small, a few huge lots
PRICE_SIGMA = 1.0  # lognormal spread of US$ per carat: industrial boart to gem rough
DISCREPANCY_KINDS: tuple[str, ...] = ("parcels", "carats", "value")
DISCREPANCY_WEIGHTS: tuple[float, ...] = (0.4, 0.4, 0.2)


def participant(code: str) -> Participant:
    """The catalogue entry, or a small partner for a code the catalogue does not know."""
    return BY_CODE.get(code) or Participant(code, code, PARTNER, 0.5, 0.5)


@dataclass(frozen=True, slots=True)
class Shipment:
    """One planned certificate: when it is issued, and how its importer will answer."""

    certificate: Certificate
    #: issued this many ms after the simulation's start
    at_ms: int
    #: the importer confirms this many ms after the certificate arrived
    confirm_delay_ms: int
    #: None: arrives as declared; else "parcels", "carats" or "value" differ
    discrepancy: str | None

    @property
    def number(self) -> str:
        return self.certificate.number

    @property
    def exporter(self) -> str:
        return self.certificate.issuer

    @property
    def importer(self) -> str:
        return self.certificate.destination


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def _lines(rng: random.Random, role: str, carats: int, cents: int) -> tuple[Line, ...]:
    single = 0.4 if role == PRODUCER else 0.75
    if carats < 2 or cents < 2 or rng.random() < single:
        hs = "7102.10" if role == PRODUCER else "7102.31"
        return (Line(hs_code=hs, carats_hundredths=carats, usd_cents=cents),)
    gem_carats = min(carats - 1, max(1, round(carats * rng.uniform(0.4, 0.9))))
    gem_cents = min(cents - 1, max(1, round(cents * rng.uniform(0.85, 0.97))))
    return (Line(hs_code="7102.31", carats_hundredths=gem_carats, usd_cents=gem_cents),
            Line(hs_code="7102.21", carats_hundredths=carats - gem_carats,
                 usd_cents=cents - gem_cents))


def plan_trade(codes: Sequence[str], count: int, *, rate: float = 0.0,
               confirm_delay: float = 1.0, discrepancy_share: float = 0.05, seed: int = 1,
               today: date | None = None) -> list[Shipment]:
    """``count`` certificates among ``codes``, in issue order.

    A pair trades in proportion to the exporter's export weight times the importer's
    import weight; carats and US$ per carat are lognormal around the world averages
    (2,800 ct, US$ 500,000 per certificate); issue times are a Poisson process of
    ``rate`` per second (0: all at once); confirmation delays are exponential with mean
    ``confirm_delay`` seconds (capped at five times that)."""
    if len(set(codes)) != len(codes) or len(codes) < 2:
        raise ValueError("a simulation needs at least two distinct Participants")
    rng = random.Random(seed)
    today = today or date.today()
    members = [participant(c) for c in codes]
    pairs = [(e, i) for e in members for i in members if e is not i]
    cumulative: list[float] = []
    total = 0.0
    for e, i in pairs:
        total += e.exports * i.imports
        cumulative.append(total)
    chosen = rng.choices(pairs, cum_weights=cumulative, k=count)
    mean_price = MEAN_USD / MEAN_CARATS
    sequence: Counter[str] = Counter()
    at = 0.0
    shipments = []
    for exporter, importer in chosen:
        sequence[exporter.code] += 1
        number = f"{exporter.code}-{today.year}-{sequence[exporter.code]:06d}"
        ct = min(_lognormal(rng, MEAN_CARATS, CARATS_SIGMA), 5_000_000.0)
        carats = max(1, round(ct * 100))
        cents = max(1, round(ct * _lognormal(rng, mean_price, PRICE_SIGMA) * 100))
        if exporter.role == PRODUCER:
            origins: tuple[str, ...] = (exporter.code,)
        elif rng.random() < 0.5:
            origins = ("MIXED",)
        else:
            origins = tuple(sorted(set(rng.choices(PRODUCERS, k=rng.randint(1, 3)))))
        firm = rng.randint(1, 12)
        certificate = Certificate(
            number=number, issuer=exporter.code, issuing_authority=f"{exporter.code}-KPA",
            destination=importer.code, origins=origins,
            exporter=Party(name=f"{exporter.name} Rough Exports {firm}",
                           address=f"{firm} Diamond Road, {exporter.name}"),
            importer=Party(name=f"{importer.name} Diamond House {firm % 5 + 1}",
                           address=f"Bourse {firm % 5 + 1}, {importer.name}"),
            lines=_lines(rng, exporter.role, carats, cents),
            parcels=1 + min(int(rng.expovariate(1 / 3)), 49),
            issued_on=today, expires_on=today + timedelta(days=90),
        )
        delay = 0.0
        if confirm_delay > 0:
            delay = min(rng.expovariate(1 / confirm_delay), 5 * confirm_delay)
        discrepancy = None
        if rng.random() < discrepancy_share:
            discrepancy = rng.choices(DISCREPANCY_KINDS, weights=DISCREPANCY_WEIGHTS)[0]
        shipments.append(Shipment(certificate, round(at * 1000), round(delay * 1000),
                                  discrepancy))
        if rate > 0:
            at += rng.expovariate(rate)
    return shipments


def received_as(shipment_certificate: Certificate, discrepancy: str | None
                ) -> tuple[tuple[Line, ...] | None, int | None]:
    """What the importer confirms: ``(lines, parcels)``, ``None`` meaning as declared."""
    c = shipment_certificate
    if discrepancy == "parcels":
        return None, c.parcels - 1 if c.parcels > 1 else c.parcels + 1
    if discrepancy in ("carats", "value"):
        first = c.lines[0]
        if discrepancy == "carats":  # a stone short (or, for a tiny lot, one more)
            declared = first.carats_hundredths
            got = declared - max(1, declared // 100) if declared > 1 else declared + 1
            changed = dataclasses.replace(first, carats_hundredths=got)
        else:  # valued differently on arrival
            changed = dataclasses.replace(first, usd_cents=first.usd_cents + max(
                1, first.usd_cents // 20))
        return (changed, *c.lines[1:]), None
    return None, None


# -- a Participant's desk: issuing and confirming at one node ---------------------------


@dataclass(frozen=True, slots=True)
class PlannedArrival:
    """How an importer will answer a certificate: after a delay, maybe with a discrepancy."""

    confirm_delay_ms: int
    discrepancy: str | None


@dataclass
class DeskStats:
    issued: int = 0
    confirmed: int = 0
    refused: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"issued": self.issued, "confirmed": self.confirmed,
                "refused": self.refused[:20], "refused_count": len(self.refused)}


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
        if any(r.side is Side.IMPORT and r.state is State.RECEIVED for r in records):
            self._wake.set()

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
                self.stats.refused.append(f"{command} {number}: {outcome}")
                log.warning(f"{command} refused", number=number, refusal=str(outcome))
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


# -- running the nodes ----------------------------------------------------------------


class SimulationError(Exception):
    """The simulation could not run (a node did not start, a worker died ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    participants: int = 10
    certificates: int = 1_000
    #: explicit Participant codes (overrides ``participants``); tests use codes of their own
    codes: tuple[str, ...] | None = None
    in_process: bool = False
    #: certificates per second over the whole network; 0 issues all at once
    rate: float = 200.0
    #: mean seconds between a certificate's arrival and its import confirmation
    confirm_delay: float = 1.0
    discrepancy_share: float = 0.05
    seed: int = 1
    #: give up waiting for open loops after this many seconds (default: from the plan)
    timeout: float | None = None
    progress: bool = True
    #: node log level (per-process nodes log to DIR/CODE/node.log)
    log_level: str = "WARNING"
    #: keep the network's directories here (default: a temporary directory)
    directory: Path | None = None

    def chosen_codes(self) -> tuple[str, ...]:
        if self.codes is not None:
            bad = [c for c in self.codes if not PARTICIPANT_CODE.fullmatch(c)]
            if bad:
                raise ValueError(f"--codes: {', '.join(map(repr, bad))} is not a two-letter "
                                 "Participant code")
            repeated = sorted({c for c in self.codes if self.codes.count(c) > 1})
            if repeated:
                raise ValueError(f"--codes: {', '.join(repeated)} given more than once")
            if not 2 <= len(self.codes) <= MAX_PARTICIPANTS:
                raise ValueError(f"--codes must name between 2 and {MAX_PARTICIPANTS} "
                                 "Participants")
            return tuple(self.codes)
        if not 2 <= self.participants <= MAX_PARTICIPANTS:
            raise ValueError(f"--participants must be between 2 and {MAX_PARTICIPANTS}")
        return tuple(p.code for p in PARTICIPANTS[:self.participants])


class Nodes:
    """The running nodes of a simulation, in one process or one process each."""

    def __init__(self, network: LocalNetwork, shipments: Sequence[Shipment],
                 options: Options) -> None:
        self.network = network
        self.shipments = shipments
        self.options = options
        self.stores: dict[str, Store] = {}
        self.peak_rss_kib: dict[str, int] = {}
        #: CPU seconds (user + system) each node process used, from its own report
        self.cpu_seconds: dict[str, float] = {}
        self.desk_stats: dict[str, dict[str, Any]] = {}
        self.process_peak_rss_kib: int | None = None

    async def start(self) -> None:
        raise NotImplementedError

    def begin(self, start_at_ms: int) -> None:
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raise SimulationError when a node died."""
        failed = [f"{code}: {desk.failure}" for code, desk in
                  getattr(self, "desks", {}).items() if desk.failure is not None]
        if failed:
            raise SimulationError(f"a desk stopped working: {'; '.join(failed)}")

    async def stop(self) -> None:
        raise NotImplementedError


class InProcessNodes(Nodes):
    """Every node a :class:`~node.runner.RunningNode` in this process's event loop."""

    async def start(self) -> None:
        from node.runner import RunningNode

        self.running: dict[str, RunningNode] = {}
        self.desks: dict[str, Desk] = {}
        for code, config in self.network.configs.items():
            running = RunningNode(config)
            try:
                await running.start()
            except Exception as exc:  # as one line, like a node process that exits
                raise SimulationError(f"node {code} did not start: "
                                      f"{exc or type(exc).__name__}") from exc
            self.running[code] = running
            assert running.node is not None
            self.stores[code] = running.node.store
            self.desks[code] = Desk(running.node, *desk_plan(code, self.shipments))

    def begin(self, start_at_ms: int) -> None:
        for desk in self.desks.values():
            desk.start(start_at_ms)

    async def stop(self) -> None:
        for desk in getattr(self, "desks", {}).values():
            await desk.stop()
        for code, running in getattr(self, "running", {}).items():
            await running.stop()
            self.desk_stats[code] = self.desks[code].stats.to_json() if code in self.desks \
                else {}
        self.process_peak_rss_kib = peak_rss_kib(os.getpid())  # one process, every node
        self.stores = {}


class ProcessNodes(Nodes):
    """Every node in its own OS process (:mod:`node.simworker`), each with its desk."""

    START_TIMEOUT = 120.0
    STOP_TIMEOUT = 60.0

    async def start(self) -> None:
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "KPX_LOG_LEVEL": self.options.log_level,
               "KPX_LOG_FORMAT": "json",
               "PYTHONPATH": os.pathsep.join(filter(None, [root,
                                                          os.environ.get("PYTHONPATH")]))}
        for code, config in self.network.configs.items():
            write_desk_plan(config.directory, code, self.shipments)
            with (config.directory / "node.log").open("ab") as logfile:
                self.procs[code] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "node.simworker", "--dir", str(config.directory),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=logfile, env=env)
        try:
            async with asyncio.timeout(self.START_TIMEOUT):
                for code in self.procs:
                    reply = await self._read(code)
                    if reply.get("event") != "ready":
                        raise SimulationError(f"node {code} did not start: {reply}")
        except TimeoutError:
            raise SimulationError("nodes did not start within "
                                  f"{self.START_TIMEOUT:.0f} s") from None
        for code, config in self.network.configs.items():
            self.stores[code] = Store(config.database_path)

    async def _read(self, code: str) -> dict[str, Any]:
        proc = self.procs[code]
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            await proc.wait()
            raise SimulationError(f"node {code} exited ({proc.returncode}): "
                                  + self._log_tail(code))
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _send(self, code: str, message: dict[str, Any]) -> None:
        stdin = self.procs[code].stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write((json.dumps(message) + "\n").encode())

    def begin(self, start_at_ms: int) -> None:
        for code in self.procs:
            self._send(code, {"start_at_ms": start_at_ms})

    @staticmethod
    def _ended(returncode: int) -> str:
        if returncode < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-returncode).name}"
        if returncode == 0:  # it stops cleanly only when told to: by a signal, then
            return "exit status 0: stopped by a signal from outside"
        return f"exit status {returncode}"

    def _log_tail(self, code: str, lines: int = 5) -> str:
        """Why a node's process ended, from its log (deleted with the network): its last
        error, else the log's last lines."""
        log_path = self.network.configs[code].directory / "node.log"
        try:
            written = log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in written if '"level": "error"' in line]
        return errors[-1] if errors else (" | ".join(written[-lines:]) or "(nothing logged)")

    def check_alive(self) -> None:
        dead = [f"{code} ({self._ended(p.returncode)}): {self._log_tail(code)}"
                for code, p in self.procs.items() if p.returncode is not None]
        if dead:
            raise SimulationError(f"node process(es) exited early: {'; '.join(dead)}")

    async def stop(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores = {}
        procs = getattr(self, "procs", {})
        for code, proc in procs.items():
            if proc.returncode is None:
                peak = peak_rss_kib(proc.pid)
                if peak is not None:
                    self.peak_rss_kib[code] = peak
            self._send(code, {"stop": True})
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()

        async def finish(code: str, proc: asyncio.subprocess.Process) -> None:
            try:
                async with asyncio.timeout(self.STOP_TIMEOUT):
                    while True:
                        reply = await self._read(code)
                        if reply.get("event") == "done":
                            self.desk_stats[code] = reply.get("desk", {})
                            self.peak_rss_kib.setdefault(code, int(reply.get("peak_rss_kib")
                                                                   or 0))
                            if reply.get("cpu_seconds") is not None:
                                self.cpu_seconds[code] = float(reply["cpu_seconds"])
                            break
                    await proc.wait()
            except (TimeoutError, SimulationError):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

        await asyncio.gather(*(finish(c, p) for c, p in procs.items()))
        failed = {c: p.returncode for c, p in procs.items() if p.returncode != 0}
        if failed:
            log.warning("node processes did not exit cleanly", returncodes=failed)
            self.unclean = failed


def cpu_seconds() -> float:
    """CPU time this process has used so far, user plus system, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_kib(pid: int) -> int | None:
    """A process's peak resident set size (VmHWM), in KiB; None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# -- progress -------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    WIDTH = 30

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._last_line = 0.0
        self._last_text = ""

    def update(self, issued: int, receipted: int, closed: int, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        if not self.tty and not final and elapsed - self._last_line < 5.0:
            return
        self._last_line = elapsed
        done = closed / self.total if self.total else 1.0
        bar = "#" * int(done * self.WIDTH)
        text = (f"[{bar:<{self.WIDTH}}] {closed:,}/{self.total:,} loops closed  "
                f"issued {issued:,}  receipts {receipted:,}  {elapsed:5.1f} s")
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
        elif text != self._last_text:
            sys.stderr.write(text + "\n")
        self._last_text = text
        sys.stderr.flush()


# -- the report -----------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    return {"count": len(values), "p50": percentile(values, 50),
            "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": max(values) if values else None}


@dataclass
class Report:
    codes: tuple[str, ...]
    mode: str
    options: dict[str, Any]
    planned: int = 0
    issued: int = 0
    closed: int = 0
    rejected: int = 0
    open: int = 0
    discrepancies: int = 0
    carats_hundredths: int = 0
    usd_cents: int = 0
    #: the instant the desks started the plan from (wall clock, ms); None: not known
    start_at_ms: int | None = None
    #: per loop, from the certificate's planned instant (its issue if the desk issued
    #: early, or without ``start_at_ms``) to the exporter's recording of the receipt, of
    #: the import confirmation, and to the issue itself (the desk's lag)
    receipt_ms: list[int] = field(default_factory=list)
    confirmation_ms: list[int] = field(default_factory=list)
    issue_lag_ms: list[int] = field(default_factory=list)
    #: first issue to last confirmation, from the nodes' own timestamps
    span_ms: int = 0
    #: first issue to last issue
    issue_span_ms: int = 0
    wall_seconds: float = 0.0
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    partner_pairs: int = 0
    #: in-process mode: the one process's peak RSS, every node included
    process_peak_rss_mib: float | None = None
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0

    @property
    def ok(self) -> bool:
        return self.failure_count == 0

    def fail(self, text: str, *, cause: bool = False) -> None:
        """Record a failure; the first 50 are listed. ``cause``: one that explains the
        others (a node process that died), listed first, whatever came before it."""
        self.failure_count += 1
        if cause:
            self.failures.insert(0, text)
            del self.failures[50:]
        elif len(self.failures) < 50:
            self.failures.append(text)

    @property
    def latency_origin(self) -> str:
        """What the latencies are timed from, for the report."""
        if self.start_at_ms is None:
            return "issue"
        return "planned issue instant"

    @property
    def loops_per_second(self) -> float:
        return self.closed / (self.span_ms / 1000) if self.span_ms > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        span = self.span_ms / 1000
        return {
            "participants": list(self.codes), "mode": self.mode, "options": self.options,
            "certificates": {"planned": self.planned, "issued": self.issued,
                             "loops_closed": self.closed, "rejected": self.rejected,
                             "open": self.open, "with_discrepancies": self.discrepancies},
            "share_of_world_year": self.planned / WORLD_CERTIFICATES_PER_YEAR,
            "volume": {"carats": self.carats_hundredths / 100, "usd": self.usd_cents / 100,
                       "mean_carats": (self.carats_hundredths / 100 / self.issued
                                       if self.issued else None),
                       "mean_usd": self.usd_cents / 100 / self.issued if self.issued else None},
            "latency_ms": {"measured_from": self.latency_origin,
                           "issue_to_receipt": latency_summary(self.receipt_ms),
                           "issue_to_confirmation": latency_summary(self.confirmation_ms),
                           "planned_to_issue": latency_summary(self.issue_lag_ms)},
            "throughput": {"seconds": span, "wall_seconds": self.wall_seconds,
                           "loops_per_second": self.loops_per_second,
                           # the pace the desks issued at, first to last issue (the plan
                           # asks for --rate; desks on a busy machine lag a little)
                           "issued_per_second": (self.issued / (self.issue_span_ms / 1000)
                                                 if self.issue_span_ms > 0 else None),
                           "messages_per_second": 3 * self.closed / span if span else 0.0},
            "nodes": self.nodes, "process_peak_rss_mib": self.process_peak_rss_mib,
            "invariants": {"ok": self.ok, "partner_pairs_compared": self.partner_pairs,
                           "failure_count": self.failure_count, "failures": self.failures},
        }


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def format_report(report: Report) -> str:
    data = report.to_json()
    c, v, t = data["certificates"], data["volume"], data["throughput"]
    lines = [
        f"kpx simulation: {len(report.codes)} Participants ({report.mode}), "
        f"{report.planned:,} certificates "
        f"({data['share_of_world_year']:.1%} of a year's world volume)",
        "",
        f"  certificates issued   {c['issued']:>10,}",
        f"  loops closed          {c['loops_closed']:>10,}",
        f"  rejected              {c['rejected']:>10,}",
        f"  still open            {c['open']:>10,}",
        f"  with discrepancies    {c['with_discrepancies']:>10,}",
        f"  carats                {v['carats']:>16,.2f}   (mean "
        f"{v['mean_carats'] or 0:,.0f} per certificate)",
        f"  US$                   {v['usd']:>16,.2f}   (mean {v['mean_usd'] or 0:,.0f})",
        "",
        "  latency                    p50        p95        p99        max",
    ]
    rows = [("issue → receipt", "issue_to_receipt"),
            ("issue → confirmation", "issue_to_confirmation")]
    if report.issue_lag_ms:
        rows.append(("planned → issue", "planned_to_issue"))
    for name, key in rows:
        s = data["latency_ms"][key]
        lines.append(f"  {name:<22}" + "".join(f"{_ms(s[p]):>11}"
                                               for p in ("p50", "p95", "p99", "max")))
    lines.append(f"  (timed from each certificate's {report.latency_origin}"
                 + (", or its issue if that came first)" if report.start_at_ms is not None
                    else ")"))
    lines += [
        "",
        f"  throughput            {t['loops_per_second']:,.1f} loops/s, "
        f"{t['messages_per_second']:,.1f} messages/s over {t['seconds']:.1f} s "
        f"(first issue to last confirmation; {t['wall_seconds']:.1f} s wall in all)",
    ]
    if t["issued_per_second"] is not None:
        lines.append(f"  issued                {t['issued_per_second']:,.1f} certificates/s "
                     "(first issue to last)")
    lines += [
        "",
        "  node   exports  imports  peak RSS      CPU",
    ]
    for code, node in report.nodes.items():
        rss, cpu = node.get("peak_rss_mib"), node.get("cpu_seconds")
        lines.append(f"  {code:<5}{node.get('exports', 0):>9,}{node.get('imports', 0):>9,}"
                     f"  {'-' if rss is None else f'{rss:,.1f} MiB':>9}"
                     f"  {'-' if cpu is None else f'{cpu:,.1f} s':>7}")
    if report.process_peak_rss_mib is not None:
        lines.append(f"  (all nodes in one process: peak RSS {report.process_peak_rss_mib:,.1f} "
                     "MiB)")
    lines.append("")
    if report.ok:
        lines.append(f"Invariants hold: every loop closed as planned, both sides' records "
                     f"and signed evidence equal, mirror statistics of "
                     f"{report.partner_pairs} partner pairs agree.")
    else:
        lines.append(f"INVARIANTS FAILED ({report.failure_count}):")
        lines += [f"  - {f}" for f in report.failures]
    return "\n".join(lines)


# -- reading the outcome from the nodes' own stores -------------------------------------


@dataclass
class Evidence:
    """One certificate's signed history at one node."""

    frames: set[bytes] = field(default_factory=set)
    issued_at: int | None = None
    receipt_at: int | None = None
    confirmation_at: int | None = None
    #: what the signed frames say, to hold the node's records against: the certificate,
    #: the digest of the frame that carried it, and the import confirmation
    certificate: Certificate | None = None
    certificate_digest: bytes | None = None
    confirmation: ImportConfirmation | None = None


def evidence_by_certificate(store: Store) -> dict[str, Evidence]:
    found: dict[str, Evidence] = defaultdict(Evidence)
    for entry in store.evidence():
        if entry.certificate is None:
            continue
        evidence = found[entry.certificate]
        evidence.frames.add(entry.frame)
        try:
            frame = parse_frame(entry.frame)
            envelope = decode_body(frame.body)
        except ProtocolError:
            continue
        kind, payload = envelope.kind, envelope.payload
        if isinstance(payload, Certificate):
            evidence.certificate, evidence.certificate_digest = payload, frame.digest
        elif isinstance(payload, ImportConfirmation):
            evidence.confirmation = payload
        if entry.direction == "out" and kind in (Kind.CERTIFICATE, Kind.REPLACEMENT):
            evidence.issued_at = envelope.created_at
        elif entry.direction == "in" and kind is Kind.RECEIPT and evidence.receipt_at is None:
            evidence.receipt_at = entry.recorded_at
        elif entry.direction == "in" and kind is Kind.IMPORT_CONFIRMATION:
            evidence.confirmation_at = entry.recorded_at
    return found


def planned_discrepancies(shipment: Shipment, confirmation: ImportConfirmation
                          ) -> tuple[Discrepancy, ...]:
    """The discrepancies the plan implies: node.machine's, between the planned certificate
    and ``confirmation`` saying what the plan says arrives (:func:`received_as`, as the desk
    confirms it). Only a confirmation's lines and parcels make discrepancies, so the rest
    of ``confirmation`` does not matter."""
    declared = shipment.certificate
    lines, parcels = received_as(declared, shipment.discrepancy)
    arrived = dataclasses.replace(confirmation, lines=declared.lines if lines is None else lines,
                                  parcels=declared.parcels if parcels is None else parcels)
    return discrepancies(declared, arrived)


def _described(found: Sequence[Discrepancy]) -> str:
    return ", ".join(f"{d.field} {d.declared}→{d.received}" for d in found) or "none"


def _check_side(report: Report, code: str, record: Record, signed: Evidence,
                shipment: Shipment) -> None:
    """One side's record of a closed loop against its own signed evidence and the plan:
    records and frames are also compared across the sides, but equal records could both
    have been rewritten, and equal frames say nothing about the records."""
    number = shipment.number
    if (record.certificate, record.certificate_digest) != (signed.certificate,
                                                           signed.certificate_digest):
        report.fail(f"{number}: {code}'s record of the certificate is not the signed one in "
                    "its evidence log")
    if record.confirmation != signed.confirmation:
        report.fail(f"{number}: {code}'s record of the import confirmation is not the signed "
                    "one in its evidence log")
    if record.confirmation is None:
        return  # said just above: the signed confirmation is missing from the record
    planned = planned_discrepancies(shipment, record.confirmation)
    if record.discrepancies != planned:
        report.fail(f"{number}: {code} records discrepancies {_described(record.discrepancies)};"
                    f" the plan ({shipment.discrepancy or 'as declared'}) implies "
                    f"{_described(planned)}")


def _end_state(record: Record | None) -> str:
    """Where one side's loop stands, for a failure: its state and any rejection reason."""
    if record is None:
        return "holds no record"
    why = ": ".join(filter(None, (record.rejection_reason, record.rejection_text)))
    return f"holds it {record.state}" + (f" ({why})" if why else "")


def _timed_from(issued_at: int | None, planned_at: int | None) -> int | None:
    """The instant a loop's latency counts from: when its certificate was due, so that the
    wait for the desk and behind the node's other work counts; its issue if the desk issued
    it early (no latency is negative) or the plan has no start instant."""
    known = [t for t in (issued_at, planned_at) if t is not None]
    return min(known) if known else None


def analyse(report: Report, stores: Mapping[str, Store], shipments: Sequence[Shipment],
            start_at_ms: int | None = None) -> None:
    """Fill ``report`` from the nodes' stores and check the invariants.

    ``start_at_ms`` is the instant the desks were told to start the plan from (on the wall
    clock, :func:`node.service.now_ms`, that the nodes stamp their evidence with): latency
    is then timed from each certificate's planned instant, ``start_at_ms`` plus its
    ``at_ms``. Without it (issues not timed by a plan) it is timed from the issue."""
    report.start_at_ms = start_at_ms
    exports = {code: {r.number: r for r in s.records(side=Side.EXPORT)}
               for code, s in stores.items()}
    imports = {code: {r.number: r for r in s.records(side=Side.IMPORT)}
               for code, s in stores.items()}
    evidence = {code: evidence_by_certificate(s) for code, s in stores.items()}
    report.planned = len(shipments)
    first_issue: int | None = None
    last_issue: int | None = None
    last_close: int | None = None
    for shipment in shipments:
        number, exporter, importer = shipment.number, shipment.exporter, shipment.importer
        ours = exports[exporter].get(number)
        theirs = imports[importer].get(number)
        if ours is None:
            report.fail(f"{number}: never issued by {exporter}")
            continue
        report.issued += 1
        report.carats_hundredths += ours.certificate.carats_hundredths
        report.usd_cents += ours.certificate.usd_cents
        history = evidence[exporter].get(number, Evidence())
        if history.issued_at is not None:
            first_issue = min(first_issue or history.issued_at, history.issued_at)
            last_issue = max(last_issue or history.issued_at, history.issued_at)
            if history.confirmation_at is not None:
                last_close = max(last_close or 0, history.confirmation_at)
        planned_at = None if start_at_ms is None else start_at_ms + shipment.at_ms
        due = _timed_from(history.issued_at, planned_at)
        if due is not None:
            if planned_at is not None and history.issued_at is not None:
                report.issue_lag_ms.append(history.issued_at - due)
            if history.receipt_at is not None:
                report.receipt_ms.append(history.receipt_at - due)
            if history.confirmation_at is not None:
                report.confirmation_ms.append(history.confirmation_at - due)
        if ours.state is not State.CONFIRMED:
            # The plan closes every loop with a confirmation: it plans no rejection,
            # cancellation or replacement, so any other end (or none) is one nobody asked
            # for, however consistent both sides are about it.
            if ours.state is State.REJECTED:
                report.rejected += 1
            elif ours.state in OPEN_STATES:
                report.open += 1
            report.fail(f"{number}: planned to close confirmed, but {exporter} "
                        f"{_end_state(ours)} and {importer} {_end_state(theirs)}")
            continue
        if theirs is None or theirs.state is not State.CONFIRMED:
            report.fail(f"{number}: confirmed at {exporter} but "
                        f"{theirs.state if theirs else 'unknown'} at {importer}")
            continue
        report.closed += 1
        same = (ours.certificate == theirs.certificate
                and ours.certificate_digest == theirs.certificate_digest
                and ours.message_id == theirs.message_id
                and ours.confirmation == theirs.confirmation
                and ours.discrepancies == theirs.discrepancies)
        if not same:
            report.fail(f"{number}: {exporter}'s and {importer}'s records differ")
        frames_here = history.frames
        frames_there = evidence[importer].get(number, Evidence()).frames
        if frames_here != frames_there or len(frames_here) != 3:
            report.fail(f"{number}: signed evidence differs ({len(frames_here)} frames at "
                        f"{exporter}, {len(frames_there)} at {importer})")
        for code, record in ((exporter, ours), (importer, theirs)):
            _check_side(report, code, record, evidence[code].get(number, Evidence()), shipment)
        if ours.discrepancies:
            report.discrepancies += 1
    if first_issue is not None and last_close is not None:
        report.span_ms = last_close - first_issue
    if first_issue is not None and last_issue is not None:
        report.issue_span_ms = last_issue - first_issue
    # Mirror statistics: what X reports exporting to Y is what Y reports importing from X.
    planned_numbers = {s.number for s in shipments}
    for x in stores:
        for y in stores:
            if x == y:
                continue
            sent = [r for r in exports[x].values() if r.partner == y]
            got = [r for r in imports[y].values() if r.partner == x]
            if not sent and not got:
                continue
            report.partner_pairs += 1
            ours_stats = {k[1:]: v for k, v in mirror_statistics(sent).items()}
            theirs_stats = {k[1:]: v for k, v in mirror_statistics(got).items()}
            if ours_stats != theirs_stats:
                report.fail(f"mirror statistics {x}→{y} disagree: {x} says {ours_stats}, "
                            f"{y} says {theirs_stats}")
            unplanned = {r.number for r in sent + got} - planned_numbers
            if unplanned:
                report.fail(f"{x}→{y}: certificates nobody planned: {sorted(unplanned)[:5]}")
    # Nothing doubled: a redelivered or re-sent message is recorded once (inbox dedup).
    for code, store in stores.items():
        logged = Counter((e.direction, e.message_id) for e in store.evidence() if e.message_id)
        doubled = sorted(m for (_, m), n in logged.items() if n > 1)
        if doubled:
            report.fail(f"{code}: {len(doubled)} message(s) recorded more than once in the "
                        f"evidence log, e.g. {doubled[0]}")
    for code in stores:
        report.nodes.setdefault(code, {}).update(
            exports=len(exports[code]), imports=len(imports[code]))


def count_progress(stores: Mapping[str, Store]) -> tuple[int, int, int, int]:
    """(issued, receipted, closed, finished) summed over the exporters' own counts."""
    issued = receipted = closed = finished = 0
    for store in stores.values():
        for (side, state), n in store.counts().items():
            if side != str(Side.EXPORT):
                continue
            issued += n
            if state in (State.DELIVERED, State.CONFIRMED):
                receipted += n
            if state == State.CONFIRMED:
                closed += n
            if state not in {str(s) for s in OPEN_STATES}:
                finished += n
    return issued, receipted, closed, finished


# -- the simulation -----------------------------------------------------------------------


def _elsewhere(other_codes: bool) -> str:
    """Where else to run: the bench, which has no --codes, says so without them."""
    return "on a broker (or vhost) of its own" + (" or with other --codes" if other_codes
                                                 else "")


async def check_broker_free(broker_urls: Sequence[str], codes: Sequence[str], *,
                            other_codes: bool = True) -> None:
    """Say at once (:class:`SimulationError`) that no broker answers, or that the
    Participants' queues there are in use: a simulation would take a real network's
    messages, or mix with an interrupted run's."""
    from node.brokerclient import occupied_queues
    from node.transport import TransportUnavailable, dead_letter_queue, inbox_queue

    try:
        busy = await occupied_queues(broker_urls, [
            name for code in codes for name in (inbox_queue(code), dead_letter_queue(code))])
    except TransportUnavailable as exc:
        raise SimulationError(str(exc)) from None
    if busy:
        raise SimulationError(
            f"queues in use on this broker: {'; '.join(busy)}. A simulation would take their "
            f"messages: run it {_elsewhere(other_codes)}, or, if they are left from an "
            "interrupted run, delete them (rabbitmqctl delete_queue NAME)")


async def _declare_queues(broker_urls: Sequence[str], codes: Sequence[str],
                          created: list[str], *, other_codes: bool = True) -> None:
    """Declare the Participants' queues as their nodes will, adding to ``created`` those
    that did not exist before (as it goes: a refusal or an interrupt half-way must not
    leave the first ones behind). A queue left with other arguments (another tool's, an
    older kpx's) made every node retry for 60 s and then fail with 'no broker answered':
    said at once instead, with the broker's words."""
    from aiormq.exceptions import ChannelPreconditionFailed

    from node.brokerclient import amqp_library_logs_quiet, connect_any, queue_info
    from node.config import DEFAULT_DELIVERY_LIMIT
    from node.transport import (
        TransportUnavailable,
        dead_letter_queue,
        declare_topology,
        inbox_queue,
    )

    try:
        with amqp_library_logs_quiet():
            connection, _ = await connect_any(broker_urls)
    except TransportUnavailable as exc:
        raise SimulationError(str(exc)) from None
    async with connection:
        for code in codes:
            for name in (inbox_queue(code), dead_letter_queue(code)):
                if await queue_info(connection, name) is None:
                    created.append(name)
            channel = await connection.channel()  # a refused declare closes its channel
            try:
                await declare_topology(channel, code, DEFAULT_DELIVERY_LIMIT)
            except ChannelPreconditionFailed as exc:
                raise SimulationError(
                    f"a queue of {code} exists on this broker with other settings than kpx "
                    f"gives it ({exc.args[0] if exc.args else exc}): run the simulation "
                    f"{_elsewhere(other_codes)}, or delete that queue (rabbitmqctl "
                    "delete_queue NAME)") from None
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()


async def _delete_queues(broker_urls: Sequence[str], names: Sequence[str]) -> None:
    """Delete the queues this run created, with whatever an interrupted run left in them
    (the next run would refuse a broker where they hold messages); best effort, briefly.

    In a thread with an event loop of its own: an interrupt that lands while it runs
    cancels every task of the command's loop, this one's too, and the queues stayed.
    ``asyncio.run`` waits for the thread as it closes, so the deletion finishes."""
    from node.brokerclient import amqp_library_logs_quiet, connect_any

    async def delete() -> None:
        with amqp_library_logs_quiet():
            connection, _ = await connect_any(broker_urls)
        async with connection:
            for name in names:
                with contextlib.suppress(Exception):  # each on its own: a failure closes
                    channel = await connection.channel()  # its channel
                    await channel.queue_delete(name)

    def in_a_loop_of_its_own() -> None:
        with contextlib.suppress(Exception):
            asyncio.run(asyncio.wait_for(delete(), 10))

    if names:
        # A future, not a task: the interrupt cancels every task, and this one must be
        # waited for all the same, within the caller's claim on the Participants (another
        # simulation let in meanwhile would have an inbox deleted under it).
        deleting = asyncio.get_running_loop().run_in_executor(None, in_a_loop_of_its_own)
        try:
            await asyncio.shield(deleting)
        except asyncio.CancelledError:
            await asyncio.wait({deleting})
            raise


async def run_simulation(options: Options, broker_urls: Sequence[str], *,
                         claim: bool = True) -> Report:
    """Run one simulation on the broker at ``broker_urls`` and return its report.
    ``claim=False``: the caller holds :func:`claimed` for these Participants over several
    runs (the bench, which deletes their queues between runs, and has no --codes)."""
    codes = options.chosen_codes()
    async with contextlib.AsyncExitStack() as stack:
        if claim:
            await stack.enter_async_context(claimed(broker_urls, codes))
        await check_broker_free(broker_urls, codes, other_codes=claim)
        created: list[str] = []
        try:
            await _declare_queues(broker_urls, codes, created, other_codes=claim)
            return await _simulate(options, codes, broker_urls)
        finally:
            # Kept networks too: an interrupted run's queues hold messages, and the next
            # run would refuse this broker. A kept node started later declares its own.
            await _delete_queues(broker_urls, created)


@contextlib.asynccontextmanager
async def claimed(broker_urls: Sequence[str], codes: Sequence[str], *,
                  other_codes: bool = True, who: str = "kpnode simulate"
                  ) -> AsyncIterator[None]:
    """Two simulations started together on one broker both found the queues free, then
    took each other's messages: each holds an exclusive claim per Participant instead."""
    from node.brokerclient import ClaimTaken, exclusive_claim
    from node.transport import TransportUnavailable

    try:
        async with exclusive_claim(broker_urls,
                                   [f"kpx.simulation.{c}" for c in codes]) as unclaimed:
            if unclaimed:
                print(f"{who}: warning: this broker user may not declare "
                      f"{unclaimed[0]} (ACCESS_REFUSED), so another simulation started on "
                      "this broker meanwhile would not be refused", file=sys.stderr)
            yield
    except ClaimTaken as exc:
        held = ", ".join(name.rsplit(".", 1)[1] for name in exc.args[0])
        raise SimulationError(f"another simulation is running on this broker with "
                              f"{held}: run this one {_elsewhere(other_codes)}, or after "
                              "it") from None
    except TransportUnavailable as exc:
        raise SimulationError(str(exc)) from None


async def _simulate(options: Options, codes: tuple[str, ...],
                    broker_urls: Sequence[str]) -> Report:
    shipments = plan_trade(codes, options.certificates, rate=options.rate,
                           confirm_delay=options.confirm_delay,
                           discrepancy_share=options.discrepancy_share, seed=options.seed)
    report = Report(codes=codes, mode="in-process" if options.in_process else "process",
                    options={"rate": options.rate, "confirm_delay": options.confirm_delay,
                             "discrepancy_share": options.discrepancy_share,
                             "seed": options.seed})
    with contextlib.ExitStack() as stack:
        if options.directory is not None:
            base = options.directory
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kpx-sim-")))
        network = create_network(base, codes, broker_urls)
        nodes: Nodes = (InProcessNodes if options.in_process else ProcessNodes)(
            network, shipments, options)
        started = time.monotonic()
        try:
            await nodes.start()
            start_at = await _run(nodes, shipments, options)
        finally:
            await nodes.stop()
        report.wall_seconds = time.monotonic() - started
        stores = {code: stack.enter_context(contextlib.closing(Store(c.database_path)))
                  for code, c in network.configs.items()}
        analyse(report, stores, shipments, start_at)
        for code in codes:
            node = report.nodes.setdefault(code, {})
            peak = nodes.peak_rss_kib.get(code)
            node["peak_rss_mib"] = None if peak is None else round(peak / 1024, 1)
            cpu = nodes.cpu_seconds.get(code)
            node["cpu_seconds"] = None if cpu is None else round(cpu, 2)
            node["desk"] = nodes.desk_stats.get(code, {})
            for refused in node["desk"].get("refused", []):
                report.fail(f"{code}: {refused}")
        if nodes.process_peak_rss_kib is not None:
            report.process_peak_rss_mib = round(nodes.process_peak_rss_kib / 1024, 1)
        for code, returncode in getattr(nodes, "unclean", {}).items():
            report.fail(f"node process {code} exited with {returncode}", cause=True)
    return report


async def _run(nodes: Nodes, shipments: Sequence[Shipment], options: Options) -> int:
    """Start the desks, wait until every loop is finished (or the timeout); returns the
    instant the desks started the plan from."""
    total = len(shipments)
    last_at = max((s.at_ms for s in shipments), default=0) / 1000
    longest_delay = max((s.confirm_delay_ms for s in shipments), default=0) / 1000
    timeout = options.timeout or (60.0 + 2 * last_at + longest_delay + total / 100)
    # The plan's start instant, on the wall clock every node process of this machine
    # shares: the desks issue from it, and the analysis times latency from it.
    start_at = now_ms() + 200
    nodes.begin(start_at)
    progress = Progress(total, options.progress)
    deadline = time.monotonic() + timeout
    while True:
        await asyncio.sleep(0.25)
        nodes.check_alive()
        issued, receipted, closed, finished = count_progress(nodes.stores)
        progress.update(issued, receipted, closed)
        if finished >= total:
            break
        if time.monotonic() > deadline:
            log.warning("simulation timed out with loops open", open=total - finished,
                        timeout=timeout)
            break
    progress.update(issued, receipted, closed, final=True)
    return start_at


# -- the command line -----------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--participants", type=int,
                   help=f"number of Participants, 2 to {MAX_PARTICIPANTS} (default 10)")
    p.add_argument("--codes", help="comma-separated Participant codes (instead of "
                   "--participants)")
    p.add_argument("--certificates", type=int, default=1_000,
                   help="certificates to issue in all (a year's world volume is ~60,000; "
                   "default 1,000)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="certificates issued per second over the network; 0 issues all at "
                   "once (default 200)")
    p.add_argument("--confirm-delay", type=float, default=1.0, metavar="SECONDS",
                   help="mean delay between a certificate's arrival and its import "
                   "confirmation (exponential; default 1.0)")
    p.add_argument("--discrepancies", type=float, default=0.05, metavar="SHARE",
                   help="share of shipments that arrive with a discrepancy (default 0.05)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the trade (default 1)")
    p.add_argument("--in-process", action="store_true",
                   help="run every node in this process (default: one OS process per node)")
    p.add_argument("--broker", help="AMQP URL (default: $KPX_AMQP_URL, else a throwaway "
                   "local broker)")
    p.add_argument("--keep", help="keep the network's directories (and node logs) here")
    p.add_argument("--timeout", type=float, help="seconds to wait for open loops (default: "
                   "enough for the plan)")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                   help="node log level (default WARNING)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable report")


def check_new_directory(text: str, option: str) -> Path:
    """The directory for a network's keys, stores and logs, made if need be: it must be
    new or empty, since a file there or an earlier run's network would be mixed with the
    new one, and writable (ValueError saying which)."""
    if not text.strip():
        raise ValueError(f"{option} is empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{option} {path} is not empty (an earlier run's network?); "
                         "give a new or empty directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot make it ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: not writable")
    return path


def check_broker_choice(option: str | None) -> None:
    """``--broker``, else ``KPX_AMQP_URL``, must be a usable AMQP URL when given
    (ValueError saying which, password masked); neither given means a throwaway broker."""
    from node.brokerurl import broker_url_problem
    from node.localbroker import ENV_URL

    if option is not None:
        named, url = "--broker", option
    else:
        named, url = ENV_URL, os.environ.get(ENV_URL, "").strip()
        if not url:
            return
    if (problem := broker_url_problem(url)) is not None:
        raise ValueError(f"{named}: {problem}")


def options_from(args: argparse.Namespace) -> Options:
    codes = (None if args.codes is None
             else tuple(c.strip().upper() for c in args.codes.split(",")))
    if codes is not None and args.participants is not None \
            and args.participants != len(codes):
        raise ValueError(f"--participants {args.participants} but --codes names "
                         f"{len(codes)}: give one of them")
    if not 1 <= args.certificates <= MAX_CERTIFICATES:
        raise ValueError(f"--certificates must be between 1 and {MAX_CERTIFICATES:,}")
    if not 0 <= args.discrepancies <= 1:
        raise ValueError("--discrepancies is a share between 0 and 1")
    for option, value in (("--rate", args.rate), ("--confirm-delay", args.confirm_delay)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{option} must be a finite number, 0 or more")
    if args.rate > 0 and args.certificates / args.rate > MAX_PLAN_SECONDS:
        raise ValueError(f"{args.certificates:,} certificates at --rate {args.rate:g} would "
                         f"take over {MAX_PLAN_SECONDS // 86400} days; raise --rate")
    if args.confirm_delay > MAX_CONFIRM_DELAY:
        raise ValueError(f"--confirm-delay is at most {MAX_CONFIRM_DELAY} seconds")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError("--timeout must be a number of seconds above 0")
    keep = None if args.keep is None else check_new_directory(args.keep, "--keep")
    check_broker_choice(args.broker)
    options = Options(participants=10 if args.participants is None else args.participants,
                      certificates=args.certificates,
                      codes=codes, in_process=args.in_process, rate=args.rate,
                      confirm_delay=args.confirm_delay, discrepancy_share=args.discrepancies,
                      seed=args.seed, timeout=args.timeout, progress=not args.no_progress,
                      log_level=args.log_level.upper(),
                      directory=keep)
    options.chosen_codes()  # validates the count
    return options


def cmd_simulate(args: argparse.Namespace) -> None:
    from node.localbroker import BrokerError, broker_url
    from node.terminal import fail

    try:
        options = options_from(args)
    except ValueError as exc:
        print(f"kpnode simulate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        with sigterm_as_interrupt(), _broker(args.broker, broker_url) as url:
            report = asyncio.run(run_simulation(options, [url]))
            # printed before the broker stops: should stopping it fail, the report stands
            print(json.dumps(report.to_json(), indent=2) if args.json
                  else format_report(report), flush=True)
            if options.directory is not None:
                print(f"kpnode simulate: the network (node directories, stores, logs) is "
                      f"kept in {options.directory}", file=sys.stderr)
    except (SimulationError, BrokerError) as exc:
        fail(args, 3, str(exc), prog="kpnode simulate")
    raise SystemExit(0 if report.ok else 1)


@contextlib.contextmanager
def _broker(url: str | None, harness: Callable[[], contextlib.AbstractContextManager[str]]
            ) -> Iterator[str]:
    if url is not None:
        yield url
    else:
        with harness() as found:
            yield found


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    """Add ``kpnode simulate`` to the CLI's subcommands. (``common``'s --dir means a node
    directory, which a whole network has not, so the command takes its own options.)"""
    help_ = "run a network of Participants trading on one broker; report and check it"
    sp = sub.add_parser("simulate", help=help_, description=help_)
    add_arguments(sp)
    sp.set_defaults(handler=cmd_simulate)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m node.simulate``: the same as ``kpnode simulate``."""
    from node.logs import configure_logging

    p = argparse.ArgumentParser(prog="kpnode simulate", description=main.__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    configure_logging(level="WARNING")
    try:
        cmd_simulate(args)
    except KeyboardInterrupt:  # as kpnode's main says it
        print("kpnode simulate: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
