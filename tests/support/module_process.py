"""The module (`python -m module`) as its own process, its environment, and its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.polling import poll

LogLine = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
MODULE = "mlagent"


@dataclass
class ModuleProcess:
    """`python -m module` with JSON logs read on a thread (its stdout and stderr, merged)."""

    process: subprocess.Popen[str]
    lines: list[LogLine] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # the same lines, as written
    ports: dict[str, int] = field(default_factory=dict)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, env: Mapping[str, str], log_file: Path) -> ModuleProcess:
        process = subprocess.Popen(
            [sys.executable, "-m", "module"],
            cwd=REPO,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        module = cls(process)
        module._reader = threading.Thread(
            target=module._read, args=(log_file,), name="module-log", daemon=True
        )
        module._reader.start()
        return module

    def _read(self, log_file: Path) -> None:
        assert self.process.stdout is not None
        with log_file.open("a") as copy:
            for raw in self.process.stdout:
                copy.write(raw)
                copy.flush()
                self.raw.append(raw)
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    line = {"event": "unparsed", "text": raw.rstrip()}
                if not isinstance(line, dict):
                    line = {"event": "unparsed", "text": raw.rstrip()}
                if line.get("event") == "http_listening":
                    self.ports[str(line["service"])] = int(line["port"])
                self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def psutil(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def events(self, name: str) -> list[LogLine]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_for(self, matches: Callable[[LogLine], bool], timeout: float, what: str) -> LogLine:
        def found() -> LogLine | None:
            hits = [line for line in list(self.lines) if matches(line)]
            if hits:
                return hits[0]
            if self.process.poll() is not None:
                pytest.fail(f"the module exited ({self.process.returncode}) before {what}")
            return None

        return poll(found, timeout, f"module log: {what}", interval=0.05)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda line: line.get("event") == "hub_connection", timeout, "connected")
        poll(lambda: "http" in self.ports, timeout, "HTTP port logged")

    def infer_http(self, name: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['http']}/v2/models/{name}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), json.loads(error.read())

    def metadata(self, name: str) -> Any:
        url = f"http://127.0.0.1:{self.ports['http']}/v2/models/{name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample from the module's `/metrics` (None if absent)."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        wanted = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in (labels or {}).items()) + "}" if labels else ""
        )
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def terminate(self, timeout: float = 15.0, *, fail: bool = True) -> int | None:
        """SIGTERM, then the exit code. If it does not exit in time: SIGKILL, and a test
        failure (or None with `fail=False`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            if self._reader is not None:
                self._reader.join(10)  # every line it wrote is read: the caller looks at them
            if fail:
                pytest.fail(f"the module did not exit within {timeout} s of SIGTERM")
            return None

    def close(self) -> None:
        """SIGKILL if still running; then the log reader ends and the pipe is closed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def module_environment(
    edge_env: Mapping[str, str],
    *,
    state_dir: Path,
    trusted_keys: str,
    artifact_ca: Path,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    env.update(edge_env)
    env.update(
        {
            "EDGEML_STATE_DIR": str(state_dir),
            "EDGEML_TRUSTED_KEYS": trusted_keys,
            "EDGEML_ALLOWED_HOSTS": "127.0.0.1",
            "EDGEML_ARTIFACT_CA_FILE": str(artifact_ca),
            "EDGEML_HOST": "127.0.0.1",
            "EDGEML_HTTP_PORT": "0",
            "EDGEML_METRICS_PORT": "0",
            "EDGEML_LOG_FORMAT": "json",
            **(extra or {}),
        }
    )
    return env
