"""The certificate state machine: every decision a node takes, as pure functions.

Given the node's context (who it is, its registry, the time, its signer), the records a
message or command touches, and that message or command, each function returns a
:class:`Decision`: the records to write, the signed messages to send, the answer to
remember for duplicates, or the refusal and its reason. Nothing here does I/O; the
service shell loads records, calls one function, and commits the decision in one
transaction. Signing is pure (Ed25519 is deterministic), so decisions carry signed frames.

Lifecycles (design brief §1)::

    exporter: issued ─receipt→ delivered ─confirmation→ confirmed
              issued|delivered → rejected | cancelled | replaced | expired
    importer: received ─confirm→ confirmed;  received → rejected | cancelled | replaced | expired
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum

from node.registry import KeyOwner, Registry, newer, utc_instant
from protocol import (
    BROADCAST,
    CHAIR,
    Cancellation,
    Certificate,
    Envelope,
    Frame,
    ImportConfirmation,
    Kind,
    Line,
    Opened,
    Payload,
    Ping,
    Pong,
    Problem,
    ProtocolError,
    Reason,
    Receipt,
    RegistryUpdate,
    Rejection,
    Replacement,
    SignatureError,
    parse_frame,
)
from protocol.codec import decode_body, unpack
from protocol.frame import verify_frame
from protocol.keys import key_id
from protocol.schema import (
    NONCE_SIZE,
    validate_cancellation,
    validate_import_confirmation,
    validate_replacement,
)


class Side(StrEnum):
    EXPORT = "export"
    IMPORT = "import"


class State(StrEnum):
    ISSUED = "issued"
    DELIVERED = "delivered"
    RECEIVED = "received"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    REPLACED = "replaced"
    EXPIRED = "expired"


#: States in which a loop is still open (waiting on the other side or on the shipment).
OPEN_STATES = frozenset({State.ISSUED, State.DELIVERED, State.RECEIVED})

Signer = Callable[[Envelope], bytes]


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """Where what arrived differs from what the certificate declared."""

    field: str
    declared: int
    received: int


def discrepancies(
    certificate: Certificate, confirmation: ImportConfirmation
) -> tuple[Discrepancy, ...]:
    """Every difference between a certificate and its import confirmation.

    Both ends compute this from the same two signed messages, so they agree.
    """
    found = []
    if certificate.parcels != confirmation.parcels:
        found.append(Discrepancy("parcels", certificate.parcels, confirmation.parcels))
    declared = {x.hs_code: x for x in certificate.lines}
    received = {x.hs_code: x for x in confirmation.lines}
    for hs in sorted(set(declared) | set(received)):
        d, r = declared.get(hs), received.get(hs)
        for attr in ("carats_hundredths", "usd_cents"):
            dv, rv = (getattr(d, attr) if d else 0), (getattr(r, attr) if r else 0)
            if dv != rv:
                found.append(Discrepancy(f"lines[{hs}].{attr}", dv, rv))
    return tuple(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One certificate as one side holds it."""

    side: Side
    number: str
    partner: str
    state: State
    certificate: Certificate
    #: SHA-256 of the frame that carried the certificate: what receipts bind to.
    certificate_digest: bytes
    message_id: str
    updated_at: int
    confirmation: ImportConfirmation | None = None
    rejection_reason: str | None = None
    rejection_text: str | None = None
    replaces: str | None = None
    replaced_by: str | None = None

    @property
    def discrepancies(self) -> tuple[Discrepancy, ...]:
        if self.confirmation is None:
            return ()
        return discrepancies(self.certificate, self.confirmation)

    def moved(self, state: State, now_ms: int, **changes: object) -> Record:
        return dataclasses.replace(self, state=state, updated_at=now_ms, **changes)  # type: ignore[arg-type]


RecordKey = tuple[Side, str]
Known = Mapping[RecordKey, Record]


@dataclass(frozen=True, slots=True)
class Before:
    """What reached the importer about a certificate before the certificate itself (SPEC
    §13, "Order"): its issuer's cancellation, or a certificate received as its
    replacement. Messages to one recipient normally keep their order, but not always (a
    relay batch nacked after the next one was confirmed, a dead letter an operator moved
    back), and a certificate taken as open after its own cancellation would leave the loop
    cancelled at one end and open at the other for good."""

    cancellation: Cancellation | None = None
    successor: Record | None = None


def arriving(envelope: Envelope) -> str | None:
    """The number of the certificate a message brings, for which the shell loads
    :class:`Before`."""
    payload = envelope.payload
    if isinstance(payload, Certificate):
        return payload.number
    if isinstance(payload, Replacement):
        return payload.certificate.number
    return None


@dataclass(frozen=True, slots=True)
class Sealed:
    """A message and the exact signed bytes that will travel."""

    envelope: Envelope
    frame: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message or command was refused. ``answer_to`` is set only for an authentic
    sender, who then gets a signed rejection."""

    reason: str
    text: str
    problems: tuple[Problem, ...] = ()
    answer_to: str | None = None
    in_reply_to: str | None = None
    certificate: str | None = None
    #: False for a message refused only for a date ahead of this node's clock: that clock
    #: may be the one that is wrong (behind), so the refusal must not be for good. It is
    #: dead-lettered, neither answered nor remembered, and judged afresh when it comes
    #: again (the sender's resend, an operator's replay).
    final: bool = True
    #: False for a refused rejection or pong: its signer is named (``answer_to``) but gets
    #: no answer, whatever the refusal. Two nodes that each refuse the other's frames (both
    #: keys lapsed, say) would otherwise exchange rejections for ever.
    answered: bool = True

    def __str__(self) -> str:
        detail = "; ".join(str(p) for p in self.problems)
        return f"{self.reason}: {self.text}" + (f" ({detail})" if detail else "")


@dataclass(frozen=True, slots=True)
class Decision:
    records: tuple[Record, ...] = ()
    send: tuple[Sealed, ...] = ()
    #: The answer to the incoming message, replayed verbatim if the message comes again.
    answer: Sealed | None = None
    refusal: Refusal | None = None
    registry: Registry | None = None


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision may depend on besides the records and the message."""

    me: str
    registry: Registry
    chair_public_key: bytes
    own_authority: str
    now_ms: int
    sign: Signer
    #: why the key ``sign`` uses may not sign now in ``registry`` (None: it may). Partners
    #: would refuse what it signs, so local commands that send are refused instead.
    key_fault: ProtocolError | None = None

    @property
    def today(self) -> date:
        return day_of(self.now_ms)

    def seal(self, recipient: str, payload: Payload, in_reply_to: str | None = None) -> Sealed:
        envelope = Envelope(sender=self.me, recipient=recipient, created_at=self.now_ms,
                            payload=payload, in_reply_to=in_reply_to)
        return Sealed(envelope, self.sign(envelope))


def day_of(at_ms: int) -> date:
    """The UTC date of an instant: expiry, 'overdue' and the current quarter are judged in
    UTC everywhere, whatever the server's time zone."""
    return utc_instant(at_ms).date()


#: an open loop whose certificate expires within this many days is overdue for follow-up
OVERDUE_WITHIN_DAYS = 7


def is_overdue(record: Record, today: date) -> bool:
    """A loop an officer must chase: still open with its certificate expiring within
    OVERDUE_WITHIN_DAYS (or past), or expired unconfirmed. One rule for `kpnode status`,
    the API's ``overdue=true`` and the console's highlighting."""
    if record.state is State.EXPIRED:
        return True
    return (record.state in OPEN_STATES
            and (record.certificate.expires_on - today).days <= OVERDUE_WITHIN_DAYS)


def side_of(number: str, me: str) -> Side:
    """Certificate numbers start with the issuer's code: ours are exports."""
    return Side.EXPORT if number.startswith(me) else Side.IMPORT


def refuse(reason: Reason | str, text: str, *, certificate: str | None = None,
           problems: tuple[Problem, ...] = ()) -> Decision:
    return Decision(refusal=Refusal(str(reason), text, problems, certificate=certificate))


# -- admitting a delivery: frame → authentic, well-formed message for us ----------------


@dataclass(frozen=True, slots=True)
class Admitted:
    opened: Opened
    #: the registry entry of the signing key; ``None`` for the Chair's registry updates
    signer: KeyOwner | None

    @property
    def envelope(self) -> Envelope:
        return self.opened.envelope

    @property
    def frame(self) -> Frame:
        return self.opened.frame


def admit(ctx: Context, data: bytes, broker_user: str | None = None,
          expected_broker_user: Callable[[str], str] | None = None) -> Admitted | Refusal:
    """Parse and verify a delivery before anything else looks at it (design principle 2).

    The order matters: the frame's shape and signature are checked before the body is
    decoded, and a rejection is only ever addressed to a sender whose signature verified.
    """
    try:
        frame = parse_frame(data)
    except ProtocolError as exc:
        return Refusal(str(exc.reason), exc.text)
    chair = frame.key_id == key_id(ctx.chair_public_key)
    owner = None if chair else ctx.registry.key_owner(frame.key_id)
    lapsed = None
    try:
        try:
            public_key = (ctx.chair_public_key if chair
                          else ctx.registry.public_key_for(frame.key_id, ctx.now_ms))
        except SignatureError as exc:
            lapsed = ctx.registry.lapsed_key(frame.key_id, ctx.now_ms)
            if lapsed is None or exc.reason != Reason.KEY_NOT_VALID_NOW:
                raise
            public_key = lapsed.public_key
        verify_frame(frame, public_key)
    except SignatureError as exc:
        return Refusal(str(exc.reason), exc.text)
    signer_code = CHAIR if owner is None else owner.participant
    # From here the signer is authentic: refusals go back to them, signed.
    answer_to = None if chair else signer_code
    try:
        envelope = decode_body(frame.body)
    except ProtocolError as exc:
        # A rejection or pong that fails decoding (a field a newer peer added) is still
        # one: not answered either (SPEC §14), as far as its kind can be read.
        return Refusal(str(exc.reason), exc.text, exc.problems, answer_to=answer_to,
                       answered=_kind_of(frame.body) not in (Kind.REJECTION, Kind.PONG))

    # Never answer a rejection (or a pong) with a rejection, as _answer_refusal does not
    # either: two nodes refusing each other's would send one for every one they get.
    answered = not isinstance(envelope.payload, Rejection | Pong)

    def refused(reason: Reason, text: str) -> Refusal:
        return Refusal(str(reason), text, answer_to=answer_to, in_reply_to=envelope.message_id,
                       answered=answered)

    if lapsed is not None and not lapsed.valid_from <= envelope.created_at < (
            lapsed.valid_until or 0):
        return refused(Reason.KEY_NOT_VALID_NOW, f"key {frame.key_id.hex()} has lapsed and "
                       "the message was not signed while it was valid")
    # valid_until is the first instant the key may not sign: its last day is the day of
    # the instant before (a key ending at midnight has no part of the day that begins).
    if lapsed is not None and (later := _dated_after(envelope.payload,
                                                    day_of((lapsed.valid_until or 0) - 1))):
        # created_at is the signer's own word: a date in the message itself after the
        # key's end shows it was written since, not an old message arriving late.
        return refused(Reason.KEY_NOT_VALID_NOW, f"key {frame.key_id.hex()} has lapsed and "
                       f"the message is dated after its end ({later})")
    if envelope.sender != signer_code:
        return refused(Reason.KEY_WRONG_SENDER,
                       f"signed by a key of {signer_code} but sent as {envelope.sender}")
    if chair != isinstance(envelope.payload, RegistryUpdate):
        return refused(Reason.KEY_WRONG_SENDER,
                       "only the Chair's key signs registry updates, and only those")
    if envelope.recipient not in (ctx.me, BROADCAST):
        return refused(Reason.NOT_FOR_US,
                       f"addressed to {envelope.recipient}, this node is {ctx.me}")
    if expected_broker_user is not None and not chair:
        # A missing user_id is a mismatch too: the broker only vouches for one that is set.
        expected = expected_broker_user(envelope.sender)
        if broker_user != expected:
            return refused(Reason.BROKER_USER_MISMATCH,
                           f"published by broker user {broker_user!r}, expected {expected!r}")
    return Admitted(Opened(frame, envelope), owner)


# -- incoming messages ------------------------------------------------------------------


def _kind_of(body: bytes) -> str | None:
    """The kind a body that failed decoding says it is, if it can be read at all."""
    try:
        value = unpack(body)
    except ProtocolError:
        return None
    kind = value.get("kind") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def _dated_after(payload: Payload, day: date) -> str | None:
    """The first date the message itself states that could not have been written on
    ``day`` (a key's last day), named. A certificate may be dated up to
    ``DAYS_AHEAD_AT_ISSUE`` after the day it is signed (authorities east of UTC); the day
    of receipt is never after the day of confirming."""
    certificate = payload.certificate if isinstance(payload, Replacement) else payload
    if isinstance(certificate, Certificate) and certificate.issued_on > day + timedelta(
            days=DAYS_AHEAD_AT_ISSUE):
        return f"issued_on {certificate.issued_on.isoformat()}"
    if isinstance(payload, ImportConfirmation) and payload.received_on > day:
        return f"received_on {payload.received_on.isoformat()}"
    return None


def touches(envelope: Envelope, me: str) -> list[RecordKey]:
    """The records a message may read or change: the shell loads exactly these."""
    payload = envelope.payload
    if isinstance(payload, Certificate):
        return [(Side.IMPORT, payload.number)]
    if isinstance(payload, Replacement):
        return [(Side.IMPORT, payload.certificate.number), (Side.IMPORT, payload.replaces)]
    if isinstance(payload, Receipt | ImportConfirmation | Cancellation):
        return [(side_of(payload.certificate, me), payload.certificate)]
    if isinstance(payload, Rejection) and payload.certificate:
        return [(side_of(payload.certificate, me), payload.certificate)]
    return []


def linked(known: Known) -> list[RecordKey]:
    """Records the loaded ones point to: the certificate a replacement replaced (a
    rejection of the replacement must give the old certificate back its loop) and an
    export's replacement (an importer answers one of the two, never both)."""
    return ([(r.side, r.replaces) for r in known.values() if r.replaces]
            + [(r.side, r.replaced_by) for r in known.values()
               if r.replaced_by and r.side is Side.EXPORT])


def receive(ctx: Context, admitted: Admitted, known: Known,
            before: Before = Before()) -> Decision:
    """Decide what an admitted message does. The answer (receipt, pong or rejection) of a
    refusal is built here too, so the shell only has to send and remember it. ``before``
    matters only for a certificate or replacement (see :func:`arriving`)."""
    env = admitted.envelope
    payload = env.payload
    if isinstance(payload, Certificate):
        decision = _on_certificate(ctx, admitted, payload, known, before)
    elif isinstance(payload, Replacement):
        decision = _on_certificate(ctx, admitted, payload.certificate, known, before,
                                   payload)
    elif isinstance(payload, Receipt):
        decision = _on_receipt(ctx, env, payload, known)
    elif isinstance(payload, ImportConfirmation):
        decision = _on_confirmation(ctx, env, payload, known)
    elif isinstance(payload, Cancellation):
        decision = _on_cancellation(ctx, env, payload, known)
    elif isinstance(payload, Rejection):
        decision = _on_rejection(ctx, env, payload, known)
    elif isinstance(payload, Ping):
        answer = ctx.seal(env.sender, Pong(nonce=payload.nonce), env.message_id)
        decision = Decision(send=(answer,), answer=answer)
    elif isinstance(payload, RegistryUpdate):
        candidate = Registry(payload, admitted.frame.raw, env.message_id)
        if candidate.frame == ctx.registry.frame:
            decision = Decision()  # the registry we hold already (e.g. also given as a file)
        elif not newer(ctx.registry, candidate, ctx.chair_public_key):
            decision = refuse(Reason.REGISTRY_STALE, f"registry version {payload.version} is "
                              f"not newer than {ctx.registry.version}")
        else:
            decision = Decision(registry=candidate)
    else:  # Pong: the ping command reads it from the evidence log
        decision = Decision()
    return _answer_refusal(ctx, env, decision)


def _answer_refusal(ctx: Context, env: Envelope, decision: Decision) -> Decision:
    refusal = decision.refusal
    if refusal is None:
        return decision
    if isinstance(env.payload, Rejection | RegistryUpdate | Pong):
        # Never answer a rejection with a rejection: two nodes could loop for ever.
        return decision
    refusal = dataclasses.replace(refusal, answer_to=env.sender, in_reply_to=env.message_id)
    if not refusal.final:  # held back: who sent it is known, but nothing is answered
        return dataclasses.replace(decision, refusal=refusal)
    answer = rejection_for(ctx, refusal)
    send = decision.send + ((answer,) if answer else ())
    return dataclasses.replace(decision, refusal=refusal, answer=answer, send=send)


#: why a recipient refuses a frame for its signer's key, not for what the frame says
KEY_REASONS = frozenset({Reason.KEY_UNKNOWN, Reason.KEY_REVOKED, Reason.KEY_NOT_VALID_NOW,
                         Reason.KEY_WRONG_SENDER})


def signed_afresh(ctx: Context, frame: bytes) -> Sealed | None:
    """This node's stored answer to a message (receipt, rejection, pong) signed again now,
    when its recipient would refuse the stored bytes for their key: this node's key had
    been revoked or had lapsed when it answered (RUNBOOK, "After your key is revoked"). The
    same message, under the same id, dated now. ``None`` while the stored bytes still
    verify, or while no key of this node can sign either. A duplicate is otherwise answered
    byte for byte (SPEC §13), and a partner's resends met the refused bytes for ever."""
    if ctx.key_fault is not None:
        return None
    envelope = decode_body(parse_frame(frame).body)
    judged = admit(dataclasses.replace(ctx, me=envelope.recipient), frame)
    if not isinstance(judged, Refusal) or judged.reason not in KEY_REASONS:
        return None
    again = dataclasses.replace(envelope, created_at=ctx.now_ms)
    return Sealed(again, ctx.sign(again))


def rejection_for(ctx: Context, refusal: Refusal) -> Sealed | None:
    """The signed rejection that answers ``refusal``, when its sender is authentic and not
    this node: a frame of its own back in its inbox (anyone who received one can publish
    it there) answered would be a rejection to itself, refused in turn (sender and
    recipient the same) and answered again, for ever."""
    if refusal.answer_to in (None, CHAIR, ctx.me) or not refusal.answered:
        return None
    payload = Rejection(reason=refusal.reason, text=_clip(refusal.text, 2000),
                        certificate=refusal.certificate,
                        problems=tuple(Problem(_clip(p.path, 200), p.reason,
                                               _clip(p.message, 300))
                                       for p in refusal.problems[:100]))
    return ctx.seal(refusal.answer_to, payload, refusal.in_reply_to)


def _clip(text: str, limit: int) -> str:
    """At most ``limit`` characters. Problems quote what was sent (a field name, a value),
    so a sender could otherwise make the answer exceed SPEC §9.4's limits (the receiver
    would refuse it) or even the frame size (the node could not answer at all). 100
    problems of 200 + 300 characters stay under 256 KiB in any UTF-8."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


#: how far ahead of today (UTC) a certificate's issued_on (or a confirmation's received_on)
#: may be: a day's grace at issue for authorities east of UTC, whose today may be UTC's
#: tomorrow, and one more on receipt for clocks either side of midnight. A certificate
#: dated later could not be confirmed (a shipment cannot arrive before its certificate was
#: issued) until that day.
DAYS_AHEAD_AT_ISSUE = 1
DAYS_AHEAD_ON_RECEIPT = 2


def _trade_problems(ctx: Context, certificate: Certificate,
                    days_ahead: int) -> list[Problem]:
    """Registry and calendar rules that hold at issue time and again on receipt, each with
    the path of the certificate's field it is about."""
    found: list[Problem] = []
    for path, code in (("issuer", certificate.issuer),
                       ("destination", certificate.destination)):
        standing = ctx.registry.standing(code)
        if standing is not None:
            found.append(Problem(path, standing,
                                 f"{code} may not trade under the Scheme ({standing})"))
    if ctx.registry.authority(certificate.issuer, certificate.issuing_authority) is None:
        found.append(Problem("issuing_authority", Reason.AUTHORITY_UNKNOWN,
                             f"{certificate.issuing_authority} is not an issuing authority "
                             f"of {certificate.issuer}"))
    for i, origin in enumerate(certificate.origins):
        if ctx.registry.embargoed(origin):
            found.append(Problem(f"origins[{i}]", Reason.ORIGIN_EMBARGOED,
                                 f"origin {origin} is under embargo"))
    found.extend(calendar_problems(certificate, ctx.today, days_ahead))
    return found


def calendar_problems(certificate: Certificate, today: date, days_ahead: int
                      ) -> list[Problem]:
    """What the calendar alone says of a certificate (no registry needed): expired, or
    dated more than ``days_ahead`` days after ``today``."""
    found: list[Problem] = []
    if certificate.expires_on < today:
        found.append(Problem("expires_on", Reason.CERTIFICATE_EXPIRED,
                             f"certificate expired on {certificate.expires_on.isoformat()}"))
    if certificate.issued_on > today + timedelta(days=days_ahead):
        found.append(Problem("issued_on", Reason.BAD_DATE,
                             f"issued_on {certificate.issued_on.isoformat()} is in the "
                             f"future (today is {today.isoformat()} UTC)"))
    return found


def _on_certificate(ctx: Context, admitted: Admitted, certificate: Certificate, known: Known,
                    before: Before, replacement: Replacement | None = None) -> Decision:
    env = admitted.envelope
    number = certificate.number
    problems = _trade_problems(ctx, certificate, days_ahead=DAYS_AHEAD_ON_RECEIPT)
    if admitted.signer is not None and admitted.signer.authority.id != (
        certificate.issuing_authority
    ):
        problems.append(Problem("issuing_authority", Reason.AUTHORITY_UNKNOWN,
                                f"signed by {admitted.signer.authority.id}, not by the "
                                f"issuing authority {certificate.issuing_authority}"))
    existing = known.get((Side.IMPORT, number))
    if existing is not None:
        problems.insert(0, Problem("number", Reason.CERTIFICATE_DUPLICATE_NUMBER,
                                   f"certificate {number} was already received"))
    old = known.get((Side.IMPORT, replacement.replaces)) if replacement else None
    if old is not None and old.partner != env.sender:
        # Another Participant's certificate: left alone, and answered as if unknown, so a
        # sender can neither replace nor probe what this node received from others. The
        # schema refuses a replaces of another issuer's number first; this stays so that
        # the rule does not rest on numbering alone.
        old = None
    if old is not None and old.state not in OPEN_STATES | {State.EXPIRED}:
        problems.append(Problem("", Reason.CERTIFICATE_WRONG_STATE,
                                f"{old.number} is {old.state} and can no longer be replaced"))
    record = Record(
        side=Side.IMPORT, number=number, partner=env.sender, state=State.RECEIVED,
        certificate=certificate, certificate_digest=admitted.frame.digest,
        message_id=env.message_id, updated_at=ctx.now_ms,
        replaces=replacement.replaces if replacement else None,
    )
    if replacement is None and problems and all(p.reason is Reason.BAD_DATE
                                                for p in problems):
        # Dated ahead of this node's today, and nothing else: a refusal for now only. Not
        # a replacement: held back, it would leave its old certificate open here while
        # the exporter holds it replaced; refused, the exporter takes the old one back.
        return Decision(refusal=Refusal(str(Reason.BAD_DATE), problems[0].message,
                                        certificate=number, final=False))
    if problems:
        reason = problems[0].reason
        text = "; ".join(p.message for p in problems)
        # Keep a record of the refused certificate, unless its number is already taken.
        refused = () if existing else (record.moved(State.REJECTED, ctx.now_ms,
                                                    rejection_reason=str(reason),
                                                    rejection_text=text),)
        return Decision(records=refused,
                        refusal=Refusal(str(reason), text, certificate=number))
    if before.successor is not None:
        # Replaced before it got here: it ends as it would have, had it come first.
        record = record.moved(State.REPLACED, ctx.now_ms, replaced_by=before.successor.number)
    elif before.cancellation is not None:
        record = record.moved(State.CANCELLED, ctx.now_ms,
                              rejection_text=before.cancellation.reason)
    records = [record]
    if old is not None and replacement is not None:
        # the exporter's reason, as its own record of the old certificate keeps it
        records.append(old.moved(State.REPLACED, ctx.now_ms, replaced_by=number,
                                 rejection_text=replacement.reason))
    answer = ctx.seal(env.sender, Receipt(certificate=number,
                                          certificate_digest=admitted.frame.digest),
                      env.message_id)
    return Decision(records=tuple(records), send=(answer,), answer=answer)


def _own_record(env: Envelope, number: str, side: Side, known: Known) -> Record | Decision:
    record = known.get((side, number))
    if record is None or record.partner != env.sender:
        # One answer for both: a signed rejection saying "it is with BW" would let any
        # Participant learn, number by number, who trades with whom.
        return refuse(Reason.CERTIFICATE_UNKNOWN, f"no {side} certificate {number} here "
                      f"with {env.sender}", certificate=number)
    return record


def _on_receipt(ctx: Context, env: Envelope, receipt: Receipt, known: Known) -> Decision:
    record = _own_record(env, receipt.certificate, Side.EXPORT, known)
    if isinstance(record, Decision):
        return record
    if receipt.certificate_digest != record.certificate_digest:
        return refuse(Reason.CERTIFICATE_DIGEST_MISMATCH, "receipt names other certificate "
                      "bytes than the ones sent", certificate=record.number)
    if record.state is State.ISSUED:
        if why := _other_taken_up(record, known):
            return refuse(Reason.CERTIFICATE_WRONG_STATE, f"certificate {record.number} "
                          f"cannot be received: {why}", certificate=record.number)
        return Decision(records=(record.moved(State.DELIVERED, ctx.now_ms),))
    return Decision()  # late or repeated receipt: the record has moved on already


def _other_taken_up(record: Record, known: Known) -> str | None:
    """Why an export's importer cannot have taken it up: it took up the other one of the
    certificate and its replacement. An importer that follows SPEC §9.6 confirms the old
    certificate (and then refuses the replacement) or receives the replacement (and then
    holds the old one replaced), never both. Taken both, one shipment counted twice in
    this node's statistics, on the word of an importer whose own records count it once.
    A replacement still ``issued`` has had no answer: a confirmation of the old certificate
    may have crossed it (SPEC §9.5)."""
    successor = known.get((Side.EXPORT, record.replaced_by)) if record.replaced_by else None
    if (record.state is State.REPLACED and successor is not None
            and successor.state in (State.DELIVERED, State.CONFIRMED)):
        return (f"its importer has answered its replacement {successor.number} "
                f"({successor.state.value})")
    old = known.get((Side.EXPORT, record.replaces)) if record.replaces else None
    if old is not None and old.state is State.CONFIRMED:
        return f"its importer has confirmed {old.number}, the certificate it replaces"
    return None


def _on_confirmation(ctx: Context, env: Envelope, confirmation: ImportConfirmation,
                     known: Known) -> Decision:
    record = _own_record(env, confirmation.certificate, Side.EXPORT, known)
    if isinstance(record, Decision):
        return record
    if confirmation.certificate_digest != record.certificate_digest:
        return refuse(Reason.CERTIFICATE_DIGEST_MISMATCH, "confirmation names other "
                      "certificate bytes than the ones sent", certificate=record.number)
    if contradiction := _contradicts(record.certificate, confirmation):
        # An importer's node copies the importer and dates receipt between the date of
        # issue and its today: anything else was not written by one that follows SPEC.
        return refuse(Reason.CERTIFICATE_DIGEST_MISMATCH, f"the confirmation contradicts "
                      f"the certificate its digest names: {contradiction}",
                      certificate=record.number)
    if confirmation.received_on > ctx.today + timedelta(days=DAYS_AHEAD_ON_RECEIPT):
        return Decision(refusal=Refusal(
            str(Reason.BAD_DATE), f"received_on {confirmation.received_on.isoformat()} is "
            f"in the future (today is {ctx.today.isoformat()} UTC)",
            certificate=record.number, final=False))
    if record.state is State.CONFIRMED and record.confirmation == confirmation:
        return Decision()
    if why := _other_taken_up(record, known):
        return refuse(Reason.CERTIFICATE_WRONG_STATE, f"certificate {record.number} cannot "
                      f"be confirmed: {why}", certificate=record.number)
    if record.state in (State.CANCELLED, State.REPLACED):
        # The importer confirmed before our cancellation or replacement reached it (the
        # two crossed): the goods arrived under this certificate, and the importer refuses
        # what came after its confirmation. The confirmation wins, so both ends agree.
        # replaced_by goes: the importer refuses the replacement (it came after its
        # confirmation), and its record of this certificate names none.
        return Decision(records=(record.moved(
            State.CONFIRMED, ctx.now_ms, confirmation=confirmation, replaced_by=None,
            rejection_text=f"confirmed by {env.sender} before our {record.state.value} "
                           "reached it"),))
    if record.state not in (State.ISSUED, State.DELIVERED, State.EXPIRED):
        return refuse(Reason.CERTIFICATE_WRONG_STATE, f"certificate {record.number} is "
                      f"{record.state}; it cannot be confirmed", certificate=record.number)
    return Decision(records=(record.moved(State.CONFIRMED, ctx.now_ms,
                                          confirmation=confirmation),))


def _contradicts(certificate: Certificate, confirmation: ImportConfirmation) -> str | None:
    if confirmation.importer != certificate.importer:
        return "its importer is not the certificate's"
    if confirmation.received_on < certificate.issued_on:
        return (f"received_on {confirmation.received_on.isoformat()} is before issued_on "
                f"{certificate.issued_on.isoformat()}")
    return None


def _on_cancellation(ctx: Context, env: Envelope, cancellation: Cancellation,
                     known: Known) -> Decision:
    number = cancellation.certificate
    if (Side.IMPORT, number) not in known and number.startswith(env.sender):
        # The sender's own certificate, which has not arrived: the cancellation overtook
        # it. Accepted; the inbox and the evidence log keep it, and the certificate is
        # cancelled when it comes (Before). Numbers start with their issuer's code, so
        # this answer tells the sender nothing about anyone else's trade.
        return Decision()
    record = _own_record(env, number, Side.IMPORT, known)
    if isinstance(record, Decision):
        return record
    if record.state in (State.CANCELLED, State.REJECTED):
        return Decision()
    if record.state not in (State.RECEIVED, State.EXPIRED):
        return refuse(Reason.CERTIFICATE_WRONG_STATE, f"certificate {record.number} is "
                      f"{record.state}; it cannot be cancelled", certificate=record.number)
    return Decision(records=(record.moved(State.CANCELLED, ctx.now_ms,
                                          rejection_text=cancellation.reason),))


#: an export's states in which the importer's refusal of its own message rejects it
REJECTABLE_EXPORTS = frozenset({State.ISSUED, State.DELIVERED, State.CANCELLED, State.REPLACED,
                                State.EXPIRED})


def _on_rejection(ctx: Context, env: Envelope, rejection: Rejection, known: Known) -> Decision:
    if rejection.certificate is None:
        return Decision()  # a refused ping or similar: the evidence log keeps it
    record = known.get((side_of(rejection.certificate, ctx.me), rejection.certificate))
    if record is None or record.partner != env.sender:
        return Decision()
    fields = {"rejection_reason": rejection.reason, "rejection_text": rejection.text}
    if (record.side is Side.EXPORT and record.state in REJECTABLE_EXPORTS
            and env.in_reply_to == record.message_id):
        # Only the answer to the certificate's own message rejects it: a rejection of
        # another frame naming the number (a duplicate, a stray copy) must not. It does so
        # also when this node has cancelled, replaced or expired the certificate since:
        # the importer refused the certificate itself and holds it rejected, so must we.
        # Left "replaced", a later refusal of the replacement's own replacement put it back
        # to "issued" and it was resent for ever, each time answered with this rejection.
        records = [record.moved(State.REJECTED, ctx.now_ms, **fields)]
        old = known.get((Side.EXPORT, record.replaces)) if record.replaces else None
        if old is not None and old.state is State.REPLACED and old.replaced_by == record.number:
            # The importer refused the replacement and still holds the old certificate,
            # open: so is ours again. As issued, it is resent (same message id) until
            # the importer's receipt says delivered once more.
            records.append(old.moved(
                State.ISSUED, ctx.now_ms, replaced_by=None,
                rejection_text=f"its replacement {record.number} was refused: "
                               f"{rejection.reason}"))
        return Decision(records=tuple(records))
    # A refused confirmation or cancellation: keep the state, record the refusal.
    return Decision(records=(record.moved(record.state, ctx.now_ms, **fields),))


# -- local commands -------------------------------------------------------------------


def with_valid_key(ctx: Context, decision: Decision) -> Decision:
    """A local command's decision, or a refusal when it would send a message signed with a
    key the registry does not hold valid now: every partner would dead-letter it while this
    node recorded it as sent, a loop that could never close."""
    fault = ctx.key_fault
    if fault is None or not decision.send or decision.refusal is not None:
        return decision
    return refuse(fault.reason, f"this node cannot sign: {fault.text}. Nothing was signed or "
                  "stored. Make a new key with 'kpnode key new', have the Chair add it to "
                  "the registry ('kpnode registry add-key', then publish) and restart the "
                  "node; see 'kpnode key show'",
                  certificate=decision.records[0].number if decision.records else None)


def issue(ctx: Context, certificate: Certificate, known: Known,
          replacing: tuple[Record, str] | None = None) -> Decision:
    """Issue a certificate (or, with ``replacing=(old, reason)``, its replacement)."""
    problems = _trade_problems(ctx, certificate, days_ahead=DAYS_AHEAD_AT_ISSUE)
    if certificate.issuer != ctx.me:
        problems.insert(0, Problem("issuer", Reason.SENDER_MISMATCH,
                                   f"this node issues for {ctx.me}, not {certificate.issuer}"))
    if certificate.issuing_authority != ctx.own_authority:
        problems.append(Problem("issuing_authority", Reason.AUTHORITY_UNKNOWN,
                                f"this node signs for {ctx.own_authority}, not "
                                f"{certificate.issuing_authority}"))
    if (Side.EXPORT, certificate.number) in known:
        problems.insert(0, Problem("number", Reason.CERTIFICATE_DUPLICATE_NUMBER,
                                   f"certificate {certificate.number} was already issued"))
    if replacing is not None and replacing[0].state not in OPEN_STATES | {State.EXPIRED}:
        old = replacing[0]
        problems.append(Problem("", Reason.CERTIFICATE_WRONG_STATE,
                                f"{old.number} is {old.state} and can no longer be replaced"))
    if replacing is not None and certificate.destination != replacing[0].partner:
        # Sent elsewhere, the replacement would leave the old certificate replaced here
        # and open at its importer, who never hears of it.
        old = replacing[0]
        problems.append(Problem("destination", Reason.RECIPIENT_MISMATCH,
                                f"a replacement goes to {old.number}'s importer "
                                f"{old.partner}, not {certificate.destination}: cancel "
                                f"{old.number} and issue a new certificate instead"))
    if problems:
        # every problem with the path of its field (the API's validate lists them all)
        return refuse(problems[0].reason, "; ".join(p.message for p in problems),
                      certificate=certificate.number, problems=tuple(problems))
    payload: Payload = certificate
    if replacing is not None:
        payload = Replacement(replaces=replacing[0].number, reason=replacing[1],
                              certificate=certificate)
        try:  # the rules the partner applies: a reason it refuses would split the records
            validate_replacement(payload.to_wire())
        except ProtocolError as exc:
            return refuse(exc.reason, exc.text, problems=exc.problems,
                          certificate=certificate.number)
    sealed = ctx.seal(certificate.destination, payload)
    record = Record(
        side=Side.EXPORT, number=certificate.number, partner=certificate.destination,
        state=State.ISSUED, certificate=certificate,
        certificate_digest=_digest(sealed.frame), message_id=sealed.envelope.message_id,
        updated_at=ctx.now_ms, replaces=replacing[0].number if replacing else None,
    )
    records = [record]
    if replacing is not None:
        records.append(replacing[0].moved(State.REPLACED, ctx.now_ms,
                                          replaced_by=certificate.number,
                                          rejection_text=replacing[1]))
    return Decision(records=tuple(records), send=(sealed,))


def _digest(frame: bytes) -> bytes:
    return parse_frame(frame).digest


def cancel(ctx: Context, record: Record, reason: str) -> Decision:
    if record.side is not Side.EXPORT:
        return refuse(Reason.CERTIFICATE_WRONG_STATE,
                      f"{record.number} is an import; only its issuer can cancel it")
    if record.state not in OPEN_STATES | {State.EXPIRED}:
        return refuse(Reason.CERTIFICATE_WRONG_STATE,
                      f"{record.number} is {record.state}; it can no longer be cancelled")
    if not reason.strip():
        return refuse(Reason.REQUIRED, "a cancellation needs a reason")
    cancellation = Cancellation(certificate=record.number, reason=reason)
    try:  # the rules the partner applies: a reason it refuses would split the records
        validate_cancellation(cancellation.to_wire())
    except ProtocolError as exc:
        return refuse(exc.reason, exc.text, problems=exc.problems, certificate=record.number)
    sealed = ctx.seal(record.partner, cancellation)
    return Decision(records=(record.moved(State.CANCELLED, ctx.now_ms,
                                          rejection_text=reason),), send=(sealed,))


def confirm(ctx: Context, record: Record, *, lines: tuple[Line, ...] | None = None,
            parcels: int | None = None, received_on: date | None = None,
            remarks: str = "") -> Decision:
    """Confirm an import: what arrived (by default, exactly what was declared)."""
    if record.side is not Side.IMPORT:
        return refuse(Reason.CERTIFICATE_WRONG_STATE,
                      f"{record.number} is an export; its importer confirms it")
    if record.state is not State.RECEIVED:
        return refuse(Reason.CERTIFICATE_WRONG_STATE,
                      f"{record.number} is {record.state}; only a received certificate "
                      "can be confirmed")
    day = received_on or ctx.today
    if day > ctx.today or day < record.certificate.issued_on:
        text = f"received_on {day.isoformat()} must lie between the date of issue and today"
        return refuse(Reason.BAD_DATE, text, problems=(Problem("received_on", Reason.BAD_DATE,
                                                               text),))
    certificate = record.certificate
    # where each line that is signed stands among those given (the others did not arrive)
    given_at: list[int] = []
    if lines is not None:
        given_at = [i for i, x in enumerate(lines) if x.carats_hundredths or x.usd_cents]
        lines, problems = arrived_lines(certificate.lines, lines)
        if problems:
            return refuse(problems[0].reason, f"{record.number}: {problems[0].message}; "
                          "nothing was confirmed", problems=problems)
    confirmation = ImportConfirmation(
        certificate=record.number, certificate_digest=record.certificate_digest,
        destination=ctx.me, importer=certificate.importer,
        lines=lines if lines is not None else certificate.lines,
        parcels=parcels if parcels is not None else certificate.parcels,
        received_on=day, remarks=remarks,
    )
    try:  # the same field rules a receiving node applies
        validate_import_confirmation(confirmation.to_wire())
    except ProtocolError as exc:
        # The lines checked are those that arrived: a problem's lines[j] is the j-th of
        # those, and named the given line at j (one given as not arrived, say) instead.
        return refuse(exc.reason, exc.text, problems=tuple(
            dataclasses.replace(p, path=_LINE_AT.sub(
                lambda m: f"lines[{given_at[int(m[1])]}]", p.path)) if given_at else p
            for p in exc.problems))
    sealed = ctx.seal(record.partner, confirmation)
    return Decision(records=(record.moved(State.CONFIRMED, ctx.now_ms,
                                          confirmation=confirmation),), send=(sealed,))


#: a problem's path into the lines of a confirmation, as the schema names it
_LINE_AT = re.compile(r"^lines\[(\d+)\]")


def arrived_lines(declared: tuple[Line, ...], given: tuple[Line, ...]
                  ) -> tuple[tuple[Line, ...], tuple[Problem, ...]]:
    """What arrived, from an importer's account of every declared line: ``(lines to sign,
    problems)``. A line of 0 carats and US$ 0 names a declared line that did not arrive
    (the wire has no zero line: it is left out of what is signed). Every declared line
    must be named: one left out would be signed as not arrived, irrevocably, and is far
    more often one not meant to differ, or its HS code mistyped. Lines not declared may
    be added (goods found in the shipment), as they arrived: not as 0 and 0."""
    problems: list[Problem] = []
    seen: set[str] = set()
    codes = {d.hs_code for d in declared}
    for i, line in enumerate(given):
        if line.hs_code in seen:
            problems.append(Problem(f"lines[{i}].hs_code", Reason.DUPLICATE_HS_CODE,
                                    f"HS code {line.hs_code} appears twice"))
        elif not (line.carats_hundredths or line.usd_cents) and line.hs_code not in codes:
            # Left out of what is signed, it would never be checked: a stray space or a
            # mistyped code said nothing, unseen, where the officer meant a declared line.
            problems.append(Problem(f"lines[{i}].hs_code", Reason.UNKNOWN_HS_CODE,
                                    f"HS {line.hs_code!r} is not declared: 0 carats and "
                                    "US$ 0 name a declared line that did not arrive"))
        seen.add(line.hs_code)
        if (line.carats_hundredths == 0) != (line.usd_cents == 0):
            zero = "carats_hundredths" if line.carats_hundredths == 0 else "usd_cents"
            problems.append(Problem(f"lines[{i}].{zero}", Reason.NOT_POSITIVE,
                                    f"must be > 0 for HS {line.hs_code}, which arrived (0 "
                                    "carats and US$ 0 for a line that did not)"))
    if missing := [d.hs_code for d in declared if d.hs_code not in seen]:
        problems.append(Problem("lines", Reason.REQUIRED,
                                f"the certificate declares HS {', '.join(missing)} too: give "
                                "every declared line as it arrived (0 carats and US$ 0 for "
                                "one that did not)"))
    arrived = tuple(x for x in given if x.carats_hundredths or x.usd_cents)
    if given and not arrived:
        problems.append(Problem("lines", Reason.REQUIRED,
                                "every line given as not arrived (0 carats and US$ 0): a "
                                "confirmation says what arrived"))
    return arrived, tuple(problems)


def expire(ctx: Context, records: Iterable[Record]) -> Decision:
    """Open loops past their certificate's expiry become ``expired``: overdue, to chase."""
    moved = tuple(r.moved(State.EXPIRED, ctx.now_ms) for r in records
                  if r.state in OPEN_STATES and r.certificate.expires_on < ctx.today)
    return Decision(records=moved)


def ping(ctx: Context, partner: str, nonce: bytes) -> Decision:
    if len(nonce) != NONCE_SIZE:  # signed all the same, a frame no receiver could decode
        return refuse(Reason.BODY_SCHEMA, f"a ping's nonce is {NONCE_SIZE} bytes, not "
                      f"{len(nonce)}")
    return Decision(send=(ctx.seal(partner, Ping(nonce=nonce)),))


__all__ = [
    "OPEN_STATES", "Admitted", "Before", "Context", "Decision", "Discrepancy", "Record",
    "Refusal", "Sealed", "Side", "State", "admit", "arrived_lines", "arriving", "cancel", "confirm",
    "discrepancies", "expire", "issue", "ping", "receive", "rejection_for", "side_of",
    "signed_afresh", "touches", "with_valid_key",
]

