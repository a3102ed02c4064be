"""`python -m module`: the agent as an Azure IoT Edge module (the container's entry point).

Connects with `IoTHubModuleClient.create_from_edge_environment()`: on a device, through the
IoT Edge workload API (`IOTEDGE_*` variables); for local debugging, through
`EdgeHubConnectionString` and `EdgeModuleCACertificateFile` (as iotedgehubdev and this
project's simulator hand them out). Models come from the module twin (signed manifests), the
store in `EDGEML_STATE_DIR`, and optionally `EDGEML_WATCH_DIR`.
"""

from __future__ import annotations

import asyncio
import sys

import structlog
from pydantic import ValidationError

from agent.app import App
from agent.engine import ModelLoadError
from agent.logs import configure_logging
from agent.serving import Agent
from agent.settings import AgentSettings
from agent.store import StoreError
from module.edge import EdgeModule
from module.settings import ModuleSettings

EXIT_USAGE = 2


def main() -> int:
    try:
        module_settings = ModuleSettings.from_environment()
        settings = AgentSettings.from_environment(also_known=ModuleSettings.environment_names())
    except (ValueError, ValidationError) as error:
        print(f"module: invalid settings: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    log = structlog.get_logger("module")
    try:
        agent = Agent(settings)
        edge = EdgeModule(agent, module_settings)
        app = App(agent.services_in_start_order(edge), grace_s=settings.shutdown_grace_s)
        edge.app = app
        asyncio.run(app.run())
    except Exception as error:
        cause: BaseException = error
        while isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
        if not isinstance(cause, ValueError | ModelLoadError | StoreError):
            raise
        # An expected failure (bad settings, unusable store): one clear line, no traceback.
        log.error("module_failed", error=str(cause), error_type=type(cause).__name__)  # noqa: TRY400
        return 1
    log.info("module_stopped", reason=app.stop_reason, failed=app.failed)
    return 1 if app.failed else 0


if __name__ == "__main__":
    sys.exit(main())
