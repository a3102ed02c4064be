"""A model that overflows on finite inputs (x*x on 3e38) answers a counted, valid-JSON 422
naming the reason, never `NaN` with a 200; and the drift it is watched by stays finite."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from agent.observation.baseline import BaselinePack
from agent.observation.detector import MAX_SCORE
from agent.observation.drift import DriftSettings
from agent.observation.metrics import InferenceMetrics
from agent.observation.watch import Observer
from agent.serving import protocol
from agent.serving.engine import RuntimeOptions, load_model
from agent.serving.inference import InferenceService
from deployment.drift.baseline_pack import build_baseline
from tests.support.drift_packs import FAST
from tests.support.http_fixtures import Harness, serving
from tests.support.parity import binary_request, square_model
from tests.support.twin import twin


def _strict_json(body: bytes) -> Any:
    """The stdlib parser with NaN/Infinity refused, as JSON itself refuses them."""

    def refuse(literal: str) -> None:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(body, parse_constant=refuse)


def _request(value: float, rows: int = 1) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": [value] * (2 * rows)}
        ]
    }


async def _post(api: Harness, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with api.client.post(api.url + "/v2/models/sq/infer", data=data, headers=headers) as r:
        return r.status, await r.read()


def _pack() -> BaselinePack:
    x = np.random.default_rng(7).standard_normal((2000, 2)).astype(np.float32)
    document = build_baseline({"x": x}, {"y": x * x}, FAST)
    return BaselinePack.model_validate(document, strict=False)


async def test_an_overflowing_answer_is_a_counted_422_and_drift_stays_finite() -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    observer = Observer(
        registry, settings=DriftSettings(window_rows=20, max_sampled_per_second=1e6)
    )
    model = square_model()
    service = InferenceService("sq", metrics)
    service.activate(
        load_model(
            model,
            name="sq",
            version=1,
            sha256=hashlib.sha256(model).hexdigest(),
            options=RuntimeOptions(),
            max_rows=4,
        )
    )
    observer.attach("sq", 1, _pack(), "ab" * 32)
    service.observer = observer
    try:
        async with serving({"sq": service}, metrics=metrics) as api:
            refusals = []
            for value in (3e38, -3e38):
                refusals.append(await _post(api, json.dumps(_request(value)).encode(), {}))
            body, length = binary_request({"x": np.full((1, 2), 3e38, np.float32)})
            refusals.append(await _post(api, body, {protocol.HEADER_LENGTH: str(length)}))
            for status, answer in refusals:
                assert status == 422, answer
                error = _strict_json(answer)["error"]
                assert "non_finite_output" in error
                assert "'y'" in error
            assert api.rejections("non_finite_output") == 3
            outcome = {"outcome": "failed"}
            assert registry.get_sample_value("agent_inference_requests_total", outcome) == 0
            # Finite but extreme traffic that the model does answer (1e19 squared is 1e38),
            # then ordinary traffic: windows of both are scored.
            for index, value in enumerate([1e19] * 20 + [-1e19] * 20 + [0.5] * 20):
                status, answer = await _post(api, json.dumps(_request(value)).encode(), {})
                assert status == 200, answer
                _strict_json(answer)
                if index % 10 == 9:
                    observer.tick()  # as the periodic task would: the ring holds two windows
    finally:
        await service.close()
    observer.tick()
    drift = twin(observer.drift_entry("sq"))
    assert drift is not None
    assert drift["windows"] >= 3
    assert isinstance(drift["score"], float)
    assert math.isfinite(drift["score"])
    assert abs(drift["score"]) <= MAX_SCORE
    assert drift["state"] in {"warning", "drift"}  # extreme inputs still read as drift
    gauge = registry.get_sample_value("agent_drift_score", {"model": "sq"})
    assert gauge is not None
    assert math.isfinite(gauge)
    # The reported section is valid JSON (no NaN/Infinity literal anywhere in it).
    _strict_json(json.dumps(drift).encode())
