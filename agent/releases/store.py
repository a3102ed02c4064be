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

:class:`StoreState` and :func:`select_garbage` are pure; :class:`ModelStore` does the I/O. All
writes go through an injectable ``opener`` so tests can play a full disk without patching.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal, Protocol

import structlog
from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints

from agent.config import Section
from wire.base import LaxWireModel, WireModel
from wire.reasons import AgentError, Reason

__all__ = [
    "DEFAULT_FREE_SPACE_MARGIN_BYTES",
    "DEFAULT_KEEP_OLD_ARTIFACTS",
    "ModelRecord",
    "ModelRef",
    "ModelStore",
    "NoLastKnownGoodError",
    "Opener",
    "PartFile",
    "RolledBack",
    "StoreError",
    "StoreSettings",
    "StoreState",
    "WritableFile",
    "ensure_writable_dir",
    "is_disk_full",
    "select_garbage",
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


_SHA256 = re.compile(r"[0-9a-f]{64}")
_TEMP_SUFFIXES = (".part", ".tmp")
_STATE_SCHEMA = 1


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


class NoLastKnownGoodError(ValueError):
    """A rollback was asked for a model that has no last-known-good release."""


# --- pure state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """One release of a model, as far as the disk state cares."""

    version: int
    sha256: str
    baseline_sha256: str | None = None

    def __post_init__(self) -> None:
        _check_sha(self.sha256)
        if self.baseline_sha256 is not None:
            _check_sha(self.baseline_sha256)
        if self.version < 1:
            raise ValueError(f"version must be >= 1, got {self.version}")


@dataclass(frozen=True)
class RolledBack:
    """A release taken out of service (probation, the rollback method): never installed again."""

    version: int
    sha256: str
    reason: Reason
    at: datetime

    def __post_init__(self) -> None:
        _check_sha(self.sha256)
        if self.at.tzinfo is None:
            raise ValueError("a rollback time must be timezone-aware")

    def is_release(self, version: int, sha256: str) -> bool:
        return (self.version, self.sha256) == (version, sha256)


@dataclass(frozen=True)
class ModelRecord:
    """What the device knows about one model name."""

    active: ModelRef | None = None
    last_known_good: ModelRef | None = None
    highest_seen: ModelRef | None = None
    rolled_back: RolledBack | None = None
    installing: ModelRef | None = None  # loading or on trial in the serving process
    crashed_once: ModelRef | None = None  # died once installing it: the next crash refuses it

    @property
    def fallback(self) -> ModelRef | None:
        """What a rollback would serve: the last-known-good, unless it is what serves now
        (after a rollback the release serving is the last known good one, with none older)."""
        lkg = self.last_known_good
        return lkg if lkg is not None and not _same_release(self.active, lkg) else None


_EMPTY_RECORD = ModelRecord()


@dataclass(frozen=True)
class StoreState:
    """The persisted state, per model name; transitions return new values."""

    models: Mapping[str, ModelRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only copy: a frozen state must not change behind the back of whoever holds it.
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    def record(self, name: str) -> ModelRecord:
        return self.models.get(name, _EMPTY_RECORD)

    def _with(self, name: str, record: ModelRecord) -> StoreState:
        return StoreState({**self.models, name: record})

    def seen(self, name: str, ref: ModelRef) -> StoreState:
        """Remember ``ref`` as the highest version seen, if it is higher (never goes back)."""
        rec = self.record(name)
        if rec.highest_seen is not None and ref.version <= rec.highest_seen.version:
            return self
        rolled = rec.rolled_back
        if rolled is not None and ref.version > rolled.version:
            rolled = None  # a higher version supersedes the release that was rolled back
        return self._with(name, replace(rec, highest_seen=ref, rolled_back=rolled))

    def activated(self, name: str, ref: ModelRef) -> StoreState:
        """``ref`` now serves; the model it replaced becomes the last-known-good."""
        rec = self.record(name)
        lkg = rec.active if rec.active is not None and rec.active != ref else rec.last_known_good
        return self._with(name, replace(rec, active=ref, last_known_good=lkg)).seen(name, ref)

    def rolled_back(self, name: str, reason: Reason, at: datetime) -> StoreState:
        """The last-known-good serves again and stays the last-known-good (it is known good:
        it served before, and nothing older is kept to fall back to). The release rolled back
        from is recorded (it is refused until a higher version is seen) and not kept as a
        fallback; the highest version seen stays (a fix is published as a higher version).
        """
        rec = self.record(name)
        target = rec.fallback
        if target is None:
            raise NoLastKnownGoodError(f"model {name!r} has no last-known-good release")
        bad = rec.active
        rolled = (
            RolledBack(bad.version, bad.sha256, reason, at) if bad is not None else rec.rolled_back
        )
        return self._with(
            name,
            replace(
                rec,
                active=target,
                last_known_good=target,
                rolled_back=rolled,
                installing=None,
                crashed_once=None,
            ),
        )

    def installing(self, name: str, ref: ModelRef) -> StoreState:
        """``ref`` is about to be loaded in the serving process (see the module docstring). A
        crash remembered of another release no longer matters: it is not the one retried."""
        rec = self.record(name)
        crashed = rec.crashed_once if _same_release(rec.crashed_once, ref) else None
        return self._with(name, replace(rec, installing=ref, crashed_once=crashed))

    def installed(self, name: str, ref: ModelRef) -> StoreState:
        """``ref`` failed cleanly or has served its first requests: no longer on trial."""
        rec = self.record(name)
        # The release, whatever drift baseline its ref carries.
        if not _same_release(rec.installing, ref):
            return self
        # Through its trial (or failed for a reason of its own): an earlier crash is forgiven.
        crashed = None if _same_release(rec.crashed_once, ref) else rec.crashed_once
        return self._with(name, replace(rec, installing=None, crashed_once=crashed))

    def crash_recovered(self, name: str, at: datetime) -> StoreState:
        """At start, with ``installing`` left behind: that release crashed the process. If it
        had become active, the last-known-good serves again (and stays the last-known-good, as
        after any rollback). A first crash is remembered (``crashed_once``) and the release may
        be installed again; a second one refuses it from now on (``crashed_during_install``)."""
        rec = self.record(name)
        bad = rec.installing
        if bad is None:
            return self
        active, lkg = rec.active, rec.last_known_good
        if active is not None and _same_release(active, bad):
            active = lkg
        if not _same_release(rec.crashed_once, bad):
            return self._with(
                name,
                replace(rec, active=active, last_known_good=lkg, installing=None, crashed_once=bad),
            )
        refused = RolledBack(bad.version, bad.sha256, Reason.CRASHED_DURING_INSTALL, at)
        return self._with(
            name,
            replace(
                rec,
                active=active,
                last_known_good=lkg,
                installing=None,
                crashed_once=None,
                rolled_back=refused,
            ),
        )

    def refused(self, name: str, ref: ModelRef, reason: Reason, at: datetime) -> StoreState:
        """``ref`` is never installed again (until a higher version is seen), for ``reason``."""
        refused = RolledBack(ref.version, ref.sha256, reason, at)
        return self._with(name, replace(self.record(name), rolled_back=refused))

    def removed(self, name: str) -> StoreState:
        """``name`` serves no more (no longer desired): nothing to restore or fall back to, so
        its files may be collected. What was seen and refused stays: versions never go back,
        and a refused release stays refused if the model is desired again."""
        rec = self.record(name)
        return self._with(
            name,
            replace(rec, active=None, last_known_good=None, installing=None, crashed_once=None),
        )

    def protected_artifacts(self) -> frozenset[str]:
        """Digests that garbage collection must never remove: every active and LKG model."""
        return frozenset(ref.sha256 for ref in self._serving_refs())

    def protected_baselines(self) -> frozenset[str]:
        return frozenset(ref.baseline_sha256 for ref in self._serving_refs() if ref.baseline_sha256)

    def _serving_refs(self) -> list[ModelRef]:
        return [
            ref
            for rec in self.models.values()
            for ref in (rec.active, rec.last_known_good)
            if ref is not None
        ]

    def to_json(self) -> dict[str, object]:
        """The ``state.json`` document."""
        return {
            "schema": _STATE_SCHEMA,
            "models": {name: _record_json(rec) for name, rec in sorted(self.models.items())},
        }

    @classmethod
    def from_json_bytes(cls, data: bytes) -> StoreState:
        """Parse ``state.json``; raises ``ValueError`` (incl. ``ValidationError``) if unusable."""
        parsed = _StateFile.model_validate_json(data)
        return cls(
            {
                name: ModelRecord(
                    active=_ref(rec.active),
                    last_known_good=_ref(rec.last_known_good),
                    highest_seen=_ref(rec.highest_seen),
                    rolled_back=_rolled(rec.rolled_back),
                    installing=_ref(rec.installing),
                    crashed_once=_ref(rec.crashed_once),
                )
                for name, rec in parsed.models.items()
            }
        )


def select_garbage(
    artifacts: Mapping[str, float], protected: frozenset[str], keep: int
) -> set[str]:
    """Which artifacts to delete: all but the protected ones and the ``keep`` newest others.

    ``artifacts`` maps digest to modification time.
    """
    if keep < 0:
        raise ValueError("keep must be >= 0")
    others = sorted(
        (sha for sha in artifacts if sha not in protected),
        key=lambda sha: (artifacts[sha], sha),
        reverse=True,
    )
    return set(others[keep:])


def _same_release(ref: ModelRef | None, other: ModelRef) -> bool:
    """The same release, whatever drift baseline either ref carries."""
    return ref is not None and (ref.version, ref.sha256) == (other.version, other.sha256)


def _check_sha(sha256: str) -> str:
    # Digests become file names: anything but 64 lowercase hex could escape the directory.
    if not _SHA256.fullmatch(sha256):
        raise ValueError("sha256 must be 64 lowercase hex characters")
    return sha256


# --- state.json wire form ------------------------------------------------------------------

_Sha = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _RefFile(WireModel):
    version: int = Field(ge=1)
    sha256: _Sha
    baseline_sha256: _Sha | None = None


class _RolledBackFile(LaxWireModel):  # lax: `at` is an ISO string
    version: int = Field(ge=1)
    sha256: _Sha
    reason: Reason
    at: AwareDatetime


class _RecordFile(WireModel):
    active: _RefFile | None = None
    last_known_good: _RefFile | None = None
    highest_seen: _RefFile | None = None
    # Absent in files written before rollbacks were recorded.
    rolled_back: _RolledBackFile | None = None
    installing: _RefFile | None = None  # absent unless set
    crashed_once: _RefFile | None = None  # absent unless set


class _StateFile(WireModel):
    model_config = ConfigDict(populate_by_name=True)  # merged into WireModel's
    schema_: Literal[1] = Field(alias="schema")
    models: dict[Annotated[str, StringConstraints(min_length=1, max_length=63)], _RecordFile]


def _ref_json(ref: ModelRef | None) -> dict[str, object] | None:
    if ref is None:
        return None
    return {"version": ref.version, "sha256": ref.sha256, "baseline_sha256": ref.baseline_sha256}


def _rolled_json(rolled: RolledBack | None) -> dict[str, object] | None:
    if rolled is None:
        return None
    return {
        "version": rolled.version,
        "sha256": rolled.sha256,
        "reason": rolled.reason.value,
        "at": rolled.at.isoformat(),
    }


def _rolled(rolled: _RolledBackFile | None) -> RolledBack | None:
    if rolled is None:
        return None
    return RolledBack(rolled.version, rolled.sha256, rolled.reason, rolled.at)


def _record_json(rec: ModelRecord) -> dict[str, object]:
    document: dict[str, object] = {
        "active": _ref_json(rec.active),
        "last_known_good": _ref_json(rec.last_known_good),
        "highest_seen": _ref_json(rec.highest_seen),
        "rolled_back": _rolled_json(rec.rolled_back),
    }
    if rec.installing is not None:  # only when set: older agents can still read the file
        document["installing"] = _ref_json(rec.installing)
    if rec.crashed_once is not None:
        document["crashed_once"] = _ref_json(rec.crashed_once)
    return document


def _ref(ref: _RefFile | None) -> ModelRef | None:
    if ref is None:
        return None
    return ModelRef(version=ref.version, sha256=ref.sha256, baseline_sha256=ref.baseline_sha256)


# --- I/O -----------------------------------------------------------------------------------


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
        return self.models_dir / f"{_check_sha(sha256)}.onnx"

    def has_artifact(self, sha256: str) -> bool:
        return self.artifact_path(sha256).is_file()

    def artifact_part(self, sha256: str) -> PartFile:
        """Where the downloader writes the artifact ``sha256`` before it is verified."""
        return PartFile(self.models_dir / f"{_check_sha(sha256)}.part", self._opener)

    def commit_artifact(self, sha256: str) -> Path:
        """Give a verified ``.part`` its final content-addressed name (durably)."""
        return self._commit(self.artifact_part(sha256).path, self.artifact_path(sha256))

    def verify_artifact(self, sha256: str) -> bool:
        """Re-hash a stored artifact (e.g. before loading it after a restart)."""
        return _file_sha256(self.artifact_path(sha256)) == sha256

    def baseline_path(self, sha256: str) -> Path:
        return self.baselines_dir / f"{_check_sha(sha256)}.json"

    def baseline_part(self, sha256: str) -> PartFile:
        return PartFile(self.baselines_dir / f"{_check_sha(sha256)}.part", self._opener)

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
                if p.suffix == suffix and _SHA256.fullmatch(p.stem) and p.is_file()
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
