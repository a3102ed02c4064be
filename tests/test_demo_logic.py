"""The demo's own verdict on its summary, from tables: what counts as a closed loop."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from demo.__main__ import Events, closed

CLOSED: dict[str, Any] = {
    "retraining": {"trigger": "drift", "stage": "released", "version": 3, "gate": None},
    "rings": {
        "canary": {"alias": 3, "devices": {"plant-1": 3}},
        "all": {"alias": 3, "devices": {"plant-1": 3, "plant-2": 3, "plant-3": 3}},
    },
    "messages": {"sent": 900, "answered": 900, "lost": 0, "failed": 0, "by_version": {}},
    "drift_events": [
        {"t": 1.0, "device": "plant-1", "state": "ok"},
        {"t": 9.0, "device": "plant-1", "state": "drift"},
    ],
}


def _with(path: str, value: object) -> dict[str, Any]:
    result = copy.deepcopy(CLOSED)
    *parents, leaf = path.split(".")
    target = result
    for part in parents:
        target = target[part]
    target[leaf] = value
    return result


@pytest.mark.parametrize(
    ("summary", "problem"),
    [
        (CLOSED, None),
        (_with("retraining.stage", "failed"), "no promoted retraining"),
        (_with("retraining.version", None), "no promoted retraining"),
        (_with("rings.all.devices.plant-3", 2), "ring all is not on v3"),
        (_with("rings.canary.alias", 4), "ring canary is not on v3"),
        (_with("messages.lost", 1), "1 readings lost"),
        (_with("messages.failed", 2), "2 failed"),
        (_with("messages.sent", 0), "of 0"),
        (_with("drift_events", [{"t": 1.0, "device": "plant-1", "state": "warning"}]), "drift"),
    ],
)
def test_what_closes_the_loop(summary: dict[str, Any], problem: str | None) -> None:
    problems = closed(summary)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_events_keep_changes_only() -> None:
    events = Events(started=0.0)
    changes = [
        events.observe(device, kind, value)
        for device, kind, value in [
            ("a", "drift", "ok"),
            ("a", "drift", "ok"),
            ("b", "drift", "ok"),
            ("a", "drift", "drift"),
            ("a", "quality", "ok"),
        ]
    ]
    assert changes == [True, False, True, True, True]
    assert [(d, v) for _, d, _, v in events.of("drift")] == [
        ("a", "ok"),
        ("b", "ok"),
        ("a", "drift"),
    ]
