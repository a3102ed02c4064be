"""Prometheus metrics of the inference path, on an injected registry.

Every label takes values from a closed set (outcomes, reject reasons, routes), so a hostile
client cannot grow the series count. The model version travels in one `_info` metric.
"""

from __future__ import annotations

from typing import Final, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

from agent.contract import RejectReason

# Sub-millisecond resolution: tiny models answer in tens of microseconds.
LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InferenceMetrics:
    """The agent's metric families; children for the hot path are bound once, here."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "agent") -> None:
        self.registry = registry
        requests = Counter(
            "inference_requests",
            "Inference requests by outcome.",
            ["outcome"],
            namespace=namespace,
            registry=registry,
        )
        self.ok = requests.labels("ok")
        self.rejected = requests.labels("rejected")
        self.failed = requests.labels("failed")
        rejections = Counter(
            "inference_rejections",
            "Requests refused before inference, by reason.",
            ["reason"],
            namespace=namespace,
            registry=registry,
        )
        self.rejections = {reason: rejections.labels(reason) for reason in get_args(RejectReason)}
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds",
            "Time from arrival to the start of the batch that served the request.",
            namespace=namespace,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.compute = Histogram(
            "inference_compute_seconds",
            "ONNX Runtime time per batch.",
            namespace=namespace,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.total = Histogram(
            "inference_request_duration_seconds",
            "Time from arrival to answer, validation included.",
            namespace=namespace,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_rows = Histogram(
            "inference_batch_rows",
            "Rows per ONNX Runtime call after coalescing.",
            namespace=namespace,
            registry=registry,
            buckets=BATCH_BUCKETS,
        )
        self.in_flight = Gauge(
            "inference_in_flight",
            "Requests accepted and not yet answered.",
            namespace=namespace,
            registry=registry,
        )
        self.dispatch = Counter(
            "inference_batches",
            "ONNX Runtime calls by where they ran (inline on the event loop, or a worker thread).",
            ["dispatch"],
            namespace=namespace,
            registry=registry,
        )
        self.dispatch_inline = self.dispatch.labels("inline")
        self.dispatch_thread = self.dispatch.labels("thread")
        self._model_info = Gauge(
            "model_info",
            "The model being served (value 1); one series per served model name.",
            ["name", "version", "sha256"],
            namespace=namespace,
            registry=registry,
        )
        self._model_labels: dict[str, tuple[str, str, str]] = {}

    def set_model(self, name: str, version: str, sha256: str) -> None:
        """Replace the info series of `name`, so swaps do not accumulate old versions."""
        previous = self._model_labels.pop(name, None)
        if previous is not None:
            self._model_info.remove(*previous)
        labels = (name, version, sha256)
        self._model_info.labels(*labels).set(1)
        self._model_labels[name] = labels

    def reject(self, reason: RejectReason) -> None:
        self.rejected.inc()
        self.rejections[reason].inc()


def register_process_metrics(registry: CollectorRegistry) -> None:
    """CPU, memory and open files of this process (`process_*`), as client_python defines them."""
    ProcessCollector(registry=registry)
