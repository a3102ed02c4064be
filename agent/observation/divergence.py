"""Divergences between a reference distribution and a window's counts (pure numpy).

Jensen-Shannon and Hellinger are bounded and defined when either side has empty bins, so a
category never seen in training or a bin a small window leaves empty cannot make them infinite;
PSI is reported because people know it, with a floor on empty bins (it is unbounded otherwise).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["PSI_FLOOR", "hellinger", "jensen_shannon", "normalise", "psi"]

Floats = npt.NDArray[np.float64]

# A bin with no mass gets this probability in PSI (the usual convention of PSI tools).
PSI_FLOOR = 1e-4


def normalise(counts: npt.ArrayLike) -> Floats:
    """Probabilities from non-negative counts; all zeros gives all zeros (no data, no shape)."""
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 1 or (array < 0).any():
        raise ValueError("counts must be a 1-D array of non-negative numbers")
    total = array.sum()
    return array / total if total > 0 else np.zeros_like(array)


def _check_pair(p: Floats, q: Floats) -> None:
    if p.shape != q.shape:
        raise ValueError(f"distributions differ in length: {p.shape[0]} and {q.shape[0]}")


def jensen_shannon(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Jensen-Shannon divergence in bits, in [0, 1]; inputs are normalised first."""
    pn, qn = normalise(p), normalise(q)
    _check_pair(pn, qn)
    m = (pn + qn) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(pn > 0, pn * np.log2(pn / m), 0.0).sum()
        kl_q = np.where(qn > 0, qn * np.log2(qn / m), 0.0).sum()
    # Rounding can leave a tiny negative or a value a hair above 1.
    return float(min(1.0, max(0.0, (kl_p + kl_q) / 2)))


def hellinger(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Hellinger distance in [0, 1]; inputs are normalised first."""
    pn, qn = normalise(p), normalise(q)
    _check_pair(pn, qn)
    bc = np.sqrt(pn * qn).sum()
    return float(np.sqrt(max(0.0, 1.0 - bc)))


def psi(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Population stability index, empty bins floored at :data:`PSI_FLOOR`."""
    pn, qn = normalise(reference), normalise(current)
    _check_pair(pn, qn)
    pf, qf = np.maximum(pn, PSI_FLOOR), np.maximum(qn, PSI_FLOOR)
    return float(((qf - pf) * np.log(qf / pf)).sum())
