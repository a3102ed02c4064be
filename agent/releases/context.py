"""What the parts of a `ModelManager` share: the store and its writes, the services that serve
and the one switch between models, the statuses, the loader and the metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from agent.releases.loader import Loader
from agent.releases.metrics import SwapMetrics
from agent.releases.state import StoreState
from agent.releases.status import StatusBoard
from agent.releases.store import ModelStore, StoreError
from agent.serving.engine import LoadedModel
from agent.serving.inference import InferenceService

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class ReleaseContext:
    store: ModelStore
    services: MutableMapping[str, InferenceService]
    service_factory: Callable[[str], InferenceService]
    board: StatusBoard
    loader: Loader
    metrics: SwapMetrics
    drain_timeout_s: float
    clock: Callable[[], float]
    wall_clock: Callable[[], datetime]
    # Old sessions draining after a switch.
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def save(self, change: Callable[[StoreState], StoreState]) -> None:
        # On the loop, not a thread: writes stay ordered even when an install is cancelled
        # mid-write, and the file is a few hundred bytes (a few ms with its fsyncs).
        state = self.store.state
        changed = change(state)
        if changed is not state:  # a transition that changes nothing returns the state itself
            self.store.save(changed)

    def serving(self, name: str) -> LoadedModel | None:
        service = self.services.get(name)
        return service.model if service is not None else None

    def switch(self, name: str, model: LoadedModel) -> LoadedModel | None:
        """`model` serves `name` now; returns the model it replaced (draining)."""
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = self.service_factory(name)
        previous = service.activate(model)
        if previous is not None:
            # Requests in flight finish on the old session; then it is closed.
            release = service.release(previous, self.drain_timeout_s)
            task = asyncio.get_running_loop().create_task(release)
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        return previous

    def collect_garbage(self) -> None:
        try:
            removed = self.store.collect_garbage()
        except StoreError as error:
            log.warning("garbage_collection_failed", error=error.message)
            return
        if removed:
            log.info("artifacts_removed", files=list(removed))
