"""A node started while its wall clock is already ahead: the clock watch
(node/clockwatch.py) measures from the start, so a jump that came before it went unseen."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from node.machine import Side, State
from node.network import create_network
from node.runner import RunningNode
from tests.netutil import certificate
from tests.test_network import fresh_codes, state, until

pytestmark = [pytest.mark.broker]

YEAR_NS = 365 * 86_400 * 10**9


async def test_a_node_restarted_while_its_clock_is_ahead_expires_and_refuses_nothing(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock jumps a year ahead (a bad NTP source); the node holds its work, and
    /readyz says 503 — so its supervisor, or an operator, restarts it. The new process
    took the wrong time for its starting point: its first sweep expired every open import
    for good, and a certificate waiting in the inbox was refused as expired, a signed
    rejection that ended the loop at the exporter too."""
    monkeypatch.setattr("node.runner.SWEEP_SECONDS", 0.1)
    ex, im = fresh_codes(2)
    network = create_network(tmp_path, [ex, im], [amqp_url])
    cfg = network.configs
    real = time.time_ns
    async with RunningNode(cfg[ex]) as exporter:
        assert exporter.node is not None
        exporter.node.clock = lambda: real() // 1_000_000  # the exporter's clock is right
        held, late = f"{ex}-R1", f"{ex}-R2"
        async with RunningNode(cfg[im]) as importer:
            assert importer.node is not None
            exporter.node.issue(certificate(held, ex, im))
            await until(lambda: state(exporter.node, Side.EXPORT,  # type: ignore[arg-type]
                                      held) is State.DELIVERED)
            # the clock jumps ahead while the node runs: held, as test_faults checks
            monkeypatch.setattr("node.service.time",
                                SimpleNamespace(time_ns=lambda: real() + YEAR_NS))
            await asyncio.sleep(0.5)
            assert not importer.clock_ok
        # restarted meanwhile; a certificate waits for it in its inbox
        exporter.node.issue(certificate(late, ex, im))
        await until(lambda: exporter.node.store.backlog() == [])  # type: ignore[union-attr]
        async with RunningNode(cfg[im]) as importer:
            assert importer.node is not None
            await asyncio.sleep(2.0)  # sweeps run; the certificate is delivered
            assert state(importer.node, Side.IMPORT, held) is State.RECEIVED
            assert state(importer.node, Side.IMPORT, late) in (None, State.RECEIVED)
            assert not importer.clock_ok
            monkeypatch.setattr("node.service.time", time)  # set right
            await until(lambda: state(importer.node, Side.IMPORT,  # type: ignore[arg-type]
                                      late) is State.RECEIVED)
            assert state(importer.node, Side.IMPORT, held) is State.RECEIVED
        await until(lambda: state(exporter.node, Side.EXPORT,  # type: ignore[arg-type]
                                  late) is State.DELIVERED)


def test_the_watch_resumes_only_within_the_same_boot(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from node import clockwatch

    path = tmp_path / clockwatch.CLOCK_FILE
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(clockwatch, "_BOOT_ID", boot)
    assert clockwatch.resumed(path, 5_000_000, 1_000) == clockwatch.ClockWatch(5_000_000, 1_000)
    clockwatch.save(clockwatch.ClockWatch(1_000_000, 0), path)
    # the same boot: a year on the wall in a minute measured is a jump, across the restart
    again = clockwatch.resumed(path, 1_000_000 + 365 * 86_400_000, 60_000)
    assert again == clockwatch.ClockWatch(1_000_000, 0)
    assert again.jumped(1_000_000 + 365 * 86_400_000, 60_000)
    # after a reboot the measured clock starts again: nothing to measure from
    boot.write_text("boot-2\n")
    assert clockwatch.resumed(path, 9_000_000, 10) == clockwatch.ClockWatch(9_000_000, 10)
    path.write_text("not json")
    assert clockwatch.resumed(path, 9_000_000, 10) == clockwatch.ClockWatch(9_000_000, 10)


def test_a_start_taken_while_the_clock_was_ahead_is_not_kept_once_it_is_set_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run took a clock a year ahead for its start (started before NTP set it right, or
    a jump that lasted HOLD_AT_MOST_MS and was taken for a correction). The operator sets
    the clock right and restarts the node. Before the watch was kept, the new run measured
    from the right time; resumed, it measured from the year-ahead start, and a later jump
    of anything up to a year went unseen for the rest of the boot: loops expired again."""
    from node import clockwatch

    path = tmp_path / clockwatch.CLOCK_FILE
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(clockwatch, "_BOOT_ID", boot)
    right, year = 1_800_000_000_000, 365 * 86_400_000
    clockwatch.save(clockwatch.ClockWatch(right + year, 0), path)
    # restarted a minute later, the clock set right meanwhile
    watch = clockwatch.resumed(path, right + 60_000, 60_000)
    assert watch.check(right + 60_000, 60_000)
    # then a bad time source puts it half a year ahead: that is a jump, and held
    assert watch.jumped(right + 120_000 + year // 2, 120_000)
    assert not watch.check(right + 120_000 + year // 2, 120_000)


@pytest.mark.parametrize("saved", [
    '{"boot": "boot-1", "wall_ms": Infinity, "elapsed_ms": 0}',
    '{"boot": "boot-1", "wall_ms": 1e400, "elapsed_ms": 0}',
    '{"boot": "boot-1", "wall_ms": 0, "elapsed_ms": 0, "ahead_since_ms": -Infinity}',
    '{"boot": "boot-1", "wall_ms": 0, "elapsed_ms": 0, "ahead_since_ms": 1e12}',
])
def test_a_damaged_watch_file_starts_the_watch_afresh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved: str) -> None:
    """clockwatch.json that json reads but holds no instant (Infinity, 1e400: an edit by
    hand, a damaged disk) stopped the node's start with an OverflowError; a hold started
    in the measured future would have held a jump for longer than HOLD_AT_MOST_MS."""
    from node import clockwatch

    path = tmp_path / clockwatch.CLOCK_FILE
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(clockwatch, "_BOOT_ID", boot)
    path.write_text(saved)
    watch = clockwatch.resumed(path, 60_000, 60_000)
    assert watch.ahead_since_ms is None or watch.ahead_since_ms <= 60_000
    jump = 60_000 + 365 * 86_400_000
    assert not watch.check(jump, 60_000)
    assert watch.check(jump, 60_000 + clockwatch.HOLD_AT_MOST_MS)  # a hold never lasts longer


def test_a_hold_under_way_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node import clockwatch

    path = tmp_path / clockwatch.CLOCK_FILE
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(clockwatch, "_BOOT_ID", boot)
    clockwatch.save(clockwatch.ClockWatch(0, 0, 30_000), path)
    assert clockwatch.resumed(path, 60_000, 60_000) == clockwatch.ClockWatch(0, 0, 30_000)


def test_a_save_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    """A full disk (here: a file size limit) failed the write of the partial file and
    left it in the node directory, one .clockwatch.json.<pid> per run."""
    import subprocess
    import sys

    script = f"""
import resource, signal
from pathlib import Path
from node import clockwatch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
clockwatch._BOOT_ID = Path({str(tmp_path / "boot_id")!r})
clockwatch._BOOT_ID.write_text("boot-1")
resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
try:
    clockwatch.save(clockwatch.ClockWatch(1_800_000_000_000, 123_456_789),
                    Path({str(tmp_path / "node" / "clockwatch.json")!r}))
except OSError as exc:
    print("failed", exc.errno)
"""
    (tmp_path / "node").mkdir()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.startswith("failed"), (done.stdout, done.stderr)
    assert list((tmp_path / "node").iterdir()) == []
