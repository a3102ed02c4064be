"""The publisher against real agents: three `python -m module` processes on three devices in
two rings, artifacts from Azurite, releases through the simulator's layered deployments."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployment.examples.onnx_models import IR_VERSION, OPSET, save, tiny_mlp
from deployment.publish.signing import trusted_keys_entries
from simulator import Simulator, pick_loopback_host
from simulator.azurite import Azurite
from simulator.hub import wait_until
from tests.deployment.conftest import REPO, Workspace
from tests.support.module_process import ModuleProcess, module_environment

pytestmark = pytest.mark.e2e

FLEET = {
    "dev-a": {"ring": "canary", "fleet": "edgeml"},
    "dev-b": {"ring": "broad", "fleet": "edgeml"},
    "dev-c": {"ring": "broad", "fleet": "edgeml"},
}
RINGS = {"canary": "tags.ring = 'canary'", "all": "tags.fleet = 'edgeml'"}


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    with Simulator.start(
        REPO / "deployment" / "deployment.template.json",
        host=pick_loopback_host(),
        run_dir=tmp_path / "sim",
        devices=FLEET,
    ) as running:
        yield running


def _breaks_above_one_row() -> onnx.ModelProto:
    """32 -> 8 like tiny_mlp, but a fixed Reshape to one row fails on any larger batch."""
    weights = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["h"]),
            helper.make_node("Reshape", ["h", "shape"], ["output"]),
        ],
        "breaks",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


@pytest.mark.timeout(600)
def test_real_agents_converge_through_two_rings_and_a_bad_canary_converges_back(
    workspace: Workspace, sim: Simulator, azurite: Azurite, tmp_path: Path
) -> None:
    workspace.rings = RINGS
    workspace.extra = f'hub_ca_file = "{sim.ca_cert_path}"\n'
    workspace.write_config()
    workspace.environ["IOTHUB_CONNECTION_STRING"] = sim.service_connection_string
    workspace.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    trusted = trusted_keys_entries(sorted((workspace.root / "keys").glob("*.pem")))

    modules = []
    try:
        for device in FLEET:
            env = module_environment(
                sim.edge_env(device, "mlagent"),
                state_dir=tmp_path / device,
                trusted_keys=trusted,
                artifact_ca=sim.ca_cert_path,
                extra={
                    "EDGEML_ALLOW_HTTP_HOSTS": "127.0.0.1",  # Azurite speaks plain HTTP
                    "EDGEML_PROBATION_SECONDS": "2",
                    "EDGEML_PROBATION_TICK_S": "0.5",
                },
            )
            modules.append(ModuleProcess.start(env, tmp_path / f"{device}.log"))

        model = save(tiny_mlp(seed=11), tmp_path / "real.onnx")
        version = workspace.publish(model, "real")

        # No traffic reaches these agents during this probation: they report
        # `passed_without_traffic`, which the gate accepts only when told to.
        released = workspace.cli(
            "release",
            f"real:{version}",
            "--rings",
            "canary,all",
            "--allow-no-traffic",
            "--poll",
            "0.5",
            "--timeout",
            "240",
        )
        assert released.code == 0, released.err + "".join(m.raw[-1] for m in modules if m.raw)
        assert "accepted devices that saw no traffic" in released.out
        sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
        for device in FLEET:
            report = sim.twin(device, "mlagent")["properties"]["reported"]["models"]["real"]
            assert report["version"] == version
            assert report["sha256"] == sha256
            assert report["state"] == "active"
            assert report["probation"]["state"] == "passed_without_traffic"
        status = workspace.cli("status", "real")
        assert status.code == 0
        for device in FLEET:
            assert device in status.out
        again = workspace.cli("release", f"real:{version}", "--rings", "canary,all")
        assert again.code == 0
        assert "no change" in again.out

        # A release that fails on two-row requests: its golden (one row) passes, so only
        # probation under traffic catches it, on the canary, before any other device sees it.
        bad = save(_breaks_above_one_row(), tmp_path / "bad.onnx")
        bad_version = workspace.publish(bad, "real")
        stop = threading.Event()
        canary = modules[0]
        rows = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 32], "data": [0.5] * 64}]
        }

        def traffic() -> None:
            while not stop.is_set():
                canary.infer_http("real", rows)
                time.sleep(0.02)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            halted = workspace.cli(
                "release",
                f"real:{bad_version}",
                "--rings",
                "canary,all",
                "--poll",
                "0.5",
                "--timeout",
                "240",
            )
            assert halted.code == 1
            assert "[gate_failed]" in halted.err
            assert "dev-a" in halted.err
            restored = bad_version + 1

            def converged() -> bool:
                report = sim.twin("dev-a", "mlagent")["properties"]["reported"]["models"]["real"]
                return bool(
                    report.get("version") == restored
                    and report.get("state") == "active"
                    and report.get("probation", {}).get("state") == "passed"
                )

            wait_until(converged, timeout=120)
        finally:
            stop.set()
            sender.join(15)
        report = sim.twin("dev-a", "mlagent")["properties"]["reported"]["models"]["real"]
        assert report["sha256"] == sha256  # the good artifact, under a higher version
        for device in ("dev-b", "dev-c"):
            other = sim.twin(device, "mlagent")["properties"]["reported"]["models"]["real"]
            assert other["version"] == version
        assert all(m.process.poll() is None for m in modules)
    finally:
        for module in modules:
            module.terminate(fail=False)
            module.close()
