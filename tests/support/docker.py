"""Docker for tests: one engine and one image build per session; every container cleaned up.

A pytest plugin (loaded by tests/conftest.py). Fixtures:

* `docker_engine` (session): a `Docker` CLI whose engine answers, held through a lease
  (deployment/image/docker.py `Engine`): `dockerd` is started when none runs, and stopped when
  the last lease holder (this session, another one, `make image`...) finishes, if one of them
  started it.
* `agent_image` (session): `AgentImage`, the repository's Dockerfile built once per session
  under a tag of its own, removed at the end; the builder stage's layers stay cached.
* `containers` (function): `Containers`, whose `run(*docker_run_args, env=...)` starts the image
  (`--network host`, the only network the machine allows) and returns a `Container`; `volume()`
  makes a named volume. Everything made through it is removed after the test.

Tests using them must allow for the first build: `pytest.mark.timeout(BUILD_TIMEOUT_S)`.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deployment.image.build import IMAGE_NAME, build_default
from deployment.image.docker import Docker, Engine
from tests.support.polling import poll

# The first build of a session on a fresh machine: debootstrap (~3 min on a shared 2-core
# machine) plus pip installing the device dependencies; cached builds take seconds.
BUILD_TIMEOUT_S = 1200
TEST_LABEL = "org.edge-mlops.test"


def free_port() -> int:
    """A TCP port free on loopback now (the container binds it in the host's network)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class AgentImage:
    ref: str  # the session's tag
    image_id: str
    stand_in: bool  # built on the Debian stand-in base


@dataclass
class Container:
    docker: Docker
    name: str

    def inspect(self) -> dict[str, Any]:
        [document] = json.loads(self.docker("container", "inspect", self.name).stdout)
        return dict(document)

    def state(self) -> dict[str, Any]:
        return dict(self.inspect()["State"])

    def running(self) -> bool:
        return bool(self.state()["Running"])

    def health(self) -> str | None:
        health = self.state().get("Health")
        return None if health is None else str(health["Status"])

    def logs(self) -> str:
        done = self.docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines (stdout and stderr); other lines as {"event": "unparsed"}."""
        lines = []
        for raw in self.logs().splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = None
            lines.append(line if isinstance(line, dict) else {"event": "unparsed", "text": raw})
        return lines

    def wait_log(self, event: str, timeout_s: float = 60.0, **fields: Any) -> dict[str, Any]:
        """The first JSON log line of `event` whose `fields` have these values."""

        def found() -> dict[str, Any] | None:
            hits = [
                line
                for line in self.log_lines()
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
            ]
            if hits:
                return hits[0]
            if not self.running():
                pytest.fail(f"{self.name} exited before logging {event}:\n{self.logs()[-3000:]}")
            return None

        return dict(poll(found, timeout_s, f"{self.name} logs {event}", interval=0.3))

    def wait_health(self, status: str = "healthy", timeout_s: float = 90.0) -> None:
        def reached() -> bool:
            if not self.running():
                pytest.fail(f"{self.name} exited:\n{self.logs()[-3000:]}")
            return self.health() == status

        poll(reached, timeout_s, f"{self.name} health {status}", interval=0.5)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        poll(lambda: not self.running(), timeout_s, f"{self.name} exits", interval=0.3)
        return int(self.state()["ExitCode"])

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", self.name, *argv, check=check, timeout_s=60)

    def stop(self, grace_s: int = 10) -> float:
        """`docker stop -t grace`; the seconds it took."""
        started = time.monotonic()
        self.docker("stop", "--time", str(grace_s), self.name, timeout_s=grace_s + 60)
        return time.monotonic() - started


def http_status(url: str, timeout_s: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)
    except OSError:
        return 0  # nothing listens (yet)


@dataclass
class Containers:
    """Runs containers and makes volumes for one test; `cleanup()` removes them all."""

    docker: Docker
    image: AgentImage
    label: str
    made: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def volume(self) -> str:
        name = f"edge-mlops-test-{secrets.token_hex(4)}"
        self.docker("volume", "create", "--label", self.label, name)
        self.volumes.append(name)
        return name

    def run(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] = (),
        image: str | None = None,
    ) -> Container:
        """`docker run --detach --network host [args] IMAGE [command]` with `env` as `-e`."""
        name = f"edge-mlops-test-{secrets.token_hex(4)}"
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        self.docker(
            "run",
            "--detach",
            "--name",
            name,
            "--label",
            self.label,
            "--network",
            "host",
            *flags,
            *args,
            image or self.image.ref,
            *command,
        )
        self.made.append(name)
        return Container(self.docker, name)

    def run_once(
        self, *args: str, command: Sequence[str] = (), check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`docker run --rm --network none [args] IMAGE [command]`, to its end."""
        return self.docker(
            "run",
            "--rm",
            "--label",
            self.label,
            "--network",
            "none",
            *args,
            self.image.ref,
            *command,
            check=check,
            timeout_s=180,
        )

    def cleanup(self) -> None:
        if self.made:
            self.docker("rm", "--force", "--volumes", *self.made, check=False, timeout_s=120)
        if self.volumes:
            self.docker("volume", "rm", "--force", *self.volumes, check=False, timeout_s=60)


def remove_labelled(docker: Docker, label: str) -> None:
    """Whatever a session left behind under its label: containers, then volumes."""
    ids = docker("ps", "--all", "--quiet", "--filter", f"label={label}", check=False).stdout
    if ids.split():
        docker("rm", "--force", "--volumes", *ids.split(), check=False, timeout_s=120)
    names = docker("volume", "ls", "--quiet", "--filter", f"label={label}", check=False).stdout
    if names.split():
        docker("volume", "rm", "--force", *names.split(), check=False)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    docker = Docker()
    engine = Engine(docker, tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    engine.start()
    yield docker
    engine.stop()


@pytest.fixture(scope="session")
def session_label() -> str:
    return f"{TEST_LABEL}={secrets.token_hex(6)}"


@pytest.fixture(scope="session")
def agent_image(
    docker_engine: Docker, session_label: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentImage]:
    key, _, value = session_label.partition("=")
    tag = f"{IMAGE_NAME}:test-{value}"
    result = build_default(docker_engine, tag, tmp_path_factory.mktemp("image"), {key: value})
    yield AgentImage(tag, result.image_id, result.stand_in)
    remove_labelled(docker_engine, session_label)
    # The runtime stage's layers go with the tag; the builder stage stays tagged as the next
    # session's cache (the dependency layer above all).
    docker_engine("rmi", tag, check=False)


@pytest.fixture
def containers(
    docker_engine: Docker, agent_image: AgentImage, session_label: str
) -> Iterator[Containers]:
    made = Containers(docker_engine, agent_image, session_label)
    yield made
    made.cleanup()


def readable_copy(source: Path, target: Path) -> Path:
    """`source` copied world-readable to `target`, to mount in a container, whose uid (10001
    for the agent's image) is not the file's owner."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(0o755)
    target.write_bytes(source.read_bytes())
    target.chmod(0o644)
    return target
