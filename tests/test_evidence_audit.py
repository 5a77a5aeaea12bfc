"""What ``kpnode verify-log`` catches when the records beside the evidence log are edited.

The statistics (``kpnode stats``, the mirror check) are read from the certificates table,
not from the log; "it backs all records" must therefore mean that every record says what
the signed messages in the log say, not only that its message id appears there.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from node.evidence import unsupported_records
from node.machine import Side
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
    return unsupported_records(node.store.records(), node.store.evidence())


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
