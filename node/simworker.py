"""One simulated Participant in its own OS process: ``kpnode run`` plus its authority's desk.

Started by :mod:`node.simulate` as ``python -m node.simworker --dir NODE_DIR``. It runs the
node exactly as ``kpnode run`` does (:class:`~node.runner.RunningNode`) and, in the same
event loop, the desk that issues the node's planned certificates and confirms arrivals
(:class:`~node.desk.Desk`), as an authority's own systems would next to its node.

It speaks JSON lines: on stdout ``{"event": "ready"}`` once connected, ``{"event":
"refused", "command": ..., "number": ..., "by": ..., "why": ...}`` for each of its desk's
commands the node refused, as it happens, and ``{"event": "done", ...}`` with its desk's
counts, peak RSS and CPU time after a clean stop (and when its node committed each
issue, receipt and confirmation, in a file: :func:`~node.desk.write_answered`); on stdin
``{"start_at_ms": T}`` (issue the plan from that instant on: the simulation times latency
from T plus each certificate's planned offset, on the wall clock this process shares with
it) and ``{"stop": true}`` (or end of input, SIGTERM, SIGINT): stop the desk, drain the
node, exit 0. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.config import load_config
from node.desk import Desk, read_desk_plan, write_answered
from node.logs import configure_logging
from node.runner import RunningNode, freeze_start_up_objects
from node.simreport import cpu_seconds, peak_rss_kib


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run(directory: Path) -> int:
    config = load_config(directory)
    exports, arrivals = read_desk_plan(directory)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # An ignored SIGINT is inherited from a `simulate` started in the background of a
        # script, which Ctrl-C does not stop: its nodes must not stop under it either.
        if signal.getsignal(sig) is not signal.SIG_IGN:
            loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    running = RunningNode(config)
    # Told to stop while still connecting (Ctrl-C as the run starts, a broker that does not
    # answer): stop now, not after the 60 s the connection may take.
    starting = asyncio.create_task(running.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting  # a start cut short closes what it opened
        return 130
    starting.result()  # a start that failed raises here, as before
    assert running.node is not None
    freeze_start_up_objects()
    desk = Desk(running.node, exports, arrivals)
    failed: list[str] = []

    def desk_failed(why: str) -> None:  # the parent sees this process end, and reads why
        failed.append(why)
        stop.set()
    desk.on_failure = desk_failed
    # As each happens, not in the final report: the parent stops waiting for a loop that
    # was refused, instead of waiting out its timeout for it. (It reads this process's
    # stdout all along, so the write does not block.)
    desk.on_refused = lambda refused: emit({"event": "refused", **refused.to_json()})
    emit({"event": "ready", "participant": config.participant, "pid": os.getpid()})

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                break
            message = json.loads(line)
            if "start_at_ms" in message:
                desk.start(int(message["start_at_ms"]))
            if message.get("stop"):
                break
        stop.set()

    listener = asyncio.create_task(commands())
    try:
        await stop.wait()
    finally:
        listener.cancel()
        await desk.stop()
        await running.stop()
        write_answered(directory, desk.answered)
    emit({"event": "done", "participant": config.participant,
          "desk": desk.stats.to_json(), "peak_rss_kib": peak_rss_kib(os.getpid()),
          "cpu_seconds": cpu_seconds()})
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m node.simworker",
                                     description="one node of a kpx simulation")
    parser.add_argument("--dir", required=True, type=Path, help="the node's directory")
    args = parser.parse_args(argv)
    configure_logging()
    raise SystemExit(asyncio.run(run(args.dir)))


if __name__ == "__main__":
    main()
