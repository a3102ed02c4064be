"""A bounded, thread-safe log of items that threads and event loops can wait on.

The simulator appends on its own thread; tests read from theirs (blocking helpers) or from their
own event loop (async helpers). Waiters on a loop are woken with `call_soon_threadsafe`, so no
loop object is ever touched from a foreign thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

LISTENER_QUEUE_SIZE = 10_000


class _Listener(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[T] = asyncio.Queue(LISTENER_QUEUE_SIZE)
        self.dropped = 0

    def push(self, item: T) -> None:  # runs on the listener's loop
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1


class Feed(Generic[T]):
    """Keeps the newest `capacity` items and at most `max_bytes` of them as `size` counts;
    `dropped` counts the ones pushed out."""

    def __init__(
        self,
        capacity: int = 10_000,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        size: Callable[[T], int] = lambda _: 0,
    ) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._size = size
        self._bytes = 0
        self._condition = threading.Condition()
        self._listeners: set[_Listener[T]] = set()
        self.dropped = 0
        self.total = 0

    def append(self, item: T) -> None:
        with self._condition:
            self._items.append(item)
            self._bytes += self._size(item)
            while len(self._items) > 1 and (
                len(self._items) > self._capacity or self._bytes > self._max_bytes
            ):
                self._bytes -= self._size(self._items.popleft())
                self.dropped += 1
            self.total += 1
            self._condition.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener.loop.call_soon_threadsafe(listener.push, item)
            except RuntimeError:  # that loop is closed: its waiter is gone
                with self._condition:
                    self._listeners.discard(listener)

    def items(self) -> list[T]:
        with self._condition:
            return list(self._items)

    def clear(self) -> None:
        with self._condition:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._condition:
            return len(self._items)

    # -------------------------------------------------------- blocking (any thread but the hub's)

    def wait_for(self, predicate: Callable[[T], bool], timeout: float) -> T:
        """The first retained item matching `predicate`, waiting up to `timeout` seconds for it."""
        return self.wait_for_count(predicate, 1, timeout)[0]

    def wait_for_count(self, predicate: Callable[[T], bool], count: int, timeout: float) -> list[T]:
        """The first `count` retained items matching `predicate` (TimeoutError if too few came)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                found = [item for item in self._items if predicate(item)]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(found)} of {count} matching items after {timeout}s")
                self._condition.wait(remaining)

    # -------------------------------------------------------- async (any event loop)

    @contextlib.asynccontextmanager
    async def _listening(self) -> AsyncIterator[tuple[list[T], _Listener[T]]]:
        listener: _Listener[T] = _Listener(asyncio.get_running_loop())
        with self._condition:
            backlog = list(self._items)
            self._listeners.add(listener)
        try:
            yield backlog, listener
        finally:
            with self._condition:
                self._listeners.discard(listener)

    async def follow(self, *, backlog: bool = False) -> AsyncIterator[T]:
        """Each new item (and the retained ones first if `backlog`), until the caller stops."""
        async with self._listening() as (retained, listener):
            if backlog:
                for item in retained:
                    yield item
            while True:
                yield await listener.queue.get()

    async def next_matching(
        self,
        predicate: Callable[[T], bool],
        timeout: float,  # noqa: ASYNC109  # the same signature as the blocking wait_for
    ) -> T:
        """Like `wait_for`, without blocking the caller's event loop."""
        async with asyncio.timeout(timeout), self._listening() as (retained, listener):
            for item in retained:
                if predicate(item):
                    return item
            while True:
                item = await listener.queue.get()
                if predicate(item):
                    return item
