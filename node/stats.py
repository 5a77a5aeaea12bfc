"""Certificate-based trade statistics, and the two checks both ends of a loop make possible.

Pure functions over :class:`~node.machine.Record`. The figures have the shape of the KP
Certification Scheme's quarterly trade data: per flow (exports, imports), per partner and
per HS code, the number of certificates, carats and US$ value.

Choices, so that both Participants of a pair count the very same certificates:

* a certificate counts in the quarter of its **date of issue**, on the exporter's side
  and the importer's side alike;
* it counts unless it was ``rejected``, ``cancelled`` or ``replaced`` (its replacement
  counts instead); open and ``expired`` loops count, since the certificate was issued;
* the figures are the **declared** ones (the certificate's lines); what actually arrived
  is compared in the mirror and valuation checks, not mixed into the totals.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from node.machine import OPEN_STATES, Record, Side, State, discrepancies

#: Records in these states are not trade: the certificate never travelled as issued.
NOT_TRADE = frozenset({State.REJECTED, State.CANCELLED, State.REPLACED})
DEFAULT_VALUATION_THRESHOLD = Decimal("0.10")
CENT = Decimal("0.01")
FLOW = {Side.EXPORT: "exports", Side.IMPORT: "imports"}

_QUARTER = re.compile(r"([0-9]{4})-?Q([1-4])", re.IGNORECASE)  # ASCII digits, as elsewhere


@dataclass(frozen=True, slots=True)
class Quarter:
    year: int
    number: int

    @classmethod
    def parse(cls, text: str) -> Quarter:
        """``2026Q1`` (or ``2026-Q1``); ValueError with a readable message otherwise."""
        found = _QUARTER.fullmatch(text.strip())
        if found is None or not 1 <= int(found[1]) <= 9998:  # dates run from year 1 to 9999
            raise ValueError(f"a quarter looks like 2026Q1 (years 0001 to 9998), not "
                             f"{text!r}")
        return cls(int(found[1]), int(found[2]))

    @property
    def first_day(self) -> date:
        return date(self.year, 3 * self.number - 2, 1)

    @property
    def last_day(self) -> date:
        if self.number == 4:
            return date(self.year, 12, 31)
        return date(self.year, 3 * self.number + 1, 1) - timedelta(days=1)

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and self.first_day <= day <= self.last_day

    def __str__(self) -> str:
        return f"{self.year}Q{self.number}"


def in_quarter(records: Iterable[Record], quarter: Quarter) -> list[Record]:
    """The trade records of a quarter (by date of issue), in a stable order."""
    chosen = [r for r in records
              if r.state not in NOT_TRADE and r.certificate.issued_on in quarter]
    return sorted(chosen, key=lambda r: (r.side, r.partner, r.number))


@dataclass(slots=True)
class Figures:
    certificates: int = 0
    carats_hundredths: int = 0
    usd_cents: int = 0

    def add(self, carats_hundredths: int, usd_cents: int, certificates: int = 1) -> None:
        self.certificates += certificates
        self.carats_hundredths += carats_hundredths
        self.usd_cents += usd_cents

    def json(self) -> dict[str, int]:
        return {"certificates": self.certificates, "carats_hundredths": self.carats_hundredths,
                "usd_cents": self.usd_cents}


#: (flow, partner, HS code); partner and HS code are "ALL" in the total rows
RowKey = tuple[str, str, str]
ALL = "ALL"


def trade_table(records: Iterable[Record]) -> dict[RowKey, Figures]:
    """Per (flow, partner, HS code), with totals per flow and partner (HS "ALL") and per
    flow (partner and HS "ALL"). A certificate with two HS lines counts once in each HS
    row and once in a total: totals are distinct certificates, not sums of rows."""
    table: dict[RowKey, Figures] = defaultdict(Figures)
    for r in records:
        flow = FLOW[r.side]
        for line in r.certificate.lines:
            table[(flow, r.partner, line.hs_code)].add(line.carats_hundredths, line.usd_cents)
        for partner in (r.partner, ALL):
            table[(flow, partner, ALL)].add(r.certificate.carats_hundredths,
                                            r.certificate.usd_cents)
    return dict(sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1] == ALL, kv[0][1],
                                                      kv[0][2] == ALL, kv[0][2])))


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One certificate where the two ends' signed data differ, or where one end has not
    spoken yet (``field`` = ``confirmation``)."""

    flow: str
    partner: str
    number: str
    field: str
    declared: int | None
    received: int | None
    state: str

    def json(self) -> dict[str, object]:
        return {"flow": self.flow, "partner": self.partner, "number": self.number,
                "field": self.field, "declared": self.declared, "received": self.received,
                "state": self.state}


def mirror_check(records: Iterable[Record]) -> tuple[dict[tuple[str, str], dict[str, Figures]],
                                                    list[Disagreement]]:
    """What was declared to or by each partner against what the partner's (or our own)
    signed import confirmation says arrived.

    Returns per (flow, partner) the ``declared`` and ``confirmed`` figures (confirmed:
    only certificates with a confirmation, at the received amounts), and every
    disagreement: each differing field of a confirmed certificate, and each certificate
    that has no confirmation yet."""
    sums: dict[tuple[str, str], dict[str, Figures]] = defaultdict(
        lambda: {"declared": Figures(), "confirmed": Figures()})
    found: list[Disagreement] = []
    for r in records:
        flow = FLOW[r.side]
        pair = sums[(flow, r.partner)]
        pair["declared"].add(r.certificate.carats_hundredths, r.certificate.usd_cents)
        if r.confirmation is None:
            found.append(Disagreement(flow, r.partner, r.number, "confirmation", None, None,
                                      str(r.state)))
            continue
        pair["confirmed"].add(r.confirmation.carats_hundredths, r.confirmation.usd_cents)
        found.extend(Disagreement(flow, r.partner, r.number, d.field, d.declared, d.received,
                                  str(r.state))
                     for d in discrepancies(r.certificate, r.confirmation))
    return dict(sorted(sums.items())), found


@dataclass(frozen=True, slots=True)
class ValuationFlag:
    flow: str
    partner: str
    number: str
    hs_code: str
    #: exact rates; rounded to the cent only for display (rounded first, a line worth
    #: under half a cent per carat made the change a division by zero, and others wrong)
    declared_rate: Decimal
    received_rate: Decimal

    @property
    def declared_usd_per_carat(self) -> Decimal:
        return self.declared_rate.quantize(CENT)

    @property
    def received_usd_per_carat(self) -> Decimal:
        return self.received_rate.quantize(CENT)

    @property
    def change(self) -> Decimal:
        """Relative change of the value per carat, received against declared."""
        return (self.received_rate - self.declared_rate) / self.declared_rate

    def json(self) -> dict[str, object]:
        return {"flow": self.flow, "partner": self.partner, "number": self.number,
                "hs_code": self.hs_code,
                "declared_usd_per_carat": str(self.declared_usd_per_carat),
                "received_usd_per_carat": str(self.received_usd_per_carat),
                "change_percent": str((self.change * 100).quantize(Decimal("0.1")))}


def usd_per_carat(usd_cents: int, carats_hundredths: int) -> Decimal:
    """US$ per carat, exact; cents over hundredths of a carat is already dollars per
    carat."""
    return Decimal(usd_cents) / Decimal(carats_hundredths)


def valuation_check(records: Iterable[Record],
                    threshold: Decimal = DEFAULT_VALUATION_THRESHOLD) -> list[ValuationFlag]:
    """Confirmed certificates whose received value per carat, per HS line, differs from the
    declared one by more than ``threshold`` (0.10 = 10 %) either way. A line that did not
    arrive at all is a mirror disagreement, not a valuation question."""
    flags = []
    for r in records:
        if r.confirmation is None:
            continue
        received = {x.hs_code: x for x in r.confirmation.lines}
        for line in r.certificate.lines:
            got = received.get(line.hs_code)
            if got is None or got.carats_hundredths == 0 or line.carats_hundredths == 0:
                continue
            declared_rate = usd_per_carat(line.usd_cents, line.carats_hundredths)
            received_rate = usd_per_carat(got.usd_cents, got.carats_hundredths)
            if declared_rate and abs(received_rate - declared_rate) / declared_rate > threshold:
                flags.append(ValuationFlag(FLOW[r.side], r.partner, r.number, line.hs_code,
                                           declared_rate, received_rate))
    return flags


def quarterly_report(participant: str, records: Iterable[Record], quarter: Quarter,
                     threshold: Decimal = DEFAULT_VALUATION_THRESHOLD) -> dict[str, object]:
    """Everything ``kpnode stats`` shows, JSON-ready."""
    chosen = in_quarter(records, quarter)
    mirror, disagreements = mirror_check(chosen)
    return {
        "participant": participant,
        "quarter": str(quarter),
        "from": quarter.first_day.isoformat(),
        "to": quarter.last_day.isoformat(),
        "trade": [{"flow": flow, "partner": partner, "hs_code": hs, **figures.json()}
                  for (flow, partner, hs), figures in trade_table(chosen).items()],
        "mirror": [{"flow": flow, "partner": partner,
                    "declared": pair["declared"].json(), "confirmed": pair["confirmed"].json()}
                   for (flow, partner), pair in mirror.items()],
        "disagreements": [d.json() for d in disagreements],
        "valuation_threshold_percent": str(threshold * 100),
        "valuation_flags": [f.json() for f in valuation_check(chosen, threshold)],
    }


def mirror_statistics(records: Sequence[Record]) -> dict[tuple[str, str, str], list[int]]:
    """Per (partner, HS code, state) as one node records them: certificates, declared
    carats and US$, received carats and US$ — what both sides of a pair must agree on
    (the simulation compares an exporter's with its importer's). An open loop's state is
    "open": its exporter holds it issued or delivered, its importer received, and a
    difference of those words alone is no disagreement."""
    stats: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for r in records:
        received = {x.hs_code: x for x in r.confirmation.lines} if r.confirmation else {}
        state = "open" if r.state in OPEN_STATES else str(r.state)
        for line in r.certificate.lines:
            row = stats[(r.partner, line.hs_code, state)]
            got = received.get(line.hs_code)
            row[0] += 1
            row[1] += line.carats_hundredths
            row[2] += line.usd_cents
            row[3] += got.carats_hundredths if got else 0
            row[4] += got.usd_cents if got else 0
    return stats
