"""Per-model figures and resources against limits: metrics, windows, the headroom alarm."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os

import numpy as np
import psutil
import pytest
from prometheus_client import CollectorRegistry

from agent.observation.limits import Limits
from agent.observation.metrics import InferenceMetrics
from agent.observation.profile import (
    MAX_REPORTED_MODELS,
    REPORTED_MODEL_FIELDS,
    HeadroomAlarm,
    ModelSnapshot,
    Snapshot,
    live_profile,
    model_profiles,
    reported_profile,
)
from agent.observation.resources import ResourceCollector, Resources, headroom_low
from agent.serving.engine import RuntimeOptions, load_model
from agent.serving.inference import InferenceService
from tests.support.models import TINY_FEATURES, loaded, tiny_bytes

MIB = 1 << 20
GIB = 1 << 30


def _resources(rss: int, limit: int | None) -> Resources:
    return Resources(rss, None, 4, 10, 1.0, Limits("v2", limit, None, 2))


@pytest.mark.parametrize(
    ("rss_mib", "limit_mib", "was_low", "low"),
    [
        (800, 1000, False, False),  # 200 MiB left of 1000: 20 %, over the 10 % threshold
        (910, 1000, False, True),  # 9 %: raise
        (870, 1000, True, True),  # 13 %: still under the 15 % that clears
        (840, 1000, True, False),  # 16 %: clear
        (1100, 1000, False, True),  # past the limit
        (5000, None, False, False),  # no limit, no alarm
    ],
)
def test_the_headroom_alarm_raises_under_the_threshold_and_clears_above_it(
    rss_mib: int, limit_mib: int | None, was_low: bool, low: bool
) -> None:
    resources = _resources(rss_mib * MIB, None if limit_mib is None else limit_mib * MIB)
    assert headroom_low(resources, was_low, alert_fraction=0.1) is low


def test_headroom_and_limits_are_gauges_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    ResourceCollector(registry, limits=Limits("v2", 64 * GIB, 1.5, 2))
    get = registry.get_sample_value
    rss = psutil.Process().memory_info().rss
    headroom = get("agent_memory_headroom_bytes")
    assert headroom is not None
    assert abs(64 * GIB - rss - headroom) < 64 * MIB  # the reading a moment later
    assert get("agent_memory_limit_bytes") == 64 * GIB
    assert get("agent_cpu_limit_cores") == 1.5
    assert (get("agent_threads") or 0) >= 1
    assert (get("agent_resident_memory_peak_bytes") or 0) >= rss * 0.5


def test_without_a_memory_limit_there_is_no_headroom_series() -> None:
    registry = CollectorRegistry()
    ResourceCollector(registry, limits=Limits("none", None, None, 2))
    assert registry.get_sample_value("agent_memory_headroom_bytes") is None
    assert registry.get_sample_value("agent_cpu_limit_cores") == 2


def _model(
    counts: tuple[int, ...], compute_s: float, batches: tuple[int, ...] = (0, 0)
) -> ModelSnapshot:
    return ModelSnapshot(counts, 0.0, batches, float(sum(batches)), compute_s)


def _at(at: float, cpu: float, **models: ModelSnapshot) -> Snapshot:
    return Snapshot(at, 0, 0, 0, (0, 0, 0), 0.0, (0, 0), 0.0, cpu, 100 * MIB, models)


def test_cpu_is_shared_among_models_by_their_compute_time() -> None:
    before = _at(0.0, 10.0, a=_model((0, 0, 0), 1.0), b=_model((0, 0, 0), 1.0))
    after = _at(
        2.0,
        11.0,  # 1 s of process CPU in the window
        a=_model((100, 0, 0), 1.3, (100, 0)),  # 0.3 s of compute: 3/4 of the CPU, 100 answers
        b=_model((0, 50, 0), 1.1, (0, 10)),  # 0.1 s: 1/4, 50 answers in 10 calls of 5 rows
        c=_model((10, 0, 0), 0.0),  # appeared during the window, computed nothing
    )
    profiles = model_profiles(before, after, (0.001, 0.01))
    assert profiles["a"]["cpu_ms_per_inference"] == 7.5
    assert profiles["b"]["cpu_ms_per_inference"] == 5.0
    assert profiles["b"]["batch_rows_mean"] == 1.0  # (sum 10 rows over 10 calls)
    assert profiles["a"]["requests_per_s"] == 50
    assert profiles["c"]["requests"] == 10
    assert profiles["c"]["cpu_ms_per_inference"] == 0
    assert profiles["b"]["latency_p50_ms"] == pytest.approx(5.5)


async def test_each_model_gets_its_own_latency_batches_and_load_memory() -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    services = {name: InferenceService(name, metrics) for name in ("a", "b")}
    services["a"].activate(loaded(tiny_bytes(), name="a"))
    services["b"].activate(loaded(tiny_bytes(), name="b"))
    x = np.zeros((1, TINY_FEATURES), dtype=np.float32)
    await asyncio.gather(*(services["a"].infer({"input": x}) for _ in range(3)))
    await services["b"].infer({"input": x})
    get = registry.get_sample_value
    assert get("agent_model_request_duration_seconds_count", {"model": "a"}) == 3
    assert get("agent_model_request_duration_seconds_count", {"model": "b"}) == 1
    assert get("agent_model_batch_rows_sum", {"model": "a"}) == 3
    assert (get("agent_model_compute_seconds_total", {"model": "b"}) or 0) > 0
    assert get("agent_model_load_resident_bytes", {"model": "a"}) is not None
    assert get("agent_model_swap_transient_bytes", {"model": "a"}) is None  # no swap yet
    services["a"].activate(loaded(tiny_bytes(1), name="a", version=2))
    assert get("agent_model_swap_transient_bytes", {"model": "a"}) is not None
    metrics.forget_model("b")
    assert get("agent_model_request_duration_seconds_count", {"model": "b"}) is None
    for service in services.values():
        await service.close()


def test_a_load_measures_the_resident_memory_it_adds() -> None:
    readings = itertools.count(100 * MIB, 30 * MIB)  # before: 100 MiB, after: 130 MiB
    data = tiny_bytes()
    model = load_model(
        data,
        name="m",
        version=1,
        sha256=hashlib.sha256(data).hexdigest(),
        options=RuntimeOptions(),
        max_rows=4,
        resident_bytes=lambda: next(readings),
    )
    assert model.load_rss_delta_bytes == 30 * MIB


async def test_the_live_profile_carries_models_and_resources() -> None:
    metrics = InferenceMetrics(CollectorRegistry())
    service = InferenceService("m", metrics)
    service.activate(loaded(tiny_bytes()))
    limits = Limits("v2", 32 * GIB, 1.0, os.cpu_count() or 1)
    task = asyncio.ensure_future(live_profile(metrics, 0.2, limits=limits))
    await asyncio.sleep(0.05)
    await service.infer({"input": np.zeros((2, TINY_FEATURES), dtype=np.float32)})
    profile = await task
    assert profile["models"]["m"]["requests"] == 1
    assert profile["models"]["m"]["batch_rows_mean"] == 2
    assert profile["resources"]["memory_limit_mb"] == 32 * 1024
    assert profile["limits"]["cpu_quota_cores"] == 1.0
    assert 0 < profile["resources"]["memory_headroom_mb"] < 32 * 1024
    await service.close()


def test_the_alarm_reports_each_transition_once() -> None:
    alarm = HeadroomAlarm(alert_fraction=0.1)
    readings = [800, 950, 960, 870, 840, 830]  # MiB of a 1000 MiB limit
    kinds = [alarm.update(_resources(rss * MIB, 1000 * MIB)) for rss in readings]
    assert kinds == [None, "memory_headroom_low", None, None, "memory_headroom_recovered", None]
    with pytest.raises(ValueError, match="alert fraction"):
        HeadroomAlarm(1.0)


def test_the_reported_profile_is_bounded_and_nulls_models_gone() -> None:
    models = {
        f"m{i:02d}": {"latency_p99_ms": 1.0, "requests": 5, "extra": "x"}
        for i in range(MAX_REPORTED_MODELS + 4)
    }
    window = {"window_s": 60.0, "cpu_percent": 12.5}
    report = reported_profile(
        window, models, _resources(100 * MIB, GIB), at="now", gone=["old", "m00"]
    )
    assert report["models_omitted"] == 4
    assert len(report["models"]) == MAX_REPORTED_MODELS + 1  # + "old": null
    assert report["models"]["old"] is None
    assert set(report["models"]["m00"]) == set(REPORTED_MODEL_FIELDS)  # nothing unbounded
    assert report["memory_headroom_mb"] == 924.0
    assert len(json.dumps(report)) < 4096
