"""``kpnode demo``: a broker, three national authorities, loops closed both ways.

It provisions a Chair and nodes for South Africa, the EU and India in a temporary
directory, signs a registry, runs the three nodes against a real RabbitMQ (the one named by
``KPX_AMQP_URL``, or a throwaway local one), issues certificates in every direction,
confirms each import (one with a short shipment, to show a discrepancy) and prints the
loops as both sides record them.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from node.brokerclient import amqp_library_logs_quiet, connect_any, queue_info
from node.localbroker import broker_url
from node.machine import Side, State
from node.network import create_network
from node.runner import InboxTaken, RunningNode
from node.service import Node
from node.transport import inbox_queue
from protocol import Certificate, Line, Party

CODES = ("ZA", "EU", "IN")
SETTLE_SECONDS = 60.0


def demo_certificate(number: str, issuer: str, destination: str, seq: int) -> Certificate:
    today = datetime.now(UTC).date()  # the nodes' day: a local one east of UTC is ahead
    carats = 180_000 + 37_500 * seq  # hundredths: 1,800 ct and up
    return Certificate(
        number=number, issuer=issuer, issuing_authority=f"{issuer}-KPA",
        destination=destination, origins=(issuer,) if issuer != "EU" else ("MIXED",),
        exporter=Party(name=f"{issuer} Rough Exports {seq}", address=f"{seq} Mine Road, {issuer}"),
        importer=Party(name=f"{destination} Cutting Works", address=f"Bourse 1, {destination}"),
        lines=(Line(hs_code="7102.31", carats_hundredths=carats, usd_cents=carats * 1_800),
               Line(hs_code="7102.21", carats_hundredths=carats // 10,
                    usd_cents=carats // 10 * 400)),
        parcels=2 + seq % 3, issued_on=today, expires_on=today + timedelta(days=90),
    )


async def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def run_demo(per_pair: int = 1, keep: str | None = None, *, as_json: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="kpx-demo-") as tmp:
        base = Path(keep) if keep else Path(tmp)
        with broker_url() as url:
            # a broker named in KPX_AMQP_URL that does not answer: say so now, not after
            # three nodes have each waited a minute for it
            with amqp_library_logs_quiet():
                connection, _ = await connect_any([url])
            async with connection:
                # Nodes of these Participants already on this broker: the demo's would
                # share their inboxes (and wait minutes for them to go first).
                for code in CODES:
                    info = await queue_info(connection, inbox_queue(code))
                    if info is not None and info.consumers:
                        raise InboxTaken(f"a {code} node already runs on this broker "
                                         f"({inbox_queue(code)} has {info.consumers} "
                                         f"consumer(s)); the demo needs {', '.join(CODES)} "
                                         "free: give it a broker or vhost of its own")
            network = create_network(base, CODES, [url])
            async with AsyncExitStack() as stack:
                running = {code: await stack.enter_async_context(RunningNode(cfg))
                           for code, cfg in network.configs.items()}
                nodes: dict[str, Node] = {c: r.node for c, r in running.items() if r.node}
                return await _exchange(nodes, per_pair, as_json, base if keep else None)


async def _exchange(nodes: dict[str, Node], per_pair: int, as_json: bool,
                    kept: Path | None) -> int:
    started = time.monotonic()
    issued: list[tuple[str, str, str]] = []
    seq = 0
    for exporter in CODES:
        for importer in CODES:
            if exporter == importer:
                continue
            for _ in range(per_pair):
                seq += 1
                number = f"{exporter}-{datetime.now(UTC).year}-{seq:05d}"
                nodes[exporter].issue(demo_certificate(number, exporter, importer, seq))
                issued.append((number, exporter, importer))

    def state(code: str, side: Side, number: str) -> State | None:
        record = nodes[code].store.get(side, number)
        return record.state if record else None

    await wait_until(lambda: all(state(i, Side.IMPORT, n) is State.RECEIVED
                                 for n, _, i in issued), SETTLE_SECONDS)
    for k, (number, _, importer) in enumerate(issued):
        if state(importer, Side.IMPORT, number) is not State.RECEIVED:
            continue
        if k == 0:  # one shipment arrives a parcel short: a discrepancy, on both sides
            record = nodes[importer].store.get(Side.IMPORT, number)
            assert record is not None
            nodes[importer].confirm(number, parcels=record.certificate.parcels - 1)
        else:
            nodes[importer].confirm(number)
    await wait_until(lambda: all(state(e, Side.EXPORT, n) is State.CONFIRMED
                                 for n, e, _ in issued), SETTLE_SECONDS)
    elapsed = time.monotonic() - started

    rows = []
    for number, exporter, importer in issued:
        ex = nodes[exporter].store.get(Side.EXPORT, number)
        im = nodes[importer].store.get(Side.IMPORT, number)
        same = (ex is not None and im is not None
                and {e.frame for e in nodes[exporter].store.evidence(number)}
                == {e.frame for e in nodes[importer].store.evidence(number)})
        rows.append({
            "number": number, "exporter": exporter, "importer": importer,
            "exporter_state": str(ex.state) if ex else None,
            "importer_state": str(im.state) if im else None,
            "same_signed_evidence": same,
            "discrepancies": len(ex.discrepancies) if ex else None,
        })
    closed = all(r["exporter_state"] == r["importer_state"] == "confirmed"
                 and r["same_signed_evidence"] for r in rows)
    if as_json:
        print(json.dumps({"loops": rows, "all_closed": closed, "seconds": elapsed}, indent=2))
    else:
        from node.terminal import table

        print(table([[r["number"], f'{r["exporter"]} → {r["importer"]}', r["exporter_state"],
                      r["importer_state"], "yes" if r["same_signed_evidence"] else "NO",
                      r["discrepancies"] or ""] for r in rows],
                    ("certificate", "trade", "exporter sees", "importer sees",
                     "same signed evidence", "discrepancies")))
        verdict = "every loop closed on both sides" if closed else "SOME LOOPS DID NOT CLOSE"
        print(f"\n{len(rows)} certificates, {verdict}, in {elapsed:.1f} s.")
        if kept:
            first = rows[0]
            print(f"Node directories kept in {kept}; try: kpnode show {first['number']} "
                  f"--dir {kept / str(first['exporter'])}")
    return 0 if closed else 1
