"""The release pipeline's collectors take `(registry, namespace)`; the default namespace keeps
the exported names dashboards and alerts use."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from agent.releases.lifecycle import ModelState
from agent.releases.metrics import SwapMetrics
from wire.reasons import Reason


@pytest.mark.parametrize(
    ("namespace", "prefix"),
    [("agent", "agent_"), ("edge", "edge_")],
)
def test_names_join_the_namespace(namespace: str, prefix: str) -> None:
    registry = CollectorRegistry()
    metrics = SwapMetrics(registry, namespace)
    metrics.ended("m", ModelState.ROLLED_BACK, Reason.PROBATION_ERRORS)
    metrics.swapped("m", 0.3)
    read = registry.get_sample_value
    assert (
        read(f"{prefix}model_update_failures_total", {"model": "m", "reason": "probation_errors"})
        == 1
    )
    assert read(f"{prefix}model_updates_total", {"model": "m", "state": "rolled_back"}) == 1
    assert read(f"{prefix}model_updates_total", {"model": "m", "state": "active"}) == 1
    assert read(f"{prefix}model_swap_seconds_count") == 1
    assert read(f"{prefix}model_swap_seconds_bucket", {"le": "0.5"}) == 1


def test_the_default_namespace_is_the_agents() -> None:
    registry = CollectorRegistry()
    SwapMetrics(registry).ended("m", ModelState.FAILED, Reason.LOAD_FAILED)
    assert (
        registry.get_sample_value(
            "agent_model_update_failures_total", {"model": "m", "reason": "load_failed"}
        )
        == 1
    )
