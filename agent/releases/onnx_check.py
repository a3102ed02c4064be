"""Refuse hostile ONNX files before ONNX Runtime sees them: bytes in, facts or `HostileModel` out.

Why: ONNX Runtime follows external-data references. Given a model as bytes, ONNX Runtime
1.32 resolves a tensor's external ``location`` against the process's working directory and
reads any file beneath it (it refuses only paths that resolve outside it, and, with graph
optimisation on, fails by accident of an optimiser precondition). The agent loads models from
bytes, so no model has a folder of its own, and none may read files: any model with external
data is refused here, wherever the tensor hides: graph initializers, sparse initializers,
constant tensors in node attributes, subgraphs (``If``/``Loop``/``Scan`` bodies), model-local
function bodies (and their default attributes) and training graphs.

The reader walks the protobuf wire format itself, because the device may not import ``onnx``
(field numbers from onnx 1.23's ``onnx/onnx.proto``, noted beside each schema below). It is
bounded by construction: no recursion (pending graphs sit on an explicit stack), every length
is checked against the bytes left before use, ``raw_data`` is skipped by its length, never
copied, and a varint is at most ten bytes. It is stricter than protobuf where that is cheap
and safe: a field this module reads that arrives with the wrong wire type, or any
external-data marker at all, is refused rather than ignored.

Pure: no I/O, no logging; the caller reports the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from wire.reasons import AgentError, Reason

# The largest model the device takes (`EDGEML_MAX_MODEL_BYTES` changes it).
MAX_MODEL_BYTES: Final = 512 << 20


class HostileModel(AgentError):  # noqa: N818 -- the public name is fixed by the agent's API
    """Bytes the agent will not hand to ONNX Runtime."""


@dataclass(frozen=True)
class ModelFacts:
    """What the check read on the way; totals cover every graph and function body in the file."""

    ir_version: int
    opsets: tuple[tuple[str, int], ...]  # (domain, version) in file order; "" is the ONNX domain
    producer: str
    initializer_bytes: int  # serialized size of all (sparse) initializers, raw_data included
    nodes: int


# Protobuf wire types.
_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_SGROUP: Final = 3
_EGROUP: Final = 4
_I32: Final = 5

_MAX_FIELD_NUMBER: Final = (1 << 29) - 1
_MAX_VARINT_BYTES: Final = 10
# ONNX declares no groups; an unknown one is still legal protobuf, so it is skipped, but only
# this deep (protobuf's own default recursion limit is 100).
_MAX_GROUP_DEPTH: Final = 100
_DATA_LOCATION_EXTERNAL: Final = 1  # TensorProto.DataLocation.EXTERNAL
_LABEL_CHARS: Final = 80  # names quoted in messages are cut here (they come from the attacker)
_WHERE_CHARS: Final = 600  # and so is the description of where a tensor sits

# The fields this module reads, per message, with the wire type each must have. Fields not
# listed are skipped by wire type whatever they hold.
_MODEL: Final[Mapping[int, int]] = {
    1: _VARINT,  # ir_version
    2: _LEN,  # producer_name
    7: _LEN,  # graph
    8: _LEN,  # opset_import
    20: _LEN,  # training_info
    25: _LEN,  # functions
}
_OPSET_ID: Final[Mapping[int, int]] = {1: _LEN, 2: _VARINT}  # domain, version
_TRAINING_INFO: Final[Mapping[int, int]] = {1: _LEN, 2: _LEN}  # initialization, algorithm
_FUNCTION: Final[Mapping[int, int]] = {
    1: _LEN,  # name
    7: _LEN,  # node
    10: _LEN,  # domain
    11: _LEN,  # attribute_proto (default attribute values may hold tensors)
}
_GRAPH: Final[Mapping[int, int]] = {
    1: _LEN,  # node
    5: _LEN,  # initializer
    15: _LEN,  # sparse_initializer
}
_NODE: Final[Mapping[int, int]] = {3: _LEN, 4: _LEN, 5: _LEN}  # name, op_type, attribute
_ATTRIBUTE: Final[Mapping[int, int]] = {
    1: _LEN,  # name
    5: _LEN,  # t
    6: _LEN,  # g
    10: _LEN,  # tensors
    11: _LEN,  # graphs
    22: _LEN,  # sparse_tensor
    23: _LEN,  # sparse_tensors
}
_SPARSE_TENSOR: Final[Mapping[int, int]] = {1: _LEN, 2: _LEN}  # values, indices
_TENSOR: Final[Mapping[int, int]] = {
    8: _LEN,  # name
    13: _LEN,  # external_data
    14: _VARINT,  # data_location
}
_STRING_ENTRY: Final[Mapping[int, int]] = {1: _LEN, 2: _LEN}  # key, value


def _not_onnx(message: str) -> HostileModel:
    return HostileModel(Reason.NOT_ONNX, message)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode one varint at `pos`; return (value as uint64, position after it)."""
    result = 0
    for index in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise _not_onnx(f"truncated varint at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
    raise _not_onnx(f"varint longer than {_MAX_VARINT_BYTES} bytes before byte {pos}")


def _signed(value: int) -> int:
    """int64 fields travel as two's complement uint64 varints."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Decode a field key; return (field number, wire type, position after it)."""
    at = pos
    key, pos = _varint(data, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0 or field > _MAX_FIELD_NUMBER:
        raise _not_onnx(f"invalid field number {field} at byte {at}")
    return field, wire, pos


def _skip_scalar(data: bytes, pos: int, end: int, field: int, wire: int) -> int:
    """Skip one non-group value of `wire` type; return the position after it."""
    if wire == _VARINT:
        return _varint(data, pos, end)[1]
    if wire == _LEN:
        length, pos = _varint(data, pos, end)
        size = length
    elif wire == _I64:
        size = 8
    elif wire == _I32:
        size = 4
    else:
        raise _not_onnx(f"field {field} has invalid wire type {wire} before byte {pos}")
    if size > end - pos:
        raise _not_onnx(f"field {field} needs {size} bytes at byte {pos}, only {end - pos} remain")
    return pos + size


def _skip_group(data: bytes, pos: int, end: int, field: int) -> int:
    """Skip a (deprecated) group after its start tag, iteratively; return the position after it."""
    open_fields = [field]
    while open_fields:
        inner, wire, pos = _tag(data, pos, end)
        if wire == _SGROUP:
            if len(open_fields) >= _MAX_GROUP_DEPTH:
                raise _not_onnx(f"groups nested deeper than {_MAX_GROUP_DEPTH} at byte {pos}")
            open_fields.append(inner)
        elif wire == _EGROUP:
            if open_fields.pop() != inner:
                raise _not_onnx(f"group end for field {inner} does not match its start")
        else:
            pos = _skip_scalar(data, pos, end, inner, wire)
    return pos


def _fields(
    data: bytes, start: int, end: int, schema: Mapping[int, int], what: str
) -> Iterator[tuple[int, int, int]]:
    """Yield the `schema` fields of the message in data[start:end], skipping all others.

    Each item is (field, a, b): for a varint `a` is the value; for a length-delimited field
    data[a:b] is its payload (positions only: nothing is copied).
    """
    pos = start
    while pos < end:
        field, wire, pos = _tag(data, pos, end)
        expected = schema.get(field)
        if expected is None:
            if wire == _SGROUP:
                pos = _skip_group(data, pos, end, field)
            else:
                pos = _skip_scalar(data, pos, end, field, wire)
            continue
        if wire != expected:
            raise _not_onnx(f"{what} field {field} has wire type {wire}, expected {expected}")
        if wire == _VARINT:
            value, pos = _varint(data, pos, end)
            yield field, value, 0
        else:
            length, pos = _varint(data, pos, end)
            if length > end - pos:
                raise _not_onnx(
                    f"{what} field {field} claims {length} bytes at byte {pos}, "
                    f"only {end - pos} remain"
                )
            yield field, pos, pos + length
            pos += length


def _text(data: bytes, start: int, end: int) -> str:
    # protobuf does not validate proto2 strings either; a bad byte must not abort the check.
    return data[start:end].decode("utf-8", errors="replace")


def _label(data: bytes, start: int, end: int) -> str:
    """A quoted, length-capped name for messages: attacker-chosen text, so repr() escapes it."""
    text = _text(data, start, min(end, start + 4 * _LABEL_CHARS))
    if len(text) > _LABEL_CHARS or end - start > 4 * _LABEL_CHARS:
        text = text[:_LABEL_CHARS] + "…"
    return repr(text)


@dataclass(frozen=True, slots=True)
class _External:
    """A tensor that points at data outside the model bytes."""

    tensor: str  # quoted name
    location: str  # quoted location, or a note that there is none


def _external(data: bytes, start: int, end: int) -> _External | None:
    """Whether the TensorProto in data[start:end] refers to external data (any marker counts)."""
    name = "''"
    external = False
    location: str | None = None
    for field, a, b in _fields(data, start, end, _TENSOR, "TensorProto"):
        if field == 8:
            name = _label(data, a, b)
        elif field == 13:
            external = True
            key: tuple[int, int] | None = None
            value = (a, a)
            for entry_field, c, d in _fields(data, a, b, _STRING_ENTRY, "external_data entry"):
                if entry_field == 1:
                    key = (c, d)
                else:
                    value = (c, d)
            if key is not None and data[key[0] : key[1]] == b"location":
                location = _label(data, *value)
        elif a == _DATA_LOCATION_EXTERNAL:  # field 14; a repeat may reset it, refuse anyway
            external = True
    if not external:
        return None
    return _External(name, location if location is not None else "(no location given)")


def _sparse_external(data: bytes, start: int, end: int) -> _External | None:
    for _field, a, b in _fields(data, start, end, _SPARSE_TENSOR, "SparseTensorProto"):
        found = _external(data, a, b)
        if found is not None:
            return found
    return None


@dataclass(frozen=True, slots=True)
class _Body:
    """A graph or function body waiting on the stack, with a description for messages."""

    start: int
    end: int
    depth: int  # 1 for the model's graph, its functions and training graphs
    where: str
    kind: Literal["graph", "function"]


class _Walk:
    """One pass over a model's graphs; holds the running totals and limits."""

    def __init__(self, data: bytes, max_depth: int, max_nodes: int) -> None:
        self.data = data
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.nodes = 0
        self.initializer_bytes = 0
        self.pending: list[_Body] = []

    def push(self, body: _Body) -> None:
        if body.depth > self.max_depth:
            raise HostileModel(
                Reason.MODEL_TOO_DEEP,
                f"graphs nested deeper than {self.max_depth} levels at {body.where}",
            )
        self.pending.append(body)

    def run(self) -> None:
        while self.pending:
            self.body(self.pending.pop())

    def body(self, body: _Body) -> None:
        data = self.data
        if body.kind == "graph":
            schema, node_field, what = _GRAPH, 1, "GraphProto"
        else:
            schema, node_field, what = _FUNCTION, 7, "FunctionProto"
        for field, a, b in _fields(data, body.start, body.end, schema, what):
            if field == node_field:
                self.nodes += 1
                if self.nodes > self.max_nodes:
                    raise HostileModel(
                        Reason.MODEL_TOO_LARGE,
                        f"more than {self.max_nodes} nodes (at {body.where})",
                    )
                self.node(a, b, body)
            elif body.kind == "function":
                if field == 11:  # attribute_proto: default attribute values
                    self.attribute(a, b, f"default attribute of {body.where}", body.depth)
            elif field == 5:
                self.initializer_bytes += b - a
                self.refuse(_external(data, a, b), f"initializer of {body.where}")
            elif field == 15:
                self.initializer_bytes += b - a
                self.refuse(_sparse_external(data, a, b), f"sparse initializer of {body.where}")

    def node(self, start: int, end: int, body: _Body) -> None:
        name, op_type = "''", "''"
        attributes: list[tuple[int, int]] = []
        for field, a, b in _fields(self.data, start, end, _NODE, "NodeProto"):
            if field == 3:
                name = _label(self.data, a, b)
            elif field == 4:
                op_type = _label(self.data, a, b)
            else:
                attributes.append((a, b))
        # Attributes are read after the loop: the node's name may follow them in the bytes.
        where = f"node {name} ({op_type}) in {body.where}"
        for a, b in attributes:
            self.attribute(a, b, where, body.depth)

    def attribute(self, start: int, end: int, owner: str, depth: int) -> None:
        data = self.data
        name = "''"
        parts: list[tuple[int, int, int]] = []
        for field, a, b in _fields(data, start, end, _ATTRIBUTE, "AttributeProto"):
            if field == 1:
                name = _label(data, a, b)
            else:
                parts.append((field, a, b))
        where = f"attribute {name} of {owner}"
        for field, a, b in parts:
            if field in (5, 10):  # t, tensors
                self.refuse(_external(data, a, b), where)
            elif field in (22, 23):  # sparse_tensor, sparse_tensors
                self.refuse(_sparse_external(data, a, b), where)
            else:  # g, graphs
                # The innermost context comes first; cutting the rest keeps deep chains from
                # building descriptions larger than the file.
                nested = f"subgraph in {where}"
                if len(nested) > _WHERE_CHARS:
                    nested = nested[:_WHERE_CHARS] + "…"
                self.push(_Body(a, b, depth + 1, nested, "graph"))

    @staticmethod
    def refuse(found: _External | None, where: str) -> None:
        if found is not None:
            raise HostileModel(
                Reason.EXTERNAL_DATA,
                f"tensor {found.tensor} in {where} refers to external data at location "
                f"{found.location}; the agent loads models from bytes only",
            )


def _function_where(data: bytes, start: int, end: int, index: int) -> str:
    """Describe a model-local function by domain and name (either may follow its nodes)."""
    name, domain = "''", "''"
    for field, a, b in _fields(data, start, end, _FUNCTION, "FunctionProto"):
        if field == 1:
            name = _label(data, a, b)
        elif field == 10:
            domain = _label(data, a, b)
    return f"function #{index} {domain} {name}"


def _opset(data: bytes, start: int, end: int) -> tuple[str, int]:
    domain, version = "", 0
    for field, a, b in _fields(data, start, end, _OPSET_ID, "OperatorSetIdProto"):
        if field == 1:
            domain = _text(data, a, b)
        else:
            version = _signed(a)
    return domain, version


def _required(ir_version: int | None, graphs: int, opsets: list[tuple[str, int]]) -> int:
    """The ModelProto fields without which ONNX Runtime has nothing to run; the IR version."""
    if ir_version is None:
        raise _not_onnx("no ir_version (ModelProto field 1): not an ONNX model")
    if graphs == 0:
        raise _not_onnx("no graph (ModelProto field 7): not an ONNX model")
    if not opsets:
        raise _not_onnx("no opset_import (ModelProto field 8): not a runnable ONNX model")
    if ir_version < 1:
        raise _not_onnx(f"ir_version {ir_version} is not a valid ONNX IR version")
    return ir_version


def inspect_model(
    data: bytes,
    *,
    max_bytes: int = MAX_MODEL_BYTES,
    max_depth: int = 32,
    max_nodes: int = 1_000_000,
) -> ModelFacts:
    """Check that `data` is an ONNX ModelProto that is safe to hand to ONNX Runtime.

    Raises `HostileModel` with reason ``not_onnx`` (not a parseable ModelProto with an
    ir_version, a graph and an opset import), ``external_data`` (any tensor anywhere refers to
    data outside these bytes), ``model_too_deep`` (subgraphs nested beyond `max_depth`) or
    ``model_too_large`` (more than `max_bytes` bytes or `max_nodes` nodes).
    """
    if len(data) > max_bytes:
        raise HostileModel(
            Reason.MODEL_TOO_LARGE, f"{len(data)} bytes exceeds the cap of {max_bytes}"
        )
    if not data:
        raise _not_onnx("empty file")
    ir_version: int | None = None
    producer = ""
    opsets: list[tuple[str, int]] = []
    walk = _Walk(data, max_depth, max_nodes)
    graphs = 0
    functions = 0
    for field, a, b in _fields(data, 0, len(data), _MODEL, "ModelProto"):
        if field == 1:
            ir_version = _signed(a)  # a repeated scalar: the last one wins, as in protobuf
        elif field == 2:
            producer = _text(data, a, b)
        elif field == 7:
            # A repeated message field is merged by protobuf: every copy is walked.
            graphs += 1
            walk.push(_Body(a, b, 1, "the model graph", "graph"))
        elif field == 8:
            opsets.append(_opset(data, a, b))
        elif field == 20:
            for part, c, d in _fields(data, a, b, _TRAINING_INFO, "TrainingInfoProto"):
                role = "initialization" if part == 1 else "algorithm"
                walk.push(_Body(c, d, 1, f"the training {role} graph", "graph"))
        else:  # 25: functions
            functions += 1
            walk.push(_Body(a, b, 1, _function_where(data, a, b, functions), "function"))
    ir_version = _required(ir_version, graphs, opsets)
    walk.run()
    return ModelFacts(
        ir_version=ir_version,
        opsets=tuple(opsets),
        producer=producer,
        initializer_bytes=walk.initializer_bytes,
        nodes=walk.nodes,
    )
