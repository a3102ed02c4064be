"""The release pipeline's collectors take `(registry, namespace)`; the default namespace keeps
the exported names dashboards and alerts use."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from agent.releases.lifecycle import ModelState
from agent.releases.metrics import OTHER, SwapMetrics, model_label
from wire.reasons import Reason


@pytest.mark.parametrize(
    ("namespace", "prefix"),
    [("agent", "agent_"), ("edge", "edge_")],
)
def test_names_join_the_namespace(namespace: str, prefix: str) -> None:
    registry = CollectorRegistry()
    metrics = SwapMetrics(registry, namespace, known=lambda: {"m"})
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
    SwapMetrics(registry, known=lambda: {"m"}).ended("m", ModelState.FAILED, Reason.LOAD_FAILED)
    assert (
        registry.get_sample_value(
            "agent_model_update_failures_total", {"model": "m", "reason": "load_failed"}
        )
        == 1
    )


@pytest.mark.parametrize(
    ("name", "known", "label"),
    [
        ("m", {"m"}, "m"),  # serves, or the store holds a verified release of it
        ("forged-7f3a", {"m"}, OTHER),  # a name only a refused manifest claimed
        ("m", set(), OTHER),
        (OTHER, {"m"}, OTHER),
    ],
)
def test_the_model_label_comes_from_a_closed_set(name: str, known: set[str], label: str) -> None:
    assert model_label(name, known) == label


def test_refusals_under_names_no_release_verified_add_one_series() -> None:
    registry = CollectorRegistry()
    metrics = SwapMetrics(registry, known=lambda: {"m"})
    for i in range(300):
        metrics.ended(f"forged-{i}", ModelState.REJECTED, Reason.SIGNATURE_INVALID)
    samples = [
        s
        for family in registry.collect()
        if family.name == "agent_model_update_failures"
        for s in family.samples
        if s.name.endswith("_total")
    ]
    assert [(s.labels["model"], s.value) for s in samples] == [(OTHER, 300.0)]
