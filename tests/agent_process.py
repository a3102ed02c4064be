"""Starting `python -m agent serve` as a real subprocess, as an operator or a container would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    log_lines: list[dict[str, object]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def events(self, name: str) -> list[dict[str, object]]:
        return [line for line in list(self.log_lines) if line.get("event") == name]

    def wait_for_event(self, name: str, timeout: float = 30.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found[0]
            if self.process.poll() is not None and not found:
                break
            time.sleep(0.02)
        pytest.fail(f"agent never logged {name!r}; log: {self.log_lines[-10:]}")


def _read_logs(agent: AgentProcess) -> None:
    assert agent.process.stderr is not None
    for raw in agent.process.stderr:
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            line = {"event": "unparsed", "text": raw.rstrip()}
        if line.get("event") == "http_listening":
            agent.ports[str(line["service"])] = int(str(line["port"]))
        agent.log_lines.append(line)


@contextmanager
def running_agent(
    model: Path, *args: str, env: Mapping[str, str] | None = None, ready: bool = True
) -> Iterator[AgentProcess]:
    """Run the agent on loopback with OS-chosen ports (read back from its JSON log)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    environment |= {"EDGEML_LOG_FORMAT": "json", **(env or {})}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "agent", "serve", "--model", str(model),
            "--host", "127.0.0.1", "--http-port", "0", "--metrics-port", "0", *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )  # fmt: skip
    agent = AgentProcess(process)
    reader = threading.Thread(target=_read_logs, args=(agent,), daemon=True)
    reader.start()
    try:
        if ready:
            agent.wait_for_event("model_active")
        yield agent
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(5)
        if process.stderr is not None:
            process.stderr.close()
