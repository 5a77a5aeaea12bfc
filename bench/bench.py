"""kpx benchmark: the raw broker ceiling and kpx closed loops per second, in one run.

    .venv/bin/python bench/bench.py                 # a throwaway local broker
    KPX_AMQP_URL=amqp://... .venv/bin/python bench/bench.py --json

On one broker, one after the other:

1. **raw ceiling** — aio-pika alone: one process publishes persistent messages of a kpx
   message's mean size, pipelined with publisher confirms and ``mandatory``, through a
   direct exchange into a quorum queue declared with the very arguments of a kpx inbox,
   while another consumes them with manual acknowledgements (prefetch 256, one
   ``multiple`` ack per 50). The best of two publish windows is taken as the ceiling.
2. **kpx loops/s** — ``kpnode simulate`` with 2 and with 10 nodes, each node its own OS
   process at the production durability settings (SQLite WAL with ``synchronous=FULL``,
   one transaction per decision or batch, acknowledge after commit; quorum inboxes,
   persistent messages, publisher confirms): every certificate issued at once, each
   importer confirming as soon as the certificate arrived. Loops/s is closed loops over the
   time from the first issue to the last confirmation, as the nodes recorded them.
3. **latency at half load** — the same networks issuing at half their maximum rate
   (Poisson arrivals): p50/p95/p99 from the certificate's planned issue instant (the
   officer's click; the node's own wait before signing counts) to the exporter's commit
   of the receipt;
   then at a quarter of it, to show where the latency bends (``--loads``). Each load runs
   ``--repeats`` times (default 3), each with its own trade seed, so its own bursts: the
   slowest 1 % fall where the Poisson plan issues well above its mean rate, so one run's p99
   says as much about its seed as about kpx. The median run is reported, with every p99.

It prints the ratio ``loops/s ÷ (raw messages/s ÷ 3)`` (a loop is three messages) and the
peak RSS of every node process. Nothing here is a timed unit test: run it on a quiet
machine and read the figures with their machine (printed first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import queue as queue_module
import signal
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure the tree this script lives in

import aio_pika  # noqa: E402
from aio_pika.abc import AbstractIncomingMessage  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from node.brokerurl import redact  # noqa: E402
from node.interrupt import sigterm_as_interrupt  # noqa: E402
from node.localbroker import broker_url  # noqa: E402
from node.simreport import Report  # noqa: E402
from node.simulate import (  # noqa: E402
    LOG_LEVELS,
    MAX_CERTIFICATES,
    Options,
    SimulationError,
    check_broker_choice,
    check_broker_free,
    check_new_directory,
    claimed,
    remove_left_empty,
    run_simulation,
)
from node.trade import PARTICIPANTS, plan_trade  # noqa: E402
from node.transport import (  # noqa: E402
    CONTENT_TYPE,
    dead_letter_queue,
    inbox_arguments,
    inbox_queue,
)
from protocol import Envelope, ImportConfirmation, Receipt, parse_frame, seal  # noqa: E402

#: trade seed of the first run; a load's further runs take the next seeds
SEED = 11

# -- message size -------------------------------------------------------------------


def loop_frame_sizes(samples: int = 200) -> dict[str, float]:
    """Mean sizes of the three signed frames of a loop, over generated certificates."""
    key = SigningKey.generate()
    sizes: dict[str, list[int]] = {"certificate": [], "receipt": [], "confirmation": []}
    for s in plan_trade([p.code for p in PARTICIPANTS[:10]], samples, seed=7):
        c = s.certificate
        cert = seal(Envelope(sender=c.issuer, recipient=c.destination, created_at=1,
                             payload=c), key)
        digest = parse_frame(cert).digest
        receipt = seal(Envelope(sender=c.destination, recipient=c.issuer, created_at=2,
                                payload=Receipt(certificate=c.number,
                                                certificate_digest=digest)), key)
        confirmation = seal(Envelope(
            sender=c.destination, recipient=c.issuer, created_at=3,
            payload=ImportConfirmation(certificate=c.number, certificate_digest=digest,
                                       destination=c.destination, importer=c.importer,
                                       lines=c.lines, parcels=c.parcels,
                                       received_on=date.today())), key)
        sizes["certificate"].append(len(cert))
        sizes["receipt"].append(len(receipt))
        sizes["confirmation"].append(len(confirmation))
    means = {k: statistics.mean(v) for k, v in sizes.items()}
    means["loop_mean"] = statistics.mean(means.values())
    return means


# -- the raw ceiling --------------------------------------------------------------------


class BenchFailed(Exception):
    """A measurement went wrong (failed publishes, broken invariants): no figures."""


class BrokerTaken(Exception):
    """The broker's queues for the bench's Participants are in use, or became so."""


#: the bench's own bounds: a mistyped count must not fill the machine's memory
MAX_RAW_MESSAGES = 1_000_000
MAX_LATENCY_SECONDS = 600.0
MAX_REPEATS = 20
#: tries, 0.2 s apart, to delete a queue whose consumer should have gone
CONSUMER_GONE_ATTEMPTS = 25


async def raw_ceiling(url: str, count: int, size: int, window: int, *, prefetch: int = 256,
                      ack_every: int = 50) -> dict[str, float]:
    """Publish ``count`` persistent messages with confirms (``window`` in flight) into a
    quorum queue while another process consumes them with manual acks; messages/s end to
    end. Two processes, as kpx's nodes are: in one, the Python side capped the ceiling
    (2,729 and 3,313/s against 3,672 and 4,770/s apart, on the same broker)."""
    publisher = await aio_pika.connect(url)
    name = f"bench.raw.{uuid.uuid4().hex[:8]}"
    spawn = multiprocessing.get_context("spawn")  # no forked copy of this event loop
    ready, finished = spawn.Event(), spawn.Queue()
    reader = spawn.Process(target=_raw_consumer,
                           args=(url, name, count, prefetch, ack_every, ready, finished))
    try:
        channel = await publisher.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange("bench.raw", aio_pika.ExchangeType.DIRECT,
                                                  durable=True)
        queue = await channel.declare_queue(name, durable=True,
                                            arguments=inbox_arguments("BENCH", 5))
        await queue.bind(exchange, routing_key=name)
        # Started with SIGINT ignored (inherited across exec), so that a Ctrl-C while it
        # imports does not print its traceback; it takes Ctrl-C again once it runs.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            reader.start()
        finally:
            signal.signal(signal.SIGINT, interrupt)
        if not await asyncio.to_thread(ready.wait, 60):
            raise BenchFailed("the raw consumer process did not start")
        body = os.urandom(size)
        slots = asyncio.Semaphore(window)
        failures = 0

        async def publish() -> None:
            nonlocal failures
            try:
                await exchange.publish(
                    aio_pika.Message(body, message_id=uuid.uuid4().hex, type="certificate",
                                     content_type=CONTENT_TYPE,
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=name, mandatory=True, timeout=60)
            except Exception:
                failures += 1
            finally:
                slots.release()

        started_wall, started = time.time(), time.perf_counter()
        tasks = []
        for _ in range(count):
            await slots.acquire()
            tasks.append(asyncio.create_task(publish()))
        await asyncio.gather(*tasks)
        published = time.perf_counter() - started
        if failures:  # fewer arrive than were sent: waiting for all of them would not end
            raise BenchFailed(f"{failures} of {count} raw publishes failed")
        # the consumer's wall-clock instant of the last message: both on this machine's clock
        try:
            through = await asyncio.to_thread(finished.get, True, 180) - started_wall
        except queue_module.Empty:  # the consumer allows itself 180 s as well
            raise BenchFailed("the raw consumer did not receive every message within "
                              "180 s") from None
        return {"messages": count, "window": window, "seconds": through,
                "messages_per_second": count / through,
                "published_per_second": count / published}
    finally:
        if reader.is_alive():
            reader.join(5)
            if reader.is_alive():
                reader.kill()
        # Closed first: deleting the queue under publishes still in flight (an interrupt)
        # crashes RabbitMQ 3.10's channel and its connection with it, and the exchange
        # stayed behind. A connection of its own clears up.
        with contextlib.suppress(Exception):
            await publisher.close()
        with contextlib.suppress(Exception):
            cleaner = await aio_pika.connect(url)
            async with cleaner:
                channel = await cleaner.channel()
                await channel.queue_delete(name)
                await channel.exchange_delete("bench.raw")  # nothing of the bench stays


def _raw_consumer(url: str, name: str, count: int, prefetch: int, ack_every: int,
                  ready: Any, finished: Any) -> None:
    """The raw ceiling's consumer process: manual acks, every ``ack_every`` messages; puts
    the wall-clock instant of the last message on ``finished``."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    async def consume() -> None:
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            inbox = await channel.get_queue(name)
            received = unacked = 0
            done = asyncio.Event()

            async def on_message(message: AbstractIncomingMessage) -> None:
                nonlocal received, unacked
                received += 1
                unacked += 1
                if unacked >= ack_every or received == count:
                    unacked = 0
                    await message.ack(multiple=True)
                if received == count:
                    done.set()

            await inbox.consume(on_message)
            ready.set()
            await asyncio.wait_for(done.wait(), 180)
            finished.put(time.time())
        finally:
            await connection.close()
    # Ctrl-C reaches the whole process group: the parent reports it and cleans up; this
    # process only ends (it printed a traceback of its own before).
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(consume())


# -- kpx runs -----------------------------------------------------------------------------


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat; None where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal, then guest and guest_nice: those two
    # are counted in user and nice already, and summed again they made a machine running
    # virtual machines look busier than it was.
    fields = fields[:8]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of the machine's cores that were busy between two ``cpu_times`` readings."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 3)


async def delete_queues(url: str, codes: Sequence[str]) -> None:
    """Start each run from empty inboxes. At its start the bench made sure these queues
    were not in use, and it holds the simulations' claims on these Participants; but a
    node started meanwhile (`kpnode run`) would lose its messages: a queue with a
    consumer is not deleted, and the bench stops instead (:class:`BrokerTaken`). (Quorum
    queues refuse ``queue.delete`` with ``if-unused``: the consumers are looked at first.)"""
    from node.brokerclient import queue_info

    connection = await aio_pika.connect(url)
    async with connection:
        for code in codes:
            for name in (inbox_queue(code), dead_letter_queue(code)):
                for _ in range(CONSUMER_GONE_ATTEMPTS):
                    info = await queue_info(connection, name)
                    if info is None:
                        break
                    if info.consumers == 0:
                        channel = await connection.channel()
                        await channel.queue_delete(name)
                        break
                    # A quorum queue forgets a stopped node's consumer a moment after its
                    # connection closed.
                    await asyncio.sleep(0.2)
                else:
                    raise BrokerTaken(
                        f"{name} got a consumer during the bench: something else on this "
                        f"broker uses {code}'s queues; the bench stops without touching them "
                        "(run it on a broker or vhost of its own)")


async def kpx_run(url: str, codes: Sequence[str], certificates: int, rate: float,
                  log_level: str, keep: Path | None, seed: int = SEED
                  ) -> tuple[Report, float | None]:
    """One simulated network's report, and the share of the machine busy while it ran."""
    await delete_queues(url, codes)
    directory = None
    if keep is not None:
        name = f"{len(codes)}-nodes-{'max' if rate == 0 else f'rate{rate:g}'}-seed{seed}"
        directory, again = keep / name, 1
        while directory.exists():  # the same rate twice (--loads 0.5,0.5)
            again += 1
            directory = keep / f"{name}-{again}"
    options = Options(codes=tuple(codes), certificates=certificates, rate=rate,
                      confirm_delay=0.0, discrepancy_share=0.0, progress=False,
                      log_level=log_level, directory=directory, seed=seed)
    before = cpu_times()
    report = await run_simulation(options, [url], claim=False)
    busy = busy_share(before, cpu_times())
    await delete_queues(url, codes)
    if not report.ok:
        raise BenchFailed(f"kpx run with {len(codes)} nodes failed its invariants: "
                           f"{report.failures[:3]}")
    return report, busy


def node_cpu_ms_per_loop(report: Report) -> float | None:
    """CPU the node processes used, start to stop, per certificate issued."""
    values = [n.get("cpu_seconds") for n in report.nodes.values()]
    if not report.issued or any(v is None for v in values):
        return None
    return round(sum(float(v) for v in values if v is not None) * 1000 / report.issued, 2)


def rss_summary(report: Report) -> dict[str, Any]:
    per_node = {c: n.get("peak_rss_mib") for c, n in report.nodes.items()}
    values = [v for v in per_node.values() if v is not None]
    return {"per_node_mib": per_node, "max_mib": max(values, default=None),
            "mean_mib": round(statistics.mean(values), 1) if values else None}


# -- the machine ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = round(int(first.split()[1]) / 1024 / 1024, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory,
            "kernel": platform.release(), "python": platform.python_version(),
            "aio_pika": aio_pika.__version__, "sqlite": sqlite3.sqlite_version,
            "fsyncs_per_second": fsync_rate()}


def fsync_rate(count: int = 300) -> float:
    """Committed SQLite transactions per second (WAL, synchronous=FULL) on the temp disk."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kpx-bench-") as tmp:
        db = sqlite3.connect(Path(tmp) / "t.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (x BLOB)")
        started = time.perf_counter()
        for _ in range(count):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 600,))
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        db.close()
    return round(count / elapsed)


async def broker_version(url: str) -> str:
    connection = await aio_pika.connect(url)
    async with connection:
        underlay = connection.transport
        server = underlay.connection.server_properties if underlay is not None else {}
        version = server.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)


# -- the benchmark ------------------------------------------------------------------


async def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, holding the simulations' claims on the Participants throughout:
    the bench deletes their queues between runs, and a simulation started meanwhile on
    this broker would lose its messages."""
    codes = [p.code for p in PARTICIPANTS[:10]]
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(claimed([url], codes, other_codes=False,
                                                    who="bench"))
            await check_broker_free([url], codes, other_codes=False)
        except SimulationError as exc:
            raise BrokerTaken(str(exc)) from None
        return await _measure(url, args)


async def _measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "broker": {"version": "?"}}
    with contextlib.suppress(Exception):
        result["broker"]["version"] = await broker_version(url)
    sizes = loop_frame_sizes()
    result["frame_bytes"] = {k: round(v) for k, v in sizes.items()}
    size = round(sizes["loop_mean"])
    say(f"raw ceiling: {args.raw_messages:,} messages of {size} bytes ...")
    raws = [await raw_ceiling(url, args.raw_messages, size, window)
            for window in (200, 1000)]
    best = max(raws, key=lambda r: r["messages_per_second"])
    result["raw"] = {"runs": raws, "messages_per_second": best["messages_per_second"],
                     "loops_per_second_ceiling": best["messages_per_second"] / 3}
    say(f"  {best['messages_per_second']:,.0f} messages/s")
    result["kpx"] = {}
    for n, count in ((2, args.loops_2), (10, args.loops_10)):
        codes = [p.code for p in PARTICIPANTS[:n]]
        say(f"kpx, {n} nodes: {count:,} certificates at once ...")
        top, top_busy = await kpx_run(url, codes, count, 0.0, args.log_level, args.keep)
        loops = top.loops_per_second
        say(f"  {loops:,.1f} loops/s")
        paced: dict[float, list[tuple[Report, float | None]]] = {}
        for share in args.loads:
            rate = loops * share
            certificates = min(MAX_CERTIFICATES, max(100, round(rate * args.latency_seconds)))
            paced[share] = []
            for i in range(args.repeats):
                say(f"kpx, {n} nodes: {certificates:,} certificates at {rate:,.0f}/s "
                    f"({share:g} of the maximum; run {i + 1} of {args.repeats}) ...")
                run = await kpx_run(url, codes, certificates, rate, args.log_level,
                                    args.keep, seed=SEED + i)
                paced[share].append(run)
                say(f"  p99 issue→receipt {receipt_p99(run[0])} ms")
        rss = rss_summary(top)
        rss_paced = rss_summary(median_run(paced[0.5])[0]) if 0.5 in paced else None
        result["kpx"][f"{n}_nodes"] = {
            "codes": codes, "certificates": count,
            "loops_per_second": loops,
            "seconds": top.span_ms / 1000,
            "ratio": loops / result["raw"]["loops_per_second_ceiling"],
            "max_rate_latency_ms": top.to_json()["latency_ms"],
            "node_cpu_ms_per_loop": node_cpu_ms_per_loop(top),
            "machine_busy": top_busy,
            # "half_load" is the target's figure; "loads" has every share that was run.
            "loads": [load_summary(share, loops, runs) for share, runs in paced.items()],
            "half_load": (load_summary(0.5, loops, paced[0.5]) if 0.5 in paced else None),
            "peak_rss": rss, "peak_rss_half_load": rss_paced,
        }
    return result


def receipt_p99(report: Report) -> int:
    return int(report.to_json()["latency_ms"]["issue_to_receipt"]["p99"])


def median_run(runs: Sequence[tuple[Report, float | None]]) -> tuple[Report, float | None]:
    """The run whose issue→receipt p99 is the median (the upper one of an even count)."""
    return sorted(runs, key=lambda run: receipt_p99(run[0]))[len(runs) // 2]


def load_summary(share: float, max_rate: float, runs: Sequence[tuple[Report, float | None]]
                 ) -> dict[str, Any]:
    """One load's figures: those of its median run, and every run's p99."""
    report, busy = median_run(runs)
    latency = report.to_json()["latency_ms"]
    return {"share": share, "rate": max_rate * share, "certificates": report.issued,
            "runs": len(runs), "issue_to_receipt_p99_each_run_ms": [
                receipt_p99(r) for r, _ in runs],
            "achieved_loops_per_second": report.loops_per_second,
            "issue_to_receipt_ms": latency["issue_to_receipt"],
            "issue_to_confirmation_ms": latency["issue_to_confirmation"],
            "node_cpu_ms_per_loop": node_cpu_ms_per_loop(report),
            "machine_busy": busy}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def format_result(r: dict[str, Any]) -> str:
    m, raw = r["machine"], r["raw"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, Python {m['python']}, aio-pika {m['aio_pika']}, SQLite "
        f"{m['sqlite']}, RabbitMQ {r['broker']['version']}; "
        f"{m['fsyncs_per_second']:,} SQLite commits/s (WAL, synchronous=FULL)",
        f"frames: certificate {r['frame_bytes']['certificate']} B, receipt "
        f"{r['frame_bytes']['receipt']} B, confirmation {r['frame_bytes']['confirmation']} B;"
        f" raw messages of {r['frame_bytes']['loop_mean']} B",
        "",
        f"raw ceiling      {raw['messages_per_second']:>9,.0f} messages/s  "
        f"(= {raw['loops_per_second_ceiling']:,.0f} loops/s of 3 messages; windows "
        + ", ".join(f"{x['window']}: {x['messages_per_second']:,.0f}" for x in raw["runs"])
        + ")",
    ]
    for key, k in r["kpx"].items():
        rss = k["peak_rss"]
        lines += [
            "",
            f"kpx {key.replace('_', ' ')} ({', '.join(k['codes'])})",
            f"  closed loops     {k['loops_per_second']:>9,.1f} loops/s   "
            f"({k['certificates']:,} loops in {k['seconds']:.1f} s)",
            f"  ratio            {k['ratio']:>9.2f}   loops/s ÷ (raw messages/s ÷ 3)",
            f"  {'':<16} {'':>9}   {cpu_text(k)}",
        ]
        for h in k["loads"]:
            rec = h["issue_to_receipt_ms"]
            label = "half load" if h["share"] == 0.5 else f"{h['share']:g} load"
            lines.append(
                f"  {label:<16} {h['rate']:>9,.0f} certificates/s: issue→receipt p50 "
                f"{rec['p50']} ms, p95 {rec['p95']} ms, p99 {rec['p99']} ms")
            if h["runs"] > 1:
                each = ", ".join(str(v) for v in h["issue_to_receipt_p99_each_run_ms"])
                lines.append(f"  {'':<16} {'':>9}   the median of {h['runs']} runs (trade "
                             f"seeds {SEED}..{SEED + h['runs'] - 1}); p99 of each: {each} ms")
            lines.append(f"  {'':<16} {'':>9}   {cpu_text(h)}")
        lines += [
            f"  peak RSS         max {rss['max_mib']} MiB, mean {rss['mean_mib']} MiB per node "
            f"process ({', '.join(f'{c} {v}' for c, v in rss['per_node_mib'].items())})",
        ]
    return "\n".join(lines)


def cpu_text(figures: dict[str, Any]) -> str:
    cpu, busy = figures["node_cpu_ms_per_loop"], figures["machine_busy"]
    return (f"nodes' CPU {'?' if cpu is None else f'{cpu:.1f}'} ms per loop; machine "
            f"{'?' if busy is None else f'{busy:.0%}'} busy (all its cores, a local broker "
            "included)")


def shares(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"shares must lie in (0, 1]: {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a share is given twice: {text!r}")
    return values


def between(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be between {minimum:,} and {maximum:,}: "
                                             f"{text!r}")
        return value
    return parse


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_LATENCY_SECONDS):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most "
                                         f"{MAX_LATENCY_SECONDS:g}: {text!r}")
    return value


@contextlib.contextmanager
def _broker(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
    else:
        with broker_url() as found:
            yield found


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", help="AMQP URL (default $KPX_AMQP_URL, else a throwaway "
                   "local broker)")
    p.add_argument("--raw-messages", type=between(100, MAX_RAW_MESSAGES), default=20_000)
    p.add_argument("--loops-2", type=between(10, MAX_CERTIFICATES), default=4_000,
                   help="certificates, 2-node run")
    p.add_argument("--loops-10", type=between(10, MAX_CERTIFICATES), default=5_000,
                   help="certificates, 10-node run")
    p.add_argument("--latency-seconds", type=seconds, default=20.0,
                   help="length of each paced run")
    p.add_argument("--loads", type=shares, default=[0.5, 0.25],
                   help="shares of the maximum rate to measure latency at, comma-separated "
                        "(default 0.5,0.25; 0.5 is the target's half load)")
    p.add_argument("--repeats", type=between(1, MAX_REPEATS), default=3,
                   help="paced runs per load, each with its own trade seed; the median "
                        "run's figures are reported (default 3)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="node log level (default INFO, as kpnode run)")
    p.add_argument("--keep", help="keep the networks' directories here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    made: list[Path] = []
    try:
        check_broker_choice(args.broker)
        if args.keep is not None:  # last: a refused option left it made and empty
            args.keep = check_new_directory(args.keep, "--keep", made)
    except ValueError as exc:
        p.error(str(exc))
    from node.logs import configure_logging

    configure_logging(level="WARNING")
    try:
        with sigterm_as_interrupt(), _broker(args.broker) as url:
            result = asyncio.run(bench(url, args))
    except BrokerTaken as exc:
        say(f"bench: {exc}")
        return 3
    except (BenchFailed, SimulationError) as exc:  # a run that went wrong has no figures
        say(f"bench: {exc}")
        return 1
    except KeyboardInterrupt:
        say("bench: interrupted; its networks and any broker it started are gone")
        return 130
    finally:
        remove_left_empty(made)  # --keep made for a bench that never wrote a network there
    # Figures get published: the command that made them, with no broker password in it.
    result["command"] = " ".join(["bench/bench.py", *map(redact, argv or sys.argv[1:])])
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
