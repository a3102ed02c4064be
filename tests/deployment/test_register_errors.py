"""What `register` says about a scikit-learn model exported with skl2onnx's defaults, and about
a model whose tensor contract differs from the champion's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from deployment.publish.release import map_outputs_error
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
