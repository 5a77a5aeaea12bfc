"""Mounting the HTTP API (``/api/v1``) and the web console (``/console``) onto the node's
aiohttp application (the one that serves /metrics and /healthz)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from node.api import API_PREFIX, api_app
from node.console import CONSOLE_PREFIX, console_app
from node.service import Node
from node.tokens import Tokens
from node.webcontext import (
    ClockAgrees,
    DeadLetterDepth,
    Readiness,
    StatisticsProvider,
    StatusProvider,
    WebContext,
)


def mount_web(app: web.Application, node: Node, directory: Path, *,
              status: StatusProvider | None = None,
              statistics: StatisticsProvider | None = None,
              dead_letter_depth: DeadLetterDepth | None = None,
              clock_agrees: ClockAgrees | None = None,
              readiness: Readiness | None = None) -> WebContext:
    """Serve the API and the console from ``app``; tokens come from ``directory``."""
    context = WebContext(node, Tokens(directory), status=status, statistics=statistics,
                         dead_letter_depth=dead_letter_depth, readiness=readiness)
    if clock_agrees is not None:
        context.clock_agrees = clock_agrees
    async def to_console(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{CONSOLE_PREFIX}/")
    # before the console: its sub-application also takes the bare prefix, and the first
    # resource registered for a path answers it
    app.router.add_get(CONSOLE_PREFIX, to_console)
    app.add_subapp(API_PREFIX, api_app(node, context.tokens, context=context))
    app.add_subapp(CONSOLE_PREFIX, console_app(context))
    return context
