"""Where a release stands, replayed from the audit log (pure): rings applied and gated, a halt
decided and how far it got, and the versions already sent to rings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from deployment.errors import PublisherError, Reason
from deployment.publish.audit import Entry


@dataclass
class Progress:
    """What the audit log says a release has done so far."""

    applied: set[str] = field(default_factory=set)
    gated: set[str] = field(default_factory=set)
    previous: dict[str, int | None] = field(default_factory=dict)
    halt: Entry | None = None  # the halt decided (``release.halt started``)
    methods: set[str] = field(default_factory=set)  # devices asked to roll back
    reregistered: dict[int, int] = field(default_factory=dict)  # previous -> its new version
    restored: set[str] = field(default_factory=set)  # rings whose layer was put back
    halted: Entry | None = None  # the halt finished
    finished: bool = False
    without_traffic: dict[str, int] = field(default_factory=dict)  # ring -> devices accepted

    @property
    def halting(self) -> bool:
        """A halt was decided and not finished: a crash or an outage cut it off."""
        return self.halt is not None and self.halted is None


def progress_of(entries: Iterable[Entry], subject: str) -> Progress:
    """Replay the audit entries of one release (pure)."""
    progress = Progress()
    for entry in entries:
        if entry.subject != subject:
            continue
        ring = str(entry.details.get("ring", ""))
        if entry.action == "release.ring" and entry.outcome == "applied":
            progress.applied.add(ring)
            previous = entry.details.get("previous_version")
            progress.previous[ring] = int(previous) if previous is not None else None
        elif entry.action == "release.gate" and entry.outcome == "passed":
            progress.gated.add(ring)
            quiet = entry.details.get("without_traffic")
            if isinstance(quiet, int) and quiet > 0:
                progress.without_traffic[ring] = quiet
        elif entry.action == "release.halt" and entry.outcome == "started":
            progress.halt = entry
        elif entry.action == "release.rollback_method":
            progress.methods.add(str(entry.details.get("device", "")))
        elif entry.action == "release.rerelease":
            restored = int(entry.details["restored_version"])
            progress.reregistered[restored] = int(entry.details["as_version"])
        elif entry.action == "release.rollback":
            progress.restored.add(ring)
        elif entry.action == "release.halted":
            progress.halted = entry
        elif entry.action == "release.finished":
            progress.finished = True
    return progress


def halting_subjects(entries: Iterable[Entry]) -> list[str]:
    """Releases whose halt was decided and not finished, in the order they were decided (pure)."""
    started: dict[str, None] = {}
    for entry in entries:
        if entry.action == "release.halt" and entry.outcome == "started":
            started[entry.subject] = None
        elif entry.action == "release.halted":
            started.pop(entry.subject, None)
    return list(started)


def released_versions(entries: Iterable[Entry], model: str) -> dict[int, str]:
    """Every version of ``model`` written to a ring's layer, with the first ring (pure)."""
    released: dict[int, str] = {}
    for entry in entries:
        name, _, version = entry.subject.rpartition(":")
        if name != model or not version.isdigit():
            continue
        ring = str(entry.details.get("ring", ""))
        if entry.action == "release.ring" and entry.outcome == "applied":
            released.setdefault(int(version), ring)
        elif entry.action == "release.rollback" and entry.outcome == "rereleased":
            released.setdefault(int(entry.details["as_version"]), ring)
    return released


def check_newer_than_released(model: str, version: int, released: Mapping[int, str]) -> None:
    """Devices refuse a version that is not above the highest they were sent: so does this.

    The version itself may be in ``released``: a rerun resumes it or changes nothing.
    """
    higher = max(released, default=0)
    if version >= higher:
        return
    raise PublisherError(
        Reason.VERSION_NOT_MONOTONIC,
        f"{model}:{version} is below {model}:{higher}, already sent to ring {released[higher]!r} "
        "(devices refuse it as version_not_monotonic): register its model file again as a new "
        f"version (edgeml register FILE --name {model}), then upload, sign and release that",
    )
