"""A ``kpnode run`` in its own OS process, for fault tests and the soak script to crash.

A fault that matters — ``kill -9``, SIGTERM, a restart — happens to a process, so the crash
tests and ``scripts/soak.py`` run each node exactly as an operator would (``python -m
node.cli run --dir DIR``) and signal it. Its log (JSON lines) is appended to
``DIR/node.log``; :meth:`NodeProcess.wait_started` reads it for the runner's "node started"
event, which is logged once the node is connected and consuming.

Only the process this object started is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

STARTED_EVENT = b'"node started"'
LOG_NAME = "node.log"


class NodeProcessError(RuntimeError):
    """The node process exited, or did not start in time; the message has its log's tail."""


class NodeProcess:
    """``kpnode run --dir DIR`` as a child process: start, kill -9, SIGTERM, restart."""

    def __init__(self, directory: Path, *, env: Mapping[str, str] | None = None,
                 log_level: str = "INFO") -> None:
        self.directory = Path(directory)
        self.env = dict(env or {})
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_NAME

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    def start(self) -> None:
        if self.running:
            raise NodeProcessError(f"node in {self.directory} is running already")
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "KPX_LOG_FORMAT": "json", "KPX_LOG_LEVEL": self.log_level,
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               **self.env}
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "run", "--dir", str(self.directory)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.starts += 1

    def wait_started(self, timeout: float = 60.0) -> None:
        """Block until this run logged "node started" (connected, consuming)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                if STARTED_EVENT in log.read():
                    return
            if not self.running:
                raise NodeProcessError(f"node in {self.directory} exited "
                                       f"({self.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise NodeProcessError(f"node in {self.directory} did not start within "
                                       f"{timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs, the OS closes its sockets and files."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful shutdown; returns the exit code."""
        if self.proc is None:
            raise NodeProcessError("not started")
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise NodeProcessError(f"node in {self.directory} ignored SIGTERM for "
                                   f"{timeout:.0f} s; killed") from None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def close(self) -> None:
        """Make sure the process is gone (a test's clean-up): SIGTERM, then SIGKILL."""
        if self.running:
            with contextlib.suppress(NodeProcessError):
                self.terminate(30.0)
