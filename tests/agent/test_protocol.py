"""The v2 codec with plain values: every decode refusal, and round trips for every datatype."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from agent.serving.contract import V2_TO_NUMPY, RequestError
from agent.serving.protocol import (
    EXTENSIONS,
    InferRequest,
    RequestedOutput,
    decode_infer_request,
    encode_error,
    encode_infer_response,
    encode_model_metadata,
    encode_model_ready,
    encode_server_metadata,
    parse_header_length,
)
from wire.contract import ModelContract, TensorSpec

CAP = 1 << 20


def _doc(*tensors: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(tensors), **extra}).encode()


def _x(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **fields}


def _binary(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), len(head)


def _bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# -- decode refusals -----------------------------------------------------------------------------

BIN_X = {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}
EIGHT = np.array([1, 2], "<f4").tobytes()

JSON_REFUSALS = [
    # id, body, reason, words in the message
    ("not_json", b"{nope", "bad_json", "not valid JSON"),
    ("not_utf8", b'{"inputs": "\xff"}', "bad_json", "not valid JSON"),
    ("too_deep", b"[" * 100_000, "bad_json", "not valid JSON"),
    ("not_an_object", b"[1, 2]", "bad_json", "JSON object"),
    ("no_inputs", b"{}", "bad_request", "'inputs'"),
    ("empty_inputs", _doc(), "bad_request", "'inputs'"),
    ("input_not_object", b'{"inputs": [3]}', "bad_request", "inputs[0] must be a JSON object"),
    ("id_not_string", _doc(_x(), id=5), "bad_request", "'id' must be a string"),
    ("parameters_not_object", _doc(_x(), parameters=[1]), "bad_request", "'parameters'"),
    ("no_name", _doc(_x(name="")), "bad_request", "inputs[0] needs a non-empty string 'name'"),
    ("unknown_datatype", _doc(_x(datatype="FLOAT32")), "bad_datatype", "'FLOAT32'"),
    ("lowercase_datatype", _doc(_x(datatype="fp32")), "bad_datatype", "'fp32'"),
    ("datatype_not_string", _doc(_x(datatype=32)), "bad_datatype", "string 'datatype'"),
    ("shape_not_list", _doc(_x(shape=2)), "bad_request", "list 'shape'"),
    ("negative_dim", _doc(_x(shape=[-1])), "bad_request", "non-negative integers"),
    ("float_dim", _doc(_x(shape=[2.0])), "bad_request", "non-negative integers"),
    ("bool_dim", _doc(_x(shape=[True])), "bad_request", "non-negative integers"),
    ("rank_too_high", _doc(_x(shape=[1] * 33, data=[1.0])), "bad_request", "33 dimensions"),
    ("duplicate_input", _doc(_x(), _x()), "bad_request", "'x' appears twice"),
    ("too_many_elements", _doc(_x(data=[1.0, 2.0, 3.0])), "shape_data_mismatch",
     "shape [2] (2 elements) but 3 data elements"),
    ("too_few_elements", _doc(_x(shape=[2, 2])), "shape_data_mismatch", "but 2 data elements"),
    ("ragged", _doc(_x(shape=[2, 2], data=[[1.0, 2.0], [3.0]])), "shape_data_mismatch", "ragged"),
    ("data_not_list", _doc(_x(data=1.0)), "bad_request", "data must be a list"),
    ("no_data", _doc({"name": "x", "datatype": "FP32", "shape": [2]}), "bad_request",
     "neither data nor binary_data_size"),
    ("strings_for_fp32", _doc(_x(data=["1.5", "2"])), "bad_request", "must be numbers for FP32"),
    ("bools_for_fp32", _doc(_x(data=[True, False])), "bad_request", "must be numbers for FP32"),
    ("null_in_data", _doc(_x(data=[1.0, None])), "bad_request", "must be numbers"),
    ("floats_for_int64", _doc(_x(datatype="INT64", data=[1.5, 2])), "bad_request",
     "must be integers for INT64"),
    ("numbers_for_bool", _doc(_x(datatype="BOOL", data=[1, 0])), "bad_request",
     "must be booleans for BOOL"),
    ("out_of_range_uint8", _doc(_x(datatype="UINT8", data=[1, 256])), "bad_request",
     "[1, 256] is out of range for UINT8"),
    ("negative_uint32", _doc(_x(datatype="UINT32", data=[-1, 0])), "bad_request",
     "out of range for UINT32"),
    ("uint64_top_and_negative", _doc(_x(datatype="UINT64", data=[-1, 2**64 - 1])),
     "bad_request", "out of range for UINT64"),
    ("uint64_top_and_float", _doc(_x(datatype="UINT64", data=[1.5, 2**64 - 1])), "bad_request",
     "must be integers for UINT64"),
    ("int64_beyond", _doc(_x(datatype="INT64", data=[0, 2**64 - 1])), "bad_request",
     "out of range for INT64"),
    ("numbers_for_bytes", _doc(_x(datatype="BYTES", data=[1, 2])), "bad_request",
     "must be strings for BYTES"),
    ("bytes_count", _doc(_x(datatype="BYTES", data=["a"])), "shape_data_mismatch",
     "but 1 data elements"),
    ("oversize_shape", _doc(_x(shape=[1 << 20, 1 << 20], data=[])), "too_large",
     "needs 4398046511104 bytes"),
    ("oversize_total",
     _doc(_x(shape=[1 << 17], data=[]), _x(name="y", shape=[1 + (1 << 17)], data=[])),
     "too_large", "input 'y'"),
    ("shared_memory", _doc(_x(parameters={"shared_memory_region": "r"})), "bad_request",
     "'shared_memory_region' is not supported"),
    ("outputs_not_list", _doc(_x(), outputs={"name": "y"}), "bad_request", "'outputs' must be"),
    ("output_without_name", _doc(_x(), outputs=[{}]), "bad_request", "outputs[0] needs"),
    ("output_twice", _doc(_x(), outputs=[{"name": "y"}, {"name": "y"}]), "bad_request",
     "requested twice"),
    ("output_binary_not_bool", _doc(_x(), outputs=[{"name": "y", "parameters":
     {"binary_data": "yes"}}]), "bad_request", "binary_data must be true or false"),
    ("classification", _doc(_x(), outputs=[{"name": "y", "parameters": {"classification": 3}}]),
     "bad_request", "'classification' is not supported"),
    ("binary_without_header", _doc(BIN_X), "bad_request",
     "binary_data_size but there is no Inference-Header-Content-Length"),
    ("data_and_binary", _doc({**BIN_X, "data": [1.0, 2.0]}), "bad_request",
     "both data and binary_data_size"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "reason", "words"), [pytest.param(*case[1:], id=case[0]) for case in JSON_REFUSALS]
)
def test_json_decode_refusal(body: bytes, reason: str, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode_infer_request(body, max_input_bytes=CAP)
    assert caught.value.reason == reason
    assert words in caught.value.message


BINARY_REFUSALS = [
    # id, header document, binary part, header length override, reason, words
    ("header_past_body", {"inputs": [BIN_X]}, EIGHT, 10_000, "bad_request",
     "is 10000 but the body has only"),
    ("size_past_body", {"inputs": [BIN_X]}, EIGHT[:4], None, "bad_request",
     "runs past the end of the body (4 bytes left)"),
    ("size_wrong_for_shape", {"inputs": [{**BIN_X, "parameters": {"binary_data_size": 4}}]},
     EIGHT[:4], None, "shape_data_mismatch", "binary_data_size 4 (expected 8 bytes of FP32)"),
    ("size_negative", {"inputs": [{**BIN_X, "parameters": {"binary_data_size": -8}}]}, EIGHT,
     None, "bad_request", "non-negative integer"),
    ("size_not_int", {"inputs": [{**BIN_X, "parameters": {"binary_data_size": "8"}}]}, EIGHT,
     None, "bad_request", "non-negative integer"),
    ("bytes_left_over", {"inputs": [BIN_X]}, EIGHT + b"\0", None, "bad_request",
     "1 bytes of binary data follow the inputs"),
    ("header_cuts_json", {"inputs": [BIN_X]}, EIGHT, 5, "bad_json", "not valid JSON"),
    ("oversize_before_reading", {"inputs": [{**BIN_X, "shape": [1 << 30]}]}, EIGHT, None,
     "too_large", "needs 4294967296 bytes"),
    ("bytes_prefix_past_chunk", {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2],
     "parameters": {"binary_data_size": 9}}]}, _bytes_elements(b"abcde"), None,
     "shape_data_mismatch", "its binary data ends after 1 elements"),
    ("bytes_length_past_chunk", {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
     "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 50) + b"ab", None,
     "shape_data_mismatch", "element 0 claims 50 bytes"),
    ("bytes_trailing", {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
     "parameters": {"binary_data_size": 7}}]}, _bytes_elements(b"ab") + b"z", None,
     "shape_data_mismatch", "1 bytes of binary data are left"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("header", "binary", "length", "reason", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BINARY_REFUSALS],
)
def test_binary_decode_refusal(
    header: dict[str, Any], binary: bytes, length: int | None, reason: str, words: str
) -> None:
    body, header_length = _binary(header, binary)
    with pytest.raises(RequestError) as caught:
        decode_infer_request(body, length or header_length, max_input_bytes=CAP)
    assert caught.value.reason == reason
    assert words in caught.value.message


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("0", 0), (" 12 ", 12), ("123456", 123456)]
)
def test_header_length_parses(value: str | None, expected: int | None) -> None:
    assert parse_header_length(value) == expected


@pytest.mark.parametrize("value", ["", "-1", "1.5", "0x10", "twelve", "1e3"])
def test_header_length_refuses_anything_but_a_count(value: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_header_length(value)
    assert caught.value.reason == "bad_request"


# -- decoding --------------------------------------------------------------------------------------

NUMERIC_SAMPLES: list[tuple[str, list[Any]]] = [
    ("BOOL", [True, False, True, True]),
    ("UINT8", [0, 1, 254, 255]),
    ("UINT16", [0, 1, 2, 65535]),
    ("UINT32", [0, 1, 2, 4294967295]),
    ("UINT64", [0, 1, 2, 18446744073709551615]),
    ("INT8", [-128, -1, 0, 127]),
    ("INT16", [-32768, -1, 0, 32767]),
    ("INT32", [-(2**31), -1, 0, 2**31 - 1]),
    ("INT64", [-(2**63), -1, 0, 2**63 - 1]),
    ("FP16", [0.5, -1.25, 2.0, 65504.0]),
    ("FP32", [0.5, -1.25, 3.0, 1e30]),
    ("FP64", [0.1, -1e300, 3, 2.5]),
]


@pytest.mark.parametrize(("datatype", "values"), NUMERIC_SAMPLES)
def test_json_and_binary_tensors_decode_to_the_same_array(datatype: str, values: list[Any]) -> None:
    dtype = V2_TO_NUMPY[datatype]
    expected = np.asarray(values, dtype=dtype).reshape(2, 2)
    from_json = decode_infer_request(
        _doc({"name": "t", "datatype": datatype, "shape": [2, 2], "data": values}),
        max_input_bytes=CAP,
    ).inputs["t"]
    raw = expected.astype(dtype.newbyteorder("<")).tobytes()
    tensor = {"name": "t", "datatype": datatype, "shape": [2, 2]}
    body, length = _binary(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}, raw
    )
    from_binary = decode_infer_request(body, length, max_input_bytes=CAP).inputs["t"]
    for array in (from_json, from_binary):
        assert array.dtype == dtype
        assert array.shape == (2, 2)
        np.testing.assert_array_equal(array, expected)
    assert from_binary.flags.aligned


def test_nested_json_data_keeps_row_major_order() -> None:
    request = decode_infer_request(
        _doc(_x(shape=[2, 3], data=[[1, 2, 3], [4, 5, 6]])), max_input_bytes=CAP
    )
    np.testing.assert_array_equal(
        request.inputs["x"], np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    )


def test_integers_are_accepted_for_float_tensors() -> None:
    array = decode_infer_request(_doc(_x(data=[1, 2])), max_input_bytes=CAP).inputs["x"]
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, [1.0, 2.0])


def test_empty_tensor_decodes_with_its_shape() -> None:
    array = decode_infer_request(
        _doc(_x(datatype="INT64", shape=[0, 3], data=[])), max_input_bytes=CAP
    ).inputs["x"]
    assert array.shape == (0, 3)
    assert array.dtype == np.int64


def test_bytes_tensors_decode_from_json_and_binary() -> None:
    from_json = decode_infer_request(
        _doc({"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["héllo"], [""]]}),
        max_input_bytes=CAP,
    ).inputs["s"]
    raw = _bytes_elements("héllo".encode(), b"")
    body, length = _binary(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [2, 1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        },
        raw,
    )
    from_binary = decode_infer_request(body, length, max_input_bytes=CAP).inputs["s"]
    for array in (from_json, from_binary):
        assert array.dtype == object
        assert array.shape == (2, 1)
        # str, not bytes: ONNX Runtime reads a bytes element as its repr ("b'h\\xc3...'").
        assert array.ravel().tolist() == ["héllo", ""]
        assert all(type(element) is str for element in array.ravel())


def test_binary_bytes_that_are_not_utf8_are_refused() -> None:
    raw = _bytes_elements(b"ok", b"\xff\xfe")
    body, length = _binary(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        },
        raw,
    )
    with pytest.raises(RequestError) as caught:
        decode_infer_request(body, length, max_input_bytes=CAP)
    assert caught.value.reason == "bad_request"
    assert "'s' element 1 is not UTF-8" in caught.value.message


def test_binary_and_json_inputs_mix_in_one_request() -> None:
    body, length = _binary({"inputs": [BIN_X, _x(name="y")]}, EIGHT)
    request = decode_infer_request(body, length, max_input_bytes=CAP)
    np.testing.assert_array_equal(request.inputs["x"], [1.0, 2.0])
    np.testing.assert_array_equal(request.inputs["y"], [1.0, 2.0])


def test_request_fields_are_read() -> None:
    request = decode_infer_request(
        _doc(
            _x(),
            id="abc",
            parameters={"binary_data_output": True, "priority": 3},
            outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
        ),
        max_input_bytes=CAP,
    )
    assert request.id == "abc"
    assert request.binary_data_output
    assert request.outputs == (RequestedOutput("a", True), RequestedOutput("b", False))
    assert request.output_names == ["a", "b"]
    assert request.parameters["priority"] == 3


def test_no_outputs_means_all_of_them() -> None:
    request = decode_infer_request(_doc(_x()), max_input_bytes=CAP)
    assert request.outputs == ()
    assert request.output_names is None
    assert not request.binary_data_output


def test_the_cap_counts_declared_bytes_exactly() -> None:
    body = _doc(_x(shape=[4], data=[0.0] * 4))
    assert decode_infer_request(body, max_input_bytes=16).inputs["x"].nbytes == 16
    with pytest.raises(RequestError) as caught:
        decode_infer_request(body, max_input_bytes=15)
    assert caught.value.reason == "too_large"


# -- encoding ------------------------------------------------------------------------------------


def _request(
    *outputs: RequestedOutput, binary_default: bool = False, id: str | None = None
) -> InferRequest:
    parameters = {"binary_data_output": True} if binary_default else {}
    return InferRequest(id=id, inputs={}, outputs=outputs, parameters=parameters)


def _split(encoded_body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        return json.loads(encoded_body), b""
    return json.loads(encoded_body[:header_length]), encoded_body[header_length:]


def test_json_response_lists_outputs_and_echoes_the_id() -> None:
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(2, 3), "z": np.array([True, False])}
    encoded = encode_infer_response(
        model_name="m", model_version=3, request=_request(id="r1"), outputs=outputs
    )
    assert encoded.header_length is None
    assert encoded.content_type == "application/json"
    assert json.loads(encoded.body) == {
        "model_name": "m",
        "model_version": "3",
        "id": "r1",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]},
            {"name": "z", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        ],
    }


def test_response_follows_the_requested_outputs_and_their_order() -> None:
    outputs: dict[str, np.ndarray] = {"y": np.zeros(1, np.float32), "z": np.ones(1, np.int64)}
    encoded = encode_infer_response(
        model_name="m",
        model_version=None,
        request=_request(RequestedOutput("z", False)),
        outputs=outputs,
    )
    document = json.loads(encoded.body)
    assert "model_version" not in document
    assert "id" not in document
    assert [o["name"] for o in document["outputs"]] == ["z"]


@pytest.mark.parametrize(("datatype", "values"), NUMERIC_SAMPLES)
def test_binary_response_round_trips_every_numeric_datatype(
    datatype: str, values: list[Any]
) -> None:
    array = np.asarray(values, dtype=V2_TO_NUMPY[datatype]).reshape(2, 2)
    encoded = encode_infer_response(
        model_name="m",
        model_version=1,
        request=_request(RequestedOutput("t", True)),
        outputs={"t": array},
    )
    document, raw = _split(encoded.body, encoded.header_length)
    assert encoded.content_type == "application/octet-stream"
    [tensor] = document["outputs"]
    assert tensor == {
        "name": "t",
        "datatype": datatype,
        "shape": [2, 2],
        "parameters": {"binary_data_size": array.nbytes},
    }
    got = np.frombuffer(raw, dtype=array.dtype.newbyteorder("<")).reshape(2, 2)
    np.testing.assert_array_equal(got, array)


def test_binary_response_places_chunks_in_output_order() -> None:
    outputs: dict[str, np.ndarray] = {"a": np.array([1, 2], np.int32), "b": np.array([3.5])}
    encoded = encode_infer_response(
        model_name="m", model_version=1, request=_request(binary_default=True), outputs=outputs
    )
    document, raw = _split(encoded.body, encoded.header_length)
    sizes = [o["parameters"]["binary_data_size"] for o in document["outputs"]]
    assert sizes == [8, 8]
    assert np.frombuffer(raw[:8], "<i4").tolist() == [1, 2]
    assert np.frombuffer(raw[8:], "<f8").tolist() == [3.5]


def test_bytes_outputs_encode_as_strings_or_length_prefixed() -> None:
    strings = np.array(["héllo", "x"], dtype=object)  # ONNX Runtime returns str elements
    both = _request(RequestedOutput("s", False), RequestedOutput("b", True))
    encoded = encode_infer_response(
        model_name="m", model_version=1, request=both, outputs={"s": strings, "b": strings}
    )
    document, raw = _split(encoded.body, encoded.header_length)
    assert document["outputs"][0]["data"] == ["héllo", "x"]
    assert document["outputs"][0]["datatype"] == "BYTES"
    assert raw == _bytes_elements("héllo".encode(), b"x")


def test_non_utf8_bytes_cannot_go_as_json() -> None:
    with pytest.raises(RequestError) as caught:
        encode_infer_response(
            model_name="m",
            model_version=1,
            request=_request(),
            outputs={"s": np.array([b"\xff"], dtype=object)},
        )
    assert "binary_data" in caught.value.message


def test_a_requested_output_the_model_did_not_return_is_refused() -> None:
    with pytest.raises(RequestError) as caught:
        encode_infer_response(
            model_name="m",
            model_version=1,
            request=_request(RequestedOutput("nope", False)),
            outputs={"y": np.zeros(1, np.float32)},
        )
    assert caught.value.reason == "unknown_output"


def test_decoded_request_encodes_back_to_its_own_tensors() -> None:
    """A request's inputs, sent back as outputs, come out as the same JSON tensors."""
    tensors = [
        {"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [0.5, 1.5, -2.0, 4.0]},
        {"name": "b", "datatype": "INT64", "shape": [3], "data": [1, -2, 3]},
        {"name": "c", "datatype": "BYTES", "shape": [1], "data": ["ok"]},
    ]
    request = decode_infer_request(_doc(*tensors, id="same"), max_input_bytes=CAP)
    encoded = encode_infer_response(
        model_name="echo", model_version=1, request=request, outputs=request.inputs
    )
    document = json.loads(encoded.body)
    assert document["id"] == "same"
    assert document["outputs"] == tensors


# -- metadata and errors -------------------------------------------------------------------------


def test_model_metadata_shows_symbolic_dims_as_minus_one() -> None:
    contract = ModelContract(
        inputs=(TensorSpec(name="input", datatype="FP32", shape=(-1, 32)),),
        outputs=(TensorSpec(name="output", datatype="FP32", shape=(-1, 8)),),
    )
    body = encode_model_metadata(
        name="tiny",
        versions=("4",),
        platform="onnxruntime_onnx",
        contract=contract,
        parameters={"sha256": "ab", "ready": True},
    )
    assert json.loads(body) == {
        "name": "tiny",
        "versions": ["4"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 8]}],
        "parameters": {"sha256": "ab", "ready": True},
    }


def test_server_metadata_and_small_bodies() -> None:
    assert json.loads(encode_server_metadata(name="agent", version="1.2")) == {
        "name": "agent",
        "version": "1.2",
        "extensions": list(EXTENSIONS),
    }
    assert json.loads(encode_model_ready("m")) == {"name": "m", "ready": True}
    assert json.loads(encode_error('bad "x"')) == {"error": 'bad "x"'}
