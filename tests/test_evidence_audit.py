"""What ``kpnode verify-log`` catches when the records beside the evidence log are edited.

The statistics (``kpnode stats``, the mirror check) are read from the certificates table,
not from the log; "it backs all records" must therefore mean that every record says what
the signed messages in the log say, not only that its message id appears there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from node.evidence import unsupported_records
from node.machine import Record, Side, State
from node.network import create_network
from node.service import Node
from protocol.codec import pack, unpack
from tests.netutil import carry, certificate

Nodes = dict[str, Node]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    network = create_network(tmp_path, ["ZA", "IN", "EU"], ["amqp://unused/"])
    opened = {code: Node.open(cfg) for code, cfg in network.configs.items()}
    yield opened
    for n in opened.values():
        n.close()


def problems(node: Node) -> list[str]:
    return unsupported_records(node.store.records(), node.store.evidence(),
                               today=date.today())


def trade(nodes: Nodes) -> None:
    """ZA → IN: 0001 confirmed, 0002 delivered, 0003 cancelled, 0004 replaced by 0005."""
    za, india = nodes["ZA"], nodes["IN"]
    for n in ("ZA-2026-0001", "ZA-2026-0002", "ZA-2026-0003", "ZA-2026-0004"):
        za.issue(certificate(n, "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    india.confirm("ZA-2026-0001")
    carry(india, nodes)
    za.cancel("ZA-2026-0003", "issued in error")
    za.replace("ZA-2026-0004", certificate("ZA-2026-0005", "ZA", "IN", parcels=4), "parcels")
    carry(za, nodes)
    carry(india, nodes)
    for node in nodes.values():
        assert problems(node) == []


def edit_certificate(node: Node, side: Side, number: str, **changes: Any) -> None:
    (blob,) = node.store.db.execute("SELECT certificate FROM certificates WHERE side=? AND "
                                    "number=?", (str(side), number)).fetchone()
    wire = unpack(blob)
    wire.update(changes)
    node.store.db.execute("UPDATE certificates SET certificate=? WHERE side=? AND number=?",
                          (pack(wire), str(side), number))


def test_a_certificate_whose_stored_bytes_were_changed_is_not_backed(nodes: Nodes) -> None:
    """Only the message id was looked up: a certificate rewritten in the database (2,500
    carats made 0.01) passed verify-log, and the statistics counted the rewritten one."""
    trade(nodes)
    za, india = nodes["ZA"], nodes["IN"]
    lines = [{"hs_code": "7102.31", "carats_hundredths": 1, "usd_cents": 40_000_000}]
    edit_certificate(za, Side.EXPORT, "ZA-2026-0002", lines=lines)
    edit_certificate(india, Side.IMPORT, "ZA-2026-0001", parcels=9)
    assert problems(za) == ["export ZA-2026-0002 (delivered): the certificate stored differs "
                            "from the one its message carries"]
    assert problems(india) == ["import ZA-2026-0001 (confirmed): the certificate stored "
                               "differs from the one its message carries"]


def test_a_record_moved_to_another_partner_is_not_backed(nodes: Nodes) -> None:
    trade(nodes)
    za = nodes["ZA"]
    za.store.db.execute("UPDATE certificates SET partner='EU' WHERE number='ZA-2026-0002'")
    assert problems(za) == ["export ZA-2026-0002 (delivered): recorded with partner EU, "
                            "but its message is between ZA and IN"]


def test_columns_the_statistics_select_by_must_agree_with_the_certificate(
        nodes: Nodes) -> None:
    """`kpnode stats` selects a quarter by the issued_on column, then reads the
    certificate: a column set to another date took the certificate out of its quarter's
    statistics, and verify-log, which reads records only, said OK."""
    trade(nodes)
    za = nodes["ZA"]
    assert za.store.column_mismatches() == []
    za.store.db.execute("UPDATE certificates SET issued_on='2001-01-01' "
                        "WHERE number='ZA-2026-0002'")
    za.store.db.execute("UPDATE certificates SET expires_on='2001-01-02' "
                        "WHERE number='ZA-2026-0001'")
    assert za.store.column_mismatches() == [
        "export ZA-2026-0001: its expires_on column says 2001-01-02, its certificate "
        f"{za.store.get(Side.EXPORT, 'ZA-2026-0001').certificate.expires_on.isoformat()}",  # type: ignore[union-attr]
        f"export ZA-2026-0002: its issued_on column says 2001-01-01, its certificate "
        f"{date.today().isoformat()}"]
    done = subprocess.run([sys.executable, "-m", "node.cli", "verify-log", "--dir",
                           str(za.config.directory)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 1, done.stdout
    assert "issued_on column says 2001-01-01" in done.stdout


def set_state(node: Node, side: Side, number: str, state: State) -> None:
    node.store.db.execute("UPDATE certificates SET state=? WHERE side=? AND number=?",
                          (str(state), str(side), number))


@pytest.mark.parametrize(("side", "number", "state", "problem"), [
    # out of the statistics: a confirmed or delivered export made cancelled, rejected,
    # replaced; an open import made cancelled
    (Side.EXPORT, "ZA-2026-0001", State.CANCELLED, "no cancellation of it is in the log"),
    (Side.EXPORT, "ZA-2026-0002", State.REJECTED, "no rejection of it is in the log"),
    (Side.EXPORT, "ZA-2026-0002", State.REPLACED, "no replacement of it is in the log"),
    (Side.IMPORT, "ZA-2026-0002", State.CANCELLED, "no cancellation of it is in the log"),
    # back into them: a cancelled or replaced certificate made open again
    (Side.EXPORT, "ZA-2026-0003", State.DELIVERED, "its cancellation is in the log"),
    (Side.IMPORT, "ZA-2026-0003", State.RECEIVED, "its cancellation is in the log"),
    (Side.EXPORT, "ZA-2026-0004", State.DELIVERED, "its replacement ZA-2026-0005 is in the log"),
    (Side.IMPORT, "ZA-2026-0004", State.RECEIVED, "its replacement ZA-2026-0005 is in the log"),
    # a confirmation taken back (the mirror check then shows it unconfirmed)
    (Side.IMPORT, "ZA-2026-0001", State.RECEIVED, "this node's import confirmation of it "
                                                  "is in the log"),
    # expired before its expiry date
    (Side.IMPORT, "ZA-2026-0002", State.EXPIRED, "it expires on "),
    # delivered without a receipt
    (Side.EXPORT, "ZA-2026-0006", State.DELIVERED, "no receipt for it is in the log"),
])
def test_a_state_changed_in_the_database_is_not_backed(
        nodes: Nodes, side: Side, number: str, state: State, problem: str) -> None:
    """Only 'confirmed' needed anything of the log: a record set to cancelled, rejected or
    replaced left the statistics, one set back to open entered them again, and verify-log
    said OK. Each state now needs the signed message that makes it, and a certificate
    whose cancellation, replacement or confirmation is logged cannot be open."""
    trade(nodes)
    nodes["ZA"].issue(certificate("ZA-2026-0006", "ZA", "IN"))  # not sent yet
    node = nodes["ZA"] if side is Side.EXPORT else nodes["IN"]
    set_state(node, side, number, state)
    (found,) = problems(node)
    assert found.startswith(f"{side} {number} ({state}): "), found
    assert problem in found, found


def test_the_records_are_read_once_and_reported_in_their_order(nodes: Nodes) -> None:
    """verify-log held every record of a node's years at once (with the parsed messages
    of the log, 470 MiB at a hub's 60,000). The records now stream past once; a check that
    needs a later record (an open certificate's replacement) waits for it, and the report
    keeps the records' order."""
    trade(nodes)
    za = nodes["ZA"]
    set_state(za, Side.EXPORT, "ZA-2026-0004", State.ISSUED)  # needs 0005, which comes later
    set_state(za, Side.EXPORT, "ZA-2026-0005", State.CANCELLED)
    read: list[str] = []

    def once() -> Iterator[Record]:
        for record in za.store.each_record():
            read.append(record.number)
            yield record
    assert unsupported_records(once(), za.store.evidence(), today=date.today()) == [
        "export ZA-2026-0004 (issued): its replacement ZA-2026-0005 is in the log, yet it "
        "is open",
        "export ZA-2026-0005 (cancelled): no cancellation of it is in the log"]
    assert read == [f"ZA-2026-000{i}" for i in range(1, 6)]


def test_legitimate_ends_are_backed(nodes: Nodes) -> None:
    """What the node itself does leaves nothing to report: rejections at both ends, a
    cancellation that crossed the importer's confirmation, a refused replacement, expiry."""
    za, india = nodes["ZA"], nodes["IN"]
    trade(nodes)
    # a cancellation crossing the confirmation: confirmed at both ends
    za.issue(certificate("ZA-2026-0010", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    za.cancel("ZA-2026-0010", "crossed")
    india.confirm("ZA-2026-0010")
    carry(za, nodes)
    carry(india, nodes)
    carry(za, nodes)
    for side, node in ((Side.EXPORT, za), (Side.IMPORT, india)):
        assert node.store.get(side, "ZA-2026-0010").state is State.CONFIRMED  # type: ignore[union-attr]
    # a certificate the importer refuses (issued by a node that has no certificate of this
    # number yet, received twice by the importer)
    za.issue(certificate("ZA-2026-0011", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    za.store.db.execute("DELETE FROM certificates WHERE number='ZA-2026-0011'")
    za.issue(certificate("ZA-2026-0011", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0011").state is State.REJECTED  # type: ignore[union-attr]
    # a replacement the importer refuses (its old certificate is confirmed there by
    # then): the old one is issued again at the exporter, the replacement rejected
    za.issue(certificate("ZA-2026-0013", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    india.confirm("ZA-2026-0013")
    za.replace("ZA-2026-0013", certificate("ZA-2026-0014", "ZA", "IN"), "crossed too")
    carry(za, nodes)
    carry(india, nodes)
    carry(za, nodes)
    assert za.store.get(Side.EXPORT, "ZA-2026-0014").state is State.REJECTED  # type: ignore[union-attr]
    # expiry of open loops at both ends, seen by a verify-log run the day after
    za.issue(certificate("ZA-2026-0015", "ZA", "IN"))
    carry(za, nodes)
    carry(india, nodes)
    later = date.today() + timedelta(days=61)
    for node in (za, india):
        node.clock = lambda: int(time.time() * 1000) + 61 * 86_400_000
        assert node.expire_overdue()
    for node in (za, india):
        assert unsupported_records(node.store.records(), node.store.evidence(),
                                   today=later) == []


def test_a_record_deleted_from_the_database_is_missed(nodes: Nodes) -> None:
    """verify-log checked records against the log, never the log against the records: a
    certificate deleted from the table (gone from the statistics, the lists, the mirror
    check) left 'evidence log OK' behind, though the log holds the frame this node signed
    for it, or the receipt it sent."""
    trade(nodes)
    za, india = nodes["ZA"], nodes["IN"]
    za.store.db.execute("DELETE FROM certificates WHERE number='ZA-2026-0001'")
    india.store.db.execute("DELETE FROM certificates WHERE number='ZA-2026-0002'")
    assert problems(za) == ["export ZA-2026-0001: the log holds the certificate this node "
                            "sent, but there is no record of it"]
    assert problems(india) == ["import ZA-2026-0002: the log holds this node's receipt of "
                               "it, but there is no record of it"]


def rewrite_without_cancellation(node: Node, number: str) -> None:
    """What anyone holding the database file can do, without any key: drop an entry,
    hash the chain anew, and set the record to what the shortened log says."""
    from node.evidence import GENESIS, entry_hash
    from protocol import Cancellation, decode_body, parse_frame
    rows = node.store.db.execute("SELECT recorded_at, direction, message_id, certificate, "
                                 "frame FROM evidence ORDER BY seq").fetchall()
    kept = [r for r in rows if not (r[3] == number and isinstance(
        decode_body(parse_frame(r[4]).body).payload, Cancellation))]
    assert len(kept) == len(rows) - 1
    node.store.db.execute("DELETE FROM evidence")
    prev = GENESIS
    for seq, (at, direction, mid, cert, frame) in enumerate(kept, start=1):
        prev = entry_hash(prev, seq, at, direction, mid, cert, frame)
        node.store.db.execute("INSERT INTO evidence VALUES (?,?,?,?,?,?,?)",
                              (seq, at, direction, mid, cert, frame, prev))
    node.store.db.execute("UPDATE certificates SET state='delivered', rejection_text=NULL "
                          "WHERE side='export' AND number=?", (number,))


def verify_log(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "verify-log", "--dir",
                           str(node.config.directory), *args], capture_output=True,
                          text=True, check=False, timeout=60)


def test_a_rewritten_log_is_caught_against_a_head_written_down_before(nodes: Nodes) -> None:
    """The chain is a plain SHA-256 chain: whoever holds the database can drop an entry
    (here the cancellation of ZA-2026-0003, which then counts in the statistics again)
    and hash the rest anew, and verify-log says OK. It now prints the log's head, and
    checks a head an auditor wrote down earlier (--anchor SEQ:HASH): a rewrite of any
    entry up to it changes that entry's hash."""
    trade(nodes)
    za = nodes["ZA"]
    first = verify_log(za, "--json")
    assert first.returncode == 0, first.stderr
    head = json.loads(first.stdout)["head"]
    anchor = f"{head['seq']}:{head['hash']}"
    assert anchor in verify_log(za).stdout
    assert verify_log(za, "--anchor", anchor).returncode == 0
    za.issue(certificate("ZA-2026-0007", "ZA", "IN"))  # the log grows after the visit
    carry(za, nodes)
    carry(nodes["IN"], nodes)
    rewrite_without_cancellation(za, "ZA-2026-0003")
    assert verify_log(za).returncode == 0  # what no check of the database alone can see
    done = verify_log(za, "--anchor", anchor)
    assert done.returncode == 1
    assert f"entry {head['seq']}: " in done.stdout and "not the anchor's" in done.stdout
    assert verify_log(za, "--anchor", "12").returncode == 2


def test_a_record_expired_by_a_clock_ahead_past_midnight_is_not_a_fault(tmp_path: Path) -> None:
    """A node whose clock ran a few hours ahead (a host clock kept in local time) passed
    midnight UTC before the certificate's last day ended and its sweep expired it: nothing
    was tampered with, yet verify-log, run once the clock was right again, said FAILED
    ('it expires on D, not before today') until that day ended. A day's grace."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    today = datetime.now(UTC).date()
    nodes["ZA"].issue(certificate("ZA-2026-0001", "ZA", "IN",
                                  issued_on=(today - timedelta(days=5)).isoformat(),
                                  expires_on=today.isoformat()))
    carry(nodes["ZA"], nodes)
    midnight = int(datetime.combine(today + timedelta(days=1), datetime.min.time(),
                                    UTC).timestamp() * 1000)
    nodes["IN"].clock = lambda: midnight + 30 * 60_000  # three hours ahead at 21:30 UTC
    assert [r.number for r in nodes["IN"].expire_overdue()] == ["ZA-2026-0001"]
    try:
        records, entries = nodes["IN"].store.records(), list(nodes["IN"].store.evidence())
        assert unsupported_records(records, entries, today=today) == []
        # two days early is no clock's doing
        assert unsupported_records(records, entries, today=today - timedelta(days=1))
    finally:
        for node in nodes.values():
            node.close()
