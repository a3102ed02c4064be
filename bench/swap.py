"""Hot swaps under steady HTTP load: failed requests, latency during swaps, memory across swaps.

The agent runs as a subprocess in managed mode (`python -m agent serve --state-dir --watch-dir`),
so its resident memory is measured alone. Two `mid_mlp` builds (seeds 1 and 2: ~22 MB each, one
contract, input [batch, 1024] FP32 -> output [batch, 10]) sit in its release folder as
`<sha256>.onnx`. Release n is model A when n is odd, B when even: the store copies each
artifact once and every later release reuses it, so a swap is verify, load + warm-up, contract,
golden sample, persist, switch, drain, drop. Each release is a manifest signed by a key made for
the run (trusted through EDGEML_TRUSTED_KEYS), written atomically over `model.manifest.json`.

With `--clients` closed-loop clients sending v2 JSON batch-1 infer requests all along, every
answer checked (200 and output shape [1, 10]) and every failure counted:

    release 1 (the first install, not a swap) -> `--warmup` s -> `--steady` s without swaps
    -> releases 2 .. swaps+1 back to back, each: write the manifest; wait for the agent's
       `model_status` log line `active` with that version (its delay from the write is the
       swap's duration, the folder's debounce included); wait `--settle` s, by when the old
       session has drained and been dropped; read the agent's RSS
    -> `--steady` s without swaps again (`p99_steady_after_swaps_ms`: did the machine's
       noise change meanwhile? `cores.other` is CPU used by neither the agent nor the bench)

`p99_steady_ms` covers requests sent in the steady window, `p99_during_swap_ms` those sent
from the first manifest write to the last RSS reading (every install, switch, drain and drop);
`p99_install_windows_ms` narrows that to requests sent between a write and its `active` line
(verify, load, warm-up, golden sample, switch), `p99_after_switch_windows_ms` to those sent
from an `active` line to the next write (the old session's drain and drop, the settle time).
`rss_growth_pct_after_200_swaps` compares the RSS after the last swap with that after the first
(after the first swap, both models have been resident at once; the first install is not a swap).
Probation keeps its production defaults: each new model is watched until the next release
cancels the watch, as on a device receiving releases quickly.

    python -m bench.swap [--swaps 200] [--clients 8] [--warmup 2] [--steady 10] [--settle 0.5]

The whole run is made twice in one invocation: first with `EDGEML_QUARANTINE=false` (the
baseline: candidates load straight into the serving process), then with quarantine (the
default, whose numbers are the result's main fields). `quarantine_seconds_median` is each
candidate's time in its quarantine child (from the agent's `quarantine_done` lines);
`quarantine_added_seconds_median` is what quarantine adds to the median swap, and
`quarantine_added_vs_load_ratio` that against the swap without quarantine (the goal: < 1).

Last line: {"swaps", "failed_requests", "p99_steady_ms", "p99_during_swap_ms",
"swap_seconds_median", "rss_growth_pct_after_200_swaps", ..., "quarantine_seconds_median",
"swap_seconds_median_without_quarantine", "quarantine_added_seconds_median",
"without_quarantine": {...}}; the same JSON goes to bench/results/swap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import public_key_to_b64, sign_manifest
from bench._loadgen import check_answer
from deployment.examples.onnx_models import mid_mlp
from deployment.publish.release import build_manifest

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "swap.json"
MODEL = "m"
KEY_ID = "bench"
SEEDS = (1, 2)  # model A, model B
FEATURES, OUTPUTS = 1024, 10
MANIFEST = "model.manifest.json"
FINAL_STATES = frozenset({"active", "failed", "rejected", "rolled_back"})
# Agent log events that say something went wrong or back; counted in the result.
NOTABLE_EVENTS = frozenset({"drain_timed_out", "probation_failed", "install_failed"})
# Raised by aiohttp and asyncio when a connection or answer fails; anything else is a bug here.
CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError)
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class Answer:
    sent: float
    done: float
    error: str | None


class Publisher:
    """Signed releases alternating two models of one contract, dropped into a release folder."""

    def __init__(self, folder: Path, models: Sequence[bytes]) -> None:
        self.key = Ed25519PrivateKey.generate()
        self._folder = folder
        self._unsigned: list[dict[str, Any]] = []
        folder.mkdir(parents=True, exist_ok=True)
        for data in models:
            sha = hashlib.sha256(data).hexdigest()
            (folder / f"{sha}.onnx").write_bytes(data)
            url = f"https://releases.invalid/{MODEL}/{sha}.onnx"
            # Contract and golden sample read off the model once; each version is re-signed.
            signed = build_manifest(
                data, name=MODEL, version=1, url=url, key=self.key, key_id=KEY_ID
            )
            signed.pop("signature")
            self._unsigned.append(signed)

    @property
    def trusted_keys(self) -> str:
        return f"{KEY_ID}={public_key_to_b64(self.key.public_key())}"

    def manifest(self, version: int) -> bytes:
        """Release `version`: model A when odd, B when even."""
        unsigned = {**self._unsigned[(version + 1) % len(self._unsigned)], "version": version}
        return json.dumps(sign_manifest(unsigned, self.key, KEY_ID)).encode()

    def publish(self, document: bytes) -> None:
        # The agent reads only `*.manifest.json`: the temporary name keeps a half-written
        # manifest out of its sight, and the rename makes the new one appear whole.
        scratch = self._folder / f".{MANIFEST}.part"
        scratch.write_bytes(document)
        os.replace(scratch, self._folder / MANIFEST)


@dataclass
class AgentLog:
    """What the agent's JSON log lines tell: its ports and its model status reports."""

    ports: dict[str, int] = field(default_factory=dict)
    statuses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    notable: Counter[str] = field(default_factory=Counter)
    quarantine_s: list[float] = field(default_factory=list)  # each candidate's time in its child
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    news: asyncio.Condition = field(default_factory=asyncio.Condition)
    ended: bool = False

    async def follow(self, stream: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        async for raw in stream:
            received = loop.time()
            text = raw.decode(errors="replace").rstrip()
            self.tail.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                continue
            event = line.get("event")
            if event == "http_listening":
                self.ports[str(line["service"])] = int(line["port"])
            elif event == "model_status":
                self.statuses.append((received, line))
            elif event == "quarantine_done":
                self.quarantine_s.append(float(line["seconds"]))
            elif event in NOTABLE_EVENTS:
                self.notable[str(event)] += 1
            async with self.news:
                self.news.notify_all()
        self.ended = True
        async with self.news:  # the agent exited: waiters look again, and give up
            self.news.notify_all()

    async def wait(self, found: Callable[[], object], timeout_s: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout_s), self.news:
                await self.news.wait_for(lambda: found() or self.ended)
        except TimeoutError:
            pass
        if not found():
            tail = "\n".join(self.tail)
            raise RuntimeError(f"agent: no {what} within {timeout_s} s; log tail:\n{tail}")

    def final_status(self, version: int, after: int) -> tuple[float, dict[str, Any]] | None:
        """The first final status of `version` among the status lines from index `after`."""
        for received, line in self.statuses[after:]:
            if line.get("version") == version and line.get("state") in FINAL_STATES:
                return received, line
        return None


@dataclass
class Load:
    """Closed-loop clients, each on one keep-alive connection, until `stop` is set."""

    url: str
    body: bytes
    clients: int
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.clients, force_close=False)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        headers = {"Content-Type": "application/json"}
        while not self.stop.is_set():
            sent = loop.time()
            try:
                async with session.post(self.url, data=self.body, headers=headers) as response:
                    body = await response.read()
                    done = loop.time()
                    error = check_answer(response.status, body, (1, OUTPUTS))
            except CLIENT_ERRORS as exc:
                done, error = loop.time(), type(exc).__name__
            self.answers.append(Answer(sent, done, error))


@dataclass
class CpuClocks:
    """CPU seconds of this process, the agent and the whole machine, read at phase edges."""

    agent: psutil.Process

    def read(self) -> dict[str, float]:
        agent = self.agent.cpu_times()
        machine = psutil.cpu_times()
        return {
            "client": time.process_time(),
            "agent": agent.user + agent.system,
            "machine": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
        }


def cores(start: Mapping[str, float], end: Mapping[str, float], seconds: float) -> dict[str, float]:
    """Cores busy between two clock readings; `other` is CPU that neither side used."""
    used = {name: (end[name] - start[name]) / seconds for name in start}
    other = max(0.0, used.pop("machine") - used["client"] - used["agent"])
    return {name: round(value, 2) for name, value in {**used, "other": other}.items()}


def window(answers: Sequence[Answer], start: float, end: float) -> list[Answer]:
    return [a for a in answers if start <= a.sent < end]


def latency_ms(answers: Sequence[Answer], quantile: float) -> float:
    ok = [a.done - a.sent for a in answers if a.error is None]
    return round(float(np.percentile(ok, quantile)) * 1000, 3) if ok else float("nan")


def sent_within(answers: Sequence[Answer], spans: Sequence[tuple[float, float]]) -> list[Answer]:
    """Answers to requests sent inside any of `spans` (sorted, not overlapping)."""
    starts = [start for start, _ in spans]
    inside = []
    for answer in answers:
        index = bisect.bisect_right(starts, answer.sent) - 1
        if index >= 0 and answer.sent < spans[index][1]:
            inside.append(answer)
    return inside


def checkpoints(swaps: int) -> list[int]:
    marks = [1, 2, 5, 10, 20, 50, 100, 150, 200, swaps]
    return sorted({m for m in marks if m <= swaps})


def agent_env(trusted_keys: str, debounce_s: float, *, quarantine: bool) -> dict[str, str]:
    # A stray EDGEML_* from the caller's shell would change (or, misspelt, stop) the agent.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    return env | {
        "EDGEML_TRUSTED_KEYS": trusted_keys,
        "EDGEML_WATCH_DEBOUNCE_S": str(debounce_s),
        "EDGEML_LOG_FORMAT": "json",
        "EDGEML_QUARANTINE": "true" if quarantine else "false",
    }


@asynccontextmanager
async def running_agent(
    scratch: Path, publisher: Publisher, debounce_s: float, *, quarantine: bool
) -> AsyncIterator[tuple[asyncio.subprocess.Process, AgentLog]]:
    """The agent in managed mode on loopback, with its HTTP port read from its log."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "serve",
        "--state-dir", str(scratch / "state"), "--watch-dir", str(scratch / "releases"),
        "--host", "127.0.0.1", "--http-port", "0", "--metrics-port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env=agent_env(publisher.trusted_keys, debounce_s, quarantine=quarantine),
    )  # fmt: skip
    assert process.stderr is not None
    log = AgentLog()
    follower = asyncio.get_running_loop().create_task(log.follow(process.stderr))
    try:
        await log.wait(lambda: "http" in log.ports, 60, "http port")
        yield process, log
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


@dataclass
class Run:
    """Raw observations of one run; `summarize` turns them into the result."""

    answers: list[Answer]
    steady: tuple[float, float]
    swapping: tuple[float, float]
    cpu: tuple[dict[str, float], dict[str, float], dict[str, float]]
    first_install_s: float
    rss_before: int
    steady_after: tuple[float, float] = (0.0, 0.0)
    durations: list[float] = field(default_factory=list)
    install_spans: list[tuple[float, float]] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    notable: Counter[str] = field(default_factory=Counter)
    quarantine_s: list[float] = field(default_factory=list)


def request_body() -> bytes:
    x = np.random.default_rng(0).standard_normal(FEATURES).astype(np.float32)
    tensor = {"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": x.tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


async def measure(
    args: argparse.Namespace, scratch: Path, publisher: Publisher, *, quarantine: bool
) -> Run:
    loop = asyncio.get_running_loop()
    # Signed before the run, so signing stays out of every measured window.
    documents = {v: publisher.manifest(v) for v in range(1, args.swaps + 2)}
    starting = running_agent(scratch, publisher, args.debounce, quarantine=quarantine)
    async with starting as (process, log):

        async def release(version: int) -> tuple[float, dict[str, Any]]:
            """Publish `version`; seconds until its final status, and that status."""
            seen = len(log.statuses)
            written = loop.time()
            publisher.publish(documents[version])
            await log.wait(lambda: log.final_status(version, seen), 120, f"release {version}")
            status = log.final_status(version, seen)
            assert status is not None
            return status[0] - written, status[1]

        first_install_s, first = await release(1)
        if first["state"] != "active":
            raise RuntimeError(f"the first release did not install: {first}")
        agent = psutil.Process(process.pid)
        clocks = CpuClocks(agent)
        url = f"http://127.0.0.1:{log.ports['http']}/v2/models/{MODEL}/infer"
        load = Load(url, request_body(), args.clients)
        clients = loop.create_task(load.run())

        await asyncio.sleep(args.warmup)
        steady_start, cpu0 = loop.time(), clocks.read()
        await asyncio.sleep(args.steady)
        swaps_start, cpu1 = loop.time(), clocks.read()
        run = Run(
            load.answers,
            steady=(steady_start, swaps_start),
            swapping=(swaps_start, swaps_start),
            cpu=(cpu0, cpu1, cpu1),
            first_install_s=first_install_s,
            rss_before=agent.memory_info().rss,
        )
        for version in range(2, args.swaps + 2):
            written = loop.time()
            seconds, status = await release(version)
            run.outcomes[str(status["state"])] += 1
            run.durations.append(seconds)
            run.install_spans.append((written, written + seconds))
            # By now the old session has drained (requests in flight take milliseconds) and
            # been dropped, so RSS shows what stays resident after the swap.
            await asyncio.sleep(args.settle)
            run.rss.append(agent.memory_info().rss)
            if version % 20 == 1 or version == args.swaps + 1:
                errors = sum(a.error is not None for a in load.answers)
                print(
                    f"swap {version - 1:4d}: {status['state']} in {seconds:.2f} s, "
                    f"rss {run.rss[-1] / MIB:.0f} MiB, failed requests so far {errors}",
                    flush=True,
                )
        run.swapping, run.cpu = (swaps_start, loop.time()), (cpu0, cpu1, clocks.read())
        # Load without swaps again: tells whether the machine's noise changed meanwhile.
        await asyncio.sleep(args.steady)
        run.steady_after = (run.swapping[1], loop.time())
        load.stop.set()
        await clients
        run.notable = log.notable
        run.quarantine_s = log.quarantine_s
    return run


def summarize(run: Run, args: argparse.Namespace, model_bytes: int) -> dict[str, Any]:
    answers = run.answers
    steady = window(answers, *run.steady)
    during = window(answers, *run.swapping)
    in_installs = sent_within(during, run.install_spans)
    # From each `active` line to the next write: the old session's drain and drop, probation.
    ends = [end for _, end in run.install_spans]
    starts = [start for start, _ in run.install_spans[1:]] + [run.swapping[1]]
    after_switches = sent_within(during, list(zip(ends, starts, strict=True)))
    errors = Counter(a.error for a in answers if a.error is not None)
    p99_steady = latency_ms(steady, 99)
    p99_during = latency_ms(during, 99)
    steady_s = run.steady[1] - run.steady[0]
    swapping_s = run.swapping[1] - run.swapping[0]
    return {
        "swaps": args.swaps,
        "failed_requests": sum(errors.values()),
        "p99_steady_ms": p99_steady,
        "p99_during_swap_ms": p99_during,
        "swap_seconds_median": round(statistics.median(run.durations), 3),
        "rss_growth_pct_after_200_swaps": round((run.rss[-1] / run.rss[0] - 1) * 100, 2),
        "p99_ratio": round(p99_during / p99_steady, 2),
        "p99_install_windows_ms": latency_ms(in_installs, 99),
        "p99_after_switch_windows_ms": latency_ms(after_switches, 99),
        "p99_steady_after_swaps_ms": latency_ms(window(answers, *run.steady_after), 99),
        "p50_steady_ms": latency_ms(steady, 50),
        "p50_during_swap_ms": latency_ms(during, 50),
        "rps_steady": round(len(steady) / steady_s, 1),
        "rps_during_swap": round(len(during) / swapping_s, 1),
        "requests": len(answers),
        "errors_by_kind": dict(errors),
        "swap_outcomes": dict(run.outcomes),
        "agent_warnings": dict(run.notable),
        "swap_seconds_p90": round(float(np.percentile(run.durations, 90)), 3),
        "swap_seconds_max": round(max(run.durations), 3),
        "first_install_s": round(run.first_install_s, 3),
        "rss_mib": {
            "before_swaps": round(run.rss_before / MIB, 1),
            **{f"after_swap_{k}": round(run.rss[k - 1] / MIB, 1) for k in checkpoints(args.swaps)},
            "max": round(max(run.rss) / MIB, 1),
        },
        "cores": {
            "steady": cores(run.cpu[0], run.cpu[1], steady_s),
            "during_swap": cores(run.cpu[1], run.cpu[2], swapping_s),
        },
        "setup": {
            "model": "mid_mlp seeds 1 and 2, alternating",
            "model_mib": round(model_bytes / MIB, 1),
            "clients": args.clients,
            "warmup_s": args.warmup,
            "steady_s": args.steady,
            "settle_s": args.settle,
            "debounce_s": args.debounce,
            "protocol": "v2 REST JSON, batch 1, keep-alive, closed loop",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
    }


async def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """The same swaps without quarantine (the baseline), then with it (the default)."""
    models = [mid_mlp(seed).SerializeToString() for seed in SEEDS]
    runs = {}
    for quarantine in (False, True):
        root = scratch / ("quarantined" if quarantine else "direct")
        publisher = Publisher(root / "releases", models)
        runs[quarantine] = await measure(args, root, publisher, quarantine=quarantine)
    result = summarize(runs[True], args, len(models[0]))
    baseline = summarize(runs[False], args, len(models[0]))
    quarantined = runs[True].quarantine_s[1:]  # the first install is not a swap
    without = baseline["swap_seconds_median"]
    added = result["swap_seconds_median"] - without
    return {
        **result,
        # Each candidate's time in its quarantine child (load, contract, golden, warm-up,
        # measurement) and what that adds to a swap, against the same swaps without it.
        "quarantine_seconds_median": round(statistics.median(quarantined), 3),
        "swap_seconds_median_without_quarantine": without,
        "quarantine_added_seconds_median": round(added, 3),
        "quarantine_added_vs_load_ratio": round(added / without, 2),
        "without_quarantine": {
            k: baseline[k]
            for k in (
                "failed_requests",
                "p99_steady_ms",
                "p99_during_swap_ms",
                "p99_ratio",
                "swap_seconds_p90",
                "rss_growth_pct_after_200_swaps",
                "swap_outcomes",
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=200, help="swaps after the first install")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of load, no swaps")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after each swap")
    parser.add_argument("--debounce", type=float, default=0.05, help="release folder debounce")
    args = parser.parse_args()
    if args.swaps < 1:
        parser.error("--swaps must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as scratch:
        result = asyncio.run(bench(args, Path(scratch)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
