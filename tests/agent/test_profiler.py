"""The offline profiler: its grid, peak-memory reading, arguments, and a real child-process run."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.__main__ import main
from agent.observation.recommend import Knobs
from agent.observation.resources import PeakMemory, parse_vm_hwm
from agent.profiler import (
    SCHEMA,
    Release,
    SweepPlan,
    knob_grid,
    read_profile,
)
from agent.serving.engine import RuntimeOptions, create_session
from agent.settings import AgentSettings
from deployment.examples.onnx_models import save, tiny_mlp
from deployment.publish.template import load_profile
from tests.support.models import TINY_FEATURES, tiny_bytes


def test_the_grid_measures_max_batch_only_where_requests_coalesce() -> None:
    grid = knob_grid([1, 2], [8, 32], [1], [True, False])
    assert grid == (
        Knobs(1, 1, 1, batching=False),
        Knobs(1, 8, 1, batching=True),
        Knobs(1, 32, 1, batching=True),
        Knobs(2, 1, 1, batching=False),
        Knobs(2, 8, 1, batching=True),
        Knobs(2, 32, 1, batching=True),
    )


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"knobs": (), "loads_rps": (1.0,)}, "at least one configuration"),
        ({"loads_rps": (10.0, 0.0)}, "above 0"),
        ({"loads_rps": (10.0,), "measure_s": 0.0}, "measured window"),
    ],
)
def test_a_plan_that_measures_nothing_is_refused(plan: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"knobs": (Knobs(1, 1, 1, batching=False),)} | plan
    with pytest.raises(ValueError, match=message):
        SweepPlan(**arguments)  # type: ignore[arg-type]  # a table of partial arguments


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 100 kB\n", 123456 * 1024),
        ("Name:\tkthreadd\n", None),
    ],
)
def test_vm_hwm(status: str, expected: int | None) -> None:
    assert parse_vm_hwm(status) == expected


def test_peak_memory_reads_the_reset_high_water_mark(tmp_path: Path) -> None:
    pid = os.getpid()
    proc = tmp_path / str(pid)
    proc.mkdir()
    (proc / "clear_refs").write_text("")
    (proc / "status").write_text(f"VmHWM:\t{1 << 30 >> 10} kB\n")  # 1 GiB, above any RSS here
    memory = PeakMemory(pid, proc_root=tmp_path)
    memory.reset()
    assert (proc / "clear_refs").read_text() == "5"
    assert memory.peak() == 1 << 30


def test_peak_memory_falls_back_to_samples_when_the_reset_is_refused(tmp_path: Path) -> None:
    memory = PeakMemory(os.getpid(), proc_root=tmp_path / "absent")
    memory.reset()
    assert not memory.hwm_resets
    assert memory.peak() >= memory.rss() > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threads", "1,x"], "is not a list of numbers"),
        (["--threads", "0"], "at least 1"),
        (["--coalescing", "maybe"], "on/off"),
        (["--loads", ""], "at least 0.01"),
    ],
)
def test_bad_profile_arguments_name_the_value(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["profile", str(tmp_path / "m.onnx"), "--target-rps", "10", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_impossible_target_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save(tiny_mlp(), tmp_path / "tiny.onnx")
    assert main(["profile", str(model), "--target-rps", "0"]) == 2
    assert "target" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "missing.onnx"), "--target-rps", "5"]) == 2


@pytest.mark.e2e
def test_a_real_profile_of_a_small_model_recommends_settings_the_agent_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two configurations, each in its own `agent serve` child, loaded and swapped."""
    model = save(tiny_mlp(), tmp_path / "tiny.onnx")
    out = tmp_path / "profile.json"
    code = main(
        [
            "profile", str(model), "--target-rps", "40", "--max-p99-ms", "1000",
            "--threads", "1", "--max-batch", "8", "--coalescing", "on,off",
            "--loads", "0.5,1", "--warmup", "0.2", "--duration", "1", "--out", str(out), "--json",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(out.read_text())
    assert json.loads(captured.out.splitlines()[-1]) == document
    assert document["schema"] == SCHEMA
    assert "[2/2]" in captured.err  # progress on stderr
    runs = document["configurations"]
    assert len(runs) == 2
    for run in runs:
        assert run["error"] is None
        assert [p["offered_rps"] for p in run["points"]] == [20, 40]
        for point in run["points"]:
            assert point["errors"] == 0
            assert point["achieved_rps"] > 0.8 * point["offered_rps"]
            assert 0 < point["p50_ms"] <= point["p99_ms"]
            # The child's own memory: a Python process with ONNX Runtime, not this test's.
            assert 30 << 20 < point["peak_rss_bytes"] < 2 << 30
        swap = run["swap"]
        assert swap["peak_rss_bytes"] >= swap["rss_before_bytes"] > 0
    best = document["recommendation"]
    assert best["met"]
    host = best["createOptions"]["HostConfig"]
    peak = best["predicted"]["peak_rss_bytes"]
    assert peak < host["Memory"] <= peak * 1.2 + (1 << 20)
    assert 0.1e9 <= host["NanoCpus"] <= (os.cpu_count() or 1) * 1e9
    assert read_profile(out.read_text()).recommendation.met
    rendered = load_profile(out).recommendation.createOptions.HostConfig  # the publisher's reader
    assert (rendered.Memory, rendered.NanoCpus) == (host["Memory"], host["NanoCpus"])
    settings = AgentSettings.from_environment(best["settings"])
    assert settings.runtime.intra_op_threads == 1
    assert sys.executable  # the children ran this interpreter


def _document(**recommendation: object) -> str:
    good: dict[str, object] = {
        "met": True,
        "why": "least CPU",
        "settings": {"EDGEML_MAX_BATCH": "8"},
        "createOptions": {"HostConfig": {"Memory": 256 << 20, "NanoCpus": 10**9}},
    }
    return json.dumps({"schema": SCHEMA, "recommendation": good | recommendation, "extra": 1})


def test_a_profile_document_reads_back_what_a_deployment_needs() -> None:
    document = read_profile(_document())
    assert document.recommendation.createOptions.HostConfig.Memory == 256 << 20
    assert document.recommendation.settings == {"EDGEML_MAX_BATCH": "8"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_document(settings={"PATH": "/bin"}), "EDGEML_"),
        (_document(settings={"EDGEML_NO_SUCH_SETTING": "1"}), "EDGEML_NO_SUCH_SETTING"),
        (_document(createOptions={"HostConfig": {"Memory": 0, "NanoCpus": 1}}), "Memory"),
        (_document(createOptions={"HostConfig": {"Memory": "1g", "NanoCpus": 1}}), "Memory"),
        (json.dumps({"schema": "agent-profile/0", "recommendation": {}}), "schema"),
        ("not json", "profile.json"),
    ],
)
def test_a_bad_profile_document_is_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_profile(text)


def test_a_file_that_is_not_a_model_fails_before_any_child_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["profile", str(junk), "--target-rps", "5", "--out", str(tmp_path / "p")]) == 1
    assert "agent profile:" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_swap_candidate_is_the_same_graph_in_other_bytes(tmp_path: Path) -> None:
    """A swap in the profile goes through the store as a new artifact would."""
    model = tiny_bytes()
    release = Release.prepare([model], tmp_path)
    first, candidate = release.models
    assert first == model
    assert hashlib.sha256(candidate).digest() != hashlib.sha256(model).digest()
    x = {"input": np.ones((2, TINY_FEATURES), dtype=np.float32)}
    outputs = [
        create_session(m, RuntimeOptions(intra_op_threads=1)).run(None, x)[0]
        for m in (model, candidate)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert len(list(tmp_path.glob("*.onnx"))) == 2
    assert json.loads(release.document(2))["sha256"] == hashlib.sha256(candidate).hexdigest()
