"""Telling a wall clock that jumped ahead from time that has passed.

A node decides by the date: a certificate past its expiry is refused on arrival, and the
sweep expires open loops whose certificates have lapsed. Both are final (a signed
rejection goes back; an expired loop cannot be confirmed). A wall clock set ahead by
mistake, even for seconds (a bad NTP source, an operator's typo), made a node refuse and
expire certificates that were still valid, for good. The running node therefore compares
the wall clock's progress with the time that has passed since it started, measured by a
clock nobody sets (``CLOCK_BOOTTIME``: it counts a suspended machine's sleep too), and
holds such decisions while the two disagree by more than :data:`TOLERANCE_MS`.

A clock that is set right again ends the hold by itself; one corrected forward on purpose
ends it with a restart of the node, which measures from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["TOLERANCE_MS", "ClockWatch", "elapsed_ms"]

#: wall-clock progress beyond the time measured that counts as a jump: far above NTP's
#: slewing and small steps, far below the day that dates are reckoned in
TOLERANCE_MS = 10 * 60 * 1000


def elapsed_ms() -> int:
    """Milliseconds on a clock that only moves forward, sleep included."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


@dataclass(frozen=True, slots=True)
class ClockWatch:
    """The wall clock and the measured clock read together once, at the node's start."""

    wall_at_start_ms: int
    elapsed_at_start_ms: int

    def ahead_ms(self, wall_now_ms: int, elapsed_now_ms: int) -> int:
        """How far the wall clock has gone beyond the time measured since the start
        (negative when it went back: that the node repairs elsewhere)."""
        return ((wall_now_ms - self.wall_at_start_ms)
                - (elapsed_now_ms - self.elapsed_at_start_ms))

    def jumped(self, wall_now_ms: int, elapsed_now_ms: int) -> bool:
        return self.ahead_ms(wall_now_ms, elapsed_now_ms) > TOLERANCE_MS
