"""``--json`` of the read-only commands: one JSON document on stdout, for scripts.

The same facts the tables show, full-length (no shortened hashes) and with times in ISO 8601.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from deployment.publish.audit import AuditLog
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
