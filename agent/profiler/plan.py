"""What a sweep measures: the grid of the agent's knobs, the offered loads, their durations."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from agent.observation.recommend import Knobs


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """What to measure: the knobs' grid, the offered loads, and the time each takes."""

    knobs: tuple[Knobs, ...]
    loads_rps: tuple[float, ...]
    warmup_s: float = 1.0
    measure_s: float = 4.0
    swap_rps: float | None = None  # the load under which the swap happens; None: no swap
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.knobs or not self.loads_rps:
            raise ValueError("a sweep needs at least one configuration and one load")
        if any(not rps > 0 for rps in self.loads_rps):
            raise ValueError(f"offered loads must be above 0 requests/s, not {self.loads_rps}")
        if not self.measure_s > 0 or self.warmup_s < 0:
            raise ValueError("a measured window lasts more than 0 s, a warm-up at least 0 s")


def knob_grid(
    threads: Iterable[int],
    max_batches: Iterable[int],
    worker_threads: Iterable[int],
    coalescing: Iterable[bool],
) -> tuple[Knobs, ...]:
    """Every combination that differs in behaviour, sorted.

    Without coalescing each request is its own call, so `max_batch` changes nothing and is
    measured once (at 1).
    """
    combos = {
        Knobs(t, b if c else 1, w, c)
        for t, b, w, c in itertools.product(threads, max_batches, worker_threads, coalescing)
    }
    return tuple(sorted(combos))
