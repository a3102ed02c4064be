"""Open Inference Protocol v2 (KServe / Triton) REST codec: bytes in, typed values out, and back.

Pure: no I/O, no clock, no logging. Every decode failure is a `RequestError` whose reason is a
bounded metric label and whose message names the offending tensor or field, so the HTTP layer
can answer 4xx without knowing the protocol.

Supported: JSON tensors (``data`` flat or nested) and the binary tensor data extension (the
``Inference-Header-Content-Length`` header; ``parameters.binary_data_size`` on inputs;
``parameters.binary_data_output`` on the request and ``parameters.binary_data`` per output).
BYTES elements travel as UTF-8 strings in JSON and as 4-byte little-endian length-prefixed
elements in binary; decoded they are numpy object arrays of `str`, the form ONNX Runtime takes
for tensor(string) (it turns a `bytes` element into its repr, `"b'a'"`, and answers for that).

Sizes are checked from the declared shape before any tensor is allocated: a client cannot make
the agent allocate more than `max_input_bytes` by declaring a large shape.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

import numpy as np

from agent.serving.contract import NUMPY_TO_V2, V2_TO_NUMPY, RequestError
from wire import bounded_json
from wire.bounded_json import JsonLimits, Problem
from wire.contract import ModelContract, TensorSpec
from wire.reasons import Reason

# The header that splits a body into a JSON part and a raw tensor part (both directions).
HEADER_LENGTH: Final = "Inference-Header-Content-Length"

# Extensions this codec implements, as `/v2` server metadata lists them.
EXTENSIONS: Final = ("binary_tensor_data",)

# numpy keeps at most 64 dimensions; a v2 request has no reason to come near that.
MAX_RANK: Final = 32

# Triton features this server does not implement: refusing them beats silently ignoring them,
# since the client would otherwise read answers computed differently from what it asked for.
_UNSUPPORTED_INPUT_PARAMETERS: Final = frozenset(
    {"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"}
)
_UNSUPPORTED_OUTPUT_PARAMETERS: Final = _UNSUPPORTED_INPUT_PARAMETERS | {"classification"}

# A BYTES element decodes to a Python object: count at least a pointer per element.
_OBJECT_ITEMSIZE: Final = 8
_BYTES_PREFIX: Final = struct.Struct("<I")

# Which JSON-inferred numpy kinds may be cast to each target kind without changing a value's
# meaning: a float sent for an INT64 input is refused, not truncated.
_ACCEPTED_KINDS: Final[Mapping[str, frozenset[str]]] = {
    "b": frozenset("b"),
    "i": frozenset("iu"),
    "u": frozenset("iu"),
    "f": frozenset("iuf"),
}

_LITTLE_ENDIAN: Final = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary_data: bool


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded v2 inference request. `outputs` is empty when the client asked for all of them."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_data_output(self) -> bool:
        """Whether outputs not listed in `outputs` (all of them when it is empty) go binary."""
        return self.parameters.get("binary_data_output") is True

    @property
    def output_names(self) -> list[str] | None:
        """The outputs to compute, or None for all of them (the service's own order)."""
        return [out.name for out in self.outputs] if self.outputs else None


@dataclass(frozen=True, slots=True)
class EncodedResponse:
    """A response body; `header_length` is set when binary tensor data follows the JSON part."""

    body: bytes
    header_length: int | None

    @property
    def content_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


# --- decoding -----------------------------------------------------------------------------------


def parse_header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header as an int, or None when absent."""
    if value is None:
        return None
    stripped = value.strip()
    if not stripped.isdigit():
        raise RequestError(
            Reason.BAD_REQUEST,
            f"{HEADER_LENGTH} must be a non-negative integer, got {value[:32]!r}",
        )
    return int(stripped)


def decode_infer_request(
    body: bytes, header_length: int | None = None, *, max_input_bytes: int
) -> InferRequest:
    """Decode a v2 infer request body; `header_length` is the binary extension's JSON length."""
    if header_length is None:
        header = body
    elif header_length > len(body):
        raise RequestError(
            Reason.BAD_REQUEST,
            f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes",
        )
    else:
        header = body[:header_length]
    document = _load_json(header, max_input_bytes)
    if not isinstance(document, dict):
        raise RequestError(Reason.BAD_JSON, "the request body must be a JSON object")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(Reason.BAD_REQUEST, "'id' must be a string")
    parameters = _parameters(document, "the request")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError(Reason.BAD_REQUEST, "'inputs' must be a non-empty list of tensors")

    # Every declared size is checked before any tensor is built, so that a refused request
    # costs no allocation however its inputs are ordered.
    tensors: dict[str, _Tensor] = {}
    budget = max_input_bytes
    for position, raw in enumerate(raw_inputs):
        tensor = _tensor_header(raw, position)
        if tensor.name in tensors:
            raise RequestError(Reason.BAD_REQUEST, f"input {tensor.name!r} appears twice")
        if tensor.nbytes > budget:
            raise RequestError(
                Reason.TOO_LARGE,
                f"input {tensor.name!r} of shape {list(tensor.shape)} {tensor.datatype} needs "
                f"{tensor.nbytes} bytes; the request limit is {max_input_bytes}",
            )
        budget -= tensor.nbytes
        tensors[tensor.name] = tensor
    binary = _BinaryCursor(body, header_length)
    inputs = {
        tensor.name: _decode_input(raw, tensor, binary)
        for raw, tensor in zip(raw_inputs, tensors.values(), strict=True)
    }
    binary.finish()
    outputs = _requested_outputs(document.get("outputs"), parameters)
    return InferRequest(id=request_id, inputs=inputs, outputs=outputs, parameters=parameters)


@dataclass(frozen=True, slots=True)
class _Tensor:
    """What an input declares about itself, checked, before any of its data is looked at."""

    name: str
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * (_OBJECT_ITEMSIZE if self.datatype == "BYTES" else self.dtype.itemsize)

    def mismatch(self, found: str) -> RequestError:
        return RequestError(
            Reason.SHAPE_DATA_MISMATCH,
            f"input {self.name!r} has shape {list(self.shape)} ({self.count} elements) but {found}",
        )


class _BinaryCursor:
    """Hands out the binary part of a body to inputs in order, and checks all of it was used."""

    __slots__ = ("body", "enabled", "offset")

    def __init__(self, body: bytes, header_length: int | None) -> None:
        self.body = body
        self.enabled = header_length is not None
        self.offset = len(body) if header_length is None else header_length

    def take(self, name: str, size: object) -> tuple[int, int]:
        """Claim `size` bytes for input `name`; return the (start, end) offsets in the body."""
        if not self.enabled:
            raise RequestError(
                Reason.BAD_REQUEST,
                f"input {name!r} has binary_data_size but there is no {HEADER_LENGTH}",
            )
        if not _is_int(size) or size < 0:
            raise RequestError(
                Reason.BAD_REQUEST,
                f"input {name!r} binary_data_size must be a non-negative integer",
            )
        start = self.offset
        end = start + size
        if end > len(self.body):
            raise RequestError(
                Reason.BAD_REQUEST,
                f"input {name!r} binary data ({size} bytes) runs past the end of the body "
                f"({len(self.body) - start} bytes left)",
            )
        self.offset = end
        return start, end

    def finish(self) -> None:
        if self.offset != len(self.body):
            raise RequestError(
                Reason.BAD_REQUEST,
                f"{len(self.body) - self.offset} bytes of binary data follow the inputs "
                "that no input claims",
            )


def _decode_input(raw: Mapping[str, Any], tensor: _Tensor, binary: _BinaryCursor) -> np.ndarray:
    where = f"input {tensor.name!r}"
    input_parameters = _parameters(raw, where)
    _refuse_unsupported(input_parameters, _UNSUPPORTED_INPUT_PARAMETERS, where)
    size = input_parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise RequestError(Reason.BAD_REQUEST, f"{where} has neither data nor binary_data_size")
        return _json_tensor(raw["data"], tensor)
    if "data" in raw:
        raise RequestError(Reason.BAD_REQUEST, f"{where} has both data and binary_data_size")
    start, end = binary.take(tensor.name, size)
    if tensor.datatype == "BYTES":
        return _binary_bytes_tensor(binary.body, start, end, tensor)
    return _binary_tensor(binary.body, start, end, tensor)


def _load_json(data: bytes, max_input_bytes: int) -> Any:
    # orjson underneath (`wire.bounded_json`): the stdlib parser takes ~700 µs for the 1,024
    # floats of a mid-size model's request, most of the agent's time per request; orjson ~10x
    # less. Size and depth are bounded first: a tensor of MAX_RANK dimensions inside the
    # request's envelope, and text no longer than its elements could ever need (a one-byte
    # element is at most a few characters).
    limits = JsonLimits(max_bytes=16 * max_input_bytes + 65536, max_depth=MAX_RANK + 8)
    try:
        return bounded_json.loads(data, limits)
    except bounded_json.BoundedJsonError as exc:
        reason = Reason.TOO_LARGE if exc.problem is Problem.TOO_LARGE else Reason.BAD_JSON
        raise RequestError(reason, f"the request is not valid JSON: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, and `true` is not a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _parameters(document: Mapping[str, Any], where: str) -> dict[str, Any]:
    parameters = document.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(Reason.BAD_REQUEST, f"'parameters' of {where} must be a JSON object")
    return parameters


def _refuse_unsupported(
    parameters: Mapping[str, Any], unsupported: Iterable[str], where: str
) -> None:
    for key in unsupported:
        if key in parameters:
            raise RequestError(Reason.BAD_REQUEST, f"{where}: parameter {key!r} is not supported")


def _tensor_header(raw: object, position: int) -> _Tensor:
    if not isinstance(raw, dict):
        raise RequestError(Reason.BAD_REQUEST, f"inputs[{position}] must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(
            Reason.BAD_REQUEST, f"inputs[{position}] needs a non-empty string 'name'"
        )
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise RequestError(Reason.BAD_DATATYPE, f"input {name!r} needs a string 'datatype'")
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise RequestError(
            Reason.BAD_DATATYPE,
            f"input {name!r} has unknown datatype {datatype[:32]!r}; "
            f"expected one of {', '.join(V2_TO_NUMPY)}",
        )
    shape = raw.get("shape")
    if not isinstance(shape, list):
        raise RequestError(Reason.BAD_REQUEST, f"input {name!r} needs a list 'shape'")
    if len(shape) > MAX_RANK:
        raise RequestError(
            Reason.BAD_REQUEST, f"input {name!r} has {len(shape)} dimensions; at most {MAX_RANK}"
        )
    if not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise RequestError(
            Reason.BAD_REQUEST, f"input {name!r} shape {shape} must hold non-negative integers"
        )
    return _Tensor(name, datatype, dtype, tuple(shape), math.prod(shape))


def _json_tensor(data: object, tensor: _Tensor) -> np.ndarray:
    name, dtype = tensor.name, tensor.dtype
    if not isinstance(data, list):
        raise RequestError(Reason.BAD_REQUEST, f"input {name!r} data must be a list")
    if tensor.datatype == "BYTES":
        return _json_bytes_tensor(data, tensor)
    try:
        # Let numpy infer the kind first so that a value is never silently changed by the cast
        # (1.7 into INT64, "1.5" into FP32, true into FP32); the cast is one vectorised copy.
        inferred = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise tensor.mismatch("its data is ragged (nested lists of unequal length)") from None
    if inferred.size != tensor.count:
        raise tensor.mismatch(f"{inferred.size} data elements")
    if tensor.count and dtype.kind in "iu" and inferred.dtype.kind in "fO":
        # numpy infers float64 (or object) for integers beyond int64, such as UINT64's top half.
        return _exact_integers(data, tensor)
    if tensor.count and inferred.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        want = "booleans" if dtype.kind == "b" else "numbers"
        if dtype.kind in "iu" and inferred.dtype.kind == "f":
            want = "integers"
        raise RequestError(
            Reason.BAD_REQUEST, f"input {name!r} data must be {want} for {tensor.datatype}"
        )
    if tensor.count and dtype.kind in "iu" and inferred.dtype != dtype:
        info = np.iinfo(dtype)
        low, high = int(inferred.min()), int(inferred.max())
        if low < info.min or high > info.max:
            raise RequestError(
                Reason.BAD_REQUEST,
                f"input {name!r} data [{low}, {high}] is out of range for {tensor.datatype}",
            )
    return inferred.astype(dtype, copy=False).reshape(tensor.shape)


def _exact_integers(data: list[Any], tensor: _Tensor) -> np.ndarray:
    """The slow path for integer data numpy could not type as integers: per element."""
    flat = np.array(data, dtype=object).ravel().tolist()
    if not all(_is_int(value) for value in flat):
        raise RequestError(
            Reason.BAD_REQUEST, f"input {tensor.name!r} data must be integers for {tensor.datatype}"
        )
    try:
        return np.array(flat, dtype=tensor.dtype).reshape(tensor.shape)
    except OverflowError:
        raise RequestError(
            Reason.BAD_REQUEST, f"input {tensor.name!r} data is out of range for {tensor.datatype}"
        ) from None


def _json_bytes_tensor(data: list[Any], tensor: _Tensor) -> np.ndarray:
    flat: list[Any] = data
    if data and isinstance(data[0], list):
        try:
            flat = np.array(data, dtype=object).ravel().tolist()
        except ValueError:
            raise tensor.mismatch("its data is ragged (nested lists of unequal length)") from None
    if len(flat) != tensor.count:
        raise tensor.mismatch(f"{len(flat)} data elements")
    out = np.empty(tensor.count, dtype=object)
    for index, element in enumerate(flat):
        if not isinstance(element, str):
            raise RequestError(
                Reason.BAD_REQUEST, f"input {tensor.name!r} data must be strings for BYTES"
            )
        out[index] = element
    return out.reshape(tensor.shape)


def _binary_tensor(body: bytes, start: int, end: int, tensor: _Tensor) -> np.ndarray:
    expected = tensor.count * tensor.dtype.itemsize
    if end - start != expected:
        raise tensor.mismatch(
            f"binary_data_size {end - start} (expected {expected} bytes of {tensor.datatype})"
        )
    little = tensor.dtype.newbyteorder("<")
    array = np.frombuffer(body, dtype=little, count=tensor.count, offset=start)
    if not _LITTLE_ENDIAN:
        array = array.astype(tensor.dtype)
    elif not array.flags.aligned:
        # The JSON header has any length, so the tensor usually starts at an odd offset; ONNX
        # Runtime wants aligned buffers, and one memcpy is cheap next to inference.
        array = array.copy()
    return array.reshape(tensor.shape)


def _binary_bytes_tensor(body: bytes, start: int, end: int, tensor: _Tensor) -> np.ndarray:
    out = np.empty(tensor.count, dtype=object)
    position = start
    for index in range(tensor.count):
        if position + 4 > end:
            raise tensor.mismatch(f"its binary data ends after {index} elements")
        (length,) = _BYTES_PREFIX.unpack_from(body, position)
        position += 4
        if position + length > end:
            raise tensor.mismatch(f"element {index} claims {length} bytes past its binary data")
        try:
            out[index] = body[position : position + length].decode()
        except UnicodeDecodeError:
            # ONNX strings are UTF-8: other bytes could only reach the model mangled.
            raise RequestError(
                Reason.BAD_REQUEST,
                f"input {tensor.name!r} element {index} is not UTF-8, which ONNX strings must be",
            ) from None
        position += length
    if position != end:
        raise tensor.mismatch(f"{end - position} bytes of binary data are left after them")
    return out.reshape(tensor.shape)


def _requested_outputs(
    raw_outputs: object, parameters: Mapping[str, Any]
) -> tuple[RequestedOutput, ...]:
    if raw_outputs is None:
        return ()
    if not isinstance(raw_outputs, list):
        raise RequestError(Reason.BAD_REQUEST, "'outputs' must be a list")
    default_binary = parameters.get("binary_data_output") is True
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for position, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict):
            raise RequestError(Reason.BAD_REQUEST, f"outputs[{position}] must be a JSON object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(
                Reason.BAD_REQUEST, f"outputs[{position}] needs a non-empty string 'name'"
            )
        if name in seen:
            raise RequestError(Reason.BAD_REQUEST, f"output {name!r} is requested twice")
        seen.add(name)
        output_parameters = _parameters(raw, f"output {name!r}")
        _refuse_unsupported(output_parameters, _UNSUPPORTED_OUTPUT_PARAMETERS, f"output {name!r}")
        binary = output_parameters.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise RequestError(
                Reason.BAD_REQUEST, f"output {name!r} binary_data must be true or false"
            )
        outputs.append(RequestedOutput(name, binary))
    return tuple(outputs)


# --- encoding -----------------------------------------------------------------------------------


def _dumps(document: object) -> bytes:
    # allow_nan=False: `NaN`/`Infinity` are not JSON; a body with them must never go out.
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def encode_error(message: str) -> bytes:
    """The v2 error body."""
    return _dumps({"error": message})


def encode_infer_response(
    *,
    model_name: str,
    model_version: int | None,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
) -> EncodedResponse:
    """Encode `outputs` as the request asked: listed outputs in its order, else all of them."""
    if request.outputs:
        selected = [(out.name, out.binary_data) for out in request.outputs]
    else:
        binary = request.binary_data_output
        selected = [(name, binary) for name in outputs]
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in selected:
        array = outputs.get(name)
        if array is None:
            raise RequestError(Reason.UNKNOWN_OUTPUT, f"the model has no output {name!r}")
        datatype = _v2_datatype(array, name)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunk = _binary_output(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _json_output(array, datatype, name)
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = str(model_version)  # v2 versions are strings
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = tensors
    header = _dumps(document)
    if not chunks:
        return EncodedResponse(header, None)
    return EncodedResponse(b"".join([header, *chunks]), len(header))


def _v2_datatype(array: np.ndarray, name: str) -> str:
    datatype = NUMPY_TO_V2.get(array.dtype)
    if datatype is not None:
        return datatype
    if array.dtype.kind in "SU":
        return "BYTES"
    # A model returning a type v2 cannot carry is a server fault, not the client's.
    raise ValueError(f"output {name!r} has dtype {array.dtype}, which v2 cannot carry")


def _element_bytes(element: object) -> bytes:
    if isinstance(element, bytes):
        return element
    return str(element).encode()


def _binary_output(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for element in array.ravel().tolist():
            data = _element_bytes(element)
            parts.append(_BYTES_PREFIX.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()


def _json_output(array: np.ndarray, datatype: str, name: str) -> list[Any]:
    # NaN and Inf never get here: the inference service refuses them (non_finite_output), and
    # the encoder's allow_nan=False would stop one that did.
    flat: list[Any] = array.ravel().tolist()
    if datatype != "BYTES":
        return flat
    try:
        return [e.decode() if isinstance(e, bytes) else str(e) for e in flat]
    except UnicodeDecodeError:
        raise RequestError(
            Reason.BAD_REQUEST,
            f"output {name!r} holds bytes that are not UTF-8; request it with binary_data",
        ) from None


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": spec.v2_shape}


def encode_model_metadata(
    *,
    name: str,
    versions: Sequence[str],
    platform: str,
    contract: ModelContract,
    parameters: Mapping[str, str | int | float | bool],
) -> bytes:
    """`GET /v2/models/{name}`: symbolic dimensions are -1."""
    return _dumps(
        {
            "name": name,
            "versions": list(versions),
            "platform": platform,
            "inputs": [_tensor_metadata(spec) for spec in contract.inputs],
            "outputs": [_tensor_metadata(spec) for spec in contract.outputs],
            "parameters": dict(parameters),
        }
    )


def encode_model_ready(name: str) -> bytes:
    """`GET /v2/models/{name}/ready` when it is (a not-ready model answers 503 with an error)."""
    return _dumps({"name": name, "ready": True})


def encode_server_metadata(
    *, name: str, version: str, extensions: Sequence[str] = EXTENSIONS
) -> bytes:
    """`GET /v2`."""
    return _dumps({"name": name, "version": version, "extensions": list(extensions)})
