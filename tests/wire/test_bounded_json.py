"""The bounded JSON loader: limits at their edges, every failure one error type naming why."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wire.bounded_json import (
    PARSER_MAX_DEPTH,
    BoundedJsonError,
    JsonLimits,
    Problem,
    check_bounds,
    check_value,
    loads,
    nesting_depth,
)

LIMITS = JsonLimits(max_bytes=64, max_depth=3)


def _deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("[]", []),
        ("[[[]]]", [[[]]]),  # depth 3: at the limit
        ('{"a":{"b":[1]}}', {"a": {"b": [1]}}),  # depth 3 across objects and lists
        ('["[[[[[[[["]', ["[[[[[[[["]),  # brackets inside a string do not nest
        ('["\\"[[[[["]', ['"[[[[[']),  # nor after an escaped quote
        ('"' + "a" * 62 + '"', "a" * 62),  # 64 bytes: at the limit
        ("[18446744073709551616]", [18446744073709551616]),  # past 64 bits, kept exact
    ],
)
def test_documents_within_the_limits_load(text: str, expected: Any) -> None:
    assert loads(text.encode(), LIMITS) == expected
    assert loads(text, LIMITS) == expected  # str and bytes alike


@pytest.mark.parametrize(
    ("data", "problem", "fragment"),
    [
        (b'"' + b"a" * 63 + b'"', Problem.TOO_LARGE, "65 bytes, over the limit of 64"),
        (_deep(4).encode(), Problem.TOO_DEEP, "nested 4 levels deep, over the limit of 3"),
        (b'{"a":{"b":{"c":[]}}}', Problem.TOO_DEEP, "4 levels"),
        (_deep(30).encode(), Problem.TOO_DEEP, "30 levels"),  # checked before it is parsed
        (b"[1,", Problem.NOT_JSON, "at byte 3"),
        (b"", Problem.NOT_JSON, "at byte 0"),
        (b"\xff", Problem.NOT_JSON, "UTF-8"),
        (b"NaN", Problem.NOT_JSON, "at byte 0"),
        (b"[Infinity]", Problem.NOT_JSON, "at byte 1"),
        (b"[1e999]", Problem.NOT_JSON, "infinity"),
        (b"[1] [2]", Problem.NOT_JSON, "at byte 4"),
        (b'"unterminated', Problem.NOT_JSON, "not JSON"),
        (b"[" + b'"\\' * 20, Problem.NOT_JSON, "not JSON"),  # a string that never ends
    ],
)
def test_each_failure_names_its_problem(data: bytes, problem: Problem, fragment: str) -> None:
    with pytest.raises(BoundedJsonError, match=fragment) as raised:
        loads(data, LIMITS)
    assert raised.value.problem is problem
    assert isinstance(raised.value, ValueError)  # callers' `except ValueError` still holds


def test_the_original_feedback_bomb_is_too_deep_not_a_recursion_error() -> None:
    bomb = (_deep(1000) + " " * 8000).encode()  # ~10 KB, 1,000 levels
    with pytest.raises(BoundedJsonError, match="1000 levels") as raised:
        loads(bomb, JsonLimits(max_bytes=16 * 1024, max_depth=64))
    assert raised.value.problem is Problem.TOO_DEEP


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("", 0),
        ("1", 0),
        ("[]", 1),
        ("[[],[[{}]]]", 4),
        ('{"a":"]]]]"}', 1),
        ('["\\\\",[[]]]', 3),  # an escaped backslash ends before the quote that closes
        ("]]]", 0),  # unbalanced: never negative depth reported; the parser refuses it
    ],
)
def test_nesting_depth_is_counted_outside_strings(text: str, depth: int) -> None:
    assert nesting_depth(text.encode()) == depth


def test_a_document_with_few_brackets_is_not_scanned() -> None:
    # At most `stop_above` openers: it cannot nest deeper, whatever its strings hold.
    assert nesting_depth(b'["[[[[[[[[[["]', stop_above=3) <= 3
    assert nesting_depth(b'["[[[[[[[[[["]', stop_above=3) == nesting_depth(b'["[[[[[[[[[["]')


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, {"b": 2}]}, None),  # depth 3
        ({"a": [1, {"b": []}]}, Problem.TOO_DEEP),
        ({"a": "x" * 100}, Problem.TOO_LARGE),
        ({"a": float("nan")}, Problem.NOT_JSON),
        ({"a": object()}, Problem.NOT_JSON),
    ],
)
def test_a_structure_parsed_elsewhere_is_held_to_the_same_limits(
    value: object, problem: Problem | None
) -> None:
    if problem is None:
        check_value(value, LIMITS)
        return
    with pytest.raises(BoundedJsonError) as raised:
        check_value(value, LIMITS)
    assert raised.value.problem is problem


def test_a_structure_far_deeper_than_recursion_allows_is_refused_without_recursing() -> None:
    value: object = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(BoundedJsonError, match="deeper than the limit of 3"):
        check_value(value, LIMITS)


def test_check_bounds_returns_the_bytes_for_another_parser() -> None:
    assert check_bounds('{"a":1}', LIMITS) == b'{"a":1}'
    assert json.loads(check_bounds(b"[[1]]", LIMITS)) == [[1]]


@pytest.mark.parametrize(("max_bytes", "max_depth"), [(0, 3), (10, 0), (10, PARSER_MAX_DEPTH + 1)])
def test_limits_outside_what_can_be_enforced_are_refused(max_bytes: int, max_depth: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        JsonLimits(max_bytes=max_bytes, max_depth=max_depth)
