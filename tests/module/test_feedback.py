"""The feedback route's message format, and the twin's typed drift section."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.observation.drift import DriftSettings
from agent.observation.watch import Observer
from module.desired import Apply, Reconciler, Reject
from module.feedback import FeedbackRoute, parse_feedback
from module.routes import RouteMetrics


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": "a", "label": 1}', [("a", [1])]),
        (b'{"id": "a", "label": [0.5, 2]}', [("a", [0.5, 2])]),
        (b'[{"id": "a", "label": true}, {"id": "b", "label": 0}]', [("a", [True]), ("b", [0])]),
    ],
)
def test_feedback_items(body: bytes, expected: list[tuple[str, list[Any]]]) -> None:
    assert [(item.id, item.labels) for item in parse_feedback(body)] == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b'{"id": "a"}', "label"),
        (b'{"id": "", "label": 1}', "id"),
        (b'{"id": "a", "label": "cat"}', "label"),
        (b'{"id": "a", "label": 1, "extra": 2}', "extra"),
        (b"[]", "at least 1"),
        (b'{"id": 5, "label": 1}', "id"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_feedback(body)


def test_the_drift_section_is_typed() -> None:
    _, applied = Reconciler().full({"$version": 1, "drift": {"window_rows": 200}})
    assert isinstance(applied, Apply)
    assert applied.state.drift == DriftSettings(window_rows=200)
    _, rejected = Reconciler().full({"$version": 1, "drift": {"window_rows": "200"}})
    assert isinstance(rejected, Reject)
    assert "drift.window_rows" in rejected.message


@pytest.mark.parametrize("keeps", [True, False])
def test_a_feedback_route_needs_an_observer_that_keeps_predictions(keeps: bool) -> None:
    observer = Observer(CollectorRegistry(), keeps_predictions=keeps)
    metrics = RouteMetrics(CollectorRegistry())
    if keeps:
        FeedbackRoute(observer, metrics)
    else:
        with pytest.raises(ValueError, match="keeps predictions"):
            FeedbackRoute(observer, metrics)
