"""Hostile ONNX models: tiny, valid files whose first run allocates gigabytes or never ends.

Each takes `x: float32[N, 4]` and returns `y: float32[N, 4]`, so a manifest's contract and the
agent's warm-up accept them; the damage happens only when ONNX Runtime runs the graph (it skips
constant folding of tensors over 1 GiB, so nothing is allocated at load time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 4
GIB = 1 << 30
_OPSET = 17


def _graph_model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> bytes:
    """`y = x + reduced`, where `nodes` compute the float scalar-ish tensor `reduced`."""
    graph = helper.make_graph(
        [*nodes, helper.make_node("Add", ["x", "reduced"], ["y"])],
        "bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", FEATURES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _int64s(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _reduce(source: str) -> onnx.NodeProto:
    return helper.make_node("ReduceMax", [source], ["reduced"], keepdims=0)


def _gib_shape(gib: int) -> list[int]:
    # float32 elements of `gib` GiB as a 2-D shape
    return [gib * 1024, (1 << 20) // 4]


@functools.cache
def constant_of_shape(gib: int = 4) -> bytes:
    fill = numpy_helper.from_array(np.array([1.0], dtype=np.float32))
    return _graph_model(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=fill), _reduce("big")],
        [_int64s("shape", _gib_shape(gib))],
    )


@functools.cache
def expand(gib: int = 4) -> bytes:
    one = numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one")
    return _graph_model(
        [helper.make_node("Expand", ["one", "shape"], ["big"]), _reduce("big")],
        [one, _int64s("shape", _gib_shape(gib))],
    )


@functools.cache
def tile(gib: int = 4) -> bytes:
    one = numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "one")
    return _graph_model(
        [helper.make_node("Tile", ["one", "repeats"], ["big"]), _reduce("big")],
        [one, _int64s("repeats", _gib_shape(gib))],
    )


def _loop_model(body: onnx.GraphProto, trip_count: int, scan_outputs: int) -> bytes:
    """A `Loop` of `trip_count` iterations carrying a float scalar; `reduced` is its final value
    (plus the max of the first scan output, if any: so the accumulated outputs are live)."""
    loop_outputs = ["carried", *(f"scan{i}" for i in range(scan_outputs))]
    nodes = [
        helper.make_node("Loop", ["trips", "", "start"], loop_outputs, body=body),
    ]
    if scan_outputs:
        nodes += [
            helper.make_node("ReduceMax", ["scan0"], ["scan_max"], keepdims=0),
            helper.make_node("Add", ["carried", "scan_max"], ["reduced"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["carried"], ["reduced"]))
    return _graph_model(
        nodes,
        [
            numpy_helper.from_array(np.array(trip_count, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "start"),
        ],
    )


def _body(extra_nodes: list[onnx.NodeProto], scan: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
    step = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "step")
    return helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "step"], ["acc_out"]),
            *extra_nodes,
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
            *scan,
        ],
        [step],
    )


@functools.cache
def loop_allocating(mib_per_iteration: int = 64, iterations: int = 256) -> bytes:
    """Each iteration emits a fresh `mib_per_iteration` MiB scan output; ORT keeps them all
    until the loop ends (16 GiB by default)."""
    fill = numpy_helper.from_array(np.array([1.0], dtype=np.float32))
    shape = numpy_helper.from_array(
        np.array([mib_per_iteration, (1 << 20) // 4], dtype=np.int64), "chunk_shape"
    )
    body = _body(
        [helper.make_node("ConstantOfShape", ["chunk_shape"], ["chunk"], value=fill)],
        [helper.make_tensor_value_info("chunk", TensorProto.FLOAT, [mib_per_iteration, None])],
    )
    body.initializer.append(shape)
    return _loop_model(body, iterations, scan_outputs=1)


@functools.cache
def loop_forever(iterations: int = 1 << 40) -> bytes:
    """A trip count of 2^40 scalar additions: hours of CPU, no memory."""
    return _loop_model(_body([], []), iterations, scan_outputs=0)


BOMBS: dict[str, Callable[[], bytes]] = {
    "constant_of_shape": constant_of_shape,
    "expand": expand,
    "tile": tile,
    "loop_allocating": loop_allocating,
    "loop_forever": loop_forever,
}
