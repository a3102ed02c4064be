"""What the device remembers per model name, and how ``state.json`` spells it. Pure.

:class:`StoreState` holds, per model, the active release, the last-known-good, the highest
version seen, a rolled-back release and the crash guard's ``installing`` and ``crashed_once``;
its transitions return new values. :func:`select_garbage` decides which artifacts may go. The
store (:mod:`agent.releases.store`) reads and writes this state on disk, atomically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints

from wire.base import LaxWireModel, WireModel
from wire.reasons import Reason

_STATE_SCHEMA = 1
SHA256 = re.compile(r"[0-9a-f]{64}")


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
        check_sha(self.sha256)
        if self.baseline_sha256 is not None:
            check_sha(self.baseline_sha256)
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
        check_sha(self.sha256)
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


def check_sha(sha256: str) -> str:
    # Digests become file names: anything but 64 lowercase hex could escape the directory.
    if not SHA256.fullmatch(sha256):
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
