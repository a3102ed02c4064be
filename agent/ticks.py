"""One drift-free periodic tick for every periodic task of the agent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable


async def ticks(
    interval_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[int]:
    """Yield 1, 2, 3, ... at `interval_s` multiples from the start, whatever the body costs.

    A body slower than the interval skips the ticks it missed instead of firing them in a burst.
    """
    if interval_s <= 0:
        raise ValueError(f"interval must be positive, got {interval_s}")
    start = clock()
    number = 0
    while True:
        number += 1
        due = start + number * interval_s
        now = clock()
        if now > due:  # overran: resume on the next future tick
            number = int((now - start) // interval_s) + 1
            due = start + number * interval_s
        await sleep(due - now)
        yield number
