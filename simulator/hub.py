"""The public `Simulator`: IoT Hub + edgeHub on a background thread with its own event loop.

Why a thread of its own: the azure-iot-device aio client's handler setters block the calling
thread until the SDK's own loop has done the work, so a hub on the test's loop would deadlock.
All hub state lives on the simulator loop; every method here hands its work to that loop with
`run_coroutine_threadsafe` and waits for the answer.

    with Simulator.start(deployment=path, host="127.0.0.7", run_dir=tmp_path) as sim:
        env = sim.edge_env("edge-device", "filter")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog
from aiohttp import web

from simulator import certs, manifest, sas, topics
from simulator import query as twin_query
from simulator.broker import MQTT_PORT, Broker
from simulator.configurations import EDGE_HUB
from simulator.core import Hub as HubCore
from simulator.core import (
    HubEvent,
    Identity,
    TwinResponseFault,
    UpstreamMessage,
)
from simulator.errors import ServiceError
from simulator.feed import Feed
from simulator.fleet import new_device
from simulator.rest import SERVICE_POLICY, ServiceApi
from simulator.storage import BlobUploader, StorageRoute, StorageWriter
from simulator.twins import Twin

log = structlog.get_logger(__name__)

T = TypeVar("T")
DEFAULT_DEVICE_ID = "edge-device"
MAX_DEVICES = 100_000
# IoT Hub device ids: up to 128 ASCII letters, digits and -.%_*?!(),:=@$'+
DEVICE_ID = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$'+]{1,128}$")
START_TIMEOUT_SECONDS = 30.0
CALL_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
INFO_FILE = "simulator.json"
ENV_FILE = "simulator.env"


def _load_deployment(
    deployment: Path | str | Mapping[str, Any] | manifest.Deployment,
) -> manifest.Deployment:
    if isinstance(deployment, manifest.Deployment):
        return deployment
    if isinstance(deployment, Mapping):
        return manifest.parse_manifest(deployment)
    return manifest.load_manifest(Path(deployment))


def fleet_devices(
    device_id: str, devices: int | Mapping[str, Mapping[str, Any]] | None
) -> dict[str, Mapping[str, Any]]:
    """Device ids and their tags: one device, N numbered ones, or the ones given."""
    if devices is None:
        return {device_id: {}}
    if isinstance(devices, int):
        if not 1 <= devices <= MAX_DEVICES:
            raise ValueError(f"devices must be 1..{MAX_DEVICES}, not {devices}")
        return {f"{device_id}-{index:04d}": {} for index in range(devices)}
    if not devices:
        raise ValueError("the fleet names no device")
    for name, tags in devices.items():
        if not DEVICE_ID.match(name):
            raise ValueError(f"device id {name!r} is not a valid IoT Hub device id")
        if not isinstance(tags, Mapping):
            raise TypeError(f"tags of device {name!r} must be an object")
    return dict(devices)


def _write_private(path: Path, text: str) -> None:
    """Connection strings are secrets: owner-only. Readers poll for these files, so each
    appears whole: written beside its final name, then renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    temporary.replace(path)


class SimulatorFaults:
    """Fault injection, callable from any thread but the simulator's."""

    def __init__(self, simulator: Simulator) -> None:
        self._sim = simulator

    def drop_connection(self, device_id: str, module_id: str) -> bool:
        """Cut the module's link as a network failure would; True if it was connected."""
        return self._sim._call_sync(lambda hub: hub.broker.drop(f"{device_id}/{module_id}"))

    def refuse_connections(self, device_id: str, module_id: str, seconds: float) -> None:
        """Answer the module's CONNECTs with 'server unavailable' for `seconds`."""
        self._sim._call_sync(lambda hub: hub.faults.refuse(f"{device_id}/{module_id}", seconds))

    def twin_responses(
        self, *, status: int | None = None, delay: float = 0.0, count: int | None = None
    ) -> None:
        """Delay twin GET / reported-patch answers by `delay`, or answer them with `status`;
        for the next `count` requests, or until `clear()`."""
        fault = TwinResponseFault(status=status, delay_seconds=delay, remaining=count)

        def set_fault(hub: HubCore) -> None:
            hub.faults.twin = fault

        self._sim._call_sync(set_fault)

    def pause_pubacks(self) -> None:
        """Stop acknowledging publishes from every module until `resume_pubacks()`."""
        self._sim._call_sync(lambda hub: hub.faults.pause_pubacks())

    def resume_pubacks(self) -> None:
        self._sim._call_sync(lambda hub: hub.faults.resume_pubacks())

    def clear(self) -> None:
        self._sim._call_sync(lambda hub: hub.faults.clear())


class Simulator:
    """An offline IoT Hub + edgeHub for one edge device; use `Simulator.start(...)`."""

    def __init__(
        self,
        deployment: manifest.Deployment,
        *,
        run_dir: Path,
        host: str = "127.0.0.1",
        device_id: str = DEFAULT_DEVICE_ID,
        service_port: int = 0,
        mqtt_port: int = MQTT_PORT,
        extra_modules: tuple[str, ...] = (),
        devices: int | Mapping[str, Mapping[str, Any]] | None = None,
        storage_routes: Sequence[StorageRoute] = (),
    ) -> None:
        self.storage_routes = tuple(storage_routes)
        self.host = host
        self.fleet_tags = fleet_devices(device_id, devices)
        self.device_id = next(iter(self.fleet_tags))
        self.run_dir = Path(run_dir)
        self._deployment = deployment
        self._mqtt_port = mqtt_port
        self._requested_service_port = service_port
        self.service_port = 0
        self.service_key = sas.new_key()
        self.upstream: Feed[UpstreamMessage] = Feed(size=lambda item: item.message.size)
        self.events: Feed[HubEvent] = Feed(size=lambda event: event.size)
        self.faults = SimulatorFaults(self)
        modules = tuple(dict.fromkeys((*deployment.modules, *extra_modules)))
        self._modules = modules
        self._identities = {
            (device, module): Identity(device, module, sas.new_key(), sas.new_key())
            for device in self.fleet_tags
            for module in modules
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hub: HubCore | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._certificates: certs.CertificateFiles | None = None

    # -------------------------------------------------------- lifecycle

    @classmethod
    def start(
        cls,
        deployment: Path | str | Mapping[str, Any] | manifest.Deployment,
        *,
        run_dir: Path,
        host: str = "127.0.0.1",
        device_id: str = DEFAULT_DEVICE_ID,
        service_port: int = 0,
        mqtt_port: int = MQTT_PORT,
        extra_modules: tuple[str, ...] = (),
        devices: int | Mapping[str, Mapping[str, Any]] | None = None,
        storage_routes: Sequence[StorageRoute] = (),
    ) -> Simulator:
        """Start serving on `host` (MQTT on `mqtt_port`, REST on `service_port`, 0 = any free).

        `devices`: None for the one device `device_id`; a count N for `<device_id>-0000` ...;
        or device ids mapped to their twin tags. Every device runs the deployment's modules.
        `storage_routes`: IoT Hub routes of `$upstream` messages into Blob containers."""
        simulator = cls(
            _load_deployment(deployment),
            run_dir=run_dir,
            host=host,
            device_id=device_id,
            service_port=service_port,
            mqtt_port=mqtt_port,
            extra_modules=extra_modules,
            devices=devices,
            storage_routes=storage_routes,
        )
        simulator._start()
        return simulator

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._certificates = certs.generate(self.run_dir / "certs", self.host)
        # A daemon, so that a test which forgets stop() cannot hang the interpreter at exit.
        self._thread = threading.Thread(
            target=self._thread_main, name="iothub-simulator", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_SECONDS):
            self.stop()
            raise TimeoutError("the simulator did not start in time")
        if self._startup_error is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            raise RuntimeError(f"the simulator failed to start: {self._startup_error}") from (
                self._startup_error
            )
        self._write_run_files()
        log.info("simulator_started", host=self.host, service_port=self.service_port)

    def stop(self) -> None:
        """Close every connection and server, then end the thread; safe to call twice."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between, so there is nothing left to stop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                raise RuntimeError("the simulator thread did not stop")
            self._thread = None

    def __enter__(self) -> Simulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread, which re-raises it
            self._startup_error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        assert self._certificates is not None  # generated by _start before the thread runs
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        twins = {
            key: Twin(*key, desired=dict(self._deployment.desired.get(key[1], {})))
            for key in self._identities
        }
        own = {name: self._deployment.desired.get(name, {}) for name in self._modules}
        own[EDGE_HUB] = self._deployment.edge_hub
        devices = {
            device_id: new_device(
                device_id,
                self._modules,
                tags=tags,
                own=own,
                routes=self._deployment.routes,
                routes_source=self._deployment.edge_hub.get("routes", {}),
            )
            for device_id, tags in self.fleet_tags.items()
        }
        uploader = BlobUploader()
        hub = HubCore(
            hostname=self.host,
            identities=self._identities,
            twins=twins,
            devices=devices,
            upstream=self.upstream,
            events=self.events,
            storage=[
                StorageWriter(route, upload=uploader, clock=time.time)
                for route in self.storage_routes
            ],
        )
        hub.start_storage()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(self._certificates.server_cert, self._certificates.server_key)
        broker = Broker(hub, tls, self.host, self._mqtt_port, puback_gate=hub.faults.puback_gate)
        hub.attach(broker)
        runner: web.AppRunner | None = None
        try:
            await broker.start()
            # Bound before the app exists: the service hostname (which SAS tokens sign) has
            # the port in it, and with service_port=0 the port is known only once bound.
            listener = socket.create_server((self.host, self._requested_service_port))
            self.service_port = int(listener.getsockname()[1])
            api = ServiceApi(
                hub, service_hostname=self.service_hostname, service_key=self.service_key
            )
            runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            await web.SockSite(runner, listener, ssl_context=tls).start()
            self._hub = hub
            self._ready.set()
            await self._stop.wait()
        finally:
            if runner is not None:
                await runner.cleanup()
            await broker.close()
            await hub.close()
            self._hub = None
            log.info("simulator_stopped", host=self.host)

    # -------------------------------------------------------- calls into the loop

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        loop = self._loop
        if loop is None or self._hub is None:
            coroutine.close()
            raise RuntimeError("the simulator is not running")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("blocking simulator call from the simulator's own thread")
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    def _call_sync(self, action: Callable[[HubCore], T]) -> T:
        async def run() -> T:
            assert self._hub is not None  # checked by _submit
            return action(self._hub)

        return self._submit(run()).result(CALL_TIMEOUT_SECONDS)

    def _call_async(self, action: Callable[[HubCore], Awaitable[T]], timeout: float) -> T:
        async def run() -> T:
            assert self._hub is not None  # checked by _submit
            return await action(self._hub)

        return self._submit(run()).result(timeout)

    # -------------------------------------------------------- connection details

    @property
    def ca_cert_path(self) -> Path:
        assert self._certificates is not None  # set by start()
        return self._certificates.ca_cert

    @property
    def service_hostname(self) -> str:
        return f"{self.host}:{self.service_port}"

    @property
    def service_connection_string(self) -> str:
        return (
            f"HostName={self.service_hostname};SharedAccessKeyName={SERVICE_POLICY};"
            f"SharedAccessKey={self.service_key}"
        )

    @property
    def modules(self) -> list[tuple[str, str]]:
        """(device id, module id) of every module identity, sorted."""
        return sorted(self._identities)

    @property
    def devices(self) -> list[str]:
        """Every edge device id, in the order given (numbered fleets: sorted)."""
        return list(self.fleet_tags)

    def _identity(self, device_id: str, module_id: str) -> Identity:
        try:
            return self._identities[(device_id, module_id)]
        except KeyError:
            raise KeyError(f"no module {device_id}/{module_id} in this simulator") from None

    def module_connection_string(self, device_id: str, module_id: str) -> str:
        """`HostName=...;GatewayHostName=...;DeviceId=...;ModuleId=...;SharedAccessKey=...`."""
        identity = self._identity(device_id, module_id)
        return (
            f"HostName={self.host};GatewayHostName={self.host};DeviceId={device_id};"
            f"ModuleId={module_id};SharedAccessKey={identity.primary_key}"
        )

    def edge_env(self, device_id: str, module_id: str) -> dict[str, str]:
        """The variables `IoTHubModuleClient.create_from_edge_environment()` reads."""
        return {
            "EdgeHubConnectionString": self.module_connection_string(device_id, module_id),
            "EdgeModuleCACertificateFile": str(self.ca_cert_path),
        }

    def module_sas_token(self, device_id: str, module_id: str, expiry: int) -> str:
        """A module token expiring at `expiry` (unix seconds), e.g. for expiry tests."""
        identity = self._identity(device_id, module_id)
        resource = f"{self.host}/devices/{device_id}/modules/{module_id}"
        return sas.generate(resource, identity.primary_key, expiry)

    def _write_run_files(self) -> None:
        info = {
            "host": self.host,
            "service_port": self.service_port,
            "service_connection_string": self.service_connection_string,
            "ca_cert": str(self.ca_cert_path),
            "modules": {
                f"{device}/{module}": self.edge_env(device, module)
                for device, module in self.modules
            },
            "storage": [
                {
                    "route": route.name,
                    "container": route.container,
                    "connection_string": route.connection_string,
                }
                for route in self.storage_routes
            ],
        }
        _write_private(self.run_dir / INFO_FILE, json.dumps(info, indent=2) + "\n")
        lines = [
            f"IOTHUB_CONNECTION_STRING={self.service_connection_string}",
            f"EdgeModuleCACertificateFile={self.ca_cert_path}",
        ]
        # One device's variables (the first): names would collide across a fleet, whose
        # connection strings are all in simulator.json.
        for device, module in self.modules:
            if device != self.device_id:
                continue
            variable = "".join(c if c.isalnum() else "_" for c in module).upper()
            conn = self.module_connection_string(device, module)
            lines.append(f"{variable}_EDGEHUB_CONNECTION_STRING={conn}")
        _write_private(self.run_dir / ENV_FILE, "\n".join(lines) + "\n")

    # -------------------------------------------------------- state and actions

    def is_connected(self, device_id: str, module_id: str) -> bool:
        return self._call_sync(lambda hub: hub.is_connected(device_id, module_id))

    def twin(self, device_id: str, module_id: str) -> dict[str, Any]:
        """The module twin as the service API shows it (tags, desired, reported, versions)."""
        return self._call_sync(lambda hub: hub.service_twin(device_id, module_id))

    def device_twin(self, device_id: str) -> dict[str, Any]:
        """The device twin as the service API shows it (tags, configurations)."""
        return self._call_sync(lambda hub: hub.fleet.device_document(device_id))

    def update_tags(self, device_id: str, tags: Mapping[str, Any]) -> dict[str, Any]:
        """Patch the device twin's tags as the service would; configurations re-target."""
        body = {"tags": dict(tags)}
        return self._call_sync(
            lambda hub: hub.fleet.update_device_twin(device_id, body, None, replace_all=False)
        )

    def flush_storage(self) -> None:
        """Write what the storage routes have batched now, rather than at the batch frequency."""
        self._call_async(lambda hub: hub.flush_storage(), CALL_TIMEOUT_SECONDS)

    def query(self, text: str) -> list[Mapping[str, object]]:
        """Every row of a twin query (`ServiceError` 400 if it does not parse)."""

        def run(hub: HubCore) -> list[Mapping[str, object]]:
            try:
                rows = hub.fleet.query(twin_query.parse_query(text))
            except twin_query.QueryError as exc:
                raise ServiceError(400, "BadRequest", str(exc)) from exc
            copied: list[Mapping[str, object]] = json.loads(json.dumps(rows))
            return copied  # copies: the hub's documents stay its own

        return self._call_sync(run)

    def update_desired(
        self, device_id: str, module_id: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Patch desired properties as the service would; the module gets the patch."""
        body = {"properties": {"desired": dict(patch)}}
        return self._call_sync(
            lambda hub: hub.update_twin(device_id, module_id, body, None, replace=False)
        )

    def invoke_method(
        self, device_id: str, module_id: str, method_name: str, payload: Any, timeout: float = 30
    ) -> tuple[int, Any]:
        """(status, payload) the module answered; `ServiceError` 404 / 504 as IoT Hub would."""
        return self._call_async(
            lambda hub: hub.invoke_method(device_id, module_id, method_name, payload, timeout),
            timeout + 5,
        )

    def send_to_input(
        self,
        device_id: str,
        module_id: str,
        input_name: str,
        body: bytes | str | Mapping[str, Any] | list[Any],
        properties: Mapping[str, str] | None = None,
        *,
        content_type: str = "application/json",
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Deliver a message to a module input, as a route would (kept until it subscribes)."""
        if isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode()
        else:
            payload = json.dumps(body).encode()
        system = {"contentType": content_type, "contentEncoding": "utf-8"}
        if message_id is not None:
            system["messageId"] = message_id
        if correlation_id is not None:
            system["correlationId"] = correlation_id
        message = topics.Message(payload, system, dict(properties or {}))
        if message.size > topics.MAX_MESSAGE_BYTES:
            raise ServiceError(413, "MessageTooLarge", "message exceeds 256 KB")
        self._identity(device_id, module_id)
        self._call_sync(lambda hub: hub.deliver_to_input(device_id, module_id, input_name, message))


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    """Poll `condition` from a test thread until it holds (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def pick_loopback_host(port: int = MQTT_PORT) -> str:
    """A random 127.x.y.z where `port` is free, so parallel simulators do not collide on 8883."""
    for _ in range(100):
        octets = (secrets.randbelow(254) + 1, secrets.randbelow(256), secrets.randbelow(254) + 1)
        candidate = "127.{}.{}.{}".format(*octets)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((candidate, port))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free loopback address for port {port}")
