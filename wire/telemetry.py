"""Messages the module sends on its routes, by their `schema` stamp (the outbox's envelope
carries it, so a cloud reader knows the shape before it parses the body).

Built strictly by the device and dumped with :func:`to_message`; a reader of these records
(the drift report reads profiles) parses the JSON it stored.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, Field

from wire.base import WireModel
from wire.reported import ModelHealth, Timestamp
from wire.states import DriftState, ModelState, QualityState

__all__ = [
    "ALERT_SCHEMA",
    "PROFILE_SCHEMA",
    "TELEMETRY_SCHEMA",
    "Alert",
    "DriftAlert",
    "DriftProfile",
    "QualityAlert",
    "TelemetryModel",
    "TelemetryRecord",
    "to_message",
]

TELEMETRY_SCHEMA: Final = "agent-telemetry/1"
"""On `telemetry`, each telemetry interval: every model's version, state, health and profile,
the inference window and the resources."""

PROFILE_SCHEMA: Final = "agent-drift-profile/1"
"""On `telemetry`, each closed drift window: sparse feature counts, mergeable by baseline."""

ALERT_SCHEMA: Final = "agent-alert/1"
"""On `alerts`: an :class:`Alert`; a drift or quality state change (a :class:`DriftAlert`,
:class:`QualityAlert`) is one's details."""

# The window figures are plain JSON numbers (or None where nothing was measured).
Figures = dict[str, float | int | None]


class DriftProfile(WireModel):
    """One closed drift window (`agent-drift-profile/1`): the counts of at most
    `max_profile_features` features, sparse (`bins`, nonzero `i` and their counts `c`, `sum`,
    `sum_sq`, `below`, `above`); `truncated` counts the features left out."""

    schema_: Literal["agent-drift-profile/1"] = Field(PROFILE_SCHEMA, serialization_alias="schema")
    model: str
    version: int
    baseline: str
    seq: int
    ended: float  # wall-clock seconds
    seconds: float
    rows: int
    score: float | None
    state: DriftState
    features: dict[str, dict[str, Any]]
    truncated: int


class DriftAlert(WireModel):
    """A drift state change of a served release (`agent-alert/1`, event `drift_state`)."""

    schema_: Literal["agent-alert/1"] = Field(ALERT_SCHEMA, serialization_alias="schema")
    event: Literal["drift_state"] = "drift_state"
    model: str
    version: int
    from_: DriftState = Field(serialization_alias="from")
    to: DriftState
    score: float | None
    feature: str | None  # the most divergent feature of the window
    window: int
    at: Timestamp


class QualityAlert(WireModel):
    """A quality state change from feedback (`agent-alert/1`, event `quality_state`), with
    the window's value under the name of its metric."""

    schema_: Literal["agent-alert/1"] = Field(ALERT_SCHEMA, serialization_alias="schema")
    event: Literal["quality_state"] = "quality_state"
    model: str
    version: int
    from_: QualityState = Field(serialization_alias="from")
    to: QualityState
    accuracy: float | None = None
    mae: float | None = None
    window: int
    at: Timestamp


class Alert(WireModel):
    """What the module sends on `alerts` (`agent-alert/1`): what happened (`model_failed`,
    `manifest_rejected`, `drift_state`...), when, and its details."""

    kind: str
    at: Timestamp
    details: dict[str, Any]


class TelemetryModel(WireModel):
    """One model in a telemetry record."""

    version: int | None
    state: ModelState
    health: ModelHealth | None
    profile: Figures | None


class TelemetryRecord(WireModel):
    """`agent-telemetry/1`: one telemetry interval of the agent."""

    at: Timestamp
    models: dict[str, TelemetryModel]
    inference: Figures
    resources: dict[str, object]


def to_message(record: BaseModel) -> dict[str, Any]:
    """A record as it leaves on a route: JSON values under their wire names (`schema`,
    `from`); an optional field its producer left unset (a metric it does not have) is left
    out, a None it set is kept."""
    unset = {
        name
        for name in type(record).model_fields
        if name not in record.model_fields_set and getattr(record, name) is None
    }
    return record.model_dump(mode="json", by_alias=True, exclude=unset)
