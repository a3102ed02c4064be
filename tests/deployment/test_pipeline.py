"""The example pipeline through the CLI: reproducible bytes, MLflow runs, the evaluation gate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from deployment.errors import PublisherError
from deployment.examples import sensor_data
from deployment.publish.registry import CHAMPION, Registry
from deployment.retrain.pipeline import load_labelled, read_outputs
from tests.deployment.conftest import Workspace

STEPS = {"prepare", "features", "search", "evaluate", "export"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
def test_same_inputs_give_the_same_onnx_bytes_in_two_processes(workspace: Workspace) -> None:
    first = workspace.process("train", "--out", str(workspace.root / "a"), "--rows", "600")
    second = workspace.process("train", "--out", str(workspace.root / "b"), "--rows", "600")
    assert first.code == 0, first.err
    assert second.code == 0, second.err
    facts = {
        run: (
            json.loads((workspace.root / run / "lineage.json").read_text()),
            json.loads((workspace.root / run / "metrics.json").read_text()),
        )
        for run in ("a", "b")
    }
    assert _sha256(workspace.root / "a" / "model.onnx") == _sha256(
        workspace.root / "b" / "model.onnx"
    ), facts
    lineage = json.loads((workspace.root / "a" / "lineage.json").read_text())
    assert lineage["packages"]["skl2onnx"] != "absent"
    assert lineage["target_opset"] == 17


def test_train_records_every_step_as_a_nested_mlflow_run(workspace: Workspace) -> None:
    out = workspace.root / "model"
    result = workspace.cli("train", "--out", str(out), "--rows", "600")
    assert result.code == 0, result.err
    model, metrics, sample = read_outputs(out)
    assert metrics["onnx_parity"] == 1.0
    assert metrics["accuracy"] > 0.8
    assert sample.shape[1] == len(sensor_data.FEATURES)
    run_id = result.out.split("run=")[1].split()[0]
    client = MlflowClient(f"sqlite:///{workspace.mlflow_db}")
    parent = client.get_run(run_id)
    assert parent.data.params["data_sha256"]
    assert parent.data.params["code_version"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert {run.info.run_name for run in children} == STEPS
    assert hashlib.sha256(model).hexdigest() in result.out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("vibration_rms_mm_s,label\n1.0,0\n", "missing column 'vibration_peak_mm_s'"),
        ("", "no rows"),
    ],
)
def test_bad_data_files_name_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "field.csv"
    path.write_text(content)
    with pytest.raises(PublisherError, match=message):
        load_labelled(path)


def test_data_with_labels_out_of_range_is_refused(tmp_path: Path) -> None:
    x, y = sensor_data.generate(10, seed=1)
    np.savez(tmp_path / "field.npz", x=x, y=y + 5)
    with pytest.raises(PublisherError, match=r"labels must be in 0\.\.2"):
        load_labelled(tmp_path / "field.npz")


def test_train_with_a_missing_data_file_fails_and_names_it(workspace: Workspace) -> None:
    missing = workspace.root / "nowhere.csv"
    result = workspace.cli("train", "--out", str(workspace.root / "m"), "--data", str(missing))
    assert result.code == 1
    assert f"pipeline_failed]: data file {missing} does not exist" in result.err


def test_gate_refuses_a_candidate_no_better_than_the_champion(workspace: Workspace) -> None:
    out = workspace.root / "model"
    assert workspace.cli("train", "--out", str(out), "--rows", "600").code == 0
    # The first model has nothing to beat.
    first = workspace.cli("gate", str(out), "--name", "sensor_gate")
    assert first.code == 0, first.err
    assert "no champion" in first.out
    registered = workspace.cli(
        "register",
        str(out / "model.onnx"),
        "--name",
        "sensor_gate",
        "--metrics",
        str(out / "metrics.json"),
    )
    assert registered.code == 0, registered.err
    # Make it the champion as a finished rollout would, then gate the same model against it.
    Registry.connect(f"sqlite:///{workspace.mlflow_db}").set_alias("sensor_gate", CHAMPION, 1)
    same = workspace.cli("gate", str(out), "--name", "sensor_gate")
    assert same.code == 1
    assert "gate_failed]: candidate refused: no_gain_on_recent_data" in same.err
