"""Standalone serving: one model file behind the HTTP API, no hub (`python -m agent serve`)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from agent.app import App, idle_forever
from agent.engine import LoadedModel, ModelLoadError, load_model
from agent.http import HttpService, MetricsService
from agent.inference import InferenceService
from agent.metrics import InferenceMetrics, register_process_metrics
from agent.settings import AgentSettings

log = structlog.get_logger(__name__)


class FileModelSource:
    """Loads one ONNX file into an `InferenceService` once the process is up.

    Loading runs in `run`, after the HTTP service has started, so liveness answers at once
    and readiness turns true only when the model is loaded and warmed up.
    """

    def __init__(self, path: Path, service: InferenceService, settings: AgentSettings) -> None:
        self.name = "model-source"
        self._path = path
        self._service = service
        self._settings = settings

    async def start(self) -> None:
        if not self._path.is_file():
            raise ModelLoadError(f"model file {self._path} does not exist")

    async def run(self) -> None:
        model = await asyncio.to_thread(self._load)
        self._service.activate(model)
        log.info(
            "model_active",
            model=model.name,
            sha256=model.sha256,
            batch1_cost_us=round(model.cost.estimate(1) * 1e6, 1),
            batchable=model.contract.batchable,
        )
        await idle_forever()

    def _load(self) -> LoadedModel:
        data = self._path.read_bytes()
        return load_model(
            data,
            name=self._service.name,
            version="1",
            sha256=hashlib.sha256(data).hexdigest(),
            options=self._settings.runtime_options(),
            max_rows=self._settings.max_batch,
        )

    async def stop(self, grace_s: float) -> None:
        await self._service.close()


def build_app(settings: AgentSettings, registry: CollectorRegistry | None = None) -> App:
    if settings.model_path is None:
        raise ValueError("no model: pass --model PATH or set EDGEML_MODEL_PATH")
    registry = registry or CollectorRegistry()
    register_process_metrics(registry)
    metrics = InferenceMetrics(registry)
    name = settings.model_name or settings.model_path.stem
    service = InferenceService(
        name,
        metrics,
        policy=settings.batching_policy(),
        limits=settings.request_limits(),
    )
    return App(
        [
            FileModelSource(settings.model_path, service, settings),
            MetricsService(registry, host=settings.host, port=settings.metrics_port),
            HttpService(
                {name: service},
                metrics,
                host=settings.host,
                port=settings.http_port,
                max_body_bytes=settings.max_request_bytes,
            ),
        ],
        grace_s=settings.shutdown_grace_s,
    )
