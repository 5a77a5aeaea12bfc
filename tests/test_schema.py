"""Validation of message bodies: every problem at once, each with its field path."""

from __future__ import annotations

import copy
from datetime import date
from typing import Any

import pytest

from protocol import (
    Certificate,
    ProtocolError,
    Reason,
    ValidationError,
    validate_certificate,
    validate_import_confirmation,
)
from protocol.codec import decode_body, pack
from protocol.schema import MAX_PROBLEMS, parse_envelope


def certificate(**changes: Any) -> dict[str, Any]:
    """A valid certificate payload (wire form), with ``changes`` applied."""
    value: dict[str, Any] = {
        "number": "ZA/2026/000123",
        "issuer": "ZA",
        "issuing_authority": "ZA-SADPMR",
        "destination": "BW",
        "origins": ["ZA", "MIXED"],
        "exporter": {"name": "Kimberley Rough Exports", "address": "1 Dutoitspan Rd"},
        "importer": {"name": "Gaborone Cutting Works", "address": "Plot 5, Gaborone"},
        "lines": [
            {"hs_code": "7102.10", "carats_hundredths": 1_234_567, "usd_cents": 98_765_432},
            {"hs_code": "7102.31", "carats_hundredths": 250_075, "usd_cents": 375_011_250},
        ],
        "parcels": 3,
        "issued_on": "2026-01-05",
        "expires_on": "2026-03-05",
        "remarks": "",
    }
    value.update(changes)
    return value


def confirmation(**changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "certificate": "ZA/2026/000123",
        "certificate_digest": bytes(32),
        "destination": "BW",
        "importer": {"name": "Gaborone Cutting Works", "address": "Plot 5, Gaborone"},
        "lines": [{"hs_code": "7102.10", "carats_hundredths": 1_234_567,
                   "usd_cents": 98_765_432}],
        "parcels": 3,
        "received_on": "2026-01-20",
        "remarks": "",
    }
    value.update(changes)
    return value


def envelope(payload: Any, kind: str = "certificate", **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "message_id": "0123456789abcdef0123456789abcdef",
        "kind": kind,
        "sender": "ZA",
        "recipient": "BW",
        "created_at": 1_767_225_600_000,
        "in_reply_to": None,
        "payload": payload,
    }
    value.update(changes)
    return value


def problems(value: Any) -> list[tuple[str, str]]:
    """The (path, reason) pairs the envelope check reports; [] when it is valid."""
    try:
        parse_envelope(value)
    except ValidationError as exc:
        assert exc.reason == Reason.BODY_SCHEMA
        return [(p.path, str(p.reason)) for p in exc.problems]
    return []


def certificate_problems(value: Any) -> list[tuple[str, str]]:
    try:
        validate_certificate(value)
    except ValidationError as exc:
        return [(p.path, str(p.reason)) for p in exc.problems]
    return []


# -- the valid baseline -------------------------------------------------------------------


def test_the_baseline_is_valid() -> None:
    cert = validate_certificate(certificate())
    assert isinstance(cert, Certificate)
    assert cert.carats_hundredths == 1_234_567 + 250_075
    assert cert.usd_cents == 98_765_432 + 375_011_250
    assert cert.issued_on == date(2026, 1, 5)
    assert problems(envelope(certificate())) == []
    assert validate_import_confirmation(confirmation()).parcels == 3


# -- every problem at once ----------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    bad = certificate(parcels=0, expires_on="2026-01-01", note="?")
    bad["lines"][1]["carats_hundredths"] = 0
    bad["lines"][0]["usd_cents"] = 12.5
    bad["exporter"]["name"] = ""
    del bad["remarks"]
    assert sorted(certificate_problems(bad)) == sorted([
        ("note", "field.unknown"),
        ("remarks", "field.required"),
        ("exporter.name", "field.empty"),
        ("lines[0].usd_cents", "field.float_not_allowed"),
        ("lines[1].carats_hundredths", "field.not_positive"),
        ("parcels", "field.not_positive"),
        ("expires_on", "field.expiry_before_issue"),
    ])


def test_paths_inside_an_envelope_start_with_payload() -> None:
    bad = certificate()
    bad["lines"][1]["carats_hundredths"] = -5
    assert problems(envelope(bad)) == [("payload.lines[1].carats_hundredths",
                                        "field.not_positive")]


def test_the_error_says_everything() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_certificate(certificate(parcels=0, issuer="za"))
    text = str(caught.value)
    assert text.startswith("body.schema: certificate is not valid: ")
    assert "parcels: must be > 0" in text and "issuer: must be a participant code" in text
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.problems[0].to_wire().keys() == {"path", "reason", "message"}


def test_problems_stop_at_the_cap() -> None:
    bad = envelope(certificate(**{f"extra{i:03}": 1 for i in range(150)}))
    assert len(problems(bad)) == MAX_PROBLEMS


def test_a_body_that_is_not_a_map() -> None:
    assert problems([1, 2]) == [("", "field.wrong_type")]
    assert problems(envelope("certificate")) == [("payload", "field.wrong_type")]


# -- integers: no booleans, no floats, ranges ------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_an_integer(value: bool) -> None:
    assert certificate_problems(certificate(parcels=value)) == [("parcels", "field.wrong_type")]


@pytest.mark.parametrize("value", [5.0, 0.5, float("inf"), float("nan")])
def test_floats_are_refused_as_such(value: float) -> None:
    bad = certificate()
    bad["lines"][0]["carats_hundredths"] = value
    assert certificate_problems(bad) == [("lines[0].carats_hundredths",
                                          "field.float_not_allowed")]


@pytest.mark.parametrize(("value", "reason"), [
    (0, "field.not_positive"), (-1, "field.not_positive"), ("12", "field.wrong_type"),
    (None, "field.wrong_type"), (1_000_001, "field.too_large"),
])
def test_integer_rules(value: Any, reason: str) -> None:
    assert certificate_problems(certificate(parcels=value)) == [("parcels", reason)]


def test_limits_are_inclusive() -> None:
    ok = certificate(parcels=1_000_000)
    ok["lines"] = [{"hs_code": "7102.10", "carats_hundredths": 10**12, "usd_cents": 10**15}]
    assert certificate_problems(ok) == []
    assert problems(envelope(certificate(), created_at=2**53)) == []
    assert problems(envelope(certificate(), created_at=2**53 + 1)) == [
        ("created_at", "field.too_large")]
    assert problems(envelope(certificate(), created_at=-1)) == [("created_at", "field.negative")]
    reg = registry()
    key = reg["participants"][0]["authorities"][0]["keys"][0]
    key.update(valid_from=2**53, valid_until=2**53, revoked_at=2**53)
    assert problems(envelope(reg, kind="registry_update", sender="KPCS", recipient="*")) == []
    key.update(valid_until=2**53 + 1, revoked_at=2**53 + 1)
    prefix = "payload.participants[0].authorities[0].keys[0]"
    assert problems(envelope(reg, kind="registry_update", sender="KPCS", recipient="*")) == [
        (f"{prefix}.valid_until", "field.too_large"), (f"{prefix}.revoked_at", "field.too_large")]


# -- dates -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "reason"), [
    ("2026-02-29", "field.bad_date"),      # not a leap year
    ("2026-13-01", "field.bad_date"),
    ("0000-01-01", "field.bad_date"),
    ("2026-1-05", "field.bad_format"),
    ("05.01.2026", "field.bad_format"),
    # Arabic-Indic digits: digits, but not ASCII ones
    ("\u0662\u0660\u0662\u0666-\u0660\u0661-\u0660\u0665", "field.bad_format"),
    ("2026-01-05T10:00Z", "field.too_long"),
    ("", "field.empty"),
    (20260105, "field.wrong_type"),
])
def test_bad_dates(value: Any, reason: str) -> None:
    assert certificate_problems(certificate(issued_on=value)) == [("issued_on", reason)]


def test_leap_day_is_a_date() -> None:
    leap = certificate(issued_on="2028-02-29", expires_on="2028-03-01")
    assert certificate_problems(leap) == []


@pytest.mark.parametrize(("issued", "expires"), [
    ("2026-01-05", "2026-01-04"),
    ("2026-01-05", "2026-01-05"),   # expiring on the day of issue is not after it
    ("1970-01-02", "1970-01-01"),   # the epoch is an ordinary date
])
def test_expiry_must_be_after_issue(issued: str, expires: str) -> None:
    assert certificate_problems(certificate(issued_on=issued, expires_on=expires)) == [
        ("expires_on", "field.expiry_before_issue")]


def test_no_expiry_rule_when_a_date_is_already_wrong() -> None:
    assert certificate_problems(certificate(issued_on="2026-02-30",
                                            expires_on="2020-01-01")) == [
        ("issued_on", "field.bad_date")]


# -- text --------------------------------------------------------------------------------


def test_lengths_count_code_points_not_bytes() -> None:
    ok = certificate(exporter={"name": "é" * 200, "address": "x"})
    assert certificate_problems(ok) == []
    long = certificate(exporter={"name": "é" * 201, "address": "x"})
    assert certificate_problems(long) == [("exporter.name", "field.too_long")]
    assert certificate_problems(certificate(remarks="é" * 2000)) == []
    assert certificate_problems(certificate(remarks="é" * 2001)) == [
        ("remarks", "field.too_long")]


def test_codes_and_numbers() -> None:
    assert certificate_problems(certificate(destination="bw")) == [
        ("destination", "field.bad_format")]
    assert certificate_problems(certificate(destination="BWA")) == [
        ("destination", "field.too_long")]
    assert certificate_problems(certificate(number="BW/2026/1")) == [
        ("number", "field.number_prefix")]
    assert certificate_problems(certificate(issuing_authority="BW-MMGE")) == [
        ("issuing_authority", "field.bad_format")]
    assert certificate_problems(certificate(destination="ZA")) == [
        ("destination", "field.self_trade")]


def test_a_lone_surrogate_is_not_text() -> None:
    # Only local input (JSON, a form) can hold one: it has no UTF-8, so it could never be
    # signed, and must be refused as a field, not fail later at signing.
    assert certificate_problems(certificate(remarks="ok \ud800")) == [
        ("remarks", "field.bad_format")]
    assert certificate_problems(certificate(remarks="ok \U0001f48e")) == []


def test_message_ids_are_16_to_64_characters() -> None:
    for ok in ("a" * 16, "A-_9" * 16):
        assert problems(envelope(certificate(), message_id=ok, in_reply_to=ok)) == []
    assert problems(envelope(certificate(), message_id="a" * 15, in_reply_to="b" * 15)) == [
        ("message_id", "field.bad_format"), ("in_reply_to", "field.bad_format")]
    assert problems(envelope(certificate(), message_id="a" * 65)) == [
        ("message_id", "field.too_long")]


def test_bytes_are_not_text_and_text_is_not_bytes() -> None:
    assert certificate_problems(certificate(issuer=b"ZA")) == [("issuer", "field.wrong_type")]
    assert _confirmation_problems(confirmation(certificate_digest=bytes(32).hex())) == [
        ("certificate_digest", "field.wrong_type")]
    assert _confirmation_problems(confirmation(certificate_digest=bytes(31))) == [
        ("certificate_digest", "field.bad_format")]


def _confirmation_problems(value: Any) -> list[tuple[str, str]]:
    try:
        validate_import_confirmation(value)
    except ValidationError as exc:
        return [(p.path, str(p.reason)) for p in exc.problems]
    return []


def test_origins() -> None:
    assert certificate_problems(certificate(origins=["MIXED"])) == []
    assert certificate_problems(certificate(origins=[])) == [("origins", "field.empty")]
    assert certificate_problems(certificate(origins=["ZA", "ABCDEF", "Mixed"])) == [
        ("origins[1]", "field.too_long"), ("origins[1]", "field.bad_format"),
        ("origins[2]", "field.bad_format")]


# -- HS lines ----------------------------------------------------------------------------


def test_hs_lines() -> None:
    bad = certificate()
    bad["lines"][1]["hs_code"] = "7102.10"
    assert certificate_problems(bad) == [("lines[1].hs_code", "field.duplicate_hs_code")]
    bad["lines"][1]["hs_code"] = "7102.29"
    assert certificate_problems(bad) == [("lines[1].hs_code", "field.unknown_hs_code")]
    four = certificate()
    four["lines"] = four["lines"] * 2
    assert certificate_problems(four) == [("lines", "field.too_long")]


def test_two_lines_without_a_code_are_not_duplicates() -> None:
    bad = certificate()
    for line in bad["lines"]:
        del line["hs_code"]
    assert certificate_problems(bad) == [
        ("lines[0].hs_code", "field.required"), ("lines[1].hs_code", "field.required")]
    assert certificate_problems(certificate(lines=["x", "y"])) == [
        ("lines[0]", "field.wrong_type"), ("lines[1]", "field.wrong_type")]


# -- unknown and missing fields -----------------------------------------------------------


def test_unknown_fields_are_refused_everywhere() -> None:
    bad = certificate()
    bad["importer"]["vat"] = "BE0123"
    assert problems(envelope(bad, priority="high")) == [
        ("priority", "field.unknown"), ("payload.importer.vat", "field.unknown")]


def test_nullable_fields_must_still_be_present() -> None:
    value = envelope(certificate())
    del value["in_reply_to"]
    assert problems(value) == [("in_reply_to", "field.required")]


def test_an_unknown_kind_leaves_the_payload_unexamined() -> None:
    assert problems(envelope({"anything": 1.5}, kind="certificate_v2")) == [
        ("kind", "field.unknown_kind")]


# -- the payload's parties are the envelope's ---------------------------------------------


def test_certificate_issuer_and_destination_must_be_the_envelope_parties() -> None:
    assert problems(envelope(certificate(), sender="IN", recipient="EU")) == [
        ("payload.issuer", "field.sender_mismatch"),
        ("payload.destination", "field.recipient_mismatch"),
    ]


def test_replacement_certificate_parties() -> None:
    payload = {"replaces": "BW/2026/000001", "reason": "typo",
               "certificate": certificate(issuer="BW", number="BW/1",
                                          issuing_authority="BW-MMGE", destination="ZA")}
    assert problems(envelope(payload, kind="replacement")) == [
        ("payload.certificate.issuer", "field.sender_mismatch"),
        ("payload.certificate.destination", "field.recipient_mismatch"),
    ]
    # A Participant replaces only its own certificates.
    payload = {"replaces": "BW/2026/000001", "reason": "typo", "certificate": certificate()}
    assert problems(envelope(payload, kind="replacement")) == [
        ("payload.replaces", "field.number_prefix")]
    payload = {"replaces": "ZA/2026/000123", "reason": "typo", "certificate": certificate()}
    assert problems(envelope(payload, kind="replacement")) == [
        ("payload.replaces", "field.bad_format")]


def test_import_confirmation_comes_from_its_destination() -> None:
    value = envelope(confirmation(destination="EU"), kind="import_confirmation",
                     sender="BW", recipient="ZA")
    assert problems(value) == [("payload.destination", "field.sender_mismatch")]


def test_no_message_to_oneself() -> None:
    ping = {"nonce": bytes(16)}
    assert problems(envelope(ping, kind="ping", recipient="ZA")) == [
        ("recipient", "field.self_trade")]


def test_a_rejection_lists_at_most_100_problems() -> None:
    listed = [{"path": "x", "reason": "field.empty", "message": "must not be empty"}]
    rejection = {"reason": "body.schema", "text": "no", "certificate": None,
                 "problems": listed * 100}
    assert problems(envelope(rejection, kind="rejection")) == []
    rejection["problems"] = listed * 101
    assert problems(envelope(rejection, kind="rejection")) == [
        ("payload.problems", "field.too_long")]


# -- the registry belongs to the Chair ---------------------------------------------------


def registry(**changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "version": 3,
        "participants": [{"code": "ZA", "name": "South Africa", "status": "active",
                          "authorities": [{"id": "ZA-SADPMR", "name": "SADPMR", "keys": [
                              {"public_key": bytes(32), "valid_from": 0, "valid_until": None,
                               "revoked_at": None}]}]}],
        "embargoed_origins": [],
    }
    value.update(changes)
    return value


def test_registry_updates_come_from_the_chair_to_everyone() -> None:
    assert problems(envelope(registry(), kind="registry_update", sender="KPCS",
                             recipient="*")) == []
    assert problems(envelope(registry(), kind="registry_update")) == [
        ("sender", "field.bad_format"), ("recipient", "field.bad_format")]


def test_only_registry_updates_come_from_the_chair() -> None:
    assert problems(envelope({"nonce": bytes(16)}, kind="ping", sender="KPCS")) == [
        ("sender", "field.bad_format")]


def test_registry_content() -> None:
    reg = registry(version=0, embargoed_origins=["cf"])
    reg["participants"].append(copy.deepcopy(reg["participants"][0]))
    reg["participants"][1]["status"] = "dormant"
    value = envelope(reg, kind="registry_update", sender="KPCS", recipient="*")
    assert sorted(problems(value)) == sorted([
        ("payload.version", "field.not_positive"),
        ("payload.participants[1].status", "field.bad_format"),
        ("payload.embargoed_origins[0]", "field.bad_format"),
        ("payload.participants", "field.bad_format"),
    ])


def test_registry_lists_are_capped() -> None:
    """At most 500 Participants, 50 authorities each, 20 keys each, 500 embargoed origins:
    the caps in SPEC that bound what one registry update can make a node hold."""
    def participant(i: int) -> dict[str, Any]:
        code = chr(65 + i // 26 % 26) + chr(65 + i % 26)
        return {"code": code, "name": code, "status": "active", "authorities": []}

    def authority(i: int, keys: int = 1) -> dict[str, Any]:
        return {"id": f"ZA-{i}", "name": "A", "keys": [
            {"public_key": i.to_bytes(2, "big") + bytes([k]) * 30, "valid_from": 0,
             "valid_until": None, "revoked_at": None} for k in range(keys)]}

    def registry_problems(reg: dict[str, Any]) -> list[tuple[str, str]]:
        return problems(envelope(reg, kind="registry_update", sender="KPCS", recipient="*"))

    # 26 * 26 codes, no two alike: 500 are a valid registry, and 501 too many
    assert registry_problems(registry(participants=[participant(i) for i in range(500)])) == []
    assert registry_problems(registry(participants=[participant(i) for i in range(501)])) == [
        ("payload.participants", "field.too_long")]
    za = registry()["participants"][0]
    za["authorities"] = [authority(i) for i in range(50)]
    assert registry_problems(registry(participants=[za])) == []
    za["authorities"].append(authority(50))
    assert registry_problems(registry(participants=[za])) == [
        ("payload.participants[0].authorities", "field.too_long")]
    za["authorities"] = [authority(0, keys=20)]
    assert registry_problems(registry(participants=[za])) == []
    za["authorities"] = [authority(0, keys=21)]
    assert registry_problems(registry(participants=[za])) == [
        ("payload.participants[0].authorities[0].keys", "field.too_long")]
    assert registry_problems(registry(embargoed_origins=["CF"] * 500)) == []
    assert registry_problems(registry(embargoed_origins=["CF"] * 501)) == [
        ("payload.embargoed_origins", "field.too_long")]


def test_participants_without_a_code_do_not_repeat_one() -> None:
    reg = registry()
    first = reg["participants"][0]
    del first["code"]
    second = copy.deepcopy(first)
    second["authorities"][0]["keys"][0]["public_key"] = bytes(range(32))  # keys must not repeat
    reg["participants"].append(second)
    value = envelope(reg, kind="registry_update", sender="KPCS", recipient="*")
    assert problems(value) == [("payload.participants[0].code", "field.required"),
                               ("payload.participants[1].code", "field.required")]


# -- through the codec --------------------------------------------------------------------


def test_decode_body_reports_the_same_problems() -> None:
    bad = certificate(parcels=True)
    with pytest.raises(ValidationError) as caught:
        decode_body(pack(envelope(bad)))
    assert [(p.path, p.reason) for p in caught.value.problems] == [
        ("payload.parcels", Reason.WRONG_TYPE)]
