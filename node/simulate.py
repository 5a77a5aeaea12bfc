"""``kpnode simulate``: a network of Participants trading rough diamonds on one broker.

The simulation provisions a Chair, N nodes and a signed registry (:func:`node.network.
create_network`), starts every node — by default each in its own OS process
(:mod:`node.simworker`), or all in this process with ``--in-process`` — and lets each
Participant's *desk* (:mod:`node.desk`: its authority's staff, a coroutine next to the
node) issue its planned certificates on time and confirm each arriving shipment after a
random delay, a configurable share of them with a discrepancy (a parcel short, carats or
value off).

The trade has the shape of the Kimberley Process' (design brief §1): a few trading hubs
(the EU, the UAE, India, Israel ...) and producers (Botswana, Russia, South Africa ...)
carry most of it, many small partners a little; a year's world volume is on the order of
60,000 certificates averaging about 2,800 carats and US$ 500,000 each. ``--certificates``
draws that many from the same distribution (:mod:`node.trade`), issued at ``--rate`` per
second.

At the end it reads every node's own records and evidence log and checks the invariants:
every certificate's loop is closed as planned (the plan confirms every one, so a loop
rejected, cancelled or still open when the wait ends is a failure, and so is one whose
issue or confirmation its node refused: the wait ends without it, since nothing in the
plan would close it), each certificate issued is the planned one, both sides hold equal
records and the same signed frames, the discrepancies are the planned ones on both
sides, and the mirror statistics of every pair of partners agree (:mod:`node.simreport`).
It prints a report (``--json`` for machines) and exits 1 when an invariant fails.

Latency (issue → receipt, issue → confirmation) is timed from each certificate's planned
instant — the run's start instant plus the certificate's planned offset — to when the
exporter's node committed the answer (its desk hears each commit: the evidence's stamp is
the start of the batch, before its other messages and the fsync), so the time a
certificate waited for its desk to wake and for the node's other work (most in bursts)
counts. The start instant is chosen here, sent to every desk (``{"start_at_ms": T}`` to
a node process) and given to the analysis; nodes commit and stamp their evidence by the
same wall clock (:func:`node.service.now_ms`) on the same machine. A certificate its desk
issued before its planned instant is timed from its issue, so no latency is negative.
``planned → issue`` is the desk's lag alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from node.desk import (
    Answered,
    Desk,
    RefusedCommand,
    desk_plan,
    read_answered,
    write_answered,
    write_desk_plan,
)
from node.interrupt import sigterm_as_interrupt
from node.machine import OPEN_STATES, Side, State
from node.network import LocalNetwork, create_network
from node.service import now_ms
from node.simreport import Report, analyse, format_report, peak_rss_kib
from node.store import Store, StoreError, UnreadableRecord
from node.trade import MAX_PARTICIPANTS, PARTICIPANTS, Shipment, plan_trade
from protocol.schema import PARTICIPANT_CODE

log = structlog.get_logger("kpx.simulate")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Bounds on a simulation's size and pace: beyond them the plan alone would take hours to
# build or days to run, which is a typo rather than a wish. A million certificates is
# some sixteen years of the world's trade.
MAX_CERTIFICATES = 1_000_000
MAX_PLAN_SECONDS = 7 * 86_400
MAX_CONFIRM_DELAY = 3_600

# -- running the nodes ----------------------------------------------------------------


class SimulationError(Exception):
    """The simulation could not run (a node did not start, a worker died ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    participants: int = 10
    certificates: int = 1_000
    #: explicit Participant codes (overrides ``participants``); tests use codes of their own
    codes: tuple[str, ...] | None = None
    in_process: bool = False
    #: certificates per second over the whole network; 0 issues all at once
    rate: float = 200.0
    #: mean seconds between a certificate's arrival and its import confirmation
    confirm_delay: float = 1.0
    discrepancy_share: float = 0.05
    seed: int = 1
    #: give up waiting for open loops after this many seconds (default: from the plan)
    timeout: float | None = None
    progress: bool = True
    #: node log level (per-process nodes log to DIR/CODE/node.log)
    log_level: str = "WARNING"
    #: keep the network's directories here (default: a temporary directory)
    directory: Path | None = None
    #: the directories reading the options made for ``directory`` (it, and any parents that
    #: were missing), outermost first: a run that fails before it writes there removes them
    made_directories: tuple[Path, ...] = ()

    def chosen_codes(self) -> tuple[str, ...]:
        if self.codes is not None:
            bad = [c for c in self.codes if not PARTICIPANT_CODE.fullmatch(c)]
            if bad:
                raise ValueError(f"--codes: {', '.join(map(repr, bad))} is not a two-letter "
                                 "Participant code")
            repeated = sorted({c for c in self.codes if self.codes.count(c) > 1})
            if repeated:
                raise ValueError(f"--codes: {', '.join(repeated)} given more than once")
            if not 2 <= len(self.codes) <= MAX_PARTICIPANTS:
                raise ValueError(f"--codes must name between 2 and {MAX_PARTICIPANTS} "
                                 "Participants")
            return tuple(self.codes)
        if not 2 <= self.participants <= MAX_PARTICIPANTS:
            raise ValueError(f"--participants must be between 2 and {MAX_PARTICIPANTS}")
        return tuple(p.code for p in PARTICIPANTS[:self.participants])


class Nodes:
    """The running nodes of a simulation, in one process or one process each."""

    def __init__(self, network: LocalNetwork, shipments: Sequence[Shipment],
                 options: Options) -> None:
        self.network = network
        self.shipments = shipments
        self.options = options
        self.stores: dict[str, Store] = {}
        self.peak_rss_kib: dict[str, int] = {}
        #: CPU seconds (user + system) each node process used, from its own report
        self.cpu_seconds: dict[str, float] = {}
        self.desk_stats: dict[str, dict[str, Any]] = {}
        #: per node, when it committed each receipt and confirmation of its exports
        self.answered: dict[str, dict[str, Answered]] = {}
        self.process_peak_rss_kib: int | None = None

    async def start(self) -> None:
        raise NotImplementedError

    def refused(self) -> dict[str, RefusedCommand]:
        """Per loop (its certificate's number), the desk's command for it that a node
        refused so far: that loop will not close, and the run need not wait for it."""
        raise NotImplementedError

    def begin(self, start_at_ms: int) -> None:
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raise SimulationError when a node died."""
        failed = [f"{code}: {desk.failure}" for code, desk in
                  getattr(self, "desks", {}).items() if desk.failure is not None]
        if failed:
            raise SimulationError(f"a desk stopped working: {'; '.join(failed)}")

    async def stop(self) -> None:
        raise NotImplementedError


class InProcessNodes(Nodes):
    """Every node a :class:`~node.runner.RunningNode` in this process's event loop."""

    async def start(self) -> None:
        from node.runner import RunningNode

        self.running: dict[str, RunningNode] = {}
        self.desks: dict[str, Desk] = {}
        for code, config in self.network.configs.items():
            running = RunningNode(config)
            try:
                await running.start()
            except Exception as exc:  # as one line, like a node process that exits
                raise SimulationError(f"node {code} did not start: "
                                      f"{exc or type(exc).__name__}") from exc
            self.running[code] = running
            assert running.node is not None
            self.stores[code] = running.node.store
            self.desks[code] = Desk(running.node, *desk_plan(code, self.shipments))

    def begin(self, start_at_ms: int) -> None:
        for desk in self.desks.values():
            desk.start(start_at_ms)

    def refused(self) -> dict[str, RefusedCommand]:
        return {r.number: r for desk in getattr(self, "desks", {}).values()
                for r in desk.stats.refused}

    async def stop(self) -> None:
        for desk in getattr(self, "desks", {}).values():
            await desk.stop()
        for code, running in getattr(self, "running", {}).items():
            await running.stop()
            self.desk_stats[code] = self.desks[code].stats.to_json() if code in self.desks \
                else {}
            if code in self.desks:
                self.answered[code] = self.desks[code].answered
                # beside the store, as a node process leaves it: a kept network gives the
                # report's figures again (start_at_ms, these), whichever the mode. This
                # run's analysis has them in memory, so a file it cannot write fails nothing.
                with contextlib.suppress(OSError):
                    write_answered(self.network.configs[code].directory, self.answered[code])
        self.process_peak_rss_kib = peak_rss_kib(os.getpid())  # one process, every node
        self.stores = {}


class ProcessNodes(Nodes):
    """Every node in its own OS process (:mod:`node.simworker`), each with its desk."""

    START_TIMEOUT = 120.0
    STOP_TIMEOUT = 60.0

    async def start(self) -> None:
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        #: per node process, the task reading what it says after "ready" (:meth:`_listen`)
        self.listeners: dict[str, asyncio.Task[None]] = {}
        self._refused: dict[str, RefusedCommand] = {}
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "KPX_LOG_LEVEL": self.options.log_level,
               "KPX_LOG_FORMAT": "json",
               "PYTHONPATH": os.pathsep.join(filter(None, [root,
                                                          os.environ.get("PYTHONPATH")]))}
        for code, config in self.network.configs.items():
            write_desk_plan(config.directory, code, self.shipments)
            with (config.directory / "node.log").open("ab") as logfile:
                self.procs[code] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "node.simworker", "--dir", str(config.directory),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=logfile, env=env)
        try:
            async with asyncio.timeout(self.START_TIMEOUT):
                for code in self.procs:
                    reply = await self._read(code)
                    if reply.get("event") != "ready":
                        raise SimulationError(f"node {code} did not start: {reply}")
        except TimeoutError:
            raise SimulationError("nodes did not start within "
                                  f"{self.START_TIMEOUT:.0f} s") from None
        for code, config in self.network.configs.items():
            self.stores[code] = Store(config.database_path)
        for code in self.procs:
            self.listeners[code] = asyncio.create_task(self._listen(code),
                                                       name=f"listen-{code}")

    async def _listen(self, code: str) -> None:
        """Read what node process ``code`` says until it is done: its desk's refused
        commands as they happen, then its final counts. All along, since a process whose
        stdout pipe is full would block in the middle of its work."""
        while True:
            try:
                reply = await self._read(code)
            except SimulationError:
                return  # it ended without "done": check_alive and stop say how
            if reply.get("event") == "refused":
                refused = RefusedCommand.from_json(reply)
                self._refused.setdefault(refused.number, refused)
            elif reply.get("event") == "done":
                self.desk_stats[code] = reply.get("desk", {})
                self.peak_rss_kib.setdefault(code, int(reply.get("peak_rss_kib") or 0))
                if reply.get("cpu_seconds") is not None:
                    self.cpu_seconds[code] = float(reply["cpu_seconds"])
                return

    def refused(self) -> dict[str, RefusedCommand]:
        return dict(getattr(self, "_refused", {}))

    async def _read(self, code: str) -> dict[str, Any]:
        proc = self.procs[code]
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            await proc.wait()
            raise SimulationError(f"node {code} exited ({proc.returncode}): "
                                  + self._log_tail(code))
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _send(self, code: str, message: dict[str, Any]) -> None:
        stdin = self.procs[code].stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write((json.dumps(message) + "\n").encode())

    def begin(self, start_at_ms: int) -> None:
        for code in self.procs:
            self._send(code, {"start_at_ms": start_at_ms})

    @staticmethod
    def _ended(returncode: int) -> str:
        if returncode < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-returncode).name}"
        if returncode == 0:  # it stops cleanly only when told to: by a signal, then
            return "exit status 0: stopped by a signal from outside"
        return f"exit status {returncode}"

    def _log_tail(self, code: str, lines: int = 5) -> str:
        """Why a node's process ended, from its log (deleted with the network): its last
        error, else the log's last lines."""
        log_path = self.network.configs[code].directory / "node.log"
        try:
            written = log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in written if '"level": "error"' in line]
        return errors[-1] if errors else (" | ".join(written[-lines:]) or "(nothing logged)")

    def check_alive(self) -> None:
        dead = [f"{code} ({self._ended(p.returncode)}): {self._log_tail(code)}"
                for code, p in self.procs.items() if p.returncode is not None]
        if dead:
            raise SimulationError(f"node process(es) exited early: {'; '.join(dead)}")

    async def stop(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores = {}
        procs = getattr(self, "procs", {})
        self.listeners = getattr(self, "listeners", {})
        for code, proc in procs.items():
            if proc.returncode is None:
                peak = peak_rss_kib(proc.pid)
                if peak is not None:
                    self.peak_rss_kib[code] = peak
            self._send(code, {"stop": True})
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()

        async def finish(code: str, proc: asyncio.subprocess.Process) -> None:
            # a process that did not get to "ready" (start failed part-way) has no listener
            listener = self.listeners.get(code) or asyncio.create_task(self._listen(code))
            try:
                async with asyncio.timeout(self.STOP_TIMEOUT):
                    await listener
                    await proc.wait()
            except TimeoutError:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

        await asyncio.gather(*(finish(c, p) for c, p in procs.items()))
        for code in procs:
            self.answered[code] = read_answered(self.network.configs[code].directory)
        failed = {c: p.returncode for c, p in procs.items() if p.returncode != 0}
        if failed:
            log.warning("node processes did not exit cleanly", returncodes=failed)
            self.unclean = failed


# -- progress -------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    WIDTH = 30

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._last_line = 0.0
        self._last_text = ""

    def update(self, issued: int, receipted: int, closed: int, refused: int = 0,
               final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        if not self.tty and not final and elapsed - self._last_line < 5.0:
            return
        self._last_line = elapsed
        done = closed / self.total if self.total else 1.0
        bar = "#" * int(done * self.WIDTH)
        text = (f"[{bar:<{self.WIDTH}}] {closed:,}/{self.total:,} loops closed  "
                f"issued {issued:,}  receipts {receipted:,}  "
                + (f"refused {refused:,}  " if refused else "") + f"{elapsed:5.1f} s")
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
        elif text != self._last_text:
            sys.stderr.write(text + "\n")
        self._last_text = text
        sys.stderr.flush()


def count_progress(stores: Mapping[str, Store]) -> tuple[int, int, int, int]:
    """(issued, receipted, closed, finished) summed over the exporters' own counts."""
    issued = receipted = closed = finished = 0
    for store in stores.values():
        for (side, state), n in store.counts().items():
            if side != str(Side.EXPORT):
                continue
            issued += n
            if state in (State.DELIVERED, State.CONFIRMED):
                receipted += n
            if state == State.CONFIRMED:
                closed += n
            if state not in {str(s) for s in OPEN_STATES}:
                finished += n
    return issued, receipted, closed, finished


def stuck(refused: Mapping[str, RefusedCommand], stores: Mapping[str, Store],
          exporters: Mapping[str, str]) -> int:
    """The planned loops a refused command left where nothing in the plan moves them on:
    never issued, or still open at their exporter. Counted once: a refused loop that
    finished after all (expired, say) is among ``finished`` already, and a refusal for a
    number nobody planned is no planned loop."""
    count = 0
    for number in refused:
        exporter = exporters.get(number)
        if exporter is None:
            continue
        record = stores[exporter].get(Side.EXPORT, number)
        if record is None or record.state in OPEN_STATES:
            count += 1
    return count


# -- the simulation -----------------------------------------------------------------------


def _elsewhere(other_codes: bool) -> str:
    """Where else to run: the bench, which has no --codes, says so without them."""
    return "on a broker (or vhost) of its own" + (" or with other --codes" if other_codes
                                                 else "")


async def check_broker_free(broker_urls: Sequence[str], codes: Sequence[str], *,
                            other_codes: bool = True) -> None:
    """Say at once (:class:`SimulationError`) that no broker answers, or that the
    Participants' queues there are in use: a simulation would take a real network's
    messages, or mix with an interrupted run's."""
    from node.brokerclient import occupied_queues
    from node.transport import TransportUnavailable, dead_letter_queue, inbox_queue

    try:
        busy = await occupied_queues(broker_urls, [
            name for code in codes for name in (inbox_queue(code), dead_letter_queue(code))])
    except TransportUnavailable as exc:
        raise SimulationError(str(exc)) from None
    if busy:
        raise SimulationError(
            f"queues in use on this broker: {'; '.join(busy)}. A simulation would take their "
            f"messages: run it {_elsewhere(other_codes)}, or, if they are left from an "
            "interrupted run, delete them (rabbitmqctl delete_queue NAME)")


async def _declare_queues(broker_urls: Sequence[str], codes: Sequence[str],
                          created: list[str], *, other_codes: bool = True) -> None:
    """Declare the Participants' queues as their nodes will, adding to ``created`` those
    that did not exist before (as it goes: a refusal or an interrupt half-way must not
    leave the first ones behind). A queue left with other arguments (another tool's, an
    older kpx's) made every node retry for 60 s and then fail with 'no broker answered':
    said at once instead, with the broker's words."""
    from aiormq.exceptions import ChannelPreconditionFailed

    from node.brokerclient import amqp_library_logs_quiet, connect_any, queue_info
    from node.config import DEFAULT_DELIVERY_LIMIT
    from node.transport import (
        TransportUnavailable,
        dead_letter_queue,
        declare_topology,
        inbox_queue,
    )

    try:
        with amqp_library_logs_quiet():
            connection, _ = await connect_any(broker_urls)
    except TransportUnavailable as exc:
        raise SimulationError(str(exc)) from None
    async with connection:
        for code in codes:
            for name in (inbox_queue(code), dead_letter_queue(code)):
                if await queue_info(connection, name) is None:
                    created.append(name)
            channel = await connection.channel()  # a refused declare closes its channel
            try:
                await declare_topology(channel, code, DEFAULT_DELIVERY_LIMIT)
            except ChannelPreconditionFailed as exc:
                raise SimulationError(
                    f"a queue of {code} exists on this broker with other settings than kpx "
                    f"gives it ({exc.args[0] if exc.args else exc}): run the simulation "
                    f"{_elsewhere(other_codes)}, or delete that queue (rabbitmqctl "
                    "delete_queue NAME)") from None
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()


async def _delete_queues(broker_urls: Sequence[str], names: Sequence[str]) -> None:
    """Delete the queues this run created, with whatever an interrupted run left in them
    (the next run would refuse a broker where they hold messages); best effort, briefly.

    In a thread with an event loop of its own: an interrupt that lands while it runs
    cancels every task of the command's loop, this one's too, and the queues stayed.
    ``asyncio.run`` waits for the thread as it closes, so the deletion finishes."""
    from node.brokerclient import amqp_library_logs_quiet, connect_any

    async def delete() -> None:
        with amqp_library_logs_quiet():
            connection, _ = await connect_any(broker_urls)
        async with connection:
            for name in names:
                with contextlib.suppress(Exception):  # each on its own: a failure closes
                    channel = await connection.channel()  # its channel
                    await channel.queue_delete(name)

    def in_a_loop_of_its_own() -> None:
        with contextlib.suppress(Exception):
            asyncio.run(asyncio.wait_for(delete(), 10))

    if names:
        # A future, not a task: the interrupt cancels every task, and this one must be
        # waited for all the same, within the caller's claim on the Participants (another
        # simulation let in meanwhile would have an inbox deleted under it).
        deleting = asyncio.get_running_loop().run_in_executor(None, in_a_loop_of_its_own)
        try:
            await asyncio.shield(deleting)
        except asyncio.CancelledError:
            await asyncio.wait({deleting})
            raise


async def run_simulation(options: Options, broker_urls: Sequence[str], *,
                         claim: bool = True) -> Report:
    """Run one simulation on the broker at ``broker_urls`` and return its report.
    ``claim=False``: the caller holds :func:`claimed` for these Participants over several
    runs (the bench, which deletes their queues between runs, and has no --codes)."""
    codes = options.chosen_codes()
    async with contextlib.AsyncExitStack() as stack:
        if claim:
            await stack.enter_async_context(claimed(broker_urls, codes))
        await check_broker_free(broker_urls, codes, other_codes=claim)
        created: list[str] = []
        try:
            await _declare_queues(broker_urls, codes, created, other_codes=claim)
            return await _simulate(options, codes, broker_urls)
        finally:
            # Kept networks too: an interrupted run's queues hold messages, and the next
            # run would refuse this broker. A kept node started later declares its own.
            await _delete_queues(broker_urls, created)


@contextlib.asynccontextmanager
async def claimed(broker_urls: Sequence[str], codes: Sequence[str], *,
                  other_codes: bool = True, who: str = "kpnode simulate"
                  ) -> AsyncIterator[None]:
    """Two simulations started together on one broker both found the queues free, then
    took each other's messages: each holds an exclusive claim per Participant instead."""
    from node.brokerclient import ClaimTaken, exclusive_claim
    from node.transport import TransportUnavailable

    try:
        async with exclusive_claim(broker_urls,
                                   [f"kpx.simulation.{c}" for c in codes]) as unclaimed:
            if unclaimed:
                print(f"{who}: warning: this broker user may not declare "
                      f"{unclaimed[0]} (ACCESS_REFUSED), so another simulation started on "
                      "this broker meanwhile would not be refused", file=sys.stderr)
            yield
    except ClaimTaken as exc:
        held = ", ".join(name.rsplit(".", 1)[1] for name in exc.args[0])
        raise SimulationError(f"another simulation is running on this broker with "
                              f"{held}: run this one {_elsewhere(other_codes)}, or after "
                              "it") from None
    except TransportUnavailable as exc:
        raise SimulationError(str(exc)) from None


async def _simulate(options: Options, codes: tuple[str, ...],
                    broker_urls: Sequence[str]) -> Report:
    shipments = plan_trade(codes, options.certificates, rate=options.rate,
                           confirm_delay=options.confirm_delay,
                           discrepancy_share=options.discrepancy_share, seed=options.seed)
    report = Report(codes=codes, mode="in-process" if options.in_process else "process",
                    options={"rate": options.rate, "confirm_delay": options.confirm_delay,
                             "discrepancy_share": options.discrepancy_share,
                             "seed": options.seed})
    with contextlib.ExitStack() as stack:
        if options.directory is not None:
            base = options.directory
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kpx-sim-")))
        network = create_network(base, codes, broker_urls)
        nodes: Nodes = (InProcessNodes if options.in_process else ProcessNodes)(
            network, shipments, options)
        started = time.monotonic()
        try:
            await nodes.start()
            start_at = await _run(nodes, shipments, options)
        finally:
            await nodes.stop()
        report.wall_seconds = time.monotonic() - started
        stores = _open_for_analysis(network, stack)
        try:
            analyse(report, stores, shipments, start_at, answered=nodes.answered,
                    refused=nodes.refused())
        except (StoreError, UnreadableRecord, sqlite3.DatabaseError) as exc:
            raise SimulationError(f"the nodes' records cannot be read after the run: "
                                  f"{exc}") from None
        for code in codes:
            node = report.nodes.setdefault(code, {})
            peak = nodes.peak_rss_kib.get(code)
            node["peak_rss_mib"] = None if peak is None else round(peak / 1024, 1)
            cpu = nodes.cpu_seconds.get(code)
            node["cpu_seconds"] = None if cpu is None else round(cpu, 2)
            node["desk"] = nodes.desk_stats.get(code, {})  # refusals: failed in analyse
        if nodes.process_peak_rss_kib is not None:
            report.process_peak_rss_mib = round(nodes.process_peak_rss_kib / 1024, 1)
        for code, returncode in getattr(nodes, "unclean", {}).items():
            report.fail(f"node process {code} exited with {returncode}", cause=True)
    return report


def _open_for_analysis(network: LocalNetwork, stack: contextlib.ExitStack
                       ) -> dict[str, Store]:
    """Every node's store, each record and evidence entry read once to say which node holds
    one kpx cannot read: a database damaged, or a row changed outside kpx, ended the run in
    a traceback (and printed nothing on stdout for --json). The evidence log too: damaged
    pages of it, the records intact, failed in the analysis without naming the node."""
    stores = {}
    for code, config in network.configs.items():
        try:
            # never made anew: an empty store, created here, would fail the check unnamed
            store = stack.enter_context(contextlib.closing(
                Store(config.database_path, create=False)))
            store.records()
            for _ in store.evidence():  # read through, as the analysis will
                pass
        except (StoreError, UnreadableRecord, sqlite3.DatabaseError) as exc:
            raise SimulationError(f"node {code}'s records cannot be read after the run: "
                                  f"{exc}") from None
        stores[code] = store
    return stores


async def _run(nodes: Nodes, shipments: Sequence[Shipment], options: Options) -> int:
    """Start the desks, wait until every loop is finished or refused (or the timeout);
    returns the instant the desks started the plan from."""
    total = len(shipments)
    last_at = max((s.at_ms for s in shipments), default=0) / 1000
    longest_delay = max((s.confirm_delay_ms for s in shipments), default=0) / 1000
    timeout = options.timeout or (60.0 + 2 * last_at + longest_delay + total / 100)
    # The plan's start instant, on the wall clock every node process of this machine
    # shares: the desks issue from it, and the analysis times latency from it.
    start_at = now_ms() + 200
    nodes.begin(start_at)
    progress = Progress(total, options.progress)
    deadline = time.monotonic() + timeout
    exporters = {s.number: s.exporter for s in shipments}
    while True:
        await asyncio.sleep(0.25)
        nodes.check_alive()
        issued, receipted, closed, finished = count_progress(nodes.stores)
        # A refused loop stays where the refusal left it (an issue refused leaves no
        # record, a confirmation refused leaves it delivered): nothing in the plan moves
        # it on, so it is accounted for, not waited for until the timeout.
        refused = len(nodes.refused())
        progress.update(issued, receipted, closed, refused)
        if finished + stuck(nodes.refused(), nodes.stores, exporters) >= total:
            if refused:
                log.warning("commands refused: their loops will not close", refused=refused)
            break
        if time.monotonic() > deadline:
            log.warning("simulation timed out with loops open",
                        open=total - finished - refused, timeout=timeout)
            break
    progress.update(issued, receipted, closed, refused, final=True)
    return start_at


# -- the command line -----------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--participants", type=int,
                   help=f"number of Participants, 2 to {MAX_PARTICIPANTS} (default 10)")
    p.add_argument("--codes", help="comma-separated Participant codes (instead of "
                   "--participants)")
    p.add_argument("--certificates", type=int, default=1_000,
                   help="certificates to issue in all (a year's world volume is ~60,000; "
                   "default 1,000)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="certificates issued per second over the network; 0 issues all at "
                   "once (default 200)")
    p.add_argument("--confirm-delay", type=float, default=1.0, metavar="SECONDS",
                   help="mean delay between a certificate's arrival and its import "
                   "confirmation (exponential; default 1.0)")
    p.add_argument("--discrepancies", type=float, default=0.05, metavar="SHARE",
                   help="share of shipments that arrive with a discrepancy (default 0.05)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the trade (default 1)")
    p.add_argument("--in-process", action="store_true",
                   help="run every node in this process (default: one OS process per node)")
    p.add_argument("--broker", help="AMQP URL (default: $KPX_AMQP_URL, else a throwaway "
                   "local broker)")
    p.add_argument("--keep", help="keep the network's directories (and node logs) here")
    p.add_argument("--timeout", type=float, help="seconds to wait for open loops (default: "
                   "enough for the plan)")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                   help="node log level (default WARNING)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable report")


def check_new_directory(text: str, option: str, made: list[Path] | None = None) -> Path:
    """The directory for a network's keys, stores and logs, made if need be: it must be
    new or empty, since a file there or an earlier run's network would be mixed with the
    new one, and writable (ValueError saying which). Made here, not when the network is
    written, so that a path that cannot be one is said before anything starts; ``made``
    gets the directories made (outermost first), for :func:`remove_left_empty`."""
    if not text.strip():
        raise ValueError(f"{option} is empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{option} {path} is not empty (an earlier run's network?); "
                         "give a new or empty directory")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot make it ({exc.strerror})") from None
    if made is not None:
        made.extend(reversed(missing))
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: not writable")
    return path


def remove_left_empty(made: Sequence[Path]) -> None:
    """Remove the directories :func:`check_new_directory` made for a run that left them
    empty (a broker that did not answer: the network was never written), innermost first.
    Only empty ones, which ``rmdir`` alone removes, so nothing written there is lost; and
    never one the user had before the run."""
    for directory in reversed(made):
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (the network, or something put there meanwhile): it stays


def check_broker_choice(option: str | None) -> None:
    """``--broker``, else ``KPX_AMQP_URL``, must be a usable AMQP URL when given
    (ValueError saying which, password masked); neither given means a throwaway broker."""
    from node.brokerurl import broker_url_problem
    from node.localbroker import ENV_URL

    if option is not None:
        named, url = "--broker", option
    else:
        named, url = ENV_URL, os.environ.get(ENV_URL, "").strip()
        if not url:
            return
    if (problem := broker_url_problem(url)) is not None:
        raise ValueError(f"{named}: {problem}")


def options_from(args: argparse.Namespace) -> Options:
    codes = (None if args.codes is None
             else tuple(c.strip().upper() for c in args.codes.split(",")))
    if codes is not None and args.participants is not None \
            and args.participants != len(codes):
        raise ValueError(f"--participants {args.participants} but --codes names "
                         f"{len(codes)}: give one of them")
    if not 1 <= args.certificates <= MAX_CERTIFICATES:
        raise ValueError(f"--certificates must be between 1 and {MAX_CERTIFICATES:,}")
    if not 0 <= args.discrepancies <= 1:
        raise ValueError("--discrepancies is a share between 0 and 1")
    for option, value in (("--rate", args.rate), ("--confirm-delay", args.confirm_delay)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{option} must be a finite number, 0 or more")
    if args.rate > 0 and args.certificates / args.rate > MAX_PLAN_SECONDS:
        raise ValueError(f"{args.certificates:,} certificates at --rate {args.rate:g} would "
                         f"take over {MAX_PLAN_SECONDS // 86400} days; raise --rate")
    if args.confirm_delay > MAX_CONFIRM_DELAY:
        raise ValueError(f"--confirm-delay is at most {MAX_CONFIRM_DELAY} seconds")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError("--timeout must be a number of seconds above 0")
    check_broker_choice(args.broker)
    options = Options(participants=10 if args.participants is None else args.participants,
                      certificates=args.certificates,
                      codes=codes, in_process=args.in_process, rate=args.rate,
                      confirm_delay=args.confirm_delay, discrepancy_share=args.discrepancies,
                      seed=args.seed, timeout=args.timeout, progress=not args.no_progress,
                      log_level=args.log_level.upper())
    options.chosen_codes()  # validates the count
    if args.keep is None:
        return options
    # Last, once every other option is known good: a refused one left it made and empty.
    made: list[Path] = []
    keep = check_new_directory(args.keep, "--keep", made)
    return dataclasses.replace(options, directory=keep, made_directories=tuple(made))


def cmd_simulate(args: argparse.Namespace) -> None:
    from node.localbroker import BrokerError, broker_url
    from node.terminal import fail

    try:
        options = options_from(args)
    except ValueError as exc:
        fail(args, 2, str(exc), prog="kpnode simulate")
    try:
        with sigterm_as_interrupt(), _broker(args.broker, broker_url) as url:
            report = asyncio.run(run_simulation(options, [url]))
            # printed before the broker stops: should stopping it fail, the report stands
            print(json.dumps(report.to_json(), indent=2) if args.json
                  else format_report(report), flush=True)
            if options.directory is not None:
                print(f"kpnode simulate: the network (node directories, stores, logs) is "
                      f"kept in {options.directory}", file=sys.stderr)
    except (SimulationError, BrokerError) as exc:
        fail(args, 3, str(exc), prog="kpnode simulate")
    finally:
        # --keep made for a run that failed (or was interrupted) before writing anything
        remove_left_empty(options.made_directories)
    raise SystemExit(0 if report.ok else 1)


@contextlib.contextmanager
def _broker(url: str | None, harness: Callable[[], contextlib.AbstractContextManager[str]]
            ) -> Iterator[str]:
    if url is not None:
        yield url
    else:
        with harness() as found:
            yield found


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    """Add ``kpnode simulate`` to the CLI's subcommands. (``common``'s --dir means a node
    directory, which a whole network has not, so the command takes its own options.)"""
    help_ = "run a network of Participants trading on one broker; report and check it"
    sp = sub.add_parser("simulate", help=help_, description=help_)
    add_arguments(sp)
    sp.set_defaults(handler=cmd_simulate)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m node.simulate``: the same as ``kpnode simulate``."""
    from node.logs import configure_logging

    p = argparse.ArgumentParser(prog="kpnode simulate", description=main.__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    configure_logging(level="WARNING")
    try:
        cmd_simulate(args)
    except KeyboardInterrupt:  # as kpnode's main says it
        print("kpnode simulate: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
