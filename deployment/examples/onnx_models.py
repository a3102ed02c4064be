"""Example ONNX models built from code: for the demo, the tests and the benchmarks.

Built with `onnx.helper` so that no weights are downloaded; a seed makes every build
byte-identical, hence content-addressed by the same sha256.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ONNX Runtime 1.2x reads opset 21 and IR 10; pinning both keeps builds reproducible.
OPSET = 21
IR_VERSION = 10


def mlp(
    widths: Sequence[int],
    *,
    seed: int = 0,
    input_name: str = "input",
    output_name: str = "output",
    batch_dim: str | int = "batch",
) -> onnx.ModelProto:
    """A dense ReLU network `widths[0] -> ... -> widths[-1]` with a symbolic batch dimension."""
    if len(widths) < 2:
        raise ValueError("an MLP needs at least an input and an output width")
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = input_name
    layers = list(itertools.pairwise(widths))
    for index, (fan_in, fan_out) in enumerate(layers):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        last = index == len(layers) - 1
        gemm_out = output_name if last else f"h{index}"
        nodes.append(helper.make_node("Gemm", [current, f"w{index}", f"b{index}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"r{index}"]))
            current = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch_dim, widths[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch_dim, widths[-1]])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-mlops-examples"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def tiny_mlp(seed: int = 0) -> onnx.ModelProto:
    """About 20 µs a call at batch 1 on one core: 32 features -> 8 scores (0.6 MB)."""
    return mlp([32, 384, 384, 8], seed=seed)


def mid_mlp(seed: int = 0) -> onnx.ModelProto:
    """About 1 ms a call at batch 1 on one core: 1024 features -> 10 scores.

    Its 22 MB of weights also make memory behaviour across hot swaps visible.
    """
    return mlp([1024, 1536, 1536, 1024, 10], seed=seed)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path
