"""The whole publisher path over real services: MLflow on SQLite, Azurite with the real
azure-storage-blob SDK, the simulator's IoT Hub with the real azure-iot-hub SDK.

Devices: three, in two rings (canary: dev-a; all: dev-a, dev-b, dev-c). They are agent
stand-ins (simulator/standins.py) that speak MQTT to the hub, check each manifest's signature
against the trusted keys, download the artifact from its SAS URL and check its sha256, then
report the agent's states and probation; a sha256 put in `failing` fails probation. They make
the slow and rare paths cheap (crash and resume, expiry, outages); the same rollout against
real `python -m module` agents is in test_release_modules_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.releases.manifest import load_trusted_keys, verify_manifest
from deployment.examples.onnx_models import save, tiny_mlp
from deployment.publish.audit import AuditLog
from deployment.publish.hub_client import AzureHub
from simulator import Simulator, pick_loopback_host
from simulator.azurite import Azurite
from simulator.hub import wait_until
from simulator.standins import StandInFleet
from tests.deployment.conftest import REPO, Result, Workspace

pytestmark = pytest.mark.e2e

FLEET = {
    "dev-a": {"ring": "canary", "fleet": "edgeml"},
    "dev-b": {"ring": "broad", "fleet": "edgeml"},
    "dev-c": {"ring": "broad", "fleet": "edgeml"},
}
# A device no stand-in runs until a test starts one: a ring that waits for it cannot finish.
LATE = {"dev-late": {"ring": "late"}}
RINGS = {
    "canary": "tags.ring = 'canary'",
    "all": "tags.fleet = 'edgeml'",
    "late": "tags.ring = 'late'",
}
GATE = ("--poll", "0.2", "--timeout", "60")


class Fleet:
    def __init__(self, sim: Simulator, failing: set[str], quiet: set[str]) -> None:
        self.sim = sim
        self.failing = failing
        self.quiet = quiet  # sha256s whose probation sees no traffic
        self.trusted_dirs: list[Path] = []

    def reported(self, device: str, model: str) -> Mapping[str, Any]:
        models = self.sim.twin(device, "mlagent")["properties"]["reported"].get("models", {})
        entry: Mapping[str, Any] = models.get(model, {})
        return entry

    def check(self, manifest: Mapping[str, Any]) -> None:
        """What an agent checks before it reports anything: signature, then the bytes."""
        trusted = load_trusted_keys("", [p for d in self.trusted_dirs for p in d.glob("*.pem")])
        verify_manifest(manifest, trusted, datetime.now(UTC))
        with urllib.request.urlopen(str(manifest["url"]), timeout=30) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise ValueError("hash_mismatch")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir = tmp_path_factory.mktemp("sim")
    host = pick_loopback_host()
    failing: set[str] = set()
    quiet: set[str] = set()
    with Simulator.start(
        REPO / "deployment" / "deployment.template.json",
        host=host,
        run_dir=run_dir,
        devices={**FLEET, **LATE},
    ) as sim:
        fleet = Fleet(sim, failing, quiet)
        standins = StandInFleet(
            [(device, "mlagent") for device in FLEET],
            host=host,
            ca_file=sim.ca_cert_path,
            token_for=sim.module_sas_token,
            probation_s=0.5,
            failing=failing,
            check=fleet.check,
            quiet=quiet,
        )
        with standins.start():
            yield fleet


@pytest.fixture
def ws(workspace: Workspace, fleet: Fleet, azurite: Azurite) -> Workspace:
    workspace.rings = RINGS
    workspace.extra = f'hub_ca_file = "{fleet.sim.ca_cert_path}"\n'
    workspace.write_config()
    workspace.environ["IOTHUB_CONNECTION_STRING"] = fleet.sim.service_connection_string
    workspace.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    fleet.trusted_dirs.append(workspace.root / "keys")
    return workspace


def _ok(result: Result) -> Result:
    assert result.code == 0, result.err
    return result


def _publish(ws: Workspace, name: str, seed: int) -> tuple[int, str]:
    """register, upload, sign: (version, sha256)."""
    model = save(tiny_mlp(seed=seed), ws.root / f"{name}-{seed}.onnx")
    return ws.publish(model, name), hashlib.sha256(model.read_bytes()).hexdigest()


def _layers(fleet: Fleet, model: str) -> list[str]:
    hub = AzureHub(fleet.sim.service_connection_string, ca_file=str(fleet.sim.ca_cert_path))
    return sorted(c.id for c in hub.configurations() if c.id.startswith(f"edgeml-{model}-"))


def _actions(ws: Workspace, subject: str) -> list[tuple[str, str, str]]:
    return [
        (e.action, str(e.details.get("ring", "")), e.outcome)
        for e in AuditLog(ws.audit).entries()
        if e.subject == subject
    ]


def test_release_through_two_rings_then_a_rerun_changes_nothing(
    ws: Workspace, fleet: Fleet
) -> None:
    version, sha256 = _publish(ws, "ringed", seed=1)
    dry = _ok(ws.cli("release", f"ringed:{version}", "--rings", "canary,all", "--dry-run"))
    assert "dev-a" in dry.out
    assert "3: dev-a, dev-b, dev-c" in dry.out
    assert "nothing was changed" in dry.out
    assert _layers(fleet, "ringed") == []

    released = _ok(ws.cli("release", f"ringed:{version}", "--rings", "canary,all", *GATE))
    assert f"released ringed:{version}" in released.out
    for device in FLEET:
        report = fleet.reported(device, "ringed")
        assert report["version"] == version
        assert report["sha256"] == sha256
        assert report["state"] == "active"
        assert report["probation"]["state"] == "passed"
    layers = _layers(fleet, "ringed")
    assert len(layers) == 2
    steps = _actions(ws, f"ringed:{version}")
    assert [a for a in steps if a[0].startswith("release.") and a[0] != "release.start"] == [
        ("release.ring", "canary", "applied"),
        ("release.gate", "canary", "passed"),
        ("release.ring", "all", "applied"),
        ("release.gate", "all", "passed"),
        ("release.finished", "", "released"),
    ]
    shown = _ok(ws.cli("show", f"ringed:{version}"))
    assert "ring-canary" in shown.out
    assert "ring-all" in shown.out
    assert "champion" not in shown.out  # the environment's last ring is "late"
    status = _ok(ws.cli("status", "ringed"))
    for device in FLEET:
        assert device in status.out
        # "last seen": the twin query's lastActivityTime, when the device last reported.
        row = next(line for line in status.out.splitlines() if device in line)
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", row), row
    assert "passed" in status.out

    again = _ok(ws.cli("release", f"ringed:{version}", "--rings", "canary,all", *GATE))
    assert "no change" in again.out
    assert _layers(fleet, "ringed") == layers
    _ok(ws.cli("audit", "verify"))


def test_a_model_failing_probation_on_the_canary_halts_and_the_canary_converges_back(
    ws: Workspace, fleet: Fleet
) -> None:
    good, good_sha = _publish(ws, "probed", seed=3)
    _ok(ws.cli("release", f"probed:{good}", "--rings", "canary,all", *GATE))
    bad, bad_sha = _publish(ws, "probed", seed=4)
    fleet.failing.add(bad_sha)

    halted = ws.cli("release", f"probed:{bad}", "--rings", "canary,all", *GATE)
    assert halted.code == 1
    assert "[gate_failed]" in halted.err
    assert "dev-a" in halted.err
    restored = bad + 1
    wait_until(
        lambda: (
            fleet.reported("dev-a", "probed").get("version") == restored
            and fleet.reported("dev-a", "probed").get("probation", {}).get("state") == "passed"
        ),
        timeout=60,
    )
    assert fleet.reported("dev-a", "probed")["sha256"] == good_sha
    for device in ("dev-b", "dev-c"):  # the halted rollout never reached them
        assert fleet.reported(device, "probed")["version"] == good
    actions = _actions(ws, f"probed:{bad}")
    assert ("release.gate", "canary", "failed") in actions
    assert ("release.halt", "canary", "started") in actions
    assert actions[-1] == ("release.halted", "canary", "halted")  # once every step was done
    assert ("release.rollback_method", "canary", "200") in actions
    assert ("release.rollback", "canary", "rereleased") in actions
    assert not any(a[1] == "all" for a in actions)
    history = _ok(ws.cli("history", "probed"))
    assert f"rollback of probed:{bad} to probed:{good}" in history.out
    again = ws.cli("release", f"probed:{bad}", "--rings", "canary,all", *GATE)
    assert again.code == 1
    assert "[halted]" in again.err


def test_a_probation_without_traffic_fails_the_gate_unless_allowed_and_the_cli_says_which(
    ws: Workspace, fleet: Fleet
) -> None:
    # Seeds of their own: the stand-ins keep quiet per artifact, whatever test releases it.
    quiet, quiet_sha = _publish(ws, "quiet", seed=21)
    fleet.quiet.add(quiet_sha)
    refused = ws.cli("release", f"quiet:{quiet}", "--rings", "canary", *GATE)
    assert refused.code == 1
    assert "[gate_failed]" in refused.err
    assert "dev-a: saw no traffic during probation" in refused.err
    assert "--allow-no-traffic" in refused.err

    accepted, accepted_sha = _publish(ws, "quiet", seed=22)
    fleet.quiet.add(accepted_sha)
    released = _ok(
        ws.cli("release", f"quiet:{accepted}", "--rings", "canary", "--allow-no-traffic", *GATE)
    )
    assert f"released quiet:{accepted}" in released.out
    assert "accepted devices that saw no traffic during probation" in released.out
    assert "canary: 1" in released.out
    assert fleet.reported("dev-a", "quiet")["probation"]["state"] == "passed_without_traffic"

    busy, _ = _publish(ws, "quiet", seed=23)  # its devices see traffic: the flag was not needed
    allowed = _ok(
        ws.cli("release", f"quiet:{busy}", "--rings", "canary", "--allow-no-traffic", *GATE)
    )
    assert "not needed, every device passed probation on traffic" in allowed.out


def test_a_crash_between_ring_steps_resumes_from_the_audit_log(ws: Workspace, fleet: Fleet) -> None:
    """Killed while its last ring waits for a device that is offline; run again once it is back."""
    version, _ = _publish(ws, "resumed", seed=5)
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(ws.root), **ws.environ}
    rings = ("--rings", "canary,late")
    command = [sys.executable, "-m", "deployment", "--config", str(ws.config), "release"]
    process = subprocess.Popen(
        [*command, f"resumed:{version}", *rings, *GATE],
        env=environ,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: ("release.ring", "late", "applied") in _actions(ws, f"resumed:{version}"),
            timeout=120,
        )
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    actions = _actions(ws, f"resumed:{version}")
    assert ("release.gate", "canary", "passed") in actions
    assert not any(a[0] == "release.gate" and a[1] == "late" for a in actions)
    _ok(ws.cli("audit", "verify"))

    late = StandInFleet(
        [("dev-late", "mlagent")],
        host=fleet.sim.host,
        ca_file=fleet.sim.ca_cert_path,
        token_for=fleet.sim.module_sas_token,
        probation_s=0.5,
    )
    with late.start():
        resumed = _ok(ws.cli("release", f"resumed:{version}", *rings, *GATE))
    assert f"released resumed:{version}" in resumed.out
    actions = _actions(ws, f"resumed:{version}")
    assert actions.count(("release.ring", "canary", "applied")) == 1  # not done twice
    assert actions.count(("release.gate", "canary", "passed")) == 1
    assert actions.count(("release.ring", "late", "applied")) == 1
    assert actions[-1] == ("release.finished", "", "released")
    assert fleet.reported("dev-late", "resumed")["version"] == version
    assert "champion" in _ok(ws.cli("show", f"resumed:{version}")).out


def test_a_ring_that_matches_no_device_releases_nothing(ws: Workspace, fleet: Fleet) -> None:
    ws.rings = {**RINGS, "empty": "tags.ring = 'nowhere'"}
    ws.write_config()
    version, _ = _publish(ws, "nowhere", seed=6)
    result = ws.cli("release", f"nowhere:{version}", "--rings", "canary,empty", *GATE)
    assert result.code == 1
    assert "[no_devices]" in result.err
    assert "ring 'empty'" in result.err
    assert _layers(fleet, "nowhere") == []
    assert not any(a[0].startswith("release.") for a in _actions(ws, f"nowhere:{version}"))


def test_missing_secrets_and_unreachable_endpoints_name_themselves(
    ws: Workspace, fleet: Fleet
) -> None:
    version, _ = _publish(ws, "guarded", seed=7)
    hub_secret = ws.environ.pop("IOTHUB_CONNECTION_STRING")
    missing = ws.cli("release", f"guarded:{version}", "--rings", "canary", *GATE)
    assert missing.code == 1
    assert "missing secret IOTHUB_CONNECTION_STRING for environment 'test'" in missing.err

    ws.environ["IOTHUB_CONNECTION_STRING"] = hub_secret.replace(
        f"HostName={fleet.sim.host}:{fleet.sim.service_port}", f"HostName={fleet.sim.host}:9"
    )
    unreachable = ws.cli("release", f"guarded:{version}", "--rings", "canary", *GATE)
    assert unreachable.code == 1
    assert f"[unreachable]: IoT Hub {fleet.sim.host}:9: query failed" in unreachable.err

    storage = ws.environ["AZURE_STORAGE_CONNECTION_STRING"]
    ws.environ["AZURE_STORAGE_CONNECTION_STRING"] = storage.replace(
        storage.split("BlobEndpoint=")[1].split(";")[0], "http://127.0.0.1:9/devstoreaccount1"
    )
    no_storage = ws.cli("upload", f"guarded:{version}")
    assert no_storage.code == 1
    assert "[unreachable]: Blob storage http://127.0.0.1:9/devstoreaccount1" in no_storage.err
    assert _layers(fleet, "guarded") == []
    assert not any(a[0].startswith("release.") for a in _actions(ws, f"guarded:{version}"))


def test_an_expired_url_is_refused_until_refreshed(ws: Workspace, fleet: Fleet) -> None:
    version, _ = _publish(ws, "expiring", seed=8)
    _ok(ws.cli("sign", f"expiring:{version}", "--valid-hours", "0.0005"))  # 1.8 s
    manifest_file = ws.root / "releases" / "expiring" / f"{version}.manifest.json"
    url = json.loads(manifest_file.read_text())["url"]
    time.sleep(2.5)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code == 403  # Azurite checks the SAS expiry, as Azure does
    result = ws.cli("release", f"expiring:{version}", "--rings", "canary", *GATE)
    assert result.code == 1
    assert "[sas_expired]" in result.err
    assert "refresh-url" in result.err
    _ok(ws.cli("refresh-url", f"expiring:{version}"))
    with urllib.request.urlopen(json.loads(manifest_file.read_text())["url"], timeout=30) as ok:
        assert (
            hashlib.sha256(ok.read()).hexdigest() == json.loads(manifest_file.read_text())["sha256"]
        )
    _ok(ws.cli("release", f"expiring:{version}", "--rings", "canary", *GATE))
    assert fleet.reported("dev-a", "expiring")["version"] == version


def _secret_values(ws: Workspace) -> dict[str, str]:
    def field(connection_string: str, name: str) -> str:
        return connection_string.split(f"{name}=")[1].split(";", maxsplit=1)[0]

    pem = Path(ws.environ["PUBLISHER_SIGNING_KEY_FILE"]).read_text()
    return {
        "hub key": field(ws.environ["IOTHUB_CONNECTION_STRING"], "SharedAccessKey"),
        "storage key": field(ws.environ["AZURE_STORAGE_CONNECTION_STRING"], "AccountKey"),
        "signing key": pem.split("-----")[2].strip(),
    }


@pytest.mark.timeout(600)  # nine CLI processes, each importing MLflow and the Azure SDKs
def test_no_secret_reaches_any_output(ws: Workspace, fleet: Fleet) -> None:
    """Every command as its own process with debug logs; then every file it wrote."""
    model = save(tiny_mlp(seed=9), ws.root / "secretive.onnx")
    metrics = str(ws.metrics)
    results = [
        ws.process(
            "--log-level",
            "debug",
            "register",
            str(model),
            "--name",
            "secretive",
            "--metrics",
            metrics,
        ),
    ]
    version = results[0].out.split("registered secretive:")[1].split()[0]
    ref = f"secretive:{version}"
    for argv in (
        ["upload", ref],
        ["sign", ref],
        ["release", ref, "--rings", "canary", "--dry-run"],
        ["release", ref, "--rings", "canary", *GATE],
        ["status"],
        ["show", ref],
        ["audit", "show"],
    ):
        results.append(ws.process("--log-level", "debug", *argv))
        assert results[-1].code == 0, results[-1].err
    broken = dict(ws.environ)
    ws.environ["IOTHUB_CONNECTION_STRING"] += "x;Bad"
    results.append(ws.process("--log-level", "debug", "status"))
    ws.environ.clear()
    ws.environ.update(broken)

    texts = [r.out for r in results] + [r.err for r in results]
    files = [p for p in ws.root.rglob("*") if p.is_file() and p.suffix not in (".key", ".onnx")]
    mlflow_files = [p for p in ws.mlflow_db.parent.rglob("*") if p.is_file()]
    blobs = b"".join(p.read_bytes() for p in files + mlflow_files)
    assert ws.audit in files
    assert any(p.suffix == ".db" for p in mlflow_files)
    for what, value in _secret_values(ws).items():
        for text in texts:
            assert value not in text, what
        assert value.encode() not in blobs, what
