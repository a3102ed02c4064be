"""Installing releases: answering a manifest as received, then the pipeline of one install.

    submit(manifest) -> verify signature and version -> fetch (or reuse) the artifact ->
    size + sha256 -> hostile-file check -> quarantine -> load + warm up in the loader thread ->
    contract (manifest's, and the active model's unless `contract_change`) -> golden sample ->
    persist -> switch one reference -> old session drains and is dropped -> probation

A newer manifest for the same name cancels the install in progress (only the newest spec is
acted on). `state.json` is written before the switch: a crash at any instant restarts on the old
or the new model, never a partial one, and a failed write leaves the old model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.observation.baseline import BaselinePack
from agent.releases.context import ReleaseContext
from agent.releases.download import Downloader
from agent.releases.lifecycle import (
    NO_BASELINE,
    ModelState,
    ModelStatus,
    SwapError,
    failure_state,
)
from agent.releases.manifest import (
    ManifestRejected,
    ReleaseManifest,
    ReleaseStatus,
    check_version,
    verify_manifest,
)
from agent.releases.probation import Probations, serving_stats
from agent.releases.quarantine import Quarantine, Refused
from agent.releases.rejections import Rejections
from agent.releases.state import ModelRef, RolledBack
from agent.releases.store import PartFile
from agent.serving.engine import CostModel, LoadedModel
from wire.reasons import AgentError, Reason

log = structlog.get_logger(__name__)
# Releases that fail for these are not installed again after a restart: the same bytes would
# exhaust the same limits, or kill the process again.
BLOCKING = frozenset({Reason.RESOURCE_LIMIT, Reason.LOAD_TIMEOUT, Reason.CRASHED_DURING_INSTALL})
# A crash is blamed on a release only at its second one (see the store).
_TWICE = {Reason.CRASHED_DURING_INSTALL: " (two crashes)"}


class ArtifactSource(Protocol):
    """Where a release's bytes come from; writes them into `part`, checking size and sha256."""

    async def fetch(self, manifest: ReleaseManifest, part: PartFile) -> None: ...

    async def fetch_baseline(self, manifest: ReleaseManifest, part: PartFile) -> None:
        """The drift baseline pack the manifest names (never called without one)."""
        ...


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


@dataclass(slots=True)
class _Install:
    manifest: ReleaseManifest
    task: asyncio.Task[None]


class Installs:
    """The install in progress of each name, and the answers to manifests as received."""

    def __init__(
        self,
        ctx: ReleaseContext,
        *,
        trusted_keys: Mapping[str, Ed25519PublicKey],
        artifacts: ArtifactSource,
        quarantine: Quarantine | None,
        probations: Probations,
        rejections: Rejections,
    ) -> None:
        self._ctx = ctx
        self._keys = trusted_keys
        self._artifacts = artifacts
        self._quarantine = quarantine
        self._probations = probations
        self._rejections = rejections
        self._installs: dict[str, _Install] = {}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._installs)

    def submit(self, raw: object, artifacts: ArtifactSource | None) -> ModelStatus:
        """See `ModelManager.submit`."""
        ctx = self._ctx
        try:
            manifest = verify_manifest(raw, self._keys, ctx.wall_clock())
        except ManifestRejected as rejected:
            if rejected.reason is Reason.EXPIRED and self._serves(raw):
                # Expiry bounds when a release may be installed, not how long it may serve:
                # the twin re-submits the active release after every restart.
                return self._already_active(str(raw["name"]))  # type: ignore[index]
            return self._rejections.unverified(raw, rejected.reason, rejected.message)
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
        self._probations.stop(name)
        status = ctx.board.publish(
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

    def cancel(self, name: str, why: str) -> None:
        """End the install of `name` in progress, if any, and forget it."""
        install = self._installs.pop(name, None)
        if install is not None and not install.task.done():
            install.task.cancel(why)

    def cancel_all(self, why: str) -> None:
        for install in self._installs.values():
            install.task.cancel(why)

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """Every install task, forgotten here (the caller cancels and awaits them)."""
        tasks = [i.task for i in self._installs.values()]
        self._installs.clear()
        return tasks

    async def wait_idle(self) -> None:
        while running := [i.task for i in self._installs.values() if not i.task.done()]:
            await asyncio.wait(running)

    def is_superseded(self, raw: object) -> bool:
        """See `ModelManager.is_superseded`."""
        if not isinstance(raw, Mapping):
            return False
        name, version = raw.get("name"), raw.get("version")
        if not isinstance(name, str) or not isinstance(version, int):
            return False
        highest = self._ctx.store.state.record(name).highest_seen
        return highest is not None and version < highest.version

    # -- answers without an install ----------------------------------------------------------

    def _answer_without_install(self, manifest: ReleaseManifest) -> ModelStatus | None:
        """The answer to a verified manifest that must not start an install, else None."""
        name = manifest.name
        running = self._installs.get(name)
        if running is not None and not running.task.done():
            if running.manifest.version == manifest.version:
                if running.manifest.sha256 == manifest.sha256:
                    return self._ctx.board.statuses[name]  # the same release, being installed
            elif running.manifest.version > manifest.version:
                return self._rejections.reject(
                    manifest,
                    Reason.VERSION_NOT_MONOTONIC,
                    f"version {manifest.version} is older than {running.manifest.version}, "
                    "which is being installed",
                )
        record = self._ctx.store.state.record(name)
        rolled = record.rolled_back
        if rolled is not None and rolled.is_release(manifest.version, manifest.sha256):
            return self._still_rolled_back(name, rolled)
        try:
            release = check_version(manifest, record.highest_seen)
        except ManifestRejected as rejected:
            return self._rejections.reject(manifest, rejected.reason, rejected.message)
        serving = self._ctx.serving(name)
        if (
            release is ReleaseStatus.SAME_RELEASE
            and serving is not None
            and serving.sha256 == manifest.sha256
        ):
            return self._already_active(name)
        return None

    def _serves(self, raw: object) -> bool:
        """Whether `raw` names exactly the release serving under its name."""
        if not isinstance(raw, Mapping):
            return False
        model = self._ctx.serving(raw.get("name"))  # type: ignore[arg-type]
        return (
            model is not None
            and raw.get("version") == model.version
            and raw.get("sha256") == model.sha256
        )

    def _already_active(self, name: str) -> ModelStatus:
        """The serving release submitted again: `active`, whatever was reported meanwhile."""
        current = self._ctx.board.statuses.get(name)
        model = self._ctx.services[name].model
        assert model is not None
        if (
            current is not None
            and current.state is ModelState.ACTIVE
            and current.version == model.version
        ):
            return current  # keeps its probation
        return self._ctx.board.publish(
            name,
            ModelState.ACTIVE,
            None,
            "already active",
            version=model.version,
            sha256=model.sha256,
        )

    def _still_rolled_back(self, name: str, rolled: RolledBack) -> ModelStatus:
        """The release rolled back from, submitted again: refused without a download."""
        current = self._ctx.board.statuses.get(name)
        if rolled.reason in BLOCKING:
            return self._still_failed(name, rolled, current)
        if current is not None and current.state is ModelState.ROLLED_BACK:
            return current
        return self._ctx.board.publish(
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
        return self._ctx.board.publish(
            name,
            ModelState.FAILED,
            refused.reason,
            f"version {refused.version} failed with {refused.reason}"
            f"{_TWICE.get(refused.reason, '')} at {refused.at.isoformat()}; "
            "it is not installed again: publish a higher version",
            version=refused.version,
            sha256=refused.sha256,
        )

    def _is_retry(self, manifest: ReleaseManifest) -> bool:
        """Whether this release crashed the agent once already (a second crash blocks it)."""
        crashed = self._ctx.store.state.record(manifest.name).crashed_once
        return (
            crashed is not None
            and crashed.version == manifest.version
            and (crashed.sha256 == manifest.sha256)
        )

    def _retry_note(self, manifest: ReleaseManifest) -> str:
        return " (retry after one crash during install)" if self._is_retry(manifest) else ""

    # -- the install pipeline ------------------------------------------------------------------

    async def _install(self, manifest: ReleaseManifest, artifacts: ArtifactSource) -> None:
        ctx = self._ctx
        store, board, loader = ctx.store, ctx.board, ctx.loader
        name, sha = manifest.name, manifest.sha256
        started = ctx.clock()
        baseline_sha = manifest.baseline.sha256 if manifest.baseline is not None else None
        ref = ModelRef(version=manifest.version, sha256=sha, baseline_sha256=baseline_sha)
        try:
            # Versions never go backwards, even when this install fails.
            ctx.save(lambda state: state.seen(name, ref))
            if store.has_artifact(sha):
                board.publish(
                    name, ModelState.VERIFYING, None, "artifact cached", manifest=manifest
                )
                await loader.run(loader.verify_cached_blocking, sha)
            else:
                store.ensure_free_space(manifest.size)
                await artifacts.fetch(manifest, store.artifact_part(sha))
                board.publish(
                    name, ModelState.VERIFYING, None, "sha256 verified", manifest=manifest
                )
                store.commit_artifact(sha)
            pack = await self._fetch_baseline(manifest, artifacts)
            board.publish(name, ModelState.LOADING, None, "loading", manifest=manifest)
            cost = await self._quarantined(manifest)
            # From here a death of the process is blamed on this release (see the store).
            ctx.save(lambda state: state.installing(name, ref))
            log.info(
                "installing_in_process",
                model=name,
                version=manifest.version,
                retry_after_crash=self._is_retry(manifest),
            )
            try:
                model = await loader.run(loader.release_blocking, manifest, cost)
                self._check_against_active(name, manifest, model)
            except AgentError:
                ctx.save(lambda state: state.installed(name, ref))
                raise
            ctx.save(lambda state: state.activated(name, ref))
            previous = ctx.switch(name, model)
            loader.attach(name, model.version, pack, baseline_sha)
        except AgentError as error:  # download, store, model checks: each with its reason
            board.fail(manifest, failure_state(error.reason), error.reason, error.message)
            return
        seconds = ctx.clock() - started
        ctx.metrics.swapped(name, seconds)
        board.publish(
            name,
            ModelState.ACTIVE,
            None,
            f"swapped in {seconds:.2f} s" + self._retry_note(manifest),
            manifest=manifest,
        )
        ctx.collect_garbage()
        baseline = serving_stats(previous) if previous is not None else NO_BASELINE
        self._probations.start(name, model, baseline)

    async def _fetch_baseline(
        self, manifest: ReleaseManifest, artifacts: ArtifactSource
    ) -> BaselinePack | None:
        """Fetch (or reuse) and parse the release's drift baseline; a bad one fails the
        release with `baseline_invalid`, like a bad model."""
        baseline = manifest.baseline
        if baseline is None:
            return None
        store, loader = self._ctx.store, self._ctx.loader
        if not store.baseline_path(baseline.sha256).exists():
            store.ensure_free_space(baseline.size)
            await artifacts.fetch_baseline(manifest, store.baseline_part(baseline.sha256))
            store.commit_baseline(baseline.sha256)
        return await loader.run(loader.baseline_blocking, baseline.sha256)

    async def _quarantined(self, manifest: ReleaseManifest) -> CostModel | None:
        """Run the candidate in a bounded child first; its measured cost, or None if off."""
        if self._quarantine is None:
            return None
        ctx, loader = self._ctx, self._ctx.loader
        # The file checks first: a file that is not ONNX at all fails with its own reason.
        await loader.run(loader.checked_bytes_blocking, manifest.sha256)
        result = await self._quarantine.check(
            ctx.store.artifact_path(manifest.sha256), manifest, loader.runtime, loader.max_rows
        )
        if isinstance(result, Refused):
            if result.reason in BLOCKING:
                ref = ModelRef(version=manifest.version, sha256=manifest.sha256)
                refused_at = ctx.wall_clock()
                ctx.save(lambda state: state.refused(manifest.name, ref, result.reason, refused_at))
            raise SwapError(result.reason, result.message)
        return result.cost

    def _check_against_active(
        self, name: str, manifest: ReleaseManifest, model: LoadedModel
    ) -> None:
        active = self._ctx.serving(name)
        if active is None or manifest.contract_change:
            return
        differences = active.contract.differences(model.contract)
        if differences:
            raise SwapError(
                Reason.CONTRACT_MISMATCH,
                "contract differs from the active model's and the manifest does not set "
                "contract_change: " + "; ".join(differences[:5]),
            )
