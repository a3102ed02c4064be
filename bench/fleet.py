"""A fleet of 1,000 edge devices in the simulator: rollout convergence, queries/s, memory.

The simulator runs as `python -m simulator start --fleet FILE` in a process of its own, so that
its memory is its own. Its fleet: `--devices` edge devices (each with the deployment's two
modules), one in ten tagged `ring: canary`, the rest `ring: broad`. Everything else goes through
the real SDKs:

1. rollout: `IoTHubConfigurationManager.create_configuration` of a layered deployment setting
   `properties.desired.model.version` of the `consumer` module on `tags.ring = 'canary'` (10 %),
   then `update_configuration` (with its etag) retargeting it to every ring (100 %). Converged
   when the configuration's custom metric (`SELECT deviceId FROM devices.modules WHERE
   moduleId = 'consumer' AND properties.desired.model.version = N`), read with
   `get_configuration` as an operator would, equals its `targetedCount`, and every connected
   module of the sample (`--connected` real `IoTHubModuleClient`s, spread over both rings) that
   is targeted has received its desired-property patch. Seconds from the create / update call.
2. queries/s: `query_iot_hub` for one page (the canary ring: 100 twins at 1,000 devices) and
   for the whole fleet paged by 100 (`devices`), each for `--query-seconds`; and the same
   queries as plain REST requests (`rest_*`): the SDK spends most of its time deserialising
   rows into its models, so these tell what the simulator itself answers.
3. memory: the simulator process's RSS after start, and after the rollouts.

The baseline, in the same run: the same simulator with one device (start time, RSS, the same
queries). Every statistic is the median over `--rounds` (a fresh simulator each round).

    python -m bench.fleet [--devices 1000] [--rounds 3] [--connected 20] [--query-seconds 3]

Last line: {"devices", "converge_10pct_s", "converge_100pct_s", "queries_per_s", ...};
the same JSON goes to bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import requests
from azure.iot.device.aio import IoTHubModuleClient
from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    QuerySpecification,
)

from bench._machine import machine_busy, stop
from simulator import pick_loopback_host, sas

RESULTS = Path(__file__).parent / "results" / "fleet.json"
MODULE = "consumer"
MANIFEST: dict[str, Any] = {
    "modulesContent": {
        "$edgeAgent": {
            "properties.desired": {
                "schemaVersion": "1.1",
                "modules": {"producer": {"type": "docker"}, MODULE: {"type": "docker"}},
            }
        },
        "$edgeHub": {
            "properties.desired": {
                "schemaVersion": "1.1",
                "routes": {"up": "FROM /messages/* INTO $upstream"},
            }
        },
        MODULE: {"properties.desired": {"model": {"name": "m", "version": 1}}},
    }
}


def fleet_file(devices: int) -> dict[str, Any]:
    return {
        "devices": {
            f"edge-{n:05d}": {"tags": {"ring": "canary" if n % 10 == 0 else "broad"}}
            for n in range(devices)
        }
    }


class RunningSimulator:
    """`python -m simulator start` in a process of its own; `info` is its simulator.json."""

    def __init__(self, devices: int, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "deployment.json").write_text(json.dumps(MANIFEST))
        (work / "fleet.json").write_text(json.dumps(fleet_file(devices)))
        self.run_dir = work / "run"
        started = time.monotonic()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulator",
                "start",
                "--deployment",
                str(work / "deployment.json"),
                "--fleet",
                str(work / "fleet.json"),
                "--host",
                pick_loopback_host(),
                "--run-dir",
                str(self.run_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        info_file = self.run_dir / "simulator.json"
        while not info_file.exists():
            if self.process.poll() is not None or time.monotonic() - started > 120:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.02)
        self.start_s = time.monotonic() - started
        self.info: dict[str, Any] = json.loads(info_file.read_text())
        os.environ["REQUESTS_CA_BUNDLE"] = self.info["ca_cert"]

    def rss_mb(self) -> float:
        return round(psutil.Process(self.process.pid).memory_info().rss / 2**20, 1)

    def close(self) -> None:
        stop(self.process)


@contextlib.contextmanager
def simulator(devices: int, work: Path) -> Iterator[RunningSimulator]:
    running = RunningSimulator(devices, work)
    try:
        yield running
    finally:
        running.close()


def layer(version: int, target: str) -> Configuration:
    return Configuration(
        id="model-rollout",
        target_condition=target,
        priority=10,
        content=ConfigurationContent(
            modules_content={MODULE: {"properties.desired.model.version": version}}
        ),
        metrics=ConfigurationMetrics(
            queries={
                "desiredOk": "SELECT deviceId FROM devices.modules WHERE moduleId = "
                f"'{MODULE}' AND properties.desired.model.version = {version}"
            }
        ),
    )


class Sample:
    """Real module clients of a few devices, on a loop of their own, recording patch times."""

    def __init__(self, info: dict[str, Any], devices: list[str]) -> None:
        self._info = info
        self._ca = Path(info["ca_cert"]).read_text()
        self.devices = devices
        self.received: dict[str, dict[int, float]] = {d: {} for d in devices}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._clients: list[IoTHubModuleClient] = []
        self._run(self._connect())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(120)

    async def _connect(self) -> None:
        for device in self.devices:
            env = self._info["modules"][f"{device}/{MODULE}"]
            client = IoTHubModuleClient.create_from_connection_string(
                env["EdgeHubConnectionString"], server_verification_cert=self._ca
            )
            await client.connect()
            client.on_twin_desired_properties_patch_received = self._handler(device)
            self._clients.append(client)

    def _handler(self, device: str) -> Callable[[dict[str, Any]], None]:
        def handle(patch: dict[str, Any]) -> None:
            version = patch.get("model", {}).get("version")
            if isinstance(version, int):
                self.received[device].setdefault(version, time.monotonic())

        return handle

    def close(self) -> None:
        async def shutdown() -> None:
            for client in self._clients:
                await client.shutdown()

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def converge(
    configs: IoTHubConfigurationManager,
    sample: Sample,
    targeted_devices: set[str],
    *,
    version: int,
    started: float,
    timeout_s: float = 120.0,
) -> float:
    """Seconds from `started` until the metric and the connected sample say every target has
    the version."""
    while True:
        got = configs.get_configuration("model-rollout")
        done_metric = got.metrics.results.get("desiredOk") == len(targeted_devices)
        waiting = [d for d in sample.devices if d in targeted_devices]
        done_sample = all(version in sample.received[d] for d in waiting)
        if done_metric and done_sample:
            last_patch = max((sample.received[d][version] for d in waiting), default=started)
            return round(max(time.monotonic(), last_patch) - started, 3)
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"version {version} did not converge in {timeout_s} s")
        time.sleep(0.01)


def queries_per_s(registry: IoTHubRegistryManager, text: str, seconds: float) -> float:
    """Complete queries (every page, 100 a page) per second."""
    done = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        token = None
        while True:
            result = registry.query_iot_hub(QuerySpecification(query=text), token, 100)
            token = result.continuation_token
            if not token:
                break
        done += 1
    return round(done / (time.monotonic() - started), 1)


CANARY_QUERY = "SELECT * FROM devices WHERE tags.ring = 'canary'"
FLEET_QUERY = "SELECT * FROM devices"


def rest_queries_per_s(info: dict[str, Any], text: str, seconds: float) -> float:
    """The same queries as plain REST requests (one keep-alive session, rows parsed as JSON):
    what the simulator answers, without the SDK's model deserialisation (most of its time)."""
    fields = dict(part.split("=", 1) for part in info["service_connection_string"].split(";"))
    url = f"https://{fields['HostName']}/devices/query?api-version=2021-04-12"
    done = 0
    with requests.Session() as session:
        session.verify = info["ca_cert"]
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            token = None
            while True:
                expiry = int(time.time()) + 3600
                headers = {
                    "Authorization": sas.generate(
                        fields["HostName"], fields["SharedAccessKey"], expiry, "iothubowner"
                    ),
                    "x-ms-max-item-count": "100",
                }
                if token:
                    headers["x-ms-continuation"] = token
                response = session.post(url, json={"query": text}, headers=headers, timeout=30)
                response.raise_for_status()
                response.json()
                token = response.headers.get("x-ms-continuation")
                if not token:
                    break
            done += 1
        return round(done / (time.monotonic() - started), 1)


def measure_queries(running: RunningSimulator, seconds: float) -> dict[str, float]:
    registry = IoTHubRegistryManager.from_connection_string(
        running.info["service_connection_string"]
    )
    try:
        return {
            "canary_page_qps": queries_per_s(registry, CANARY_QUERY, seconds),
            "whole_fleet_paged_qps": queries_per_s(registry, FLEET_QUERY, seconds),
            "rest_canary_page_qps": rest_queries_per_s(running.info, CANARY_QUERY, seconds),
            "rest_whole_fleet_paged_qps": rest_queries_per_s(running.info, FLEET_QUERY, seconds),
        }
    finally:
        registry.amqp_svc_client.disconnect_sync()


def fleet_round(devices: int, connected: int, query_seconds: float, work: Path) -> dict[str, Any]:
    with simulator(devices, work) as running:
        rss_start = running.rss_mb()
        ids = list(fleet_file(devices)["devices"])
        canary = {d for n, d in enumerate(ids) if n % 10 == 0}
        # Half the sample in the canary ring, half outside it.
        step = max(1, len(ids) // max(1, connected))
        chosen = sorted(
            {*list(canary)[: connected // 2], *ids[1::step][: connected - connected // 2]}
        )
        sample = Sample(running.info, chosen)
        configs = IoTHubConfigurationManager.from_connection_string(
            running.info["service_connection_string"]
        )
        try:
            started = time.monotonic()
            created = configs.create_configuration(layer(2, "tags.ring = 'canary'"))
            ten = converge(configs, sample, canary, version=2, started=started)
            created.target_condition = "tags.ring IN ['canary', 'broad']"
            started = time.monotonic()
            configs.update_configuration(created, created.etag)
            hundred = converge(configs, sample, set(ids), version=2, started=started)
            # Outside the canary ring the sample got version 2 only from the retargeting.
            outside = [d for d in sample.devices if d not in canary]
            assert all(2 in sample.received[d] for d in outside)
            applied = configs.get_configuration("model-rollout").system_metrics.results
        finally:
            sample.close()
        queries = measure_queries(running, query_seconds)
        return {
            "start_s": round(running.start_s, 3),
            "rss_start_mb": rss_start,
            "rss_after_mb": running.rss_mb(),
            "converge_10pct_s": ten,
            "converge_100pct_s": hundred,
            "applied": applied,
            **queries,
        }


def baseline_round(query_seconds: float, work: Path) -> dict[str, Any]:
    with simulator(1, work) as running:
        return {
            "start_s": round(running.start_s, 3),
            "rss_start_mb": running.rss_mb(),
            **measure_queries(running, query_seconds),
        }


def median(rounds: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(r[key] for r in rounds)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connected", type=int, default=20)
    parser.add_argument("--query-seconds", type=float, default=3.0)
    args = parser.parse_args()
    busy_before, wall_before = machine_busy(), time.monotonic()
    fleet_rounds: list[dict[str, Any]] = []
    base_rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for index in range(args.rounds):
            base_rounds.append(baseline_round(args.query_seconds, Path(tmp) / f"base-{index}"))
            fleet_rounds.append(
                fleet_round(
                    args.devices, args.connected, args.query_seconds, Path(tmp) / f"f-{index}"
                )
            )
    machine_cores = (machine_busy() - busy_before) / (time.monotonic() - wall_before)
    result: dict[str, Any] = {
        "devices": args.devices,
        "modules": 2 * args.devices,
        "connected_sample": args.connected,
        "converge_10pct_s": median(fleet_rounds, "converge_10pct_s"),
        "converge_100pct_s": median(fleet_rounds, "converge_100pct_s"),
        "queries_per_s": {
            "canary_page": median(fleet_rounds, "canary_page_qps"),
            "whole_fleet_paged": median(fleet_rounds, "whole_fleet_paged_qps"),
            "one_device_baseline_canary_page": median(base_rounds, "canary_page_qps"),
            "one_device_baseline_whole_fleet_paged": median(base_rounds, "whole_fleet_paged_qps"),
            "rest_canary_page": median(fleet_rounds, "rest_canary_page_qps"),
            "rest_whole_fleet_paged": median(fleet_rounds, "rest_whole_fleet_paged_qps"),
            "rest_one_device_baseline": median(base_rounds, "rest_canary_page_qps"),
        },
        "start_s": median(fleet_rounds, "start_s"),
        "baseline_start_s": median(base_rounds, "start_s"),
        "rss_mb": median(fleet_rounds, "rss_start_mb"),
        "rss_after_rollouts_mb": median(fleet_rounds, "rss_after_mb"),
        "baseline_rss_mb": median(base_rounds, "rss_start_mb"),
        "rss_ratio": round(
            median(fleet_rounds, "rss_after_mb") / median(base_rounds, "rss_start_mb"), 3
        ),
        "machine_cores_busy": round(machine_cores, 2),
        "rounds": {"fleet": fleet_rounds, "baseline": base_rounds},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
