"""Manifests refused before any install (forged, malformed, expired, older), by the name they
claim: kept apart from the statuses, so they cannot touch what serves under that name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import structlog

from agent.releases.lifecycle import ModelState, ModelStatus
from agent.releases.manifest import ReleaseManifest
from agent.releases.metrics import SwapMetrics
from wire.reasons import Reason

log = structlog.get_logger(__name__)
MAX_REJECTIONS_KEPT = 8
_MAX_NAME = 63


class Rejections:
    """The newest `MAX_REJECTIONS_KEPT` rejections (forged names are unbounded)."""

    def __init__(self, metrics: SwapMetrics, wall_clock: Callable[[], datetime]) -> None:
        self._metrics = metrics
        self._wall_clock = wall_clock
        self.entries: dict[str, ModelStatus] = {}
        self.listeners: list[Callable[[ModelStatus], None]] = []

    def unverified(self, raw: object, reason: Reason, message: str) -> ModelStatus:
        """Refuse a manifest that did not verify; its name is echoed only if it could be valid."""
        name = raw.get("name") if isinstance(raw, Mapping) else None
        # Only a name that could be valid is echoed: it keys reported state.
        safe = (
            name if isinstance(name, str) and name.isprintable() and len(name) <= _MAX_NAME else "?"
        )
        return self._publish(safe, reason, message, None)

    def reject(self, manifest: ReleaseManifest, reason: Reason, message: str) -> ModelStatus:
        """Refuse a verified manifest that must not be installed (an older version, say)."""
        return self._publish(manifest.name, reason, message, manifest)

    def _publish(
        self, name: str, reason: Reason, message: str, manifest: ReleaseManifest | None
    ) -> ModelStatus:
        self._metrics.ended(name, ModelState.REJECTED, reason)
        status = ModelStatus(
            name=name,
            version=manifest.version if manifest is not None else None,
            sha256=manifest.sha256 if manifest is not None else None,
            state=ModelState.REJECTED,
            reason=reason,
            message=message[:500],
            since=self._wall_clock(),
        )
        log.warning("manifest_rejected", model=name, reason=reason, error=status.message)
        # Forged names are unbounded: keep the newest few, dropping the oldest.
        self.entries.pop(name, None)
        self.entries[name] = status
        while len(self.entries) > MAX_REJECTIONS_KEPT:
            del self.entries[next(iter(self.entries))]
        for listener in self.listeners:
            listener(status)
        return status
