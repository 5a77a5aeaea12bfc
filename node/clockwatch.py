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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["HOLD_AT_MOST_MS", "TOLERANCE_MS", "ClockWatch", "elapsed_ms"]

#: wall-clock progress beyond the time measured that counts as a jump: far above NTP's
#: slewing and small steps, far below the day that dates are reckoned in
TOLERANCE_MS = 10 * 60 * 1000
#: measured time a jump may last before it is taken for a correction
HOLD_AT_MOST_MS = 10 * 60 * 1000
#: Linux counts a suspended machine's sleep in CLOCK_BOOTTIME; elsewhere, monotonic time
_MEASURED = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


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
