"""The simulation's report, and the invariants read from the nodes' own stores.

:func:`analyse` reads every node's records and evidence log after a run and checks them
against the plan: every loop closed as planned, both sides' records and signed frames
equal, the discrepancies the planned ones on both sides, the mirror statistics of every
pair of partners agreeing. :class:`Report` holds the figures (latency percentiles,
throughput, per-node memory and CPU) and the failures; :func:`format_report` prints it.
"""

from __future__ import annotations

import dataclasses
import math
import resource
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.desk import Answered, RefusedCommand
from node.evidence import unsupported_records
from node.machine import (
    OPEN_STATES,
    Discrepancy,
    Record,
    Side,
    State,
    day_of,
    discrepancies,
)
from node.service import now_ms
from node.stats import mirror_statistics
from node.store import Store
from node.trade import WORLD_CERTIFICATES_PER_YEAR, Shipment, received_as
from protocol import (
    Certificate,
    ImportConfirmation,
    Kind,
    ProtocolError,
    decode_body,
    parse_frame,
)


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
    #: loops whose issue or import confirmation the desk asked for and its node refused
    refused: int = 0
    open: int = 0
    discrepancies: int = 0
    carats_hundredths: int = 0
    usd_cents: int = 0
    #: the instant the desks started the plan from (wall clock, ms); None: not known
    start_at_ms: int | None = None
    #: answers timed at the exporter's commit (its desk heard it), and those timed by the
    #: evidence's stamp instead (the start of the batch that took them in, earlier)
    answers_at_commit: int = 0
    answers_at_stamp: int = 0
    #: per loop, from the certificate's planned instant (its issue if the desk issued
    #: early, or without ``start_at_ms``) to the exporter's commit of the receipt, of the
    #: import confirmation, and to the issue itself (the desk's lag)
    receipt_ms: list[int] = field(default_factory=list)
    confirmation_ms: list[int] = field(default_factory=list)
    issue_lag_ms: list[int] = field(default_factory=list)
    #: first issue to last confirmation, from the nodes' own timestamps
    span_ms: int = 0
    #: first issue (its stamp: the start of its batch) to the end of the last issue (its
    #: commit as the desk heard it, else its stamp): the time the desks took to issue them
    issue_span_ms: int = 0
    #: whether that window ends at the last issue's commit (not known: at its stamp)
    issue_span_to_commit: bool = True
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
    def latency_end(self) -> str:
        """What the latencies are timed to, for the report."""
        if self.answers_at_stamp == 0:
            return "exporter's commit of the answer"
        if self.answers_at_commit == 0:
            return "exporter's evidence stamp of the answer (the start of its batch)"
        return (f"exporter's commit of the answer ({self.answers_at_stamp:,} answers: to "
                "their evidence stamp, the start of their batch)")

    @property
    def all_at_once(self) -> bool:
        """Whether the plan issued everything at once (``--rate 0``): no pace was asked
        for, and the issue window is how fast the desks got through their queue."""
        return self.options.get("rate") == 0

    @property
    def loops_per_second(self) -> float:
        return self.closed / (self.span_ms / 1000) if self.span_ms > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        span = self.span_ms / 1000
        return {
            "participants": list(self.codes), "mode": self.mode, "options": self.options,
            "certificates": {"planned": self.planned, "issued": self.issued,
                             "loops_closed": self.closed, "rejected": self.rejected,
                             "refused": self.refused, "open": self.open,
                             "with_discrepancies": self.discrepancies},
            "share_of_world_year": self.planned / WORLD_CERTIFICATES_PER_YEAR,
            "volume": {"carats": self.carats_hundredths / 100, "usd": self.usd_cents / 100,
                       "mean_carats": (self.carats_hundredths / 100 / self.issued
                                       if self.issued else None),
                       "mean_usd": self.usd_cents / 100 / self.issued if self.issued else None},
            "latency_ms": {"measured_from": self.latency_origin,
                           "measured_to": self.latency_end,
                           "start_at_ms": self.start_at_ms,
                           "issue_to_receipt": latency_summary(self.receipt_ms),
                           "issue_to_confirmation": latency_summary(self.confirmation_ms),
                           "planned_to_issue": latency_summary(self.issue_lag_ms)},
            "throughput": {"seconds": span, "wall_seconds": self.wall_seconds,
                           "loops_per_second": self.loops_per_second,
                           # the pace the desks issued at, first issue to the last one's
                           # commit, to hold against --rate (desks on a busy machine lag a
                           # little). None with --rate 0: everything was due at once, so
                           # it was no pace but how fast a desk signs and writes its queue
                           # (thousands a second, next to a few hundred loops): the issue
                           # window says that. (A batch of up to 200 issues shares one
                           # stamp, its start: the window ends at the last one's commit, or
                           # it would leave the last batch's own work out.)
                           "issued_per_second": (self.issued / (self.issue_span_ms / 1000)
                                                 if self.issue_span_ms > 0
                                                 and not self.all_at_once else None),
                           "issue_seconds": self.issue_span_ms / 1000,
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
        f"  refused by a node     {c['refused']:>10,}",
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
                 + (", or its issue if that came first," if report.start_at_ms is not None
                    else "") + f" to the {report.latency_end})")
    lines += [
        "",
        f"  throughput            {t['loops_per_second']:,.1f} loops/s, "
        f"{t['messages_per_second']:,.1f} messages/s over {t['seconds']:.1f} s "
        f"(first issue to last confirmation; {t['wall_seconds']:.1f} s wall in all)",
    ]
    window = ("first issue to the last one's "
              + ("commit" if report.issue_span_to_commit else "stamp, the start of its batch"))
    if report.all_at_once and report.issued:
        lines.append(f"  issued                all {report.issued:,} at once (--rate 0) in "
                     f"{t['issue_seconds']:.2f} s ({window}; no pace asked for)")
    elif t["issued_per_second"] is not None:
        lines.append(f"  issued                {t['issued_per_second']:,.1f} certificates/s "
                     f"({window})")
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


def _fields_differing(planned: Certificate, issued: Certificate) -> str:
    """The certificate's fields that differ between the plan and the issue, for a failure."""
    return ", ".join(f"{f.name} {getattr(planned, f.name)!r}→{getattr(issued, f.name)!r}"
                     for f in dataclasses.fields(planned)
                     if getattr(planned, f.name) != getattr(issued, f.name))


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


def _answered_at(report: Report, stamped: int | None, committed: int | None) -> int | None:
    """When the exporter had an answer its evidence log holds (``stamped``: None if it
    holds none): its commit where the desk heard it, else the stamp; counted by which."""
    if stamped is None:
        return None
    if committed is None:
        report.answers_at_stamp += 1
        return stamped
    report.answers_at_commit += 1
    return committed


def analyse(report: Report, stores: Mapping[str, Store], shipments: Sequence[Shipment],
            start_at_ms: int | None = None, *,
            answered: Mapping[str, Mapping[str, Answered]] | None = None,
            refused: Mapping[str, RefusedCommand] | None = None) -> None:
    """Fill ``report`` from the nodes' stores and check the invariants.

    ``start_at_ms`` is the instant the desks were told to start the plan from (on the wall
    clock, :func:`node.service.now_ms`, that the nodes stamp their evidence with): latency
    is then timed from each certificate's planned instant, ``start_at_ms`` plus its
    ``at_ms``. Without it (issues not timed by a plan) it is timed from the issue.

    ``answered``: per exporter, when its node committed each certificate's receipt and
    import confirmation (:attr:`node.desk.Desk.answered`); latency is timed to those. And
    its issue: the window the issue pace is taken over ends at the last one's commit.
    Where one is not known, to the evidence's stamp, which is earlier: the instant the
    node began the batch that took the answer in, before the batch's other messages and
    its fsync.

    ``refused``: per certificate number, the desk's command for it that a node refused
    (:attr:`node.desk.DeskStats.refused`). Such a loop fails once, with the node's
    reason, and counts as refused rather than open or never issued."""
    report.start_at_ms = start_at_ms
    refused = refused or {}
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
        refusal = refused.get(number)
        if ours is None:
            if refusal is not None:
                report.refused += 1
                report.fail(f"{number}: {refusal.by} refused to {refusal.command} it: "
                            f"{refusal.why}")
            else:
                report.fail(f"{number}: never issued by {exporter}")
            continue
        report.issued += 1
        if ours.certificate != shipment.certificate:
            # Records, frames and discrepancies are held against each other, and the
            # discrepancies against the plan's, but all of them follow the certificate
            # issued: one other than planned (a desk, a node or the plan's file changing
            # it on the way) agreed with every one of them, and its loop passed as planned.
            report.fail(f"{number}: {exporter} issued it other than planned "
                        f"({_fields_differing(shipment.certificate, ours.certificate)})")
        report.carats_hundredths += ours.certificate.carats_hundredths
        report.usd_cents += ours.certificate.usd_cents
        history = evidence[exporter].get(number, Evidence())
        heard = (answered or {}).get(exporter, {}).get(number, Answered())
        receipt_at = _answered_at(report, history.receipt_at, heard.receipt_at)
        confirmation_at = _answered_at(report, history.confirmation_at,
                                       heard.confirmation_at)
        if history.issued_at is not None:
            first_issue = min(first_issue or history.issued_at, history.issued_at)
            issue_done = history.issued_at if heard.issued_at is None else heard.issued_at
            if last_issue is None or issue_done > last_issue:
                last_issue, report.issue_span_to_commit = (issue_done,
                                                           heard.issued_at is not None)
            if confirmation_at is not None:
                last_close = max(last_close or 0, confirmation_at)
        planned_at = None if start_at_ms is None else start_at_ms + shipment.at_ms
        due = _timed_from(history.issued_at, planned_at)
        if due is not None:
            if planned_at is not None and history.issued_at is not None:
                report.issue_lag_ms.append(history.issued_at - due)
            if receipt_at is not None:
                report.receipt_ms.append(receipt_at - due)
            if confirmation_at is not None:
                report.confirmation_ms.append(confirmation_at - due)
        if ours.state is not State.CONFIRMED:
            # The plan closes every loop with a confirmation: it plans no rejection,
            # cancellation or replacement, so any other end (or none) is one nobody asked
            # for, however consistent both sides are about it.
            if refusal is not None:
                report.refused += 1
            elif ours.state is State.REJECTED:
                report.rejected += 1
            elif ours.state in OPEN_STATES:
                report.open += 1
            report.fail(f"{number}: planned to close confirmed, but "
                        + (f"{refusal.by} refused to {refusal.command} it: {refusal.why}; "
                           if refusal is not None else "")
                        + f"{exporter} {_end_state(ours)} and {importer} {_end_state(theirs)}")
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
    # A refused command the plan did not ask for (a desk confirming an arrival nobody
    # planned) has no loop above to fail with: said on its own.
    planned_numbers = {s.number for s in shipments}
    for number, refusal in sorted(refused.items()):
        if number not in planned_numbers:
            report.fail(f"{refusal.by}: {refusal}")
    if first_issue is not None and last_close is not None:
        report.span_ms = last_close - first_issue
    if first_issue is not None and last_issue is not None:
        report.issue_span_ms = last_issue - first_issue
    # Mirror statistics: what X reports exporting to Y is what Y reports importing from X.
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
        # What `kpnode verify-log` checks of the records: each backed by the log and
        # saying what its signed messages say, none missing. The chain and signatures are
        # compared across the two sides above.
        for problem in [*unsupported_records(store.records(), store.evidence(),
                                             today=day_of(now_ms())),
                        *store.column_mismatches()][:5]:
            report.fail(f"{code}: verify-log: {problem}")
    for code in stores:
        report.nodes.setdefault(code, {}).update(
            exports=len(exports[code]), imports=len(imports[code]))
