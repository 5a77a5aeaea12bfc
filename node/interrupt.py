"""SIGTERM and SIGHUP handled as Ctrl-C, for commands that own throwaway things.

``kpnode simulate``, ``kpnode demo`` and the benchmark start brokers of their own and write
networks (node keys, ``node.toml`` files with broker passwords) to temporary directories;
Ctrl-C unwinds their ``with`` blocks and removes all of it. SIGTERM — sent by ``timeout``,
a cancelled CI job, ``kill`` or a service manager — ended the process at once and left the
broker running and the secrets on disk. Within :func:`sigterm_as_interrupt` SIGTERM is
handled by the SIGINT handler, so the same cleanup runs: inside ``asyncio.run`` its Ctrl-C handling
cancels the main task (whose ``finally`` blocks stop the nodes) and then raises
:class:`KeyboardInterrupt`; outside, Python raises it at once. SIGHUP (the terminal closed,
an SSH session dropped) likewise: the private broker runs in a session of its own, so the
hang-up never reaches it, and it ran on after its owner died.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP do what Ctrl-C does (in the main thread);
    a SIGHUP the process ignores (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; nothing to change here
        return

    def as_sigint(signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):  # Python's own, or asyncio.run's while it runs
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored, as for a shell script's background job
            raise KeyboardInterrupt

    # A hang-up ignored on purpose (nohup) stays ignored: the run is meant to outlive
    # the terminal.
    hang_up = [] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP]
    previous = {signum: signal.signal(signum, as_sigint)
                for signum in (signal.SIGTERM, *hang_up)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
