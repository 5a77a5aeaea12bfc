"""Waiting on an event with a timeout, without a task per wait."""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` is set or ``seconds`` pass, whichever comes first. A timeout sets
    the event too, so clear it before waiting again.

    ``asyncio.wait_for(event.wait(), seconds)`` does the same but makes a task per call
    (Python 3.11); the relay waits after every publish, so that shows in its CPU time."""
    timer = asyncio.get_running_loop().call_later(seconds, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()
