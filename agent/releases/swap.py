"""Verified delivery and zero-downtime hot swap of models, one pipeline per model name.

    submit(manifest) -> verify signature and version -> fetch (or reuse) the artifact ->
    size + sha256 -> hostile-file check -> load + warm up in a worker thread -> contract
    (manifest's, and the active model's unless `contract_change`) -> golden sample ->
    persist -> switch one reference -> old session drains and is dropped -> probation

Every failure leaves the active model serving and ends in a `ModelStatus` with a bounded
reason. A newer manifest for the same name cancels the install in progress (only the newest
spec is acted on). `state.json` is written before the switch: a crash at any instant restarts
on the old or the new model, never a partial one, and a failed write leaves the old model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import operator
import os
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import Field

from agent.config import Section
from agent.observation.baseline import BaselineInvalidError, BaselinePack, parse_baseline
from agent.reasons import AgentError, Reason
from agent.releases.download import Downloader
from agent.releases.lifecycle import (
    NO_BASELINE,
    ModelState,
    ModelStatus,
    ProbationPolicy,
    ProbationReport,
    ProbationState,
    ServingStats,
    SwapError,
    Verdict,
    failure_state,
    judge_probation,
    probation_report,
)
from agent.releases.manifest import (
    ManifestRejected,
    ReleaseManifest,
    ReleaseStatus,
    check_version,
    verify_manifest,
)
from agent.releases.onnx_check import MAX_MODEL_BYTES, HostileModel, inspect_model
from agent.releases.quarantine import Quarantine, Refused, verify_candidate
from agent.releases.store import (
    ModelRef,
    ModelStore,
    NoLastKnownGoodError,
    PartFile,
    RolledBack,
    StoreError,
    StoreState,
)
from agent.serving.engine import (
    CostModel,
    LoadedModel,
    ModelLoadError,
    RuntimeOptions,
    load_model,
)
from agent.serving.inference import BatchingPolicy, InferenceService
from agent.ticks import ticks

log = structlog.get_logger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
LOADER_NICENESS = 10
# Releases that fail for these are not installed again after a restart: the same bytes would
# exhaust the same limits, or kill the process again.
_BLOCKING = frozenset({Reason.RESOURCE_LIMIT, Reason.LOAD_TIMEOUT, Reason.CRASHED_DURING_INSTALL})
MAX_REJECTIONS_KEPT = 8
# A crash is blamed on a release only at its second one (see the store).
_TWICE = {Reason.CRASHED_DURING_INSTALL: " (two crashes)"}


class ArtifactSource(Protocol):
    """Where a release's bytes come from; writes them into `part`, checking size and sha256."""

    async def fetch(self, manifest: ReleaseManifest, part: PartFile) -> None: ...

    async def fetch_baseline(self, manifest: ReleaseManifest, part: PartFile) -> None:
        """The drift baseline pack the manifest names (never called without one)."""
        ...


class ReleaseObserver(Protocol):
    """Told which release serves a name, with its parsed drift baseline (None: no baseline)."""

    def attach(
        self, name: str, version: int, pack: BaselinePack | None, baseline_sha256: str | None
    ) -> None: ...

    def detach(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class HttpsArtifacts:
    """Artifacts by the manifest's URL (Azure Blob SAS URLs in production)."""

    downloader: Downloader

    async def fetch(self, manifest: ReleaseManifest, part: PartFile) -> None:
        await self.downloader.fetch(
            manifest.url, sha256=manifest.sha256, size=manifest.size, part=part
        )

    async def fetch_baseline(self, manifest: ReleaseManifest, part: PartFile) -> None:
        baseline = manifest.baseline
        if baseline is None:
            raise ValueError(f"release {manifest.name} {manifest.version} has no baseline")
        await self.downloader.fetch(
            baseline.url, sha256=baseline.sha256, size=baseline.size, part=part
        )


class SwapSettings(Section):
    """Limits of the install pipeline itself."""

    max_model_bytes: int = Field(MAX_MODEL_BYTES, ge=1024)
    # An old session still answering after this long is closed anyway.
    drain_timeout_s: float = Field(30.0, gt=0.0, alias="swap_drain_timeout_s")
    # A new model is on trial until it has served this many requests or for this long: if
    # the process dies before, the next start rolls it back (`crashed_during_install`).
    crash_guard_requests: int = Field(20, ge=0)
    crash_guard_s: float = Field(60.0, ge=0.0)


@dataclass(slots=True)
class _Install:
    manifest: ReleaseManifest
    task: asyncio.Task[None]


class _SwapMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "agent_model_updates",
            "Model releases by model and final state.",
            ["model", "state"],
            registry=registry,
        )
        self.failures = Counter(
            "agent_model_update_failures",
            "Releases rejected, failed or rolled back, by model and reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.swap_seconds = Histogram(
            "agent_model_swap_seconds",
            "From accepting a manifest to serving the new model.",
            registry=registry,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        )

    def ended(self, model: str, state: ModelState, reason: Reason) -> None:
        """A release of `model` ended in `state` (rejected, failed, rolled back) for `reason`."""
        self.failures.labels(model, reason.value).inc()
        self.outcomes.labels(model, state.value).inc()


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
        self._store = store
        self._keys = trusted_keys
        self._artifacts = artifacts
        self._services = services
        self._service_factory = service_factory
        self._settings = settings or SwapSettings()
        self._runtime = runtime or RuntimeOptions()
        self._max_rows = (batching or BatchingPolicy()).max_rows
        self._probation_policy = probation or ProbationPolicy()
        self._listeners = listeners if listeners is not None else []
        self._quarantine = quarantine
        self._observer = observer
        self._clock = clock
        self._wall_clock = wall_clock
        self._metrics = _SwapMetrics(registry)
        self._installs: dict[str, _Install] = {}
        self._probations: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # One loader thread at a lower CPU priority: on a 2-core device, loading and warming
        # up a candidate must not take the event loop's core from requests being served.
        self._loader = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model-loader", initializer=_lower_priority
        )
        self.statuses: dict[str, ModelStatus] = {}
        # The newest probation of each name, kept after it ends (passed or failed).
        self.probation: dict[str, ProbationReport] = {}
        # Manifests refused before any install, by the name they claim (bounded: see
        # `_reject_unverified`); kept apart from `statuses` so they cannot touch what serves.
        self.rejections: dict[str, ModelStatus] = {}
        self._rejection_listeners: list[Callable[[ModelStatus], None]] = []
        # Set once `restore` has run: sources wait for it, so a release never races the
        # restoring of the model it would replace.
        self.restored = asyncio.Event()

    # -- entry points -----------------------------------------------------------------

    def submit(self, raw: object, *, artifacts: ArtifactSource | None = None) -> ModelStatus:
        """Act on a release manifest as received (twin or folder); returns the status now.

        Verification is synchronous and cheap, so a bad manifest is answered at once; the
        install itself runs as a task that a newer manifest for the same name cancels. A
        manifest refused before any install starts (forged, malformed, expired, older) is a
        rejection (`rejections`, `add_rejection_listener`): it never changes the status, the
        metadata or anything else of the model that serves under that name.
        """
        try:
            manifest = verify_manifest(raw, self._keys, self._wall_clock())
        except ManifestRejected as rejected:
            if rejected.reason is Reason.EXPIRED and self._serves(raw):
                # Expiry bounds when a release may be installed, not how long it may serve:
                # the twin re-submits the active release after every restart.
                return self._already_active(str(raw["name"]))  # type: ignore[index]
            return self._reject_unverified(raw, rejected.reason, rejected.message)
        answered = self._answer_without_install(manifest)
        if answered is not None:
            return answered
        name = manifest.name
        running = self._installs.get(name)
        if running is not None and not running.task.done():
            running.task.cancel("superseded by a newer release")
            log.info(
                "install_superseded",
                model=name,
                version=running.manifest.version,
                by_version=manifest.version,
            )
        self._stop_probation(name)
        status = self._publish(
            name,
            ModelState.DOWNLOADING,
            None,
            "accepted" + self._retry_note(manifest),
            manifest=manifest,
        )
        task = asyncio.get_running_loop().create_task(
            self._install(manifest, artifacts or self._artifacts), name=f"install-{name}"
        )
        self._installs[name] = _Install(manifest, task)
        return status

    def _answer_without_install(self, manifest: ReleaseManifest) -> ModelStatus | None:
        """The answer to a verified manifest that must not start an install, else None."""
        name = manifest.name
        running = self._installs.get(name)
        if running is not None and not running.task.done():
            if running.manifest.version == manifest.version:
                if running.manifest.sha256 == manifest.sha256:
                    return self.statuses[name]  # the same release, already being installed
            elif running.manifest.version > manifest.version:
                return self._reject(
                    manifest,
                    Reason.VERSION_NOT_MONOTONIC,
                    f"version {manifest.version} is older than {running.manifest.version}, "
                    "which is being installed",
                )
        record = self._store.state.record(name)
        rolled = record.rolled_back
        if rolled is not None and rolled.is_release(manifest.version, manifest.sha256):
            return self._still_rolled_back(name, rolled)
        try:
            release = check_version(manifest, record.highest_seen)
        except ManifestRejected as rejected:
            return self._reject(manifest, rejected.reason, rejected.message)
        if release is ReleaseStatus.SAME_RELEASE and self._serving_sha(name) == manifest.sha256:
            return self._already_active(name)
        return None

    def _serves(self, raw: object) -> bool:
        """Whether `raw` names exactly the release serving under its name."""
        if not isinstance(raw, Mapping):
            return False
        service = self._services.get(raw.get("name"))  # type: ignore[arg-type]
        model = service.model if service is not None else None
        return (
            model is not None
            and raw.get("version") == model.version
            and raw.get("sha256") == model.sha256
        )

    def _already_active(self, name: str) -> ModelStatus:
        """The serving release submitted again: `active`, whatever was reported meanwhile."""
        current = self.statuses.get(name)
        service = self._services[name]
        model = service.model
        assert model is not None
        if (
            current is not None
            and current.state is ModelState.ACTIVE
            and current.version == model.version
        ):
            return current  # keeps its probation
        return self._publish(
            name,
            ModelState.ACTIVE,
            None,
            "already active",
            version=model.version,
            sha256=model.sha256,
        )

    def _still_rolled_back(self, name: str, rolled: RolledBack) -> ModelStatus:
        """The release rolled back from, submitted again: refused without a download."""
        current = self.statuses.get(name)
        if rolled.reason in _BLOCKING:
            return self._still_failed(name, rolled, current)
        if current is not None and current.state is ModelState.ROLLED_BACK:
            return current
        return self._publish(
            name,
            ModelState.ROLLED_BACK,
            rolled.reason,
            f"version {rolled.version} was rolled back at {rolled.at.isoformat()} "
            f"({rolled.reason}); publish a higher version",
            version=rolled.version,
            sha256=rolled.sha256,
        )

    def _still_failed(
        self, name: str, refused: RolledBack, current: ModelStatus | None
    ) -> ModelStatus:
        """A release that killed the process or exhausted its quarantine, submitted again:
        `failed` at once, never loaded or run again."""
        if (
            current is not None
            and current.state is ModelState.FAILED
            and current.version == refused.version
            and current.reason is refused.reason
        ):
            return current
        return self._publish(
            name,
            ModelState.FAILED,
            refused.reason,
            f"version {refused.version} failed with {refused.reason}"
            f"{_TWICE.get(refused.reason, '')} at {refused.at.isoformat()}; "
            "it is not installed again: publish a higher version",
            version=refused.version,
            sha256=refused.sha256,
        )

    async def rollback(self, name: str, reason: Reason = Reason.REQUESTED) -> ModelStatus:
        """Serve the last-known-good release of `name` again (`rolled_back`)."""
        record = self._store.state.record(name)
        target = record.fallback
        if target is None:
            raise SwapError(
                Reason.NO_LAST_KNOWN_GOOD,
                f"model {name!r} has no last-known-good release to roll back to",
            )
        install = self._installs.pop(name, None)
        if install is not None and not install.task.done():
            install.task.cancel("rollback requested")
        self._stop_probation(name)
        # The status describes the release rolled back from; `active_version` the one serving.
        bad = record.active or target
        model = await self._in_loader(self._load_stored, name, target)
        try:
            self._save(lambda state: state.rolled_back(name, reason, self._wall_clock()))
        except NoLastKnownGoodError as error:  # raced with another rollback
            raise SwapError(Reason.NO_LAST_KNOWN_GOOD, str(error)) from None
        self._switch(name, model)
        await self._attach_stored(name, target)
        self._metrics.ended(name, ModelState.ROLLED_BACK, reason)
        log.warning(
            "model_rolled_back",
            model=name,
            version=bad.version,
            reason=reason,
            serving_version=target.version,
        )
        return self._publish(
            name,
            ModelState.ROLLED_BACK,
            reason,
            f"version {bad.version} rolled back ({reason}); "
            f"serving last-known-good version {target.version}",
            version=bad.version,
            sha256=bad.sha256,
        )

    @property
    def names(self) -> frozenset[str]:
        """Every name served, being installed, reported, or active in the store."""
        stored = (name for name, record in self._store.state.models.items() if record.active)
        return frozenset((*self._services, *self._installs, *self.statuses, *stored))

    async def remove(self, name: str) -> bool:
        """Stop serving `name` and let its files go: it is no longer desired. An install or
        probation under way ends; what was seen and refused stays in the store. False if
        nothing of `name` was served, installed or reported."""
        install = self._installs.pop(name, None)
        if install is not None and not install.task.done():
            install.task.cancel("model removed")
        self._stop_probation(name)
        service = self._services.pop(name, None)
        known = service is not None or name in self.statuses
        if not known and self._store.state.record(name).active is None:
            return False
        self._save(operator.methodcaller("removed", name))
        self.statuses.pop(name, None)
        self.probation.pop(name, None)
        if self._observer is not None:
            self._observer.detach(name)
        if service is not None:
            await service.retire(self._settings.drain_timeout_s)
        self._collect_garbage()
        log.info("model_removed", model=name)
        return True

    async def restore(self) -> None:
        """At start: serve what `state.json` says is active (or its last-known-good), after
        rolling back a release the process died installing."""
        if self._quarantine is not None:
            self._quarantine.prepare()
        try:
            self._recover_crashed_installs()
            await self._restore_all()
        finally:
            self.restored.set()

    def _recover_crashed_installs(self) -> None:
        for name, record in sorted(self._store.state.models.items()):
            bad = record.installing
            if bad is None:
                continue
            self._save(operator.methodcaller("crash_recovered", name, self._wall_clock()))
            after = self._store.state.record(name)
            back = after.active
            serving = f"serving version {back.version}" if back is not None else "nothing to serve"
            retry = after.crashed_once is not None
            log.error(
                "crashed_during_install",
                model=name,
                version=bad.version,
                crashes=1 if retry else 2,
                action="retry" if retry else "blocked",
                serving_version=back.version if back is not None else None,
            )
            if retry:
                # One crash is not evidence against the release: it is installed again, under
                # the same guard, when next offered. Nothing is reported failed meanwhile.
                continue
            self._metrics.ended(name, ModelState.FAILED, Reason.CRASHED_DURING_INSTALL)
            self._publish(
                name,
                ModelState.FAILED,
                Reason.CRASHED_DURING_INSTALL,
                f"the agent died twice while installing version {bad.version}; "
                f"it is not installed again; {serving}",
                version=bad.version,
                sha256=bad.sha256,
            )

    async def _restore_all(self) -> None:
        for name, record in sorted(self._store.state.models.items()):
            if record.active is None:
                continue
            try:
                model = await self._in_loader(self._load_stored, name, record.active)
            except SwapError as error:
                # An expected outcome with its reason: no traceback.
                log.error("restore_failed", model=name, reason=error.reason, error=error.message)  # noqa: TRY400
                if record.fallback is None:
                    self._publish(
                        name,
                        ModelState.FAILED,
                        Reason.RESTORE_FAILED,
                        error.message,
                        version=record.active.version,
                        sha256=record.active.sha256,
                    )
                    continue
                await self.rollback(name, Reason.RESTORE_FAILED)
                continue
            self._switch(name, model)
            await self._attach_stored(name, record.active)
            self._publish(
                name,
                ModelState.ACTIVE,
                Reason.RESTORED,
                "restored from the model store",
                version=record.active.version,
                sha256=record.active.sha256,
            )

    def add_listener(self, listener: Callable[[ModelStatus], None]) -> None:
        """`listener` gets every status change, on the event loop (adapters report them)."""
        self._listeners.append(listener)

    def add_rejection_listener(self, listener: Callable[[ModelStatus], None]) -> None:
        """`listener` gets every manifest refused before an install started."""
        self._rejection_listeners.append(listener)

    def is_superseded(self, raw: object) -> bool:
        """Whether an (unverified) manifest names a version below the highest one seen.

        Only for skipping stale files quietly; acting on a manifest always verifies it.
        """
        if not isinstance(raw, Mapping):
            return False
        name, version = raw.get("name"), raw.get("version")
        if not isinstance(name, str) or not isinstance(version, int):
            return False
        highest = self._store.state.record(name).highest_seen
        return highest is not None and version < highest.version

    async def wait_idle(self) -> None:
        """Wait until no install is running (probations may continue)."""
        while running := [i.task for i in self._installs.values() if not i.task.done()]:
            await asyncio.wait(running)

    def abandon_installs(self) -> None:
        """Cancel installs in progress now (shutdown): a swap must not land while draining."""
        for install in self._installs.values():
            install.task.cancel("agent stopping")

    async def close(self) -> None:
        """Abandon installs in progress (the disk state stays consistent) and probations."""
        tasks = [i.task for i in self._installs.values()]
        tasks += list(self._probations.values()) + list(self._background)
        for task in tasks:
            task.cancel("agent stopping")
        await asyncio.gather(*tasks, return_exceptions=True)
        self._installs.clear()
        self._probations.clear()
        # A load in progress is not waited for: its result is dropped when it ends.
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self._quarantine is not None:
            await self._quarantine.close()

    async def _in_loader(self, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, functools.partial(work, *args, **kwargs))

    # -- the install pipeline -----------------------------------------------------------

    async def _install(self, manifest: ReleaseManifest, artifacts: ArtifactSource) -> None:
        name, sha = manifest.name, manifest.sha256
        started = self._clock()
        baseline_sha = manifest.baseline.sha256 if manifest.baseline is not None else None
        ref = ModelRef(version=manifest.version, sha256=sha, baseline_sha256=baseline_sha)
        try:
            # Versions never go backwards, even when this install fails.
            self._save(lambda state: state.seen(name, ref))
            if self._store.has_artifact(sha):
                self._publish(
                    name, ModelState.VERIFYING, None, "artifact cached", manifest=manifest
                )
                await self._in_loader(self._verify_cached, sha)
            else:
                self._store.ensure_free_space(manifest.size)
                await artifacts.fetch(manifest, self._store.artifact_part(sha))
                self._publish(
                    name, ModelState.VERIFYING, None, "sha256 verified", manifest=manifest
                )
                self._store.commit_artifact(sha)
            pack = await self._fetch_baseline(manifest, artifacts)
            self._publish(name, ModelState.LOADING, None, "loading", manifest=manifest)
            cost = await self._quarantined(manifest)
            # From here a death of the process is blamed on this release (see the store).
            self._save(lambda state: state.installing(name, ref))
            log.info(
                "installing_in_process",
                model=name,
                version=manifest.version,
                retry_after_crash=self._is_retry(manifest),
            )
            try:
                model = await self._in_loader(self._load_release, manifest, cost)
                self._check_against_active(name, manifest, model)
            except AgentError:
                self._save(lambda state: state.installed(name, ref))
                raise
            self._save(lambda state: state.activated(name, ref))
            previous = self._switch(name, model)
            self._attach(name, model.version, pack, baseline_sha)
        except AgentError as error:  # download, store, model checks: each with its reason
            self._fail(manifest, failure_state(error.reason), error.reason, error.message)
            return
        seconds = self._clock() - started
        self._metrics.swap_seconds.observe(seconds)
        self._metrics.outcomes.labels(name, ModelState.ACTIVE.value).inc()
        self._publish(
            name,
            ModelState.ACTIVE,
            None,
            f"swapped in {seconds:.2f} s" + self._retry_note(manifest),
            manifest=manifest,
        )
        self._collect_garbage()
        baseline = _stats(previous) if previous is not None else NO_BASELINE
        self._probations[name] = asyncio.get_running_loop().create_task(
            self._probation(name, model, baseline), name=f"probation-{name}"
        )

    async def _fetch_baseline(
        self, manifest: ReleaseManifest, artifacts: ArtifactSource
    ) -> BaselinePack | None:
        """Fetch (or reuse) and parse the release's drift baseline; a bad one fails the
        release with `baseline_invalid`, like a bad model."""
        baseline = manifest.baseline
        if baseline is None:
            return None
        if not self._store.baseline_path(baseline.sha256).exists():
            self._store.ensure_free_space(baseline.size)
            await artifacts.fetch_baseline(manifest, self._store.baseline_part(baseline.sha256))
            self._store.commit_baseline(baseline.sha256)
        return await self._in_loader(self._load_baseline, baseline.sha256)

    def _load_baseline(self, sha256: str) -> BaselinePack:
        """Worker thread: the stored pack, re-hashed (a cached file may have rotted)."""
        data = self._store.baseline_path(sha256).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SwapError(Reason.HASH_MISMATCH, "stored drift baseline is corrupt")
        try:
            return parse_baseline(data)
        except BaselineInvalidError as error:
            raise SwapError(Reason.BASELINE_INVALID, str(error)) from None

    async def _attach_stored(self, name: str, ref: ModelRef) -> None:
        """After a restore or rollback: watch the release with its stored baseline, if any.
        A baseline that no longer loads leaves the model serving, unwatched."""
        pack = None
        if ref.baseline_sha256 is not None:
            try:
                pack = await self._in_loader(self._load_baseline, ref.baseline_sha256)
            except (SwapError, OSError) as error:
                log.warning(
                    "baseline_unavailable", model=name, version=ref.version, error=str(error)
                )
        self._attach(name, ref.version, pack, ref.baseline_sha256 if pack else None)

    def _attach(
        self, name: str, version: int, pack: BaselinePack | None, baseline_sha: str | None
    ) -> None:
        if self._observer is not None:
            self._observer.attach(name, version, pack, baseline_sha)

    def _verify_cached(self, sha256: str) -> None:
        if not self._store.verify_artifact(sha256):
            raise SwapError(Reason.HASH_MISMATCH, "cached artifact is corrupt")

    async def _quarantined(self, manifest: ReleaseManifest) -> CostModel | None:
        """Run the candidate in a bounded child first; its measured cost, or None if off."""
        if self._quarantine is None:
            return None
        # The file checks first: a file that is not ONNX at all fails with its own reason.
        await self._in_loader(self._checked_bytes, manifest.sha256)
        result = await self._quarantine.check(
            self._store.artifact_path(manifest.sha256), manifest, self._runtime, self._max_rows
        )
        if isinstance(result, Refused):
            if result.reason in _BLOCKING:
                ref = ModelRef(version=manifest.version, sha256=manifest.sha256)
                refused_at = self._wall_clock()
                self._save(
                    lambda state: state.refused(manifest.name, ref, result.reason, refused_at)
                )
            raise SwapError(result.reason, result.message)
        return result.cost

    def _load_release(self, manifest: ReleaseManifest, cost: CostModel | None) -> LoadedModel:
        """Worker thread: hostile-file check, load + warm-up, manifest contract, golden sample.
        A candidate that passed quarantine (`cost` measured there) was inspected and verified
        on these very bytes (the digest is checked again): only the load remains."""
        model = self._load_bytes(manifest.name, manifest.version, manifest.sha256, cost)
        if cost is None:
            verify_candidate(model, manifest)
        return model

    def _load_stored(self, name: str, ref: ModelRef) -> LoadedModel:
        """Worker thread: a release already installed once (restart, rollback)."""
        if not self._store.has_artifact(ref.sha256) or not self._store.verify_artifact(ref.sha256):
            raise SwapError(
                Reason.HASH_MISMATCH,
                f"stored artifact of version {ref.version} is missing or corrupt",
            )
        return self._load_bytes(name, ref.version, ref.sha256)

    def _load_bytes(
        self, name: str, version: int, sha256: str, cost: CostModel | None = None
    ) -> LoadedModel:
        data = self._checked_bytes(sha256, inspect=cost is None)
        try:
            return load_model(
                data,
                name=name,
                version=version,
                sha256=sha256,
                options=self._runtime,
                max_rows=self._max_rows,
                cost=cost,
            )
        except ModelLoadError as error:
            raise SwapError(error.reason, error.message) from None

    def _checked_bytes(self, sha256: str, *, inspect: bool = True) -> bytes:
        """Worker thread: the artifact's bytes, their size, digest and hostile-file check."""
        path: Path = self._store.artifact_path(sha256)
        limit = self._settings.max_model_bytes
        if path.stat().st_size > limit:
            raise SwapError(Reason.MODEL_TOO_LARGE, f"model is over {limit} bytes")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:  # the file changed under us
            raise SwapError(Reason.HASH_MISMATCH, "artifact changed on disk")
        if inspect:
            try:
                inspect_model(data, max_bytes=limit)
            except HostileModel as hostile:
                raise SwapError(hostile.reason, hostile.message) from None
        return data

    def _check_against_active(
        self, name: str, manifest: ReleaseManifest, model: LoadedModel
    ) -> None:
        service = self._services.get(name)
        active = service.model if service is not None else None
        if active is None or manifest.contract_change:
            return
        differences = active.contract.differences(model.contract)
        if differences:
            raise SwapError(
                Reason.CONTRACT_MISMATCH,
                "contract differs from the active model's and the manifest does not set "
                "contract_change: " + "; ".join(differences[:5]),
            )

    # -- switching, probation -----------------------------------------------------------

    def _switch(self, name: str, model: LoadedModel) -> LoadedModel | None:
        service = self._services.get(name)
        if service is None:
            service = self._services[name] = self._service_factory(name)
        previous = service.activate(model)
        if previous is not None:
            # Requests in flight finish on the old session; then it is closed.
            release = service.release(previous, self._settings.drain_timeout_s)
            task = asyncio.get_running_loop().create_task(release)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return previous

    async def _probation(self, name: str, model: LoadedModel, previous: ServingStats) -> None:
        ref = ModelRef(version=model.version, sha256=model.sha256)
        try:
            await self._watch(name, model, previous, ref)
        finally:
            # Passed, rolled back or cancelled (a newer release, a stop): no longer on trial.
            with contextlib.suppress(StoreError):
                self._save(lambda state: state.installed(name, ref))

    async def _watch(
        self, name: str, model: LoadedModel, previous: ServingStats, ref: ModelRef
    ) -> None:
        policy = self._probation_policy
        started = self._clock()
        on_trial = True
        until = self._wall_clock() + timedelta(seconds=policy.seconds)
        self.probation[name] = probation_report(
            _stats(model), previous, Verdict.WATCHING, policy, until
        )
        async for _ in ticks(policy.tick_s, clock=self._clock):
            if on_trial and (
                model.served >= self._settings.crash_guard_requests
                or self._clock() - started >= self._settings.crash_guard_s
            ):
                on_trial = False
                self._save(lambda state: state.installed(name, ref))
            stats = _stats(model)
            verdict = judge_probation(stats, previous, self._clock() - started, policy)
            self.probation[name] = probation_report(stats, previous, verdict, policy, until)
            if verdict is Verdict.WATCHING:
                continue
            if verdict is Verdict.PASSED:
                log.info("probation_passed", model=name, version=model.version, served=model.served)
                self._publish(
                    name,
                    ModelState.ACTIVE,
                    None,
                    f"probation passed after {stats.served} requests",
                    version=model.version,
                    sha256=model.sha256,
                )
                return
            if verdict is Verdict.NO_TRAFFIC:
                # Nothing went wrong, but nothing was shown either: it keeps serving, and a
                # ring gate sees `passed_without_traffic`, not `passed`.
                log.warning(
                    "probation_passed_without_traffic",
                    model=name,
                    version=model.version,
                    served=stats.served,
                    min_requests=policy.min_requests,
                )
                self._publish(
                    name,
                    ModelState.ACTIVE,
                    None,
                    f"probation ended after {stats.served} requests, fewer than its minimum of "
                    f"{policy.min_requests}: passed without traffic",
                    version=model.version,
                    sha256=model.sha256,
                )
                return
            reason = (
                Reason.PROBATION_ERRORS if verdict is Verdict.ERRORS else Reason.PROBATION_LATENCY
            )
            log.warning("probation_failed", model=name, version=model.version, reason=reason)
            self._probations.pop(name, None)  # rollback() must not cancel this very task
            try:
                await self.rollback(name, reason)
            except SwapError as error:
                # An expected outcome with its reason: no traceback.
                log.error("rollback_failed", model=name, reason=error.reason, error=error.message)  # noqa: TRY400
            return

    def _stop_probation(self, name: str) -> None:
        task = self._probations.pop(name, None)
        if task is not None:
            task.cancel("model changed")
        report = self.probation.get(name)
        if report is not None and report.state is ProbationState.WATCHING:
            # Cut short (a rollback, a newer release): not passed, so not safe either.
            self.probation[name] = dataclasses.replace(report, state=ProbationState.FAILED)

    # -- state, status ------------------------------------------------------------------

    def _save(self, change: Callable[[StoreState], StoreState]) -> None:
        # On the loop, not a thread: writes stay ordered even when an install is cancelled
        # mid-write, and the file is a few hundred bytes (a few ms with its fsyncs).
        state = self._store.state
        changed = change(state)
        if changed is not state:  # a transition that changes nothing returns the state itself
            self._store.save(changed)

    def _collect_garbage(self) -> None:
        try:
            removed = self._store.collect_garbage()
        except StoreError as error:
            log.warning("garbage_collection_failed", error=error.message)
            return
        if removed:
            log.info("artifacts_removed", files=list(removed))

    def _is_retry(self, manifest: ReleaseManifest) -> bool:
        """Whether this release crashed the agent once already (a second crash blocks it)."""
        crashed = self._store.state.record(manifest.name).crashed_once
        return (
            crashed is not None
            and crashed.version == manifest.version
            and (crashed.sha256 == manifest.sha256)
        )

    def _retry_note(self, manifest: ReleaseManifest) -> str:
        return " (retry after one crash during install)" if self._is_retry(manifest) else ""

    def _serving_sha(self, name: str) -> str | None:
        service = self._services.get(name)
        model = service.model if service is not None else None
        return model.sha256 if model is not None else None

    def _reject_unverified(self, raw: object, reason: Reason, message: str) -> ModelStatus:
        name = raw.get("name") if isinstance(raw, Mapping) else None
        # Only a name that could be valid is echoed: it keys reported state.
        safe = name if isinstance(name, str) and name.isprintable() and len(name) <= 63 else "?"
        return self._publish_rejection(safe, reason, message, None)

    def _reject(self, manifest: ReleaseManifest, reason: Reason, message: str) -> ModelStatus:
        return self._publish_rejection(manifest.name, reason, message, manifest)

    def _publish_rejection(
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
        self.rejections.pop(name, None)
        self.rejections[name] = status
        while len(self.rejections) > MAX_REJECTIONS_KEPT:
            del self.rejections[next(iter(self.rejections))]
        for listener in self._rejection_listeners:
            listener(status)
        return status

    def _fail(
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
        self._publish(manifest.name, state, reason, message, manifest=manifest)

    def _publish(
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
        for listener in self._listeners:
            listener(status)
        return status


def _lower_priority() -> None:
    """Thread initializer: nice 10 for this thread only (Linux schedules threads apart)."""
    with contextlib.suppress(OSError, AttributeError):  # no per-thread niceness elsewhere
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)


def _stats(model: LoadedModel) -> ServingStats:
    latency = model.latency
    return ServingStats(model.served, model.failed, latency.total, tuple(latency.counts))
