"""Telemetry at the desired cadence: a profile of the agent on `telemetry`, and each model's
health (requests, error rate, p50/p99 over the window) handed to the reported properties, with
the bounded reported `profile` (resources against the limits, a few figures per model)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import psutil

from agent.observation.metrics import LATENCY_BUCKETS, InferenceMetrics, LoopFailures
from agent.observation.profile import (
    ModelCounters,
    Snapshot,
    model_health,
    model_profiles,
    reported_profile,
    take_snapshot,
    window_profile,
)
from agent.observation.resources import Resources
from agent.releases.swap import ModelManager
from agent.serving.inference import InferenceService
from agent.ticks import ticks
from module.outbox import Outbox
from wire.desired import TelemetrySettings
from wire.reported import ModelHealth
from wire.telemetry import TELEMETRY_SCHEMA, TelemetryModel, TelemetryRecord, to_message

TELEMETRY = "telemetry"

Health = dict[str, float | int | None]


def counters(service: InferenceService) -> ModelCounters | None:
    model = service.model
    if model is None:
        return None
    return ModelCounters(id(model), model.served, model.failed, tuple(model.latency.counts))


def _health(health: Health | None) -> ModelHealth | None:
    return None if health is None else ModelHealth.model_validate(health)


class Telemetry:
    """Runs until cancelled; `retune` applies new desired settings at once."""

    def __init__(
        self,
        services: Mapping[str, InferenceService],
        manager: ModelManager,
        metrics: InferenceMetrics,
        outbox: Outbox,
        *,
        on_health: Callable[[Mapping[str, Health]], None],
        resources: Callable[[], Resources],
        on_profile: Callable[[dict[str, Any]], None],
        failures: LoopFailures | None = None,
    ) -> None:
        self._failures = failures or LoopFailures()
        self._services = services
        self._manager = manager
        self._metrics = metrics
        self._outbox = outbox
        self._on_health = on_health
        self._resources = resources
        self._on_profile = on_profile
        self._profiled: set[str] = set()  # models in the last reported profile
        self._settings = TelemetrySettings()
        self._changed = asyncio.Event()
        self.health: dict[str, Health] = {}

    def retune(self, settings: TelemetrySettings) -> None:
        if settings != self._settings:
            self._settings = settings
            self._changed.set()

    async def run(self) -> None:
        while True:
            settings = self._settings
            self._changed.clear()
            if not settings.enabled:
                await self._changed.wait()
                continue
            # A new interval takes effect at once, not at the old interval's next tick (which
            # could be a day away).
            emitter = asyncio.ensure_future(self._emit(settings.interval_s))
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({emitter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                emitter.cancel()
                waiter.cancel()
                await asyncio.gather(emitter, waiter, return_exceptions=True)
            if emitter.done() and not emitter.cancelled():
                emitter.result()  # re-raises what the emitter died of

    async def _emit(self, interval_s: float) -> None:
        process = psutil.Process()
        metrics = self._metrics
        before = take_snapshot(metrics, process)
        models_before = self._counters()
        async for _ in ticks(interval_s):
            try:
                before, models_before = self._window(process, before, models_before)
            except Exception:  # one window lost, not telemetry: the next one covers both
                self._failures.record("telemetry")

    def _window(
        self, process: psutil.Process, before: Snapshot, models_before: dict[str, ModelCounters]
    ) -> tuple[Snapshot, dict[str, ModelCounters]]:
        metrics = self._metrics
        after = take_snapshot(metrics, process)
        models_after = self._counters()
        window_s = after.at - before.at
        self.health = {
            name: model_health(models_before.get(name), now, window_s, LATENCY_BUCKETS)
            for name, now in models_after.items()
        }
        now = datetime.now(UTC)
        at = now.isoformat()
        window = window_profile(before, after, metrics.total.bounds)
        profiles = model_profiles(before, after, metrics.total.bounds)
        resources = self._resources()
        record = TelemetryRecord(
            at=now,
            models={
                name: TelemetryModel(
                    version=s.version,
                    state=s.state,
                    health=_health(self.health.get(name)),
                    profile=profiles.get(name),
                )
                for name, s in self._manager.statuses.items()
            },
            inference=window,
            resources=resources.as_json(),
        )
        self._outbox.put(TELEMETRY, to_message(record), TELEMETRY_SCHEMA)
        self._on_health(self.health)
        gone = self._profiled - profiles.keys()
        self._on_profile(reported_profile(window, profiles, resources, at=at, gone=gone))
        self._profiled = set(profiles)
        return after, models_after

    def _counters(self) -> dict[str, ModelCounters]:
        found = {name: counters(service) for name, service in self._services.items()}
        return {name: c for name, c in found.items() if c is not None}
