"""Hostile model files are refused before ONNX Runtime sees them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.releases.onnx_check import HostileModel, ModelFacts, inspect_model
from deployment.examples.onnx_models import IR_VERSION, OPSET
from tests.support.models import mid_bytes, tiny_bytes

# ---------------------------------------------------------------------------------------------
# Builders


def vector(name: str, size: int = 4) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [size])


def weights(name: str = "w", size: int = 4) -> TensorProto:
    return numpy_helper.from_array(np.arange(size, dtype=np.float32) * 7, name)


def external(
    tensor: TensorProto,
    location: str = "weights.bin",
    *,
    entries: bool = True,
    marker: bool = True,
) -> TensorProto:
    """Turn `tensor` into a reference to `location` (offset 0), as onnx's own saver would."""
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    if marker:
        tensor.data_location = TensorProto.EXTERNAL
    if entries:
        for name, value in (("location", location), ("offset", "0"), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = name, value
    return tensor


def make_model(
    graph: onnx.GraphProto,
    *,
    functions: Iterable[onnx.FunctionProto] = (),
    domains: Iterable[str] = (),
) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(
        graph, opset_imports=opsets, functions=list(functions), producer_name="onnx-check-tests"
    )
    model.ir_version = IR_VERSION
    return model


def add_model(initializer: TensorProto) -> onnx.ModelProto:
    """y = x + w, with w an initializer: the smallest model whose output shows w's bytes."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [vector("x")],
        [vector("y")],
        [initializer],
    )
    return make_model(graph)


def if_model(then_initializers: Iterable[TensorProto] = ()) -> onnx.ModelProto:
    """An If whose then-branch returns a subgraph initializer `w`."""
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["t"])],
        "then",
        [],
        [vector("t")],
        list(then_initializers) or [weights()],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [vector("e")]
    )
    node = helper.make_node(
        "If", ["c"], ["y"], name="choose", then_branch=then_branch, else_branch=else_branch
    )
    graph = helper.make_graph(
        [node],
        "if",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), vector("x")],
        [vector("y")],
    )
    return make_model(graph)


def constant_model(tensor: TensorProto) -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["y"], name="const", value=tensor)
    return make_model(helper.make_graph([node], "constant", [], [vector("y")]))


def sparse_constant_model(sparse: onnx.SparseTensorProto) -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["y"], name="const", sparse_value=sparse)
    return make_model(helper.make_graph([node], "sparse_constant", [], [vector("y")]))


def tensors_attribute_model(tensor: TensorProto) -> onnx.ModelProto:
    """A custom-domain node with a `tensors` list attribute (the check is op-agnostic)."""
    node = helper.make_node("Pack", [], ["y"], name="pack", domain="test.custom")
    node.attribute.append(helper.make_attribute("parts", [weights("fine"), tensor]))
    return make_model(helper.make_graph([node], "pack", [], [vector("y")]), domains=["test.custom"])


def sparse(values: TensorProto, indices: TensorProto) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(values, indices, [8])


def sparse_parts() -> tuple[TensorProto, TensorProto]:
    values = numpy_helper.from_array(np.ones(2, dtype=np.float32), "sparse_values")
    indices = numpy_helper.from_array(np.array([1, 5], dtype=np.int64), "sparse_indices")
    return values, indices


def sparse_initializer_model(sparse_tensor: onnx.SparseTensorProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["sparse_values"], ["y"])], "sparse", [], [vector("y", 8)]
    )
    graph.sparse_initializer.append(sparse_tensor)
    return make_model(graph)


def function_body_model(tensor: TensorProto) -> onnx.ModelProto:
    """A model-local function whose body holds a Constant with `tensor`."""
    function = helper.make_function(
        "test.custom",
        "Seven",
        [],
        ["out"],
        [helper.make_node("Constant", [], ["out"], name="inner", value=tensor)],
        [helper.make_opsetid("", OPSET)],
    )
    call = helper.make_node("Seven", [], ["y"], name="call", domain="test.custom")
    graph = helper.make_graph([call], "calls_function", [], [vector("y")])
    return make_model(graph, functions=[function], domains=["test.custom"])


def function_default_model(tensor: TensorProto) -> onnx.ModelProto:
    """A function whose default attribute value (FunctionProto.attribute_proto) is `tensor`."""
    model = function_body_model(weights())
    model.functions[0].attribute_proto.append(helper.make_attribute("value", tensor))
    return model


def training_model(tensor: TensorProto) -> onnx.ModelProto:
    model = add_model(weights())
    training = onnx.TrainingInfoProto()
    training.initialization.CopyFrom(helper.make_graph([], "init", [], [], [tensor]))
    model.training_info.append(training)
    return model


def serialized(model: onnx.ModelProto) -> bytes:
    return bytes(model.SerializeToString())


def reference_totals(model: onnx.ModelProto) -> tuple[int, int]:
    """(nodes, initializer bytes) over every graph and function, counted with onnx's parser."""
    node_lists: list[Iterable[onnx.NodeProto]] = [f.node for f in model.functions]
    graphs = [model.graph]
    graphs += [g for t in model.training_info for g in (t.initialization, t.algorithm)]
    nodes = initializer_bytes = 0
    while graphs or node_lists:
        if graphs:
            graph = graphs.pop()
            initializer_bytes += sum(t.ByteSize() for t in graph.initializer)
            initializer_bytes += sum(s.ByteSize() for s in graph.sparse_initializer)
            node_lists.append(graph.node)
            continue
        for node in node_lists.pop():
            nodes += 1
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    return nodes, initializer_bytes


# Hand-encoded wire format, for inputs onnx's own serializer will not produce.


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


MODEL_HEADER = b"\x08" + varint(IR_VERSION)  # ir_version
OPSET_IMPORT = field(8, b"\x10" + varint(OPSET))  # opset_import { version }


def nested_graphs(depth: int) -> bytes:
    """A ModelProto whose graph nests `depth` graphs: each holds one node with a `g` attribute."""
    graph = b""
    for _ in range(depth - 1):
        attribute = field(1, b"body") + field(6, graph)
        graph = field(1, field(4, b"Loop") + field(5, attribute))
    return MODEL_HEADER + field(7, graph) + OPSET_IMPORT


# ---------------------------------------------------------------------------------------------
# Valid models


FACT_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "tiny_mlp": lambda: onnx.load_from_string(tiny_bytes()),
    "mid_mlp": lambda: onnx.load_from_string(mid_bytes()),
    "if_subgraph": if_model,
    "function": lambda: function_body_model(weights()),
    "sparse_initializer": lambda: sparse_initializer_model(sparse(*sparse_parts())),
    "training_info": lambda: training_model(weights()),
}


@pytest.mark.parametrize("build", FACT_MODELS.values(), ids=FACT_MODELS.keys())
def test_valid_model_facts_match_onnx_parse(build: Callable[[], onnx.ModelProto]) -> None:
    model = build()
    nodes, initializer_bytes = reference_totals(model)

    facts = inspect_model(serialized(model))

    assert facts == ModelFacts(
        ir_version=model.ir_version,
        opsets=tuple((o.domain, o.version) for o in model.opset_import),
        producer=model.producer_name,
        initializer_bytes=initializer_bytes,
        nodes=nodes,
    )


def test_large_raw_data_model_checks_in_milliseconds() -> None:
    """22 MB of raw_data are skipped by length, never copied or scanned."""
    data = mid_bytes()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        inspect_model(data)
        best = min(best, time.perf_counter() - started)
    assert best < 0.02


def test_graphs_nested_exactly_max_depth_pass() -> None:
    assert inspect_model(nested_graphs(32), max_depth=32).nodes == 31


def test_deep_nesting_within_a_raised_limit_does_not_recurse() -> None:
    """Thousands of nested graphs: an explicit stack, not Python recursion, walks them."""
    depth = 5_000
    assert inspect_model(nested_graphs(depth), max_depth=depth).nodes == depth - 1


# ---------------------------------------------------------------------------------------------
# External data


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "weights.bin"])
def test_external_initializer_is_refused_naming_tensor_and_location(location: str) -> None:
    data = serialized(add_model(external(weights("w"), location)))

    with pytest.raises(HostileModel) as refused:
        inspect_model(data)

    assert refused.value.reason == "external_data"
    assert "'w'" in refused.value.message
    assert repr(location) in refused.value.message


HIDING_PLACES: dict[str, Callable[[], onnx.ModelProto]] = {
    "constant_attribute": lambda: constant_model(external(weights("hidden"))),
    "tensors_list_attribute": lambda: tensors_attribute_model(external(weights("hidden"))),
    "if_subgraph_initializer": lambda: if_model([external(weights("hidden"))]),
    "sparse_initializer_values": lambda: sparse_initializer_model(
        sparse(external(sparse_parts()[0], "hidden.bin"), sparse_parts()[1])
    ),
    "sparse_initializer_indices": lambda: sparse_initializer_model(
        sparse(sparse_parts()[0], external(sparse_parts()[1], "hidden.bin"))
    ),
    "sparse_constant_attribute": lambda: sparse_constant_model(
        sparse(external(sparse_parts()[0], "hidden.bin"), sparse_parts()[1])
    ),
    "function_body": lambda: function_body_model(external(weights("hidden"))),
    "function_default_attribute": lambda: function_default_model(external(weights("hidden"))),
    "training_graph": lambda: training_model(external(weights("hidden"))),
}


@pytest.mark.parametrize("build", HIDING_PLACES.values(), ids=HIDING_PLACES.keys())
def test_external_data_is_refused_wherever_the_tensor_hides(
    build: Callable[[], onnx.ModelProto],
) -> None:
    with pytest.raises(HostileModel) as refused:
        inspect_model(serialized(build()))

    assert refused.value.reason == "external_data"


def test_refusal_names_the_node_and_subgraph_where_the_tensor_hides() -> None:
    with pytest.raises(HostileModel) as refused:
        inspect_model(serialized(if_model([external(weights("hidden"))])))

    message = refused.value.message
    assert "'hidden'" in message
    assert "'then_branch'" in message
    assert "'choose'" in message


def test_data_location_external_without_entries_is_refused() -> None:
    data = serialized(add_model(external(weights(), entries=False)))

    with pytest.raises(HostileModel, match="no location given") as refused:
        inspect_model(data)

    assert refused.value.reason == "external_data"


def test_external_data_entries_without_data_location_are_refused() -> None:
    """ONNX Runtime keys on data_location; the check refuses either marker on its own."""
    data = serialized(add_model(external(weights(), marker=False)))

    with pytest.raises(HostileModel) as refused:
        inspect_model(data)

    assert refused.value.reason == "external_data"


def test_refusal_message_escapes_control_characters_in_the_location() -> None:
    """The location is attacker text bound for logs: no raw line breaks get through."""
    data = serialized(add_model(external(weights(), "x\r\nlevel=info forged")))

    with pytest.raises(HostileModel) as refused:
        inspect_model(data)

    assert "\n" not in refused.value.message
    assert "\r" not in refused.value.message


@pytest.mark.parametrize("location", ["weights.bin", "state/keys.bin"])
def test_onnx_runtime_reads_cwd_files_named_by_a_model_that_the_check_refuses(
    location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the check exists: loaded from bytes, ORT resolves `location` against the cwd.

    ONNX Runtime 1.32 refuses paths that resolve outside the working directory, but reads any
    file beneath it (with graph optimisation disabled, a setting the agent offers; with it
    enabled, loading fails only on an optimiser precondition). The agent's working directory
    is not a place whose files a model should be able to read.
    """
    secret = np.array([3.0, 1.0, 4.0, 1.5], dtype=np.float32)
    (tmp_path / location).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / location).write_bytes(secret.tobytes())
    monkeypatch.chdir(tmp_path)
    data = serialized(add_model(external(weights("w"), location)))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    (leaked,) = session.run(None, {"x": np.zeros(4, dtype=np.float32)})

    np.testing.assert_array_equal(leaked, secret)
    with pytest.raises(HostileModel) as refused:
        inspect_model(data)
    assert refused.value.reason == "external_data"


# ---------------------------------------------------------------------------------------------
# Not ONNX, and malformed wire format


NOT_ONNX: dict[str, bytes] = {
    "empty": b"",
    "random_seed_0": np.random.default_rng(0).bytes(4096),
    "random_seed_1": np.random.default_rng(1).bytes(64),
    "json": json.dumps({"model": "resnet", "weights": [1, 2, 3]}).encode(),
    "text": b"This is not a model.\n",
    "zeros": bytes(1024),
    "no_graph": MODEL_HEADER + OPSET_IMPORT,
    "no_ir_version": field(7, b"") + OPSET_IMPORT,
    "no_opset_import": MODEL_HEADER + field(7, b""),
    "negative_ir_version": b"\x08" + varint((1 << 64) - 1) + field(7, b"") + OPSET_IMPORT,
}


@pytest.mark.parametrize("data", NOT_ONNX.values(), ids=NOT_ONNX.keys())
def test_input_that_is_not_an_onnx_model_is_not_onnx(data: bytes) -> None:
    with pytest.raises(HostileModel) as refused:
        inspect_model(data)

    assert refused.value.reason == "not_onnx"


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.25, 0.5, 0.75, 0.999])
@pytest.mark.parametrize("model", ["tiny", "if_subgraph"])
def test_truncated_model_is_not_onnx(model: str, fraction: float) -> None:
    data = tiny_bytes() if model == "tiny" else serialized(if_model())
    cut = max(1, min(len(data) - 1, int(len(data) * fraction)))

    with pytest.raises(HostileModel) as refused:
        inspect_model(data[:cut])

    assert refused.value.reason == "not_onnx"


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


# Field 100 is unknown to ModelProto, so these reach the skipping paths, not the schema check.
MALFORMED: dict[str, tuple[bytes, str]] = {
    "varint_over_ten_bytes": (b"\x08" + b"\xff" * 11 + b"\x01", "longer than 10 bytes"),
    "varint_cut_short": (b"\x08\xff\xff", "truncated varint"),
    "length_beyond_buffer": (b"\x3a" + varint(1 << 40) + b"\x00", "claims 1099511627776 bytes"),
    "unknown_length_beyond_buffer": (key(100, 2) + varint(50) + bytes(10), "needs 50 bytes"),
    "raw_data_longer_than_its_tensor": (
        MODEL_HEADER + field(7, field(5, key(9, 2) + varint(1000) + b"\x00")) + OPSET_IMPORT,
        "needs 1000 bytes",
    ),
    "field_number_zero": (b"\x02\x00", "invalid field number 0"),
    "field_number_too_large": (varint(1 << 32), "invalid field number"),
    "wire_type_seven": (key(100, 7), "invalid wire type 7"),
    "fixed64_cut_short": (key(100, 1) + b"\x00\x00", "needs 8 bytes"),
    "fixed32_cut_short": (key(100, 5) + b"\x00", "needs 4 bytes"),
    "group_end_without_start": (key(100, 4), "invalid wire type 4"),
    "group_never_closed": (key(100, 3) + key(101, 0) + b"\x01", "truncated varint"),
    "group_closed_by_another_field": (key(100, 3) + key(101, 4), "does not match"),
    "groups_nested_ten_thousand_deep": (
        key(100, 3) * 10_000 + key(100, 4) * 10_000,
        "groups nested deeper than 100",
    ),
    "known_field_with_wrong_wire_type": (
        MODEL_HEADER + key(7, 0) + b"\x01" + OPSET_IMPORT,
        "field 7 has wire type 0, expected 2",
    ),
}


@pytest.mark.parametrize(("data", "says"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_wire_format_is_not_onnx(data: bytes, says: str) -> None:
    with pytest.raises(HostileModel, match=says) as refused:
        inspect_model(data)

    assert refused.value.reason == "not_onnx"


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    """protobuf ignores fields it does not know; so must the check, groups included."""
    unknown = b"".join(
        [
            key(100, 0) + varint(1 << 63),
            key(101, 1) + bytes(8),
            key(102, 5) + bytes(4),
            field(103, b"\xff\xff"),
            key(104, 3) + key(1, 0) + b"\x01" + key(105, 3) + key(105, 4) + key(104, 4),
        ]
    )
    data = unknown + tiny_bytes() + unknown

    assert inspect_model(data) == inspect_model(tiny_bytes())


# ---------------------------------------------------------------------------------------------
# Bounds


@pytest.mark.parametrize(
    ("data", "max_depth"),
    [(nested_graphs(33), 32), (serialized(if_model()), 1)],
    ids=["33_of_32", "if_subgraph_of_1"],
)
def test_graphs_nested_beyond_max_depth_are_too_deep(data: bytes, max_depth: int) -> None:
    with pytest.raises(HostileModel) as refused:
        inspect_model(data, max_depth=max_depth)

    assert refused.value.reason == "model_too_deep"


def test_more_nodes_than_max_nodes_is_too_large() -> None:
    with pytest.raises(HostileModel) as refused:
        inspect_model(tiny_bytes(), max_nodes=4)  # tiny_mlp has 5

    assert refused.value.reason == "model_too_large"


def test_file_over_max_bytes_is_too_large() -> None:
    data = tiny_bytes()

    with pytest.raises(HostileModel) as refused:
        inspect_model(data, max_bytes=len(data) - 1)

    assert refused.value.reason == "model_too_large"
