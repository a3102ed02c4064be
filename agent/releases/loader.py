"""Loading releases into the serving process: one low-priority worker thread that checks the
stored bytes (size, digest, hostile-file check), loads and warms up the model, and parses its
drift baseline; and telling the observer which release serves, with that baseline."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

import structlog

from agent.observation.baseline import BaselineInvalidError, BaselinePack, parse_baseline
from agent.releases.lifecycle import SwapError
from agent.releases.manifest import ReleaseManifest
from agent.releases.onnx_check import HostileModel, inspect_model
from agent.releases.quarantine import verify_candidate
from agent.releases.state import ModelRef
from agent.releases.store import ModelStore
from agent.serving.engine import (
    CostModel,
    LoadedModel,
    ModelLoadError,
    RuntimeOptions,
    load_model,
)
from wire.reasons import Reason

log = structlog.get_logger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
LOADER_NICENESS = 10


class ReleaseObserver(Protocol):
    """Told which release serves a name, with its parsed drift baseline (None: no baseline)."""

    def attach(
        self, name: str, version: int, pack: BaselinePack | None, baseline_sha256: str | None
    ) -> None: ...

    def detach(self, name: str) -> None: ...


class Loader:
    """Loads stored releases off the event loop; every method named `*_blocking` runs in its
    worker thread (through `run`)."""

    def __init__(
        self,
        store: ModelStore,
        *,
        max_model_bytes: int,
        runtime: RuntimeOptions,
        max_rows: int,
        observer: ReleaseObserver | None,
    ) -> None:
        self._store = store
        self._max_model_bytes = max_model_bytes
        self._runtime = runtime
        self._max_rows = max_rows
        self._observer = observer
        # One loader thread at a lower CPU priority: on a 2-core device, loading and warming
        # up a candidate must not take the event loop's core from requests being served.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model-loader", initializer=_lower_priority
        )

    @property
    def runtime(self) -> RuntimeOptions:
        return self._runtime

    @property
    def max_rows(self) -> int:
        return self._max_rows

    async def run(self, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(work, *args, **kwargs))

    def close(self) -> None:
        # A load in progress is not waited for: its result is dropped when it ends.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- observer --------------------------------------------------------------------------

    async def attach_stored(self, name: str, ref: ModelRef) -> None:
        """After a restore or rollback: watch the release with its stored baseline, if any.
        A baseline that no longer loads leaves the model serving, unwatched."""
        pack = None
        if ref.baseline_sha256 is not None:
            try:
                pack = await self.run(self.baseline_blocking, ref.baseline_sha256)
            except (SwapError, OSError) as error:
                log.warning(
                    "baseline_unavailable", model=name, version=ref.version, error=str(error)
                )
        self.attach(name, ref.version, pack, ref.baseline_sha256 if pack else None)

    def attach(
        self, name: str, version: int, pack: BaselinePack | None, baseline_sha: str | None
    ) -> None:
        if self._observer is not None:
            self._observer.attach(name, version, pack, baseline_sha)

    def detach(self, name: str) -> None:
        if self._observer is not None:
            self._observer.detach(name)

    # -- worker thread ---------------------------------------------------------------------

    def baseline_blocking(self, sha256: str) -> BaselinePack:
        """The stored pack, re-hashed (a cached file may have rotted)."""
        data = self._store.baseline_path(sha256).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SwapError(Reason.HASH_MISMATCH, "stored drift baseline is corrupt")
        try:
            return parse_baseline(data)
        except BaselineInvalidError as error:
            raise SwapError(Reason.BASELINE_INVALID, str(error)) from None

    def verify_cached_blocking(self, sha256: str) -> None:
        if not self._store.verify_artifact(sha256):
            raise SwapError(Reason.HASH_MISMATCH, "cached artifact is corrupt")

    def release_blocking(self, manifest: ReleaseManifest, cost: CostModel | None) -> LoadedModel:
        """Hostile-file check, load + warm-up, manifest contract, golden sample. A candidate
        that passed quarantine (`cost` measured there) was inspected and verified on these
        very bytes (the digest is checked again): only the load remains."""
        model = self._load_bytes(manifest.name, manifest.version, manifest.sha256, cost)
        if cost is None:
            verify_candidate(model, manifest)
        return model

    def stored_blocking(self, name: str, ref: ModelRef) -> LoadedModel:
        """A release already installed once (restart, rollback)."""
        if not self._store.has_artifact(ref.sha256) or not self._store.verify_artifact(ref.sha256):
            raise SwapError(
                Reason.HASH_MISMATCH,
                f"stored artifact of version {ref.version} is missing or corrupt",
            )
        return self._load_bytes(name, ref.version, ref.sha256)

    def _load_bytes(
        self, name: str, version: int, sha256: str, cost: CostModel | None = None
    ) -> LoadedModel:
        data = self.checked_bytes_blocking(sha256, inspect=cost is None)
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

    def checked_bytes_blocking(self, sha256: str, *, inspect: bool = True) -> bytes:
        """The artifact's bytes, their size, digest and hostile-file check."""
        path: Path = self._store.artifact_path(sha256)
        limit = self._max_model_bytes
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


def _lower_priority() -> None:
    """Thread initializer: nice 10 for this thread only (Linux schedules threads apart)."""
    with contextlib.suppress(OSError, AttributeError):  # no per-thread niceness elsewhere
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)
