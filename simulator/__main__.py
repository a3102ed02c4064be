"""Command line: `start` a simulator, `send` a message to a module input, `watch` what goes up.

    python -m simulator start --deployment deployment.json [--host 127.0.0.1] [--run-dir DIR]
        [--devices N | --fleet fleet.json]
        [--storage-container C [--storage-condition Q] [--azurite | --storage-connection-string S]]
    python -m simulator send --module M --input I --file body.json [--property k=v ...]
    python -m simulator watch
    python -m simulator fault drop|refuse|twin|pause-pubacks|resume-pubacks|clear [options]

`send` and `watch` find the running simulator through `simulator.json` in the run folder and talk
to its admin endpoints with the service key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import structlog

from simulator import sas
from simulator.azurite import Azurite, AzuriteError
from simulator.hub import DEFAULT_DEVICE_ID, INFO_FILE, Simulator
from simulator.manifest import ManifestError
from simulator.rest import SERVICE_POLICY
from simulator.storage import DEFAULT_BATCH_FREQUENCY_SECONDS, StorageRoute, StorageRouteError
from wire.version import version_text

DEFAULT_RUN_DIR = Path(tempfile.gettempdir()) / "edge-mlops-simulator"
SHOWN_DEVICES = 3  # `start` prints the connection details of this many devices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=version_text("simulator"))
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run IoT Hub + edgeHub until interrupted")
    start.add_argument(
        "--deployment", type=Path, required=True, help="IoT Edge deployment manifest"
    )
    start.add_argument("--host", default="127.0.0.1", help="loopback address to bind (port 8883)")
    start.add_argument("--device-id", default=DEFAULT_DEVICE_ID)
    start.add_argument("--service-port", type=int, default=0, help="REST port (0: any free)")
    start.add_argument(
        "--module", action="append", default=[], help="an extra module identity, repeatable"
    )
    fleet = start.add_mutually_exclusive_group()
    fleet.add_argument(
        "--devices", type=_positive, default=None, help="N edge devices <device-id>-0000 ..."
    )
    fleet.add_argument(
        "--fleet", type=Path, default=None, help='JSON {"devices": {"<id>": {"tags": {...}}}}'
    )
    storage = start.add_argument_group("routing $upstream messages to Blob storage")
    storage.add_argument("--storage-container", default=None, help="route into this container")
    storage.add_argument("--storage-condition", default="", help="IoT Hub routing query")
    storage.add_argument(
        "--storage-batch-seconds",
        type=float,
        default=DEFAULT_BATCH_FREQUENCY_SECONDS,
        help="batch frequency (IoT Hub: 60..720)",
    )
    target = storage.add_mutually_exclusive_group()
    target.add_argument("--storage-connection-string", default=None, help="a running storage")
    target.add_argument(
        "--azurite", action="store_true", help="start Azurite (make system-deps) on loopback"
    )
    for command in (start, *_client_commands(commands)):
        command.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def load_fleet(path: Path) -> dict[str, dict[str, Any]]:
    """Device ids and their tags from a fleet file `{"devices": {"<id>": {"tags": {...}}}}`."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the fleet file {path}: {exc}") from exc
    devices = document.get("devices") if isinstance(document, dict) else None
    if not isinstance(devices, dict) or not devices:
        raise ValueError(f"{path}: 'devices' must map device ids to {{'tags': {{...}}}}")
    fleet: dict[str, dict[str, Any]] = {}
    for device_id, spec in devices.items():
        tags = spec.get("tags", {}) if isinstance(spec, dict) else None
        if not isinstance(tags, dict):
            raise TypeError(f"{path}: device {device_id!r} needs an object 'tags'")
        fleet[device_id] = tags
    return fleet


def _client_commands(commands: Any) -> tuple[argparse.ArgumentParser, ...]:
    send = commands.add_parser("send", help="deliver a message to a module input")
    send.add_argument("--module", required=True)
    send.add_argument("--input", required=True)
    send.add_argument("--file", type=Path, required=True, help="message body")
    send.add_argument("--device-id", default=None, help="default: the simulator's device")
    send.add_argument("--property", action="append", default=[], help="key=value, repeatable")
    watch = commands.add_parser("watch", help="follow $upstream messages and twin changes")
    watch.add_argument(
        "--kinds",
        default="upstream,reported",
        help="also: desired, connected, disconnected, configuration, targeting",
    )
    watch.add_argument("--device", action="append", default=[], help="only these devices")
    watch.add_argument("--module", action="append", default=[], help="only these modules")
    fault = commands.add_parser("fault", help="inject a failure")
    fault.add_argument(
        "fault", choices=["drop", "refuse", "twin", "pause-pubacks", "resume-pubacks", "clear"]
    )
    fault.add_argument("--module", help="for drop and refuse")
    fault.add_argument("--device-id", default=None, help="default: the simulator's device")
    fault.add_argument("--seconds", type=float, default=10.0, help="for refuse")
    fault.add_argument("--status", type=int, default=None, help="for twin: answer this status")
    fault.add_argument("--delay", type=float, default=0.0, help="for twin: answer this late")
    fault.add_argument("--count", type=int, default=None, help="for twin: this many times")
    return send, watch, fault


# ---------------------------------------------------------------- start


def _start(args: argparse.Namespace, out: TextIO) -> int:
    with contextlib.ExitStack() as stack:
        try:
            routes = _storage_routes(args, stack)
        except (AzuriteError, StorageRouteError) as exc:
            print(f"cannot route to storage: {exc}", file=sys.stderr)
            return 2
        return _serve(args, routes, out)


def _storage_routes(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[StorageRoute]:
    if args.storage_container is None:
        if args.azurite or args.storage_connection_string:
            raise StorageRouteError("--storage-container names the container to route into")
        return []
    connection_string = args.storage_connection_string
    if args.azurite or connection_string is None:
        azurite = stack.enter_context(Azurite.start(args.run_dir / "azurite", host=args.host))
        connection_string = azurite.connection_string
    return [
        StorageRoute(
            name="storage",
            connection_string=connection_string,
            container=args.storage_container,
            condition=args.storage_condition,
            batch_frequency_seconds=args.storage_batch_seconds,
        )
    ]


def _serve(args: argparse.Namespace, routes: list[StorageRoute], out: TextIO) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        devices = load_fleet(args.fleet) if args.fleet is not None else args.devices
        simulator = Simulator.start(
            args.deployment,
            run_dir=args.run_dir,
            host=args.host,
            device_id=args.device_id,
            service_port=args.service_port,
            extra_modules=tuple(args.module),
            devices=devices,
            storage_routes=routes,
        )
    except (ManifestError, OSError, RuntimeError, ValueError, TypeError) as exc:
        print(f"cannot start the simulator: {exc}", file=sys.stderr)
        return 2
    with simulator:
        print(f"service connection string:\n  {simulator.service_connection_string}", file=out)
        shown = set(simulator.devices[:SHOWN_DEVICES])
        if len(simulator.devices) > SHOWN_DEVICES:
            print(f"{len(simulator.devices)} devices; every module in simulator.json", file=out)
        for device_id, module_id in simulator.modules:
            if device_id not in shown:
                continue
            print(f"module {device_id}/{module_id}:", file=out)
            for name, value in simulator.edge_env(device_id, module_id).items():
                print(f"  {name}={value}", file=out)
        for route in routes:
            print(f"storage route into container {route.container!r}:", file=out)
            print(f"  {route.connection_string}", file=out)
        print(f"env file: {args.run_dir / 'simulator.env'}", file=out, flush=True)
        # Polled: a signal handler runs only between bytecodes of the main thread.
        while not stop.wait(0.2):
            pass
    return 0


# ---------------------------------------------------------------- admin clients


class _Admin:
    def __init__(self, run_dir: Path) -> None:
        try:
            info = json.loads((run_dir / INFO_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"no running simulator found in {run_dir}: {exc}") from exc
        self.base = f"https://{info['host']}:{info['service_port']}"
        fields = dict(part.split("=", 1) for part in info["service_connection_string"].split(";"))
        self._hostname = fields["HostName"]
        self._key = fields["SharedAccessKey"]
        self.ssl = ssl.create_default_context(cafile=info["ca_cert"])
        modules: dict[str, Any] = info["modules"]
        self.device_id = next(iter(modules)).split("/")[0] if modules else DEFAULT_DEVICE_ID

    def headers(self) -> dict[str, str]:
        token = sas.generate(self._hostname, self._key, int(time.time()) + 3600, SERVICE_POLICY)
        return {"Authorization": token}


async def _send(args: argparse.Namespace, out: TextIO) -> int:
    admin = _Admin(args.run_dir)
    properties = dict(item.split("=", 1) for item in args.property)
    device_id = args.device_id or admin.device_id
    envelope = {"body": args.file.read_text(encoding="utf-8"), "properties": properties}
    url = f"{admin.base}/_simulator/inputs/{device_id}/{args.module}/{args.input}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=envelope, headers=admin.headers(), ssl=admin.ssl) as response,
    ):
        print(await response.text(), file=out)
        return 0 if response.status < 300 else 1


async def _watch(args: argparse.Namespace, out: TextIO) -> int:
    admin = _Admin(args.run_dir)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(
            f"{admin.base}/_simulator/watch",
            params={
                "kinds": args.kinds,
                "devices": ",".join(args.device),
                "modules": ",".join(args.module),
            },
            headers=admin.headers(),
            ssl=admin.ssl,
        ) as response,
    ):
        if response.status >= 300:
            print(await response.text(), file=sys.stderr)
            return 1
        async for line in response.content:
            out.write(line.decode())
            out.flush()
    return 0


async def _fault(args: argparse.Namespace, out: TextIO) -> int:
    admin = _Admin(args.run_dir)
    body: dict[str, Any] = {
        "device": args.device_id or admin.device_id,
        "module": args.module,
        "seconds": args.seconds,
        "status": args.status,
        "delay": args.delay,
        "count": args.count,
    }
    url = f"{admin.base}/_simulator/faults/{args.fault}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=admin.headers(), ssl=admin.ssl) as response,
    ):
        print(await response.text(), file=out)
        return 0 if response.status < 300 else 1


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = _parser().parse_args(argv)
    # Logs go to stderr so that stdout carries only what the command prints.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        match args.command:
            case "start":
                return _start(args, out)
            case "send":
                return asyncio.run(_send(args, out))
            case "fault":
                return asyncio.run(_fault(args, out))
            case _:
                return asyncio.run(_watch(args, out))
    except KeyboardInterrupt:
        return 0
    except aiohttp.ClientError as exc:
        print(f"cannot reach the simulator: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
