"""`python -m module`: the agent as an Azure IoT Edge module (the container's entry point).

Connects with `IoTHubModuleClient.create_from_edge_environment()`: on a device, through the
IoT Edge workload API (`IOTEDGE_*` variables); for local debugging, through
`EdgeHubConnectionString` and `EdgeModuleCACertificateFile` (as iotedgehubdev and this
project's simulator hand them out). Models come from the module twin (signed manifests), the
store in `EDGEML_STATE_DIR`, and optionally `EDGEML_WATCH_DIR`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from agent.app import App
from agent.logs import configure_logging
from agent.standalone import run_process
from module.connection import HubUnreachable
from module.edge import EdgeModule
from module.settings import ModuleProcessSettings
from wire.version import version_text

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    # No flags of its own: the IoT Edge runtime configures it through the environment. The
    # parser answers --help and --version before any connection setting is required.
    parser = argparse.ArgumentParser(
        prog="python -m module",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=(
            "Settings come from the environment: IOTEDGE_* (on a device) or "
            "EdgeHubConnectionString and EdgeModuleCACertificateFile (local debugging), "
            "EDGEML_* for the agent (EDGEML_STATE_DIR, EDGEML_WATCH_DIR, ...)."
        ),
    )
    parser.add_argument("--version", action="version", version=version_text("module"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _parser().parse_args(argv)
    try:
        process = ModuleProcessSettings.from_environment(
            # Route messages arrive in bursts, and inside the module the SDK's threads take the
            # GIL whenever ONNX Runtime releases it, so a model call costs several times what
            # it does alone (bench/route.py): sharing calls pays even for a tiny model.
            defaults={"coalesce_above_us": 0.0},
        )
        settings, module_settings = process.agent, process.module
    except (ValueError, ValidationError) as error:
        print(f"module: invalid settings: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log.log_level, settings.log.log_format)

    def build() -> App:
        edge = EdgeModule(settings, module_settings)
        return edge.agent.make_app(edge)

    # A hub unreachable past the offline budget ends the process non-zero, without a
    # traceback: the IoT Edge runtime restarts the module.
    return run_process(build, "module", expected=(HubUnreachable,))


if __name__ == "__main__":
    sys.exit(main())
