"""How a node's records and evidence look from outside: the JSON that ``kpnode --json``,
the HTTP API and the web console all show, and the amount formats people read and type.

Shared so that a certificate looks the same whichever door an operator or a national
system comes through.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from node.machine import Record
from node.store import Store
from protocol import ProtocolError, decode_body, parse_frame
from protocol.schema import DATE, PARTICIPANT_CODE


def partner_filter(text: str) -> str:
    """A partner to list by, as typed ('za' or 'ZA') → 'ZA'. ``ValueError`` when it is no
    Participant code: a typo ('ZA1') listed nothing, as if there were no such trade."""
    code = text.strip().upper()
    if not PARTICIPANT_CODE.fullmatch(code):
        raise ValueError(f"{text[:12]!r} is not a Participant code (two letters)")
    return code


def carats(hundredths: int) -> str:
    return f"{Decimal(hundredths) / 100:,.2f}"


def usd(cents: int) -> str:
    return f"{Decimal(cents) / 100:,.2f}"


#: digits with an optional dot and one or two decimals; commas only between thousands
_AMOUNT = re.compile(r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]{1,2})?")


def parse_amount(text: str, what: str, *, zero: bool = False) -> int:
    """'2500.5' or '2,500.50' → 250050 hundredths; at most two decimals, > 0 (or 0 with
    ``zero``: what arrived of a declared line that did not). ``ValueError`` says why. A
    confirmation is signed and final, so an amount must not be open to two readings: a
    decimal comma ('2500,50') is refused, not read as 250050, and so is a dot between
    thousands ('2.400', 2,400 where a dot groups thousands), not read as 2.40."""
    cleaned = text.strip()
    if not _AMOUNT.fullmatch(cleaned):
        raise ValueError(f"{what} must be a number like 2500.50 or 2,500.50 (a dot before "
                         f"at most two decimals, commas only between thousands), not "
                         f"{text!r}")
    try:
        value = Decimal(cleaned.replace(",", ""))
    except InvalidOperation:
        raise ValueError(f"{what} must be a number, not {text!r}") from None
    scaled = value * 100
    if not scaled.is_finite() or scaled != scaled.to_integral_value() or scaled < 0 or (
            scaled == 0 and not zero):
        raise ValueError(f"{what} must be {'0 or more' if zero else '> 0'} with at most two "
                         f"decimals, not {text!r}")
    return int(scaled)


_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")


def parse_whole_number(text: str) -> int:
    """ASCII digits only: Python's ``int`` also takes '1_000', ' 7 ' and other scripts'
    digits (full-width '10'), which a form or query string should not pass as a count."""
    if not _WHOLE_NUMBER.fullmatch(text):
        raise ValueError(f"a whole number in digits 0-9 is required, not {text[:40]!r}")
    return int(text)


def parse_date(text: str) -> date:
    """Only YYYY-MM-DD, as in certificates: ``date.fromisoformat`` alone also reads
    20261115 and 2026-W46-7, and the date goes into a signed confirmation."""
    if not DATE.fullmatch(text):
        raise ValueError(f"a date YYYY-MM-DD is required, not {text[:40]!r}")
    return date.fromisoformat(text)


def record_note(record: Record) -> str:
    """The note column of a list of records (kpnode list, the console): every one of these
    that applies, so that 'replaces X' hides neither a discrepancy nor a refusal."""
    parts = [record.rejection_reason or ""]
    if record.discrepancies:
        parts.append(f"{len(record.discrepancies)} discrepancy(ies)")
    if record.replaced_by:
        parts.append(f"replaced by {record.replaced_by}")
    elif record.replaces:
        parts.append(f"replaces {record.replaces}")
    return "; ".join(p for p in parts if p)


def record_json(record: Record) -> dict[str, Any]:
    c = record.certificate
    return {
        "side": str(record.side), "number": record.number, "partner": record.partner,
        "state": str(record.state), "issued_on": c.issued_on.isoformat(),
        "expires_on": c.expires_on.isoformat(), "carats_hundredths": c.carats_hundredths,
        "usd_cents": c.usd_cents, "parcels": c.parcels,
        "certificate_digest": record.certificate_digest.hex(),
        "message_id": record.message_id, "updated_at": record.updated_at,
        "rejection_reason": record.rejection_reason, "rejection_text": record.rejection_text,
        "replaces": record.replaces, "replaced_by": record.replaced_by,
        "confirmation": None if record.confirmation is None else {
            "carats_hundredths": record.confirmation.carats_hundredths,
            "usd_cents": record.confirmation.usd_cents,
            "parcels": record.confirmation.parcels,
            "received_on": record.confirmation.received_on.isoformat(),
            "remarks": record.confirmation.remarks,
        },
        "discrepancies": [
            {"field": d.field, "declared": d.declared, "received": d.received}
            for d in record.discrepancies
        ],
        "certificate": c.to_wire(),
    }


def history_json(store: Store, number: str, records: Sequence[Record], *,
                 frames: bool = False) -> list[dict[str, Any]]:
    """The signed messages about one certificate, in the order the evidence log kept them;
    with ``frames``, each message's signed bytes too (base64), to keep or re-verify.

    Only messages between this node and the partner of one of ``records`` (the node's
    records of that number): any Participant can send a frame that names the number, and
    the log keeps it, but a third party's word is not part of this loop's history."""
    loops = {frozenset((r.certificate.issuer, r.certificate.destination)) for r in records}
    history: list[dict[str, Any]] = []
    for entry in store.evidence(number):
        try:
            frame = parse_frame(entry.frame)
            env = decode_body(frame.body)
        except ProtocolError:
            continue  # kept verbatim as evidence, but not a message about this certificate
        if frozenset((env.sender, env.recipient)) not in loops:
            continue
        item: dict[str, Any] = {
            "seq": entry.seq, "direction": entry.direction, "kind": str(env.kind),
            "from": env.sender, "to": env.recipient, "message_id": env.message_id,
            "in_reply_to": env.in_reply_to, "created_at": env.created_at,
            "recorded_at": entry.recorded_at, "frame_sha256": frame.digest.hex()}
        if frames:
            item["frame_base64"] = base64.b64encode(entry.frame).decode()
        history.append(item)
    # Whether what this node signed has left it: the record's state alone does not say (a
    # certificate is 'issued' from the moment it is signed, whether or not the broker
    # took it), and a back office must see an 'unroutable' before the loop goes overdue.
    sending = store.sending(i["message_id"] for i in history if i["direction"] == "out")
    for item in history:
        if item["direction"] == "out":
            item["outbox"] = sending.get(item["message_id"])
    return history
