"""A real Prometheus scrapes the real agent: the exposition is what a server ingests, not text.

`python -m agent serve` runs as a subprocess on loopback with a tiny model and serves a few
requests; then Debian's `prometheus` (tests/support/prometheus.py) scrapes its metrics port
every second and the test reads the counters back through Prometheus's own query API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deployment.examples.onnx_models import save, tiny_mlp
from tests.support.polling import poll
from tests.support.prometheus import Prometheus, free_port, running_prometheus

pytestmark = pytest.mark.e2e

JOB = "edge-agent"
REQUESTS = 7
MODEL = "tiny"


@dataclass(frozen=True)
class Agent:
    process: subprocess.Popen[bytes]
    http: str
    metrics_target: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _infer_body() -> bytes:
    tensor = {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.25] * 32}
    return json.dumps({"inputs": [tensor]}).encode()


def _wait_ready(agent: Agent, timeout_s: float = 30.0) -> None:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{agent.http}/v2/health/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def exited() -> str | None:
        if agent.process.poll() is None:
            return None
        return f"agent exited {agent.process.returncode}:\n{agent.log_tail()}"

    poll(ready, timeout_s, "the agent is ready", alive=exited)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """The agent CLI as a device runs it, on free loopback ports; it must exit 0 on SIGTERM."""
    workdir = tmp_path_factory.mktemp("agent")
    model = save(tiny_mlp(), workdir / f"{MODEL}.onnx")
    http_port, metrics_port = free_port(), free_port()
    # Only this test's settings: a stray EDGEML_* in the caller's shell is an error to the agent.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    log = workdir / "agent.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "serve",
                f"--model={model}",
                f"--name={MODEL}",
                "--host=127.0.0.1",
                f"--http-port={http_port}",
                f"--metrics-port={metrics_port}",
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    running = Agent(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{metrics_port}", log)
    try:
        _wait_ready(running)
        yield running
    finally:
        process.terminate()
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    assert code == 0, running.log_tail()


@pytest.fixture(scope="module")
def prometheus(agent: Agent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus started after the requests, so its very first scrape must see all of them."""
    for _ in range(REQUESTS):
        request = urllib.request.Request(
            f"{agent.http}/v2/models/{MODEL}/infer",
            data=_infer_body(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
            assert json.load(response)["outputs"][0]["shape"] == [1, 8]
    with running_prometheus(
        tmp_path_factory.mktemp("prometheus"), job=JOB, targets=[agent.metrics_target]
    ) as server:
        yield server


def test_prometheus_ingests_the_ok_counter_equal_to_the_requests_sent(
    prometheus: Prometheus,
) -> None:
    query = f'agent_inference_requests_total{{job="{JOB}",outcome="ok"}}'
    value = prometheus.wait_for(lambda: prometheus.value(query), query)
    assert value == REQUESTS


def test_up_is_one_for_the_agent_job(prometheus: Prometheus) -> None:
    query = f'up{{job="{JOB}"}}'
    assert prometheus.wait_for(lambda: prometheus.value(query), query) == 1


def test_targets_api_reports_the_agent_target_healthy(prometheus: Prometheus, agent: Agent) -> None:
    def scraped() -> dict[str, object] | None:
        targets = prometheus.active_targets()
        ours = [t for t in targets if t["labels"]["job"] == JOB]
        assert len(ours) == 1, targets
        return ours[0] if ours[0]["health"] != "unknown" else None

    target = prometheus.wait_for(scraped, "the first scrape of the agent")
    assert target["health"] == "up", target
    assert target["lastError"] == ""
    assert target["scrapeUrl"] == f"http://{agent.metrics_target}/metrics"
