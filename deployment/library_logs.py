"""The libraries' stdlib logging, routed into the CLI's structlog stream.

Without this, azure-core's ``Incomplete download.`` reaches stderr through logging's last-resort
handler as a bare line, and MLflow's own handler prints a SQLAlchemy traceback beside the
CLI's one-line error. Records become structured events (logger name, no traceback: the
publisher reports what failed as a `PublisherError`); the messages of failures the publisher
reports itself are demoted to debug.
"""

from __future__ import annotations

import logging
import os

import structlog

# Library loggers whose warnings and errors are failures the publisher reports itself, in one
# line with a reason: shown only at --log-level debug.
DEMOTED = (
    "azure.core.pipeline.transport",  # "Incomplete download." before IncompleteReadError
    "mlflow.store.db.utils",  # "SQLAlchemy database error" before MlflowException
)
# Loggers that bring their own stream handler (MLflow sets these up when imported).
OWN_HANDLERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey")


def routed_level(name: str, level: int) -> int:
    """The level a library record is logged at (pure)."""
    if any(name == prefix or name.startswith(prefix + ".") for prefix in DEMOTED):
        return logging.DEBUG
    return level


class StructlogHandler(logging.Handler):
    """Forwards stdlib records to structlog, which filters and renders them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        fields: dict[str, object] = {"library": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = type(record.exc_info[1]).__name__
        structlog.get_logger("library").log(
            routed_level(record.name, record.levelno), message.splitlines()[0][:500], **fields
        )


def route(level: str) -> None:
    """Send every library's records at ``level`` and above through structlog (the CLI only)."""
    # The verbs import MLflow only when they need it, after this ran: told here, it adds no
    # handler of its own on import (one already imported loses it below).
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    handler = StructlogHandler()
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True  # their levels stay: sqlalchemy.engine's SQL is not wanted
