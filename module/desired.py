"""Desired twin reconciliation as a pure state machine.

IoT Hub delivers desired properties as a full document (twin GET, and the SDK's replay after a
reconnect) or as JSON merge patches, each stamped with `$version`. The reconciler merges
patches into the last applied document, ignores anything not newer than what it applied, and
validates the result into typed settings before anything acts on it. What changed comes out as
actions; the adapter performs them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from wire.bounded_json import BoundedJsonError, JsonLimits, check_value
from wire.desired import DesiredState
from wire.reasons import Reason

# IoT Hub caps desired properties at 32 KB, strings at 4 KB and depth at 10 levels; a document
# over those is not from a real hub and is refused before it is parsed into settings.
MAX_DOCUMENT_BYTES = 32 * 1024
MAX_DEPTH = 10
MAX_STRING = 4096
# What the SDK hands over, checked before anything recursive (the merge) touches it. Looser
# than the hub's limits, which `check_shape` then applies naming the field: this only keeps a
# structure no hub would send (1,000 levels, megabytes) from the merge's recursion.
INCOMING_LIMITS = JsonLimits(max_bytes=8 * MAX_DOCUMENT_BYTES, max_depth=64)
NULL_MODEL = (
    "model: null is not a release; the served model is kept "
    "(publish a newer release, or call the rollback method)"
)


@dataclass(frozen=True, slots=True)
class Apply:
    """Act on a new desired state: submit the manifests that changed, retune telemetry."""

    version: int
    state: DesiredState
    changed: tuple[str, ...]  # the names whose desired manifest is new or different

    @property
    def model_changed(self) -> bool:
        return bool(self.changed)


@dataclass(frozen=True, slots=True)
class Reject:
    """The merged document is not a valid desired state; keep what runs, report why."""

    version: int
    message: str
    reason: Reason = Reason.DESIRED_INVALID


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing newer than what was applied (a duplicate, an older patch, a replay)."""

    version: int | None


Action = Apply | Reject | Ignore


@dataclass(frozen=True)
class Reconciler:
    """Applied `$version`, the merged desired document, and the state last applied."""

    version: int = 0
    document: Mapping[str, Any] = field(default_factory=dict)
    applied: DesiredState | None = None
    max_models: int = 8

    def full(self, desired: Mapping[str, Any]) -> tuple[Reconciler, Action]:
        """A whole desired document (twin GET on connect, or the SDK's replay)."""
        return self._next(desired, replace=True)

    def patch(self, patch: Mapping[str, Any]) -> tuple[Reconciler, Action]:
        """A desired-properties patch (JSON merge patch with `$version`)."""
        return self._next(patch, replace=False)

    def _refused(self, version: int, problem: str) -> tuple[Reconciler, Action]:
        return (
            Reconciler(version, self.document, self.applied, self.max_models),
            Reject(version, problem),
        )

    def _next(self, incoming: Mapping[str, Any], *, replace: bool) -> tuple[Reconciler, Action]:
        version = incoming.get("$version")
        if not isinstance(version, int) or isinstance(version, bool):
            return self, Reject(self.version, "desired properties carry no integer $version")
        if version <= self.version:
            return self, Ignore(version)
        try:
            check_value(incoming, INCOMING_LIMITS)
        except BoundedJsonError as error:
            # The version is consumed, as for any refused document; the merged one is kept.
            return self._refused(version, f"desired properties {error.problem}: {error.message}")
        body = {k: v for k, v in incoming.items() if not k.startswith("$")}
        document = body if replace else merge_patch(self.document, body)
        problem = check_shape(document)
        if problem is None and "model" in body and body["model"] is None:
            # A null model is invalid, not "serve nothing": what runs is kept and the
            # operator is told how to go back.
            problem = NULL_MODEL
        reason = Reason.DESIRED_INVALID
        if problem is None:
            try:
                state = DesiredState.model_validate_json(json.dumps(document))
            except ValidationError as error:
                problem = describe(error)
            else:
                if state.model is not None and state.models is not None:
                    problem = "use `models` or its `model` shorthand, not both"
                elif len(state.models or {}) > self.max_models:
                    reason = Reason.TOO_MANY_MODELS
                    problem = (
                        f"{len(state.models or {})} models desired; this device takes at most "
                        f"{self.max_models} (EDGEML_MODULE_MAX_MODELS)"
                    )
        if problem is not None:
            # The version is consumed, so the same bad document is not retried forever; the
            # merged document is kept, so a later patch that fixes the field applies.
            return (
                Reconciler(version, document, self.applied, self.max_models),
                Reject(version, problem, reason),
            )
        before = self.applied.releases() if self.applied is not None else {}
        changed = tuple(
            name for name, manifest in state.releases().items() if before.get(name) != manifest
        )
        return Reconciler(version, document, state, self.max_models), Apply(version, state, changed)


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: objects merge, `null` deletes, anything else replaces."""
    merged = copy.deepcopy(dict(target))
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_patch(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_shape(document: Mapping[str, Any]) -> str | None:
    """IoT Hub's own limits, checked without recursion: depth, string length, then size."""
    stack: list[tuple[object, int, str]] = [(document, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            return f"{path or 'desired'} nests deeper than {MAX_DEPTH} levels"
        if isinstance(value, str) and len(value) > MAX_STRING:
            return f"{path} is a string of {len(value)} characters, over {MAX_STRING}"
        if isinstance(value, Mapping):
            stack += [(v, depth + 1, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, depth + 1, f"{path}[{i}]") for i, v in enumerate(value)]
    try:
        size = len(json.dumps(document, allow_nan=False).encode())
    except (TypeError, ValueError):
        return "desired properties are not JSON"
    if size > MAX_DOCUMENT_BYTES:
        return f"desired properties are {size} bytes, over the {MAX_DOCUMENT_BYTES} byte limit"
    return None


def describe(error: ValidationError, root: str = "desired") -> str:
    """The first problems, by field path (`root` for the document itself); input values are
    left out (untrusted, maybe huge)."""
    parts = [
        f"{'.'.join(str(p) for p in item['loc']) or root}: {item['msg']}"
        for item in error.errors()[:3]
    ]
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
