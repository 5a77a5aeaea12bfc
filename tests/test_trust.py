"""Trust: the Chair's live registry, key rotation and revocation, and the key at rest.

Pure edits of the registry are checked without a broker; key validity windows with nodes
whose clock the test sets, messages carried by hand; the live registry through
``kpnode registry ... publish --broker`` on the real broker, with running nodes applying it
at once; the encrypted key file through ``kpnode`` as an operator runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiormq.exceptions import ChannelNotFoundEntity
from nacl.signing import SigningKey

from node import keyfile, registrytool, transport
from node.chair import (
    RegistryEditError,
    add_key,
    add_participant,
    embargo,
    end_key,
    revoke_key,
    set_status,
    sign_registry,
)
from node.config import KEYS_DIR, ConfigError, load_config, write_config
from node.deploy import read_registry
from node.keyfile import (
    KeyFileError,
    encrypt_seed,
    read_node_key,
    read_signing_key,
    write_signing_key,
)
from node.machine import Refusal, Side, State
from node.network import create_network
from node.registry import LAPSED_GRACE_MS
from node.registrytool import ChairDirectory
from node.service import CommandRefused, Delivery, Node, RegistryFileError, now_ms
from node.views import history_json
from protocol import (
    Cancellation,
    Envelope,
    ParticipantStatus,
    Receipt,
    RegistryKey,
    RegistryUpdate,
    Rejection,
    Replacement,
    key_id,
    new_message_id,
    parse_frame,
    seal,
)
from protocol.codec import decode_body, pack
from protocol.frame import seal_body
from tests import independent_verifier
from tests.netutil import carry, certificate, certificate_json
from tests.test_network import Net, fresh_codes, net, state, until  # noqa: F401

KPNODE = [sys.executable, "-m", "node.cli"]
DAY = 86_400_000


# -- the Chair's edits ----------------------------------------------------------------


def _pub() -> bytes:
    return bytes(SigningKey.generate().verify_key)


def test_registry_edits_refuse_what_does_not_fit() -> None:
    first = _pub()
    base = add_participant(RegistryUpdate(version=1, participants=()), "BW", "Botswana",
                           "BW-KPA", "Botswana KP Authority", first, 0)
    with pytest.raises(RegistryEditError, match="already"):
        add_participant(base, "BW", "Botswana", "BW-KPA", "x", _pub(), 0)
    with pytest.raises(RegistryEditError, match="belongs to BW/BW-KPA"):
        add_participant(base, "NA", "Namibia", "NA-KPA", "x", first, 0)
    with pytest.raises(RegistryEditError, match="not in the registry"):
        set_status(base, "ZZ", ParticipantStatus.SUSPENDED)
    with pytest.raises(RegistryEditError, match="no authority"):
        add_key(base, "BW", "BW-MINES", _pub(), 0)
    two = add_key(base, "BW", "BW-MINES", _pub(), 0, authority_name="Mines")
    assert [a.id for a in two.participants[0].authorities] == ["BW-KPA", "BW-MINES"]
    # a name for a new authority without its id: not dropped silently onto BW-KPA
    with pytest.raises(RegistryEditError, match="has an authority BW-KPA already"):
        add_key(base, "BW", "BW-KPA", _pub(), 0, authority_name="BW Second")
    with pytest.raises(RegistryEditError, match="after its start"):
        end_key(end_key(base, first, 10, 0), first, 0, 0)
    # A lapsed key brought back made valid what a retired key's copy signed meanwhile;
    # an end still to come moves either way, a lapsed one only earlier.
    ended = end_key(base, first, 10, 0)
    with pytest.raises(RegistryEditError, match=r"lapsed at .* not brought back"):
        end_key(ended, first, 20, 15)
    for at, now, ends in ((5, 15, 5), (20, 5, 20)):
        keys = end_key(ended, first, at, now).participants[0].authorities[0].keys
        assert keys[0].valid_until == ends
    # A second revoke-key (to be sure, a script run twice) moved the revocation to its
    # own --at, now by default: what a compromised key signed in between was valid again.
    revoked = revoke_key(base, first, 5_000)
    with pytest.raises(RegistryEditError, match="revoked already"):
        revoke_key(revoked, first, 9_000)
    assert revoke_key(revoked, first, 5_000) == revoked  # the same again: idempotent
    assert revoke_key(revoked, first, 1_000).participants[0].authorities[0].keys[0] \
        .revoked_at == 1_000  # earlier: the Chair learnt of the compromise late
    with pytest.raises(RegistryEditError, match="after its start"):  # 'valid 12-01 .. 11-01'
        add_key(base, "BW", "BW-KPA", _pub(), 2_000, valid_until=1_000)
    withdrawn = set_status(base, "BW", ParticipantStatus.WITHDRAWN)
    with pytest.raises(RegistryEditError, match="withdrawn") as refused:
        set_status(withdrawn, "BW", ParticipantStatus.ACTIVE)
    # The advice can be followed: there is no 'remove' command, and add-participant
    # refuses a code the registry holds.
    assert "remove" not in str(refused.value)
    assert 'set BW\'s "status" back to "active"' in str(refused.value)
    with pytest.raises(RegistryEditError, match="in the registry already"):
        add_participant(withdrawn, "BW", "Botswana", "BW-KPA", "x", _pub(), 0)
    embargoed = embargo(base, "CF", True)
    assert embargoed.embargoed_origins == ("CF",)
    with pytest.raises(RegistryEditError, match="embargoed already"):
        embargo(embargoed, "CF", True)
    assert embargo(embargoed, "CF", False).embargoed_origins == ()
    # an authority named for another Participant: every certificate it issued would fail
    # SPEC §9.1 at every node
    with pytest.raises(RegistryEditError, match="must start with BW"):
        add_key(base, "BW", "IN-DGFT", _pub(), 0, authority_name="Indian DGFT")
    with pytest.raises(RegistryEditError, match="must start with NA"):
        add_participant(base, "NA", "Namibia", "BW-KPA2", "x", _pub(), 0)
    # the Chair's own key as a Participant's: every node takes its signatures for the
    # Chair's and drops what that Participant sends, unanswered
    chair = SigningKey.generate()
    listing = add_key(base, "BW", "BW-KPA", bytes(chair.verify_key), 0)
    with pytest.raises(RegistryEditError, match="the Chair's key is listed as a key of BW"):
        sign_registry(listing, chair, 0)
    # once that listing is revoked, the Chair can publish again (no key is ever removed);
    # a revocation still to come does not count
    with pytest.raises(RegistryEditError, match="the Chair's key is listed"):
        sign_registry(revoke_key(listing, bytes(chair.verify_key), 10**13), chair, 2)
    sign_registry(revoke_key(listing, bytes(chair.verify_key), 1), chair, 2)
    with pytest.raises(RegistryEditError, match=r"field\.bad_format|two-letter|code"):
        add_participant(base, "bw1", "x", "BW1-KPA", "x", _pub(), 0)


# -- key rotation and revocation, with a clock the test sets ---------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Node, Node, object]]:
    exporter_code, importer_code = fresh_codes(2)
    network = create_network(tmp_path, [exporter_code, importer_code], [])
    exporter = Node.open(network.configs[exporter_code])
    importer = Node.open(network.configs[importer_code])
    yield exporter, importer, network
    exporter.close()
    importer.close()


def _deliver_registry(update: RegistryUpdate, chair: SigningKey, *nodes: Node) -> None:
    frame = sign_registry(update, chair, 1)
    for node in nodes:
        (verdict,) = node.handle_batch([Delivery(frame)])
        assert verdict.dead_letter is None
        assert node.registry.version == update.version


def _signed_by(key: SigningKey, node: Node, number: str, to: str) -> bytes:
    """A certificate from ``node``'s Participant signed with ``key``, as a peer would."""
    envelope = Envelope(sender=node.me, recipient=to, created_at=node.clock(),
                        payload=certificate(number, node.me, to))
    return seal(envelope, key)


def test_key_rotation_overlap_and_revocation(pair: tuple[Node, Node, object]) -> None:
    exporter, importer, network = pair
    chair: SigningKey = network.chair_key  # type: ignore[attr-defined]
    me, you = exporter.me, importer.me
    t0 = now_ms()
    starts, old_ends = t0 + DAY, t0 + 3 * DAY
    old = exporter.signing_keys[0]

    # The node makes a key for the rotation; it is not used before the registry holds it.
    new = SigningKey.generate()
    folder = exporter.config.path(KEYS_DIR)
    folder.mkdir()
    write_signing_key(folder / "next.key", new)
    exporter.close()
    exporter = Node.open(exporter.config)
    assert [bytes(k) for k in exporter.signing_keys] == [bytes(old), bytes(new)]

    update = network.registry  # type: ignore[attr-defined]
    update = add_key(update, me, exporter.config.authority, bytes(new.verify_key), starts)
    update = end_key(update, bytes(old.verify_key), old_ends, now_ms())
    update = dataclasses.replace(update, version=2)
    for node, at in ((exporter, t0), (importer, t0)):
        node.clock = lambda at=at: at  # type: ignore[misc]
    _deliver_registry(update, chair, exporter, importer)
    nodes = {me: exporter, you: importer}

    # Before the start time: the old key signs; a frame under the new key is refused.
    assert bytes(exporter.signing_key()) == bytes(old)
    exporter.issue(certificate(f"{me}-1", me, you))
    assert [v.dead_letter for _, v in carry(exporter, nodes)] == [None]
    (early,) = importer.handle_batch([Delivery(_signed_by(new, exporter, f"{me}-2", you))])
    assert early.dead_letter is not None and early.dead_letter.reason == "key.not_valid_now"
    assert importer.store.get(Side.IMPORT, f"{me}-2") is None

    # In the overlap both keys verify; the node signs with the new one by itself.
    for node in (exporter, importer):
        node.clock = lambda: starts + DAY  # type: ignore[method-assign]
    assert bytes(exporter.signing_key()) == bytes(new)
    exporter.issue(certificate(f"{me}-3", me, you))
    assert [v.dead_letter for _, v in carry(exporter, nodes)] == [None]
    (overlap,) = importer.handle_batch([Delivery(_signed_by(old, exporter, f"{me}-4", you))])
    assert overlap.dead_letter is None
    assert state(importer, Side.IMPORT, f"{me}-3") is State.RECEIVED
    assert state(importer, Side.IMPORT, f"{me}-4") is State.RECEIVED

    # After the old key's end: refused, nothing recorded.
    for node in (exporter, importer):
        node.clock = lambda: old_ends + 1  # type: ignore[method-assign]
    (late,) = importer.handle_batch([Delivery(_signed_by(old, exporter, f"{me}-5", you))])
    assert late.dead_letter is not None and late.dead_letter.reason == "key.not_valid_now"
    assert importer.store.get(Side.IMPORT, f"{me}-5") is None

    # Revocation of the new key takes effect as soon as the registry arrives.
    revoked = dataclasses.replace(revoke_key(update, bytes(new.verify_key), old_ends),
                                  version=3)
    _deliver_registry(revoked, chair, importer)
    before = importer.store.counts()
    (bad,) = importer.handle_batch([Delivery(_signed_by(new, exporter, f"{me}-6", you))])
    assert bad.dead_letter is not None and bad.dead_letter.reason == "key.revoked"
    assert importer.store.counts() == before


def test_a_certificate_is_signed_by_a_key_of_its_own_issuing_authority(
        pair: tuple[Node, Node, object]) -> None:
    """A key of one authority of a Participant does not sign in the name of another."""
    exporter, importer, network = pair
    chair: SigningKey = network.chair_key  # type: ignore[attr-defined]
    me, you = exporter.me, importer.me
    mines = SigningKey.generate()
    update = add_key(network.registry, me, f"{me}-MINES",  # type: ignore[attr-defined]
                     bytes(mines.verify_key), 0, authority_name="Mines")
    _deliver_registry(dataclasses.replace(update, version=2), chair, exporter, importer)
    # nor does a node issue in the name of an authority other than its own
    with pytest.raises(CommandRefused) as refused:
        exporter.issue(certificate(f"{me}-0", me, you, issuing_authority=f"{me}-MINES"))
    assert refused.value.refusal.reason == "authority.unknown"
    (other,) = importer.handle_batch([Delivery(_signed_by(mines, exporter, f"{me}-1", you))])
    assert other.dead_letter is not None and other.dead_letter.reason == "authority.unknown"
    assert state(importer, Side.IMPORT, f"{me}-1") is State.REJECTED
    own = seal(Envelope(sender=me, recipient=you, created_at=now_ms(), payload=certificate(
        f"{me}-2", me, you, issuing_authority=f"{me}-MINES")), mines)
    (verdict,) = importer.handle_batch([Delivery(own)])
    assert verdict.dead_letter is None
    assert state(importer, Side.IMPORT, f"{me}-2") is State.RECEIVED


def test_a_stale_registry_version_changes_nothing(pair: tuple[Node, Node, object]) -> None:
    exporter, importer, network = pair
    chair: SigningKey = network.chair_key  # type: ignore[attr-defined]
    base: RegistryUpdate = network.registry  # type: ignore[attr-defined]
    suspended = dataclasses.replace(set_status(base, importer.me, ParticipantStatus.SUSPENDED),
                                    version=3)
    _deliver_registry(suspended, chair, exporter)
    older = dataclasses.replace(base, version=2)
    (verdict,) = exporter.handle_batch([Delivery(sign_registry(older, chair, 2))])
    assert verdict.dead_letter is not None and verdict.dead_letter.reason == "registry.stale"
    assert exporter.registry.version == 3
    with pytest.raises(CommandRefused, match=r"participant\.suspended"):
        exporter.issue(certificate(f"{exporter.me}-1", exporter.me, importer.me))


def _make_unusable(how: str, node: Node, update: RegistryUpdate, at: int) -> tuple[
        RegistryUpdate, SigningKey]:
    """The registry (and the node's key file) after the node's key became unusable at
    ``at`` in one of the ways a key can; the key the node then holds."""
    key = node.signing_keys[0]
    if how == "revoked":
        return revoke_key(update, bytes(key.verify_key), at), key
    if how == "lapsed":
        return end_key(update, bytes(key.verify_key), at, now_ms()), key
    # The operator swapped node.key for a key the registry does not hold (yet).
    swapped = SigningKey.generate()
    path = node.config.path(node.config.signing_key_file)
    path.unlink()
    write_signing_key(path, swapped)
    if how == "not yet valid":
        update = add_key(update, node.me, node.config.authority, bytes(swapped.verify_key),
                         at + DAY)
    return update, swapped


def _new_key_added(node: Node, update: RegistryUpdate, valid_from: int, chair: SigningKey,
                   *others: Node) -> tuple[Node, SigningKey]:
    """The way out of an unusable key: a new one in ``keys/``, which the Chair adds (as
    version 3, heard by every node); the node, started again, signs with it by itself."""
    new = SigningKey.generate()
    folder = node.config.path(KEYS_DIR)
    folder.mkdir()
    write_signing_key(folder / "next.key", new)
    added = add_key(update, node.me, node.config.authority, bytes(new.verify_key), valid_from)
    _deliver_registry(dataclasses.replace(added, version=3), chair, node, *others)
    node.close()
    return Node.open(node.config), new


@pytest.mark.parametrize(("how", "reason"), [
    ("revoked", "key.revoked"), ("lapsed", "key.not_valid_now"),
    ("not yet valid", "key.not_valid_now"), ("absent", "key.unknown")])
def test_a_node_whose_key_cannot_sign_refuses_to_send_and_writes_nothing(
        pair: tuple[Node, Node, object], how: str, reason: str) -> None:
    """BW's key was revoked (v2, applied at BW), yet 'kpnode issue' printed 'issued': every
    partner dead-lettered the frame and BW's record stayed issued for ever."""
    exporter, importer, network = pair
    chair: SigningKey = network.chair_key  # type: ignore[attr-defined]
    me, you = exporter.me, importer.me
    nodes = {me: exporter, you: importer}
    exporter.issue(certificate(f"{me}-1", me, you))  # to cancel or replace
    importer.issue(certificate(f"{you}-1", you, me))  # to confirm
    carry(exporter, nodes)
    carry(importer, nodes)
    carry(exporter, nodes)

    t0 = now_ms()
    update, held = _make_unusable(how, exporter, network.registry, t0)  # type: ignore[attr-defined]
    update = dataclasses.replace(update, version=2)
    exporter.close()
    exporter = nodes[me] = Node.open(exporter.config)
    try:
        _deliver_registry(update, chair, exporter, importer)
        exporter.clock = lambda: t0 + 1  # type: ignore[method-assign]
        before = (exporter.store.counts(), len(list(exporter.store.evidence())),
                  exporter.store.backlog())
        kid = key_id(bytes(held.verify_key)).hex()
        attempts = {
            "issue": lambda: exporter.issue(certificate(f"{me}-2", me, you)),
            "replace": lambda: exporter.replace(f"{me}-1", certificate(f"{me}-3", me, you),
                                                "issued in error"),
            "cancel": lambda: exporter.cancel(f"{me}-1", "withdrawn"),
            "confirm": lambda: exporter.confirm(f"{you}-1"),
        }
        for name, attempt in attempts.items():
            with pytest.raises(CommandRefused) as refused:
                attempt()
            assert refused.value.refusal.reason == reason, name
            assert kid in refused.value.refusal.text, name
            assert "kpnode key new" in refused.value.refusal.text, name
        (many,) = exporter.issue_many([certificate(f"{me}-4", me, you)])
        assert isinstance(many, Refusal) and many.reason == reason
        check = exporter.check_issue(certificate(f"{me}-5", me, you))  # kpnode validate
        assert check is not None and check.reason == reason
        assert exporter.expire_overdue() == []  # a command that signs nothing still runs
        assert (exporter.store.counts(), len(list(exporter.store.evidence())),
                exporter.store.backlog()) == before

        # The way out: a new key, which the Chair adds; the node signs with it by itself.
        exporter, _ = _new_key_added(exporter, update, t0, chair, importer)
        nodes[me] = exporter
        exporter.issue(certificate(f"{me}-2", me, you))
        assert [v.dead_letter for _, v in carry(exporter, nodes)] == [None]
        assert state(importer, Side.IMPORT, f"{me}-2") is State.RECEIVED
    finally:
        exporter.close()


def test_a_receipt_signed_under_a_revoked_key_is_signed_afresh_once_a_key_can_sign(
        pair: tuple[Node, Node, object]) -> None:
    """The importer's key was revoked; it still answered a certificate with a receipt
    under that key, which the exporter refused. Once the importer had a new key, the
    exporter's resend was answered with the same refused bytes, so the exporter never saw
    the receipt."""
    exporter, importer, network = pair
    chair: SigningKey = network.chair_key  # type: ignore[attr-defined]
    me, you = exporter.me, importer.me
    t0 = now_ms()
    update, _ = _make_unusable("revoked", importer, network.registry, t0)  # type: ignore[attr-defined]
    update = dataclasses.replace(update, version=2)
    _deliver_registry(update, chair, exporter, importer)
    exporter.issue(certificate(f"{me}-1", me, you))
    nodes = {me: exporter, you: importer}
    carry(exporter, nodes)
    assert [v.dead_letter.reason for _, v in carry(importer, nodes)  # type: ignore[union-attr]
            ] == ["key.revoked"]
    # While no key of the importer can sign, a duplicate gets the stored bytes: signed
    # afresh under the revoked key, they would be refused all the same.
    sent = exporter.store.get(Side.EXPORT, f"{me}-1").message_id  # type: ignore[union-attr]
    receipt = importer.store.seen(me, sent).answer_message_id  # type: ignore[union-attr]
    stored = importer.store.outbox_frame(receipt)  # type: ignore[arg-type]
    importer.handle_batch([Delivery(exporter.store.outbox_frame(sent))])  # type: ignore[arg-type]
    assert importer.store.outbox_frame(receipt) == stored  # type: ignore[arg-type]

    importer, new = _new_key_added(importer, update, t0, chair, exporter)
    nodes[you] = importer
    try:
        assert exporter.resend_unanswered(0) == [sent]
        carry(exporter, nodes)
        assert [v.dead_letter for _, v in carry(importer, nodes)] == [None]
        assert state(exporter, Side.EXPORT, f"{me}-1") is State.DELIVERED
        # The same receipt (same id), now under the new key; both frames are evidence.
        frames = [parse_frame(e.frame) for e in importer.store.evidence(f"{me}-1")
                  if e.message_id == receipt]
        assert [f.key_id for f in frames] == [key_id(bytes(k.verify_key)) for k in
                                              (importer.signing_keys[0], new)]
        # Another duplicate gets those new bytes again, unchanged.
        afresh = importer.store.outbox_frame(receipt)  # type: ignore[arg-type]
        importer.handle_batch([Delivery(exporter.store.outbox_frame(sent))])  # type: ignore[arg-type]
        assert importer.store.outbox_frame(receipt) == afresh  # type: ignore[arg-type]
        assert len([e for e in importer.store.evidence(f"{me}-1")
                    if e.message_id == receipt]) == 2
        importer.confirm(f"{me}-1")
        carry(importer, nodes)
        assert state(exporter, Side.EXPORT, f"{me}-1") is State.CONFIRMED
    finally:
        importer.close()


def test_an_answer_signed_afresh_is_sent_even_while_its_old_bytes_are_in_flight(
        pair: tuple[Node, Node, object]) -> None:
    """The relay had the old receipt's bytes in flight when a duplicate got the receipt
    signed afresh in the same outbox row; the old publish's confirm marked the row sent,
    so the new bytes never left and the exporter waited for its next resend."""
    exporter, importer, network = pair
    chair: SigningKey = network.chair_key  # type: ignore[attr-defined]
    me, you = exporter.me, importer.me
    nodes = {me: exporter, you: importer}
    t0 = now_ms()
    update, _ = _make_unusable("revoked", importer, network.registry, t0)  # type: ignore[attr-defined]
    update = dataclasses.replace(update, version=2)
    _deliver_registry(update, chair, exporter, importer)
    exporter.issue(certificate(f"{me}-1", me, you))
    (row,) = exporter.store.due(now_ms=2**62, limit=10)
    importer.handle_batch([Delivery(row.frame)])
    (in_flight,) = importer.store.due(now_ms=2**62, limit=10)  # the relay took it
    importer, _ = _new_key_added(importer, update, t0, chair, exporter)
    nodes[you] = importer
    try:
        importer.handle_batch([Delivery(row.frame)])  # the exporter's resend
        with importer.store.transaction():  # the broker confirms the old bytes
            importer.store.mark_published([in_flight.seq], now_ms())
        assert [v.dead_letter for _, v in carry(importer, nodes)] == [None]
        assert state(exporter, Side.EXPORT, f"{me}-1") is State.DELIVERED
    finally:
        importer.close()


def test_kpnode_issue_with_a_revoked_key_says_so_and_exits_1(
        pair: tuple[Node, Node, object], tmp_path: Path) -> None:
    exporter, importer, network = pair
    chair: SigningKey = network.chair_key  # type: ignore[attr-defined]
    key = bytes(exporter.signing_key().verify_key)
    revoked = revoke_key(network.registry, key, now_ms())  # type: ignore[attr-defined]
    _deliver_registry(dataclasses.replace(revoked, version=2), chair, exporter)
    exporter.close()
    cert = tmp_path / "cert.json"
    cert.write_text(json.dumps(certificate_json(f"{exporter.me}-3", exporter.me, importer.me)))
    result = kpnode("issue", str(cert), "--dir", str(exporter.config.directory), check=False)
    assert result.returncode == 1, result.stdout
    assert "key.revoked" in result.stderr and key_id(key).hex() in result.stderr
    assert "issued" not in result.stdout
    shown = kpnode("key", "show", "--dir", str(exporter.config.directory)).stdout
    assert "no key of this node is valid now (key.revoked)" in shown
    listed = kpnode("key", "show", "--json", "--dir", str(exporter.config.directory)).stdout
    assert [row["signing"] for row in json.loads(listed)] == [False]  # it cannot sign


# -- the live registry over the broker ------------------------------------------------


def kpnode(*args: str, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*KPNODE, *args], capture_output=True, text=True, timeout=120,
                            env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.broker
async def test_chair_publishes_and_nodes_apply_at_once(net: Net, amqp_url: str) -> None:  # noqa: F811
    za, india, eu = net.codes  # type: ignore[attr-defined]
    exporter = await net.start(za)
    importer = await net.start(india)
    chair_dir = str(net.network.base / "chair")

    kpnode("registry", "suspend", india, "--dir", chair_dir)
    kpnode("registry", "embargo", "CF", "--dir", chair_dir)
    out = kpnode("registry", "publish", "--broker", amqp_url, "--dir", chair_dir, "--json")
    assert json.loads(out.stdout)["version"] == 2
    await until(lambda: exporter.registry.version == 2 and importer.registry.version == 2)

    with pytest.raises(CommandRefused, match=r"participant\.suspended"):
        exporter.issue(certificate(f"{za}-1", za, india))
    with pytest.raises(CommandRefused, match=r"origin\.embargoed"):
        exporter.issue(certificate(f"{za}-2", za, eu, origins=["CF"]))
    # persisted: a node started later, or restarted, holds version 2 from its database
    await net.stop(india)
    again = await net.start(india)
    assert again.registry.version == 2

    kpnode("registry", "reactivate", india, "--dir", chair_dir)
    kpnode("registry", "publish", "--broker", amqp_url, "--dir", chair_dir)
    await until(lambda: exporter.registry.version == 3)
    exporter.issue(certificate(f"{za}-3", za, india))
    await until(lambda: state(again, Side.IMPORT, f"{za}-3") is State.RECEIVED)


def test_every_command_finds_its_directory_in_kpx_node_dir(tmp_path: Path) -> None:
    """--dir, else $KPX_NODE_DIR, else the current directory: registry, chair and init
    commands once ended in a TypeError traceback (or a usage error) without --dir."""
    env = {**os.environ, "KPX_NODE_DIR": str(tmp_path / "chair")}
    kpnode("registry", "init", env=env)
    assert "version 1" in kpnode("registry", "show", env=env).stdout
    env["KPX_NODE_DIR"] = str(tmp_path / "za")
    kpnode("init", "--participant", "ZA", env=env)
    assert (tmp_path / "za" / "node.toml").exists()
    # The Chair's tool, run where the node's directory is the default, once published its
    # registry.kpx over the node's own: the node then refused to start.
    registry = b"the node's copy of the registry"
    (tmp_path / "za" / "registry.kpx").write_bytes(registry)
    for command in (["init"], ["show"], ["suspend", "BW"],
                    ["publish"]):
        refused = kpnode("registry", *command, env=env, check=False)
        assert refused.returncode == 1, (command, refused.stdout)
        assert "is a node's directory" in refused.stderr, (command, refused.stderr)
    assert (tmp_path / "za" / "registry.kpx").read_bytes() == registry
    assert not (tmp_path / "za" / "registry.json").exists()
    here = tmp_path / "here"
    here.mkdir()
    del env["KPX_NODE_DIR"]
    done = subprocess.run([*KPNODE, "chair", "init"], capture_output=True, text=True,
                          cwd=here, env=env, timeout=60, check=True)
    assert (here / "chair.key").exists(), done.stdout


def test_a_wrong_chair_key_names_the_setting_and_is_an_environment_error(
        tmp_path: Path) -> None:
    """Every command failed with exit 1 and 'key.unknown: registry is not signed by the
    Chair's key', naming neither the registry it checked nor the setting to suspect."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    directory = network.configs["ZA"].directory
    Node.open(network.configs["ZA"]).close()  # the registry is in the database too
    other = bytes(SigningKey.generate().verify_key).hex()
    for remove_file in (False, True):
        if remove_file:
            (directory / "registry.kpx").unlink()
        done = subprocess.run([*KPNODE, "list", "--dir", str(directory)], capture_output=True,
                              text=True, env={**os.environ, "KPX_CHAIR_PUBLIC_KEY": other})
        assert done.returncode == 3, done.stderr
        assert "does not verify against chair_public_key" in done.stderr


def test_a_registry_file_that_is_no_frame_is_not_blamed_on_the_chair_key(
        tmp_path: Path) -> None:
    """The Chair's draft registry.json copied in as registry.kpx (or a truncated copy) was
    reported as 'does not verify against chair_public_key', sending the operator to check
    a key that was right."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    directory = network.configs["ZA"].directory
    draft = (network.base / "chair" / "registry.json").read_bytes()
    for content, says in ((draft, "it holds JSON, as the Chair's draft registry.json does"),
                          (b"kpx", "put the Chair-signed registry.kpx there")):
        (directory / "registry.kpx").write_bytes(content)
        done = subprocess.run([*KPNODE, "list", "--dir", str(directory)],
                              capture_output=True, text=True)
        assert done.returncode == 3, done.stderr
        assert "is not a signed registry" in done.stderr and says in done.stderr
        assert "chair_public_key" not in done.stderr, done.stderr


def test_a_publish_killed_after_signing_is_finished_by_running_it_again(
        tmp_path: Path) -> None:
    """A publish killed (kill -9, Ctrl-C) after it had put the signed version on record
    but before the draft moved on: the rerun was refused ('version 2 is not above version
    2, signed already'), and --resend sent the version before. The rerun now finishes it
    with the very frame on record: one version, one frame."""
    network = create_network(tmp_path, fresh_codes(2), [])
    chair_dir = network.base / "chair"
    before = (chair_dir / "registry.kpx").read_bytes()
    killer = ("import os, signal, sys\n"
              "from node import registrytool\n"
              "registrytool.ChairDirectory.save = "
              "lambda self, update: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from node.cli import main\n"
              "main(sys.argv[1:])\n")
    killed = subprocess.run([sys.executable, "-c", killer, "registry", "publish", "--dir",
                             str(chair_dir)], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    on_record = (chair_dir / "published" / "registry-v000002.kpx").read_bytes()
    assert json.loads((chair_dir / "registry.json").read_text())["version"] == 2
    out = kpnode("registry", "publish", "--json", "--dir", str(chair_dir))
    assert json.loads(out.stdout)["version"] == 2
    assert (chair_dir / "registry.kpx").read_bytes() == on_record != before
    assert json.loads((chair_dir / "registry.json").read_text())["version"] == 3
    again = tmp_path / "again.kpx"
    kpnode("registry", "publish", "--resend", "--out", str(again), "--dir", str(chair_dir))
    assert again.read_bytes() == on_record
    # a draft changed since is not taken for the stopped publish: refused as before
    kpnode("registry", "suspend", network.registry.participants[0].code, "--dir",
           str(chair_dir))
    (chair_dir / "registry.json").write_text((chair_dir / "registry.json").read_text()
                                             .replace('"version": 3', '"version": 2'))
    refused = kpnode("registry", "publish", "--dir", str(chair_dir), check=False)
    assert refused.returncode == 1 and "is not above version 2" in refused.stderr


def test_a_chair_key_rotation_killed_part_way_leaves_a_key_and_runs_again(
        tmp_path: Path) -> None:
    """rotate-chair-key moved chair.key into former-chair-keys/, then wrote the new one:
    killed in between, the Chair had no key ('signing key chair/chair.key not found'),
    could neither publish nor rotate again. The old key is now kept before the new one
    takes its name in one rename, and the rerun rotates."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    chair_dir = network.base / "chair"
    first = bytes(network.chair_key.verify_key).hex()
    killer = ("import os, signal, sys\n"
              "from node import registrytool\n"
              "registrytool.write_signing_key = "
              "lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from node.cli import main\n"
              "main(sys.argv[1:])\n")
    killed = subprocess.run([sys.executable, "-c", killer, "registry", "rotate-chair-key",
                             "--dir", str(chair_dir)], capture_output=True, text=True,
                            timeout=60)
    assert killed.returncode == -9, killed.stderr
    assert ChairDirectory(chair_dir).key().verify_key == network.chair_key.verify_key
    rotated = json.loads(kpnode("registry", "rotate-chair-key", "--json", "--dir",
                                str(chair_dir)).stdout)
    assert rotated["former_chair_public_keys"] == [first]
    assert (chair_dir / "chair.pub").read_text().strip() == rotated["chair_public_key"]
    assert bytes(ChairDirectory(chair_dir).key().verify_key).hex() \
        == rotated["chair_public_key"]
    kpnode("registry", "publish", "--dir", str(chair_dir))


def test_a_registry_init_stopped_while_writing_chair_pub_is_repaired_by_its_rerun(
        tmp_path: Path) -> None:
    """'registry init' killed while it wrote chair.pub (after chair.key) left it empty;
    the rerun wrote chair.pub only when missing, so the Chair handed out, and 'deploy
    network' read, an empty public key. The rerun now writes it from the key."""
    chair = tmp_path / "chair"
    chair.mkdir()
    key = SigningKey.generate()
    write_signing_key(chair / "chair.key", key)
    (chair / "chair.pub").write_text("")  # what the kill left
    kpnode("registry", "init", "--dir", str(chair))
    assert (chair / "chair.pub").read_text().strip() == bytes(key.verify_key).hex()


def test_publish_without_a_broker_explains_and_keeps_the_file(tmp_path: Path) -> None:
    network = create_network(tmp_path, fresh_codes(2), [])
    chair_dir = str(network.base / "chair")
    result = kpnode("registry", "publish", "--broker", "amqp://guest:guest@127.0.0.1:1/",
                    "--dir", chair_dir, check=False)
    assert result.returncode == 3  # the broker is the environment, as for kpnode run
    assert "could not be sent" in result.stderr and "guest@" not in result.stderr
    assert "--resend" in result.stderr
    signed = (network.base / "chair" / "published" / "registry-v000002.kpx").read_bytes()
    assert (network.base / "chair" / "registry.kpx").read_bytes() == signed
    # Sent again, the very bytes go: a version is never signed twice.
    out = tmp_path / "again.kpx"
    said = kpnode("registry", "publish", "--resend", "--out", str(out), "--dir", chair_dir)
    assert said.stdout.strip() == f"registry version 2 sent again to {out}"
    assert out.read_bytes() == signed
    refused = kpnode("registry", "publish", "--resend", "--dir", chair_dir, check=False)
    assert refused.returncode == 1 and "--broker or --out" in refused.stderr
    # The draft moved on: the next publish signs version 3.
    kpnode("registry", "publish", "--dir", chair_dir)
    v3 = network.base / "chair" / "published" / "registry-v000003.kpx"
    assert v3.exists()
    # --out a directory is refused before anything is signed (it used up version 4).
    refused = kpnode("registry", "publish", "--out", str(tmp_path), "--dir", chair_dir,
                     check=False)
    assert refused.returncode == 1 and "is not a file" in refused.stderr
    assert not (network.base / "chair" / "published" / "registry-v000004.kpx").exists()
    # A draft set back to a version signed already: refused, not signed a second time.
    # (Changed since: one that says just what that version says is taken for a publish
    # stopped before it moved the draft on, and finished with the frame on record.)
    kpnode("registry", "embargo", "CF", "--dir", chair_dir)
    draft = network.base / "chair" / "registry.json"
    draft.write_text(draft.read_text().replace('"version": 4', '"version": 3'))
    refused = kpnode("registry", "publish", "--dir", chair_dir, check=False)
    assert refused.returncode == 1 and "version 3 is not above version 3" in refused.stderr
    assert (network.base / "chair" / "registry.kpx").read_bytes() == v3.read_bytes()
    # Set back further, to a version with no file in published/ (version 1, which
    # 'deploy network' signs into registry.kpx alone): it was signed. Nodes ignore a lower
    # version, so what it said never took effect, and a second version 1 split the network.
    for older in (2, 1):
        draft.write_text(re.sub(r'"version": \d+', f'"version": {older}', draft.read_text()))
        refused = kpnode("registry", "publish", "--dir", chair_dir, check=False)
        assert refused.returncode == 1, refused.stdout
        assert (f"version {older} is not above version 3, signed already ("
                f"{network.base / 'chair' / 'published' / 'registry-v000003.kpx'}); set the "
                "draft's version to 4 or above") in refused.stderr
    assert (network.base / "chair" / "registry.kpx").read_bytes() == v3.read_bytes()
    fresh = create_network(tmp_path / "fresh", fresh_codes(2), [])
    fresh_draft = fresh.base / "chair" / "registry.json"
    kpnode("registry", "embargo", "CF", "--dir", str(fresh.base / "chair"))
    fresh_draft.write_text(fresh_draft.read_text().replace('"version": 2', '"version": 1'))
    refused = kpnode("registry", "publish", "--dir", str(fresh.base / "chair"), check=False)
    assert refused.returncode == 1 and "version 1 is not above version 1" in refused.stderr


# -- the private key at rest ------------------------------------------------------------


def test_encrypted_key_needs_the_passphrase(tmp_path: Path) -> None:
    network = create_network(tmp_path, fresh_codes(2), [])
    code, config = next(iter(network.configs.items()))
    public = bytes(config.signing_key().verify_key)
    env = {**os.environ, "KPX_KEY_PASSPHRASE": "correct horse battery"}
    kpnode("key", "encrypt", "--dir", str(config.directory), env=env)
    text = config.path(config.signing_key_file).read_text()
    assert json.loads(text)["format"] == "kpx-encrypted-key-v1"
    seed = read_signing_key(config.path(config.signing_key_file),
                            passphrase="correct horse battery")
    assert bytes(seed).hex() not in text  # the seed is no longer in the clear
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("KPX_KEY")}
    where = str(config.directory)
    (tmp_path / "c.json").write_text(json.dumps(
        certificate_json(f"{code}-2026-0001", code, next(c for c in network.configs
                                                         if c != code))))
    issue = ["issue", str(tmp_path / "c.json"), "--dir", where]
    locked = kpnode(*issue, check=False, env=plain_env)
    assert locked.returncode == 3 and "is encrypted" in locked.stderr
    wrong = kpnode(*issue, check=False,
                   env={**plain_env, "KPX_KEY_PASSPHRASE": "wrong horse battery"})
    assert wrong.returncode == 3 and "wrong passphrase" in wrong.stderr
    assert json.loads(kpnode("list", "--json", "--dir", where, env=plain_env).stdout) == []
    # Commands that only read need no passphrase: monitoring and auditors need not be
    # given the one that signs (they had to be, and paid the key derivation each time).
    for command in (["status", "--json"], ["key", "show", "--json"], ["verify-log"],
                    ["list"]):
        done = kpnode(*command, "--dir", where, env=plain_env, check=False)
        assert done.returncode in (0, 2), (command, done.stderr)  # status 2: no broker
        assert "encrypted" not in done.stderr and "passphrase" not in done.stderr, command
    shown = kpnode("key", "show", "--json", "--dir", where, env=plain_env)
    (row,) = json.loads(shown.stdout)
    assert row["public_key"] == public.hex() and row["signing"] is True
    kpnode(*issue, env=env)
    assert [r["number"] for r in json.loads(
        kpnode("list", "--json", "--dir", where, env=plain_env).stdout)] == [f"{code}-2026-0001"]


def test_a_passphrase_file_others_may_read_is_refused_as_a_password_file_is(
        tmp_path: Path) -> None:
    """KPX_KEY_PASSPHRASE_FILE was read whatever its mode, while a broker password file or
    a key file that others may read is refused: a passphrase anyone on the host can read
    leaves the encrypted key as open as a plain one. The same rule now holds for all
    three (a Kubernetes secret, root's and 0440, still reads; test_definitions)."""
    from node.keyfile import KeyFileError, passphrase_from_environment

    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery \n")  # a space at its end is its own
    secret.chmod(0o600)
    environ = {"KPX_KEY_PASSPHRASE_FILE": str(secret)}
    assert passphrase_from_environment(environ) == "correct horse battery "
    secret.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"KPX_KEY_PASSPHRASE_FILE .* is readable by others"):
        passphrase_from_environment(environ)
    network = create_network(tmp_path / "net", fresh_codes(2), [])
    config = next(iter(network.configs.values()))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KPX_KEY")},
           "KPX_KEY_PASSPHRASE_FILE": str(secret)}
    done = kpnode("key", "encrypt", "--dir", str(config.directory), env=env, check=False)
    assert done.returncode == 3 and "readable by others" in done.stderr, done.stderr
    assert not config.path(config.signing_key_file).read_text().lstrip().startswith("{")


def test_an_encrypted_key_whose_public_half_was_changed_does_not_sign(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The public key is kept in the clear for commands that only read; one that is not
    the encrypted key's own is refused when the key would sign, as is a key file swapped
    for another after the node read it."""
    path = tmp_path / "node.key"
    seed = b"\1" * 32
    data = json.loads(encrypt_seed(seed, "correct horse battery"))
    assert data["public_key"] == bytes(SigningKey(seed).verify_key).hex()
    data["public_key"] = bytes(SigningKey(b"\2" * 32).verify_key).hex()
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    monkeypatch.setenv("KPX_KEY_PASSPHRASE", "correct horse battery")
    key = read_node_key(path)  # the public half only
    assert not key.unlocked
    with pytest.raises(KeyFileError, match="public_key is not that of the key it holds"):
        key.unlock()
    # read as a good file, then replaced by another key's before it first signs
    path.unlink()
    write_signing_key(path, SigningKey(seed), passphrase="correct horse battery",
                      strength="interactive")
    key = read_node_key(path)
    path.unlink()
    write_signing_key(path, SigningKey(b"\3" * 32), passphrase="correct horse battery",
                      strength="interactive")
    with pytest.raises(KeyFileError, match="changed while the node had it open"):
        key.sign(b"anything")


def test_keys_encrypted_before_the_public_key_was_kept_are_written_anew(
        tmp_path: Path) -> None:
    """A key file encrypted by an earlier kpx lacks the clear public key, so read-only
    commands still needed the passphrase and nothing could add it: `key encrypt` does."""
    network = create_network(tmp_path, fresh_codes(2), [])
    _, config = next(iter(network.configs.items()))
    where = str(config.directory)
    env = {**os.environ, "KPX_KEY_PASSPHRASE": "correct horse battery"}
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("KPX_KEY")}
    kpnode("key", "encrypt", "--dir", where, env=env)
    path = config.path(config.signing_key_file)
    data = json.loads(path.read_text())
    del data["public_key"]  # as an earlier kpx wrote it
    path.write_text(json.dumps(data))
    locked = kpnode("list", "--dir", where, env=plain_env, check=False)
    assert locked.returncode == 3 and "is encrypted" in locked.stderr
    wrong = kpnode("key", "encrypt", "--dir", where, check=False,
                   env={**plain_env, "KPX_KEY_PASSPHRASE": "wrong horse battery"})
    assert wrong.returncode == 3 and "wrong passphrase" in wrong.stderr
    done = kpnode("key", "encrypt", "--json", "--dir", where, env=env)
    assert json.loads(done.stdout) == {"encrypted": [], "rewritten": [str(path)]}
    assert kpnode("list", "--dir", where, env=plain_env).returncode == 0
    again = kpnode("key", "encrypt", "--dir", where, env=env, check=False)
    assert again.returncode == 1 and "encrypted already" in again.stderr


def test_one_passphrase_opens_every_key_of_a_node(tmp_path: Path) -> None:
    """'key new' on an encrypted node wrote its key in plaintext, and a second 'key
    encrypt' under another passphrase was accepted: no passphrase then opened both key
    files, and the node could not start."""
    network = create_network(tmp_path, fresh_codes(2), [])
    config = next(iter(network.configs.values()))
    folder, where = config.path(KEYS_DIR), str(config.directory)
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("KPX_KEY")}
    first = {**plain_env, "KPX_KEY_PASSPHRASE": "the first passphrase"}
    other = {**plain_env, "KPX_KEY_PASSPHRASE": "another passphrase"}
    kpnode("key", "encrypt", "--dir", where, env=first)

    # Without the node's passphrase, or with another one: refused, nothing written; exit 3
    # either way, as 'issue' and 'run' (the first was 1).
    for env, says in ((plain_env, "KPX_KEY_PASSPHRASE"), (other, "wrong passphrase")):
        refused = kpnode("key", "new", "--dir", where, env=env, check=False)
        assert refused.returncode == 3 and says in refused.stderr, refused
        assert not folder.exists() or not list(folder.glob("*.key"))
    made = json.loads(kpnode("key", "new", "--json", "--dir", where, env=first).stdout)
    path = Path(made["key_file"])
    assert json.loads(path.read_text())["format"] == "kpx-encrypted-key-v1"
    opened = read_signing_key(path, passphrase="the first passphrase")
    assert bytes(opened.verify_key).hex() == made["public_key"]

    # A plain key beside encrypted ones is encrypted under their passphrase only.
    stray = folder / "stray.key"
    write_signing_key(stray, SigningKey.generate())
    refused = kpnode("key", "encrypt", "--dir", where, env=other, check=False)
    assert refused.returncode != 0 and "wrong passphrase" in refused.stderr
    assert not stray.read_text().startswith("{")
    kpnode("key", "encrypt", "--dir", where, env=first)
    shown = json.loads(kpnode("key", "show", "--json", "--dir", where, env=first).stdout)
    assert len(shown) == 3  # the node opens with the one passphrase


def test_key_file_readable_by_others_or_damaged_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_signing_key(path, SigningKey.generate())
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        read_signing_key(path)
    path.chmod(0o600)
    read_signing_key(path)
    damaged = tmp_path / "damaged.key"
    fd = os.open(damaged, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"format": "kpx-encrypted-key-v1", "kdf": "argon2id", "memlimit": '
                 b'99999999999999, "opslimit": 3, "salt": "00", "box": "00"}')
    os.close(fd)
    with pytest.raises(KeyFileError, match="malformed"):
        read_signing_key(damaged, passphrase="a passphrase long enough")
    good = json.loads(encrypt_seed(b"\1" * 32, "a passphrase long enough"))
    for change, says in (({"opslimit": 1e400}, "malformed"),  # was an OverflowError
                         ({"box": good["box"][:-2]}, "the encrypted seed has the wrong length")):
        damaged.write_text(json.dumps({**good, **change}))
        with pytest.raises(KeyFileError, match=says):  # not "wrong passphrase"
            read_signing_key(damaged, passphrase="a passphrase long enough")
    damaged.write_bytes(b"\xff\xfe not text")
    with pytest.raises(KeyFileError, match="neither hex nor an encrypted key"):
        read_signing_key(damaged)
    with pytest.raises(KeyFileError, match="too short"):
        encrypt_seed(b"\0" * 32, "short")
    assert key_id(bytes(SigningKey.generate().verify_key))


def test_key_encrypt_refused_by_one_key_file_encrypts_none(tmp_path: Path) -> None:
    """A rotated key in keys/ left readable by others: 'key encrypt' refused it, exit 3,
    after it had encrypted node.key already."""
    network = create_network(tmp_path, ["ZA"], [])
    config = network.configs["ZA"]
    folder = config.path(KEYS_DIR)
    folder.mkdir()
    write_signing_key(folder / "next.key", SigningKey.generate())
    (folder / "next.key").chmod(0o644)
    before = config.path(config.signing_key_file).read_bytes()
    done = subprocess.run([*KPNODE, "key", "encrypt", "--dir", str(config.directory)],
                          capture_output=True, text=True,
                          env={**os.environ, "KPX_KEY_PASSPHRASE": "correct horse battery"})
    assert done.returncode == 3 and "readable by others" in done.stderr
    assert config.path(config.signing_key_file).read_bytes() == before


def test_the_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """Like the key: it holds every certificate, party and value, and the evidence log."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    config = network.configs["ZA"]
    node = Node.open(config)
    try:
        node.issue(certificate("ZA-2026-0001", "ZA", "IN"))
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{config.database_path}{suffix}")
            assert path.stat().st_mode & 0o777 == 0o600, path
    finally:
        node.close()


def test_node_refuses_to_start_on_an_exposed_key(tmp_path: Path) -> None:
    network = create_network(tmp_path, fresh_codes(2), [])
    config = next(iter(network.configs.values()))
    config.path(config.signing_key_file).chmod(0o640)
    result = kpnode("run", "--dir", str(config.directory), check=False)
    assert result.returncode == 3 and "readable by others" in result.stderr
    assert load_config(config.directory).participant == config.participant


def test_every_key_of_a_sixty_participant_registry_resolves_to_its_own_authority() -> None:
    """Keys are found by id across the whole registry, each to the authority that lists it
    (the first listing, should two list the same key), and unknown or revoked ones fail."""
    from node.registry import Registry
    from protocol import Authority, ParticipantEntry, Reason, RegistryKey, SignatureError

    keys = [bytes(SigningKey(bytes([i]) * 32).verify_key) for i in range(61)]
    entries = tuple(
        ParticipantEntry(code=chr(65 + i // 26) + chr(65 + i % 26), name=str(i),
                         status=ParticipantStatus.ACTIVE,
                         authorities=(Authority(id=f"A{i}", name=str(i), keys=(
                             RegistryKey(public_key=keys[i], valid_from=0,
                                         revoked_at=5_000 if i == 59 else None),
                             # participant 58 lists participant 3's key again
                             *((RegistryKey(public_key=keys[3], valid_from=0),)
                               if i == 58 else ()))),))
        for i in range(60))
    registry = Registry(RegistryUpdate(version=1, participants=entries), b"", "r-1")
    for i, entry in enumerate(entries):
        owner = registry.key_owner(key_id(keys[i]))
        assert owner is not None and owner.participant == entry.code
        assert owner.authority.id == f"A{i}"
        assert registry.participant(entry.code) is entry
    assert registry.public_key_for(key_id(keys[59]), 4_999) == keys[59]
    with pytest.raises(SignatureError) as revoked:
        registry.public_key_for(key_id(keys[59]), 5_000)
    assert revoked.value.reason is Reason.KEY_REVOKED
    with pytest.raises(SignatureError) as unknown:
        registry.public_key_for(key_id(keys[60]), 0)
    assert unknown.value.reason is Reason.KEY_UNKNOWN
    assert registry.participant("ZZ") is None


def test_a_keys_window_holds_its_start_and_not_its_end_or_revocation() -> None:
    """valid_from is the first instant a key signs, valid_until and revoked_at the first it
    does not; a lapsed (not revoked) key's grace runs for LAPSED_GRACE_MS from its end."""
    from node.registry import Registry
    from protocol import Authority, ParticipantEntry, Reason, RegistryKey, SignatureError

    ending, revoked = (bytes(SigningKey(bytes([i]) * 32).verify_key) for i in (1, 2))
    keys = (RegistryKey(public_key=ending, valid_from=1_000, valid_until=5_000),
            RegistryKey(public_key=revoked, valid_from=0, valid_until=2_000, revoked_at=3_000))
    registry = Registry(RegistryUpdate(version=1, participants=(ParticipantEntry(
        code="ZA", name="ZA", status=ParticipantStatus.ACTIVE,
        authorities=(Authority(id="ZA-A", name="A", keys=keys),)),)), b"", "r-1")

    def refusal(key: bytes, at: int) -> str | None:
        try:
            assert registry.public_key_for(key_id(key), at) == key
        except SignatureError as exc:
            return str(exc.reason)
        return None

    assert [refusal(ending, at) for at in (999, 1_000, 4_999, 5_000)] == [
        Reason.KEY_NOT_VALID_NOW, None, None, Reason.KEY_NOT_VALID_NOW]
    assert [refusal(revoked, at) for at in (1_999, 2_000, 3_000)] == [
        None, Reason.KEY_NOT_VALID_NOW, Reason.KEY_REVOKED]
    lapsed = [registry.lapsed_key(key_id(ending), at) is not None
              for at in (4_999, 5_000, 5_000 + LAPSED_GRACE_MS - 1, 5_000 + LAPSED_GRACE_MS)]
    assert lapsed == [False, True, True, False]
    # Revocation ends the grace too, from its own instant.
    assert [registry.lapsed_key(key_id(revoked), at) is not None
            for at in (2_999, 3_000)] == [True, False]


def test_a_node_may_sign_only_with_a_key_the_registry_lists_for_its_own_authority() -> None:
    """A key file copied from another Participant, or a key listed for another authority
    of the node's own: partners refuse what it signs (key.wrong_sender, or a certificate
    'signed by' another authority), so the node must not take it as able to sign."""
    from node.registry import Registry, own_key_fault
    from protocol import Authority, ParticipantEntry, Reason, RegistryKey

    mine, other_authority, other_participant = (
        bytes(SigningKey(bytes([i]) * 32).verify_key) for i in (1, 2, 3))

    def entry(code: str, *authorities: tuple[str, bytes]) -> ParticipantEntry:
        return ParticipantEntry(code=code, name=code, status=ParticipantStatus.ACTIVE,
                                authorities=tuple(Authority(id=a, name=a, keys=(
                                    RegistryKey(public_key=k, valid_from=0),))
                                    for a, k in authorities))
    registry = Registry(RegistryUpdate(version=1, participants=(
        entry("ZA", ("ZA-A", mine), ("ZA-B", other_authority)),
        entry("IN", ("IN-A", other_participant)))), b"", "r-1")
    assert own_key_fault(registry, "ZA", "ZA-A", mine, 1) is None
    for key in (other_authority, other_participant):
        fault = own_key_fault(registry, "ZA", "ZA-A", key, 1)
        assert fault is not None and fault.reason is Reason.KEY_WRONG_SENDER


def test_a_key_end_written_as_a_compact_date_is_refused_not_read_as_ms() -> None:
    """'--at 20261231' was taken as 20,261 seconds after 1970: a key ended then, published,
    would be expired at once. Now it is refused; dates and 13-digit ms still work."""
    from node.registrytool import ChairError, parse_instant

    with pytest.raises(ChairError, match=r"write a date as 2026-12-31, or ms since 1970"):
        parse_instant("20261231")
    assert parse_instant("2026-12-31") == 1_798_675_200_000
    assert parse_instant("1798675200000") == 1_798_675_200_000
    assert parse_instant("2026-12-31T01:00:00+01:00") == 1_798_675_200_000


def test_registry_end_key_echoes_the_instant_it_read(tmp_path: Path) -> None:
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    key = bytes(network.configs["ZA"].signing_key().verify_key).hex()
    chair = str(network.base / "chair")
    ended = kpnode("registry", "end-key", "--key", key, "--at", "2026-12-31", "--dir", chair,
                   check=False)
    assert ended.returncode == 0, ended.stderr
    assert "key ends at 2026-12-31 00:00:00Z" in ended.stdout
    refused = kpnode("registry", "end-key", "--key", key, "--at", "20261231", "--dir", chair,
                     check=False)
    assert refused.returncode == 1
    assert "write a date as 2026-12-31" in refused.stderr


def test_registry_end_and_revoke_key_take_the_key_id_registry_show_prints(
        tmp_path: Path) -> None:
    """'registry show' and 'kpnode key show' name keys by their id only, and the Chair who
    gave one to end-key was told "a public key is 32 bytes (64 hex characters)"."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    za = bytes(network.configs["ZA"].signing_key().verify_key)
    chair = str(network.base / "chair")
    shown = kpnode("registry", "show", "--dir", chair).stdout
    za_id = key_id(za).hex()
    assert f"key {za_id}" in shown and za.hex() not in shown
    ended = kpnode("registry", "end-key", "--key", za_id, "--at", "2026-12-31", "--dir", chair,
                   check=False)
    assert ended.returncode == 0, ended.stderr
    india = key_id(bytes(network.configs["IN"].signing_key().verify_key)).hex().upper()
    assert kpnode("registry", "revoke-key", "--key", india, "--dir", chair,
                  check=False).returncode == 0
    keys = {k.public_key: k for p in ChairDirectory(Path(chair)).load().participants
            for a in p.authorities for k in a.keys}
    assert keys[za].valid_until == 1_798_675_200_000
    assert keys[bytes(network.configs["IN"].signing_key().verify_key)].revoked_at is not None
    unknown = kpnode("registry", "end-key", "--key", "ab" * 16, "--at", "2026-12-31",
                     "--dir", chair, check=False)
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1, f"kpnode: no key with id {'ab' * 16} in the registry draft")
    # the 16 digits 'kpnode ping' prints, or a prefix: neither a key nor an id, said so
    short = kpnode("registry", "end-key", "--key", za_id[:16], "--at", "2026-12-31",
                   "--dir", chair, check=False)
    assert short.returncode == 1
    assert "neither a public key (64 hex characters) nor a key id (32" in short.stderr


def test_a_registry_command_without_the_chairs_directory_is_exit_3(tmp_path: Path) -> None:
    """No registry.json where --dir points (a mistyped path, a volume not mounted) exited
    1, as a refused input; a node's missing node.toml or registry, and the Chair's own
    missing key, exit 3 (README: missing configuration)."""
    for command in (["show"], ["publish"], ["suspend", "ZA"]):
        done = kpnode("registry", *command, "--dir", str(tmp_path / "chair"), check=False)
        assert done.returncode == 3, done.stderr
        assert "run 'kpnode registry init' first" in done.stderr, done.stderr


def test_registry_publish_refuses_a_bad_broker_or_out_before_signing(tmp_path: Path) -> None:
    """A version once signed stays on record: bad options are refused before it is."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    chair = network.base / "chair"
    for args, says in (
            (["--broker", "http://kpx-chair:s3cret@broker/"],
             "kpnode: --broker: 'http://kpx-chair:***@broker/' is not an amqp:// or amqps:// "
             "URL with a host"),
            (["--out", str(tmp_path / "missing" / "registry.kpx")],
             f"kpnode: --out: no directory {tmp_path / 'missing'}")):
        done = kpnode("registry", "publish", *args, "--dir", str(chair), check=False)
        assert (done.returncode, done.stderr.strip()) == (1, says)
    assert not (chair / "published").exists()


def test_deploy_publish_registry_checks_the_file_and_url_before_connecting(
        tmp_path: Path) -> None:
    """Without --chair-key, any file went to every inbox (each node dead-lettered it), and a
    malformed URL was found only by the connection attempt."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    signed = network.base / "chair" / "registry.kpx"
    garbage = tmp_path / "notes.txt"
    garbage.write_text("registry: version 2, please\n")
    for path, broker, says in (
            (garbage, "amqp://guest:guest@127.0.0.1:1/",
             f"kpnode: {garbage} is not a signed registry: frame.malformed: not a kpx frame "
             "(bad magic)"),
            (signed, "http://guest:s3cret@127.0.0.1:1/",
             "kpnode: --broker: 'http://guest:***@127.0.0.1:1/' is not an amqp://")):
        done = kpnode("deploy", "publish-registry", str(path), "--broker", broker,
                      check=False)
        assert done.returncode == 3, done.stderr
        assert done.stderr.startswith(says), done.stderr


# -- what one Participant's signed messages may do to another's certificates ------------


@pytest.fixture
def three(tmp_path: Path) -> Iterator[dict[str, Node]]:
    network = create_network(tmp_path, ["BW", "BE", "ZA"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    yield nodes
    for node in nodes.values():
        node.close()


def _from_za(nodes: dict[str, Node], payload: object, **envelope: Any
             ) -> list[tuple[str, str]]:
    """ZA, a registered Participant with its own valid key, sends ``payload`` to BE; the
    (reason, text) of each signed rejection BE queues for ZA."""
    za, be = nodes["ZA"], nodes["BE"]
    frame = seal(Envelope(sender="ZA", recipient="BE", created_at=za.clock(),
                          payload=payload, **envelope), za.signing_key())  # type: ignore[arg-type]
    be.handle_batch([Delivery(frame)])
    answers = []
    for row in be.store.due(now_ms=2**62, limit=100):
        envelope = decode_body(parse_frame(row.frame).body)
        if envelope.recipient == "ZA" and isinstance(envelope.payload, Rejection):
            answers.append((str(envelope.payload.reason), envelope.payload.text))
    with be.store.transaction():
        be.store.mark_published([r.seq for r in be.store.due(2**62, 100)], now_ms())
    return answers


def test_a_participant_cannot_replace_another_participants_certificate(
        three: dict[str, Node]) -> None:
    bw, be = three["BW"], three["BE"]
    bw.issue(certificate("BW-2026-0001", "BW", "BE"))
    carry(bw, three)
    carry(be, three)
    answers = _from_za(three, Replacement(replaces="BW-2026-0001", reason="issued in error",
                                          certificate=certificate("ZA-2026-0777", "ZA", "BE")))
    held = be.store.get(Side.IMPORT, "BW-2026-0001")
    assert held is not None and held.state is State.RECEIVED and held.replaced_by is None
    # Refused as a whole: taken, ZA-2026-0777 was recorded as replacing BW's certificate,
    # a link between two Participants' certificates that the console showed.
    ((reason, text),) = answers
    assert reason == "body.schema", text  # problems: (payload.replaces, number_prefix)
    assert be.store.get(Side.IMPORT, "ZA-2026-0777") is None
    be.confirm("BW-2026-0001")  # BE can still close BW's loop
    carry(be, three)
    assert bw.store.get(Side.EXPORT, "BW-2026-0001").state is State.CONFIRMED  # type: ignore[union-attr]


def test_a_message_id_reused_for_another_kind_is_said_not_dropped_silently(
        three: dict[str, Node]) -> None:
    """SPEC §13: a repeated message id is a duplicate, whatever it carries. A (buggy)
    exporter that reused its certificate's id for its cancellation had it acknowledged as
    a duplicate without a trace: the two ends then disagreed, and neither log said why.
    The receiver still takes it for the duplicate it claims to be, and says so."""
    import structlog.testing

    za, be = three["ZA"], three["BE"]
    za.issue(certificate("ZA-2026-0001", "ZA", "BE"))
    carry(za, three)
    record = za.store.get(Side.EXPORT, "ZA-2026-0001")
    assert record is not None
    with structlog.testing.capture_logs() as logs:
        _from_za(three, Cancellation(certificate="ZA-2026-0001", reason="in error"),
                 message_id=record.message_id)
    said = [e for e in logs if e["log_level"] == "warning"]
    assert len(said) == 1 and "another kind of message" in said[0]["event"], logs
    assert (said[0]["kind"], said[0]["first_kind"]) == ("cancellation", "certificate")
    held = be.store.get(Side.IMPORT, "ZA-2026-0001")
    assert held is not None and held.state is State.RECEIVED  # not processed, as before
    again = new_message_id()
    with structlog.testing.capture_logs() as logs:  # a duplicate of the same kind: quiet
        for _ in range(2):
            _from_za(three, Cancellation(certificate="ZA-2026-0002", reason="x"),
                     message_id=again)
    assert not [e for e in logs if e["log_level"] == "warning"], logs
    assert [e["event"] for e in logs].count("duplicate") == 1
    # Not processed means not applied either: a receipt under an id used for another kind
    # left BE's certificate delivered though ZA, which has not got it, never received it.
    be.issue(certificate("BE-2026-0001", "BE", "ZA"))
    sent = be.store.get(Side.EXPORT, "BE-2026-0001")
    assert sent is not None
    _from_za(three, Receipt(certificate="BE-2026-0001",
                            certificate_digest=sent.certificate_digest), message_id=again)
    assert be.store.get(Side.EXPORT, "BE-2026-0001").state is State.ISSUED  # type: ignore[union-attr]


def test_a_participant_cannot_cancel_a_certificate_on_its_way_under_anothers_message_id(
        three: dict[str, Node]) -> None:
    """BE keeps a cancellation that overtook its certificate. ZA, reusing the message id of
    a cancellation BW had sent (seen on the broker), named BW's certificate still on its
    way: BE refused it, but on the certificate's arrival took ZA's frame for BW's and
    recorded the certificate cancelled, with ZA's reason, while BW held it delivered."""
    bw, be = three["BW"], three["BE"]
    bw.issue(certificate("BW-2026-0007", "BW", "BE"))
    bw.cancel("BW-2026-0007", "called off")
    carry(bw, three)
    (bws,) = [e.message_id for e in be.store.evidence("BW-2026-0007")
              if decode_body(parse_frame(e.frame).body).kind == "cancellation"]
    bw.issue(certificate("BW-2026-0001", "BW", "BE"))
    on_its_way = bw.store.due(now_ms=2**62, limit=10)
    assert [r for r, _ in _from_za(three, Cancellation(certificate="BW-2026-0001",
                                                       reason="forged"), message_id=bws)
            ] == ["certificate.unknown"]
    for row in on_its_way:
        be.handle_batch([Delivery(row.frame)])
    carry(be, three)
    assert state(be, Side.IMPORT, "BW-2026-0001") is State.RECEIVED
    assert state(bw, Side.EXPORT, "BW-2026-0001") is State.DELIVERED


def test_answers_do_not_tell_a_participant_who_else_a_certificate_is_with(
        three: dict[str, Node]) -> None:
    bw, be = three["BW"], three["BE"]
    bw.issue(certificate("BW-2026-0001", "BW", "BE"))
    carry(bw, three)
    be.issue(certificate("BE-2026-0555", "BE", "BW"))
    carry(be, three)
    carry(bw, three)
    held = _from_za(three, Cancellation(certificate="BW-2026-0001", reason="x"))
    absent = _from_za(three, Cancellation(certificate="BW-2026-0002", reason="x"))
    assert [r for r, _ in held] == [r for r, _ in absent] == ["certificate.unknown"]
    assert "BW" not in held[0][1].replace("BW-2026-0001", "")
    sent = _from_za(three, Receipt(certificate="BE-2026-0555", certificate_digest=bytes(32)))
    unsent = _from_za(three, Receipt(certificate="BE-2026-0556", certificate_digest=bytes(32)))
    assert [r for r, _ in sent] == [r for r, _ in unsent] == ["certificate.unknown"]
    assert "BW" not in sent[0][1]
    assert be.store.get(Side.IMPORT, "BW-2026-0001").state is State.RECEIVED  # type: ignore[union-attr]
    assert be.store.get(Side.EXPORT, "BE-2026-0555").state is State.DELIVERED  # type: ignore[union-attr]


def test_a_message_built_to_bloat_its_rejection_still_gets_a_valid_one(
        three: dict[str, Node]) -> None:
    """Problems quote what was sent; 80,000 NULs as an HS code (each 4 characters quoted)
    and a field name of 50,000 characters once made a rejection too large to frame, so the
    node failed on the message instead of answering it."""
    za, be = three["ZA"], three["BE"]
    bloated = certificate_json("ZA-2026-0001", "ZA", "BE")
    bloated["lines"][0]["hs_code"] = "\x00" * 80_000
    bloated["é" * 50_000] = 1
    body = pack({"message_id": "a" * 32, "kind": "certificate", "sender": "ZA",
                 "recipient": "BE", "created_at": za.clock(), "in_reply_to": None,
                 "payload": bloated})
    (verdict,) = be.handle_batch([Delivery(seal_body(body, za.signing_key()))])
    assert verdict.dead_letter is not None and verdict.dead_letter.reason == "body.schema"
    (answered,) = carry(be, three)
    assert answered[0] == "rejection" and answered[1].dead_letter is None  # ZA took it
    received = [decode_body(parse_frame(e.frame).body).payload
                for e in za.store.evidence() if e.direction == "in"]
    (payload,) = [p for p in received if isinstance(p, Rejection)]
    assert payload.reason == "body.schema"
    assert {p.reason for p in payload.problems} >= {"field.unknown_hs_code", "field.unknown"}
    assert all(len(p.path) <= 200 and len(p.message) <= 300 for p in payload.problems)


def test_what_a_key_signed_while_valid_is_accepted_after_it_lapses(tmp_path: Path) -> None:
    """A rotation's old key lapsed while ZA was down: IN's receipt waiting in ZA's queue,
    and every later answer to ZA's resends (the same bytes), were refused for ever, so the
    loop never closed. Now judged by when they were signed, for LAPSED_GRACE_MS."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    za, india = nodes["ZA"], nodes["IN"]
    try:
        t0 = now_ms()
        za.issue(certificate("ZA-2026-0001", "ZA", "IN"))
        carry(za, nodes)
        (receipt,) = india.store.due(2**62, 10)  # signed with IN's first key; ZA is down
        starts, ends = t0 - DAY, t0 + 7 * 86_400_000
        old_key, new_key = india.signing_key(), SigningKey.generate()

        def rotated(p: Any) -> Any:
            if p.code != "IN":
                return p
            authority = p.authorities[0]
            keys = (dataclasses.replace(authority.keys[0], valid_from=starts, valid_until=ends),
                    RegistryKey(public_key=bytes(new_key.verify_key), valid_from=0))
            return dataclasses.replace(p, authorities=(
                dataclasses.replace(authority, keys=keys),))
        update = RegistryUpdate(version=2, participants=tuple(
            rotated(p) for p in network.registry.participants))
        frame = sign_registry(update, network.chair_key, t0)
        for node in nodes.values():
            node.handle_batch([Delivery(frame)])

        za.clock = lambda: ends + 86_400_000  # back a day after the old key lapsed
        (verdict,) = za.handle_batch([Delivery(receipt.frame)])
        assert verdict.dead_letter is None
        assert za.store.get(Side.EXPORT, "ZA-2026-0001").state is State.DELIVERED  # type: ignore[union-attr]

        # Signed after the key lapsed (or claiming so): refused, and answered.
        late = Envelope(sender="IN", recipient="ZA", created_at=ends + 1,
                        payload=Receipt(certificate="ZA-2026-0001",
                                        certificate_digest=bytes(32)))
        (verdict,) = za.handle_batch([Delivery(seal(late, old_key))])
        assert verdict.dead_letter is not None
        assert verdict.dead_letter.reason == "key.not_valid_now"
        # Nor what claims to be signed before its start, or at its end: its window is
        # [valid_from, valid_until), for a lapsed key as for a valid one.
        for created_at, mid in ((starts - 1, "s"), (ends, "u")):
            claimed = dataclasses.replace(late, created_at=created_at, message_id=mid * 32)
            (verdict,) = za.handle_batch([Delivery(seal(claimed, old_key))])
            assert verdict.dead_letter is not None
            assert verdict.dead_letter.reason == "key.not_valid_now", created_at
        # Past the grace period nothing the old key signed is taken.
        za.clock = lambda: ends + LAPSED_GRACE_MS
        early = dataclasses.replace(late, created_at=t0, message_id="e" * 32)
        (verdict,) = za.handle_batch([Delivery(seal(early, old_key))])
        assert verdict.dead_letter is not None
        assert verdict.dead_letter.reason == "key.not_valid_now"
    finally:
        for node in nodes.values():
            node.close()


def test_a_key_that_ends_at_midnight_is_judged_by_its_last_day(tmp_path: Path) -> None:
    """valid_until is the first instant a key may not sign, so a key ended at midnight
    (`kpnode registry end-key --at 2026-12-31`) has its last day on the 30th. A
    confirmation received on the 31st, claiming to be signed before, was still taken. A
    certificate signed on the 30th may be dated the 31st (a day's grace at issue), but not
    the 1st."""
    from datetime import UTC, datetime, timedelta

    from protocol import ImportConfirmation

    network = create_network(tmp_path, ["ZA", "IN"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    za, india = nodes["ZA"], nodes["IN"]
    try:
        za.issue(certificate("ZA-M-1", "ZA", "IN"))
        carry(za, nodes)
        carry(india, nodes)
        record = india.store.get(Side.IMPORT, "ZA-M-1")
        assert record is not None
        first_day = datetime.now(UTC).date() + timedelta(days=2)
        ends = int(datetime(first_day.year, first_day.month, first_day.day,
                            tzinfo=UTC).timestamp() * 1000)
        old = {"ZA": za.signing_key(), "IN": india.signing_key()}
        update = dataclasses.replace(network.registry, version=2)
        for key in old.values():
            update = end_key(update, bytes(key.verify_key), ends, now_ms())
        for node in nodes.values():
            node.handle_batch([Delivery(sign_registry(update, network.chair_key, now_ms()))])
            node.clock = lambda: ends + 86_400_000

        def verdict(node: Node, sender: str, payload: Any) -> str | None:
            frame = seal(Envelope(sender=sender, recipient=node.me, created_at=ends - 1,
                                  payload=payload), old[sender])
            (v,) = node.handle_batch([Delivery(frame)])
            return v.dead_letter.reason if v.dead_letter else None
        for day, expected in ((first_day, None),
                              (first_day + timedelta(days=1), "key.not_valid_now")):
            dated = certificate(f"ZA-M-{day}", "ZA", "IN", issued_on=day.isoformat(),
                                expires_on=(day + timedelta(days=60)).isoformat())
            assert verdict(india, "ZA", dated) == expected, day
        confirmation = ImportConfirmation(
            certificate=record.number, certificate_digest=record.certificate_digest,
            destination="IN", importer=record.certificate.importer,
            lines=record.certificate.lines, parcels=record.certificate.parcels,
            received_on=first_day, remarks="")
        assert verdict(za, "IN", confirmation) == "key.not_valid_now"
        earlier = dataclasses.replace(confirmation, received_on=first_day - timedelta(days=1))
        assert verdict(za, "IN", earlier) is None
        assert za.store.get(Side.EXPORT, "ZA-M-1").state is State.CONFIRMED  # type: ignore[union-attr]
    finally:
        for node in nodes.values():
            node.close()


def test_a_third_participant_cannot_write_into_a_loops_signed_history(
        three: dict[str, Node]) -> None:
    """ZA signed a 'rejection' and a receipt naming BW's certificate to BE. The log keeps
    them as evidence, but the certificate's history (console, API, `kpnode show`) showed
    them beside BW's and BE's own messages, as if part of the loop."""
    bw, be = three["BW"], three["BE"]
    bw.issue(certificate("BW-2026-0001", "BW", "BE"))
    carry(bw, three)
    _from_za(three, Rejection(reason="certificate.invalid", text="seized; do not confirm",
                              certificate="BW-2026-0001"))
    _from_za(three, Receipt(certificate="BW-2026-0001", certificate_digest=bytes(32)))
    assert sum(1 for e in be.store.evidence("BW-2026-0001") if e.direction == "in") == 3
    history = history_json(be.store, "BW-2026-0001", be.find("BW-2026-0001"))
    assert [(x["kind"], x["from"], x["to"]) for x in history] == [
        ("certificate", "BW", "BE"), ("receipt", "BE", "BW")]
    # nor into either end's record: only the loop's partner's rejection is heard
    imported = be.store.get(Side.IMPORT, "BW-2026-0001")
    assert imported is not None and imported.state is State.RECEIVED
    assert imported.rejection_reason is imported.rejection_text is None
    za, exported = three["ZA"], bw.store.get(Side.EXPORT, "BW-2026-0001")
    assert exported is not None
    posing = seal(Envelope(sender="ZA", recipient="BW", created_at=za.clock(),
                           in_reply_to=exported.message_id, payload=Rejection(
                               reason="certificate.invalid", text="seized",
                               certificate="BW-2026-0001")), za.signing_key())
    bw.handle_batch([Delivery(posing)])
    assert bw.store.get(Side.EXPORT, "BW-2026-0001") == exported


def test_registry_init_after_a_lost_draft_starts_from_the_newest_signed(
        tmp_path: Path) -> None:
    """With registry.json lost, 'registry init' said 'Chair directory ready' and wrote an
    empty draft of version 1: publish refused it, and its advice (a version above the
    newest signed) signed a registry without a Participant, every certificate refused at
    every node. init now starts the draft from the newest signed registry."""
    chair = tmp_path / "chair"
    kpnode("registry", "init", "--dir", str(chair))
    kpnode("registry", "add-participant", "BW", "--name", "Botswana", "--key",
           bytes(SigningKey.generate().verify_key).hex(), "--dir", str(chair))
    kpnode("registry", "embargo", "XX", "--dir", str(chair))
    kpnode("registry", "publish", "--dir", str(chair))
    (chair / "registry.json").unlink()
    kpnode("registry", "init", "--dir", str(chair))
    draft = ChairDirectory(chair).load()
    assert draft.version == 2
    assert [p.code for p in draft.participants] == ["BW"]
    assert draft.embargoed_origins == ("XX",)
    kpnode("registry", "publish", "--dir", str(chair))
    assert (chair / "published" / "registry-v000002.kpx").exists()


def test_registry_init_writes_the_chair_public_key_the_runbook_reads(tmp_path: Path) -> None:
    """RUNBOOK passes `$(cat chair/chair.pub)` on; only `deploy network` wrote that file."""
    done = subprocess.run([sys.executable, "-m", "node.cli", "registry", "init", "--json",
                           "--dir", str(tmp_path / "chair")], capture_output=True, text=True,
                          check=True)
    public = json.loads(done.stdout)["chair_public_key"]
    assert (tmp_path / "chair" / "chair.pub").read_text() == public + "\n"


async def test_publishing_before_any_node_ran_says_what_to_do_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_exchange(url: str, frame: bytes, **_: object) -> None:
        raise ChannelNotFoundEntity("NOT_FOUND - no exchange 'kpx.registry' in vhost '/'")
    monkeypatch.setattr(transport, "publish_registry", no_exchange)
    with pytest.raises(registrytool.BrokerUnreachable) as failed:
        await registrytool._send(["amqp://guest:guest@127.0.0.1/"], b"frame", 2, [])
    assert "no node has run against this broker yet" in str(failed.value)
    assert "start the nodes (or import the broker definitions) first" in str(failed.value)


def test_a_terminal_is_asked_for_the_passphrase_once_for_all_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of a node is under one passphrase; after two rotations a node asked for
    it three times at every start."""
    paths = [tmp_path / f"{i}.key" for i in range(3)]
    for path in paths:
        write_signing_key(path, SigningKey.generate(), passphrase="one passphrase for all",
                          strength="interactive")
    asked: list[str] = []
    monkeypatch.delenv("KPX_KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("KPX_KEY_PASSPHRASE_FILE", raising=False)
    monkeypatch.setattr(keyfile, "_typed", [])
    monkeypatch.setattr(keyfile.sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(keyfile.getpass, "getpass", lambda prompt: asked.append(prompt)
                        or "one passphrase for all")
    for path in paths:
        read_signing_key(path)
    assert len(asked) == 1


def test_a_registry_listing_one_key_twice_is_refused_by_both_verifiers(tmp_path: Path) -> None:
    """A key under two Participants: the node took the first listing as its owner, so a
    signature by it spoke for whichever the registry named first."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za_entry, in_entry = network.registry.participants
    borrowed = dataclasses.replace(in_entry, authorities=(dataclasses.replace(
        in_entry.authorities[0], keys=za_entry.authorities[0].keys),))
    update = dataclasses.replace(network.registry, version=2,
                                 participants=(za_entry, borrowed))
    frame = sign_registry(update, network.chair_key, now_ms())
    node = Node.open(network.configs["IN"])
    try:
        (verdict,) = node.handle_batch([Delivery(frame)])
        assert verdict.dead_letter is not None
        assert verdict.dead_letter.reason == "body.schema"
        assert node.registry.version == 1
    finally:
        node.close()
    chair = bytes(network.chair_key.verify_key)
    checked = independent_verifier.verify(frame, {independent_verifier.key_id(chair): chair})
    assert (checked.stage, checked.reason, checked.problems) == (
        "schema", "body.schema", [("payload.participants", "field.bad_format")])


def test_a_damaged_registry_json_is_one_clear_error(tmp_path: Path) -> None:
    """The Chair's draft and a registry JSON to sign are edited by hand: a number with more
    digits than Python converts, or nesting 100,000 deep, once ended in a traceback."""
    chair = tmp_path / "chair"
    kpnode("registry", "init", "--dir", str(chair))
    draft = chair / "registry.json"
    kpnode("chair", "init", "--dir", str(tmp_path / "signer"))
    for name, content, says in (
            ("digits", b'{"version": ' + b"7" * 5000 + b"}", "a number with too many digits"),
            ("deep", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
            ("latin1", "{\"é\": 1}".encode("latin-1"), "not UTF-8 text"),
            ("broken", b"{\"version\": ", "not valid JSON")):
        draft.write_bytes(content)
        shown = kpnode("registry", "show", "--dir", str(chair), check=False)
        assert shown.returncode == 1, (name, shown.stderr)
        assert shown.stderr.startswith(f"kpnode: {draft}: {says}"), (name, shown.stderr)
        assert "Traceback" not in shown.stderr
        signed = kpnode("chair", "sign-registry", str(draft), "--key",
                        str(tmp_path / "signer" / "chair.key"), "--out",
                        str(tmp_path / "out.kpx"), check=False)
        assert signed.returncode == 3, (name, signed.stderr)
        assert signed.stderr.startswith(f"kpnode: {draft}: {says}"), (name, signed.stderr)
        assert "Traceback" not in signed.stderr
    assert not (tmp_path / "out.kpx").exists()


def test_a_damaged_encrypted_key_file_is_a_key_error(tmp_path: Path) -> None:
    """Nested 100,000 deep, an encrypted key file once raised RecursionError (a traceback)."""
    path = tmp_path / "node.key"
    for text in ('{"a":' * 100_000 + "1" + "}" * 100_000, '{"opslimit": ' + "9" * 5000 + "}"):
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(KeyFileError, match="is malformed"):
            read_signing_key(path, passphrase="correct horse battery")


def test_key_show_says_which_keys_the_running_node_does_not_hold(tmp_path: Path) -> None:
    """`kpnode run` reads its keys when it starts; `key show` marked a key made since as
    the one that 'signs now' while the running node still signed with the old one. Judged
    by key id, which the node writes into its lock file: a key copied in with its old
    times kept is not held, and keys encrypted under a running node still are."""
    from node.runner import DirectoryLock

    network = create_network(tmp_path, fresh_codes(2), [])
    code, config = next(iter(network.configs.items()))
    where = str(config.directory)
    with DirectoryLock(config.directory) as lock:  # as the running node holds it
        lock.note_keys([key_id(bytes(config.signing_key().verify_key)).hex()])
        new = SigningKey.generate()
        (config.directory / KEYS_DIR).mkdir()
        write_signing_key(config.directory / KEYS_DIR / "next.key", new)
        long_ago = time.time() - 86_400  # cp -p, rsync -a, tar x
        os.utime(config.directory / KEYS_DIR / "next.key", (long_ago, long_ago))
        update = add_key(network.registry, code, config.authority,  # type: ignore[attr-defined]
                         bytes(new.verify_key), now_ms() - 1000)
        (config.directory / config.registry_file).write_bytes(
            sign_registry(update, network.chair_key, now_ms()))
        env = {**os.environ, "KPX_KEY_PASSPHRASE": "correct horse battery"}
        kpnode("key", "encrypt", "--dir", where, env=env)  # rewrites both files
        shown = kpnode("key", "show", "--dir", where)
        assert "yes, once the node restarts" in shown.stdout
        assert (f"the running node (pid {os.getpid()}) does not hold key(s) "
                f"{key_id(bytes(new.verify_key)).hex()}") in shown.stdout
        rows = json.loads(kpnode("key", "show", "--json", "--dir", where).stdout)
        assert [(r["signing"], r["held_by_running_node"]) for r in rows] == [
            (False, True), (True, False)]
        status = json.loads(kpnode("status", "--json", "--dir", where, check=False).stdout)
        texts = [p["text"] for p in status["problems"]]
        assert any(t.startswith("key file(s) the running node does not hold (next.key)")
                   for t in texts), texts
    rows = json.loads(kpnode("key", "show", "--json", "--dir", where).stdout)
    assert [r["held_by_running_node"] for r in rows] == [None, None]


def test_two_nodes_with_lapsed_keys_do_not_answer_each_others_rejections(
        tmp_path: Path) -> None:
    """Both ZA's and IN's keys had lapsed (a rotation neither node had taken up yet). IN
    answered ZA's certificate, signed while ZA's key was valid, with a receipt under its
    own lapsed key; ZA refused it (key.not_valid_now) and answered with a rejection under
    its lapsed key, which IN refused and answered in turn, and so on: the two nodes sent
    each other a new rejection for every one they got, for ever (until the grace ended).
    A rejection, like a pong, is never answered, whatever it is refused for."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    za, india = nodes["ZA"], nodes["IN"]
    try:
        t0 = now_ms()
        za.issue(certificate("ZA-2026-0001", "ZA", "IN"))
        ends = t0 + 7 * DAY
        update = dataclasses.replace(network.registry, version=2)
        for node in nodes.values():
            update = end_key(update, bytes(node.signing_keys[0].verify_key), ends, t0)
        frame = sign_registry(update, network.chair_key, t0)
        for node in nodes.values():
            node.handle_batch([Delivery(frame)])
            node.clock = lambda: ends + DAY  # type: ignore[method-assign]
        kinds = []
        for _ in range(4):
            for sender in (za, india):
                kinds += [(sender.me, kind, v.dead_letter.reason if v.dead_letter else None)
                          for kind, v in carry(sender, nodes)]
        assert kinds == [("ZA", "certificate", None), ("IN", "receipt", "key.not_valid_now"),
                         ("ZA", "rejection", "key.not_valid_now")]
        assert za.store.backlog() == [] and india.store.backlog() == []
    finally:
        for node in nodes.values():
            node.close()


def test_a_rejection_refused_for_its_broker_user_is_not_answered(tmp_path: Path) -> None:
    """Two nodes with check_broker_user on whose messages reach each other under a broker
    user that is not the sender's (a shared login): the importer refuses the certificate
    with a signed rejection; that rejection, refused on arrival, was answered with another,
    refused in turn and answered again, for ever."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    nodes = {c: Node.open(cfg, check_broker_user=True) for c, cfg in network.configs.items()}
    try:
        nodes["ZA"].issue(certificate("ZA-L1", "ZA", "IN"))
        sender, kinds = "ZA", []
        for _ in range(6):
            rows = nodes[sender].store.due(2**62, 100)
            if not rows:
                break
            with nodes[sender].store.transaction():
                nodes[sender].store.mark_published([r.seq for r in rows], 0)
            for row in rows:
                kinds.append(row.kind)
                (verdict,) = nodes[row.recipient].handle_batch(
                    [Delivery(row.frame, user_id="guest")])
                assert verdict.dead_letter is not None
                assert verdict.dead_letter.reason == "message.broker_user_mismatch"
            sender = "IN" if sender == "ZA" else "ZA"
        # the certificate, refused with one rejection; that rejection, refused unanswered
        assert kinds == ["certificate", "rejection"]
    finally:
        for n in nodes.values():
            n.close()


def test_a_missing_broker_user_is_a_mismatch_and_the_chairs_registry_needs_none(
        tmp_path: Path) -> None:
    """The broker vouches only for a user_id that is set: a message without one is not
    taken as the sender's. The Chair's registry updates carry their own authority (the
    Chair's signature), whoever published them."""
    from node.service import broker_user_for

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    nodes = {c: Node.open(cfg, check_broker_user=True) for c, cfg in network.configs.items()}
    try:
        za, india = nodes["ZA"], nodes["IN"]
        za.issue(certificate("ZA-U1", "ZA", "IN"))
        (row,) = za.store.due(2**62, 10)
        (unnamed,) = india.handle_batch([Delivery(row.frame, user_id=None)])
        assert unnamed.dead_letter is not None
        assert unnamed.dead_letter.reason == "message.broker_user_mismatch"
        (named,) = india.handle_batch([Delivery(row.frame, user_id=broker_user_for("ZA"))])
        assert named.dead_letter is None
        for version, user in ((2, None), (3, "guest")):
            update = dataclasses.replace(network.registry, version=version)
            (verdict,) = india.handle_batch([Delivery(sign_registry(
                update, network.chair_key, now_ms()), user_id=user)])
            assert verdict.dead_letter is None
            assert india.registry.version == version
    finally:
        for n in nodes.values():
            n.close()


def test_publish_takes_the_chairs_password_from_a_file_not_the_command_line(
        tmp_path: Path) -> None:
    """The runbook had the Chair type `--broker "amqp://kpx-chair:$(cat
    chair/broker-passwords/kpx-chair.password)@..."`: the password was then in the
    process's arguments, readable by every local user in `ps` while it ran. `registry
    publish` takes the password from a file, as `deploy publish-registry` does."""
    network = create_network(tmp_path, fresh_codes(2), [])
    chair_dir = str(network.base / "chair")
    secret = tmp_path / "kpx-chair.password"
    secret.write_text("s3cret-of-the-chair\n")
    secret.chmod(0o600)
    result = kpnode("registry", "publish", "--dir", chair_dir, "--broker",
                    "amqp://{user}:{password}@127.0.0.1:1/kpx", "--password-file",
                    str(secret), check=False)
    assert result.returncode == 3, result.stderr  # signed, the broker did not answer
    assert "amqp://kpx-chair:***@127.0.0.1:1/kpx" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert (network.base / "chair" / "published" / "registry-v000002.kpx").exists()
    # and the way to send it again keeps the password in its file, off the command line
    assert "--resend --broker URL'" not in result.stderr, result.stderr
    assert "--resend --password-file FILE --broker TEMPLATE" in result.stderr, result.stderr
    # A template without {password}, or a password file missing, is refused before
    # anything is signed.
    for broker, password_file in (("amqp://kpx-chair@127.0.0.1:1/kpx", str(secret)),
                                  ("amqp://{user}:{password}@127.0.0.1:1/kpx",
                                   str(tmp_path / "missing"))):
        refused = kpnode("registry", "publish", "--dir", chair_dir, "--broker", broker,
                         "--password-file", password_file, check=False)
        assert refused.returncode in (1, 3) and "Traceback" not in refused.stderr, refused
        assert not (network.base / "chair" / "published" / "registry-v000003.kpx").exists()
    # A template without --password-file logged in as the user '{user}': refused by the
    # broker only after version 3 was signed, and the draft had moved on to 4.
    refused = kpnode("registry", "publish", "--dir", chair_dir, "--broker",
                     "amqp://{user}:{password}@127.0.0.1:1/kpx", check=False)
    assert refused.returncode == 1, refused.stderr
    assert "is a template" in refused.stderr and "--password-file" in refused.stderr
    assert not (network.base / "chair" / "published" / "registry-v000003.kpx").exists()
    assert json.loads((network.base / "chair" / "registry.json").read_text())["version"] == 3
    # The runbook puts no password file's content on a command line.
    runbook = (Path(__file__).resolve().parents[1] / "deploy" / "RUNBOOK.md").read_text()
    assert not re.search(r"\$\(cat [^)]*\.password\)", runbook)


def test_deploy_publish_registry_says_why_the_broker_refused_in_one_line(
        tmp_path: Path, amqp_url: str) -> None:
    """A vhost with a typo came out as 'InvalidFrameError: Expected one of
    ['Connection.OpenOk'], got <Connection.Close object at 0x7f...>', and an unreachable
    broker printed the AMQP library's own JSON error line before kpnode's: `kpnode registry
    publish` said both in words already."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    signed = str(network.base / "chair" / "registry.kpx")
    wrong_vhost = amqp_url.rstrip("/") + "/kpx-no-such-vhost"
    done = kpnode("deploy", "publish-registry", signed, "--broker", wrong_vhost, check=False)
    assert done.returncode == 3
    assert "refused to open virtual host 'kpx-no-such-vhost'" in done.stderr, done.stderr
    assert "object at 0x" not in done.stderr and ":guest@" not in done.stderr
    done = kpnode("deploy", "publish-registry", signed, "--broker",
                  "amqp://guest:guest@127.0.0.1:1/", check=False)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("kpnode: registry not "
                                                                   "published"), done.stderr


def test_key_show_says_a_key_file_is_another_participants(tmp_path: Path) -> None:
    """Another Participant's key file copied into keys/ (a mix-up of two nodes' files on
    one host): the node never signs with it, but `kpnode key show` listed it as 'valid',
    like a key of its own, without a word on whose it is."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za, india = network.configs["ZA"], network.configs["IN"]
    (za.directory / KEYS_DIR).mkdir()
    other = za.directory / KEYS_DIR / "copied.key"
    other.write_bytes(india.path(india.signing_key_file).read_bytes())
    other.chmod(0o600)
    rows = json.loads(kpnode("key", "show", "--json", "--dir", str(za.directory)).stdout)
    theirs = key_id(bytes(india.signing_key().verify_key)).hex()
    (row,) = [r for r in rows if r["key_id"] == theirs]
    assert row["registry"] == "a key of IN/IN-KPA, not of ZA/ZA-KPA (key.wrong_sender)"
    assert row["signing"] is False


def test_a_rotation_keeps_the_authority_a_node_signs_as(tmp_path: Path) -> None:
    """A node whose authority is not CODE-KPA (`kpnode init --authority NA-MME`): `kpnode
    key new` printed 'kpnode registry add-key NA --key ...' without --authority; the Chair
    running it was told 'NA has no authority NA-KPA; give --authority-name to add it', and
    doing that put the new key under a new authority NA-KPA, which the node (NA-MME) never
    signs with: once the old key ended it could sign nothing."""
    chair = tmp_path / "chair"
    kpnode("registry", "init", "--dir", str(chair))
    node = tmp_path / "NA"
    made = json.loads(kpnode("init", "--participant", "NA", "--authority", "NA-MME", "--dir",
                             str(node), "--chair-key", (chair / "chair.pub").read_text().strip(),
                             "--json").stdout)
    kpnode("registry", "add-participant", "NA", "--name", "Namibia", "--key",
           made["public_key"], "--authority", "NA-MME", "--dir", str(chair))
    kpnode("registry", "publish", "--dir", str(chair))
    (node / "registry.kpx").write_bytes((chair / "registry.kpx").read_bytes())
    new = kpnode("key", "new", "--dir", str(node)).stdout
    public = json.loads(kpnode("key", "show", "--json", "--dir", str(node)).stdout)[1][
        "public_key"]
    assert (f"kpnode registry add-key NA --key {public} --authority NA-MME "
            "--valid-from WHEN") in new, new
    # the command as an earlier kpx printed it: the refusal names the authorities there are
    refused = kpnode("registry", "add-key", "NA", "--key", public, "--dir", str(chair),
                     check=False)
    assert refused.returncode == 1
    assert "NA's authorities: NA-MME" in refused.stderr, refused.stderr
    assert "--authority NA-MME" in refused.stderr, refused.stderr


def test_the_chairs_own_key_is_rotated_and_the_loops_go_on(tmp_path: Path) -> None:
    """The Chair could not rotate its key: with chair_public_key changed, the registry a
    node held no longer verified and every command exited 3, and no procedure existed (a
    compromised Chair key would have stranded every node). Now the Chair rotates it, each
    node lists the key it replaced as former, and takes new registries from the new key
    only: a registry the former key signs is refused, by the broker and as a file."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    chair_dir = network.base / "chair"
    ChairDirectory(chair_dir).save(dataclasses.replace(network.registry, version=2))
    old_key = network.chair_key
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    nodes["ZA"].issue(certificate("ZA-2026-0001", "ZA", "IN"))
    carry(nodes["ZA"], nodes)  # open: received, not yet confirmed

    rotated = json.loads(kpnode("registry", "rotate-chair-key", "--dir", str(chair_dir),
                                "--json").stdout)
    assert rotated["former_chair_public_key"] == bytes(old_key.verify_key).hex()
    new_public = bytes.fromhex(rotated["chair_public_key"])
    assert (chair_dir / "chair.pub").read_text().strip() == new_public.hex()
    assert (chair_dir / "former-chair-keys").stat().st_mode & 0o077 == 0
    # until the next publish, registry.kpx is the former key's: the deploy tool says so
    with pytest.raises(ConfigError, match="publish first"):
        read_registry(chair_dir / "registry.kpx", new_public)
    kpnode("registry", "publish", "--dir", str(chair_dir))  # version 2, the new key
    v2 = (chair_dir / "registry.kpx").read_bytes()
    # a node not reconfigured yet holds it as a dead letter
    (verdict,) = nodes["ZA"].handle_batch([Delivery(v2)])
    assert verdict.dead_letter is not None and nodes["ZA"].registry.version == 1
    for node in nodes.values():
        node.close()

    for config in network.configs.values():
        write_config(dataclasses.replace(config, chair_public_key=new_public))
    with pytest.raises(RegistryFileError, match="former_chair_public_keys"):
        Node.open(load_config(network.configs["ZA"].directory))
    for config in network.configs.values():
        write_config(dataclasses.replace(config, chair_public_key=new_public,
                                         former_chair_public_keys=(bytes(old_key.verify_key),)))
    configs = {code: load_config(c.directory) for code, c in network.configs.items()}
    nodes = {code: Node.open(config) for code, config in configs.items()}
    za = nodes["ZA"]
    assert za.registry.version == 1  # held from before the rotation
    (verdict,) = za.handle_batch([Delivery(v2)])
    assert verdict.dead_letter is None and za.registry.version == 2
    # the former key signs no new registry: not through the broker, not as a file
    forged = sign_registry(dataclasses.replace(network.registry, version=3), old_key, now_ms())
    (verdict,) = za.handle_batch([Delivery(forged)])
    assert verdict.dead_letter is not None and za.registry.version == 2
    nodes["IN"].close()
    configs["IN"].registry_path.write_bytes(forged)
    with pytest.raises(RegistryFileError, match="former Chair key"):
        Node.open(configs["IN"])
    configs["IN"].registry_path.write_bytes(v2)
    nodes["IN"] = Node.open(configs["IN"])
    assert nodes["IN"].registry.version == 2
    # the loop opened before the rotation closes after it, and both logs verify
    nodes["IN"].confirm("ZA-2026-0001")
    carry(nodes["IN"], nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0001").state is State.CONFIRMED  # type: ignore[union-attr]
    for node in nodes.values():
        node.close()
    for code in nodes:
        checked = kpnode("verify-log", "--dir", str(configs[code].directory), "--json")
        assert json.loads(checked.stdout)["ok"], checked.stdout
    # the Chair's tool does not resend what the former key signed
    (chair_dir / "registry.kpx").write_bytes(forged)
    refused = kpnode("registry", "publish", "--resend", "--out", str(tmp_path / "x.kpx"),
                     "--dir", str(chair_dir), check=False)
    assert refused.returncode != 0 and "former Chair key" in refused.stderr, refused.stderr


def test_the_new_chair_key_replaces_a_registry_the_exposed_one_forged(tmp_path: Path) -> None:
    """A Chair key is rotated because it was exposed; what its holder signed before the
    nodes were reconfigured, they applied. A forged registry (listing a key of the forger's
    for IN) stayed a node's for good: the former key still verifies it, and the RUNBOOK's
    'set the draft's version above it' could go nowhere above 2**63-1, nor could the Chair
    know the version to go above; at the version the Chair signs next, the node dropped
    the Chair's copy when it saved it and took the forged one back at its next start. Now
    a registry the current key signed replaces one a former key signed, whatever their
    versions, through the broker and as a file, and after a restart too."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    chair_dir = network.base / "chair"
    ChairDirectory(chair_dir).save(dataclasses.replace(network.registry, version=2))
    forger = SigningKey.generate()
    forged_registry = add_key(network.registry, "IN", "IN-KPA",
                              bytes(forger.verify_key), now_ms() - 1000)
    forged = {version: sign_registry(dataclasses.replace(forged_registry, version=version),
                                     network.chair_key, now_ms())
              for version in (2, 2**63 - 1)}
    for code, version in (("ZA", 2), ("IN", 2**63 - 1)):
        node = Node.open(network.configs[code])  # signed by the key it trusts still
        (verdict,) = node.handle_batch([Delivery(forged[version])])
        assert verdict.dead_letter is None and node.registry.version == version
        node.close()

    rotated = json.loads(kpnode("registry", "rotate-chair-key", "--dir", str(chair_dir),
                                "--json").stdout)
    kpnode("registry", "publish", "--dir", str(chair_dir))  # version 2, the new key's
    v2 = (chair_dir / "registry.kpx").read_bytes()
    configs = {}
    for code, config in network.configs.items():
        write_config(dataclasses.replace(
            config, chair_public_key=bytes.fromhex(rotated["chair_public_key"]),
            former_chair_public_keys=tuple(bytes.fromhex(k)
                                           for k in rotated["former_chair_public_keys"])))
        configs[code] = load_config(config.directory)
    za = Node.open(configs["ZA"])  # through the broker, at the forged one's version
    (verdict,) = za.handle_batch([Delivery(v2)])
    assert verdict.dead_letter is None and za.registry.frame == v2
    za.close()
    configs["IN"].registry_path.write_bytes(v2)  # as a file, below the forged version
    for code in ("ZA", "IN"):
        node = Node.open(configs[code])
        assert node.registry.frame == v2, code
        assert node.registry.key_owner(key_id(bytes(forger.verify_key))) is None
        for version in (2, 2**63 - 1):  # nor does the forged one come back
            (verdict,) = node.handle_batch([Delivery(forged[version])])
            assert verdict.dead_letter is not None and node.registry.frame == v2
        node.close()
        assert json.loads(kpnode("verify-log", "--dir", str(configs[code].directory),
                                 "--json").stdout)["ok"]


def test_a_forged_registry_stays_superseded_across_a_second_rotation(tmp_path: Path) -> None:
    """The first Chair key was exposed and a registry forged with it, at the highest
    version, reached a node; the second key's registry replaced it, but its row stayed in
    the database. At the Chair's next rotation both keys are former ones, and a node
    restarted with the new key before the new key's registry reached it took 'the newest of
    all' by version: the forged one, trusting the forger's key for IN until the Chair's
    registry came. A node now starts with the registry it held last."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    chair_dir = network.base / "chair"
    ChairDirectory(chair_dir).save(dataclasses.replace(network.registry, version=2))
    forger = SigningKey.generate()
    forged = sign_registry(dataclasses.replace(
        add_key(network.registry, "IN", "IN-KPA", bytes(forger.verify_key), now_ms() - 1000),
        version=2**63 - 1), network.chair_key, now_ms())
    config = network.configs["ZA"]
    node = Node.open(config)
    (verdict,) = node.handle_batch([Delivery(forged)])
    assert verdict.dead_letter is None and node.registry.version == 2**63 - 1
    node.close()

    held = []
    for _ in range(2):
        rotated = json.loads(kpnode("registry", "rotate-chair-key", "--dir", str(chair_dir),
                                    "--json").stdout)
        kpnode("registry", "publish", "--dir", str(chair_dir))
        held.append((chair_dir / "registry.kpx").read_bytes())
        write_config(dataclasses.replace(
            load_config(config.directory),
            chair_public_key=bytes.fromhex(rotated["chair_public_key"]),
            former_chair_public_keys=tuple(bytes.fromhex(k)
                                           for k in rotated["former_chair_public_keys"])))
        node = Node.open(load_config(config.directory))  # before the new key's registry
        if len(held) > 1:  # the second key's, as it held it; at first the forged one
            assert node.registry.frame == held[-2]
            assert node.registry.key_owner(key_id(bytes(forger.verify_key))) is None
        (verdict,) = node.handle_batch([Delivery(forged)])
        assert verdict.dead_letter is not None
        (verdict,) = node.handle_batch([Delivery(held[-1])])  # the broker brings it
        assert verdict.dead_letter is None and node.registry.frame == held[-1]
        node.close()
    node = Node.open(load_config(config.directory))
    assert node.registry.frame == held[-1]
    node.close()
    assert json.loads(kpnode("verify-log", "--dir", str(config.directory), "--json").stdout)["ok"]


def test_a_second_rotation_of_the_chairs_key_keeps_the_first_former_key(tmp_path: Path) -> None:
    """RUNBOOK's step 3 showed one former key, 'the key it replaces': an operator following
    it at the Chair's second rotation listed only the second key. The registries the first
    key signed, still in the database and the log, then stopped verify-log with one line,
    'kpnode: key.unknown: registry is not signed by the Chair's key' (exit 1), and a
    registry.kpx of theirs stopped every command. rotate-chair-key now prints the whole
    list, every former key, and verify-log says which registry fails and what to list."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    chair_dir = network.base / "chair"
    ChairDirectory(chair_dir).save(dataclasses.replace(network.registry, version=2))
    first = bytes(network.chair_key.verify_key)
    config = network.configs["ZA"]
    Node.open(config).close()  # holds version 1, the first key's
    formers: list[list[str]] = []
    for _ in range(2):
        rotated = json.loads(kpnode("registry", "rotate-chair-key", "--dir", str(chair_dir),
                                    "--json").stdout)
        formers.append(rotated["former_chair_public_keys"])
        kpnode("registry", "publish", "--dir", str(chair_dir))
        # the operator takes the printed list as it is, and the new registry as a file
        write_config(dataclasses.replace(
            load_config(config.directory),
            chair_public_key=bytes.fromhex(rotated["chair_public_key"]),
            former_chair_public_keys=tuple(bytes.fromhex(k) for k in formers[-1])))
        config.registry_path.write_bytes((chair_dir / "registry.kpx").read_bytes())
        Node.open(load_config(config.directory)).close()
    assert formers[0] == [first.hex()]
    assert formers[1][0] == first.hex() and len(formers[1]) == 2
    assert json.loads(kpnode("verify-log", "--dir", str(config.directory), "--json").stdout)["ok"]

    # listed as the RUNBOOK used to show it, the first key missing: said, not a crash
    write_config(dataclasses.replace(load_config(config.directory),
                                     former_chair_public_keys=(bytes.fromhex(formers[1][1]),)))
    checked = kpnode("verify-log", "--dir", str(config.directory), "--json", check=False)
    assert checked.returncode == 1, checked.stderr
    faults = json.loads(checked.stdout)["faults"]
    assert any("registry version 1" in f and "former_chair_public_keys" in f
               for f in faults), faults
