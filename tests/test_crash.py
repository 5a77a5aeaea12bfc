"""``kill -9`` of a node in the middle of its work: every loop still closes exactly once.

The nodes are real ``kpnode run`` processes (:class:`node.nodeprocess.NodeProcess`) on the
session's broker; the authorities' desks issue and confirm through their own connection to
the node's database, as ``kpnode issue`` and ``kpnode confirm`` do, so they go on while a
node is down. At the end :func:`node.simreport.analyse` checks both sides' records and
evidence, and ``kpnode verify-log`` the hash chains.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node.machine import Side, State
from node.network import create_network
from node.nodeprocess import NodeProcess
from tests.faultnet import (
    burst,
    check,
    confirm,
    count,
    issue,
    logged_events,
    logged_in,
    stop_all,
    unpublished,
    verify_log,
)
from tests.tcpproxy import proxied
from tests.test_network import fresh_codes, until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BURST = 1_000
#: desks issue and confirm at this pace, so a crash lands in the middle of the burst
PACE = 250.0


async def start(*nodes: NodeProcess) -> None:
    for n in nodes:
        n.start()
    for n in nodes:
        await asyncio.to_thread(n.wait_started)


async def test_importer_killed_mid_burst_every_loop_closes_exactly_once(
        amqp_url: str, tmp_path: Path, processes: list[NodeProcess]) -> None:
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    cfg = network.configs
    exporter, importer = NodeProcess(cfg[ex].directory), NodeProcess(cfg[im].directory)
    processes += [exporter, importer]
    await start(importer, exporter)
    shipments = burst(ex, im, BURST)

    issuing = asyncio.create_task(asyncio.to_thread(issue, cfg[ex], shipments, PACE))
    await until(lambda: count(cfg[im], Side.IMPORT) >= 200, 60)
    importer.kill()
    assert count(cfg[im], Side.IMPORT) < BURST  # the crash came mid-burst
    await asyncio.sleep(1.0)  # certificates pile up in its inbox meanwhile
    await start(importer)
    await issuing
    await until(lambda: count(cfg[ex], Side.EXPORT, State.DELIVERED) == BURST, 120)

    # the importing authority confirms; its node is killed again while answering
    confirming = asyncio.create_task(asyncio.to_thread(confirm, cfg[im], shipments, PACE))
    await until(lambda: count(cfg[ex], Side.EXPORT, State.CONFIRMED) >= 200, 60)
    importer.kill()
    assert count(cfg[ex], Side.EXPORT, State.CONFIRMED) < BURST
    await asyncio.sleep(1.0)
    await start(importer)
    await confirming
    await until(lambda: count(cfg[ex], Side.EXPORT, State.CONFIRMED) == BURST, 120)

    assert stop_all([exporter, importer]) == [0, 0]
    report = check(cfg, shipments)
    assert report.failures == []
    assert (report.closed, report.open) == (BURST, 0)
    assert count(cfg[im], Side.IMPORT) == count(cfg[ex], Side.EXPORT) == BURST
    for code in (ex, im):
        received, distinct = logged_in(cfg[code])
        assert received == distinct  # no message recorded twice
        result = verify_log(cfg[code].directory)
        assert (result["exit"], result["ok"]) == (0, True), result


def logged_duplicate(log: Path, message_id: str) -> bool:
    return any(e.get("message_id") == message_id for e in logged_events(log, "duplicate"))


async def test_exporter_killed_between_commit_and_confirm_sends_it_after_restart_once(
        amqp_url: str, tmp_path: Path, processes: list[NodeProcess]) -> None:
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    cfg = network.configs
    async with proxied(amqp_url) as (proxy, through):
        exporter = NodeProcess(cfg[ex].directory, env={"KPX_BROKER_URLS": through})
        importer = NodeProcess(cfg[im].directory)
        processes += [exporter, importer]
        await start(importer, exporter)

        proxy.hold()  # from now on the broker's confirms cannot reach the exporter
        shipments = burst(ex, im, 1, "K")
        issue(cfg[ex], shipments)  # committed: certificate and outbox row
        (message_id,) = unpublished(cfg[ex])
        wire_id = message_id.encode()
        await until(lambda: any(wire_id in sent for sent in proxy.sent), 30)
        # published and queued (the importer has it), but the confirm never came back
        await until(lambda: count(cfg[im], Side.IMPORT, State.RECEIVED) == 1, 30)
        assert unpublished(cfg[ex]) == [message_id]
        exporter.kill()
        assert unpublished(cfg[ex]) == [message_id]
        proxy.release()

        await start(exporter)
        await until(lambda: count(cfg[ex], Side.EXPORT, State.DELIVERED) == 1, 60)
        await until(lambda: unpublished(cfg[ex]) == [], 30)
        # it left again after the restart: the broker got it twice ...
        assert sum(wire_id in sent for sent in proxy.sent) == 2
        # ... and the importer recognised the second copy
        await until(lambda: logged_duplicate(importer.log_path, message_id), 30)

        confirm(cfg[im], shipments)
        await until(lambda: count(cfg[ex], Side.EXPORT, State.CONFIRMED) == 1, 60)
        # in a thread: this event loop runs the proxy the exporter shuts down through
        assert await asyncio.to_thread(stop_all, [exporter, importer]) == [0, 0]
    report = check(cfg, shipments)
    assert report.failures == []
    assert report.closed == 1
    assert count(cfg[im], Side.IMPORT) == 1
    assert logged_in(cfg[im]) == (1, 1)  # the certificate, recorded once
    assert logged_in(cfg[ex]) == (2, 2)  # its receipt and confirmation, once each
    for code in (ex, im):
        result = verify_log(cfg[code].directory)
        assert (result["exit"], result["ok"]) == (0, True), result
