"""`--json` on the read-only commands: one JSON document on stdout, with the same facts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from tests.deployment.conftest import Workspace


def _json(workspace: Workspace, *args: str) -> Any:
    result = workspace.cli(*args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)  # the whole of stdout is one document


def test_list_show_history_and_audit_as_json(workspace: Workspace, tiny_file: Path) -> None:
    name = f"json_{uuid.uuid4().hex[:10]}"  # the MLflow database is shared by the session
    first = workspace.register(tiny_file, name)
    second = workspace.register(tiny_file, name)

    listed = {m["name"]: m for m in _json(workspace, "list")}
    assert listed[name]["version"] == second
    assert len(listed[name]["sha256"]) == 64

    shown = _json(workspace, "show", f"{name}:{first}")
    assert (shown["name"], shown["version"]) == (name, first)
    assert shown["contract"]["inputs"][0]["datatype"] == "FP32"
    assert shown["metrics"] == {"accuracy": 0.91, "loss": 0.2}

    versions = [v["version"] for v in _json(workspace, "history", name)]
    assert sorted(versions) == [first, second]

    entries = _json(workspace, "audit", "show", f"{name}:{second}")
    assert [(e["action"], e["outcome"]) for e in entries] == [("register", "registered")]
    assert entries[0]["details"]["sha256"] == shown["sha256"]
    everything = _json(workspace, "audit", "show")
    assert [e["seq"] for e in everything] == sorted(e["seq"] for e in everything)
