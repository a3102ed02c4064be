"""The baseline pack on the device: strict parsing, feature extraction, window scores."""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import pytest

from agent.observation.baseline import (
    MAX_BASELINE_BYTES,
    BaselineInvalidError,
    Extractor,
    Source,
    parse_baseline,
    score_window,
)
from agent.observation.counts import FeatureCounts
from tests.support.drift_packs import tabular_pack, tabular_rows

NAN = float("nan")


def _document() -> dict[str, Any]:
    return tabular_pack().model_dump(mode="json", by_alias=True)


def test_a_built_pack_round_trips_through_json() -> None:
    pack = parse_baseline(json.dumps(_document()).encode())
    assert pack == tabular_pack()
    assert [f.name for f in pack.features] == [
        "x[0]", "x[1]", "x[2]", "c", "p:confidence", "p:class"
    ]  # fmt: skip
    assert [f.kind for f in pack.features][3:] == ["categorical", "numeric", "categorical"]


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema", "agent-drift-baseline/2", "schema"),
        ("features.0.reference", [1.0], "reference probabilities for"),
        ("features.0.cuts", [2.0, 1.0], "reference probabilities|strictly increasing"),
        ("features.0.std", 0.0, "greater than 0"),
        ("features.0.min", 1e9, "min is above max"),
        ("features.0.source.reduce", "median", "source.reduce"),
        ("features.1.name", "x[0]", "names must be unique"),
        ("calibration.windows.0.shift_std", [1.0], "does not cover the 6 features"),
        ("calibration.windows.0.rows", 100, "strictly increasing"),
        ("rows", "4000", "rows"),
        ("extra", 1, "extra"),
    ],
)
def test_a_bad_pack_is_refused_naming_what_is_wrong(path: str, value: Any, message: str) -> None:
    document = _set(_document(), path, value)
    with pytest.raises(BaselineInvalidError, match=message):
        parse_baseline(json.dumps(document).encode())


def test_reference_probabilities_must_sum_to_one() -> None:
    document = _document()
    document["features"][0]["reference"][0] += 0.5
    with pytest.raises(BaselineInvalidError, match="do not sum to 1"):
        parse_baseline(json.dumps(document).encode())


def test_an_oversized_pack_is_refused_before_parsing() -> None:
    with pytest.raises(BaselineInvalidError, match=r"too_large.*over the limit"):
        parse_baseline(b" " * (MAX_BASELINE_BYTES + 1))


Reduce = Literal["position", "channel_mean", "row_max", "row_argmax"]


def _source(tensor: str, reduce: Reduce, index: int = 0) -> Source:
    return Source(tensor=tensor, role="input", reduce=reduce, index=index)


IMAGE = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
TABLE = np.array([[1.0, 5.0, 2.0], [4.0, 0.0, 9.0]])


@pytest.mark.parametrize(
    ("source", "column"),
    [
        (_source("t", "position", 1), [5.0, 0.0]),
        (_source("t", "row_max"), [5.0, 9.0]),
        (_source("t", "row_argmax"), [1.0, 2.0]),
        (_source("img", "channel_mean", 2), [9.5, 21.5]),
        (_source("img", "position", 11), [11.0, 23.0]),  # a flattened position of a row
        (_source("t", "position", 3), [NAN, NAN]),  # past the end of the row
        (_source("t", "channel_mean", 0), [NAN, NAN]),  # not image-like
        (_source("absent", "position"), [NAN, NAN]),
        (_source("labels", "position"), [NAN, NAN]),  # strings are not features
        (_source("short", "position"), [NAN, NAN]),  # a tensor of another batch size
    ],
)
def test_extract(source: Source, column: list[float]) -> None:
    tensors = {
        "t": TABLE,
        "img": IMAGE,
        "labels": np.array([["a"], ["b"]]),
        "short": np.zeros((1, 3)),
    }
    assert Extractor([source])(tensors, 2)[:, 0].tolist() == pytest.approx(column, nan_ok=True)


def test_extract_many_features_of_one_tensor_in_order() -> None:
    sources = [_source("t", "position", 2), _source("t", "row_max"), _source("t", "position", 0)]
    assert Extractor(sources)({"t": TABLE}, 2).tolist() == [[2.0, 5.0, 1.0], [9.0, 9.0, 4.0]]


def _counts(rng: np.random.Generator, rows: int, shift: float = 0.0) -> list[FeatureCounts]:
    pack = tabular_pack()
    inputs, outputs = tabular_rows(rng, rows, shift)
    values = Extractor([f.source for f in pack.features])({**inputs, **outputs}, rows)
    return [
        FeatureCounts.of(f.binning, values[:, i], f.min, f.max) for i, f in enumerate(pack.features)
    ]


def test_windows_like_training_score_near_zero_and_shifted_ones_high() -> None:
    rng = np.random.default_rng(0)
    pack = tabular_pack()
    null = [score_window(pack, _counts(rng, 50)).score for _ in range(40)]
    shifted = score_window(pack, _counts(rng, 50, shift=1.5))
    assert abs(float(np.median(null))) < 1.5
    assert shifted.score > 4
    evidence = {f.name: f.evidence for f in shifted.features}
    assert evidence["x[0]"] > 3  # the shifted input, and the outputs it moves
    assert max(evidence, key=evidence.__getitem__) in {"x[0]", "p:class", "p:confidence"}
    assert shifted.calibrated_rows == 50


@pytest.mark.parametrize(("rows", "calibrated"), [(19, None), (20, 20), (49, 20), (500, 50)])
def test_a_window_scores_against_the_largest_calibration_it_fills(
    rows: int, calibrated: int | None
) -> None:
    score = score_window(tabular_pack(), _counts(np.random.default_rng(1), rows))
    assert score.calibrated_rows == calibrated
    assert np.isnan(score.score) == (calibrated is None)


@pytest.mark.parametrize(("wanted", "nearest"), [(1, 20), (30, 20), (35, 50), (10_000, 50)])
def test_a_window_size_not_calibrated_uses_the_nearest(wanted: int, nearest: int) -> None:
    assert tabular_pack().nearest_window(wanted).rows == nearest
