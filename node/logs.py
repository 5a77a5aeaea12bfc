"""Log set-up: structlog JSON lines for machines, readable lines on a terminal.

Every event carries its fields (message id, certificate number, partner, state) as keys,
so operators can filter the JSON with ``jq`` and collectors index them as-is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError

#: marks the stdlib handler configure_logging installed, to replace it (not pytest's)
_OURS = "_kpx_handler"


class _ClientFaults(logging.Filter):
    """aiohttp logs a traceback for every malformed request and every client gone in the
    middle of one: the client's doing, already answered (400) or moot, and anyone who
    reaches the port could fill the log with them. Its own bugs still get logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        return not isinstance(fault, HttpProcessingError | ConnectionError)


class _LogThatCannotStopTheNode(structlog.PrintLogger):
    """A line that cannot be written (a full log disk, a log pipe whose reader has exited)
    is dropped. Written from inside transactions and error handlers, a raising write made
    the node roll back its work, take it for a poison message, and at last stop taking
    deliveries until it was restarted, while its status said OK."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: the stream was closed
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _never_raising_logger(*_args: object) -> _LogThatCannotStopTheNode:
    return _LogThatCannotStopTheNode(file=sys.stderr)


def configure_logging(*, json_logs: bool | None = None, level: str | None = None,
                      default_level: str = "INFO") -> None:
    """JSON unless stderr is a terminal; ``KPX_LOG_FORMAT=json|console`` overrides. The
    level is ``level`` if given, else ``KPX_LOG_LEVEL``, else ``default_level`` (a command
    run by hand logs only warnings unless the operator asks for more)."""
    fmt = os.environ.get("KPX_LOG_FORMAT")
    if json_logs is None:
        json_logs = fmt == "json" if fmt else not sys.stderr.isatty()
    level_name = (level or os.environ.get("KPX_LOG_LEVEL") or default_level).upper()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_logs
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    stamp: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)),
        logger_factory=_never_raising_logger,
        cache_logger_on_first_use=False,
    )
    # The libraries (aiohttp, aio-pika, asyncio) log through the standard library: give
    # their warnings the same format, one line each, so a log collector reads them too.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=stamp,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, _OURS, False)] + [handler]
    root.setLevel(min(logging.WARNING,
                      logging.getLevelNamesMapping().get(level_name, logging.INFO)))
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaults) for f in server.filters):
        server.addFilter(_ClientFaults())
