"""The IoT Edge module: the agent's twin, routes, direct methods and telemetry over edgeHub.

azure-iot-device runs our handlers on its own threads; each handler only hands its item to
the event loop (`call_soon_threadsafe`), and everything else happens on the loop. Every SDK
call has a timeout. A hub that stays unreachable past `offline_budget_s` makes the process exit
non-zero, so the IoT Edge runtime restarts it (the SDK is known to wedge after some outages).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import psutil
import structlog
from azure.iot.device import Message, MethodRequest, MethodResponse
from azure.iot.device.aio import IoTHubModuleClient
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import agent
from agent.app import App
from agent.observation.drift import PROFILE_SCHEMA
from agent.observation.profile import live_profile, take_snapshot, window_profile
from agent.observation.watch import ALERT_SCHEMA, Sinks
from agent.reasons import Reason
from agent.releases.lifecycle import ModelState, ModelStatus, SwapError
from agent.serving.contract import RequestError
from agent.serving.protocol import decode_infer_request, encode_infer_response
from agent.standalone import Agent
from agent.ticks import ticks
from module.desired import Apply, DesiredState, Ignore, Reconciler, Reject, describe
from module.feedback import FEEDBACK_INPUT, parse_feedback
from module.outbox import OutboundMessage, Outbox
from module.reported import ReportedProperties
from module.settings import ModuleSettings

log = structlog.get_logger(__name__)
T = TypeVar("T")

INFER_INPUT = "infer"
PREDICTIONS = "predictions"
TELEMETRY = "telemetry"
ALERTS = "alerts"
MAX_ROUTE_MESSAGE_BYTES = 255 * 1024  # IoT Hub's 256 KB, less room for the properties
ALERT_STATES = frozenset({ModelState.REJECTED, ModelState.FAILED, ModelState.ROLLED_BACK})

ClientFactory = Callable[[], IoTHubModuleClient]
_Event = tuple[Literal["patch", "connection", "method", "resync"], Any]
RESYNC_RETRY_S = (1.0, 30.0)  # first and longest delay before reading the twin again


class RollbackPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, min_length=1, max_length=63)


class ProfilePayload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    seconds: float = Field(5.0, gt=0.0, le=30.0)


class StatusPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _ModuleMetrics:
    def __init__(self, agent_: Agent) -> None:
        registry = agent_.registry
        self.connection_changes = Counter(
            "agent_hub_connection_changes",
            "Connection state changes of the hub client.",
            ["state"],
            registry=registry,
        )
        self.connected = Gauge(
            "agent_hub_connected", "1 while the hub client is connected.", registry=registry
        )
        self.route_messages = Counter(
            "agent_route_messages",
            "Messages on the infer input, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.desired = Counter(
            "agent_desired_updates",
            "Desired-property documents, by what was done with them.",
            ["action"],
            registry=registry,
        )
        self.methods = Counter(
            "agent_direct_methods",
            "Direct method calls, by method and status.",
            ["method", "status"],
            registry=registry,
        )
        self.sdk_timeouts = Counter(
            "agent_hub_call_timeouts", "SDK calls that timed out.", registry=registry
        )


class EdgeModule:
    """Service: the hub client and everything that flows through it."""

    def __init__(
        self,
        agent_: Agent,
        settings: ModuleSettings,
        *,
        client_factory: ClientFactory = IoTHubModuleClient.create_from_edge_environment,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if agent_.manager is None:
            raise ValueError("the IoT Edge module needs the managed mode (no --model file)")
        self.name = "edge-module"
        self.app: App | None = None  # set by the entry point: an unrecoverable hub fails it
        self._agent = agent_
        self._manager = agent_.manager
        self._settings = settings
        self._client_factory = client_factory
        self._clock = clock
        self._metrics = _ModuleMetrics(agent_)
        self._client: IoTHubModuleClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._messages: asyncio.Queue[Message] = asyncio.Queue(settings.max_queued_messages)
        self._route_slots = asyncio.Semaphore(settings.max_route_in_flight)
        self._route_tasks: set[asyncio.Task[None]] = set()
        self._outbox_task: asyncio.Task[None] | None = None
        # Unique per message without a uuid4 each: os.urandom releases the GIL, and on the
        # route's hot path the SDK's threads then hold the loop up.
        self._prediction_ids = (f"{uuid.uuid4().hex}-{n}" for n in itertools.count())
        self._senders: list[asyncio.Task[None]] = []
        self._accepting = True
        self._connected = False
        self._offline_since: float | None = clock()
        self._reconciler = Reconciler()
        self._resync_retry: asyncio.TimerHandle | None = None
        self._resync_delay = RESYNC_RETRY_S[0]
        self._desired = DesiredState()
        self._telemetry_changed = asyncio.Event()
        self._started = datetime.now(UTC).isoformat()
        self.reported = ReportedProperties(self._send_reported, timeout_s=settings.call_timeout_s)
        self.outbox = Outbox(
            self._send_outbound,
            settings.spool_dir or agent_.settings.store.state_dir / "spool",
            registry=agent_.registry,
            send_timeout_s=settings.call_timeout_s,
        )
        self._manager.add_listener(self._on_model_status)
        self._observer = agent_.observer
        self._observer.sinks = Sinks(profile=self._drift_profile, alert=self._drift_alert)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = await asyncio.to_thread(self._client_factory)
        # The SDK's handler setters block until its handler thread runs: not on our loop.
        await asyncio.to_thread(self._install_handlers, self._client)
        # `stopped: null` removes what the previous run reported when it stopped.
        self.reported.update(
            {"agent": {"version": agent.__version__, "started": self._started, "stopped": None}}
        )

    def _install_handlers(self, client: IoTHubModuleClient) -> None:
        client.on_twin_desired_properties_patch_received = self._sdk_patch
        client.on_message_received = self._sdk_message
        client.on_method_request_received = self._sdk_method
        client.on_connection_state_change = self._sdk_connection

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._connect_until_up())
            group.create_task(self._control_loop())
            group.create_task(self._route_loop())
            self._senders = [
                group.create_task(self.reported.run()),
                group.create_task(self.outbox.run()),
            ]
            group.create_task(self._telemetry_loop())
            group.create_task(self._watch_connection())

    async def stop(self, grace_s: float) -> None:
        """Stop taking route messages, finish those in flight, report, hand over to the spool."""
        self._accepting = False
        deadline = self._clock() + grace_s
        if self._resync_retry is not None:
            self._resync_retry.cancel()
        # The App stops services before it cancels their runs, but `flush` and `drain` send
        # by themselves: the senders' loops end first (one patch, one message in flight).
        for task in self._senders:
            task.cancel("module stopping")
        if self._senders:
            await asyncio.wait(self._senders, timeout=max(grace_s / 4, 0.1))
        if self._route_tasks:
            await asyncio.wait(list(self._route_tasks), timeout=max(grace_s / 2, 0.1))
        self.reported.update({"agent": {"stopped": datetime.now(UTC).isoformat()}})
        remaining = max(deadline - self._clock(), 0.1)
        if self._connected:
            await self.reported.flush(remaining / 2)
        if self._outbox_task is not None:  # drain() takes over from the sender task
            self._outbox_task.cancel("module stopping")
            await asyncio.gather(self._outbox_task, return_exceptions=True)
        await self.outbox.drain(max(deadline - self._clock(), 0.1) / 2)
        client, self._client = self._client, None
        if client is not None:
            try:
                async with asyncio.timeout(max(deadline - self._clock(), 0.5)):
                    await client.shutdown()
            except (TimeoutError, Exception) as error:  # the process is leaving anyway
                log.warning("hub_shutdown_failed", error=str(error))

    # -- SDK threads -> loop ---------------------------------------------------------

    def _hand_over(self, event: _Event) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def _sdk_patch(self, patch: dict[str, Any]) -> None:
        self._hand_over(("patch", patch))

    def _sdk_method(self, request: MethodRequest) -> None:
        self._hand_over(("method", request))

    def _sdk_connection(self, _unused: None = None) -> None:
        client = self._client
        self._hand_over(("connection", bool(client is not None and client.connected)))

    def _sdk_message(self, message: Message) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._enqueue_message, message)

    def _enqueue_message(self, message: Message) -> None:
        try:
            self._messages.put_nowait(message)
        except asyncio.QueueFull:
            self._metrics.route_messages.labels("dropped_overload").inc()

    # -- connection ------------------------------------------------------------------

    async def _connect_until_up(self) -> None:
        """The first connect (the SDK reconnects by itself afterwards)."""
        assert self._client is not None
        delay = 1.0
        while True:
            try:
                await self._call(self._client.connect())
            except Exception as error:  # the hub may be down at boot: serve anyway, retry
                log.warning("hub_connect_failed", error=str(error), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            await self._on_connection(connected=True)
            return

    async def _on_connection(self, *, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        self._metrics.connected.set(1 if connected else 0)
        self._metrics.connection_changes.labels("connected" if connected else "lost").inc()
        log.info("hub_connection", connected=connected)
        if connected:
            self._offline_since = None
            await self._resync()
            self.reported.retry_now()
        else:
            self._offline_since = self._clock()

    async def _watch_connection(self) -> None:
        budget = self._settings.offline_budget_s
        async for _ in ticks(min(5.0, budget / 2)):
            since = self._offline_since
            if since is not None and self._clock() - since > budget and self.app is not None:
                self.app.fail(f"hub unreachable for over {budget:.0f} s")
                return

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._settings.call_timeout_s):
                return await awaitable
        except TimeoutError:
            self._metrics.sdk_timeouts.inc()
            raise

    # -- desired properties ------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            kind, item = await self._events.get()
            try:
                if kind == "patch":
                    await self._on_patch(item)
                elif kind == "connection":
                    await self._on_connection(connected=bool(item))
                elif kind == "resync":
                    if self._connected:  # else the reconnect reads the twin anyway
                        await self._resync()
                else:
                    task = asyncio.get_running_loop().create_task(self._on_method(item))
                    self._route_tasks.add(task)
                    task.add_done_callback(self._route_tasks.discard)
            except Exception:  # one bad event must not stop the module
                log.exception("control_event_failed", kind=kind)

    async def _resync(self) -> None:
        """Promise 1: on every (re)connect, GET the full twin and apply its desired part."""
        assert self._client is not None
        try:
            twin = await self._call(self._client.get_twin())
        except Exception as error:  # reconnecting: the next connection event tries again
            # Patches missed while offline would stay unapplied until the next patch came:
            # read again after a back-off (promise 1).
            log.warning("twin_get_failed", error=str(error), retry_s=self._resync_delay)
            self._schedule_resync()
            return
        self._resync_delay = RESYNC_RETRY_S[0]
        desired = twin.get("desired", {}) if isinstance(twin, dict) else {}
        self._reconciler, action = self._reconciler.full(desired)
        self._act(action)

    def _schedule_resync(self) -> None:
        if self._resync_retry is not None:
            return  # one retry pending is enough
        assert self._loop is not None
        self._resync_retry = self._loop.call_later(self._resync_delay, self._resync_due)
        self._resync_delay = min(self._resync_delay * 2, RESYNC_RETRY_S[1])

    def _resync_due(self) -> None:
        self._resync_retry = None
        self._events.put_nowait(("resync", None))

    async def _on_patch(self, patch: Any) -> None:
        if not isinstance(patch, dict):
            self._act(Reject(self._reconciler.version, "desired patch is not an object"))
            return
        version = patch.get("$version")
        # The SDK runs handlers on a thread pool, so patches can arrive out of order; a gap in
        # versions means a patch is missing or late, and merging past it would lose it.
        if isinstance(version, int) and version > self._reconciler.version + 1:
            await self._resync()
            return
        self._reconciler, action = self._reconciler.patch(patch)
        self._act(action)

    def _act(self, action: Apply | Reject | Ignore) -> None:
        if isinstance(action, Ignore):
            self._metrics.desired.labels("ignored").inc()
            return
        if isinstance(action, Reject):
            self._metrics.desired.labels("rejected").inc()
            log.warning("desired_rejected", version=action.version, error=action.message)
            self.reported.update(
                {
                    "desired": {
                        "version": action.version,
                        "state": "rejected",
                        "message": action.message,
                    }
                }
            )
            self._alert("desired_rejected", {"version": action.version, "message": action.message})
            return
        self._metrics.desired.labels("applied").inc()
        if action.state.telemetry != self._desired.telemetry:
            self._telemetry_changed.set()
        if action.state.drift != self._desired.drift:
            self._observer.configure(action.state.drift)
        self._desired = action.state
        self.reported.update(
            {"desired": {"version": action.version, "state": "applied", "message": None}}
        )
        if action.model_changed and action.state.model is not None:
            self._manager.submit(action.state.model)

    # -- model status -> reported properties and alerts ----------------------------------

    def _on_model_status(self, status: ModelStatus) -> None:
        report = self._model_report(status)
        self.reported.update({"model": report})
        if status.state in ALERT_STATES:
            self._alert(f"model_{status.state.value}", status.to_json())

    def _model_report(self, status: ModelStatus) -> dict[str, Any]:
        """The reported entry of a model: its release status, and the drift and quality of
        the release that serves it."""
        return status.to_json() | (self._observer.reported(status.name) or {})

    # -- drift: window profiles out as telemetry, state changes as alerts and reported ----

    def _drift_profile(self, message: dict[str, Any]) -> None:
        self.outbox.put(TELEMETRY, message, PROFILE_SCHEMA)

    def _drift_alert(self, message: dict[str, Any]) -> None:
        self.outbox.put(ALERTS, message, ALERT_SCHEMA)
        status = self._manager.statuses.get(str(message["model"]))
        if status is not None:
            self.reported.update({"model": self._model_report(status)})

    def _alert(self, kind: str, details: dict[str, Any]) -> None:
        self.outbox.put(
            ALERTS,
            {"kind": kind, "at": datetime.now(UTC).isoformat(), "details": details},
            "agent-alert/1",
        )

    async def _send_reported(self, patch: dict[str, Any]) -> None:
        client = self._client
        if client is None or not self._connected:
            raise ConnectionError("hub not connected")
        await self._call(client.patch_twin_reported_properties(patch))

    async def _send_outbound(self, outbound: OutboundMessage) -> None:
        client = self._client
        if client is None or not self._connected:
            raise ConnectionError("hub not connected")
        message = _json_message(outbound.body, outbound.message_id, outbound.schema)
        await self._call(client.send_message_to_output(message, outbound.output))

    # -- telemetry -----------------------------------------------------------------------

    async def _telemetry_loop(self) -> None:
        while True:
            settings = self._desired.telemetry
            self._telemetry_changed.clear()
            if not settings.enabled:
                await self._telemetry_changed.wait()
                continue
            # A new interval takes effect at once, not at the old interval's next tick (which
            # could be a day away).
            emitter = asyncio.ensure_future(self._emit_telemetry(settings.interval_s))
            waiter = asyncio.ensure_future(self._telemetry_changed.wait())
            try:
                await asyncio.wait({emitter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                emitter.cancel()
                waiter.cancel()
                await asyncio.gather(emitter, waiter, return_exceptions=True)
            if emitter.done() and not emitter.cancelled():
                emitter.result()  # re-raises what the emitter died of

    async def _emit_telemetry(self, interval_s: float) -> None:
        process = psutil.Process()
        metrics = self._agent.metrics
        before = take_snapshot(metrics, process)
        async for _ in ticks(interval_s):
            after = take_snapshot(metrics, process)
            self.outbox.put(
                TELEMETRY,
                {
                    "at": datetime.now(UTC).isoformat(),
                    "models": {
                        name: {"version": s.version, "state": s.state.value}
                        for name, s in self._manager.statuses.items()
                    },
                    "inference": window_profile(before, after, metrics.total.bounds),
                },
                "agent-telemetry/1",
            )
            before = after

    # -- routes --------------------------------------------------------------------------

    async def _route_loop(self) -> None:
        while True:
            message = await self._messages.get()
            if not self._accepting:
                self._metrics.route_messages.labels("dropped_stopping").inc()
                continue
            if message.input_name == FEEDBACK_INPUT:
                self._on_feedback(message)
                continue
            if message.input_name != INFER_INPUT:
                self._metrics.route_messages.labels("unknown_input").inc()
                log.warning("unknown_input", input=message.input_name)
                continue
            await self._route_slots.acquire()
            task = asyncio.get_running_loop().create_task(self._infer_message(message))
            self._route_tasks.add(task)
            task.add_done_callback(self._route_done)

    def _on_feedback(self, message: Message) -> None:
        body = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        try:
            items = parse_feedback(body)
        except ValueError as error:
            self._metrics.route_messages.labels("bad_feedback").inc()
            log.warning("feedback_rejected", error=str(error))
            return
        for item in items:
            self._observer.feedback(item.id, item.labels)
        self._metrics.route_messages.labels("feedback").inc()

    def _route_done(self, task: asyncio.Task[None]) -> None:
        self._route_tasks.discard(task)
        self._route_slots.release()

    async def _infer_message(self, message: Message) -> None:
        correlation = message.correlation_id or message.message_id
        try:
            payload = await self._predict(message)
            schema, outcome = "oip-v2-response/1", "ok"
        except RequestError as error:
            payload = json.dumps({"error": error.message}).encode()
            schema, outcome = "oip-v2-error/1", "error"
        except Exception:  # a failure of ours: answered, logged, never a crash
            log.exception("route_inference_failed")
            payload = json.dumps({"error": "inference failed; see the agent log"}).encode()
            schema, outcome = "oip-v2-error/1", "failed"
        self._metrics.route_messages.labels(outcome).inc()
        await self._send_prediction(payload, schema, correlation)

    async def _predict(self, message: Message) -> bytes:
        """The v2 response to one route message, or `RequestError` saying what was wrong."""
        body = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        request = decode_infer_request(body, max_input_bytes=self._settings.max_input_bytes)
        # Routes carry JSON only: binary outputs would need the HTTP header extension.
        request = dataclasses.replace(
            request,
            outputs=tuple(dataclasses.replace(o, binary_data=False) for o in request.outputs),
            parameters={k: v for k, v in request.parameters.items() if k != "binary_data_output"},
        )
        name = self._model_for(message)
        service = self._agent.services.get(name) if name else None
        if service is None:
            raise RequestError(Reason.UNKNOWN_MODEL, f"no model {name!r} is served here")
        version, outputs = await service.infer_versioned(
            request.inputs,
            request.output_names,
            request_id=message.correlation_id or message.message_id,
        )
        payload = encode_infer_response(
            model_name=service.name,
            model_version=version,
            request=request,
            outputs=outputs,
        ).body
        if len(payload) > MAX_ROUTE_MESSAGE_BYTES:
            raise RequestError(
                Reason.TOO_LARGE,
                f"the response is {len(payload)} bytes, over a route message's 256 KB; "
                "ask for fewer rows or use HTTP",
            )
        return payload

    def _model_for(self, message: Message) -> str | None:
        """The `model` message property, else the twin's model, else the only one served."""
        named = message.custom_properties.get("model")
        if isinstance(named, str) and named:
            return named
        return self._default_model()

    async def _send_prediction(self, payload: bytes, schema: str, correlation: str | None) -> None:
        client = self._client
        if client is None:
            self._metrics.route_messages.labels("reply_failed").inc()
            return
        message = _json_message(payload, next(self._prediction_ids), schema)
        message.correlation_id = correlation
        try:
            await self._call(client.send_message_to_output(message, PREDICTIONS))
        except Exception as error:  # the requester times out and retries on its side
            self._metrics.route_messages.labels("reply_failed").inc()
            log.warning("prediction_send_failed", error=str(error), correlation_id=correlation)

    # -- direct methods --------------------------------------------------------------------

    async def _on_method(self, request: MethodRequest) -> None:
        status, payload = await self._method_result(request.name, request.payload)
        self._metrics.methods.labels(
            request.name if request.name in {"status", "rollback", "profile"} else "unknown",
            str(status),
        ).inc()
        client = self._client
        if client is None:
            return
        response = MethodResponse.create_from_method_request(request, status, payload)
        try:
            await self._call(client.send_method_response(response))
        except Exception as error:  # the caller sees a timeout; nothing else to do
            log.warning("method_response_failed", method=request.name, error=str(error))

    async def _method_result(self, name: str, raw: Any) -> tuple[int, Any]:
        handlers: dict[str, Callable[[Any], Awaitable[tuple[int, Any]]]] = {
            "status": self._method_status,
            "rollback": self._method_rollback,
            "profile": self._method_profile,
        }
        handler = handlers.get(name)
        if handler is None:
            return 404, {"error": f"unknown method {name!r}; this module has {sorted(handlers)}"}
        try:
            # azure-iot-hub's invoke_device_module_method sends "" for "no payload".
            return await handler({} if raw is None or raw == "" else raw)
        except ValidationError as error:
            return 400, {"error": f"bad {name} payload: {describe(error, root='payload')}"}
        except SwapError as error:
            return 409, {"error": error.message, "reason": error.reason.value}

    async def _method_status(self, payload: Any) -> tuple[int, Any]:
        StatusPayload.model_validate(payload)
        return 200, self.status()

    async def _method_rollback(self, payload: Any) -> tuple[int, Any]:
        target = RollbackPayload.model_validate(payload).model or self._default_model()
        if target is None:
            return 400, {"error": 'no model to roll back: name one with {"model": ...}'}
        return 200, (await self._manager.rollback(target)).to_json()

    async def _method_profile(self, payload: Any) -> tuple[int, Any]:
        seconds = ProfilePayload.model_validate(payload).seconds
        return 200, await live_profile(self._agent.metrics, seconds)

    def _default_model(self) -> str | None:
        desired = self._desired.model
        if desired is not None and isinstance(desired.get("name"), str):
            return str(desired["name"])
        names = list(self._agent.services)
        return names[0] if len(names) == 1 else None

    def status(self) -> dict[str, Any]:
        return {
            "agent": {"version": agent.__version__, "started": self._started},
            "hub_connected": self._connected,
            "ready": bool(self._agent.services)
            and all(s.ready for s in self._agent.services.values()),
            "models": {name: s.to_json() for name, s in self._manager.statuses.items()},
            "desired_version": self._reconciler.version,
            "outbox": {"queued": self.outbox.queued, "spooled": self.outbox.spooled},
        }


def _json_message(body: bytes, message_id: str, schema: str) -> Message:
    message: Message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        body, message_id=message_id, content_encoding="utf-8", content_type="application/json"
    )
    message.custom_properties["schema"] = schema
    return message
