"""Every datatype the agent accepts answers what ONNX Runtime answers, over HTTP JSON and over
the binary tensor data extension: an Identity model per datatype, and scikit-learn's
OneHotEncoder for strings (a BYTES input read as anything but the string itself answers zeros
with a 200). The route half is in tests/module/test_datatype_parity_e2e.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.observation.metrics import InferenceMetrics
from agent.serving import protocol
from agent.serving.contract import ONNX_TO_V2
from agent.serving.engine import RuntimeOptions, load_model
from agent.serving.inference import InferenceService
from tests.support.http_fixtures import Harness, serving
from tests.support.parity import (
    DATATYPES,
    ONEHOT_SAMPLE,
    assert_same,
    binary_request,
    decode_response,
    identity_model,
    json_request,
    onehot_model,
    reference,
    sample,
)

TRANSPORTS = ("json", "binary")


def test_every_datatype_the_agent_accepts_has_a_parity_model() -> None:
    assert set(DATATYPES) == set(ONNX_TO_V2.values())


@asynccontextmanager
async def _serving_model(model: bytes) -> AsyncIterator[Harness]:
    metrics = InferenceMetrics(CollectorRegistry())
    service = InferenceService("m", metrics)
    service.activate(
        load_model(
            model,
            name="m",
            version=1,
            sha256=hashlib.sha256(model).hexdigest(),
            options=RuntimeOptions(),
            max_rows=4,
        )
    )
    try:
        async with serving({"m": service}, metrics=metrics) as api:
            yield api
    finally:
        await service.close()


async def _infer(
    api: Harness, feed: Mapping[str, np.ndarray], transport: str
) -> dict[str, tuple[str, np.ndarray]]:
    url = api.url + "/v2/models/m/infer"
    if transport == "json":
        data, headers = json.dumps(json_request(feed)).encode(), {}
    else:
        data, length = binary_request(feed)
        headers = {protocol.HEADER_LENGTH: str(length)}
    async with api.client.post(url, data=data, headers=headers) as response:
        body = await response.read()
        assert response.status == 200, body[:300]
        answered = response.headers.get(protocol.HEADER_LENGTH)
    assert (answered is not None) == (transport == "binary")
    return decode_response(body, None if answered is None else int(answered))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("datatype", DATATYPES)
async def test_identity_answers_what_onnx_runtime_answers(datatype: str, transport: str) -> None:
    model, feed = identity_model(datatype), {"x": sample(datatype)}
    expected = reference(model, feed)["y"]
    async with _serving_model(model) as api:
        answered = await _infer(api, feed, transport)
    assert_same(answered["y"], expected, f"{datatype} over {transport}")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_one_hot_encoder_reads_the_strings_it_was_sent(transport: str) -> None:
    model, feed = onehot_model(), {"category": ONEHOT_SAMPLE}
    expected = reference(model, feed)
    # The reference itself: "a" is the first category, an unknown one is all zeros.
    np.testing.assert_array_equal(expected["variable"][0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(expected["variable"][2], [0.0, 0.0, 0.0])
    async with _serving_model(model) as api:
        answered = await _infer(api, feed, transport)
    assert set(answered) == set(expected)
    for name, array in expected.items():
        assert_same(answered[name], array, f"{name} over {transport}")
