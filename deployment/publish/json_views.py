"""``--json`` of the read-only commands: one JSON document on stdout, for scripts.

The same facts the tables show, full-length (no shortened hashes) and with times in ISO 8601.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from deployment.publish import rollout
from deployment.publish.audit import AuditLog
from deployment.publish.hub_client import Hub
from deployment.publish.registry import ModelEntry, Registry, parse_ref


def _when(created_ms: int) -> str:
    return datetime.fromtimestamp(created_ms / 1000, UTC).isoformat()


def entry_json(entry: ModelEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "version": entry.version,
        "sha256": entry.sha256,
        "size": entry.size,
        "aliases": list(entry.aliases),
        "lineage": entry.lineage,
        "run_id": entry.run_id,
        "registered": _when(entry.created_ms),
    }


def models(registry: Registry) -> list[dict[str, Any]]:
    return [entry_json(entry) for entry in registry.models()]


def show(registry: Registry, ref: str) -> dict[str, Any]:
    name, version = parse_ref(ref, version_required=False)
    entry = registry.entry(name, version)
    return entry_json(entry) | {
        "contract": dict(entry.contract),
        "tags": dict(entry.tags),
        "metrics": registry.metrics(entry),
    }


def history(registry: Registry, name: str) -> list[dict[str, Any]]:
    return [entry_json(entry) for entry in registry.history(name)]


def audit(log: AuditLog, subject: str | None) -> list[dict[str, Any]]:
    return [
        {
            "seq": e.seq,
            "time": e.time,
            "actor": e.actor,
            "action": e.action,
            "subject": e.subject,
            "outcome": e.outcome,
            "details": dict(e.details),
        }
        for e in log.entries()
        if subject is None or e.subject == subject
    ]


def _last_seen(twin: Mapping[str, Any]) -> str | None:
    reported = twin.get("properties", {}).get("reported", {})
    for candidate in (
        twin.get("lastActivityTime"),
        reported.get("$metadata", {}).get("$lastUpdated"),
    ):
        if isinstance(candidate, str) and not candidate.startswith("0001-"):
            return candidate
    return None


def status(hub: Hub, *, module: str, rings: Mapping[str, str], name: str | None) -> dict[str, Any]:
    """The fleet as ``status`` shows it: each device's reported entry of each model (as the
    agent reported it, in full) with its ring, and the model's ring layers."""
    ring_of: dict[str, str] = {}
    for ring, condition in rings.items():
        for device in rollout.Rollout.devices_of(hub, condition):
            ring_of.setdefault(device, ring)
    # A twin query, not SQL; the module name was checked against a pattern by the config.
    twins = hub.query(f"SELECT * FROM devices.modules WHERE moduleId = '{module}'")  # noqa: S608
    devices = []
    for twin in twins:
        reported = twin.get("properties", {}).get("reported", {})
        models = reported.get("models") if isinstance(reported, dict) else None
        for model, report in sorted((models or {}).items()):
            if (name is not None and model != name) or not isinstance(report, Mapping):
                continue
            device = str(twin.get("deviceId"))
            devices.append(
                {
                    "ring": ring_of.get(device),
                    "device": device,
                    "model": model,
                    "reported": dict(report),
                    "last_seen": _last_seen(twin),
                }
            )
    layers = [
        {
            "id": layer.id,
            "ring": layer.labels.get(rollout.LABEL_RING),
            "version": layer.labels.get(rollout.LABEL_VERSION),
            "priority": layer.priority,
            "targeted": layer.targeted,
            "applied": layer.applied,
            "metrics": dict(layer.metric_results or {}),
        }
        for layer in hub.configurations()
        if rollout.LABEL_MODEL in layer.labels
        and (name is None or layer.labels[rollout.LABEL_MODEL] == name)
    ]
    return {"devices": devices, "layers": layers}
