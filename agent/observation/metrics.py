"""Prometheus metrics of the inference path, on an injected registry.

The hot path records into plain counters and bucket arrays (a fraction of a microsecond each,
against over a microsecond for a locked client_python histogram: a tiny model answers in
20 µs). They are updated only on the event-loop thread, and a custom collector turns them into
standard counter and histogram families at scrape time.

Every label takes values from a closed set (outcomes, reject reasons, dispatch kinds), so a
hostile client cannot grow the series count. The model version travels in one info metric.
Per-model families carry only a `model` label: names of served models, which the manager
bounds (a model's series go when it is forgotten); never versions or request ids.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from wire.reasons import REQUEST_REASONS

_log = structlog.get_logger(__name__)

# Sub-millisecond resolution: tiny models answer in tens of microseconds.
LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class Tally:
    """A monotonic count, or with `dec` a level; event-loop thread only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class Distribution:
    """Histogram counts with Prometheus `le` (upper-bound inclusive) buckets; event-loop only."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(
            name, documentation, buckets=self.cumulative(), sum_value=self.total
        )


class ModelStats:
    """One served model name's share of the inference path; event-loop thread only."""

    __slots__ = (
        "batch_rows",
        "compute_s",
        "load_rss_delta_bytes",
        "swap_transient_bytes",
        "total",
    )

    def __init__(self) -> None:
        self.total = Distribution(LATENCY_BUCKETS)
        self.batch_rows = Distribution(BATCH_BUCKETS)
        self.compute_s = 0.0
        # Resident memory the active version added while it loaded; when it loaded beside a
        # previous version (a swap), that is also the swap's transient.
        self.load_rss_delta_bytes: int | None = None
        self.swap_transient_bytes: int | None = None

    def loaded(self, rss_delta_bytes: int | None, *, beside_previous: bool) -> None:
        self.load_rss_delta_bytes = rss_delta_bytes
        if beside_previous:
            self.swap_transient_bytes = rss_delta_bytes


class InferenceMetrics:
    """The agent's inference metrics; registers itself as a collector on `registry`."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "agent") -> None:
        self.registry = registry
        self._prefix = f"{namespace}_"
        self.ok = Tally()
        self.rejected = Tally()
        self.failed = Tally()
        # Every request reason has its series from the start; HTTP adds its routing ones.
        self.rejections: dict[str, Tally] = {reason: Tally() for reason in REQUEST_REASONS}
        self.in_flight = Tally()
        self.dispatch_inline = Tally()
        self.dispatch_thread = Tally()
        self.queue_wait = Distribution(LATENCY_BUCKETS)
        self.compute = Distribution(LATENCY_BUCKETS)
        self.total = Distribution(LATENCY_BUCKETS)
        self.batch_rows = Distribution(BATCH_BUCKETS)
        self._model_info = Gauge(
            "model_info",
            "The model being served (value 1); one series per served model name.",
            ["model", "version", "sha256"],
            namespace=namespace,
            registry=registry,
        )
        self._model_labels: dict[str, tuple[str, str, str]] = {}
        self.models: dict[str, ModelStats] = {}
        registry.register(self)

    def model(self, name: str) -> ModelStats:
        """The per-model figures of `name`, created on first use."""
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def forget_model(self, name: str) -> None:
        """Drop `name`'s series (a model no longer served)."""
        self.models.pop(name, None)
        labels = self._model_labels.pop(name, None)
        if labels is not None:
            self._model_info.remove(*labels)

    def set_model(self, name: str, version: int, sha256: str) -> None:
        """Replace the info series of `name`, so swaps do not accumulate old versions."""
        previous = self._model_labels.pop(name, None)
        if previous is not None:
            self._model_info.remove(*previous)
        labels = (name, str(version), sha256)
        self._model_info.labels(*labels).set(1)
        self._model_labels[name] = labels

    def declare(self, reasons: Iterable[enum.StrEnum]) -> None:
        """Add a transport's own refusal reasons (HTTP routing), each a series from now on."""
        for reason in reasons:
            self.rejections.setdefault(reason, Tally())

    def reject(self, reason: enum.StrEnum) -> None:
        """One refused request, for a request reason or a declared one (bounded series)."""
        self.rejected.inc()
        self.rejections[reason].inc()

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        p = self._prefix
        requests = CounterMetricFamily(
            f"{p}inference_requests", "Inference requests by outcome.", labels=["outcome"]
        )
        for outcome, tally in (
            ("ok", self.ok),
            ("rejected", self.rejected),
            ("failed", self.failed),
        ):
            requests.add_metric([outcome], tally.value)
        yield requests
        rejections = CounterMetricFamily(
            f"{p}inference_rejections",
            "Requests refused before inference, by reason.",
            labels=["reason"],
        )
        for reason, tally in self.rejections.items():
            rejections.add_metric([reason], tally.value)
        yield rejections
        batches = CounterMetricFamily(
            f"{p}inference_batches",
            "ONNX Runtime calls by where they ran: inline on the event loop, or a worker thread.",
            labels=["dispatch"],
        )
        batches.add_metric(["inline"], self.dispatch_inline.value)
        batches.add_metric(["thread"], self.dispatch_thread.value)
        yield batches
        yield GaugeMetricFamily(
            f"{p}inference_in_flight",
            "Requests accepted and not yet answered.",
            value=self.in_flight.value,
        )
        yield self.queue_wait.family(
            f"{p}inference_queue_wait_seconds",
            "Time from arrival to the start of the call that served the request.",
        )
        yield self.compute.family(f"{p}inference_compute_seconds", "ONNX Runtime time per call.")
        yield self.total.family(
            f"{p}inference_request_duration_seconds",
            "Time from arrival to answer, validation included.",
        )
        yield self.batch_rows.family(
            f"{p}inference_batch_rows", "Rows per ONNX Runtime call after coalescing."
        )
        yield from self._per_model()

    def _per_model(self) -> Iterator[Metric]:
        p = self._prefix
        duration = HistogramMetricFamily(
            f"{p}model_request_duration_seconds",
            "Time from arrival to answer, per served model.",
            labels=["model"],
        )
        rows = HistogramMetricFamily(
            f"{p}model_batch_rows",
            "Rows per ONNX Runtime call after coalescing, per served model.",
            labels=["model"],
        )
        compute = CounterMetricFamily(
            f"{p}model_compute_seconds",
            "ONNX Runtime time spent in calls, per served model.",
            labels=["model"],
        )
        load = GaugeMetricFamily(
            f"{p}model_load_resident_bytes",
            "Resident memory the active version added while loading (warm-up included).",
            labels=["model"],
        )
        swap = GaugeMetricFamily(
            f"{p}model_swap_transient_bytes",
            "Resident memory the last swap's candidate added beside the version it replaced.",
            labels=["model"],
        )
        for name, stats in sorted(self.models.items()):
            duration.add_metric([name], stats.total.cumulative(), stats.total.total)
            rows.add_metric([name], stats.batch_rows.cumulative(), stats.batch_rows.total)
            compute.add_metric([name], stats.compute_s)
            if stats.load_rss_delta_bytes is not None:
                load.add_metric([name], stats.load_rss_delta_bytes)
            if stats.swap_transient_bytes is not None:
                swap.add_metric([name], stats.swap_transient_bytes)
        yield from (duration, rows, compute, load, swap)


def register_process_metrics(registry: CollectorRegistry) -> None:
    """CPU, memory and open files of this process (`process_*`), as client_python defines them."""
    ProcessCollector(registry=registry)


class LoopFailures:
    """Items a long-running loop failed on and went past: counted by loop, logged once each.

    A route, a control loop, a sink or a watcher handles one item at a time, and one item's
    exception must not end its task (and with it the process). `record` is called from an
    `except Exception` block: cancellation, `SystemExit` and `KeyboardInterrupt` are not
    `Exception`s and still propagate. The loop names are a closed set: a metric label.
    """

    LOOPS: Final = frozenset(
        {
            "route",  # module: a message on the infer or feedback input
            "control",  # module: a desired patch, a connection change, a method call
            "method",  # module: a direct method's handler
            "telemetry",  # module: one telemetry window
            "headroom",  # module: one memory-headroom check
            "drift_tick",  # agent: one scoring tick of the observer
            "sink",  # agent: a window profile or an alert handed to the adapter's sink
            "folder",  # agent: one manifest file of the watched folder
            "secrets_reload",  # agent: one check of the TLS and token files
        }
    )

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Without a registry (a part built alone, in a test) it still counts, unexported.
        self._counter = Counter(
            "agent_loop_failures",
            "Items a long-running loop failed on and went past, by loop.",
            ["loop"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        for loop in self.LOOPS:
            self._counter.labels(loop)  # every series from the start, at 0
        self.counts = dict.fromkeys(self.LOOPS, 0)

    def record(self, loop: str, **fields: object) -> None:
        """Count and log the exception being handled (one `exc_info` event)."""
        if loop not in self.LOOPS:
            raise ValueError(f"unknown loop {loop!r}: add it to LoopFailures.LOOPS")
        self._counter.labels(loop).inc()
        self.counts[loop] += 1
        _log.error("loop_item_failed", loop=loop, exc_info=True, **fields)
