"""`make demo`: the whole loop on one machine, with no Azure account and no Docker.

    python -m demo [--container] [--keep-running] [--http-port 8000] [--metrics-port 9600]
                   [--seconds 20]

1. starts the offline IoT Hub + edgeHub (`simulator/`) with `deployment/deployment.template.json`;
2. starts the agent module as its own process (`python -m module`), or with --container from
   the device image built from the Dockerfile (demo/container.py), through the local-debug
   variables IoT Edge tooling hands out (`EdgeHubConnectionString`, `EdgeModuleCACertificateFile`);
3. signs model v1 and serves it over HTTPS, then releases it by updating the module twin
   through the service SDK (`azure-iot-hub`), as a cloud publisher would;
4. a sensor module sends v2 inference requests through the `infer` route; predictions come
   back upstream with their correlation ids;
5. releases v2 under that traffic: the agent hot-swaps without dropping a message;
6. prints a summary and stops everything (or keeps it up with --keep-running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.iot.device import Message
from azure.iot.device.aio import IoTHubModuleClient
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import public_key_to_b64
from demo.artifacts import ArtifactServer
from demo.container import ModuleContainer, start_module_container
from deployment.example_models import tiny_mlp
from deployment.image import Docker, Engine, ImageError, build_default, default_tag
from deployment.release import build_manifest
from simulator.core import UpstreamMessage
from simulator.hub import Simulator, pick_loopback_host

RUN_DIR = Path("run/demo")
TEMPLATE = Path("deployment/deployment.template.json")
DEVICE, MODULE, SENSOR = "edge-device", "mlagent", "sensor"
KEY_ID = "demo-publisher"
FEATURES = 32


@dataclass
class Traffic:
    sent: dict[str, float] = field(default_factory=dict)  # correlation id -> wall-clock send time
    answered: dict[str, float] = field(default_factory=dict)  # correlation id -> latency
    errors: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # model version -> answers
    sending: bool = True
    all_answered: asyncio.Event = field(default_factory=asyncio.Event)


def _request(seed: int) -> dict[str, Any]:
    values = [round(((seed * 7919 + i * 104729) % 2000) / 1000 - 1, 3) for i in range(FEATURES)]
    return {
        "id": f"reading-{seed}",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, FEATURES], "data": values}],
    }


async def _sensor(client: IoTHubModuleClient, traffic: Traffic, stop: asyncio.Event) -> None:
    """Sends a reading every 20 ms (50 per second) until told to stop."""
    seed = 0
    while not stop.is_set():
        correlation = uuid.uuid4().hex
        message: Message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
            json.dumps(_request(seed)),
            message_id=uuid.uuid4().hex,
            content_encoding="utf-8",
            content_type="application/json",
        )
        message.correlation_id = correlation
        traffic.sent[correlation] = time.time()  # the simulator stamps arrivals with time.time()
        await client.send_message_to_output(message, "readings")
        seed += 1
        await asyncio.sleep(0.02)
    traffic.sending = False
    if len(traffic.answered) == len(traffic.sent):
        traffic.all_answered.set()


async def _collect(sim: Simulator, traffic: Traffic) -> None:
    async for item in sim.upstream.follow():
        _record(item, traffic)


def _record(item: UpstreamMessage, traffic: Traffic) -> None:
    if item.output != "predictions":
        return
    correlation = item.message.system.get("correlationId", "")
    sent = traffic.sent.get(correlation)
    if sent is None or correlation in traffic.answered:
        return
    traffic.answered[correlation] = item.received_at - sent
    body = json.loads(item.message.body)
    if "error" in body:
        traffic.errors.append(body["error"])
    else:
        version = str(body.get("model_version"))
        traffic.versions[version] = traffic.versions.get(version, 0) + 1
    if not traffic.sending and len(traffic.answered) == len(traffic.sent):
        traffic.all_answered.set()


def _reported_model(registry: IoTHubRegistryManager) -> dict[str, Any]:
    twin = registry.get_module_twin(DEVICE, MODULE)
    reported = twin.properties.reported or {}
    return dict(reported.get("model") or {})


async def _release(
    registry: IoTHubRegistryManager, manifest: dict[str, Any], version: int
) -> float:
    """Update the module twin through the service SDK; return seconds until reported active."""
    started = time.monotonic()
    twin = Twin(properties=TwinProperties(desired={"model": manifest}))
    await asyncio.to_thread(registry.update_module_twin, DEVICE, MODULE, twin, "*")
    deadline = started + 60
    while time.monotonic() < deadline:
        model = await asyncio.to_thread(_reported_model, registry)
        if model.get("version") == version and model.get("state") in {
            "active",
            "failed",
            "rejected",
        }:
            if model["state"] != "active":
                raise SystemExit(f"demo: v{version} ended {model['state']}: {model.get('message')}")
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise SystemExit(f"demo: v{version} was not active within 60 s (see {RUN_DIR}/module.log)")


def _module_env(
    sim: Simulator, key: Ed25519PrivateKey, artifacts: ArtifactServer, args: argparse.Namespace
) -> dict[str, str]:
    return {
        **sim.edge_env(DEVICE, MODULE),
        "EDGEML_TRUSTED_KEYS": f"{KEY_ID}={public_key_to_b64(key.public_key())}",
        "EDGEML_ALLOWED_HOSTS": artifacts.host,
        "EDGEML_ARTIFACT_CA_FILE": str(sim.ca_cert_path),
        "EDGEML_HOST": "127.0.0.1",
        "EDGEML_HTTP_PORT": str(args.http_port),
        "EDGEML_METRICS_PORT": str(args.metrics_port),
        "EDGEML_LOG_FORMAT": "json",
    }


def _start_module(
    sim: Simulator,
    key: Ed25519PrivateKey,
    artifacts: ArtifactServer,
    args: argparse.Namespace,
    *,
    image: str | None,
    docker: Docker,
) -> subprocess.Popen[bytes] | ModuleContainer:
    """`python -m module` as a process, or from `image` as iotedgehubdev runs a container."""
    if image is not None:
        container_env = _module_env(sim, key, artifacts, args)
        ca_files = {
            name: Path(container_env.pop(name))
            for name in ("EdgeModuleCACertificateFile", "EDGEML_ARTIFACT_CA_FILE")
        }
        # The model store is the image's volume, not a folder of this run.
        module = start_module_container(docker, image, container_env, ca_files, RUN_DIR)
        print(f"module: container {module.name} from {image} (docker logs {module.name})")
        return module
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    env |= _module_env(sim, key, artifacts, args)
    env["EDGEML_STATE_DIR"] = str(RUN_DIR / "state")
    log = (RUN_DIR / "module.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "module"], env=env, stdout=log, stderr=log)


async def _run(args: argparse.Namespace, image: str | None, docker: Docker) -> int:
    sim = Simulator.start(
        TEMPLATE, run_dir=RUN_DIR / "sim", host=pick_loopback_host(), device_id=DEVICE
    )
    os.environ["REQUESTS_CA_BUNDLE"] = str(sim.ca_cert_path)  # the service SDK trusts the hub
    key = Ed25519PrivateKey.generate()
    artifacts = ArtifactServer(
        RUN_DIR / "artifacts", host=sim.host, certificates=RUN_DIR / "sim" / "certs"
    )
    await artifacts.start()
    try:
        module = _start_module(sim, key, artifacts, args, image=image, docker=docker)
    except BaseException:
        await artifacts.close()
        sim.stop()
        raise
    sensor = IoTHubModuleClient.create_from_connection_string(
        sim.module_connection_string(DEVICE, SENSOR),
        server_verification_cert=sim.ca_cert_path.read_text(),
    )
    traffic = Traffic()
    stop_sensor = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        registry = IoTHubRegistryManager.from_connection_string(sim.service_connection_string)
        print(f"simulator: IoT Hub + edgeHub on {sim.host} (run files in {RUN_DIR})")
        releases = [_signed(artifacts, key, version, seed) for version, seed in ((1, 0), (2, 1))]
        swap_v1 = await _release(registry, releases[0], 1)
        print(f"v1 released through the module twin: active after {swap_v1:.2f} s")
        await sensor.connect()
        tasks.append(asyncio.ensure_future(_collect(sim, traffic)))
        tasks.append(asyncio.ensure_future(_sensor(sensor, traffic, stop_sensor)))
        await asyncio.sleep(args.seconds / 2)
        swap_v2 = await _release(registry, releases[1], 2)
        print(f"v2 hot-swapped under traffic: active after {swap_v2:.2f} s")
        await asyncio.sleep(args.seconds / 2)
        stop_sensor.set()
        await tasks[1]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await traffic.all_answered.wait()
        _summary(
            traffic, swap_v1, swap_v2, args, await asyncio.to_thread(_reported_model, registry)
        )
        if args.keep_running:
            print("\nkept running; Ctrl-C stops everything")
            await asyncio.Event().wait()
        return 0 if len(traffic.answered) == len(traffic.sent) and not traffic.errors else 1
    finally:
        stop_sensor.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sensor.shutdown()
        await _stop_module(module)
        await artifacts.close()
        sim.stop()


def _signed(
    artifacts: ArtifactServer, key: Ed25519PrivateKey, version: int, seed: int
) -> dict[str, Any]:
    data = bytes(tiny_mlp(seed).SerializeToString())
    url = artifacts.publish(f"tiny-v{version}.onnx", data)
    return build_manifest(data, name="tiny", version=version, url=url, key=key, key_id=KEY_ID)


async def _stop_module(module: subprocess.Popen[bytes] | ModuleContainer) -> None:
    if isinstance(module, ModuleContainer):
        try:
            code = await asyncio.to_thread(module.stop)
            print(f"module container stopped with docker stop, exit code {code}")
        finally:
            module.remove()
        return
    if module.poll() is None:
        module.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(module.wait, 15)
        print(f"module stopped with SIGTERM, exit code {code}")


def _summary(
    traffic: Traffic,
    swap_v1: float,
    swap_v2: float,
    args: argparse.Namespace,
    model: dict[str, Any],
) -> None:
    latencies = sorted(traffic.answered.values())
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")
    print("\nsummary")
    print(f"  releases: v1 active in {swap_v1:.2f} s, v2 swapped in {swap_v2:.2f} s under traffic")
    print(f"  reported: model {model.get('name')} v{model.get('version')} {model.get('state')}")
    print(
        f"  messages: {len(traffic.sent)} sent, {len(traffic.answered)} answered, "
        f"{len(traffic.sent) - len(traffic.answered)} lost, {len(traffic.errors)} errors"
    )
    print(f"  answers by model version: {dict(sorted(traffic.versions.items()))}")
    print(f"  route latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(
        f"  agent: http://127.0.0.1:{args.http_port}/v2/models/tiny, "
        f"metrics http://127.0.0.1:{args.metrics_port}/metrics"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--keep-running", action="store_true", help="leave everything up")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=9600)
    parser.add_argument("--seconds", type=float, default=20.0, help="traffic duration")
    parser.add_argument(
        "--container", action="store_true", help="run the module from the device image"
    )
    args = parser.parse_args()
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    docker = Docker()
    engine = Engine(docker, RUN_DIR / "dockerd.log")
    image = None
    try:
        if args.container:
            engine.start()
            print("image: building the device image from the Dockerfile (cached after the first)")
            image = build_default(docker, default_tag(), RUN_DIR).tag
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_run(args, image, docker))
    except ImageError as error:
        print(f"demo: {error.reason}: {error}", file=sys.stderr)
        return 1
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
