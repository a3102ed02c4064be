"""The process lifecycle and the shared tick, from tables: stop order, one grace for all."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agent.app import App
from agent.ticks import ticks
from tests.support.clock import FakeClock


class Recorded:
    """A service that records its calls and takes `stop_cost_s` of the fake clock to stop."""

    def __init__(self, name: str, log: list[str], clock: FakeClock, stop_cost_s: float) -> None:
        self.name = name
        self._log = log
        self._clock = clock
        self._cost = stop_cost_s
        self.grace: float | None = None

    async def start(self) -> None:
        self._log.append(f"start {self.name}")

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def stop(self, grace_s: float) -> None:
        self.grace = grace_s
        self._clock.now += self._cost
        self._log.append(f"stop {self.name}")


@pytest.mark.parametrize(
    ("grace_s", "costs", "graces"),
    [
        (8.0, [1.0, 2.0, 3.0], [3.0, 5.0, 8.0]),  # reversed: the last started stops first
        (8.0, [0.0, 0.0, 0.0], [8.0, 8.0, 8.0]),
        (4.0, [1.0, 1.0, 5.0], [0.0, 0.0, 4.0]),  # one slow stop uses the grace up for all
        (2.0, [0.5], [2.0]),
    ],
)
async def test_services_stop_in_reverse_within_one_shared_grace(
    grace_s: float, costs: Sequence[float], graces: Sequence[float]
) -> None:
    clock, log = FakeClock(), list[str]()
    services = [Recorded(f"s{i}", log, clock, cost) for i, cost in enumerate(costs)]
    app = App(services, grace_s=grace_s, clock=clock, handle_signals=False)
    running = asyncio.ensure_future(app.run())
    await asyncio.sleep(0)
    app.request_stop("test")
    await asyncio.wait_for(running, 5)
    names = [s.name for s in services]
    assert log == [f"start {n}" for n in names] + [f"stop {n}" for n in reversed(names)]
    assert [s.grace for s in services] == pytest.approx(graces)
    assert app.stop_reason == "test"


async def test_a_failing_service_stops_the_others_and_is_raised() -> None:
    clock, log = FakeClock(), list[str]()

    class Failing(Recorded):
        async def run(self) -> None:
            raise RuntimeError("broken")

    services = [Recorded("a", log, clock, 0.0), Failing("b", log, clock, 0.0)]
    app = App(services, grace_s=1.0, clock=clock, handle_signals=False)
    with pytest.raises(ExceptionGroup) as failed:
        await asyncio.wait_for(app.run(), 5)
    assert failed.group_contains(RuntimeError)
    assert log[-2:] == ["stop b", "stop a"]


class Sleeps:
    """`sleep` for `ticks`: records what it is asked and advances the clock by it."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self.asked: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.asked.append(round(delay, 6))
        self._clock.now += delay


@pytest.mark.parametrize(
    ("interval_s", "body_costs", "numbers", "sleeps"),
    [
        (1.0, [0.0, 0.0, 0.0], [1, 2, 3], [1.0, 1.0, 1.0]),
        (1.0, [0.25, 0.25, 0.25], [1, 2, 3], [1.0, 0.75, 0.75]),  # no drift from body costs
        (1.0, [2.5, 0.0, 0.0], [1, 4, 5], [1.0, 0.5, 1.0]),  # an overrun skips missed ticks
        (0.5, [0.5, 0.0], [1, 2, 3], [0.5, 0.0, 0.5]),  # a body ending on the tick: at once
    ],
)
async def test_ticks(
    interval_s: float, body_costs: Sequence[float], numbers: list[int], sleeps: list[float]
) -> None:
    clock = FakeClock()
    sleep = Sleeps(clock)
    got: list[int] = []
    async for number in ticks(interval_s, clock=clock, sleep=sleep):
        got.append(number)
        if len(got) == len(numbers):
            break
        clock.now += body_costs[len(got) - 1]
    assert got == numbers
    assert sleep.asked == sleeps


@pytest.mark.parametrize("interval_s", [0.0, -1.0])
async def test_ticks_refuse_a_non_positive_interval(interval_s: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        await anext(ticks(interval_s))
