"""Environments and secrets: the documented precedence, and errors that name what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployment import config
from deployment.errors import PublisherError, Reason

CONFIG = """
[environments.simulator]
mlflow_tracking_uri = "sqlite:///mlflow.db"
secrets_dir = "secrets"
[environments.simulator.rings]
canary = "tags.ring = 'canary'"
all = "tags.fleet = 'edgeml'"

[environments.production]
mlflow_tracking_uri = "https://mlflow.example.com"
storage_container = "models"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "edgeml.toml"
    path.write_text(CONFIG)
    return path


def test_relative_paths_are_relative_to_the_config_file(config_file: Path) -> None:
    resolved = config.load(config_file, "simulator", {})
    assert resolved.mlflow_tracking_uri == f"sqlite:///{config_file.parent}/mlflow.db"
    assert resolved.audit_log == config_file.parent / "audit.jsonl"
    assert list(resolved.env.rings) == ["canary", "all"]


def test_the_environment_comes_from_the_variable(config_file: Path) -> None:
    resolved = config.load(config_file, None, {config.ENVIRONMENT_VARIABLE: "production"})
    assert resolved.name == "production"
    assert resolved.mlflow_tracking_uri == "https://mlflow.example.com"


@pytest.mark.parametrize(
    ("environment", "words"),
    [
        (None, "several environments (production, simulator): give --env"),
        ("staging", "no environment 'staging'"),
    ],
)
def test_an_environment_that_cannot_be_chosen_is_named(
    config_file: Path, environment: str | None, words: str
) -> None:
    with pytest.raises(PublisherError) as caught:
        config.load(config_file, environment, {})
    assert caught.value.reason == Reason.CONFIG
    assert words in caught.value.message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[environments.x]\nmlflow_tracking_uri = 1\n", "mlflow_tracking_uri"),
        ("[environments.x]\nmlflow_tracking_uri = 'a'\nhub_key = 'x'\n", "hub_key"),
        ("[environments.x]\nmlflow_tracking_uri='a'\n[environments.x.rings]\nBad = 'c'\n", "rings"),
        ("not toml [", "Expected"),
    ],
)
def test_a_malformed_config_file_is_refused(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "edgeml.toml"
    path.write_text(text)
    with pytest.raises(PublisherError, match=words):
        config.load(path, None, {})


def test_a_missing_config_file_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(PublisherError, match="PUBLISHER_CONFIG"):
        config.load(None, None, {config.CONFIG_VARIABLE: str(tmp_path / "none.toml")})


@pytest.mark.parametrize(
    ("variables", "secret_file", "expected"),
    [
        ({"IOTHUB_CONNECTION_STRING": "from-variable"}, "from-dir", "from-variable"),
        ({"IOTHUB_CONNECTION_STRING_FILE": "FILE"}, "from-dir", "from-file"),
        ({}, "from-dir", "from-dir"),
        (
            {"IOTHUB_CONNECTION_STRING": "from-variable", "IOTHUB_CONNECTION_STRING_FILE": "FILE"},
            None,
            "from-variable",
        ),
    ],
    ids=["variable-first", "file-variable-second", "secrets-dir-last", "variable-over-file"],
)
def test_secret_precedence(
    config_file: Path,
    tmp_path: Path,
    variables: dict[str, str],
    secret_file: str | None,
    expected: str,
) -> None:
    resolved = config.load(config_file, "simulator", {})
    named = tmp_path / "named-secret"
    named.write_text("from-file\n")
    environ = {k: (str(named) if v == "FILE" else v) for k, v in variables.items()}
    if secret_file is not None:
        (tmp_path / "secrets").mkdir()
        (tmp_path / "secrets" / "iothub_connection_string").write_text(secret_file)
    assert config.secret(config.HUB_SECRET, resolved, environ) == expected


def test_a_missing_secret_names_every_place_it_was_looked_for(config_file: Path) -> None:
    resolved = config.load(config_file, "simulator", {})
    with pytest.raises(PublisherError) as caught:
        config.secret(config.STORAGE_SECRET, resolved, {})
    assert caught.value.reason == Reason.SECRET_MISSING
    message = caught.value.message
    assert "AZURE_STORAGE_CONNECTION_STRING for environment 'simulator'" in message
    assert "AZURE_STORAGE_CONNECTION_STRING_FILE" in message
    assert str(config_file.parent / "secrets" / "azure_storage_connection_string") in message


def test_an_empty_or_unreadable_secret_file_is_an_error(config_file: Path, tmp_path: Path) -> None:
    resolved = config.load(config_file, "simulator", {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(PublisherError, match="is empty"):
        config.secret(config.HUB_SECRET, resolved, {"IOTHUB_CONNECTION_STRING_FILE": str(empty)})
    with pytest.raises(PublisherError, match="cannot read"):
        config.secret(
            config.HUB_SECRET, resolved, {"IOTHUB_CONNECTION_STRING_FILE": str(tmp_path / "no")}
        )
