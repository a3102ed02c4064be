"""`make demo`: the whole MLOps loop on one machine, with no Azure account and no Docker.

    python -m demo [--keep-running] [--container] [--run-dir run/demo] [--retrain-timeout 240]

1. starts Azurite (HTTPS on loopback), the offline IoT Hub + edgeHub (`simulator/`) with a fleet
   of three devices in two rings (canary: plant-1; all: every device), and a real agent process
   (`python -m module`) per device (with --container, the canary's agent runs from the device
   image built from the Dockerfile, demo/container.py);
2. trains v1 with the example pipeline (`deployment/retrain/pipeline.py`, tracked in MLflow on
   SQLite), then the publisher registers it with its drift baseline pack, uploads both to
   Azurite, signs the manifest and releases it ring by ring (canary, then all, each gated on
   probation);
3. a sensor module per device sends readings through the `infer` route and, a few readings
   later, their true class through the `feedback` route;
4. trains and releases v2 under that traffic: every agent hot-swaps without losing a message;
5. the plant's sensors are recalibrated wrongly (`sensor_data.RECALIBRATED`): the agents detect
   the drift against v2's baseline and report it; the maintenance log's labelled readings land
   in the folder the retraining controller reads;
6. the controller (`deployment/retrain/controller.py`) sees drift on enough devices, retrains,
   gates the candidate against the champion on the drifted window and the holdout, and hands it
   to the publisher, which rolls v3 out ring by ring;
7. prints a summary (and a JSON line the tests check) and stops everything, or keeps it up
   with --keep-running. Exit status 0 only when the whole loop closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from azure.iot.device.aio import IoTHubModuleClient
from azure.storage.blob import BlobServiceClient
from rich.console import Console

from agent.logs import configure_logging
from demo.sensors import Sensor
from demo.world import (
    AGENT,
    FLEET,
    MAX_LATENCY_RATIO,
    MODEL,
    PROFILES_CONTAINER,
    RINGS,
    SENSOR,
    World,
    start_world,
)
from deployment import cli
from deployment.config import load as load_config
from deployment.drift.baseline_pack import BaselineOptions
from deployment.errors import PublisherError
from deployment.examples import sensor_data
from deployment.image.build import build_default, default_tag
from deployment.image.docker import Docker, Engine, ImageError
from deployment.publish import gate, rollout
from deployment.publish.publisher import Publisher, Services
from deployment.publish.registry import ring_alias
from deployment.retrain.controller import Controller, ControllerConfig, Job, PipelineTrainer
from deployment.retrain.pipeline import BASELINE_FILE, PipelineConfig, run_pipeline
from deployment.retrain.policy import Decision, RetrainPolicy
from deployment.retrain.verbs import PublisherReleaser, tracker_for
from simulator.core import UpstreamMessage

RUN_DIR = Path("run/demo")  # the default; --run-dir moves it (tests use a temporary one)
READING_PERIOD_S = 0.05  # per sensor: 20 readings a second, 60 across the fleet
# The baseline packs calibrate the window sizes the devices watch (demo/world.py: 50 rows);
# fewer resamples than the default keep training quick, at a looser false-alarm bound.
DEMO_BASELINE = BaselineOptions(window_sizes=(50, 100), resamples=500, simulated_windows=20_000)
# The controller: drift on at least 2 devices and half the fleet, for 2 polls in a row; data
# streams in all the time, so its arrival alone starts nothing.
POLICY = RetrainPolicy(
    cooldown_s=600.0,
    min_drifting_devices=2,
    min_drifting_share=0.5,
    sustain_polls=2,
    retrain_on_new_data=False,
)
POLL_S = 2.0
GATE = gate.GateBounds(timeout_s=120.0, poll_s=0.5, max_p99_ratio=MAX_LATENCY_RATIO)

T = TypeVar("T")


class DemoError(Exception):
    """A step of the loop did not close; the message says which and where to look."""


@dataclass
class Traffic:
    """Every reading the sensors sent and what came back upstream for it."""

    answered: dict[str, float] = field(default_factory=dict)  # correlation id -> received
    errors: list[str] = field(default_factory=list)
    versions: dict[int, int] = field(default_factory=dict)  # model version -> answers
    unknown: int = 0  # predictions whose correlation id no sensor sent

    def record(self, item: UpstreamMessage, sent: Callable[[str], bool]) -> None:
        if item.output != "predictions":
            return
        correlation = str(item.message.system.get("correlationId", ""))
        if not sent(correlation):
            self.unknown += 1
            return
        if correlation in self.answered:
            return
        self.answered[correlation] = item.received_at
        try:
            body = json.loads(item.message.body)
        except ValueError:
            self.errors.append("a prediction that is not JSON")
            return
        if not isinstance(body, dict) or "error" in body:
            self.errors.append(str(body.get("error") if isinstance(body, dict) else body))
            return
        version = body.get("model_version")
        key = int(version) if isinstance(version, int | str) and str(version).isdigit() else -1
        self.versions[key] = self.versions.get(key, 0) + 1


@dataclass
class Events:
    """What the demo saw the fleet report, in order (seconds since the start)."""

    started: float
    lines: list[tuple[float, str, str, str]] = field(default_factory=list)  # t, device, kind, value
    last: dict[tuple[str, str], str] = field(default_factory=dict)

    def observe(self, device: str, kind: str, value: str) -> bool:
        if self.last.get((device, kind)) == value:
            return False
        self.last[(device, kind)] = value
        self.lines.append((time.monotonic() - self.started, device, kind, value))
        return True

    def of(self, kind: str) -> list[tuple[float, str, str, str]]:
        return [line for line in self.lines if line[2] == kind]


class Demo:
    def __init__(self, world: World) -> None:
        self.world = world
        self.started = time.monotonic()
        self.events = Events(self.started)
        self.traffic = Traffic()
        self.sensors: dict[str, Sensor] = {}
        self.clients: list[IoTHubModuleClient] = []
        self.stop_sensors = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.controller_outcomes: list[str] = []
        self.job: Job | None = None
        self.fault_at: dict[str, int] = {}
        log_file = (world.run_dir / "publisher.log").open("w", encoding="utf-8")
        self._publisher_log = log_file
        console = Console(file=log_file, width=160, no_color=True)
        resolved = load_config(world.config_path, "simulator", world.environ)
        self.services = Services(resolved, environ=world.environ)
        self.publisher = Publisher(self.services, console, console)
        self.releaser = PublisherReleaser(self.services, self.publisher, list(RINGS), GATE)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    # -- steps ----------------------------------------------------------------------------

    async def train(self, name: str, seed: int) -> Path:
        out = self.world.run_dir / "training" / name
        config = PipelineConfig(out, seed=seed, rows=3000, baseline=DEMO_BASELINE)
        result = await asyncio.to_thread(lambda: run_pipeline(config, tracker_for(self.services)))
        self.say(
            f"trained {name} (seed {seed}): accuracy {result.metrics['accuracy']:.3f}, "
            f"sha256 {result.sha256[:12]}, MLflow run {result.run_id[:8]}, "
            f"baseline pack {(out / BASELINE_FILE).stat().st_size} bytes"
        )
        return out

    async def release(self, out: Path, why: str) -> int:
        self.say(f"publisher: register, upload, sign and release ({why}) through canary, all")
        version = await asyncio.to_thread(self.releaser.register, MODEL, out)
        await asyncio.to_thread(self.releaser.release, MODEL, version, why)
        versions = {d: self.world.reported(d).get("version") for d in FLEET}
        self.say(f"{MODEL} v{version} released to every ring; reported versions {versions}")
        return version

    async def start_sensors(self) -> None:
        for index, device in enumerate(FLEET):
            client = IoTHubModuleClient.create_from_connection_string(
                self.world.sim.module_connection_string(device, SENSOR),
                server_verification_cert=self.world.sim.ca_cert_path.read_text(),
            )
            await client.connect()
            self.clients.append(client)
            self.sensors[device] = Sensor(device, client, seed=index + 1)
        self.tasks.append(asyncio.ensure_future(self._collect()))
        for device, sensor in self.sensors.items():
            self.tasks.append(asyncio.ensure_future(self._sense(device, sensor)))
        self.tasks.append(asyncio.ensure_future(self._watch_fleet()))

    async def _sense(self, device: str, sensor: Sensor) -> None:
        """The sensor starts once its agent serves a model (nothing to answer before)."""
        while self.world.reported(device).get("state") != "active":
            if self.stop_sensors.is_set():
                return
            await asyncio.sleep(0.2)
        await sensor.run(self.stop_sensors, READING_PERIOD_S)

    def _sent(self, correlation: str) -> bool:
        return any(correlation in s.sent.times for s in self.sensors.values())

    async def _collect(self) -> None:
        async for item in self.world.sim.upstream.follow(backlog=True):
            self.traffic.record(item, self._sent)

    async def _watch_fleet(self) -> None:
        """Every half second: each device's serving version, drift and quality, as events."""
        while True:
            for device in FLEET:
                entry = await asyncio.to_thread(self.world.reported, device)
                version = entry.get("version")
                serving = entry.get("state") == "active" and version is not None
                if serving and self.events.observe(device, "serving", f"v{version}"):
                    self.say(f"{device}: serving v{version}")
                for kind in ("drift", "quality"):
                    section = entry.get(kind)
                    state = section.get("state") if isinstance(section, dict) else None
                    if state is not None and self.events.observe(device, kind, str(state)):
                        score = section.get("score") if isinstance(section, dict) else None
                        extra = f" (score {score:.2f})" if isinstance(score, float) else ""
                        self.say(f"{device}: {kind} {state}{extra}")
            await asyncio.sleep(0.5)

    def land_field_data(self) -> int:
        """The labelled readings sent since the fault, as one .npz in the controller's data
        folder (replaced atomically: the controller never reads half a file)."""
        parts = [s.labelled(self.fault_at[d]) for d, s in self.sensors.items()]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if len(x) == 0:
            return 0
        folder = self.world.run_dir / "field-data"
        folder.mkdir(exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            np.savez(handle, x=x, y=y)
        Path(temporary).replace(folder / "recalibrated.npz")
        return len(x)

    def controller(self) -> Controller:
        work = self.world.run_dir / "controller"
        trainer = PipelineTrainer(tracker_for(self.services), seed=9, baseline=DEMO_BASELINE)
        return Controller(
            ControllerConfig(
                model=MODEL,
                module=AGENT,
                data_dir=self.world.run_dir / "field-data",
                work_dir=work,
                policy=POLICY,
            ),
            fleet=self.services.hub(),
            trainer=trainer,
            releaser=self.releaser,
            audit=self.services.audit,
        )

    async def retrain_loop(self, deadline: float) -> Job:
        controller = self.controller()
        last = ""
        while time.monotonic() < deadline:
            landed = await asyncio.to_thread(self.land_field_data)
            outcome: Decision | Job = await asyncio.to_thread(controller.poll)
            if isinstance(outcome, Job):
                self.say(
                    f"controller: retraining ({outcome.trigger}) ended at {outcome.stage}"
                    + (f" as v{outcome.version}" if outcome.version else "")
                    + (f"; gate {outcome.gate['reason']}" if outcome.gate else "")
                )
                self.controller_outcomes.append(f"{outcome.trigger}:{outcome.stage}")
                if outcome.stage in {"released", "failed"} or outcome.promote is False:
                    return outcome
            else:
                text = f"controller: holds ({outcome.hold}); {landed} labelled readings landed"
                if str(outcome.hold) != last:
                    self.say(text)
                    last = str(outcome.hold)
            await asyncio.sleep(POLL_S)
        raise DemoError(
            "the controller did not retrain in time: is drift reported by the agents "
            f"(properties.reported.models.{MODEL}.drift)? see {self.world.run_dir}/devices/*/"
        )

    # -- the end ----------------------------------------------------------------------------

    async def drain(self) -> None:
        self.stop_sensors.set()
        sent = sum(len(s.sent.times) for s in self.sensors.values())
        deadline = time.monotonic() + 30
        while len(self.traffic.answered) < sent and time.monotonic() < deadline:  # noqa: ASYNC110 - answers arrive on the hub's thread
            await asyncio.sleep(0.2)

    def drift_report(self) -> Path | None:
        """The routed window profiles from Azurite, merged by `deployment drift-report`."""
        self.world.sim.flush_storage()
        profiles = self.world.run_dir / "drift-profiles"
        profiles.mkdir(exist_ok=True)
        service = BlobServiceClient.from_connection_string(self.world.azurite.connection_string)
        container = service.get_container_client(PROFILES_CONTAINER)
        with contextlib.suppress(Exception):
            for index, blob in enumerate(container.list_blobs()):
                data = container.download_blob(blob.name).readall()
                (profiles / f"{index:04d}.json").write_bytes(data)
        packs = sorted((self.world.run_dir).glob(f"**/{BASELINE_FILE}"))
        if not any(profiles.iterdir()) or not packs:
            return None
        out = self.world.run_dir / "drift-report"
        argv = ["drift-report", "--profiles", str(profiles), "--baseline", *map(str, packs)]
        code = cli.run(
            [*argv, "--bucket-seconds", "10", "-o", str(out)],
            environ=self.world.environ,
            stdout=self._publisher_log,
            stderr=self._publisher_log,
            logs=False,
        )
        return out if code == 0 else None

    def summary(self, report: Path | None) -> dict[str, Any]:
        sent = sum(len(s.sent.times) for s in self.sensors.values())
        answered = len(self.traffic.answered)
        rings: dict[str, dict[str, Any]] = {}
        registry = self.services.registry()
        for ring, condition in RINGS.items():
            devices = rollout.Rollout.devices_of(self.services.hub(), condition)
            rings[ring] = {
                "alias": registry.alias_version(MODEL, ring_alias(ring)),
                "devices": {d: self.world.reported(d).get("version") for d in sorted(devices)},
            }
        swaps = {
            d: [v for _, dev, kind, v in self.events.lines if dev == d and kind == "serving"]
            for d in FLEET
        }
        result: dict[str, Any] = {
            "seconds": round(time.monotonic() - self.started, 1),
            "rings": rings,
            "swaps": swaps,
            "messages": {
                "sent": sent,
                "answered": answered,
                "lost": sent - answered,
                "failed": len(self.traffic.errors),
                "by_version": {str(k): v for k, v in sorted(self.traffic.versions.items())},
            },
            "drift_events": [
                {"t": round(t, 1), "device": d, "state": v}
                for t, d, _, v in self.events.of("drift")
            ],
            "quality_events": [
                {"t": round(t, 1), "device": d, "state": v}
                for t, d, _, v in self.events.of("quality")
            ],
            "retraining": {
                "trigger": self.job.trigger if self.job else None,
                "stage": self.job.stage if self.job else None,
                "version": self.job.version if self.job else None,
                "gate": self.job.gate if self.job else None,
            },
        }
        run = self.world.run_dir.resolve()
        print("\nsummary")
        for ring, facts in rings.items():
            print(f"  ring {ring}: registry alias v{facts['alias']}, devices {facts['devices']}")
        for device, versions in swaps.items():
            print(f"  {device}: served {' -> '.join(versions)} ({max(0, len(versions) - 1)} swaps)")
        m = result["messages"]
        print(
            f"  messages: {m['sent']} readings sent, {m['answered']} answered, {m['lost']} lost,"
            f" {m['failed']} failed; answers by version {m['by_version']}"
        )
        print(
            f"  drift events: {len(result['drift_events'])}, quality events: "
            f"{len(result['quality_events'])}"
        )
        for t, device, kind, value in self.events.lines:
            if kind in {"drift", "quality"}:
                print(f"    {t:6.1f} s  {device}  {kind} -> {value}")
        r = result["retraining"]
        print(f"  retraining: trigger {r['trigger']}, ended {r['stage']}, version {r['version']}")
        if r["gate"]:
            g = r["gate"]
            print(
                f"    gate {g['reason']}: drifted window {g['candidate_window']:.3f} vs champion "
                f"{g['champion_window']:.3f}, holdout {g['candidate_holdout']:.3f} vs "
                f"{g['champion_holdout']:.3f}"
            )
        print(
            f"  MLflow: {self.world.mlflow_db}  (mlflow ui --backend-store-uri "
            f"sqlite:///{self.world.mlflow_db})"
        )
        print(f"  publisher: PUBLISHER_CONFIG={run / 'edgeml.toml'}, audit {run / 'audit.jsonl'}")
        for device, agent in self.world.agents.items():
            print(f"  {device}: metrics {agent.metrics_url}, log {agent.log_path.resolve()}")
        print(f"  drift report: {report.resolve() if report else 'none (no profiles routed)'}")
        print(
            f"  controller: {run / 'controller' / 'controller.json'}, "
            f"field data {run / 'field-data'}"
        )
        print("DEMO_SUMMARY " + json.dumps(result, sort_keys=True))
        return result

    async def close(self) -> None:
        self.stop_sensors.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.shutdown()
        self._publisher_log.close()


def closed(result: dict[str, Any]) -> list[str]:
    """What of the loop did not close (empty: all of it)."""
    problems = []
    final = result["retraining"]["version"]
    if result["retraining"]["stage"] != "released" or final is None:
        problems.append(f"no promoted retraining (ended {result['retraining']['stage']})")
    for ring, facts in result["rings"].items():
        if final is None or set(facts["devices"].values()) != {final} or facts["alias"] != final:
            problems.append(f"ring {ring} is not on v{final}: {facts}")
    m = result["messages"]
    if m["sent"] == 0 or m["lost"] or m["failed"]:
        problems.append(f"{m['lost']} readings lost and {m['failed']} failed of {m['sent']}")
    if not any(e["state"] == "drift" for e in result["drift_events"]):
        problems.append("no device reported drift")
    return problems


async def _step(demo: Demo, what: str, action: Callable[[], Any], limit_s: float) -> Any:
    try:
        async with asyncio.timeout(limit_s):
            return await action()
    except TimeoutError:
        raise DemoError(f"{what} took over {limit_s:.0f} s") from None
    except PublisherError as error:
        raise DemoError(f"{what}: [{error.reason}] {error.message}") from None


async def _loop(demo: Demo, args: argparse.Namespace) -> int:
    world = demo.world
    demo.say(
        f"hub on {world.sim.host} (fleet: {', '.join(FLEET)}; rings: {', '.join(RINGS)}), "
        f"Azurite on {world.azurite.blob_endpoint}, run files in {world.run_dir}"
    )
    for index, device in enumerate(FLEET):
        if index == 0 and args.image is not None:
            agent = world.start_agent_container(device, args.docker, args.image)
            assert agent.container is not None
            demo.say(f"{device}: agent container {agent.container.name} from {args.image}")
        else:
            world.start_agent(device)
    demo.say(f"{len(FLEET)} agents started; training v1 meanwhile")
    v1_dir = await _step(demo, "training v1", lambda: demo.train("v1", seed=7), 300)
    await demo.start_sensors()
    await _step(demo, "releasing v1", lambda: demo.release(v1_dir, "first release"), 300)
    v2_dir = await _step(demo, "training v2", lambda: demo.train("v2", seed=8), 300)
    await _step(demo, "releasing v2", lambda: demo.release(v2_dir, "hot swap"), 300)
    await asyncio.sleep(2)
    for device, sensor in demo.sensors.items():
        demo.fault_at[device] = sensor.count
        sensor.fault = sensor_data.RECALIBRATED
    demo.say(
        "the plant's sensors were recalibrated wrongly (temperature +9 °C, vibration x1.3): "
        "waiting for the agents to see it and the controller to act"
    )
    deadline = time.monotonic() + args.retrain_timeout
    try:
        demo.job = await _step(
            demo, "retraining", lambda: demo.retrain_loop(deadline), args.retrain_timeout + 300
        )
    except DemoError as error:
        # The summary still shows how far the loop got (and says what did not close).
        print(f"demo: {error}", file=sys.stderr)
    await asyncio.sleep(2)
    await demo.drain()
    report = await asyncio.to_thread(demo.drift_report)
    result = demo.summary(report)
    problems = closed(result)
    for problem in problems:
        print(f"demo: the loop did not close: {problem}", file=sys.stderr)
    if args.keep_running:
        print("\nkept running (the sensors stopped); Ctrl-C stops everything")
        await asyncio.Event().wait()
    return 1 if problems else 0


async def _run(args: argparse.Namespace) -> int:
    world = await asyncio.to_thread(start_world, args.run_dir)
    demo: Demo | None = None
    try:
        demo = Demo(world)
        return await _loop(demo, args)
    except DemoError as error:
        print(f"demo: {error} (logs in {args.run_dir})", file=sys.stderr)
        return 1
    finally:
        if demo is not None:
            await demo.close()
        await asyncio.to_thread(world.stop)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--keep-running", action="store_true", help="leave everything up")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="run files (emptied first)")
    parser.add_argument(
        "--retrain-timeout",
        type=float,
        default=240.0,
        help="seconds from the sensor fault to a released retraining",
    )
    parser.add_argument(
        "--container", action="store_true", help="the canary's agent runs from the device image"
    )
    args = parser.parse_args()
    # The demo prints its own progress; components log warnings and errors only.
    configure_logging("warning", stream=sys.stderr)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupted)  # a stopped demo still stops what it started
    shutil.rmtree(args.run_dir, ignore_errors=True)
    args.run_dir.mkdir(parents=True)
    args.docker = Docker()
    args.image = None
    engine = Engine(args.docker, args.run_dir / "dockerd.log")
    try:
        if args.container:
            engine.start()
            print("image: building the device image from the Dockerfile (cached after the first)")
            args.image = build_default(args.docker, default_tag(), args.run_dir).tag
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_run(args))
    except ImageError as error:
        print(f"demo: {error.reason}: {error}", file=sys.stderr)
        return 1
    finally:
        if args.container:
            engine.stop()
    return 130  # interrupted


if __name__ == "__main__":
    sys.exit(main())
