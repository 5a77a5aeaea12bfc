"""Helpers for the API and console tests: nodes with tokens, served by an aiohttp server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from node.evidence import OPERATOR
from node.network import create_network
from node.service import Node, now_ms
from node.store import Store, StoreError
from node.tokens import Role, Tokens
from node.web import mount_web
from node.webcontext import WebContext
from protocol import ParticipantStatus


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


@contextlib.asynccontextmanager
async def served_pair(directory: Path, others: Sequence[tuple[str, ParticipantStatus]] = ()
                      ) -> AsyncIterator[tuple[Served, Served]]:
    """ZA and IN, each served with its tokens; no broker (messages are carried by hand)."""
    network = create_network(directory, ["ZA", "IN"], ["amqp://127.0.0.1:1/"],
                             others=others)
    served = (await serve(Node.open(network.configs["ZA"])),
              await serve(Node.open(network.configs["IN"])))
    try:
        yield served
    finally:
        for s in served:
            await s.client.close()
            s.node.close()


def refuse_operator_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every store refuse the evidence log's operator entries (who called what), as
    a database locked by another process would, and take every other entry: an action's
    own evidence goes in."""
    original = Store.append_evidence

    def locked(self: Store, direction: str, *args: Any, **kwargs: Any) -> Any:
        if direction == OPERATOR:
            raise StoreError("database is locked")
        return original(self, direction, *args, **kwargs)
    monkeypatch.setattr(Store, "append_evidence", locked)
