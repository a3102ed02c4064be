"""The release pipeline's own metrics: outcomes, failures by reason, how long a swap takes.

Like client_python's own collectors, they take `(registry, namespace)`: the namespace joins
the name as `namespace_name`, so the default `agent` exports `agent_model_updates_total`,
`agent_model_update_failures_total` and `agent_model_swap_seconds`.

The `model` label comes from a closed set: a name that serves or that the store holds a
verified release of, else `other`. A rejected manifest's name is whatever its author wrote
(forged ones included): 300 forged names once made 1,361 series.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from agent.releases.lifecycle import ModelState
from wire.reasons import Reason

NAMESPACE = "agent"
OTHER = "other"


def model_label(name: str, known: Collection[str]) -> str:
    """The `model` label for `name`: itself when known (served or verified), else `other`."""
    return name if name in known else OTHER


class SwapMetrics:
    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        namespace: str = NAMESPACE,
        known: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self._known = known
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
        label = model_label(model, self._known())
        self.failures.labels(label, reason.value).inc()
        self.outcomes.labels(label, state.value).inc()

    def swapped(self, model: str, seconds: float) -> None:
        """A release of `model` serves, `seconds` after its manifest was accepted."""
        self.swap_seconds.observe(seconds)
        self.outcomes.labels(model_label(model, self._known()), ModelState.ACTIVE.value).inc()
