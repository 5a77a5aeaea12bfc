"""Helpers for the fault tests that crash real ``kpnode run`` processes: a burst of
certificates issued and confirmed from the authority's side (a second connection to the
node's database, as ``kpnode issue`` / ``kpnode confirm`` would), progress read from the
stores, and the end-of-test invariants checked by :func:`node.simreport.analyse` and
``kpnode verify-log``."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from node.config import NodeConfig
from node.machine import Side, State
from node.nodeprocess import NodeProcess
from node.service import Node
from node.simreport import Report, analyse
from node.store import Store
from node.trade import Shipment
from tests.netutil import certificate


def burst(exporter: str, importer: str, count: int, tag: str = "B") -> list[Shipment]:
    """``count`` certificates from ``exporter`` to ``importer``, confirmed as declared."""
    return [Shipment(certificate(f"{exporter}-{tag}{i:05d}", exporter, importer), 0, 0, None)
            for i in range(count)]


def issue(config: NodeConfig, shipments: Sequence[Shipment], per_second: float = 0.0) -> None:
    """Issue at the exporter's node (blocking; run it in a thread to overlap a fault)."""
    _paced(config, shipments, per_second, lambda node, s: node.issue(s.certificate))


def confirm(config: NodeConfig, shipments: Sequence[Shipment], per_second: float = 0.0) -> None:
    """The importing authority confirms every shipment as declared (blocking)."""
    _paced(config, shipments, per_second, lambda node, s: node.confirm(s.number))


def _paced(config: NodeConfig, shipments: Sequence[Shipment], per_second: float,
           act: Callable[[Node, Shipment], object]) -> None:
    """One desk action per shipment at the node, at most ``per_second`` (0: at once)."""
    node = Node.open(config)
    try:
        started = time.monotonic()
        for i, s in enumerate(shipments):
            act(node, s)
            if per_second > 0:
                ahead = (i + 1) / per_second - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        node.close()


@contextlib.contextmanager
def stores(configs: Mapping[str, NodeConfig]) -> Iterator[dict[str, Store]]:
    opened = {code: Store(c.database_path) for code, c in configs.items()}
    try:
        yield opened
    finally:
        for store in opened.values():
            store.close()


def count(config: NodeConfig, side: Side, *states: State) -> int:
    """How many records of ``side`` (in one of ``states``, if given) the node holds now.
    Read-only, so polling it never competes with the node for the write lock."""
    wanted = [str(s) for s in states] or [str(s) for s in State]
    with contextlib.closing(sqlite3.connect(f"file:{config.database_path}?mode=ro",
                                            uri=True, timeout=30)) as db:
        row = db.execute(
            f"SELECT COUNT(*) FROM certificates WHERE side=? AND state IN "
            f"({','.join('?' * len(wanted))})", (str(side), *wanted)).fetchone()
    return int(row[0])


def unpublished(config: NodeConfig) -> list[str]:
    """Message ids in the node's outbox that the broker has not confirmed yet."""
    with contextlib.closing(sqlite3.connect(f"file:{config.database_path}?mode=ro",
                                            uri=True, timeout=30)) as db:
        rows = db.execute("SELECT message_id FROM outbox WHERE published_at IS NULL "
                          "ORDER BY seq").fetchall()
    return [str(r[0]) for r in rows]


def logged_in(config: NodeConfig) -> tuple[int, int]:
    """(incoming frames about certificates in the evidence log, distinct message ids)."""
    with contextlib.closing(sqlite3.connect(f"file:{config.database_path}?mode=ro",
                                            uri=True, timeout=30)) as db:
        row = db.execute("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM evidence "
                         "WHERE direction='in' AND certificate IS NOT NULL").fetchone()
    return int(row[0]), int(row[1])


def check(configs: Mapping[str, NodeConfig], shipments: Sequence[Shipment]) -> Report:
    """Every planned loop closed once, equal on both sides, each message logged once."""
    report = Report(codes=tuple(configs), mode="process", options={})
    with stores(configs) as opened:
        analyse(report, opened, shipments)
    return report


def verify_log(directory: Path) -> dict[str, object]:
    """``kpnode verify-log --json``: the hash chain and every signature of the evidence."""
    done = subprocess.run([sys.executable, "-m", "node.cli", "verify-log", "--dir",
                           str(directory), "--json"], capture_output=True, text=True,
                          check=False)
    result: dict[str, object] = json.loads(done.stdout) if done.stdout.strip() else {}
    result["exit"] = done.returncode
    return result


def stop_all(processes: Sequence[NodeProcess]) -> list[int]:
    """SIGTERM every node; their exit codes (0 is a clean, drained shutdown)."""
    return [p.terminate() for p in processes]


def logged_events(log: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log entries of one event name in a node's log."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
    return found
