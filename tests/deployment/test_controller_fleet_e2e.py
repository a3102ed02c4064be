"""The retraining controller on a simulated fleet, over real services: the simulator's IoT Hub
(twin queries and layered deployments through the azure-iot-hub SDK), MLflow on SQLite, Azurite,
and the publisher's register/upload/sign/release behind `PublisherReleaser`.

Devices: four agent stand-ins (simulator/standins.py: they follow the agent's reported-state
protocol and pass probation, but load no model), one in the canary ring; `all` is every device.
A device's drift is what its stand-in reports under `models.<name>.drift`, as the agent does.
The trainer is the pipeline's own steps on a small data set (tests/deployment/test_retraining.py).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from rich.console import Console

from deployment.config import load
from deployment.examples import sensor_data
from deployment.publish import gate
from deployment.publish.audit import AuditLog
from deployment.publish.publisher import Publisher, Services
from deployment.retrain.controller import Controller, ControllerConfig, Job
from deployment.retrain.policy import Decision, Hold, RetrainPolicy
from deployment.retrain.verbs import PublisherReleaser
from simulator import Simulator, pick_loopback_host
from simulator.azurite import Azurite
from simulator.hub import wait_until
from simulator.standins import StandInFleet
from tests.deployment.conftest import REPO, Workspace
from tests.deployment.test_retraining import SmallTrainer
from tests.support.clock import FakeClock
from wire.reported import DriftEntry, ModelEntry
from wire.states import DriftState

pytestmark = pytest.mark.e2e

MODEL = "fleet_classifier"
FLEET = {
    "line-a": {"ring": "canary", "fleet": "edgeml"},
    "line-b": {"ring": "broad", "fleet": "edgeml"},
    "line-c": {"ring": "broad", "fleet": "edgeml"},
    "line-d": {"ring": "broad", "fleet": "edgeml"},
}
RINGS = {"canary": "tags.ring = 'canary'", "all": "tags.fleet = 'edgeml'"}
POLICY = RetrainPolicy(
    cooldown_s=3600.0, min_drifting_devices=2, min_drifting_share=0.5, sustain_polls=2
)


class Fleet:
    def __init__(self, sim: Simulator, standins: StandInFleet) -> None:
        self.sim = sim
        self.standins = standins

    def report_drift(self, device: str, state: str) -> None:
        """What an agent reports when its drift state changes (a merge patch of its entry)."""
        standin = next(s for s in self.standins.standins if s.device_id == device)
        self.standins._loop.call_soon_threadsafe(
            standin.report, MODEL, ModelEntry(drift=DriftEntry(state=DriftState(state), score=5.0))
        )
        wait_until(lambda: self.drift(device) == state, timeout=30)

    def entry(self, device: str) -> dict[str, object]:
        models = self.sim.twin(device, "mlagent")["properties"]["reported"].get("models", {})
        return dict(models.get(MODEL, {}))

    def drift(self, device: str) -> object:
        section = self.entry(device).get("drift")
        return section.get("state") if isinstance(section, dict) else None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    host = pick_loopback_host()
    with Simulator.start(
        REPO / "deployment" / "deployment.template.json",
        host=host,
        run_dir=tmp_path_factory.mktemp("sim"),
        devices=FLEET,
    ) as sim:
        standins = StandInFleet(
            [(device, "mlagent") for device in sim.devices],
            host=host,
            ca_file=sim.ca_cert_path,
            token_for=sim.module_sas_token,
            probation_s=0.3,
        )
        with standins.start():
            yield Fleet(sim, standins)


def _controller(
    ws: Workspace, trainer: SmallTrainer, clock: FakeClock
) -> tuple[Controller, Services]:
    services = Services(load(ws.config, "test", ws.environ), environ=ws.environ)
    console = Console(file=io.StringIO())
    releaser = PublisherReleaser(
        services,
        Publisher(services, console, console),
        list(RINGS),
        gate.GateBounds(timeout_s=60.0, poll_s=0.2),
    )
    config = ControllerConfig(
        model=MODEL,
        module="mlagent",
        data_dir=ws.root / "data",
        work_dir=ws.root / "work",
        policy=POLICY,
    )
    controller = Controller(
        config,
        fleet=services.hub(),
        trainer=trainer,
        releaser=releaser,
        audit=services.audit,
        clock=clock,
    )
    return controller, services


def _retrain_entries(ws: Workspace) -> list[str]:
    return [e.outcome for e in AuditLog(ws.audit).entries() if e.action == "retrain"]


def test_drift_on_enough_devices_retrains_once_and_promotes_through_the_rings(
    workspace: Workspace, fleet: Fleet, azurite: Azurite
) -> None:
    ws = workspace
    ws.rings = RINGS
    ws.extra = f'hub_ca_file = "{fleet.sim.ca_cert_path}"\n'
    ws.write_config()
    ws.environ["IOTHUB_CONNECTION_STRING"] = fleet.sim.service_connection_string
    ws.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    trainer = SmallTrainer()
    clock = FakeClock(1_000_000.0)
    controller, services = _controller(ws, trainer, clock)

    # The champion: the first job (new data, clean readings) has nothing to beat.
    (ws.root / "data").mkdir()
    x, y = sensor_data.generate(300, seed=41)
    np.savez(ws.root / "data" / "clean.npz", x=x, y=y)
    first = controller.poll()
    assert isinstance(first, Job)
    assert (first.trigger, first.stage, first.version) == ("new_data", "released", 1)
    for device in FLEET:
        assert fleet.entry(device)["version"] == 1

    clock.now += POLICY.cooldown_s + 1  # long after the first job

    # One noisy device: held, however long it lasts.
    fleet.report_drift("line-c", "drift")
    for _ in range(3):
        held = controller.poll()
        assert isinstance(held, Decision)
        assert held.hold is Hold.FEW_DEVICES
    assert trainer.calls == 1

    # The plant's sensors drift on three of four devices: on the first poll it may be noise.
    for device in ("line-a", "line-b"):
        fleet.report_drift(device, "drift")
    waiting = controller.poll()
    assert isinstance(waiting, Decision)
    assert waiting.hold is Hold.NOT_SUSTAINED
    # The maintenance log's labelled readings arrive; the drift holds: one job, for drift.
    x, y = sensor_data.generate(900, seed=42, fault=sensor_data.RECALIBRATED)
    np.savez(ws.root / "data" / "recalibrated.npz", x=x, y=y)
    job = controller.poll()
    assert isinstance(job, Job)
    assert job.trigger == "drift"
    assert job.stage == "released", job
    assert job.version == 2
    assert job.gate is not None
    assert job.gate["reason"] == "better"
    assert job.gate["candidate_window"] > job.gate["champion_window"]
    manifest = json.loads((ws.root / "releases" / MODEL / "2.manifest.json").read_text())
    assert manifest["schema"] == 2  # with the drift baseline pack the pipeline wrote
    pack = (ws.root / "work" / "candidate" / "baseline.json").read_bytes()
    assert manifest["baseline"]["sha256"] == hashlib.sha256(pack).hexdigest()
    assert manifest["baseline"]["size"] == len(pack)
    for device in FLEET:
        entry = fleet.entry(device)
        assert entry["version"] == 2
        assert isinstance(entry["probation"], dict)
        assert entry["probation"]["state"] == "passed"
    registry = services.registry()
    assert registry.alias_version(MODEL, "ring-canary") == 2
    assert registry.alias_version(MODEL, "ring-all") == 2
    steps = [
        (e.action, str(e.details.get("ring", "")), e.outcome)
        for e in AuditLog(ws.audit).entries()
        if e.subject == f"{MODEL}:2" and e.action in {"release.ring", "release.gate"}
    ]
    assert steps == [
        ("release.ring", "canary", "applied"),
        ("release.gate", "canary", "passed"),
        ("release.ring", "all", "applied"),
        ("release.gate", "all", "passed"),
    ]

    # v2 serves with a fresh drift watch on every device (its own baseline).
    assert {str(fleet.drift(device)) for device in FLEET} == {"ok"}
    # Drift again at once, sustained: inside the cooldown nothing retrains.
    for device in ("line-a", "line-b", "line-c"):
        fleet.report_drift(device, "drift")
    holds = []
    for _ in range(3):
        after = controller.poll()
        assert isinstance(after, Decision)
        holds.append(after.hold)
    assert holds == [Hold.NOT_SUSTAINED, Hold.COOLDOWN, Hold.COOLDOWN]
    assert trainer.calls == 2
    assert _retrain_entries(ws).count("started") == 2
    assert _retrain_entries(ws).count("released") == 2
