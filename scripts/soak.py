#!/usr/bin/env python3
"""Soak: a small simulated network under a random fault schedule, invariants checked at the end.

    .venv/bin/python scripts/soak.py --participants 4 --certificates 1000 --duration 120 \\
        --faults 8 --seed 3

It starts a broker of its own (a :class:`~node.localbroker.LocalBroker`: the schedule
restarts it), provisions a Chair, the nodes and a signed registry, and runs every node as
``kpnode run`` in its own process (:class:`~node.nodeprocess.NodeProcess`). The
Participants' desks (:class:`~node.desk.Desk`) run here, next to the nodes, issuing the
trade planned by :func:`~node.trade.plan_trade` and confirming arrivals through their own
connection to each node's database, so they go on while a node is down.

During ``--duration`` seconds it applies ``--faults`` faults at random instants, each of
them one of: ``kill -9`` a node and restart it after a pause; SIGTERM a node (it must exit
0) and restart it; restart the broker. With three faults or more each kind occurs at least
once. Then it waits (at most ``--timeout`` seconds) for every loop to finish, stops the
nodes with SIGTERM and checks, with :func:`~node.simreport.analyse` and ``kpnode
verify-log``: every loop closed once with equal records and the same signed evidence on both
sides, nothing recorded twice, mirror statistics agreeing, every hash chain and signature
valid, every SIGTERM answered by exit 0. It prints a short report (``--json`` for machines)
and exits 0 when all holds, 1 when an invariant failed, 2 on bad arguments, 3 when the
environment (broker, a node) would not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.desk import Desk, desk_plan
from node.interrupt import sigterm_as_interrupt
from node.localbroker import BrokerError, LocalBroker
from node.logs import configure_logging
from node.network import create_network
from node.nodeprocess import NodeProcess, NodeProcessError
from node.service import Node, now_ms
from node.simreport import Report, analyse
from node.simulate import count_progress
from node.store import Store
from node.trade import MAX_PARTICIPANTS, PARTICIPANTS, plan_trade

KILL, TERM, BROKER = "kill -9", "SIGTERM", "broker restart"
KINDS = (KILL, TERM, BROKER)


@dataclass
class Fault:
    at: float
    kind: str
    target: str
    seconds: float = 0.0
    outcome: str = "ok"


@dataclass
class Soak:
    faults: list[Fault] = field(default_factory=list)
    exit_codes: dict[str, list[int]] = field(default_factory=dict)
    finished: bool = False
    wall_seconds: float = 0.0


def schedule(rng: random.Random, count: int, duration: float, codes: Sequence[str]
             ) -> list[Fault]:
    """``count`` faults at random instants within the middle of ``duration``."""
    kinds = list(KINDS[:count]) + rng.choices(KINDS, k=max(0, count - len(KINDS)))
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.1 * duration, 0.8 * duration) for _ in kinds)
    return [Fault(at, kind, "broker" if kind == BROKER else rng.choice(codes))
            for at, kind in zip(times, kinds, strict=True)]


async def apply(fault: Fault, rng: random.Random, nodes: dict[str, NodeProcess],
                broker: LocalBroker, soak: Soak) -> None:
    started = time.monotonic()
    if fault.kind == BROKER:
        await asyncio.to_thread(broker.restart)
    else:
        node = nodes[fault.target]
        if fault.kind == KILL:
            node.kill()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
        else:
            code = await asyncio.to_thread(node.terminate)
            soak.exit_codes.setdefault(fault.target, []).append(code)
            if code != 0:
                fault.outcome = f"exit {code} after SIGTERM"
        node.start()
        await asyncio.to_thread(node.wait_started)
    fault.seconds = time.monotonic() - started


async def run(args: argparse.Namespace, base: Path) -> tuple[Report, Soak]:
    codes = tuple(p.code for p in PARTICIPANTS[:args.participants])
    rng = random.Random(args.seed)
    rate = args.certificates / (0.8 * args.duration)  # the trade spans the fault window
    shipments = plan_trade(codes, args.certificates, rate=rate, confirm_delay=1.0,
                           discrepancy_share=0.05, seed=args.seed)
    report = Report(codes=codes, mode="soak", options={
        "duration": args.duration, "faults": args.faults, "seed": args.seed, "rate": rate})
    soak = Soak()
    began = time.monotonic()
    broker = LocalBroker(base / "broker")
    await asyncio.to_thread(broker.start)
    nodes: dict[str, NodeProcess] = {}
    desks: dict[str, Desk] = {}
    try:
        network = create_network(base / "network", codes, [broker.url])
        nodes = {c: NodeProcess(cfg.directory) for c, cfg in network.configs.items()}
        for node in nodes.values():
            node.start()
        for node in nodes.values():
            await asyncio.to_thread(node.wait_started)
        desks = {c: Desk(Node.open(cfg), *desk_plan(c, shipments))
                 for c, cfg in network.configs.items()}
        start_at = now_ms() + 200
        for desk in desks.values():
            desk.start(start_at)
        window_start = time.monotonic()
        for fault in schedule(rng, args.faults, args.duration, codes):
            await asyncio.sleep(max(0.0, window_start + fault.at - time.monotonic()))
            fault.at = time.monotonic() - window_start
            log(args, f"{fault.at:6.1f} s  {fault.kind} {fault.target}")
            await apply(fault, rng, nodes, broker, soak)
            soak.faults.append(fault)
        await asyncio.sleep(max(0.0, window_start + args.duration - time.monotonic()))
        deadline = time.monotonic() + args.timeout
        stores = {c: d.node.store for c, d in desks.items()}
        while time.monotonic() < deadline:
            if count_progress(stores)[3] >= len(shipments):
                soak.finished = True
                break
            await asyncio.sleep(0.5)
    finally:
        for desk in desks.values():
            await desk.stop()
            desk.node.close()
        for code, node in nodes.items():
            if node.running:
                with contextlib.suppress(NodeProcessError):
                    soak.exit_codes.setdefault(code, []).append(
                        await asyncio.to_thread(node.terminate))
            node.close()
        await asyncio.to_thread(broker.close)
    soak.wall_seconds = time.monotonic() - began

    with contextlib.ExitStack() as stack:
        stores = {c: stack.enter_context(contextlib.closing(Store(cfg.database_path)))
                  for c, cfg in network.configs.items()}
        analyse(report, stores, shipments)
    for code, desk in desks.items():
        for refused in desk.stats.refused:
            report.fail(f"{code}: {refused}")
    for code, cfg in network.configs.items():
        done = subprocess.run([sys.executable, "-m", "node.cli", "verify-log", "--dir",
                               str(cfg.directory), "--json"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            report.fail(f"{code}: verify-log failed: {done.stdout.strip() or done.stderr}")
    for code, exits in soak.exit_codes.items():
        if any(e != 0 for e in exits):
            report.fail(f"{code}: SIGTERM exit codes {exits}")
    for fault in soak.faults:
        if fault.outcome != "ok":
            report.fail(f"{fault.kind} {fault.target}: {fault.outcome}")
    if not soak.finished:
        report.fail(f"loops still open {args.timeout:.0f} s after the fault window")
    return report, soak


def log(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"soak: {text}", file=sys.stderr, flush=True)


def summary(report: Report, soak: Soak) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "participants": list(report.codes),
        "certificates": {"planned": report.planned, "issued": report.issued,
                         "loops_closed": report.closed, "open": report.open,
                         "with_discrepancies": report.discrepancies},
        "faults": [{"at_s": round(f.at, 1), "kind": f.kind, "target": f.target,
                    "seconds": round(f.seconds, 1), "outcome": f.outcome}
                   for f in soak.faults],
        "wall_seconds": round(soak.wall_seconds, 1),
        "failures": report.failures, "failure_count": report.failure_count,
    }


def format_summary(data: dict[str, Any]) -> str:
    c = data["certificates"]
    lines = [f"kpx soak: {len(data['participants'])} Participants, {c['planned']:,} "
             f"certificates, {len(data['faults'])} faults, {data['wall_seconds']:.0f} s",
             "", "     at  fault            target   took  outcome"]
    lines += [f"  {f['at_s']:5.1f}s  {f['kind']:<15}  {f['target']:<7}  {f['seconds']:4.1f}s  "
              f"{f['outcome']}" for f in data["faults"]]
    lines += ["", f"  issued {c['issued']:,}  loops closed {c['loops_closed']:,}  "
              f"still open {c['open']:,}  with discrepancies {c['with_discrepancies']:,}", ""]
    if data["ok"]:
        lines.append("invariants OK: every loop closed once, both sides equal, evidence "
                     "chains verified, clean SIGTERM exits")
    else:
        lines.append(f"invariants FAILED ({data['failure_count']}):")
        lines += [f"  {f}" for f in data["failures"]]
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=int, default=4,
                   help=f"nodes, 2 to {MAX_PARTICIPANTS} (default 4)")
    p.add_argument("--certificates", type=int, default=1_000,
                   help="certificates issued over the fault window (default 1,000)")
    p.add_argument("--duration", type=float, default=120.0, metavar="SECONDS",
                   help="length of the fault window, the trade spread over it (default 120)")
    p.add_argument("--faults", type=int, default=8, help="faults to apply (default 8)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="wait at most this long after the window for open loops (default 120)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--keep", help="keep the broker's and nodes' directories here")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if not 2 <= args.participants <= MAX_PARTICIPANTS:
        p.error(f"--participants must be between 2 and {MAX_PARTICIPANTS}")
    if args.certificates < 1 or args.faults < 0:
        p.error("--certificates must be at least 1 and --faults not negative")
    if args.duration <= 0 or args.timeout <= 0:
        p.error("--duration and --timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    configure_logging(level="ERROR")  # the desks' Node objects log here; the nodes to files
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())  # the broker and nodes stop on SIGTERM too
        if args.keep:
            base = Path(args.keep)
            base.mkdir(parents=True, exist_ok=True)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kpx-soak-")))
        try:
            report, soak = asyncio.run(run(args, base))
        except (BrokerError, NodeProcessError) as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 3
    data = summary(report, soak)
    print(json.dumps(data, indent=2) if args.json else format_summary(data))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
