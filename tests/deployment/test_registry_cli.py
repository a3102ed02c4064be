"""register / list / show / history / keygen / sign on a real MLflow (SQLite file)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from agent.releases.manifest import (
    ManifestRejected,
    load_trusted_keys,
    parse_trusted_keys,
    verify_manifest,
)
from deployment.examples.onnx_models import IR_VERSION, OPSET, save, tiny_mlp
from deployment.publish import template
from deployment.publish.audit import AuditLog
from tests.deployment.conftest import Workspace

URL = "https://fleet.blob.core.windows.net/models/tiny.onnx"


def _entries(ws: Workspace) -> list[tuple[str, str, str]]:
    return [(e.action, e.subject, e.outcome) for e in AuditLog(ws.audit).entries()]


def test_keygen_writes_a_private_file_only_the_owner_reads(
    tmp_path: Path, workspace: Workspace
) -> None:
    result = workspace.cli("keygen", "--out", str(tmp_path / "new"))
    assert result.code == 0
    (private,) = (tmp_path / "new").glob("*.key")
    (public,) = (tmp_path / "new").glob("*.pem")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    body = private.read_text().split("-----")[2].strip()
    assert body not in result.out
    assert body not in result.err
    line = next(x for x in result.out.splitlines() if x.startswith("EDGEML_TRUSTED_KEYS="))
    keys = parse_trusted_keys(line.removeprefix("EDGEML_TRUSTED_KEYS="))
    assert set(keys) == {public.stem}
    assert keys.keys() == load_trusted_keys("", [public]).keys()


def test_register_list_show_history(workspace: Workspace, tiny_file: Path) -> None:
    first = workspace.register(tiny_file, "reg_a")
    second = workspace.register(save(tiny_mlp(seed=2), workspace.root / "v2.onnx"), "reg_a")
    assert second == first + 1
    listed = workspace.cli("list")
    assert listed.code == 0
    assert "reg_a" in listed.out
    shown = workspace.cli("show", f"reg_a:{first}")
    assert shown.code == 0
    assert "accuracy" in shown.out
    assert "0.91" in shown.out
    assert '"shape": [-1, 32]' in shown.out
    history = workspace.cli("history", "reg_a")
    assert history.code == 0
    assert f"│ {first} " in history.out
    assert f"│ {second} " in history.out
    assert {e.actor for e in AuditLog(workspace.audit).entries()} == {"tester"}
    assert _entries(workspace)[-2:] == [
        ("register", f"reg_a:{first}", "registered"),
        ("register", f"reg_a:{second}", "registered"),
    ]


def test_a_version_that_is_not_next_is_refused(workspace: Workspace, tiny_file: Path) -> None:
    latest = workspace.register(tiny_file, "reg_b")
    for asked in (latest, latest + 2):
        result = workspace.cli(
            "register",
            str(tiny_file),
            "--name",
            "reg_b",
            "--metrics",
            str(workspace.metrics),
            "--version",
            str(asked),
        )
        assert result.code == 1
        assert "version_not_monotonic" in result.err
    assert workspace.register(tiny_file, "reg_b", "--version", str(latest + 1)) == latest + 1


def _nan_model(path: Path) -> Path:
    """Log of a standard normal sample: NaN for every negative input, so its golden fails."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["input"], ["output"])],
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return save(model, path)


@pytest.mark.parametrize(
    ("case", "reason", "words"),
    [
        ("missing_model", "model_invalid", "cannot read model file"),
        ("not_onnx", "model_invalid", "not_onnx"),
        ("golden_nan", "golden_mismatch", "NaN"),
        ("metrics_not_numbers", "model_invalid", "'accuracy' must be a finite number"),
        ("metrics_missing", "model_invalid", "no metrics file"),
        ("bad_name", "usage", "cannot be released through twin queries"),
        ("unknown_run", "not_found", "no MLflow run"),
    ],
)
def test_bad_input_registers_nothing(
    workspace: Workspace, tiny_file: Path, case: str, reason: str, words: str
) -> None:
    name = f"bad_{case}"
    model, metrics, extra = tiny_file, workspace.metrics, []
    if case == "missing_model":
        model = workspace.root / "absent.onnx"
    elif case == "not_onnx":
        model = workspace.root / "junk.onnx"
        model.write_bytes(b"\x00not a model" * 10)
    elif case == "golden_nan":
        model = _nan_model(workspace.root / "nan.onnx")
    elif case == "metrics_not_numbers":
        metrics = workspace.root / "m.json"
        metrics.write_text('{"accuracy": "high"}')
    elif case == "metrics_missing":
        metrics = workspace.root / "none.json"
    elif case == "bad_name":
        name = "bad-name"
    elif case == "unknown_run":
        extra = ["--run", "0" * 32]
    result = workspace.cli(
        "register", str(model), "--name", name, "--metrics", str(metrics), *extra
    )
    assert result.code == 1
    assert f"[{reason}]" in result.err
    assert words in result.err
    assert workspace.cli("show", name).code == 1  # nothing half-registered
    assert _entries(workspace)[-1] == ("register", name, "failed")


def test_sign_makes_a_manifest_devices_accept(workspace: Workspace, tiny_file: Path) -> None:
    version = workspace.register(tiny_file, "signed_a")
    result = workspace.cli("sign", f"signed_a:{version}", "--url", URL, "--valid-hours", "2")
    assert result.code == 0, result.err
    manifest_file = workspace.root / "releases" / "signed_a" / f"{version}.manifest.json"
    assert stat.S_IMODE(manifest_file.stat().st_mode) == 0o600
    manifest = json.loads(manifest_file.read_text())
    trusted = load_trusted_keys("", (workspace.root / "keys").glob("*.pem"))
    verified = verify_manifest(manifest, trusted, datetime.now(UTC))
    assert verified.version == version
    assert verified.url == URL
    assert verified.golden is not None
    assert verified.expires is not None
    assert _entries(workspace)[-1] == ("sign", f"signed_a:{version}", "signed")


def test_key_rotation_two_trusted_keys_during_the_change_over(
    workspace: Workspace, tiny_file: Path
) -> None:
    """Devices trust old and new keys while rings move to releases signed by the new one;
    once the old key is dropped, a release it signed is refused."""
    old_key = Path(workspace.environ["PUBLISHER_SIGNING_KEY_FILE"])
    first = workspace.register(tiny_file, "rotated")
    assert workspace.cli("sign", f"rotated:{first}", "--url", URL).code == 0
    old_manifest = json.loads(
        (workspace.root / "releases" / "rotated" / f"{first}.manifest.json").read_text()
    )
    workspace.environ["PUBLISHER_SIGNING_KEY_FILE"] = str(workspace.keygen())
    second = workspace.register(tiny_file, "rotated")
    assert workspace.cli("sign", f"rotated:{second}", "--url", URL).code == 0
    new_manifest = json.loads(
        (workspace.root / "releases" / "rotated" / f"{second}.manifest.json").read_text()
    )
    both = load_trusted_keys("", (workspace.root / "keys").glob("*.pem"))
    assert len(both) == 2
    now = datetime.now(UTC)
    assert verify_manifest(old_manifest, both, now).version == first
    assert verify_manifest(new_manifest, both, now).version == second
    new_only = {k: v for k, v in both.items() if k != old_key.stem}
    assert verify_manifest(new_manifest, new_only, now).version == second
    with pytest.raises(ManifestRejected, match="unknown_key"):
        verify_manifest(old_manifest, new_only, now)


def test_a_missing_signing_key_names_itself_and_signs_nothing(
    workspace: Workspace, tiny_file: Path
) -> None:
    version = workspace.register(tiny_file, "unsigned")
    del workspace.environ["PUBLISHER_SIGNING_KEY_FILE"]
    result = workspace.cli("sign", f"unsigned:{version}", "--url", URL)
    assert result.code == 1
    assert "missing secret PUBLISHER_SIGNING_KEY for environment 'test'" in result.err
    assert "PUBLISHER_SIGNING_KEY_FILE" in result.err
    assert not (workspace.root / "releases" / "unsigned").exists()


def test_an_unreachable_mlflow_store_is_named(workspace: Workspace, tmp_path: Path) -> None:
    workspace.mlflow_db = tmp_path / "no-such-folder" / "mlflow.db"
    workspace.write_config()
    result = workspace.cli("list")
    assert result.code == 1
    assert "[unreachable]" in result.err
    assert "no-such-folder" in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "x:0"],
        ["show", "x:one"],
        ["release", "x:1", "--rings", "canary,,all"],
        ["release", "x:1", "--rings", "canary", "--timeout", "-1"],
        ["release", "x:1", "--rings", "canary", "--min-fraction", "1.5"],
        ["release", "x:1", "--rings", "canary", "--poll", "nan"],
        ["sign", "x:1", "--valid-hours", "0"],
        ["register", "m.onnx"],
        ["frobnicate"],
    ],
)
def test_malformed_arguments_are_refused(workspace: Workspace, argv: list[str]) -> None:
    result = workspace.cli(*argv)
    assert result.code in (1, 2)
    assert result.err.strip()
    assert not result.out.strip()


def test_a_ring_the_environment_does_not_define_is_named(workspace: Workspace) -> None:
    result = workspace.cli("release", "x:1", "--rings", "early")
    assert result.code == 1
    assert "unknown ring(s) early (configured: canary)" in result.err


def _log_analytics_template(folder: Path) -> Path:
    """The template on its Log Analytics path: metrics-collector running, Prometheus stopped."""
    loaded = template.load_template()
    modules = loaded["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    modules["metricscollector"]["status"] = "running"
    modules["prometheus"]["status"] = "stopped"
    path = folder / "log-analytics.template.json"
    path.write_text(json.dumps(loaded))
    return path


def test_manifest_names_every_missing_value_at_once(workspace: Workspace) -> None:
    args = ["manifest", "--image", "r.example/agent:1", "--module-image", "sensor=r.example/s:1"]
    keys = ["--trusted-keys-dir", str(workspace.root / "keys")]
    out = ["--out", str(workspace.root / "d.json")]
    path = ["--template", str(_log_analytics_template(workspace.root))]
    result = workspace.cli(*args, *keys, *path, *out)
    assert result.code == 1
    (line,) = result.err.strip().splitlines()
    for name in (
        "IOT_HUB_RESOURCE_ID",
        "LOG_ANALYTICS_WORKSPACE_ID",
        "LOG_ANALYTICS_SHARED_KEY",
    ):
        assert f"${{{name}}}" in line


def test_the_prometheus_path_asks_for_no_log_analytics_value(workspace: Workspace) -> None:
    out = workspace.root / "prometheus.json"
    done = workspace.cli(
        "manifest",
        "--image",
        "r.example/agent:1",
        "--module-image",
        "sensor=r.example/s:1",
        "--trusted-keys-dir",
        str(workspace.root / "keys"),
        "--set",
        "EDGE_RING=unassigned",
        "--out",
        str(out),
    )
    assert done.code == 0, done.err
    modules = json.loads(out.read_text())["modulesContent"]["$edgeAgent"]["properties.desired"][
        "modules"
    ]
    assert modules["prometheus"]["status"] == "running"
    assert modules["metricscollector"]["status"] == "stopped"
    assert modules["metricscollector"]["env"]["LogAnalyticsSharedKey"]["value"] == ""


def test_manifest_renders_with_values_and_credentials_from_the_environment(
    workspace: Workspace,
) -> None:
    out = workspace.root / "deployment.json"
    args = [
        "manifest",
        "--template",
        str(_log_analytics_template(workspace.root)),
        "--image",
        "r.example/agent:1",
        "--module-image",
        "sensor=r.example/s:1",
        "--trusted-keys-dir",
        str(workspace.root / "keys"),
        "--set",
        "EDGE_RING=unassigned",
        "--set",
        "IOT_HUB_RESOURCE_ID=/subscriptions/s/hub",
        "--set",
        "LOG_ANALYTICS_WORKSPACE_ID=w",
        "--out",
        str(out),
    ]
    missing = workspace.cli(*args)
    assert missing.code == 1
    assert "${LOG_ANALYTICS_SHARED_KEY} (secret: set LOG_ANALYTICS_SHARED_KEY or" in missing.err
    refused = workspace.cli(*args, "--set", "LOG_ANALYTICS_SHARED_KEY=plain")
    assert refused.code == 1
    assert "a credential comes from the variable LOG_ANALYTICS_SHARED_KEY" in refused.err
    workspace.environ["LOG_ANALYTICS_SHARED_KEY"] = "c2hhcmVkLWtleQ=="
    done = workspace.cli(*args)
    assert done.code == 0, done.err
    assert "c2hhcmVkLWtleQ==" not in done.out + done.err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rendered = json.loads(out.read_text())
    modules = rendered["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    assert modules["mlagent"]["env"]["EDGEML_TRUSTED_KEYS"]["value"].startswith("edgeml-")
    assert modules["metricscollector"]["env"]["LogAnalyticsSharedKey"]["value"] == (
        "c2hhcmVkLWtleQ=="
    )


@pytest.mark.e2e
def test_an_unreachable_mlflow_server_is_named_by_the_cli_process(workspace: Workspace) -> None:
    """As CI runs it: its own process, MLflow's HTTP retries off (the conftest sets them)."""
    workspace.config.write_text(
        workspace.config.read_text().replace(
            f"sqlite:///{workspace.mlflow_db}", "http://127.0.0.1:9"
        )
    )
    result = workspace.process("list", timeout=300)
    assert result.code == 1
    assert "[unreachable]: MLflow at http://127.0.0.1:9 failed" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("mode", "refused"),
    [(0o600, False), (0o400, False), (0o640, True), (0o644, True), (0o666, True), (0o604, True)],
)
def test_a_signing_key_file_others_can_read_is_refused_as_ssh_does(
    workspace: Workspace, tiny_file: Path, mode: int, refused: bool
) -> None:
    key = Path(workspace.environ["PUBLISHER_SIGNING_KEY_FILE"])
    key.chmod(mode)
    version = workspace.register(tiny_file, "keymode")
    result = workspace.cli("sign", f"keymode:{version}", "--url", URL)
    if not refused:
        assert result.code == 0, result.err
        return
    assert result.code == 1
    assert result.err.strip() == (
        f"edgeml: error [key_invalid]: the secret file '{key}' (PUBLISHER_SIGNING_KEY_FILE) is "
        f"accessible by others (mode {mode:04o}): run chmod 600 {key}"
    )
    assert not (workspace.root / "releases" / "keymode").exists()


@pytest.mark.parametrize("lab", [True, False])
def test_a_plain_http_url_is_signed_with_a_warning_in_a_lab_and_refused_elsewhere(
    workspace: Workspace, tiny_file: Path, lab: bool
) -> None:
    workspace.lab = lab
    workspace.write_config()
    version = workspace.register(tiny_file, "plain")
    url = "http://10.0.0.5:8080/models/tiny.onnx?sig=secret"
    result = workspace.cli("sign", f"plain:{version}", "--url", url)
    manifest = workspace.root / "releases" / "plain" / f"{version}.manifest.json"
    shown = "http://10.0.0.5:8080/models/tiny.onnx"
    assert "sig=secret" not in result.err
    if lab:
        assert result.code == 0, result.err
        assert f"edgeml: warning: sign: the artifact URL {shown} is plain http" in result.err
        assert manifest.exists()
        return
    assert result.code == 1
    assert result.err.startswith(
        f"edgeml: error [insecure_url]: sign: the artifact URL {shown} is plain http"
    )
    assert "mark the environment 'test' as a lab (lab = true)" in result.err
    assert not manifest.exists()
