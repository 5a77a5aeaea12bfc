"""The node's decisions applied to real stores, messages carried by hand (no broker)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from node import evidence
from node.config import KEYS_DIR, ConfigError
from node.evidence import unsupported_records, verify_chain
from node.keyfile import write_signing_key
from node.machine import Record, Refusal, Side, State, day_of, is_overdue
from node.network import create_network
from node.service import Arrival, CommandRefused, Delivery, Node, now_ms
from node.store import StoreError
from node.tokens import Principal, Role, Tokens
from protocol import Line, ParticipantStatus
from tests.netutil import carry, certificate

Nodes = dict[str, Node]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    network = create_network(tmp_path, ["ZA", "IN", "EU"], ["amqp://unused/"],
                             others=[("XS", ParticipantStatus.SUSPENDED)])
    opened = {code: Node.open(cfg) for code, cfg in network.configs.items()}
    yield opened
    for n in opened.values():
        n.close()


def evidence_frames(node: Node, number: str) -> set[bytes]:
    return {bytes(e.frame) for e in node.store.evidence(number)}


def test_loop_closes_on_both_sides_with_identical_evidence(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0001", "ZA", "IN"))
    assert [(k, v.dead_letter) for k, v in carry(za, nodes)] == [("certificate", None)]
    assert india.store.get(Side.IMPORT, "ZA-2026-0001").state is State.RECEIVED
    carry(india, nodes)  # the receipt
    assert za.store.get(Side.EXPORT, "ZA-2026-0001").state is State.DELIVERED
    india.confirm("ZA-2026-0001")
    carry(india, nodes)
    exported = za.store.get(Side.EXPORT, "ZA-2026-0001")
    imported = india.store.get(Side.IMPORT, "ZA-2026-0001")
    assert exported.state is State.CONFIRMED and imported.state is State.CONFIRMED
    assert exported.confirmation == imported.confirmation
    assert exported.discrepancies == () == imported.discrepancies
    # certificate, receipt, confirmation: the same three signed frames on both sides
    assert evidence_frames(za, "ZA-2026-0001") == evidence_frames(india, "ZA-2026-0001")
    assert len(evidence_frames(za, "ZA-2026-0001")) == 3


def test_discrepancy_is_recorded_on_both_sides(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0002", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    lines = (Line(hs_code="7102.31", carats_hundredths=249_000, usd_cents=40_000_000),
             Line(hs_code="7102.21", carats_hundredths=30_000, usd_cents=10_000_000))
    india.confirm("ZA-2026-0002", lines=lines, parcels=2)
    carry(india, nodes)
    for node, side in ((za, Side.EXPORT), (india, Side.IMPORT)):
        record = node.store.get(side, "ZA-2026-0002")
        assert record.state is State.CONFIRMED
        assert {(d.field, d.declared, d.received) for d in record.discrepancies} == {
            ("parcels", 3, 2), ("lines[7102.31].carats_hundredths", 250_000, 249_000)}


def test_every_declared_line_is_named_in_a_confirmation_zero_for_one_not_arrived(
        nodes: Nodes) -> None:
    """The CLI refused a declared line left out while the API signed it as not arrived, and
    the console could not say 'not arrived' at all: one rule now, in the decision."""
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0005", "ZA", "IN"))  # 7102.31 and 7102.21 declared
    carry(za, nodes)
    carry(india, nodes)  # the receipt
    arrived = Line(hs_code="7102.31", carats_hundredths=250_000, usd_cents=40_000_000)
    none = Line(hs_code="7102.21", carats_hundredths=0, usd_cents=0)
    typo = Line(hs_code="7102.29", carats_hundredths=30_000, usd_cents=10_000_000)
    refusals = {
        "left out": ((arrived,), "lines", "field.required", "declares HS 7102.21 too"),
        "mistyped": ((arrived, typo), "lines", "field.required", "declares HS 7102.21 too"),
        "twice": ((arrived, none, dataclasses.replace(none, carats_hundredths=1,
                                                      usd_cents=1)),
                  "lines[2].hs_code", "field.duplicate_hs_code", "appears twice"),
        "half zero": ((arrived, dataclasses.replace(none, usd_cents=5)),
                      "lines[1].carats_hundredths", "field.not_positive", "which arrived"),
        "nothing": ((dataclasses.replace(arrived, carats_hundredths=0, usd_cents=0), none),
                    "lines", "field.required", "every line given as not arrived"),
    }
    for case, (lines, path, reason, says) in refusals.items():
        with pytest.raises(CommandRefused) as refused:
            india.confirm("ZA-2026-0005", lines=lines)
        problem = refused.value.refusal.problems[0]
        assert (problem.path, problem.reason) == (path, reason), case
        assert says in problem.message, (case, problem.message)
        assert india.store.get(Side.IMPORT, "ZA-2026-0005").state is State.RECEIVED, case
        assert india.store.due(2**62, 10) == [], case  # nothing signed, nothing to send
    india.confirm("ZA-2026-0005", lines=(none, arrived))
    carry(india, nodes)
    for node, side in ((za, Side.EXPORT), (india, Side.IMPORT)):
        record = node.store.get(side, "ZA-2026-0005")
        assert record.state is State.CONFIRMED
        assert record.confirmation is not None and record.confirmation.lines == (arrived,)
        assert {(d.field, d.declared, d.received) for d in record.discrepancies} == {
            ("lines[7102.21].carats_hundredths", 30_000, 0),
            ("lines[7102.21].usd_cents", 10_000_000, 0)}


def test_a_line_not_declared_cannot_be_named_as_not_arrived(nodes: Nodes) -> None:
    """0 carats and US$ 0 says a declared line did not arrive. Named for an HS code not
    declared ('7102.10', a stray space before a declared one, text that is no HS code at
    all) it said nothing and was dropped unseen, never checked against the HS codes: the
    confirmation was signed as if the line had not been there."""
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0006", "ZA", "IN"))  # 7102.31 and 7102.21 declared
    carry(za, nodes)
    arrived = Line(hs_code="7102.31", carats_hundredths=250_000, usd_cents=40_000_000)
    other = Line(hs_code="7102.21", carats_hundredths=30_000, usd_cents=10_000_000)
    for stray in ("7102.10", " 7102.21", "not an HS code"):
        with pytest.raises(CommandRefused) as refused:
            india.confirm("ZA-2026-0006", lines=(
                arrived, other, Line(hs_code=stray, carats_hundredths=0, usd_cents=0)))
        assert [(p.path, p.reason) for p in refused.value.refusal.problems] == [
            ("lines[2].hs_code", "field.unknown_hs_code")], stray
        assert "not declared" in refused.value.refusal.problems[0].message
        assert india.store.get(Side.IMPORT, "ZA-2026-0006").state is State.RECEIVED


def test_a_problem_of_a_line_after_one_not_arrived_names_that_line(nodes: Nodes) -> None:
    """The lines that did not arrive are left out before the confirmation is checked, so a
    problem of a later line was reported at its place among those that arrived: lines[0],
    the line given as not arrived, for the fault of lines[1]."""
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0007", "ZA", "IN"))  # 7102.31 and 7102.21 declared
    carry(za, nodes)
    with pytest.raises(CommandRefused) as refused:
        india.confirm("ZA-2026-0007", lines=(
            Line(hs_code="7102.21", carats_hundredths=0, usd_cents=0),
            Line(hs_code="7102.31", carats_hundredths=10**13, usd_cents=40_000_000)))
    assert [p.path for p in refused.value.refusal.problems] == [
        "lines[1].carats_hundredths"], refused.value.refusal
    assert "lines[0]" not in str(refused.value.refusal)


def test_duplicate_delivery_gets_the_original_answer_and_one_record(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0003", "ZA", "IN"))
    (row,) = za.store.due(2**62, 10)
    (first,) = india.handle_batch([Delivery(row.frame)])
    (answer1,) = india.store.due(2**62, 10)
    with india.store.transaction():
        india.store.mark_published([answer1.seq], 1)
    (second,) = india.handle_batch([Delivery(row.frame)])
    assert second.duplicate and not first.duplicate
    (answer2,) = india.store.due(2**62, 10)
    assert answer2.frame == answer1.frame  # the same receipt, byte for byte
    assert len(india.store.records(side=Side.IMPORT)) == 1


def test_refusals_reach_the_exporter_with_their_reason(nodes: Nodes, tmp_path: Path) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    # importer not a Participant in good standing: refused at issue time
    with pytest.raises(CommandRefused) as refused:
        za.issue(certificate("ZA-2026-0004", "ZA", "XS"))
    assert refused.value.refusal.reason == "participant.suspended"
    # a node issues for its own Participant only, and says so first
    with pytest.raises(CommandRefused) as refused:
        za.issue(certificate("IN-2026-0004", "IN", "EU"))
    assert refused.value.refusal.reason == "field.sender_mismatch"
    assert refused.value.refusal.problems[0].path == "issuer"
    # the importer's registry disagrees (here: number already used) → signed rejection back
    za.issue(certificate("ZA-2026-0005", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    za.store.db.execute("DELETE FROM certificates WHERE number='ZA-2026-0005'")
    za.issue(certificate("ZA-2026-0005", "ZA", "IN"))
    ((_, verdict),) = carry(za, nodes)
    assert verdict.dead_letter is not None
    assert verdict.dead_letter.reason == "certificate.duplicate_number"
    carry(india, nodes)
    record = za.store.get(Side.EXPORT, "ZA-2026-0005")
    assert record.state is State.REJECTED
    assert record.rejection_reason == "certificate.duplicate_number"
    for node in (za, india):  # the evidence logs back every record, rejected ones too
        assert unsupported_records(node.store.records(), node.store.evidence()) == []


def test_no_certificate_is_issued_to_a_withdrawn_or_unlisted_participant(
        tmp_path: Path) -> None:
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"],
                             others=[("XW", ParticipantStatus.WITHDRAWN)])
    za = Node.open(network.configs["ZA"])
    try:
        for to, reason in (("XW", "participant.withdrawn"), ("ZZ", "participant.unknown")):
            with pytest.raises(CommandRefused) as refused:
                za.issue(certificate(f"ZA-2026-{to}", "ZA", to))
            assert refused.value.refusal.reason == reason
            assert za.store.get(Side.EXPORT, f"ZA-2026-{to}") is None
    finally:
        za.close()


def test_cancel_and_replace_propagate(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0006", "ZA", "IN"))
    za.issue(certificate("ZA-2026-0007", "ZA", "IN"))
    carry(za, nodes)
    za.cancel("ZA-2026-0006", "issued in error")
    za.replace("ZA-2026-0007", certificate("ZA-2026-0008", "ZA", "IN", parcels=4), "wrong parcels")
    carry(za, nodes)
    assert india.store.get(Side.IMPORT, "ZA-2026-0006").state is State.CANCELLED
    old = india.store.get(Side.IMPORT, "ZA-2026-0007")
    new = india.store.get(Side.IMPORT, "ZA-2026-0008")
    assert (old.state, old.replaced_by) == (State.REPLACED, "ZA-2026-0008")
    assert (new.state, new.replaces) == (State.RECEIVED, "ZA-2026-0007")
    assert za.store.get(Side.EXPORT, "ZA-2026-0007").replaced_by == "ZA-2026-0008"
    # both ends keep the exporter's reason (the importer's record had none)
    assert old.rejection_text == "wrong parcels"
    assert za.store.get(Side.EXPORT, "ZA-2026-0007").rejection_text == "wrong parcels"
    with pytest.raises(CommandRefused):
        india.confirm("ZA-2026-0006")
    # the evidence logs back every record these left (what verify-log checks)
    for node in (za, india):
        assert unsupported_records(node.store.records(), node.store.evidence()) == []


def test_evidence_log_verifies_and_detects_a_changed_byte(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0009", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    keys = [bytes(n.signing_key().verify_key) for n in nodes.values()]
    chair = za.config.chair_public_key
    assert verify_chain(za.store.evidence(), keys, chair) == []
    seq, frame = za.store.db.execute("SELECT seq, frame FROM evidence ORDER BY seq DESC").fetchone()
    changed = bytearray(frame)
    changed[40] ^= 0x01
    za.store.db.execute("UPDATE evidence SET frame=? WHERE seq=?", (bytes(changed), seq))
    faults = verify_chain(za.store.evidence(), keys, chair)
    assert faults and all(f.seq == seq for f in faults)


def test_verifying_the_chain_decodes_only_the_frames_the_chair_signed(
        nodes: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify_chain learns keys from registry updates; it decoded every frame's body to
    find them, a quarter of verify-log's time on a node with years of trade."""
    za, india = nodes["ZA"], nodes["IN"]
    for i in range(3):
        za.issue(certificate(f"ZA-2026-002{i}", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    decoded: list[bytes] = []
    original = evidence.decode_body

    def counting(body: bytes) -> Any:
        decoded.append(body)
        return original(body)
    monkeypatch.setattr(evidence, "decode_body", counting)
    keys = [bytes(n.signing_key().verify_key) for n in nodes.values()]
    assert verify_chain(za.store.evidence(), keys, za.config.chair_public_key) == []
    registry_entries = za.store.db.execute(  # the one entry about no certificate
        "SELECT count(*) FROM evidence WHERE certificate IS NULL").fetchone()[0]
    logged = za.store.last_evidence_seq()
    assert 1 <= len(decoded) == registry_entries < logged


def test_evidence_cut_short_at_its_end_is_caught_by_the_records_it_no_longer_backs(
        nodes: Nodes) -> None:
    """Deleting the newest entries leaves a chain that still links up; the records those
    entries justified show the cut (verify-log reported 'OK' before)."""
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0011", "ZA", "IN"))
    carry(za, nodes)
    india.confirm("ZA-2026-0011")
    carry(india, nodes)
    keys = [bytes(n.signing_key().verify_key) for n in nodes.values()]
    for node in (za, india):
        assert verify_chain(node.store.evidence(), keys, za.config.chair_public_key) == []
        assert unsupported_records(node.store.records(), node.store.evidence()) == []
    newest = za.store.db.execute("SELECT max(seq) FROM evidence").fetchone()[0]
    za.store.db.execute("DELETE FROM evidence WHERE seq = ?", (newest,))  # the confirmation
    assert verify_chain(za.store.evidence(), keys, za.config.chair_public_key) == []
    assert unsupported_records(za.store.records(), za.store.evidence()) == [
        "export ZA-2026-0011 is confirmed, but no import confirmation for it is in the log"]
    za.store.db.execute("DELETE FROM evidence")
    (record,) = za.store.records()
    assert unsupported_records(za.store.records(), za.store.evidence()) == [
        f"export ZA-2026-0011 (confirmed): its message {record.message_id} is not in the log"]


def test_a_refused_confirmation_from_a_third_participant_does_not_hide_a_cut(
        nodes: Nodes) -> None:
    """verify-log took any logged import confirmation naming the number as the backing of a
    confirmed record, even one refused from a third Participant: with the real one cut from
    the log's end, it still said OK."""
    from protocol import Envelope, ImportConfirmation, seal

    za, india, eu = nodes["ZA"], nodes["IN"], nodes["EU"]
    za.issue(certificate("ZA-2026-0200", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    record = india.store.get(Side.IMPORT, "ZA-2026-0200")
    assert record is not None
    bogus = ImportConfirmation(certificate=record.number, certificate_digest=bytes(32),
                               destination="EU", importer=record.certificate.importer,
                               lines=record.certificate.lines, parcels=1,
                               received_on=date.today(), remarks="")
    frame = seal(Envelope(sender="EU", recipient="ZA", created_at=now_ms(), payload=bogus),
                 eu.signing_key())
    (verdict,) = za.handle_batch([Delivery(frame)])
    assert verdict.dead_letter is not None
    cut = za.store.db.execute("SELECT max(seq) FROM evidence").fetchone()[0]
    india.confirm("ZA-2026-0200")
    carry(india, nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0200").state is State.CONFIRMED  # type: ignore[union-attr]
    assert unsupported_records(za.store.records(), za.store.evidence()) == []
    za.store.db.execute("DELETE FROM evidence WHERE seq > ?", (cut,))
    assert unsupported_records(za.store.records(), za.store.evidence()) == [
        "export ZA-2026-0200 is confirmed, but no import confirmation for it is in the log"]


def test_a_certificate_dated_ahead_is_held_back_on_receipt(nodes: Nodes) -> None:
    """Only issuing refused a certificate dated after tomorrow: one from a misbehaving
    exporter was received, and its importer could then neither confirm it (no shipment
    arrives before its certificate is issued) nor see it expire for years. It is now
    dead-lettered, but neither answered nor remembered: the importer's clock may be the
    one that is wrong (days behind), and a signed rejection would end the loop for good.
    Delivered again once the dates agree, it is taken."""
    from protocol import Envelope, seal

    za, india = nodes["ZA"], nodes["IN"]
    today = date.today()
    for days, number in ((2, "ZA-2026-0301"), (3, "ZA-2026-0302")):
        ahead = certificate(number, "ZA", "IN",
                            issued_on=(today + timedelta(days=days)).isoformat(),
                            expires_on=(today + timedelta(days=90)).isoformat())
        envelope = Envelope(sender="ZA", recipient="IN", created_at=now_ms(), payload=ahead)
        frame = seal(envelope, za.signing_key())
        (verdict,) = india.handle_batch([Delivery(frame)])
        if days == 2:  # a day's grace at issue, one more for clocks either side of midnight
            assert verdict.dead_letter is None
            assert india.store.get(Side.IMPORT, number).state is State.RECEIVED  # type: ignore[union-attr]
        else:
            assert verdict.dead_letter is not None
            assert verdict.dead_letter.reason == "field.bad_date"
            assert not verdict.kept
            # whom it came from, for dead-letters list and the replay's evidence entry
            assert verdict.dead_letter.answer_to == "ZA"
            assert verdict.dead_letter.in_reply_to == envelope.message_id
            assert india.store.get(Side.IMPORT, number) is None
            assert india.store.seen("ZA", envelope.message_id) is None
            assert not [e for e in india.store.evidence() if bytes(e.frame) == frame]
            # the same bytes once the importer's clock agrees (a slow clock set right)
            right = india.clock
            india.clock = lambda right=right: right() + 2 * 86_400_000  # type: ignore[misc]
            (again,) = india.handle_batch([Delivery(frame)])
            india.clock = right
            assert again.dead_letter is None
            assert india.store.get(Side.IMPORT, number).state is State.RECEIVED  # type: ignore[union-attr]
    assert [r.kind for r in india.store.due(2**62, 10)] == ["receipt", "receipt"]


def test_a_replacement_dated_ahead_of_a_slow_clock_is_refused_as_before(
        nodes: Nodes) -> None:
    """Held back like a certificate, a replacement left its old certificate open at the
    importer while the exporter held it replaced, and a cancellation of the replacement
    (no receipt came) made that for good. Refused, the exporter takes the old one back and
    both ends agree."""
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0500", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    right = india.clock
    india.clock = lambda: right() - 3 * 86_400_000  # the importer's clock 3 days behind
    za.replace("ZA-2026-0500", certificate("ZA-2026-0501", "ZA", "IN"), "wrong weight")
    ((_, verdict),) = carry(za, nodes)
    india.clock = right
    assert verdict.dead_letter is not None and verdict.dead_letter.reason == "field.bad_date"
    carry(india, nodes)  # the signed rejection: the old one is ZA's again, and resent
    assert za.store.get(Side.EXPORT, "ZA-2026-0500").state is State.ISSUED  # type: ignore[union-attr]
    za.resend_unanswered(0)
    carry(za, nodes)
    carry(india, nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0500").state is State.DELIVERED  # type: ignore[union-attr]
    assert india.store.get(Side.IMPORT, "ZA-2026-0500").state is State.RECEIVED  # type: ignore[union-attr]
    assert za.store.get(Side.EXPORT, "ZA-2026-0501").state is State.REJECTED  # type: ignore[union-attr]


def test_a_confirmation_that_contradicts_its_certificate_is_refused(nodes: Nodes) -> None:
    """The exporter took any confirmation naming the right digest: another importer, or
    goods received before the certificate was issued, closed the loop as if nothing
    differed. An importer's node never writes either."""
    from protocol import Envelope, ImportConfirmation, Party, seal

    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0400", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    record = india.store.get(Side.IMPORT, "ZA-2026-0400")
    assert record is not None
    honest = ImportConfirmation(
        certificate=record.number, certificate_digest=record.certificate_digest,
        destination="IN", importer=record.certificate.importer, lines=record.certificate.lines,
        parcels=record.certificate.parcels, received_on=date.today(), remarks="")
    for changed, reason, answered in (
            ({"importer": Party(name="Someone Else", address="Elsewhere")},
             "certificate.digest_mismatch", True),
            ({"received_on": record.certificate.issued_on - timedelta(days=1)},
             "certificate.digest_mismatch", True),
            # a confirmation binds to the certificate bytes sent, not just to the number
            ({"certificate_digest": bytes(32)}, "certificate.digest_mismatch", True),
            # ahead of the exporter's today: its own clock may be behind, so held back
            ({"received_on": date.today() + timedelta(days=3)}, "field.bad_date", False)):
        bad = dataclasses.replace(honest, **changed)
        frame = seal(Envelope(sender="IN", recipient="ZA", created_at=now_ms(), payload=bad),
                     india.signing_key())
        before = len(za.store.due(2**62, 100))
        (verdict,) = za.handle_batch([Delivery(frame)])
        assert verdict.dead_letter is not None, changed
        assert verdict.dead_letter.reason == reason
        assert len(za.store.due(2**62, 100)) == before + answered
        assert za.store.get(Side.EXPORT, "ZA-2026-0400").state is State.DELIVERED  # type: ignore[union-attr]
    india.confirm("ZA-2026-0400")
    carry(india, nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0400").state is State.CONFIRMED  # type: ignore[union-attr]


def test_a_receipt_for_other_certificate_bytes_does_not_deliver(nodes: Nodes) -> None:
    from protocol import Envelope, Receipt, seal

    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0401", "ZA", "IN"))
    receipt = Receipt(certificate="ZA-2026-0401", certificate_digest=bytes(32))
    frame = seal(Envelope(sender="IN", recipient="ZA", created_at=now_ms(), payload=receipt),
                 india.signing_key())
    (verdict,) = za.handle_batch([Delivery(frame)])
    assert verdict.dead_letter is not None
    assert verdict.dead_letter.reason == "certificate.digest_mismatch"
    assert za.store.get(Side.EXPORT, "ZA-2026-0401").state is State.ISSUED  # type: ignore[union-attr]


def test_forged_and_garbage_messages_are_refused_without_state_change(nodes: Nodes) -> None:
    za, india, eu = nodes["ZA"], nodes["IN"], nodes["EU"]
    za.issue(certificate("ZA-2026-0010", "ZA", "IN"))
    (row,) = za.store.due(2**62, 10)
    forged = bytearray(row.frame)
    forged[-1] ^= 0x80
    verdicts = india.handle_batch([Delivery(b"garbage" * 20), Delivery(bytes(forged))])
    assert [v.dead_letter.reason for v in verdicts if v.dead_letter] == [
        "frame.malformed", "signature.invalid"]
    assert india.store.records() == []
    assert india.store.due(2**62, 10) == []  # nobody authentic to answer
    # a genuine frame delivered to the wrong node is refused and answered
    (wrong,) = eu.handle_batch([Delivery(row.frame)])
    assert wrong.dead_letter is not None and wrong.dead_letter.reason == "message.not_for_us"
    assert len(eu.store.due(2**62, 10)) == 1
    # a genuine signature speaks only for its own Participant: EU cannot write as ZA
    from protocol import Envelope, seal

    as_za = seal(Envelope(sender="ZA", recipient="IN", created_at=now_ms(),
                          payload=certificate("ZA-2026-0011", "ZA", "IN")), eu.signing_key())
    (posing,) = india.handle_batch([Delivery(as_za)])
    assert posing.dead_letter is not None and posing.dead_letter.reason == "key.wrong_sender"
    assert india.store.records() == []


def test_backup_taken_live_restores_a_node_that_verifies(nodes: Nodes, tmp_path: Path) -> None:
    from node.backup import backup, restore

    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0100", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    # A key made for a rotation and an API token: without them, a node restored after the
    # old key lapsed could not sign, and every back office would be locked out.
    rotated = SigningKey.generate()
    za.config.path(KEYS_DIR).mkdir()
    write_signing_key(za.config.path(KEYS_DIR) / "next.key", rotated)
    token = Tokens(za.config.directory).add("customs", Role.OFFICER, now_ms())
    archive = tmp_path / "za.tar.gz"
    backup(za.config, archive)  # while ZA's store is open
    assert archive.stat().st_mode & 0o777 == 0o600
    config = restore(archive, tmp_path / "restored")
    restored = Node.open(config)
    try:
        assert restored.store.get(Side.EXPORT, "ZA-2026-0100").state is State.DELIVERED
        keys = [bytes(n.signing_key().verify_key) for n in nodes.values()]
        assert verify_chain(restored.store.evidence(), keys, za.config.chair_public_key) == []
        assert bytes(restored.signing_key()) == bytes(za.signing_key())
        assert [bytes(k) for k in restored.signing_keys] == [bytes(za.signing_key()),
                                                             bytes(rotated)]
        assert Tokens(config.directory).authenticate(token) == Principal("customs",
                                                                         Role.OFFICER)
        for name in ("node.key", "keys/next.key", "tokens.json", "node.sqlite3"):
            assert config.path(name).stat().st_mode & 0o777 == 0o600, name
        assert config.path(KEYS_DIR).stat().st_mode & 0o777 == 0o700
    finally:
        restored.close()
    with pytest.raises(ConfigError, match="is not an empty directory"):
        restore(archive, tmp_path / "restored")


def test_an_exporter_restored_to_before_a_confirmation_still_closes_the_loop(
        nodes: Nodes, tmp_path: Path) -> None:
    """A crash hunt restored an exporter from a snapshot taken before its importer
    confirmed: the confirmation had gone to the retired node, the restored one never sent
    the certificate again (it had its receipt), and the loop stayed open on its side until
    it expired, confirmed on the other. Now restore sends delivered certificates once more,
    and the importer answers a certificate sent again with its confirmation too."""
    from node.backup import backup, restore

    za, india = nodes["ZA"], nodes["IN"]
    for number in ("ZA-2026-0200", "ZA-2026-0201"):
        za.issue(certificate(number, "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    archive = tmp_path / "za.tar.gz"
    backup(za.config, archive)
    india.confirm("ZA-2026-0200")
    carry(india, nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0200").state is State.CONFIRMED
    restored = Node.open(restore(archive, tmp_path / "restored"))  # ZA retired for good
    try:
        assert restored.store.get(Side.EXPORT, "ZA-2026-0200").state is State.DELIVERED
        carry(restored, {**nodes, "ZA": restored})
        carry(india, {**nodes, "ZA": restored})
        closed = restored.store.get(Side.EXPORT, "ZA-2026-0200")
        assert closed.state is State.CONFIRMED
        assert closed.confirmation == india.store.get(Side.IMPORT, "ZA-2026-0200").confirmation
        assert restored.store.get(Side.EXPORT, "ZA-2026-0201").state is State.DELIVERED
        assert [row.kind for row in india.store.due(2**62, 10)] == []  # nothing more to say
    finally:
        restored.close()


def test_restore_refuses_a_backup_whose_config_points_outside_its_directory(
        nodes: Nodes, tmp_path: Path) -> None:
    """Restore makes the database and keys mode 0600 and opens the database: a doctored
    node.toml must not turn that onto files elsewhere."""
    import io
    import tarfile

    from node.backup import restore

    toml = nodes["ZA"].config.path("node.toml").read_text().replace(
        'database = "node.sqlite3"', 'database = "../elsewhere.sqlite3"')
    archive = tmp_path / "doctored.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("node.toml")
        info.size = len(toml.encode())
        tar.addfile(info, io.BytesIO(toml.encode()))
    outside = tmp_path / "elsewhere.sqlite3"
    with pytest.raises(ConfigError, match="outside the node directory"):
        restore(archive, tmp_path / "restored")
    assert not outside.exists()


def test_a_refused_restore_leaves_the_directory_as_it_was(nodes: Nodes, tmp_path: Path) -> None:
    """The refused archive's files (node.key among them) must not stay behind, nor make a
    retry with a good archive fail as a directory that already holds a node."""
    import io
    import tarfile

    from node.backup import backup, restore

    za = nodes["ZA"].config
    good = tmp_path / "good.tar.gz"
    backup(za, good)

    def doctored(name: str, change: Callable[[bytes], bytes]) -> Path:
        out = tmp_path / name
        with tarfile.open(good) as source, tarfile.open(out, "w:gz") as tar:
            for member in source.getmembers():
                data = source.extractfile(member).read()  # type: ignore[union-attr]
                if member.name in ("node.toml", "node.sqlite3"):
                    data = change(data) if member.name in name else data
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        return out

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    outside = doctored("node.toml.tar.gz", lambda d: d.replace(
        b'database = "node.sqlite3"', b'database = "../evil.sqlite3"'))
    broken = doctored("node.sqlite3.tar.gz", lambda d: b"not a database" * 100)
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "new" / "node", empty):
        before = sorted(tmp_path.rglob("*"))
        with pytest.raises(ConfigError, match="outside the node directory"):
            restore(outside, target)
        with pytest.raises(sqlite3.DatabaseError):
            restore(broken, target)
        with pytest.raises(ConfigError, match=r"cannot read backup .*(ended|truncated)"):
            restore(truncated, target)  # was an EOFError traceback
        assert sorted(tmp_path.rglob("*")) == before
        assert restore(good, target).directory == target
        assert (target / "node.key").read_bytes() == za.path("node.key").read_bytes()
        assert (target / "node.key").stat().st_mode & 0o777 == 0o600
        assert not any(p.name.startswith(".kpx-restore") for p in target.iterdir())


@pytest.mark.parametrize("killed_at_rename", [1, 2, 4])
def test_a_restore_killed_part_way_can_simply_run_again(
        nodes: Nodes, tmp_path: Path, killed_at_rename: int) -> None:
    """A restore killed (kill -9, a host going down) while it unpacked or moved the files
    up left its staging folder, and some of the files, in the directory: the rerun refused
    it as not empty, and every other command said there was no node.toml or no database.
    The rerun now takes away what the interrupted one left, and restores."""
    import subprocess
    import sys

    from node.backup import backup, restore

    archive = tmp_path / "za.tar.gz"
    backup(nodes["ZA"].config, archive)
    target = tmp_path / "restored"
    killer = ("import os, pathlib, signal, sys\n"
              "from node.backup import restore\n"
              "real, calls = pathlib.Path.rename, []\n"
              "def rename(self, to):\n"
              "    calls.append(to)\n"
              f"    if len(calls) == {killed_at_rename}:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(self, to)\n"
              "pathlib.Path.rename = rename\n"
              "restore(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))\n")
    killed = subprocess.run([sys.executable, "-c", killer, str(archive), str(target)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert killed.returncode == -9, killed.stderr
    assert any(p.name.startswith(".kpx-restore-") for p in target.iterdir())
    # what every other command says meanwhile: not 'run kpnode init first'
    said = subprocess.run([sys.executable, "-m", "node.cli", "list", "--dir", str(target)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert (said.returncode, said.stderr) == (
        3, f"kpnode: no node.toml in {target}: a 'kpnode restore' into it was stopped "
        "part-way; run that restore again\n")
    config = restore(archive, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["BACKUP-INFO", "node.key", "node.sqlite3", "node.toml", "registry.kpx"])
    Node.open(config).close()
    # a directory holding anything else beside the staging folder is left as it was
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-c", killer, str(archive), str(other)],
                   capture_output=True, check=False, timeout=60)
    (other / "notes.txt").write_text("someone's notes")
    before = sorted(other.rglob("*"))
    with pytest.raises(ConfigError, match="is not an empty directory"):
        restore(archive, other)
    assert sorted(other.rglob("*")) == before


def test_a_backup_that_fails_part_way_leaves_no_archive(nodes: Nodes, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """A full disk mid-backup left a part-written archive: it restored as a truncated one,
    and its name refused the retry ('exists already')."""
    import errno
    import tarfile

    from node.backup import backup

    out = tmp_path / "b.tar.gz"
    real = tarfile.TarFile.addfile

    def full(self: tarfile.TarFile, info: tarfile.TarInfo, fileobj: Any = None) -> None:
        if info.name != "node.sqlite3":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    with pytest.raises(OSError) as failed:
        backup(nodes["ZA"].config, out)
    assert failed.value.filename == str(out) and not out.exists()
    monkeypatch.undo()
    assert "node.sqlite3" in backup(nodes["ZA"].config, out)


def test_a_backup_stopped_by_sigterm_leaves_nothing_behind(nodes: Nodes, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """SIGTERM (a cron or systemd timeout, a host shutting down) mid-backup left a
    truncated archive under the final name, refusing the retry and restoring as a broken
    one, and a full copy of the database in $TMPDIR. Now nothing is left: the archive
    gets its name only once written and synced."""
    import os
    import signal
    import tarfile

    from node.backup import backup

    folder = tmp_path / "backups"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = folder / "b.tar.gz"
    real = tarfile.TarFile.addfile

    def terminated(self: tarfile.TarFile, info: tarfile.TarInfo, fileobj: Any = None) -> None:
        real(self, info, fileobj)
        if info.name == "node.sqlite3":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tarfile.TarFile, "addfile", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        backup(nodes["ZA"].config, out)
    assert signal.getsignal(signal.SIGTERM) == before
    assert list(folder.iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []
    monkeypatch.undo()
    assert "node.sqlite3" in backup(nodes["ZA"].config, out)
    assert [p.name for p in folder.iterdir()] == ["b.tar.gz"]
    with tarfile.open(out) as tar:
        info = tar.getmember("BACKUP-INFO")
        assert info.mode == 0o600 and info.mtime > 1_700_000_000


def test_what_a_killed_backup_left_is_cleared_by_the_next(nodes: Nodes, tmp_path: Path
                                                           ) -> None:
    """A backup killed part-way (kill -9, a host going down) left its temporary folder
    beside the archives: a partial archive with the node's private key in it and a copy
    of the database, for good. The next backup into that folder clears it; a backup
    running meanwhile keeps its own."""
    import fcntl
    import os
    import subprocess
    import sys

    from node.backup import IN_PROGRESS, backup

    folder = tmp_path / "backups"
    folder.mkdir()
    killer = ("import os, signal, sys, tarfile\n"
              "real = tarfile.TarFile.addfile\n"
              "def killed(self, info, fileobj=None):\n"
              "    real(self, info, fileobj)\n"
              "    if info.name == 'node.sqlite3':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "tarfile.TarFile.addfile = killed\n"
              "from node.cli import main\n"
              "main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", killer, "backup", "--out",
                           str(folder / "monday.tar.gz"), "--dir",
                           str(nodes["ZA"].config.directory)], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    (left,) = folder.iterdir()
    assert left.name.startswith(".monday.tar.gz.") and (left / IN_PROGRESS).exists()
    # a backup running now, in another process: its folder is locked
    running = folder / ".tuesday.tar.gz.x1y2z3"
    running.mkdir()
    fd = os.open(running / IN_PROGRESS, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (folder / ".not-a-backup").mkdir()  # something else's, left alone
    try:
        backup(nodes["ZA"].config, folder / "tuesday.tar.gz")
    finally:
        os.close(fd)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".not-a-backup", ".tuesday.tar.gz.x1y2z3", "tuesday.tar.gz"]


def test_a_backup_is_written_where_hard_links_are_not_to_be_had(
        nodes: Nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vfat and exFAT disks and many SMB shares answer link() with EPERM: the archive was
    then never given its name."""
    import errno
    import os

    from node.backup import backup

    def no_links(src: object, dst: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "usb" / "za.tar.gz"
    out.parent.mkdir()
    assert "node.sqlite3" in backup(nodes["ZA"].config, out)
    assert [p.name for p in out.parent.iterdir()] == ["za.tar.gz"]
    with pytest.raises(ConfigError, match="exists already"):
        backup(nodes["ZA"].config, out)


def test_a_node_whose_database_is_in_a_subdirectory_is_backed_up_and_restored(
        nodes: Nodes, tmp_path: Path) -> None:
    """`database = "data/node.sqlite3"` (a volume of its own): the snapshot was made as
    `snapshot-data/node.sqlite3` in the scratch folder, which has no such subdirectory,
    and every backup failed with "the node's database: unable to open database file"."""
    import dataclasses

    from node.backup import backup, restore

    za = nodes["ZA"]
    za.issue(certificate("ZA-2026-0300", "ZA", "IN"))
    za.close()
    config = za.config
    config.path("data").mkdir()
    config.database_path.rename(config.path("data") / "node.sqlite3")
    toml = config.path("node.toml")
    toml.write_text(toml.read_text().replace('database = "node.sqlite3"',
                                             'database = "data/node.sqlite3"'))
    moved = dataclasses.replace(config, database="data/node.sqlite3")
    archive = tmp_path / "za.tar.gz"
    assert "data/node.sqlite3" in backup(moved, archive)
    restored = Node.open(restore(archive, tmp_path / "restored"))
    try:
        assert restored.config.database_path == tmp_path / "restored" / "data" / "node.sqlite3"
        assert restored.store.get(Side.EXPORT, "ZA-2026-0300").state is State.ISSUED
    finally:
        restored.close()


def test_a_damaged_database_is_not_backed_up_into_an_archive_restore_refuses(
        nodes: Nodes, tmp_path: Path) -> None:
    """A damaged index page: the node still lists its records and verify-log passes, and
    the backup API copies pages as they are, so 'kpnode backup' wrote an archive and said
    so, which 'kpnode restore' then refused ("database disk image is malformed") on the
    day it was needed."""
    from node.backup import backup

    za = nodes["ZA"]
    za.issue(certificate("ZA-2026-0400", "ZA", "IN"))
    za.close()
    db = sqlite3.connect(za.config.database_path)
    (page,) = db.execute("SELECT rootpage FROM sqlite_master "
                         "WHERE name = 'certificates_by_partner_state'").fetchone()
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with za.config.database_path.open("r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xff" * size)
    out = tmp_path / "backups" / "za.tar.gz"
    out.parent.mkdir()
    with pytest.raises(ConfigError, match=r"fails SQLite's integrity check.*none was written"):
        backup(za.config, out)
    assert list(out.parent.iterdir()) == []


def test_restore_refuses_a_directory_that_is_not_empty(nodes: Nodes, tmp_path: Path) -> None:
    """`cd /tmp && kpnode restore backup.tar.gz` must not scatter a node's key and database
    among someone else's files: one line, exit 3 (an environment error), nothing written."""
    import subprocess
    import sys

    from node.backup import backup

    archive = tmp_path / "za.tar.gz"
    backup(nodes["ZA"].config, archive)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone's notes")
    done = subprocess.run([sys.executable, "-m", "node.cli", "restore", str(archive)],
                          cwd=busy, capture_output=True, text=True, check=False, timeout=60)
    assert (done.returncode, done.stderr) == (
        3, "kpnode: . exists and is not an empty directory; restore into a new or empty "
        "one\n")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # a fresh ext4 volume mounted as the node directory holds lost+found: that is empty
    volume = tmp_path / "volume"
    (volume / "lost+found").mkdir(parents=True)
    from node.backup import restore
    assert restore(archive, volume).participant == "ZA"


def test_issue_many_commits_all_but_the_refused_in_one_transaction(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    batch = [certificate("ZA-2026-0101", "ZA", "IN"),
             certificate("ZA-2026-0102", "ZA", "XS"),  # importer suspended
             certificate("ZA-2026-0101", "ZA", "EU"),  # number taken a line earlier
             certificate("ZA-2026-0103", "ZA", "EU")]
    commits = count_commits(za)
    outcomes = za.issue_many(batch)
    assert commits() == 1
    assert [getattr(o, "reason", None) for o in outcomes] == [
        None, "participant.suspended", "certificate.duplicate_number", None]
    assert [o.partner for o in outcomes if isinstance(o, Record)] == ["IN", "EU"]
    assert za.store.get(Side.EXPORT, "ZA-2026-0102") is None
    assert za.store.get(Side.EXPORT, "ZA-2026-0101").partner == "IN"
    assert [(r.recipient, r.kind) for r in za.store.due(2**62, 10)] == [
        ("IN", "certificate"), ("EU", "certificate")]
    carry(za, nodes)
    assert india.store.get(Side.IMPORT, "ZA-2026-0101").state is State.RECEIVED


def test_confirm_many_confirms_each_arrival_as_received(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    za.issue_many([certificate(f"ZA-2026-02{i:02}", "ZA", "IN") for i in range(3)])
    carry(za, nodes)
    commits = count_commits(india)
    outcomes = india.confirm_many([Arrival("ZA-2026-0200"),
                                   Arrival("ZA-2026-0299"),  # never arrived
                                   Arrival("ZA-2026-0202", parcels=2, remarks="one parcel short")])
    assert commits() == 1
    assert isinstance(outcomes[1], Refusal) and outcomes[1].reason == "certificate.unknown"
    carry(india, nodes)  # receipts and confirmations
    exported = {n: za.store.get(Side.EXPORT, f"ZA-2026-02{n:02}") for n in range(3)}
    assert [exported[n].state for n in range(3)] == [State.CONFIRMED, State.DELIVERED,
                                                     State.CONFIRMED]
    assert exported[0].discrepancies == ()
    assert {(d.field, d.declared, d.received) for d in exported[2].discrepancies} == {
        ("parcels", 3, 2)}


def test_an_arrival_is_dated_between_the_date_of_issue_and_today(nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    today = day_of(india.clock())
    issued = today - timedelta(days=3)
    za.issue_many([certificate(f"ZA-2026-03{i:02}", "ZA", "IN", issued_on=issued.isoformat())
                   for i in range(2)])
    carry(za, nodes)
    outcomes = india.confirm_many([
        Arrival("ZA-2026-0300", received_on=today + timedelta(days=1)),
        Arrival("ZA-2026-0300", received_on=issued - timedelta(days=1)),
        Arrival("ZA-2026-0300", received_on=issued),
        Arrival("ZA-2026-0301", received_on=today)])
    assert [o.reason if isinstance(o, Refusal) else o.state for o in outcomes] == [
        "field.bad_date", "field.bad_date", State.CONFIRMED, State.CONFIRMED]


def test_a_cancellation_needs_a_reason_that_is_not_blank(nodes: Nodes) -> None:
    za = nodes["ZA"]
    za.issue(certificate("ZA-2026-0310", "ZA", "IN"))
    with pytest.raises(CommandRefused) as refused:
        za.cancel("ZA-2026-0310", " \t ")
    assert refused.value.refusal.reason == "field.required"
    assert za.store.get(Side.EXPORT, "ZA-2026-0310").state is State.ISSUED  # type: ignore[union-attr]


def test_a_store_failure_in_a_batch_commits_none_of_it(nodes: Nodes, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    za = nodes["ZA"]
    real_save = za.store.save
    saved = []

    def failing_save(records: Any) -> None:
        saved.append(records)
        if len(saved) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        real_save(records)

    monkeypatch.setattr(za.store, "save", failing_save)
    with pytest.raises(StoreError, match="disk I/O error"):
        za.issue_many([certificate("ZA-2026-0301", "ZA", "IN"),
                       certificate("ZA-2026-0302", "ZA", "IN")])
    assert za.store.get(Side.EXPORT, "ZA-2026-0301") is None
    assert za.store.due(2**62, 10) == []


def test_on_records_hears_each_committed_change_once_and_nothing_rolled_back(
        nodes: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    heard: dict[str, list[tuple[str, Side, State]]] = {"ZA": [], "IN": []}
    for code in heard:
        nodes[code].on_records = lambda records, code=code: heard[code].extend(  # type: ignore[misc]
            (r.number, r.side, r.state) for r in records)
    za.issue_many([certificate("ZA-2026-0401", "ZA", "IN"),
                   certificate("ZA-2026-0402", "ZA", "XS")])  # refused: suspended
    assert heard["ZA"] == [("ZA-2026-0401", Side.EXPORT, State.ISSUED)]
    carry(za, nodes)
    assert heard["IN"] == [("ZA-2026-0401", Side.IMPORT, State.RECEIVED)]
    carry(za, nodes)  # nothing due: no commit, nothing heard
    carry(india, nodes)
    assert heard["ZA"][-1] == ("ZA-2026-0401", Side.EXPORT, State.DELIVERED)

    # A batch that fails to commit is not heard of, and does not leak into the next one.
    heard["ZA"].clear()
    monkeypatch.setattr(za.store, "enqueue", lambda *a: (_ for _ in ()).throw(
        sqlite3.OperationalError("disk I/O error")))
    with pytest.raises(StoreError, match="disk I/O error"):
        za.issue(certificate("ZA-2026-0403", "ZA", "IN"))
    monkeypatch.undo()
    za.cancel("ZA-2026-0401", "wrong parcel count")
    assert heard["ZA"] == [("ZA-2026-0401", Side.EXPORT, State.CANCELLED)]


def count_commits(node: Node) -> Callable[[], int]:
    """How many transactions the node's store has committed since this call."""
    transactions = []
    real = node.store.transaction

    @contextmanager
    def counting() -> Iterator[None]:
        with real():
            yield
        transactions.append(1)

    node.store.transaction = counting  # type: ignore[method-assign]
    return lambda: len(transactions)


def test_a_full_disk_is_a_store_fault_not_a_poison_message(nodes: Nodes) -> None:
    """An INSERT failing on a full disk came out as sqlite3.OperationalError (hidden behind
    a failed second ROLLBACK), so the runner took each delivery for a poison message and
    burnt its delivery limit: receipts and confirmations went to the dead-letter queue."""
    za, india = nodes["ZA"], nodes["IN"]
    for i in range(40):
        za.issue(certificate(f"ZA-2026-{i:04d}", "ZA", "IN"))
    rows = za.store.due(now_ms=2**62, limit=100)
    db = india.store.db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full from here on
    with pytest.raises(StoreError, match="full"):
        india.handle_batch([Delivery(r.frame) for r in rows])
    assert india.store.records() == []  # nothing half-written
    db.execute("PRAGMA max_page_count=1073741823")  # space again: the same batch goes in
    verdicts = india.handle_batch([Delivery(r.frame) for r in rows])
    assert [v.dead_letter for v in verdicts] == [None] * 40
    assert len(india.store.records()) == 40


def test_a_loop_is_overdue_a_week_before_expiry_and_expires_after_its_last_day(
        nodes: Nodes) -> None:
    za = nodes["ZA"]
    now = now_ms()
    za.clock = lambda: now  # type: ignore[method-assign]
    today = day_of(now)
    for days in (0, 7, 8):  # a certificate is valid on its expires_on day itself
        za.issue(certificate(f"ZA-2026-070{days}", "ZA", "IN",
                             issued_on=(today - timedelta(days=1)).isoformat(),
                             expires_on=(today + timedelta(days=days)).isoformat()))
    assert {r.number: is_overdue(r, today) for r in za.store.records()} == {
        "ZA-2026-0700": True, "ZA-2026-0707": True, "ZA-2026-0708": False}
    assert za.expire_overdue() == []
    za.clock = lambda: now + 86_400_000  # type: ignore[method-assign]
    assert [r.number for r in za.expire_overdue()] == ["ZA-2026-0700"]
    expired = za.store.get(Side.EXPORT, "ZA-2026-0700")
    assert expired is not None and expired.state is State.EXPIRED
    assert is_overdue(expired, today + timedelta(days=1))  # expired unconfirmed: to chase


def test_an_expired_loop_can_still_be_cancelled_and_the_importer_hears_of_it(
        nodes: Nodes) -> None:
    za, india = nodes["ZA"], nodes["IN"]
    today = date.today()
    za.issue(certificate("ZA-2026-0800", "ZA", "IN",
                         issued_on=(today - timedelta(days=1)).isoformat(),
                         expires_on=today.isoformat()))
    carry(za, nodes)
    for node in (za, india):
        node.clock = lambda: now_ms() + 86_400_000  # type: ignore[method-assign]
        assert [r.number for r in node.expire_overdue()] == ["ZA-2026-0800"]
    carry(india, nodes)  # the receipt, late: the loop stays expired, to chase
    assert za.store.get(Side.EXPORT, "ZA-2026-0800").state is State.EXPIRED  # type: ignore[union-attr]
    za.cancel("ZA-2026-0800", "shipment stopped")
    carry(za, nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0800").state is State.CANCELLED  # type: ignore[union-attr]
    assert india.store.get(Side.IMPORT, "ZA-2026-0800").state is State.CANCELLED  # type: ignore[union-attr]


def test_a_certificate_dated_after_tomorrow_is_refused_at_issue(nodes: Nodes) -> None:
    """A certificate issued 'next month' went out, and its importer could not confirm it
    (a shipment cannot arrive before its certificate's date) until then."""
    za = nodes["ZA"]
    today = day_of(za.clock())
    later = certificate("ZA-2026-0061", "ZA", "IN",
                        issued_on=(today + timedelta(days=2)).isoformat(),
                        expires_on=(today + timedelta(days=60)).isoformat())
    with pytest.raises(CommandRefused) as refused:
        za.issue(later)
    assert refused.value.refusal.reason == "field.bad_date"
    assert "in the future" in refused.value.refusal.text
    assert za.store.get(Side.EXPORT, "ZA-2026-0061") is None
    # a day ahead is an authority east of UTC, whose today is already UTC's tomorrow
    za.issue(certificate("ZA-2026-0062", "ZA", "IN",
                         issued_on=(today + timedelta(days=1)).isoformat(),
                         expires_on=(today + timedelta(days=60)).isoformat()))


def test_a_state_change_is_logged_once_and_only_when_it_commits(
        nodes: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 'certificate' events were logged as each decision was written, before the
    commit: a batch refused by a full disk logged every certificate as issued, and a batch
    held back logged them again at each retry."""
    import structlog

    za = nodes["ZA"]
    real = za.store.enqueue
    calls = []

    def disk_full_on_the_third(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise sqlite3.OperationalError("database or disk is full")
        real(*args, **kwargs)

    monkeypatch.setattr(za.store, "enqueue", disk_full_on_the_third)
    batch = [certificate(f"ZA-2026-07{i:02d}", "ZA", "IN") for i in range(5)]
    with structlog.testing.capture_logs() as logs, pytest.raises(StoreError):
        za.issue_many(batch)
    assert za.store.records() == []
    assert [e for e in logs if e["event"] == "certificate"] == []
    with structlog.testing.capture_logs() as logs:
        za.issue_many(batch)
    assert [(e["number"], e["state"]) for e in logs if e["event"] == "certificate"] == [
        (c.number, "issued") for c in batch]


def test_a_registry_taken_from_the_file_is_not_logged_again_from_the_broker(
        tmp_path: Path) -> None:
    """The Chair's publish writes the registry file and sends the update: a node started
    in between took it from the file, then logged the same frame again when the broker's
    copy came (found by a soak: 'recorded more than once in the evidence log')."""
    import contextlib
    from collections import Counter

    from protocol import ParticipantEntry

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    config = network.configs["ZA"]
    with contextlib.closing(Node.open(config)):
        pass
    update = dataclasses.replace(network.registry, version=2, participants=(
        *network.registry.participants,
        ParticipantEntry(code="ZB", name="filler", status=ParticipantStatus.WITHDRAWN,
                         authorities=())))
    frame = network.publish_registry(update)
    node = Node.open(config)
    try:
        assert node.registry.version == 2
        (verdict,) = node.handle_batch([Delivery(frame)])
        assert verdict.dead_letter is None
        logged = Counter((e.direction, e.message_id) for e in node.store.evidence())
        assert max(logged.values()) == 1
    finally:
        node.close()


def test_a_running_node_applies_a_registry_another_command_read_from_the_file(
        tmp_path: Path) -> None:
    """The operator hands the new registry.kpx to the node and runs `kpnode list`, which
    takes it from the file into the database; the running node must still apply the
    broker's copy (remembering the file's update as received made it a duplicate, and the
    running node kept the old registry until restarted)."""
    import contextlib
    from collections import Counter

    from protocol import ParticipantEntry

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    config = network.configs["ZA"]
    running = Node.open(config)
    try:
        update = dataclasses.replace(network.registry, version=2, participants=(
            *network.registry.participants,
            ParticipantEntry(code="ZB", name="filler", status=ParticipantStatus.WITHDRAWN,
                             authorities=())))
        frame = network.publish_registry(update)
        with contextlib.closing(Node.open(config)):  # `kpnode list` meanwhile
            pass
        (verdict,) = running.handle_batch([Delivery(frame)])
        assert verdict.dead_letter is None and running.registry.version == 2
        logged = Counter((e.direction, e.message_id) for e in running.store.evidence())
        assert max(logged.values()) == 1
    finally:
        running.close()


def test_a_refusal_is_logged_once_it_commits_not_at_every_retry(nodes: Nodes,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """While the store cannot commit, the runner retries the held batch; each retry logged
    the same 'refused' again, though nothing was decided (found by a soak on a full
    disk)."""
    import structlog

    za, india = nodes["ZA"], nodes["IN"]
    record = za.issue(certificate("ZA-2026-0001", "ZA", "EU"))  # not India's
    frame = za.store.outbox_frame(record.message_id)
    assert frame is not None
    real = india.store.append_evidence

    def full(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(india.store, "append_evidence", full)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(StoreError):
                india.handle_batch([Delivery(frame)])
    assert [e for e in logs if e["event"] == "refused"] == []
    monkeypatch.setattr(india.store, "append_evidence", real)
    with structlog.testing.capture_logs() as logs:
        (verdict,) = india.handle_batch([Delivery(frame)])
    assert verdict.dead_letter is not None
    assert [e["reason"] for e in logs if e["event"] == "refused"] == ["message.not_for_us"]


def test_a_frame_replayed_into_a_third_inbox_is_answered_once_however_often(
        nodes: Nodes) -> None:
    """EU, which got ZA's certificate, published it into India's inbox again and again.
    India refused each copy (message.not_for_us) and signed a new rejection to ZA for
    every one: anyone holding a frame could make a node sign and send at will, and grow
    both evidence logs. The same bytes are answered once; every copy is still refused
    and dead-lettered. So is an accepted frame replayed under another broker login."""
    za, india = nodes["ZA"], nodes["IN"]
    record = za.issue(certificate("ZA-2026-0001", "ZA", "EU"))  # not India's
    frame = za.store.outbox_frame(record.message_id)
    assert frame is not None
    entries = india.store.last_evidence_seq()
    for _ in range(3):
        (verdict,) = india.handle_batch([Delivery(frame, user_id="kpx-eu")])
        assert verdict.dead_letter is not None and verdict.kept
        assert verdict.dead_letter.reason == "message.not_for_us"
    answers = india.store.due(2**62, 10)
    assert [(r.recipient, r.kind) for r in answers] == [("ZA", "rejection")]
    assert india.store.last_evidence_seq() - entries == 2  # the frame and the answer
    # a second batch holding two copies: none answered
    verdicts = india.handle_batch([Delivery(frame), Delivery(frame)])
    assert all(v.dead_letter is not None for v in verdicts)
    assert len(india.store.due(2**62, 10)) == 1
    # A frame India accepted, replayed under another login with check_broker_user: refused
    # (message.broker_user_mismatch) but not answered: ZA's own certificate was taken.
    mine = za.issue(certificate("ZA-2026-0002", "ZA", "IN"))
    theirs = za.store.outbox_frame(mine.message_id)
    assert theirs is not None
    (taken,) = india.handle_batch([Delivery(theirs, user_id="kpx-za")])
    assert taken.dead_letter is None
    sent = {r.message_id for r in india.store.due(2**62, 10)}
    india.check_broker_user = True
    (replayed,) = india.handle_batch([Delivery(theirs, user_id="kpx-eu")])
    assert replayed.dead_letter is not None
    assert replayed.dead_letter.reason == "message.broker_user_mismatch"
    assert {r.message_id for r in india.store.due(2**62, 10)} == sent


def test_a_nodes_own_frame_published_back_into_its_inbox_is_not_answered(
        nodes: Nodes) -> None:
    """IN published ZA's certificate to IN back into ZA's inbox (any partner can publish
    there, with check_broker_user too). ZA refused it (message.not_for_us) and answered
    its signer, itself: a rejection from ZA to ZA, relayed into its own inbox, refused
    (body.schema: recipient is the sender) and answered again, for ever. A frame the
    node's own key signed is dead-lettered and never answered."""
    za, india = nodes["ZA"], nodes["IN"]
    za.issue(certificate("ZA-2026-0077", "ZA", "IN"))
    (row,) = za.store.due(2**62, 10)
    with za.store.transaction():
        za.store.mark_published([row.seq], 0)
    (verdict,) = za.handle_batch([Delivery(row.frame, user_id="kpx-in")])
    assert verdict.dead_letter is not None
    assert verdict.dead_letter.reason == "message.not_for_us"
    assert za.store.due(2**62, 10) == []
    assert za.store.get(Side.EXPORT, "ZA-2026-0077").state is State.ISSUED
    # and the certificate itself still reaches IN as sent
    assert [v.dead_letter for _, v in carry(za, {"IN": india})] == []
    (verdict,) = india.handle_batch([Delivery(row.frame)])
    assert verdict.dead_letter is None


@pytest.mark.parametrize("kind,payload", [
    ("rejection", {"reason": "body.schema", "text": "x", "certificate": None,
                   "problems": [], "retry_after": 5}),
    ("pong", {"nonce": b"n", "smuggled": 1}),
])
def test_a_rejection_or_pong_refused_for_its_schema_is_not_answered(
        nodes: Nodes, kind: str, payload: dict[str, Any]) -> None:
    """SPEC §14: a refused rejection or pong is never answered, whatever the reason. A
    field the receiver does not know (a newer peer's) failed decoding before admission
    knew the kind, and was answered with a signed rejection all the same."""
    import uuid

    from protocol.codec import pack
    from protocol.frame import seal_body

    za, india = nodes["ZA"], nodes["IN"]
    body = pack({"message_id": uuid.uuid4().hex, "kind": kind, "sender": "IN",
                 "recipient": "ZA", "created_at": now_ms(), "in_reply_to": None,
                 "payload": payload})
    (verdict,) = za.handle_batch([Delivery(seal_body(body, india.signing_keys[0]))])
    assert verdict.dead_letter is not None
    assert verdict.dead_letter.reason == "body.schema"
    assert verdict.dead_letter.answer_to == "IN"  # its signer is named all the same
    assert za.store.due(2**62, 10) == []


@pytest.mark.parametrize("kind", ["pong", "rejection"])
def test_a_rejection_or_pong_refused_on_admission_is_not_answered(
        nodes: Nodes, kind: str) -> None:
    """SPEC §14 again, for a well-formed one refused before its content is read: here,
    delivered to a node it is not addressed to."""
    from protocol import Envelope, Pong, Rejection, seal

    za, india, eu = nodes["ZA"], nodes["IN"], nodes["EU"]
    payload = Pong(nonce=bytes(16)) if kind == "pong" else Rejection(
        reason="body.schema", text="no", certificate=None)
    frame = seal(Envelope(sender="IN", recipient="ZA", created_at=now_ms(), payload=payload),
                 india.signing_key())
    (verdict,) = eu.handle_batch([Delivery(frame)])
    assert verdict.dead_letter is not None
    assert verdict.dead_letter.reason == "message.not_for_us"
    assert eu.store.due(2**62, 10) == []
    assert za.store.due(2**62, 10) == []


def test_a_ping_with_a_nonce_of_the_wrong_size_is_refused_not_signed(nodes: Nodes) -> None:
    """Node.ping signed any nonce: one not of 16 bytes made a frame the partner could not
    decode (body.schema), refused without an answer, so the ping never came back."""
    za = nodes["ZA"]
    with pytest.raises(CommandRefused, match="nonce is 16 bytes, not 8"):
        za.ping("IN", b"\0" * 8)
    assert za.store.due(2**62, 10) == []
    sealed = za.ping("IN", b"\0" * 16)
    assert [r.message_id for r in za.store.due(2**62, 10)] == [sealed.envelope.message_id]


def test_an_authentic_frame_that_cannot_be_decoded_is_answered_without_a_log_search(
        nodes: Nodes) -> None:
    """Refused bytes are answered once (SPEC §14) by finding them in the evidence log under
    their message id. A frame whose body cannot be decoded has none: all such frames share
    '' there, and the search compared each delivery with every one of them, in the batch's
    transaction, slower as the log grew (136 ms a delivery with 2,000 of 200 KB). Such a
    frame is answered each time it comes, as before."""
    from protocol.codec import pack
    from protocol.frame import seal_body

    za, india = nodes["ZA"], nodes["IN"]
    body = pack({"kind": "certificate", "sender": "IN"})  # no message_id: cannot decode
    frame = seal_body(body, india.signing_keys[0])
    for _ in range(2):
        (verdict,) = za.handle_batch([Delivery(frame)])
        assert verdict.dead_letter is not None and verdict.dead_letter.in_reply_to is None
    assert [r.recipient for r in za.store.due(2**62, 10)] == ["IN", "IN"]


def test_what_is_read_on_every_call_comes_from_an_index_not_the_whole_table(
        nodes: Nodes) -> None:
    """Status, the console and the API count per partner, select a quarter and page the
    records on every call; each scanned (and sorted) every certificate of a node's years:
    86 ms for the counts, 25 ms for a first page of 50 at 60,000 records."""
    za = nodes["ZA"]
    za.issue(certificate("ZA-2026-0031", "ZA", "IN"))
    db = za.store.db

    def plan(call: Callable[[], object]) -> list[str]:
        """The query plan of the one statement ``call`` runs (values bound as it ran)."""
        statements: list[str] = []
        db.set_trace_callback(statements.append)
        try:
            call()
        finally:
            db.set_trace_callback(None)
        (sql,) = statements
        return [str(row[3]).split(" (")[0] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
    assert plan(za.store.partner_counts) == [
        "SCAN certificates USING COVERING INDEX certificates_by_partner_state"]
    assert plan(lambda: za.store.records(issued_between=(date(2026, 1, 1), date(2026, 3, 31)))
                )[0] == "SEARCH certificates USING INDEX certificates_by_issue"
    assert plan(lambda: za.store.records(limit=50)) == [
        "SCAN certificates USING INDEX certificates_by_creation"]
    # the console's newest closed loops, `kpnode list --last`: read from the newest back,
    # not every match of the filters found by their index and sorted (36 ms against
    # 0.2 ms for the newest 200 of 60,000)
    tail = plan(lambda: za.store.records(side=Side.EXPORT, states=[State.CONFIRMED],
                                         partner="IN", last=200))
    assert "SCAN certificates USING INDEX certificates_by_creation" in tail, tail
    assert not [step for step in tail if step.startswith("SEARCH")], tail
    # and asked for every certificate that arrives, the replacement of one: not all of
    # the partner's imports through the index on (partner, side, state)
    assert plan(lambda: za.store.successor("IN-2026-0001", "IN"))[0] == (
        "SEARCH certificates USING INDEX certificates_by_replaces")
