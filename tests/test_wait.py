"""``wait_set``: the relay's and the desk's wait for work, with a timeout."""

from __future__ import annotations

import asyncio
import time

from node.wait import wait_set


async def test_returns_as_soon_as_the_event_is_set() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, event.set)
    started = time.monotonic()
    await wait_set(event, 5.0)
    assert time.monotonic() - started < 1.0


async def test_returns_after_the_timeout_and_leaves_no_timer_behind() -> None:
    event = asyncio.Event()
    started = time.monotonic()
    await wait_set(event, 0.05)
    assert time.monotonic() - started >= 0.04
    assert event.is_set()  # documented: a timeout sets the event
    event.clear()
    await wait_set(event, 0.01)  # a fresh timer, not the old one
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    assert not [h for h in scheduled if h._callback == event.set and not h.cancelled()]
