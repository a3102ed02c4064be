"""The device image, built from the repository's Dockerfile by a real Docker engine.

    python -m deployment.image.build build [--tag TAG]     # what `make image` runs

Where no engine runs, `dockerd` is started (no bridge, no iptables: containers use the host's
network) and stopped again afterwards. The Dockerfile's base (`python:3.11-slim`) is pulled where
a registry is reachable; where none is, a stand-in is made from Debian packages with
debootstrap (bookworm's python3 is 3.11, the slim image's Debian release) from the machine's
own apt mirror, and tagged with the base's name, so the Dockerfile stays exactly what
production builds. The stand-in carries the host's CA bundle, and the build gets the host pip's
index settings as build arguments, so pip inside the build reaches PyPI the way the host does.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deployment.image.docker import SHARED_DIR, Docker, ImageError, locked, running_engine

REPO = Path(__file__).resolve().parents[2]
IMAGE_NAME = "edge-mlops-agent"
# The Debian release of python:3.11-slim, whose python3 is 3.11 too.
SUITE = "bookworm"
# Where Debian and the slim image keep the CA bundle that pip is pointed at inside the build.
IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
STAND_IN_LABEL = "org.edge-mlops.stand-in"
# pip options that make sense inside the build: where packages come from and how to trust it.
# Paths on the host (find-links, file:// indexes, constraint files) do not exist in there.
_PIP_OPTIONS = ("index-url", "extra-index-url", "trusted-host", "default-timeout")

BaseSource = Literal["present", "pulled", "stand-in"]


# --- pure helpers -----------------------------------------------------------------------------


def project_version(pyproject: str) -> str:
    version = tomllib.loads(pyproject)["project"]["version"]
    if not isinstance(version, str) or not version:
        raise ImageError("bad_pyproject", "pyproject.toml has no project.version")
    return version


def _stages(dockerfile: str) -> Iterator[tuple[str, str | None]]:
    """Each stage's `FROM` image and its name (None for an unnamed stage), in order."""
    for line in dockerfile.splitlines():
        words = line.split()
        if len(words) < 2 or words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        yield args[0], args[2] if len(args) >= 3 and args[1].upper() == "AS" else None


def base_images(dockerfile: str) -> list[str]:
    """The images the Dockerfile's stages start from (not its own stages), in order."""
    stages: set[str] = set()
    bases: list[str] = []
    for image, name in _stages(dockerfile):
        if name is not None:
            stages.add(name)
        if image not in stages and image not in bases:
            bases.append(image)
    return bases


def named_stages(dockerfile: str) -> list[str]:
    """The Dockerfile's named stages, in order."""
    return [name for _, name in _stages(dockerfile) if name is not None]


def debian_mirror(sources: Iterable[str], suite: str = SUITE) -> str:
    """The first http(s) archive URL that serves `suite`, from apt's sources (one-line `deb`
    entries or deb822 stanzas); security and updates archives do not carry the base system."""
    for text in sources:
        for uris, suites in _apt_entries(text):
            if suite in suites:
                for uri in uris:
                    if uri.startswith(("http://", "https://")):
                        return uri.rstrip("/")
    raise ImageError("no_mirror", f"no apt source serves Debian {suite} over http(s)")


def _apt_entries(text: str) -> Iterator[tuple[list[str], list[str]]]:
    stanza: dict[str, str] = {}
    for raw in [*text.splitlines(), ""]:
        if raw.lstrip().startswith("#"):
            continue  # a comment inside a deb822 stanza does not end it
        line = raw.split("#", 1)[0].strip()
        if line.startswith("deb "):
            words = re.sub(r"\[[^]]*\]", " ", line).split()[1:]  # without [options]
            if len(words) >= 2:
                yield [words[0]], [words[1]]
            continue
        if not line:
            if "deb" in stanza.get("types", "").split() and stanza.get("enabled") != "no":
                yield stanza.get("uris", "").split(), stanza.get("suites", "").split()
            stanza = {}
            continue
        key, sep, value = line.partition(":")
        if sep and not raw[:1].isspace():
            stanza[key.strip().lower()] = value.strip()


def parse_pip_config(listing: str) -> dict[str, str]:
    """`pip config list` output as {option: value}; environment variables (`:env:`) win."""
    values: dict[str, str] = {}
    from_env: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep or "." not in key:
            continue
        scope, _, option = key.rpartition(".")
        unquoted = shlex.split(value)
        text = " ".join(unquoted)
        (from_env if scope == ":env:" else values)[option] = text
    return values | from_env


def pip_build_args(pip_config: Mapping[str, str], *, stand_in: bool) -> dict[str, str]:
    """The `--build-arg`s (PIP_* variables) that give pip in the build the host's index.

    Only network indexes pass: a file:// index is a path on the host. PIP_CERT only with the
    stand-in base, which carries the host's CA bundle at IMAGE_CA_BUNDLE.
    """
    args: dict[str, str] = {}
    for option in _PIP_OPTIONS:
        value = pip_config.get(option, "")
        if option.endswith("index-url"):
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
        if value:
            args["PIP_" + option.upper().replace("-", "_")] = value
    if stand_in and pip_config.get("cert"):
        args["PIP_CERT"] = IMAGE_CA_BUNDLE
    return args


def size_bytes(text: str) -> int:
    """A size as the Docker CLI prints it ("215MB", "57.3MiB", "512kB", "0B") in bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kKMGT]?i?B)\s*", text)
    if match is None:
        raise ImageError("bad_size", f"not a size: {text!r}")
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    units |= {"KiB": 1024, "kiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
    return round(float(match[1]) * units[match[2]])


# --- the base image -------------------------------------------------------------------------


@dataclass(frozen=True)
class StandIn:
    """How to make a Debian stand-in for a python:3.11-slim base."""

    mirror: str
    ca_bundle: Path
    suite: str = SUITE
    debootstrap: str = "debootstrap"


def read_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[str]:
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    return [
        f.read_text()
        for f in files
        if f.is_file() and (f.name == "sources.list" or f.suffix in {".list", ".sources"})
    ]


def ensure_base(
    docker: Docker, base: str, stand_in: Callable[[], StandIn], work_dir: Path
) -> BaseSource:
    """`base` in the engine: already there, pulled, or made from Debian packages."""
    if docker.image_exists(base):
        return "present"
    if docker("pull", "--quiet", base, check=False, timeout_s=120).returncode == 0:
        return "pulled"
    make_stand_in(docker, base, stand_in(), work_dir)
    return "stand-in"


def make_stand_in(docker: Docker, tag: str, recipe: StandIn, work_dir: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="stand-in-", dir=work_dir))
    try:
        done = subprocess.run(
            [
                recipe.debootstrap,
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                recipe.suite,
                str(root),
                recipe.mirror,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            raise ImageError(
                "debootstrap_failed", f"debootstrap exited {done.returncode}: {done.stdout[-2000:]}"
            )
        # The slim image's names: `python` on PATH and its CA bundle (here, the host's).
        (root / "usr/bin/python").symlink_to("python3")
        shutil.copyfile(recipe.ca_bundle, root / IMAGE_CA_BUNDLE.lstrip("/"))
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-c", "."],
            capture_output=True,
            timeout=600,
            check=True,
        )
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
            f"LABEL {STAND_IN_LABEL}=debootstrap-{recipe.suite}",
        ]
        flags = [a for change in changes for a in ("--change", change)]
        imported = subprocess.run(
            [docker.binary, "import", *flags, "-", tag],
            input=tar.stdout,
            capture_output=True,
            timeout=600,
            check=False,
        )
        if imported.returncode != 0:
            raise ImageError("import_failed", imported.stderr.decode(errors="replace")[-2000:])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def is_stand_in(docker: Docker, ref: str) -> bool:
    labels = docker(
        "image", "inspect", "--format", "{{json .Config.Labels}}", ref, check=False, timeout_s=30
    ).stdout
    return STAND_IN_LABEL in labels


# --- the build ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    tag: str
    image_id: str
    bases: dict[str, BaseSource]
    stand_in: bool  # a base is the Debian stand-in (made now or by an earlier build)
    seconds: float


@dataclass(frozen=True)
class Builder:
    """`docker build` of the repository's Dockerfile, with the host's pip settings."""

    docker: Docker
    context: Path = REPO
    pip_config: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def build(self, tag: str, work_dir: Path, stand_in: Callable[[], StandIn]) -> BuildResult:
        started = time.monotonic()
        dockerfile = (self.context / "Dockerfile").read_text()
        # Two sessions missing the base at once would both debootstrap it: one at a time.
        with locked(SHARED_DIR / "base.lock"):
            bases = {
                b: ensure_base(self.docker, b, stand_in, work_dir) for b in base_images(dockerfile)
            }
        uses_stand_in = any(is_stand_in(self.docker, b) for b in bases)
        args = pip_build_args(self.pip_config, stand_in=uses_stand_in)
        # The host's network: the build's pip reaches the index as the host does (loopback
        # proxies included), and an engine without a bridge has no other network to give.
        build = [
            "build",
            "--network=host",
            *(f"--build-arg={k}={v}" for k, v in sorted(args.items())),
        ]
        # Each named stage is tagged on its own, and the image its tag held before is removed:
        # the engine keeps one copy of the stage as the next build's cache, not an untagged
        # image per build.
        for stage in named_stages(dockerfile):
            cache = f"{IMAGE_NAME}:cache-{stage}"
            replaced = self._image_id(cache)
            self.docker(*build, "--target", stage, "--tag", cache, str(self.context))
            if replaced is not None and replaced != self._image_id(cache):
                self.docker("rmi", replaced, check=False)  # a parent of another image: kept
        labels = [f"--label={k}={v}" for k, v in sorted(self.labels.items())]
        self.docker(*build, *labels, "--tag", tag, str(self.context))
        image_id = self.docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
        return BuildResult(tag, image_id, bases, uses_stand_in, time.monotonic() - started)

    def _image_id(self, ref: str) -> str | None:
        found = self.docker("image", "inspect", "--format", "{{.Id}}", ref, check=False)
        return found.stdout.strip() if found.returncode == 0 else None


def host_pip_config(python: str = sys.executable) -> dict[str, str]:
    done = subprocess.run(
        [python, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return parse_pip_config(done.stdout)


def default_stand_in() -> StandIn:
    """The machine's own Debian mirror and the CA bundle the host's pip trusts."""
    cert = host_pip_config().get("cert") or os.environ.get("SSL_CERT_FILE") or IMAGE_CA_BUNDLE
    return StandIn(mirror=debian_mirror(read_apt_sources()), ca_bundle=Path(cert))


def default_tag() -> str:
    return f"{IMAGE_NAME}:{project_version((REPO / 'pyproject.toml').read_text())}"


def build_default(
    docker: Docker, tag: str, work_dir: Path, labels: Mapping[str, str] | None = None
) -> BuildResult:
    builder = Builder(docker, REPO, host_pip_config(), dict(labels or {}))
    return builder.build(tag, work_dir, default_stand_in)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployment.image.build", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the device image from the Dockerfile")
    build.add_argument("--tag", default=None, help=f"default {IMAGE_NAME}:<project version>")
    build.add_argument("--work-dir", type=Path, default=REPO / "run" / "image")
    args = parser.parse_args(argv)
    docker = Docker()
    work_dir: Path = args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with running_engine(docker, work_dir / "dockerd.log") as engine:
            if engine.started_here:
                print(f"image: started dockerd (log in {work_dir / 'dockerd.log'})")
            result = build_default(docker, args.tag or default_tag(), work_dir)
    except ImageError as error:
        print(f"image: {error.reason}: {error}", file=sys.stderr)
        return 1
    for base, source in result.bases.items():
        how = {
            "present": "already in the engine",
            "pulled": "pulled from its registry",
            "stand-in": "unreachable: made a Debian stand-in with debootstrap",
        }[source]
        stand_in = " (the Debian stand-in)" if result.stand_in else ""
        print(f"image: base {base}{stand_in}: {how}")
    print(f"image: built {result.tag} ({result.image_id[:19]}) in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
