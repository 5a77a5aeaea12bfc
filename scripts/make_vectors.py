"""Generate the kpx test vectors: ``protocol/vectors/frames.json``.

Deterministic: fixed Ed25519 seeds, fixed message ids and instants, and Ed25519 signatures
are deterministic, so every run writes the same bytes. ``tests/test_vectors.py`` checks
that the file in the repository equals what this script produces.

Each vector states its expected verdict by hand (reason, and for ``body.schema`` the
problems); :func:`build` checks every one of them against the reference implementation
and refuses to write a file the code disagrees with. The file format is described in
``protocol/SPEC.md`` §12.

Usage::

    python scripts/make_vectors.py           # (re)write the file
    python scripts/make_vectors.py --check   # exit 1 if the file is not up to date
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import msgpack
from nacl.signing import SigningKey

from protocol.codec import pack
from protocol.errors import Problem, ProtocolError, SignatureError
from protocol.frame import (
    DOMAIN,
    HEADER,
    MAGIC,
    MAX_FRAME_SIZE,
    SIGNATURE_SIZE,
    VERSION,
    open_frame,
    seal,
    seal_body,
)
from protocol.keys import key_id
from protocol.messages import (
    MIXED_ORIGIN,
    Authority,
    Cancellation,
    Certificate,
    Envelope,
    ImportConfirmation,
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
from protocol.schema import MAX_PROBLEMS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "protocol" / "vectors" / "frames.json"

Wire = dict[str, Any]

# -- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestKey:
    name: str
    owner: str
    known: bool
    note: str

    @property
    def seed(self) -> bytes:
        return hashlib.sha256(b"kpx test vector key " + self.name.encode()).digest()

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def key_id(self) -> bytes:
        return key_id(self.public_key)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed_hex": self.seed.hex(),
            "public_key_hex": self.public_key.hex(),
            "key_id_hex": self.key_id.hex(),
        }


KEYS = {
    k.name: k
    for k in (
        TestKey("za", "ZA", True, "South Africa, authority ZA-SADPMR"),
        TestKey("bw", "BW", True, "Botswana, authority BW-MMGE"),
        TestKey("eu-be", "EU", True, "European Union, authority EU-BE-FPS (Antwerp)"),
        TestKey("eu-de", "EU", True, "European Union, authority EU-DE-ZOLL"),
        TestKey("chair", "KPCS", True, "the KP Chair: signs registry updates"),
        TestKey("rogue", "ZA", False, "a key the verifier does not know"),
    )
}
ZA, BW, EU, CHAIR_KEY, ROGUE = (KEYS[n] for n in ("za", "bw", "eu-be", "chair", "rogue"))


def trusted_key(kid: bytes) -> bytes:
    """The verifier's key policy for the vectors: the keys marked known."""
    for k in KEYS.values():
        if k.known and k.key_id == kid:
            return k.public_key
    raise SignatureError(Reason.KEY_UNKNOWN, f"key {kid.hex()} is not trusted")


# -- fixed ids and instants ---------------------------------------------------------------

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms


def mid(label: str) -> str:
    """A fixed 32-hex-character message id."""
    return hashlib.sha256(b"kpx test message " + label.encode()).hexdigest()[:32]


def nonce(label: str) -> bytes:
    return hashlib.sha256(b"kpx test nonce " + label.encode()).digest()[:16]


# -- the positive messages ------------------------------------------------------------------

REMARKS = (
    "Twelve parcels, sealed at the SADPMR office, Kimberley — seal numbers ZA-0001 … "
    "ZA-0012. Goods accompanied by the paper certificate with the same number. "
    "Valuation by the Government Diamond Valuator; mixed-origin parcels assessed under "
    "the KPCS system of warranties. Contact: kp-office@example.org. "
    "Inspección física realizada; 検査済み."
)
assert len(REMARKS.encode()) > 255  # exercises str16 in the canonical encoding

EXPORTER = Party(
    name="Kimberley Rough Exports (Pty) Ltd",
    address="1 Dutoitspan Road, Kimberley 8301, South Africa",
)
IMPORTER = Party(
    name="Antwerp Rough Trading NV",
    address="Hoveniersstraat 2, 2018 Antwerpen, Belgium",
)
LINES = (
    Line(hs_code="7102.10", carats_hundredths=1_234_567, usd_cents=98_765_432),
    Line(hs_code="7102.21", carats_hundredths=50_000, usd_cents=1_250_000),
    Line(hs_code="7102.31", carats_hundredths=250_075, usd_cents=375_011_250),
)
CERTIFICATE = Certificate(
    number="ZA/2026/000123",
    issuer="ZA",
    issuing_authority="ZA-SADPMR",
    destination="EU",
    origins=(MIXED_ORIGIN, "BW", "ZA"),
    exporter=EXPORTER,
    importer=IMPORTER,
    lines=LINES,
    parcels=12,
    issued_on=date(2026, 1, 5),
    expires_on=date(2026, 3, 5),
    remarks=REMARKS,
)


def envelope(
    label: str,
    sender: str,
    recipient: str,
    payload: Payload,
    *,
    at: int = 0,
    in_reply_to: str | None = None,
) -> Envelope:
    return Envelope(
        message_id=mid(label),
        sender=sender,
        recipient=recipient,
        created_at=T0 + at,
        in_reply_to=in_reply_to,
        payload=payload,
    )


CERT_ENV = envelope("certificate", "ZA", "EU", CERTIFICATE, at=4 * 86_400_000)
CERT_FRAME = seal(CERT_ENV, ZA.signing_key)
#: The base of the malformed and invalid bodies: the same certificate, shorter remarks.
SHORT_REMARKS = "Twelve sealed parcels."
BASE_ENV = dataclasses.replace(
    CERT_ENV, message_id=mid("certificate-base"),
    payload=dataclasses.replace(CERTIFICATE, remarks=SHORT_REMARKS),
)
CERT_DIGEST = hashlib.sha256(CERT_FRAME).digest()

RECEIPT_ENV = envelope(
    "receipt", "EU", "ZA",
    Receipt(certificate=CERTIFICATE.number, certificate_digest=CERT_DIGEST),
    at=4 * 86_400_000 + 1_250, in_reply_to=mid("certificate"),
)
CONFIRMATION_ENV = envelope(
    "import-confirmation", "EU", "ZA",
    ImportConfirmation(
        certificate=CERTIFICATE.number,
        certificate_digest=CERT_DIGEST,
        destination="EU",
        importer=IMPORTER,
        lines=(
            # 0.67 ct fewer unsorted goods arrived than were certified: recorded, not refused
            Line(hs_code="7102.10", carats_hundredths=1_234_500, usd_cents=98_765_432),
            Line(hs_code="7102.21", carats_hundredths=50_000, usd_cents=1_250_000),
            Line(hs_code="7102.31", carats_hundredths=250_075, usd_cents=375_011_250),
        ),
        parcels=12,
        received_on=date(2026, 1, 19),
        remarks="Parcel 7 seal intact; 0.67 ct short in 7102.10 on re-weighing.",
    ),
    at=18 * 86_400_000, in_reply_to=mid("certificate"),
)
REJECTION_ENV = envelope(
    "rejection", "BW", "ZA",
    Rejection(
        reason=Reason.BODY_SCHEMA,
        text="certificate ZA/2026/000124 is not valid",
        certificate="ZA/2026/000124",
        problems=(
            Problem("payload.lines[1].carats_hundredths", Reason.NOT_POSITIVE, "must be > 0"),
            Problem("payload.expires_on", Reason.EXPIRY_BEFORE_ISSUE, "must be after issued_on"),
        ),
    ),
    at=5 * 86_400_000, in_reply_to=mid("certificate-124"),
)
FUTURE_REJECTION_ENV = envelope(
    "rejection-future", "BW", "ZA",
    Rejection(
        reason="origin.traceability_review",
        text="a reason code added by a newer peer: still a valid rejection",
        certificate=None,
        problems=(),
    ),
    at=5 * 86_400_000 + 1, in_reply_to=mid("certificate-125"),
)
CANCELLATION_ENV = envelope(
    "cancellation", "ZA", "EU",
    Cancellation(certificate=CERTIFICATE.number,
                 reason="Issued in error: wrong importer address"),
    at=6 * 86_400_000,
)
REPLACEMENT = Replacement(
    replaces=CERTIFICATE.number,
    reason="Importer address corrected",
    certificate=Certificate(
        number="ZA/2026/000126",
        issuer="ZA",
        issuing_authority="ZA-SADPMR",
        destination="EU",
        origins=("ZA",),
        exporter=EXPORTER,
        importer=Party(name=IMPORTER.name,
                       address="Hoveniersstraat 22, 2018 Antwerpen, Belgium"),
        lines=(Line(hs_code="7102.31", carats_hundredths=250_075, usd_cents=375_011_250),),
        parcels=1,
        issued_on=date(2026, 1, 7),
        expires_on=date(2026, 3, 7),
        remarks="",
    ),
)
REPLACEMENT_ENV = envelope("replacement", "ZA", "EU", REPLACEMENT, at=6 * 86_400_000 + 5)


def _rkey(k: TestKey, valid_from: int, until: int | None = None,
          revoked: int | None = None) -> RegistryKey:
    return RegistryKey(public_key=k.public_key, valid_from=valid_from, valid_until=until,
                       revoked_at=revoked)


REGISTRY = RegistryUpdate(
    version=7,
    participants=(
        ParticipantEntry(code="BW", name="Botswana", status=ParticipantStatus.ACTIVE,
                         authorities=(Authority(id="BW-MMGE", name="Ministry of Minerals",
                                                keys=(_rkey(BW, T0 - 10**10),)),)),
        ParticipantEntry(code="CF", name="Central African Republic",
                         status=ParticipantStatus.SUSPENDED, authorities=()),
        ParticipantEntry(
            code="EU", name="European Union", status=ParticipantStatus.ACTIVE,
            authorities=(
                Authority(id="EU-BE-FPS", name="FPS Economy, Antwerp",
                          keys=(_rkey(EU, T0 - 10**10),)),
                Authority(id="EU-DE-ZOLL", name="Zoll, Frankfurt",
                          keys=(_rkey(KEYS["eu-de"], T0 - 10**10, until=T0 + 10**11),
                                _rkey(ROGUE, T0 - 2 * 10**10, revoked=T0 - 10**10))),
            ),
        ),
        ParticipantEntry(code="ZA", name="South Africa", status=ParticipantStatus.ACTIVE,
                         authorities=(Authority(id="ZA-SADPMR", name="SADPMR",
                                                keys=(_rkey(ZA, T0 - 10**10),)),)),
        ParticipantEntry(code="ZZ", name="Example Withdrawn Participant",
                         status=ParticipantStatus.WITHDRAWN, authorities=()),
    ),
    embargoed_origins=("CF",),
)
REGISTRY_ENV = envelope("registry", "KPCS", "*", REGISTRY, at=0)
PING_ENV = envelope("ping", "ZA", "BW", Ping(nonce=nonce("ping")), at=60_000)
PONG_ENV = envelope("pong", "BW", "ZA", Pong(nonce=nonce("ping")), at=60_042,
                    in_reply_to=mid("ping"))

# -- raw encoding helpers ---------------------------------------------------------------------


def frame_with(body: bytes, key: TestKey, *, magic: bytes = MAGIC, version: int = VERSION,
               kid: bytes | None = None, length: int | None = None,
               domain: bytes = DOMAIN) -> bytes:
    """A frame with any header field overridden, signed over what it actually says."""
    header = HEADER.pack(magic, version, key.key_id if kid is None else kid,
                         len(body) if length is None else length)
    return header + body + key.signing_key.sign(domain + header + body).signature


def body_of(frame: bytes) -> bytes:
    return frame[HEADER.size:-SIGNATURE_SIZE]


def wire(env: Envelope) -> Wire:
    return copy.deepcopy(env.to_wire())


def raw_str(text: str) -> bytes:
    return msgpack.packb(text, use_bin_type=True)


def raw_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already encoded keys and values, in the order given."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in pairs)


def canonical_pairs(value: Wire) -> list[tuple[bytes, bytes]]:
    return [(raw_str(k), pack(value[k])) for k in sorted(value, key=lambda k: k.encode())]


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, (old, data.count(old))
    return data.replace(old, new)


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def to_json(value: Any) -> Any:
    """The JSON form of a decoded body (SPEC.md §12): bin as lowercase hex."""
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


# -- vector collection ------------------------------------------------------------------------


@dataclass
class Vector:
    name: str
    description: str
    signer: TestKey | None
    frame: bytes
    stage: str
    reason: str | None = None
    problems: list[tuple[str, str]] | None = None


VECTORS: list[Vector] = []


def accept(name: str, description: str, env: Envelope, key: TestKey) -> None:
    VECTORS.append(Vector(f"accept/{name}", description, key, seal(env, key.signing_key),
                          "accept"))


def reject(name: str, description: str, frame: bytes, key: TestKey | None, stage: str,
           reason: Reason, problems: list[tuple[str, Reason]] | None = None) -> None:
    VECTORS.append(Vector(
        f"{stage}/{name}", description, key, frame, stage, str(reason),
        None if problems is None else [(p, str(r)) for p, r in problems],
    ))


def schema(name: str, description: str, body: Wire | Any, key: TestKey,
           problems: list[tuple[str, Reason]]) -> None:
    """A deliberately invalid body, canonically encoded and properly signed."""
    frame = seal_body(pack(body), key.signing_key)
    reject(name, description, frame, key, "schema", Reason.BODY_SCHEMA, problems)


def signed(body: bytes, key: TestKey) -> bytes:
    return seal_body(body, key.signing_key)


# -- the vectors --------------------------------------------------------------------------------


def accepts() -> None:
    accept("certificate-mixed-origin",
           "A certificate ZA -> EU with three HS lines and mixed origin (MIXED, BW, ZA); "
           "remarks over 255 UTF-8 bytes (str16) with non-ASCII text; amounts in "
           "uint8..uint32 forms, created_at in uint64.", CERT_ENV, ZA)
    accept("receipt",
           "The importer's receipt; certificate_digest is the SHA-256 of the frame of "
           "accept/certificate-mixed-origin.", RECEIPT_ENV, EU)
    accept("import-confirmation",
           "The import confirmation, with a quantity different from the certificate "
           "(a mismatch is recorded, not a schema fault).", CONFIRMATION_ENV, EU)
    accept("rejection-with-problems",
           "A rejection listing two problems (path, reason, message).", REJECTION_ENV, BW)
    accept("rejection-future-reason-code",
           "A rejection with a reason code this version does not define (codes are "
           "add-only), certificate nil, no problems.", FUTURE_REJECTION_ENV, BW)
    accept("cancellation", "A cancellation by the exporter.", CANCELLATION_ENV, ZA)
    accept("replacement", "A replacement certificate naming the one it replaces.",
           REPLACEMENT_ENV, ZA)
    accept("registry-update",
           "A registry update signed by the Chair's key: sender KPCS, recipient '*'; "
           "active, suspended and withdrawn Participants, an EU with two authorities, "
           "keys with valid_until and revoked_at, an embargoed origin.", REGISTRY_ENV,
           CHAIR_KEY)
    accept("ping", "A ping with a 16-byte nonce.", PING_ENV, ZA)
    accept("pong", "The pong answering it: same nonce, in_reply_to the ping.", PONG_ENV, BW)

    long_names = dataclasses.replace(
        CERTIFICATE,
        number="ZA/2026/000200",
        exporter=Party(name="é" * 200, address="ü" * 500),
        lines=(Line(hs_code="7102.31", carats_hundredths=10**12, usd_cents=10**15),),
        parcels=1_000_000,
        origins=("ZA",) * 50,
        remarks="x" * 2000,
    )
    accept("limits-in-code-points",
           "Every limit reached exactly: exporter name of 200 and address of 500 code "
           "points (2 UTF-8 bytes each), 50 origins, remarks of 2000, carats 10^12, "
           "usd_cents 10^15, parcels 10^6, created_at 2^53.",
           Envelope(message_id="M" * 64, sender="ZA", recipient="EU",
                    created_at=2**53, payload=long_names), ZA)


def frame_level() -> None:
    good = CERT_FRAME
    n = len(body_of(good))
    reject("empty-frame", "Zero bytes.", b"", None, "header", Reason.FRAME_TRUNCATED)
    reject("shorter-than-header", "The first 23 bytes of a valid frame.", good[:23], ZA,
           "header", Reason.FRAME_TRUNCATED)
    reject("short-with-bad-magic",
           "10 bytes starting 'XYZ': the length check (2a) comes before the magic (2b).",
           b"XYZ\x01" + bytes(6), None, "header", Reason.FRAME_TRUNCATED)
    reject("truncated-signature", "A valid frame without its last byte.", good[:-1], ZA,
           "header", Reason.FRAME_TRUNCATED)
    reject("truncated-body", "Header and half the body of a valid frame.",
           good[: HEADER.size + n // 2], ZA, "header", Reason.FRAME_TRUNCATED)
    reject("length-claims-4-gib",
           "A valid frame whose body length field says 2^32-1 (re-signed over that "
           "header).", frame_with(body_of(good), ZA, length=2**32 - 1), ZA, "header",
           Reason.FRAME_TRUNCATED)
    reject("trailing-byte", "A valid frame followed by one zero byte.", good + b"\x00", ZA,
           "header", Reason.FRAME_MALFORMED)
    reject("bad-magic", "Magic 'KPY', signature made over that header.",
           frame_with(body_of(good), ZA, magic=b"KPY"), ZA, "header", Reason.FRAME_MALFORMED)
    reject("lowercase-magic", "Magic 'kpx'.", frame_with(body_of(good), ZA, magic=b"kpx"),
           ZA, "header", Reason.FRAME_MALFORMED)
    reject("bad-magic-and-version", "Magic 'KPZ' and version 2: magic is checked first.",
           frame_with(body_of(good), ZA, magic=b"KPZ", version=2), ZA, "header",
           Reason.FRAME_MALFORMED)
    reject("version-2", "Version byte 2, otherwise a valid v1 frame signed over its header.",
           frame_with(body_of(good), ZA, version=2), ZA, "header", Reason.FRAME_VERSION)
    reject("version-0", "Version byte 0.", frame_with(body_of(good), ZA, version=0), ZA,
           "header", Reason.FRAME_VERSION)
    reject("version-255-short",
           "Version 255 with a body length beyond the frame: version (2c) before length (2d).",
           frame_with(b"", ZA, version=255, length=1000), ZA, "header", Reason.FRAME_VERSION)

    reject("unknown-key", "A valid certificate signed by a key the verifier does not know.",
           seal(CERT_ENV, ROGUE.signing_key), ROGUE, "key", Reason.KEY_UNKNOWN)
    reject("flipped-key-id-bit", "Bit 0 of the first key id byte flipped.", flip(good, 4),
           ZA, "key", Reason.KEY_UNKNOWN)

    sig_at = HEADER.size + n
    reject("flipped-signature-bit", "One bit of the signature flipped (byte 10 of it).",
           flip(good, sig_at + 10, 3), ZA, "signature", Reason.SIGNATURE_INVALID)
    reject("flipped-body-bit",
           "One bit of the body flipped (inside the remarks text: still valid msgpack).",
           flip(good, HEADER.size + n - 40, 1), ZA, "signature", Reason.SIGNATURE_INVALID)
    reject("zero-signature", "Signature of 64 zero bytes.", good[:sig_at] + bytes(64), ZA,
           "signature", Reason.SIGNATURE_INVALID)
    reject("no-domain-prefix",
           "Signed over header || body without the DOMAIN prefix.",
           frame_with(body_of(good), ZA, domain=b""), ZA, "signature",
           Reason.SIGNATURE_INVALID)
    reject("wrong-domain-version",
           "Signed with the domain string 'KPX-FRAME-SIGNATURE-V2\\0'.",
           frame_with(body_of(good), ZA, domain=b"KPX-FRAME-SIGNATURE-V2\x00"), ZA,
           "signature", Reason.SIGNATURE_INVALID)
    reject("domain-without-zero-byte",
           "Signed with the domain string without its final zero byte.",
           frame_with(body_of(good), ZA, domain=DOMAIN[:-1]), ZA, "signature",
           Reason.SIGNATURE_INVALID)
    reject("key-id-of-another-known-key",
           "The header names BW's key (trusted), but ZA's key signed it.",
           frame_with(body_of(good), ZA, kid=BW.key_id), ZA, "signature",
           Reason.SIGNATURE_INVALID)
    reject("signature-not-over-header",
           "Signed over DOMAIN || body only (header left out).",
           good[:sig_at] + ZA.signing_key.sign(DOMAIN + body_of(good)).signature, ZA,
           "signature", Reason.SIGNATURE_INVALID)


def size_limits() -> list[Vector]:
    """The two frames too large to list as hex: described by segments (SPEC.md §12)."""
    # Exactly MAX_FRAME_SIZE: a properly signed frame whose body is a single bin32 value.
    body_len = MAX_FRAME_SIZE - HEADER.size - SIGNATURE_SIZE
    payload_len = body_len - 5
    body = b"\xc6" + struct.pack(">I", payload_len) + bytes(payload_len)
    at_max = seal_body(body, ZA.signing_key)
    assert len(at_max) == MAX_FRAME_SIZE
    over = HEADER.pack(MAGIC, VERSION, ZA.key_id, MAX_FRAME_SIZE + 1 - HEADER.size - 64)
    over += bytes(MAX_FRAME_SIZE + 1 - len(over))
    return [
        Vector("schema/frame-of-exactly-max-size",
               f"A frame of exactly {MAX_FRAME_SIZE} bytes passes the size check; its "
               "(signed) body is one bin32 value, not a map.", ZA, at_max, "schema",
               str(Reason.BODY_SCHEMA), [("", str(Reason.WRONG_TYPE))]),
        Vector("size/one-byte-over-max",
               f"{MAX_FRAME_SIZE + 1} bytes: a header claiming a body that fills it, "
               "then zeros. Refused before anything else is looked at.", None, over,
               "size", str(Reason.FRAME_TOO_LARGE)),
    ]


def decoding() -> None:
    cert = wire(BASE_ENV)
    canon = pack(cert)

    def malformed(name: str, description: str, body: bytes, key: TestKey = ZA) -> None:
        reject(name, description, signed(body, key), key, "decode", Reason.BODY_MALFORMED)

    malformed("empty-body", "Body length 0.", b"")
    malformed("reserved-byte", "Body is the reserved msgpack byte c1.", b"\xc1")
    malformed("not-msgpack-text", "Body is the ASCII text 'hello' (fixint then extra bytes).",
              b"hello")
    malformed("truncated-msgpack", "A valid certificate body without its last byte.",
              canon[:-1])
    malformed("trailing-value", "A valid certificate body followed by nil (c0).",
              canon + b"\xc0")

    pairs = canonical_pairs(cert)
    dup = [*pairs, (raw_str("sender"), raw_str("ZA"))]
    malformed("duplicate-key",
              "Envelope with the key 'sender' twice (same value both times).",
              raw_map(sorted(dup)))

    def with_payload(extra: list[tuple[bytes, bytes]]) -> bytes:
        payload = canonical_pairs(cert["payload"]) + extra
        env_pairs = [(k, v) if k != raw_str("payload") else (k, raw_map(payload))
                     for k, v in pairs]
        return raw_map(env_pairs)

    malformed("int-map-key", "The payload map has an extra pair with the integer key 1.",
              with_payload([(b"\x01", b"\x01")]))
    malformed("bin-map-key", "The payload map has an extra pair with a bin key (c4 01 78).",
              with_payload([(b"\xc4\x01x", b"\x01")]))

    remarks = raw_str(SHORT_REMARKS)
    malformed("invalid-utf8",
              "remarks holds the bytes c3 28 (not UTF-8).",
              replace_once(canon, remarks, b"\xa2\xc3\x28"))
    malformed("utf8-surrogate",
              "remarks holds ed a0 80, the UTF-8 form of surrogate U+D800 (not valid UTF-8).",
              replace_once(canon, remarks, b"\xa3\xed\xa0\x80"))
    malformed("utf8-overlong",
              "remarks holds c0 af, an overlong '/' (not valid UTF-8).",
              replace_once(canon, remarks, b"\xa2\xc0\xaf"))
    malformed("ext-value", "remarks is a fixext 1 of type 5.",
              replace_once(canon, remarks, b"\xd4\x05\x00"))
    created = pack(cert["created_at"])
    malformed("timestamp-ext",
              "created_at is a msgpack timestamp (ext type -1, 32-bit form).",
              replace_once(canon, raw_str("created_at") + created,
                           raw_str("created_at") + b"\xd6\xff" + struct.pack(">I", T0 // 1000)))
    malformed("nesting-1025",
              "remarks is 1023 nested arrays around 0: with the envelope and payload maps, "
              "1025 containers deep (the limit is 1024).",
              replace_once(canon, remarks, b"\x91" * 1023 + b"\x00"))
    reject("nesting-1024",
           "remarks is 1022 nested arrays around 0: 1024 containers deep, which decodes; "
           "the schema then refuses it (an array, not text).",
           signed(replace_once(canon, remarks, b"\x91" * 1022 + b"\x00"), ZA), ZA, "schema",
           Reason.BODY_SCHEMA, [("payload.remarks", Reason.WRONG_TYPE)])


def canonical_form() -> None:
    cert = wire(BASE_ENV)
    canon = pack(cert)

    def noncanonical(name: str, description: str, body: bytes, key: TestKey = ZA) -> None:
        assert body != canon
        assert msgpack.unpackb(body, raw=False) == msgpack.unpackb(canon, raw=False)
        reject(name, description, signed(body, key), key, "canonical", Reason.BODY_MALFORMED)

    in_order = msgpack.packb(cert, use_bin_type=True)  # Python dict order: message_id first
    noncanonical("unsorted-envelope-keys",
                 "Every map in field-declaration order instead of sorted order.", in_order)
    pairs = canonical_pairs(cert)
    swapped = pairs[:]
    i = [k for k, _ in pairs].index(raw_str("kind"))
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    noncanonical("two-keys-swapped", "'kind' and 'message_id' swapped; all else canonical.",
                 raw_map(swapped))
    parcels = raw_str("parcels")
    noncanonical("uint16-for-fixint", "parcels 12 as uint16 (cd 00 0c) instead of 0c.",
                 replace_once(canon, parcels + b"\x0c", parcels + b"\xcd\x00\x0c"))
    noncanonical("int8-for-non-negative",
                 "parcels 12 as int8 (d0 0c): non-negative integers use unsigned forms.",
                 replace_once(canon, parcels + b"\x0c", parcels + b"\xd0\x0c"))
    first_carats = raw_str("carats_hundredths") + pack(LINES[0].carats_hundredths)
    noncanonical("uint64-for-uint32",
                 "carats_hundredths 1234567 as uint64 instead of uint32.",
                 replace_once(canon, first_carats, raw_str("carats_hundredths") + b"\xcf"
                              + struct.pack(">Q", LINES[0].carats_hundredths)))
    sender = raw_str("sender") + raw_str("ZA")
    noncanonical("str8-for-fixstr", "sender 'ZA' as str8 (d9 02 5a 41).",
                 replace_once(canon, sender, raw_str("sender") + b"\xd9\x02ZA"))
    noncanonical("str8-for-fixstr-key", "The key 'sender' as str8.",
                 replace_once(canon, sender, b"\xd9\x06sender" + raw_str("ZA")))
    assert canon[0] == 0x87
    noncanonical("map16-for-fixmap", "The envelope map as map16 (de 00 07) instead of 87.",
                 b"\xde\x00\x07" + canon[1:])
    origins = raw_str("origins") + pack(list(CERTIFICATE.origins))
    noncanonical("array16-for-fixarray", "origins as array16.",
                 replace_once(canon, origins, raw_str("origins") + b"\xdc\x00\x03"
                              + pack(list(CERTIFICATE.origins))[1:]))
    receipt = pack(wire(RECEIPT_ENV))
    digest = raw_str("certificate_digest") + b"\xc4\x20" + CERT_DIGEST
    body = replace_once(receipt, digest,
                        raw_str("certificate_digest") + b"\xc5\x00\x20" + CERT_DIGEST)
    reject("bin16-for-bin8", "A receipt whose digest is bin16 instead of bin8.",
           signed(body, EU), EU, "canonical", Reason.BODY_MALFORMED)


def schema_faults() -> None:
    def cert(**payload: Any) -> Wire:
        w = wire(BASE_ENV)
        w["payload"].update(payload)
        return w

    def line(i: int, **fields: Any) -> Wire:
        w = wire(BASE_ENV)
        w["payload"]["lines"][i].update(fields)
        return w

    p = "payload."
    schema("float-amount", "carats_hundredths as float64 1234567.0.",
           line(0, carats_hundredths=1234567.0), ZA,
           [(p + "lines[0].carats_hundredths", Reason.FLOAT_NOT_ALLOWED)])
    marker = 1.5
    f32 = signed(replace_once(pack(line(1, usd_cents=marker)), b"\xcb" + struct.pack(">d", marker),
                              b"\xca" + struct.pack(">f", marker)), ZA)
    reject("float32-amount", "usd_cents as float32 1.5.", f32, ZA, "schema",
           Reason.BODY_SCHEMA, [(p + "lines[1].usd_cents", Reason.FLOAT_NOT_ALLOWED)])
    schema("negative-amount", "usd_cents -500.", line(1, usd_cents=-500), ZA,
           [(p + "lines[1].usd_cents", Reason.NOT_POSITIVE)])
    schema("zero-carats", "carats_hundredths 0.", line(2, carats_hundredths=0), ZA,
           [(p + "lines[2].carats_hundredths", Reason.NOT_POSITIVE)])
    schema("amount-too-large", "usd_cents 10^15 + 1.", line(0, usd_cents=10**15 + 1), ZA,
           [(p + "lines[0].usd_cents", Reason.TOO_LARGE)])
    schema("bool-as-integer", "parcels true: a boolean is not an integer.",
           cert(parcels=True), ZA, [(p + "parcels", Reason.WRONG_TYPE)])
    schema("string-as-integer", "parcels '12'.", cert(parcels="12"), ZA,
           [(p + "parcels", Reason.WRONG_TYPE)])
    schema("unknown-hs-code", "hs_code 7102.29.", line(1, hs_code="7102.29"), ZA,
           [(p + "lines[1].hs_code", Reason.UNKNOWN_HS_CODE)])
    schema("duplicate-hs-code", "lines[2] repeats 7102.10.", line(2, hs_code="7102.10"), ZA,
           [(p + "lines[2].hs_code", Reason.DUPLICATE_HS_CODE)])
    four = wire(BASE_ENV)
    four["payload"]["lines"].append(dict(four["payload"]["lines"][0]))
    schema("too-many-lines", "Four lines (at most 3); the items are then not checked.", four,
           ZA, [(p + "lines", Reason.TOO_LONG)])
    schema("no-lines", "lines is empty.", cert(lines=[]), ZA, [(p + "lines", Reason.EMPTY)])
    schema("expiry-before-issue", "expires_on the day before issued_on.",
           cert(expires_on="2026-01-04"), ZA, [(p + "expires_on", Reason.EXPIRY_BEFORE_ISSUE)])
    schema("expiry-on-issue-day", "expires_on equal to issued_on.",
           cert(expires_on="2026-01-05"), ZA, [(p + "expires_on", Reason.EXPIRY_BEFORE_ISSUE)])
    schema("expiry-before-issue-1970",
           "issued_on 1970-01-02, expires_on 1970-01-01: dates at the epoch are dates too.",
           cert(issued_on="1970-01-02", expires_on="1970-01-01"), ZA,
           [(p + "expires_on", Reason.EXPIRY_BEFORE_ISSUE)])
    schema("not-a-calendar-date", "expires_on 2026-02-29 (2026 is not a leap year).",
           cert(expires_on="2026-02-29"), ZA, [(p + "expires_on", Reason.BAD_DATE)])
    schema("date-bad-format", "issued_on '2026-1-05'.", cert(issued_on="2026-1-05"), ZA,
           [(p + "issued_on", Reason.BAD_FORMAT)])
    schema("date-with-time", "issued_on '2026-01-05T00:00Z' (too long for a date).",
           cert(issued_on="2026-01-05T00:00Z"), ZA, [(p + "issued_on", Reason.TOO_LONG)])
    schema("date-non-ascii-digits", "issued_on in Arabic-Indic digits: not [0-9].",
           cert(issued_on="\u0662\u0660\u0662\u0666-\u0660\u0661-\u0660\u0665"), ZA,
           [(p + "issued_on", Reason.BAD_FORMAT)])
    schema("number-prefix", "number BW/2026/000123 on a certificate issued by ZA.",
           cert(number="BW/2026/000123"), ZA, [(p + "number", Reason.NUMBER_PREFIX)])
    schema("authority-of-another-participant", "issuing_authority BW-MMGE, issuer ZA.",
           cert(issuing_authority="BW-MMGE"), ZA,
           [(p + "issuing_authority", Reason.BAD_FORMAT)])
    schema("origin-bad", "origins: 'ZAF' (bad format) and 'ABCDEF' (too long and bad format).",
           cert(origins=["ZAF", "ZA", "ABCDEF"]), ZA,
           [(p + "origins[0]", Reason.BAD_FORMAT), (p + "origins[2]", Reason.TOO_LONG),
            (p + "origins[2]", Reason.BAD_FORMAT)])
    schema("name-201-code-points", "exporter.name of 201 'é' (402 bytes).",
           cert(exporter={"name": "é" * 201, "address": "x"}), ZA,
           [(p + "exporter.name", Reason.TOO_LONG)])
    schema("empty-name", "importer.name ''.",
           cert(importer={"name": "", "address": "x"}), ZA,
           [(p + "importer.name", Reason.EMPTY)])

    unknown_kind = wire(BASE_ENV)
    unknown_kind["kind"] = "certificate_v2"
    schema("unknown-kind", "kind 'certificate_v2': the payload is then not examined.",
           unknown_kind, ZA, [("kind", Reason.UNKNOWN_KIND)])
    kind_int = wire(BASE_ENV)
    kind_int["kind"] = 1
    schema("kind-wrong-type", "kind 1 (an integer).", kind_int, ZA,
           [("kind", Reason.WRONG_TYPE)])
    extra = wire(BASE_ENV)
    extra["priority"] = 1
    schema("unknown-envelope-field", "An extra envelope field 'priority'.", extra, ZA,
           [("priority", Reason.UNKNOWN_FIELD)])
    schema("unknown-payload-field", "An extra payload field 'carats_total'.",
           cert(carats_total=1534642), ZA, [(p + "carats_total", Reason.UNKNOWN_FIELD)])
    missing = wire(BASE_ENV)
    del missing["in_reply_to"]
    del missing["payload"]["remarks"]
    schema("missing-fields",
           "in_reply_to and payload.remarks left out (nullable and may-be-empty fields are "
           "still required).", missing, ZA,
           [("in_reply_to", Reason.REQUIRED), (p + "remarks", Reason.REQUIRED)])
    not_map = wire(BASE_ENV)
    not_map["payload"] = "certificate"
    schema("payload-not-a-map", "payload is a string.", not_map, ZA,
           [("payload", Reason.WRONG_TYPE)])
    schema("body-not-a-map", "The body is the array [1, 2].", [1, 2], ZA,
           [("", Reason.WRONG_TYPE)])

    mismatch = wire(BASE_ENV)
    mismatch["sender"] = "BW"
    mismatch["recipient"] = "IN"
    schema("sender-and-recipient-mismatch",
           "A ZA certificate to EU, sent (and signed) by BW to IN.", mismatch, BW,
           [(p + "issuer", Reason.SENDER_MISMATCH),
            (p + "destination", Reason.RECIPIENT_MISMATCH)])
    chair_sender = wire(BASE_ENV)
    chair_sender["sender"] = "KPCS"
    schema("chair-sender-on-certificate",
           "sender 'KPCS' on a certificate: bad format, and (as received) not the issuer.",
           chair_sender, ZA,
           [("sender", Reason.BAD_FORMAT), (p + "issuer", Reason.SENDER_MISMATCH)])
    self_trade = cert(destination="ZA")
    self_trade["recipient"] = "ZA"
    schema("self-trade", "ZA certificate to ZA, sent ZA to ZA.", self_trade, ZA,
           [(p + "destination", Reason.SELF_TRADE), ("recipient", Reason.SELF_TRADE)])
    conf = wire(CONFIRMATION_ENV)
    conf["payload"]["destination"] = "BW"
    schema("confirmation-not-from-destination",
           "An import confirmation for destination BW, sent by EU.", conf, EU,
           [(p + "destination", Reason.SENDER_MISMATCH)])
    bin_sender = wire(BASE_ENV)
    bin_sender["sender"] = b"ZA"
    schema("bin-as-text", "sender as bin 'ZA'.", bin_sender, ZA,
           [("sender", Reason.WRONG_TYPE)])
    receipt = wire(RECEIPT_ENV)
    receipt["payload"]["certificate_digest"] = CERT_DIGEST.hex()
    schema("text-as-bin", "certificate_digest as a hex str instead of bin.", receipt, EU,
           [(p + "certificate_digest", Reason.WRONG_TYPE)])
    receipt = wire(RECEIPT_ENV)
    receipt["payload"]["certificate_digest"] = CERT_DIGEST[:31]
    schema("digest-31-bytes", "certificate_digest of 31 bytes.", receipt, EU,
           [(p + "certificate_digest", Reason.BAD_FORMAT)])

    env = wire(PING_ENV)
    env["message_id"] = "abc"
    env["created_at"] = -1
    env["in_reply_to"] = ""
    env["payload"]["nonce"] = b"\x00" * 8
    schema("envelope-faults",
           "message_id 'abc', created_at -1, in_reply_to '', an 8-byte nonce.", env, ZA,
           [("message_id", Reason.BAD_FORMAT), ("created_at", Reason.NEGATIVE),
            ("in_reply_to", Reason.EMPTY), (p + "nonce", Reason.BAD_FORMAT)])
    env = wire(PONG_ENV)
    env["message_id"] = "m" * 65
    env["created_at"] = 2**53 + 1
    env["recipient"] = "ZAF"
    schema("envelope-limits", "message_id of 65, created_at 2^53+1, recipient 'ZAF'.", env,
           BW, [("message_id", Reason.TOO_LONG), ("created_at", Reason.TOO_LARGE),
                ("recipient", Reason.TOO_LONG)])

    reg = wire(REGISTRY_ENV)
    reg["sender"] = "ZA"
    reg["recipient"] = "EU"
    schema("registry-not-from-chair", "A registry update with sender ZA and recipient EU.",
           reg, CHAIR_KEY, [("sender", Reason.BAD_FORMAT), ("recipient", Reason.BAD_FORMAT)])
    reg = wire(REGISTRY_ENV)
    participants = reg["payload"]["participants"]
    participants[1]["status"] = "paused"
    participants[3]["code"] = "BW"
    participants[2]["authorities"][0]["keys"][0]["public_key"] = b"\x01" * 31
    participants[2]["authorities"][1]["keys"][0]["valid_until"] = 1.0e12
    reg["payload"]["version"] = 0
    reg["payload"]["embargoed_origins"] = ["CF", ""]
    schema("registry-faults",
           "version 0, an unknown status, a repeated participant code, a 31-byte key, a "
           "float instant, an empty embargoed origin.", reg, CHAIR_KEY,
           [(p + "version", Reason.NOT_POSITIVE),
            (p + "participants[1].status", Reason.BAD_FORMAT),
            (p + "participants[2].authorities[0].keys[0].public_key", Reason.BAD_FORMAT),
            (p + "participants[2].authorities[1].keys[0].valid_until",
             Reason.FLOAT_NOT_ALLOWED),
            (p + "embargoed_origins[1]", Reason.EMPTY),
            (p + "participants", Reason.BAD_FORMAT)])

    reg = wire(REGISTRY_ENV)
    participants = reg["payload"]["participants"]
    participants[0]["authorities"][0]["keys"].append(
        dict(participants[3]["authorities"][0]["keys"][0]))
    schema("registry-key-listed-twice",
           "ZA's public key listed under BW's authority as well (SPEC §9.7): a signature by "
           "it would speak for two Participants.", reg, CHAIR_KEY,
           [(p + "participants", Reason.BAD_FORMAT)])

    rej = wire(REJECTION_ENV)
    rej["payload"]["reason"] = "Not A Code"
    rej["payload"]["problems"][1]["reason"] = "field"
    rej["payload"]["certificate"] = 124
    schema("rejection-faults",
           "reason 'Not A Code', a problem reason 'field' (no dot), certificate 124.", rej, BW,
           [(p + "problems[1].reason", Reason.BAD_FORMAT), (p + "reason", Reason.BAD_FORMAT),
            (p + "certificate", Reason.WRONG_TYPE)])
    rep = wire(REPLACEMENT_ENV)
    rep["payload"]["replaces"] = rep["payload"]["certificate"]["number"]
    schema("replacement-replaces-itself", "replaces equals the new certificate's number.",
           rep, ZA, [(p + "replaces", Reason.BAD_FORMAT)])
    rep = wire(REPLACEMENT_ENV)
    rep["payload"]["replaces"] = "BW/2026/1"
    schema("replacement-of-another-issuer", "replaces names a number of another issuer "
           "(BW's, in ZA's replacement).", rep, ZA, [(p + "replaces", Reason.NUMBER_PREFIX)])
    rep = wire(REPLACEMENT_ENV)
    rep["payload"]["certificate"]["issuer"] = "BW"
    rep["payload"]["certificate"]["number"] = "BW/2026/9"
    rep["payload"]["certificate"]["issuing_authority"] = "BW-MMGE"
    schema("replacement-inner-sender-mismatch",
           "A replacement whose inner certificate is issued by BW, sent by ZA (and so "
           "replacing ZA's number, not one of its issuer's).", rep, ZA,
           [(p + "replaces", Reason.NUMBER_PREFIX),
            (p + "certificate.issuer", Reason.SENDER_MISMATCH)])
    cancel = wire(CANCELLATION_ENV)
    cancel["payload"]["reason"] = ""
    cancel["payload"]["certificate"] = "ZA"
    schema("cancellation-faults", "certificate 'ZA' (too short), empty reason.", cancel, ZA,
           [(p + "certificate", Reason.BAD_FORMAT), (p + "reason", Reason.EMPTY)])

    many = wire(BASE_ENV)
    c = many["payload"]
    c["lines"][0]["usd_cents"] = 1.5
    c["lines"][1]["carats_hundredths"] = 0
    c["origins"][1] = "bw"
    c["exporter"]["name"] = ""
    c["parcels"] = True
    c["expires_on"] = "2025-12-31"
    c["note"] = "unexpected"
    del c["remarks"]
    schema("every-problem-at-once",
           "Eight faults in one certificate, all reported: unknown field, missing field, "
           "bad origin, empty name, float, zero, boolean, expiry before issue.", many, ZA,
           [(p + "note", Reason.UNKNOWN_FIELD), (p + "remarks", Reason.REQUIRED),
            (p + "origins[1]", Reason.BAD_FORMAT), (p + "exporter.name", Reason.EMPTY),
            (p + "lines[0].usd_cents", Reason.FLOAT_NOT_ALLOWED),
            (p + "lines[1].carats_hundredths", Reason.NOT_POSITIVE),
            (p + "parcels", Reason.WRONG_TYPE), (p + "expires_on", Reason.EXPIRY_BEFORE_ISSUE)])


# -- checking and rendering ---------------------------------------------------------------------


def reference_verdict(frame: bytes) -> tuple[str, str | None, list[tuple[str, str]] | None,
                                              Envelope | None]:
    try:
        opened = open_frame(frame, trusted_key)
    except ProtocolError as exc:
        problems = [(p.path, str(p.reason)) for p in exc.problems]
        return "reject", str(exc.reason), problems if exc.reason == Reason.BODY_SCHEMA \
            else None, None
    return "accept", None, None, opened.envelope


def segments(frame: bytes) -> list[dict[str, Any]]:
    """Long runs of one byte as fill segments (SPEC.md §12); everything else as hex."""
    out: list[dict[str, Any]] = []
    i = 0
    start = 0
    while i < len(frame):
        j = i
        while j < len(frame) and frame[j] == frame[i]:
            j += 1
        if j - i >= 256:
            if start < i:
                out.append({"hex": frame[start:i].hex()})
            out.append({"fill": f"{frame[i]:02x}", "count": j - i})
            start = j
        i = j
    if start < len(frame):
        out.append({"hex": frame[start:].hex()})
    return out


def render_vector(v: Vector) -> dict[str, Any]:
    verdict, reason, problems, env = reference_verdict(v.frame)
    expected_verdict = "accept" if v.stage == "accept" else "reject"
    if verdict != expected_verdict or reason != v.reason:
        raise SystemExit(f"{v.name}: the reference says {verdict} {reason}, "
                         f"the vector says {expected_verdict} {v.reason}")
    if v.problems is not None and Counter(problems or []) != Counter(v.problems):
        raise SystemExit(f"{v.name}: the reference finds {problems}, the vector says "
                         f"{v.problems}")
    out: dict[str, Any] = {
        "name": v.name,
        "description": v.description,
        "signer": v.signer.describe() if v.signer else None,
    }
    if len(v.frame) <= 16 * 1024:
        out["frame_hex"] = v.frame.hex()
    else:
        out["frame_segments"] = segments(v.frame)
    out["frame_length"] = len(v.frame)
    out["verdict"] = verdict
    out["stage"] = v.stage
    if verdict == "accept":
        assert env is not None
        out["kind"] = str(env.kind)
        out["content"] = to_json(msgpack.unpackb(body_of(v.frame), raw=False))
        out["frame_sha256_hex"] = hashlib.sha256(v.frame).hexdigest()
    else:
        out["reason"] = reason
        if problems is not None:
            out["problems"] = [{"path": path, "reason": r} for path, r in problems]
    return out


def build() -> dict[str, Any]:
    """Every vector, checked against the reference implementation."""
    VECTORS.clear()
    accepts()
    frame_level()
    VECTORS.extend(size_limits())
    decoding()
    canonical_form()
    schema_faults()
    names = [v.name for v in VECTORS]
    assert len(names) == len(set(names)), "vector names repeat"
    return {
        "format": "kpx-test-vectors",
        "format_version": 1,
        "description": "kpx wire protocol v1 test vectors; see protocol/SPEC.md §12. "
                       "Generated by scripts/make_vectors.py: do not edit by hand.",
        "constants": {
            "magic_hex": MAGIC.hex(),
            "version": VERSION,
            "domain_hex": DOMAIN.hex(),
            "header_size": HEADER.size,
            "signature_size": SIGNATURE_SIZE,
            "max_frame_size": MAX_FRAME_SIZE,
            "max_problems": MAX_PROBLEMS,
        },
        "content_encoding": "content: decoded body as JSON; map=object, array=array, "
                            "str=string, int=number, nil=null, bin=lowercase hex string",
        "keys": [
            {**k.describe(), "owner": k.owner, "known": k.known, "note": k.note}
            for k in KEYS.values()
        ],
        "vectors": [render_vector(v) for v in VECTORS],
    }


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render(build())
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is not up to date: run scripts/make_vectors.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    data = json.loads(text)
    print(f"wrote {len(data['vectors'])} vectors, {len(text.encode())} bytes, to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
