"""A quarter's certificate-based trade figures, per direction, partner and HS code.

The figures the web console charts and ``GET /api/v1/statistics`` returns until the node's
statistics module is wired in as their provider (see :func:`node.web.mount_web`). Counted by
the certificate's date of issue; certificates cancelled, replaced or rejected are left out,
because no trade took place under them. Pure: it takes records, returns data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

from node.machine import Record, State

QUARTER = re.compile(r"^(\d{4})-Q([1-4])$")
NOT_TRADED = {State.CANCELLED, State.REPLACED, State.REJECTED}


@dataclass(frozen=True, slots=True, order=True)
class Quarter:
    year: int
    number: int

    @classmethod
    def parse(cls, text: str) -> Quarter:
        match = QUARTER.match(text)
        if match is None:
            raise ValueError(f"quarter must look like 2026-Q4, not {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def of(cls, day: date) -> Quarter:
        return cls(day.year, (day.month - 1) // 3 + 1)

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and Quarter.of(day) == self

    def __str__(self) -> str:
        return f"{self.year}-Q{self.number}"


def quarter_figures(records: Iterable[Record], quarter: Quarter) -> dict[str, Any]:
    """``{"quarter", "exports": [...], "imports": [...], "totals": {...}}``; each row is
    one partner and HS code with its number of certificates, carats and US$ value."""
    rows: dict[tuple[str, str, str], list[int]] = {}
    numbers: dict[str, set[str]] = {"export": set(), "import": set()}
    for r in records:
        if r.state in NOT_TRADED or r.certificate.issued_on not in quarter:
            continue
        numbers[str(r.side)].add(r.number)
        for line in r.certificate.lines:
            row = rows.setdefault((str(r.side), r.partner, line.hs_code), [0, 0, 0])
            row[0] += 1
            row[1] += line.carats_hundredths
            row[2] += line.usd_cents
    result: dict[str, Any] = {"quarter": str(quarter)}
    totals: dict[str, Any] = {}
    for side, key in (("export", "exports"), ("import", "imports")):
        listed = [{"partner": p, "hs_code": hs, "certificates": n, "carats_hundredths": ct,
                   "usd_cents": us}
                  for (s, p, hs), (n, ct, us) in sorted(rows.items()) if s == side]
        result[key] = listed
        totals[key] = {"certificates": len(numbers[side]),
                       "carats_hundredths": sum(x["carats_hundredths"] for x in listed),
                       "usd_cents": sum(x["usd_cents"] for x in listed)}
    result["totals"] = totals
    return result
