"""The running node's HTTP endpoints (aiohttp): ``/metrics``, ``/healthz``, ``/readyz``.

Served only when ``http_port`` is configured, on ``http_host`` (loopback by default:
metrics and health name partners and volumes, so exposing them is a deliberate act, e.g.
behind a reverse proxy; on loopback they answer only requests naming a loopback host,
:func:`named_hosts_only`). ``http_port = 0`` takes a free port (see ``HttpServer.port``).

Other parts of kpx extend the same application: :func:`build_app` returns the
``web.Application`` before it starts, and a :class:`~node.runner.RunningNode` calls every
function in its ``http_extensions`` list on it, so routes and sub-applications
(``app.add_subapp("/api/v1", api)``) are mounted before the server freezes the app.

* ``/healthz`` — 200 while the process serves requests (liveness: restart when it fails);
* ``/readyz`` — 200 when connected to a broker that does not block its publishes, consuming
  the inbox, the database takes a write and the clock agrees; 503 with the failing checks
  otherwise (readiness: alert, don't restart);
* ``/metrics`` — Prometheus text format, this node's registry only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST

from node.config import host_name
from node.machine import OPEN_STATES, State
from node.runner import LOCK_WAIT_SECONDS
from node.service import now_ms
from node.status import age_bucket, gather_status, store_writable, with_readiness
from node.store import Store, UnreadableRecord, read_apart

if TYPE_CHECKING:
    from node.runner import RunningNode

log = structlog.get_logger("kpx.http")

NODE: web.AppKey[RunningNode] = web.AppKey("kpx_node")
GAUGES: web.AppKey[GaugeReadings] = web.AppKey("kpx_gauges")
#: the state gauges (open loops, outbox, queue depths, readiness) are at most this old
GAUGE_SECONDS = 5.0
#: a scrape asks the broker for queue depths; never let a slow broker stall it
BROKER_QUERY_SECONDS = 2.0
#: a connection that sends no request (or not all of its headers) for this long is closed,
#: as is one that reads nothing of its answers for this long
IDLE_SECONDS = 15.0
#: connections served at once; those beyond are closed as they are accepted
MAX_CONNECTIONS = 256


async def healthz(request: web.Request) -> web.Response:
    running = request.app[NODE]
    return web.json_response({"alive": True, "participant": running.config.participant})


def readiness(running: RunningNode) -> dict[str, bool]:
    transport = running.transport
    node = running.node
    return {
        "broker_connected": transport is not None and transport.connected,
        "consuming": transport is not None and transport.consuming,
        "store_writable": node is not None and running.store_ok
        and store_writable(node, timeout_ms=int(LOCK_WAIT_SECONDS * 1000)),
        "clock_agrees": running.clock_agrees(),
        # a broker low on disk or memory blocks publishers: nothing leaves the outbox
        "publishing_allowed": transport is not None and transport.connected
        and not transport.publishing_blocked,
    }


async def running_status(running: RunningNode) -> dict[str, Any]:
    """``GET /api/v1/status``: what ``kpnode status`` says, and what the node knows of
    itself that the broker cannot show from outside (see :func:`with_readiness`)."""
    assert running.node is not None
    document = await gather_status(running.node, served=True)
    return with_readiness(document, readiness(running))


async def readyz(request: web.Request) -> web.Response:
    checks = readiness(request.app[NODE])
    ready = all(checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def refresh_gauges(running: RunningNode) -> None:
    """Set the state gauges from the store and the broker, just before a scrape."""
    metrics, node, transport = running.metrics, running.node, running.transport
    if node is None:
        return
    now = now_ms()
    metrics.set_outbox([(r, n, oldest) for r, n, oldest, _, _ in node.store.outbox_summary()],
                       now)
    metrics.set_unanswered(node.store.unanswered_summary())
    today = datetime.fromtimestamp(now / 1000, UTC).date()
    # Every open and expired record, parsed: at a hub's size some 170 ms, read apart from
    # the event loop so that a scrape does not hold up the node's deliveries.
    open_loops, expired, unreadable = await read_apart(
        node.store.path, lambda store: loop_counts(store, today))
    metrics.unreadable_records.set(unreadable)
    metrics.set_loops(open_loops, expired)
    checks = readiness(running)
    metrics.broker_connected.set(int(checks["broker_connected"]))
    metrics.consuming.set(int(checks["consuming"]))
    metrics.store_ok.set(int(checks["store_writable"]))
    metrics.publishing_allowed.set(int(checks["publishing_allowed"]))
    metrics.registry_version.set(node.registry.version)
    inbox = dead = -1
    if transport is not None and transport.connected:
        try:
            inbox = (await asyncio.wait_for(transport.inbox_depth(), BROKER_QUERY_SECONDS))[0]
            dead = await asyncio.wait_for(transport.dead_letter_depth(), BROKER_QUERY_SECONDS)
        except Exception as exc:
            # a timeout's text is empty: 'error=' alone said nothing
            log.warning("queue depths not available for /metrics",
                        error=f"{type(exc).__name__}: {exc}".rstrip(": "))
    metrics.inbox_depth.set(inbox)
    metrics.dead_letter_depth.set(dead)


def loop_counts(store: Store, today: date) -> tuple[Counter[tuple[str, str]], Counter[str],
                                                   int]:
    """Open loops by side and age, expired certificates by side, and the records kpx
    cannot read: counted, not a scrape that fails (one row changed outside kpx)."""
    unreadable: list[UnreadableRecord] = []
    records = store.records(states=[*OPEN_STATES, State.EXPIRED], unreadable=unreadable)
    return (Counter((str(r.side), age_bucket(max(0, (today - r.certificate.issued_on).days)))
                    for r in records if r.state in OPEN_STATES),
            Counter(str(r.side) for r in records if r.state is State.EXPIRED),
            len(unreadable))


class GaugeReadings:
    """Refreshes the state gauges at most once per :data:`GAUGE_SECONDS`.

    ``/metrics`` needs no token, and a refresh reads every open record and asks the
    broker: scrapes back to back, by anyone who reaches the port, would otherwise keep
    the event loop (the consumer and the relay with it) busy reading."""

    def __init__(self, running: RunningNode) -> None:
        self.running = running
        self.read_at = -math.inf
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:  # scrapes arriving together share one reading
            if time.monotonic() - self.read_at < GAUGE_SECONDS:
                return
            await refresh_gauges(self.running)
            self.read_at = time.monotonic()


async def metrics_endpoint(request: web.Request) -> web.Response:
    await request.app[GAUGES].refresh()
    return web.Response(body=request.app[NODE].metrics.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


#: what needs no token, and is kept to loopback callers when the server listens there
TOKENLESS = frozenset({"/healthz", "/readyz", "/metrics"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine's
    loopback: ``localhost`` or an address in 127.0.0.0/8 or ::1."""
    name = host.strip().lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def named_hosts_only(allowed: frozenset[str]) -> Middleware:
    """A middleware that answers the token-less endpoints only to a request whose Host is a
    loopback name or one of ``allowed``.

    Listening on loopback keeps the figures (partners, volumes) on this machine, but not
    from a web page that a browser here opens: its own domain, made to resolve to
    127.0.0.1 (DNS rebinding), is then the page's origin, and it reads /metrics like any
    same-origin answer. Such a request still names the page's domain in its Host header;
    Prometheus and probes name 127.0.0.1, localhost, or a name given in
    ``http_allowed_hosts`` (a container's service name, where the server listens on all
    addresses and a port is published to the host's loopback). The API and the console
    need a token or a session cookie, which the page has not, and a proxy in front may
    pass them on with its own name."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in TOKENLESS:
            try:
                host = request.url.host or ""
            except ValueError:  # a Host header that is no host at all
                host = ""
            if not is_loopback(host) and host_name(host) not in allowed:
                names = ", ".join(["127.0.0.1", "::1", "localhost", *sorted(allowed)])
                return web.json_response(
                    {"error": "request.misdirected", "message": f"served to {names} only"},
                    status=421)
        return await handler(request)
    return middleware


#: Headers every answer carries unless its handler chose its own (the console's pages set a
#: policy that lets their nonce'd script run). Nothing the node serves is meant to be framed
#: (clickjacking of the console's forms) or sniffed into another type (a JSON answer quoting
#: a partner's text, read as HTML).
SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


async def add_safe_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` hook: :data:`SAFE_HEADERS`, on error pages too."""
    for name, value in SAFE_HEADERS.items():
        response.headers.setdefault(name, value)


def build_app(running: RunningNode) -> web.Application:
    """The node's application; add routes or sub-applications before it starts."""
    config = running.config
    guarded = is_loopback(config.http_host) or bool(config.http_allowed_hosts)
    app = web.Application(middlewares=[named_hosts_only(frozenset(config.http_allowed_hosts))]
                          if guarded else [])
    app.on_response_prepare.append(add_safe_headers)
    app[NODE] = running
    app[GAUGES] = GaugeReadings(running)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    if running.node is not None:
        from node.web import mount_web  # the API and console: /api/v1, /console

        transport = running.transport
        mount_web(app, running.node, running.config.directory,
                  status=lambda: running_status(running),
                  dead_letter_depth=transport.dead_letter_depth if transport else None,
                  clock_agrees=running.clock_agrees,
                  readiness=lambda: readiness(running))
    return app


def oldest_idle(handlers: Iterable[RequestHandler]) -> RequestHandler | None:
    """The connection that has waited longest for its next request (or for the rest of
    it), or ``None`` when every one is in the middle of answering."""
    # aiohttp keeps no public record of this: a handler holds ``_waiter`` while it waits
    # for a request and ``_next_keepalive_close_time`` from its last answer (or its start).
    # Should those change, nothing counts as idle and the server refuses as before.
    idle = [h for h in handlers
            if (waiter := getattr(h, "_waiter", None)) is not None and not waiter.done()]
    return min(idle, key=lambda h: float(getattr(h, "_next_keepalive_close_time", 0.0)),
               default=None)


class _ReadByPeer(asyncio.Protocol):
    """A served connection, closed when its peer reads nothing of its answers for
    :data:`IDLE_SECONDS`.

    The idle limit ends connections waiting for a request, not those in the middle of an
    answer: a client that pipelines requests (or asks for a large page) and never reads
    the answers kept its connection busy for good, stuck writing, where no limit reached
    it and the slot could not go to a newcomer; :data:`MAX_CONNECTIONS` of them shut
    everyone out. The transport says when its buffer is full (``pause_writing``) and when
    the peer has read it down again (``resume_writing``); in between, the buffer is looked
    at every IDLE_SECONDS, so a slow reader of a long answer keeps its connection as long
    as it reads some. A tail under the high-water mark never pauses writing, yet once the
    connection is closed (the idle limit, an eviction) the close waits to send it, for
    ever if the peer reads nothing: a closing transport with unsent bytes is watched the
    same way. Everything else is the handler's."""

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        self._transport: asyncio.WriteTransport | None = None
        self._stalled: asyncio.TimerHandle | None = None
        self._closing: asyncio.TimerHandle | None = None
        self._unread = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.WriteTransport):
            self._transport = transport
            self._closing = asyncio.get_running_loop().call_later(IDLE_SECONDS,
                                                                  self._closing_tail)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> None:  # None: the transport closes once its peer's half does
        self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()
        self._watch()

    def resume_writing(self) -> None:
        self._stop_watching()
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        self.handler.connection_lost(exc)

    def _closing_tail(self) -> None:
        """Every IDLE_SECONDS: a connection closed with an answer's tail unsent is watched
        like a paused one (its close waits for a peer that may never read)."""
        transport = self._transport
        if transport is None:
            return
        if self._stalled is None and transport.is_closing() \
                and transport.get_write_buffer_size():
            self._watch()
        self._closing = asyncio.get_running_loop().call_later(IDLE_SECONDS,
                                                              self._closing_tail)

    def _watch(self) -> None:
        if self._transport is not None:
            self._unread = self._transport.get_write_buffer_size()
            self._stalled = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._check)

    def _check(self) -> None:
        if self._transport is None:
            return
        if self._transport.get_write_buffer_size() < self._unread:
            self._watch()  # the peer reads, however slowly
        else:
            # abort, not close: a close waits to send what is buffered, which this peer
            # does not take, and the slot stayed held
            self._transport.abort()

    def _stop_watching(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None


class _Refused(asyncio.Protocol):
    """A connection over :data:`MAX_CONNECTIONS`: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class HttpServer:
    """Serves one application on host:port until stopped.

    Anyone who reaches the port can open connections before any token is checked, so
    their number and their idle time are bounded: aiohttp by itself keeps a connection
    that sends nothing, or half a request, for an hour (and one whose answers are never
    read for ever: :class:`_ReadByPeer`), and enough of them use up the process's file
    descriptors, the broker connection's and the database's included."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.refused = 0
        self.evicted = 0
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_SECONDS)
        self._listening: asyncio.Server | None = None

    async def start(self) -> None:
        await self._runner.setup()
        server = self._runner.server
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) < MAX_CONNECTIONS:
                return _ReadByPeer(server())
            idle = oldest_idle(server.connections)
            if idle is not None:
                # Whoever holds the slots with cheap requests now and then keeps most of
                # them idle between requests: give the slot that waited longest to the
                # newcomer, so they cannot shut out the officers, Prometheus or /healthz.
                idle.force_close()
                self.evicted += 1
                if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
                    log.warning("http connections over the limit: closing idle ones",
                                limit=MAX_CONNECTIONS, closed=self.evicted)
                return _ReadByPeer(server())
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("http connections over the limit are being closed",
                            limit=MAX_CONNECTIONS, refused=self.refused)
            return _Refused()

        self._listening = await asyncio.get_running_loop().create_server(
            connection, self.host, self.requested_port, reuse_address=True)
        self.port = int(self._listening.sockets[0].getsockname()[1])
        log.info("http endpoints serving", url=self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._listening is not None:
            self._listening.close()
        await self._runner.cleanup()
