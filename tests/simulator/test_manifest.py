"""Deployment manifests: modules, routes and initial desired twins."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from simulator.manifest import ManifestError, load_manifest, parse_manifest
from simulator.routes import ModuleInput, Upstream
from tests.simulator.conftest import MANIFEST


def test_a_manifest_gives_modules_routes_and_desired_twins(tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps(MANIFEST))
    deployment = load_manifest(path)
    assert deployment.modules == ("producer", "consumer")
    assert [route.sink for route in deployment.routes] == [
        ModuleInput("consumer", "samples"),
        Upstream(),
        Upstream(),
    ]
    assert deployment.desired["producer"] == {"rate": 5, "model": {"name": "m", "version": 1}}


def _broken(edit: str) -> dict[str, Any]:
    document = copy.deepcopy(MANIFEST)
    content = document["modulesContent"]
    match edit:
        case "no modulesContent":
            del document["modulesContent"]
        case "no edgeAgent":
            del content["$edgeAgent"]
        case "bad route":
            content["$edgeHub"]["properties.desired"]["routes"]["x"] = "FROM nowhere"
        case "unknown module section":
            content["ghost"] = {"properties.desired": {}}
        case "desired not an object":
            content["producer"]["properties.desired"] = [1]
    return document


@pytest.mark.parametrize(
    "edit",
    [
        "no modulesContent",
        "no edgeAgent",
        "bad route",
        "unknown module section",
        "desired not an object",
    ],
)
def test_broken_manifests_are_refused(edit: str) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(_broken(edit))


def test_an_unreadable_manifest_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError):
        load_manifest(path)
