"""Assembling the agent's services from settings, without a hub (`python -m agent serve`).

Two ways to get models:
* `--model PATH`: one ONNX file, served as is (no store, no swaps);
* otherwise the managed mode: the model store in `EDGEML_STATE_DIR` is restored at start, and
  signed releases arrive from `EDGEML_WATCH_DIR` (the IoT Edge module adds the twin as a
  second source of releases on top of the same `ModelManager`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from agent.app import App, Service, idle_forever
from agent.observation.limits import Limits, read_limits
from agent.observation.metrics import InferenceMetrics, LoopFailures, register_process_metrics
from agent.observation.resources import ResourceCollector
from agent.observation.watch import Observer, ObserverTicks, Sinks
from agent.releases.download import Downloader
from agent.releases.folder import FolderSource
from agent.releases.quarantine import Quarantine
from agent.releases.store import ModelStore, StoreError
from agent.releases.swap import HttpsArtifacts, ModelManager
from agent.serving.auth import Credentials, SecretsReloader
from agent.serving.connections import AcceptErrors
from agent.serving.engine import LoadedModel, ModelLoadError, load_model
from agent.serving.http import HttpService, MetricsService
from agent.serving.inference import InferenceService
from agent.settings import AgentSettings

log = structlog.get_logger(__name__)


class FileModelSource:
    """Loads one ONNX file into an `InferenceService` once the process is up.

    Loading runs in `run`, after the HTTP service has started, so liveness answers at once
    and readiness turns true only when the model is loaded and warmed up.
    """

    def __init__(self, path: Path, service: InferenceService, settings: AgentSettings) -> None:
        self.name = "model-file"
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
            version=1,
            sha256=hashlib.sha256(data).hexdigest(),
            options=self._settings.runtime,
            max_rows=self._settings.batching.max_rows,
        )

    async def stop(self, grace_s: float) -> None:
        await self._service.close()


class ManagedModels:
    """The model store and manager as a service: restore at start, abandon installs at stop."""

    def __init__(
        self, store: ModelStore, manager: ModelManager, services: dict[str, InferenceService]
    ) -> None:
        self.name = "model-manager"
        self.store = store
        self.manager = manager
        self._services = services

    async def start(self) -> None:
        await asyncio.to_thread(self.store.open)

    async def run(self) -> None:
        await self.manager.restore()

    async def stop(self, grace_s: float) -> None:
        await self.manager.close()
        for service in self._services.values():
            await service.close()


class Agent:
    """The parts of a running agent that adapters (the IoT Edge module) reach into."""

    def __init__(
        self,
        settings: AgentSettings,
        registry: CollectorRegistry | None = None,
        limits: Limits | None = None,
        *,
        sinks: Sinks | None = None,
        labelled: bool = False,
    ) -> None:
        """`sinks` take window profiles and drift and quality alerts (an adapter's outbox);
        `labelled`: feedback can label predictions, so they are remembered for it."""
        self.limits = limits or read_limits()
        # Thread counts left unset follow the container's CPU limit, read once here.
        runtime = settings.runtime.for_limits(self.limits)
        self.settings = settings = settings.model_copy(update={"runtime": runtime})
        self.registry = registry or CollectorRegistry()
        register_process_metrics(self.registry)
        self.resources = ResourceCollector(self.registry, limits=self.limits)
        self.metrics = InferenceMetrics(self.registry)
        # Drift and quality of what is served; the adapter tunes it from its desired state.
        # One count of the items long-running loops failed on and went past.
        self.failures = LoopFailures(self.registry)
        self.observer = Observer(
            self.registry, sinks=sinks, keeps_predictions=labelled, failures=self.failures
        )
        log.info(
            "runtime_limits",
            **self.limits.as_json(),
            intra_op_threads=runtime.intra_op_threads,
        )
        # Read once here, so a missing or malformed secret stops the start with its reason.
        self.credentials = (
            Credentials(settings.auth, registry=self.registry)
            if settings.auth.tls_cert_file is not None
            else None
        )
        self.services: dict[str, InferenceService] = {}
        self.manager: ModelManager | None = None
        self._sources: list[Service] = []
        if settings.model_path is not None:
            name = settings.model_name or settings.model_path.stem
            service = self.services[name] = self._new_service(name)
            self._sources.append(FileModelSource(settings.model_path, service, settings))
        else:
            self._sources += self._managed()

    def _new_service(self, name: str) -> InferenceService:
        return InferenceService(
            name,
            self.metrics,
            policy=self.settings.batching,
            limits=self.settings.limits,
            observer=self.observer,
        )

    def _managed(self) -> list[Service]:
        settings = self.settings
        keys = settings.keys.load()
        if not keys:
            raise ValueError(
                "no trusted manifest keys: set EDGEML_TRUSTED_KEYS or EDGEML_TRUSTED_KEYS_DIR "
                "(or serve a single file with --model)"
            )
        tls = ssl.create_default_context()
        if settings.download.artifact_ca_file is not None:
            tls.load_verify_locations(cafile=str(settings.download.artifact_ca_file))
        store = ModelStore(
            settings.store.state_dir,
            keep_old_artifacts=settings.store.keep_old_artifacts,
            free_space_margin_bytes=settings.store.free_space_margin_bytes,
        )
        self.manager = ModelManager(
            store=store,
            trusted_keys=keys,
            artifacts=HttpsArtifacts(Downloader(settings.download, ssl_context=tls)),
            services=self.services,
            service_factory=self._new_service,
            registry=self.registry,
            settings=settings.swap,
            runtime=settings.runtime,
            batching=settings.batching,
            probation=settings.probation,
            quarantine=Quarantine(settings.quarantine) if settings.quarantine.enabled else None,
            observer=self.observer,
        )
        sources: list[Service] = [
            ManagedModels(store, self.manager, self.services),
            ObserverTicks(self.observer),
        ]
        folder = settings.folder
        if folder.watch_dir is not None:
            sources.append(
                FolderSource(
                    folder.watch_dir,
                    self.manager,
                    debounce_s=folder.watch_debounce_s,
                    failures=self.failures,
                )
            )
        return sources

    def make_app(self, *extra: Service) -> App:
        """The process: model sources, `extra` (adapters), then the servers."""
        app = App(self.services_in_start_order(*extra), grace_s=self.settings.shutdown_grace_s)
        if self.manager is not None:
            app.on_stop_requested.append(self.manager.abandon_installs)
        return app

    def services_in_start_order(self, *extra: Service) -> list[Service]:
        """Model sources first, then `extra` (adapters), then the servers: HTTP stops first."""
        settings = self.settings
        reloader = (
            [SecretsReloader(self.credentials, self.failures)]
            if self.credentials is not None
            else []
        )
        accept_errors = AcceptErrors(self.registry)
        return [
            *self._sources,
            *extra,
            *reloader,
            MetricsService(
                self.registry,
                settings.http,
                credentials=self.credentials,
                accept_errors=accept_errors,
            ),
            HttpService(
                self.services,
                self.metrics,
                settings.http,
                credentials=self.credentials,
                accept_errors=accept_errors,
            ),
        ]


EXPECTED_FAILURES = (ValueError, ModelLoadError, StoreError)


def run_process(
    build: Callable[[], App], process: str, expected: tuple[type[Exception], ...] = ()
) -> int:
    """Build and run an app as a process: 0 after a clean stop, 1 after a failure.

    Expected failures (bad settings, an unusable model or store) end in one clear log line;
    anything else is a bug and keeps its traceback.
    """
    log = structlog.get_logger(process).bind(process=process)
    try:
        app = build()
        asyncio.run(app.run())
    except Exception as error:
        cause: BaseException = error
        while isinstance(cause, BaseExceptionGroup):  # from the app's TaskGroup
            cause = cause.exceptions[0]
        if not isinstance(cause, (*EXPECTED_FAILURES, *expected)):
            raise
        # An expected outcome: one clear line, no traceback.
        log.error("process_failed", error=str(cause), error_type=type(cause).__name__)  # noqa: TRY400
        return 1
    log.info("process_stopped", reason=app.stop_reason, failed=app.failed)
    return 1 if app.failed else 0


def build_app(settings: AgentSettings, registry: CollectorRegistry | None = None) -> App:
    return Agent(settings, registry).make_app()
