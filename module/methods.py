"""Direct methods `status`, `rollback` and `profile`: payloads validated, errors explained."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from azure.iot.device import MethodRequest, MethodResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field, ValidationError

from agent.observation.limits import Limits
from agent.observation.metrics import InferenceMetrics, LoopFailures
from agent.observation.profile import live_profile
from agent.releases.lifecycle import SwapError
from agent.releases.swap import ModelManager
from module.connection import HubConnection
from module.desired import describe
from wire.base import WireModel
from wire.bounded_json import BoundedJsonError, JsonLimits, check_value

log = structlog.get_logger(__name__)

MethodResult = tuple[int, Any]
# IoT Hub caps a method payload at 128 KB; these methods take a flat object of one field.
PAYLOAD_LIMITS = JsonLimits(max_bytes=128 * 1024, max_depth=4)


class RollbackPayload(WireModel):
    model: str | None = Field(None, min_length=1, max_length=63)


class ProfilePayload(WireModel):
    seconds: float = Field(5.0, gt=0.0, le=30.0)


class StatusPayload(WireModel):
    """No arguments."""


class DirectMethods:
    def __init__(
        self,
        connection: HubConnection,
        manager: ModelManager,
        metrics: InferenceMetrics,
        registry: CollectorRegistry,
        *,
        status: Callable[[], Mapping[str, Any]],
        default_model: Callable[[], str | None],
        limits: Limits | None = None,
        failures: LoopFailures | None = None,
    ) -> None:
        self._failures = failures or LoopFailures()
        self._connection = connection
        self._limits = limits
        self._manager = manager
        self._metrics = metrics
        self._status = status
        self._default_model = default_model
        self._handlers: dict[str, Callable[[Any], Awaitable[MethodResult]]] = {
            "status": self._method_status,
            "rollback": self._method_rollback,
            "profile": self._method_profile,
        }
        self._calls = Counter(
            "agent_direct_methods",
            "Direct method calls, by method and status.",
            ["method", "status"],
            registry=registry,
        )

    async def answer(self, request: MethodRequest) -> None:
        """Run the method and send its response (the caller times out if that fails)."""
        status, payload = await self.result(request.name, request.payload)
        known = request.name if request.name in self._handlers else "unknown"
        self._calls.labels(known, str(status)).inc()
        client = self._connection.client
        if client is None:
            return
        response = MethodResponse.create_from_method_request(request, status, payload)
        try:
            await self._connection.call(client.send_method_response(response))
        except Exception as error:  # the caller sees a timeout; nothing else to do
            log.warning("method_response_failed", method=request.name, error=str(error))

    async def result(self, name: str, raw: Any) -> MethodResult:
        handler = self._handlers.get(name)
        if handler is None:
            return 404, {
                "error": f"unknown method {name!r}; this module has {sorted(self._handlers)}"
            }
        try:
            # The SDK parsed the payload; its size and depth are ours to bound before pydantic.
            check_value(raw, PAYLOAD_LIMITS)
        except BoundedJsonError as error:
            return 400, {"error": f"bad {name} payload: {error.problem}: {error.message}"}
        try:
            # azure-iot-hub's invoke_device_module_method sends "" for "no payload".
            return await handler({} if raw is None or raw == "" else raw)
        except ValidationError as error:
            return 400, {"error": f"bad {name} payload: {describe(error, root='payload')}"}
        except SwapError as error:
            return 409, {"error": error.message, "reason": error.reason.value}
        except Exception:  # a failure of ours: answered, counted and logged, never a lost task
            self._failures.record("method", method=name)
            return 500, {"error": f"the {name} method failed; see the agent log"}

    async def _method_status(self, payload: Any) -> MethodResult:
        StatusPayload.model_validate(payload)
        return 200, self._status()

    async def _method_rollback(self, payload: Any) -> MethodResult:
        target = RollbackPayload.model_validate(payload).model or self._default_model()
        if target is None:
            return 400, {"error": 'no model to roll back: name one with {"model": ...}'}
        return 200, (await self._manager.rollback(target)).to_json()

    async def _method_profile(self, payload: Any) -> MethodResult:
        seconds = ProfilePayload.model_validate(payload).seconds
        return 200, await live_profile(self._metrics, seconds, limits=self._limits)
