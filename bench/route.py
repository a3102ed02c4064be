"""Inferences per second through IoT Edge routes: the agent module against an echo module.

One simulator (`simulator.Simulator`, the real azure-iot-device SDK on every side) runs the
deployment template with an `echo` module added: the `sensor` module's output named after a
module (`mlagent`, `echo`) is routed to that module's input `infer`, and every module's
`predictions` to `$upstream`. Three processes besides this one:

    mlagent  `python -m module`, the agent as the IoT Edge module; the tiny model (input FP32
             [1, 32] -> output [1, 8]) is published through its twin as a signed manifest,
             the artifact served over HTTPS from this process
    echo     `python -m bench._echo_module`: the same SDK path (handler thread -> loop ->
             task -> `send_message_to_output`), relaying the request body unchanged
    sensor   this process: a real `IoTHubModuleClient` (aio) keeping `--window` v2 infer
             requests (batch-1 JSON) in flight, each with a unique correlation id

A message's latency runs from the sender's `send_message_to_output` call to its arrival in
the simulator's `$upstream` feed (`received_at`). A request's slot in the window frees when
its answer arrives. Each run warms up for `--warmup` s, then measures `--duration` s: the
rate counts answers that arrived inside the window, the latencies requests sent inside it.
Then sending stops and every request must be answered exactly once within `--drain` s:
missing, duplicate, unknown and error answers (the agent's v2 error bodies, or a wrong
output shape / a changed echo body) are counted.

All modules stay connected for the whole run; every round measures each once, back to back,
in an order rotated each round, and each statistic is the median over rounds. CPU clocks of
this process (`bench`: the simulator and the sender), of the module under test (`module`)
and of the machine are read at the window's edges: `*_cpu_us_per_msg` is what one message
costs each, `machine_cores` minus the others is work that is not ours (the machine may be
shared); `loop_thread_cpu_us_per_msg` is the part of the module's CPU spent by its main
thread (the event loop; the SDK's threads are the rest); `module_switches_per_msg` counts
the module's context switches (all threads) and,
for the agent, `model_calls_per_msg` its ONNX Runtime calls (under 1 when messages share one).

    python -m bench.route [--rounds 9] [--duration 6] [--warmup 1.5] [--window 64]
                          [--echo-onnx] [--profile DIR]

Diagnostics (their results are printed, not written to bench/results/):
`--agent-env NAME=VALUE` (repeatable) adds an `EDGEML_*` setting to the agent, e.g.
`EDGEML_COALESCE_ABOVE_US=0` to stack the route messages queued together into one model call.
`--switch-interval S` sets `sys.setswitchinterval(S)` in every module process (through a
`sitecustomize` on their PYTHONPATH; CPython's default is 0.005). `--echo-onnx` adds a third
module, `echo-onnx`: the echo that also runs the tiny model once
per message on its event loop, as the agent does, which tells the cost of that call apart
from the rest of the agent's work. `--profile DIR` runs every module under cProfile (the
main thread only, where the event loop and the agent's inference run, not the SDK's
threads) and writes `DIR/<module>.prof`; `--profile-clock cpu` (the default) charges each
function the main thread's CPU time, `wall` the elapsed time, waits for the GIL included.

Last line: {"agent_msgs_per_s", "echo_msgs_per_s", "ratio", "p99_ms", ...} (p99 is the
agent's); the same JSON goes to bench/results/route.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.metadata
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from aiohttp import web
from azure.iot.device import Message
from azure.iot.device.aio import IoTHubModuleClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from agent.releases.manifest import public_key_to_b64
from bench._machine import machine_busy, stop, wait_for_quiet_machine
from deployment.examples.onnx_models import tiny_mlp
from deployment.publish.release import build_manifest
from simulator import certs
from simulator.core import UpstreamMessage
from simulator.hub import Simulator, pick_loopback_host, wait_until

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "route.json"
TEMPLATE = REPO / "deployment" / "deployment.template.json"
AGENT, ECHO, ECHO_ONNX, SENDER = "mlagent", "echo", "echo-onnx", "sensor"
ECHOES = (ECHO, ECHO_ONNX)
PREDICTIONS = "predictions"
MODEL, KEY_ID = "m", "bench"
FEATURES, OUTPUTS = 32, 8
SCHEMAS = {AGENT: "oip-v2-response/1", ECHO: "bench-echo/1", ECHO_ONNX: "bench-echo/1"}
ERROR_SCHEMA = "oip-v2-error/1"


# ------------------------------------------------------------------ deployment (pure)


def bench_deployment(template: Mapping[str, Any], echoes: Sequence[str]) -> dict[str, Any]:
    """The template plus `echoes` modules; the sender's output named after a module goes to
    that module's `infer`, and every module's `predictions` to `$upstream`."""
    document = copy.deepcopy(dict(template))
    content = document["modulesContent"]
    modules = content["$edgeAgent"]["properties.desired"]["modules"]
    routes = content["$edgeHub"]["properties.desired"]["routes"]
    if AGENT not in modules or SENDER not in modules:
        raise ValueError(f"the template has no {AGENT!r} or no {SENDER!r} module")
    source = f"/messages/modules/{SENDER}/outputs"
    # The template's sensor route takes every output; each module gets its own here.
    routes["sensorToAgent"] = (
        f'FROM {source}/{AGENT} INTO BrokeredEndpoint("/modules/{AGENT}/inputs/infer")'
    )
    for index, echo in enumerate(echoes):
        modules[echo] = copy.deepcopy(modules[SENDER]) | {"settings": {"image": "bench-echo"}}
        routes[f"sensorToEcho{index}"] = (
            f'FROM {source}/{echo} INTO BrokeredEndpoint("/modules/{echo}/inputs/infer")'
        )
        routes[f"echo{index}Upstream"] = (
            f"FROM /messages/modules/{echo}/outputs/{PREDICTIONS} INTO $upstream"
        )
    return document


def request_body(seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal(FEATURES).astype(np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, FEATURES], "data": x.tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def check_answer(config: str, item: UpstreamMessage, request: bytes) -> str | None:
    """None for a good answer, else the error kind (a bounded set of strings)."""
    schema = item.message.properties.get("schema")
    if schema == ERROR_SCHEMA:
        return "v2_error"
    if schema != SCHEMAS[config]:
        return "wrong_schema"
    if config in ECHOES:
        return None if item.body == request else "changed_body"
    outputs = json.loads(item.body)["outputs"]
    if outputs[0]["shape"] != [1, OUTPUTS] or len(outputs[0]["data"]) != OUTPUTS:
        return "wrong_shape"
    return None


# ------------------------------------------------------------------ one measured run


@dataclass
class Run:
    """One configuration's run: what was sent, what came back, and when (wall clock)."""

    config: str
    tag: str
    window: asyncio.Semaphore
    open_at: float = 0.0
    close_at: float = 0.0
    sent: dict[str, float] = field(default_factory=dict)
    answers: dict[str, UpstreamMessage] = field(default_factory=dict)
    duplicates: int = 0
    send_failures: int = 0
    all_answered: asyncio.Event = field(default_factory=asyncio.Event)
    sending_done: bool = False
    cpu_s: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)  # counters' growth in the window

    def on_answer(self, correlation: str, item: UpstreamMessage) -> bool:
        """Record an answer; False if it is none of this run's requests."""
        if correlation not in self.sent:
            return False
        if correlation in self.answers:
            self.duplicates += 1
            return True
        self.answers[correlation] = item
        self.window.release()
        self._check_done()
        return True

    def on_send_failed(self, correlation: str) -> None:
        self.send_failures += 1
        self.sent.pop(correlation, None)
        self.window.release()
        self._check_done()

    def finish_sending(self) -> None:
        self.sending_done = True
        self._check_done()

    def _check_done(self) -> None:
        if self.sending_done and len(self.answers) >= len(self.sent):
            self.all_answered.set()

    def summary(self, request: bytes) -> dict[str, float | int]:
        duration = self.close_at - self.open_at
        arrived = [i.received_at for i in self.answers.values()]
        in_window = sum(self.open_at <= at < self.close_at for at in arrived)
        latencies = np.asarray(
            [
                (self.answers[c].received_at - sent) * 1000
                for c, sent in self.sent.items()
                if self.open_at <= sent < self.close_at and c in self.answers
            ]
        )
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies.size else (np.nan, np.nan)
        errors = Counter(
            kind
            for item in self.answers.values()
            if (kind := check_answer(self.config, item, request)) is not None
        )
        if errors:
            print(f"  {self.config} errors by kind: {dict(errors)}", flush=True)
        rate = in_window / duration
        messages = max(in_window, 1)  # per-message costs of a run that got no answer in time
        summary: dict[str, float | int] = {
            "msgs_per_s": round(rate, 1),
            "p50_ms": round(float(p50), 3),
            "p99_ms": round(float(p99), 3),
            "sent": len(self.sent),
            "errors": sum(errors.values()),
            "missing": len(self.sent) - len(self.answers),
            "duplicates": self.duplicates,
            "send_failures": self.send_failures,
        }
        for name, seconds in self.cpu_s.items():
            summary[f"{name}_cores"] = round(seconds / duration, 2)
            if name != "machine":
                summary[f"{name}_cpu_us_per_msg"] = round(seconds / messages * 1e6, 1)
        for name, count in self.counts.items():
            summary[f"{name}_per_msg"] = round(count / messages, 3)
        return summary


class Answers:
    """Hands each `$upstream` prediction to the run that sent its request."""

    def __init__(self) -> None:
        self.current: Run | None = None
        self.unexpected = 0

    async def dispatch(self, sim: Simulator) -> None:
        async for item in sim.upstream.follow():
            if item.output != PREDICTIONS:
                continue  # telemetry and alerts share $upstream
            correlation = item.message.system.get("correlationId", "")
            run = self.current
            if run is None or not run.on_answer(correlation, item):
                self.unexpected += 1


async def measure(
    run: Run,
    client: IoTHubModuleClient,
    body: bytes,
    *,
    warmup_s: float,
    duration_s: float,
    drain_s: float,
    cpu_clocks: Mapping[str, Callable[[], float]],
    counters: Mapping[str, Callable[[], float]] | None = None,
) -> None:
    """Keep the window full until the measured window closes, then wait for every answer."""
    loop = asyncio.get_running_loop()
    output = run.config  # the sender's output routed to that module
    run.open_at = time.time() + warmup_s
    run.close_at = run.open_at + duration_s
    marks: dict[str, float] = {}

    async def send(correlation: str) -> None:
        message: Message = Message(  # type: ignore[no-untyped-call]  # the SDK is unannotated
            body,
            message_id=correlation,
            content_encoding="utf-8",
            content_type="application/json",
        )
        message.correlation_id = correlation
        run.sent[correlation] = time.time()
        try:
            await client.send_message_to_output(message, output)
        except Exception as error:  # counted; the run goes on
            print(f"  send failed: {error!r}", flush=True)
            run.on_send_failed(correlation)

    async def sample_cpu() -> None:
        # One task reads every clock at each edge, so all share the same window.
        await asyncio.sleep(run.open_at - time.time())
        marks.update({name: clock() for name, clock in cpu_clocks.items()})
        counted = {name: read() for name, read in (counters or {}).items()}
        await asyncio.sleep(run.close_at - time.time())
        run.cpu_s = {name: clock() - marks[name] for name, clock in cpu_clocks.items()}
        run.counts = {name: read() - counted[name] for name, read in (counters or {}).items()}

    sampler = loop.create_task(sample_cpu())
    sends: set[asyncio.Task[None]] = set()
    count = 0
    while True:
        await run.window.acquire()
        if time.time() >= run.close_at:
            run.window.release()
            break
        task = loop.create_task(send(f"{run.tag}-{count}"))
        sends.add(task)
        task.add_done_callback(sends.discard)
        count += 1
    await sampler
    if sends:
        await asyncio.wait(sends, timeout=drain_s)
    run.finish_sending()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(drain_s):
            await run.all_answered.wait()


# ------------------------------------------------------------------ processes and setup


def _process_clock(pid: int) -> Callable[[], float]:
    process = psutil.Process(pid)

    def read() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    return read


def _main_thread_cpu_us(pid: int) -> Callable[[], float]:
    """CPU microseconds of the main thread of `pid`: the event loop's (the SDK's are others)."""
    process = psutil.Process(pid)

    def read() -> float:
        for thread in process.threads():
            if thread.id == pid:
                return (thread.user_time + thread.system_time) * 1e6
        return 0.0

    return read


def _context_switches(pid: int) -> Callable[[], float]:
    """Voluntary and involuntary context switches of every thread of `pid` (Linux)."""
    tasks = Path(f"/proc/{pid}/task")

    def read() -> float:
        total = 0
        for status in tasks.glob("*/status"):
            with contextlib.suppress(OSError):  # a thread that ended since the listing
                for line in status.read_text().splitlines():
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
        return total

    return read


def _metrics_port(log: Path) -> int:
    """The agent's metrics port, from its `http_listening` log line."""
    for line in log.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "http_listening" and event.get("service") == "metrics":
                return int(event["port"])
    raise RuntimeError(f"no metrics port in {log}")


def _model_calls(url: str) -> float:
    """ONNX Runtime calls the agent made so far (`agent_inference_batch_rows` observations)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "agent_inference_batch_rows_count":
                return float(sample.value)
    return 0.0


@contextlib.asynccontextmanager
async def artifact_server(directory: Path, files: Mapping[str, bytes]) -> AsyncIterator[str]:
    """Serve `files` over HTTPS on 127.0.0.1; yields the base URL (its CA: directory/ca.pem)."""
    pem = certs.generate(directory, "127.0.0.1")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pem.server_cert, pem.server_key)

    async def handle(request: web.Request) -> web.Response:
        data = files.get(request.match_info["name"])
        return web.Response(status=404) if data is None else web.Response(body=data)

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def module_process(
    argv: list[str], env: Mapping[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a module; on the way out SIGTERM it (a cProfile run writes its file then)."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=dict(env), stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process)


# `python -m cProfile` times functions by wall clock, which charges a thread for the time it
# waits for the GIL; this runner times them by the main thread's own CPU time instead.
_CPU_PROFILER = """
import cProfile, runpy, sys, time
output, module = sys.argv[1], sys.argv[2]
sys.argv = [module]
profiler = cProfile.Profile(time.thread_time)
try:
    profiler.runcall(runpy.run_module, module, run_name="__main__", alter_sys=True)
finally:
    profiler.dump_stats(output)
"""


def _module_argv(module: str, profile: Path | None, name: str, clock: str) -> list[str]:
    if profile is None:
        return [sys.executable, "-m", module]
    output = str(profile / f"{name}.prof")
    if clock == "wall":
        return [sys.executable, "-m", "cProfile", "-o", output, "-m", module]
    return [sys.executable, "-c", _CPU_PROFILER, output, module]


def _base_env(sim: Simulator, module_id: str, site: Path | None) -> dict[str, str]:
    # A stray EDGEML_* from the caller's shell would change (or, misspelt, stop) the agent.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    env.update(sim.edge_env(sim.device_id, module_id))
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def _switch_interval_site(directory: Path, seconds: float) -> Path:
    """A folder whose `sitecustomize` sets the GIL switch interval of every Python using it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(f"import sys\nsys.setswitchinterval({seconds!r})\n")
    return directory


def _reported_model_state(sim: Simulator) -> str | None:
    reported = sim.twin(sim.device_id, AGENT)["properties"]["reported"]
    model = (reported.get("models") or {}).get(MODEL)
    return model.get("state") if isinstance(model, dict) else None


def _check_alive(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")


# ------------------------------------------------------------------ the benchmark


def _aggregate(runs: list[dict[str, float | int]]) -> dict[str, float | int]:
    """Median of each statistic over the rounds, the rate extremes, the counts summed."""
    counts = {"sent", "errors", "missing", "duplicates", "send_failures"}
    out: dict[str, float | int] = {
        key: round(float(statistics.median(float(r[key]) for r in runs)), 3)
        for key in runs[0]
        if key not in counts
    }
    rates = [float(r["msgs_per_s"]) for r in runs]
    out |= {"msgs_per_s_min": min(rates), "msgs_per_s_max": max(rates)}
    out |= {key: sum(int(r[key]) for r in runs) for key in sorted(counts)}
    return out


def _agent_env(
    sim: Simulator,
    scratch: Path,
    key: Ed25519PrivateKey,
    site: Path | None,
    extra: Sequence[tuple[str, str]],
) -> dict[str, str]:
    return (
        _base_env(sim, AGENT, site)
        | {
            "EDGEML_STATE_DIR": str(scratch / "state"),
            "EDGEML_TRUSTED_KEYS": f"{KEY_ID}={public_key_to_b64(key.public_key())}",
            "EDGEML_ALLOWED_HOSTS": "127.0.0.1",
            "EDGEML_ARTIFACT_CA_FILE": str(scratch / "artifacts" / "ca.pem"),
            "EDGEML_HOST": "127.0.0.1",
            "EDGEML_HTTP_PORT": "0",
            "EDGEML_METRICS_PORT": "0",
            "EDGEML_LOG_FORMAT": "json",
        }
        | dict(extra)
    )


def _echo_env(sim: Simulator, echo: str, model_path: Path, site: Path | None) -> dict[str, str]:
    env = _base_env(sim, echo, site)
    return env | {"BENCH_ECHO_ONNX": str(model_path)} if echo == ECHO_ONNX else env


async def _bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    model = bytes(tiny_mlp().SerializeToString())
    model_path = scratch / "tiny.onnx"
    model_path.write_bytes(model)
    key = Ed25519PrivateKey.generate()
    echoes = ECHOES if args.echo_onnx else (ECHO,)
    template = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    profile = Path(args.profile) if args.profile else None
    logs = Path(args.logs or scratch)
    site = None
    if args.switch_interval is not None:
        site = _switch_interval_site(scratch / "site", args.switch_interval)
    async with artifact_server(scratch / "artifacts", {"tiny.onnx": model}) as base_url:
        sim = Simulator.start(
            bench_deployment(template, echoes),
            run_dir=scratch / "sim",
            host=pick_loopback_host(),
        )
        try:
            with contextlib.ExitStack() as stack:
                processes = {
                    AGENT: stack.enter_context(
                        module_process(
                            _module_argv("module", profile, AGENT, args.profile_clock),
                            _agent_env(sim, scratch, key, site, args.agent_env),
                            logs / f"{AGENT}.log",
                        )
                    )
                }
                for echo in echoes:
                    processes[echo] = stack.enter_context(
                        module_process(
                            _module_argv("bench._echo_module", profile, echo, args.profile_clock),
                            _echo_env(sim, echo, model_path, site),
                            logs / f"{echo}.log",
                        )
                    )
                manifest = build_manifest(
                    model,
                    name=MODEL,
                    version=1,
                    url=f"{base_url}/tiny.onnx",
                    key=key,
                    key_id=KEY_ID,
                )
                return await _drive(sim, args, manifest, processes, logs / f"{AGENT}.log")
        finally:
            sim.stop()


async def _drive(
    sim: Simulator,
    args: argparse.Namespace,
    manifest: dict[str, Any],
    processes: Mapping[str, subprocess.Popen[bytes]],
    agent_log: Path,
) -> dict[str, Any]:
    device = sim.device_id
    configs = tuple(processes)
    await asyncio.to_thread(
        wait_until, lambda: all(sim.is_connected(device, m) for m in configs), 60
    )
    sim.update_desired(device, AGENT, {"models": {manifest["name"]: manifest}})
    await asyncio.to_thread(wait_until, lambda: _reported_model_state(sim) == "active", 60)
    client = IoTHubModuleClient.create_from_connection_string(
        sim.module_connection_string(device, SENDER),
        server_verification_cert=sim.ca_cert_path.read_text(),
    )
    await client.connect()
    body = request_body()
    answers = Answers()
    dispatcher = asyncio.get_running_loop().create_task(answers.dispatch(sim))
    runs: dict[str, list[dict[str, float | int]]] = {c: [] for c in configs}
    counters = {
        config: {
            "module_switches": _context_switches(process.pid),
            "loop_thread_cpu_us": _main_thread_cpu_us(process.pid),
        }
        for config, process in processes.items()
    }
    metrics_url = f"http://127.0.0.1:{_metrics_port(agent_log)}/metrics"
    counters[AGENT]["model_calls"] = lambda: _model_calls(metrics_url)
    busy_before: list[float] = []
    try:
        for config in configs:  # unmeasured: connections, caches and the model's first calls
            run = Run(config, f"warm-{config}", asyncio.Semaphore(args.window))
            answers.current = run
            await measure(
                run,
                client,
                body,
                warmup_s=args.first_warmup,
                duration_s=1.0,
                drain_s=args.drain,
                cpu_clocks={},
            )
        for round_index in range(args.rounds):
            _check_alive(*processes.values())
            busy_before.append(
                await asyncio.to_thread(wait_for_quiet_machine, args.quiet_below, args.quiet_wait)
            )
            # Rotate the order so no configuration always runs first (or last) in a round.
            shift = round_index % len(configs)
            for config in configs[shift:] + configs[:shift]:
                run = Run(config, f"{config}-{round_index}", asyncio.Semaphore(args.window))
                answers.current = run
                await measure(
                    run,
                    client,
                    body,
                    warmup_s=args.warmup,
                    duration_s=args.duration,
                    drain_s=args.drain,
                    cpu_clocks={
                        "bench": time.process_time,
                        "module": _process_clock(processes[config].pid),
                        "machine": machine_busy,
                    },
                    counters=counters[config],
                )
                summary = run.summary(body)
                runs[config].append(summary)
                print(f"round {round_index} {config:9} {json.dumps(summary)}", flush=True)
        _check_alive(*processes.values())
    finally:
        answers.current = None
        dispatcher.cancel()
        await client.shutdown()
    return _result(args, runs, answers.unexpected, busy_before)


def _result(
    args: argparse.Namespace,
    runs: Mapping[str, list[dict[str, float | int]]],
    unexpected: int,
    busy_before: list[float],
) -> dict[str, Any]:
    stats = {config: _aggregate(summaries) for config, summaries in runs.items()}
    rate = {config: float(s["msgs_per_s"]) for config, s in stats.items()}
    result: dict[str, Any] = {
        "agent_msgs_per_s": rate[AGENT],
        "echo_msgs_per_s": rate[ECHO],
        "ratio": round(rate[AGENT] / rate[ECHO], 4) if rate[ECHO] else None,
        "p99_ms": stats[AGENT]["p99_ms"],
        # Each round's pair ran back to back, so its ratio shares that moment's noise.
        "ratio_round_median": round(
            statistics.median(
                float(a["msgs_per_s"]) / float(e["msgs_per_s"])
                for a, e in zip(runs[AGENT], runs[ECHO], strict=True)
            ),
            4,
        ),
        "ratio_per_round": [
            round(float(a["msgs_per_s"]) / float(e["msgs_per_s"]), 4)
            for a, e in zip(runs[AGENT], runs[ECHO], strict=True)
        ],
    }
    if ECHO_ONNX in rate:
        result["echo_onnx_msgs_per_s"] = rate[ECHO_ONNX]
        result["ratio_echo_onnx"] = round(rate[ECHO_ONNX] / rate[ECHO], 4)
    result |= {
        "agent": stats[AGENT],
        **{config.replace("-", "_"): stats[config] for config in runs if config != AGENT},
        "unexpected_answers": unexpected,
        "setup": {
            "window": args.window,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "busy_before_cores": busy_before,
            "aggregate": "median over rounds per statistic; msgs_per_s_min/max give the spread",
            "path": "sensor -> route -> module infer -> predictions -> route -> $upstream",
            "body": "v2 JSON infer, batch 1, input FP32 [1, 32] (tiny_mlp, output [1, 8])",
            "profiled": bool(args.profile),
            "switch_interval_s": args.switch_interval,
            "agent_env": dict(args.agent_env),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "azure_iot_device": importlib.metadata.version("azure-iot-device"),
        },
    }
    return result


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("EDGEML_"):
        raise argparse.ArgumentTypeError(f"expected EDGEML_NAME=VALUE, got {text!r}")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="agent + echo runs, back to back")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per run")
    parser.add_argument("--first-warmup", type=float, default=3.0, help="once per module, first")
    parser.add_argument("--window", type=int, default=64, help="requests in flight")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for answers")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="before each round, wait until other work uses fewer cores than this",
    )
    parser.add_argument("--quiet-wait", type=float, default=10.0, help="seconds, at most")
    parser.add_argument("--logs", default=None, help="module logs directory (default: a tmp dir)")
    parser.add_argument("--profile", default=None, help="cProfile every module into this dir")
    parser.add_argument(
        "--profile-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the main thread's CPU time; wall: elapsed time, GIL waits included",
    )
    parser.add_argument(
        "--echo-onnx",
        action="store_true",
        help="also measure an echo module that runs the model once per message",
    )
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="GIL switch interval of the modules"
    )
    parser.add_argument(
        "--agent-env",
        type=_setting,
        action="append",
        default=[],
        metavar="EDGEML_NAME=VALUE",
        help="an extra agent setting (repeatable)",
    )
    args = parser.parse_args()
    for folder in (args.profile, args.logs):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    if args.profile:  # the modules run with another working directory's relative paths
        args.profile = str(Path(args.profile).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-route-") as scratch:
        result = asyncio.run(_bench(args, Path(scratch)))
    diagnostic = args.profile or args.echo_onnx or args.agent_env
    if not diagnostic and args.switch_interval is None:
        # Those are diagnostics; only the plain configuration is the benchmark's result.
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
