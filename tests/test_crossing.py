"""Messages that cross in flight, or are refused: both ends of a loop end in the same state.

Nodes are carried by hand (no broker), so a test can hold one side's messages back and
deliver them after the other side's, as two officers acting at once would have them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from node.chair import embargo, sign_registry
from node.machine import Side, State, day_of
from node.network import create_network
from node.service import CommandRefused, Delivery, Node, now_ms
from node.stats import NOT_TRADE
from node.store import OutboxRow
from protocol import (
    Cancellation,
    Envelope,
    ImportConfirmation,
    Payload,
    Receipt,
    RegistryKey,
    RegistryUpdate,
    Replacement,
    decode_body,
    parse_frame,
    seal,
)
from tests.netutil import carry, certificate

Nodes = dict[str, Node]
HOUR_MS = 3_600_000


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Nodes]:
    network = create_network(tmp_path, ["BW", "BE"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    nodes["BW"].chair_key = network.chair_key  # type: ignore[attr-defined]
    nodes["BW"].network = network  # type: ignore[attr-defined]
    yield nodes
    for node in nodes.values():
        node.close()


def held(sender: Node) -> list[OutboxRow]:
    """Take what ``sender`` has to send without delivering it yet."""
    rows = sender.store.due(now_ms=2**62, limit=10_000)
    with sender.store.transaction():
        sender.store.mark_published([r.seq for r in rows], 0)
    return rows


def deliver(node: Node, rows: list[OutboxRow]) -> None:
    for row in rows:
        node.handle_batch([Delivery(row.frame)])


def states(nodes: Nodes, number: str) -> tuple[State | None, State | None]:
    exported = nodes["BW"].store.get(Side.EXPORT, number)
    imported = nodes["BE"].store.get(Side.IMPORT, number)
    return (exported.state if exported else None, imported.state if imported else None)


def cross(nodes: Nodes) -> None:
    """What each side sent reaches the other only after both have acted; then the rest."""
    from_bw, from_be = held(nodes["BW"]), held(nodes["BE"])
    deliver(nodes["BE"], from_bw)
    deliver(nodes["BW"], from_be)
    settle(nodes)


def settle(nodes: Nodes) -> None:
    for _ in range(3):
        carry(nodes["BW"], nodes)
        carry(nodes["BE"], nodes)


def swept(nodes: Nodes) -> None:
    """Everything delivered, with the sweep resending every unanswered certificate."""
    for _ in range(4):
        nodes["BW"].resend_unanswered(0)
        settle(nodes)


def embargo_cd_at_importer(nodes: Nodes) -> None:
    """The Chair embargoes origin CD; BE hears of it before BW does."""
    network = nodes["BW"].network  # type: ignore[attr-defined]
    newer = dataclasses.replace(embargo(network.registry, "CD", True), version=2)
    nodes["BE"].handle_batch([Delivery(sign_registry(newer, network.chair_key, now_ms()))])


def delivered(nodes: Nodes, number: str) -> None:
    nodes["BW"].issue(certificate(number, "BW", "BE"))
    settle(nodes)
    assert states(nodes, number) == (State.DELIVERED, State.RECEIVED)


def closes(nodes: Nodes, number: str) -> None:
    """The importer confirms an open loop, and both ends end confirmed."""
    nodes["BE"].confirm(number)
    settle(nodes)
    assert states(nodes, number) == (State.CONFIRMED, State.CONFIRMED)


def test_a_replacement_the_importer_refuses_gives_the_old_certificate_its_loop_back(
        pair: Nodes) -> None:
    """BE refused the replacement (BW had not yet heard of an embargo): BW had marked the
    old certificate replaced, BE still held it open. BE could confirm it, BW never saw
    that, and BW could neither cancel nor replace it again: the loop was split for good."""
    bw = pair["BW"]
    delivered(pair, "BW-2026-0001")
    embargo_cd_at_importer(pair)
    bw.replace("BW-2026-0001", certificate("BW-2026-0002", "BW", "BE", origins=["BW", "CD"]),
               "wrong origins")
    settle(pair)
    assert states(pair, "BW-2026-0002") == (State.REJECTED, State.REJECTED)
    old = bw.store.get(Side.EXPORT, "BW-2026-0001")
    assert old is not None and old.state is State.ISSUED and old.replaced_by is None
    assert "BW-2026-0002 was refused" in (old.rejection_text or "")
    # Unanswered again, it is resent under its message id; BE answers with its receipt.
    later = now_ms() + 2 * HOUR_MS
    bw.clock = lambda: later
    assert bw.resend_unanswered(HOUR_MS) == [old.message_id]
    settle(pair)
    assert states(pair, "BW-2026-0001") == (State.DELIVERED, State.RECEIVED)
    closes(pair, "BW-2026-0001")


def test_the_refusal_of_a_certificate_replaced_since_rejects_it_at_both_ends(
        pair: Nodes) -> None:
    """BW replaced a certificate whose refusal (an embargo BW had not heard of) was on its
    way: the refusal was only noted, since the record said "replaced", and when BE then
    refused the replacement too (it no longer held the old one open), BW put the old one
    back to "issued" and resent it for ever, each time answered with the same refusal."""
    embargo_cd_at_importer(pair)
    pair["BW"].issue(certificate("BW-1", "BW", "BE", origins=["BW", "CD"]))
    pair["BW"].replace("BW-1", certificate("BW-2", "BW", "BE"), "origin")
    swept(pair)
    assert states(pair, "BW-1") == (State.REJECTED, State.REJECTED)
    assert states(pair, "BW-2") == (State.REJECTED, State.REJECTED)
    assert pair["BW"].resend_unanswered(0) == []


def test_a_replacement_of_a_replacement_crossing_a_confirmation_ends_resolved(
        pair: Nodes) -> None:
    bw, be = pair["BW"], pair["BE"]
    delivered(pair, "BW-1")
    bw.replace("BW-1", certificate("BW-2", "BW", "BE"), "typo")
    bw.replace("BW-2", certificate("BW-3", "BW", "BE"), "another typo")
    be.confirm("BW-1")
    cross(pair)
    swept(pair)
    assert states(pair, "BW-1") == (State.CONFIRMED, State.CONFIRMED)
    assert states(pair, "BW-2") == (State.REJECTED, State.REJECTED)  # was issued: resent
    assert states(pair, "BW-3") == (State.REJECTED, State.REJECTED)
    assert bw.resend_unanswered(0) == []


def test_a_refused_replacement_replaced_again_gives_the_old_certificate_its_loop_back(
        pair: Nodes) -> None:
    """The importer refused the replacement and held the old certificate open; the
    exporter, which had replaced the replacement before hearing so, kept the old one
    "replaced": open at one end, closed at the other."""
    bw = pair["BW"]
    delivered(pair, "BW-1")
    embargo_cd_at_importer(pair)
    bw.replace("BW-1", certificate("BW-2", "BW", "BE", origins=["BW", "CD"]), "origins")
    bw.replace("BW-2", certificate("BW-3", "BW", "BE"), "origins again")
    swept(pair)
    assert states(pair, "BW-1") == (State.DELIVERED, State.RECEIVED)
    assert states(pair, "BW-2") == (State.REJECTED, State.REJECTED)
    assert states(pair, "BW-3") == (State.REJECTED, State.REJECTED)


def test_a_refused_replacement_cancelled_since_gives_the_old_certificate_its_loop_back(
        pair: Nodes) -> None:
    bw = pair["BW"]
    delivered(pair, "BW-1")
    embargo_cd_at_importer(pair)
    bw.replace("BW-1", certificate("BW-2", "BW", "BE", origins=["BW", "CD"]), "origins")
    bw.cancel("BW-2", "never mind")
    swept(pair)
    assert states(pair, "BW-1") == (State.DELIVERED, State.RECEIVED)
    assert states(pair, "BW-2") == (State.REJECTED, State.REJECTED)


def test_a_cancellation_crossing_the_refusal_of_its_certificate_ends_rejected(
        pair: Nodes) -> None:
    embargo_cd_at_importer(pair)
    pair["BW"].issue(certificate("BW-1", "BW", "BE", origins=["BW", "CD"]))
    pair["BW"].cancel("BW-1", "issued in error")
    swept(pair)
    assert states(pair, "BW-1") == (State.REJECTED, State.REJECTED)


def test_a_cancelled_replacement_crossing_a_confirmation_ends_resolved(pair: Nodes) -> None:
    bw, be = pair["BW"], pair["BE"]
    delivered(pair, "BW-1")
    bw.replace("BW-1", certificate("BW-2", "BW", "BE"), "typo")
    bw.cancel("BW-2", "never mind")
    be.confirm("BW-1")
    cross(pair)
    swept(pair)
    assert states(pair, "BW-1") == (State.CONFIRMED, State.CONFIRMED)
    assert states(pair, "BW-2") == (State.REJECTED, State.REJECTED)


def test_a_confirmation_crossing_a_cancellation_wins_on_both_sides(pair: Nodes) -> None:
    """BW cancelled while BE confirmed: each refused the other's message, and BW's record
    said cancelled, BE's confirmed, for ever."""
    bw, be = pair["BW"], pair["BE"]
    delivered(pair, "BW-2026-0001")
    bw.cancel("BW-2026-0001", "issued in error")
    be.confirm("BW-2026-0001")
    cross(pair)
    assert states(pair, "BW-2026-0001") == (State.CONFIRMED, State.CONFIRMED)
    exported = bw.store.get(Side.EXPORT, "BW-2026-0001")
    imported = be.store.get(Side.IMPORT, "BW-2026-0001")
    assert exported is not None and imported is not None
    assert exported.confirmation == imported.confirmation


def test_a_confirmation_crossing_a_replacement_wins_and_the_replacement_is_refused(
        pair: Nodes) -> None:
    bw, be = pair["BW"], pair["BE"]
    delivered(pair, "BW-2026-0001")
    bw.replace("BW-2026-0001", certificate("BW-2026-0002", "BW", "BE"), "typo")
    be.confirm("BW-2026-0001")
    cross(pair)
    assert states(pair, "BW-2026-0001") == (State.CONFIRMED, State.CONFIRMED)
    assert states(pair, "BW-2026-0002") == (State.REJECTED, State.REJECTED)
    # A hunt found the exporter's record still 'replaced by' the refused replacement
    # (kpnode show said so) while the importer's named none.
    exported = bw.store.get(Side.EXPORT, "BW-2026-0001")
    imported = be.store.get(Side.IMPORT, "BW-2026-0001")
    assert exported is not None and imported is not None
    assert (exported.replaced_by, imported.replaced_by) == (None, None)


def test_only_the_answer_to_a_certificates_own_message_rejects_it(pair: Nodes) -> None:
    """BW's certificate sent again in a new frame (same content, a restored node): BE
    refused the duplicate number, and that rejection turned BW's delivered loop into
    'rejected' while BE held it open and could confirm it."""
    bw, be = pair["BW"], pair["BE"]
    delivered(pair, "BW-2026-0001")
    again = Envelope(sender="BW", recipient="BE", created_at=now_ms(),
                     payload=certificate("BW-2026-0001", "BW", "BE"))
    (verdict,) = be.handle_batch([Delivery(seal(again, bw.signing_key()))])
    assert verdict.dead_letter is not None
    assert verdict.dead_letter.reason == "certificate.duplicate_number"
    settle(pair)
    assert states(pair, "BW-2026-0001") == (State.DELIVERED, State.RECEIVED)
    closes(pair, "BW-2026-0001")


def overtaken(nodes: Nodes) -> list[str]:
    """BW's messages reach BE last first (a relay batch nacked after the next one was
    confirmed, or a dead letter an operator moved back); returns what BE refused."""
    refused = []
    for row in reversed(held(nodes["BW"])):
        (verdict,) = nodes["BE"].handle_batch([Delivery(row.frame)])
        if verdict.dead_letter is not None:
            refused.append(f"{row.kind}: {verdict.dead_letter.reason}")
    settle(nodes)
    return refused


def test_a_cancellation_that_overtakes_its_certificate_cancels_it_at_both_ends(
        pair: Nodes) -> None:
    """BE refused the cancellation of a certificate it did not hold yet, then took the
    certificate as open: cancelled at BW, received at BE, for good."""
    bw, be = pair["BW"], pair["BE"]
    bw.issue(certificate("BW-2026-0001", "BW", "BE"))
    bw.cancel("BW-2026-0001", "shipment called off")
    assert overtaken(pair) == []
    assert states(pair, "BW-2026-0001") == (State.CANCELLED, State.CANCELLED)
    imported = be.store.get(Side.IMPORT, "BW-2026-0001")
    assert imported is not None and imported.rejection_text == "shipment called off"
    exported = bw.store.get(Side.EXPORT, "BW-2026-0001")
    assert exported is not None and exported.rejection_reason is None


def test_a_replacement_that_overtakes_the_certificate_it_replaces_ends_replaced(
        pair: Nodes) -> None:
    """BE took the replacement as a new certificate, then the old one as open: replaced at
    BW, received at BE, for good."""
    bw = pair["BW"]
    bw.issue(certificate("BW-2026-0001", "BW", "BE"))
    bw.replace("BW-2026-0001", certificate("BW-2026-0002", "BW", "BE"), "wrong mass")
    assert overtaken(pair) == []
    assert states(pair, "BW-2026-0001") == (State.REPLACED, State.REPLACED)
    assert states(pair, "BW-2026-0002") == (State.DELIVERED, State.RECEIVED)
    imported = pair["BE"].store.get(Side.IMPORT, "BW-2026-0001")
    assert imported is not None and imported.replaced_by == "BW-2026-0002"


def test_a_refused_replacement_that_overtook_leaves_the_old_certificate_open(
        pair: Nodes) -> None:
    """A replacement BE refused replaces nothing: the old certificate, arriving after it,
    is open at both ends, as when the refusal comes in order."""
    bw = pair["BW"]
    embargo_cd_at_importer(pair)
    bw.issue(certificate("BW-2026-0001", "BW", "BE"))
    bw.replace("BW-2026-0001", certificate("BW-2026-0002", "BW", "BE", origins=["BW", "CD"]),
               "wrong origins")
    assert overtaken(pair) == ["replacement: origin.embargoed"]
    swept(pair)
    assert states(pair, "BW-2026-0002") == (State.REJECTED, State.REJECTED)
    assert states(pair, "BW-2026-0001") == (State.DELIVERED, State.RECEIVED)
    closes(pair, "BW-2026-0001")


def test_a_cancellation_of_another_issuers_certificate_is_still_unknown(
        pair: Nodes) -> None:
    """Only the sender's own numbers are kept for their certificate: naming another
    issuer's is answered as unknown, whether this node holds that certificate or not."""
    bw, be = pair["BW"], pair["BE"]
    for number in ("EU-2026-0001", "BE-2026-0001"):
        probe = Envelope(sender="BW", recipient="BE", created_at=now_ms(),
                         payload=Cancellation(certificate=number, reason="probe"))
        (verdict,) = be.handle_batch([Delivery(seal(probe, bw.signing_key()))])
        assert verdict.dead_letter is not None, number
        assert verdict.dead_letter.reason == "certificate.unknown"


def test_a_cancelled_certificate_is_not_brought_back_as_replaced(pair: Nodes) -> None:
    """An exporter that follows SPEC never replaces what it cancelled (issue refuses it);
    one that sends such a replacement all the same leaves the importer's record as it
    was: cancelled, as the exporter's own."""
    bw, be = pair["BW"], pair["BE"]
    bw.issue(certificate("BW-C1", "BW", "BE"))
    bw.cancel("BW-C1", "stopped at the border")
    settle(pair)
    assert states(pair, "BW-C1") == (State.CANCELLED, State.CANCELLED)
    late = Envelope(sender="BW", recipient="BE", created_at=now_ms(), payload=Replacement(
        replaces="BW-C1", reason="typo", certificate=certificate("BW-C2", "BW", "BE")))
    (verdict,) = be.handle_batch([Delivery(seal(late, bw.signing_key()))])
    assert verdict.dead_letter is not None
    assert verdict.dead_letter.reason == "certificate.wrong_state"
    assert states(pair, "BW-C1") == (State.CANCELLED, State.CANCELLED)


def test_a_replacement_to_another_importer_is_refused(tmp_path: Path) -> None:
    """BW replaced BE's certificate with one addressed to IN: BW held the old one replaced,
    BE held it open until it expired, never told."""
    network = create_network(tmp_path, ["BW", "BE", "IN"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    try:
        bw = nodes["BW"]
        bw.issue(certificate("BW-2026-0001", "BW", "BE"))
        with pytest.raises(CommandRefused) as refused:
            bw.replace("BW-2026-0001", certificate("BW-2026-0002", "BW", "IN"), "wrong buyer")
        assert refused.value.refusal.reason == "field.recipient_mismatch"
        assert "cancel BW-2026-0001" in refused.value.refusal.text
        exported = bw.store.get(Side.EXPORT, "BW-2026-0001")
        assert exported is not None and exported.state is State.ISSUED
        assert bw.store.get(Side.EXPORT, "BW-2026-0002") is None
    finally:
        for node in nodes.values():
            node.close()


def test_a_lapsed_key_cannot_sign_a_certificate_dated_after_its_end(tmp_path: Path) -> None:
    """The 90 days' grace for a rotated-out key rests on the signer's own created_at; a
    holder of the old key could back-date it and issue new certificates for 90 days."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za, india = (Node.open(network.configs[c]) for c in ("ZA", "IN"))
    try:
        start = now_ms()
        ends = start - 5 * 86_400_000  # ZA's old key lapsed five days ago
        old_key = za.signing_key()

        def rotated(entry: object) -> object:
            if entry.code != "ZA":  # type: ignore[attr-defined]
                return entry
            authority = entry.authorities[0]  # type: ignore[attr-defined]
            keys = (dataclasses.replace(authority.keys[0], valid_until=ends),
                    RegistryKey(public_key=bytes(SigningKey.generate().verify_key),
                                valid_from=0))
            return dataclasses.replace(entry, authorities=(  # type: ignore[type-var]
                dataclasses.replace(authority, keys=keys),))
        update = RegistryUpdate(version=2, participants=tuple(
            rotated(p) for p in network.registry.participants))  # type: ignore[misc]
        india.handle_batch([Delivery(sign_registry(update, network.chair_key, start))])
        today, end_day = day_of(start), day_of(ends)

        def sent(number: str, issued_on: object) -> str | None:
            cert = certificate(number, "ZA", "IN", issued_on=str(issued_on),
                               expires_on=(today + timedelta(days=30)).isoformat())
            envelope = Envelope(sender="ZA", recipient="IN", created_at=ends - 1, payload=cert)
            (verdict,) = india.handle_batch([Delivery(seal(envelope, old_key))])
            return verdict.dead_letter.reason if verdict.dead_letter else None
        assert sent("ZA-2026-9999", today) == "key.not_valid_now"
        assert india.store.get(Side.IMPORT, "ZA-2026-9999") is None
        # what the key signed while valid, dated then, still arrives late
        assert sent("ZA-2026-9998", end_day - timedelta(days=1)) is None
        assert india.store.get(Side.IMPORT, "ZA-2026-9998") is not None
    finally:
        za.close()
        india.close()


# -- an importer that answers both a certificate and its replacement --------------------


def from_be(pair: Nodes, payload: Payload, times: int = 1) -> str | None:
    """BE, registered and with its own valid key, signs ``payload`` by hand (not through
    its node's rules) and BW takes it ``times`` times: the reason BW refused it the last
    time, or None."""
    be = pair["BE"]
    frame = seal(Envelope(sender="BE", recipient="BW", created_at=be.clock(),
                          payload=payload), be.signing_key())
    for _ in range(times):
        (verdict,) = pair["BW"].handle_batch([Delivery(frame)])
    return verdict.dead_letter.reason if verdict.dead_letter else None


def confirmation(pair: Nodes, number: str, digest: bytes) -> ImportConfirmation:
    sent = pair["BW"].store.get(Side.EXPORT, number)
    assert sent is not None
    c = sent.certificate
    return ImportConfirmation(certificate=number, certificate_digest=digest, destination="BE",
                              importer=c.importer, lines=c.lines, parcels=c.parcels,
                              received_on=c.issued_on, remarks="")


def traded(node: Node) -> list[str]:
    """The exports the statistics count (stats.NOT_TRADE)."""
    return sorted(r.number for r in node.records(side=Side.EXPORT)
                  if r.state not in NOT_TRADE)


def test_an_importer_that_took_the_replacement_cannot_confirm_the_old_certificate_too(
        pair: Nodes) -> None:
    """BE receipted the replacement (its own record of the old certificate says replaced),
    then signed an import confirmation of the old one. BW took it as a confirmation that
    crossed its replacement: the old certificate confirmed, the replacement delivered, one
    shipment counted twice in BW's exports."""
    bw = pair["BW"]
    delivered(pair, "BW-1")
    old = bw.store.get(Side.EXPORT, "BW-1")
    assert old is not None
    bw.replace("BW-1", certificate("BW-2", "BW", "BE"), "typo")
    settle(pair)
    assert states(pair, "BW-1") == (State.REPLACED, State.REPLACED)
    assert states(pair, "BW-2") == (State.DELIVERED, State.RECEIVED)
    assert from_be(pair, confirmation(pair, "BW-1", old.certificate_digest)
                   ) == "certificate.wrong_state"
    assert states(pair, "BW-1") == (State.REPLACED, State.REPLACED)
    assert traded(bw) == ["BW-2"]
    closes(pair, "BW-2")
    assert traded(bw) == ["BW-2"]


def test_an_importer_that_confirmed_the_old_certificate_cannot_take_the_replacement_too(
        pair: Nodes) -> None:
    """BE confirmed the old certificate while the replacement was on its way, which BW
    takes as a crossing; BE then signed a receipt and a confirmation of the replacement
    instead of refusing it, and BW counted both."""
    bw, be = pair["BW"], pair["BE"]
    delivered(pair, "BW-1")
    bw.replace("BW-1", certificate("BW-2", "BW", "BE"), "typo")
    replacement = held(bw)
    be.confirm("BW-1")
    settle(pair)
    assert states(pair, "BW-1") == (State.CONFIRMED, State.CONFIRMED)
    (row,) = replacement
    digest = parse_frame(row.frame).digest
    assert decode_body(parse_frame(row.frame).body).kind == "replacement"
    # (a repeated receipt is applied again, SPEC §13: so is this rule)
    assert from_be(pair, Receipt(certificate="BW-2", certificate_digest=digest), times=2
                   ) == "certificate.wrong_state"
    assert from_be(pair, confirmation(pair, "BW-2", digest)) == "certificate.wrong_state"
    assert states(pair, "BW-2") == (State.ISSUED, None)
    assert traded(bw) == ["BW-1", "BW-2"]  # open until BE's refusal comes
    deliver(be, replacement)  # BE's node refuses it, as it should
    settle(pair)
    assert states(pair, "BW-2") == (State.REJECTED, State.REJECTED)
    assert traded(bw) == ["BW-1"]


AGREED = {(State.CONFIRMED, State.CONFIRMED), (State.REJECTED, State.REJECTED),
          (State.DELIVERED, State.RECEIVED), (State.REPLACED, State.REPLACED)}


@pytest.mark.parametrize("confirmed_first", [True, False])
def test_a_replacement_of_a_replacement_that_overtakes_it_leaves_both_ends_agreeing(
        pair: Nodes, confirmed_first: bool) -> None:
    """BW replaces BW-1 by BW-2, then BW-2 by BW-3; BW-2 is nacked and retried after BW-3
    (SPEC §13, "Order"). BE's node, following the rules, takes BW-3 (it does not know
    BW-2) and confirms BW-1 (before BW-3 came, or after), then refuses BW-2. A rule that
    looked along the whole chain (an importer that confirmed BW-1 cannot take BW-3)
    refused BE's receipt of BW-3 (resent and refused for ever) or its confirmation of
    BW-1: the exporter judges one link, the one the importer has seen."""
    bw, be = pair["BW"], pair["BE"]
    delivered(pair, "BW-1")
    if confirmed_first:
        be.confirm("BW-1")
        confirmation = held(be)
    bw.replace("BW-1", certificate("BW-2", "BW", "BE"), "typo")
    late = held(bw)
    bw.replace("BW-2", certificate("BW-3", "BW", "BE"), "another typo")
    if confirmed_first:
        deliver(bw, confirmation)  # it crossed the replacements: BW-1 confirmed at BW
    deliver(be, held(bw))
    if not confirmed_first:
        be.confirm("BW-1")  # BW-1 is received at BE: nothing there says it was replaced
    settle(pair)
    deliver(be, late)  # refused: BW-1 is confirmed at BE
    settle(pair)
    swept(pair)
    for number in ("BW-1", "BW-2", "BW-3"):
        assert states(pair, number) in AGREED, number
