"""IoT Hub and edgeHub semantics on top of the broker: identities, twins, methods, routing.

Everything here runs on the simulator's event loop; other threads reach it through `hub.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from simulator import mqtt_codec as mqtt
from simulator import query as twin_query
from simulator import routes as routing
from simulator import sas, topics
from simulator.broker import Broker, ClientError, ClientIdentity, Session
from simulator.errors import ServiceError
from simulator.feed import Feed
from simulator.fleet import Device, Fleet, twin_body
from simulator.storage import StorageWriter
from simulator.twins import Twin, TwinError, activity_time, desired_delta, etag_matches

log = structlog.get_logger(__name__)

DEFAULT_METHOD_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Identity:
    device_id: str
    module_id: str
    primary_key: str
    secondary_key: str


@dataclass(frozen=True)
class UpstreamMessage:
    """A message a route sent to `$upstream`."""

    device_id: str
    module_id: str
    output: str | None
    message: topics.Message
    received_at: float

    @property
    def body(self) -> bytes:
        return self.message.body

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.message.body)

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "module_id": self.module_id,
            "output": self.output,
            "received_at": self.received_at,
            **self.message.to_json(),
        }


@dataclass(frozen=True)
class HubEvent:
    """Something `watch` shows: kind is upstream, reported, desired, connected, disconnected,
    configuration (created / updated / deleted; no device) or targeting (a device's targeted and
    applied configurations changed; no module)."""

    kind: str
    device_id: str
    module_id: str
    data: Mapping[str, Any] = field(default_factory=dict)
    at: float = 0.0

    @property
    def size(self) -> int:
        """Roughly the bytes it holds: an upstream event carries a whole message body."""
        body = self.data.get("body")
        return len(body) if isinstance(body, str) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device_id": self.device_id,
            "module_id": self.module_id,
            "at": self.at,
            "data": dict(self.data),
        }


@dataclass
class TwinResponseFault:
    status: int | None  # None: answer normally, after the delay
    delay_seconds: float
    remaining: int | None  # None: until cleared


class Faults:
    """Injected failures; mutated only on the simulator loop."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._refuse_until: dict[str, float] = {}
        self.twin: TwinResponseFault | None = None
        self._pubacks_open = asyncio.Event()
        self._pubacks_open.set()

    def refuse(self, client_id: str, seconds: float) -> None:
        self._refuse_until[client_id] = self._monotonic() + seconds

    def refusing(self, client_id: str) -> bool:
        return self._refuse_until.get(client_id, 0.0) > self._monotonic()

    def take_twin_fault(self) -> TwinResponseFault | None:
        fault = self.twin
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self.twin = None
        return fault

    def pause_pubacks(self) -> None:
        self._pubacks_open.clear()

    def resume_pubacks(self) -> None:
        self._pubacks_open.set()

    async def puback_gate(self, _session: Session) -> None:
        await self._pubacks_open.wait()

    def clear(self) -> None:
        self._refuse_until.clear()
        self.twin = None
        self._pubacks_open.set()


class Hub:
    """The IoT Hub (service side) and the edgeHub (device side) of every simulated edge device."""

    def __init__(
        self,
        *,
        hostname: str,
        identities: Mapping[tuple[str, str], Identity],
        twins: Mapping[tuple[str, str], Twin],
        devices: Mapping[str, Device],
        upstream: Feed[UpstreamMessage],
        events: Feed[HubEvent],
        storage: Sequence[StorageWriter] = (),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hostname = hostname
        self.identities = dict(identities)
        self.twins = dict(twins)
        self.upstream = upstream
        self.events = events
        self.storage = tuple(storage)
        self.faults = Faults(monotonic)
        self._clock = clock
        self.fleet = Fleet(
            devices,
            self.twins,
            notify=self._notify_desired,
            event=self._event,
            connected=self.is_connected,
            clock=clock,
        )
        self._broker: Broker | None = None
        self._pending_methods: dict[str, asyncio.Future[tuple[int, Any]]] = {}
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._cursors = twin_query.Cursors()

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the hub has no broker yet")
        return self._broker

    def attach(self, broker: Broker) -> None:
        self._broker = broker

    def start_storage(self) -> None:
        """Start each storage endpoint's batch timer (on the simulator loop)."""
        for writer in self.storage:
            self._spawn(writer.run())

    async def flush_storage(self) -> None:
        """Write every storage endpoint's batches now."""
        for writer in self.storage:
            await writer.flush()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # What is still batched is written, as a hub that stops gracefully would.
        await self.flush_storage()
        for future in self._pending_methods.values():
            future.cancel()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(self, kind: str, device_id: str, module_id: str, data: Mapping[str, Any]) -> None:
        self.events.append(HubEvent(kind, device_id, module_id, data, self._clock()))

    def _session(self, device_id: str, module_id: str) -> Session:
        return self.broker.session(ClientIdentity(device_id, module_id))

    def is_connected(self, device_id: str, module_id: str) -> bool:
        session = self.broker.sessions.get(f"{device_id}/{module_id}")
        return session is not None and session.connected

    # -------------------------------------------------------- device side (BrokerHandler)

    def authenticate(self, connect: mqtt.Connect) -> ClientIdentity | mqtt.ConnackCode:
        device_id, _, module_id = connect.client_id.partition("/")
        identity = self.identities.get((device_id, module_id))
        if connect.username is None or connect.password is None:
            return mqtt.ConnackCode.BAD_USERNAME_OR_PASSWORD
        expected_prefix = f"{self.hostname}/{connect.client_id}/".lower()
        if not connect.username.lower().startswith(expected_prefix):
            log.warning("mqtt_auth_failed", client_id=connect.client_id, reason="bad username")
            return mqtt.ConnackCode.BAD_USERNAME_OR_PASSWORD
        if identity is None:
            log.warning("mqtt_auth_failed", client_id=connect.client_id, reason="unknown identity")
            return mqtt.ConnackCode.NOT_AUTHORIZED
        resource = f"{self.hostname}/devices/{device_id}/modules/{module_id}"
        verdict = sas.Verdict.MALFORMED
        for key in (identity.primary_key, identity.secondary_key):
            verdict = sas.verify(connect.password, resource=resource, key=key, now=self._clock())
            if verdict is not sas.Verdict.BAD_SIGNATURE:
                break
        if verdict is not sas.Verdict.VALID:
            log.warning("mqtt_auth_failed", client_id=connect.client_id, reason=verdict.value)
            return mqtt.ConnackCode.NOT_AUTHORIZED
        if self.faults.refusing(connect.client_id):
            log.warning("mqtt_auth_failed", client_id=connect.client_id, reason="fault injected")
            return mqtt.ConnackCode.SERVER_UNAVAILABLE
        return ClientIdentity(device_id, module_id)

    def on_connection_change(self, session: Session, connected: bool) -> None:
        identity = session.identity
        kind = "connected" if connected else "disconnected"
        self._event(kind, identity.device_id, identity.module_id, {})

    async def on_publish(self, session: Session, publish: mqtt.Publish) -> None:
        identity = session.identity
        try:
            request = topics.parse_client_topic(
                publish.topic, publish.payload, identity.device_id, identity.module_id
            )
        except topics.TopicError as exc:
            raise ClientError(f"{exc}: {publish.topic[:200]!r}") from exc
        match request:
            case topics.Telemetry(message):
                if message.size > topics.MAX_MESSAGE_BYTES:
                    raise ClientError(f"message of {message.size} bytes exceeds 256 KB")
                self.route(message)
            case topics.TwinGet(request_id):
                twin = self.twins[(identity.device_id, identity.module_id)]
                self._answer_twin(session, 200, request_id, None, twin.device_document())
            case topics.TwinReportedPatch(request_id):
                self._patch_reported(session, request_id, publish.payload)
            case topics.MethodResponse(request_id, status):
                self._method_answered(request_id, status, publish.payload)

    def _answer_twin(
        self,
        session: Session,
        status: int,
        request_id: str,
        version: int | None,
        body: Mapping[str, Any] | None,
    ) -> None:
        fault = self.faults.take_twin_fault()
        if fault is not None and fault.status is not None:
            status, version, body = fault.status, None, {"message": "fault injected"}
        topic = topics.twin_response_topic(status, request_id, version)
        payload = b"" if body is None else json.dumps(body).encode()
        if fault is None or fault.delay_seconds <= 0:
            session.deliver(topic, payload)
            return

        async def later(delay: float) -> None:
            await asyncio.sleep(delay)
            session.deliver(topic, payload)

        self._spawn(later(fault.delay_seconds))

    def _patch_reported(self, session: Session, request_id: str, payload: bytes) -> None:
        key = (session.identity.device_id, session.identity.module_id)
        try:
            patch = json.loads(payload)
            twin = replace(
                self.twins[key].patch_reported(patch),
                last_activity_time=activity_time(self._clock()),
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning(
                "twin_reported_refused", client_id=session.identity.client_id, reason="json"
            )
            self._answer_twin(session, 400, request_id, None, {"message": "invalid JSON"})
            return
        except TwinError as exc:
            log.warning(
                "twin_reported_refused", client_id=session.identity.client_id, reason=str(exc)
            )
            self._answer_twin(session, exc.status, request_id, None, {"message": str(exc)})
            return
        self.twins[key] = twin
        self._answer_twin(session, 204, request_id, twin.reported_version, None)
        self._event("reported", *key, {"patch": patch, "$version": twin.reported_version})

    # -------------------------------------------------------- routing

    def route(self, message: topics.Message) -> None:
        """Send a module's message wherever the routes take it (nowhere if none does)."""
        device_id = message.system.get("connectionDeviceId", "")
        module_id = message.system.get("connectionModuleId", "")
        device = self.fleet.devices.get(device_id)
        if device is None:
            return
        for route in routing.routes_for(device.routes, message):
            match route.sink:
                case routing.Upstream():
                    upstream = UpstreamMessage(
                        device_id,
                        module_id,
                        message.system.get("outputName"),
                        message,
                        self._clock(),
                    )
                    self.upstream.append(upstream)
                    self._event("upstream", device_id, module_id, upstream.to_json())
                    if self.storage:  # the twin document is only for storage routes
                        twin = self.fleet.device_document(device_id, copied=False)
                        for writer in self.storage:
                            if writer.add(message, twin):
                                self._spawn(writer.flush(full_only=True))
                case routing.ModuleInput(target, input_name):
                    self.deliver_to_input(
                        device_id, target, input_name, message, ttl_seconds=route.ttl_seconds
                    )

    def deliver_to_input(
        self,
        device_id: str,
        module_id: str,
        input_name: str,
        message: topics.Message,
        *,
        ttl_seconds: float = routing.DEFAULT_TTL_SECONDS,
    ) -> None:
        """Queue `message` for a module input; it waits up to `ttl_seconds` for the module."""
        if (device_id, module_id) not in self.identities:
            log.warning("route_target_unknown", device_id=device_id, module_id=module_id)
            return
        topic = topics.input_topic(device_id, module_id, input_name, message)
        self._session(device_id, module_id).deliver(
            topic, message.body, store_and_forward=True, ttl_seconds=ttl_seconds
        )

    # -------------------------------------------------------- service side

    def twin(self, device_id: str, module_id: str) -> Twin:
        try:
            return self.twins[(device_id, module_id)]
        except KeyError:
            raise ServiceError(404, "ModuleNotFound", "no such module") from None

    def service_twin(self, device_id: str, module_id: str) -> dict[str, Any]:
        self.twin(device_id, module_id)
        return self.fleet.module_document(device_id, module_id)

    def update_twin(
        self, device_id: str, module_id: str, body: object, if_match: str | None, *, replace: bool
    ) -> dict[str, Any]:
        twin = self.twin(device_id, module_id)
        if not etag_matches(if_match, twin):
            raise ServiceError(412, "PreconditionFailed", "etag does not match")
        desired, tags = twin_body(body)
        try:
            if self.fleet.device(device_id).applied:
                self._update_shaped_twin(twin, desired, tags, replace=replace)
            else:
                self._update_twin(twin, desired, tags, replace=replace)
        except TwinError as exc:
            raise ServiceError(exc.status, "ArgumentInvalid", str(exc)) from exc
        return self.service_twin(device_id, module_id)

    def _update_twin(
        self,
        twin: Twin,
        desired: Mapping[str, Any],
        tags: Mapping[str, Any] | None,
        *,
        replace: bool,
    ) -> None:
        """No configuration shapes the device: the write goes to the twin as it was sent."""
        if replace:
            updated = twin.replace_desired_and_tags(desired, tags or {})
            patch = desired_delta(twin.desired, updated.desired)
        else:
            updated = twin.patch_tags(tags) if tags else twin
            patch = dict(desired)
            if desired:
                updated = updated.patch_desired(desired)
        key = (twin.device_id, twin.module_id)
        self.twins[key] = updated
        self.fleet.device(twin.device_id).own[twin.module_id] = updated.desired
        if updated.desired_version != twin.desired_version:
            self._notify_desired(*key, patch, updated.desired_version)

    def _update_shaped_twin(
        self,
        twin: Twin,
        desired: Mapping[str, Any],
        tags: Mapping[str, Any] | None,
        *,
        replace: bool,
    ) -> None:
        """Configurations shape the device: the write changes the device's own content, and
        the layers are applied over it again."""
        device = self.fleet.device(twin.device_id)
        own = Twin(twin.device_id, twin.module_id, desired=device.own.get(twin.module_id, {}))
        if replace:
            own = own.replace_desired_and_tags(desired, {})
            tagged = twin.with_tags(tags or {})
        else:
            own = own.patch_desired(desired) if desired else own
            tagged = twin.patch_tags(tags) if tags else twin
        self.twins[(twin.device_id, twin.module_id)] = tagged
        device.own[twin.module_id] = own.desired
        self.fleet.evaluate(device)

    def _notify_desired(
        self, device_id: str, module_id: str, patch: Mapping[str, Any], version: int
    ) -> None:
        self._event("desired", device_id, module_id, {"patch": dict(patch), "$version": version})
        payload = topics.desired_patch_payload(patch, version)
        self._session(device_id, module_id).deliver(topics.desired_patch_topic(version), payload)

    async def invoke_method(
        self,
        device_id: str,
        module_id: str,
        method_name: str,
        payload: Any,
        timeout_seconds: float,
        *,
        connect_timeout_seconds: float = 0.0,
    ) -> tuple[int, Any]:
        """(status the module answered, its payload); 404 if it is offline (for longer than
        `connect_timeout_seconds`, as IoT Hub waits), 504 if it answers too late."""
        self.twin(device_id, module_id)
        request_id = format(next(self._request_ids), "x")
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        topic = topics.method_request_topic(method_name, request_id)
        session = self._session(device_id, module_id)
        await self._wait_for_method_subscriber(session, topic, connect_timeout_seconds)
        self._pending_methods[request_id] = future
        try:
            if not session.deliver(topic, json.dumps(payload).encode()):
                raise ServiceError(404, "DeviceNotOnline", "module not connected or not subscribed")
            try:
                async with asyncio.timeout(timeout_seconds):
                    return await future
            except TimeoutError:
                raise ServiceError(504, "GatewayTimeout", "module did not answer in time") from None
        finally:
            self._pending_methods.pop(request_id, None)

    @staticmethod
    async def _wait_for_method_subscriber(session: Session, topic: str, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while not (session.connected and session.subscription_qos(topic) is not None):
            if asyncio.get_running_loop().time() >= deadline:
                return
            # Polled: connecting and subscribing are separate packets, and this wait is rare.
            await asyncio.sleep(0.05)

    def _method_answered(self, request_id: str, status: int, payload: bytes) -> None:
        future = self._pending_methods.get(request_id)
        if future is None or future.done():
            log.info("method_response_unmatched", request_id=request_id)
            return
        try:
            body: Any = json.loads(payload) if payload else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = payload.decode("utf-8", "replace")
        future.set_result((status, body))

    def query(
        self, text: str, continuation: str | None, max_items: int
    ) -> tuple[list[Mapping[str, object]], str | None, str]:
        """(one page of rows, the next page's token, x-ms-item-type)."""
        try:
            parsed = twin_query.parse_query(text)
            items, token = self._cursors.page(
                lambda: self.fleet.query(parsed), continuation, max_items
            )
        except twin_query.QueryError as exc:
            raise ServiceError(400, "BadRequest", str(exc)) from exc
        # Rows of a projection or an aggregate are plain JSON, not twins.
        plain = bool(parsed.projections) or parsed.count_alias is not None
        return items, token, "json" if plain else "twin"
