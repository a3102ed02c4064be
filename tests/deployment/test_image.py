"""The image tool's pure parts: apt sources, pip settings, the Dockerfile's bases, sizes."""

from __future__ import annotations

import os

import pytest

from deployment.image.build import (
    IMAGE_CA_BUNDLE,
    base_images,
    debian_mirror,
    named_stages,
    parse_pip_config,
    pip_build_args,
    project_version,
    size_bytes,
)
from deployment.image.docker import ImageError, live_leases, process_identity

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.mark.parametrize(
    ("sources", "mirror"),
    [
        ([DEB822], "http://mirror.example/debian"),
        (["deb http://a.example/debian bookworm main\n"], "http://a.example/debian"),
        (
            ["deb [arch=amd64 signed-by=/k.gpg] https://b.example/debian/ bookworm main"],
            "https://b.example/debian",
        ),
        (
            ["deb http://sec.example/ bookworm-security main", DEB822],
            "http://mirror.example/debian",
        ),
        (["# deb http://old.example/debian bookworm main", DEB822], "http://mirror.example/debian"),
        (
            ["Types: deb-src\nURIs: http://src.example/\nSuites: bookworm\n", DEB822],
            "http://mirror.example/debian",
        ),
        (
            ["Types: deb\nURIs: http://off.example/\nSuites: bookworm\nEnabled: no\n", DEB822],
            "http://mirror.example/debian",
        ),
        (["deb cdrom:[Debian]/ bookworm main", DEB822], "http://mirror.example/debian"),
    ],
)
def test_the_debian_mirror_is_the_first_http_source_of_the_suite(
    sources: list[str], mirror: str
) -> None:
    assert debian_mirror(sources) == mirror


def test_no_source_for_the_suite_is_an_error_naming_it() -> None:
    with pytest.raises(ImageError, match="no apt source serves Debian bookworm"):
        debian_mirror(["deb http://a.example/debian trixie main"])


@pytest.mark.parametrize(
    ("listing", "config"),
    [
        ("global.cert='/etc/ca.pem'\n", {"cert": "/etc/ca.pem"}),
        (
            "global.index-url='https://a/simple'\n:env:.index-url='https://b/simple'\n",
            {"index-url": "https://b/simple"},
        ),
        (
            "global.extra-index-url='file:///x/simple https://c/simple'\n",
            {"extra-index-url": "file:///x/simple https://c/simple"},
        ),
        ("not a line\nsite.timeout='5'\n", {"timeout": "5"}),
        ("", {}),
    ],
)
def test_pip_config_list_parses_with_the_environment_winning(
    listing: str, config: dict[str, str]
) -> None:
    assert parse_pip_config(listing) == config


@pytest.mark.parametrize(
    ("config", "stand_in", "args"),
    [
        ({}, False, {}),
        (
            {"index-url": "https://proxy.example/simple"},
            False,
            {"PIP_INDEX_URL": "https://proxy.example/simple"},
        ),
        # Host paths do not exist inside the build: file:// indexes, find-links, constraints.
        (
            {
                "extra-index-url": "file:///opt/pypi/simple https://extra.example/simple",
                "find-links": "/opt/wheels",
                "constraint": "/etc/c.txt",
            },
            False,
            {"PIP_EXTRA_INDEX_URL": "https://extra.example/simple"},
        ),
        ({"extra-index-url": "file:///opt/pypi/simple"}, False, {}),
        ({"cert": "/etc/ca.pem", "default-timeout": "180"}, False, {"PIP_DEFAULT_TIMEOUT": "180"}),
        ({"cert": "/etc/ca.pem"}, True, {"PIP_CERT": IMAGE_CA_BUNDLE}),
        ({"trusted-host": "proxy.example"}, False, {"PIP_TRUSTED_HOST": "proxy.example"}),
    ],
)
def test_pip_build_args_pass_only_what_works_inside_the_build(
    config: dict[str, str], stand_in: bool, args: dict[str, str]
) -> None:
    assert pip_build_args(config, stand_in=stand_in) == args


@pytest.mark.parametrize(
    ("dockerfile", "bases"),
    [
        ("FROM python:3.11-slim AS builder\nRUN x\nFROM python:3.11-slim\n", ["python:3.11-slim"]),
        ("FROM a AS one\nFROM one AS two\nFROM b\nCOPY --from=two /x /x\n", ["a", "b"]),
        ("from --platform=$BUILDPLATFORM a as build\nFROM build\n", ["a"]),
        ("# FROM commented\nFROM c\n", ["c"]),
    ],
)
def test_base_images_are_the_external_images_of_the_stages(
    dockerfile: str, bases: list[str]
) -> None:
    assert base_images(dockerfile) == bases


@pytest.mark.parametrize(
    ("dockerfile", "stages"),
    [
        ("FROM a AS builder\nFROM a\nCOPY --from=builder /x /x\n", ["builder"]),
        ("FROM a AS one\nFROM one AS two\nFROM b\n", ["one", "two"]),
        ("from --platform=$BUILDPLATFORM a as build\nFROM build\n", ["build"]),
        ("FROM c\n", []),
    ],
)
def test_named_stages_are_the_ones_a_build_can_target(dockerfile: str, stages: list[str]) -> None:
    assert named_stages(dockerfile) == stages


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0B", 0),
        ("512kB", 512_000),
        ("215MB", 215_000_000),
        ("1.5GB", 1_500_000_000),
        ("57.5MiB", 60_293_120),
        ("2GiB", 2 * 1024**3),
    ],
)
def test_docker_cli_sizes_in_bytes(text: str, size: int) -> None:
    assert size_bytes(text) == size


def test_a_size_docker_never_prints_is_an_error() -> None:
    with pytest.raises(ImageError, match="not a size"):
        size_bytes("12 parsecs")


def test_the_project_version_tags_the_image() -> None:
    assert project_version('[project]\nname = "x"\nversion = "1.2.3"\n') == "1.2.3"
    with pytest.raises(ImageError, match=r"project\.version"):
        project_version('[project]\nversion = ""\n')


@pytest.mark.parametrize(
    ("leases", "running", "live"),
    [
        ({}, {}, []),
        ({"101": "b 5", "102": "b 6"}, {101: "b 5"}, ["101"]),
        ({"101": "b 5"}, {101: "b 9"}, []),  # the pid was reused by a later process
        ({"101": "a 5"}, {101: "b 5"}, []),  # left by a session before a reboot
        ({"101": ""}, {101: "b 5"}, []),  # a lease that says nothing holds nothing
        ({"101": "b 5", "lock": "b 5", "x1": "b 5"}, {101: "b 5"}, ["101"]),  # pid-named only
    ],
)
def test_an_engine_lease_counts_while_the_process_that_took_it_runs(
    leases: dict[str, str], running: dict[int, str], live: list[str]
) -> None:
    assert live_leases(leases, identity=running.get) == live


def test_a_process_identity_is_its_boot_and_start_time() -> None:
    mine = process_identity(os.getpid())
    assert mine is not None
    assert mine == process_identity(os.getpid())
    assert mine != process_identity(1)
    assert process_identity(2**22 + 1) is None  # above any pid_max: no such process
