"""The evidence log's hash chain: how entries are hashed and how the chain is re-checked.

Every signed frame a node sends or receives is kept verbatim, and each entry's hash covers
the previous entry's hash, so changing, removing or reordering any byte of the history is
detectable years later — by one who kept a later entry's hash elsewhere (``kpnode
verify-log --anchor``): the hash takes no key, so whoever can write the database can also
hash a rewritten history anew. Signed frames cannot be forged that way, but they can be
left out, and operator entries are not signed at all. Pure: the store persists entries,
this module only computes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from node.machine import OPEN_STATES, Record, Side, State
from protocol import (
    Cancellation,
    Certificate,
    Envelope,
    ImportConfirmation,
    ProtocolError,
    Receipt,
    RegistryUpdate,
    Rejection,
    Replacement,
    decode_body,
    parse_frame,
    verify_frame,
)
from protocol.codec import pack, unpack
from protocol.keys import key_id
from protocol.reasons import Reason

GENESIS = bytes(32)
#: how early (in days, by UTC) an expired record may have been expired by a node's clock
#: that ran ahead before verify-log calls it unbacked
EXPIRY_GRACE_DAYS = 1
#: The direction of an operator's action record (a dead letter replayed or discarded).
#: Such an entry's "frame" is not a signed message but the canonical msgpack map that
#: :func:`operator_record` makes; the hash chain protects it like any other entry.
OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    recorded_at: int
    direction: str  # "in" | "out" | "operator"
    message_id: str
    certificate: str | None
    frame: bytes
    hash: bytes


def entry_hash(prev: bytes, seq: int, recorded_at: int, direction: str, message_id: str,
               certificate: str | None, frame: bytes) -> bytes:
    """SHA-256 over the previous hash and the canonical msgpack of the entry's fields."""
    fields = [seq, recorded_at, direction, message_id, certificate, frame]
    return hashlib.sha256(prev + pack(fields)).digest()


@dataclass(frozen=True, slots=True)
class Fault:
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.problem}"


def verify_chain(entries: Iterable[Entry], known_keys: Iterable[bytes],
                 chair_public_key: bytes, former_chair_keys: Iterable[bytes] = ()
                 ) -> list[Fault]:
    """Every fault in the log: broken links, altered entries, signatures that fail.

    Keys are those of the node itself and its partners as any registry ever listed them;
    registry frames found in the log add their keys as the walk meets them, so a key that
    was later rotated away still verifies what it signed. The Chair's keys before a
    rotation of its own (``former_chair_keys``) verify the registries they signed then.
    """
    keys: dict[bytes, bytes] = {key_id(k): k for k in known_keys}
    chair_keys = {key_id(k): k for k in (*former_chair_keys, chair_public_key)}
    keys.update(chair_keys)
    faults: list[Fault] = []
    prev = GENESIS
    expected_seq = 1
    for e in entries:
        if e.seq != expected_seq:
            faults.append(Fault(e.seq, f"expected entry {expected_seq}: entries missing"))
        expected_seq = e.seq + 1
        if entry_hash(prev, e.seq, e.recorded_at, e.direction, e.message_id, e.certificate,
                      e.frame) != e.hash:
            faults.append(Fault(e.seq, "hash does not match its content and predecessor"))
        prev = e.hash
        if e.direction == OPERATOR:
            faults.extend(Fault(e.seq, p) for p in _operator_problems(e.frame))
            continue
        problems = _frame_problems(e.frame, keys.get)
        faults.extend(Fault(e.seq, p) for p in problems)
        if not problems:
            _learn_keys(e.frame, keys, set(chair_keys))
    return faults


def unsupported_records(records: Iterable[Record], entries: Iterable[Entry], *,
                        today: date | None = None) -> list[str]:
    """Records the log does not back. The chain cannot show entries cut from its end (what
    is left still links up), but the records those entries justified can: every record
    needs the frame its message id names, and a confirmed one the very import confirmation
    it holds, sent by its importer (a refused confirmation, or one a third Participant sent
    about the number, is logged too, and backs nothing).

    The statistics are read from the records, not from the log, so a record must also say
    what its signed message says: the very certificate (and its digest) that the frame
    under its message id carries, between the partners that frame names; and its state
    must be one the logged messages lead to (:func:`_state_problem`). ``today`` (UTC) lets
    an ``expired`` record be checked against its certificate's expiry date.

    The records are read once, as they come (a hub's years of them are not held): a check
    that needs another record (an open one's replacement) waits for the end."""
    log = _Log()
    for e in entries:
        log.frames.setdefault(e.message_id, [])
        if e.certificate is not None and e.direction != OPERATOR:
            try:
                frame = parse_frame(e.frame)
                envelope = decode_body(frame.body)
            except ProtocolError:
                continue  # verify_chain reports it
            log.add(e, envelope, frame.digest)
    #: of every record, what another's check needs: what it replaces, and its state
    links: dict[tuple[Side, str], tuple[str | None, State]] = {}
    problems: list[str] = []
    waiting: list[tuple[int, Record, list[str], str | None]] = []
    for r in records:
        links[(r.side, r.number)] = (r.replaces, r.state)
        what = f"{r.side} {r.number} ({r.state})"
        if r.message_id not in log.frames:
            problems.append(f"{what}: its message {r.message_id} is not in the log")
            continue
        if (problem := _carried(r, log.frames[r.message_id])) is not None:
            problems.append(f"{what}: {problem}")
        elif r.state is State.CONFIRMED and (
                r.confirmation is None or fingerprint(r.confirmation) not in
                log.confirmations.get((r.number, r.certificate.destination), ())):
            problems.append(f"{r.side} {r.number} is confirmed, but no import confirmation "
                            "for it is in the log")
        else:
            before, replacements, after = _state_problem(r, log, today)
            if before is not None:
                problems.append(f"{what}: {before}")
            elif replacements:
                # its place in the list kept, for a report in the records' order
                waiting.append((len(problems), r, replacements, after))
                problems.append("")
            elif after is not None:
                problems.append(f"{what}: {after}")
    for at, r, replacements, after in waiting:
        for number in replacements:
            # Open again only when its replacement was refused (rejected here too).
            successor = links.get((r.side, number))
            if successor is None or (successor[0] == r.number
                                     and successor[1] is not State.REJECTED):
                after = f"its replacement {number} is in the log, yet it is open"
                break
        if after is not None:
            problems[at] = f"{r.side} {r.number} ({r.state}): {after}"
    problems = [p for p in problems if p]
    # and the other way: what this node signed for a certificate needs its record
    problems.extend(f"export {number}: the log holds the certificate this node sent, but "
                    "there is no record of it" for number in sorted(log.sent_certificates)
                    if (Side.EXPORT, number) not in links)
    problems.extend(f"import {number}: the log holds this node's receipt of it, but there "
                    "is no record of it" for number in sorted(log.sent_receipts)
                    if (Side.IMPORT, number) not in links)
    return problems


def fingerprint(message: Certificate | ImportConfirmation) -> bytes:
    """What the audit keeps of a logged certificate or import confirmation, to compare a
    record's with: the SHA-256 of its canonical form, equal exactly when the values are.
    The parsed messages of a hub's years took most of verify-log's memory."""
    return hashlib.sha256(pack(message.to_wire())).digest()


@dataclass(frozen=True, slots=True)
class _Carried:
    """A logged frame that carries a certificate (or a replacement), as far as a record's
    check needs it."""

    direction: str
    sender: str
    recipient: str
    certificate: bytes  # its fingerprint
    digest: bytes  # the frame's


@dataclass
class _Log:
    """What the logged messages say about certificates, by number."""

    #: frames by message id, of those that carry a certificate (or a replacement); every
    #: logged message id is a key
    frames: dict[str, list[_Carried]] = field(default_factory=dict)
    #: import confirmations' fingerprints by (number, sender)
    confirmations: dict[tuple[str, str], set[bytes]] = field(default_factory=dict)
    #: (number, sender, recipient) of cancellations and rejections; (number, digest,
    #: sender) of receipts
    cancellations: set[tuple[str, str, str]] = field(default_factory=set)
    rejections: set[tuple[str, str, str]] = field(default_factory=set)
    receipts: set[tuple[str, bytes, str]] = field(default_factory=set)
    #: (old number, sender, recipient) → the replacements' numbers
    replacements: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)
    #: numbers of the certificates (and replacements) and the receipts this node sent
    sent_certificates: set[str] = field(default_factory=set)
    sent_receipts: set[str] = field(default_factory=set)

    def add(self, entry: Entry, envelope: Envelope, digest: bytes) -> None:
        payload, pair = envelope.payload, (envelope.sender, envelope.recipient)
        if isinstance(payload, Certificate | Replacement):
            # Only these can carry a record (_carried)
            sent = payload.certificate if isinstance(payload, Replacement) else payload
            self.frames[entry.message_id].append(
                _Carried(entry.direction, *pair, fingerprint(sent), digest))
        if entry.direction == "out":
            if isinstance(payload, Certificate | Replacement):
                self.sent_certificates.add(
                    payload.certificate.number if isinstance(payload, Replacement)
                    else payload.number)
            elif isinstance(payload, Receipt):
                self.sent_receipts.add(payload.certificate)
        if isinstance(payload, ImportConfirmation):
            self.confirmations.setdefault((payload.certificate, envelope.sender),
                                          set()).add(fingerprint(payload))
        elif isinstance(payload, Cancellation):
            self.cancellations.add((payload.certificate, *pair))
        elif isinstance(payload, Rejection) and payload.certificate is not None:
            self.rejections.add((payload.certificate, *pair))
        elif isinstance(payload, Receipt):
            self.receipts.add((payload.certificate, payload.certificate_digest,
                               envelope.sender))
        elif isinstance(payload, Replacement):
            self.replacements.setdefault((payload.replaces, *pair), []).append(
                payload.certificate.number)


def _state_problem(r: Record, log: _Log, today: date | None
                   ) -> tuple[str | None, list[str], str | None]:
    """Why the logged messages cannot have left ``r`` in its state. Each state needs the
    message that makes it; and a certificate whose cancellation or replacement its issuer
    sent, or whose import confirmation this node sent, is no longer open.

    As (a problem; else the replacements in the log of an open record, each one a problem
    unless that replacement was refused, which only its record says; else a problem
    after those), each None or empty when there is none."""
    pair = (r.certificate.issuer, r.certificate.destination)
    state = r.state
    cancelled = (r.number, *pair) in log.cancellations
    replacements = log.replacements.get((r.number, *pair), [])
    after = None
    if r.side is Side.IMPORT and state is not State.CONFIRMED and log.confirmations.get(
            (r.number, r.certificate.destination)):
        after = "this node's import confirmation of it is in the log, yet it is not confirmed"
    if state is State.CANCELLED and not cancelled:
        return "no cancellation of it is in the log", [], None
    if state is State.REJECTED and (r.number, *pair) not in log.rejections \
            and (r.number, *reversed(pair)) not in log.rejections:
        return "no rejection of it is in the log", [], None
    if state is State.REPLACED and not replacements:
        return "no replacement of it is in the log", [], None
    if state is State.DELIVERED and (r.number, r.certificate_digest,
                                     r.certificate.destination) not in log.receipts:
        return "no receipt for it is in the log", [], None
    # A day's grace, as for dates on receipt (machine.DAYS_AHEAD_AT_ISSUE): a node whose
    # clock ran ahead past midnight UTC expired it on its last day, and verify-log, run
    # once the clock is right again, is not to call that history tampered with.
    if state is State.EXPIRED and today is not None \
            and r.certificate.expires_on >= today + timedelta(days=EXPIRY_GRACE_DAYS):
        return (f"it expires on {r.certificate.expires_on.isoformat()}, not before "
                f"{today.isoformat()} (UTC)"), [], None
    if state in OPEN_STATES | {State.EXPIRED}:
        if cancelled:
            return "its cancellation is in the log, yet it is open", [], None
        return None, list(replacements), after
    return None, [], after


def _carried(record: Record, found: list[_Carried]) -> str | None:
    """Why the frames logged under a record's message id do not carry that record, or None.
    An export's is the certificate (or replacement) this node sent its importer, an
    import's the one its issuer sent this node."""
    export = record.side is Side.EXPORT
    carried = [c for c in found if c.direction == ("out" if export else "in")]
    if not carried:
        return f"its message {record.message_id} in the log carries no certificate"
    stored = fingerprint(record.certificate)
    for c in carried:
        partner = c.recipient if export else c.sender
        if c.certificate == stored and c.digest == record.certificate_digest:
            if partner != record.partner:
                return (f"recorded with partner {record.partner}, but its message is "
                        f"between {c.sender} and {c.recipient}")
            return None
    return "the certificate stored differs from the one its message carries"


def operator_record(action: str, operator: str, at_ms: int, **fields: Any) -> bytes:
    """An operator's action as an evidence entry: who did what, when, and why, with the
    bytes acted on (a discarded dead letter stays readable in the log)."""
    return pack({"action": action, "operator": operator, "at": at_ms, **fields})


def read_operator_record(data: bytes) -> dict[str, Any]:
    """The fields of an operator record; ProtocolError if it is not one."""
    value = unpack(data)
    if not isinstance(value, dict) or not isinstance(value.get("action"), str) \
            or not isinstance(value.get("operator"), str) or not isinstance(value.get("at"), int):
        raise ProtocolError(Reason.BODY_MALFORMED, "not an operator record")
    return value


def _operator_problems(data: bytes) -> list[str]:
    try:
        read_operator_record(data)
    except ProtocolError as exc:
        return [f"operator record does not parse: {exc}"]
    return []


def _frame_problems(frame_bytes: bytes, key_for: Callable[[bytes], bytes | None]) -> list[str]:
    try:
        frame = parse_frame(frame_bytes)
        public_key = key_for(frame.key_id)
        if public_key is None:
            return [f"signed by unknown key {frame.key_id.hex()}"]
        verify_frame(frame, public_key)
    except ProtocolError as exc:
        return [f"frame does not verify: {exc}"]
    return []


def _learn_keys(frame_bytes: bytes, keys: dict[bytes, bytes], chair_ids: set[bytes]) -> None:
    """Add the keys of a registry update that the Chair signed (and that verified)."""
    try:
        frame = parse_frame(frame_bytes)
        # Only a frame the Chair signed can be a registry update: the body of every other
        # one (nearly all of a log) is not decoded here, which took a quarter of the time
        # verify-log spent on a node with a few years of trade.
        if frame.key_id not in chair_ids:
            return
        envelope = decode_body(frame.body)
    except ProtocolError:
        return
    if isinstance(envelope.payload, RegistryUpdate):
        for p in envelope.payload.participants:
            for a in p.authorities:
                for k in a.keys:
                    keys[key_id(k.public_key)] = k.public_key
