"""The running node's sweep, without a broker: expiry and resends go on after a fault."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node import runner
from node.machine import Side, State
from node.network import create_network
from node.runner import RunningNode
from node.service import Node, now_ms
from tests.netutil import certificate


async def test_the_sweep_survives_a_fault_of_any_kind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One unexpected exception used to end the sweep task for good: no expiry and no
    resend until the node was restarted."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    node = Node.open(network.configs["ZA"])
    try:
        node.issue(certificate("ZA-2026-0001", "ZA", "IN", issued_on="2020-01-01",
                               expires_on="2099-01-01"))
        later = now_ms() + 100 * 365 * 86_400_000
        node.clock = lambda: later  # past the certificate's expiry: the sweep has work
        original = Node.expire_overdue
        faults = [RuntimeError("a bug, once")]

        def expire_overdue(self: Node) -> list[object]:
            if faults:
                raise faults.pop()
            return original(self)  # type: ignore[return-value]
        monkeypatch.setattr(Node, "expire_overdue", expire_overdue)
        monkeypatch.setattr(runner, "SWEEP_SECONDS", 0.02)
        running = RunningNode(network.configs["ZA"])
        running.node = node
        task = asyncio.create_task(running._sweep())
        for _ in range(200):
            record = node.store.get(Side.EXPORT, "ZA-2026-0001")
            if record is not None and record.state is State.EXPIRED:
                break
            await asyncio.sleep(0.02)
        assert not task.done()
        assert not faults
        assert node.store.get(Side.EXPORT, "ZA-2026-0001").state is State.EXPIRED  # type: ignore[union-attr]
        task.cancel()
    finally:
        node.close()
