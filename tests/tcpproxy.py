"""A TCP proxy between a node and the broker that can hold back the broker's answers.

With the answers held, everything the node sends still reaches the broker (its publish is
routed and queued) but nothing comes back: no publisher confirm, no delivery. That is the
window between an outbox commit and the broker's confirm, opened on purpose and for as long
as a test needs — without a fault hook in the node's code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit


class HoldingProxy:
    """``127.0.0.1:port`` → ``target``; :meth:`hold` stops broker → client traffic."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: bytes each client connection sent upstream, in connection order
        self.sent: list[bytearray] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers += [client_w, broker_w]
        record = bytearray()
        self.sent.append(record)
        up = asyncio.create_task(self._pump(client_r, broker_w, record, held=False))
        down = asyncio.create_task(self._pump(broker_r, client_w, None, held=True))
        self._tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        # one side closed (e.g. the node was killed): close both, as a network would
        for task in (up, down):
            task.cancel()
        for writer in (client_w, broker_w):
            writer.close()
        self._tasks -= {up, down}

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    record: bytearray | None, *, held: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if record is not None:
                record += data
            if held:
                await self._flowing.wait()
            writer.write(data)
            await writer.drain()


def via_proxy(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's (user and vhost kept)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))


@contextlib.asynccontextmanager
async def proxied(amqp_url: str) -> AsyncIterator[tuple[HoldingProxy, str]]:
    """A started proxy in front of the broker at ``amqp_url``, and the URL through it;
    released and closed on the way out."""
    broker = urlsplit(amqp_url)
    proxy = HoldingProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    await proxy.start()
    try:
        yield proxy, via_proxy(amqp_url, proxy.port)
    finally:
        proxy.release()
        await proxy.close()
