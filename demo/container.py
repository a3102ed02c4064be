"""`make demo ARGS=--container`: the agent module runs from the device image, not as a process.

The module gets what iotedgehubdev gives a module container when debugging locally: the
hub's `EdgeHubConnectionString`, its CA certificate mounted at `EdgeModuleCACertificateFile`,
the deployment's `env`, and a named volume for the model store. The container shares the
host's network (the engine here has no bridge), so it reaches the simulator and Azurite on
their loopback addresses and serves on the demo's ports. Its logs follow into the device's
module.log as they would for the process.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deployment.image.docker import Docker

CERTS_DIR = "/run/edge"  # where the container finds the mounted CA certificates
STATE_DIR = "/var/lib/edge-agent"  # the image's VOLUME
LABEL = "org.edge-mlops.demo=module"


@dataclass
class ModuleContainer:
    docker: Docker
    name: str
    volume: str
    log_follower: subprocess.Popen[bytes]

    def stop(self, grace_s: int = 10) -> int:
        """`docker stop` (SIGTERM, then SIGKILL after the grace); the module's exit code."""
        self.docker("stop", "--time", str(grace_s), self.name, timeout_s=grace_s + 60)
        code = self.docker("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout
        self.log_follower.wait(30)
        return int(code)

    def remove(self) -> None:
        self.docker("rm", "--force", self.name, check=False)
        self.docker("volume", "rm", "--force", self.volume, check=False)
        if self.log_follower.poll() is None:
            self.log_follower.kill()
            self.log_follower.wait(10)


def start_module_container(
    docker: Docker,
    image: str,
    env: Mapping[str, str],
    ca_files: Mapping[str, Path],
    run_dir: Path,
) -> ModuleContainer:
    """Run `image` with `env`; `ca_files` maps a variable (naming a CA file) to the host file
    mounted in the container for it."""
    certs = run_dir.resolve() / "container-certs"  # a bind mount needs an absolute path
    certs.mkdir(parents=True, exist_ok=True)
    certs.chmod(0o755)
    environment = dict(env)
    for variable, source in ca_files.items():
        target = certs / f"{variable.lower()}.pem"
        shutil.copyfile(source, target)
        target.chmod(0o644)  # the image runs as uid 10001
        environment[variable] = f"{CERTS_DIR}/{target.name}"
    suffix = secrets.token_hex(3)
    name, volume = f"edge-mlops-demo-{suffix}", f"edge-mlops-demo-models-{suffix}"
    docker("volume", "create", "--label", LABEL, volume)
    docker(
        "run",
        "--detach",
        "--name",
        name,
        "--label",
        LABEL,
        "--network",
        "host",
        f"--volume={certs}:{CERTS_DIR}:ro",
        f"--volume={volume}:{STATE_DIR}",
        *(f"--env={key}={value}" for key, value in environment.items()),
        image,
    )
    with (run_dir / "module.log").open("wb") as log:
        follower = subprocess.Popen(  # noqa: S603 - the docker CLI, our own container's name
            [docker.binary, "logs", "--follow", name], stdout=log, stderr=subprocess.STDOUT
        )
    return ModuleContainer(docker, name, volume, follower)
