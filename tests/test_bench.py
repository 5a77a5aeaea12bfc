"""``bench/bench.py`` at a tiny size: it runs end to end on a real broker and reports every
figure the issue asks for (its numbers are read by people, never asserted as timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.brokerurl import redact

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
    ("--repeats 0", "argument --repeats: must be at least 1: '0'"),
    ("--loads 0.5,2", "argument --loads: shares must lie in (0, 1]: '0.5,2'"),
    ("--loads 0.5,0.5", "argument --loads: a share is given twice: '0.5,0.5'"),
    ("--raw-messages 0", "argument --raw-messages: must be at least 100: '0'"),
    ("--loops-10 many", "argument --loops-10: not a whole number: 'many'"),
    ("--latency-seconds nan", "argument --latency-seconds: must be a number of seconds above "
                              "0: 'nan'"),
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
