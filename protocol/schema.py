"""Wire map → typed message, reporting every problem at once.

A reader walks the decoded map, records a :class:`~protocol.errors.Problem` for each fault
(with its field path, e.g. ``payload.lines[1].carats_hundredths``) and keeps going, using
placeholder values so the walk can finish; only a walk that recorded no problem yields an
object. Nothing here looks at the clock or the registry: time- and registry-dependent
rules (expired, suspended, embargoed) are the node's decisions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import date
from typing import TypeVar

from protocol.errors import Problem, ValidationError
from protocol.messages import (
    BROADCAST,
    CHAIR,
    HS_CODES,
    MIXED_ORIGIN,
    Authority,
    Cancellation,
    Certificate,
    Envelope,
    ImportConfirmation,
    Kind,
    Line,
    ParticipantEntry,
    ParticipantStatus,
    Party,
    Payload,
    Ping,
    Pong,
    Receipt,
    RegistryKey,
    RegistryUpdate,
    Rejection,
    Replacement,
)
from protocol.reasons import Reason

T = TypeVar("T")

PARTICIPANT_CODE = re.compile(r"[A-Z]{2}")
MESSAGE_ID = re.compile(r"[0-9A-Za-z_-]{16,64}")
CERTIFICATE_NUMBER = re.compile(r"[A-Z]{2}[A-Z0-9/-]{1,38}")
AUTHORITY_ID = re.compile(r"[A-Z]{2}[A-Za-z0-9_.-]{0,38}")
REASON_CODE = re.compile(r"[a-z_]+(\.[a-z_]+)+")
DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # ASCII digits only, unlike \d

MAX_NAME = 200
MAX_ADDRESS = 500
MAX_TEXT = 2000
MAX_CARATS_HUNDREDTHS = 10**12  # ten billion carats: far above any shipment
MAX_USD_CENTS = 10**15
MAX_PARCELS = 1_000_000
MAX_PROBLEMS = 100
MAX_ORIGINS = 50
MAX_PARTICIPANTS = 500
MAX_AUTHORITIES = 50
MAX_KEYS = 20
MAX_INSTANT = 2**53  # ms; keeps instants exact in any language's doubles, too
DIGEST_SIZE = 32
PUBLIC_KEY_SIZE = 32
NONCE_SIZE = 16

_PLACEHOLDER_DATE = date(1970, 1, 1)
#: Stands for a missing nested map, so its parser records nothing more.
ABSENT = object()


def join(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a lone surrogate cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Reader:
    """Reads one wire map, recording every problem instead of stopping at the first.

    Readers of a value that is missing or wrong record a problem and return a placeholder
    of the right type, so parsing code stays straight-line and fully typed; the caller
    throws the built object away when any problem was recorded.
    """

    def __init__(
        self, problems: list[Problem], value: object, path: str, fields: tuple[str, ...]
    ) -> None:
        self.problems = problems
        self.path = path
        self.data: dict[str, object] | None = None
        if value is ABSENT:  # already reported as required by the parent
            return
        if not isinstance(value, dict):
            self.problem(path, Reason.WRONG_TYPE, f"must be a map, not {_type_name(value)}")
            return
        for key in value:
            if not isinstance(key, str):
                self.problem(path, Reason.WRONG_TYPE, "map keys must be strings")
                return
        self.data = value
        for key in sorted(set(value) - set(fields)):
            self.problem(join(path, key), Reason.UNKNOWN_FIELD, "unknown field")
        for key in fields:
            if key not in value:
                self.problem(join(path, key), Reason.REQUIRED, "is required")

    def problem(self, path: str, reason: Reason, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(path, reason, message))

    def raw(self, key: str) -> tuple[str, object, bool]:
        """The value at ``key`` with its path; ``False`` when absent (already reported)."""
        path = join(self.path, key)
        if self.data is None or key not in self.data:
            return path, None, False
        return path, self.data[key], True

    def text(
        self,
        key: str,
        *,
        max_len: int,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
        allow_empty: bool = False,
    ) -> str:
        path, value, present = self.raw(key)
        return self.check_text(
            path, value, present, max_len=max_len, pattern=pattern, hint=hint,
            allow_empty=allow_empty,
        )

    def check_text(
        self,
        path: str,
        value: object,
        present: bool,
        *,
        max_len: int,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
        allow_empty: bool = False,
    ) -> str:
        if not present:
            return ""
        if not isinstance(value, str):
            self.problem(path, Reason.WRONG_TYPE, f"must be a string, not {_type_name(value)}")
            return ""
        if not value and not allow_empty:
            self.problem(path, Reason.EMPTY, "must not be empty")
        elif not value.isascii() and not encodable(value):
            # Only local input (JSON, a form) can hold a lone surrogate: the wire's UTF-8 is
            # decoded strictly. It could never be signed, so it is refused here.
            self.problem(path, Reason.BAD_FORMAT, "must be Unicode text (a lone surrogate "
                         "is not)")
        elif len(value) > max_len:
            self.problem(path, Reason.TOO_LONG, f"must be at most {max_len} characters")
        elif pattern is not None and not pattern.fullmatch(value):
            self.problem(path, Reason.BAD_FORMAT, f"must be {hint or pattern.pattern}")
        return value

    def optional_text(
        self, key: str, *, max_len: int, pattern: re.Pattern[str] | None = None, hint: str = ""
    ) -> str | None:
        path, value, present = self.raw(key)
        if present and value is None:
            return None
        return self.check_text(path, value, present, max_len=max_len, pattern=pattern, hint=hint)

    def code(self, key: str) -> str:
        return self.text(key, max_len=2, pattern=PARTICIPANT_CODE, hint="a participant code")

    def integer(self, key: str, *, minimum: int, maximum: int) -> int:
        path, value, present = self.raw(key)
        return self.check_integer(path, value, present, minimum=minimum, maximum=maximum)

    def check_integer(
        self, path: str, value: object, present: bool, *, minimum: int, maximum: int
    ) -> int:
        if not present:
            return minimum
        if isinstance(value, float):
            self.problem(path, Reason.FLOAT_NOT_ALLOWED, "must be an integer, not a float")
            return minimum
        # bool is an int subclass in Python; on the wire it is its own type.
        if type(value) is not int:
            self.problem(path, Reason.WRONG_TYPE, f"must be an integer, not {_type_name(value)}")
            return minimum
        if value < minimum:
            if minimum == 1 and value <= 0:
                self.problem(path, Reason.NOT_POSITIVE, "must be > 0")
            else:
                self.problem(path, Reason.NEGATIVE, f"must be >= {minimum}")
        elif value > maximum:
            self.problem(path, Reason.TOO_LARGE, f"must be <= {maximum}")
        return value

    def optional_integer(self, key: str, *, minimum: int, maximum: int) -> int | None:
        path, value, present = self.raw(key)
        if present and value is None:
            return None
        return self.check_integer(path, value, present, minimum=minimum, maximum=maximum)

    def day(self, key: str) -> date:
        return self.valid_day(key) or _PLACEHOLDER_DATE

    def valid_day(self, key: str) -> date | None:
        """The date at ``key``, or ``None`` (a problem recorded) when it is not one."""
        path, value, present = self.raw(key)
        text = self.check_text(
            path, value, present, max_len=10, pattern=DATE, hint="a date YYYY-MM-DD"
        )
        if not DATE.fullmatch(text):
            return None
        try:
            return date.fromisoformat(text)
        except ValueError:
            self.problem(path, Reason.BAD_DATE, "is not a calendar date")
            return None

    def blob(self, key: str, *, size: int) -> bytes:
        path, value, present = self.raw(key)
        if not present:
            return b""
        if not isinstance(value, bytes):
            self.problem(path, Reason.WRONG_TYPE, f"must be binary, not {_type_name(value)}")
            return b""
        if len(value) != size:
            self.problem(path, Reason.BAD_FORMAT, f"must be exactly {size} bytes")
        return value

    def items(
        self, key: str, *, max_items: int, min_items: int = 1
    ) -> Iterator[tuple[str, object]]:
        path, value, present = self.raw(key)
        if not present:
            return
        if not isinstance(value, list):
            self.problem(path, Reason.WRONG_TYPE, f"must be an array, not {_type_name(value)}")
            return
        if len(value) < min_items:
            self.problem(path, Reason.EMPTY, f"must have at least {min_items} item(s)")
        if len(value) > max_items:
            self.problem(path, Reason.TOO_LONG, f"must have at most {max_items} items")
            return
        for i, item in enumerate(value):
            yield f"{path}[{i}]", item

    def nested(self, key: str, parse: Callable[[list[Problem], object, str], T]) -> T:
        """Parse the map at ``key`` with another type's parser, sharing the problem list."""
        path, value, present = self.raw(key)
        return parse(self.problems, value if present else ABSENT, path)


def _type_name(value: object) -> str:
    names = {
        type(None): "nil", bool: "a boolean", int: "an integer", float: "a float",
        str: "a string", bytes: "binary", list: "an array", dict: "a map",
    }
    return names.get(type(value), type(value).__name__)


# -- the message types ---------------------------------------------------------------


def _party(problems: list[Problem], value: object, path: str) -> Party:
    r = Reader(problems, value, path, ("name", "address"))
    return Party(
        name=r.text("name", max_len=MAX_NAME), address=r.text("address", max_len=MAX_ADDRESS)
    )


def _lines(r: Reader) -> tuple[Line, ...]:
    lines = []
    seen: set[str] = set()
    for path, item in r.items("lines", max_items=len(HS_CODES)):
        lr = Reader(r.problems, item, path, ("hs_code", "carats_hundredths", "usd_cents"))
        hs_path, hs, present = lr.raw("hs_code")
        hs_code = lr.check_text(hs_path, hs, present, max_len=7)
        if hs_code and hs_code not in HS_CODES:
            lr.problem(
                hs_path, Reason.UNKNOWN_HS_CODE,
                f"unknown HS code {hs_code[:12]!r}; expected one of {', '.join(HS_CODES)}",
            )
        elif hs_code and hs_code in seen:  # a missing code is no duplicate of another
            lr.problem(hs_path, Reason.DUPLICATE_HS_CODE, f"HS code {hs_code} appears twice")
        seen.add(hs_code)
        lines.append(
            Line(
                hs_code=hs_code,
                carats_hundredths=lr.integer(
                    "carats_hundredths", minimum=1, maximum=MAX_CARATS_HUNDREDTHS
                ),
                usd_cents=lr.integer("usd_cents", minimum=1, maximum=MAX_USD_CENTS),
            )
        )
    return tuple(lines)


CERTIFICATE_FIELDS = (
    "number", "issuer", "issuing_authority", "destination", "origins", "exporter",
    "importer", "lines", "parcels", "issued_on", "expires_on", "remarks",
)


def parse_certificate(problems: list[Problem], value: object, path: str = "") -> Certificate:
    r = Reader(problems, value, path, CERTIFICATE_FIELDS)
    number = r.text("number", max_len=40, pattern=CERTIFICATE_NUMBER,
                    hint="2 upper-case letters then up to 38 of A-Z 0-9 / -")
    issuer = r.code("issuer")
    authority = r.text("issuing_authority", max_len=40, pattern=AUTHORITY_ID,
                       hint="an authority id starting with its participant code")
    destination = r.code("destination")
    origins = []
    for opath, item in r.items("origins", max_items=MAX_ORIGINS):
        origin = r.check_text(opath, item, True, max_len=5)
        if origin and origin != MIXED_ORIGIN and not PARTICIPANT_CODE.fullmatch(origin):
            r.problem(opath, Reason.BAD_FORMAT, f"must be a country code or {MIXED_ORIGIN!r}")
        origins.append(origin)
    exporter = r.nested("exporter", _party)
    importer = r.nested("importer", _party)
    lines = _lines(r)
    parcels = r.integer("parcels", minimum=1, maximum=MAX_PARCELS)
    issued_on = r.valid_day("issued_on")
    expires_on = r.valid_day("expires_on")
    remarks = r.text("remarks", max_len=MAX_TEXT, allow_empty=True)
    if number and issuer and not number.startswith(issuer):
        r.problem(join(path, "number"), Reason.NUMBER_PREFIX,
                  f"must start with the issuer's code {issuer}")
    if issuer and authority and not authority.startswith(issuer):
        r.problem(join(path, "issuing_authority"), Reason.BAD_FORMAT,
                  f"must be an authority of the issuer {issuer}")
    if issuer and issuer == destination:
        r.problem(join(path, "destination"), Reason.SELF_TRADE,
                  "must differ from the issuer")
    if issued_on is not None and expires_on is not None and expires_on <= issued_on:
        r.problem(join(path, "expires_on"), Reason.EXPIRY_BEFORE_ISSUE,
                  "must be after issued_on")
    return Certificate(
        number=number, issuer=issuer, issuing_authority=authority, destination=destination,
        origins=tuple(origins), exporter=exporter, importer=importer, lines=lines,
        parcels=parcels, issued_on=issued_on or _PLACEHOLDER_DATE,
        expires_on=expires_on or _PLACEHOLDER_DATE, remarks=remarks,
    )


def _receipt(problems: list[Problem], value: object, path: str) -> Receipt:
    r = Reader(problems, value, path, ("certificate", "certificate_digest"))
    return Receipt(
        certificate=r.text("certificate", max_len=40, pattern=CERTIFICATE_NUMBER),
        certificate_digest=r.blob("certificate_digest", size=DIGEST_SIZE),
    )


CONFIRMATION_FIELDS = (
    "certificate", "certificate_digest", "destination", "importer", "lines", "parcels",
    "received_on", "remarks",
)


def parse_import_confirmation(
    problems: list[Problem], value: object, path: str = ""
) -> ImportConfirmation:
    r = Reader(problems, value, path, CONFIRMATION_FIELDS)
    return ImportConfirmation(
        certificate=r.text("certificate", max_len=40, pattern=CERTIFICATE_NUMBER),
        certificate_digest=r.blob("certificate_digest", size=DIGEST_SIZE),
        destination=r.code("destination"),
        importer=r.nested("importer", _party),
        lines=_lines(r),
        parcels=r.integer("parcels", minimum=1, maximum=MAX_PARCELS),
        received_on=r.day("received_on"),
        remarks=r.text("remarks", max_len=MAX_TEXT, allow_empty=True),
    )


def _rejection(problems: list[Problem], value: object, path: str) -> Rejection:
    r = Reader(problems, value, path, ("reason", "text", "certificate", "problems"))
    listed = []
    for ppath, item in r.items("problems", max_items=MAX_PROBLEMS, min_items=0):
        pr = Reader(problems, item, ppath, ("path", "reason", "message"))
        listed.append(
            Problem(
                pr.text("path", max_len=200, allow_empty=True),
                # Kept as text: a code added by a newer peer must still parse.
                pr.text("reason", max_len=64, pattern=REASON_CODE, hint="a reason code"),
                pr.text("message", max_len=MAX_TEXT),
            )
        )
    return Rejection(
        reason=r.text("reason", max_len=64, pattern=REASON_CODE, hint="a reason code"),
        text=r.text("text", max_len=MAX_TEXT),
        certificate=r.optional_text("certificate", max_len=40, pattern=CERTIFICATE_NUMBER),
        problems=tuple(listed),
    )


def _cancellation(problems: list[Problem], value: object, path: str) -> Cancellation:
    r = Reader(problems, value, path, ("certificate", "reason"))
    return Cancellation(
        certificate=r.text("certificate", max_len=40, pattern=CERTIFICATE_NUMBER),
        reason=r.text("reason", max_len=MAX_TEXT),
    )


def _replacement(problems: list[Problem], value: object, path: str) -> Replacement:
    r = Reader(problems, value, path, ("replaces", "reason", "certificate"))
    replaces = r.text("replaces", max_len=40, pattern=CERTIFICATE_NUMBER)
    certificate = r.nested("certificate", parse_certificate)
    if replaces and replaces == certificate.number:
        r.problem(join(path, "replaces"), Reason.BAD_FORMAT, "must differ from the new number")
    elif replaces and certificate.issuer and not replaces.startswith(certificate.issuer):
        # A Participant replaces only its own certificates: naming another's, the new one
        # was received with a link to a certificate its sender never issued.
        r.problem(join(path, "replaces"), Reason.NUMBER_PREFIX,
                  f"must start with the issuer's code {certificate.issuer}")
    return Replacement(replaces=replaces, reason=r.text("reason", max_len=MAX_TEXT),
                       certificate=certificate)


def _registry_key(problems: list[Problem], value: object, path: str) -> RegistryKey:
    r = Reader(problems, value, path, ("public_key", "valid_from", "valid_until", "revoked_at"))
    return RegistryKey(
        public_key=r.blob("public_key", size=PUBLIC_KEY_SIZE),
        valid_from=r.integer("valid_from", minimum=0, maximum=MAX_INSTANT),
        valid_until=r.optional_integer("valid_until", minimum=0, maximum=MAX_INSTANT),
        revoked_at=r.optional_integer("revoked_at", minimum=0, maximum=MAX_INSTANT),
    )


def _authority(problems: list[Problem], value: object, path: str) -> Authority:
    r = Reader(problems, value, path, ("id", "name", "keys"))
    return Authority(
        id=r.text("id", max_len=40, pattern=AUTHORITY_ID, hint="an authority id"),
        name=r.text("name", max_len=MAX_NAME),
        keys=tuple(_registry_key(problems, v, p) for p, v in r.items("keys", max_items=MAX_KEYS,
                                                                       min_items=0)),
    )


def _participant(problems: list[Problem], value: object, path: str) -> ParticipantEntry:
    r = Reader(problems, value, path, ("code", "name", "status", "authorities"))
    spath, status_value, present = r.raw("status")
    status_text = r.check_text(spath, status_value, present, max_len=20)
    status = ParticipantStatus.WITHDRAWN
    if status_text:
        try:
            status = ParticipantStatus(status_text)
        except ValueError:
            r.problem(spath, Reason.BAD_FORMAT,
                      f"must be one of {', '.join(s.value for s in ParticipantStatus)}")
    return ParticipantEntry(
        code=r.code("code"),
        name=r.text("name", max_len=MAX_NAME),
        status=status,
        authorities=tuple(
            _authority(problems, v, p)
            for p, v in r.items("authorities", max_items=MAX_AUTHORITIES, min_items=0)
        ),
    )


def parse_registry(problems: list[Problem], value: object, path: str) -> RegistryUpdate:
    r = Reader(problems, value, path, ("version", "participants", "embargoed_origins"))
    version = r.integer("version", minimum=1, maximum=2**63 - 1)
    participants = tuple(
        _participant(problems, v, p)
        for p, v in r.items("participants", max_items=MAX_PARTICIPANTS, min_items=0)
    )
    embargoed = [
        r.check_text(p, v, True, max_len=2, pattern=PARTICIPANT_CODE, hint="a country code")
        for p, v in r.items("embargoed_origins", max_items=MAX_PARTICIPANTS, min_items=0)
    ]
    codes = [p.code for p in participants if p.code]  # a missing code repeats nothing
    # One key under two entries: which Participant would a signature by it speak for?
    keys = [k.public_key for p in participants for a in p.authorities for k in a.keys
            if len(k.public_key) == PUBLIC_KEY_SIZE]
    if len(set(codes)) != len(codes) or len(set(keys)) != len(keys):
        r.problem(join(path, "participants"), Reason.BAD_FORMAT,
                  "participant codes or public keys repeat")
    return RegistryUpdate(version=version, participants=participants,
                          embargoed_origins=tuple(embargoed))


def _ping(problems: list[Problem], value: object, path: str) -> Ping:
    return Ping(nonce=Reader(problems, value, path, ("nonce",)).blob("nonce", size=NONCE_SIZE))


def _pong(problems: list[Problem], value: object, path: str) -> Pong:
    return Pong(nonce=Reader(problems, value, path, ("nonce",)).blob("nonce", size=NONCE_SIZE))


PAYLOAD_PARSERS: dict[Kind, Callable[[list[Problem], object, str], Payload]] = {
    Kind.CERTIFICATE: parse_certificate,
    Kind.RECEIPT: _receipt,
    Kind.IMPORT_CONFIRMATION: parse_import_confirmation,
    Kind.REJECTION: _rejection,
    Kind.CANCELLATION: _cancellation,
    Kind.REPLACEMENT: _replacement,
    Kind.REGISTRY_UPDATE: parse_registry,
    Kind.PING: _ping,
    Kind.PONG: _pong,
}

ENVELOPE_FIELDS = (
    "message_id", "kind", "sender", "recipient", "created_at", "in_reply_to", "payload",
)


def parse_envelope(value: object) -> Envelope:
    """A decoded body map → :class:`Envelope`, or :class:`ValidationError` listing all faults."""
    problems: list[Problem] = []
    r = Reader(problems, value, "", ENVELOPE_FIELDS)
    message_id = r.text("message_id", max_len=64, pattern=MESSAGE_ID,
                        hint="16-64 characters of A-Z a-z 0-9 _ -")
    kpath, kvalue, present = r.raw("kind")
    kind_text = r.check_text(kpath, kvalue, present, max_len=32)
    kind: Kind | None = None
    if kind_text:
        try:
            kind = Kind(kind_text)
        except ValueError:
            r.problem(kpath, Reason.UNKNOWN_KIND, f"unknown message kind {kind_text!r}")
    is_registry = kind is Kind.REGISTRY_UPDATE
    party = re.compile(re.escape(CHAIR)) if is_registry else PARTICIPANT_CODE
    sender = r.text("sender", max_len=4, pattern=party,
                    hint=f"{CHAIR!r}" if is_registry else "a participant code")
    to = re.compile(re.escape(BROADCAST)) if is_registry else PARTICIPANT_CODE
    recipient = r.text("recipient", max_len=2, pattern=to,
                       hint=f"{BROADCAST!r}" if is_registry else "a participant code")
    created_at = r.integer("created_at", minimum=0, maximum=MAX_INSTANT)
    in_reply_to = r.optional_text("in_reply_to", max_len=64, pattern=MESSAGE_ID,
                                  hint="a message id")
    ppath, pvalue, present = r.raw("payload")
    payload: Payload = Ping(nonce=b"")
    if kind is not None and present:
        payload = PAYLOAD_PARSERS[kind](problems, pvalue, ppath)
        _check_parties(r, payload, sender, recipient)
    if problems:
        raise ValidationError(tuple(problems))
    return Envelope(message_id=message_id, sender=sender, recipient=recipient,
                    created_at=created_at, in_reply_to=in_reply_to, payload=payload)


def _check_parties(r: Reader, payload: Payload, sender: str, recipient: str) -> None:
    """The payload's own parties must be the envelope's: a certificate cannot be relabelled."""
    certificate = payload.certificate if isinstance(payload, Replacement) else payload
    base = "payload.certificate" if isinstance(payload, Replacement) else "payload"
    if isinstance(certificate, Certificate):
        if sender and certificate.issuer and certificate.issuer != sender:
            r.problem(join(base, "issuer"), Reason.SENDER_MISMATCH,
                      f"is {certificate.issuer} but the message is from {sender}")
        if recipient and certificate.destination and certificate.destination != recipient:
            r.problem(join(base, "destination"), Reason.RECIPIENT_MISMATCH,
                      f"is {certificate.destination} but the message is to {recipient}")
    if isinstance(payload, ImportConfirmation) and payload.destination and sender and (
        payload.destination != sender
    ):
        r.problem("payload.destination", Reason.SENDER_MISMATCH,
                  f"is {payload.destination} but the confirmation is from {sender}")
    if sender and sender == recipient:
        r.problem("recipient", Reason.SELF_TRADE, "must differ from the sender")


def validate(
    parse: Callable[[list[Problem], object, str], T], value: object, what: str = "message"
) -> T:
    """Run one payload parser on its own; raise :class:`ValidationError` on any problem."""
    problems: list[Problem] = []
    result = parse(problems, value, "")
    if problems:
        raise ValidationError(tuple(problems), f"{what} is not valid")
    return result


def validate_certificate(value: object) -> Certificate:
    """Check a certificate on its own (``kpnode validate``): all problems, or the object."""
    return validate(parse_certificate, value, "certificate")


def validate_import_confirmation(value: object) -> ImportConfirmation:
    return validate(parse_import_confirmation, value, "import confirmation")


def validate_cancellation(value: object) -> Cancellation:
    return validate(_cancellation, value, "cancellation")


def validate_replacement(value: object) -> Replacement:
    return validate(_replacement, value, "replacement")
