"""The operator's commands: ``status``, ``dead-letters``, ``ping`` and ``stats``.

The work is done in :mod:`node.status`, :mod:`node.deadletters`, :mod:`node.ping` and
:mod:`node.stats`; this module only parses, prints and maps failures to exit codes
(1 refused or bad input, 3 environment: no broker, node not running).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import io
import json
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from node.brokerclient import amqp_library_logs_quiet
from node.cli import EXIT_ENVIRONMENT, UserError, with_node
from node.deadletters import DeadLetter, DeadLetterError, DeadLetterQueue, verdict_now
from node.ping import NodeNotRunning, PingFailed, ping_partner
from node.registry import utc_instant
from node.service import Node
from node.stats import DEFAULT_VALUATION_THRESHOLD, Quarter, quarterly_report
from node.status import gather_status, render_status
from node.terminal import emit, fail, printable, table
from node.transport import TransportUnavailable
from node.views import carats, usd

Handler = Callable[[argparse.Namespace], None]


def _operator_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> None:
        try:
            with amqp_library_logs_quiet():
                handler(args)
        except (DeadLetterError, PingFailed) as exc:
            raise UserError(str(exc)) from None
        except (TransportUnavailable, NodeNotRunning) as exc:
            fail(args, EXIT_ENVIRONMENT, str(exc))
    return run


def _seconds(text: str) -> float:
    """A period: --watch 0 asked the broker for a report in a tight loop."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 86_400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be seconds from 0.1 to 86400, not {text!r}")
    return value


# -- status -----------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> None:
    def show(status: dict[str, Any]) -> None:
        if args.watch is not None and args.json:
            print(json.dumps(status, sort_keys=True), flush=True)  # one document a line
        elif args.watch is not None:
            print("\x1b[H\x1b[2J" + printable(render_status(status)), flush=True)
        else:
            emit(args, status, render_status(status))

    async def run(node: Node) -> None:
        while True:
            show(await gather_status(node))
            if args.watch is None:
                return
            await asyncio.sleep(args.watch)

    with_node(args, lambda node: asyncio.run(run(node)))


# -- dead letters -------------------------------------------------------------------------


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return utc_instant(ms).strftime("%Y-%m-%d %H:%M:%S")


def _letter_row(d: DeadLetter) -> list[object]:
    claimed = d.claimed or {}
    return [d.id, _when(d.dead_lettered_at), d.reason, d.sender or claimed.get("sender", "?"),
            claimed.get("kind", "unreadable"), claimed.get("certificate") or "",
            d.text[:60]]


def cmd_dead_list(args: argparse.Namespace) -> None:
    async def run(node: Node) -> None:
        async with DeadLetterQueue(node.config) as queue:
            letters = await queue.letters()
            depth, name = queue.depth, queue.queue_name
        data = {"queue": name, "count": depth, "dead_letters": [d.json() for d in letters]}
        text = f"{depth} dead letter(s) in {name}" + (" (oldest first)" if letters else "")
        if letters:
            text += "\n" + table([_letter_row(d) for d in letters],
                                 ("id", "dead-lettered", "reason", "sender", "kind",
                                  "certificate", "text"))
        if len(letters) < depth:
            text += f"\n(showing {len(letters)}: the others are held by another reader)"
        emit(args, data, text)
    with_node(args, lambda node: asyncio.run(run(node)))


def cmd_dead_show(args: argparse.Namespace) -> None:
    async def run(node: Node) -> None:
        async with DeadLetterQueue(node.config) as queue:
            held = await queue.find(args.id)
        d = held.letter
        verdict = verdict_now(node, held.message.body)
        data = {**d.json(), "verdict_now": verdict, "frame_hex": held.message.body.hex()}
        def shown(value: object) -> str:  # headers and claims come from whoever sent it
            return printable(str(value), one_line=True)
        lines = [f"dead letter {d.id} ({d.size} bytes)",
                 f"  dead-lettered  {_when(d.dead_lettered_at)}",
                 f"  reason         {shown(d.reason)}",
                 f"  text           {shown(d.text)}",
                 f"  sender         {shown(d.sender or '(not authenticated)')}",
                 f"  message id     {shown(d.message_id or '-')}"]
        if d.claimed:
            lines.append("  the frame claims (unverified):")
            lines += [f"    {k:<12} {shown(v)}" for k, v in d.claimed.items()]
        else:
            lines.append("  the frame does not parse")
        lines.append(f"  checked now    {verdict}")
        lines.append(f"replay it with: kpnode dead-letters replay {d.id} --reason TEXT")
        emit(args, data, "\n".join(lines))
    with_node(args, lambda node: asyncio.run(run(node)))


def _reason(args: argparse.Namespace, action: str) -> str:
    """The operator's why, for the evidence log: checked before the node or the broker is
    touched (``--reason ""`` passed argparse's 'required' and a replay was recorded with
    no why)."""
    reason: str = args.reason
    if not reason.strip():
        raise UserError(f"a {action} needs a --reason: why, for the evidence log")
    return reason


def cmd_dead_replay(args: argparse.Namespace) -> None:
    reason = _reason(args, "replay")

    async def run(node: Node) -> None:
        async with DeadLetterQueue(node.config) as queue:
            held = await queue.find(args.id)
            seq = await queue.replay(node, held, reason)
        emit(args, {"replayed": held.letter.id, "evidence_seq": seq},
             f"{held.letter.id}: replayed to this node's inbox, where it is verified and "
             f"decided like any other message (evidence log entry {seq})")
    with_node(args, lambda node: asyncio.run(run(node)))


def cmd_dead_discard(args: argparse.Namespace) -> None:
    reason = _reason(args, "discard")

    async def run(node: Node) -> None:
        async with DeadLetterQueue(node.config) as queue:
            held = await queue.find(args.id)
            seq = await queue.discard(node, held, reason)
        emit(args, {"discarded": held.letter.id, "evidence_seq": seq},
             f"{held.letter.id}: discarded; its bytes and your reason are kept in evidence "
             f"log entry {seq}")
    with_node(args, lambda node: asyncio.run(run(node)))


# -- ping ------------------------------------------------------------------------------


def cmd_ping(args: argparse.Namespace) -> None:
    def run(node: Node) -> None:
        result = asyncio.run(ping_partner(node, args.partner, args.timeout))
        if result.answer == "rejection":
            raise UserError(f"{result.partner} refused the ping: {result.rejection}")
        rtt = "" if result.round_trip_ms is None else f"round trip {result.round_trip_ms} ms, "
        emit(args, result.json(),
             f"pong from {result.partner}: signed by key {result.signed_by_key[:16]}, "
             f"{rtt}{result.total_ms} ms from queueing (message {result.answer_message_id})")
    with_node(args, run)


# -- stats -----------------------------------------------------------------------------


def _figures(f: dict[str, int]) -> list[object]:
    return [f["certificates"], carats(f["carats_hundredths"]), usd(f["usd_cents"])]


def _amount(field: str, value: int | None) -> str:
    if value is None:
        return "-"
    if field.endswith("usd_cents"):
        return "US$ " + usd(value)
    if field.endswith("carats_hundredths"):
        return carats(value) + " ct"
    return str(value)


def render_stats(report: dict[str, Any]) -> str:
    parts = [f"{report['participant']} {report['quarter']} ({report['from']} to {report['to']}),"
             " by date of issue; rejected, cancelled and replaced certificates excluded", ""]
    if not report["trade"]:
        parts.append("no certificates in this quarter")
    else:
        parts.append(table([[r["flow"], r["partner"], r["hs_code"], *_figures(r)]
                            for r in report["trade"]],
                           ("flow", "partner", "HS code", "certificates", "carats", "US$")))
    if report["mirror"]:
        parts += ["", "mirror check: declared vs confirmed received",
                  table([[m["flow"], m["partner"], *_figures(m["declared"]),
                          *_figures(m["confirmed"])] for m in report["mirror"]],
                        ("flow", "partner", "declared certs", "carats", "US$",
                         "confirmed certs", "carats", "US$"))]
    disagreements = report["disagreements"]
    if disagreements:
        parts += ["", f"{len(disagreements)} disagreement(s):",
                  table([[d["flow"], d["partner"], d["number"], d["state"], d["field"],
                          _amount(d["field"], d["declared"]), _amount(d["field"], d["received"])]
                         for d in disagreements],
                        ("flow", "partner", "certificate", "state", "field", "declared",
                         "received"))]
    elif report["mirror"]:
        parts.append("every certificate confirmed exactly as declared")
    flags = report["valuation_flags"]
    parts += ["", f"valuation check (more than {report['valuation_threshold_percent']} % "
              f"per carat): {len(flags)} flag(s)"]
    if flags:
        parts.append(table([[f["flow"], f["partner"], f["number"], f["hs_code"],
                             f["declared_usd_per_carat"], f["received_usd_per_carat"],
                             f["change_percent"] + " %"] for f in flags],
                           ("flow", "partner", "certificate", "HS code", "declared $/ct",
                            "received $/ct", "change")))
    return "\n".join(parts)


def stats_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["quarter", "participant", "flow", "partner", "hs_code", "certificates",
                     "carats", "usd"])
    for r in report["trade"]:
        writer.writerow([report["quarter"], report["participant"], r["flow"], r["partner"],
                         r["hs_code"], r["certificates"],
                         f"{Decimal(r['carats_hundredths']) / 100:.2f}",
                         f"{Decimal(r['usd_cents']) / 100:.2f}"])
    return out.getvalue().rstrip("\n")


def cmd_stats(args: argparse.Namespace) -> None:
    try:
        quarter = Quarter.parse(args.quarter)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        threshold = Decimal(args.valuation_threshold) / 100
    except InvalidOperation:
        raise UserError("--valuation-threshold is a percentage, e.g. 10") from None
    if not threshold.is_finite() or threshold <= 0:
        raise UserError("--valuation-threshold must be a percentage above 0, e.g. 10")

    def run(node: Node) -> None:
        report = quarterly_report(node.me, node.store.records(
            issued_between=(quarter.first_day, quarter.last_day)), quarter, threshold)
        if args.csv:
            print(stats_csv(report))
        else:
            emit(args, report, render_stats(report))
    with_node(args, run)


# -- the parser ------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    def add(name: str, handler: Handler, help_: str,
            into: argparse._SubParsersAction[argparse.ArgumentParser] = sub
            ) -> argparse.ArgumentParser:
        sp = into.add_parser(name, help=help_, description=help_, parents=[common])
        sp.set_defaults(handler=_operator_errors(handler))
        return sp

    sp = add("status", cmd_status, "the node's health and the state of its exchange")
    sp.add_argument("--watch", nargs="?", type=_seconds, const=2.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until Ctrl-C; with --json, one "
                    "JSON document per line")
    dead = sub.add_parser("dead-letters", help="browse, replay or discard the node's "
                          "dead letters")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="COMMAND")
    add("list", cmd_dead_list, "every dead letter, oldest first (nothing is removed)",
        dead_sub)
    sp = add("show", cmd_dead_show, "one dead letter in full, and what the node's checks "
             "say of it now", dead_sub)
    sp.add_argument("id", help="the dead letter's id (or at least 6 of its first digits)")
    sp = add("replay", cmd_dead_replay, "send a dead letter to this node's inbox again, to "
             "be verified and decided afresh", dead_sub)
    sp.add_argument("id", help="the dead letter's id (or at least 6 of its first digits)")
    # Required as for discard: the evidence log says who replayed a message, when and why.
    sp.add_argument("--reason", required=True, help="why (kept in the evidence log)")
    sp = add("discard", cmd_dead_discard, "remove a dead letter; its bytes and the reason "
             "stay in the evidence log", dead_sub)
    sp.add_argument("id", help="the dead letter's id (or at least 6 of its first digits)")
    sp.add_argument("--reason", required=True, help="why (kept in the evidence log)")
    sp = add("ping", cmd_ping, "send a signed ping to a partner through the running node "
             "and wait for its signed pong")
    sp.add_argument("partner", help="the partner's two-letter code")
    sp.add_argument("--timeout", type=_seconds, default=10.0, help="seconds (default 10)")
    sp = add("stats", cmd_stats, "quarterly certificate statistics per partner and HS code, "
             "with the mirror and valuation checks")
    sp.add_argument("--quarter", required=True, help="e.g. 2026Q1")
    sp.add_argument("--csv", action="store_true", help="the trade table as CSV")
    sp.add_argument("--valuation-threshold", default=str(DEFAULT_VALUATION_THRESHOLD * 100),
                    metavar="PERCENT", help="flag a received value per carat this far from "
                    "the declared one (default 10)")
