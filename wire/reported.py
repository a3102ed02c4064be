"""The module twin's reported properties: what a device says, and what the cloud reads.

Sections: `models.<name>` (:class:`ModelEntry`, one per served model), `rejected.<name>`
(:class:`RejectedEntry`, manifests refused before install), `desired` (:class:`DesiredEntry`)
and `agent` (:class:`AgentEntry`). The agent builds these and dumps them at the edge
(:func:`to_twin`); the rollout gate, the retraining controller, the publisher's `status` and
the simulator's stand-ins read them back through :func:`read_entry`.

Every field may be absent: the twin takes each patch as a JSON merge patch, where a null
deletes the key, so a reader sees no key where the agent wrote None, and a stand-in may report
only what changed.

Producers are strict and readers lenient, on purpose. The device builds these models from its
own values (strict: an unknown or mistyped field, a string for a state, is our bug, refused
before it leaves). A reader (:func:`read_entry`) drops the fields it does not know, then the
known fields whose values it cannot read (a list of features with one odd item goes whole),
and keeps the rest: a publisher one release older than the fleet keeps gating on what it knows
when a newer agent adds a field, and one odd value costs that field, not the device's whole
entry. Values are read as JSON (strict JSON mode: an ISO string is a timestamp, a boolean is
never a number).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import PlainSerializer, ValidationError

from wire.base import WireModel
from wire.reasons import Reason
from wire.states import DesiredOutcome, DriftState, ModelState, ProbationState, QualityState

__all__ = [
    "AgentEntry",
    "DesiredEntry",
    "DriftEntry",
    "DriftFeature",
    "ModelEntry",
    "ModelHealth",
    "ProbationEntry",
    "QualityEntry",
    "RejectedEntry",
    "StatusEntry",
    "read_entry",
    "to_twin",
]

# The twin has always shown `datetime.isoformat()` (`+00:00`), not pydantic's `Z`.
Timestamp = Annotated[
    datetime, PlainSerializer(datetime.isoformat, return_type=str, when_used="json")
]


class TwinModel(WireModel):
    """A section of the reported twin (strict to build; read with :func:`read_entry`)."""


class ProbationEntry(TwinModel):
    """`models.<name>.probation`: the ring gate reads exactly this.

    `latency_ratio` (means) is what the device judges on; `p99_ratio` is the tail, for the
    gate. A ratio is None until both releases served the policy's minimum of requests.
    """

    state: ProbationState
    requests: int | None = None
    error_rate: float | None = None
    latency_ratio: float | None = None
    p99_ratio: float | None = None
    until: Timestamp | None = None


class ModelHealth(TwinModel):
    """`models.<name>.health`: one telemetry window of the serving release."""

    requests: int | None = None
    error_rate: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    window_s: float | None = None


class DriftFeature(TwinModel):
    """One of the most divergent features of the last drift window."""

    feature: str
    divergence: float
    psi: float


class DriftEntry(TwinModel):
    """`models.<name>.drift`. `version` says whose watch it is: during a release the entry's
    own `version` is the incoming one while the serving release's watch goes on. The figures
    are there only when the release is watched (it has a baseline and drift is enabled)."""

    version: int | None = None
    state: DriftState
    since: Timestamp | None = None
    score: float | None = None
    level: float | None = None
    threshold: float | None = None
    window_rows: int | None = None
    windows: int | None = None
    sample_every: int | None = None
    top: tuple[DriftFeature, ...] | None = None
    requested_window_rows: int | None = None  # the calibrated size differs from the asked one


class QualityEntry(TwinModel):
    """`models.<name>.quality`: accuracy or mean absolute error from feedback labels."""

    version: int | None = None
    state: QualityState
    since: Timestamp | None = None
    metric: str | None = None
    value: float | None = None
    windows: int | None = None
    reference: bool | None = None


class StatusEntry(TwinModel):
    """A model name's lifecycle status: the first fields of its entry.

    `reason` is one of the bounded reasons of `wire.reasons`.
    """

    version: int | None = None
    sha256: str | None = None
    state: ModelState | None = None
    reason: Reason | None = None
    message: str | None = None
    since: Timestamp | None = None


class ModelEntry(StatusEntry):
    """`models.<name>`: the status plus one section per feature. A section is None (null on
    the twin, which deletes it there) when it does not apply: no probation running, no
    telemetry window yet, the name not served."""

    active_version: int | None = None
    probation: ProbationEntry | None = None
    health: ModelHealth | None = None
    drift: DriftEntry | None = None
    quality: QualityEntry | None = None


class RejectedEntry(StatusEntry):
    """`rejected.<name>`: a manifest refused before anything was installed. `version` and
    `sha256` are None when the refusal came before the manifest could be read."""


class DesiredEntry(TwinModel):
    """`desired`: the last desired document's `$version` and what was done with it."""

    version: int | None = None
    state: DesiredOutcome | None = None
    reason: Reason | None = None
    message: str | None = None


class AgentEntry(TwinModel):
    """`agent`: the running agent's version, when it started and (on the way out) stopped."""

    version: str | None = None
    started: Timestamp | None = None
    stopped: Timestamp | None = None


def to_twin(section: TwinModel) -> dict[str, Any]:
    """A section as the twin shows it: the fields its producer set, None included (a null
    deletes the key on the hub; a field left unset is not in the patch at all)."""
    return section.model_dump(mode="json", exclude_unset=True)


M = TypeVar("M", bound=TwinModel)


def read_entry(data: object, model: type[M]) -> M | None:
    """A reported section as read from a twin; None when absent or unreadable."""
    cleaned = _readable(data, model)
    return None if cleaned is None else model.model_validate_json(json.dumps(cleaned))


def _readable(data: object, model: type[TwinModel]) -> dict[str, Any] | None:
    """The part of `data` that reads as `model`: unknown fields and unreadable values out."""
    if not isinstance(data, Mapping):
        return None
    kept: dict[str, Any] = {}
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue  # a field from a newer agent
        nested = _section_type(field.annotation)
        readable = _readable(value, nested) if nested is not None and value is not None else value
        if readable is None and value is not None:
            continue  # a section with nothing readable in it
        kept[key] = readable
    for _ in range(len(kept) + 1):
        try:
            model.model_validate_json(json.dumps(kept))
        except ValidationError as error:
            bad = {item["loc"][0] for item in error.errors() if item["loc"]}
            if not bad & kept.keys():
                return None  # a field it cannot do without is missing
            kept = {k: v for k, v in kept.items() if k not in bad}
        else:
            return kept
    return None


def _section_type(annotation: object) -> type[TwinModel] | None:
    """The section model a field holds (`X` or `X | None`), if it holds one."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [_section_type(arg) for arg in typing.get_args(annotation)]
        return next((f for f in found if f is not None), None)
    if isinstance(annotation, type) and issubclass(annotation, TwinModel):
        return annotation
    return None
