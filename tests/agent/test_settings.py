"""Settings sections composed from `EDGEML_*` variables: names users set keep working."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import Section
from agent.settings import AgentSettings
from module.settings import ModuleProcessSettings


@pytest.mark.parametrize(
    ("environ", "path", "expected"),
    [
        ({}, ("batching", "max_rows"), 32),
        ({"EDGEML_MAX_BATCH": "8"}, ("batching", "max_rows"), 8),
        ({"EDGEML_BATCHING": "false"}, ("batching", "enabled"), False),
        ({"EDGEML_MAX_WAIT_MS": "2.5"}, ("batching", "max_wait_ms"), 2.5),
        ({"EDGEML_GRAPH_OPTIMIZATION": "basic"}, ("runtime", "optimization"), "basic"),
        ({"EDGEML_MAX_REQUEST_ELEMENTS": "10"}, ("limits", "max_elements"), 10),
        ({"EDGEML_HTTP_PORT": "8080"}, ("http", "http_port"), 8080),
        ({"EDGEML_STATE_DIR": "/vol"}, ("store", "state_dir"), Path("/vol")),
        (
            {"EDGEML_ALLOWED_HOSTS": "a.example, *.b.example"},
            ("download", "allowed_hosts"),
            ("a.example", "*.b.example"),
        ),
        ({"EDGEML_DOWNLOAD_DEADLINE_S": "60"}, ("download", "deadline_s"), 60.0),
        ({"EDGEML_PROBATION_REQUESTS": "5"}, ("probation", "requests"), 5),
        ({"EDGEML_MAX_MODEL_BYTES": "2048"}, ("swap", "max_model_bytes"), 2048),
        ({"EDGEML_WATCH_DEBOUNCE_S": "2"}, ("folder", "watch_debounce_s"), 2.0),
        ({"EDGEML_TRUSTED_KEYS": "k=AAAA"}, ("keys", "trusted_keys"), "k=AAAA"),
        ({"EDGEML_LOG_LEVEL": "debug"}, ("log", "log_level"), "debug"),
        ({"EDGEML_SHUTDOWN_GRACE_S": "3"}, ("shutdown_grace_s",), 3.0),
    ],
)
def test_each_variable_lands_in_its_components_section(
    environ: dict[str, str], path: tuple[str, ...], expected: object
) -> None:
    value: Any = AgentSettings.from_environment(environ)
    for name in path:
        value = getattr(value, name)
    assert value == expected


@pytest.mark.parametrize(
    ("settings", "environ"),
    [
        (AgentSettings, {"EDGEML_MAX_BACTH": "8"}),
        (AgentSettings, {"EDGEML_MODULE_CALL_TIMEOUT_S": "5"}),  # the agent alone has no module
        (ModuleProcessSettings, {"EDGEML_MODULE_CALL_TIMEOUT": "5"}),
        (ModuleProcessSettings, {"edgeml_nonsense": "1"}),
    ],
)
def test_unknown_names_are_refused_and_named(
    settings: type[Section], environ: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="unknown setting") as refused:
        settings.from_environment(environ)
    assert next(iter(environ)) in str(refused.value)


def test_the_module_reads_its_own_section_and_the_agents() -> None:
    process = ModuleProcessSettings.from_environment(
        {"EDGEML_MODULE_MAX_MODELS": "3", "EDGEML_MAX_BATCH": "4"}
    )
    assert process.module.max_models == 3
    assert process.agent.batching.max_rows == 4


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, 0.0), ({"EDGEML_COALESCE_ABOVE_US": "250"}, 250.0)],
)
def test_a_process_default_yields_to_the_environment(
    environ: dict[str, str], expected: float
) -> None:
    process = ModuleProcessSettings.from_environment(environ, defaults={"coalesce_above_us": 0.0})
    assert process.agent.batching.coalesce_above_us == expected


def test_flags_override_the_environment_and_none_leaves_it() -> None:
    settings = AgentSettings.from_environment(
        {"EDGEML_HTTP_PORT": "1", "EDGEML_HOST": "h"},
        overrides={"http_port": 2, "host": None},
    )
    assert (settings.http.http_port, settings.http.host) == (2, "h")


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        AgentSettings.from_environment({"EDGEML_MAX_BATCH": "0"})


def test_sections_are_frozen() -> None:
    settings = AgentSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.batching.max_rows = 3  # type: ignore[misc]
