"""Every verb of `python -m deployment`, through the CLI's own parser and dispatch, against real
services: MLflow on SQLite, Azurite, the simulator's IoT Hub (one device, no agent).

One row per verb; the rows' verbs must equal the parser's subcommands, so a new verb without a
row fails here. A verb whose parser and dispatch disagree (as `watch --command` once did: it
wrote the subcommand's own destination) fails its row.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from deployment import cli
from deployment.examples.onnx_models import save, tiny_mlp
from deployment.retrain.controller import work_dir_lock
from simulator import Simulator, pick_loopback_host
from simulator.azurite import Azurite
from tests.deployment.conftest import REPO, Workspace

pytestmark = pytest.mark.e2e

MODEL = "verbs"


@dataclass(frozen=True)
class Row:
    verb: str
    argv: str  # shell words; {root}, {ref} are filled in
    code: int
    line: str  # a line of its output (stdout, or stderr for the log-only drift verbs)
    process: bool = False  # its own `python -m deployment` process


ROWS = [
    Row("keygen", "keygen --out {root}/more-keys", 0, "key id: edgeml-"),
    Row("register", f"register {{root}}/m.onnx --name {MODEL} --metrics {{root}}/metrics.json",
        0, f"registered {MODEL}:"),
    Row("list", "list", 0, MODEL),
    Row("show", "show {ref}", 0, "metric accuracy"),
    Row("history", f"history {MODEL}", 0, "lineage"),
    Row("upload", "upload {ref}", 0, "(sha256 checked)"),
    Row("sign", "sign {ref}", 0, "signed {ref} with edgeml-"),
    Row("refresh-url", "refresh-url {ref}", 0, "re-signed {ref}"),
    Row("release", "release {ref} --rings canary --dry-run", 0, "nothing was changed"),
    Row("status", f"status {MODEL}", 0, "targeted"),
    Row("audit", "audit verify", 0, "audit log intact"),
    # The device has no agent connected: its rollback method fails, and so does the command.
    Row("rollback", f"rollback {MODEL} --ring canary", 1,
        f"rollback of {MODEL} failed on 1 of 1 devices: dev-a"),
    Row("manifest",
        "manifest --image r.example/agent:1 --module-image sensor=r.example/s:1"
        " --trusted-keys-dir {root}/keys"
        " --set EDGE_RING=canary --set IOT_HUB_RESOURCE_ID=/s/hub"
        " --set LOG_ANALYTICS_WORKSPACE_ID=w --out {root}/deployment.json",
        0, "wrote {root}/deployment.json"),
    Row("train", "train --out {root}/trained --rows 400", 0, "trained {root}/trained/model.onnx"),
    # `dev up` and `down` run end to end in the quickstart test; here the folder holds nothing.
    Row("dev", "dev status --run-dir {root}/dev", 3, "not running in {root}/dev", process=True),
    Row("gate", f"gate {{root}}/candidate --name {MODEL}", 0, f"no champion of {MODEL} yet"),
    Row("watch",
        f"watch --name {MODEL} --data-dir {{root}}/data --work-dir {{root}}/work --rings canary"
        " --once --command 'true {{out}}'",
        0, "watch: "),
    Row("baseline",
        "--log-level info baseline --data {root}/inputs.npy --model {root}/m.onnx"
        " -o {root}/baseline.json --window-sizes 50 --resamples 100",
        0, "baseline", process=True),
    Row("drift-report",
        "--log-level info drift-report --profiles {root}/profiles"
        " --baseline {root}/candidate/baseline.json -o {root}/report",  # no profile: an index
        1, "wrote {root}/report/index.html", process=True),
]  # fmt: skip


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_every_verb_of_the_parser_has_one_row() -> None:
    verbs = [row.verb for row in ROWS]
    assert len(verbs) == len(set(verbs))
    assert set(verbs) == _subcommands(cli._parser())


@dataclass
class World:
    ws: Workspace
    ref: str

    def fill(self, text: str) -> str:
        return text.format(root=self.ws.root, ref=self.ref)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, mlflow_db: Path, azurite: Azurite
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("verbs")
    host = pick_loopback_host()
    with Simulator.start(
        REPO / "deployment" / "deployment.template.json",
        host=host,
        run_dir=root / "sim",
        devices={"dev-a": {"ring": "canary"}},
    ) as sim:
        ws = Workspace(root, mlflow_db, rings={"canary": "tags.ring = 'canary'"})
        ws.extra = f'hub_ca_file = "{sim.ca_cert_path}"\n'
        ws.write_config()
        ws.environ.update(
            PUBLISHER_ACTOR="tester",
            IOTHUB_CONNECTION_STRING=sim.service_connection_string,
            AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string,
            LOG_ANALYTICS_SHARED_KEY="c2hhcmVkLWtleQ==",
        )
        ws.environ["PUBLISHER_SIGNING_KEY_FILE"] = str(ws.keygen())
        ws.metrics.write_text('{"accuracy": 0.91}')
        model = save(tiny_mlp(seed=11), root / "m.onnx")
        np.save(root / "inputs.npy", np.random.default_rng(1).normal(size=(400, 32)))
        (root / "profiles").mkdir()
        (root / "data").mkdir()
        version = ws.publish(model, MODEL)
        trained = ws.cli("train", "--out", str(root / "candidate"), "--rows", "400")
        assert trained.code == 0, trained.err
        yield World(ws, f"{MODEL}:{version}")


@pytest.mark.parametrize("row", ROWS, ids=[row.verb for row in ROWS])
def test_a_verb_runs_through_the_cli(world: World, row: Row) -> None:
    argv = [world.fill(word) for word in shlex.split(row.argv)]
    if row.process:
        result = world.ws.process(*argv, timeout=120)
        output = result.out + result.err
    else:
        result = world.ws.cli(*argv)
        output = result.out if row.code == 0 else result.err
    assert result.code == row.code, (result.out, result.err)
    assert world.fill(row.line) in output, (result.out, result.err)
    assert "Traceback" not in result.err


def test_watch_with_its_own_pipeline_command_runs_as_a_process(world: World) -> None:
    """The reported crash, as it was reported: `python -m deployment watch … --command`."""
    root = world.ws.root
    result = world.ws.process(
        "watch",
        "--name",
        MODEL,
        "--data-dir",
        str(root / "data"),
        "--work-dir",
        str(root / "work-process"),
        "--rings",
        "canary",
        "--once",
        "--command",
        f"{sys.executable} -c pass {{out}}",
        timeout=120,
    )
    assert result.code == 0, result.err
    assert result.out.startswith("watch: ")


def test_a_second_watch_on_a_held_work_folder_exits_with_one_line_naming_the_holder(
    world: World,
) -> None:
    root = world.ws.root
    argv = ["watch", "--name", MODEL, "--data-dir", str(root / "data"), "--rings", "canary"]
    with work_dir_lock(root / "work-held"):
        result = world.ws.cli(*argv, "--work-dir", str(root / "work-held"), "--once")
    assert result.code == 1
    assert result.err.count("\n") == 1
    assert result.err.startswith("edgeml: error [locked]: work folder ")
    assert f"in use by another controller (pid {os.getpid()}" in result.err


def test_outside_a_lab_azurite_s_plain_http_is_refused_at_upload_and_release(
    world: World,
) -> None:
    ws = world.ws
    ws.lab = False
    ws.write_config()
    try:
        upload = ws.cli("upload", world.ref)
        release = ws.cli("release", world.ref, "--rings", "canary", "--dry-run")
    finally:
        ws.lab = True
        ws.write_config()
    for result, action in ((upload, "upload"), (release, "release")):
        assert result.code == 1
        assert result.err.startswith(f"edgeml: error [insecure_url]: {action}: the artifact URL")
        assert "is plain http" in result.err
    assert "nothing was changed" not in release.out
    warned = ws.cli("upload", world.ref)
    assert warned.code == 0, warned.err
    assert "edgeml: warning: upload: the artifact URL http://" in warned.err
