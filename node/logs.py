"""Log set-up: structlog JSON lines for machines, readable lines on a terminal.

Every event carries its fields (message id, certificate number, partner, state) as keys,
so operators can filter the JSON with ``jq`` and collectors index them as-is.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(*, json_logs: bool | None = None, level: str | None = None) -> None:
    """JSON unless stderr is a terminal; ``KPX_LOG_FORMAT=json|console`` and
    ``KPX_LOG_LEVEL`` override."""
    fmt = os.environ.get("KPX_LOG_FORMAT")
    if json_logs is None:
        json_logs = fmt == "json" if fmt else not sys.stderr.isatty()
    level_name = (level or os.environ.get("KPX_LOG_LEVEL") or "INFO").upper()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_logs
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
