"""What an operator sees and does, on a real broker: a network driven into a backlog, a
dead letter, an overdue certificate and a discrepancy, and ``status --json``, ``/metrics``
and ``stats`` showing each; dead letters replayed and discarded without losing a byte;
a ping answered by a signed pong."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from node.deadletters import DeadLetterQueue, dead_letter_id
from node.evidence import OPERATOR, read_operator_record
from node.machine import Side, State, day_of
from node.metrics import NodeMetrics
from node.network import LocalNetwork, create_network
from node.ping import NodeNotRunning, PingFailed, ping_partner
from node.runner import RunningNode
from node.service import Delivery, Node, Verdict, now_ms
from node.stats import Quarter
from node.status import gather_status, store_writable
from node.tokens import Role, Tokens
from node.transport import claim_queue, inbox_queue
from protocol import Certificate, Line, ProtocolError, decode_body, key_id, parse_frame
from tests.netutil import certificate, queue_depth
from tests.test_network import fresh_codes, publish_raw, state, until

pytestmark = pytest.mark.broker

KPNODE = [sys.executable, "-m", "node.cli"]


def kpnode(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KPNODE, *args], capture_output=True, text=True, check=check)


def kpnode_json(*args: str) -> Any:
    return json.loads(kpnode(*args, "--json").stdout)


async def metrics_text(running: RunningNode) -> str:
    assert running.http is not None
    async with aiohttp.ClientSession() as session, \
            session.get(running.http.url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from the Prometheus text, or None if absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and got == wanted:
            return float(value)
    return None


def test_a_database_that_refuses_writes_is_not_called_writable(tmp_path: Path) -> None:
    """On an immutable file or a read-only mount, BEGIN IMMEDIATE succeeds and only the
    first write fails: status and /health called such a database writable."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    node = Node.open(network.configs["ZA"])
    try:
        assert store_writable(node)
        path = network.configs["ZA"].directory / "node.sqlite3"
        read_only = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        with read_only:
            node.store.db, writable = read_only, node.store.db
            try:
                assert not store_writable(node)
            finally:
                node.store.db = writable
        assert store_writable(node) and node.store.schema_version > 0
    finally:
        node.close()


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


async def start(stack: AsyncExitStack, network: LocalNetwork, code: str,
                http: bool = False) -> RunningNode:
    config = network.configs[code]
    if http:
        config = dataclasses.replace(config, http_port=0)
    running = RunningNode(config)
    await running.start()
    stack.push_async_callback(running.stop)
    return running


async def test_backlog_overdue_and_discrepancy_show_in_status_metrics_and_stats(
        amqp_url: str, tmp_path: Path, stack: AsyncExitStack) -> None:
    za, india, absent = fresh_codes(3)
    network = create_network(tmp_path, [za, india, absent], [amqp_url])
    exporter = await start(stack, network, za, http=True)
    importer = await start(stack, network, india)
    assert exporter.node is not None and importer.node is not None and exporter.http
    today = date.today()
    soon = (today + timedelta(days=3)).isoformat()
    exporter.node.issue(certificate(f"{za}-1", za, india))                    # confirmed short
    exporter.node.issue(certificate(f"{za}-2", za, india))                    # as declared
    exporter.node.issue(certificate(f"{za}-3", za, india, expires_on=soon))   # overdue
    exporter.node.issue(certificate(f"{za}-4", za, absent))                   # backlog
    await until(lambda: all(state(importer.node, Side.IMPORT, f"{za}-{i}")  # type: ignore[arg-type]
                            is State.RECEIVED for i in (1, 2, 3)))
    short = (Line(hs_code="7102.31", carats_hundredths=250_000, usd_cents=30_000_000),
             Line(hs_code="7102.21", carats_hundredths=30_000, usd_cents=10_000_000))
    importer.node.confirm(f"{za}-1", lines=short, parcels=2)
    importer.node.confirm(f"{za}-2")
    await until(lambda: state(exporter.node, Side.EXPORT, f"{za}-2")  # type: ignore[arg-type]
                is State.CONFIRMED and state(exporter.node, Side.EXPORT, f"{za}-1")  # type: ignore[arg-type]
                is State.CONFIRMED)
    await until(lambda: any((r.last_error or "").startswith("unroutable")
                            for r in exporter.node.store.backlog()))  # type: ignore[union-attr]

    # status --json, as an operator runs it next to the running node
    status = kpnode_json("status", "--dir", str(network.configs[za].directory))
    assert status["node"]["running"] and status["broker"]["reachable"]
    assert status["broker"]["inbox"]["consumers"] == 1
    assert status["outbox"]["backlog"] == 1
    assert status["outbox"]["by_recipient"][0]["recipient"] == absent
    assert status["outbox"]["by_recipient"][0]["last_error"].startswith("unroutable")
    assert [o["number"] for o in status["overdue"]] == [f"{za}-3"]
    assert status["open_loops"]["total"] == 2  # the overdue one and the one in the outbox
    assert status["health"] == "warning"
    texts = " | ".join(p["text"] for p in status["problems"])
    assert f"1 message(s) to {absent} not sent: unroutable" in texts
    assert "expire within 7 days" in texts
    partners = {p["partner"]: p for p in status["partners"]}
    assert partners[india]["exports"] == {"confirmed": 2, "delivered": 1}
    screen = kpnode("status", "--dir", str(network.configs[za].directory)).stdout
    assert "WARNING" in screen and f"{za}-3" in screen and "outbox    1 message(s)" in screen

    # /metrics and the health endpoints of the running exporter
    text = await metrics_text(exporter)
    assert sample(text, "kpx_outbox_backlog", recipient=absent) == 1
    assert sample(text, "kpx_messages_out_total", kind="certificate") == 3
    assert (sample(text, "kpx_publish_failures_total", kind="certificate",
                   error="unroutable") or 0) >= 1
    assert sample(text, "kpx_messages_in_total", kind="import_confirmation",
                  outcome="accepted") == 2
    assert sample(text, "kpx_open_loops", side="export", age="0-1d") == 2
    assert sample(text, "kpx_batch_processing_seconds_count") is not None
    assert sample(text, "kpx_broker_connected") == 1
    async with aiohttp.ClientSession() as session:
        async with session.get(exporter.http.url + "/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"] == {
                "broker_connected": True, "consuming": True, "store_writable": True,
                "clock_agrees": True, "publishing_allowed": True}
        async with session.get(exporter.http.url + "/healthz") as response:
            assert response.status == 200

    # stats on both sides: the same certificates, the same disagreement
    quarter = str(Quarter(today.year, (today.month - 1) // 3 + 1))
    ours = kpnode_json("stats", "--quarter", quarter, "--dir",
                       str(network.configs[za].directory))
    theirs = kpnode_json("stats", "--quarter", quarter, "--dir",
                         str(network.configs[india].directory))
    totals = {(r["flow"], r["partner"], r["hs_code"]): r["certificates"] for r in ours["trade"]}
    assert totals[("exports", india, "ALL")] == 3 and totals[("exports", absent, "ALL")] == 1
    assert totals[("exports", "ALL", "ALL")] == 4
    wrong = {(d["number"], d["field"]) for d in ours["disagreements"]}
    assert wrong == {(f"{za}-1", "parcels"), (f"{za}-1", "lines[7102.31].usd_cents"),
                     (f"{za}-3", "confirmation"), (f"{za}-4", "confirmation")}
    assert {(d["number"], d["field"]) for d in theirs["disagreements"]} == {
        (f"{za}-1", "parcels"), (f"{za}-1", "lines[7102.31].usd_cents"),
        (f"{za}-3", "confirmation")}
    assert [(f["number"], f["hs_code"], f["change_percent"]) for f in
            ours["valuation_flags"]] == [(f"{za}-1", "7102.31", "-25.0")]
    assert theirs["valuation_flags"] == [dict(f, flow="imports", partner=za)
                                         for f in ours["valuation_flags"]]
    csv_lines = kpnode("stats", "--quarter", quarter, "--csv", "--dir",
                       str(network.configs[za].directory)).stdout.splitlines()
    assert csv_lines[0] == "quarter,participant,flow,partner,hs_code,certificates,carats,usd"
    assert f"{quarter},{za},exports,{india},7102.31,3,7500.00,1200000.00" in csv_lines
    bad = kpnode("stats", "--quarter", "2026Q7", "--dir", str(network.configs[za].directory),
                 check=False)
    assert bad.returncode == 1 and "2026Q1" in bad.stderr


def _is_certificate(body: bytes, number: str) -> bool:
    try:
        payload = decode_body(parse_frame(body).body).payload
    except ProtocolError:
        return False
    return isinstance(payload, Certificate) and payload.number == number


async def test_dead_letters_are_listed_replayed_and_discarded_without_loss(
        amqp_url: str, tmp_path: Path, stack: AsyncExitStack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    za, india = fresh_codes(2)
    network = create_network(tmp_path, [za, india], [amqp_url])
    poison = f"{za}-BUG"
    original = Node._handle
    bug = [True]

    def handle(self: Node, ctx: object, delivery: Delivery) -> Verdict:
        if bug[0] and _is_certificate(delivery.body, poison):
            raise RuntimeError("a bug this certificate triggers every time")
        return original(self, ctx, delivery)  # type: ignore[arg-type]
    monkeypatch.setattr(Node, "_handle", handle)

    importer = await start(stack, network, india, http=True)
    exporter = await start(stack, network, za)
    assert importer.node is not None and exporter.node is not None
    exporter.node.issue(certificate(poison, za, india))
    await publish_raw(amqp_url, india, b"not a kpx frame at all", "junk-1")
    importer_dir = str(network.configs[india].directory)
    dead_queue = f"kpx.dead.{india}"
    for _ in range(600):
        if await queue_depth(amqp_url, dead_queue) == 2:
            break
        await asyncio.sleep(0.05)
    listed = kpnode_json("dead-letters", "list", "--dir", importer_dir)
    assert listed["count"] == 2
    by_reason = {d["reason"]: d for d in listed["dead_letters"]}
    assert set(by_reason) == {"frame.truncated", "broker.delivery_limit"}
    assert by_reason["broker.delivery_limit"]["claimed"]["certificate"] == poison
    assert await queue_depth(amqp_url, dead_queue) == 2  # listing took nothing away

    status = await gather_status(importer.node)
    assert status["dead_letters"]["count"] == 2
    assert status["dead_letters"]["by_reason"] == {"broker.delivery_limit": 1,
                                                   "frame.truncated": 1}
    assert any("dead-letter queue" in p["text"] for p in status["problems"])
    # Over HTTP, which anyone with a monitor token may poll, the status counts them without
    # reading them: a read takes each off the queue, and a replay meanwhile missed it.
    assert importer.http is not None
    token = Tokens(network.configs[india].directory).add("dashboard", Role.MONITOR, now_ms())
    async with aiohttp.ClientSession() as session, session.get(
            importer.http.url + "/api/v1/status",
            headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
        served = (await response.json())["dead_letters"]
    assert (served["count"], served["by_reason"], served["latest"]) == (2, {}, [])
    text = await metrics_text(importer)
    assert sample(text, "kpx_dead_letters_total", reason="frame.truncated") == 1
    assert sample(text, "kpx_rejections_total", reason="frame.truncated") == 1
    assert sample(text, "kpx_dead_letter_queue_messages") == 2
    assert (sample(text, "kpx_messages_in_total", kind="unknown", outcome="failed") or 0) >= 1

    shown = kpnode_json("dead-letters", "show", by_reason["broker.delivery_limit"]["id"][:8],
                        "--dir", importer_dir)
    assert shown["verdict_now"].startswith("admissible")
    junk_id = by_reason["frame.truncated"]["id"]
    assert kpnode("dead-letters", "show", "zzzzzz", "--dir", importer_dir,
                  check=False).returncode == 1

    bug[0] = False  # the fix is deployed: replay the certificate the bug stopped
    # ... while another command reads the queue (kpnode status, dead-letters list): it
    # holds every letter until it ends, and a replay meanwhile said 'no dead letter'.
    async with DeadLetterQueue(network.configs[india]) as reading:
        assert len(await reading.letters()) == 2
        replay = asyncio.create_task(asyncio.to_thread(
            kpnode, "dead-letters", "replay", by_reason["broker.delivery_limit"]["id"],
            "--reason", "fixed in 1.0.1", "--dir", importer_dir))
        await asyncio.sleep(2)
    await replay
    await until(lambda: state(exporter.node, Side.EXPORT, poison)  # type: ignore[arg-type]
                is State.DELIVERED)
    assert await queue_depth(amqp_url, dead_queue) == 1

    refused = kpnode("dead-letters", "discard", junk_id, "--dir", importer_dir, check=False)
    assert refused.returncode == 2  # --reason is required
    kpnode("dead-letters", "discard", junk_id[:10], "--reason", "test garbage", "--dir",
           importer_dir)
    assert await queue_depth(amqp_url, dead_queue) == 0
    records = [r for r in (read_operator_record(e.frame) for e in
                           importer.node.store.evidence() if e.direction == OPERATOR)
               if r["action"].startswith("dead_letter.")]  # not the API call above
    assert [(r["action"], r["reason"]) for r in records] == [
        ("dead_letter.replay", "fixed in 1.0.1"), ("dead_letter.discard", "test garbage")]
    assert records[1]["frame"] == b"not a kpx frame at all"  # discarded, not lost
    verified = kpnode("verify-log", "--dir", importer_dir)
    assert "evidence log OK" in verified.stdout
    async with DeadLetterQueue(network.configs[india]) as queue:
        assert await queue.letters() == []


async def test_a_replay_is_recorded_before_it_is_published_and_a_failed_one_says_so(
        amqp_url: str, tmp_path: Path, stack: AsyncExitStack) -> None:
    """The replay's evidence entry came after the publish: a command stopped in between
    (Ctrl-C, a crash) put the frame back into the inbox with no record of who did it. Now
    the entry comes first, and a publish that fails (here: the inbox was deleted) is
    recorded as failed, with the dead letter left where it was."""
    import aio_pika

    from node.deadletters import DeadLetterError

    india, other = fresh_codes(2)
    network = create_network(tmp_path, [india, other], [amqp_url])
    running = await start(stack, network, india)
    await publish_raw(amqp_url, india, b"junk for the dead-letter queue", "junk-r")
    dead_queue = f"kpx.dead.{india}"
    for _ in range(600):
        if await queue_depth(amqp_url, dead_queue) == 1:
            break
        await asyncio.sleep(0.05)
    await running.stop()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"kpx.inbox.{india}")
    node = Node.open(network.configs[india])
    try:
        async with DeadLetterQueue(network.configs[india]) as queue:
            (letter,) = await queue.letters()
            with pytest.raises(DeadLetterError, match="start the node once"):
                await queue.replay(node, await queue.find(letter.id), "after the fix")
        records = [read_operator_record(e.frame) for e in node.store.evidence()
                   if e.direction == OPERATOR]
    finally:
        node.close()
    assert [(r["action"], r["reason"]) for r in records] == [
        ("dead_letter.replay", "after the fix"),
        ("dead_letter.replay_failed", "no inbox on the broker")]
    assert await queue_depth(amqp_url, dead_queue) == 1  # still there to replay


async def test_a_replay_stopped_before_its_ack_leaves_no_second_dead_letter(
        amqp_url: str, tmp_path: Path, stack: AsyncExitStack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay stopped after the broker confirmed the publish but before the dead letter
    was acknowledged (Ctrl-C, kill -9, the broker gone) leaves the dead letter where it
    was, and the node dead-letters the replayed copy again: two letters with one id. A
    replay or discard of that id took one of them and said it was done, the other still
    listed. Now every copy of those bytes from the same publisher goes with it."""
    import aio_pika.message

    india, other = fresh_codes(2)
    network = create_network(tmp_path, [india, other], [amqp_url])
    await start(stack, network, india)
    dead_queue = f"kpx.dead.{india}"
    for body in (b"junk replayed twice", b"junk discarded twice"):
        await publish_raw(amqp_url, india, body, "junk")
    for _ in range(600):
        if await queue_depth(amqp_url, dead_queue) == 2:
            break
        await asyncio.sleep(0.05)
    node = Node.open(network.configs[india])
    stack.callback(node.close)
    replayed, discarded = (dead_letter_id(b"junk replayed twice"),
                           dead_letter_id(b"junk discarded twice"))

    class Stopped(Exception):
        pass

    real_ack = aio_pika.message.IncomingMessage.ack

    async def stopped(self: aio_pika.message.IncomingMessage, *args: Any,
                      **kwargs: Any) -> None:
        if self.exchange == "kpx.dlx":  # the dead letter's, not the running node's
            raise Stopped  # as kill -9 between the confirm and the ack
        await real_ack(self, *args, **kwargs)
    with monkeypatch.context() as patched:
        patched.setattr(aio_pika.message.IncomingMessage, "ack", stopped)
        for letter in (replayed, discarded):
            async with DeadLetterQueue(network.configs[india]) as queue:
                with pytest.raises(Stopped):
                    await queue.replay(node, await queue.find(letter), "stopped")
    for _ in range(600):  # each replayed copy refused again, beside the one left
        if await queue_depth(amqp_url, dead_queue) == 4:
            break
        await asyncio.sleep(0.05)
    async with DeadLetterQueue(network.configs[india]) as queue:
        ids = sorted(letter.id for letter in await queue.letters())
    assert ids == sorted([replayed, replayed, discarded, discarded])

    async with DeadLetterQueue(network.configs[india]) as queue:
        await queue.replay(node, await queue.find(replayed), "again, to the end")
    async with DeadLetterQueue(network.configs[india]) as queue:
        await queue.discard(node, await queue.find(discarded), "junk")
    for _ in range(100):
        await asyncio.sleep(0.05)
    async with DeadLetterQueue(network.configs[india]) as queue:
        assert [letter.id for letter in await queue.letters()] == [replayed]  # once


async def test_ping_reports_the_signed_pong_and_a_partner_that_cannot_answer(
        amqp_url: str, tmp_path: Path, stack: AsyncExitStack) -> None:
    za, india, absent = fresh_codes(3)
    network = create_network(tmp_path, [za, india, absent], [amqp_url])
    cli_view = Node.open(network.configs[za])
    stack.callback(cli_view.close)
    with pytest.raises(NodeNotRunning):
        await ping_partner(cli_view, india, timeout=1)
    exporter = await start(stack, network, za)
    await start(stack, network, india)
    assert exporter.node is not None
    result = await ping_partner(cli_view, india, timeout=20)
    assert result.answer == "pong" and result.partner == india
    assert result.round_trip_ms is not None and result.total_ms >= result.round_trip_ms >= 0
    india_key = bytes(network.configs[india].signing_key().verify_key)
    assert result.signed_by_key == key_id(india_key).hex()
    with pytest.raises(PingFailed, match="never left this node"):
        await ping_partner(cli_view, absent, timeout=1.5)
    assert cli_view.store.backlog() == []  # the undeliverable ping was withdrawn
    # Its inbox there and nobody answering: down, or (a key its registry does not list
    # yet) dead-lettered unanswered, which 'no pong' named no way to see.
    gone = await start(stack, network, absent)
    await gone.stop()
    with pytest.raises(PingFailed, match=r"down or behind.*'kpnode dead-letters list'"):
        await ping_partner(cli_view, absent, timeout=1.5)
    with pytest.raises(PingFailed, match="not a Participant"):
        await ping_partner(cli_view, "QQ", timeout=1)
    # in a thread: the nodes in this process must keep running while the command waits
    out = await asyncio.to_thread(kpnode, "ping", india, "--dir",
                                  str(network.configs[za].directory), "--json")
    assert json.loads(out.stdout)["answer"] == "pong"


async def test_the_served_status_says_what_the_running_node_knows_of_itself(
        amqp_url: str, tmp_path: Path, stack: AsyncExitStack) -> None:
    """After a broken connection the broker keeps the node's old one, its consumer and the
    inbox's claim until it notices it is gone (minutes). The node, reconnected, waits for
    the claim and consumes nothing meanwhile; /readyz said so, but the status the node
    served (GET /api/v1/status, the console's officers' view) counted the old consumer
    and said 'ok'. It now adds the running node's own failing checks as errors."""
    za, india = fresh_codes(2)
    network = create_network(tmp_path, [za, india], [amqp_url])
    node = await start(stack, network, za, http=True)
    assert node.transport is not None and node.http is not None
    token = Tokens(network.configs[za].directory).add("dashboard", Role.MONITOR, now_ms())

    async def served_status() -> dict[str, Any]:
        assert node.http is not None
        async with aiohttp.ClientSession() as session, session.get(
                node.http.url + "/api/v1/status",
                headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
            return dict(await response.json())

    assert (await served_status())["health"] == "ok"
    # what the broker still holds of the node's old connection: its claim and its consumer
    old = await aio_pika.connect(amqp_url)
    stack.push_async_callback(old.close)
    channel = await old.channel()
    connection = node.transport._connection
    assert connection is not None
    await connection.close()  # the node's connection breaks ...
    await channel.declare_queue(claim_queue(za), exclusive=True, auto_delete=True)
    inbox = await channel.declare_queue(inbox_queue(za), passive=True)

    async def ignore(message: Any) -> None:
        pass
    await inbox.consume(ignore)
    await until(lambda: node.transport is not None and node.transport.connected
                and not node.transport.consuming)  # ... it reconnects, and waits
    status = await served_status()
    assert status["broker"]["inbox"]["consumers"] == 1
    assert status["health"] == "error", status["problems"]
    assert any("does not consume" in p["text"] and p["level"] == "error"
               for p in status["problems"]), status["problems"]
    assert status["node"]["ready"] == {"broker_connected": True, "consuming": False,
                                       "store_writable": True, "clock_agrees": True,
                                       "publishing_allowed": True}
    await old.close()
    await until(lambda: node.transport is not None and node.transport.consuming, 20)
    assert (await served_status())["health"] == "ok"


def test_a_resent_certificate_waits_in_the_outbox_from_its_resend(tmp_path: Path) -> None:
    """A certificate without a receipt is queued again, byte for byte, an hour after it
    was sent, then after two, four ... When that resend cannot be published at once (the
    broker down or blocking for a minute), kpx_outbox_oldest_age_seconds and kpnode
    status's oldest age counted from the day the certificate was first queued: an outbox
    'stuck for 3 days' that had waited a minute, paging whoever watches its age."""
    network = create_network(tmp_path, ["ZA", "IN"], [])
    node = Node.open(network.configs["ZA"])
    try:
        issued_at = now_ms() - 3 * 86_400_000
        node.clock = lambda: issued_at
        node.issue(certificate("ZA-1", "ZA", "IN",
                               issued_on=day_of(issued_at).isoformat()))
        with node.store.transaction():
            node.store.mark_published([r.seq for r in node.store.backlog()], issued_at)
        now = now_ms()
        node.clock = lambda: now
        assert node.resend_unanswered(3_600_000)  # queued again now
        status = build_status_of(node, now)
        assert status["outbox"]["backlog"] == 1
        assert status["outbox"]["oldest_age_seconds"] < 60, status["outbox"]
        metrics = NodeMetrics()
        metrics.set_outbox([(r, n, o) for r, n, o, _, _ in node.store.outbox_summary()],
                           now)
        assert metrics.outbox_oldest._value.get() < 60
    finally:
        node.close()


def build_status_of(node: Node, now: int) -> dict[str, Any]:
    from node.status import BrokerView, build_status, read_store
    return build_status(participant=node.me, authority=node.config.authority, now=now,
                        running_pid=1, registry=node.registry,
                        own_public_key=bytes(node.signing_key(now).verify_key),
                        broker=BrokerView(reachable=True, inbox_consumers=1),
                        **read_store(node.store))


def test_an_answer_still_waiting_keeps_its_age_when_a_duplicate_asks_for_it_again(
        tmp_path: Path) -> None:
    """A receipt that cannot leave (its recipient's inbox missing, say) waits in the
    outbox; the exporter, without the receipt, sends the certificate again every hour,
    and each duplicate queues the same receipt again. Resetting the age there too made
    kpx_outbox_oldest_age_seconds fall back to 0 every hour: an outbox stuck for days
    never reached the RUNBOOK's 15 minutes. Only a row already sent starts a new wait."""
    network = create_network(tmp_path, ["BW", "BE"], [])
    bw, be = Node.open(network.configs["BW"]), Node.open(network.configs["BE"])
    try:
        first = now_ms() - 3 * 86_400_000
        bw.clock = be.clock = lambda: first
        bw.issue(certificate("BW-1", "BW", "BE", issued_on=day_of(first).isoformat()))
        (sent,) = bw.store.due(2**62, 10)
        be.handle_batch([Delivery(sent.frame)])  # its receipt waits, never published
        assert [r.kind for r in be.store.backlog()] == ["receipt"]
        now = now_ms()
        be.clock = lambda: now
        be.handle_batch([Delivery(sent.frame)])  # the exporter's resend: a duplicate
        status = build_status_of(be, now)
        assert status["outbox"]["backlog"] == 1
        assert status["outbox"]["oldest_age_seconds"] >= 3 * 86_400 - 60, status["outbox"]
    finally:
        bw.close()
        be.close()
