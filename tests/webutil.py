"""Helpers for the API and console tests: nodes with tokens, served by an aiohttp server."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from node.service import Node, now_ms
from node.tokens import Role, Tokens
from node.web import mount_web
from node.webcontext import WebContext


@dataclass
class Served:
    node: Node
    client: TestClient[web.Request, web.Application]
    context: WebContext
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


async def serve(node: Node) -> Served:
    """The node's API and console on a local port, with an officer and a monitor token."""
    directory = node.config.directory
    tokens = Tokens(directory)
    issued = {"officer": tokens.add(f"{node.me.lower()}-officer", Role.OFFICER, now_ms()),
              "monitor": tokens.add(f"{node.me.lower()}-monitor", Role.MONITOR, now_ms())}
    app = web.Application()
    context = mount_web(app, node, directory)
    client = TestClient(TestServer(app))
    await client.start_server()
    return Served(node, client, context, issued)
