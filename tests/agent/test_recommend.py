"""Recommendation maths: which configuration meets a target, and the container's resources."""

from __future__ import annotations

import pytest

from agent.observation.recommend import (
    MIB,
    ConfigRun,
    Knobs,
    LoadPoint,
    SwapPoint,
    Target,
    cpu_limit,
    memory_limit,
    recommend,
    verdict,
)
from agent.settings import AgentSettings

ONE = Knobs(1, 32, 1, batching=True)
TWO = Knobs(2, 32, 1, batching=True)
DIRECT = Knobs(1, 1, 1, batching=False)


def _point(
    offered: float, p99: float | None = 10.0, *, cores: float = 0.5, achieved: float | None = None
) -> LoadPoint:
    return LoadPoint(
        offered_rps=offered,
        achieved_rps=offered if achieved is None else achieved,
        p50_ms=None if p99 is None else p99 / 2,
        p99_ms=p99,
        errors=0,
        cpu_cores=cores,
        peak_rss_bytes=100 * MIB,
    )


def _run(knobs: Knobs, *points: LoadPoint, swap_peak_mib: int = 150) -> ConfigRun:
    swap = SwapPoint(100 * MIB, swap_peak_mib * MIB, 101 * MIB, 0.5)
    return ConfigRun(knobs, 90 * MIB, tuple(points), swap)


@pytest.mark.parametrize(
    ("run", "target", "why"),
    [
        (_run(ONE, _point(100), _point(200)), Target(150, 20), None),
        (_run(ONE, _point(100)), Target(150, 20), "not measured at 150"),
        (_run(ONE, _point(200, 30)), Target(150, 20), "p99 30 ms over the 20 ms budget"),
        (_run(ONE, _point(200, None)), Target(150, 20), "no request answered at 200/s"),
        (_run(ONE, _point(200, achieved=120)), Target(150, 20), "achieved 120 of 150"),
        (_run(ONE, _point(200, achieved=190)), Target(200, 20), None),  # within 5 %
        (
            ConfigRun(ONE, 0, (), None, error="exit 1: model did not load"),
            Target(1, 1),
            "failed: exit 1",
        ),
    ],
)
def test_verdict_says_why_a_configuration_misses(
    run: ConfigRun, target: Target, why: str | None
) -> None:
    result = verdict(run, target)
    assert result == why if why is None else why in (result or "")


def test_a_point_with_failed_requests_misses() -> None:
    failing = LoadPoint(200, 200, 1.0, 2.0, 3, 0.5, 100 * MIB)
    assert verdict(_run(ONE, failing), Target(100, 20)) == "3 failed requests at 200/s"


@pytest.mark.parametrize(
    ("peak_mib", "swap_peak_mib", "headroom", "limit_mib"),
    [
        (100, 150, 0.2, 180),  # steady 100 + swap transient 50, +20 %
        (100, 0, 0.2, 120),  # no swap measured: the load peak
        (200, 150, 0.0, 200),  # a load peak higher than the swap's
        (100, 151, 0.1, 167),  # 166.1 rounds up to whole MiB
    ],
)
def test_memory_limit_is_steady_plus_largest_transient_with_headroom(
    peak_mib: int, swap_peak_mib: int, headroom: float, limit_mib: int
) -> None:
    point = LoadPoint(100, 100, 1.0, 2.0, 0, 0.5, peak_mib * MIB)
    swap = SwapPoint(peak_mib * MIB, swap_peak_mib * MIB, peak_mib * MIB, 1.0)
    run = ConfigRun(ONE, 90 * MIB, (point,), swap if swap_peak_mib else None)
    assert memory_limit(run, headroom) == limit_mib * MIB


@pytest.mark.parametrize(
    ("cores", "target", "knobs", "host", "cpus"),
    [
        (0.5, Target(100, 20, cpu_headroom=0.25), ONE, 4.0, 1.0),  # tight p99: a whole thread
        (0.5, Target(100, 500, cpu_headroom=0.25), ONE, 4.0, 0.7),  # 0.625 up to tenths
        (0.01, Target(1, 500), ONE, 4.0, 0.1),  # never under 0.1
        (1.2, Target(100, 20, cpu_headroom=0.0), TWO, 4.0, 2.0),  # two intra-op threads
        (3.5, Target(100, 20, cpu_headroom=0.25), ONE, 2.0, 2.0),  # capped at the host
        (0.8, Target(100, 500, cpu_headroom=0.25), ONE, 4.0, 1.0),  # exactly 1.0 stays 1.0
    ],
)
def test_cpu_limit(cores: float, target: Target, knobs: Knobs, host: float, cpus: float) -> None:
    assert cpu_limit(cores, target, knobs, host) == pytest.approx(cpus)


def test_the_cheapest_configuration_meeting_the_target_wins() -> None:
    runs = [
        _run(TWO, _point(100, 5, cores=0.9), _point(200, 6, cores=1.4)),
        _run(ONE, _point(100, 8, cores=0.5), _point(200, 12, cores=0.8), swap_peak_mib=140),
        _run(DIRECT, _point(100, 9, cores=0.6), _point(200, 40, cores=1.0)),
    ]
    best = recommend(runs, Target(150, 20, memory_headroom=0.0), host_cpus=2)
    assert best.met
    assert best.knobs == ONE
    assert best.predicted_p99_ms == 12
    assert best.predicted_peak_rss_bytes == 140 * MIB
    assert best.memory_limit_bytes == 140 * MIB
    assert best.swap_transient_bytes == 40 * MIB
    assert best.nano_cpus == 1_000_000_000
    assert set(best.rejected) == {DIRECT.label()}


def test_when_nothing_meets_the_target_the_closest_is_named_as_such() -> None:
    runs = [
        _run(ONE, _point(200, 50, achieved=150)),
        _run(TWO, _point(200, 40, achieved=180)),
        ConfigRun(DIRECT, 0, (), None, error="killed"),
    ]
    best = recommend(runs, Target(200, 20), host_cpus=2)
    assert not best.met
    assert best.knobs == TWO
    assert "no configuration met" in best.why
    assert len(best.rejected) == 3


def test_nothing_measured_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing was measured"):
        recommend([], Target(1, 1), host_cpus=1)
    with pytest.raises(ValueError, match="could be measured"):
        recommend([ConfigRun(ONE, 0, (), None, error="boom")], Target(1, 1), host_cpus=1)


@pytest.mark.parametrize(
    ("rps", "p99", "headroom"), [(0, 10, 0.2), (10, 0, 0.2), (10, 10, -0.1), (float("nan"), 1, 0)]
)
def test_a_target_without_rate_or_budget_is_refused(
    rps: float, p99: float, headroom: float
) -> None:
    with pytest.raises(ValueError, match=r"target|headroom"):
        Target(rps, p99, memory_headroom=headroom)


@pytest.mark.parametrize("knobs", [ONE, TWO, DIRECT])
def test_the_recommended_environment_configures_the_agent(knobs: Knobs) -> None:
    settings = AgentSettings.from_environment(knobs.environment())
    policy = settings.batching
    assert settings.runtime.intra_op_threads == knobs.intra_op_threads
    assert (policy.max_rows, policy.worker_threads, policy.enabled) == (
        knobs.max_batch,
        knobs.worker_threads,
        knobs.batching,
    )
