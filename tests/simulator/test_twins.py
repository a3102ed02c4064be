"""Twin documents: merge patches, versions, etags and IoT Hub's limits."""

from __future__ import annotations

from typing import Any

import pytest

from simulator.twins import Twin, TwinError, desired_delta, etag_matches, merge_patch


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({}, {"a": 1}, {"a": 1}),
        ({"a": 1}, {"a": None}, {}),
        ({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}, {"a": {"c": 2, "d": 3}}),
        ({"a": {"b": 1}}, {"a": 5}, {"a": 5}),
        ({"a": 5}, {"a": {"b": None, "c": 1}}, {"a": {"c": 1}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ({"a": 1}, {"missing": None}, {"a": 1}),
    ],
)
def test_merge_patch(
    target: dict[str, Any], patch: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert merge_patch(target, patch) == expected


def test_merge_patch_leaves_its_inputs_alone() -> None:
    target = {"a": {"b": 1}}
    patch = {"a": {"c": [1]}}
    merged = merge_patch(target, patch)
    merged["a"]["c"].append(2)
    assert target == {"a": {"b": 1}}
    assert patch == {"a": {"c": [1]}}


def test_each_change_moves_its_version_and_the_etag() -> None:
    twin = Twin("d", "m", desired={"rate": 1})
    reported = twin.patch_reported({"state": "ok"})
    desired = reported.patch_desired({"rate": 2})
    tagged = desired.patch_tags({"ring": "a"})
    assert (reported.reported_version, reported.desired_version) == (2, 1)
    assert (desired.reported_version, desired.desired_version) == (2, 2)
    assert len({twin.etag, reported.etag, desired.etag, tagged.etag}) == 4
    assert tagged.device_document() == {
        "desired": {"rate": 2, "$version": 2},
        "reported": {"state": "ok", "$version": 2},
    }


@pytest.mark.parametrize(
    ("patch", "status"),
    [
        ({"$version": 3}, 400),
        ({"a.b": 1}, 400),
        ({"a b": 1}, 400),
        ({"": 1}, 400),
        ({"big": "x" * 33_000}, 413),
        (
            {
                "l1": {
                    "l2": {
                        "l3": {"l4": {"l5": {"l6": {"l7": {"l8": {"l9": {"l10": {"l11": 1}}}}}}}}
                    }
                }
            },
            400,
        ),
    ],
)
def test_patches_iot_hub_refuses_are_refused(patch: dict[str, Any], status: int) -> None:
    with pytest.raises(TwinError) as refused:
        Twin("d", "m").patch_desired(patch)
    assert refused.value.status == status


def test_a_patch_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(TwinError):
        Twin("d", "m").patch_reported([1, 2])  # type: ignore[arg-type]  # what a bad client sends


@pytest.mark.parametrize(
    ("before", "after", "delta"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"b": 2}, {"a": None}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1}}, {"a": {"y": None}}),
        ({}, {"a": {"x": 1}}, {"a": {"x": 1}}),
    ],
)
def test_desired_delta_is_the_patch_between_documents(
    before: dict[str, Any], after: dict[str, Any], delta: dict[str, Any]
) -> None:
    assert desired_delta(before, after) == delta
    assert merge_patch(before, delta) == after


@pytest.mark.parametrize(
    ("if_match", "expected"),
    [
        (None, True),
        ("*", True),
        ('"*"', True),
        ("current", True),
        ('"current"', True),
        ("old", False),
    ],
)
def test_if_match(if_match: str | None, expected: bool) -> None:
    twin = Twin("d", "m")
    header = if_match.replace("current", twin.etag) if if_match else if_match
    assert etag_matches(header, twin) is expected
