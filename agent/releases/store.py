"""Model store on a mounted volume: content-addressed artifacts and a crash-safe ``state.json``.

Layout under the store root::

    models/<sha256>.onnx       verified artifacts, named by their digest (never by URL)
    models/<sha256>.part       a download in progress (removed at start: never trusted)
    baselines/<sha256>.json    verified drift baselines, named by their own digest
    baselines/<sha256>.part
    state.json                 {"schema": 1, "models": {<name>: {"active": ref|null,
                                 "last_known_good": ref|null, "highest_seen": ref|null,
                                 "rolled_back": rolled|null, ["installing": ref],
                                 ["crashed_once": ref]}}}
        ref = {"version": int, "sha256": hex64, "baseline_sha256": hex64|null}
        rolled = {"version": int, "sha256": hex64, "reason": str, "at": ISO 8601}

A rolled-back release stays refused across restarts and twin resyncs until a higher version is
seen: without the record, a restart would re-submit the twin's (bad) manifest, find it to be
the highest version seen, and install it again. The same record refuses a release that killed
the process (``crashed_during_install``) or exhausted its quarantine's limits
(``resource_limit``, ``load_timeout``): retrying either would only do it again.

``installing`` is written before a release is loaded into the serving process and cleared once
it has served its first requests (or failed cleanly): found at start, it means the process died
loading or trying that release (`crash_recovered`). One crash is not evidence against a release
(a power cut or an OOM kill of a neighbour looks the same): the first one is remembered as
``crashed_once`` and the release is installed again, under the same guard, when it is next
offered; a second crash of the same release refuses it (``crashed_during_install``). Both are
written only when set, so a file without them reads as before they existed.

``state.json`` is replaced atomically (temp file in the same directory, fsync, ``os.replace``,
fsync of the directory), so a crash at any instant leaves either the old or the new state, and
an artifact is only renamed into ``models/`` after its digest was checked: a restart never
finds a partial model under a final name.

The state itself and its file format are pure (:mod:`agent.releases.state`); :class:`ModelStore`
does the I/O. All
writes go through an injectable ``opener`` so tests can play a full disk without patching.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import structlog
from pydantic import Field

from agent.config import Section
from agent.releases.state import SHA256, StoreState, check_sha, select_garbage
from wire.reasons import AgentError, Reason

__all__ = [
    "DEFAULT_FREE_SPACE_MARGIN_BYTES",
    "DEFAULT_KEEP_OLD_ARTIFACTS",
    "ModelStore",
    "Opener",
    "PartFile",
    "StoreError",
    "StoreSettings",
    "WritableFile",
    "ensure_writable_dir",
    "is_disk_full",
]

DEFAULT_KEEP_OLD_ARTIFACTS = 3
# Headroom kept free beyond the artifact itself: the state file, logs and the telemetry spool
# share the volume, and a volume filled to the last byte breaks all of them at once.
DEFAULT_FREE_SPACE_MARGIN_BYTES = 32 * 1024 * 1024


class StoreSettings(Section):
    """The model store's volume and how much it keeps."""

    state_dir: Path = Path("/var/lib/edge-agent")
    keep_old_artifacts: int = Field(DEFAULT_KEEP_OLD_ARTIFACTS, ge=0, le=100)
    free_space_margin_bytes: int = Field(DEFAULT_FREE_SPACE_MARGIN_BYTES, ge=0)


_TEMP_SUFFIXES = (".part", ".tmp")


class StoreError(AgentError):
    """A store write that did not happen (`disk_full`, `io_error`); the state on disk is intact."""


def ensure_writable_dir(directory: Path, role: str) -> None:
    """Create `directory` if needed; a StoreError naming `role` if this uid cannot write it.

    A store or spool that cannot be written fails at start, not at the first release: in a
    container this is a missing volume, a read-only root, or a volume owned by another uid.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))
    except OSError as error:
        raise StoreError(
            Reason.IO_ERROR,
            f"the {role} is not usable by uid {os.getuid()} "
            f"({error.strerror}: {error.filename}); mount a volume writable by it there",
        ) from error


class WritableFile(Protocol):
    """What the store needs of an open file; the seam a test uses to play a full disk."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


Opener = Callable[[Path, Literal["wb", "ab"]], WritableFile]


def _open_file(path: Path, mode: Literal["wb", "ab"]) -> WritableFile:
    return path.open(mode)


@dataclass(frozen=True)
class PartFile:
    """A temp file a download writes into; it gets its final name only via ``commit_*``."""

    path: Path
    opener: Opener = _open_file

    def open(self, *, append: bool) -> WritableFile:
        """Open for writing: ``append`` continues a resumed download, else start empty."""
        return self.opener(self.path, "ab" if append else "wb")

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def is_disk_full(error: OSError) -> bool:
    """ENOSPC, or a quota (EDQUOT) that has the same effect for us."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def _store_error(error: OSError, doing: str) -> StoreError:
    if is_disk_full(error):
        return StoreError(Reason.DISK_FULL, f"disk full while {doing}")
    return StoreError(Reason.IO_ERROR, f"{type(error).__name__} while {doing}: {error.strerror}")


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """The store on its volume. Call :meth:`open` once at start, before anything else."""

    def __init__(
        self,
        root: Path,
        *,
        keep_old_artifacts: int = DEFAULT_KEEP_OLD_ARTIFACTS,
        free_space_margin_bytes: int = DEFAULT_FREE_SPACE_MARGIN_BYTES,
        opener: Opener = _open_file,
        disk_usage: Callable[[Path], tuple[int, int, int]] = shutil.disk_usage,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        if keep_old_artifacts < 0 or free_space_margin_bytes < 0:
            raise ValueError("keep_old_artifacts and free_space_margin_bytes must be >= 0")
        self.root = root
        self.models_dir = root / "models"
        self.baselines_dir = root / "baselines"
        self.state_path = root / "state.json"
        self._keep = keep_old_artifacts
        self._margin = free_space_margin_bytes
        self._opener = opener
        self._disk_usage = disk_usage
        self._wall_clock = wall_clock
        self._log: structlog.typing.FilteringBoundLogger = logger or structlog.get_logger(
            "agent.releases.store"
        )
        self._state = StoreState()

    # -- start --

    def open(self) -> StoreState:
        """Create the layout, drop orphaned temp files, load ``state.json`` (or start empty)."""
        for directory in (self.root, self.models_dir, self.baselines_dir):
            ensure_writable_dir(directory, f"state directory {self.root}")
        self._remove_orphans()
        self._state = self._load_state()
        return self._state

    def _remove_orphans(self) -> None:
        # A temp file left by a crash is never resumed: its bytes were not verified, and
        # starting over is cheaper than reasoning about what a killed process wrote.
        # In the root only the store's own temp file: other services may share the volume.
        candidates = [*self.models_dir.iterdir(), *self.baselines_dir.iterdir()]
        candidates += self.root.glob("state.json*.tmp")
        for path in candidates:
            if path.suffix in _TEMP_SUFFIXES and path.is_file():
                path.unlink(missing_ok=True)
                self._log.info("store_orphan_removed", file=path.name)

    def _load_state(self) -> StoreState:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return StoreState()
        try:
            return StoreState.from_json_bytes(data)
        except ValueError as e:
            stamp = self._wall_clock().strftime("%Y%m%dT%H%M%S%fZ")
            aside = self.root / f"state.json.corrupt-{stamp}"
            os.replace(self.state_path, aside)
            _fsync_path(self.root)
            self._log.error(
                "store_state_corrupt",
                kept_as=aside.name,
                error=type(e).__name__,
                detail=str(e)[:300],
            )
            return StoreState()

    # -- state --

    @property
    def state(self) -> StoreState:
        return self._state

    def save(self, state: StoreState) -> None:
        """Persist ``state`` atomically; on failure the old ``state.json`` stays as it was.

        Raises :class:`StoreError` (``disk_full`` or ``io_error``); the temp file is removed.
        """
        data = json.dumps(state.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        tmp = self.root / "state.json.tmp"
        try:
            self._write_durably(tmp, data)
            os.replace(tmp, self.state_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _store_error(e, "writing state") from e
        self._state = state
        try:
            # Without this the rename itself may not survive a power cut.
            _fsync_path(self.root)
        except OSError as e:
            raise _store_error(e, "syncing the state directory") from e

    def _write_durably(self, path: Path, data: bytes) -> None:
        f = self._opener(path, "wb")
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()

    # -- artifacts --

    def artifact_path(self, sha256: str) -> Path:
        return self.models_dir / f"{check_sha(sha256)}.onnx"

    def has_artifact(self, sha256: str) -> bool:
        return self.artifact_path(sha256).is_file()

    def artifact_part(self, sha256: str) -> PartFile:
        """Where the downloader writes the artifact ``sha256`` before it is verified."""
        return PartFile(self.models_dir / f"{check_sha(sha256)}.part", self._opener)

    def commit_artifact(self, sha256: str) -> Path:
        """Give a verified ``.part`` its final content-addressed name (durably)."""
        return self._commit(self.artifact_part(sha256).path, self.artifact_path(sha256))

    def verify_artifact(self, sha256: str) -> bool:
        """Re-hash a stored artifact (e.g. before loading it after a restart)."""
        return _file_sha256(self.artifact_path(sha256)) == sha256

    def baseline_path(self, sha256: str) -> Path:
        return self.baselines_dir / f"{check_sha(sha256)}.json"

    def baseline_part(self, sha256: str) -> PartFile:
        return PartFile(self.baselines_dir / f"{check_sha(sha256)}.part", self._opener)

    def commit_baseline(self, sha256: str) -> Path:
        return self._commit(self.baseline_part(sha256).path, self.baseline_path(sha256))

    def _commit(self, part: Path, final: Path) -> Path:
        try:
            _fsync_path(part)
            os.replace(part, final)
            _fsync_path(final.parent)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise _store_error(e, f"committing {final.name}") from e
        self._log.info("store_artifact_committed", file=final.name)
        return final

    def ensure_free_space(self, nbytes: int) -> None:
        """Refuse a download of ``nbytes`` that would leave less than the margin free."""
        free = self._disk_usage(self.models_dir)[2]
        if free < nbytes + self._margin:
            raise StoreError(
                Reason.DISK_FULL,
                f"{free} bytes free, need {nbytes} plus a margin of {self._margin}",
            )

    def collect_garbage(self) -> tuple[str, ...]:
        """Delete old artifacts and baselines beyond the newest ``keep_old_artifacts``; the
        active and last-known-good ones of every model are never deleted. Returns the file
        names removed.
        """
        removed: list[str] = []
        for directory, suffix, protected in (
            (self.models_dir, ".onnx", self._state.protected_artifacts()),
            (self.baselines_dir, ".json", self._state.protected_baselines()),
        ):
            present = {
                p.stem: p.stat().st_mtime
                for p in directory.iterdir()
                if p.suffix == suffix and SHA256.fullmatch(p.stem) and p.is_file()
            }
            for sha in sorted(select_garbage(present, protected, self._keep)):
                path = directory / f"{sha}{suffix}"
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path.name)
                self._log.info("store_artifact_collected", file=path.name)
        return tuple(removed)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
