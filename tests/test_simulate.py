"""``kpnode simulate`` at a small size: every loop closes and every pair of partners agrees.

The trade generator is checked without a broker (shape, determinism, planned discrepancies);
the simulation itself runs on the session's real broker, in-process and with a node per
OS process, and the invariant checker is shown to catch a record that was tampered with.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from node.config import load_config
from node.desk import Desk
from node.localbroker import _proc_cmdline
from node.machine import Side, State
from node.simreport import Report, analyse, format_report
from node.simulate import Options, SimulationError, run_simulation
from node.store import Store
from node.trade import MEAN_CARATS, MEAN_USD, PARTICIPANTS, Shipment, plan_trade, received_as
from tests.test_network import fresh_codes, publish_raw


def test_trade_has_the_shape_of_the_scheme() -> None:
    codes = [p.code for p in PARTICIPANTS[:10]]
    plan = plan_trade(codes, 6000, seed=3)
    assert len({s.number for s in plan}) == 6000
    exporters = Counter(s.exporter for s in plan)
    # a few hubs carry most of the trade: the top three export over half the certificates
    assert sum(n for _, n in exporters.most_common(3)) > 0.5 * len(plan)
    carats = sum(s.certificate.carats_hundredths for s in plan) / 100 / len(plan)
    usd = sum(s.certificate.usd_cents for s in plan) / 100 / len(plan)
    assert 0.6 * MEAN_CARATS < carats < 1.6 * MEAN_CARATS
    assert 0.6 * MEAN_USD < usd < 1.6 * MEAN_USD
    assert all(s.exporter != s.importer for s in plan)
    assert plan_trade(codes, 50, seed=3) == plan_trade(codes, 50, seed=3)


@pytest.mark.parametrize("kind", ["parcels", "carats", "value"])
def test_a_planned_discrepancy_changes_what_is_received(kind: str) -> None:
    shipment = plan_trade(["EU", "IN"], 1, seed=1)[0]
    lines, parcels = received_as(shipment.certificate, kind)
    declared = shipment.certificate
    if kind == "parcels":
        assert lines is None and parcels != declared.parcels
    else:
        assert parcels is None and lines is not None and lines != declared.lines
    assert received_as(declared, None) == (None, None)


def test_a_dead_node_is_listed_first_among_the_failures_it_caused() -> None:
    """The report lists 50 failures; a node that died was added last, so after the loops
    it left open its death was in neither the text nor the JSON."""
    report = Report(codes=("EU", "AE"), mode="process", options={})
    for i in range(80):
        report.fail(f"loop {i} not closed")
    report.fail("node process AE exited with -9", cause=True)
    assert report.failure_count == 81
    assert report.failures[0] == "node process AE exited with -9"
    assert len(report.failures) == 50


def test_too_few_participants_is_refused() -> None:
    with pytest.raises(ValueError, match="two distinct"):
        plan_trade(["EU"], 10)
    with pytest.raises(ValueError, match="between 2 and"):
        Options(participants=61).chosen_codes()


@pytest.mark.parametrize(("options", "says"), [
    ("--codes ZA,ZA", "--codes: ZA given more than once"),
    ("--codes ZA,Q1", "--codes: 'Q1' is not a two-letter Participant code"),
    ("--codes ZA", "--codes must name between 2 and 60 Participants"),
    ("--participants 61", "--participants must be between 2 and 60"),
    ("--participants 2 --codes EU,AE,IN", "--participants 2 but --codes names 3: give one "
                                          "of them"),
    ("--certificates 0", "--certificates must be between 1 and 1,000,000"),
    ("--certificates 1000001", "--certificates must be between 1 and 1,000,000"),
    ("--rate 1e-320", "1,000 certificates at --rate 9.99989e-321 would take over 7 days; "
                      "raise --rate"),
    ("--confirm-delay 1e308", "--confirm-delay is at most 3600 seconds"),
    ("--rate -1", "--rate must be a finite number, 0 or more"),
    ("--rate inf", "--rate must be a finite number, 0 or more"),
    ("--confirm-delay nan", "--confirm-delay must be a finite number, 0 or more"),
    ("--discrepancies 1.5", "--discrepancies is a share between 0 and 1"),
    ("--timeout 0", "--timeout must be a number of seconds above 0"),
    ("--broker guest:s3cret@127.0.0.1:1", "--broker: 'guest:***@127.0.0.1:1' is not an "
                                          "amqp:// or amqps:// URL with a host"),
    ("--broker http://guest:s3cret@127.0.0.1:1/", "--broker: 'http://guest:***@127.0.0.1:1/' "
                                                  "is not an amqp:// or amqps:// URL with a "
                                                  "host"),
    ("--keep /dev/null/network", "--keep /dev/null/network: cannot make it (Not a directory)"),
])
def test_bad_options_are_refused_in_one_line_before_anything_starts(options: str, says: str
                                                                     ) -> None:
    # An unreachable broker too: the options are refused first, without trying it.
    broker = [] if "--broker" in options else ["--broker", "amqp://guest:guest@127.0.0.1:1/"]
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", *options.split(), *broker,
         "--no-progress"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"kpnode simulate: {says}"


def test_empty_codes_are_refused_not_taken_for_the_default_network() -> None:
    """`--codes "$CODES"` with the variable unset ran the default ten Participants."""
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", "--codes", "", "--broker",
         "amqp://guest:guest@127.0.0.1:1/", "--no-progress"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("kpnode simulate: --codes: '' is not a two-letter "
                                     "Participant code")


def test_keep_must_be_a_new_or_empty_directory(tmp_path: Path) -> None:
    """An earlier run's network in --keep would mix with the new one (its Chair key, its
    stores): refused, like a file there, before anything starts; an empty one is fine."""
    used = tmp_path / "used"
    (used / "chair").mkdir(parents=True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for keep, says in ((used, f"--keep {used} is not empty (an earlier run's network?); "
                               "give a new or empty directory"),
                       (afile, f"--keep {afile} is a file, not a directory")):
        result = subprocess.run(
            [sys.executable, "-m", "node.cli", "simulate", "--participants", "2",
             "--keep", str(keep), "--broker", "amqp://guest:guest@127.0.0.1:1/",
             "--no-progress"], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr.strip()) == (2, f"kpnode simulate: {says}")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", "--participants", "2", "--keep",
         str(empty), "--broker", "amqp://guest:guest@127.0.0.1:1/", "--no-progress"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 3  # past the options, stopped by the missing broker
    assert afile.read_text() == "x" and list(used.iterdir()) == [used / "chair"]
    assert empty.is_dir()  # the user's own, though this run left it empty


@pytest.mark.parametrize(("broker", "exit_status"), [
    ("amqp://guest:guest@127.0.0.1:1/", 3), ("http://127.0.0.1:1/", 2)])
def test_a_keep_directory_made_for_a_run_that_failed_is_removed(
        tmp_path: Path, broker: str, exit_status: int) -> None:
    """--keep made its directory, and any parents missing, while it read the options: a
    broker that does not answer (or a --broker option refused after --keep) left them
    behind, empty. What the run made and left empty goes; what was there stays."""
    keep = tmp_path / "runs" / "network"
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", "--participants", "2", "--keep",
         str(keep), "--broker", broker, "--no-progress"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == exit_status, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_broker_is_said_at_once_without_its_password() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", "--participants", "2",
         "--certificates", "5", "--broker", "amqp://kpx-za:s3cret@127.0.0.1:1/",
         "--no-progress"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr.startswith("kpnode simulate: no broker answered "
                                    "(amqp://kpx-za:***@127.0.0.1:1/: ")
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.broker
async def test_a_desk_that_fails_ends_the_run_at_once(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A desk task that raised died without a word, and the run waited its whole timeout
    for loops nobody was confirming."""
    from node.service import Node

    def broken(self: Node, arrivals: object) -> list[object]:
        raise RuntimeError("the back office's queue is gone")
    monkeypatch.setattr(Node, "confirm_many", broken)
    options = Options(codes=tuple(fresh_codes(2)), certificates=20, in_process=True,
                      rate=100.0, confirm_delay=0.0, seed=5, progress=False, timeout=120.0)
    started = time.monotonic()
    with pytest.raises(SimulationError, match=r"a desk stopped working: .*desk-confirm "
                       r"failed: RuntimeError: the back office's queue is gone"):
        await run_simulation(options, [amqp_url])
    assert time.monotonic() - started < 60


@pytest.mark.broker
@pytest.mark.parametrize("in_process", [True, False])
async def test_refused_commands_end_the_wait_and_fail_the_run(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch, in_process: bool) -> None:
    """A desk's issue or import confirmation that its node refused left a loop nobody
    would ever close, and the run waited its whole timeout for it (then listed a refused
    issue twice, as refused and as never issued). It ends once every other loop is closed,
    counts the refused ones apart and fails each once, with its node's reason."""
    from datetime import UTC, datetime, timedelta

    from node import simulate

    now = datetime.now(UTC)
    if (24 * 3600 - (now.hour * 3600 + now.minute * 60 + now.second)) < 600:
        pytest.skip("a run crossing UTC midnight would move 'tomorrow'")
    today = now.date()
    planned = simulate.plan_trade
    ahead = {}

    def dated_ahead(*args: object, **kwargs: object) -> list[Shipment]:
        """The plan, with one certificate dated two days ahead (its exporter's node refuses
        to issue it) and one dated tomorrow (issued and received, but its importer's node
        refuses to confirm an arrival before the date of issue)."""
        shipments = list(planned(*args, **kwargs))  # type: ignore[arg-type]
        for i, days in ((0, 2), (1, 1)):
            certificate = dataclasses.replace(
                shipments[i].certificate, issued_on=today + timedelta(days=days),
                expires_on=today + timedelta(days=days + 90))
            shipments[i] = dataclasses.replace(shipments[i], certificate=certificate)
            ahead[days] = shipments[i]
        return shipments
    monkeypatch.setattr(simulate, "plan_trade", dated_ahead)
    options = Options(codes=tuple(fresh_codes(2)), certificates=10, in_process=in_process,
                      rate=0.0, confirm_delay=0.0, discrepancy_share=0.0, seed=3,
                      progress=False, timeout=90.0)
    started = time.monotonic()
    report = await run_simulation(options, [amqp_url])
    assert time.monotonic() - started < 45  # not the 90 s timeout
    assert not report.ok
    assert (report.issued, report.closed, report.refused, report.open) == (9, 8, 2, 0)
    unissued, unconfirmed = ahead[2], ahead[1]
    future = (f"issued_on {unissued.certificate.issued_on} is in the future (today is "
              f"{today} UTC)")
    early = f"received_on {today} must lie between the date of issue and today"
    assert report.failures[:2] == [
        f"{unissued.number}: {unissued.exporter} refused to issue it: field.bad_date: "
        f"{future} (issued_on: {future})",
        f"{unconfirmed.number}: planned to close confirmed, but {unconfirmed.importer} "
        f"refused to confirm it: field.bad_date: {early} (received_on: {early}); "
        f"{unconfirmed.exporter} holds it delivered and {unconfirmed.importer} holds it "
        "received"]
    assert sum(unissued.number in f for f in report.failures) == 1
    assert report.to_json()["certificates"]["refused"] == 2
    assert "refused by a node              2" in format_report(report)


def test_a_refused_loop_is_counted_once_and_only_while_nothing_moves_it(
        tmp_path: Path) -> None:
    """The wait ended once finished + refused loops reached the plan's count: a refused
    loop that finished after all (expired) counted twice, and so did a refusal for a number
    nobody planned, so the run could stop with other loops still open."""
    from node.desk import RefusedCommand
    from node.network import create_network
    from node.service import Node
    from node.simulate import stuck
    from tests.netutil import carry, certificate

    network = create_network(tmp_path, ["ZA", "IN"], [])
    nodes = {code: Node.open(config) for code, config in network.configs.items()}
    try:
        for number in ("ZA-1", "ZA-2"):
            nodes["ZA"].issue(certificate(number, "ZA", "IN"))
        carry(nodes["ZA"], nodes)
        carry(nodes["IN"], nodes)  # both delivered at ZA, open
        record = nodes["ZA"].store.get(Side.EXPORT, "ZA-2")
        assert record is not None
        nodes["ZA"].store.save([dataclasses.replace(record, state=State.EXPIRED)])
        stores = {code: node.store for code, node in nodes.items()}
        refused = {n: RefusedCommand(command, n, by, "x") for n, command, by in (
            ("ZA-1", "confirm", "IN"),    # still delivered: nothing moves it on
            ("ZA-2", "confirm", "IN"),    # expired since: finished, counted there
            ("ZA-3", "issue", "ZA"),      # never issued
            ("ZA-9", "confirm", "IN"))}   # nobody planned it
        assert stuck(refused, stores, {"ZA-1": "ZA", "ZA-2": "ZA", "ZA-3": "ZA"}) == 2
    finally:
        for node in nodes.values():
            node.close()


@pytest.mark.broker
async def test_in_process_simulation_closes_every_loop(amqp_url: str, tmp_path: Path) -> None:
    options = Options(codes=tuple(fresh_codes(5)), certificates=200, in_process=True,
                      rate=400.0, confirm_delay=0.2, discrepancy_share=0.1, seed=5,
                      progress=False, directory=tmp_path, timeout=120.0)
    report = await run_simulation(options, [amqp_url])
    assert report.ok, report.failures
    assert (report.planned, report.issued, report.closed) == (200, 200, 200)
    assert report.open == 0
    assert report.discrepancies > 0
    assert report.partner_pairs >= 5
    assert len(report.receipt_ms) == 200 and len(report.confirmation_ms) == 200
    # Issued over the plan's issue window (about 0.5 s at 400/s), not the whole run's.
    throughput = report.to_json()["throughput"]
    assert 0 < report.issue_span_ms < report.span_ms
    assert throughput["issued_per_second"] == pytest.approx(
        200 / (report.issue_span_ms / 1000))
    assert "issued" in format_report(report)

    # The checker is not a rubber stamp: one importer record altered behind the node's
    # back is reported as a disagreement between the partners.
    shipments = plan_trade(options.codes or (), 200, rate=400.0, confirm_delay=0.2,
                           discrepancy_share=0.1, seed=5)
    victim = shipments[0]
    database = load_config(tmp_path / victim.importer).database_path
    store = Store(database)
    try:
        record = store.get(Side.IMPORT, victim.number)
        assert record is not None and record.confirmation is not None
        changed = dataclasses.replace(record.confirmation,
                                      parcels=record.confirmation.parcels + 7)
        store.save([dataclasses.replace(record, confirmation=changed)])
    finally:
        store.close()
    stores = {code: Store(load_config(tmp_path / code).database_path)
              for code in options.codes or ()}
    try:
        again = Report(codes=options.codes or (), mode="in-process", options={})
        analyse(again, stores, shipments)
    finally:
        for s in stores.values():
            s.close()
    assert not again.ok
    assert any(victim.number in failure for failure in again.failures)


@pytest.mark.broker
async def test_the_issue_window_counts_the_last_batch_of_issues(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --rate 0 nothing is paced: 'issued' read thousands of certificates a second
    (how fast a desk signs and writes its queue) beside a few hundred loops, and even that
    was high: a batch of issues shares one stamp, its start, and the window from the first
    stamp to the last left the last batch's work out. With --rate 0 the report gives the
    window, to the last issue's commit (every issue takes 20 ms here: 20 take 400 ms), and
    no pace."""
    from node.service import Node

    commit = Node._commit

    def slow(self: Node, ctx: object, decision: object, incoming: object = None) -> None:
        commit(self, ctx, decision, incoming)  # type: ignore[arg-type]
        if incoming is None and any(r.side is Side.EXPORT and r.state is State.ISSUED
                                    for r in getattr(decision, "records", ())):
            time.sleep(0.02)  # signing and writing each certificate takes this long
    monkeypatch.setattr(Node, "_commit", slow)
    codes = tuple(fresh_codes(2))
    exporters = Counter(s.exporter for s in plan_trade(codes, 20, seed=3))
    assert len(exporters) == 2  # both desks issue, one batch each
    options = Options(codes=codes, certificates=20, in_process=True, rate=0.0,
                      confirm_delay=0.0, discrepancy_share=0.0, seed=3, progress=False,
                      timeout=120.0)
    report = await run_simulation(options, [amqp_url])
    assert report.ok, report.failures
    assert report.issue_span_ms >= 20 * 20
    throughput = report.to_json()["throughput"]
    assert throughput["issued_per_second"] is None
    assert throughput["issue_seconds"] == report.issue_span_ms / 1000
    assert (f"  issued                all 20 at once (--rate 0) in "
            f"{report.issue_span_ms / 1000:.2f} s (first issue to the last one's commit; no "
            "pace asked for)") in format_report(report).splitlines()


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A small in-process simulation that ran to the end, every invariant holding: tests
    tamper with a copy of its stores, as a reviewer would, and analyse them again."""

    directory: Path
    codes: tuple[str, ...]
    shipments: list[Shipment]
    report: Report

    def reanalyse(self, into: Path, tamper: Callable[[dict[str, Store]], None],
                  shipments: Sequence[Shipment] | None = None) -> Report:
        """Analyse a copy of the run's stores (in ``into``) after ``tamper`` changed them."""
        copy = into / "network"
        shutil.copytree(self.directory, copy)
        stores = {code: Store(load_config(copy / code).database_path) for code in self.codes}
        try:
            tamper(stores)
            report = Report(codes=self.codes, mode="in-process", options={})
            analyse(report, stores, self.shipments if shipments is None else shipments)
        finally:
            for store in stores.values():
                store.close()
        return report


@pytest.fixture(scope="module")
def finished_run(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    directory = tmp_path_factory.mktemp("finished-run")
    options = Options(codes=tuple(fresh_codes(3)), certificates=60, in_process=True,
                      rate=0.0, confirm_delay=0.0, discrepancy_share=0.3, seed=7,
                      progress=False, directory=directory, timeout=120.0)
    report = asyncio.run(run_simulation(options, [amqp_url]))
    assert report.ok, report.failures
    assert report.closed == 60
    shipments = plan_trade(options.chosen_codes(), 60, rate=0.0, confirm_delay=0.0,
                           discrepancy_share=0.3, seed=7)
    return FinishedRun(directory, options.chosen_codes(), shipments, report)


def set_states(stores: Mapping[str, Store], shipment: Shipment, exporter: State,
               importer: State) -> None:
    """Move a loop's records to these states, behind the nodes' backs."""
    for code, side, state in ((shipment.exporter, Side.EXPORT, exporter),
                              (shipment.importer, Side.IMPORT, importer)):
        record = stores[code].get(side, shipment.number)
        assert record is not None
        stores[code].save([dataclasses.replace(record, state=state)])


@pytest.mark.broker
@pytest.mark.parametrize(("state", "importer_state"), [
    (State.REJECTED, State.REJECTED), (State.CANCELLED, State.CANCELLED),
    (State.DELIVERED, State.RECEIVED)])
def test_a_loop_not_closed_as_planned_fails_the_run(
        finished_run: FinishedRun, tmp_path: Path, state: State, importer_state: State
        ) -> None:
    """The plan confirms every loop. Ten loops rejected on both sides, with neither a reason
    nor a frame, used to be counted as rejected and pass: any end the plan did not ask
    for is a failure that names the loop."""
    victims = finished_run.shipments[:10]

    def tamper(stores: dict[str, Store]) -> None:
        for shipment in victims:
            set_states(stores, shipment, state, importer_state)
    report = finished_run.reanalyse(tmp_path, tamper)
    assert not report.ok
    assert report.closed == 50
    for shipment in victims:
        assert any(f.startswith(f"{shipment.number}: planned to close confirmed, but ")
                   and f"holds it {state}" in f for f in report.failures), report.failures
    assert (report.rejected, report.open) == ((10, 0) if state is State.REJECTED
                                              else (0, 10) if state is State.DELIVERED
                                              else (0, 0))
    # Both sides agree on these loops, open ones too (delivered at the exporter, received
    # at the importer): no mirror-statistics failures burying the loops' own.
    assert not [f for f in report.failures if f.startswith("mirror statistics")]


def confirm_as(stores: Mapping[str, Store], shipment: Shipment, kind: str | None) -> None:
    """Rewrite a loop's import confirmation on both sides, behind the nodes' backs, to say
    it arrived with discrepancy ``kind``; the signed frames stay as they were."""
    for code, side in ((shipment.exporter, Side.EXPORT), (shipment.importer, Side.IMPORT)):
        record = stores[code].get(side, shipment.number)
        assert record is not None and record.confirmation is not None
        lines, parcels = received_as(record.certificate, kind)
        changed = dataclasses.replace(
            record.confirmation, lines=record.certificate.lines if lines is None else lines,
            parcels=record.certificate.parcels if parcels is None else parcels)
        stores[code].save([dataclasses.replace(record, confirmation=changed)])


@pytest.mark.broker
def test_discrepancies_are_the_planned_ones_on_both_sides(finished_run: FinishedRun,
                                                          tmp_path: Path) -> None:
    """A loop planned to arrive a parcel short, its confirmation rewritten on both sides to
    a value discrepancy, used to pass: some discrepancy was planned, some recorded, and
    the two records agreed. Each side's discrepancies are held against the plan's."""
    victim = next(s for s in finished_run.shipments if s.discrepancy == "parcels")
    report = finished_run.reanalyse(tmp_path, lambda stores: confirm_as(stores, victim,
                                                                         "value"))
    assert not report.ok
    for code in (victim.exporter, victim.importer):
        assert any(f.startswith(f"{victim.number}: {code} records discrepancies lines[")
                   and "; the plan (parcels) implies parcels " in f
                   for f in report.failures), report.failures


@pytest.mark.broker
def test_records_are_held_against_their_signed_frames(finished_run: FinishedRun,
                                                      tmp_path: Path) -> None:
    """Records were compared with each other and frames with each other, never a record
    with its frame: a confirmation rewritten on both sides, with a plan that says the
    same, is caught only by the signed confirmation in each side's evidence log."""
    victim = next(s for s in finished_run.shipments if s.discrepancy is None)
    replanned = [dataclasses.replace(s, discrepancy="value") if s is victim else s
                 for s in finished_run.shipments]
    report = finished_run.reanalyse(tmp_path, lambda stores: confirm_as(stores, victim,
                                                                         "value"), replanned)
    assert {f"{victim.number}: {code}'s record of the import confirmation is not the signed "
            "one in its evidence log" for code in (victim.exporter, victim.importer)
            } <= set(report.failures)
    # verify-log's record checks see it too, and nothing else
    assert all(victim.number in f for f in report.failures), report.failures


@pytest.mark.broker
def test_a_certificate_issued_other_than_planned_fails(finished_run: FinishedRun,
                                                       tmp_path: Path) -> None:
    """Records, frames and discrepancies were held against each other, and discrepancies
    against the plan's, but every one of them follows the certificate issued: a loop whose
    certificate was not the planned one (a parcel count changed on the way from the plan to
    the desk, say) agreed with all of them and passed as planned."""
    victim = next(s for s in finished_run.shipments if s.discrepancy is None)
    planned = dataclasses.replace(victim.certificate, parcels=victim.certificate.parcels + 3)
    replanned = [dataclasses.replace(s, certificate=planned) if s is victim else s
                 for s in finished_run.shipments]
    report = finished_run.reanalyse(tmp_path, lambda stores: None, replanned)
    assert report.failures == [
        f"{victim.number}: {victim.exporter} issued it other than planned (parcels "
        f"{planned.parcels}→{victim.certificate.parcels})"]
    assert report.closed == len(replanned)


@pytest.mark.broker
@pytest.mark.parametrize("desk_lag_ms", [400, -2000])
async def test_latency_is_timed_from_the_planned_instant(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, desk_lag_ms: int
        ) -> None:
    """Latency used to start at the envelope's created_at, stamped when the desk's batch
    began, leaving out how long a due certificate waited for its desk. Desks here start
    the plan ``desk_lag_ms`` late: that wait is in issue→receipt and issue→confirmation,
    and shows as planned→issue. A desk early (negative) is timed from its issue instead:
    never a negative latency."""
    start = Desk.start
    monkeypatch.setattr(Desk, "start", lambda desk, start_at_ms: start(
        desk, start_at_ms + desk_lag_ms))
    options = Options(codes=tuple(fresh_codes(2)), certificates=20, in_process=True,
                      rate=0.0, confirm_delay=0.0, discrepancy_share=0.0, seed=3,
                      progress=False, directory=tmp_path, timeout=120.0)
    report = await run_simulation(options, [amqp_url])
    assert report.ok, report.failures
    assert len(report.receipt_ms) == len(report.confirmation_ms) == 20
    floor = max(desk_lag_ms, 0)
    assert min(report.receipt_ms) >= floor
    assert min(report.confirmation_ms) >= floor
    if desk_lag_ms < 0:  # from the issue: neither negative nor clamped to 0
        assert min(report.receipt_ms) > 0
    latency = report.to_json()["latency_ms"]
    assert latency["measured_from"] == "planned issue instant"
    assert latency["planned_to_issue"]["count"] == 20
    assert min(report.issue_lag_ms) >= floor
    assert "timed from each certificate's planned issue instant" in format_report(report)


@pytest.mark.broker
def test_kpnode_simulate_with_a_process_per_node(amqp_url: str, tmp_path: Path) -> None:
    codes = ",".join(fresh_codes(5))
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", "--codes", codes, "--certificates",
         "200", "--rate", "300", "--confirm-delay", "0.2", "--broker", amqp_url, "--json",
         "--no-progress", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "process"
    assert report["certificates"]["loops_closed"] == 200
    assert report["invariants"]["ok"] is True
    # each node process's desk heard its commits, and the parent read them
    assert report["latency_ms"]["measured_to"] == "exporter's commit of the answer"
    nodes = report["nodes"]
    assert set(nodes) == set(codes.split(","))
    assert all(n["peak_rss_mib"] and n["peak_rss_mib"] > 0 for n in nodes.values())
    assert sum(n["exports"] for n in nodes.values()) == 200
    assert sum(n["imports"] for n in nodes.values()) == 200
    # --keep said nothing of where the network went (kpnode demo --keep does)
    assert f"the network (node directories, stores, logs) is kept in {tmp_path}" \
        in result.stderr


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        # decoded leniently: another process's arguments need not be UTF-8
        cmdline = " ".join(_proc_cmdline(int(pid)))
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _wait_for_trading(proc: subprocess.Popen[str], tmp_path: Path,
                      logs: str = "kpx-sim-*/*/node.log") -> None:
    """Until a simulation whose TMPDIR (or --keep) is ``tmp_path`` trades: once a node has
    written its log."""
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob(logs)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the simulation did not start"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_stops_the_nodes_and_the_broker_it_started_and_removes_the_network(
        tmp_path: Path, signum: signal.Signals) -> None:
    """SIGTERM (``timeout``, a cancelled CI job, ``kill``) is handled as Ctrl-C: the node
    processes and the throwaway broker stop, and the temporary network — node keys and
    node.toml files with broker passwords — is removed. It used to leave all of them. So
    is SIGHUP (the terminal closed, an SSH session dropped), which left the broker running:
    it runs in a session of its own, so the hang-up never reaches it."""
    env = {k: v for k, v in os.environ.items() if k != "KPX_AMQP_URL"}
    env["TMPDIR"] = str(tmp_path)  # the broker's and the network's temporary directories
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "simulate", "--participants", "2",
         "--certificates", "100000", "--rate", "50", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_trading(proc, tmp_path)
        assert _processes_mentioning(str(tmp_path))  # broker and nodes run from there
        time.sleep(2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        assert err.rstrip().endswith("kpnode: interrupted"), err[-2000:]
        assert _processes_mentioning(str(tmp_path)) == []
        assert list(tmp_path.iterdir()) == []
    finally:
        # Whatever this test started and left behind (the broker runs in a process group of
        # its own, the nodes beside it), it stops: nothing else has tmp_path in its command.
        if proc.poll() is None:
            proc.kill()
        for line in _processes_mentioning(str(tmp_path)):
            with contextlib.suppress(OSError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)


async def _ten_certificates(amqp_url: str, *codes: str) -> subprocess.CompletedProcess[str]:
    """`kpnode simulate` of ten certificates between ``codes`` on the test broker."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "node.cli", "simulate", "--codes", ",".join(codes),
         "--certificates", "10", "--broker", amqp_url, "--no-progress"],
        capture_output=True, text=True, timeout=120)


@pytest.mark.broker
async def test_an_interrupted_run_removes_the_queues_it_created(
        amqp_url: str, tmp_path: Path) -> None:
    """Ctrl-C stopped the nodes one by one while the others still sent: messages stayed in
    the inboxes, and the next run on that broker refused to start ('queues in use'). With
    --keep, the queues were left on purpose, messages and all, with the same effect."""
    from node.brokerclient import connect_any, queue_info
    from node.transport import dead_letter_queue, inbox_queue

    codes = fresh_codes(3)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "simulate", "--codes", ",".join(codes),
         "--certificates", "100000", "--rate", "100", "--broker", amqp_url, "--no-progress",
         "--keep", str(tmp_path / "kept")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.to_thread(_wait_for_trading, proc, tmp_path / "kept", "*/node.log")
        await asyncio.sleep(3)  # trading
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(proc.communicate, timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    connection, _ = await connect_any([amqp_url])
    async with connection:
        left = {name: await queue_info(connection, name) for code in codes
                for name in (inbox_queue(code), dead_letter_queue(code))}
    assert left == dict.fromkeys(left), left
    result = await _ten_certificates(amqp_url, *codes)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.broker
async def test_a_simulation_leaves_queues_in_use_alone(amqp_url: str) -> None:
    """Pointed at a broker where a Participant's inbox holds messages (a real network's, or
    an interrupted run's), a simulation would consume them: it refuses, and they stay."""
    import aio_pika

    from node.transport import declare_topology, inbox_queue

    busy, other = fresh_codes(2)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, busy, 5)
        await publish_raw(amqp_url, busy, b"a real certificate", f"{busy}-message-0001")
        result = await _ten_certificates(amqp_url, busy, other)
        assert result.returncode == 3, result.stderr[-2000:]
        assert (f"queues in use on this broker: {inbox_queue(busy)} (1 messages ready, "
                "0 consumers)") in result.stderr
        queue = await channel.declare_queue(inbox_queue(busy), passive=True)
        assert queue.declaration_result.message_count == 1
        await channel.queue_delete(inbox_queue(busy))


@pytest.mark.broker
async def test_a_queue_left_with_other_settings_is_named_at_once(amqp_url: str) -> None:
    """Every node retried it for 60 s, then the run failed with 'no broker answered' and a
    traceback tail; the cause was only in node logs that the run then deleted."""
    import aio_pika

    from node.brokerclient import connect_any, queue_info
    from node.transport import dead_letter_queue, inbox_queue

    plain, other = fresh_codes(2)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(inbox_queue(plain), durable=True)
        started = time.monotonic()
        result = await _ten_certificates(amqp_url, other, plain)
        took = time.monotonic() - started
        await channel.queue_delete(inbox_queue(plain))
    # what the refused run had declared before it met the queue is gone with it
    connection, _ = await connect_any([amqp_url])
    async with connection:
        left = {name: await queue_info(connection, name) for name in (
            inbox_queue(other), dead_letter_queue(other), dead_letter_queue(plain),
            inbox_queue(plain))}
    assert left == dict.fromkeys(left), left
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"a queue of {plain} exists on this broker with other settings" in result.stderr
    assert "inequivalent arg" in result.stderr and "Traceback" not in result.stderr
    assert took < 30, took  # not after the nodes' 60 s


@pytest.mark.broker
async def test_a_second_simulation_on_the_same_participants_is_refused(amqp_url: str) -> None:
    """Two simulations started together on one broker both found the queues free, then
    took each other's messages: both failed after their timeout with invariant failures
    and left dead letters behind. The second is now refused at once."""
    from node.brokerclient import exclusive_claim

    running, other = fresh_codes(2)
    async with exclusive_claim([amqp_url], [f"kpx.simulation.{running}"]):
        result = await _ten_certificates(amqp_url, other, running)
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"another simulation is running on this broker with {running}:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.broker
async def test_an_in_process_node_that_cannot_start_is_one_line(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a node process that exits is reported as one line, so is an in-process node
    whose start fails; the nodes already started are stopped."""
    from node.runner import RunningNode
    from node.store import StoreError

    codes = fresh_codes(2)
    started: list[RunningNode] = []
    start = RunningNode.start

    async def second_fails(self: RunningNode) -> None:
        if started:
            raise StoreError("disk full")
        await start(self)
        started.append(self)
    monkeypatch.setattr(RunningNode, "start", second_fails)
    with pytest.raises(SimulationError) as failed:
        await run_simulation(Options(codes=tuple(codes), certificates=5, in_process=True,
                                     progress=False), [amqp_url])
    assert str(failed.value) == f"node {codes[1]} did not start: disk full"
    (first,) = started
    assert first.transport is not None and not first.transport.connected  # stopped


@pytest.mark.broker
def test_a_missing_virtual_host_is_named(amqp_url: str) -> None:
    import yarl

    url = str(yarl.URL(amqp_url).with_path("/kpx-no-such-vhost"))
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "simulate", "--participants", "2", "--broker", url,
         "--no-progress"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert ("the broker refused to open virtual host 'kpx-no-such-vhost': it does not exist, "
            "or this user may not use it") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_node_process_told_to_stop_while_connecting_stops_at_once(tmp_path: Path) -> None:
    """A node process looked at its stop signal only once connected: Ctrl-C as a run
    started, or a broker that does not answer, held the run up to 60 s."""
    from node.desk import write_desk_plan
    from node.network import create_network

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://guest:guest@127.0.0.1:1/"])
    directory = network.configs["ZA"].directory
    write_desk_plan(directory, "ZA", [])
    proc = subprocess.Popen([sys.executable, "-m", "node.simworker", "--dir", str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # connecting, to a broker that does not answer
        assert proc.poll() is None
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - stopped < 10
        assert proc.returncode == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_run_under_nohup_outlives_its_terminal() -> None:
    """SIGHUP stops a run like Ctrl-C, so that its broker and secrets go with it; but a
    run started with nohup ignores the hang-up on purpose, and must keep doing so."""
    from node.interrupt import sigterm_as_interrupt

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)  # delivered: ignored, no KeyboardInterrupt
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.broker
def test_the_queues_are_deleted_even_when_an_interrupt_lands_during_the_deletion(
        amqp_url: str) -> None:
    """An interrupt just after the loops closed cancelled the deletion itself (every task of
    the loop is cancelled), and the run's queues stayed on the broker. The cancelled run
    also waits for the deletion before it lets go of its claim on the Participants:
    another simulation let in meanwhile would have had an inbox deleted under it."""
    from node.brokerclient import connect_any, queue_info
    from node.simulate import _delete_queues

    names = [f"kpx.test.delete.{n}.{os.getpid()}" for n in range(3)]

    async def declare_then_cancel_the_deletion() -> None:
        connection, _ = await connect_any([amqp_url])
        async with connection:
            channel = await connection.channel()
            for name in names:
                await channel.declare_queue(name, durable=True)
        deleting = asyncio.create_task(_delete_queues([amqp_url], names))
        await asyncio.sleep(0)
        deleting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await deleting
        assert await left() == [], "the cancelled deletion returned before it was done"

    async def left() -> list[str]:
        connection, _ = await connect_any([amqp_url])
        async with connection:
            return [name for name in names if await queue_info(connection, name) is not None]

    asyncio.run(declare_then_cancel_the_deletion())  # its end waits for the deletion
    assert asyncio.run(left()) == []


def test_a_node_process_that_stopped_by_itself_is_said_to_have_had_a_signal(
        tmp_path: Path) -> None:
    """A node process ended by `kill` (or by a Ctrl-C only it received) was reported as
    'AE (0): ' — an exit status and nothing else."""
    from node.network import create_network
    from node.simulate import ProcessNodes

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://guest:guest@127.0.0.1:1/"])
    for config in network.configs.values():
        (config.directory / "node.log").write_text("")  # it logs warnings and errors only
    nodes = ProcessNodes(network, [], Options(codes=("ZA", "IN"), certificates=1))
    nodes.procs = {"ZA": SimpleNamespace(returncode=0),  # type: ignore[dict-item]
                   "IN": SimpleNamespace(returncode=-9)}
    with pytest.raises(SimulationError) as raised:
        nodes.check_alive()
    assert str(raised.value) == (
        "node process(es) exited early: ZA (exit status 0: stopped by a signal from "
        "outside): (nothing logged); IN (killed by SIGKILL): (nothing logged)")


def test_a_node_process_keeps_an_ignored_sigint(tmp_path: Path) -> None:
    """A simulation started in the background of a script ignores SIGINT, and Ctrl-C in
    the terminal does not stop it; its node processes stopped all the same (they set a
    handler of their own), and the run failed."""
    from node.desk import write_desk_plan
    from node.network import create_network

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://guest:guest@127.0.0.1:1/"])
    directory = network.configs["ZA"].directory
    write_desk_plan(directory, "ZA", [])
    proc = subprocess.Popen([sys.executable, "-m", "node.simworker", "--dir", str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        time.sleep(2)
        assert proc.poll() is None, "stopped by an ignored SIGINT"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("zone", ["Etc/GMT-14", "Etc/GMT+12"])
def test_the_plan_is_dated_by_the_nodes_utc_day_whatever_the_local_zone(
        zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan was dated by the machine's local day: east of UTC, from local midnight to
    UTC's, a day ahead of the nodes' (UTC) day, and every importer's confirmation was
    refused ("received_on ... must lie between the date of issue and today"). Of these two
    zones, one has another day than UTC at any hour."""
    from datetime import UTC, datetime

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        plan = plan_trade(["EU", "AE"], 3, seed=1)
        utc_day = datetime.now(UTC).date()
        assert {s.certificate.issued_on for s in plan} == {utc_day}
        assert all(s.number.split("-")[1] == str(utc_day.year) for s in plan)
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.broker
async def test_latency_is_timed_to_the_exporters_commit_of_the_answer(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency ran to the answer's evidence stamp: the instant its node began the batch
    that took it in, before the batch's other messages and its fsync were done. A node
    whose every answer takes 300 ms to commit had receipts timed at a few ms."""
    from node.service import Node
    from protocol import Kind

    commit = Node._commit

    def slow(self: Node, ctx: object, decision: object, incoming: object = None) -> None:
        commit(self, ctx, decision, incoming)  # type: ignore[arg-type]
        kind = getattr(getattr(incoming, "envelope", None), "kind", None)
        if kind in (Kind.RECEIPT, Kind.IMPORT_CONFIRMATION):
            time.sleep(0.3)  # a slow disk: the commit lands this much after the stamp
    monkeypatch.setattr(Node, "_commit", slow)
    options = Options(codes=tuple(fresh_codes(2)), certificates=4, in_process=True,
                      rate=0.0, confirm_delay=0.0, discrepancy_share=0.0, seed=3,
                      progress=False, timeout=120.0)
    report = await run_simulation(options, [amqp_url])
    assert report.ok, report.failures
    assert len(report.receipt_ms) == len(report.confirmation_ms) == 4
    assert min(report.receipt_ms) >= 300
    assert min(report.confirmation_ms) >= 300
    latency = report.to_json()["latency_ms"]
    assert latency["measured_to"] == "exporter's commit of the answer"
    assert latency["start_at_ms"] == report.start_at_ms
    assert "to the exporter's commit of the answer)" in format_report(report)


@pytest.mark.broker
async def test_a_record_unreadable_after_the_run_is_named_not_a_traceback(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A node's database damaged between the run and the check (a row changed outside
    kpx) ended the command in a traceback, with nothing on stdout for --json: it is a
    SimulationError (one line, exit 3) that names the node."""
    from node.simulate import InProcessNodes

    codes = tuple(fresh_codes(2))
    stop = InProcessNodes.stop

    async def stop_then_damage(self: InProcessNodes) -> None:
        await stop(self)
        with contextlib.closing(sqlite3.connect(
                load_config(tmp_path / codes[1]).database_path)) as db:
            db.execute("UPDATE certificates SET certificate = x'00' WHERE rowid = 1")
            db.commit()
    monkeypatch.setattr(InProcessNodes, "stop", stop_then_damage)
    options = Options(codes=codes, certificates=6, in_process=True, rate=0.0,
                      confirm_delay=0.0, discrepancy_share=0.0, seed=3, progress=False,
                      directory=tmp_path, timeout=120.0)
    with pytest.raises(SimulationError, match=rf"^node {codes[1]}'s records cannot be read "
                       r"after the run: the database holds a record kpx cannot read"):
        await run_simulation(options, [amqp_url])


@pytest.mark.broker
async def test_a_database_gone_after_the_run_is_named_not_made_anew(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A node's database deleted between the run and the check was created anew, empty:
    the check then failed without naming the node, and a kept network held a fresh
    database where the node's had been."""
    from node.simulate import InProcessNodes

    codes = tuple(fresh_codes(2))
    stop = InProcessNodes.stop

    async def stop_then_delete(self: InProcessNodes) -> None:
        await stop(self)
        load_config(tmp_path / codes[1]).database_path.unlink()
    monkeypatch.setattr(InProcessNodes, "stop", stop_then_delete)
    options = Options(codes=codes, certificates=6, in_process=True, rate=0.0,
                      confirm_delay=0.0, discrepancy_share=0.0, seed=3, progress=False,
                      directory=tmp_path, timeout=120.0)
    with pytest.raises(SimulationError, match=rf"^node {codes[1]}'s records cannot be read "
                       r"after the run: no database at "):
        await run_simulation(options, [amqp_url])
    assert not load_config(tmp_path / codes[1]).database_path.exists()


@pytest.mark.broker
async def test_a_damaged_evidence_log_after_the_run_is_named_too(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the records were read before the analysis: a node whose evidence log's pages
    were damaged (its records intact) ended in "the nodes' records cannot be read after
    the run: database disk image is malformed", naming no node, though README.md says a
    damaged database is one line naming the node."""
    from node.simulate import InProcessNodes

    codes = tuple(fresh_codes(2))
    stop = InProcessNodes.stop

    async def stop_then_damage(self: InProcessNodes) -> None:
        await stop(self)
        path = load_config(tmp_path / codes[1]).database_path
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            root = db.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' "
                              "AND name = 'evidence'").fetchone()[0]
        with path.open("r+b") as database:  # the evidence table's root page, overwritten
            database.seek((root - 1) * page_size)
            database.write(b"\xff" * page_size)
    monkeypatch.setattr(InProcessNodes, "stop", stop_then_damage)
    options = Options(codes=codes, certificates=6, in_process=True, rate=0.0,
                      confirm_delay=0.0, discrepancy_share=0.0, seed=3, progress=False,
                      directory=tmp_path, timeout=120.0)
    with pytest.raises(SimulationError, match=rf"^node {codes[1]}'s records cannot be read "
                       r"after the run: .*malformed"):
        await run_simulation(options, [amqp_url])


@pytest.mark.broker
@pytest.mark.parametrize("in_process", [True, False])
async def test_a_kept_network_reproduces_the_reports_latency(
        amqp_url: str, tmp_path: Path, in_process: bool) -> None:
    """The report gives start_at_ms for reproducing its figures from a kept network, and a
    node process leaves when it committed each answer beside its store; an in-process run
    left nothing, so its kept network gave figures timed to the evidence stamps instead."""
    from node.desk import read_answered

    codes = tuple(fresh_codes(2))
    options = Options(codes=codes, certificates=8, in_process=in_process, rate=0.0,
                      confirm_delay=0.0, discrepancy_share=0.0, seed=3, progress=False,
                      directory=tmp_path, timeout=120.0)
    report = await run_simulation(options, [amqp_url])
    assert report.ok, report.failures
    shipments = plan_trade(codes, 8, rate=0.0, confirm_delay=0.0, discrepancy_share=0.0,
                           seed=3)
    stores = {code: Store(load_config(tmp_path / code).database_path) for code in codes}
    try:
        again = Report(codes=codes, mode=report.mode, options={})
        analyse(again, stores, shipments, report.start_at_ms,
                answered={code: read_answered(tmp_path / code) for code in codes})
    finally:
        for store in stores.values():
            store.close()
    assert again.to_json()["latency_ms"] == report.to_json()["latency_ms"]
    assert again.latency_end == "exporter's commit of the answer"
    # and the issue window, to the last issue's commit
    assert again.issue_span_ms == report.issue_span_ms > 0
    assert again.issue_span_to_commit
