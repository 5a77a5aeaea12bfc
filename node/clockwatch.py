"""Telling a wall clock that jumped ahead from time that has passed.

A node decides by the date: a certificate past its expiry is refused on arrival, and the
sweep expires open loops whose certificates have lapsed. Both are final (a signed
rejection goes back; an expired loop cannot be confirmed). A wall clock set ahead by
mistake, even for seconds (a bad NTP source, an operator's typo), made a node refuse and
expire certificates that were still valid, for good. The running node therefore compares
the wall clock's progress with the time that has passed since it started, measured by a
clock nobody sets (``CLOCK_BOOTTIME``: it counts a suspended machine's sleep too), and
holds such decisions while the two disagree by more than :data:`TOLERANCE_MS`.

A clock that is set right again ends the hold by itself. A jump that stays for
:data:`HOLD_AT_MOST_MS` of measured time is taken for a correction, not a mistake (a
virtual machine resumed after a pause its boot clock did not count, NTP stepping a clock
that was slow at the start), and the watch measures from there: a hold never lasts longer.

The starting point outlives the process (:func:`resumed`, :func:`save`): a node restarted
while its clock is ahead — by a supervisor, or an operator, seeing ``/readyz`` fail — took
the wrong time for its start, and its first sweep expired every open loop. Within one boot
of the machine (``CLOCK_BOOTTIME`` starts again at each) the new process measures from
where the last one did; after a reboot it can only start afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CLOCK_FILE", "HOLD_AT_MOST_MS", "TOLERANCE_MS", "ClockWatch", "elapsed_ms",
           "resumed", "save"]

#: wall-clock progress beyond the time measured that counts as a jump: far above NTP's
#: slewing and small steps, far below the day that dates are reckoned in
TOLERANCE_MS = 10 * 60 * 1000
#: measured time a jump may last before it is taken for a correction
HOLD_AT_MOST_MS = 10 * 60 * 1000
#: Linux counts a suspended machine's sleep in CLOCK_BOOTTIME; elsewhere, monotonic time
_MEASURED = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
#: where a node directory keeps its watch's starting point between runs
CLOCK_FILE = "clockwatch.json"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def elapsed_ms() -> int:
    """Milliseconds on a clock that only moves forward."""
    return time.clock_gettime_ns(_MEASURED) // 1_000_000


@dataclass(slots=True)
class ClockWatch:
    """The wall clock and the measured clock, read together at the node's start (and again
    when a lasting jump is taken for a correction)."""

    wall_at_start_ms: int
    elapsed_at_start_ms: int
    #: the measured time at which the current jump was first seen
    ahead_since_ms: int | None = None

    def check(self, wall_now_ms: int, elapsed_now_ms: int) -> bool:
        """Whether decisions by the wall clock may be made now: False while it has jumped
        ahead, for at most HOLD_AT_MOST_MS of measured time."""
        if not self.jumped(wall_now_ms, elapsed_now_ms):
            self.ahead_since_ms = None
            return True
        if self.ahead_since_ms is None:
            self.ahead_since_ms = elapsed_now_ms
        if elapsed_now_ms - self.ahead_since_ms < HOLD_AT_MOST_MS:
            return False
        self.wall_at_start_ms, self.elapsed_at_start_ms = wall_now_ms, elapsed_now_ms
        self.ahead_since_ms = None
        return True

    def ahead_ms(self, wall_now_ms: int, elapsed_now_ms: int) -> int:
        """How far the wall clock has gone beyond the time measured since the start
        (negative when it went back: that the node repairs elsewhere)."""
        return ((wall_now_ms - self.wall_at_start_ms)
                - (elapsed_now_ms - self.elapsed_at_start_ms))

    def jumped(self, wall_now_ms: int, elapsed_now_ms: int) -> bool:
        return self.ahead_ms(wall_now_ms, elapsed_now_ms) > TOLERANCE_MS


def boot_id() -> str | None:
    """This boot of the machine (Linux), or None: the measured clock counts from it."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def resumed(path: Path, wall_now_ms: int, elapsed_now_ms: int) -> ClockWatch:
    """The watch as the node's last run in this boot left it, so that a jump before this
    start is seen; a new one from now when there is none (first start, a reboot, another
    machine, an unreadable file), or when the clock has been set back since by more than
    the tolerance: the start kept was then taken while the clock was ahead (a node started
    before NTP set it right, a jump taken for a correction), and measured from it a later
    jump of up to that much would go unseen for the rest of the boot."""
    boot = boot_id()
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = json.loads(path.read_text())
        wall, elapsed = _instant(saved["wall_ms"]), _instant(saved["elapsed_ms"])
        since = saved.get("ahead_since_ms")
        since = None if since is None else _instant(since)
        if since is not None and not elapsed <= since <= elapsed_now_ms:
            raise ValueError("a hold that began outside the measured time kept")
        if boot is not None and saved["boot"] == boot and elapsed <= elapsed_now_ms:
            watch = ClockWatch(wall, elapsed, since)
            if watch.ahead_ms(wall_now_ms, elapsed_now_ms) >= -TOLERANCE_MS:
                return watch
    return ClockWatch(wall_now_ms, elapsed_now_ms)


def _instant(value: object) -> int:
    """A millisecond count as :func:`save` writes it: json also reads 1e400 or Infinity,
    which int() cannot take (OverflowError, which stopped the node's start)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not a count of milliseconds: {value!r}")
    return value


def save(watch: ClockWatch, path: Path) -> None:
    """Keep the watch's starting point for the next run (see :func:`resumed`). Not synced:
    a power cut that loses it is a reboot, after which it does not count anyway."""
    boot = boot_id()
    if boot is None:
        return
    state = {"boot": boot, "wall_ms": watch.wall_at_start_ms,
             "elapsed_ms": watch.elapsed_at_start_ms, "ahead_since_ms": watch.ahead_since_ms}
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(json.dumps(state))
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk: not one left per run
        raise
