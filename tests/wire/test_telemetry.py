"""Route records: wire names on the way out, and only the metric a quality window has."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from wire.states import DriftState, QualityState
from wire.telemetry import DriftAlert, QualityAlert, to_message

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_drift_alert_leaves_with_its_schema_and_from_and_a_null_score_kept() -> None:
    alert = DriftAlert(
        model="m",
        version=2,
        from_=DriftState.OK,
        to=DriftState.DRIFT,
        score=None,
        feature="x[0]",
        window=7,
        at=AT,
    )
    assert to_message(alert) == {
        "schema": "agent-alert/1",
        "event": "drift_state",
        "model": "m",
        "version": 2,
        "from": "ok",
        "to": "drift",
        "score": None,
        "feature": "x[0]",
        "window": 7,
        "at": "2026-01-02T03:04:05+00:00",
    }


@pytest.mark.parametrize("metric", ["accuracy", "mae"])
def test_a_quality_alert_carries_its_own_metric_only(metric: str) -> None:
    fields = {"model": "m", "version": 1, "window": 3, "at": AT}
    states = {"from_": QualityState.OK, "to": QualityState.DEGRADED}
    message = to_message(QualityAlert.model_validate(fields | states | {metric: 0.5}))
    assert message[metric] == 0.5
    assert {"accuracy", "mae"} - {metric} & message.keys() == set()


def test_a_quality_alert_of_an_unknown_metric_is_refused() -> None:
    with pytest.raises(ValidationError, match="rmse"):
        QualityAlert.model_validate(
            {"model": "m", "version": 1, "from_": QualityState.OK, "to": QualityState.OK}
            | {"rmse": 0.5, "window": 3, "at": AT}
        )
