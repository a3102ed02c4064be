"""Inference metrics: Prometheus semantics of the loop-thread counters and histograms."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.observation.metrics import Distribution, InferenceMetrics
from wire.reasons import Reason


@pytest.mark.parametrize(
    ("value", "bucket"),
    [(0.0, 0), (0.5, 0), (1.0, 0), (1.5, 1), (2.0, 1), (2.1, 2), (99.0, 2)],
)
def test_a_value_lands_in_the_first_bucket_whose_bound_it_does_not_exceed(
    value: float, bucket: int
) -> None:
    distribution = Distribution((1.0, 2.0))
    distribution.observe(value)
    assert distribution.counts.index(1) == bucket


def test_histograms_and_counters_read_back_through_the_registry() -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    metrics.total.observe(0.0002)
    metrics.total.observe(0.003)
    metrics.ok.inc()
    metrics.reject(Reason.NON_FINITE)
    get = registry.get_sample_value
    assert get("agent_inference_request_duration_seconds_count") == 2
    assert get("agent_inference_request_duration_seconds_sum") == pytest.approx(0.0032)
    assert get("agent_inference_request_duration_seconds_bucket", {"le": "0.00025"}) == 1
    assert get("agent_inference_request_duration_seconds_bucket", {"le": "+Inf"}) == 2
    assert get("agent_inference_requests_total", {"outcome": "rejected"}) == 1
    assert get("agent_inference_rejections_total", {"reason": "non_finite"}) == 1
    assert b"# TYPE agent_inference_request_duration_seconds histogram" in generate_latest(registry)


def test_model_info_keeps_one_series_per_name_across_swaps() -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    for version in range(1, 50):
        metrics.set_model("m", version, f"sha{version}")
    exposition = generate_latest(registry).decode()
    assert exposition.count("agent_model_info{") == 1
    assert 'version="49"' in exposition
