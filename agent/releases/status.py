"""The reported status of each model name: kept, shown in the v2 metadata, logged, and handed
to listeners (the module turns each into reported properties and alerts)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import structlog

from agent.releases.lifecycle import ModelState, ModelStatus
from agent.releases.manifest import ReleaseManifest
from agent.releases.metrics import SwapMetrics
from agent.serving.inference import InferenceService
from wire.reasons import Reason

log = structlog.get_logger(__name__)


class StatusBoard:
    """`statuses` by name; `publish` replaces one and tells every listener."""

    def __init__(
        self,
        services: Mapping[str, InferenceService],
        metrics: SwapMetrics,
        wall_clock: Callable[[], datetime],
        listeners: list[Callable[[ModelStatus], None]],
    ) -> None:
        self._services = services
        self._metrics = metrics
        self._wall_clock = wall_clock
        self.listeners = listeners
        self.statuses: dict[str, ModelStatus] = {}

    def publish(
        self,
        name: str,
        state: ModelState,
        reason: Reason | None,
        message: str,
        *,
        manifest: ReleaseManifest | None = None,
        version: int | None = None,
        sha256: str | None = None,
    ) -> ModelStatus:
        service = self._services.get(name)
        active = service.model if service is not None else None
        status = ModelStatus(
            name=name,
            version=manifest.version if manifest is not None else version,
            sha256=manifest.sha256 if manifest is not None else sha256,
            state=state,
            reason=reason,
            message=message[:500],
            since=self._wall_clock(),
            active_version=active.version if active is not None else None,
        )
        self.statuses[name] = status
        if service is not None:
            service.status = status.to_json()
        log.info(
            "model_status",
            model=name,
            version=status.version,
            state=state,
            reason=reason,
            message=status.message,
            active_version=status.active_version,
        )
        for listener in self.listeners:
            listener(status)
        return status

    def fail(
        self, manifest: ReleaseManifest, state: ModelState, reason: Reason, message: str
    ) -> None:
        log.warning(
            "install_failed",
            model=manifest.name,
            version=manifest.version,
            state=state,
            reason=reason,
            error=message,
        )
        self._metrics.ended(manifest.name, state, reason)
        self.publish(manifest.name, state, reason, message, manifest=manifest)
