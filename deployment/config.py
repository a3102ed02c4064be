"""Named environments (simulator, staging, production) and where their secrets come from.

One TOML file maps each environment to its endpoints, none of which is secret::

    [environments.simulator]
    hub = "127.0.0.1:8443"                     # informational; the connection string decides
    mlflow_tracking_uri = "sqlite:///run/mlflow.db"
    storage_container = "models"
    audit_log = "run/audit.jsonl"
    module = "mlagent"
    sas_hours = 48
    secrets_dir = "run/secrets"                # optional
    [environments.simulator.rings]             # ordered: the rollout follows this order
    canary = "tags.ring = 'canary'"
    all = "tags.fleet = 'edgeml'"

Secrets never live in that file. Each is read, first match wins, from
  1. the environment variable itself (``IOTHUB_CONNECTION_STRING``),
  2. a file named by ``<VARIABLE>_FILE`` (``IOTHUB_CONNECTION_STRING_FILE=/run/secrets/hub``),
  3. ``<secrets_dir>/<variable in lower case>`` when the environment names a ``secrets_dir``.
A missing secret is an error naming all three places. The variable names are not ``EDGEML_*``
on purpose: the agent refuses unknown ``EDGEML_*`` names, and a shell that runs both must work.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from deployment.errors import PublisherError, Reason

CONFIG_VARIABLE = "PUBLISHER_CONFIG"
ENVIRONMENT_VARIABLE = "PUBLISHER_ENV"
DEFAULT_CONFIG_FILE = Path("edgeml.toml")

# Names of variables, not values (S105 sees "secret" in the name).
HUB_SECRET = "IOTHUB_CONNECTION_STRING"  # noqa: S105
STORAGE_SECRET = "AZURE_STORAGE_CONNECTION_STRING"  # noqa: S105 -- the Azure SDK samples' name
# The PEM itself; usually PUBLISHER_SIGNING_KEY_FILE names its 0600 file.
SIGNING_KEY_SECRET = "PUBLISHER_SIGNING_KEY"  # noqa: S105

RingName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,30}$")]


class Environment(BaseModel):
    """Endpoints of one environment; relative paths are relative to the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hub: str = ""
    mlflow_tracking_uri: str = Field(min_length=1)
    storage_container: str = Field("models", pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")
    audit_log: Path = Path("audit.jsonl")
    module: str = Field("mlagent", pattern=r"^[A-Za-z0-9$][A-Za-z0-9._-]{0,63}$")
    sas_hours: float = Field(48.0, gt=0, le=24 * 365)
    secrets_dir: Path | None = None
    hub_ca_file: Path | None = None  # a private CA the hub's TLS certificate chains to
    # A lab (the simulator, a test bench): plain-http artifact URLs are signed with a warning.
    # Elsewhere they are refused, since devices fetch only https unless a host is allow-listed.
    lab: bool = False
    # How long a command keeps retrying a failing Blob storage endpoint (a line per retry).
    storage_retry_seconds: float = Field(20.0, gt=0, le=600)
    # "MODULE:VARIABLE": ring layers also set that module's variable to the ring's name (a
    # `$edgeAgent` path in each layer; the simulator takes any `$edgeAgent` content for a base
    # deployment, so this is off by default and not exercised against it).
    ring_variable: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}:[A-Za-z_][A-Za-z0-9_]{0,63}$"
    )
    rings: dict[RingName, Annotated[str, StringConstraints(min_length=1, max_length=2048)]] = Field(
        default_factory=dict
    )


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    environments: dict[str, Environment] = Field(min_length=1)


@dataclass(frozen=True)
class Resolved:
    """One environment of one config file, its paths made absolute."""

    name: str
    env: Environment
    base_dir: Path

    def path(self, value: Path) -> Path:
        return value if value.is_absolute() else self.base_dir / value

    @property
    def audit_log(self) -> Path:
        return self.path(self.env.audit_log)

    @property
    def mlflow_tracking_uri(self) -> str:
        # sqlite:///relative.db is relative to the config file, not to the caller's directory.
        uri = self.env.mlflow_tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(self.path(Path(uri.removeprefix(prefix))))
        return uri


# A config file is a few environments of a dozen settings each.
MAX_CONFIG_BYTES = 1024 * 1024


def _validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:3]
    )


def load(
    config: Path | None, environment: str | None, environ: Mapping[str, str] = os.environ
) -> Resolved:
    """The named environment of the config file (flags, then variables, then defaults)."""
    path = config or Path(environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG_FILE)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise PublisherError(
                Reason.CONFIG,
                f"config file {str(path)!r} is over the limit of {MAX_CONFIG_BYTES} bytes",
            )
        raw = tomllib.loads(data.decode("utf-8"))
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise PublisherError(
            Reason.CONFIG, f"config file {str(path)!r}: arrays or tables nested too deep"
        ) from None
    except FileNotFoundError as e:
        raise PublisherError(
            Reason.CONFIG,
            f"no config file {str(path)!r} (give --config or set {CONFIG_VARIABLE})",
        ) from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PublisherError(Reason.CONFIG, f"config file {str(path)!r}: {e}") from e
    try:
        parsed = ConfigFile.model_validate(raw)
    except ValidationError as e:
        raise PublisherError(
            Reason.CONFIG, f"config file {str(path)!r}: {_validation_message(e)}"
        ) from e
    name = environment or environ.get(ENVIRONMENT_VARIABLE)
    if not name:
        if len(parsed.environments) != 1:
            raise PublisherError(
                Reason.CONFIG,
                f"several environments ({', '.join(sorted(parsed.environments))}): "
                f"give --env or set {ENVIRONMENT_VARIABLE}",
            )
        name = next(iter(parsed.environments))
    if name not in parsed.environments:
        raise PublisherError(
            Reason.CONFIG,
            f"no environment {name!r} in {str(path)!r} "
            f"(known: {', '.join(sorted(parsed.environments))})",
        )
    return Resolved(name, parsed.environments[name], path.resolve().parent)


_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def secret(
    variable: str,
    resolved: Resolved | None,
    environ: Mapping[str, str] = os.environ,
    *,
    owner_only: bool = False,
) -> str:
    """A secret by the documented precedence; its value is never part of an error.

    ``owner_only``: a file holding it must not be readable or writable by group or others
    (a private key, as ssh demands of its own).
    """
    if not _VARIABLE.fullmatch(variable):
        raise ValueError(f"not a variable name: {variable!r}")
    direct = environ.get(variable)
    if direct:
        return direct.strip()
    places = [f"set {variable}"]
    file_variable = f"{variable}_FILE"
    from_file = environ.get(file_variable)
    if from_file:
        return _read_secret_file(Path(from_file), file_variable, owner_only=owner_only)
    places.append(f"set {file_variable} to a file holding it")
    if resolved is not None and resolved.env.secrets_dir is not None:
        candidate = resolved.path(resolved.env.secrets_dir) / variable.lower()
        if candidate.is_file():
            return _read_secret_file(candidate, "secrets_dir", owner_only=owner_only)
        places.append(f"create {candidate}")
    where = f" for environment {resolved.name!r}" if resolved is not None else ""
    raise PublisherError(
        Reason.SECRET_MISSING, f"missing secret {variable}{where}: " + ", or ".join(places)
    )


def exposed_mode(mode: int) -> bool:
    """Whether a file mode lets group or others at the file (pure)."""
    return bool(mode & 0o077)


def _read_secret_file(path: Path, source: str, *, owner_only: bool = False) -> str:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if owner_only and exposed_mode(mode):
            raise PublisherError(
                Reason.KEY_INVALID,
                f"the secret file {str(path)!r} ({source}) is accessible by others "
                f"(mode {mode:04o}): run chmod 600 {shlex.quote(str(path))}",
            )
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise PublisherError(
            Reason.SECRET_MISSING, f"cannot read the secret file {str(path)!r} ({source}): {e}"
        ) from e
    if not value:
        raise PublisherError(Reason.SECRET_MISSING, f"secret file {str(path)!r} is empty")
    return value
