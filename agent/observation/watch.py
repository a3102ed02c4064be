"""Drift and quality of every served model: the hook on the inference path, the periodic
closing of windows, and what goes out (gauges, reported state, profiles, alerts).

One :class:`Watch` per model name follows the release that serves it: :meth:`Observer.attach`
starts fresh monitors for each new release (windows never mix releases). Outputs leave
through injected sinks, so the agent knows nothing of the transport that carries them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.observation.baseline import BaselinePack
from agent.observation.detector import DriftState
from agent.observation.drift import (
    DriftMonitor,
    DriftSettings,
    WindowResult,
    profile_message,
    rounded,
)
from agent.observation.metrics import LoopFailures
from agent.observation.quality import (
    FeedbackOutcome,
    Label,
    PredictionCache,
    QualityMonitor,
    QualitySettings,
    QualityWindow,
)
from agent.ticks import ticks
from wire.reported import DriftEntry, DriftFeature, QualityEntry
from wire.states import DriftState as ReportedDrift
from wire.states import QualityState
from wire.telemetry import ALERT_SCHEMA, DriftAlert, QualityAlert, to_message

__all__ = ["ALERT_SCHEMA", "NO_BASELINE", "Observer", "ObserverTicks", "Sinks", "Watch"]

log = structlog.get_logger(__name__)

# Reported in place of a drift state when a release cannot be watched.
NO_BASELINE: Final = ReportedDrift.NO_BASELINE
DISABLED: Final = ReportedDrift.DISABLED
_STATE_VALUE: Final = {DriftState.OK: 0, DriftState.WARNING: 1, DriftState.DRIFT: 2}
# Quality runs the same state machine; its top state reads better as what it means.
_QUALITY_STATE: Final = {
    DriftState.OK: QualityState.OK,
    DriftState.WARNING: QualityState.WARNING,
    DriftState.DRIFT: QualityState.DEGRADED,
}

Tensors = Mapping[str, npt.NDArray[Any]]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Sinks:
    """Where window profiles and alerts go (the module's outbox); no-ops by default."""

    profile: Callable[[dict[str, Any]], None] = lambda message: None
    alert: Callable[[dict[str, Any]], None] = lambda message: None


@dataclass
class Watch:
    """One model name: the release being watched and its monitors."""

    name: str
    version: int
    pack: BaselinePack | None
    baseline_sha256: str | None
    drift: DriftMonitor | None
    quality: QualityMonitor
    drift_since: datetime
    quality_since: datetime
    last_window: WindowResult | None = None
    requests_seen: int = 0
    # Cumulative across releases, for monotonic counters.
    totals: dict[str, int] = field(
        default_factory=lambda: {
            "windows": 0,
            "sampled": 0,
            "dropped": 0,
            "unscored_windows": 0,
            "unscored_rows": 0,
        }
    )


class Observer:
    """Owns every :class:`Watch`; the inference path calls :meth:`observe` and
    :meth:`remember`, the feedback route :meth:`feedback`, a periodic task :meth:`tick`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        settings: DriftSettings | None = None,
        quality: QualitySettings | None = None,
        sinks: Sinks | None = None,
        keeps_predictions: bool = False,
        namespace: str = "agent",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _now,
        failures: LoopFailures | None = None,
    ) -> None:
        self.settings = settings or DriftSettings()
        self.failures = failures or LoopFailures()
        self.quality_settings = quality or QualitySettings()
        self.sinks = sinks or Sinks()
        self._clock = clock
        self._wall_clock = wall_clock
        self.watches: dict[str, Watch] = {}
        self.predictions = PredictionCache(
            self.quality_settings.remembered, self.quality_settings.max_age_s, clock
        )
        self.feedback_outcomes = dict.fromkeys(FeedbackOutcome, 0)
        # Only where something can label them (a feedback input): remembering costs a dict
        # entry per answered request.
        self.keeps_predictions = keeps_predictions
        registry.register(_Collector(self, namespace))

    # --- releases ---------------------------------------------------------------------

    def attach(
        self, name: str, version: int, pack: BaselinePack | None, baseline_sha256: str | None
    ) -> None:
        """A release of ``name`` now serves: watch it from scratch."""
        previous = self.watches.get(name)
        drift = (
            DriftMonitor(pack, self.settings, clock=self._clock)
            if pack is not None and self.settings.enabled
            else None
        )
        now = self._wall_clock()
        watch = Watch(
            name=name,
            version=version,
            pack=pack,
            baseline_sha256=baseline_sha256,
            drift=drift,
            quality=QualityMonitor(self.quality_settings, pack.quality if pack else None),
            drift_since=now,
            quality_since=now,
        )
        if previous is not None:
            self._fold(previous)
            watch.totals = previous.totals
        self.watches[name] = watch
        log.info(
            "drift_watch_started",
            model=name,
            version=version,
            state=self._drift_state(watch),
            window_rows=drift.window_rows if drift else None,
        )

    def detach(self, name: str) -> None:
        """``name`` serves no more: it is not watched, and its series go."""
        if self.watches.pop(name, None) is not None:
            log.info("drift_watch_stopped", model=name)

    def configure(self, settings: DriftSettings) -> None:
        """New settings from the twin: every release is watched afresh with them."""
        if settings == self.settings:
            return
        self.settings = settings
        for watch in list(self.watches.values()):
            self.attach(watch.name, watch.version, watch.pack, watch.baseline_sha256)

    @staticmethod
    def _fold(watch: Watch) -> None:
        watch.totals["unscored_rows"] += watch.quality.unscored_rows
        watch.quality.unscored_rows = 0
        if watch.drift is not None:
            watch.totals["sampled"] += watch.drift.requests_sampled
            watch.totals["dropped"] += watch.drift.rows_dropped
            watch.drift.requests_sampled = watch.drift.rows_dropped = 0
            watch.totals["unscored_windows"] += watch.drift.detector.unscored
            watch.drift.detector = dataclasses.replace(watch.drift.detector, unscored=0)

    # --- the hot path -------------------------------------------------------------------

    def observe(
        self, name: str, version: int, inputs: Tensors, outputs: Tensors, rows: int
    ) -> None:
        """One served request; the cost is a lookup and a countdown unless it is sampled."""
        watch = self.watches.get(name)
        if watch is None or watch.version != version or watch.drift is None:
            return
        watch.requests_seen += 1
        try:
            watch.drift.observe(inputs, outputs, rows)
        except Exception:  # watching must never fail a request that was answered
            log.exception("drift_sample_failed", model=name, version=version)

    def remember(
        self, request_id: str, name: str, version: int, outputs: Tensors, rows: int
    ) -> None:
        """Keep a prediction that feedback may later label (by its correlation id)."""
        if self.keeps_predictions:
            self.predictions.remember(request_id, name, str(version), outputs, rows)

    # --- feedback -----------------------------------------------------------------------

    def feedback(self, request_id: str, labels: Sequence[Label]) -> FeedbackOutcome:
        outcome, remembered = self.predictions.take(request_id)
        if remembered is not None:
            watch = self.watches.get(remembered.model)
            if watch is None or str(watch.version) != remembered.version:
                outcome = FeedbackOutcome.LATE  # its release no longer serves
            elif len(labels) != remembered.rows:
                outcome = FeedbackOutcome.MISMATCHED
            else:
                for window in watch.quality.add(remembered, labels):
                    self._quality_window(watch, window)
        self.feedback_outcomes[outcome] += 1
        return outcome

    # --- windows ------------------------------------------------------------------------

    def tick(self) -> list[Watch]:
        """Close due windows of every release; returns the watches whose state changed."""
        changed = []
        for watch in list(self.watches.values()):
            monitor = watch.drift
            if monitor is None:
                continue
            monitor.adapt_sampling(watch.requests_seen)
            for window in monitor.close_windows():
                if self._drift_window(watch, monitor, window):
                    changed.append(watch)
        return changed

    def _drift_window(self, watch: Watch, monitor: DriftMonitor, window: WindowResult) -> bool:
        watch.last_window = window
        watch.totals["windows"] += 1
        wall = self._wall_clock()
        self._deliver(
            self.sinks.profile,
            profile_message(
                window,
                model=watch.name,
                version=watch.version,
                baseline_sha256=watch.baseline_sha256 or "",
                features=monitor.features,
                max_features=self.settings.max_profile_features,
                max_bytes=self.settings.max_profile_bytes,
                wall_clock=wall.timestamp(),
            ),
        )
        if not window.changed:
            return False
        watch.drift_since = wall
        top = window.score.top
        alert = DriftAlert(
            model=watch.name,
            version=watch.version,
            from_=ReportedDrift(window.previous.value),
            to=ReportedDrift(window.detector.state.value),
            score=rounded(window.score.score),
            feature=top.name if top else None,
            window=window.seq,
            at=wall,
        )
        log.warning(
            "drift_state_changed",
            model=watch.name,
            version=watch.version,
            old=window.previous.value,
            new=window.detector.state.value,
            score=alert.score,
            feature=alert.feature,
        )
        self._deliver(self.sinks.alert, to_message(alert))
        return True

    def _deliver(self, sink: Callable[[dict[str, Any]], None], message: dict[str, Any]) -> None:
        # The adapter's sink failing on one message must not cost the other models their
        # windows, nor this model its state change.
        try:
            sink(message)
        except Exception:
            self.failures.record("sink", message=str(message.get("event", "profile")))

    def _quality_window(self, watch: Watch, window: QualityWindow) -> None:
        if not window.changed:
            return
        wall = self._wall_clock()
        watch.quality_since = wall
        value = rounded(window.value)
        alert = QualityAlert.model_validate(
            {
                "model": watch.name,
                "version": watch.version,
                "from_": _QUALITY_STATE[window.previous],
                "to": _QUALITY_STATE[window.detector.state],
                window.metric: value,  # accuracy or mae: an unknown metric is refused
                "window": window.seq,
                "at": wall,
            }
        )
        log.warning(
            "quality_state_changed",
            model=watch.name,
            version=watch.version,
            old=_QUALITY_STATE[window.previous],
            new=_QUALITY_STATE[window.detector.state],
            metric=window.metric,
            value=value,
        )
        self._deliver(self.sinks.alert, to_message(alert))

    # --- reported state -----------------------------------------------------------------

    def _drift_state(self, watch: Watch) -> ReportedDrift:
        if watch.drift is not None:
            return ReportedDrift(watch.drift.detector.state.value)
        return ReportedDrift.NO_BASELINE if self.settings.enabled else ReportedDrift.DISABLED

    def drift_entry(self, name: str) -> DriftEntry | None:
        """The `drift` section of the reported entry of `name` (None: not served)."""
        watch = self.watches.get(name)
        return self._drift_report(watch) if watch is not None else None

    def quality_entry(self, name: str) -> QualityEntry | None:
        """The `quality` section of the reported entry of `name` (None: not served)."""
        watch = self.watches.get(name)
        return _quality_report(watch) if watch is not None else None

    def _drift_report(self, watch: Watch) -> DriftEntry:
        monitor, window = watch.drift, watch.last_window
        # The version says whose watch this is: during a release the entry's `version` is the
        # incoming one while the serving release's watch goes on.
        head = DriftEntry(
            version=watch.version, state=self._drift_state(watch), since=watch.drift_since
        )
        if monitor is None:
            return head
        figures = DriftEntry(
            version=watch.version,
            state=head.state,
            since=watch.drift_since,
            score=rounded(window.score.score) if window else None,
            level=round(monitor.detector.level, 3),
            threshold=monitor.cusum.h,
            window_rows=monitor.window_rows,
            windows=monitor.seq,
            sample_every=monitor.sample_every,
            top=_top_features(window, 3),
        )
        if monitor.window_rows == self.settings.window_rows:
            return figures
        return figures.model_copy(update={"requested_window_rows": self.settings.window_rows})


def _quality_report(watch: Watch) -> QualityEntry:
    monitor = watch.quality
    last = monitor.last
    return QualityEntry(
        version=watch.version,
        state=_QUALITY_STATE[monitor.detector.state],
        since=watch.quality_since,
        metric=monitor.metric,
        value=rounded(last.value) if last else None,
        windows=monitor.seq,
        reference=monitor.reference is not None,
    )


class ObserverTicks:
    """Service: closes due windows every ``interval_s`` (off the request path)."""

    def __init__(self, observer: Observer, interval_s: float = 1.0) -> None:
        self.name = "drift-ticks"
        self._observer = observer
        self._interval_s = interval_s

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        async for _ in ticks(self._interval_s):
            try:
                self._observer.tick()
            except Exception:  # a scoring bug must not take serving down with it
                self._observer.failures.record("drift_tick")

    async def stop(self, grace_s: float) -> None:
        return None


def _top_features(window: WindowResult | None, count: int) -> tuple[DriftFeature, ...]:
    if window is None:
        return ()
    ranked = sorted(
        (f for f in window.score.features if np.isfinite(f.evidence)),
        key=lambda f: -f.evidence,
    )
    return tuple(
        DriftFeature(feature=f.name, divergence=round(f.divergence, 4), psi=round(f.psi, 4))
        for f in ranked[:count]
    )


class _Collector:
    """Gauges and counters built at scrape time from the watches (nothing on the hot path).

    Labels: ``model`` (the served names, bounded by the store), ``feature`` (at most
    ``max_feature_gauges`` per model, in the baseline's order so a series stays one feature),
    ``outcome`` (the closed feedback vocabulary).
    """

    def __init__(self, observer: Observer, namespace: str) -> None:
        self._observer = observer
        self._ns = namespace

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        ns, observer = self._ns, self._observer
        state = GaugeMetricFamily(
            f"{ns}_drift_state",
            "Drift state of the serving release: 0 ok, 1 warning, 2 drift, -1 not watched.",
            labels=["model"],
        )
        score = GaugeMetricFamily(
            f"{ns}_drift_score",
            "Last window's aggregate drift score, in standard deviations above training windows.",
            labels=["model"],
        )
        level = GaugeMetricFamily(
            f"{ns}_drift_cusum", "Accumulated drift evidence (CUSUM level).", labels=["model"]
        )
        threshold = GaugeMetricFamily(
            f"{ns}_drift_threshold", "CUSUM level at which drift is declared.", labels=["model"]
        )
        divergence = GaugeMetricFamily(
            f"{ns}_drift_feature_divergence_bits",
            "Last window's Jensen-Shannon divergence from the training reference, per feature.",
            labels=["model", "feature"],
        )
        every = GaugeMetricFamily(
            f"{ns}_drift_sample_every", "1-in-k request sampling: the current k.", labels=["model"]
        )
        windows = CounterMetricFamily(
            f"{ns}_drift_windows", "Drift windows closed.", labels=["model"]
        )
        sampled = CounterMetricFamily(
            f"{ns}_drift_sampled_requests", "Requests sampled for drift.", labels=["model"]
        )
        dropped = CounterMetricFamily(
            f"{ns}_drift_dropped_rows",
            "Sampled rows overwritten before their window closed.",
            labels=["model"],
        )
        accuracy = GaugeMetricFamily(
            f"{ns}_model_accuracy",
            "Accuracy (0-1) of the last window of predictions labelled by feedback.",
            labels=["model"],
        )
        mae = GaugeMetricFamily(
            f"{ns}_model_mae",
            "Mean absolute error of the last window of predictions labelled by feedback.",
            labels=["model"],
        )
        unscored_windows = CounterMetricFamily(
            f"{ns}_drift_unscored_windows",
            "Drift windows with no finite score (too few rows): counted, never accumulated.",
            labels=["model"],
        )
        unscored_rows = CounterMetricFamily(
            f"{ns}_feedback_unscored_rows",
            "Labelled rows whose prediction or label was NaN or Inf: counted, not scored.",
            labels=["model"],
        )
        quality_state = GaugeMetricFamily(
            f"{ns}_model_quality_state",
            "Quality state from feedback: 0 ok, 1 warning, 2 degraded.",
            labels=["model"],
        )
        for name, watch in sorted(observer.watches.items()):
            monitor, window = watch.drift, watch.last_window
            state.add_metric(
                [name], _STATE_VALUE[monitor.detector.state] if monitor is not None else -1
            )
            quality_state.add_metric([name], _STATE_VALUE[watch.quality.detector.state])
            sampled_now = monitor.requests_sampled if monitor else 0
            dropped_now = monitor.rows_dropped if monitor else 0
            windows.add_metric([name], watch.totals["windows"])
            sampled.add_metric([name], watch.totals["sampled"] + sampled_now)
            dropped.add_metric([name], watch.totals["dropped"] + dropped_now)
            unscored_now = monitor.detector.unscored if monitor else 0
            unscored_windows.add_metric([name], watch.totals["unscored_windows"] + unscored_now)
            unscored_rows.add_metric(
                [name], watch.totals["unscored_rows"] + watch.quality.unscored_rows
            )
            if monitor is not None:
                level.add_metric([name], monitor.detector.level)
                threshold.add_metric([name], monitor.cusum.h)
                every.add_metric([name], monitor.sample_every)
            if window is not None and np.isfinite(window.score.score):
                score.add_metric([name], window.score.score)
            if window is not None:
                for feature in window.score.features[: observer.settings.max_feature_gauges]:
                    divergence.add_metric([name, feature.name], feature.divergence)
            last = watch.quality.last
            if last is not None:
                (accuracy if last.metric == "accuracy" else mae).add_metric([name], last.value)
        feedback = CounterMetricFamily(
            f"{ns}_feedback", "Feedback labels by outcome of the join.", labels=["outcome"]
        )
        for outcome, count in observer.feedback_outcomes.items():
            feedback.add_metric([outcome.value], count)
        yield from (state, score, level, threshold, divergence, every, windows, sampled, dropped)
        yield from (accuracy, mae, quality_state, feedback, unscored_windows, unscored_rows)
