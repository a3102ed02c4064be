"""The reported twin sections: strict to build, lenient to read, the twin's JSON unchanged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from wire.reported import DriftEntry, ModelEntry, ProbationEntry, read_entry, to_twin
from wire.states import DriftState, ModelState, ProbationState

SINCE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_built_entry_is_the_json_the_twin_has_always_shown() -> None:
    entry = ModelEntry(
        version=2,
        sha256="a" * 64,
        state=ModelState.ACTIVE,
        reason=None,
        message="swapped",
        since=SINCE,
        active_version=2,
        probation=ProbationEntry(
            state=ProbationState.WATCHING,
            requests=3,
            error_rate=0.0,
            latency_ratio=None,
            p99_ratio=None,
            until=SINCE,
        ),
        health=None,
    )
    assert to_twin(entry) == {
        "version": 2,
        "sha256": "a" * 64,
        "state": "active",
        "reason": None,  # a null: it removes the previous reason from the twin
        "message": "swapped",
        "since": "2026-01-02T03:04:05+00:00",
        "active_version": 2,
        "probation": {
            "state": "watching",
            "requests": 3,
            "error_rate": 0.0,
            "latency_ratio": None,
            "p99_ratio": None,
            "until": "2026-01-02T03:04:05+00:00",
        },
        "health": None,
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"state": "active"},  # a string where the enum is due
        {"version": "2"},
        {"colour": "blue"},  # unknown
        {"probation": {"state": ProbationState.PASSED, "extra": 1}},
    ],
)
def test_a_producer_cannot_build_a_wrong_entry(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ModelEntry.model_validate(fields)


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        (None, None),
        ("active", None),
        ({}, ModelEntry()),
        # A newer agent's field is left out, at any depth.
        (
            {"version": 3, "colour": "blue", "probation": {"state": "passed", "shade": 1}},
            ModelEntry(version=3, probation=ProbationEntry(state=ProbationState.PASSED)),
        ),
        # A value that does not read costs its field only; a boolean is never a number.
        (
            {
                "version": 3,
                "state": "exploded",
                "probation": {"state": "passed", "error_rate": True},
            },
            ModelEntry(version=3, probation=ProbationEntry(state=ProbationState.PASSED)),
        ),
        # A section without the field it cannot do without is left out.
        ({"version": 3, "drift": {"version": 3}}, ModelEntry(version=3)),
        (
            {"drift": {"state": "drift", "top": [{"feature": "x", "divergence": 1, "psi": 0.5}]}},
            ModelEntry(
                drift=DriftEntry.model_validate_json(
                    '{"state": "drift", "top": [{"feature": "x", "divergence": 1, "psi": 0.5}]}'
                )
            ),
        ),
        (
            {"since": "2026-01-02T03:04:05+00:00", "state": "rolled_back"},
            ModelEntry(since=SINCE, state=ModelState.ROLLED_BACK),
        ),
    ],
)
def test_a_reader_keeps_what_it_can_read(reported: object, expected: ModelEntry | None) -> None:
    assert read_entry(reported, ModelEntry) == expected


def test_what_is_read_dumps_back_to_what_was_read() -> None:
    reported = {"version": 3, "drift": {"version": 3, "state": "no_baseline"}, "reason": None}
    entry = read_entry(reported, ModelEntry)
    assert entry is not None
    assert entry.drift is not None
    assert entry.drift.state is DriftState.NO_BASELINE
    assert to_twin(entry) == reported
