"""The cloud side of an end-to-end test through the real azure-iot-hub service SDK."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from tests.support.module_process import MODULE
from tests.support.polling import poll


@dataclass
class Service:
    """The module twin and direct methods through azure-iot-hub, as an operator would."""

    registry: IoTHubRegistryManager
    device: str

    def twin(self) -> Any:
        return self.registry.get_module_twin(self.device, MODULE)

    def reported(self) -> dict[str, Any]:
        return dict(self.twin().properties.reported or {})

    def desired_version(self) -> int:
        return int(self.twin().properties.desired["$version"])

    def update_desired(self, patch: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]) -> int:
        """Patch the desired properties under the twin's etag; the new desired `$version`.

        The etag changes with every reported patch too, so a 412 (the module reported in
        between) is answered as an operator's tool would: read again, patch again.
        `patch` may be a function of the twin read.
        """
        for _ in range(10):
            current = self.twin()
            body = dict(patch(current) if callable(patch) else patch)
            twin = Twin(properties=TwinProperties(desired=body))
            try:
                updated = self.registry.update_module_twin(self.device, MODULE, twin, current.etag)
            except HttpOperationError as error:
                if error.response.status_code != 412:
                    raise
                continue
            return int(updated.properties.desired["$version"])
        pytest.fail("the module twin changed under ten updates in a row")

    def publish(self, manifest: Mapping[str, Any], key: str | None = None) -> int:
        """Desired `models.<key>` := `manifest` (key: its name). A twin update through this
        SDK is a JSON merge patch, so a field of the previous manifest that this one lacks
        (`golden`, `expires`) is sent as null: merged into the new one, it would break the
        signature. (A layered deployment that owns `models.<key>` replaces it wholesale.)"""
        key = key or str(manifest["name"])

        def patch(twin: Any) -> dict[str, Any]:
            previous = (twin.properties.desired.get("models") or {}).get(key)
            model = dict(manifest)
            if isinstance(previous, Mapping):
                model.update({field: None for field in previous if field not in manifest})
            return {"models": {key: model}}

        return self.update_desired(patch)

    def wait_reported(
        self, matches: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            reported = self.reported()
            return reported if matches(reported) else None

        return poll(check, timeout, f"reported: {what}", interval=0.15)

    def wait_model(
        self, version: int, state: str = "active", timeout: float = 30.0, name: str = "m"
    ) -> dict[str, Any]:
        """The reported `models.<name>` entry once it shows `version` in `state`."""
        reported = self.wait_reported(
            lambda r: (
                model_entry(r, name).get("version") == version
                and model_entry(r, name).get("state") == state
            ),
            timeout,
            f"model {name} version {version} {state}",
        )
        return model_entry(reported, name)

    def invoke(self, method: str, payload: Any = None, timeout: int = 15) -> tuple[int, Any]:
        request = CloudToDeviceMethod(
            method_name=method, payload=payload, response_timeout_in_seconds=timeout
        )
        result = self.registry.invoke_device_module_method(self.device, MODULE, request)
        return int(result.status), result.payload


def model_entry(reported: Mapping[str, Any], name: str = "m") -> dict[str, Any]:
    """The reported `models.<name>` entry ({} if absent)."""
    models = reported.get("models") or {}
    return dict(models.get(name) or {})
