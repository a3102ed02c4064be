"""The package version every entry point's ``--version`` prints (one source: the install)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "edge-mlops-agent"


def package_version() -> str:
    """The installed distribution's version; a bare source tree (no install) says so."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+not-installed"


def version_text(program: str) -> str:
    return f"{program} {package_version()}"
