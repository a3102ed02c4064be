"""The release pipeline's own metrics: outcomes, failures by reason, how long a swap takes.

Like client_python's own collectors, they take `(registry, namespace)`: the namespace joins
the name as `namespace_name`, so the default `agent` exports `agent_model_updates_total`,
`agent_model_update_failures_total` and `agent_model_swap_seconds`.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from agent.releases.lifecycle import ModelState
from wire.reasons import Reason

NAMESPACE = "agent"


class SwapMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY, namespace: str = NAMESPACE) -> None:
        self.outcomes = Counter(
            "model_updates",
            "Model releases by model and final state.",
            ["model", "state"],
            namespace=namespace,
            registry=registry,
        )
        self.failures = Counter(
            "model_update_failures",
            "Releases rejected, failed or rolled back, by model and reason.",
            ["model", "reason"],
            namespace=namespace,
            registry=registry,
        )
        self.swap_seconds = Histogram(
            "model_swap_seconds",
            "From accepting a manifest to serving the new model.",
            namespace=namespace,
            registry=registry,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        )

    def ended(self, model: str, state: ModelState, reason: Reason) -> None:
        """A release of `model` ended in `state` (rejected, failed, rolled back) for `reason`."""
        self.failures.labels(model, reason.value).inc()
        self.outcomes.labels(model, state.value).inc()

    def swapped(self, model: str, seconds: float) -> None:
        """A release of `model` serves, `seconds` after its manifest was accepted."""
        self.swap_seconds.observe(seconds)
        self.outcomes.labels(model, ModelState.ACTIVE.value).inc()
