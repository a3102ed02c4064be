"""The agent stand-ins apply desired patches as JSON merge patches, like the agent."""

from __future__ import annotations

from typing import Any

import pytest

from simulator.standins import merge_patch


@pytest.mark.parametrize(
    ("target", "patch", "merged"),
    [
        ({}, {"models": {"m": {"version": 1}}}, {"models": {"m": {"version": 1}}}),
        (
            {"models": {"m": {"version": 1, "sha256": "a"}}},
            {"models": {"m": {"version": 2}}},
            {"models": {"m": {"version": 2, "sha256": "a"}}},
        ),
        (
            {"models": {"m": {"v": 1}, "n": {"v": 1}}},
            {"models": {"n": None}},
            {"models": {"m": {"v": 1}}},
        ),
        ({"a": {"b": 1}}, {"a": [1, 2]}, {"a": [1, 2]}),
        ({"a": 1}, {"$version": 4}, {"a": 1, "$version": 4}),
    ],
)
def test_merge_patch(target: dict[str, Any], patch: dict[str, Any], merged: dict[str, Any]) -> None:
    assert merge_patch(target, patch) == merged
