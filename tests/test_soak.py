"""``scripts/soak.py`` at a small size: a random fault schedule over three nodes (kill -9,
SIGTERM, a broker restart), and every invariant holds at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


@pytest.mark.broker
@pytest.mark.slow
def test_soak_small_network_random_faults_invariants_hold(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--participants", "3", "--certificates", "300",
         "--duration", "40", "--faults", "4", "--seed", "7", "--timeout", "60", "--json",
         "--quiet", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["failures"] == []
    assert report["certificates"]["loops_closed"] == report["certificates"]["planned"] == 300
    assert sorted({f["kind"] for f in report["faults"]}) == ["SIGTERM", "broker restart",
                                                            "kill -9"]
    assert len(report["faults"]) == 4


def test_soak_refuses_bad_arguments() -> None:
    done = subprocess.run([sys.executable, str(SOAK), "--participants", "1"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "--participants must be between 2" in done.stderr
