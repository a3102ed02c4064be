"""What `register` says about a scikit-learn model exported with skl2onnx's defaults, and about
a model whose tensor contract differs from the champion's."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from deployment.examples.onnx_models import mlp, save
from deployment.publish.audit import AuditLog
from deployment.publish.registry import CHAMPION, Registry
from deployment.publish.release import contract_changes, map_outputs_error
from tests.deployment.conftest import Workspace


def _classifier(path: Path, *, zipmap: bool) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    options = None if zipmap else {id(model): {"zipmap": False}}
    path.write_bytes(to_onnx(model, x[:1], options=options).SerializeToString())
    return path


def test_a_zipmap_output_is_refused_with_the_option_that_removes_it(workspace: Workspace) -> None:
    model = _classifier(workspace.root / "zipmap.onnx", zipmap=True)
    result = workspace.cli(
        "register", str(model), "--name", "clf", "--metrics", str(workspace.metrics)
    )
    assert result.code == 1
    (line,) = result.err.strip().splitlines()
    assert "ZipMap" in line
    assert '{"zipmap": False}' in line
    assert "Traceback" not in result.err


def test_the_same_classifier_without_zipmap_registers(workspace: Workspace) -> None:
    model = _classifier(workspace.root / "plain.onnx", zipmap=False)
    result = workspace.cli(
        "register", str(model), "--name", "clf", "--metrics", str(workspace.metrics)
    )
    assert result.code == 0, result.err


@pytest.mark.parametrize(
    ("outputs", "named"),
    [
        ({"label": "tensor(int64)", "probabilities": "tensor(float)"}, None),
        ({"label": "tensor(int64)", "output_probability": "seq(map(int64,tensor(float)))"}, True),
        ({"scores": "map(string,tensor(float))"}, True),
    ],
)
def test_map_outputs_are_named(outputs: dict[str, str], named: bool | None) -> None:
    problem = map_outputs_error(outputs)
    if named is None:
        assert problem is None
    else:
        assert problem is not None
        for name, kind in outputs.items():
            assert (repr(name) in problem) == ("map(" in kind)


def test_a_contract_change_against_the_champion_is_warned_and_audited(
    workspace: Workspace,
) -> None:
    name = f"contract_{uuid.uuid4().hex[:12]}"  # the MLflow database is shared by the session
    metrics = str(workspace.metrics)
    first = save(mlp([4, 8, 2], seed=1), workspace.root / "four.onnx")
    assert workspace.cli("register", str(first), "--name", name, "--metrics", metrics).code == 0
    same = save(mlp([4, 8, 2], seed=2), workspace.root / "same.onnx")
    no_champion = workspace.cli("register", str(same), "--name", name, "--metrics", metrics)
    assert no_champion.code == 0
    assert "warning" not in no_champion.err
    Registry.connect(f"sqlite:///{workspace.mlflow_db}").set_alias(name, CHAMPION, 1)
    unchanged = workspace.cli("register", str(same), "--name", name, "--metrics", metrics)
    assert "warning" not in unchanged.err
    wider = save(mlp([6, 8, 2], seed=3), workspace.root / "six.onnx")
    changed = workspace.cli("register", str(wider), "--name", name, "--metrics", metrics)
    assert changed.code == 0, changed.err
    (line,) = changed.err.strip().splitlines()
    assert line.startswith(f"edgeml: warning: {name}:4 changes the tensor contract")
    assert "shape" in line
    last = list(AuditLog(workspace.audit).entries())[-1]
    assert last.outcome == "registered"
    assert last.details["contract_changes"] == line.split("champion: ")[1].split("; ")


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        ({}, []),
        ({"inputs": [{"datatype": "FP64"}]}, ["input 'x' FP32 -> FP64"]),
        ({"inputs": [{"shape": [-1, 6]}]}, ["input 'x' shape [-1, 4] -> [-1, 6]"]),
        ({"inputs": [{"name": "y"}]}, ["input 'x' removed", "input 'y' added"]),
        ({"outputs": [{"name": "z"}]}, ["output 'p' removed", "output 'z' added"]),
    ],
)
def test_contract_changes(new: dict[str, list[dict[str, object]]], expected: list[str]) -> None:
    old: dict[str, list[dict[str, object]]] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 2]}],
    }
    changed = {side: [dict(t) for t in tensors] for side, tensors in old.items()}
    for side, updates in new.items():
        changed[side][0].update(updates[0])
    assert contract_changes(old, changed) == expected
