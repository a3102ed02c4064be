"""The device's drift monitor: sampling into the ring, closing windows, states per release."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from agent.observation.detector import DriftState
from agent.observation.drift import PROFILE_SCHEMA, DriftMonitor, DriftSettings, profile_message
from tests.support.clock import FakeClock
from tests.support.drift_packs import tabular_pack, tabular_rows


def _monitor(clock: FakeClock | None = None, **settings: object) -> DriftMonitor:
    return DriftMonitor(
        tabular_pack(), DriftSettings.model_validate(settings), clock=clock or FakeClock(100.0)
    )


def _feed(monitor: DriftMonitor, requests: int, rows: int = 1, shift: float = 0.0) -> None:
    rng = np.random.default_rng(requests)
    for _ in range(requests):
        inputs, outputs = tabular_rows(rng, rows, shift)
        monitor.observe(inputs, outputs, rows)


def test_full_windows_close_and_the_rest_waits() -> None:
    monitor = _monitor(window_rows=50)
    _feed(monitor, 30, rows=2)
    _feed(monitor, 5, rows=3)  # 75 rows
    (first,) = monitor.close_windows()
    _feed(monitor, 20, rows=2)  # 65 rows
    (second,) = monitor.close_windows()
    assert [first.seq, second.seq] == [1, 2]
    assert [first.score.rows, second.score.rows] == [50, 50]
    assert monitor.pending_rows == 15
    assert monitor.rows_dropped == 0


def test_an_old_partial_window_closes_on_time() -> None:
    clock = FakeClock(100.0)
    monitor = _monitor(clock, window_rows=50, window_seconds=10.0)
    _feed(monitor, 30)
    assert monitor.close_windows() == []
    clock.now += 10.0
    (window,) = monitor.close_windows()
    assert window.score.rows == 30
    assert window.score.calibrated_rows == 20  # scored against the size it fills
    assert window.ended - window.started == 10.0


def test_an_idle_window_restarts_its_clock_without_closing() -> None:
    clock = FakeClock(100.0)
    monitor = _monitor(clock, window_rows=50, window_seconds=10.0)
    clock.now += 30.0
    assert monitor.close_windows() == []
    _feed(monitor, 5)
    clock.now += 5.0
    assert monitor.close_windows() == []  # 5 s old, not 35 s


@pytest.mark.parametrize(("wanted", "used"), [(20, 20), (35, 50), (1000, 50)])
def test_only_calibrated_window_sizes_are_used(wanted: int, used: int) -> None:
    assert _monitor(window_rows=wanted).window_rows == used


def test_one_request_in_k_is_sampled() -> None:
    monitor = _monitor(sample_every=4)
    _feed(monitor, 40, rows=3)
    assert monitor.requests_sampled == 10
    assert monitor.pending_rows == 30


@pytest.mark.parametrize(
    ("requests", "seconds", "every"), [(50, 1.0, 1), (100, 1.0, 1), (101, 1.0, 2), (5000, 2.0, 25)]
)
def test_sampling_adapts_to_the_request_rate(requests: int, seconds: float, every: int) -> None:
    clock = FakeClock(100.0)
    monitor = _monitor(clock, max_sampled_per_second=100.0)
    clock.now += seconds
    assert monitor.adapt_sampling(requests) == every


def test_a_closer_that_falls_behind_loses_the_oldest_rows_and_counts_them() -> None:
    monitor = _monitor(window_rows=20, max_rows_per_request=40)  # ring of 40 rows
    _feed(monitor, 1, rows=30)
    _feed(monitor, 1, rows=25)
    assert monitor.pending_rows == 40
    assert monitor.rows_dropped == 15
    assert [w.score.rows for w in monitor.close_windows()] == [20, 20]


def test_a_lasting_shift_goes_warning_then_drift_and_back_after_it_ends() -> None:
    monitor = _monitor(window_rows=50)
    states = []
    for shift in [0.0] * 4 + [2.0] * 4 + [0.0] * 30:
        _feed(monitor, 50, shift=shift)
        (window,) = monitor.close_windows()
        states.append(window.detector.state)
    assert states[:4] == [DriftState.OK] * 4
    first_drift = states.index(DriftState.DRIFT)
    assert 4 <= first_drift <= 6
    assert states[-1] is DriftState.OK
    changes = [b for a, b in itertools.pairwise(states) if a is not b]
    assert DriftState.DRIFT in changes
    assert changes.count(DriftState.DRIFT) == 1  # no flapping


def test_a_threshold_override_replaces_the_calibrated_one() -> None:
    assert _monitor(window_rows=50, threshold=2.5).cusum.h == 2.5


def test_enabled_features_restrict_the_profile_and_the_score() -> None:
    monitor = _monitor(window_rows=20, features=("x[1]", "c"))
    _feed(monitor, 20, shift=3.0)  # x[0] shifted, but not watched
    (window,) = monitor.close_windows()
    assert [f.name for f in window.score.features] == ["x[1]", "c"]
    assert window.score.score < 4


def test_a_window_profile_is_sparse_capped_and_small() -> None:
    monitor = _monitor(window_rows=50)
    _feed(monitor, 50, shift=2.0)
    (window,) = monitor.close_windows()
    message = profile_message(
        window,
        model="m",
        version=3,
        baseline_sha256="ab" * 32,
        features=monitor.features,
        max_features=2,
        wall_clock=1_700_000_000.0,
    )
    assert message["schema"] == PROFILE_SCHEMA
    assert (message["model"], message["version"], message["seq"], message["rows"]) == (
        "m",
        3,
        1,
        50,
    )
    assert len(message["features"]) == 2
    assert "x[0]" in message["features"]  # the shifted feature has the most evidence
    assert message["truncated"] == len(monitor.features) - 2
    x0 = message["features"]["x[0]"]
    assert sum(x0["c"]) == 50
    assert len(x0["i"]) == len(x0["c"]) <= x0["bins"]
    assert all(c > 0 for c in x0["c"])


def test_a_big_batch_gives_at_most_the_configured_rows_spread_over_it() -> None:
    monitor = _monitor(window_rows=20, max_rows_per_request=4)
    inputs, outputs = tabular_rows(np.random.default_rng(0), 64)
    inputs["x"][:, 1] = np.arange(64)
    monitor.observe(inputs, outputs, 64)
    assert monitor.pending_rows == 4
    assert monitor._ring[:4, 1].tolist() == [0.0, 21.0, 42.0, 63.0]


@pytest.mark.parametrize("max_bytes", [600, 1200, 4000])
def test_a_profile_keeps_the_most_divergent_features_within_its_byte_budget(
    max_bytes: int,
) -> None:
    monitor = _monitor(window_rows=50)
    _feed(monitor, 50, shift=2.0)
    (window,) = monitor.close_windows()
    message = profile_message(
        window,
        model="m",
        version=3,
        baseline_sha256="ab" * 32,
        features=monitor.features,
        max_features=32,
        wall_clock=1_700_000_000.0,
        max_bytes=max_bytes,
    )
    assert len(json.dumps(message, separators=(",", ":"))) <= max_bytes
    kept = set(message["features"])
    assert message["truncated"] == len(monitor.features) - len(kept)
    evidence = {f.name: f.evidence for f in window.score.features}
    dropped = set(evidence) - kept
    if kept and dropped:
        assert min(evidence[k] for k in kept) >= max(evidence[d] for d in dropped)
