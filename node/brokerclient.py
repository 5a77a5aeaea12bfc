"""Short-lived broker connections for operator commands (status, dead letters).

The running node keeps its own supervised connection (:mod:`node.transport`); a command
run by an operator only needs one connection for a few seconds, with the node's own
configuration (its URLs, so its own broker user), and must say clearly when no broker
answers instead of retrying for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelLockedResource,
    ChannelNotFoundEntity,
)

from node.brokerurl import redact, why_connect_failed
from node.transport import TransportUnavailable, connect

OPERATOR_TIMEOUT = 5.0


@contextlib.contextmanager
def amqp_library_logs_quiet() -> Iterator[None]:
    """The AMQP libraries log a failed connect themselves; a command reports it once, in
    its own words."""
    loggers = [logging.getLogger(name) for name in ("aiormq", "aio_pika")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def connect_any(urls: Sequence[str], timeout: float = OPERATOR_TIMEOUT
                      ) -> tuple[AbstractConnection, str]:
    """The first broker that answers, and its URL without the password."""
    errors = []
    for url in urls:
        try:
            connection = await asyncio.wait_for(connect(url, timeout=timeout),
                                                timeout + 1)
        except Exception as exc:
            errors.append(f"{redact(url)}: {why_connect_failed(url, exc)}")
            continue
        return connection, redact(url)
    raise TransportUnavailable("no broker answered (" + "; ".join(errors) + ")")


@dataclass(frozen=True, slots=True)
class QueueInfo:
    messages: int
    consumers: int


async def queue_info(connection: AbstractConnection, name: str) -> QueueInfo | None:
    """Messages ready and consumers of a queue by passive declare; ``None`` if it does
    not exist (the node never ran against this broker). A channel of its own, because a
    failed passive declare closes the channel."""
    channel: AbstractChannel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        return None
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    result = queue.declaration_result
    return QueueInfo(int(result.message_count or 0), int(result.consumer_count or 0))


async def occupied_queues(urls: Sequence[str], names: Sequence[str]) -> list[str]:
    """Those of ``names`` that exist on the broker with messages ready or consumers, each
    described; raises :class:`TransportUnavailable` (passwords masked) when no broker
    answers."""
    with amqp_library_logs_quiet():
        connection, _ = await connect_any(urls)
    async with connection:
        found = []
        for name in names:
            info = await queue_info(connection, name)
            if info is not None and (info.messages or info.consumers):
                found.append(f"{name} ({info.messages} messages ready, "
                             f"{info.consumers} consumers)")
    return found


class ClaimTaken(Exception):
    """Another connection holds one of the claims; ``args[0]`` lists them."""


@contextlib.asynccontextmanager
async def exclusive_claim(urls: Sequence[str], names: Sequence[str]
                          ) -> AsyncIterator[list[str]]:
    """Hold exclusive queues named ``names`` for the block (:class:`ClaimTaken` when another
    connection holds any of them). They belong to this connection: the broker drops them
    when it ends, even when the process holding it is killed, so no claim outlives its
    holder. Yields the names the broker user may not declare (no claim, no error: a
    user whose permissions cover only kpx's own queues)."""
    with amqp_library_logs_quiet():
        connection, _ = await connect_any(urls)
    async with connection:
        taken, not_permitted = [], []
        for name in names:
            channel = await connection.channel()  # a refused declare closes its channel
            try:
                await channel.declare_queue(name, exclusive=True, auto_delete=True)
            except ChannelLockedResource:
                taken.append(name)
            except ChannelAccessRefused:
                not_permitted.append(name)
        if taken:
            raise ClaimTaken(taken)
        yield not_permitted
