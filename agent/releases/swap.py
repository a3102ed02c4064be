"""Verified delivery and zero-downtime hot swap of models, one pipeline per model name.

`ModelManager` composes the parts, each a module of one idea:

    install.py     answering manifests as received; the pipeline of one install
    probation.py   watching a new model after its swap; its crash-guard trial
    rollback.py    serving the last-known-good again
    restore.py     at start: blame a crashed install, serve what the store says
    rejections.py  manifests refused before any install
    status.py      the reported status of each name
    loader.py      loading stored releases in a low-priority worker thread
    context.py     what they share: store writes, the switch, statuses, loader, metrics
    metrics.py     the pipeline's collectors, `(registry, namespace)`

Every failure leaves the active model serving and ends in a `ModelStatus` with a bounded
reason. A newer manifest for the same name cancels the install in progress.
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry
from pydantic import Field

from agent.config import Section
from agent.releases.context import ReleaseContext
from agent.releases.install import ArtifactSource, HttpsArtifacts, Installs
from agent.releases.lifecycle import ModelStatus, ProbationPolicy, ProbationReport
from agent.releases.loader import LOADER_NICENESS, Loader, ReleaseObserver
from agent.releases.metrics import NAMESPACE, SwapMetrics
from agent.releases.onnx_check import MAX_MODEL_BYTES
from agent.releases.probation import Probations
from agent.releases.quarantine import Quarantine
from agent.releases.rejections import Rejections
from agent.releases.restore import Restore
from agent.releases.rollback import Rollback
from agent.releases.status import StatusBoard
from agent.releases.store import ModelStore
from agent.serving.engine import RuntimeOptions
from agent.serving.inference import BatchingPolicy, InferenceService
from wire.reasons import Reason

__all__ = [
    "LOADER_NICENESS",
    "ArtifactSource",
    "HttpsArtifacts",
    "ModelManager",
    "ReleaseObserver",
    "SwapSettings",
]

log = structlog.get_logger(__name__)


class SwapSettings(Section):
    """Limits of the install pipeline itself."""

    max_model_bytes: int = Field(MAX_MODEL_BYTES, ge=1024)
    # An old session still answering after this long is closed anyway.
    drain_timeout_s: float = Field(30.0, gt=0.0, alias="swap_drain_timeout_s")
    # A new model is on trial until it has served this many requests or for this long: if
    # the process dies before, the next start rolls it back (`crashed_during_install`).
    crash_guard_requests: int = Field(20, ge=0)
    crash_guard_s: float = Field(60.0, ge=0.0)


class ModelManager:
    """Owns the models being served: installs releases, rolls back, restores after restart."""

    def __init__(
        self,
        *,
        store: ModelStore,
        trusted_keys: Mapping[str, Ed25519PublicKey],
        artifacts: ArtifactSource,
        services: MutableMapping[str, InferenceService],
        service_factory: Callable[[str], InferenceService],
        registry: CollectorRegistry,
        namespace: str = NAMESPACE,
        settings: SwapSettings | None = None,
        runtime: RuntimeOptions | None = None,
        batching: BatchingPolicy | None = None,
        probation: ProbationPolicy | None = None,
        listeners: list[Callable[[ModelStatus], None]] | None = None,
        quarantine: Quarantine | None = None,
        observer: ReleaseObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        settings = settings or SwapSettings()
        # Names that serve or that the store holds a verified release of: the only model labels.
        metrics = SwapMetrics(
            registry, namespace, known=lambda: services.keys() | store.state.models.keys()
        )
        loader = Loader(
            store,
            max_model_bytes=settings.max_model_bytes,
            runtime=runtime or RuntimeOptions(),
            max_rows=(batching or BatchingPolicy()).max_rows,
            observer=observer,
        )
        board = StatusBoard(
            services, metrics, wall_clock, listeners if listeners is not None else []
        )
        self._ctx = ReleaseContext(
            store=store,
            services=services,
            service_factory=service_factory,
            board=board,
            loader=loader,
            metrics=metrics,
            drain_timeout_s=settings.drain_timeout_s,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._quarantine = quarantine
        self._rejections = Rejections(metrics, wall_clock)
        self._probations = Probations(
            self._ctx,
            probation or ProbationPolicy(),
            crash_guard_requests=settings.crash_guard_requests,
            crash_guard_s=settings.crash_guard_s,
            roll_back=self.rollback,
        )
        self._installs = Installs(
            self._ctx,
            trusted_keys=trusted_keys,
            artifacts=artifacts,
            quarantine=quarantine,
            probations=self._probations,
            rejections=self._rejections,
        )
        self._rollback = Rollback(self._ctx, self._installs, self._probations)
        self._restore = Restore(self._ctx, self._rollback)
        # Set once `restore` has run: sources wait for it, so a release never races the
        # restoring of the model it would replace.
        self.restored = asyncio.Event()

    @property
    def statuses(self) -> dict[str, ModelStatus]:
        return self._ctx.board.statuses

    @property
    def probation(self) -> dict[str, ProbationReport]:
        """The newest probation of each name, kept after it ends (passed or failed)."""
        return self._probations.reports

    @property
    def rejections(self) -> dict[str, ModelStatus]:
        """Manifests refused before any install, by the name they claim (the newest few);
        kept apart from `statuses` so they cannot touch what serves."""
        return self._rejections.entries

    # -- entry points -----------------------------------------------------------------

    def submit(self, raw: object, *, artifacts: ArtifactSource | None = None) -> ModelStatus:
        """Act on a release manifest as received (twin or folder); returns the status now.

        Verification is synchronous and cheap, so a bad manifest is answered at once; the
        install itself runs as a task that a newer manifest for the same name cancels. A
        manifest refused before any install starts (forged, malformed, expired, older) is a
        rejection (`rejections`, `add_rejection_listener`): it never changes the status, the
        metadata or anything else of the model that serves under that name.
        """
        return self._installs.submit(raw, artifacts)

    async def rollback(self, name: str, reason: Reason = Reason.REQUESTED) -> ModelStatus:
        """Serve the last-known-good release of `name` again (`rolled_back`)."""
        return await self._rollback(name, reason)

    @property
    def names(self) -> frozenset[str]:
        """Every name served, being installed, reported, or active in the store."""
        ctx = self._ctx
        stored = (name for name, record in ctx.store.state.models.items() if record.active)
        return frozenset((*ctx.services, *self._installs.names, *self.statuses, *stored))

    async def remove(self, name: str) -> bool:
        """Stop serving `name` and let its files go: it is no longer desired. An install or
        probation under way ends; what was seen and refused stays in the store. False if
        nothing of `name` was served, installed or reported."""
        ctx = self._ctx
        self._installs.cancel(name, "model removed")
        self._probations.stop(name)
        service = ctx.services.pop(name, None)
        known = service is not None or name in self.statuses
        if not known and ctx.store.state.record(name).active is None:
            return False
        ctx.save(operator.methodcaller("removed", name))
        self.statuses.pop(name, None)
        self.probation.pop(name, None)
        ctx.loader.detach(name)
        if service is not None:
            await service.retire(ctx.drain_timeout_s)
        ctx.collect_garbage()
        log.info("model_removed", model=name)
        return True

    async def restore(self) -> None:
        """At start: serve what `state.json` says is active (or its last-known-good), after
        rolling back a release the process died installing."""
        if self._quarantine is not None:
            self._quarantine.prepare()
        try:
            await self._restore()
        finally:
            self.restored.set()

    def add_listener(self, listener: Callable[[ModelStatus], None]) -> None:
        """`listener` gets every status change, on the event loop (adapters report them)."""
        self._ctx.board.listeners.append(listener)

    def add_rejection_listener(self, listener: Callable[[ModelStatus], None]) -> None:
        """`listener` gets every manifest refused before an install started."""
        self._rejections.listeners.append(listener)

    def is_superseded(self, raw: object) -> bool:
        """Whether an (unverified) manifest names a version below the highest one seen.

        Only for skipping stale files quietly; acting on a manifest always verifies it.
        """
        return self._installs.is_superseded(raw)

    async def wait_idle(self) -> None:
        """Wait until no install is running (probations may continue)."""
        await self._installs.wait_idle()

    def abandon_installs(self) -> None:
        """Cancel installs in progress now (shutdown): a swap must not land while draining."""
        self._installs.cancel_all("agent stopping")

    async def close(self) -> None:
        """Abandon installs in progress (the disk state stays consistent) and probations."""
        tasks = self._installs.take_tasks() + self._probations.take_tasks()
        tasks += list(self._ctx.background)
        for task in tasks:
            task.cancel("agent stopping")
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ctx.loader.close()
        if self._quarantine is not None:
            await self._quarantine.close()
