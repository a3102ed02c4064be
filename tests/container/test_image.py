"""The image, built from the Dockerfile by a real engine, running `python -m module` against the
simulator: a signed release through the module twin, routed and HTTP inference, health, the
model store volume, shutdown, hardened run options and start failures.

The containers share the host's network (the machine allows nothing but loopback, so the
engine has no bridge): "its published port" is the port the container binds on the host.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
import tomllib
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.releases.manifest import sign_manifest
from simulator import Simulator
from tests.container.conftest import (
    STATE_DIR,
    AgentContainer,
    StartAgent,
    template_memory_bytes,
)
from tests.support.docker import BUILD_TIMEOUT_S, AgentImage, Containers, http_status
from tests.support.models import TINY_FEATURES, tiny_bytes
from tests.support.module_releases import KEY_ID, Releases
from tests.support.polling import poll
from tests.support.sensor import SENSOR, infer_request, reference, send_infer, sensor_client
from tests.support.service_sdk import Service

# The first test of a session may pay for building the image (and its base).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(BUILD_TIMEOUT_S)]

REPO = Path(__file__).resolve().parents[2]
V1, V2 = tiny_bytes(0), tiny_bytes(1)
UID = 10001
# Docker's default `docker stop` grace; the agent's own (EDGEML_SHUTDOWN_GRACE_S, 8 s) fits in it.
STOP_GRACE_S = 10
# HEALTHCHECK runs every 15 s in the image; the tests ask for the same command every second.
FAST_HEALTH = "--health-interval=1s"


def _rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, TINY_FEATURES)).astype(np.float32)


def _release_v1(service: Service, releases: Releases) -> dict[str, Any]:
    manifest = releases.release("v1.onnx", V1, 1)
    service.publish(manifest)
    service.wait_model(1, timeout=90)
    return manifest


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirement_names(requirements: list[str]) -> set[str]:
    return {
        _normalise(r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0])
        for r in requirements
    }


def test_the_module_connects_takes_a_twin_release_and_serves_it_hardened(
    start_agent: StartAgent, sim: Simulator, service: Service, releases: Releases
) -> None:
    """As uid 10001, read-only root, no capabilities, the template's memory limit."""
    memory = template_memory_bytes()
    agent = start_agent(
        "--read-only",
        "--tmpfs=/tmp",
        "--cap-drop=ALL",
        f"--memory={memory}",
        FAST_HEALTH,
    )
    agent.wait_connected()
    _release_v1(service, releases)
    assert releases.artifacts.requests_for("v1.onnx")  # downloaded over HTTPS by the container

    # OIP v2 over HTTP on its port.
    rows = _rows(1)
    answer = agent.infer("m", infer_request("http-1", rows))
    assert answer["model_version"] == "1"
    produced = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(1, -1)
    np.testing.assert_allclose(produced, reference(V1, rows), atol=1e-5)

    # Routed `infer` messages from a sensor module, answered upstream with their ids.
    sent = {f"corr-{i}": _rows(10 + i) for i in range(5)}
    with sensor_client(sim.module_connection_string(sim.device_id, SENSOR), sim.ca_cert_path) as c:
        for correlation_id, request_rows in sent.items():
            send_infer(c, correlation_id, request_rows)
        answers = sim.upstream.wait_for_count(lambda m: m.output == "predictions", 5, timeout=60)
    assert sorted(m.message.system["correlationId"] for m in answers) == sorted(sent)

    agent.container.wait_health("healthy")
    assert http_status(f"http://127.0.0.1:{agent.metrics_port}/metrics") == 200

    status = agent.container.exec("cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {str(UID)}
    host = agent.container.inspect()["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["Memory"] == memory


def test_the_image_holds_the_device_packages_only(
    containers: Containers, agent_image: AgentImage
) -> None:
    """No cloud, dev or build-only package, and no repository folder but agent/ and module/."""
    probe = (
        "import importlib.metadata as m, importlib.util as u, json;"
        "print(json.dumps({'dists': sorted(d.metadata['Name'] for d in m.distributions()),"
        "'folders': [f for f in ('deployment', 'simulator', 'bench', 'demo', 'tests')"
        " if u.find_spec(f)]}))"
    )
    found = json.loads(containers.run_once("--entrypoint=python", command=["-c", probe]).stdout)
    dists = {_normalise(name) for name in found["dists"]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {
        name
        for group in project["optional-dependencies"].values()
        for name in _requirement_names(group)
    }
    device = _requirement_names(project["dependencies"])
    assert device <= dists
    assert not (extras - device - {"edge-mlops-agent"}) & dists
    assert not {"pip", "setuptools", "wheel"} & dists
    assert found["folders"] == []
    config = json.loads(
        containers.docker(
            "image", "inspect", "--format", "{{json .Config}}", agent_image.ref
        ).stdout
    )
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["python", "-m", "module"]
    assert list(config["Volumes"]) == [STATE_DIR]


def test_the_model_store_volume_survives_rm_and_serves_without_a_download(
    start_agent: StartAgent, containers: Containers, service: Service, releases: Releases
) -> None:
    volume = containers.volume()
    first = start_agent(volume=volume)
    first.wait_connected()
    _release_v1(service, releases)
    downloads = len(releases.artifacts.requests_for("v1.onnx"))
    first.container.stop()
    containers.docker("rm", first.container.name)

    second = start_agent(volume=volume)
    second.wait_connected()

    def served() -> Any:
        try:
            return second.infer("m", infer_request("after-rm", _rows(2)))
        except (urllib.error.URLError, ConnectionError):
            return None

    assert poll(served, 60, "the new container serves v1")["model_version"] == "1"
    assert len(releases.artifacts.requests_for("v1.onnx")) == downloads
    events = {line.get("event") for line in second.container.log_lines()}
    assert "download_started" not in events


_VOLUME_CHECK = """
import hashlib, json, pathlib
root = pathlib.Path('/store')
print(json.dumps({
    'state': json.loads((root / 'state.json').read_text()),
    'artifacts': {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in (root / 'models').glob('*.onnx')},
    'temporary': sorted(str(p.relative_to(root)) for p in root.rglob('*')
                        if p.suffix in ('.part', '.tmp')),
}))
"""


def _hammer(agent: AgentContainer, stop: threading.Event, outcomes: list[str]) -> None:
    """HTTP inference until told to stop; each request's outcome in `outcomes`."""
    body = infer_request("load", _rows(3))
    while not stop.is_set():
        try:
            agent.infer("m", body, timeout_s=30)
            outcomes.append("ok")
        except urllib.error.HTTPError as error:
            error.close()
            outcomes.append(f"http {error.code}")
        except urllib.error.URLError as error:
            # Refused: the server no longer accepts, so the request was never in flight. Reset
            # or broken while urllib still sent the request: closed unread at shutdown.
            if isinstance(error.reason, ConnectionRefusedError):
                outcomes.append("refused")
            elif isinstance(error.reason, ConnectionResetError | BrokenPipeError):
                outcomes.append(f"dropped {error.reason!r}")
            else:
                outcomes.append(f"broken {error.reason!r}")
            time.sleep(0.05)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as error:
            # Closed unread at shutdown: seen while reading the answer, or while still sending.
            outcomes.append(f"dropped {error!r}")
            time.sleep(0.05)
        except (ConnectionError, http.client.HTTPException, TimeoutError) as error:
            outcomes.append(f"broken {error!r}")


def test_docker_stop_under_load_finishes_requests_exits_0_and_leaves_a_whole_store(
    start_agent: StartAgent, containers: Containers, service: Service, releases: Releases
) -> None:
    """SIGTERM while HTTP requests run and a newer release downloads."""
    volume = containers.volume()
    agent = start_agent(volume=volume)
    agent.wait_connected()
    v1 = _release_v1(service, releases)
    stalled = releases.serve("v2.onnx", V2, stall_interval_s=0.2)
    service.publish(releases.manifest(V2, 2, stalled))
    agent.container.wait_log("download_started")

    stop = threading.Event()
    outcomes: list[str] = []
    clients = [
        threading.Thread(target=_hammer, args=(agent, stop, outcomes), name=f"load-{i}")
        for i in range(4)
    ]
    for client in clients:
        client.start()
    try:
        poll(lambda: outcomes.count("ok") >= 200, 60, "200 requests served before the stop")
        took = agent.container.stop(STOP_GRACE_S)
    finally:
        stop.set()
        for client in clients:
            client.join(60)

    state = agent.container.state()
    assert state["ExitCode"] == 0, agent.container.logs()[-3000:]
    assert took < STOP_GRACE_S, f"stopped by SIGKILL after the grace ({took:.1f} s)"
    # A connection the kernel had accepted but the server had not started reading when it
    # stopped listening is closed unanswered (aiohttp closes idle connections at shutdown): at
    # most one per client, its request never handled. Every request handled was answered 200.
    dropped = [o for o in outcomes if o.startswith("dropped")]
    assert len(dropped) <= len(clients), dropped
    assert {o for o in outcomes if o not in {"ok", "refused"} and o not in dropped} == set()
    stopped = [
        line for line in agent.container.log_lines() if line.get("event") == "process_stopped"
    ]
    assert stopped, "the process logged no clean stop"

    found = json.loads(
        containers.run_once(
            f"--volume={volume}:/store:ro", "--entrypoint=python", command=["-c", _VOLUME_CHECK]
        ).stdout
    )
    active = found["state"]["models"]["m"]["active"]
    assert (active["version"], active["sha256"]) == (1, v1["sha256"])
    # Every artifact under a final name is whole: its bytes hash to its name.
    assert found["artifacts"] == {f"{sha}.onnx": sha for sha in (v1["sha256"],)}
    # At most the download that was cut off, under its temporary name (dropped at next start).
    assert all(path.endswith(".part") for path in found["temporary"]), found["temporary"]


def test_a_model_that_cannot_load_leaves_the_container_live_and_healthy_but_not_ready(
    start_agent: StartAgent, service: Service, releases: Releases
) -> None:
    """IoT Edge sees a running module (edgeAgent restarts on exit, not on health); the twin's
    reported `model.state` and an alert say why it does not serve."""
    agent = start_agent(FAST_HEALTH)
    agent.wait_connected()
    garbage = b"not an ONNX model " * 64
    unsigned = releases.manifest(V1, 1, releases.serve("broken.onnx", garbage), golden=False)
    del unsigned["signature"]
    unsigned |= {"sha256": hashlib.sha256(garbage).hexdigest(), "size": len(garbage)}
    service.publish(sign_manifest(unsigned, releases.key, KEY_ID))
    service.wait_model(1, state="failed", timeout=90)
    agent.container.wait_health("healthy")
    assert http_status(agent.url("/v2/health/live")) == 200
    assert http_status(agent.url("/v2/health/ready")) == 503
    assert agent.container.running()


def _unwritable_host_dir(tmp_path: Path) -> list[str]:
    store = tmp_path / "root-owned-store"
    store.mkdir()
    store.chmod(0o755)  # root's, as a directory made on the host by hand would be
    return [f"--volume={store}:{STATE_DIR}"]


def _read_only_without_volume(tmp_path: Path) -> list[str]:
    return ["--read-only", "--env=EDGEML_STATE_DIR=/srv/models"]


@pytest.mark.parametrize(
    ("make_args", "without", "message"),
    [
        (
            lambda _: [],
            ["EDGEML_TRUSTED_KEYS"],
            "no trusted manifest keys: set EDGEML_TRUSTED_KEYS",
        ),
        (
            _unwritable_host_dir,
            [],
            f"directory {STATE_DIR}/spool is not usable by uid {UID} (Permission denied",
        ),
        (
            _read_only_without_volume,
            [],
            f"directory /srv/models/spool is not usable by uid {UID} (Read-only file system",
        ),
    ],
    ids=["no-trusted-key", "root-owned-volume", "read-only-without-volume"],
)
def test_a_container_missing_what_it_needs_fails_at_start_naming_it(
    start_agent: StartAgent,
    tmp_path: Path,
    make_args: Callable[[Path], list[str]],
    without: list[str],
    message: str,
) -> None:
    agent = start_agent(*make_args(tmp_path), without=without)
    assert agent.container.wait_exit(90) == 1
    failures = [
        line for line in agent.container.log_lines() if line.get("event") == "process_failed"
    ]
    assert failures, agent.container.logs()[-3000:]
    assert message in failures[0]["error"]
