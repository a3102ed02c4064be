"""Real servers for the HTTP API tests: the v2 service on loopback in front of real models."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from prometheus_client import CollectorRegistry

from agent.observation.metrics import InferenceMetrics
from agent.serving.engine import LoadedModel, RuntimeOptions, load_model
from agent.serving.http import HttpService, HttpSettings, MetricsService
from agent.serving.inference import InferenceService, ModelMetadata
from agent.serving.v2 import ServedModel
from deployment.examples.onnx_models import tiny_mlp

TINY_FEATURES = 32
TINY_OUTPUTS = 8


@functools.cache
def tiny_model_bytes() -> bytes:
    return bytes(tiny_mlp().SerializeToString())


def load_tiny(version: int = 1) -> LoadedModel:
    data = tiny_model_bytes()
    return load_model(
        data,
        name="tiny",
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        options=RuntimeOptions(),
        max_rows=32,
    )


class SlowModel:
    """A served model that answers after `delay_s`, echoing its input: for drain behaviour."""

    def __init__(self, name: str, delay_s: float, *, fail: bool = False) -> None:
        self.name = name
        self.delay_s = delay_s
        self.fail = fail
        self.finished = 0
        self.started = asyncio.Event()
        self.ready = True
        self._reference = load_tiny()

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(self.name, (7,), "test", self._reference.contract, {})

    async def infer_versioned(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        request_id: str | None = None,
    ) -> tuple[int, dict[str, np.ndarray]]:
        self.started.set()
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the runtime fell over")
        self.finished += 1
        return 7, {"output": np.asarray(inputs["input"])}


@dataclass(frozen=True)
class Harness:
    """A started `HttpService` and a client session pointed at it."""

    url: str
    client: aiohttp.ClientSession
    registry: CollectorRegistry
    models: dict[str, ServedModel]
    server: HttpService

    def rejections(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "agent_inference_rejections_total", {"reason": reason}
        )
        return value or 0.0

    async def post_json(self, path: str, document: object) -> tuple[int, Any]:
        async with self.client.post(self.url + path, data=json.dumps(document)) as response:
            return response.status, await response.json(content_type=None)

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.client.get(self.url + path) as response:
            return response.status, await response.json(content_type=None)


@asynccontextmanager
async def serving(
    models: Mapping[str, ServedModel] | None = None,
    *,
    metrics: InferenceMetrics | None = None,
    max_body_bytes: int = 1 << 20,
    max_input_bytes: int | None = None,
) -> AsyncIterator[Harness]:
    """Serve `models` (default: tiny_mlp as "tiny", active) on 127.0.0.1, on a free port.

    Pass the `metrics` the models record into, so that the harness reads one registry.
    """
    metrics = metrics or InferenceMetrics(CollectorRegistry())
    owned: list[InferenceService] = []
    if models is None:
        service = InferenceService("tiny", metrics)
        service.activate(load_tiny())
        owned.append(service)
        models = {"tiny": service}
    live = dict(models)
    settings = HttpSettings(host="127.0.0.1", http_port=0, max_request_bytes=max_body_bytes)
    server = HttpService(live, metrics, settings, max_input_bytes=max_input_bytes)
    await server.start()
    try:
        async with aiohttp.ClientSession() as client:
            yield Harness(f"http://127.0.0.1:{server.port}", client, metrics.registry, live, server)
    finally:
        await server.stop(grace_s=1.0)
        for service in owned:
            await service.close()


@asynccontextmanager
async def metrics_serving(registry: CollectorRegistry) -> AsyncIterator[str]:
    """Serve `registry` at /metrics on a free loopback port; yield the URL."""
    server = MetricsService(registry, HttpSettings(host="127.0.0.1", metrics_port=0))
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/metrics"
    finally:
        await server.stop(grace_s=1.0)
