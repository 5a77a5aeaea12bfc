"""What a commit promises, without a broker: a decision (the commit a delivery is acked
after) waits for the disk, whatever bookkeeping committed before it; and a second writer
to the database (``kpnode issue`` beside ``kpnode run``) or a transaction rolled back
leaves the evidence log a chain that verifies."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.evidence import verify_chain
from node.machine import Record
from node.network import create_network
from node.service import Delivery, Node
from node.store import StoreError
from tests.netutil import certificate

#: PRAGMA synchronous: FULL, what a commit acked to the broker needs to survive a power cut
FULL = 2


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    network = create_network(tmp_path, ["ZA", "IN"], [])
    za, india = (Node.open(network.configs[c]) for c in ("ZA", "IN"))
    yield za, india
    za.close()
    india.close()


def synchronous_of_decisions(node: Node) -> list[int]:
    """The synchronous level in force inside each transaction that saves records."""
    levels: list[int] = []
    save = node.store.save

    def saving(records: Any) -> None:
        levels.append(node.store.db.execute("PRAGMA synchronous").fetchone()[0])
        save(records)
    node.store.save = saving  # type: ignore[method-assign]
    return levels


def test_a_decision_waits_for_the_disk_after_bookkeeping_that_did_not(
        pair: tuple[Node, Node]) -> None:
    """The relay marks rows sent with durable=False; the next decision must commit with
    synchronous=FULL again, or a delivery acked after it could be undone by a power cut."""
    za, india = pair
    levels = synchronous_of_decisions(india)
    za.issue(certificate("ZA-2026-0001", "ZA", "IN"))
    (row,) = za.store.due(2**62, 10)
    with za.store.transaction(durable=False):  # the relay, marking a row sent
        za.store.mark_published([row.seq], 0)
    with india.store.transaction(durable=False):
        india.store.mark_published([], 0)
    with pytest.raises(RuntimeError), india.store.transaction(durable=False):
        raise RuntimeError("a bookkeeping transaction that failed")
    (verdict,) = india.handle_batch([Delivery(row.frame)])
    assert verdict.dead_letter is None
    india.confirm("ZA-2026-0001")  # a local command: its frame goes out once committed
    assert levels == [FULL, FULL]
    with india.store.transaction():
        assert india.store.db.execute("PRAGMA synchronous").fetchone()[0] == FULL


def test_evidence_written_by_another_process_meanwhile_keeps_the_chain(
        pair: tuple[Node, Node]) -> None:
    """``kpnode issue`` appends to the log of a running node: the running node's next entry
    must follow the other process's, not the last entry it wrote itself."""
    running = za = pair[0]
    cli = Node.open(za.config)
    try:
        running.issue(certificate("ZA-2026-0001", "ZA", "IN"))
        cli.issue(certificate("ZA-2026-0002", "ZA", "IN"))
        running.issue(certificate("ZA-2026-0003", "ZA", "IN"))
        cli.issue(certificate("ZA-2026-0004", "ZA", "IN"))
    finally:
        cli.close()
    keys = [bytes(za.signing_key().verify_key)]
    entries = list(za.store.evidence())
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert verify_chain(entries, keys, za.config.chair_public_key) == []
    assert len(za.store.records()) == 4


def test_a_rolled_back_batch_leaves_no_gap_in_the_evidence_chain(
        pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose commit failed (a full disk) appended evidence before it was rolled
    back; the next batch's entries must follow the last entry committed."""
    za, india = pair
    for n in (1, 2):
        za.issue(certificate(f"ZA-2026-000{n}", "ZA", "IN"))
    frames = [r.frame for r in za.store.due(2**62, 10)]
    save = india.store.save
    failing = [True]

    def save_or_fail(records: list[Record]) -> None:
        save(records)
        if failing[0]:
            raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(india.store, "save", save_or_fail)
    with pytest.raises(StoreError):
        india.handle_batch([Delivery(frames[0])])
    failing[0] = False
    india.handle_batch([Delivery(f) for f in frames])
    keys = [bytes(n.signing_key().verify_key) for n in pair]
    entries = list(india.store.evidence())
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert verify_chain(entries, keys, india.config.chair_public_key) == []


def test_a_registry_update_in_a_batch_that_failed_to_commit_is_applied_when_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch is held and decided again once the store recovers; had the node kept the
    uncommitted registry in memory, the retried update would be taken for one it already
    has and never reach the database: the next start would run with the old registry."""
    import dataclasses

    from protocol import ParticipantEntry, ParticipantStatus

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://unused/"])
    running = Node.open(network.configs["ZA"])
    try:
        update = dataclasses.replace(network.registry, version=2, participants=(
            *network.registry.participants,
            ParticipantEntry(code="ZB", name="filler", status=ParticipantStatus.WITHDRAWN,
                             authorities=())))
        frame = network.publish_registry(update)
        remember = running.store.remember

        def full_disk(*_: Any) -> None:  # after the update was applied, before the commit
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(running.store, "remember", full_disk)
        with pytest.raises(StoreError):
            running.handle_batch([Delivery(frame)])
        assert running.registry.version == 1
        monkeypatch.setattr(running.store, "remember", remember)
        (verdict,) = running.handle_batch([Delivery(frame)])
        assert verdict.dead_letter is None
        assert running.registry.version == 2
        assert running.store.latest_registry_frame() == frame
    finally:
        running.close()
