"""ONNX Runtime sessions: loading, the model's own I/O contract, and its measured cost.

The cost model decides dispatch (inline on the event loop or a worker thread), so it is
measured on this machine at load time rather than guessed from the file size.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import psutil
from pydantic import Field

from agent.config import Section
from agent.observation.limits import Limits, default_intra_op_threads, read_limits
from agent.observation.metrics import LATENCY_BUCKETS, Distribution
from agent.serving.contract import ONNX_TO_V2, V2_TO_NUMPY
from wire.contract import SYMBOLIC, ModelContract, TensorSpec
from wire.reasons import AgentError, Reason

GraphOptimization = Literal["disable", "basic", "extended", "all"]

_OPTIMIZATION_LEVELS: Mapping[GraphOptimization, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelLoadError(AgentError):
    """The bytes are not a model ONNX Runtime can run, or its I/O cannot be described."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.LOAD_FAILED, message)


_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def pin_mmap_threshold(size: int) -> bool:
    """Fix glibc's mmap threshold at `size` bytes for the whole process; False if not glibc.

    glibc raises its threshold each time a block it had mmap'ed is freed (up to 32 MiB). After
    the first hot swap drops a session, the next models' weights and load-time buffers then
    come from heap arenas, where freed memory stays resident and fragmented: the agent's RSS
    grew 86 % over 200 swaps of a 22 MB model (bench/swap.py; microsoft/onnxruntime#18749).
    With a fixed threshold every block of `size` or more gets its own mapping, returned to the
    OS when freed: RSS stays within 1 %. The price is paid by loading, which faults its big
    buffers in afresh (~85 MB, some 50 ms of CPU for that model, on the loader thread); the
    inference hot path takes no page faults either way, ORT's arena holding its buffers.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, size))


class RuntimeOptions(Section):
    """ONNX Runtime session options (`EDGEML_INTRA_OP_THREADS`, `EDGEML_GRAPH_OPTIMIZATION`...)."""

    # Unset: whole cores of the container's CPU limit less one (`default_intra_op_threads`).
    intra_op_threads: int | None = Field(None, ge=1, le=64)
    inter_op_threads: int = Field(1, ge=1, le=64)
    optimization: GraphOptimization = Field("all", alias="graph_optimization")
    # Blocks from this size up are mapped on their own and unmapped when freed; 0 leaves
    # glibc's dynamic threshold (see `pin_mmap_threshold`).
    mmap_threshold_bytes: int = Field(1 << 20, ge=0)

    def for_limits(self, limits: Limits) -> RuntimeOptions:
        """These options with unset thread counts taken from `limits`, not the host's cores."""
        if self.intra_op_threads is not None:
            return self
        return self.model_copy(update={"intra_op_threads": default_intra_op_threads(limits)})

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        # Unresolved options (tests, tools) read the limits here; the agent resolves them once.
        resolved = self.for_limits(read_limits()) if self.intra_op_threads is None else self
        options.intra_op_num_threads = resolved.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.optimization]
        # Thread pools that spin keep a core busy after each call; on a 2-core device that
        # steals the event loop's CPU. Waiting threads cost a few microseconds of wake-up.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options


@dataclass(frozen=True, slots=True)
class CostModel:
    """Seconds per ONNX Runtime call as `fixed + per_row * rows`, fitted from two batch sizes."""

    fixed_s: float
    per_row_s: float

    def estimate(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows


def fit_cost(rows_a: int, seconds_a: float, rows_b: int, seconds_b: float) -> CostModel:
    """A line through two measurements; a negative slope (noise) is read as flat."""
    if rows_b == rows_a:
        return CostModel(fixed_s=max(seconds_a, seconds_b), per_row_s=0.0)
    per_row = max((seconds_b - seconds_a) / (rows_b - rows_a), 0.0)
    return CostModel(fixed_s=max(seconds_a - per_row * rows_a, 0.0), per_row_s=per_row)


def read_contract(session: ort.InferenceSession) -> ModelContract:
    def spec(arg: ort.NodeArg) -> TensorSpec:
        datatype = ONNX_TO_V2.get(arg.type)
        if datatype is None:
            raise ModelLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
        dims = tuple(dim if isinstance(dim, int) and dim >= 0 else SYMBOLIC for dim in arg.shape)
        return TensorSpec(name=arg.name, datatype=datatype, shape=dims)

    return ModelContract(
        inputs=tuple(spec(a) for a in session.get_inputs()),
        outputs=tuple(spec(a) for a in session.get_outputs()),
    )


def sample_inputs(contract: ModelContract, rows: int) -> dict[str, np.ndarray]:
    """Zeros of the contract's shapes, symbolic dims set to `rows` (first) or 1 (others)."""
    samples: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        shape = spec.concrete_shape(rows)
        if spec.datatype == "BYTES":
            samples[spec.name] = np.full(shape, "", dtype=np.object_)
        else:
            samples[spec.name] = np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])
    return samples


class LoadedModel:
    """One ONNX Runtime session with its identity, contract and measured cost."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        name: str,
        version: int,
        sha256: str,
        cost: CostModel,
        load_rss_delta_bytes: int | None = None,
    ) -> None:
        self.session = session
        # Resident memory the process gained while this model loaded and warmed up.
        self.load_rss_delta_bytes = load_rss_delta_bytes
        self.name = name
        self.version = version
        self.sha256 = sha256
        self.contract = read_contract(session)
        self.output_names = list(self.contract.output_names)
        self.cost = cost
        self.in_flight = 0
        # Updated by the inference service on the event loop; probation reads them.
        self.served = 0
        self.failed = 0
        self.latency = Distribution(LATENCY_BUCKETS)

    def close(self) -> None:
        """Release the session once no request holds this model (see `drained`)."""
        # ORT frees the session's memory when the last reference goes.
        del self.session

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> list[np.ndarray]:
        # run() copies inputs into ORT tensors and releases the GIL while computing. Output
        # names are always passed: with None, ORT rebuilds the name list in Python every call.
        names = output_names or self.output_names
        outputs: list[np.ndarray] = self.session.run(names, inputs)
        return outputs


def create_session(model: bytes | Path, options: RuntimeOptions) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model
    if options.mmap_threshold_bytes:
        # Process-wide and idempotent: set before each session, whose allocations obey it.
        pin_mmap_threshold(options.mmap_threshold_bytes)
    try:
        return ort.InferenceSession(
            source, options.session_options(), providers=["CPUExecutionProvider"]
        )
    except (
        Exception
    ) as error:  # ORT raises its own hierarchy, Fail/InvalidGraph/... and RuntimeError
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ModelLoadError(first_line[:300]) from error


def measure_cost(
    session: ort.InferenceSession,
    contract: ModelContract,
    max_rows: int,
    *,
    repeats: int = 15,
    clock: Callable[[], float] = time.perf_counter,
) -> CostModel:
    """Warm the session up and time it at batch 1 and at `max_rows` (median of `repeats`)."""

    def median_seconds(rows: int) -> float:
        feed = sample_inputs(contract, rows)
        session.run(None, feed)  # first call allocates; keep it out of the timing
        timings = []
        for _ in range(repeats):
            start = clock()
            session.run(None, feed)
            timings.append(clock() - start)
        return statistics.median(timings)

    one = median_seconds(1)
    if not contract.batchable or max_rows <= 1:
        return CostModel(fixed_s=one, per_row_s=0.0)
    return fit_cost(1, one, max_rows, median_seconds(max_rows))


def warm_up(session: ort.InferenceSession, contract: ModelContract, max_rows: int) -> None:
    """One run at batch 1 and one at `max_rows`: the first calls allocate their buffers."""
    for rows in (1, max_rows) if contract.batchable and max_rows > 1 else (1,):
        session.run(None, sample_inputs(contract, rows))


def _resident_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def load_model(
    model: bytes | Path,
    *,
    name: str,
    version: int,
    sha256: str,
    options: RuntimeOptions,
    max_rows: int,
    resident_bytes: Callable[[], int] = _resident_bytes,
    cost: CostModel | None = None,
) -> LoadedModel:
    """Create, warm up and time a session (or only warm it up when its `cost` was measured
    already, in quarantine). Blocking: call it from a worker thread.

    The resident memory it adds is measured around it (requests served meanwhile allocate a
    little too): with a version already serving, that is the transient of a swap.
    """
    before = resident_bytes()
    session = create_session(model, options)
    contract = read_contract(session)
    try:
        if cost is None:
            cost = measure_cost(session, contract, max_rows)
        else:
            warm_up(session, contract, max_rows)
    except Exception as error:  # a model that loads but cannot run on its own contract
        raise ModelLoadError(f"warm-up failed: {str(error).strip()[:300]}") from error
    return LoadedModel(
        session,
        name=name,
        version=version,
        sha256=sha256,
        cost=cost,
        load_rss_delta_bytes=resident_bytes() - before,
    )
