"""The IoT Hub service calls the publisher makes, behind one small interface.

`AzureHub` speaks to IoT Hub (or the simulator) through the real `azure-iot-hub` SDK; it
counts its calls, which is how the rollout benchmark compares publishers. Every SDK failure
becomes a `PublisherError(unreachable)` naming the operation, never the connection string.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import (
    CloudToDeviceMethod,
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
)

from deployment.errors import PublisherError, Reason

PAGE_SIZE = 1000  # IoT Hub's largest page for twin queries
CALL_TIMEOUT_S = 30


@dataclass(frozen=True)
class LayeredDeployment:
    """A layered deployment as the publisher writes and reads it."""

    id: str
    target_condition: str
    priority: int
    modules_content: Mapping[str, Mapping[str, Any]]
    labels: Mapping[str, str]
    metric_queries: Mapping[str, str]
    targeted: int = 0
    applied: int = 0
    metric_results: Mapping[str, int] | None = None
    etag: str | None = None


class Hub(Protocol):
    calls: int

    def query(self, text: str) -> list[dict[str, Any]]: ...

    def configuration(self, config_id: str) -> LayeredDeployment | None: ...

    def configurations(self) -> list[LayeredDeployment]: ...

    def create_configuration(self, deployment: LayeredDeployment) -> None: ...

    def delete_configuration(self, config_id: str) -> None: ...

    def invoke(
        self, device_id: str, module_id: str, method: str, payload: Mapping[str, Any]
    ) -> tuple[int, Any]: ...


def _unreachable(host: str, operation: str, error: Exception) -> PublisherError:
    # An SDK message may embed a request with its SAS token: keep the type and the status.
    status = getattr(getattr(error, "response", None), "status_code", None)
    suffix = f" (HTTP {status})" if status is not None else ""
    return PublisherError(
        Reason.UNREACHABLE, f"IoT Hub {host}: {operation} failed: {type(error).__name__}{suffix}"
    )


def _status(error: Exception) -> int | None:
    status = getattr(getattr(error, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


class AzureHub:
    """IoT Hub through the service SDK; ``ca_file`` trusts a private CA (the simulator's)."""

    def __init__(
        self, connection_string: str, *, ca_file: str | None = None, timeout_s: float = 30
    ) -> None:
        try:
            self._registry = IoTHubRegistryManager.from_connection_string(connection_string)
            self._configs = IoTHubConfigurationManager.from_connection_string(connection_string)
        except Exception as e:  # the SDK raises bare ValueError/KeyError for malformed strings
            raise PublisherError(Reason.CONFIG, "the IoT Hub connection string is malformed") from e
        fields = dict(part.partition("=")[::2] for part in connection_string.split(";"))
        self.host = fields.get("HostName", "?")  # not secret: it names the hub in errors
        for client in (self._registry, self._configs):
            connection = client.protocol.config.connection
            connection.timeout = timeout_s
            if ca_file is not None:
                connection.verify = ca_file
        self.calls = 0

    def query(self, text: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            self.calls += 1
            try:
                result = self._registry.query_iot_hub({"query": text}, token, PAGE_SIZE)
            except Exception as e:
                if _status(e) == 400:
                    raise PublisherError(
                        Reason.CONFIG, f"IoT Hub refused the query {text!r}"
                    ) from e
                raise _unreachable(self.host, "query", e) from e
            items.extend(_plain(item) for item in (result.items or []))
            token = result.continuation_token
            if not token:
                return items

    def configuration(self, config_id: str) -> LayeredDeployment | None:
        self.calls += 1
        try:
            found = self._configs.get_configuration(config_id)
        except Exception as e:
            if _status(e) == 404:
                return None
            raise _unreachable(self.host, "get configuration", e) from e
        return _from_sdk(found)

    def configurations(self) -> list[LayeredDeployment]:
        self.calls += 1
        try:
            found = self._configs.get_configurations(max_count=1000)
        except Exception as e:
            raise _unreachable(self.host, "list configurations", e) from e
        return [_from_sdk(item) for item in found or []]

    def create_configuration(self, deployment: LayeredDeployment) -> None:
        self.calls += 1
        configuration = Configuration(
            id=deployment.id,
            schema_version="1.0",
            labels=dict(deployment.labels),
            content=ConfigurationContent(
                modules_content={k: dict(v) for k, v in deployment.modules_content.items()}
            ),
            target_condition=deployment.target_condition,
            priority=deployment.priority,
            metrics=ConfigurationMetrics(queries=dict(deployment.metric_queries)),
        )
        try:
            self._configs.create_configuration(configuration)
        except Exception as e:
            if _status(e) == 409:  # created by an earlier run that crashed: same id, same content
                return
            if _status(e) == 400:
                raise PublisherError(
                    Reason.SCHEMA_INVALID, f"IoT Hub refused configuration {deployment.id}"
                ) from e
            raise _unreachable(self.host, "create configuration", e) from e

    def delete_configuration(self, config_id: str) -> None:
        self.calls += 1
        try:
            self._configs.delete_configuration(config_id, etag="*")
        except Exception as e:
            if _status(e) == 404:
                return
            raise _unreachable(self.host, "delete configuration", e) from e

    def invoke(
        self, device_id: str, module_id: str, method: str, payload: Mapping[str, Any]
    ) -> tuple[int, Any]:
        self.calls += 1
        request = CloudToDeviceMethod(
            method_name=method,
            payload=dict(payload),
            response_timeout_in_seconds=30,
            connect_timeout_in_seconds=10,
        )
        try:
            result = self._registry.invoke_device_module_method(device_id, module_id, request)
        except Exception as e:
            status = _status(e)
            if status is not None and status < 500:
                return status, None
            raise _unreachable(self.host, f"method {method} on {device_id}/{module_id}", e) from e
        return int(result.status), result.payload


def _plain(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    serialized = item.serialize()  # the wire shape (deviceId, properties.reported)
    return dict(json.loads(json.dumps(serialized)))


def _from_sdk(item: Configuration) -> LayeredDeployment:
    content = item.content.modules_content if item.content is not None else None
    system = item.system_metrics.results if item.system_metrics is not None else None
    custom = item.metrics.results if item.metrics is not None else None
    return LayeredDeployment(
        id=str(item.id),
        target_condition=str(item.target_condition or ""),
        priority=int(item.priority or 0),
        modules_content=dict(content or {}),
        labels=dict(item.labels or {}),
        metric_queries=dict(item.metrics.queries or {}) if item.metrics is not None else {},
        targeted=int((system or {}).get("targetedCount", 0)),
        applied=int((system or {}).get("appliedCount", 0)),
        metric_results={k: int(v) for k, v in (custom or {}).items()},
        etag=item.etag,
    )
