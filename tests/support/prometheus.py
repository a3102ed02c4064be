"""Real Prometheus-family servers for tests: Debian's binaries started on loopback.

Configs are written as JSON (YAML is a superset of it), data lives in the test's tmp dir, and
both a server's API and its own log are reachable for assertions and failure messages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.polling import poll

T = TypeVar("T")


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def debian_binary(name: str, package: str) -> str:
    """A Debian binary on PATH; in CI its absence is a setup error, not a reason to skip."""
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is missing: run `make system-deps` (Debian package {package})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def scrape_config(job: str, targets: list[str], interval_s: float) -> dict[str, Any]:
    interval = f"{int(interval_s * 1000)}ms"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": [{"targets": targets}],
            }
        ],
    }


@dataclass(frozen=True)
class Service:
    """A running server: its URL, its process and the log it writes."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
            body: bytes = response.read()
            return body


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


@contextmanager
def running_service(
    name: str,
    argv: list[str],
    workdir: Path,
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Iterator[Service]:
    """Start `argv` (listening on `port`), wait for /-/ready, stop it with SIGTERM on exit."""
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    service = Service(name, f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(service.url):
            if process.poll() is not None:
                pytest.fail(f"{name} exited {process.returncode}:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready after {timeout_s} s:\n{service.log_tail()}")
            time.sleep(0.2)
        yield service
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Prometheus(Service):
    """A running Prometheus server's HTTP API."""

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant-query results: `[{"metric": {...}, "value": [ts, "1"]}, ...]`."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single sample of `promql`, or None while it has no result yet."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return targets

    def wait_for(self, probe: Callable[[], T | None], what: str, timeout_s: float = 30.0) -> T:
        """Poll `probe` until it returns something other than None; fail with the server log."""
        # A probe's answer may be falsy (a counter at 0): wrap it so only None means "not yet".
        found = poll(
            lambda: (answer,) if (answer := probe()) is not None else None,
            timeout_s,
            f"{what}; {self.name} log:\n{self.log_tail()}",
            interval=0.2,
            alive=self._exited,
        )
        return found[0]

    def _exited(self) -> str | None:
        if self.process.poll() is None:
            return None
        return f"{self.name} exited {self.process.returncode}:\n{self.log_tail()}"


@contextmanager
def running_prometheus_server(
    name: str, argv: list[str], workdir: Path, port: int, *, env: Mapping[str, str] | None = None
) -> Iterator[Prometheus]:
    """`running_service` for a `prometheus` command line, with the query API."""
    with running_service(name, argv, workdir, port, env=env) as service:
        yield Prometheus(service.name, service.url, service.process, service.log)


@contextmanager
def running_prometheus(
    workdir: Path, *, job: str, targets: list[str], scrape_interval_s: float = 1.0
) -> Iterator[Prometheus]:
    """Start Prometheus on 127.0.0.1 scraping `targets`; stop it (SIGTERM, wait) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps(scrape_config(job, targets, scrape_interval_s), indent=2))
    port = free_port()
    argv = [
        debian_binary("prometheus", "prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with running_prometheus_server("prometheus", argv, workdir, port) as server:
        yield server
