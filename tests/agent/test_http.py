"""The v2 REST API and /metrics over real HTTP on loopback, in front of a real ONNX model."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import gevent
import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from agent.observation.metrics import InferenceMetrics
from agent.serving.inference import InferenceService
from agent.serving.protocol import HEADER_LENGTH
from tests.support.http_fixtures import (
    TINY_FEATURES,
    TINY_OUTPUTS,
    SlowModel,
    load_tiny,
    metrics_serving,
    serving,
)
from wire.reasons import Reason

RNG = np.random.default_rng(11)


def _rows(n: int) -> np.ndarray:
    return RNG.standard_normal((n, TINY_FEATURES)).astype(np.float32)


def _reference(x: np.ndarray) -> np.ndarray:
    result: np.ndarray = load_tiny().session.run(None, {"input": x})[0]
    return result


def _json_request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": list(x.shape),
        "data": x.ravel().tolist(),
    }
    return {"inputs": [tensor], **extra}


# -- health and metadata -------------------------------------------------------------------------


async def test_liveness_answers_while_readiness_waits_for_the_model() -> None:
    metrics = InferenceMetrics(CollectorRegistry())
    cold = InferenceService("tiny", metrics)
    try:
        async with serving({"tiny": cold}, metrics=metrics) as api:
            assert await api.get_json("/v2/health/live") == (200, {"live": True})
            status, body = await api.get_json("/v2/health/ready")
            assert (status, body) == (503, {"error": "not ready: tiny"})
            status, body = await api.get_json("/v2/models/tiny/ready")
            assert (status, body) == (503, {"error": "model 'tiny' is not ready"})

            cold.activate(load_tiny())
            assert await api.get_json("/v2/health/ready") == (200, {"ready": True})
            ready = await api.get_json("/v2/models/tiny/ready")
            assert ready == (200, {"name": "tiny", "ready": True})
    finally:
        await cold.close()


async def test_readiness_without_any_model_is_503() -> None:
    async with serving({}) as api:
        assert await api.get_json("/v2/health/ready") == (503, {"error": "no model is loaded yet"})


async def test_server_metadata_lists_the_binary_extension() -> None:
    async with serving() as api:
        status, body = await api.get_json("/v2")
    assert status == 200
    assert body["name"] == "edge-mlops-agent"
    assert "binary_tensor_data" in body["extensions"]
    assert isinstance(body["version"], str)


@pytest.mark.parametrize("path", ["/v2/models/tiny", "/v2/models/tiny/versions/1"])
async def test_model_metadata_shows_the_contract_with_symbolic_dims(path: str) -> None:
    async with serving() as api:
        status, body = await api.get_json(path)
    assert status == 200
    assert body["name"] == "tiny"
    assert body["versions"] == ["1"]
    assert body["platform"] == "onnxruntime_onnx"
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, TINY_FEATURES]}]
    assert body["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, TINY_OUTPUTS]}]
    assert body["parameters"]["ready"] is True


# -- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer"])
async def test_json_inference_returns_the_models_numbers_and_echoes_the_id(path: str) -> None:
    x = _rows(3)
    async with serving() as api:
        status, body = await api.post_json(path, _json_request(x, id="req-42"))
    assert status == 200
    assert body["model_name"] == "tiny"
    assert body["model_version"] == "1"
    assert body["id"] == "req-42"
    [output] = body["outputs"]
    assert output["name"] == "output"
    assert output["datatype"] == "FP32"
    assert output["shape"] == [3, TINY_OUTPUTS]
    got = np.asarray(output["data"], dtype=np.float32).reshape(3, TINY_OUTPUTS)
    np.testing.assert_allclose(got, _reference(x), rtol=1e-6)


async def test_nested_json_data_is_accepted() -> None:
    x = _rows(2)
    request = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 32], "data": x.tolist()}]
    }
    async with serving() as api:
        status, body = await api.post_json("/v2/models/tiny/infer", request)
    assert status == 200
    assert "id" not in body
    got = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(2, TINY_OUTPUTS)
    np.testing.assert_allclose(got, _reference(x), rtol=1e-6)


async def test_binary_request_and_binary_response_round_trip() -> None:
    x = _rows(4)
    header = json.dumps(
        {
            "id": "bin-1",
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [4, TINY_FEATURES],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    async with (
        serving() as api,
        api.client.post(
            api.url + "/v2/models/tiny/infer",
            data=header + x.tobytes(),
            headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
        ) as response,
    ):
        assert response.status == 200
        body = await response.read()
        json_length = int(response.headers[HEADER_LENGTH])
    document = json.loads(body[:json_length])
    assert document["id"] == "bin-1"
    [output] = document["outputs"]
    assert output["parameters"] == {"binary_data_size": 4 * TINY_OUTPUTS * 4}
    assert "data" not in output
    got = np.frombuffer(body[json_length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(got, _reference(x), rtol=1e-6)


async def test_binary_data_output_applies_unless_an_output_opts_out() -> None:
    x = _rows(1)
    request = _json_request(
        x,
        parameters={"binary_data_output": True},
        outputs=[{"name": "output", "parameters": {"binary_data": False}}],
    )
    async with serving() as api:
        status, body = await api.post_json("/v2/models/tiny/infer", request)
    assert status == 200
    assert len(body["outputs"][0]["data"]) == TINY_OUTPUTS


# -- refusals ------------------------------------------------------------------------------------

GOOD = json.dumps(_json_request(np.zeros((1, TINY_FEATURES), np.float32))).encode()


def _body(**tensor: Any) -> bytes:
    base = {"name": "input", "datatype": "FP32", "shape": [1, TINY_FEATURES]}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


@dataclass(frozen=True)
class Refusal:
    id: str
    method: str
    path: str
    body: bytes
    status: int
    reason: str
    words: str  # what the v2 error message must say
    headers: Mapping[str, str] = field(default_factory=dict)


INFER = "/v2/models/tiny/infer"
REFUSALS = [
    Refusal("malformed_json", "POST", INFER, b'{"inputs": [', 400, "bad_json", "not valid JSON"),
    Refusal("wrong_datatype", "POST", INFER, _body(datatype="FLOAT32", data=[0] * 32), 400,
            "bad_datatype", "'FLOAT32'"),
    Refusal("shape_data_mismatch", "POST", INFER, _body(data=[0.0] * 31), 400,
            "shape_data_mismatch", "31 data elements"),
    Refusal("oversize_tensor", "POST", INFER, _body(shape=[1 << 40, 32], data=[]), 413,
            "too_large", "needs"),
    Refusal("header_past_body", "POST", INFER, GOOD, 400, "bad_request", "the body has only",
            {HEADER_LENGTH: "99999"}),
    Refusal("unknown_model", "POST", "/v2/models/nope/infer", GOOD, 404, "unknown_model",
            "'nope'"),
    Refusal("unknown_version", "POST", "/v2/models/tiny/versions/9/infer", GOOD, 404,
            "unknown_model", "no version '9'"),
    Refusal("unknown_model_metadata", "GET", "/v2/models/nope", b"", 404, "unknown_model",
            "'nope'"),
    Refusal("wrong_method", "GET", INFER, b"", 405, "method_not_allowed", "allowed: POST"),
    Refusal("unknown_route", "GET", "/v2/nowhere", b"", 404, "not_found", "/v2/nowhere"),
    # Reaches the model: the inference service counts it, and the API must not count it again.
    Refusal("wrong_input_dtype", "POST", INFER, _body(datatype="INT64", data=[0] * 32), 400,
            "dtype_mismatch", "model expects FP32"),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS, ids=lambda case: case.id)
async def test_a_refusal_names_the_problem_counts_once_and_leaves_the_server_serving(
    case: Refusal,
) -> None:
    async with serving() as api:
        async with api.client.request(
            case.method, api.url + case.path, data=case.body, headers=case.headers
        ) as bad:
            assert bad.status == case.status
            assert bad.content_type == "application/json"
            error = await bad.json()
        assert set(error) == {"error"}
        assert case.words in error["error"]
        assert api.rejections(case.reason) == 1
        rejected = {"outcome": "rejected"}
        assert api.registry.get_sample_value("agent_inference_requests_total", rejected) == 1

        ok, answer = await api.post_json(INFER, json.loads(GOOD))
        assert ok == 200
        assert answer["outputs"][0]["shape"] == [1, TINY_OUTPUTS]


async def test_a_body_over_the_cap_is_refused_with_413() -> None:
    async with serving(max_body_bytes=4096) as api:
        big = _body(data=[0.0] * 32) + b" " * 8192
        async with api.client.post(api.url + "/v2/models/tiny/infer", data=big) as response:
            assert response.status == 413
            error = await response.json()
        assert "limit" in error["error"]
        assert api.rejections("too_large") == 1


async def test_a_chunked_body_over_the_cap_is_refused_with_413() -> None:
    """Without a Content-Length the cap still holds, enforced while reading."""

    async def chunks() -> Any:
        for _ in range(8):
            yield b" " * 1024

    async with serving(max_body_bytes=4096) as api:
        async with api.client.post(api.url + "/v2/models/tiny/infer", data=chunks()) as response:
            assert response.status == 413
            error = await response.json()
        assert "4096" in error["error"]
        assert api.rejections("too_large") == 1


async def test_a_compressed_body_is_capped_after_decompression() -> None:
    """A small gzip body that inflates past the cap is refused, not inflated into memory."""
    bomb = gzip.compress(b" " * (4 << 20))
    async with serving(max_body_bytes=64 << 10) as api:
        async with api.client.post(
            api.url + "/v2/models/tiny/infer", data=bomb, headers={"Content-Encoding": "gzip"}
        ) as response:
            assert response.status == 413
            await response.json()
        assert len(bomb) < 64 << 10
        assert api.rejections("too_large") == 1


async def test_a_model_not_ready_answers_503_and_counts_once() -> None:
    metrics = InferenceMetrics(CollectorRegistry())
    cold = InferenceService("tiny", metrics)
    try:
        async with serving({"tiny": cold}, metrics=metrics) as api:
            status, body = await api.post_json("/v2/models/tiny/infer", json.loads(GOOD))
            assert status == 503
            assert "no active version" in body["error"]
            assert api.rejections("not_ready") == 1
    finally:
        await cold.close()


async def test_a_failing_model_answers_500_with_a_v2_error() -> None:
    async with serving({"broken": SlowModel("broken", 0.0, fail=True)}) as api:
        status, body = await api.post_json("/v2/models/broken/infer", json.loads(GOOD))
    assert status == 500
    assert body == {"error": "inference failed on model 'broken'; see the agent log"}


async def test_hostile_names_and_paths_add_no_metric_series() -> None:
    async with serving() as api:

        def series() -> int:
            return sum(len(m.samples) for m in api.registry.collect())

        before = series()
        for index in range(20):
            await api.post_json(f"/v2/models/m{index}/infer", {})
            await api.get_json(f"/v2/random/{index}")
        assert series() == before
        assert api.rejections("unknown_model") == 20
        assert api.rejections("not_found") == 20


# -- lifecycle -----------------------------------------------------------------------------------


async def test_stop_lets_a_request_in_flight_finish_and_refuses_new_connections() -> None:
    slow = SlowModel("slow", delay_s=0.3)
    async with serving({"slow": slow}) as api:
        in_flight = asyncio.create_task(api.post_json("/v2/models/slow/infer", json.loads(GOOD)))
        await slow.started.wait()
        await api.server.stop(grace_s=2.0)
        status, body = await in_flight
        assert status == 200
        assert body["outputs"][0]["shape"] == [1, TINY_FEATURES]
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(api.url + "/v2/health/live")


async def test_stop_cuts_requests_that_outlive_the_grace() -> None:
    slow = SlowModel("slow", delay_s=30.0)
    async with serving({"slow": slow}) as api:
        in_flight = asyncio.create_task(api.post_json("/v2/models/slow/infer", json.loads(GOOD)))
        await slow.started.wait()
        started = time.monotonic()
        await api.server.stop(grace_s=0.2)
        assert time.monotonic() - started < 2.0
        with pytest.raises(aiohttp.ClientError):
            await in_flight
        assert slow.finished == 0


# -- /metrics ------------------------------------------------------------------------------------


async def test_metrics_endpoint_serves_the_injected_registry() -> None:
    registry = CollectorRegistry()
    InferenceMetrics(registry).reject(Reason.BAD_JSON)
    async with metrics_serving(registry) as url, aiohttp.ClientSession() as client:
        async with client.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with client.get(url, headers=accept) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert 'agent_inference_rejections_total{reason="bad_json"} 1.0' in text


# -- standard v2 clients work unchanged ----------------------------------------------------------


Call = Callable[..., Awaitable[Any]]


@asynccontextmanager
async def _triton(url: str) -> AsyncIterator[tuple[Any, Call]]:
    """A tritonclient and a `call(fn, *args)` that runs its methods off the event loop.

    tritonclient is synchronous and gevent-based: a connection belongs to the gevent hub of the
    thread that opened it, so every call of one client runs on one dedicated thread, while the
    server answers on the test's loop.
    """
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tritonclient")

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    client = await call(httpclient.InferenceServerClient, url.removeprefix("http://"))
    try:
        yield client, call
    finally:
        await call(client.close)
        await call(lambda: gevent.get_hub().destroy(destroy_loop=True))
        pool.shutdown(wait=True)


async def test_health_and_metadata_through_tritonclient() -> None:
    async with serving() as api, _triton(api.url) as (client, call):
        assert await call(client.is_server_live)
        assert await call(client.is_server_ready)
        assert await call(client.is_model_ready, "tiny")
        server = await call(client.get_server_metadata)
        metadata = await call(client.get_model_metadata, "tiny")
    assert "binary_tensor_data" in server["extensions"]
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, TINY_FEATURES]}
    ]


@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "json"])
async def test_inference_through_tritonclient(binary_data: bool) -> None:
    x = _rows(5)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_data)
    wanted = [httpclient.InferRequestedOutput("output", binary_data=binary_data)]
    async with serving() as api, _triton(api.url) as (client, call):
        result = await call(client.infer, "tiny", [tensor], request_id="t-1", outputs=wanted)
        # Without `outputs` tritonclient asks for all of them, in binary.
        every = await call(client.infer, "tiny", [tensor], model_version="1")
    got = result.as_numpy("output")
    assert got.shape == (5, TINY_OUTPUTS)
    np.testing.assert_allclose(got, _reference(x), rtol=1e-6)
    np.testing.assert_allclose(every.as_numpy("output"), _reference(x), rtol=1e-6)
    response = result.get_response()
    assert response["id"] == "t-1"
    assert response["model_name"] == "tiny"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
async def test_compressed_requests_through_tritonclient(algorithm: str) -> None:
    x = _rows(2)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    async with serving() as api, _triton(api.url) as (client, call):
        result = await call(
            client.infer,
            "tiny",
            [tensor],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
    np.testing.assert_allclose(result.as_numpy("output"), _reference(x), rtol=1e-6)


async def test_tritonclient_sees_the_v2_error_message() -> None:

    tensor = httpclient.InferInput("input", [1, TINY_FEATURES], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, TINY_FEATURES), np.float32))
    async with serving() as api, _triton(api.url) as (client, call):
        with pytest.raises(InferenceServerException) as caught:
            await call(client.infer, "missing", [tensor])
    assert "unknown model 'missing'" in caught.value.message()


async def test_300_requests_to_names_and_paths_nobody_serves_add_no_series_per_name() -> None:
    """Model names and paths in requests are the client's choice: never metric labels."""
    async with serving() as api:
        await api.get_json("/v2/models/tiny")  # every series a request can touch, once

        def series() -> int:
            return sum(len(family.samples) for family in api.registry.collect())

        before = series()
        for i in range(100):
            await api.post_json(f"/v2/models/nobody-{i}/infer", {"inputs": []})
            await api.get_json(f"/v2/models/nobody-{i}/ready")
            await api.get_json(f"/nowhere/{i}")
        # A few refusal reasons may be counted for the first time; nothing per name or path.
        assert series() - before <= 12
