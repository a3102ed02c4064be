"""Binning and mergeable count profiles of windows of feature values (pure numpy).

A window of rows becomes, per feature, a vector of bin counts plus a few sums; profiles of two
windows merge by adding them, so a fleet's profiles combine into the profile of all their rows
without any raw data leaving a device.

Bin layout of one feature (``Binning.size`` counts):
    numeric:      ``len(cuts) + 1`` value bins split at the interior edges ``cuts`` (a value equal
                  to an edge goes to the bin above it), then one bin for missing values (NaN);
    categorical:  one bin per known category (``cuts`` sorted), one for any other value, then
                  one for missing values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "SUM_LIMIT",
    "Binning",
    "FeatureCounts",
    "equal_frequency_edges",
    "merge_counts",
]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Kind = Literal["numeric", "categorical"]

# The largest magnitude a value adds to a window's sums: its square (1e200) times any number of
# rows a fleet's merged profiles could hold stays far below float64's 1.8e308.
SUM_LIMIT = 1e100


def equal_frequency_edges(values: npt.ArrayLike, bins: int) -> Floats:
    """Interior edges that split the finite ``values`` into ``bins`` about equally filled bins.

    Each quantile snaps up to the next distinct value, so that ties stay in one bin and an
    edge never sits at the minimum (which would leave the first bin empty by construction); a
    feature with few distinct values gets fewer bins.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        raise ValueError("no finite value to place edges on")
    distinct = np.unique(finite)
    quantiles = np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    above = np.searchsorted(distinct, quantiles, side="right")
    return np.unique(distinct[above[above < distinct.size]])


@dataclass(frozen=True, eq=False)
class Binning:
    """How one feature's values map to bins; see the module docstring for the layout."""

    kind: Kind
    cuts: Floats

    def __post_init__(self) -> None:
        if self.cuts.ndim != 1 or not np.all(np.isfinite(self.cuts)):
            raise ValueError("cuts must be a 1-D array of finite numbers")
        if self.cuts.size and not np.all(np.diff(self.cuts) > 0):
            raise ValueError("cuts must be strictly increasing")
        if self.kind == "categorical" and self.cuts.size == 0:
            raise ValueError("a categorical feature needs at least one category")

    @property
    def size(self) -> int:
        return int(self.cuts.size) + 2

    def indices(self, column: npt.ArrayLike) -> Ints:
        """Bin index of every value of ``column``."""
        values = np.asarray(column, dtype=np.float64)
        missing = np.isnan(values)
        if self.kind == "numeric":
            index = np.searchsorted(self.cuts, values, side="right")
        else:
            index = np.searchsorted(self.cuts, values, side="left")
            clipped = np.minimum(index, self.cuts.size - 1)
            index = np.where(self.cuts[clipped] == values, index, self.cuts.size)
        return np.where(missing, self.size - 1, index).astype(np.int64)

    def count(self, column: npt.ArrayLike) -> Ints:
        return np.bincount(self.indices(column), minlength=self.size).astype(np.int64)


@dataclass(frozen=True, eq=False)
class FeatureCounts:
    """One feature over one window: bin counts and additive moments of the finite values.

    ``below``/``above`` count present values outside the training range ``[low, high]``.
    """

    counts: Ints
    total: float
    total_sq: float
    below: int
    above: int

    @cached_property
    def rows(self) -> int:
        return int(self.counts.sum())

    @property
    def missing(self) -> int:
        return int(self.counts[-1])

    @cached_property
    def present(self) -> int:
        return self.rows - self.missing

    @property
    def mean(self) -> float:
        return self.total / self.present if self.present else float("nan")

    @property
    def std(self) -> float:
        if not self.present:
            return float("nan")
        variance = self.total_sq / self.present - self.mean**2
        return float(np.sqrt(max(0.0, variance)))

    @classmethod
    def of(cls, binning: Binning, column: npt.ArrayLike, low: float, high: float) -> FeatureCounts:
        values = np.asarray(column, dtype=np.float64)
        present = values[~np.isnan(values)]
        # Infinities count as out of range but stay out of the sums, which must stay finite;
        # so must sums of huge finite values (1e200 squared is Inf): the sums see them clipped,
        # the bins and the range counts as they are.
        finite = np.clip(present[np.isfinite(present)], -SUM_LIMIT, SUM_LIMIT)
        return cls(
            counts=binning.count(values),
            total=float(finite.sum()),
            total_sq=float(np.dot(finite, finite)),
            below=int(np.count_nonzero(present < low)),
            above=int(np.count_nonzero(present > high)),
        )

    @classmethod
    def empty(cls, size: int) -> FeatureCounts:
        return cls(np.zeros(size, dtype=np.int64), 0.0, 0.0, 0, 0)

    def __add__(self, other: FeatureCounts) -> FeatureCounts:
        if self.counts.shape != other.counts.shape:
            raise ValueError(f"cannot merge {self.counts.size} bins with {other.counts.size} bins")
        return FeatureCounts(
            counts=self.counts + other.counts,
            total=self.total + other.total,
            total_sq=self.total_sq + other.total_sq,
            below=self.below + other.below,
            above=self.above + other.above,
        )


def merge_counts(parts: list[FeatureCounts]) -> FeatureCounts:
    if not parts:
        raise ValueError("nothing to merge")
    merged = parts[0]
    for part in parts[1:]:
        merged = merged + part
    return merged
