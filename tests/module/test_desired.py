"""Desired twin reconciliation (pure): versions, merge patches, validation."""

from __future__ import annotations

from typing import Any

import pytest

from module.desired import Apply, Ignore, Reconciler, Reject, check_shape, merge_patch

MANIFEST = {"name": "m", "version": 1}
OTHER = {"name": "m", "version": 2}


def _nested(depth: int) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for _ in range(depth):
        document = {"k": document}
    return document


def _run(steps: list[tuple[str, dict[str, Any]]]) -> tuple[Reconciler, list[object]]:
    reconciler = Reconciler()
    actions: list[object] = []
    for kind, document in steps:
        reconciler, action = (
            reconciler.full(document) if kind == "full" else reconciler.patch(document)
        )
        actions.append(action)
    return reconciler, actions


def test_the_first_full_document_is_applied() -> None:
    _, [action] = _run([("full", {"$version": 3, "model": MANIFEST})])
    assert isinstance(action, Apply)
    assert action.model_changed
    assert action.state.model == MANIFEST
    assert action.state.telemetry.interval_s == 60


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (("patch", {"$version": 3, "model": OTHER}), Ignore),  # duplicate
        (("patch", {"$version": 2, "model": OTHER}), Ignore),  # older
        (("full", {"$version": 3, "model": MANIFEST}), Ignore),  # the SDK's replay
        (("patch", {"$version": 4, "model": OTHER}), Apply),
    ],
)
def test_only_newer_versions_act(second: tuple[str, dict[str, Any]], expected: type) -> None:
    _, actions = _run([("full", {"$version": 3, "model": MANIFEST}), second])
    assert isinstance(actions[1], expected)


def test_a_patch_that_leaves_the_model_alone_does_not_resubmit_it() -> None:
    _, actions = _run(
        [
            ("full", {"$version": 1, "model": MANIFEST}),
            ("patch", {"$version": 2, "telemetry": {"interval_s": 5.0}}),
        ]
    )
    second = actions[1]
    assert isinstance(second, Apply)
    assert not second.model_changed
    assert second.state.model == MANIFEST
    assert second.state.telemetry.interval_s == 5.0


def test_a_null_in_a_patch_removes_the_key() -> None:
    _, actions = _run(
        [
            ("full", {"$version": 1, "model": MANIFEST, "telemetry": {"interval_s": 5.0}}),
            ("patch", {"$version": 2, "telemetry": None}),
        ]
    )
    second = actions[1]
    assert isinstance(second, Apply)
    assert second.state.telemetry.interval_s == 60  # back to the default
    assert not second.model_changed


@pytest.mark.parametrize(
    ("document", "names"),
    [
        ({"models": {"a": MANIFEST, "b": MANIFEST}}, {"a", "b"}),
        ({"models": {}}, set()),
        ({}, set()),  # the agent's section desires nothing
        ({"model": MANIFEST}, {"m"}),
        ({"model": {"version": 1}}, None),  # cannot tell which model: none is removed
        ({"model": {"name": 7}}, None),
    ],
)
def test_the_names_a_document_wants_served(
    document: dict[str, Any], names: set[str] | None
) -> None:
    _, [action] = _run([("full", {"$version": 1, **document})])
    assert isinstance(action, Apply)
    assert action.state.names() == (None if names is None else frozenset(names))


def test_a_null_model_is_rejected_and_the_served_model_kept() -> None:
    """`model: null` is not a way to stop serving."""
    reconciler, actions = _run(
        [("full", {"$version": 1, "model": MANIFEST}), ("patch", {"$version": 2, "model": None})]
    )
    second = actions[1]
    assert isinstance(second, Reject)
    assert "model: null" in second.message
    assert reconciler.applied is not None
    assert reconciler.applied.model == MANIFEST


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"$version": 2, "model": "not an object"}, "model"),
        ({"$version": 2, "telemetry": {"interval_s": "5"}}, "telemetry.interval_s"),
        ({"$version": 2, "telemetry": {"interval_s": 0.1}}, "greater than or equal"),
        ({"$version": 2, "unknown": 1}, "unknown"),
        ({"$version": 2, "model": {"name": "x" * 5000}}, "4096"),
        ({"$version": 2, "drift": _nested(12)}, "deeper than 10"),
        ({"$version": 2, "model": {"blob": "x" * 4000, "more": ["y" * 4000] * 8}}, "bytes"),
    ],
)
def test_invalid_documents_are_rejected_with_the_field_named(
    document: dict[str, Any], fragment: str
) -> None:
    reconciler, actions = _run([("full", {"$version": 1, "model": MANIFEST}), ("patch", document)])
    rejection = actions[1]
    assert isinstance(rejection, Reject)
    assert fragment in rejection.message
    assert reconciler.applied is not None
    assert reconciler.applied.model == MANIFEST  # what runs is kept


def test_a_later_patch_can_repair_a_rejected_field() -> None:
    _, actions = _run(
        [
            ("full", {"$version": 1, "model": MANIFEST}),
            ("patch", {"$version": 2, "telemetry": {"interval_s": "bad"}}),
            ("patch", {"$version": 3, "telemetry": {"interval_s": 10.0}}),
        ]
    )
    assert isinstance(actions[1], Reject)
    assert isinstance(actions[2], Apply)


def test_a_document_without_version_is_rejected() -> None:
    _, [action] = _run([("patch", {"model": MANIFEST})])
    assert isinstance(action, Reject)


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": None}}, {"a": {"x": 1}}),
        ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
    ],
)
def test_merge_patch_follows_rfc_7386(
    target: dict[str, Any], patch: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert merge_patch(target, patch) == expected


def test_shape_check_has_no_recursion_limit() -> None:
    assert "deeper" in (check_shape(_nested(5000)) or "")
