"""Ring rollout at fleet size: the publisher's layered deployments against a naive publisher.

1,000 edge devices in the simulator, tagged into rings of 1 %, 10 % and 100 % (cumulative),
each running an agent stand-in (`simulator/standins.py`: an MQTT client that follows the
agent's reported-state protocol, probation included, without loading models). Per round, one
new signed release goes through the three rings, each ring gated on every targeted device
reporting the release active with probation passed:

* **publisher**: `deployment.publish.rollout.Rollout`, one layered deployment per ring (the hub fans
  out to the devices), gate read by one twin query per poll;
* **naive**: the same rings and gate, but the publisher patches every module twin itself
  (`update_module_twin`, one call per device).

Rounds alternate between the two (the machine is shared and noisy: medians of rounds).
Measured: wall time from the first call to a converged fleet, and the hub calls each made.

    python -m bench.rollout [--devices 1000] [--rounds 3]

Last line: `{"devices", "seconds", "hub_calls", "naive_hub_calls", "naive_seconds", ...}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._machine import machine_busy, wait_for_quiet_machine
from deployment.examples.onnx_models import tiny_mlp
from deployment.publish import gate, rollout
from deployment.publish.audit import AuditLog
from deployment.publish.hub_client import AzureHub
from deployment.publish.release import build_manifest
from simulator import Simulator, pick_loopback_host
from simulator.standins import StandInFleet

RESULTS = Path(__file__).parent / "results" / "rollout.json"
TEMPLATE = Path(__file__).parent.parent / "deployment" / "deployment.template.json"
MODULE = "mlagent"
RINGS = {
    "canary": "tags.ring = 'canary'",
    "early": "tags.ring IN ['canary', 'early']",
    "all": "tags.fleet = 'edgeml'",
}
BOUNDS = gate.GateBounds(timeout_s=600, poll_s=0.5)


def fleet_tags(devices: int) -> dict[str, dict[str, str]]:
    """1 % canary, the next 9 % early (10 % cumulative), everyone in the fleet."""
    tags = {}
    for index in range(devices):
        ring = "canary" if index < devices // 100 else "early" if index < devices // 10 else "rest"
        tags[f"dev-{index:04d}"] = {"ring": ring, "fleet": "edgeml"}
    return tags


def signed(name: str, version: int, model: bytes, key: Ed25519PrivateKey) -> dict[str, Any]:
    return build_manifest(
        model,
        name=name,
        version=version,
        url=f"https://bench.blob.core.windows.net/models/{name}/{version}.onnx",
        key=key,
        key_id="bench",
        valid_for=timedelta(days=1),
    )


class NaiveHub:
    """Patches each module twin itself; gates like the publisher (one query per poll)."""

    def __init__(self, hub: AzureHub, registry: IoTHubRegistryManager) -> None:
        self._hub = hub
        self._registry = registry
        self.patches = 0

    def release(
        self, name: str, version: int, manifest: Mapping[str, Any], rings: Sequence[rollout.Ring]
    ) -> None:
        done: set[str] = set()
        for ring in rings:
            targeted = rollout.Rollout.devices_of(self._hub, ring.condition)
            for device in targeted:
                if device in done:
                    continue
                twin = Twin(properties=TwinProperties(desired={"models": {name: manifest}}))
                self._registry.update_module_twin(device, MODULE, twin, "*")
                self.patches += 1
                done.add(device)
            self._gate(name, version, set(targeted))

    def _gate(self, name: str, version: int, targeted: set[str]) -> None:
        deadline = time.monotonic() + BOUNDS.timeout_s
        query = (
            f"SELECT * FROM devices.modules WHERE moduleId = '{MODULE}' "
            f"AND properties.reported.models.{name}.version = {version}"
        )
        while time.monotonic() < deadline:
            verdicts = [
                gate.judge_device(
                    str(t["deviceId"]), rollout.module_models(t, name), version, BOUNDS
                )
                for t in self._hub.query(query)
                if t["deviceId"] in targeted
            ]
            result = gate.judge_gate(verdicts, len(targeted))
            if result.outcome == "passed":
                return
            if result.outcome == "failed":
                raise RuntimeError(f"naive gate failed: {result.failed[:3]}")
            time.sleep(BOUNDS.poll_s)
        raise TimeoutError("naive gate timed out")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probation-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    key = Ed25519PrivateKey.generate()
    model = tiny_mlp().SerializeToString()
    rings = rollout.rings_from_config(RINGS)
    host = pick_loopback_host()
    quiet = wait_for_quiet_machine(threshold_cores=0.5, max_wait_s=60)
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        with Simulator.start(
            TEMPLATE, host=host, run_dir=Path(folder) / "sim", devices=fleet_tags(args.devices)
        ) as sim:
            setup_s = time.monotonic() - started
            connect_started = time.monotonic()
            with StandInFleet(
                [(device, MODULE) for device in sim.devices],
                host=host,
                ca_file=sim.ca_cert_path,
                token_for=sim.module_sas_token,
                probation_s=args.probation_s,
            ).start(timeout=600):
                connect_s = time.monotonic() - connect_started
                hub = AzureHub(sim.service_connection_string, ca_file=str(sim.ca_cert_path))
                registry = IoTHubRegistryManager.from_connection_string(
                    sim.service_connection_string
                )
                registry.protocol.config.connection.verify = str(sim.ca_cert_path)
                aliases: dict[str, int] = {}
                runner = rollout.Rollout(
                    hub,
                    AuditLog(Path(folder) / "audit.jsonl", actor="bench"),
                    module=MODULE,
                    alias_of=lambda _m, ring: aliases.get(ring),
                    set_alias=lambda _m, ring, version: aliases.__setitem__(ring, version),
                    rerelease=lambda *_: (_ for _ in ()).throw(RuntimeError("no rollback here")),
                )
                naive = NaiveHub(hub, registry)
                ours: list[tuple[float, int]] = []
                theirs: list[tuple[float, int]] = []
                busy_before = machine_busy()
                wall_before = time.monotonic()
                for version in range(1, args.rounds + 1):
                    calls = hub.calls
                    begun = time.monotonic()
                    runner.release(
                        "layered", version, signed("layered", version, model, key), rings, BOUNDS
                    )
                    ours.append((time.monotonic() - begun, hub.calls - calls))

                    calls, patches = hub.calls, naive.patches
                    begun = time.monotonic()
                    naive.release("naive", version, signed("naive", version, model, key), rings)
                    theirs.append(
                        (
                            time.monotonic() - begun,
                            hub.calls - calls + naive.patches - patches,
                        )
                    )
                    print(
                        json.dumps({"round": version, "publisher": ours[-1], "naive": theirs[-1]}),
                        flush=True,
                    )
                load = (machine_busy() - busy_before) / (time.monotonic() - wall_before)
    result = {
        "devices": args.devices,
        "rings": {name: condition for name, condition in RINGS.items()},
        "rounds": args.rounds,
        "seconds": round(statistics.median(s for s, _ in ours), 2),
        "hub_calls": int(statistics.median(c for _, c in ours)),
        "naive_seconds": round(statistics.median(s for s, _ in theirs), 2),
        "naive_hub_calls": int(statistics.median(c for _, c in theirs)),
        "speedup": round(
            statistics.median(s for s, _ in theirs) / statistics.median(s for s, _ in ours), 2
        ),
        "probation_s": args.probation_s,
        "simulator_start_s": round(setup_s, 1),
        "standins_connect_s": round(connect_s, 1),
        "machine_busy_cores_before": quiet,
        "machine_cores_busy_during": round(load, 2),
        "note": "agent stand-ins (simulator/standins.py), not real agents; one shared 2-core "
        "machine: simulator, stand-ins and publisher in one process, other engineers' work "
        "running too",
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
