"""The inference service with real ONNX Runtime sessions: dispatch, coalescing, swaps, metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.observation.metrics import InferenceMetrics
from agent.serving.contract import RequestError
from agent.serving.engine import CostModel, LoadedModel
from agent.serving.inference import BatchingPolicy, InferenceService
from tests.support.models import MID_FEATURES, TINY_FEATURES, loaded, mid_bytes, tiny_bytes
from wire.contract import ModelContract, TensorSpec

RNG = np.random.default_rng(7)


def _rows(n: int, features: int = TINY_FEATURES) -> np.ndarray:
    return RNG.standard_normal((n, features)).astype(np.float32)


def _reference(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    result: np.ndarray = model.session.run(None, {"input": x})[0]
    return result


def _service(registry: CollectorRegistry, model: LoadedModel, **policy: Any) -> InferenceService:
    service = InferenceService("m", InferenceMetrics(registry), policy=BatchingPolicy(**policy))
    service.activate(model)
    return service


def _costed(model: LoadedModel, fixed_s: float, per_row_s: float = 0.0) -> LoadedModel:
    """The same session with a chosen cost, to steer dispatch deterministically."""
    model.cost = CostModel(fixed_s=fixed_s, per_row_s=per_row_s)
    return model


async def test_a_request_gets_the_models_own_answer() -> None:
    registry = CollectorRegistry()
    model = loaded(tiny_bytes())
    service = _service(registry, model)
    x = _rows(3)
    result = await service.infer({"input": x})
    np.testing.assert_allclose(result["output"], _reference(model, x), rtol=1e-6)
    assert registry.get_sample_value("agent_inference_requests_total", {"outcome": "ok"}) == 1
    await service.close()


async def test_concurrent_requests_share_calls_and_each_gets_its_rows() -> None:
    registry = CollectorRegistry()
    model = _costed(loaded(tiny_bytes()), fixed_s=0.0002)  # coalesced, under the inline budget
    service = _service(registry, model, max_rows=16)
    inputs = [_rows(n) for n in (1, 2, 3) * 10]
    results = await asyncio.gather(*(service.infer({"input": x}) for x in inputs))
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result["output"], _reference(model, x), rtol=1e-5, atol=1e-6)
    calls = registry.get_sample_value("agent_inference_batch_rows_count")
    assert calls is not None
    assert calls < len(inputs) / 2
    assert registry.get_sample_value("agent_inference_batch_rows_sum") == 60
    await service.close()


async def test_costly_batches_run_on_a_worker_thread() -> None:
    registry = CollectorRegistry()
    model = loaded(mid_bytes())
    service = _service(registry, model, inline_budget_us=0.0)
    inputs = [_rows(1, MID_FEATURES) for _ in range(8)]
    results = await asyncio.gather(*(service.infer({"input": x}) for x in inputs))
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result["output"], _reference(model, x), rtol=1e-4, atol=1e-5)
    threaded = registry.get_sample_value("agent_inference_batches_total", {"dispatch": "thread"})
    assert threaded is not None
    assert 1 <= threaded < 8
    assert registry.get_sample_value("agent_inference_batches_total", {"dispatch": "inline"}) == 0
    await service.close()


async def test_fast_models_run_directly_without_coalescing() -> None:
    registry = CollectorRegistry()
    service = _service(registry, _costed(loaded(tiny_bytes()), fixed_s=0.00001))
    await asyncio.gather(*(service.infer({"input": _rows(1)}) for _ in range(5)))
    assert registry.get_sample_value("agent_inference_batch_rows_count") == 5
    assert service.metadata().parameters["dispatch"] == "direct"
    await service.close()


async def test_with_batching_off_every_request_is_its_own_call() -> None:
    registry = CollectorRegistry()
    service = _service(registry, _costed(loaded(tiny_bytes()), fixed_s=0.0002), enabled=False)
    await asyncio.gather(*(service.infer({"input": _rows(1)}) for _ in range(6)))
    assert registry.get_sample_value("agent_inference_batch_rows_count") == 6
    await service.close()


async def test_max_wait_holds_a_partial_batch_open() -> None:
    registry = CollectorRegistry()
    service = _service(
        registry, _costed(loaded(tiny_bytes()), fixed_s=0.0002), max_wait_ms=50, max_rows=4
    )
    first = asyncio.ensure_future(service.infer({"input": _rows(1)}))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(service.infer({"input": _rows(1)}))
    await asyncio.gather(first, second)
    assert registry.get_sample_value("agent_inference_batch_rows_count") == 1
    await service.close()


async def test_requests_of_other_shapes_are_not_mixed() -> None:
    registry = CollectorRegistry()
    model = _costed(loaded(tiny_bytes()), fixed_s=0.0002)
    # Widen the contract's feature dim to symbolic so two shapes are valid; ORT rejects one.
    model.contract = ModelContract(
        inputs=(TensorSpec(name="input", datatype="FP32", shape=(-1, -1)),),
        outputs=model.contract.outputs,
    )
    service = _service(registry, model)
    good = service.infer({"input": _rows(1)})
    bad = service.infer({"input": _rows(1, TINY_FEATURES + 1)})
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(results[0], dict)
    assert isinstance(results[1], Exception)
    assert registry.get_sample_value("agent_inference_requests_total", {"outcome": "failed"}) == 1
    await service.close()


async def test_invalid_requests_count_their_reason_and_leave_the_service_serving() -> None:
    registry = CollectorRegistry()
    service = _service(registry, loaded(tiny_bytes()))
    with pytest.raises(RequestError, match="NaN"):
        await service.infer({"input": np.full((1, TINY_FEATURES), np.nan, np.float32)})
    with pytest.raises(RequestError, match="unknown output"):
        await service.infer({"input": _rows(1)}, ["nope"])
    assert registry.get_sample_value("agent_inference_rejections_total", {"reason": "non_finite"})
    assert registry.get_sample_value(
        "agent_inference_rejections_total", {"reason": "unknown_output"}
    )
    assert (await service.infer({"input": _rows(1)}))["output"].shape == (1, 8)
    await service.close()


async def test_a_service_without_a_model_is_live_but_not_ready() -> None:
    registry = CollectorRegistry()
    service = InferenceService("m", InferenceMetrics(registry))
    assert not service.ready
    with pytest.raises(RequestError) as caught:
        await service.infer({"input": _rows(1)})
    assert caught.value.reason == "not_ready"
    await service.close()


async def test_requests_in_flight_finish_on_the_model_they_started_with() -> None:
    registry = CollectorRegistry()
    old = _costed(loaded(mid_bytes(0), version=1), fixed_s=0.01)  # forces a worker thread
    new = loaded(mid_bytes(1), version=2)
    service = _service(registry, old)
    x = _rows(1, MID_FEATURES)
    in_flight = asyncio.ensure_future(service.infer_versioned({"input": x}))
    await asyncio.sleep(0)
    assert old.in_flight == 1
    assert service.activate(new) is old
    after_version, after = await service.infer_versioned({"input": x})
    before_version, before = await in_flight
    assert (before_version, after_version) == (1, 2)
    np.testing.assert_allclose(before["output"], _reference(old, x), rtol=1e-4)
    np.testing.assert_allclose(after["output"], _reference(new, x), rtol=1e-4)
    await asyncio.wait_for(service.drained(old), 1)
    assert old.in_flight == 0
    info = registry.get_sample_value(
        "agent_model_info", {"model": "m", "version": "2", "sha256": new.sha256}
    )
    assert info == 1
    assert (
        registry.get_sample_value(
            "agent_model_info", {"model": "m", "version": "1", "sha256": old.sha256}
        )
        is None
    )
    await service.close()


async def test_a_lone_request_runs_inline_and_a_busy_batch_on_a_worker_thread() -> None:
    registry = CollectorRegistry()
    # 500 µs a call: under the inline budget, over the budget for a loop with others waiting.
    service = _service(registry, _costed(loaded(tiny_bytes()), fixed_s=0.0005))
    await service.infer({"input": _rows(1)})
    assert registry.get_sample_value("agent_inference_batches_total", {"dispatch": "inline"}) == 1
    await asyncio.gather(*(service.infer({"input": _rows(1)}) for _ in range(8)))
    threaded = registry.get_sample_value("agent_inference_batches_total", {"dispatch": "thread"})
    assert threaded is not None
    assert threaded >= 1
    await service.close()
