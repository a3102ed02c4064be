"""Collect what SDK handlers receive on the SDK's thread, and await it on the test's loop."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from azure.iot.device import Message

T = TypeVar("T")


class Inbox(Generic[T]):
    """Create it on the test's loop; pass `put` as the SDK handler (it runs on the SDK thread)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[T] = asyncio.Queue()

    def put(self, item: T) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self, timeout: float = 10.0) -> T:  # noqa: ASYNC109  # a test helper; one knob
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    def empty(self) -> bool:
        return self._queue.empty()

    def qsize(self) -> int:
        return self._queue.qsize()


def sdk_message(body: str | bytes, **system: Any) -> Message:
    """An SDK `Message` (its constructor is untyped, hence this typed front door)."""
    return Message(body, **system)  # type: ignore[no-untyped-call]  # the SDK's __init__ has no annotations
