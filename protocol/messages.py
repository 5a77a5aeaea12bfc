"""Typed, immutable message types: what a signed kpx body can say.

Every type has ``to_wire()``, giving the plain map that :mod:`protocol.codec` encodes
into canonical msgpack. The reverse direction — wire map to typed message, with every
problem reported — lives in :mod:`protocol.schema`, so an object of these types is always
either built by this program or fully validated.

Amounts are integers: carats in hundredths of a carat, values in US$ cents. Dates are
``datetime.date`` (``YYYY-MM-DD`` on the wire); instants are integer milliseconds since the
Unix epoch, UTC.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any

from protocol.errors import Problem

#: HS codes a KP certificate may carry (rough diamonds, Chapter 71.02).
HS_CODES: dict[str, str] = {
    "7102.10": "unsorted",
    "7102.21": "industrial",
    "7102.31": "non-industrial",
}

#: The sender of registry updates: the KP Chair, which is not a Participant.
CHAIR = "KPCS"
#: The recipient of messages meant for every node (registry updates).
BROADCAST = "*"
#: The origin value for a parcel of mixed origin.
MIXED_ORIGIN = "MIXED"


class Kind(StrEnum):
    CERTIFICATE = "certificate"
    RECEIPT = "receipt"
    IMPORT_CONFIRMATION = "import_confirmation"
    REJECTION = "rejection"
    CANCELLATION = "cancellation"
    REPLACEMENT = "replacement"
    REGISTRY_UPDATE = "registry_update"
    PING = "ping"
    PONG = "pong"


class ParticipantStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    WITHDRAWN = "withdrawn"


@dataclass(frozen=True, slots=True, kw_only=True)
class Party:
    """An exporter or importer: name and address as printed on the certificate."""

    name: str
    address: str

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address}


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One HS-code line: carats (hundredths) and US$ value (cents) under that code."""

    hs_code: str
    carats_hundredths: int
    usd_cents: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "hs_code": self.hs_code,
            "carats_hundredths": self.carats_hundredths,
            "usd_cents": self.usd_cents,
        }


def _lines_total(lines: tuple[Line, ...]) -> tuple[int, int]:
    return sum(x.carats_hundredths for x in lines), sum(x.usd_cents for x in lines)


@dataclass(frozen=True, slots=True, kw_only=True)
class Certificate:
    """A KP certificate: the minimum elements of KPCS Annex I.

    The exporting authority's validation is the signature of the frame that carries it.
    """

    number: str
    issuer: str
    issuing_authority: str
    destination: str
    origins: tuple[str, ...]
    exporter: Party
    importer: Party
    lines: tuple[Line, ...]
    parcels: int
    issued_on: date
    expires_on: date
    remarks: str = ""

    @property
    def carats_hundredths(self) -> int:
        return _lines_total(self.lines)[0]

    @property
    def usd_cents(self) -> int:
        return _lines_total(self.lines)[1]

    def to_wire(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "issuer": self.issuer,
            "issuing_authority": self.issuing_authority,
            "destination": self.destination,
            "origins": list(self.origins),
            "exporter": self.exporter.to_wire(),
            "importer": self.importer.to_wire(),
            "lines": [x.to_wire() for x in self.lines],
            "parcels": self.parcels,
            "issued_on": self.issued_on.isoformat(),
            "expires_on": self.expires_on.isoformat(),
            "remarks": self.remarks,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """The importing node's automatic acknowledgement: certificate received and accepted.

    ``certificate_digest`` is the SHA-256 of the certificate's whole frame, so the receipt
    binds to exactly the signed bytes the importer holds.
    """

    certificate: str
    certificate_digest: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"certificate": self.certificate, "certificate_digest": self.certificate_digest}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportConfirmation:
    """The return part of a certificate (KPCS Annex I, recommended): what arrived."""

    certificate: str
    certificate_digest: bytes
    destination: str
    importer: Party
    lines: tuple[Line, ...]
    parcels: int
    received_on: date
    remarks: str = ""

    @property
    def carats_hundredths(self) -> int:
        return _lines_total(self.lines)[0]

    @property
    def usd_cents(self) -> int:
        return _lines_total(self.lines)[1]

    def to_wire(self) -> dict[str, Any]:
        return {
            "certificate": self.certificate,
            "certificate_digest": self.certificate_digest,
            "destination": self.destination,
            "importer": self.importer.to_wire(),
            "lines": [x.to_wire() for x in self.lines],
            "parcels": self.parcels,
            "received_on": self.received_on.isoformat(),
            "remarks": self.remarks,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """A refusal, with a stable reason code, a human text, and every problem found.

    ``reason`` is kept as a string so that a code added by a newer peer still parses.
    """

    reason: str
    text: str
    certificate: str | None = None
    problems: tuple[Problem, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "reason": str(self.reason),  # a Reason member is welcome here
            "text": self.text,
            "certificate": self.certificate,
            "problems": [p.to_wire() for p in self.problems],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancellation:
    """The exporter withdraws a certificate before the import is confirmed."""

    certificate: str
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"certificate": self.certificate, "reason": str(self.reason)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Replacement:
    """A new certificate that replaces one issued in error; both ends record the link."""

    replaces: str
    reason: str
    certificate: Certificate

    def to_wire(self) -> dict[str, Any]:
        return {
            "replaces": self.replaces,
            "reason": self.reason,
            "certificate": self.certificate.to_wire(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryKey:
    """One Ed25519 node key of an issuing authority, with its validity window (ms)."""

    public_key: bytes
    valid_from: int
    valid_until: int | None = None
    revoked_at: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "public_key": self.public_key,
            "valid_from": self.valid_from,
            "valid_until": self.valid_until,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Authority:
    """An issuing authority of a Participant (the EU has several)."""

    id: str
    name: str
    keys: tuple[RegistryKey, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "keys": [k.to_wire() for k in self.keys]}


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantEntry:
    code: str
    name: str
    status: ParticipantStatus
    authorities: tuple[Authority, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "status": str(self.status),
            "authorities": [a.to_wire() for a in self.authorities],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryUpdate:
    """The whole registry at one version, signed by the Chair. Versions only move forward."""

    version: int
    participants: tuple[ParticipantEntry, ...]
    embargoed_origins: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "participants": [p.to_wire() for p in self.participants],
            "embargoed_origins": list(self.embargoed_origins),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    nonce: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"nonce": self.nonce}


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    nonce: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"nonce": self.nonce}


Payload = (
    Certificate
    | Receipt
    | ImportConfirmation
    | Rejection
    | Cancellation
    | Replacement
    | RegistryUpdate
    | Ping
    | Pong
)

KIND_OF: dict[type[Any], Kind] = {
    Certificate: Kind.CERTIFICATE,
    Receipt: Kind.RECEIPT,
    ImportConfirmation: Kind.IMPORT_CONFIRMATION,
    Rejection: Kind.REJECTION,
    Cancellation: Kind.CANCELLATION,
    Replacement: Kind.REPLACEMENT,
    RegistryUpdate: Kind.REGISTRY_UPDATE,
    Ping: Kind.PING,
    Pong: Kind.PONG,
}


def new_message_id() -> str:
    """A fresh message id: 32 lowercase hex characters (a random UUID)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """The signed body: who says what to whom, when, and in answer to which message."""

    sender: str
    recipient: str
    created_at: int
    payload: Payload
    in_reply_to: str | None = None
    message_id: str = field(default_factory=new_message_id)

    @property
    def kind(self) -> Kind:
        return KIND_OF[type(self.payload)]

    def to_wire(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "kind": str(self.kind),
            "sender": self.sender,
            "recipient": self.recipient,
            "created_at": self.created_at,
            "in_reply_to": self.in_reply_to,
            "payload": self.payload.to_wire(),
        }
