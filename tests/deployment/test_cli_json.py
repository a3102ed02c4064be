"""`--json` on the read-only commands: one JSON document on stdout, with the same facts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from tests.deployment.conftest import Workspace
from tests.support.fake_service_hub import FakeHub


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


def test_status_as_json(workspace: Workspace) -> None:
    workspace.rings = {"canary": "tags.ring = 'canary'", "broad": "tags.ring = 'broad'"}
    workspace.write_config()
    workspace.environ["IOTHUB_CONNECTION_STRING"] = "HostName=h;SharedAccessKey=x"
    hub = FakeHub(model="m")
    hub.devices = {"tags.ring = 'canary'": ["cam-1"], "tags.ring = 'broad'": ["cam-2"]}
    hub.reports = {
        "cam-1": {"version": 2, "state": "active"},
        "cam-2": {"version": 1, "state": "failed", "reason": "load_failed"},
    }
    result = workspace.cli("status", "m", "--json", hub_factory=lambda *_: hub)
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert [(d["ring"], d["device"], d["reported"]["version"]) for d in document["devices"]] == [
        ("canary", "cam-1", 2),
        ("broad", "cam-2", 1),
    ]
    assert document["devices"][1]["reported"]["reason"] == "load_failed"
    assert document["layers"] == []
    other = workspace.cli("status", "x", "--json", hub_factory=lambda *_: hub)
    assert json.loads(other.out)["devices"] == []
