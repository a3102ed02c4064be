"""One way for a test to wait: ask a condition until it holds, or fail naming what never came.

`poll` for synchronous tests (processes, servers, files), `poll_async` for tests on the loop,
which may pass the event a fake sets on every change so a wait ends at the change, not at the
next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def poll(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """`condition()`'s first truthy value, asked every `interval` s for at most `timeout` s.

    `alive`, asked before each try, returns why waiting is pointless (a process that exited,
    with its log) or None; the test then fails at once with that text instead of timing out.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and (dead := alive()) is not None:
            pytest.fail(f"while waiting for {what}: {dead}")
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(interval)


async def poll_async(
    condition: Callable[[], T | None],
    within_s: float,
    what: str,
    *,
    changed: asyncio.Event | None = None,
    interval: float = 0.1,
) -> T:
    """`condition()`'s first truthy value within `within_s` s, re-asked whenever `changed` is
    set (then cleared) and at least every `interval` s."""
    try:
        async with asyncio.timeout(within_s):
            while not (value := condition()):
                if changed is None:
                    await asyncio.sleep(interval)
                    continue
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), interval)
    except TimeoutError:
        raise AssertionError(f"not within {within_s} s: {what}") from None
    return value
