"""The cloud-side baseline builder: which features, and the command that writes a pack."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from agent.observation.baseline import parse_baseline
from agent.observation.divergence import jensen_shannon
from deployment.cli import run
from deployment.drift.baseline_pack import (
    BaselineOptions,
    build_baseline,
    js_rows,
    load_table,
    model_outputs,
)
from deployment.examples.onnx_models import mlp

FAST = BaselineOptions(window_sizes=(20, 50), resamples=50, simulated_windows=5_000)
RNG = np.random.default_rng(0)


def _cli(argv: list[str], environ: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m deployment ARGV` in-process: its exit code and what it wrote to stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = run(argv, environ=environ or {}, stdout=out, stderr=err, logs=False)
    return code, err.getvalue()


def _names(pack: dict[str, Any]) -> list[str]:
    return [f["name"] for f in pack["features"]]


def test_small_rows_give_one_feature_per_position_named_from_the_header() -> None:
    pack = build_baseline({"x": RNG.standard_normal((300, 3))}, {}, FAST, {"x": ["a", "b", "c"]})
    assert _names(pack) == ["a", "b", "c"]
    assert {f["source"]["reduce"] for f in pack["features"]} == {"position"}
    assert all(16 <= len(f["reference"]) <= 22 for f in pack["features"])


def test_image_like_rows_give_per_channel_means() -> None:
    pack = build_baseline({"img": RNG.random((200, 3, 8, 8))}, {}, FAST)
    assert _names(pack) == ["img:channel0", "img:channel1", "img:channel2"]


def test_outputs_give_confidence_and_class_or_the_value() -> None:
    outputs = {"probs": RNG.dirichlet([1, 1, 1], size=300), "value": RNG.random((300, 1))}
    pack = build_baseline({"x": RNG.standard_normal((300, 1))}, outputs, FAST)
    assert _names(pack) == ["x", "probs:confidence", "probs:class", "value"]
    assert [f["kind"] for f in pack["features"]] == ["numeric", "numeric", "categorical", "numeric"]


def test_integers_with_few_values_are_categories() -> None:
    pack = build_baseline({"k": RNG.integers(0, 5, size=(300, 1))}, {}, FAST)
    (feature,) = pack["features"]
    assert (feature["kind"], feature["cuts"]) == ("categorical", [0.0, 1.0, 2.0, 3.0, 4.0])


def test_bytes_constant_and_capped_features_are_skipped_and_say_so() -> None:
    inputs = {
        "text": np.array([["a"]] * 300),
        "flat": np.ones((300, 1)),
        "x": RNG.standard_normal((300, 4)),
    }
    pack = build_baseline(inputs, {}, BaselineOptions(**{**FAST.__dict__, "max_features": 2}))
    assert _names(pack) == ["x[0]", "x[1]"]
    assert pack["skipped"] == [
        {"tensor": "text", "reason": "bytes"},
        {"tensor": "flat", "reason": "constant"},
        {"tensor": "x", "reason": "feature_cap"},
    ]


def test_a_pack_has_a_threshold_per_window_size_on_the_grid() -> None:
    pack = build_baseline({"x": RNG.standard_normal((300, 2))}, {}, FAST)
    windows = pack["calibration"]["windows"]
    assert [w["rows"] for w in windows] == [20, 50]
    assert all(w["h"] > 0 for w in windows)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.ones((10, 2))}, "no feature to profile"),
        ({"x": np.ones((10, 2)), "y": np.ones((11, 1))}, "disagree on the number of rows"),
    ],
)
def test_unusable_data_is_refused(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_baseline(inputs, {}, FAST)


def test_vectorised_js_equals_the_device_js() -> None:
    reference = np.array([0.5, 0.3, 0.2, 0.0])
    counts = RNG.integers(0, 20, size=(10, 4))
    expected = [jensen_shannon(reference, row) for row in counts]
    assert js_rows(reference, counts).tolist() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "header", "shape"),
    [("a,b\n1,2\n3,4\n", ("a", "b"), (2, 2)), ("1,2\n3,\n5,6\n", None, (3, 2))],
)
def test_load_csv(
    tmp_path: Path, text: str, header: tuple[str, ...] | None, shape: tuple[int, ...]
) -> None:
    path = tmp_path / "train.csv"
    path.write_text(text)
    array, names = load_table(path)
    assert (names, array.shape) == (header, shape)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.csv", "a,b\n1,x\n", "not a table of numbers"),
        ("t.csv", "a,b\n1,2\n", "at least 2 rows"),
        ("t.txt", "1\n", ".npy or .csv"),
    ],
)
def test_load_refuses(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_table(path)


def test_the_command_writes_a_pack_the_device_accepts(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    onnx.save(mlp([4, 8, 3], seed=1), model)
    data = tmp_path / "train.npy"
    np.save(data, RNG.standard_normal((400, 4)).astype(np.float32))
    out = tmp_path / "baseline.json"
    argv = ["baseline", "--data", str(data), "--model", str(model), "-o", str(out)]
    assert _cli([*argv, "--window-sizes", "20,50", "--resamples", "50"])[0] == 0
    pack = parse_baseline(out.read_bytes())
    assert [f.name for f in pack.features] == [
        "input[0]", "input[1]", "input[2]", "input[3]", "output:confidence", "output:class"
    ]  # fmt: skip


def test_the_command_names_a_bad_argument(tmp_path: Path) -> None:
    argv = ["baseline", "--data", str(tmp_path / "x.txt"), "--model", "m.onnx", "-o", "o.json"]
    code, err = _cli(argv)
    assert code == 2
    assert ".npy or .csv" in err


def test_training_labels_give_the_quality_reference(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    onnx.save(mlp([4, 8, 3], seed=1), model)
    data = RNG.standard_normal((400, 4)).astype(np.float32)
    np.save(tmp_path / "train.npy", data)
    _, outputs = model_outputs(model, data)
    labels = outputs["output"].argmax(axis=1)
    labels[:100] = (labels[:100] + 1) % 3  # a quarter wrong
    np.save(tmp_path / "labels.npy", labels)
    out = tmp_path / "baseline.json"
    argv = ["baseline", "--data", str(tmp_path / "train.npy"), "--model", str(model)]
    argv += ["--labels", str(tmp_path / "labels.npy"), "-o", str(out), "--resamples", "50"]
    assert _cli([*argv, "--window-sizes", "20,50"])[0] == 0
    quality = parse_baseline(out.read_bytes()).quality
    assert quality is not None
    assert (quality.metric, quality.value) == ("accuracy", 0.75)
    assert quality.loss_std == pytest.approx(0.4330127)


def test_wide_inputs_leave_room_for_the_outputs() -> None:
    inputs = {"x": RNG.standard_normal((300, 40))}
    outputs = {"probs": RNG.dirichlet([1, 1, 1], size=300)}
    pack = build_baseline(inputs, outputs, BaselineOptions(**{**FAST.__dict__, "max_features": 8}))
    assert _names(pack) == [*(f"x[{i}]" for i in range(6)), "probs:confidence", "probs:class"]
