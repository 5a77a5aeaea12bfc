"""Properties of the protocol, checked with hypothesis.

- every valid message of every kind survives seal -> open_frame unchanged;
- flipping any single bit of a valid frame gets it refused with a ProtocolError;
- whatever bytes arrive — as a frame, or as a properly signed body — and whatever
  msgpack value a body holds, the only exception that comes out is ProtocolError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import string
from datetime import date, timedelta
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol import (
    BROADCAST,
    CHAIR,
    HS_CODES,
    MAX_FRAME_SIZE,
    Authority,
    Cancellation,
    Certificate,
    Envelope,
    ImportConfirmation,
    Line,
    ParticipantEntry,
    ParticipantStatus,
    Party,
    Ping,
    Pong,
    Problem,
    ProtocolError,
    Reason,
    Receipt,
    RegistryKey,
    RegistryUpdate,
    Rejection,
    Replacement,
    SignatureError,
    decode_body,
    encode_body,
    key_id,
    open_frame,
    parse_frame,
    seal,
)
from protocol.codec import unpack
from protocol.frame import OVERHEAD, seal_body
from protocol.schema import (
    AUTHORITY_ID,
    CERTIFICATE_NUMBER,
    MAX_CARATS_HUNDREDTHS,
    MAX_INSTANT,
    MAX_PARCELS,
    MAX_USD_CENTS,
    MESSAGE_ID,
    REASON_CODE,
    validate_certificate,
    validate_import_confirmation,
)

KEY = SigningKey(bytes(range(32)))
PUBLIC = bytes(KEY.verify_key)
KID = key_id(PUBLIC)


def lookup(kid: bytes) -> bytes:
    if kid != KID:
        raise SignatureError(Reason.KEY_UNKNOWN, "unknown key")
    return PUBLIC


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies for valid messages ----------------------------------------------------------

codes = st.text(alphabet=string.ascii_uppercase, min_size=2, max_size=2)
# any Unicode scalar value except surrogates (they cannot be UTF-8)
chars = st.characters(exclude_categories=["Cs"])


def texts(max_size: int, min_size: int = 1) -> st.SearchStrategy[str]:
    return st.text(chars, min_size=min_size, max_size=max_size)


message_ids = st.from_regex(MESSAGE_ID, fullmatch=True)
cert_numbers = st.from_regex(CERTIFICATE_NUMBER, fullmatch=True)
reason_codes = st.from_regex(REASON_CODE, fullmatch=True).filter(lambda s: len(s) <= 64)
instants = st.integers(0, MAX_INSTANT)
parties = st.builds(Party, name=texts(200), address=texts(500))


@st.composite
def line_tuples(draw: st.DrawFn) -> tuple[Line, ...]:
    hs = draw(st.lists(st.sampled_from(sorted(HS_CODES)), min_size=1, max_size=3, unique=True))
    return tuple(
        Line(hs_code=h, carats_hundredths=draw(st.integers(1, MAX_CARATS_HUNDREDTHS)),
             usd_cents=draw(st.integers(1, MAX_USD_CENTS)))
        for h in hs
    )


@st.composite
def certificates(draw: st.DrawFn, issuer: str, destination: str) -> Certificate:
    issued = draw(st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 30)))
    expires = issued + timedelta(days=draw(st.integers(1, (date(9999, 12, 31) - issued).days)))
    number = issuer + draw(cert_numbers)[2:]
    authority = draw(st.from_regex(AUTHORITY_ID, fullmatch=True))
    return Certificate(
        number=number,
        issuer=issuer,
        issuing_authority=issuer + authority[2:],
        destination=destination,
        origins=tuple(draw(st.lists(codes | st.just("MIXED"), min_size=1, max_size=5))),
        exporter=draw(parties),
        importer=draw(parties),
        lines=draw(line_tuples()),
        parcels=draw(st.integers(1, MAX_PARCELS)),
        issued_on=issued,
        expires_on=expires,
        remarks=draw(texts(60, min_size=0)),
    )


@st.composite
def two_codes(draw: st.DrawFn) -> tuple[str, str]:
    a, b = draw(st.lists(codes, min_size=2, max_size=2, unique=True))
    return a, b


@st.composite
def registry_updates(draw: st.DrawFn) -> RegistryUpdate:
    keys = st.builds(
        RegistryKey, public_key=st.binary(min_size=32, max_size=32), valid_from=instants,
        valid_until=st.none() | instants, revoked_at=st.none() | instants,
    )
    authorities = st.builds(
        Authority, id=st.from_regex(AUTHORITY_ID, fullmatch=True), name=texts(200),
        keys=st.lists(keys, max_size=3).map(tuple),
    )
    participant_codes = draw(st.lists(codes, max_size=5, unique=True))
    participants = tuple(
        ParticipantEntry(code=c, name=draw(texts(200)),
                         status=draw(st.sampled_from(list(ParticipantStatus))),
                         authorities=tuple(draw(st.lists(authorities, max_size=2))))
        for c in participant_codes
    )
    # A key listed twice is refused (SPEC §9.7): give each listing its own key.
    numbered = iter(range(1, 1000))
    participants = tuple(dataclasses.replace(p, authorities=tuple(
        dataclasses.replace(a, keys=tuple(
            dataclasses.replace(k, public_key=next(numbered).to_bytes(2, "big") + k.public_key[2:])
            for k in a.keys)) for a in p.authorities)) for p in participants)
    return RegistryUpdate(version=draw(st.integers(1, 2**63 - 1)), participants=participants,
                          embargoed_origins=tuple(draw(st.lists(codes, max_size=3))))


@st.composite
def envelopes(draw: st.DrawFn, kind: str) -> Envelope:
    sender, recipient = draw(two_codes())
    payload: Any
    if kind == "certificate":
        payload = draw(certificates(sender, recipient))
    elif kind == "receipt":
        payload = Receipt(certificate=draw(cert_numbers),
                          certificate_digest=draw(st.binary(min_size=32, max_size=32)))
    elif kind == "import_confirmation":
        payload = ImportConfirmation(
            certificate=draw(cert_numbers),
            certificate_digest=draw(st.binary(min_size=32, max_size=32)),
            destination=sender, importer=draw(parties), lines=draw(line_tuples()),
            parcels=draw(st.integers(1, MAX_PARCELS)), received_on=draw(st.dates()),
            remarks=draw(texts(60, min_size=0)),
        )
    elif kind == "rejection":
        problem = st.builds(Problem, texts(200, min_size=0), reason_codes, texts(80))
        payload = Rejection(reason=draw(reason_codes), text=draw(texts(80)),
                            certificate=draw(st.none() | cert_numbers),
                            problems=tuple(draw(st.lists(problem, max_size=4))))
    elif kind == "cancellation":
        payload = Cancellation(certificate=draw(cert_numbers), reason=draw(texts(80)))
    elif kind == "replacement":
        new = draw(certificates(sender, recipient))
        replaces = sender + draw(cert_numbers)[2:]  # one of the issuer's own numbers
        assume(replaces != new.number)
        payload = Replacement(replaces=replaces, reason=draw(texts(80)), certificate=new)
    elif kind == "registry_update":
        sender, recipient = CHAIR, BROADCAST
        payload = draw(registry_updates())
    elif kind == "ping":
        payload = Ping(nonce=draw(st.binary(min_size=16, max_size=16)))
    else:
        payload = Pong(nonce=draw(st.binary(min_size=16, max_size=16)))
    return Envelope(message_id=draw(message_ids), sender=sender, recipient=recipient,
                    created_at=draw(instants), in_reply_to=draw(st.none() | message_ids),
                    payload=payload)


KINDS = ["certificate", "receipt", "import_confirmation", "rejection", "cancellation",
         "replacement", "registry_update", "ping", "pong"]
any_envelope = st.sampled_from(KINDS).flatmap(envelopes)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_every_kind_round_trips(kind: str, data: st.DataObject) -> None:
    envelope = data.draw(envelopes(kind))
    frame = seal(envelope, KEY)
    opened = open_frame(frame, lookup)
    assert opened.envelope == envelope
    assert str(opened.envelope.kind) == kind
    assert opened.frame.raw == frame
    assert encode_body(opened.envelope) == opened.frame.body  # one message, one encoding
    assert seal(opened.envelope, KEY) == frame


def test_reason_members_are_welcome_in_rejections() -> None:
    envelope = Envelope(sender="ZA", recipient="BW", created_at=0, payload=Rejection(
        reason=Reason.BODY_SCHEMA, text="no", problems=(Problem("x", Reason.EMPTY, "m"),)))
    assert open_frame(seal(envelope, KEY), lookup).envelope == envelope


# -- single bit flips ----------------------------------------------------------------------


def assert_refused(frame: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        open_frame(frame, lookup)
    return caught.value


def flip(frame: bytes, bit: int) -> bytes:
    out = bytearray(frame)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelope=any_envelope, data=st.data())
def test_any_single_bit_flip_is_refused(envelope: Envelope, data: st.DataObject) -> None:
    frame = seal(envelope, KEY)
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    assert_refused(flip(frame, bit))


def test_every_bit_of_a_certificate_frame() -> None:
    """Exhaustively: each of the ~6,000 one-bit changes of one frame is refused."""
    certificate = Certificate(
        number="ZA/2026/1", issuer="ZA", issuing_authority="ZA-SADPMR", destination="BW",
        origins=("ZA", "MIXED"), exporter=Party(name="E", address="A"),
        importer=Party(name="I", address="B"),
        lines=(Line(hs_code="7102.10", carats_hundredths=100, usd_cents=5000),
               Line(hs_code="7102.31", carats_hundredths=2, usd_cents=70000)),
        parcels=2, issued_on=date(2026, 1, 1), expires_on=date(2026, 2, 1),
    )
    frame = seal(Envelope(sender="ZA", recipient="BW", created_at=1, payload=certificate),
                 KEY)
    reasons = {str(assert_refused(flip(frame, bit)).reason) for bit in range(len(frame) * 8)}
    assert reasons <= {
        "frame.malformed", "frame.truncated", "frame.unsupported_version", "key.unknown",
        "signature.invalid",
    }


# -- nothing but ProtocolError -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_a_frame(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_frame(data, lookup)


@settings(max_examples=200, deadline=None)
@given(kid=st.sampled_from([KID, bytes(16)]), version=st.integers(0, 255),
       length=st.integers(0, 2**32 - 1), rest=st.binary(max_size=200))
def test_arbitrary_bytes_behind_a_plausible_header(kid: bytes, version: int, length: int,
                                                   rest: bytes) -> None:
    data = b"KPX" + bytes([version]) + kid + length.to_bytes(4, "big") + rest
    with pytest.raises(ProtocolError):
        open_frame(data, lookup)


def test_oversize_and_non_bytes_frames() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_frame(bytes(MAX_FRAME_SIZE + 1))
    assert caught.value.reason == Reason.FRAME_TOO_LARGE
    with pytest.raises(ProtocolError):
        parse_frame("KPX")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        seal_body(bytes(MAX_FRAME_SIZE), KEY)


def test_seal_makes_no_frame_larger_than_a_receiver_accepts() -> None:
    """The signature counts towards the limit: a frame sealed at most MAX_FRAME_SIZE."""
    largest = seal_body(bytes(MAX_FRAME_SIZE - OVERHEAD), KEY)
    assert len(largest) == MAX_FRAME_SIZE
    assert parse_frame(largest).body == bytes(MAX_FRAME_SIZE - OVERHEAD)
    with pytest.raises(ProtocolError) as caught:
        seal_body(bytes(MAX_FRAME_SIZE - OVERHEAD + 1), KEY)
    assert caught.value.reason == Reason.FRAME_TOO_LARGE


@pytest.mark.parametrize("data", [
    b"\x82\xa1a\x01\xa1a\x02",  # {"a": 1, "a": 2}
    msgpack.packb([1, msgpack.Timestamp(1, 0)]),
    msgpack.packb({"a": [msgpack.Timestamp(1, 0)]}),
    msgpack.packb({"a": msgpack.Timestamp(1, 0)}),
], ids=["duplicate-key", "timestamp-in-array", "timestamp-in-nested-array",
        "timestamp-in-map"])
def test_unpack_on_its_own_refuses_duplicate_keys_and_timestamps(data: bytes) -> None:
    """Stored certificates and evidence records are read with unpack alone: no schema or
    canonical re-encoding follows to catch what it lets through."""
    with pytest.raises(ProtocolError) as caught:
        unpack(data)
    assert caught.value.reason == Reason.BODY_MALFORMED


def only_protocol_errors(body: bytes) -> None:
    """A signed body of any content: accepted, or refused with a ProtocolError."""
    try:
        opened = open_frame(seal_body(body, KEY), lookup)
    except ProtocolError:
        return
    assert encode_body(opened.envelope) == body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_signed_bodies(body: bytes) -> None:
    only_protocol_errors(body)
    with pytest.raises(ProtocolError):
        decode_body(body)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
    st.floats(width=32), st.text(chars, max_size=20), st.binary(max_size=40),
    st.sampled_from(["ZA", "certificate", "registry_update", "KPCS", "*", "7102.10"]),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**32), st.integers(0, 999_999_999)),
)
msgpack_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["kind", "payload", "sender", "lines"])
        | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=4), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_arbitrary_msgpack_values_as_bodies(value: Any) -> None:
    only_protocol_errors(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(value=msgpack_values, kind=st.sampled_from([*KINDS, "nonsense"]))
def test_arbitrary_payloads_under_a_valid_envelope(value: Any, kind: str) -> None:
    body = {"message_id": "0123456789abcdef", "kind": kind, "sender": "ZA",
            "recipient": "BW", "created_at": 0, "in_reply_to": None, "payload": value}
    only_protocol_errors(msgpack.packb(body, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_standalone_validators_raise_only_protocol_errors(value: Any) -> None:
    for validate in (validate_certificate, validate_import_confirmation):
        with contextlib.suppress(ProtocolError):
            validate(value)


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    for depth in (1024, 1025, 5000):
        only_protocol_errors(b"\x91" * depth + b"\x00")
