"""Models and requests for the datatype parity tests: one Identity model per v2 datatype, and a
real scikit-learn OneHotEncoder (skl2onnx) for strings, each checked against ONNX Runtime.

Every tensor of a request is encoded here by hand (JSON, or the binary tensor data extension)
and every answer decoded by hand, so the tests do not share the agent's codec.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import StringTensorType
from sklearn.preprocessing import OneHotEncoder

from agent.serving.contract import V2_TO_NUMPY

_ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
# Every datatype the agent accepts must have a model here (the tests check the two agree).
DATATYPES = tuple(V2_TO_NUMPY)


def _extremes(dtype: np.dtype[Any]) -> list[Any]:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return [int(info.min), int(info.max), 0, 1]
    # The largest finite value, the smallest normal, and a value no binary fraction is.
    info_f = np.finfo(dtype)
    return [float(info_f.max), -float(info_f.tiny), 0.1, -2.5]


def sample(datatype: str) -> np.ndarray:
    """A 2 x 2 input of `datatype` holding its edge values (numpy's own dtype for it)."""
    if datatype == "BOOL":
        return np.array([[True, False], [False, True]])
    if datatype == "BYTES":
        return np.array([["a", "héllo"], ["", "日本"]], dtype=object)
    dtype = V2_TO_NUMPY[datatype]
    return np.array(_extremes(dtype), dtype=dtype).reshape(2, 2)


def identity_model(datatype: str) -> bytes:
    """`y = Identity(x)` for one datatype, both `[batch, 2]`."""
    kind = _ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", kind, [None, 2])],
        [helper.make_tensor_value_info("y", kind, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def square_model() -> bytes:
    """`y = x * x` in FP32, `[batch, 2]`: finite inputs past 1.8e19 overflow to Inf."""
    kind = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["y"])],
        "square",
        [helper.make_tensor_value_info("x", kind, [None, 2])],
        [helper.make_tensor_value_info("y", kind, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@functools.cache
def _encoder() -> onnx.ModelProto:
    encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    encoder.fit(np.array([["a"], ["b"], ["c"]]))
    model: onnx.ModelProto = convert_sklearn(
        encoder, initial_types=[("category", StringTensorType([None, 1]))], target_opset=17
    )
    return model


@functools.cache
def onehot_model() -> bytes:
    """scikit-learn's OneHotEncoder over {"a", "b", "c"} (unknown categories: all zeros)."""
    return bytes(_encoder().SerializeToString())


ONEHOT_SAMPLE = np.array([["a"], ["c"], ["zz"], ["b"]], dtype=object)


@functools.cache
def combined_model() -> bytes:
    """Every datatype's Identity (`in_<type>` -> `out_<type>`) and the OneHotEncoder in one
    graph: one release answers every datatype in one route message."""
    encoder = _encoder()
    nodes = list(encoder.graph.node)
    inputs = list(encoder.graph.input)
    outputs = list(encoder.graph.output)
    for datatype in DATATYPES:
        kind, low = _ONNX_TYPES[datatype], datatype.lower()
        nodes.append(helper.make_node("Identity", [f"in_{low}"], [f"out_{low}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{low}", kind, [None, 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{low}", kind, [None, 2]))
    graph = helper.make_graph(
        nodes, "parity", inputs, outputs, initializer=list(encoder.graph.initializer)
    )
    model = helper.make_model(graph, opset_imports=list(encoder.opset_import))
    model.ir_version = encoder.ir_version
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def combined_sample() -> dict[str, np.ndarray]:
    feed = {f"in_{datatype.lower()}": sample(datatype) for datatype in DATATYPES}
    feed["category"] = np.array([["a"], ["zz"]], dtype=object)  # the samples' two rows
    return feed


def reference(model: bytes, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ONNX Runtime itself answers for `feed`."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed)), strict=True))


# --- the wire, by hand ---------------------------------------------------------------------------

_BYTES_PREFIX = struct.Struct("<I")


def v2_datatype(array: np.ndarray) -> str:
    return (
        "BYTES"
        if array.dtype == object
        else next(name for name, dtype in V2_TO_NUMPY.items() if dtype == array.dtype)
    )


def json_request(feed: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "datatype": v2_datatype(array),
                "shape": list(array.shape),
                "data": array.ravel().tolist(),
            }
            for name, array in feed.items()
        ]
    }


def _raw(array: np.ndarray) -> bytes:
    if array.dtype == object:
        parts = [str(element).encode() for element in array.ravel().tolist()]
        return b"".join(_BYTES_PREFIX.pack(len(part)) + part for part in parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def binary_request(feed: Mapping[str, np.ndarray]) -> tuple[bytes, int]:
    """The body and `Inference-Header-Content-Length` of a request whose inputs and outputs
    all travel as binary tensor data."""
    chunks = [_raw(array) for array in feed.values()]
    header = {
        "inputs": [
            {
                "name": name,
                "datatype": v2_datatype(array),
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(chunk)},
            }
            for (name, array), chunk in zip(feed.items(), chunks, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    return head + b"".join(chunks), len(head)


def _from_raw(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        elements, position = [], 0
        while position < len(raw):
            (length,) = _BYTES_PREFIX.unpack_from(raw, position)
            elements.append(raw[position + 4 : position + 4 + length].decode())
            position += 4 + length
        return np.array(elements, dtype=object).reshape(shape)
    dtype = V2_TO_NUMPY[datatype].newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).astype(V2_TO_NUMPY[datatype]).reshape(shape)


def decode_response(body: bytes, header_length: int | None) -> dict[str, tuple[str, np.ndarray]]:
    """(datatype, array) of every output of a v2 response, JSON or binary."""
    document = json.loads(body if header_length is None else body[:header_length])
    offset = len(body) if header_length is None else header_length
    decoded: dict[str, tuple[str, np.ndarray]] = {}
    for output in document["outputs"]:
        datatype, shape = output["datatype"], output["shape"]
        if "data" in output:
            dtype = V2_TO_NUMPY[datatype]
            array = np.array(output["data"], dtype=dtype).reshape(shape)
        else:
            size = output["parameters"]["binary_data_size"]
            array = _from_raw(body[offset : offset + size], datatype, shape)
            offset += size
        decoded[output["name"]] = (datatype, array)
    assert offset == len(body), "the binary part holds bytes no output claims"
    return decoded


def assert_same(agent: tuple[str, np.ndarray], expected: np.ndarray, where: str) -> None:
    """The agent's answer equals ONNX Runtime's: datatype, shape and every value, exactly."""
    datatype, array = agent
    assert datatype == v2_datatype(expected), f"{where}: datatype {datatype}"
    assert array.shape == expected.shape, f"{where}: shape {array.shape} != {expected.shape}"
    if datatype == "BYTES":
        assert array.ravel().tolist() == expected.ravel().tolist(), where
    else:
        np.testing.assert_array_equal(array, expected, err_msg=where, strict=True)
