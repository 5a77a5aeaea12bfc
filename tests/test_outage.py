"""A long outage: the importer's node is down while 10,000 certificates queue for it; once
started it drains them all, each recorded once, and the receipts flow back. The drain rate
is printed and recorded (``record_property``), never asserted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node.machine import Side, State
from node.network import create_network
from node.nodeprocess import NodeProcess
from node.transport import inbox_queue
from tests.faultnet import burst, count, issue, logged_in, stop_all, verify_log
from tests.netutil import queue_depth
from tests.test_crash import start
from tests.test_network import fresh_codes, until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BACKLOG = 10_000


async def test_importer_down_while_10000_queue_then_drains_them_all(
        amqp_url: str, tmp_path: Path, processes: list[NodeProcess],
        record_property: Callable[[str, object], None]) -> None:
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    cfg = network.configs
    exporter, importer = NodeProcess(cfg[ex].directory), NodeProcess(cfg[im].directory)
    processes += [exporter, importer]
    await start(importer)  # once, so its inbox exists; then the outage begins
    assert importer.terminate() == 0
    await start(exporter)

    shipments = burst(ex, im, BACKLOG, "L")
    await asyncio.to_thread(issue, cfg[ex], shipments)
    inbox = inbox_queue(im)
    await until(lambda: count(cfg[ex], Side.EXPORT) == BACKLOG, 60)
    deadline = time.monotonic() + 120
    while await queue_depth(amqp_url, inbox) < BACKLOG:
        assert time.monotonic() < deadline, "the backlog never built up in the inbox"
        await asyncio.sleep(0.5)

    began = time.monotonic()
    await start(importer)
    up = time.monotonic() - began
    await until(lambda: count(cfg[im], Side.IMPORT) == BACKLOG, 300)
    drained = time.monotonic() - began
    await until(lambda: count(cfg[ex], Side.EXPORT, State.DELIVERED) == BACKLOG, 300)
    assert await queue_depth(amqp_url, inbox) == 0
    assert await asyncio.to_thread(stop_all, [exporter, importer]) == [0, 0]

    assert logged_in(cfg[im]) == (BACKLOG, BACKLOG)  # each recorded once
    assert logged_in(cfg[ex]) == (BACKLOG, BACKLOG)  # each receipt once
    result = verify_log(cfg[im].directory)
    assert (result["exit"], result["ok"]) == (0, True), result

    rate = BACKLOG / drained
    record_property("drain_messages_per_second", round(rate))
    record_property("drain_seconds", round(drained, 1))
    print(f"\nkpx: drained {BACKLOG:,} queued certificates in {drained:.1f} s "
          f"({rate:,.0f} messages/s, node start {up:.1f} s included)")
