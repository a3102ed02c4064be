"""Layered deployments as pure values: paths, validation, and the merge order IoT Hub documents."""

from __future__ import annotations

from typing import Any

import pytest

from simulator.configurations import (
    Configuration,
    ConfigurationError,
    layering,
    module_desired,
    parse_configuration,
    parse_target_condition,
    set_at,
)


@pytest.mark.parametrize(
    ("document", "path", "value", "expected"),
    [
        ({"a": 1}, (), {"b": 2}, {"b": 2}),
        ({"a": 1}, ("a",), 3, {"a": 3}),
        ({"a": {"x": 1, "y": 2}}, ("a", "x"), 5, {"a": {"x": 5, "y": 2}}),
        ({"a": 1}, ("a", "x"), 5, {"a": {"x": 5}}),  # a scalar on the way becomes an object
        ({}, ("m", "n", "o"), [1], {"m": {"n": {"o": [1]}}}),
        ({"a": {"x": 1}}, ("a",), {"y": 2}, {"a": {"y": 2}}),  # replaced, not merged
    ],
)
def test_set_at_replaces_the_value_at_its_path(
    document: dict[str, Any], path: tuple[str, ...], value: Any, expected: dict[str, Any]
) -> None:
    before = repr(document)
    assert set_at(document, path, value) == expected
    assert repr(document) == before


def body(
    target: str = "tags.ring = 'canary'",
    priority: object = 1,
    modules: object = None,
    **extra: Any,
) -> dict[str, Any]:
    content = {
        "modulesContent": modules if modules is not None else {"m": {"properties.desired.a": 1}}
    }
    return {"targetCondition": target, "priority": priority, "content": content, **extra}


@pytest.mark.parametrize(
    ("config_id", "document", "reason"),
    [
        ("ok", body(target="tags.ring = = 1"), "targetCondition"),
        ("ok", body(target="tags.ring IN ['a'"), "targetCondition"),
        ("ok", body(modules={"m": {"properties.reported.a": 1}}), "outside properties.desired"),
        ("ok", body(modules={"m": {"desired.a": 1}}), "outside properties.desired"),
        ("ok", body(modules={"m": {"properties.desired..a": 1}}), "invalid path"),
        ("ok", body(modules={"m": {"properties.desired.$version": 1}}), "invalid path"),
        ("ok", body(modules={"m": {"properties.desired": 3}}), "must be a JSON object"),
        ("ok", body(modules={"m": 3}), "must be a JSON object"),
        ("ok", body(priority=-1), "priority"),
        ("ok", body(priority="1"), "priority"),
        ("ok", body(priority=True), "priority"),
        ("Upper", body(), "configuration id"),
        ("a/b", body(), "configuration id"),
        ("ok", {"targetCondition": "", "content": {}}, "exactly one of"),
        ("ok", body(metrics={"queries": {"q": "SELECT deviceId FROM elsewhere"}}), "metric"),
        ("ok", body(metrics={"queries": {"q": 1}}), "strings"),
        ("ok", body(labels={"a": 1}), "labels"),
        ("ok", body(id="other"), "differs"),
        ("ok", [], "JSON object"),
    ],
)
def test_bad_configurations_are_refused_with_the_reason(
    config_id: str, document: object, reason: str
) -> None:
    with pytest.raises(ConfigurationError, match=reason) as refused:
        parse_configuration(config_id, document, now=0.0, sequence=1)
    assert refused.value.status == 400


def test_oversized_content_is_413() -> None:
    huge = body(modules={f"m{i}": {"properties.desired.a": "x" * 30_000} for i in range(20)})
    with pytest.raises(ConfigurationError) as refused:
        parse_configuration("big", huge, now=0.0, sequence=1)
    assert refused.value.status == 413


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("", False),
        ("*", True),
        ("tags.ring = 'canary'", True),
        ("FROM devices WHERE tags.ring = 'canary'", True),
        ("tags.ring = 'broad'", False),
        ("deviceId = 'd1' AND tags.missing = 1", False),
    ],
)
def test_target_conditions(text: str, matches: bool) -> None:
    device = {"deviceId": "d1", "tags": {"ring": "canary"}}
    config = parse_configuration("c", body(target=text), now=0.0, sequence=1)
    assert parse_target_condition(text) == config.condition
    assert config.targets(device) is matches


def config(config_id: str, priority: int, sequence: int, modules: dict[str, Any]) -> Configuration:
    document = body(target="*", priority=priority, modules=modules)
    return parse_configuration(config_id, document, now=float(sequence), sequence=sequence)


BASE: dict[str, Any] = {
    "$edgeAgent": {"properties.desired": {}},
    "$edgeHub": {"properties.desired": {}},
}
OWN = {"rate": 1, "model": {"version": 1}}


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        ([], OWN),
        ([config("l1", 5, 1, {"m": {"properties.desired.rate": 2}})], {**OWN, "rate": 2}),
        (
            [
                config("high", 9, 1, {"m": {"properties.desired.rate": 9}}),
                config("low", 1, 2, {"m": {"properties.desired.rate": 1}}),
            ],
            {**OWN, "rate": 9},
        ),
        (  # same priority: the most recently created wins
            [
                config("old", 5, 1, {"m": {"properties.desired.rate": 3}}),
                config("new", 5, 2, {"m": {"properties.desired.rate": 4}}),
            ],
            {**OWN, "rate": 4},
        ),
        (  # a base deployment replaces the device's own content
            [config("base", 0, 1, {**BASE, "m": {"properties.desired": {"x": 1}}})],
            {"x": 1},
        ),
        (  # only the best base applies; layers above it add to it
            [
                config("base-a", 1, 1, {**BASE, "m": {"properties.desired": {"x": 1}}}),
                config("base-b", 2, 2, {**BASE, "m": {"properties.desired": {"x": 2}}}),
                config("layer", 3, 3, {"m": {"properties.desired.y.z": 1}}),
            ],
            {"x": 2, "y": {"z": 1}},
        ),
        (  # a layer below the base is overwritten where the base sets the whole module
            [
                config("layer", 0, 1, {"m": {"properties.desired.y": 1}}),
                config("base", 5, 2, {**BASE, "m": {"properties.desired": {"x": 1}}}),
            ],
            {"x": 1},
        ),
        (  # another module's layer leaves this one alone
            [config("other", 5, 1, {"n": {"properties.desired.rate": 7}})],
            OWN,
        ),
    ],
)
def test_layers_merge_in_priority_order(
    configs: list[Configuration], expected: dict[str, Any]
) -> None:
    chosen = layering(configs, {"deviceId": "d1"})
    assert module_desired("m", OWN, chosen) == expected


def test_a_base_that_loses_is_targeted_not_applied() -> None:
    low = config("low", 1, 1, {**BASE, "m": {"properties.desired": {}}})
    high = config("high", 2, 2, {**BASE, "m": {"properties.desired": {}}})
    chosen = layering([low, high], {"deviceId": "d1"})
    assert {c.id for c in chosen.targeted} == {"low", "high"}
    assert chosen.applied() == {"high"}
