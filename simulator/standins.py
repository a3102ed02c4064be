"""Agent stand-ins: many light MQTT clients that follow the agent's reported-state protocol.

A stand-in connects as a module of one device, reads its twin, and for every manifest under
``properties.desired.models`` newer than what it runs reports what the agent reports, built with
the agent's own wire models (``models.<name>``, a ``wire.reported.ModelEntry``): ``active`` with
probation ``watching``, then ``passed`` after ``probation_s`` -- or, for a sha256 listed in
``failing``, probation ``failed`` and ``rolled_back`` to the previous release, or, for one
listed in ``quiet`` (a device that sees no traffic), ``passed_without_traffic``. A model that
leaves the desired ``models`` loses its reported entry (the agent stops serving it). It answers
the ``rollback`` direct method like the agent. It does not load models: a fleet of a thousand
fits in one thread. ``check`` (optional) runs on each manifest first, e.g. a signature check or
a download; an exception there is reported as ``failed``.

For fleet-scale tests and benchmarks of cloud-side code; it never replaces the agent's own tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import structlog

from simulator import mqtt_codec as mqtt
from simulator.twins import merge_patch
from wire.reasons import Reason
from wire.reported import DriftEntry, ModelEntry, ProbationEntry, to_twin
from wire.states import DriftState, ModelState, ProbationState

log = structlog.get_logger(__name__)

Check = Callable[[Mapping[str, Any]], None]
TokenFor = Callable[[str, str, int], str]  # (device, module, expiry) -> SAS token
_API = "api-version=2019-10-01"
KEEP_ALIVE_S = 240  # the MQTT keep-alive: a ping every half of it keeps an idle stand-in on


# The agent's reasons for what a stand-in plays.
CHECK_FAILED: Final = Reason.FETCH_FAILED  # a failed check stands for any install that failed
PROBATION_FAILED: Final = Reason.PROBATION_ERRORS
ROLLBACK_REQUESTED: Final = Reason.REQUESTED
REASONS: Final = frozenset({CHECK_FAILED, PROBATION_FAILED, ROLLBACK_REQUESTED})


def _probation(
    state: ProbationState,
    requests: int,
    error_rate: float,
    p99_ratio: float | None,
    left_s: float = 0.0,
) -> ProbationEntry:
    """A probation section; `until` is when it ends (or ended)."""
    return ProbationEntry(
        state=state,
        requests=requests,
        error_rate=error_rate,
        p99_ratio=p99_ratio,
        until=datetime.now(UTC) + timedelta(seconds=left_s),
    )


@dataclass
class _Model:
    version: int = 0
    sha256: str = ""
    previous: tuple[int, str] | None = None  # the last release that passed probation


@dataclass
class StandIn:
    """One module of one device."""

    device_id: str
    module_id: str
    probation_s: float
    failing: Collection[str]
    check: Check | None
    quiet: Collection[str] = ()  # sha256s whose probation sees no traffic
    models: dict[str, _Model] = field(default_factory=dict)
    entries: set[str] = field(default_factory=set)  # names with a reported entry
    desired: dict[str, Any] = field(default_factory=dict)
    _writer: asyncio.StreamWriter | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # ------------------------------------------------------------ wire

    def _send(self, packet: mqtt.Packet) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(mqtt.encode(packet))

    def _publish(self, topic: str, body: Mapping[str, Any] | None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self._send(mqtt.Publish(topic, payload, qos=0))

    def report(self, name: str, entry: ModelEntry) -> ModelEntry:
        """Report what changed of `name`'s entry: the fields `entry` sets, and `since`."""
        stamped = entry.model_copy(update={"since": datetime.now(UTC)})
        self._patch_reported({"models": {name: to_twin(stamped)}})
        self.entries.add(name)
        return stamped

    def remove(self, name: str) -> None:
        self._patch_reported({"models": {name: None}})
        self.entries.discard(name)

    def _patch_reported(self, patch: Mapping[str, Any]) -> None:
        self._publish(f"$iothub/twin/PATCH/properties/reported/?$rid={next(self._ids)}", patch)

    # ------------------------------------------------------------ protocol

    def on_desired(self, desired: Mapping[str, Any]) -> None:
        models = desired.get("models")
        wanted = models if isinstance(models, Mapping) else {}
        for name, manifest in wanted.items():
            if isinstance(manifest, Mapping):
                self._consider(str(name), manifest)
        for name in sorted(self.entries - set(wanted)):
            self.remove(name)

    def _consider(self, name: str, manifest: Mapping[str, Any]) -> None:
        version, sha256 = manifest.get("version"), manifest.get("sha256")
        if not isinstance(version, int) or not isinstance(sha256, str):
            return
        model = self.models.setdefault(name, _Model())
        if version < model.version or (version == model.version and name in self.entries):
            return  # versions never go backwards; the same release is a replay
        if self.check is not None:
            try:
                self.check(manifest)
            except Exception as error:  # any failed check is a failed release, as on a device
                model.version = version
                self.report(
                    name,
                    ModelEntry(
                        version=version,
                        sha256=sha256,
                        state=ModelState.FAILED,
                        reason=CHECK_FAILED,
                        message=str(error)[:200],
                    ),
                )
                return
        model.version, model.sha256 = version, sha256
        self.report(
            name,
            ModelEntry(
                version=version,
                sha256=sha256,
                state=ModelState.ACTIVE,
                reason=None,
                message="",
                # As the agent does, a release that starts serving gets a fresh drift watch.
                drift=DriftEntry(
                    version=version,
                    state=DriftState.OK if manifest.get("baseline") else DriftState.NO_BASELINE,
                ),
                probation=_probation(ProbationState.WATCHING, 0, 0.0, None, self.probation_s),
            ),
        )
        task = asyncio.get_running_loop().create_task(self._judge(name, version, sha256))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _judge(self, name: str, version: int, sha256: str) -> None:
        await asyncio.sleep(self.probation_s)
        model = self.models[name]
        if model.version != version or name not in self.entries:
            return
        if sha256 in self.failing:
            self.report(
                name,
                ModelEntry(
                    version=version,
                    sha256=sha256,
                    state=ModelState.ROLLED_BACK,
                    reason=PROBATION_FAILED,
                    message="error rate 0.5 > 0.05",
                    probation=_probation(ProbationState.FAILED, 200, 0.5, 1.0),
                ),
            )
            return
        model.previous = (version, sha256)
        quiet = sha256 in self.quiet
        self.report(
            name,
            ModelEntry(
                version=version,
                sha256=sha256,
                state=ModelState.ACTIVE,
                probation=_probation(
                    ProbationState.PASSED_WITHOUT_TRAFFIC if quiet else ProbationState.PASSED,
                    0 if quiet else 200,
                    0.0,
                    1.0,
                ),
            ),
        )

    def on_method(self, method: str, rid: str, payload: Any) -> None:
        answer: dict[str, Any] = {"error": f"no method {method}"}
        status = 404
        if method == "rollback":
            name = payload.get("model") if isinstance(payload, Mapping) else None
            model = self.models.get(str(name)) if str(name) in self.entries else None
            if model is None or model.previous is None or model.previous[0] == model.version:
                status, answer = 409, {"error": "no last-known-good release"}
            else:
                entry = self.report(
                    str(name),
                    ModelEntry(
                        version=model.version,
                        sha256=model.sha256,
                        state=ModelState.ROLLED_BACK,
                        reason=ROLLBACK_REQUESTED,
                        message="rollback method",
                        active_version=model.previous[0],
                    ),
                )
                # As the agent answers: the model's status, by name.
                status, answer = 200, {"name": str(name), **to_twin(entry)}
        self._publish(f"$iothub/methods/res/{status}/?$rid={rid}", answer)

    def on_publish(self, publish: mqtt.Publish) -> None:
        if publish.qos and publish.packet_id is not None:
            self._send(mqtt.PubAck(publish.packet_id))
        topic = publish.topic
        if topic.startswith("$iothub/twin/res/200/"):
            document = json.loads(publish.payload)
            self.desired = dict(document.get("desired", {}))
            self.on_desired(self.desired)
        elif topic.startswith("$iothub/twin/PATCH/properties/desired/"):
            patch = json.loads(publish.payload)
            # Desired patches are JSON merge patches (RFC 7386): a field that did not change
            # (the sha256 of a re-released artifact) is not in the patch.
            self.desired = merge_patch(self.desired, patch)
            self.on_desired(self.desired)
        elif topic.startswith("$iothub/methods/POST/"):
            method = topic.split("/")[3]
            rid = topic.partition("$rid=")[2]
            self.on_method(method, rid, json.loads(publish.payload or b"null"))

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_S / 2)
            self._send(mqtt.PingReq())

    async def run(
        self, host: str, port: int, context: ssl.SSLContext, token: str, connected: asyncio.Event
    ) -> None:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host
        )
        self._writer = writer
        client = f"{self.device_id}/{self.module_id}"
        self._send(mqtt.Connect(client, f"{host}/{client}/?{_API}", token, False, KEEP_ALIVE_S))
        pinger = asyncio.create_task(self._ping())
        self._send(
            mqtt.Subscribe(
                next(self._ids),
                (
                    ("$iothub/twin/res/#", 0),
                    ("$iothub/twin/PATCH/properties/desired/#", 1),
                    ("$iothub/methods/POST/#", 0),
                ),
            )
        )
        buffer = b""
        asked = False
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
                while (decoded := mqtt.decode(buffer)) is not None:
                    packet, used = decoded
                    buffer = buffer[used:]
                    if isinstance(packet, mqtt.SubAck) and not asked:
                        asked = True
                        self._publish(f"$iothub/twin/GET/?$rid={next(self._ids)}", None)
                        connected.set()
                    elif isinstance(packet, mqtt.Publish):
                        self.on_publish(packet)
        finally:
            pinger.cancel()
            # abort, not close: a TLS close waits for the peer's close_notify, which a hub
            # that is stopping never sends.
            writer.transport.abort()


class StandInFleet:
    """Stand-ins on a thread of their own (the simulator has its own, the caller is free)."""

    def __init__(
        self,
        modules: Iterable[tuple[str, str]],
        *,
        host: str,
        ca_file: Path,
        token_for: TokenFor,
        port: int = 8883,
        probation_s: float = 0.5,
        failing: Collection[str] = (),
        check: Check | None = None,
        quiet: Collection[str] = (),
    ) -> None:
        self.standins = [
            StandIn(device, module, probation_s, failing, check, quiet)
            for device, module in modules
        ]
        self._host, self._port = host, port
        self._ca_file = ca_file
        self._token_for = token_for
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="standins")
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, timeout: float = 120.0) -> StandInFleet:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._connect_all(), self._loop)
        future.result(timeout)
        return self

    async def _connect_all(self) -> None:
        context = ssl.create_default_context(cafile=str(self._ca_file))
        expiry = int(time.time()) + 24 * 3600
        events = []
        for standin in self.standins:
            event = asyncio.Event()
            token = self._token_for(standin.device_id, standin.module_id, expiry)
            self._tasks.append(
                asyncio.create_task(standin.run(self._host, self._port, context, token, event))
            )
            events.append(event)
        await asyncio.gather(*(event.wait() for event in events))

    def stop(self) -> None:
        async def cancel() -> None:
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.sleep(0.1)  # aborted transports close their sockets on the next turns

        if self._thread.is_alive():
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> StandInFleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
