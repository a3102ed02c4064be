"""Starting `python -m agent serve` as a real subprocess, as an operator or a container would."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LogLine = dict[str, object]


def model_status(state: str, version: int, reason: str | None = None) -> Callable[[LogLine], bool]:
    """Matches the agent's `model_status` log line for `version` in `state` (and `reason`)."""

    def matches(line: LogLine) -> bool:
        return (
            line.get("event") == "model_status"
            and line.get("state") == state
            and line.get("version") == version
            and (reason is None or line.get("reason") == reason)
        )

    return matches


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    log_lines: list[LogLine] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    # Set by `signal_on`: the log reader sends `_signal` as it reads the first matching line.
    _trigger: Callable[[LogLine], bool] | None = None
    _signal: int = signal.SIGKILL
    signalled_after: LogLine | None = None
    signalled_at: float | None = None  # time.monotonic() when the signal was sent

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def events(self, name: str) -> list[dict[str, object]]:
        return [line for line in list(self.log_lines) if line.get("event") == name]

    def wait_for_event(self, name: str, timeout: float = 30.0) -> dict[str, object]:
        return self.wait_for(lambda line: line.get("event") == name, timeout, what=repr(name))

    def wait_for(
        self, matches: Callable[[LogLine], bool], timeout: float = 30.0, *, what: str = "a line"
    ) -> LogLine:
        """The first log line that `matches`, waiting at most `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.process.poll() is not None
            found = [line for line in list(self.log_lines) if matches(line)]
            if found:
                return found[0]
            if exited:
                break
            time.sleep(0.02)
        pytest.fail(f"agent never logged {what}; log: {self.log_lines[-10:]}")

    def signal_on(self, matches: Callable[[LogLine], bool], signum: int = signal.SIGKILL) -> None:
        """Send `signum` the moment the agent logs a line that `matches` (not a poll later)."""
        self._signal = signum
        self._trigger = matches


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
        trigger = agent._trigger
        if trigger is not None and trigger(line):
            agent._trigger = None
            agent.process.send_signal(agent._signal)
            agent.signalled_at = time.monotonic()
            agent.signalled_after = line


@contextmanager
def running_agent(
    model: Path | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    ready: bool = True,
    open_file_limit: int | None = None,
) -> Iterator[AgentProcess]:
    """Run the agent on loopback with OS-chosen ports (read back from its JSON log).

    `model=None` runs the managed mode (pass `--state-dir` / `--watch-dir` in `args`); `ready`
    then waits for the HTTP port only, as no model has to be active. `open_file_limit` sets
    the child's RLIMIT_NOFILE (soft and hard), as a device's would be.
    """

    def limit_files() -> None:
        if open_file_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_file_limit, open_file_limit))

    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    environment |= {"EDGEML_LOG_FORMAT": "json", **(env or {})}
    model_args = ["--model", str(model)] if model is not None else []
    process = subprocess.Popen(
        [
            sys.executable, "-m", "agent", "serve", *model_args,
            "--host", "127.0.0.1", "--http-port", "0", "--metrics-port", "0", *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        preexec_fn=limit_files if open_file_limit is not None else None,  # noqa: PLW1509 -- only setrlimit, before exec
    )  # fmt: skip
    agent = AgentProcess(process)
    reader = threading.Thread(target=_read_logs, args=(agent,), daemon=True)
    reader.start()
    try:
        if ready and model is not None:
            agent.wait_for_event("model_active")
        elif ready:
            agent.wait_for(
                lambda line: line.get("event") == "http_listening" and line["service"] == "http",
                what="the HTTP port",
            )
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
