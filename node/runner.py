"""``kpnode run``: the node's service wired to the broker.

Three loops share one :class:`~node.service.Node`:

* the **inbox consumer** hands each batch of deliveries to the service, which decides and
  commits them in one transaction; only then are they dead-lettered (if refused) and
  acknowledged — so a crash at any point leaves them in the queue, and the inbox's
  de-duplication makes the redelivery harmless;
* the **outbox relay** publishes committed frames, pipelined, with publisher confirms, and
  marks them sent only once the broker confirmed them; unroutable or failed messages stay
  queued and are retried with backoff. When rows are due while a batch waits long for
  its confirms, the next batch overtakes it (at most two under way);
* the **sweep** turns open loops past their expiry date into ``expired``, and sends a
  certificate again (same message id, same bytes) when no receipt came back within
  ``resend_after_seconds``, doubling the wait after each attempt.

Shutdown (SIGTERM/SIGINT) stops consuming, lets the batch in hand finish, flushes the
outbox for up to ``DRAIN_SECONDS`` and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog

from node.clockwatch import (
    CLOCK_FILE,
    HOLD_AT_MOST_MS,
    TOLERANCE_MS,
    ClockWatch,
    elapsed_ms,
    resumed,
)
from node.clockwatch import save as save_clock
from node.config import HELD_KEYS, LOCK_NAME, NOT_CONSUMING, ConfigError, NodeConfig
from node.deadletters import USER_ID_HEADER, publisher_of
from node.metrics import NodeMetrics
from node.service import Delivery, Node, Verdict, now_ms
from node.store import MAX_RETRY_DELAY_MS, OutboxRow, StoreError, UnreadableRecord
from node.transport import (
    DEAD_CONNECTION_SECONDS,
    Outgoing,
    PublishResult,
    Transport,
    TransportUnavailable,
    claim_queue,
    inbox_queue,
)
from node.transport import Delivery as BrokerDelivery
from node.wait import wait_set
from protocol import key_id

if TYPE_CHECKING:
    from aiohttp import web

    from node.httpserver import HttpServer

log = structlog.get_logger("kpx.runner")

DRAIN_SECONDS = 10.0
RELAY_BATCH = 500
#: a batch still waiting for its confirms after this long lets the next one overtake it
RELAY_OVERTAKE_SECONDS = 0.005
#: batches awaiting their confirms at once, at most
RELAY_IN_FLIGHT = 2
#: while the outbox waits for the same reason, how often that is logged again
RELAY_WAIT_LOG_SECONDS = 60.0
#: while the same records cannot be read, how often the sweep says so again
UNREADABLE_LOG_SECONDS = 3600.0
IDLE_POLL_SECONDS = 0.25
SWEEP_SECONDS = 5.0
#: tries at putting a refused message on the dead-letter queue (0.2 s, then 0.4 s apart)
DEAD_LETTER_ATTEMPTS = 3
#: how long a transaction of the running node waits for another process's write lock (a
#: `sqlite3` shell left in a transaction, a VACUUM). SQLite waits on the event loop's
#: thread: with the default 30 s the whole node froze, HTTP and broker included, in 30 s
#: spells for as long as the lock was held. Past this the work is held and tried again.
LOCK_WAIT_SECONDS = 0.5
UNROUTABLE_RETRY_MS = 30_000  # within MAX_RETRY_DELAY_MS, like every planned retry
#: how long a starting node waits for another consumer of its inbox to go: a node whose
#: host died holds its consumer until the broker's heartbeat gives up
INBOX_TAKEN_WAIT_SECONDS = DEAD_CONNECTION_SECONDS
#: how long the inbox must stay free after another consumer was seen on it: longer than
#: a live node takes to reconnect (its back-off reaches 10 s) after a broker restart
INBOX_SETTLE_SECONDS = 15.0


@dataclass
class RelayWaiting:
    """Why the relay could not publish, since when it last said so, and how often it tried."""

    event: str
    error: str
    tries: int
    logged_at: float


class InboxTaken(TransportUnavailable):
    """Another consumer holds the node's inbox: a second node for the Participant."""


def retry_delay_ms(attempts: int) -> int:
    """Exponential backoff for a failed publish: 0.5 s doubling to at most a minute."""
    return int(min(MAX_RETRY_DELAY_MS, 500 * 2 ** min(attempts, 7)))


class DirectoryLock:
    """One ``kpnode run`` per node directory: two would relay the same outbox twice."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self.file: IO[str] | None = None
        self._keys: Sequence[str] | None = None
        self._not_consuming: str | None = None

    def __enter__(self) -> DirectoryLock:
        # Not truncated before the lock is ours: a second 'kpnode run', refused, erased the
        # running one's pid (and with it the start time kpnode status reads from the file).
        # Opened to read and write (made if missing), never truncated by the opening: every
        # later note is written through this very handle, the file this run holds locked.
        self.file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ConfigError(f"another 'kpnode run' is using {self.path.parent}") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def note_keys(self, key_ids: Sequence[str]) -> None:
        """Say which keys the running node holds (it reads them only at start), for
        ``kpnode status`` and ``key show`` to compare with the key files as they are now."""
        self._keys = list(key_ids)
        self._rewrite()

    def note_not_consuming(self, why: str | None) -> None:
        """Say why the running node does not consume its inbox (another connection holds
        it), or ``None`` once it does: ``kpnode status`` sees only the inbox's consumers,
        and the one there may be the other node's."""
        if why != self._not_consuming:
            self._not_consuming = why
            self._rewrite()

    def _rewrite(self) -> None:
        if self.file is None or self.file.closed:
            return
        lines = [str(os.getpid())]
        if self._keys is not None:
            lines.append(f"{HELD_KEYS} {' '.join(self._keys)}")
        if self._not_consuming is not None:
            lines.append(f"{NOT_CONSUMING} {' '.join(self._not_consuming.split())}")
        # Written over in place, then cut to length: the pid line and the keys' come first
        # and stay as they were, so a 'kpnode status' reading meanwhile never finds the
        # file empty (emptied first, it could read no pid). Through the handle that holds
        # the lock, not the path: a lock file removed while the node runs made the note
        # fail (a start waiting for another node ended in a traceback), and once a second
        # 'kpnode run' had made and locked a new one, the notes overwrote its file.
        self.file.seek(0)
        self.file.write("".join(f"{line}\n" for line in lines))
        self.file.truncate()  # flushes the write first, then cuts where it ended
        self.file.flush()

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


class RunningNode:
    """A node connected to the broker. ``start()``, then ``stop()``; or ``async with``."""

    def __init__(self, config: NodeConfig, *, check_broker_user: bool | None = None) -> None:
        self.config = config
        self.check_broker_user = (config.check_broker_user if check_broker_user is None
                                  else check_broker_user)
        self.node: Node | None = None
        self.transport: Transport | None = None
        self._lock = DirectoryLock(config.directory)
        self._wake = asyncio.Event()
        #: outbox rows being published now (excluded from the next batch)
        self._relaying: set[int] = set()
        #: outbox rows the broker confirmed but the store could not yet mark sent (its write
        #: lock held by another process): never published again, marked when it can be
        self._unmarked: set[int] = set()
        #: per recipient without an inbox: when that was last logged, messages returned since
        self._unroutable_logged: dict[str, tuple[float, int]] = {}
        #: why the outbox waits, while it does (logged once, not every second)
        self._relay_waiting: RelayWaiting | None = None
        #: the records the sweep could not read when it last said so, and when
        self._unreadable_logged: tuple[tuple[str, ...], float] | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._batch_lock = asyncio.Lock()
        #: False while the store refuses to commit (reported by status and /readyz)
        self.store_ok = True
        #: False while the wall clock is ahead of the time measured (reported by /readyz)
        self.clock_ok = True
        self._clock: ClockWatch | None = None
        self._clock_saved: tuple[int, int, int | None] | None = None
        self.metrics = NodeMetrics()
        #: called with the HTTP application before it starts (routes, sub-applications)
        self.http_extensions: list[Callable[[web.Application], None]] = []
        self.http: HttpServer | None = None

    async def __aenter__(self) -> RunningNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._lock.__enter__()
        try:
            self.node = Node.open(self.config, check_broker_user=self.check_broker_user)
            self.node.unlock()  # a wrong passphrase stops the start, not a later answer
            self._lock.note_keys([key_id(bytes(k.verify_key)).hex()
                                  for k in self.node.signing_keys])
            # From where the last run in this boot measured: a clock that jumped ahead
            # before this start (the reason for the restart, perhaps) is seen too.
            self._clock = resumed(self.config.path(CLOCK_FILE), self.node.clock(),
                                  elapsed_ms())
            self._save_clock()
            self.node.store.wait_for_locks(LOCK_WAIT_SECONDS)
            self.node.on_outbox = self._wake.set
            self.transport = Transport(
                self.config.broker_urls, self.config.participant,
                prefetch=self.config.prefetch, delivery_limit=self.config.delivery_limit,
                declare=self.config.declare_topology, broker_user=self.config.broker_user,
            )
            claim = claim_queue(self.config.participant)
            self.transport.on_claim_wait = lambda waiting: self._lock.note_not_consuming(
                f"another connection holds {claim}" if waiting else None)
            await self.transport.connect()
            await self._wait_for_inbox_free()
            self._tasks = [asyncio.create_task(self._relay(), name="relay"),
                           asyncio.create_task(self._sweep(), name="sweep")]
            # Whatever can still fail comes before consuming: a start that fails with
            # deliveries in hand returns them to the queue, and in RabbitMQ 3.10 every such
            # return counts towards the delivery limit (a supervisor restarting a node whose
            # port is taken dead-lettered its whole prefetch, unread, after five tries).
            if self.config.http_port is not None:
                await self._start_http()
            await self._wait_for_inbox_free()  # again, just before: the HTTP start took time
            await self.transport.consume(self._on_batch)
        except BaseException:
            await self._close()
            raise
        log.info("node started", participant=self.config.participant,
                 registry_version=self.node.registry.version)

    async def _wait_for_inbox_free(self) -> None:
        """Refuse to start beside another node for the Participant (a restored copy started
        while the original runs, a second host given the same node): the broker would
        share the Participant's messages out between two databases, each with half of
        the evidence. One left by a node whose host died goes by itself, so wait for it
        first. Checked at start; a reconnect takes the claim again before consuming
        (see :meth:`Transport.claim_inbox`).

        Another node shows as a consumer of the inbox or as the holder of its claim (two
        started at the same moment both see no consumer; only one gets the claim). Once
        another was seen, its going counts only after the inbox has stayed free for
        ``INBOX_SETTLE_SECONDS``: a live node whose connection dropped (a broker restart
        drops them all) shows no consumer until it has reconnected."""
        from aiormq.exceptions import ChannelClosed

        assert self.transport is not None
        deadline = time.monotonic() + INBOX_TAKEN_WAIT_SECONDS
        inbox = inbox_queue(self.config.participant)
        claim = claim_queue(self.config.participant)
        held_by = ""  # what last showed another node, once anything did
        free_since: float | None = None
        while True:
            now = time.monotonic()
            looking_at = inbox  # named in an error: the inbox, or its claim
            try:
                consumers = (await self.transport.inbox_depth())[1]
                settled = free_since is not None and now - free_since >= INBOX_SETTLE_SECONDS
                # Claimed only once free and settled: held while settling, the claim would
                # lock out an original reconnecting after a broker restart, for the copy.
                asked = consumers == 0 and (not held_by or settled)
                looking_at = claim
                claimed = await self.transport.claim_inbox() if asked else False
            except TransportUnavailable:
                # The broker went away meanwhile (a restart clears a stale consumer too):
                # wait for the reconnect, as a start waits for its broker.
                await self.transport.connect(timeout=max(deadline - time.monotonic(), 60.0))
                continue
            except ChannelClosed as exc:  # no such queue, no access: no use waiting
                raise TransportUnavailable(f"could not look at {looking_at}: {exc}") from exc
            except Exception as exc:  # the connection going down as we asked
                if time.monotonic() >= deadline:
                    raise TransportUnavailable(f"could not look at {looking_at}: {exc}"
                                               ) from exc
                await asyncio.sleep(1.0)
                continue
            if asked and claimed is not False:  # held, or not permitted: the count alone
                self._lock.note_not_consuming(None)
                if held_by:
                    log.info("the other node's hold on the inbox is gone; starting",
                             queue=inbox)
                return
            if asked:
                holder = f"another connection holds the claim {claim}"
            elif consumers:
                holder = f"{consumers} consumer(s) on {inbox}"
            else:
                holder = ""  # free, settling
                free_since = now if free_since is None else free_since
            if holder:
                self._lock.note_not_consuming(f"starting: {holder}")
                if not held_by:
                    log.warning("another node holds the inbox; waiting for it to go before "
                                "starting (a node whose host died is forgotten by the broker "
                                "within about three minutes)", queue=inbox, held_by=holder,
                                wait_seconds=INBOX_TAKEN_WAIT_SECONDS)
                held_by, free_since = holder, None
            if now >= deadline and free_since is None:
                raise InboxTaken(
                    f"{held_by} within {INBOX_TAKEN_WAIT_SECONDS:g} s: another node for "
                    f"{self.config.participant} is running against this broker (a restored "
                    "copy beside the original?). Two would share its messages out between "
                    "two databases; stop the other one")
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Graceful: stop consuming, finish the batch in hand, flush the outbox, close."""
        if self._stopping:
            return
        self._stopping = True
        try:
            deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
            if self.transport is not None:
                with contextlib.suppress(Exception):
                    await self.transport.stop_consuming()
                try:
                    # Deliveries received before the cancel are decided and acknowledged,
                    # not dropped (see Transport.stop_consuming).
                    await asyncio.wait_for(self.transport.settled(), DRAIN_SECONDS)
                except TimeoutError:
                    log.warning("deliveries in hand left to the broker at shutdown")
            try:
                # The batch in hand, if any, committed and acknowledged: within the same
                # time, for a batch can wait on a broker that stopped answering (a dead-
                # letter copy), and a supervisor's SIGKILL would end the stop instead.
                left = deadline - asyncio.get_running_loop().time()
                await asyncio.wait_for(self._batch_lock.acquire(), max(0.1, left))
                self._batch_lock.release()
            except TimeoutError:
                log.warning("the batch in hand did not finish at shutdown; its deliveries "
                            "not yet acknowledged go back to the broker")
            self._wake.set()
            try:
                await asyncio.wait_for(self._drain(), DRAIN_SECONDS)
            except (TimeoutError, TransportUnavailable, StoreError) as exc:
                # Whatever stops the drain, the node still closes: the rows stay in the
                # outbox for the next start, and the directory lock is released.
                backlog = None
                with contextlib.suppress(Exception):  # a failing store cannot count them
                    backlog = len(self.node.store.backlog()) if self.node else None
                log.warning("outbox not empty at shutdown; it is sent on next start",
                            reason=str(exc) or type(exc).__name__, backlog=backlog)
        finally:
            # Even when something unforeseen escapes: the connection, the tasks and the
            # directory lock go, or a second stop() (a no-op now) could never free them.
            await self._close()
        log.info("node stopped", participant=self.config.participant)

    async def _start_http(self) -> None:
        from node.httpserver import HttpServer, build_app

        app = build_app(self)
        for extend in self.http_extensions:
            extend(app)
        host, port = self.config.http_host, self.config.http_port or 0
        self.http = HttpServer(app, host, port)
        try:
            await self.http.start()
        except OSError as exc:  # a name that does not resolve, a port in use or not ours
            raise ConfigError(f"cannot serve HTTP on http_host {host!r}, http_port {port}: "
                              f"{exc.strerror or exc}") from exc

    async def _close(self) -> None:
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await self.transport.close()
        if self.node is not None:
            self.node.close()
        self._lock.__exit__()

    # -- the inbox ---------------------------------------------------------------

    async def _on_batch(self, deliveries: list[BrokerDelivery]) -> None:
        assert self.node is not None and self.transport is not None
        async with self._batch_lock:
            started = time.perf_counter()
            decided = await self._decide(deliveries)
            if decided is None:
                return  # shutting down with the store failing: left to the broker
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(deliveries))
            done = []
            for delivery, verdict in decided:
                refusal = verdict.dead_letter
                self.metrics.received(verdict.kind, verdict.duplicate,
                                      refusal.reason if refusal else None,
                                      held=refusal is not None and not refusal.final)
                if refusal is not None and not await self._dead_letter(delivery, verdict) \
                        and (self._stopping or not verdict.kept):
                    # No copy anywhere else, or none made yet by a node that stops and will
                    # not try again: the broker keeps it and delivers it again (a duplicate
                    # of a refusal is copied then).
                    await self.transport.reject(delivery, requeue=True)
                    continue
                done.append(delivery)
            await self.transport.ack(done)

    async def _dead_letter(self, delivery: BrokerDelivery, verdict: Verdict) -> bool:
        """Put a refused delivery's copy on the dead-letter queue, trying a few times (once
        while stopping); whether it was made. A failure never stops the batch (its
        deliveries would hold their prefetch slots until a reconnect, and a full dead-letter
        queue would stall the inbox): one whose frame is kept in the evidence log is then
        acknowledged, unless the node is stopping."""
        assert self.transport is not None and verdict.dead_letter is not None
        refusal = verdict.dead_letter
        headers = {"x-kpx-sender": refusal.answer_to or "",
                   "x-kpx-message-id": refusal.in_reply_to or "",
                   "x-kpx-dead-at": str(now_ms()),
                   USER_ID_HEADER: publisher_of(delivery.user_id, delivery.headers,
                                                self.config.broker_user) or ""}
        for attempt in range(DEAD_LETTER_ATTEMPTS):
            try:
                await self.transport.dead_letter(delivery.body, reason=refusal.reason,
                                                 text=refusal.text[:1000], headers=headers)
            except Exception as exc:
                if attempt + 1 < DEAD_LETTER_ATTEMPTS and not self._stopping:
                    await asyncio.sleep(0.2 * 2 ** attempt)
                    continue
                log.error("could not dead-letter a refused message"
                          + ("; its frame and refusal are in the evidence log"
                             if verdict.kept and not self._stopping
                             else "; left in the inbox to be delivered again"),
                          reason=refusal.reason, message_id=refusal.in_reply_to,
                          error=f"{type(exc).__name__}: {exc}")
                return False
            self.metrics.dead_letters.labels(reason=refusal.reason).inc()
            return True
        return False

    async def _decide(self, deliveries: list[BrokerDelivery]
                      ) -> list[tuple[BrokerDelivery, Verdict]] | None:
        """Commit a batch; on a store fault, hold the deliveries and retry until the store
        recovers (nothing acked, nothing requeued: a requeue would burn the delivery limit);
        on any other fault, isolate the poison message by deciding one delivery at a time."""
        assert self.node is not None and self.transport is not None
        delay = 0.5
        while True:
            if not self.clock_agrees():
                # Decided now, a valid certificate could be refused as expired, for good.
                if self._stopping:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            try:
                own = self.config.broker_user
                verdicts = self.node.handle_batch(
                    [Delivery(d.body, publisher_of(d.user_id, d.headers, own))
                     for d in deliveries])
                if not self.store_ok:
                    log.warning("store recovered")
                self.store_ok = True
                return list(zip(deliveries, verdicts, strict=True))
            except StoreError as exc:
                if self.store_ok:
                    log.error("store failed; holding deliveries unacknowledged until it "
                              "recovers", error=str(exc), count=len(deliveries))
                self.store_ok = False
                if self._stopping:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception:
                if len(deliveries) > 1:
                    decided: list[tuple[BrokerDelivery, Verdict]] = []
                    for one in deliveries:
                        decided.extend(await self._decide([one]) or [])
                    return decided
                log.exception("processing failed; the broker will redeliver it, and "
                              "dead-letter it after the delivery limit",
                              message_id=deliveries[0].message_id,
                              delivery_count=deliveries[0].delivery_count)
                self.metrics.messages_in.labels(kind="unknown", outcome="failed").inc()
                await self.transport.reject(deliveries[0], requeue=True)
                return []

    # -- the outbox --------------------------------------------------------------

    async def _relay(self) -> None:
        """One batch at a time, normally: rows committed while a batch waits for its
        confirms go out together in the next, which keeps the relay cheap. But when rows
        are due while a batch has waited ``RELAY_OVERTAKE_SECONDS`` for its confirms (a
        burst, a busy broker), the next batch overtakes it, so that they do not queue
        behind it; at most ``RELAY_IN_FLIGHT`` batches are under way at once."""
        slots = asyncio.Semaphore(RELAY_IN_FLIGHT)
        batches: set[asyncio.Task[int]] = set()
        try:
            while True:
                await slots.acquire()
                self._wake.clear()
                batch = asyncio.create_task(self._relay_batch(slots))
                batches.add(batch)
                batch.add_done_callback(batches.discard)
                done, _ = await asyncio.wait({batch}, timeout=RELAY_OVERTAKE_SECONDS)
                if not done:
                    woken = asyncio.create_task(self._wake.wait())
                    try:
                        await asyncio.wait({batch, woken},
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        woken.cancel()
                    if not batch.done():
                        continue  # new rows while the batch waits: overtake it
                # A short batch took every row due; unless a commit queued more meanwhile
                # (on_outbox set the event), asking the store again would find nothing.
                if batch.result() < RELAY_BATCH and not self._wake.is_set():
                    await wait_set(self._wake, IDLE_POLL_SECONDS)
        finally:
            for batch in batches:
                batch.cancel()
            await asyncio.gather(*batches, return_exceptions=True)

    async def _relay_batch(self, slots: asyncio.Semaphore) -> int:
        try:
            sent = await self.relay_once()
        except TransportUnavailable as exc:
            self._relay_waits("warning", "broker unavailable; outbox waits", exc)
            await asyncio.sleep(1.0)
            return 0
        except StoreError as exc:
            self._relay_waits("error", "store failed; outbox waits", exc)
            await asyncio.sleep(1.0)
            return 0
        except Exception as exc:
            # A bug must not stop the relay for good (nor vanish with an overtaken batch):
            # the rows stay due and are tried again.
            self._relay_waits("exception", "relaying failed; outbox waits", exc)
            await asyncio.sleep(1.0)
            return 0
        finally:
            slots.release()
        if self._relay_waiting is not None:
            log.info("outbox moving again", waited_for=self._relay_waiting.event,
                     tries=self._relay_waiting.tries)
            self._relay_waiting = None
        return sent

    def _relay_waits(self, level: str, event: str, exc: Exception) -> None:
        """Log why the outbox waits once, and again only when the reason changes or every
        ``RELAY_WAIT_LOG_SECONDS``: retried every second, a broker outage of an hour wrote
        3,600 lines that said the same."""
        error, now, last = f"{type(exc).__name__}: {exc}", time.monotonic(), self._relay_waiting
        if last is None or (last.event, last.error) != (event, error):
            last = self._relay_waiting = RelayWaiting(event, error, 0, now)
        elif now - last.logged_at < RELAY_WAIT_LOG_SECONDS:
            last.tries += 1
            return
        last.tries += 1
        last.logged_at = now
        getattr(log, level)(event, error=error, tries=last.tries)

    async def relay_once(self) -> int:
        """Publish what is due; returns how many rows were attempted."""
        assert self.node is not None and self.transport is not None
        store = self.node.store
        if self._unmarked:
            with store.transaction(durable=False):
                store.mark_published(self._unmarked, now_ms())
            self._unmarked.clear()
        relaying = self._relaying
        rows = [r for r in store.due(now_ms(), RELAY_BATCH + len(relaying))
                if r.seq not in relaying][:RELAY_BATCH]
        if not rows:
            return 0
        seqs = {r.seq for r in rows}
        relaying |= seqs
        try:
            return await self._publish_rows(rows)
        finally:
            relaying -= seqs

    async def _publish_rows(self, rows: list[OutboxRow]) -> int:
        assert self.node is not None and self.transport is not None
        started = time.perf_counter()
        results = await self.transport.publish(
            [Outgoing(message_id=r.message_id, recipient=r.recipient, body=r.frame,
                      kind=r.kind) for r in rows])
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        for row, result in zip(rows, results, strict=True):
            if result.confirmed:
                self.metrics.messages_out.labels(kind=row.kind).inc()
                log.debug("published", message_id=row.message_id, recipient=row.recipient,
                          kind=row.kind, attempts=row.attempts + 1)
            else:
                self.metrics.publish_failures.labels(
                    kind=row.kind, error="unroutable" if result.returned else "failed").inc()
        now = now_ms()
        confirmed = [r.seq for r, res in zip(rows, results, strict=True) if res.confirmed]
        try:
            self._mark(rows, results, confirmed, now)
        except StoreError:
            # Sent again, each would be a duplicate for the receiver to answer again, and
            # for as long as the lock lasts, once a second: remembered instead.
            self._unmarked.update(confirmed)
            raise
        return len(rows)

    def _mark(self, rows: list[OutboxRow], results: Sequence[PublishResult],
              confirmed: list[int], now: int) -> None:
        assert self.node is not None
        store = self.node.store
        # Not waiting for the disk: should a power cut undo these marks, the rows are sent
        # again with the same message ids, and the receivers recognise them.
        returned: dict[str, list[str]] = {}
        with store.transaction(durable=False):
            store.mark_published(confirmed, now)
            for row, result in zip(rows, results, strict=True):
                if result.confirmed:
                    self._unroutable_logged.pop(row.recipient, None)
                    continue
                if result.returned:
                    returned.setdefault(row.recipient, []).append(row.message_id)
                    store.mark_failed(row.seq, f"unroutable: no inbox for {row.recipient}",
                                      now + UNROUTABLE_RETRY_MS)
                else:
                    store.mark_failed(row.seq, result.error or "not confirmed",
                                      now + retry_delay_ms(row.attempts))
        self._unroutable_seen(returned)

    def _unroutable_seen(self, returned: Mapping[str, list[str]]) -> None:
        """Log the messages the broker returned for want of their recipient's inbox: once
        per recipient, then every ``RELAY_WAIT_LOG_SECONDS`` with how many came back since.
        A line per message at every retry (30 s) wrote 10,000 lines a minute for 5,000
        certificates to a new Participant whose node had not started yet."""
        now = time.monotonic()
        for recipient, message_ids in returned.items():
            logged_at, since = self._unroutable_logged.get(recipient, (None, 0))
            since += len(message_ids)
            if logged_at is not None and now - logged_at < RELAY_WAIT_LOG_SECONDS:
                self._unroutable_logged[recipient] = (logged_at, since)
                continue
            log.warning("unroutable: no inbox for recipient; kept in outbox",
                        recipient=recipient, messages=since, message_ids=message_ids[:20])
            self._unroutable_logged[recipient] = (now, 0)

    async def _drain(self) -> None:
        """Publish what is due, and wait for the relay's batches under way to be confirmed
        and marked (a row cancelled mid-confirm would go out again on the next start)."""
        assert self.node is not None
        while self.node.store.due(now_ms(), 1) or self._relaying:
            if await self.relay_once() == 0:
                if not self._relaying:
                    break  # nothing due, nothing under way
                await asyncio.sleep(0.01)

    # -- expiry ------------------------------------------------------------------

    def clock_agrees(self) -> bool:
        """Whether the wall clock has kept to the time measured since the start (see
        node.clockwatch); logs when that changes."""
        if self.node is None or self._clock is None:
            return True
        wall, elapsed = self.node.clock(), elapsed_ms()
        ahead = self._clock.ahead_ms(wall, elapsed)
        agrees = self._clock.check(wall, elapsed)
        if agrees != self.clock_ok:
            if agrees:
                log.warning("deciding and expiring by the clock again", ahead_seconds=(
                    ahead // 1000), taken_for_a_correction=ahead > TOLERANCE_MS)
            else:
                log.error("the clock jumped ahead of the time measured: holding deliveries "
                          "and expiring nothing until it is set right, or for at most "
                          f"{HOLD_AT_MOST_MS // 60_000} minutes (then it is taken for a "
                          "correction)", ahead_seconds=ahead // 1000)
        self.clock_ok = agrees
        return agrees

    def _save_clock(self) -> None:
        """Keep the clock watch's starting point for the next run (node.clockwatch)."""
        if self._clock is None:
            return
        state = (self._clock.wall_at_start_ms, self._clock.elapsed_at_start_ms,
                 self._clock.ahead_since_ms)
        if state == self._clock_saved:
            return
        try:
            save_clock(self._clock, self.config.path(CLOCK_FILE))
        except OSError as exc:  # a full disk: kept in memory, saved when it can be
            log.warning("could not save the clock watch", error=str(exc))
            return
        self._clock_saved = state

    async def _sweep(self) -> None:
        assert self.node is not None
        while True:
            # Expiry and resends each on their own: one failing (a record edited outside
            # kpx, say) must not stop the other.
            with self._sweep_step("expiry"):
                unreadable: list[UnreadableRecord] = []
                expired = self.node.expire_overdue(unreadable) if self.clock_agrees() else []
                self._save_clock()
                if expired:
                    log.warning("certificates expired unconfirmed",
                                numbers=[r.number for r in expired])
                self._unreadable_seen(unreadable)
            with self._sweep_step("resends"):
                resent = self.node.resend_unanswered(self.config.resend_after_seconds * 1000)
                if resent:
                    log.warning("no receipt yet: certificates sent again with the same "
                                "message id", count=len(resent), message_ids=resent[:20])
                    self._wake.set()
            await asyncio.sleep(SWEEP_SECONDS)

    def _unreadable_seen(self, unreadable: Sequence[UnreadableRecord]) -> None:
        """Log the records the sweep's expiry could not read: once, again when what cannot
        be read changes, and every ``UNREADABLE_LOG_SECONDS`` while it lasts. Every sweep
        (5 s) said it again otherwise: 17,000 errors a day for one row edited by hand."""
        if not unreadable:
            self._unreadable_logged = None
            return
        what, now = tuple(str(u) for u in unreadable), time.monotonic()
        last = self._unreadable_logged
        if last is not None and last[0] == what and now - last[1] < UNREADABLE_LOG_SECONDS:
            return
        self._unreadable_logged = (what, now)
        log.error("records kpx cannot read are left out of expiry; restore them from a "
                  "backup (kpnode verify-log names them)", count=len(what), first=what[0])

    @contextlib.contextmanager
    def _sweep_step(self, step: str) -> Iterator[None]:
        try:
            yield
        except StoreError as exc:
            log.error("sweep failed", step=step, error=str(exc))
        except Exception:  # a bug must not end expiry and resends until a restart
            log.exception("sweep failed; trying again next period", step=step)


async def run_until_signalled(config: NodeConfig,
                              signals: Sequence[signal.Signals] = (signal.SIGTERM,
                                                                    signal.SIGINT)) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    running = RunningNode(config)
    # A signal during the start (up to a minute waiting for a broker) stops it there: it
    # was ignored until the node ran, and a supervisor's stop ended in SIGKILL.
    starting = asyncio.create_task(running.start(), name="start")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not starting.done():
        starting.cancel()  # start() closes what it opened before it lets this through
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped before the node had started", participant=config.participant)
        return
    starting.result()  # a start that failed raises here
    try:
        freeze_start_up_objects()
        await stop.wait()
    finally:
        await running.stop()


def freeze_start_up_objects() -> None:
    """Take what is alive once the node runs (modules, keys, registry, connections) out of
    the garbage collector's sight: a full collection then walks only what came later. In a
    node at 180 loops/s, full collections took 22-52 ms (each a pause of every message in
    hand) and 7-13 ms after this. For a process's entry point only: frozen objects are
    never collected, so a process that starts and stops many nodes must not call it."""
    gc.freeze()
