"""The Dockerfile's recipe, replayed without a Docker engine.

CI has the Docker client but no engine, so these tests perform the image's own steps: they parse
the Dockerfile, copy the build context (filtered by .dockerignore) the way its COPY lines say, run
the builder stage's RUN lines in a fresh virtual environment that stands in for `/opt/venv`, then
start the runtime stage's ENTRYPOINT + CMD with only the image's environment and wait for its
HEALTHCHECK command, run exactly as written, to pass. Container paths are mapped onto tmp_path
(`/opt/venv`, the build WORKDIR, the VOLUME), nothing else is rewritten, so a broken recipe (a
wrong module, a missing dependency, a COPY of an ignored file) fails here as it would in Docker.

What cannot be replayed without root (useradd, chown in the runtime stage) is checked statically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import public_key_to_b64
from deployment.example_models import tiny_mlp
from deployment.release import build_manifest
from simulator.hub import Simulator, pick_loopback_host, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# Installing the default dependencies (onnxruntime, numpy, cryptography, azure-iot-device...)
# into a fresh venv takes 30-40 s on an idle 2-core machine but over 120 s, the default
# per-test timeout, when the machine is shared with other builds; the first test that uses the
# module's image pays for it.
INSTALL_TIMEOUT_S = 600
# Keywords whose leading `--flag=value` tokens are options rather than arguments.
_FLAGGED = frozenset({"FROM", "COPY", "ADD", "HEALTHCHECK", "RUN"})


class RecipeError(AssertionError):
    """The recipe does not build, does not start, or does not become healthy."""


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: Mapping[str, str]
    args: str

    def command(self) -> list[str]:
        """An exec-form (JSON array) or shell-form command as an argv."""
        return exec_or_shell(self.args)


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        if not found:
            raise RecipeError(f"stage {self.name or self.base!r} has no {keyword}")
        return found[-1]


def exec_or_shell(args: str) -> list[str]:
    if args.lstrip().startswith("["):
        argv = json.loads(args)
        assert isinstance(argv, list)
        assert all(isinstance(a, str) for a in argv)
        return argv
    return ["/bin/sh", "-c", args]


def _logical_lines(text: str) -> Iterator[str]:
    """Comment lines dropped and backslash continuations joined, as Docker's parser does."""
    pending: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        yield " ".join(p for p in pending if p)
        pending = []
    if pending:
        yield " ".join(pending)


def _split_flags(keyword: str, rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    if keyword not in _FLAGGED:
        return flags, rest
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        name, _, value = token[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    base, name, body = "", None, list[Instruction]()
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags, rest = _split_flags(keyword, rest.strip())
        if keyword == "FROM":
            if base:
                stages.append(Stage(base, name, tuple(body)))
            words = rest.split()
            base, name, body = words[0], None, []
            if len(words) == 3 and words[1].upper() == "AS":
                name = words[2]
            continue
        if not base:
            raise RecipeError(f"{keyword} before the first FROM")
        body.append(Instruction(keyword, flags, rest))
    if base:
        stages.append(Stage(base, name, tuple(body)))
    return stages


def parse_env(args: str, env: Mapping[str, str]) -> dict[str, str]:
    """`ENV k=v k2="v 2"` (or the legacy `ENV k v`), $VAR expanded against `env` like Docker."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        pairs = [(words[0], " ".join(words[1:]))]
    else:
        pairs = [(w.partition("=")[0], w.partition("=")[2]) for w in words]

    def expand(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)

    return {key: expand(value) for key, value in pairs}


def parse_duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    if match is None:
        raise RecipeError(f"unsupported duration {value!r}")
    return float(match[1]) * units[match[2]]


@dataclass(frozen=True)
class Recipe:
    builder: Stage
    runtime: Stage

    @classmethod
    def parse(cls, text: str) -> Recipe:
        stages = parse_dockerfile(text)
        if len(stages) < 2:
            raise RecipeError("expected a multi-stage build: a builder and a runtime stage")
        runtime = stages[-1]
        copy_from = [c for c in runtime.all("COPY") if "from" in c.flags]
        if len(copy_from) != 1:
            raise RecipeError("the runtime stage must copy exactly one thing from the builder")
        source = copy_from[0].flags["from"]
        builders = [s for s in stages[:-1] if s.name == source]
        if len(builders) != 1:
            raise RecipeError(f"no stage named {source!r}")
        return cls(builders[0], runtime)

    @property
    def venv(self) -> str:
        """The container path of the venv that the runtime stage copies from the builder."""
        copy = next(c for c in self.runtime.all("COPY") if "from" in c.flags)
        source, dest = copy.args.split()
        if source != dest:
            raise RecipeError("the venv must keep its path: its scripts embed it")
        return dest

    @property
    def volume(self) -> str:
        volumes = exec_or_shell(self.runtime.last("VOLUME").args)
        paths = volumes[2].split() if volumes[0] == "/bin/sh" else volumes
        if len(paths) != 1:
            raise RecipeError("expected one volume, the model store")
        return paths[0]

    def argv(self, run_args: Sequence[str] = ()) -> list[str]:
        """What `docker run IMAGE *run_args` executes: arguments replace CMD, if any."""
        entrypoint = self.runtime.last("ENTRYPOINT").command()
        if run_args:
            return [*entrypoint, *run_args]
        cmd = self.runtime.all("CMD")
        return entrypoint + (cmd[-1].command() if cmd else [])

    def env_defaults(self) -> dict[str, str]:
        """The runtime stage's ENV, unexpanded."""
        env: dict[str, str] = {}
        for instruction in self.runtime.all("ENV"):
            env.update(parse_env(instruction.args, {}))
        return env

    def healthcheck(self) -> tuple[list[str], float]:
        check = self.runtime.last("HEALTHCHECK")
        word, _, command = check.args.partition(" ")
        if word.upper() != "CMD":
            raise RecipeError("HEALTHCHECK must run a command")
        return exec_or_shell(command), parse_duration_s(check.flags.get("timeout", "30s"))


# --- the build context -----------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match plus `**`, which is what Docker applies to .dockerignore lines."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, _glob_regex(pattern)))
    return rules


def is_ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """The last matching rule wins; a rule that matches a parent directory matches its files."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def copy_from_context(
    context: Path, rules: list[tuple[bool, re.Pattern[str]]], source: str, dest: Path
) -> None:
    """`COPY source dest` semantics: a directory's contents land in dest, a file in dest/."""
    origin = context / source
    if not origin.exists() or is_ignored(source, rules):
        raise RecipeError(f"COPY {source}: not in the build context (missing or .dockerignored)")
    if origin.is_file():
        target = dest / origin.name if dest.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target)
        return
    for path in sorted(origin.rglob("*")):
        relative = path.relative_to(context).as_posix()
        if path.is_file() and not is_ignored(relative, rules):
            target = dest / path.relative_to(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


# --- replay ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathMap:
    """Container paths and the host directories that stand in for them."""

    pairs: tuple[tuple[str, Path], ...]

    def __call__(self, text: str) -> str:
        for container, host in self.pairs:
            text = re.sub(re.escape(container) + r"(?![\w.-])", str(host), text)
        return text


@dataclass(frozen=True)
class Image:
    """What the builder produced, on the host: the venv and the path map to reach it."""

    recipe: Recipe
    paths: PathMap
    venv: Path
    volume: Path
    log: Path

    def environment(self) -> dict[str, str]:
        """Only what the image sets, over a minimal base: nothing leaks from the test's venv."""
        env = {"PATH": os.environ["PATH"], "HOME": str(self.volume), "LANG": "C.UTF-8"}
        for instruction in self.recipe.runtime.all("ENV"):
            env.update(parse_env(self.paths(instruction.args), env))
        return env


def _host_python_shim(directory: Path) -> Path:
    """`python` as the base image has it: the interpreter running the tests, outside any venv."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "python"
    shim.symlink_to(getattr(sys, "_base_executable", sys.executable))
    return directory


def build(recipe: Recipe, root: Path, context: Path = REPO) -> Image:
    """Replay the builder stage: ENV, WORKDIR, COPY and RUN, with container paths mapped."""
    workdirs = [w.args for w in recipe.builder.all("WORKDIR")]
    paths = PathMap(
        (
            (recipe.venv, root / "venv"),
            (recipe.volume, root / "volume"),
            *((w, root / "src" / w.strip("/").replace("/", "_")) for w in workdirs),
        )
    )
    rules = dockerignore_rules((context / ".dockerignore").read_text())
    shim = _host_python_shim(root / "base-bin")
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    # pip's own config (find-links, the local mirror) must reach the replayed `pip install`, but
    # the test's venv must not: a VIRTUAL_ENV or PYTHONPATH would leak its packages in.
    for leaked in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(leaked, None)
    cwd = root / "src"
    cwd.mkdir(parents=True)
    for instruction in recipe.builder.instructions:
        match instruction.keyword:
            case "ENV":
                env.update(parse_env(paths(instruction.args), env))
            case "WORKDIR":
                cwd = Path(paths(instruction.args))
                cwd.mkdir(parents=True, exist_ok=True)
            case "COPY":
                *sources, dest = instruction.args.split()
                target = Path(paths(dest)) if dest.startswith("/") else cwd / dest
                if dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                for source in sources:
                    copy_from_context(context, rules, source, target)
            case "RUN":
                argv = [paths(a) for a in instruction.command()]
                done = subprocess.run(
                    argv, cwd=cwd, env=env, capture_output=True, text=True, check=False
                )
                if done.returncode != 0:
                    raise RecipeError(
                        f"RUN {instruction.args} exited {done.returncode}:\n{done.stderr[-4000:]}"
                    )
            case other:
                raise RecipeError(f"the replay does not know builder instruction {other}")
    (root / "volume").mkdir(exist_ok=True)
    return Image(recipe, paths, root / "venv", root / "volume", root / "container.log")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@dataclass(frozen=True)
class Deployment:
    """What IoT Edge hands the container: the hub's local-debug variables and the settings the
    deployment manifest's `env` sets, plus a signed release in a folder of the volume."""

    environment: Mapping[str, str]


def deployment_for(image: Image, hub: Simulator) -> Deployment:
    key = Ed25519PrivateKey.generate()
    releases = image.volume / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    model = bytes(tiny_mlp().SerializeToString())
    manifest = build_manifest(
        model,
        name="tiny",
        version=1,
        url=f"https://artifacts.invalid/{hashlib.sha256(model).hexdigest()}.onnx",
        key=key,
        key_id="image-test",
    )
    (releases / f"{manifest['sha256']}.onnx").write_bytes(model)
    (releases / "tiny.manifest.json").write_text(json.dumps(manifest))
    return Deployment(
        {
            **hub.edge_env(hub.device_id, "mlagent"),
            "EDGEML_TRUSTED_KEYS": f"image-test={public_key_to_b64(key.public_key())}",
            "EDGEML_WATCH_DIR": str(releases),
        }
    )


def run_container(
    image: Image, deployment: Deployment, recipe: Recipe | None = None
) -> subprocess.Popen[bytes]:
    """`docker run -v store:VOLUME -e <deployment env> IMAGE`, replayed.

    The image's environment plus the deployment's, and the volume as working directory:
    `python -m` puts the cwd first on sys.path, and the repository's source tree there would
    hide a package missing from the installed wheel.
    """
    recipe = recipe or image.recipe
    argv = [image.paths(a) for a in recipe.argv()]
    ports = [int(p) for p in recipe.runtime.last("EXPOSE").args.split()]
    busy = [p for p in ports if not _port_free(p)]
    if busy:
        pytest.fail(f"ports {busy} are taken on this machine; the image's ports are fixed")
    # A file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it.
    with image.log.open("wb") as log:
        return subprocess.Popen(
            argv,
            cwd=image.volume,
            env={**image.environment(), **deployment.environment},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(image: Image, process: subprocess.Popen[bytes], deadline_s: float = 60.0) -> None:
    """Run the HEALTHCHECK command until it exits 0, as Docker does, or the server dies."""
    command, timeout = image.recipe.healthcheck()
    argv = [image.paths(a) for a in command]
    env = image.environment()
    last = ""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RecipeError(
                f"the entry point exited {process.returncode} before it was healthy:\n"
                f"{image.log.read_text(errors='replace')[-4000:]}"
            )
        try:
            done = subprocess.run(
                argv,
                env=env,
                cwd=image.volume,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            last = f"HEALTHCHECK timed out after {timeout} s"
        else:
            if done.returncode == 0:
                return
            last = done.stderr[-1000:]
        time.sleep(0.25)
    raise RecipeError(f"HEALTHCHECK never passed within {deadline_s} s; last: {last}")


def stop(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match is not None, requirement
        names.add(_normalise(match[0]))
    return names


def cloud_and_dev_packages() -> set[str]:
    """Everything the extras name that the default dependencies do not."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {
        n for group in project["optional-dependencies"].values() for n in _requirement_names(group)
    }
    return extras - _requirement_names(project["dependencies"]) - {_normalise(project["name"])}


def installed(image: Image) -> dict[str, dict[str, str]]:
    done = subprocess.run(
        [str(image.venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        env=image.environment(),
        cwd=image.volume,
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[dict[str, str]] = json.loads(done.stdout)
    return {_normalise(row["name"]): row for row in rows}


# --- tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return Recipe.parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def image(recipe: Recipe, tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(recipe, tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """The IoT Edge hub the module connects to (this project's offline simulator)."""
    with Simulator.start(
        REPO / "deployment" / "deployment.template.json",
        run_dir=tmp_path_factory.mktemp("hub"),
        host=pick_loopback_host(),
    ) as simulator:
        yield simulator


@pytest.mark.parametrize(
    ("dockerignore", "path", "ignored"),
    [
        ("*\n!agent/", "agent/serving/engine.py", False),
        ("*\n!agent/", "deployment/publish.py", True),
        ("*\n!agent/\n**/__pycache__", "agent/__pycache__/engine.pyc", True),
        ("**/__pycache__", "__pycache__/x.pyc", True),  # `**/` matches no directory too
        ("*.md\n!README.md", "README.md", False),
        ("*.md\n!README.md", "NOTES.md", True),
        ("docs", "docs/a/b.txt", True),  # an ignored directory takes its files along
        ("*/tmp", "a/b/tmp", False),  # `*` does not cross a slash
        ("# *", "agent/serving/engine.py", False),
    ],
)
def test_dockerignore_matching_follows_docker(dockerignore: str, path: str, ignored: bool) -> None:
    assert is_ignored(path, dockerignore_rules(dockerignore)) is ignored


@pytest.mark.parametrize(
    ("line", "before", "after"),
    [
        ('A=1 B="x y"', {}, {"A": "1", "B": "x y"}),
        ('PATH="/opt/venv/bin:$PATH"', {"PATH": "/usr/bin"}, {"PATH": "/opt/venv/bin:/usr/bin"}),
        ("P=${HOME}/x", {"HOME": "/h"}, {"P": "/h/x"}),
        ("K legacy form value", {}, {"K": "legacy form value"}),
    ],
)
def test_env_lines_parse_and_expand_like_docker(
    line: str, before: dict[str, str], after: dict[str, str]
) -> None:
    assert parse_env(line, before) == after


def test_parser_joins_continuations_skips_comments_and_reads_flags() -> None:
    stages = parse_dockerfile(
        "FROM a AS one\nRUN x \\\n# a comment inside\n    y\n"
        'FROM b\nCOPY --from=one /v /v\nHEALTHCHECK --timeout=3s CMD ["true"]\n'
    )
    assert [(s.base, s.name) for s in stages] == [("a", "one"), ("b", None)]
    assert stages[0].last("RUN").args == "x y"
    assert stages[1].last("COPY").flags == {"from": "one"}
    assert stages[1].last("HEALTHCHECK").flags == {"timeout": "3s"}
    assert stages[1].last("HEALTHCHECK").args == 'CMD ["true"]'


def test_both_stages_start_from_python_slim_matching_the_test_interpreter(recipe: Recipe) -> None:
    """The replay uses this interpreter as the base image's `python`: they must agree."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert recipe.builder.base == recipe.runtime.base == f"python:{version}-slim"


def test_runtime_stage_runs_as_a_non_root_user(recipe: Recipe) -> None:
    user = recipe.runtime.last("USER").args.split(":")[0]
    assert user not in {"root", "0"}


def test_runtime_stage_declares_ports_volume_and_healthcheck(recipe: Recipe) -> None:
    assert recipe.runtime.last("EXPOSE").args.split() == ["8000", "9600"]
    assert recipe.volume == "/var/lib/edge-agent"
    command, _ = recipe.healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8000/v2/health/live" in command[2]


def test_environment_defaults_agree_with_ports_and_volume(recipe: Recipe) -> None:
    env = recipe.env_defaults()
    assert (env["EDGEML_HTTP_PORT"], env["EDGEML_METRICS_PORT"]) == ("8000", "9600")
    assert env["EDGEML_STATE_DIR"] == recipe.volume
    assert env["EDGEML_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith(recipe.venv + "/bin:")


def test_builder_installs_the_project_without_extras(recipe: Recipe) -> None:
    installs = [r.args for r in recipe.builder.all("RUN") if "pip install" in r.args]
    assert installs, "the builder must pip install the project"
    assert all("[" not in command for command in installs), installs


def test_dockerignore_keeps_only_the_device_packages() -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    assert not is_ignored("agent/serving/engine.py", rules)
    assert not is_ignored("pyproject.toml", rules)
    assert not is_ignored("README.md", rules)
    for ignored in (
        ".venv/bin/python",
        ".git/HEAD",
        "deployment/x.py",
        "tests/t.py",
        "agent/__pycache__/a.pyc",
    ):
        assert is_ignored(ignored, rules), ignored


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_image_installs_no_cloud_or_dev_packages(image: Image) -> None:
    packages = installed(image)
    assert "edge-mlops-agent" in packages
    assert "editable_project_location" not in packages["edge-mlops-agent"]
    leaked = cloud_and_dev_packages() & packages.keys()
    assert not leaked, f"cloud/dev packages in the device image: {sorted(leaked)}"
    probe = (
        "import importlib.util as u;"
        "print([m for m in ('deployment', 'simulator', 'bench', 'demo') if u.find_spec(m)])"
    )
    done = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", probe],
        env=image.environment(),
        cwd=image.volume,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_entry_point_connects_becomes_healthy_serves_a_release_and_exits_zero_on_sigterm(
    image: Image, hub: Simulator
) -> None:
    process = run_container(image, deployment_for(image, hub))
    try:
        wait_healthy(image, process)
        body = {
            "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]
        }
        request = urllib.request.Request(
            "http://127.0.0.1:8000/v2/models/tiny/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 30
        # Live comes before the model: the release installs after the port is up (404 until
        # the name exists, 503 until it is ready).
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = json.load(response)
                break
            except urllib.error.HTTPError as error:
                if error.code not in (404, 503) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert answer["outputs"][0]["shape"] == [1, 8]
        wait_until(lambda: hub.is_connected(hub.device_id, "mlagent"), 30)
    finally:
        code = stop(process)
    assert code == 0, image.log.read_text(errors="replace")[-4000:]


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_a_wrong_module_in_the_entry_point_fails_the_replay(image: Image, hub: Simulator) -> None:
    """The replay really runs the recipe's command: a typo there is caught, not papered over."""
    broken = image.recipe.runtime.last("ENTRYPOINT")
    mutated = replace(broken, args=broken.args.replace('"module"', '"modlue"'))
    assert mutated != broken
    runtime = replace(
        image.recipe.runtime,
        instructions=tuple(
            mutated if i is broken else i for i in image.recipe.runtime.instructions
        ),
    )
    process = run_container(
        image, deployment_for(image, hub), replace(image.recipe, runtime=runtime)
    )
    try:
        with pytest.raises(RecipeError, match="exited 1 before it was healthy"):
            wait_healthy(image, process)
    finally:
        stop(process)


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_a_missing_dependency_fails_the_replay(tmp_path: Path, hub: Simulator) -> None:
    """`pip install --no-deps .` builds fine and must still be caught at start."""
    text = DOCKERFILE.read_text().replace(
        "/opt/venv/bin/pip install .", "/opt/venv/bin/pip install --no-deps ."
    )
    assert "--no-deps" in text
    broken = build(Recipe.parse(text), tmp_path)
    process = run_container(broken, deployment_for(broken, hub))
    try:
        with pytest.raises(RecipeError, match="ModuleNotFoundError"):
            wait_healthy(broken, process)
    finally:
        stop(process)
