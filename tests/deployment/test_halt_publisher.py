"""A halt through the publisher's commands: MLflow on SQLite, Azurite, an in-memory hub.

What the rollout's own tests cannot show: the re-release is a real registry version that
carries everything the restored one carried (the drift baseline above all), a rerun after an
outage registers no second one, and a release below what the fleet was sent is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from deployment.examples.onnx_models import mlp, save, tiny_mlp
from deployment.publish import rollout
from deployment.publish.audit import AuditLog
from deployment.publish.hub_client import Hub, LayeredDeployment
from simulator.azurite import Azurite
from tests.deployment.conftest import Result, Workspace
from tests.support.fake_service_hub import FakeHub

pytestmark = pytest.mark.e2e

GATE = ("--poll", "0.01", "--timeout", "5")


def _passed(version: int) -> dict[str, Any]:
    return {"version": version, "state": "active", "probation": {"state": "passed"}}


@pytest.fixture
def ws(workspace: Workspace, azurite: Azurite) -> Workspace:
    workspace.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    # The fake hub is handed to the CLI; the secret only has to exist.
    workspace.environ["IOTHUB_CONNECTION_STRING"] = "HostName=fake;SharedAccessKey=eA=="
    return workspace


def _failing_during_the_halt(hub: FakeHub, bad: int) -> Callable[[], None]:
    """The hub goes away as the halt writes the re-release's layer; returns the repair."""
    real_create = hub.create_configuration

    def create(deployment: LayeredDeployment) -> None:
        if deployment.labels[rollout.LABEL_VERSION] != str(bad):
            hub.creates_unreachable = True
        real_create(deployment)

    def back() -> None:
        hub.create_configuration = real_create  # type: ignore[method-assign]
        hub.creates_unreachable = False

    hub.create_configuration = create  # type: ignore[method-assign]
    return back


def _cli(ws: Workspace, hub: FakeHub) -> Callable[..., Result]:
    factory: Callable[[str, str | None], Hub] = lambda _secret, _ca: hub  # noqa: E731
    return lambda *args: ws.cli(*args, hub_factory=factory)


def _manifest(ws: Workspace, name: str, version: int) -> dict[str, Any]:
    path = ws.root / "releases" / name / f"{version}.manifest.json"
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def _published(ws: Workspace, name: str, seed: int, *extra: str) -> int:
    model = save(tiny_mlp(seed=seed), ws.root / f"{name}-{seed}.onnx")
    version = ws.register(model, name, *extra)
    for command in ("upload", "sign"):
        result = ws.cli(command, f"{name}:{version}")
        assert result.code == 0, result.err
    return version


def test_a_halt_cut_off_by_the_hub_is_finished_by_a_rerun_with_the_baseline_carried(
    ws: Workspace,
) -> None:
    name = "halting"  # each test its own model: the MLflow database is shared
    hub = FakeHub(model=name)
    hub.devices = {"tags.ring = 'canary'": ["dev-a"]}
    cli = _cli(ws, hub)
    baseline = ws.root / "baseline.json"
    baseline.write_text('{"features": ["x"], "pack": 1}')
    good = _published(ws, name, 21, "--baseline", str(baseline))
    hub.reports = {"dev-a": _passed(good)}
    assert cli("release", f"{name}:{good}", "--rings", "canary", *GATE).code == 0

    bad = _published(ws, name, 22)
    hub.reports = {"dev-a": {"version": bad, "state": "rolled_back", "reason": "probation"}}
    back = _failing_during_the_halt(hub, bad)
    cut_off = cli("release", f"{name}:{bad}", "--rings", "canary", *GATE)
    assert cut_off.code == 1
    assert "[unreachable]" in cut_off.err
    back()

    rerun = cli("release", f"{name}:{bad}", "--rings", "canary", *GATE)
    assert rerun.code == 1
    assert "[halted]" in rerun.err
    assert "finished now" in rerun.err
    history = cli("history", name).out
    assert history.count(f"rollback of {name}:{bad} to {name}:{good}") == 1  # registered once
    restored = bad + 1
    layers = [c.labels[rollout.LABEL_VERSION] for c in hub.configurations()]
    assert layers == [str(restored)]

    old, new = _manifest(ws, name, good), _manifest(ws, name, restored)
    assert new["baseline"]["sha256"] == old["baseline"]["sha256"]
    assert new["baseline"]["sha256"] == hashlib.sha256(baseline.read_bytes()).hexdigest()
    assert new["baseline"]["size"] == old["baseline"]["size"]
    # The same blob, under a freshly signed SAS.
    assert new["baseline"]["url"].split("?")[0] == old["baseline"]["url"].split("?")[0]
    for field in ("sha256", "size", "contract", "golden", "schema"):
        assert new[field] == old[field], field
    assert new.get("contract_change", False) == old.get("contract_change", False)

    steps = [
        (e.action, e.outcome)
        for e in AuditLog(ws.audit).entries()
        if e.subject == f"{name}:{bad}" and e.action.startswith("release.halt")
    ]
    assert steps == [
        ("release.halt", "started"),
        ("release.halt", "resumed"),
        ("release.halted", "halted"),
    ]

    below = cli("release", f"{name}:{good}", "--rings", "canary", *GATE)
    assert below.code == 1
    # One error line (a lab environment also warns about its plain-http artifact URL).
    (error,) = (line for line in below.err.splitlines() if line.startswith("edgeml: error"))
    assert error.startswith(f"edgeml: error [version_not_monotonic]: {name}:{good} is below")
    assert f"{name}:{restored}" in error
    assert cli("audit", "verify").code == 0


def test_status_repair_finishes_a_halt_that_a_killed_run_left(ws: Workspace) -> None:
    name = "repaired"
    hub = FakeHub(model=name)
    hub.devices = {"tags.ring = 'canary'": ["dev-a"]}
    cli = _cli(ws, hub)
    good = _published(ws, name, 23)
    hub.reports = {"dev-a": _passed(good)}
    assert cli("release", f"{name}:{good}", "--rings", "canary", *GATE).code == 0
    bad = _published(ws, name, 24)
    hub.reports = {"dev-a": {"version": bad, "state": "rolled_back", "reason": "probation"}}
    back = _failing_during_the_halt(hub, bad)
    assert "[unreachable]" in cli("release", f"{name}:{bad}", "--rings", "canary", *GATE).err
    back()

    repaired = cli("status", "--repair")
    assert repaired.code == 0, repaired.err
    assert f"finished the halt of {name}:{bad}" in repaired.out
    assert [c.labels[rollout.LABEL_VERSION] for c in hub.configurations()] == [str(bad + 1)]
    assert "finished the halt" not in cli("status", "--repair").out


def test_a_re_release_after_a_contract_change_says_so(ws: Workspace) -> None:
    """Devices that installed the bad release check the restore against its contract."""
    name = "reshaped"
    hub = FakeHub(model=name)
    hub.devices = {"tags.ring = 'canary'": ["dev-a"]}
    cli = _cli(ws, hub)
    versions = []
    for outputs in (2, 3):
        model = save(mlp([4, 8, outputs], seed=outputs), ws.root / f"{name}-{outputs}.onnx")
        versions.append(ws.register(model, name))
        for command in ("upload", "sign"):
            assert ws.cli(command, f"{name}:{versions[-1]}").code == 0
    good, bad = versions
    hub.reports = {"dev-a": _passed(good)}
    assert cli("release", f"{name}:{good}", "--rings", "canary", *GATE).code == 0
    hub.reports = {"dev-a": {"version": bad, "state": "failed", "reason": "warmup"}}
    assert "[gate_failed]" in cli("release", f"{name}:{bad}", "--rings", "canary", *GATE).err
    old, new = _manifest(ws, name, good), _manifest(ws, name, bad + 1)
    assert "contract_change" not in old
    assert new["contract_change"] is True
    assert new["contract"] == old["contract"]
