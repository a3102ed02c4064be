"""The image's module against the simulator: the module tests' hub, service SDK and artifact
server (tests/module), and the session's image run in a real engine (tests/support/docker)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from simulator import Simulator
from tests.module import conftest as module_fixtures
from tests.support.artifact_server import TestPki
from tests.support.docker import Container, Containers, free_port, readable_copy
from tests.support.module_process import MODULE
from tests.support.module_releases import Releases

# The module tests' hub, service SDK and artifact server, shared as they are.
sim = module_fixtures.sim
service = module_fixtures.service
artifact_pki = module_fixtures.artifact_pki
artifacts = module_fixtures.artifacts
releases = module_fixtures.releases

TEMPLATE = Path(__file__).resolve().parents[2] / "deployment" / "deployment.template.json"
STATE_DIR = "/var/lib/edge-agent"  # the image's VOLUME and EDGEML_STATE_DIR
CERTS_DIR = "/run/edge"  # where the tests mount the hub's and the artifact server's CAs


def template_memory_bytes(template: Path = TEMPLATE) -> int:
    """The memory limit the deployment template gives the agent module (`--memory`)."""
    modules = json.loads(template.read_text())["modulesContent"]["$edgeAgent"][
        "properties.desired"
    ]["modules"]
    return int(modules[MODULE]["settings"]["createOptions"]["HostConfig"]["Memory"])


@dataclass
class AgentContainer:
    """The image running `python -m module`, serving on loopback ports of the host."""

    container: Container
    http_port: int
    metrics_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def infer(self, name: str, body: Mapping[str, Any], timeout_s: float = 10.0) -> Any:
        request = urllib.request.Request(
            self.url(f"/v2/models/{name}/infer"),
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def wait_connected(self, timeout_s: float = 90.0) -> None:
        self.container.wait_log("hub_connection", timeout_s, connected=True)


StartAgent = Callable[..., AgentContainer]


@pytest.fixture
def start_agent(
    containers: Containers,
    sim: Simulator,
    releases: Releases,
    artifact_pki: TestPki,
    tmp_path: Path,
) -> StartAgent:
    """Start the image as IoT Edge's local debugging runs a module: `EdgeHubConnectionString`
    plus the hub's CA mounted at `EdgeModuleCACertificateFile`, the trusted key and artifact
    settings a deployment's `env` carries, and a model store volume."""
    certs = tmp_path / "certs"
    hub_ca = readable_copy(sim.ca_cert_path, certs / "hub-ca.pem")
    artifacts_ca = readable_copy(artifact_pki.ca_pem, certs / "artifacts-ca.pem")

    def start(
        *run_args: str,
        volume: str | None = None,
        env: Mapping[str, str] | None = None,
        without: Sequence[str] = (),
    ) -> AgentContainer:
        http_port, metrics_port = free_port(), free_port()
        environment = {
            "EdgeHubConnectionString": sim.module_connection_string(sim.device_id, MODULE),
            "EdgeModuleCACertificateFile": f"{CERTS_DIR}/{hub_ca.name}",
            "EDGEML_TRUSTED_KEYS": releases.trusted_keys,
            "EDGEML_ALLOWED_HOSTS": "127.0.0.1",
            "EDGEML_ARTIFACT_CA_FILE": f"{CERTS_DIR}/{artifacts_ca.name}",
            # The host's network: loopback only, and ports no other process holds.
            "EDGEML_HOST": "127.0.0.1",
            "EDGEML_HTTP_PORT": str(http_port),
            "EDGEML_METRICS_PORT": str(metrics_port),
            **(env or {}),
        }
        for name in without:
            del environment[name]
        mounts = [f"--volume={certs}:{CERTS_DIR}:ro"]
        if volume is not None:
            mounts.append(f"--volume={volume}:{STATE_DIR}")
        container = containers.run(*mounts, *run_args, env=environment)
        return AgentContainer(container, http_port, metrics_port)

    return start
