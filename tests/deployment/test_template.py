"""The base deployment manifest: placeholders, the profile's limits, and who owns `models`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from deployment.errors import PublisherError
from deployment.publish import template

KEYS = "edgeml-abc=" + "A" * 43 + "="
IMAGES = {"mlagent": "registry.example/agent:1.2", "sensor": "registry.example/sensor:1"}
SETTINGS = {
    "EDGE_RING": "unassigned",
    "IOT_HUB_RESOURCE_ID": "/subscriptions/s/resourceGroups/g/providers/x/IotHubs/h",
    "LOG_ANALYTICS_WORKSPACE_ID": "w",
    "LOG_ANALYTICS_SHARED_KEY": "k",
}
PROFILE = {
    "schema": "agent-profile/1",
    "model": {"file": "m.onnx"},
    "recommendation": {
        "met": True,
        "why": "least CPU",
        "settings": {"EDGEML_MAX_BATCH": "16", "EDGEML_INTRA_OP_THREADS": "2"},
        "createOptions": {"HostConfig": {"Memory": 268435456, "NanoCpus": 1500000000}},
    },
}


def _agent(rendered: dict[str, Any]) -> dict[str, Any]:
    modules = rendered["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    agent: dict[str, Any] = modules["mlagent"]
    return agent


def test_the_shipped_template_renders_and_validates() -> None:
    rendered = template.render(
        template.load_template(), images=IMAGES, trusted_keys=KEYS, settings=SETTINGS
    )
    agent = _agent(rendered)
    assert agent["settings"]["image"] == IMAGES["mlagent"]
    assert agent["env"]["EDGEML_TRUSTED_KEYS"] == {"value": KEYS}
    assert "$schema-template" not in rendered
    assert "models" not in rendered["modulesContent"]["mlagent"]["properties.desired"]


def test_the_profile_sets_limits_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    rendered = template.render(
        template.load_template(),
        images=IMAGES,
        trusted_keys=KEYS,
        settings=SETTINGS,
        profile=template.load_profile(path),
    )
    agent = _agent(rendered)
    host = agent["settings"]["createOptions"]["HostConfig"]
    assert host["Memory"] == 268435456
    assert host["NanoCpus"] == 1500000000
    assert host["Binds"] == ["edge-mlops-models:/var/lib/edge-agent"]  # the template's stay
    assert agent["env"]["EDGEML_MAX_BATCH"] == {"value": "16"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.update(schema="other/2"), "schema"),
        (lambda p: p["recommendation"]["settings"].update(PATH="/bin"), "not PATH"),
        (lambda p: p["recommendation"]["settings"].update(EDGEML_MAX_BACH="8"), "MAX_BACH"),
        (lambda p: p["recommendation"]["settings"].update(EDGEML_MAX_BATCH=16), "MAX_BATCH"),
        (
            lambda p: p["recommendation"]["createOptions"]["HostConfig"].update(Memory="1g"),
            "Memory",
        ),
    ],
)
def test_a_bad_profile_is_refused(tmp_path: Path, change: Any, words: str) -> None:
    profile = copy.deepcopy(PROFILE)
    change(profile)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(PublisherError, match=words):
        template.load_profile(path)


def _log_analytics_path() -> dict[str, Any]:
    loaded = template.load_template()
    modules = loaded["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    modules["metricscollector"]["status"] = "running"
    return loaded


def test_a_stopped_modules_placeholders_are_not_required() -> None:
    required = template.required_placeholders(template.load_template())
    assert "LOG_ANALYTICS_SHARED_KEY" not in required
    assert "EDGE_RING" in required
    assert "LOG_ANALYTICS_SHARED_KEY" in template.required_placeholders(_log_analytics_path())


def test_every_missing_value_is_named_with_where_it_comes_from() -> None:
    settings = {
        k: v for k, v in SETTINGS.items() if k not in ("EDGE_RING", "LOG_ANALYTICS_SHARED_KEY")
    }
    with pytest.raises(PublisherError) as caught:
        template.render(
            _log_analytics_path(),
            images={"mlagent": "a:1"},
            trusted_keys=KEYS,
            settings=settings,
        )
    message = caught.value.message
    assert "${EDGE_RING} (--set)" in message
    assert "${MODULES.sensor} (--module-image)" in message
    assert "${LOG_ANALYTICS_SHARED_KEY} (secret: set LOG_ANALYTICS_SHARED_KEY or" in message


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("LOG_ANALYTICS_SHARED_KEY", True),
        ("API_TOKEN", True),
        ("EDGEML_TRUSTED_KEYS", False),
        ("EDGE_RING", False),
        ("LOG_ANALYTICS_WORKSPACE_ID", False),
    ],
)
def test_which_placeholders_are_credentials(name: str, secret: bool) -> None:
    assert template.is_secret_placeholder(name) is secret


def test_a_base_deployment_that_sets_models_is_refused() -> None:
    base = template.load_template()
    base["modulesContent"]["mlagent"]["properties.desired"]["models"] = {}
    with pytest.raises(PublisherError, match="belongs to the ring layers"):
        template.render(base, images=IMAGES, trusted_keys=KEYS, settings=SETTINGS)


def test_a_broken_route_is_refused() -> None:
    base = template.load_template()
    base["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]["bad"] = "INTO x"
    with pytest.raises(PublisherError, match="route 'bad'"):
        template.render(base, images=IMAGES, trusted_keys=KEYS, settings=SETTINGS)
