"""The simulated trade: who the Participants are, and the shape of what they ship.

The trade has the shape of the Kimberley Process' (design brief §1): a few trading hubs
(the EU, the UAE, India, Israel ...) and producers (Botswana, Russia, South Africa ...)
carry most of it, many small partners a little; a year's world volume is on the order of
60,000 certificates averaging about 2,800 carats and US$ 500,000 each. :func:`plan_trade`
draws a given number of shipments from that distribution, each with its planned issue
instant, the importer's confirmation delay and, for a share of them, a discrepancy
(:func:`received_as`). Pure functions of a seed: no node, no broker.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from protocol import (
    Certificate,
    Line,
    Party,
)

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
    # The nodes judge dates by the UTC day (node.machine.day_of): a plan dated by the
    # local day of a machine east of UTC was a day ahead of the nodes' from its midnight to
    # UTC's, and every importer's confirmation was refused (received_on before issued_on).
    today = today or datetime.now(UTC).date()
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
