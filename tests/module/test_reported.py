"""Reported properties: one patch in flight, later updates coalesced, failures retried."""

from __future__ import annotations

import asyncio
from typing import Any

from module.reported import ReportedProperties


class SlowHub:
    """Accepts patches after a delay; can be told to fail."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_next = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived = asyncio.Event()
        self.entered = asyncio.Event()

    async def send(self, patch: dict[str, Any]) -> None:
        self.in_flight += 1
        self.entered.set()
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            await asyncio.sleep(0.01)
            if self.fail_next:
                self.fail_next -= 1
                raise ConnectionError("hub unreachable")
            self.received.append(patch)
            self.arrived.set()
        finally:
            self.in_flight -= 1


async def _received(hub: SlowHub, count: int) -> None:
    async with asyncio.timeout(5):
        while len(hub.received) < count:
            hub.arrived.clear()
            await hub.arrived.wait()


async def test_updates_during_a_send_are_coalesced_into_one_later_patch() -> None:
    hub = SlowHub()
    reported = ReportedProperties(hub.send)
    runner = asyncio.ensure_future(reported.run())
    reported.update({"model": {"state": "downloading", "version": 2}})
    await asyncio.sleep(0.002)
    for state in ("verifying", "loading", "active"):
        reported.update({"model": {"state": state}})
    await _received(hub, 2)
    runner.cancel()
    assert hub.most_in_flight == 1
    assert hub.received == [
        {"model": {"state": "downloading", "version": 2}},
        {"model": {"state": "active"}},
    ]


async def test_a_failed_patch_is_retried_with_newer_values_winning() -> None:
    hub = SlowHub()
    hub.fail_next = 1
    reported = ReportedProperties(hub.send, retry_s=0.05)
    runner = asyncio.ensure_future(reported.run())
    reported.update({"model": {"state": "loading", "version": 3}, "agent": {"version": "1"}})
    await asyncio.sleep(0.02)  # the first send is failing now
    reported.update({"model": {"state": "active"}})
    await _received(hub, 1)
    runner.cancel()
    assert hub.received == [{"model": {"state": "active", "version": 3}, "agent": {"version": "1"}}]
    assert reported.failures == 1


async def test_a_null_reaches_the_hub_to_delete_a_key() -> None:
    hub = SlowHub()
    reported = ReportedProperties(hub.send)
    runner = asyncio.ensure_future(reported.run())
    reported.update({"drift": None})
    await _received(hub, 1)
    runner.cancel()
    assert hub.received == [{"drift": None}]


async def test_flush_sends_what_is_pending_at_shutdown() -> None:
    hub = SlowHub()
    reported = ReportedProperties(hub.send)
    reported.update({"agent": {"stopping": True}})
    assert await reported.flush(1.0)
    assert hub.received == [{"agent": {"stopping": True}}]


async def test_a_patch_cut_off_by_stopping_is_kept_for_the_final_flush() -> None:
    hub = SlowHub()
    hub.gate.clear()  # the hub holds the first patch
    reported = ReportedProperties(hub.send)
    runner = asyncio.get_running_loop().create_task(reported.run())
    reported.update({"model": {"state": "downloading"}})
    async with asyncio.timeout(5):
        await hub.entered.wait()
    reported.update({"agent": {"stopped": "now"}})
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    hub.gate.set()
    assert await reported.flush(1.0)
    assert hub.received == [{"model": {"state": "downloading"}, "agent": {"stopped": "now"}}]
