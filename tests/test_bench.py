"""``bench/bench.py`` at a tiny size: it runs end to end on a real broker and reports every
figure the issue asks for (its numbers are read by people, never asserted as timings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.brokerurl import redact
from tests.test_network import fresh_codes

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


@pytest.mark.broker
@pytest.mark.slow
def test_bench_reports_ratio_latency_by_load_and_memory(amqp_url: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--broker", amqp_url, "--raw-messages", "2000",
         "--loops-2", "200", "--loops-10", "300", "--latency-seconds", "2",
         "--loads", "0.5,0.25", "--repeats", "2", "--json"],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["raw"]["messages_per_second"] > 0
    # The command is recorded with the figures, never with the broker's password.
    assert redact(amqp_url) in result["command"]
    assert "@" not in amqp_url or amqp_url not in result["command"]
    for n in (2, 10):
        k = result["kpx"][f"{n}_nodes"]
        assert len(k["codes"]) == n
        assert k["ratio"] == pytest.approx(
            k["loops_per_second"] / (result["raw"]["messages_per_second"] / 3))
        assert [load["share"] for load in k["loads"]] == [0.5, 0.25]
        assert k["half_load"] == k["loads"][0]
        assert k["half_load"]["rate"] == pytest.approx(k["loops_per_second"] / 2)
        half = k["half_load"]
        assert half["issue_to_receipt_ms"]["p99"] > 0
        # two runs, each with its own seed; the reported figures are those of the median
        # run (the upper one of two), whose p99 is the larger
        assert half["runs"] == 2
        assert half["issue_to_receipt_ms"]["p99"] == max(
            half["issue_to_receipt_p99_each_run_ms"])
        assert len(k["peak_rss"]["per_node_mib"]) == n
        for figures in (k, *k["loads"]):  # what the machine spent on it (Linux)
            assert figures["node_cpu_ms_per_loop"] > 0
            assert 0 < figures["machine_busy"] <= 1


@pytest.mark.parametrize(("options", "says"), [
    ("--repeats 0", "argument --repeats: must be between 1 and 20: '0'"),
    ("--loads 0.5,2", "argument --loads: shares must lie in (0, 1]: '0.5,2'"),
    ("--loads 0.5,0.5", "argument --loads: a share is given twice: '0.5,0.5'"),
    ("--raw-messages 0", "argument --raw-messages: must be between 100 and 1,000,000: '0'"),
    # A mistyped count filled the machine's memory, deaf to SIGTERM, until the kernel
    # killed the bench and its throwaway broker was left running.
    ("--loops-2 99999999999999", "argument --loops-2: must be between 10 and 1,000,000: "
                                 "'99999999999999'"),
    ("--latency-seconds 1e12", "argument --latency-seconds: must be a number of seconds "
                               "above 0 and at most 600: '1e12'"),
    ("--loops-10 many", "argument --loops-10: not a whole number: 'many'"),
    ("--latency-seconds nan", "argument --latency-seconds: must be a number of seconds above "
                              "0 and at most 600: 'nan'"),
    ("--log-level loud", "argument --log-level: invalid choice: 'LOUD'"),
])
def test_bench_refuses_bad_options_before_anything_starts(options: str, says: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH), *options.split(), "--broker",
                           "amqp://guest:guest@127.0.0.1:1/"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 2
    assert f"bench/bench.py: error: {says}" in done.stderr


def test_bench_says_at_once_that_the_broker_does_not_answer() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--broker",
                           "amqp://guest:s3cret@127.0.0.1:1/"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 3
    assert done.stderr.startswith("bench: no broker answered (amqp://guest:***@127.0.0.1:1/: ")
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.broker
async def test_the_bench_never_deletes_a_queue_someone_consumes(amqp_url: str) -> None:
    """The bench deletes its Participants' queues between runs. It checked only once, at
    its start, that nobody used them: a simulation or node started on the broker during the
    bench lost the messages in its inbox. A queue with a consumer now stops the bench."""
    import aio_pika

    from node.brokerclient import queue_info
    from node.transport import inbox_queue

    bench = _bench_module()
    code = fresh_codes(1)[0]
    monkeypatch_attempts = bench.CONSUMER_GONE_ATTEMPTS
    bench.CONSUMER_GONE_ATTEMPTS = 2  # no need to wait 5 s for a consumer that stays
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(inbox_queue(code), durable=True,
                                            arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(aio_pika.Message(b"someone's certificate"),
                                               routing_key=queue.name)
        async def hold(message: object) -> None:  # a node that holds it
            pass
        await queue.consume(hold)
        try:
            with pytest.raises(bench.BrokerTaken, match="got a consumer during the bench"):
                await bench.delete_queues(amqp_url, [code])
        finally:
            bench.CONSUMER_GONE_ATTEMPTS = monkeypatch_attempts
        kept = await queue_info(connection, queue.name)
        assert kept is not None and kept.consumers == 1  # untouched, its message held
        await channel.queue_delete(queue.name)


def test_machine_busy_counts_guest_time_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/stat's guest and guest_nice columns are already inside user and nice: summed
    with the rest, a host running virtual machines counted that time twice, in the busy
    jiffies and in the total, and the bench's "machine busy" came out too high."""
    bench = _bench_module()

    class Stat:
        lines = iter(["cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 ...\n",
                      # 40 of the 100 further user jiffies ran a guest: in user and in guest
                      "cpu  200 0 100 1500 100 0 0 0 40 0\ncpu0 ...\n"])

        def __init__(self, path: str) -> None:
            assert path == "/proc/stat"

        def read_text(self) -> str:
            return next(self.lines)
    monkeypatch.setattr(bench, "Path", Stat)
    before, after = bench.cpu_times(), bench.cpu_times()
    assert (before, after) == ((150, 1000), (300, 1900))
    assert bench.busy_share(before, after) == pytest.approx(150 / 900, abs=0.001)
