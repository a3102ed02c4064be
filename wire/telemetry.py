"""Messages the module sends on its routes, by their `schema` stamp (the outbox's envelope
carries it, so a cloud reader knows the shape before it parses the body)."""

from __future__ import annotations

from typing import Final

TELEMETRY_SCHEMA: Final = "agent-telemetry/1"
"""On `telemetry`, each telemetry interval: every model's version, state, health and profile,
the inference window and the resources."""

PROFILE_SCHEMA: Final = "agent-drift-profile/1"
"""On `telemetry`, each closed drift window: sparse feature counts, mergeable by baseline."""

ALERT_SCHEMA: Final = "agent-alert/1"
"""A drift or quality state change (event `drift_state`, `quality_state`) before it becomes
an alert on `alerts`."""
