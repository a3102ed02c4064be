"""Profiles: histogram quantiles and window maths (pure), and a live profile."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.observation.metrics import InferenceMetrics
from agent.observation.profile import Snapshot, live_profile, quantile, window_profile


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ([0, 0, 0], 0.5, None),
        ([10, 0, 0], 0.5, 0.5),  # inside the first bucket (0, 1]
        ([0, 10, 0], 0.5, 1.5),  # inside (1, 2]
        ([5, 5, 0], 0.99, 1.98),
        ([0, 0, 4], 0.5, 2.0),  # +Inf bucket: the last finite bound
    ],
)
def test_quantile_interpolates_within_the_bucket(
    counts: list[int], q: float, expected: float | None
) -> None:
    result = quantile((1.0, 2.0), counts, q)
    assert result == (None if expected is None else pytest.approx(expected))


def _snapshot(at: float, ok: int, counts: tuple[int, ...], total: float, cpu: float) -> Snapshot:
    return Snapshot(at, ok, 0, 0, counts, total, (ok, 0), float(ok), cpu, 100 * 2**20)


def test_a_window_reports_rates_latency_and_cpu() -> None:
    before = _snapshot(10.0, 100, (100, 0, 0), 5.0, 1.0)
    after = _snapshot(12.0, 300, (300, 0, 0), 15.0, 2.0)
    profile = window_profile(before, after, (0.1, 1.0))
    assert profile["requests_ok"] == 200
    assert profile["requests_per_s"] == 100
    assert profile["latency_mean_ms"] == 50
    assert profile["cpu_percent"] == 50
    assert profile["batch_rows_mean"] == 1


async def test_a_live_profile_sees_inference_done_during_it() -> None:
    metrics = InferenceMetrics(CollectorRegistry())
    for _ in range(3):
        metrics.ok.inc()
        metrics.total.observe(0.002)
    profile = await live_profile(metrics, 0.05)
    assert profile["requests_ok"] == 0
    assert isinstance(profile["rss_mb"], float)
    assert profile["rss_mb"] > 0
    with pytest.raises(ValueError, match="between 0 and 60"):
        await live_profile(metrics, float(np.float64(120)))
