"""Binning, divergences and mergeable counts: tables for the maths, properties for merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.observation.counts import Binning, FeatureCounts, equal_frequency_edges, merge_counts
from agent.observation.divergence import PSI_FLOOR, hellinger, jensen_shannon, normalise, psi

NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    ("values", "bins", "edges"),
    [
        (range(1, 9), 4, [3.0, 5.0, 7.0]),  # quantiles 2.75, 4.5, 6.25 snap up to values
        (range(100), 2, [50.0]),
        ([0, 0, 0, 0, 1], 4, [1.0]),  # ties collapse; no edge at the minimum
        ([5.0] * 10, 4, []),  # a constant has one bin
        ([1, 2, NAN, INF, 3, 4], 2, [3.0]),  # non-finite values are ignored
    ],
)
def test_equal_frequency_edges(values: list[float], bins: int, edges: list[float]) -> None:
    assert equal_frequency_edges(list(values), bins).tolist() == pytest.approx(edges)


@pytest.mark.parametrize(
    ("values", "bins", "message"),
    [([1, 2], 1, "at least 2"), ([NAN, INF], 4, "no finite value")],
)
def test_equal_frequency_edges_refuses(values: list[float], bins: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        equal_frequency_edges(values, bins)


@pytest.mark.parametrize(
    ("kind", "cuts", "values", "indices"),
    [
        # numeric: bins (-inf,1) [1,2) [2,inf) then missing; a value on an edge goes above it
        (
            "numeric",
            [1.0, 2.0],
            [0.5, 1.0, 1.5, 2.0, 9.0, NAN, -INF, INF],
            [0, 1, 1, 2, 2, 3, 0, 2],
        ),
        # categorical: one bin per category, one for others, one for missing
        ("categorical", [0.0, 3.0, 7.0], [0, 3, 7, 1, 8, -1, NAN], [0, 1, 2, 3, 3, 3, 4]),
    ],
)
def test_bin_indices(kind: str, cuts: list[float], values: list[float], indices: list[int]) -> None:
    binning = Binning(kind, np.array(cuts))  # type: ignore[arg-type]
    assert binning.indices(values).tolist() == indices
    assert binning.count(values).tolist() == np.bincount(indices, minlength=binning.size).tolist()


@pytest.mark.parametrize(
    ("kind", "cuts", "message"),
    [
        ("numeric", [2.0, 1.0], "strictly increasing"),
        ("numeric", [1.0, NAN], "finite"),
        ("categorical", [], "at least one category"),
    ],
)
def test_binning_refuses(kind: str, cuts: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Binning(kind, np.array(cuts))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("p", "q", "js", "hel"),
    [
        ([1, 0], [1, 0], 0.0, 0.0),
        ([1, 0], [0, 1], 1.0, 1.0),  # disjoint supports: both at their maximum
        ([1, 1], [3, 1], 0.0487949, 0.1845919),
        ([2, 2], [1, 1], 0.0, 0.0),  # counts are normalised first
        ([1, 1, 0], [1, 1, 2], 0.3112781, 0.5411961),  # an empty reference bin stays finite
    ],
)
def test_divergences(p: list[float], q: list[float], js: float, hel: float) -> None:
    assert jensen_shannon(p, q) == pytest.approx(js, abs=1e-6)
    assert jensen_shannon(q, p) == pytest.approx(js, abs=1e-6)  # symmetric
    assert hellinger(p, q) == pytest.approx(hel, abs=1e-6)


@pytest.mark.parametrize(
    ("reference", "current", "expected"),
    [
        ([1, 1], [1, 1], 0.0),
        ([1, 1], [3, 1], (0.75 - 0.5) * math.log(1.5) + (0.25 - 0.5) * math.log(0.5)),
        ([1, 0], [1, 1], (0.5 - 1) * math.log(0.5) + (0.5 - PSI_FLOOR) * math.log(0.5 / PSI_FLOOR)),
    ],
)
def test_psi(reference: list[float], current: list[float], expected: float) -> None:
    assert psi(reference, current) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("p", "q", "message"),
    [([1, 0], [1, 0, 0], "differ in length"), ([-1, 2], [1, 1], "non-negative")],
)
def test_divergence_refuses(p: list[float], q: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jensen_shannon(p, q)


def test_normalise_of_nothing_is_zeros() -> None:
    assert normalise([0, 0]).tolist() == [0.0, 0.0]


def test_feature_counts_moments_and_range() -> None:
    binning = Binning("numeric", np.array([0.0]))
    counts = FeatureCounts.of(binning, [-2.0, 1.0, 3.0, NAN, INF], low=-1.0, high=2.0)
    assert counts.counts.tolist() == [1, 3, 1]
    assert (counts.rows, counts.missing, counts.present) == (5, 1, 4)
    assert (counts.total, counts.total_sq) == (2.0, 14.0)  # the infinity stays out of the sums
    assert (counts.below, counts.above) == (1, 2)


def test_merging_different_layouts_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot merge 3 bins with 4 bins"):
        _ = FeatureCounts.empty(3) + FeatureCounts.empty(4)


values = hnp.arrays(
    np.float64,
    st.integers(0, 60),
    elements=st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False), st.just(NAN), st.sampled_from([0.0, 1.0, 2.0])
    ),
)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(values, min_size=1, max_size=5), kind=st.sampled_from(["n", "c"]))
def test_merged_profiles_equal_the_profile_of_the_concatenation(
    parts: list[np.ndarray], kind: str
) -> None:
    binning = (
        Binning("numeric", np.array([-10.0, 0.0, 1.5, 100.0]))
        if kind == "n"
        else Binning("categorical", np.array([0.0, 1.0, 2.0]))
    )
    merged = merge_counts([FeatureCounts.of(binning, p, -5.0, 50.0) for p in parts])
    whole = FeatureCounts.of(binning, np.concatenate(parts), -5.0, 50.0)
    assert merged.counts.tolist() == whole.counts.tolist()
    assert (merged.below, merged.above) == (whole.below, whole.above)
    assert merged.total == pytest.approx(whole.total, rel=1e-9, abs=1e-6)
    assert merged.total_sq == pytest.approx(whole.total_sq, rel=1e-9, abs=1e-6)
