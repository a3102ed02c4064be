"""An in-memory IoT Hub for the publisher: layered deployments in a dict, twin queries and
direct methods answered from tables a test sets, and outages a test switches on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deployment.errors import PublisherError, Reason
from deployment.publish.hub_client import LayeredDeployment


class FakeHub:
    """Configurations kept in a dict; queries answered from tables the test sets."""

    def __init__(self, model: str = "m") -> None:
        self.model = model
        self.calls = 0
        self.layers: dict[str, LayeredDeployment] = {}
        self.devices: dict[str, list[str]] = {}  # condition -> device ids
        self.reports: dict[str, Mapping[str, Any]] = {}  # device -> reported models.m
        self.methods: list[tuple[str, str]] = []
        self.reports_unreachable = False  # the gate's query fails, as a hub outage would
        self.offline: set[str] = set()
        self.creates_unreachable = False  # writing a layer fails, as a hub outage would

    def query(self, text: str) -> list[dict[str, Any]]:
        self.calls += 1
        if text.startswith("SELECT * FROM devices.modules") and self.reports_unreachable:
            raise PublisherError(Reason.UNREACHABLE, "IoT Hub h: query failed")
        if text.startswith("SELECT * FROM devices WHERE "):
            condition = text.removeprefix("SELECT * FROM devices WHERE ")
            ids: set[str] = set()
            for part in condition.split(" OR "):
                ids.update(self.devices.get(part.strip("()"), []))
            return [{"deviceId": d} for d in sorted(ids)]
        version = int(text.rsplit("= ", 1)[1]) if ".version = " in text else None
        return [
            {"deviceId": d, "properties": {"reported": {"models": {self.model: r}}}}
            for d, r in self.reports.items()
            if version is None or r.get("version") == version
        ]

    def configuration(self, config_id: str) -> LayeredDeployment | None:
        return self.layers.get(config_id)

    def configurations(self) -> list[LayeredDeployment]:
        self.calls += 1
        return list(self.layers.values())

    def create_configuration(self, deployment: LayeredDeployment) -> None:
        self.calls += 1
        if self.creates_unreachable:
            raise PublisherError(Reason.UNREACHABLE, "IoT Hub h: create configuration failed")
        self.layers.setdefault(deployment.id, deployment)

    def delete_configuration(self, config_id: str) -> None:
        self.calls += 1
        self.layers.pop(config_id, None)

    def invoke(
        self, device_id: str, module_id: str, method: str, payload: Mapping[str, Any]
    ) -> tuple[int, Any]:
        self.calls += 1
        if device_id in self.offline:
            raise PublisherError(Reason.UNREACHABLE, f"IoT Hub h: method on {device_id} failed")
        self.methods.append((device_id, method))
        return 200, {}
