"""Read an IoT Edge deployment manifest: modules, routes and initial desired twins (pure)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.routes import Route, RouteError, parse_routes

SYSTEM_MODULES = frozenset({"$edgeAgent", "$edgeHub"})


class ManifestError(ValueError):
    """The manifest is not a deployment IoT Edge would accept (for what the simulator reads)."""


@dataclass(frozen=True)
class Deployment:
    modules: tuple[str, ...]
    routes: tuple[Route, ...]
    desired: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    edge_hub: Mapping[str, Any] = field(default_factory=dict)  # $edgeHub's properties.desired


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where} must be a JSON object")
    return value


def parse_manifest(document: Mapping[str, Any]) -> Deployment:
    content = _object(document.get("modulesContent"), "modulesContent")
    agent = _object(content.get("$edgeAgent"), "modulesContent.$edgeAgent")
    agent_desired = _object(agent.get("properties.desired"), "$edgeAgent properties.desired")
    modules = tuple(_object(agent_desired.get("modules", {}), "$edgeAgent modules"))
    hub = _object(content.get("$edgeHub"), "modulesContent.$edgeHub")
    hub_desired = _object(hub.get("properties.desired"), "$edgeHub properties.desired")
    try:
        routes = parse_routes(_object(hub_desired.get("routes", {}), "$edgeHub routes"))
    except RouteError as exc:
        raise ManifestError(str(exc)) from exc
    desired: dict[str, Mapping[str, Any]] = {}
    for name, section in content.items():
        if name in SYSTEM_MODULES:
            continue
        if name not in modules:
            raise ManifestError(f"modulesContent has {name!r}, which $edgeAgent does not run")
        desired[name] = copy.deepcopy(
            dict(_object(_object(section, name).get("properties.desired", {}), name))
        )
    return Deployment(
        modules=modules, routes=routes, desired=desired, edge_hub=copy.deepcopy(dict(hub_desired))
    )


def load_manifest(path: Path) -> Deployment:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    return parse_manifest(_object(document, str(path)))
