"""Micro-batching plan: which queued requests share one ONNX Runtime call, and splitting back.

Pure. Requests are stacked along axis 0 only when every input agrees on datatype and on all
dimensions but the first, so a batch never mixes shapes the model would reject.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import accumulate

import numpy as np


def batch_key(inputs: Mapping[str, np.ndarray]) -> Hashable:
    """Requests with equal keys can be concatenated along axis 0."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())


def take_batch(pending: Sequence[tuple[Hashable, int]], max_rows: int) -> list[int]:
    """Indices of the next batch: the oldest request plus later ones of the same key.

    FIFO for the head, so no request starves; a request larger than `max_rows` runs alone.
    Requests of other keys keep their place for a later batch.
    """
    if not pending:
        return []
    head_key, rows = pending[0]
    taken = [0]
    for index in range(1, len(pending)):
        key, more = pending[index]
        if key == head_key and rows + more <= max_rows:
            taken.append(index)
            rows += more
            if rows == max_rows:
                break
    return taken


def stack(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def split(outputs: Sequence[np.ndarray], rows: Sequence[int]) -> list[list[np.ndarray]]:
    """Cut each output back into per-request slices of `rows` (views, no copies)."""
    total = sum(rows)
    for output in outputs:
        if output.ndim == 0 or output.shape[0] != total:
            raise ValueError(
                f"output with shape {list(output.shape)} cannot be split into {total} rows"
            )
    if len(rows) == 1:
        return [list(outputs)]
    bounds = list(accumulate(rows))[:-1]
    per_output = [np.split(output, bounds) for output in outputs]
    return [[parts[i] for parts in per_output] for i in range(len(rows))]
