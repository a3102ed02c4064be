"""The service REST API the azure-iot-hub SDK calls, plus the simulator's admin endpoints.

Every request carries a service SAS token (`Authorization: SharedAccessSignature sr=<host>...
&skn=iothubowner`) signed with the service key; the admin endpoints (`/_simulator/...`, used by the
CLI) take the same token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from simulator import sas, topics
from simulator.core import DEFAULT_METHOD_TIMEOUT_SECONDS, Hub, HubEvent, TwinResponseFault
from simulator.errors import ServiceError

log = structlog.get_logger(__name__)

SERVICE_POLICY = "iothubowner"
# Above IoT Hub's own limits (512 KB of configuration content), so that an oversized
# configuration gets IoT Hub's error body rather than the HTTP server's.
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000  # IoT Hub's largest query page
MAX_CONFIGURATIONS_LISTED = 100
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    """IoT Hub's error body: the code and reason in `Message`, a tracking id beside it."""
    now = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime())
    tracking = f"Tracking ID:{uuid.uuid4().hex}-G:0-TimeStamp:{now}"
    return web.json_response(
        {"Message": f"ErrorCode:{code};{message}", "ExceptionMessage": tracking}, status=status
    )


def event_selected(event: HubEvent, kinds: set[str], devices: set[str], modules: set[str]) -> bool:
    """Whether `watch` shows the event; a fleet-wide event (no device) passes device filters."""
    if event.kind not in kinds:
        return False
    if devices and event.device_id and event.device_id not in devices:
        return False
    return not (modules and event.module_id and event.module_id not in modules)


class ServiceApi:
    def __init__(
        self,
        hub: Hub,
        *,
        service_hostname: str,
        service_key: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._hub = hub
        self._service_hostname = service_hostname
        self._service_key = service_key
        self._clock = clock
        # TLS transports of connections that made a request. On shutdown they are aborted:
        # a graceful TLS close waits for the peer's close_notify, which an idle keep-alive
        # client never sends, and the loop would end with the socket still open.
        self._transports: weakref.WeakSet[asyncio.Transport] = weakref.WeakSet()
        self._watchers: set[asyncio.Task[Any]] = set()

    async def _on_shutdown(self, _app: web.Application) -> None:
        # Watch streams never end by themselves, and would hold the shutdown for its timeout.
        for task in list(self._watchers):
            task.cancel()
        for transport in list(self._transports):
            transport.abort()

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._track, self._errors, self._authorize],
            client_max_size=MAX_BODY_BYTES,
        )
        app.on_shutdown.append(self._on_shutdown)
        app.router.add_get("/twins/{device}/modules/{module}", self._get_twin)
        app.router.add_patch("/twins/{device}/modules/{module}", self._update_twin)
        app.router.add_put("/twins/{device}/modules/{module}", self._replace_twin)
        app.router.add_post("/twins/{device}/modules/{module}/methods", self._invoke_method)
        app.router.add_post("/devices/query", self._query)
        app.router.add_get("/twins/{device}", self._get_device_twin)
        app.router.add_patch("/twins/{device}", self._update_device_twin)
        app.router.add_put("/twins/{device}", self._replace_device_twin)
        app.router.add_get("/devices", self._get_devices)
        app.router.add_get("/devices/{device}", self._get_device)
        app.router.add_post("/devices/{device}/applyConfigurationContent", self._apply_content)
        app.router.add_post("/configurations/testQueries", self._test_queries)
        app.router.add_get("/configurations", self._get_configurations)
        app.router.add_get("/configurations/{id}", self._get_configuration)
        app.router.add_put("/configurations/{id}", self._put_configuration)
        app.router.add_delete("/configurations/{id}", self._delete_configuration)
        app.router.add_get("/devices/{device}/modules/{module}", self._get_module)
        app.router.add_get("/devices/{device}/modules", self._get_modules)
        app.router.add_post("/_simulator/inputs/{device}/{module}/{input}", self._send_to_input)
        app.router.add_get("/_simulator/watch", self._watch)
        app.router.add_post("/_simulator/faults/{fault}", self._fault)
        return app

    # -------------------------------------------------------- middlewares

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            self._transports.add(request.transport)
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServiceError as exc:
            log.info("rest_refused", path=request.path, status=exc.status, reason=str(exc))
            return _error(exc.status, exc.code, str(exc))

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = request.headers.get("Authorization", "")
        verdict = sas.verify(
            token,
            resource=self._service_hostname,
            key=self._service_key,
            now=self._clock(),
            key_name=SERVICE_POLICY,
        )
        if verdict is not sas.Verdict.VALID:
            log.warning("rest_unauthorized", path=request.path, reason=verdict.value)
            raise ServiceError(401, "IotHubUnauthorizedAccess", "unauthorized")
        return await handler(request)

    # -------------------------------------------------------- helpers

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServiceError(400, "ArgumentInvalid", "body is not JSON") from exc

    @staticmethod
    def _ids(request: web.Request) -> tuple[str, str]:
        return request.match_info["device"], request.match_info["module"]

    def _twin_response(self, twin: dict[str, Any]) -> web.Response:
        return web.json_response(twin, headers={"ETag": f'"{twin["etag"]}"'})

    # -------------------------------------------------------- service API

    async def _get_twin(self, request: web.Request) -> web.StreamResponse:
        return self._twin_response(self._hub.service_twin(*self._ids(request)))

    async def _update_twin(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if_match = request.headers.get("If-Match")
        twin = self._hub.update_twin(*self._ids(request), body, if_match, replace=False)
        return self._twin_response(twin)

    async def _replace_twin(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if_match = request.headers.get("If-Match")
        twin = self._hub.update_twin(*self._ids(request), body, if_match, replace=True)
        return self._twin_response(twin)

    def _module_document(self, device_id: str, module_id: str) -> dict[str, Any]:
        twin = self._hub.twin(device_id, module_id)
        identity = self._hub.identities[(device_id, module_id)]
        connected = self._hub.is_connected(device_id, module_id)
        return {
            "deviceId": device_id,
            "moduleId": module_id,
            "managedBy": "IotEdge",
            "generationId": "1",
            "etag": twin.etag,
            "connectionState": "Connected" if connected else "Disconnected",
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "type": "sas",
                "symmetricKey": {
                    "primaryKey": identity.primary_key,
                    "secondaryKey": identity.secondary_key,
                },
            },
        }

    async def _get_module(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._module_document(*self._ids(request)))

    async def _get_modules(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        modules = [module for device, module in sorted(self._hub.identities) if device == device_id]
        if not modules:
            raise ServiceError(404, "DeviceNotFound", "no such device")
        return web.json_response([self._module_document(device_id, m) for m in modules])

    async def _invoke_method(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("methodName"), str):
            raise ServiceError(400, "ArgumentInvalid", "methodName is required")
        timeout = body.get("responseTimeoutInSeconds") or DEFAULT_METHOD_TIMEOUT_SECONDS
        connect_timeout = body.get("connectTimeoutInSeconds") or 0
        if not isinstance(timeout, int | float) or not 0 < timeout <= 300:
            raise ServiceError(400, "ArgumentInvalid", "responseTimeoutInSeconds must be 1..300")
        if not isinstance(connect_timeout, int | float) or not 0 <= connect_timeout <= 300:
            raise ServiceError(400, "ArgumentInvalid", "connectTimeoutInSeconds must be 0..300")
        status, payload = await self._hub.invoke_method(
            *self._ids(request),
            body["methodName"],
            body.get("payload"),
            float(timeout),
            connect_timeout_seconds=float(connect_timeout),
        )
        return web.json_response({"status": status, "payload": payload})

    async def _query(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise ServiceError(400, "ArgumentInvalid", "query is required")
        try:
            page_size = int(request.headers.get("x-ms-max-item-count") or DEFAULT_PAGE_SIZE)
        except ValueError as exc:
            raise ServiceError(400, "ArgumentInvalid", "bad x-ms-max-item-count") from exc
        page_size = min(page_size, MAX_PAGE_SIZE)
        items, continuation, item_type = self._hub.query(
            body["query"], request.headers.get("x-ms-continuation"), page_size
        )
        headers = {"x-ms-item-type": item_type}
        if continuation is not None:
            headers["x-ms-continuation"] = continuation
        return web.json_response(items, headers=headers)

    # -------------------------------------------------------- devices

    async def _get_device_twin(self, request: web.Request) -> web.StreamResponse:
        return self._twin_response(self._hub.fleet.device_document(request.match_info["device"]))

    async def _update_device_twin(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        twin = self._hub.fleet.update_device_twin(
            request.match_info["device"], body, request.headers.get("If-Match"), replace_all=False
        )
        return self._twin_response(twin)

    async def _replace_device_twin(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        twin = self._hub.fleet.update_device_twin(
            request.match_info["device"], body, request.headers.get("If-Match"), replace_all=True
        )
        return self._twin_response(twin)

    def _device_document(self, device_id: str) -> dict[str, Any]:
        device = self._hub.fleet.device(device_id)
        connected = any(self._hub.is_connected(device_id, m) for m in device.modules)
        return {
            "deviceId": device_id,
            "generationId": "1",
            "etag": device.twin.etag,
            "connectionState": "Connected" if connected else "Disconnected",
            "status": "enabled",
            "cloudToDeviceMessageCount": 0,
            "capabilities": {"iotEdge": True},
            # Edge devices of the simulator have no device-level identity to connect with.
            "authentication": {"type": "none"},
        }

    async def _get_device(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._device_document(request.match_info["device"]))

    async def _get_devices(self, request: web.Request) -> web.StreamResponse:
        top = self._int_query(request, "top", default=1000)
        devices = list(self._hub.fleet.devices)[:top]
        return web.json_response([self._device_document(device) for device in devices])

    # -------------------------------------------------------- configurations

    @staticmethod
    def _int_query(request: web.Request, name: str, *, default: int) -> int:
        try:
            value = int(request.query.get(name, default))
        except ValueError as exc:
            raise ServiceError(400, "ArgumentInvalid", f"{name} must be an integer") from exc
        if value < 1:
            raise ServiceError(400, "ArgumentInvalid", f"{name} must be positive")
        return value

    async def _get_configuration(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._hub.fleet.configuration_document(request.match_info["id"]))

    async def _get_configurations(self, request: web.Request) -> web.StreamResponse:
        top = self._int_query(request, "top", default=MAX_CONFIGURATIONS_LISTED)
        return web.json_response(self._hub.fleet.list_configurations(top))

    async def _put_configuration(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        config_id = request.match_info["id"]
        created = config_id not in self._hub.fleet.configurations
        document = self._hub.fleet.put_configuration(
            config_id, body, request.headers.get("If-Match")
        )
        return web.json_response(document, status=201 if created else 200)

    async def _delete_configuration(self, request: web.Request) -> web.StreamResponse:
        self._hub.fleet.delete_configuration(
            request.match_info["id"], request.headers.get("If-Match")
        )
        return web.Response(status=204)

    async def _test_queries(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._hub.fleet.test_queries(await self._json(request)))

    async def _apply_content(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        self._hub.fleet.apply_on_edge_device(request.match_info["device"], body)
        return web.Response(status=204)

    # -------------------------------------------------------- admin API (CLI and tests)

    async def _send_to_input(self, request: web.Request) -> web.StreamResponse:
        """Body: `{"body": str, "base64": bool?, "properties": {str: str}?}`."""
        envelope = await self._json(request)
        if not isinstance(envelope, dict) or not isinstance(envelope.get("body"), str):
            raise ServiceError(400, "ArgumentInvalid", "body must be a string")
        properties = envelope.get("properties") or {}
        if not isinstance(properties, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in properties.items()
        ):
            raise ServiceError(400, "ArgumentInvalid", "properties must map strings to strings")
        try:
            payload = (
                base64.b64decode(envelope["body"], validate=True)
                if envelope.get("base64")
                else envelope["body"].encode()
            )
        except binascii.Error as exc:
            raise ServiceError(400, "ArgumentInvalid", "body is not base64") from exc
        system = {"contentType": "application/json", "contentEncoding": "utf-8"}
        message = topics.Message(payload, system, properties)
        if message.size > topics.MAX_MESSAGE_BYTES:
            raise ServiceError(413, "MessageTooLarge", "message exceeds 256 KB")
        device_id, module_id = self._ids(request)
        self._hub.twin(device_id, module_id)
        self._hub.deliver_to_input(device_id, module_id, request.match_info["input"], message)
        return web.json_response({"queued": True}, status=202)

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        """JSON lines, as they happen: `?kinds=` (default upstream,reported) of upstream,
        reported, desired, connected, disconnected, configuration; `?devices=` and `?modules=`
        (comma-separated, empty: all) keep only those devices' and modules' events."""
        kinds = set(request.query.get("kinds", "upstream,reported").split(","))
        devices = {d for d in request.query.get("devices", "").split(",") if d}
        modules = {m for m in request.query.get("modules", "").split(",") if m}
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None  # aiohttp runs each handler in a task
        self._watchers.add(task)
        try:
            # The first line says the stream is live: what happens from now on will be shown.
            hello = {"kind": "watching", "kinds": sorted(kinds)}
            await response.write(json.dumps(hello).encode() + b"\n")
            async for event in self._hub.events.follow():
                if event_selected(event, kinds, devices, modules):
                    line = json.dumps(event.to_json(), default=str) + "\n"
                    await response.write(line.encode())
        except ConnectionResetError:
            log.info("watch_client_gone")
        finally:
            self._watchers.discard(task)
        return response

    async def _fault(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ServiceError(400, "ArgumentInvalid", "body must be an object")
        faults = self._hub.faults
        try:
            match request.match_info["fault"]:
                case "drop":
                    found = self._hub.broker.drop(f"{body['device']}/{body['module']}")
                    return web.json_response({"dropped": found})
                case "refuse":
                    faults.refuse(f"{body['device']}/{body['module']}", float(body["seconds"]))
                case "twin":
                    status = body.get("status")
                    faults.twin = TwinResponseFault(
                        status=None if status is None else int(status),
                        delay_seconds=float(body.get("delay", 0.0)),
                        remaining=body.get("count"),
                    )
                case "pause-pubacks":
                    faults.pause_pubacks()
                case "resume-pubacks":
                    faults.resume_pubacks()
                case "clear":
                    faults.clear()
                case other:
                    raise ServiceError(404, "NotFound", f"no fault {other!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(400, "ArgumentInvalid", f"bad fault arguments: {exc}") from exc
        return web.json_response({"ok": True})
