"""Offline profile (`python -m agent profile MODEL.onnx`): the agent's knobs swept on this machine.

Each configuration runs in a fresh `python -m agent serve` child process, so its peak memory is
its own and no allocator state carries over from the previous configuration. The child runs in
managed mode with a release folder: the model goes through the real install path (verified
manifest signed by a key made for the run, store, load, warm-up, switch) and is served through
the real HTTP path. Then, per configuration:

* each offered load (open loop: requests leave on a fixed schedule whatever the answers, and
  latency counts from the scheduled instant, so a stalled server cannot hide its queue) runs
  for a warm-up, then a measured window: p50/p99, achieved rate, failures, the child's CPU and
  its peak resident memory over the window;
* under the target load, the same model is released again as a higher version: the candidate
  loads beside the active one, then the old session drains and is dropped. The peak resident
  memory across that swap is what a memory limit must leave room for.

Peak memory is the kernel's high-water mark (`VmHWM`), reset before each window through
`/proc/<pid>/clear_refs`, checked against RSS sampled every few milliseconds; where the reset
is refused the sampled maximum stands alone. The load generator runs in this process, on the
same machine: its CPU is not the child's, but it competes for the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp
import numpy as np
import onnxruntime as ort
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.observation.limits import Limits, read_limits
from agent.observation.recommend import (
    ConfigRun,
    Knobs,
    LoadPoint,
    Recommendation,
    SwapPoint,
    Target,
    recommend,
    verdict,
)
from agent.observation.resources import PeakMemory
from agent.releases.lifecycle import ModelState
from agent.releases.manifest import public_key_to_b64, sign_manifest
from agent.serving.engine import ModelLoadError, RuntimeOptions, create_session, read_contract
from agent.settings import AgentSettings
from wire.bounded_json import BoundedJsonError, JsonLimits, check_bounds

SCHEMA = "agent-profile/1"
MODEL_NAME = "profiled"
KEY_ID = "profile"
MANIFEST = "model.manifest.json"
FINAL_STATES = frozenset(
    {ModelState.ACTIVE, ModelState.FAILED, ModelState.REJECTED, ModelState.ROLLED_BACK}
)
MAX_OUTSTANDING = 256  # open-loop requests in flight at once; beyond, a request counts as failed


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """What to measure: the knobs' grid, the offered loads, and the time each takes."""

    knobs: tuple[Knobs, ...]
    loads_rps: tuple[float, ...]
    warmup_s: float = 1.0
    measure_s: float = 4.0
    swap_rps: float | None = None  # the load under which the swap happens; None: no swap
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.knobs or not self.loads_rps:
            raise ValueError("a sweep needs at least one configuration and one load")
        if any(not rps > 0 for rps in self.loads_rps):
            raise ValueError(f"offered loads must be above 0 requests/s, not {self.loads_rps}")
        if not self.measure_s > 0 or self.warmup_s < 0:
            raise ValueError("a measured window lasts more than 0 s, a warm-up at least 0 s")


def knob_grid(
    threads: Iterable[int],
    max_batches: Iterable[int],
    worker_threads: Iterable[int],
    coalescing: Iterable[bool],
) -> tuple[Knobs, ...]:
    """Every combination that differs in behaviour, sorted.

    Without coalescing each request is its own call, so `max_batch` changes nothing and is
    measured once (at 1).
    """
    combos = {
        Knobs(t, b if c else 1, w, c)
        for t, b, w, c in itertools.product(threads, max_batches, worker_threads, coalescing)
    }
    return tuple(sorted(combos))


# -- the child process -------------------------------------------------------------------


def _release_document(
    model: bytes, version: int, key: Ed25519PrivateKey, contract: Mapping[str, Any]
) -> bytes:
    # No golden sample: the profiler measures the agent, the publisher vouches for outputs.
    sha = hashlib.sha256(model).hexdigest()
    unsigned = {
        "name": MODEL_NAME,
        "version": version,
        "sha256": sha,
        "size": len(model),
        "url": f"https://profile.invalid/{sha}.onnx",
        "created": datetime.now(UTC).isoformat(),
        "contract": contract,
    }
    return json.dumps(sign_manifest(unsigned, key, KEY_ID)).encode()


def _with_doc_string(model: bytes, text: bytes) -> bytes:
    """`model` with its `ModelProto.doc_string` (field 6) set to `text`.

    Protobuf merges a serialized message with fields appended to it, the last value of a
    singular field winning: the graph and weights stay as they are, the sha256 changes.
    """
    if len(text) >= 0x80:
        raise ValueError("a doc string this long needs a multi-byte length")
    return model + bytes([6 << 3 | 2, len(text)]) + text


def _contract_json(model: bytes) -> tuple[dict[str, Any], bytes]:
    """The model's contract as a manifest carries it, and a batch-1 v2 request body for it."""
    session = create_session(model, RuntimeOptions())
    contract = read_contract(session)
    rng = np.random.default_rng(0)
    tensors = []
    for spec in contract.inputs:
        if spec.datatype == "BYTES":
            raise ModelLoadError(f"input {spec.name!r} takes strings; the profiler sends numbers")
        shape = [1 if dim is None else dim for dim in spec.shape]
        data = rng.standard_normal(shape).astype(spec.numpy_dtype)
        tensors.append(
            {"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": data.tolist()}
        )
    document = {
        "inputs": [
            {"name": s.name, "datatype": s.datatype, "shape": s.v2_shape} for s in contract.inputs
        ],
        "outputs": [
            {"name": s.name, "datatype": s.datatype, "shape": s.v2_shape} for s in contract.outputs
        ],
    }
    body = json.dumps({"inputs": [_flat(t) for t in tensors]}).encode()
    return document, body


def _flat(tensor: dict[str, Any]) -> dict[str, Any]:
    return {**tensor, "data": np.asarray(tensor["data"]).ravel().tolist()}


@dataclass
class ChildLog:
    ports: dict[str, int] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False

    async def follow(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            text = raw.decode(errors="replace").rstrip()
            self.tail = [*self.tail[-19:], text]
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if line.get("event") == "http_listening":
                    self.ports[str(line["service"])] = int(line["port"])
                elif line.get("event") == "model_status":
                    self.statuses.append(line)
            self.changed.set()
        self.ended = True
        self.changed.set()

    async def wait(self, found: Callable[[], object], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not found():
            if self.ended:
                raise ChildError(f"the agent exited before {what}: {' | '.join(self.tail[-3:])}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"no {what} within {timeout_s:g} s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.changed.wait()

    def final(self, version: int) -> dict[str, Any] | None:
        for line in self.statuses:
            if line.get("version") == version and line.get("state") in FINAL_STATES:
                return line
        return None


class ChildError(Exception):
    """A configuration's child process failed; the sweep records why and goes on."""


@dataclass
class Child:
    process: asyncio.subprocess.Process
    log: ChildLog
    memory: PeakMemory
    url: str
    metrics_url: str

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


def child_environment(knobs: Knobs, trusted_keys: str) -> dict[str, str]:
    # A stray EDGEML_* from the caller's shell would change the configuration measured.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    return env | {
        **knobs.environment(),
        "EDGEML_TRUSTED_KEYS": trusted_keys,
        "EDGEML_WATCH_DEBOUNCE_S": "0.05",
        "EDGEML_LOG_FORMAT": "json",
    }


@asynccontextmanager
async def running_child(
    scratch: Path, knobs: Knobs, trusted_keys: str, timeout_s: float
) -> AsyncIterator[Child]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "serve",
        "--state-dir", str(scratch / "state"), "--watch-dir", str(scratch / "releases"),
        "--host", "127.0.0.1", "--http-port", "0", "--metrics-port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=child_environment(knobs, trusted_keys),
    )  # fmt: skip
    assert process.stderr is not None
    log = ChildLog()
    follower = asyncio.get_running_loop().create_task(log.follow(process.stderr))
    try:
        await log.wait(lambda: {"http", "metrics"} <= log.ports.keys(), timeout_s, "HTTP port")
        http, metrics = log.ports["http"], log.ports["metrics"]
        yield Child(
            process,
            log,
            PeakMemory(process.pid),
            f"http://127.0.0.1:{http}/v2/models/{MODEL_NAME}/infer",
            f"http://127.0.0.1:{metrics}/metrics",
        )
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        await follower


# -- load --------------------------------------------------------------------------------


@dataclass
class Window:
    """Answers to an offered load: latencies of the good ones, a count of the rest."""

    latencies_s: list[float] = field(default_factory=list)
    scheduled: list[float] = field(default_factory=list)  # loop time each request was due
    errors: int = 0

    def p99_ms(self, start: float, end: float) -> float | None:
        """p99 of the requests due in [start, end)."""
        return _percentile_ms(
            [
                lat
                for lat, at in zip(self.latencies_s, self.scheduled, strict=True)
                if start <= at < end
            ],
            99,
        )


def http_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_OUTSTANDING),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def offer_load(
    session: aiohttp.ClientSession, url: str, body: bytes, rps: float, seconds: float
) -> Window:
    """Open loop: one request every 1/rps s for `seconds`; latency from each scheduled instant."""
    loop = asyncio.get_running_loop()
    window = Window()
    outstanding: set[asyncio.Task[None]] = set()
    headers = {"Content-Type": "application/json"}

    async def send(scheduled: float) -> None:
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            window.latencies_s.append(loop.time() - scheduled)
            window.scheduled.append(scheduled)
        else:
            window.errors += 1

    start = loop.time()
    for index in range(max(1, round(rps * seconds))):
        scheduled = start + index / rps
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(outstanding) >= MAX_OUTSTANDING:  # the server fell behind: a failure, not a wait
            window.errors += 1
            continue
        task = loop.create_task(send(scheduled))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        await asyncio.wait(outstanding)
    return window


async def _batch_rows(session: aiohttp.ClientSession, metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the agent's rows-per-call histogram."""
    async with session.get(metrics_url) as response:
        text = await response.text()
    values = dict.fromkeys(("sum", "count"), 0.0)
    for line in text.splitlines():
        for kind in values:
            if line.startswith(f"agent_inference_batch_rows_{kind} "):
                values[kind] = float(line.split()[1])
    return values["sum"], values["count"]


def _percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    if not latencies_s:
        return None
    return round(float(np.percentile(latencies_s, q)) * 1000, 3)


@dataclass(frozen=True, slots=True)
class Release:
    """Models as the child receives them: artifacts in a release folder, signed manifests.

    Version n serves `models[(n - 1) % len(models)]`; they share one contract and request
    body.
    """

    models: tuple[bytes, ...]
    folder: Path
    key: Ed25519PrivateKey
    contract: dict[str, Any]
    body: bytes

    @classmethod
    def prepare(cls, models: Sequence[bytes], folder: Path) -> Release:
        """Write the artifacts into `folder`, read the contract, make a signing key.

        One model is paired with a copy that differs in its bytes alone, so a swap to it
        takes the path of a new artifact (copied into the store, hashed, read), as on a
        device: re-releasing identical bytes skips that and measured ~8 MiB less at the peak.
        """
        if len(models) == 1:
            models = [models[0], _with_doc_string(models[0], b"agent profile: swap candidate")]
        contract, body = _contract_json(models[0])
        folder.mkdir(parents=True, exist_ok=True)
        for model in models:
            (folder / f"{hashlib.sha256(model).hexdigest()}.onnx").write_bytes(model)
        return cls(tuple(models), folder, Ed25519PrivateKey.generate(), contract, body)

    @property
    def trusted_keys(self) -> str:
        return f"{KEY_ID}={public_key_to_b64(self.key.public_key())}"

    def document(self, version: int) -> bytes:
        model = self.models[(version - 1) % len(self.models)]
        return _release_document(model, version, self.key, self.contract)


@dataclass
class Measurement:
    """One configuration's child, the HTTP client talking to it, and what to measure."""

    child: Child
    session: aiohttp.ClientSession
    release: Release
    plan: SweepPlan
    knobs: Knobs
    progress: TextIO

    def say(self, text: str) -> None:
        print(f"  {self.knobs.label()} {text}", file=self.progress, flush=True)

    async def publish(self, version: int) -> None:
        """Release `version` and wait until it serves (or fails: `ChildError`)."""
        folder, log = self.release.folder, self.child.log
        scratch = folder / f".{MANIFEST}.part"
        scratch.write_bytes(self.release.document(version))
        os.replace(scratch, folder / MANIFEST)  # the agent sees the manifest whole or not at all
        await log.wait(lambda: log.final(version), self.plan.startup_timeout_s, f"v{version}")
        final = log.final(version)
        assert final is not None
        if final.get("state") != ModelState.ACTIVE:
            state, message = final.get("state"), final.get("message")
            raise ChildError(f"release {version} ended {state}: {message}")

    async def run(self) -> ConfigRun:
        await self.publish(1)
        load_rss = self.child.memory.rss()
        points: list[LoadPoint] = []
        for rps in sorted(self.plan.loads_rps):
            point = await self.point(rps)
            points.append(point)
            self.say(
                f"at {rps:g}/s: achieved {point.achieved_rps:g}/s, p50 {point.p50_ms} ms, "
                f"p99 {point.p99_ms} ms, errors {point.errors}, cpu {point.cpu_cores:g} cores, "
                f"peak {point.peak_rss_bytes / 2**20:.1f} MiB"
            )
            if point.errors or point.achieved_rps < 0.5 * rps:
                break  # saturated: higher loads only queue longer
        swap = None
        if self.plan.swap_rps is not None:
            swap = await self.swap(self.plan.swap_rps)
            self.say(
                f"swap: {swap.seconds:.2f} s, peak {swap.peak_rss_bytes / 2**20:.1f} MiB "
                f"(+{swap.transient_bytes / 2**20:.1f} MiB over the RSS before), "
                f"p99 {swap.p99_ms} ms over {swap.window_s:g} s around it"
            )
        return ConfigRun(self.knobs, load_rss, tuple(points), swap)

    async def offer(self, rps: float, seconds: float) -> Window:
        return await offer_load(self.session, self.child.url, self.release.body, rps, seconds)

    async def point(self, rps: float) -> LoadPoint:
        child = self.child
        if self.plan.warmup_s:
            await self.offer(rps, self.plan.warmup_s)
        rows_before = await _batch_rows(self.session, child.metrics_url)
        child.memory.reset()
        cpu_before, started = child.cpu_seconds(), time.monotonic()
        window = await self.offer(rps, self.plan.measure_s)
        # The schedule spans measure_s; answers arriving after it stretch the window.
        elapsed = max(time.monotonic() - started, self.plan.measure_s)
        cpu = child.cpu_seconds() - cpu_before
        peak = child.memory.peak()
        rows_after = await _batch_rows(self.session, child.metrics_url)
        calls = rows_after[1] - rows_before[1]
        return LoadPoint(
            offered_rps=rps,
            achieved_rps=round(len(window.latencies_s) / elapsed, 1),
            p50_ms=_percentile_ms(window.latencies_s, 50),
            p99_ms=_percentile_ms(window.latencies_s, 99),
            errors=window.errors,
            cpu_cores=round(cpu / elapsed, 3),
            peak_rss_bytes=peak,
            batch_rows_mean=round((rows_after[0] - rows_before[0]) / calls, 2) if calls else None,
        )

    async def swap(self, rps: float) -> SwapPoint:
        """Release the model again a quarter into a window of load twice a measured one.

        The p99 of that window is what a window of its length with one swap shows; the peak
        covers the candidate loading beside the active model, then the old one's drain.
        """
        memory, window_s = self.child.memory, self.plan.measure_s * 2
        load = asyncio.get_running_loop().create_task(self.offer(rps, window_s))
        await asyncio.sleep(window_s / 4)
        memory.reset()
        before = memory.rss()
        started = time.monotonic()
        try:
            await self.publish(2)
        finally:
            seconds = time.monotonic() - started
            window = await load
        return SwapPoint(
            before,
            memory.peak(),
            memory.rss(),
            round(seconds, 3),
            p99_ms=_percentile_ms(window.latencies_s, 99),
            window_s=window_s,
        )


async def profile_configuration(
    model: bytes, knobs: Knobs, plan: SweepPlan, scratch: Path, progress: TextIO
) -> ConfigRun:
    """One configuration in a fresh child process: loads, then one swap under load."""
    release = await asyncio.to_thread(Release.prepare, [model], scratch / "releases")
    try:
        async with (
            running_child(scratch, knobs, release.trusted_keys, plan.startup_timeout_s) as child,
            http_client() as session,
        ):
            sampler = asyncio.get_running_loop().create_task(child.memory.sample_forever())
            try:
                return await Measurement(child, session, release, plan, knobs, progress).run()
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
    except (ChildError, psutil.Error, aiohttp.ClientError, OSError) as error:
        print(f"  {knobs.label()}: failed: {error}", file=progress, flush=True)
        return ConfigRun(knobs, 0, (), None, error=str(error)[:300])


# -- the sweep and its report ------------------------------------------------------------


async def sweep(model: bytes, plan: SweepPlan, progress: TextIO) -> list[ConfigRun]:
    # SIGTERM cancels the sweep like Ctrl-C does, so the running child is stopped, not orphaned.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    if task is not None and threading.current_thread() is threading.main_thread():
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    runs = []
    for index, knobs in enumerate(plan.knobs, 1):
        print(f"[{index}/{len(plan.knobs)}] {knobs.label()}", file=progress, flush=True)
        with tempfile.TemporaryDirectory(prefix="agent-profile-") as scratch:
            runs.append(await profile_configuration(model, knobs, plan, Path(scratch), progress))
    return runs


@dataclass(frozen=True, slots=True)
class ProfiledModel:
    file: str
    data: bytes = field(repr=False)


def report(
    model: ProfiledModel,
    runs: Sequence[ConfigRun],
    target: Target,
    *,
    limits: Limits,
    plan: SweepPlan,
) -> dict[str, Any]:
    """The `profile.json` document (schema `agent-profile/1`)."""
    best = recommend(runs, target, host_cpus=limits.cpus)
    return {
        "schema": SCHEMA,
        "model": {
            "file": model.file,
            "sha256": hashlib.sha256(model.data).hexdigest(),
            "bytes": len(model.data),
        },
        "target": asdict(target),
        "recommendation": recommendation_json(best),
        "configurations": [_run_json(run, target) for run in runs],
        "host": {
            "limits": limits.as_json(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "profiled": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "plan": {
            "loads_rps": list(plan.loads_rps),
            "warmup_s": plan.warmup_s,
            "measure_s": plan.measure_s,
            "swap_rps": plan.swap_rps,
            "load": "open loop, v2 REST JSON, batch-1 requests, client on the same machine",
        },
    }


def recommendation_json(best: Recommendation) -> dict[str, Any]:
    """What a deployment takes: the module's `EDGEML_*` settings and its `createOptions`."""
    return {
        "met": best.met,
        "why": best.why,
        "settings": best.knobs.environment(),
        "createOptions": {
            "HostConfig": {"Memory": best.memory_limit_bytes, "NanoCpus": best.nano_cpus}
        },
        "predicted": {
            "p99_ms": best.predicted_p99_ms,
            "swap_window_p99_ms": best.predicted_swap_p99_ms,
            "swap_window_s": best.swap_window_s,
            "peak_rss_bytes": best.predicted_peak_rss_bytes,
            "steady_rss_bytes": best.steady_rss_bytes,
            "swap_transient_bytes": best.swap_transient_bytes,
            "cpu_cores": best.predicted_cpu_cores,
        },
    }


def _run_json(run: ConfigRun, target: Target) -> dict[str, Any]:
    return {
        "knobs": asdict(run.knobs),
        "settings": run.knobs.environment(),
        "verdict": verdict(run, target) or "meets the target",
        "error": run.error,
        "load_rss_bytes": run.load_rss_bytes,
        "points": [asdict(point) for point in run.points],
        "swap": None if run.swap is None else asdict(run.swap),
    }


def summary_lines(document: Mapping[str, Any]) -> list[str]:
    """A person's reading of a profile document."""
    lines = []
    for run in document["configurations"]:
        label = " ".join(f"{k}={v}" for k, v in run["knobs"].items())
        lines.append(f"{label}: {run['verdict']}")
        lines.extend(
            f"    {p['offered_rps']:>8g}/s offered  {p['achieved_rps']:>8g}/s achieved  "
            f"p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms  cpu {p['cpu_cores']:g}  "
            f"peak {p['peak_rss_bytes'] / 2**20:.1f} MiB  errors {p['errors']}"
            for p in run["points"]
        )
    best = document["recommendation"]
    host = best["createOptions"]["HostConfig"]
    lines += [
        "",
        f"recommendation ({best['why']}):",
        *(f"    {name}={value}" for name, value in best["settings"].items()),
        f"    HostConfig.Memory={host['Memory']} ({host['Memory'] / 2**20:.0f} MiB)",
        f"    HostConfig.NanoCpus={host['NanoCpus']} ({host['NanoCpus'] / 1e9:g} CPUs)",
        f"    predicted p99 {best['predicted']['p99_ms']} ms, "
        f"peak {best['predicted']['peak_rss_bytes'] / 2**20:.1f} MiB",
    ]
    return lines


def run_profile(
    model_path: Path, plan: SweepPlan, target: Target, progress: TextIO | None = None
) -> dict[str, Any]:
    """Profile `model_path` on this machine and return the `profile.json` document."""
    progress = progress or sys.stderr
    model = ProfiledModel(model_path.name, model_path.read_bytes())
    runs = asyncio.run(sweep(model.data, plan, progress))
    return report(model, runs, target, limits=read_limits(), plan=plan)


# -- reading profile.json back (the publisher renders createOptions from it) ------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class HostConfig(_Strict):
    Memory: int = Field(gt=0)
    NanoCpus: int = Field(gt=0)


class CreateOptions(_Strict):
    HostConfig: HostConfig


class RecommendationDocument(_Strict):
    met: bool
    why: str
    settings: dict[str, str]
    createOptions: CreateOptions  # noqa: N815 - Docker's own spelling, as the manifest has it

    @field_validator("settings")
    @classmethod
    def _agent_settings(cls, settings: dict[str, str]) -> dict[str, str]:
        # They become the module's environment, where an unknown EDGEML_* name stops the agent.
        known = AgentSettings.environment_names()
        strangers = sorted(name for name in settings if name not in known)
        if strangers:
            raise ValueError(f"settings must be the agent's EDGEML_* variables, not {strangers[0]}")
        return settings


class ProfileDocument(_Strict):
    """The parts of `profile.json` a deployment uses; other fields are for people."""

    schema_: Literal["agent-profile/1"] = Field(alias="schema")
    recommendation: RecommendationDocument


def read_profile(text: str | bytes) -> ProfileDocument:
    """`profile.json` parsed and checked; ValueError naming what is wrong."""
    # A page of numbers for people and the recommendation a deployment reads: small, shallow.
    limits = JsonLimits(max_bytes=1024 * 1024, max_depth=16)
    try:
        return ProfileDocument.model_validate_json(check_bounds(text, limits))
    except BoundedJsonError as error:
        raise ValueError(f"profile.json: {error.problem}: {error.message}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"profile.json: {where}: {first['msg']}") from None
