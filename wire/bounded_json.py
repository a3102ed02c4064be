"""JSON from outside, bounded: size and nesting depth are checked before anything is parsed.

Every boundary that parses bytes it did not write goes through here, with limits of its own
(`JsonLimits`). A document over a limit, or not JSON at all, raises one error type,
`BoundedJsonError`, whose `problem` says which (`too_large`, `too_deep`, `not_json`) and whose
message names the size, the depth or the position, so each component can turn it into its own
reason. The limits are ours, not a parser's recursion limit: a document 1,000 levels deep
never reaches a recursive parser (the stdlib's raises `RecursionError`, which nobody catches).

Pure: the stdlib and orjson only.
"""

from __future__ import annotations

import enum
import itertools
import json
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

# orjson itself refuses documents deeper than this: no limit of ours may be above it.
PARSER_MAX_DEPTH = 1024

# A string literal, escapes included; an unterminated one runs to the end (`\Z`), so the scan
# stays linear on hostile input instead of retrying from every later quote.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.DOTALL)
# After strings are gone, only brackets matter: openers become 2, closers 0, the rest deleted,
# so the running sum of (byte - 1) is the nesting depth at each bracket.
_BRACKETS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


class Problem(enum.StrEnum):
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    NOT_JSON = "not_json"


@dataclass(frozen=True, slots=True)
class JsonLimits:
    """What one boundary accepts: at most `max_bytes` of UTF-8, nested at most `max_depth`
    (a scalar is depth 0, `[]` and `{}` depth 1)."""

    max_bytes: int
    max_depth: int

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {self.max_bytes}")
        if not 1 <= self.max_depth <= PARSER_MAX_DEPTH:
            raise ValueError(f"max_depth must be in 1..{PARSER_MAX_DEPTH}, not {self.max_depth}")


class BoundedJsonError(ValueError):
    """A document refused at a boundary; `problem` says why, the message says by how much."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message


def nesting_depth(data: bytes, stop_above: int | None = None) -> int:
    """The deepest bracket nesting outside string literals, without parsing.

    Cheap: a document with at most `stop_above` opening brackets cannot nest deeper, and is
    not scanned (the count, capped at `stop_above`, is returned). Unbalanced brackets (not
    JSON) still give a number; the parser refuses them.
    """
    if stop_above is not None and data.count(b"[") + data.count(b"{") <= stop_above:
        return min(data.count(b"[") + data.count(b"{"), stop_above)
    if b'"' in data:
        data = _STRING.sub(b"", data)
    steps = data.translate(_BRACKETS, _NOT_BRACKETS)
    depths: Iterable[int] = itertools.accumulate(map(operator.sub, steps, itertools.repeat(1)))
    return max(itertools.chain((0,), depths))


def check_bounds(data: bytes | str, limits: JsonLimits) -> bytes:
    """`data` as bytes if within `limits` (size, then depth); else `BoundedJsonError`.

    For boundaries that validate with pydantic's own JSON parser (`model_validate_json`):
    the bounds are ours, the parse and its errors theirs.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > limits.max_bytes:
        raise BoundedJsonError(
            Problem.TOO_LARGE, f"{len(raw)} bytes, over the limit of {limits.max_bytes}"
        )
    depth = nesting_depth(raw, stop_above=limits.max_depth)
    if depth > limits.max_depth:
        raise BoundedJsonError(
            Problem.TOO_DEEP, f"nested {depth} levels deep, over the limit of {limits.max_depth}"
        )
    return raw


def loads(data: bytes | str, limits: JsonLimits) -> Any:
    """The JSON value of `data`, within `limits`; else `BoundedJsonError`.

    Strict JSON: UTF-8 only, no NaN or Infinity, integers past 64 bits kept exact.
    """
    raw = check_bounds(data, limits)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if "64-bit range" not in str(error):
            raise BoundedJsonError(Problem.NOT_JSON, _where(error)) from None
    # Valid JSON orjson cannot hold exactly: the stdlib parser can, and its recursion is
    # safe now that the depth is bounded.
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise BoundedJsonError(Problem.NOT_JSON, _where(error)) from None


def check_value(value: object, limits: JsonLimits) -> None:
    """A structure someone else parsed (an SDK's twin or method payload), held to `limits`:
    depth without recursion, then size as compact JSON; else `BoundedJsonError`."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            depth += 1
            if depth > limits.max_depth:
                raise BoundedJsonError(
                    Problem.TOO_DEEP,
                    f"nested deeper than the limit of {limits.max_depth} levels",
                )
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth) for child in children)
    try:
        size = len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode())
    except (TypeError, ValueError) as error:
        raise BoundedJsonError(Problem.NOT_JSON, f"not a JSON value: {error}") from None
    if size > limits.max_bytes:
        raise BoundedJsonError(
            Problem.TOO_LARGE, f"{size} bytes as JSON, over the limit of {limits.max_bytes}"
        )


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _where(error: Exception) -> str:
    position = getattr(error, "pos", None)
    text = str(error.args[0] if error.args else error)
    text = text if len(text) <= 120 else text[:120] + "..."
    at = f" at byte {position}" if isinstance(position, int) else ""
    return f"not JSON{at}: {text}"
