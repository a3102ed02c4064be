"""Fixtures for the module's end-to-end tests: simulator, service SDK, artifacts, the process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from azure.iot.hub import IoTHubRegistryManager

from simulator import Simulator, pick_loopback_host
from tests.simulator.conftest import collect_sdk_garbage
from tests.support.artifact_server import TestPki, make_pki
from tests.support.module_process import MODULE, ModuleProcess, module_environment
from tests.support.module_releases import Releases, ThreadedArtifacts
from tests.support.service_sdk import Service

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deployment" / "deployment.template.json"

StartModule = Callable[..., ModuleProcess]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    """The simulator with this project's own deployment template (mlagent, sensor, routes)."""
    with Simulator.start(DEPLOYMENT, run_dir=tmp_path / "sim", host=pick_loopback_host()) as hub:
        yield hub
    collect_sdk_garbage()


@pytest.fixture
def service(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """The real service SDK; it trusts the simulator CA through REQUESTS_CA_BUNDLE."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sim.ca_cert_path))
    registry = IoTHubRegistryManager.from_connection_string(sim.service_connection_string)
    yield Service(registry, sim.device_id)
    registry.amqp_svc_client.disconnect_sync()


@pytest.fixture(scope="session")
def artifact_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """The test CA of tests/agent: the module trusts it through EDGEML_ARTIFACT_CA_FILE."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def artifacts(artifact_pki: TestPki) -> Iterator[ThreadedArtifacts]:
    server = ThreadedArtifacts(artifact_pki)
    yield server
    server.close()


@pytest.fixture
def releases(artifacts: ThreadedArtifacts) -> Releases:
    return Releases(artifacts)


@pytest.fixture
def start_module(
    sim: Simulator, releases: Releases, artifact_pki: TestPki, tmp_path: Path
) -> Iterator[StartModule]:
    """Start `python -m module` (again, for restarts: same state dir); all stopped after."""
    started: list[ModuleProcess] = []

    def start(extra_env: Mapping[str, str] | None = None, *, wait: bool = True) -> ModuleProcess:
        env = module_environment(
            sim.edge_env(sim.device_id, MODULE),
            state_dir=tmp_path / "state",
            trusted_keys=releases.trusted_keys,
            artifact_ca=artifact_pki.ca_pem,
            extra=extra_env,
        )
        module = ModuleProcess.start(env, tmp_path / "module.log")
        started.append(module)
        if wait:
            module.wait_ready()
        return module

    yield start
    for module in started:
        module.close()
