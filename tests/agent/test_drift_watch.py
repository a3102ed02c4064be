"""The observer: releases watched apart, windows out as profiles, alerts on state changes,
feedback joined, and the metrics a scrape sees."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.observation.drift import DriftSettings
from agent.observation.metrics import LoopFailures
from agent.observation.quality import FeedbackOutcome, QualitySettings
from agent.observation.watch import Observer, Sinks
from tests.support.clock import FakeClock
from tests.support.drift_packs import tabular_pack, tabular_rows
from tests.support.twin import twin

SHA = "ab" * 32


class Recorder(Sinks):
    def __init__(self) -> None:
        self.profiles: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []
        super().__init__(profile=self.profiles.append, alert=self.alerts.append)


@pytest.fixture
def setup() -> tuple[Observer, Recorder, CollectorRegistry, FakeClock]:
    registry, sinks, clock = CollectorRegistry(), Recorder(), FakeClock()
    observer = Observer(
        registry,
        settings=DriftSettings(window_rows=50),
        quality=QualitySettings(window_rows=10),
        sinks=sinks,
        keeps_predictions=True,  # as where a feedback input exists
        clock=clock,
        wall_clock=lambda: datetime(2026, 1, 1, tzinfo=UTC),
    )
    return observer, sinks, registry, clock


def _serve(observer: Observer, version: int, requests: int, shift: float = 0.0) -> None:
    rng = np.random.default_rng(requests + int(shift * 10))
    for _ in range(requests):
        inputs, outputs = tabular_rows(rng, 1, shift)
        observer.observe("m", version, inputs, outputs, 1)


def test_a_release_without_baseline_reports_no_baseline(setup: Any) -> None:
    observer, _, registry, _ = setup
    observer.attach("m", 1, None, None)
    _serve(observer, 1, 60)
    assert observer.tick() == []
    drift = twin(observer.drift_entry("m"))
    assert drift is not None
    assert drift["state"] == "no_baseline"
    assert registry.get_sample_value("agent_drift_state", {"model": "m"}) == -1


def test_windows_go_out_as_profiles_and_a_drift_as_one_alert(setup: Any) -> None:
    observer, sinks, registry, _ = setup
    observer.attach("m", 3, tabular_pack(), SHA)
    _serve(observer, 3, 50)
    observer.tick()
    for _ in range(5):
        _serve(observer, 3, 50, shift=2.5)
        observer.tick()
    assert [p["seq"] for p in sinks.profiles] == [1, 2, 3, 4, 5, 6]
    assert {p["baseline"] for p in sinks.profiles} == {SHA}
    assert [(a["event"], a["to"]) for a in sinks.alerts][-1] == ("drift_state", "drift")
    # the shifted input, or the model's outputs it moves, leads
    assert sinks.alerts[-1]["feature"] in {"x[0]", "p:class", "p:confidence"}
    drift = twin(observer.drift_entry("m"))
    assert drift is not None
    assert (drift["version"], drift["state"]) == (3, "drift")
    assert "x[0]" in [top["feature"] for top in drift["top"]]
    assert registry.get_sample_value("agent_drift_state", {"model": "m"}) == 2
    assert registry.get_sample_value("agent_drift_score", {"model": "m"}) > 3
    assert registry.get_sample_value("agent_drift_windows_total", {"model": "m"}) == 6
    assert (
        registry.get_sample_value(
            "agent_drift_feature_divergence_bits", {"model": "m", "feature": "x[0]"}
        )
        > 0.05
    )


def test_requests_of_another_release_never_enter_its_windows(setup: Any) -> None:
    observer, sinks, _, _ = setup
    observer.attach("m", 3, tabular_pack(), SHA)
    _serve(observer, 2, 100, shift=3.0)  # in flight on the old release during a swap
    observer.tick()
    assert sinks.profiles == []
    observer.attach("m", 4, tabular_pack(), SHA)
    _serve(observer, 4, 50)
    observer.tick()
    assert [(p["version"], p["seq"]) for p in sinks.profiles] == [(4, 1)]


def test_a_requested_window_size_not_calibrated_is_reported(setup: Any) -> None:
    observer, _, _, _ = setup
    observer.configure(DriftSettings(window_rows=35))
    observer.attach("m", 1, tabular_pack(), SHA)
    drift = twin(observer.drift_entry("m"))
    assert drift is not None
    assert (drift["window_rows"], drift["requested_window_rows"]) == (
        50,
        35,
    )


def test_a_detached_model_is_not_watched_its_series_go_and_new_settings_leave_it_out(
    setup: Any,
) -> None:
    observer, _, registry, _ = setup
    observer.attach("m", 1, tabular_pack(), SHA)
    _serve(observer, 1, 60)
    observer.detach("m")
    _serve(observer, 1, 60)  # requests still in flight when it went
    assert observer.tick() == []
    assert observer.drift_entry("m") is None
    assert observer.quality_entry("m") is None
    assert registry.get_sample_value("agent_drift_state", {"model": "m"}) is None
    observer.configure(DriftSettings(window_rows=20))
    assert "m" not in observer.watches


def test_new_settings_restart_the_watch(setup: Any) -> None:
    observer, _, _, _ = setup
    observer.attach("m", 1, tabular_pack(), SHA)
    observer.configure(DriftSettings(window_rows=20))
    watch = observer.watches["m"]
    assert watch.drift is not None
    assert watch.drift.window_rows == 20
    observer.configure(DriftSettings(enabled=False))
    drift = twin(observer.drift_entry("m"))
    assert drift is not None
    assert drift["state"] == "disabled"


def test_feedback_is_joined_counted_and_scored(setup: Any) -> None:
    observer, _, registry, _ = setup
    observer.attach("m", 1, tabular_pack(), SHA)
    probs = np.array([[0.2, 0.7, 0.1]], dtype=np.float32)
    for i in range(10):
        observer.remember(f"r{i}", "m", 1, {"p": probs}, 1)
    outcomes = [observer.feedback(f"r{i}", [1 if i < 8 else 0]) for i in reversed(range(10))]
    outcomes += [observer.feedback("r3", [1]), observer.feedback("nope", [1])]
    assert outcomes[-2:] == [FeedbackOutcome.DUPLICATE, FeedbackOutcome.UNKNOWN]
    assert registry.get_sample_value("agent_model_accuracy", {"model": "m"}) == 0.8
    assert registry.get_sample_value("agent_feedback_total", {"outcome": "joined"}) == 10
    assert registry.get_sample_value("agent_feedback_total", {"outcome": "duplicate"}) == 1
    quality = twin(observer.quality_entry("m"))
    assert quality is not None
    assert quality | {"since": None} == {
        "version": 1,
        "state": "ok",
        "since": None,
        "metric": "accuracy",
        "value": 0.8,
        "windows": 1,
        "reference": False,  # the pack was built without labels
    }


def test_without_a_feedback_input_no_prediction_is_kept() -> None:
    observer = Observer(CollectorRegistry())
    observer.attach("m", 1, None, None)
    observer.remember("r", "m", 1, {"y": np.array([[1.0]])}, 1)
    assert len(observer.predictions) == 0
    assert observer.feedback("r", [1.0]) is FeedbackOutcome.UNKNOWN


def test_feedback_for_a_replaced_release_or_of_the_wrong_length(setup: Any) -> None:
    observer, _, _, _ = setup
    observer.attach("m", 1, None, None)
    observer.remember("old", "m", 1, {"y": np.array([[1.0]])}, 1)
    observer.remember("two", "m", 1, {"y": np.array([[1.0], [2.0]])}, 2)
    assert observer.feedback("two", [1.0]) is FeedbackOutcome.MISMATCHED
    observer.attach("m", 2, None, None)
    assert observer.feedback("old", [1.0]) is FeedbackOutcome.LATE


def test_a_failing_sink_is_counted_and_the_next_window_and_the_alert_still_go_out() -> None:
    alerts: list[dict[str, Any]] = []
    profiles_refused = 0

    def profile(message: dict[str, Any]) -> None:
        nonlocal profiles_refused
        profiles_refused += 1
        raise RuntimeError("the outbox is broken")

    failures = LoopFailures()
    observer = Observer(
        CollectorRegistry(),
        settings=DriftSettings(window_rows=50),
        sinks=Sinks(profile=profile, alert=alerts.append),
        clock=FakeClock(),
        failures=failures,
    )
    observer.attach("m", 3, tabular_pack(), SHA)
    _serve(observer, 3, 50)
    observer.tick()
    for _ in range(5):
        _serve(observer, 3, 50, shift=2.5)
        observer.tick()
    assert profiles_refused == 6  # every window was offered, none lost to the one before
    assert failures.counts["sink"] == 6
    assert [(a["event"], a["to"]) for a in alerts][-1] == ("drift_state", "drift")
