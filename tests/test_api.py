"""The HTTP API: every endpoint, its authorisation, its refusals, idempotency, evidence.

Messages between the two nodes are carried by hand here (tests/netutil.carry); the last
test runs them on a real broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from openapi_spec_validator import validate

from node import httpserver
from node import store as store_module
from node.api import ROUTES, api_app
from node.config import ConfigError, NodeConfig
from node.evidence import OPERATOR, read_operator_record
from node.machine import Record, Side, State, day_of
from node.metrics import NodeMetrics
from node.network import create_network
from node.openapi import openapi_document
from node.runner import RunningNode
from node.service import Delivery, Node, now_ms
from node.stats import Quarter
from node.store import Store, StoreError
from node.tokens import Principal, Role, Tokens, token_hash
from node.web import mount_web
from node.webcontext import AnonymousBudget, quarter_of
from protocol import ParticipantStatus, parse_frame
from tests.netutil import carry, certificate, certificate_json
from tests.webutil import Served, refuse_operator_entries, served_pair

API = "/api/v1"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Served, Served]]:
    async with served_pair(tmp_path, others=[("XX", ParticipantStatus.SUSPENDED)]) as served:
        yield served


def kpnode(*args: str) -> str:
    """The real command, in its own process (it configures logging for the process)."""
    done = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def api_entries(node: Node) -> list[dict[str, Any]]:
    return [read_operator_record(e.frame) for e in node.store.evidence()
            if e.direction == OPERATOR]


async def issue(s: Served, number: str, **changes: Any) -> Any:
    response = await s.client.post(f"{API}/certificates", headers=s.auth("officer"),
                                   json=certificate_json(number, "ZA", "IN", **changes))
    assert response.status == 201, await response.text()
    return await response.json()


def test_openapi_document_validates_and_matches_the_served_routes() -> None:
    document = openapi_document()
    validate(document)
    described = {(method.upper(), path) for path, item in document["paths"].items()
                 for method in item}
    app = api_app(None, Tokens(Path("/nonexistent")))  # type: ignore[arg-type]
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    assert served == described
    assert described == {(m, p) for m, p, _ in ROUTES}


def test_the_documented_certificate_schema_refuses_what_the_node_refuses() -> None:
    """An integrator who checks a body against the OpenAPI document before sending it must
    not meet a 400 the document allows: the node requires `remarks` and refuses fields it
    does not know, in the certificate and in each party."""
    from jsonschema import Draft202012Validator

    from protocol.errors import ValidationError
    from protocol.schema import validate_certificate

    components = openapi_document()["components"]
    checker = Draft202012Validator({"$ref": "#/components/schemas/Certificate",
                                    "components": components})
    good = certificate_json("ZA-2026-00001", "ZA", "IN")
    assert checker.is_valid(good)
    validate_certificate(good)
    no_remarks = {k: v for k, v in good.items() if k != "remarks"}
    extra_field = {**good, "carats": 3}
    extra_in_party = {**good, "exporter": {**good["exporter"], "vat": "x"}}
    for bad in (no_remarks, extra_field, extra_in_party):
        with pytest.raises(ValidationError):
            validate_certificate(bad)
        assert not checker.is_valid(bad), bad


async def test_openapi_is_public_and_every_other_call_needs_a_token(pair: tuple[Served,
                                                                                Served]) -> None:
    za, _ = pair
    response = await za.client.get(f"{API}/openapi.json")
    assert response.status == 200
    assert (await response.json())["openapi"] == "3.1.0"
    response = await za.client.get(f"{API}/certificates")
    assert response.status == 401
    assert (await response.json())["error"] == "auth.missing_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = await za.client.get(f"{API}/status", headers={"Authorization": "Bearer nope"})
    assert response.status == 401
    assert (await response.json())["error"] == "auth.bad_token"
    response = await za.client.get(f"{API}/status", headers=za.auth("monitor"))
    assert response.status == 200
    assert (await response.json())["participant"] == "ZA"  # the broker is unreachable here


async def test_a_monitor_reads_but_cannot_act_and_a_revoked_token_stops_working(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    body = certificate_json("ZA-2026-0001", "ZA", "IN")
    response = await za.client.post(f"{API}/certificates", headers=za.auth("monitor"),
                                    json=body)
    assert response.status == 403
    assert (await response.json())["error"] == "auth.forbidden"
    assert za.node.records() == [] and za.node.store.backlog() == []
    for path in ("ZA-1/cancel", "ZA-1/confirm", "ZA-1/replace"):
        response = await za.client.post(f"{API}/certificates/{path}",
                                         headers=za.auth("monitor"), json={})
        assert response.status == 403
    response = await za.client.get(f"{API}/certificates", headers=za.auth("monitor"))
    assert response.status == 200
    za.context.tokens.revoke("za-monitor")
    response = await za.client.get(f"{API}/certificates", headers=za.auth("monitor"))
    assert response.status == 401


async def test_validate_lists_every_problem_with_paths_and_sends_nothing(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    bad = certificate_json("ZA-2026-0001", "ZA", "IN", parcels=0)
    bad["lines"][1]["usd_cents"] = 1.5
    response = await za.client.post(f"{API}/certificates/validate",
                                    headers=za.auth("monitor"), json=bad)
    assert response.status == 200
    verdict = await response.json()
    assert verdict["valid"] is False
    found = {(p["path"], p["reason"]) for p in verdict["problems"]}
    assert ("parcels", "field.not_positive") in found
    assert ("lines[1].usd_cents", "field.float_not_allowed") in found
    response = await za.client.post(f"{API}/certificates/validate", headers=za.auth("officer"),
                                    json=certificate_json("ZA-2026-0001", "ZA", "XX"))
    verdict = await response.json()
    assert verdict["valid"] is False
    assert verdict["problems"][0]["reason"] == "participant.suspended"
    response = await za.client.post(f"{API}/certificates/validate", headers=za.auth("officer"),
                                    json=certificate_json("ZA-2026-0001", "ZA", "IN"))
    assert await response.json() == {"valid": True, "number": "ZA-2026-0001", "problems": []}
    assert za.node.records() == [] and za.node.store.backlog() == []
    assert not [e for e in za.node.store.evidence() if e.direction == "out"]


async def test_issue_answers_bad_input_and_refusals_with_the_right_status(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    officer = za.auth("officer")
    response = await za.client.post(f"{API}/certificates", headers=officer, data=b"{nope")
    assert response.status == 400
    assert (await response.json())["error"] == "request.malformed"
    twice = json.dumps(certificate_json("ZA-2026-0001", "ZA", "IN")).replace(
        '"parcels": 3', '"parcels": 3, "parcels": 300')
    response = await za.client.post(f"{API}/certificates", headers=officer, data=twice)
    assert response.status == 400
    assert (await response.json())["message"] == (
        "the body is not JSON kpx accepts: the key 'parcels' appears twice in one object")
    assert za.node.records() == []
    bad = certificate_json("ZA-2026-0001", "ZA", "IN")
    del bad["importer"]
    response = await za.client.post(f"{API}/certificates", headers=officer, json=bad)
    assert response.status == 400
    error = await response.json()
    assert error["error"] == "body.schema"
    assert [(p["path"], p["reason"]) for p in error["problems"]] == [
        ("importer", "field.required")]
    response = await za.client.post(f"{API}/certificates", headers=officer,
                                    json=certificate_json("ZA-2026-0002", "ZA", "XX"))
    assert response.status == 422
    assert (await response.json())["error"] == "participant.suspended"
    record = await issue(za, "ZA-2026-0001")
    assert (record["state"], record["partner"]) == ("issued", "IN")
    response = await za.client.post(f"{API}/certificates", headers=officer,
                                    json=certificate_json("ZA-2026-0001", "ZA", "IN"))
    assert response.status == 409
    assert (await response.json())["error"] == "certificate.duplicate_number"
    assert len(za.node.store.backlog()) == 1


async def test_a_retried_issue_with_its_idempotency_key_returns_the_first_answer(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    headers = {**za.auth("officer"), "Idempotency-Key": "customs-4711"}
    body = certificate_json("ZA-2026-0001", "ZA", "IN")
    first = await za.client.post(f"{API}/certificates", headers=headers, json=body)
    again = await za.client.post(f"{API}/certificates", headers=headers, json=body)
    assert (first.status, again.status) == (201, 201)
    assert await first.read() == await again.read()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(za.node.store.backlog()) == 1
    other = certificate_json("ZA-2026-0002", "ZA", "IN")
    response = await za.client.post(f"{API}/certificates", headers=headers, json=other)
    assert response.status == 422
    assert (await response.json())["error"] == "idempotency.key_reused"
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0002") is None
    response = await za.client.post(f"{API}/certificates",
                                    headers={**headers, "Idempotency-Key": "bad key"}, json=other)
    assert response.status == 400


async def test_an_answer_that_cannot_be_stored_undoes_the_action_and_retrying_is_safe(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """The action and its remembered answer commit together: a 503 that says 'retry with
    the same Idempotency-Key' was once given after the certificate had been issued, and the
    retry then answered 409 duplicate_number for the client's own certificate."""
    za, _ = pair
    headers = {**za.auth("officer"), "Idempotency-Key": "customs-4712"}
    body = certificate_json("ZA-2026-0005", "ZA", "IN")

    def disk_full(*_: object, **__: object) -> None:
        raise StoreError("database or disk is full")
    with monkeypatch.context() as patched:
        patched.setattr(Store, "remember_idempotent", disk_full)
        response = await za.client.post(f"{API}/certificates", headers=headers, json=body)
    assert response.status == 503
    assert (await response.json())["error"] == "node.store_unavailable"
    assert response.headers["Retry-After"] == "10"  # when the node retries its store
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0005") is None
    assert za.node.store.backlog() == []
    retried = await za.client.post(f"{API}/certificates", headers=headers, json=body)
    assert retried.status == 201
    assert len(za.node.store.backlog()) == 1


async def test_a_call_the_evidence_log_cannot_take_still_gets_its_real_answer(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a plain-text 500 for a certificate that had been issued."""
    za, _ = pair
    refuse_operator_entries(monkeypatch)
    response = await za.client.post(f"{API}/certificates", headers=za.auth("officer"),
                                    json=certificate_json("ZA-2026-0006", "ZA", "IN"))
    assert response.status == 201
    assert (await response.json())["number"] == "ZA-2026-0006"


async def test_overdue_and_the_current_quarter_are_judged_in_utc(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in the server's time zone: at 12:00 UTC on 31 March, Kiritimati (UTC+14) is
    already in April, and the default quarter left out a certificate of 31 March."""
    za, _ = pair
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        noon = int(datetime(2026, 3, 31, 12, tzinfo=UTC).timestamp() * 1000)
        za.node.clock = lambda: noon
        await issue(za, "ZA-2026-0001", issued_on="2026-03-01", expires_on="2026-04-08")
        figures = await (await za.client.get(f"{API}/statistics",
                                              headers=za.auth("monitor"))).json()
        assert figures["quarter"] == str(Quarter(2026, 1))
        listed = await (await za.client.get(f"{API}/certificates?overdue=true",
                                             headers=za.auth("monitor"))).json()
        # 8 days left in UTC, 7 in Kiritimati: not overdue yet (status's rule, 7 days)
        assert listed["certificates"] == []
    finally:
        monkeypatch.undo()  # the session's TZ again (tests/conftest.py)
        time.tzset()


async def test_list_filters_both_ways_and_show_gives_the_signed_history(
        pair: tuple[Served, Served]) -> None:
    za, india = pair
    await issue(za, "ZA-2026-0001")
    await issue(za, "ZA-2026-0002")
    carry(za.node, {"IN": india.node})
    za.node.cancel("ZA-2026-0002", "issued in error")
    carry(za.node, {"IN": india.node})
    carry(india.node, {"ZA": za.node})
    monitor = za.auth("monitor")

    async def listed(query: str, s: Served = za) -> list[str]:
        response = await s.client.get(f"{API}/certificates?{query}", headers=s.auth("monitor"))
        assert response.status == 200, await response.text()
        return [c["number"] for c in (await response.json())["certificates"]]
    assert await listed("side=export") == ["ZA-2026-0001", "ZA-2026-0002"]
    assert await listed("side=import") == []
    assert await listed("side=import&state=received", india) == ["ZA-2026-0001"]
    assert await listed("state=cancelled", india) == ["ZA-2026-0002"]
    assert await listed("state=delivered&partner=IN") == ["ZA-2026-0001"]
    assert await listed("state=delivered&partner=in") == ["ZA-2026-0001"]  # as kpnode list
    assert await listed("state=issued,confirmed") == []
    assert await listed("state=delivered&state=cancelled&limit=1&offset=1") == [
        "ZA-2026-0002"]
    assert await listed("partner=BW") == []
    assert len(await listed("partner=")) == 2  # a form's "any partner"
    # a typo listed nothing, as if there were no trade with that partner
    for partner in ("IN1", "I", "%20IN%201"):
        response = await za.client.get(f"{API}/certificates?partner={partner}",
                                       headers=monitor)
        assert response.status == 400, partner
        assert [p["path"] for p in (await response.json())["problems"]] == ["partner"]
    response = await za.client.get(f"{API}/certificates?state=lost&side=up", headers=monitor)
    assert response.status == 400
    assert {p["path"] for p in (await response.json())["problems"]} == {"state", "side"}
    # int() would read these as 10: only ASCII digits count
    for limit in ("1_0", "\uff11\uff10", "+10", "%2010"):
        response = await za.client.get(f"{API}/certificates?limit={limit}&offset=0",
                                       headers=monitor)
        assert response.status == 400, limit
        assert [p["path"] for p in (await response.json())["problems"]] == ["limit"]
    response = await za.client.get(f"{API}/certificates/ZA-2026-0001", headers=monitor)
    shown = await response.json()
    assert [h["kind"] for h in shown["history"]] == ["certificate", "receipt"]
    for item in shown["history"]:
        frame = parse_frame(base64.b64decode(item["frame_base64"]))
        assert frame.digest.hex() == item["frame_sha256"]
    response = await za.client.get(f"{API}/certificates/ZA-2026-0404", headers=monitor)
    assert response.status == 404
    assert (await response.json())["error"] == "certificate.unknown"


async def test_overdue_filter_shows_open_loops_past_expiry(pair: tuple[Served, Served]) -> None:
    za, _ = pair
    await issue(za, "ZA-2026-0001")
    za.node.clock = lambda: 4_102_444_800_000  # 2100-01-01: every loop is long overdue
    response = await za.client.get(f"{API}/certificates?overdue=true",
                                   headers=za.auth("monitor"))
    assert [c["number"] for c in (await response.json())["certificates"]] == ["ZA-2026-0001"]


async def test_overdue_means_the_same_in_the_api_as_in_kpnode_status(
        pair: tuple[Served, Served]) -> None:
    """status listed a loop expiring in 3 days as overdue; the API and console did not
    (one rule now: node.machine.is_overdue)."""
    za, _ = pair
    today = day_of(za.node.clock())
    await issue(za, "ZA-2026-0001", expires_on=(today + timedelta(days=3)).isoformat())
    await issue(za, "ZA-2026-0002", expires_on=(today + timedelta(days=30)).isoformat())
    response = await za.client.get(f"{API}/certificates?overdue=true",
                                   headers=za.auth("monitor"))
    assert [c["number"] for c in (await response.json())["certificates"]] == ["ZA-2026-0001"]


async def test_cancel_and_replace(pair: tuple[Served, Served]) -> None:
    za, _ = pair
    officer = za.auth("officer")
    await issue(za, "ZA-2026-0001")
    await issue(za, "ZA-2026-0002")
    response = await za.client.post(f"{API}/certificates/ZA-2026-0001/cancel",
                                    headers=officer, json={})
    assert response.status == 400
    assert (await response.json())["problems"][0]["path"] == "reason"
    response = await za.client.post(f"{API}/certificates/ZA-2026-0001/cancel",
                                    headers=officer, json={"reason": "issued in error"})
    assert response.status == 200
    assert (await response.json())["state"] == "cancelled"
    response = await za.client.post(f"{API}/certificates/ZA-2026-0001/cancel",
                                    headers=officer, json={"reason": "again"})
    assert response.status == 409
    assert (await response.json())["error"] == "certificate.wrong_state"
    response = await za.client.post(f"{API}/certificates/ZA-2026-0999/cancel",
                                    headers=officer, json={"reason": "x"})
    assert response.status == 404
    new = certificate_json("ZA-2026-0003", "ZA", "IN", parcels=4)
    response = await za.client.post(f"{API}/certificates/ZA-2026-0002/replace",
                                    headers=officer, json={"reason": "wrong parcels",
                                                           "certificate": new})
    assert response.status == 201, await response.text()
    assert (await response.json())["replaces"] == "ZA-2026-0002"
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0002").state is State.REPLACED
    response = await za.client.post(f"{API}/certificates/ZA-2026-0002/replace",
                                    headers=officer, json={"reason": "x", "extra": 1})
    assert response.status == 400
    assert (await response.json())["problems"][0]["reason"] == "field.unknown"


async def test_a_replacements_problems_are_named_from_the_request_body(
        pair: tuple[Served, Served]) -> None:
    """A problem in the replacing certificate had its path from the certificate's root:
    'reason: unknown field' for a stray field in the certificate, although the request's
    own reason was fine, and 'parcels' for what is 'certificate.parcels' in the body."""
    za, _ = pair
    await issue(za, "ZA-2026-0001")
    new = {**certificate_json("ZA-2026-0002", "ZA", "IN"), "parcels": "3", "reason": "x"}
    response = await za.client.post(f"{API}/certificates/ZA-2026-0001/replace",
                                    headers=za.auth("officer"),
                                    json={"reason": "wrong parcels", "certificate": new})
    assert response.status == 400, await response.text()
    paths = sorted(p["path"] for p in (await response.json())["problems"])
    assert paths == ["certificate.parcels", "certificate.reason"]
    response = await za.client.post(f"{API}/certificates/ZA-2026-0001/replace",
                                    headers=za.auth("officer"),
                                    json={"reason": "wrong parcels", "certificate": []})
    assert [p["path"] for p in (await response.json())["problems"]] == ["certificate"]
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0002") is None


async def test_confirm_records_what_arrived_and_refuses_what_it_cannot(
        pair: tuple[Served, Served]) -> None:
    za, india = pair
    await issue(za, "ZA-2026-0001")
    await issue(za, "ZA-2026-0002")
    await issue(za, "ZA-2026-0003")
    carry(za.node, {"IN": india.node})
    officer = india.auth("officer")
    url = f"{API}/certificates/ZA-2026-0001/confirm"
    response = await india.client.post(url, headers=officer, json={"parcels": "three"})
    assert response.status == 400
    assert (await response.json())["problems"][0]["path"] == "parcels"
    response = await india.client.post(url, headers=officer, json={"received_on": "2000-01-01"})
    assert response.status == 400
    assert (await response.json())["error"] == "field.bad_date"
    # Read as dates once and signed into the confirmation: only YYYY-MM-DD is a date here.
    for odd in (20261115, "2026-W46-7", "20261115"):
        response = await india.client.post(url, headers=officer, json={"received_on": odd})
        assert response.status == 400, odd
    response = await india.client.post(url, headers=officer, json={"remarks": False})
    assert response.status == 400
    assert (await response.json())["problems"][0]["path"] == "remarks"
    # A declared line left out was signed as not arrived (the CLI refused it): refused
    # now; 0 and 0 names one that did not arrive.
    response = await india.client.post(url, headers=officer, json={"lines": [
        {"hs_code": "7102.31", "carats_hundredths": 240_000, "usd_cents": 40_000_000}]})
    assert response.status == 400, await response.text()
    refused = await response.json()
    assert [(p["path"], p["reason"]) for p in refused["problems"]] == [
        ("lines", "field.required")]
    assert "declares HS 7102.21 too" in refused["problems"][0]["message"]
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0001").state is State.RECEIVED
    arrived = {"lines": [{"hs_code": "7102.31", "carats_hundredths": 240_000,
                          "usd_cents": 40_000_000},
                         {"hs_code": "7102.21", "carats_hundredths": 30_000,
                          "usd_cents": 10_000_000}], "parcels": 3, "remarks": "one short"}
    headers = {**officer, "Idempotency-Key": "arrival-1"}
    first = await india.client.post(url, headers=headers, json=arrived)
    assert first.status == 200, await first.text()
    record = await first.json()
    assert record["state"] == "confirmed"
    assert record["discrepancies"][0]["field"].startswith("lines")
    # The same JSON rebuilt for the retry, other key order and spacing: still the same call.
    rebuilt = json.dumps(dict(reversed(list(arrived.items()))), indent=2)
    again = await india.client.post(url, headers={**headers, "Content-Type":
                                                  "application/json"}, data=rebuilt)
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    response = await india.client.post(url, headers=officer)
    assert response.status == 409
    response = await india.client.post(f"{API}/certificates/ZA-2026-0002/confirm",
                                       headers=officer)  # no body: as declared
    assert response.status == 200
    response = await za.client.post(f"{API}/certificates/ZA-2026-0002/confirm",
                                    headers=za.auth("officer"))
    assert response.status == 404  # the exporter holds no import of that number
    response = await india.client.post(
        f"{API}/certificates/ZA-2026-0003/confirm", headers=officer, json={"lines": [
            {"hs_code": "7102.21", "carats_hundredths": 0, "usd_cents": 0},  # not arrived
            {"hs_code": "7102.31", "carats_hundredths": 250_000, "usd_cents": 40_000_000}]})
    assert response.status == 200, await response.text()
    assert {d["field"] for d in (await response.json())["discrepancies"]} == {
        "lines[7102.21].carats_hundredths", "lines[7102.21].usd_cents"}
    carry(india.node, {"ZA": za.node})
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0001").state is State.CONFIRMED
    assert len([r for r in india.node.store.backlog()]) == 0


async def answered_while_held(served: Served, path: str, monkeypatch: pytest.MonkeyPatch,
                              module: Any, name: str) -> Any:
    """GET ``path`` with ``module.name`` held (in whatever thread calls it) until a list of
    certificates asked meanwhile is answered; ``path``'s answer as JSON. Fails where the
    held work ran on the event loop: nothing else was answered while it was held."""
    import threading

    release = threading.Event()
    order: list[str] = []
    work = getattr(module, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)  # at most 10 s
        order.append(path)
        return work(*args, **kwargs)
    monkeypatch.setattr(module, name, held)
    monitor = served.auth("monitor")
    asked = asyncio.create_task(served.client.get(path, headers=monitor))
    await asyncio.sleep(0.3)  # its handler is in the held work now
    listed = await served.client.get(f"{API}/certificates", headers=monitor)
    order.append("certificates")
    release.set()
    response = await asked
    assert listed.status == 200 and response.status == 200
    assert order == ["certificates", path]
    return await response.json()


async def test_a_quarters_statistics_do_not_hold_up_the_node_meanwhile(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub's quarter is thousands of certificates, each parsed: half a second on the
    event loop, during which the running node took no delivery and answered nothing. The
    figures are made in a worker thread: another request is answered meanwhile."""
    from node import webcontext

    za, _ = pair
    await issue(za, "ZA-2026-0001")
    figures = await answered_while_held(za, f"{API}/statistics", monkeypatch, webcontext,
                                        "quarterly_report")
    assert figures["trade"]  # the figures themselves, as before


async def test_a_polled_status_does_not_hold_up_the_node_meanwhile(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """The status reads every open and expired loop: some 80 ms at a hub's size, spent
    on the running node's event loop at each poll of the API or the console. It is read
    in a worker thread now: another request is answered meanwhile."""
    from node import status

    za, _ = pair
    await issue(za, "ZA-2026-0001")
    document = await answered_while_held(za, f"{API}/status", monkeypatch, status,
                                         "read_store")
    assert document["open_loops"]["total"] == 1  # what it read, as before
    assert document["partners"][0]["exports"] == {"issued": 1}


async def test_statistics_and_status(pair: tuple[Served, Served]) -> None:
    za, _ = pair
    today = date.today()
    await issue(za, "ZA-2026-0001")
    await issue(za, "ZA-2026-0002", issued_on=(today - timedelta(days=200)).isoformat())
    monitor = za.auth("monitor")
    quarter = quarter_of(today)
    response = await za.client.get(f"{API}/statistics?quarter={quarter.year}-Q{quarter.number}",
                                   headers=monitor)
    figures = await response.json()
    assert figures["quarter"] == str(quarter)
    rows = {(r["flow"], r["partner"], r["hs_code"]): r for r in figures["trade"]}
    assert set(rows) == {("exports", p, hs) for p in ("IN", "ALL")
                         for hs in ("7102.31", "7102.21", "ALL") if p == "IN" or hs == "ALL"}
    assert rows[("exports", "ALL", "ALL")] == {
        "flow": "exports", "partner": "ALL", "hs_code": "ALL", "certificates": 1,
        "carats_hundredths": 280_000, "usd_cents": 50_000_000}
    response = await za.client.get(f"{API}/statistics?quarter=2026-Q5", headers=monitor)
    assert response.status == 400
    response = await za.client.get(f"{API}/status", headers=monitor)
    status = await response.json()
    assert status["participant"] == "ZA"
    assert status["outbox"]["backlog"] == 2
    assert status["broker"]["reachable"] is False  # this test has no broker: reported


async def test_unknown_routes_and_methods_answer_json(pair: tuple[Served, Served]) -> None:
    za, _ = pair
    response = await za.client.get(f"{API}/nothing-here", headers=za.auth("monitor"))
    assert response.status == 404
    assert (await response.json())["error"] == "request.not_found"
    response = await za.client.delete(f"{API}/certificates", headers=za.auth("officer"))
    assert response.status == 405
    assert (await response.json())["error"] == "request.method_not_allowed"
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    response = await za.client.head(f"{API}/status", headers=za.auth("monitor"))
    assert response.status == 200 and await response.read() == b""
    response = await za.client.head(f"{API}/status")
    assert response.status == 401


async def test_every_call_is_in_the_evidence_log_with_who_made_it(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    await issue(za, "ZA-2026-0001")
    await za.client.get(f"{API}/certificates", headers=za.auth("monitor"))
    await za.client.get(f"{API}/certificates", headers={"Authorization": "Bearer wrong"})
    await za.client.get(f"{API}/openapi.json")
    calls = api_entries(za.node)
    assert [(c["operator"], c["action"], c["method"], c["path"], c["status"])
            for c in calls] == [
        ("za-officer", "api.call", "POST", f"{API}/certificates", 201),
        ("za-monitor", "api.call", "GET", f"{API}/certificates", 200),
        ("anonymous", "api.call", "GET", f"{API}/certificates", 401),
    ]
    assert calls[0]["certificate"] == "ZA-2026-0001"
    verified = kpnode("verify-log", "--json", "--dir", str(za.node.config.directory))
    assert json.loads(verified)["ok"] is True


async def test_anonymous_calls_cannot_grow_the_evidence_log_without_bound(
        pair: tuple[Served, Served]) -> None:
    """Past the budget, calls without a working token are counted, not chained; the next
    one recorded says how many were left out. Calls with a token are always recorded."""
    za, _ = pair
    now = [0.0]
    za.context.anonymous = AnonymousBudget(per_window=2, window_seconds=60,
                                           clock=lambda: now[0])
    bad = {"Authorization": "Bearer wrong"}
    for _ in range(5):
        assert (await za.client.get(f"{API}/certificates", headers=bad)).status == 401
    assert (await za.client.get(f"{API}/certificates")).status == 401  # no token at all
    await za.client.get(f"{API}/status", headers=za.auth("monitor"))
    now[0] = 60.0
    assert (await za.client.get(f"{API}/certificates", headers=bad)).status == 401
    calls = api_entries(za.node)
    assert [(c["operator"], c["path"], c.get("left_out")) for c in calls] == [
        ("anonymous", f"{API}/certificates", None),
        ("anonymous", f"{API}/certificates", None),
        ("za-monitor", f"{API}/status", None),
        ("anonymous", f"{API}/certificates", 4),
    ]
    verified = kpnode("verify-log", "--json", "--dir", str(za.node.config.directory))
    assert json.loads(verified)["ok"] is True


async def test_an_anonymous_call_adds_little_to_the_evidence_log(
        pair: tuple[Served, Served]) -> None:
    """The budget bounds how many anonymous entries there are; a request line of 8 KiB
    made each of them 8 KiB of a log kept for years. Long paths keep their start and a
    digest; a call with a token keeps its path whole."""
    za, _ = pair
    before = sum(len(e.frame) for e in za.node.store.evidence())
    response = await za.client.get(f"{API}/certificates", params={"x": "A" * 8000})
    assert response.status == 401
    assert sum(len(e.frame) for e in za.node.store.evidence()) - before < 1024
    path = api_entries(za.node)[-1]["path"]
    assert path.startswith(f"{API}/certificates?x=AAA") and "sha256" in path
    response = await za.client.get(f"{API}/certificates", params={"x": "B" * 300},
                                   headers=za.auth("monitor"))
    assert api_entries(za.node)[-1]["path"] == f"{API}/certificates?x={'B' * 300}"


async def test_a_token_made_with_kpnode_works_at_once_and_is_kept_hashed(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    directory = za.node.config.directory
    added = kpnode("token", "add", "customs-system", "--role", "officer", "--json",
                   "--dir", str(directory))
    token = json.loads(added)["token"]
    response = await za.client.get(f"{API}/status",
                                   headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    assert token not in (directory / "tokens.json").read_text()
    assert (directory / "tokens.json").stat().st_mode & 0o077 == 0


async def test_requests_that_were_500s_are_refused_with_a_reason(
        pair: tuple[Served, Served]) -> None:
    """Found by a review: each of these was a 500 with a traceback, or worse, a 200."""
    za, india = pair
    officer = za.auth("officer")
    await issue(za, "ZA-2026-0001")
    carry(za.node, {"IN": india.node})
    # A cancellation or replacement reason the partner's schema refuses (over 2,000
    # characters, or a lone surrogate) was accepted here and refused there: the two sides'
    # records split. It is refused here, and nothing changes.
    for reason in ("x" * 2001, "\udfff"):
        response = await za.client.post(
            f"{API}/certificates/ZA-2026-0001/cancel", headers=officer,
            data=json.dumps({"reason": reason}))
        assert response.status == 400, await response.text()
        assert (await response.json())["problems"][0]["path"] == "reason"
        response = await za.client.post(
            f"{API}/certificates/ZA-2026-0001/replace", headers=officer,
            json={"reason": reason,
                  "certificate": certificate_json("ZA-2026-0002", "ZA", "IN")})
        assert response.status == 400, await response.text()
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0001").state is State.ISSUED
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0002") is None
    assert za.node.store.due(2**62, 10) == []  # nothing went out
    # A token that is not ASCII (raw header bytes) is no token.
    response = await za.client.get(f"{API}/status",
                                   headers={"Authorization": "Bearer \u00e9\u00e9"})
    assert response.status == 401
    # Too deep a body, or a charset nobody knows.
    response = await za.client.post(f"{API}/certificates/validate", headers=officer,
                                    data=b"[" * 100_000 + b"]" * 100_000)
    assert response.status == 400
    assert (await response.json())["error"] == "request.malformed"
    response = await za.client.post(
        f"{API}/certificates/validate", data=b"{}",
        headers={**officer, "Content-Type": "application/json; charset=bogus"})
    assert response.status == 200  # read as the UTF-8 JSON is
    # A console form that is not UTF-8 (after fetching the login form, as a browser does).
    await za.client.get("/console/login")
    response = await za.client.post(
        "/console/login", data=b"token=\xff&csrf=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 400


async def test_connections_without_a_request_are_closed_and_capped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone reaching the port could hold connections open for an hour (aiohttp's default)
    sending nothing, or half a request: a few hundred used up the node's file descriptors,
    and the broker connection could not be made again."""
    monkeypatch.setattr(httpserver, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 5)
    release = asyncio.Event()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"done": True})
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/slow", slow)
    server = httpserver.HttpServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        held[0][1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        await asyncio.sleep(0.1)
        # Full of idle connections: a newcomer is served, and the one that waited longest
        # (the half-sent request) is closed for it.
        assert (await _get_once(server.port, "/healthz")).startswith(b"HTTP/1.1 200")
        assert await _closed_by_server(held[0][0], 0.5)
        assert (server.evicted, server.refused) == (1, 0)
        for reader, _ in held[1:]:  # the other idle ones are closed in time
            assert await _closed_by_server(reader, 3.0)
        # Full of requests being answered: a newcomer is closed at once, nothing cut short.
        busy = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        for _, writer in busy:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.2)
        extra, _ = await asyncio.open_connection("127.0.0.1", server.port)
        assert await _closed_by_server(extra, 0.5)
        assert server.refused == 1
        release.set()
        for reader, _ in busy:
            assert (await asyncio.wait_for(reader.read(), 3)).startswith(b"HTTP/1.1 200")
        assert (await _get_once(server.port, "/healthz")).startswith(b"HTTP/1.1 200")
    finally:
        await server.stop()


async def test_one_client_cannot_hold_every_connection_slot_with_cheap_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client keeping every slot alive with a cheap anonymous request now and then (256
    connections, /healthz every 14 s) shut out the officers, Prometheus and the liveness
    probe. Scaled down: 5 slots, 1 s idle limit, a request every 0.5 s on each."""
    monkeypatch.setattr(httpserver, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 5)
    server = await _healthz_server()

    async def hold() -> None:
        while True:  # when the server closes this one, take a slot again at once
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                while True:
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    await writer.drain()
                    await reader.readuntil(b'"alive": true}')
                    await asyncio.sleep(0.5)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()

    holders = [asyncio.create_task(hold()) for _ in range(5)]
    try:
        await asyncio.sleep(1.0)
        answers = []
        for _ in range(4):
            answers.append(await _get_once(server.port, "/healthz"))
            await asyncio.sleep(0.3)
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
        assert server.evicted >= 1
    finally:
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await server.stop()


async def test_clients_that_never_read_their_answers_cannot_hold_every_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests pipelined on every slot and their answers never read: each connection
    stayed in the middle of an answer, stuck writing, which neither the idle limit nor
    the eviction of idle connections reaches; the node answered no one, for good.
    Scaled down: 5 slots, 1 s limit."""
    monkeypatch.setattr(httpserver, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 5)

    # each connection whose answers have filled the buffers to its peer, and not been
    # read down since (the transport pauses writing, and would resume it)
    stuck: set[int] = set()
    pause, resume = RequestHandler.pause_writing, RequestHandler.resume_writing

    def paused(handler: RequestHandler) -> None:
        stuck.add(id(handler))
        pause(handler)

    def resumed(handler: RequestHandler) -> None:
        stuck.discard(id(handler))
        resume(handler)
    monkeypatch.setattr(RequestHandler, "pause_writing", paused)
    monkeypatch.setattr(RequestHandler, "resume_writing", resumed)
    server = await _healthz_server()
    held = []
    try:
        for _ in range(5):
            _, writer = await _small_window_connection(server.port)
            writer.transport.pause_reading()  # nothing of the answers is taken
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000)
            held.append(writer)
        async with asyncio.timeout(30):  # filling the buffers takes a busy machine a while
            while len(stuck) < 5:
                await asyncio.sleep(0.05)
        # every slot taken by a connection stuck writing: within the limit of a peer that
        # reads nothing, they are free again
        answer = b""
        for _ in range(10):
            await asyncio.sleep(0.5)
            if (answer := await _get_once(server.port, "/healthz")).startswith(b"HTTP/1.1 200"):
                break
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        for writer in held:
            writer.transport.abort()
        await server.stop()


async def test_a_slow_reader_of_a_long_answer_keeps_its_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the limit on unread answers must not cut: a client on a slow link reading a
    long answer (a page of 5,000 certificates) for longer than the limit, a little at a
    time. Scaled down: 1 s limit, 8 MB read at some 2.5 MB/s."""
    monkeypatch.setattr(httpserver, "IDLE_SECONDS", 1.0)
    body = b"x" * (8 << 20)

    async def long(_: web.Request) -> web.Response:
        return web.Response(body=body)
    app = web.Application()
    app.router.add_get("/long", long)
    server = httpserver.HttpServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        reader, writer = await _small_window_connection(server.port)
        writer.write(b"GET /long HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = 0
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
            await asyncio.sleep(0.4)
        assert received > len(body)  # the headers and all of the body
        writer.close()
    finally:
        await server.stop()


async def test_an_answer_left_unread_below_the_buffers_limit_does_not_hold_its_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer whose unread tail stays under the transport's high-water mark never
    pauses writing, so nothing watched it: the idle limit then closed the connection, and
    a close waits to send that tail, which a peer that reads nothing never takes. The
    connection stayed counted for good, neither idle nor in an answer, and the slot was
    lost. Scaled down: 1 slot, 1 s limit; the server's kernel buffer made small so that
    60,000 bytes leave a tail under 64 KiB in the transport."""
    monkeypatch.setattr(httpserver, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 1)
    tails: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and request.path == "/tail":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return web.Response(body=b"x" * (60_000 if request.path == "/tail" else 2))
    app = web.Application()
    app.router.add_get("/tail", answer)
    app.router.add_get("/healthz", answer)
    server = httpserver.HttpServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        _, writer = await _small_window_connection(server.port)
        writer.transport.pause_reading()  # nothing of the answer is taken
        writer.write(b"GET /tail HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.3)
        assert server._runner.server is not None
        for handler in server._runner.server.connections:
            assert handler.transport is not None and not handler.writing_paused
            tails.append(handler.transport.get_write_buffer_size())
        assert tails and 0 < tails[0] < 65_536  # a tail left, writing never paused
        await asyncio.sleep(1.5)  # the idle limit closes it: a close that waits for ever
        answer_ = b""
        for _ in range(10):
            await asyncio.sleep(0.5)
            if (answer_ := await _get_once(server.port, "/healthz")).startswith(
                    b"HTTP/1.1 200"):
                break
        assert answer_.startswith(b"HTTP/1.1 200")
        writer.transport.abort()
    finally:
        await server.stop()


async def _healthz_server() -> httpserver.HttpServer:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    server = httpserver.HttpServer(app, "127.0.0.1", 0)
    await server.start()
    return server


async def _small_window_connection(port: int | None
                                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose receive buffer is small: what it does not read soon fills the
    server's buffers, not its own."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock, limit=1 << 20)


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except TimeoutError:
        return False


async def _get_once(port: int | None, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 3)
    except (TimeoutError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_scrapes_of_metrics_by_anyone_cannot_keep_the_node_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics needs no token, and reading its gauges decodes every open record: with
    3,000 open loops four clients scraping back to back left the event loop (the
    consumer's, the relay's) free 3 % of the time. The gauges are now read at most every
    GAUGE_SECONDS, and what a scrape shows is still the node's state. (Counted, not timed:
    a share of free time measured over a few milliseconds failed on a busy machine.)"""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    node = Node.open(network.configs["ZA"])
    for i in range(3000):
        node.issue(certificate(f"ZA-2026-{i:05d}", "ZA", "IN"))
    running = SimpleNamespace(config=node.config, node=None, transport=None,
                              metrics=NodeMetrics(), store_ok=True, clock_agrees=lambda: True)
    app = httpserver.build_app(running)  # type: ignore[arg-type]
    running.node = node  # read per request; without it build_app mounts no console
    server = httpserver.HttpServer(app, "127.0.0.1", 0)
    await server.start()
    reads = 0
    refresh = httpserver.refresh_gauges

    async def counted(r: Any) -> None:
        nonlocal reads
        reads += 1
        await refresh(r)
    monkeypatch.setattr(httpserver, "refresh_gauges", counted)

    async def scrape(times: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        text = b""
        for _ in range(times):
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            text = await reader.readuntil(b"kpx_registry_version ")
            await reader.readline()
        writer.close()
        return text

    try:
        text = await scrape(1)
        assert b'kpx_open_loops{age="0-1d",side="export"} 3000.0' in text
        assert b'kpx_outbox_backlog{recipient="IN"} 3000.0' in text
        started = time.monotonic()
        await asyncio.gather(*(scrape(10) for _ in range(4)))
        elapsed = time.monotonic() - started
    finally:
        await server.stop()
        node.close()
    # 41 scrapes: one reading, and one more for each GAUGE_SECONDS they took
    assert reads <= 2 + int(elapsed / httpserver.GAUGE_SECONDS), (reads, elapsed)


async def test_a_scrapes_reading_of_the_records_does_not_hold_up_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape reads every open and expired record (some 170 ms at a hub's size) and did
    so on the event loop: no delivery was taken meanwhile. It reads them in a worker
    thread, and another request is answered while it does."""
    import threading

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    node = Node.open(network.configs["ZA"])
    node.issue(certificate("ZA-2026-00001", "ZA", "IN"))
    running = SimpleNamespace(config=node.config, node=None, transport=None,
                              metrics=NodeMetrics(), store_ok=True, clock_agrees=lambda: True)
    app = httpserver.build_app(running)  # type: ignore[arg-type]
    running.node = node
    server = httpserver.HttpServer(app, "127.0.0.1", 0)
    await server.start()
    release = threading.Event()
    order: list[str] = []
    counted = httpserver.loop_counts

    def slow(*args: Any) -> Any:
        release.wait(10)  # held until the other request is answered (at most 10 s)
        order.append("metrics")
        return counted(*args)
    monkeypatch.setattr(httpserver, "loop_counts", slow)

    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "\r\n".encode())
        try:
            return await reader.read()
        finally:
            writer.close()
    try:
        scrape = asyncio.create_task(get("/metrics"))
        await asyncio.sleep(0.3)  # its refresh is reading the records now
        alive = await get("/healthz")
        order.append("healthz")
        release.set()
        text = await scrape
    finally:
        await server.stop()
        node.close()
    assert alive.startswith(b"HTTP/1.1 200")
    assert order == ["healthz", "metrics"]
    assert b'kpx_open_loops{age="0-1d",side="export"} 1.0' in text


async def test_a_scrape_is_not_held_up_by_another_process_holding_the_write_lock(
        tmp_path: Path) -> None:
    """Another process holding the database's write lock is the fault kpx_store_ok says.
    The scrape's reading apart opened a Store, whose migration began a write transaction:
    it waited for that lock (30 s) and failed, so /metrics said nothing when it mattered.
    A reader takes no write lock; the scrape answers at once, kpx_store_ok 0."""
    import sqlite3

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    node = Node.open(network.configs["ZA"])
    node.issue(certificate("ZA-2026-00001", "ZA", "IN"))
    running = SimpleNamespace(config=node.config, node=node, transport=None,
                              metrics=NodeMetrics(), store_ok=True, clock_agrees=lambda: True)
    blocker = sqlite3.connect(node.config.database_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        await asyncio.wait_for(httpserver.refresh_gauges(running), 5)  # type: ignore[arg-type]
        figures = await asyncio.wait_for(store_module.read_apart(
            node.config.database_path, lambda store: len(store.records())), 5)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        node.close()
    text = running.metrics.exposition()
    assert b"kpx_store_ok 0.0" in text
    assert b'kpx_open_loops{age="0-1d",side="export"} 1.0' in text
    assert figures == 1


async def _raw_http(s: Served, request: bytes) -> bytes:
    """Bytes a client library would not send (header values that are not UTF-8)."""
    assert s.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", s.client.server.port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_a_malformed_idempotency_key_header_gets_its_json_answer_and_is_recorded(
        pair: tuple[Served, Served]) -> None:
    """An Idempotency-Key header of bytes that are not UTF-8 made recording the call in
    the evidence log fail: aiohttp's plain-text 500 went out instead of the answer, even
    after the action had happened, and the call was not recorded."""
    za, _ = pair
    token = za.tokens["monitor"].encode()
    answer = await _raw_http(za, b"GET /api/v1/certificates HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: close\r\nAuthorization: Bearer " + token +
                             b"\r\nIdempotency-Key: \xff\xfe\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"application/json" in head, answer[:300]
    assert json.loads(body)["certificates"] == []
    (entry,) = api_entries(za.node)
    assert (entry["path"], entry["status"], entry["idempotency_key"]) == (
        "/api/v1/certificates", 200, "'\\udcff\\udcfe'")
    # A hand-edited tokens.json naming a token in text that is not UTF-8 is refused whole,
    # as any malformed entry is, rather than acting and then failing to record who acted.
    path = za.node.config.directory / "tokens.json"
    data = json.loads(path.read_text())
    data["tokens"].append({"name": "customs\ud800", "role": "officer",
                           "sha256": "0" * 64})
    path.write_text(json.dumps(data))
    response = await za.client.post(f"{API}/certificates", headers=za.auth("officer"),
                                     json=certificate_json("ZA-2026-0077", "ZA", "IN"))
    assert response.status == 503, await response.text()
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0077") is None


async def test_a_body_that_never_ends_is_a_408_and_an_aborted_one_is_not_a_node_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request body that never finished held its connection slot for good (a monitor's
    token was enough, and 256 of them take the node's API, console and /healthz down); a
    client that gave up mid-body was logged and recorded as a failure of the node (500)."""
    monkeypatch.setattr("node.api.IDLE_SECONDS", 0.5)
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    node = Node.open(network.configs["ZA"])
    token = Tokens(node.config.directory).add("dashboard", Role.MONITOR, now_ms()).encode()
    app = web.Application()
    mount_web(app, node, node.config.directory)
    server = httpserver.HttpServer(app, "127.0.0.1", 0)
    await server.start()
    request = (b"POST /api/v1/certificates/validate HTTP/1.1\r\nHost: x\r\n"
               b"Authorization: Bearer " + token + b"\r\nContent-Type: application/json"
               b"\r\nContent-Length: 10\r\n\r\n{")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        # aiohttp then lingers a while for the rest before it closes: read the answer only.
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert json.loads(body)["error"] == "request.timeout"
        # The same, but the client gives up before the limit.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        await writer.drain()
        writer.close()
        for _ in range(50):
            if len(api_entries(node)) == 2:
                break
            await asyncio.sleep(0.1)
        assert [e["status"] for e in api_entries(node)] == [408, 499]
    finally:
        await server.stop()
        node.close()


async def test_a_page_or_a_quarter_reads_only_its_own_records(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing read (and decoded) every record the node had ever made before it cut out the
    page, and statistics every record of every quarter: with a few years of records one
    monitor's '?limit=1' stalled the node's event loop for seconds."""
    za, _ = pair
    issued = za.node.issue_many([certificate(f"ZA-2026-{i:04d}", "ZA", "IN")
                                 for i in range(300)])
    assert all(isinstance(r, Record) for r in issued)
    decoded = [0]
    decode = store_module._record

    def counting(row: tuple[Any, ...]) -> Record:
        decoded[0] += 1
        return decode(row)
    monkeypatch.setattr(store_module, "_record", counting)
    response = await za.client.get(f"{API}/certificates?limit=2&offset=10",
                                   headers=za.auth("monitor"))
    listed = await response.json()
    assert (listed["total"], [c["number"] for c in listed["certificates"]]) == (
        300, ["ZA-2026-0010", "ZA-2026-0011"])
    assert decoded[0] == 2
    decoded[0] = 0
    response = await za.client.get(f"{API}/statistics?quarter=2025Q1",
                                   headers=za.auth("monitor"))
    assert response.status == 200 and (await response.json())["trade"] == []
    assert decoded[0] == 0  # none of them was issued in that quarter


def test_a_token_name_written_by_hand_before_the_naming_rule_still_works(
        tmp_path: Path) -> None:
    """A review found that checking hand-edited names against 'token add's rule refused a
    whole tokens.json that had worked, locking every token out after an upgrade."""
    tokens = Tokens(tmp_path)
    token = tokens.add("dashboard", Role.MONITOR, now_ms())
    data = json.loads((tmp_path / "tokens.json").read_text())
    data["tokens"].append({"name": "Customs Desk", "role": "officer",
                           "sha256": token_hash("kpx_handmade")})
    (tmp_path / "tokens.json").write_text(json.dumps(data))
    assert tokens.authenticate(token) == Principal("dashboard", Role.MONITOR)
    assert tokens.authenticate("kpx_handmade") == Principal("Customs Desk", Role.OFFICER)


@contextlib.asynccontextmanager
async def served_node(config: NodeConfig) -> AsyncIterator[tuple[RunningNode, Any]]:
    """``config``'s node (no broker) served by the running node's own application, as
    ``kpnode run`` serves it: /metrics, the probes, the API and the console."""
    from aiohttp.test_utils import TestClient, TestServer

    running = RunningNode(config)
    running.node = Node.open(config)
    client = TestClient(TestServer(httpserver.build_app(running)))
    await client.start_server()
    try:
        yield running, client
    finally:
        await client.close()
        running.node.close()


async def test_no_answer_of_the_node_may_be_framed_or_sniffed(tmp_path: Path) -> None:
    """A web security review found the anti-framing and no-sniff headers on the console's
    pages only: the login page's redirect, the API's JSON (which quotes partners' text),
    /metrics and every error page could be framed by another site or sniffed as HTML."""
    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    async with served_node(network.configs["ZA"]) as (_, client):
        answers = {}
        for path in ("/metrics", "/healthz", "/readyz", "/nowhere", f"{API}/openapi.json",
                     f"{API}/certificates", f"{API}/nowhere", "/console",
                     "/console/", "/console/login"):
            response = await client.get(path, allow_redirects=False)
            answers[path] = response.status
            assert response.headers.get("X-Frame-Options") == "DENY", path
            assert response.headers.get("X-Content-Type-Options") == "nosniff", path
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], path
        assert answers == {"/metrics": 200, "/healthz": 200, "/readyz": 503, "/nowhere": 404,
                           f"{API}/openapi.json": 200, f"{API}/certificates": 401,
                           f"{API}/nowhere": 401, "/console": 302, "/console/": 303,
                           "/console/login": 200}
        # the console's pages keep their own policy, which lets their nonce'd script run
        response = await client.get("/console/login")
        assert "script-src 'nonce-" in response.headers["Content-Security-Policy"]


async def test_a_web_page_cannot_read_the_metrics_by_rebinding_its_name_to_loopback(
        tmp_path: Path) -> None:
    """The server listens on loopback so that the figures stay on the machine, but a page
    a browser here opened, its domain made to resolve to 127.0.0.1 (DNS rebinding), read
    /metrics as its own: partners and volumes. Its requests name its domain in Host."""
    from node.httpserver import is_loopback

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    async with served_node(network.configs["ZA"]) as (_, client):
        for path in ("/metrics", "/readyz", "/healthz"):
            for host in ("attacker.example", "attacker.example:8080",
                         "localhost.attacker.example", "127.0.0.1.nip.io"):
                response = await client.get(path, headers={"Host": host})
                assert response.status == 421, (path, host)
                assert (await response.json())["error"] == "request.misdirected"
            for host in ("127.0.0.1:9101", "localhost:9101", "[::1]:9101", "localhost"):
                response = await client.get(path, headers={"Host": host})
                assert response.status in (200, 503), (path, host)  # /readyz: no broker
        # the API and the console keep their own guard (a token, a session), and may be
        # passed on by a proxy under its own name
        response = await client.get(f"{API}/openapi.json", headers={"Host": "kpx.example"})
        assert response.status == 200
    assert is_loopback("127.8.0.1") and is_loopback("::1") and is_loopback("LocalHost.")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


async def test_a_container_names_the_hosts_its_metrics_answer_to(tmp_path: Path) -> None:
    """A container's node listens on 0.0.0.0 and its port is published to the host's
    loopback (docker-compose.yml): a page a browser on the host opened, rebound to
    127.0.0.1, read /metrics, since the check applied to a loopback http_host only. With
    http_allowed_hosts (a service name) the check applies there too; without, the
    exposure stays the operator's choice."""
    from node.config import load_config

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    directory = network.configs["ZA"].directory
    for allowed, answers in ((" node-za , Node-EU., node_in, [FD00::1], 10.0.0.5",
                              {"node-za:8080": 200, "NODE-EU": 200, "node_in": 200,
                               "[fd00::1]:8080": 200, "10.0.0.5:8080": 200,
                               "127.0.0.1:9101": 200, "attacker.example": 421,
                               "10.0.0.6": 421}),
                             ("", {"attacker.example": 200})):
        config = load_config(directory, environ={"KPX_HTTP_HOST": "0.0.0.0",
                                                 "KPX_HTTP_ALLOWED_HOSTS": allowed})
        async with served_node(config) as (_, client):
            for host, status in answers.items():
                response = await client.get("/healthz", headers={"Host": host})
                assert response.status == status, (allowed, host)
    with pytest.raises(ConfigError, match=r"KPX_HTTP_ALLOWED_HOSTS \(environment\) must be a "
                       "list of host names"):
        load_config(directory, environ={"KPX_HTTP_ALLOWED_HOSTS": "node-za:8080"})
    from node.config import write_config  # kept by 'kpnode deploy configure', which writes
    write_config(load_config(directory, environ={"KPX_HTTP_ALLOWED_HOSTS": "node-za"}))
    assert load_config(directory, environ={}).http_allowed_hosts == ("node-za",)


async def test_nothing_is_signed_while_the_running_node_distrusts_its_clock(
        tmp_path: Path) -> None:
    """The running node holds deliveries while its wall clock is ahead of the time it
    measured, but the API went on signing with that clock: a certificate a year ahead,
    which its importer refuses. Commands now get a 503 until the clock agrees again; an
    answer already given under an Idempotency-Key is still replayed."""
    from node.clockwatch import ClockWatch, elapsed_ms

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    async with served_node(network.configs["ZA"]) as (running, client):
        assert running.node is not None
        node = running.node
        running._clock = ClockWatch(node.clock(), elapsed_ms())
        right = node.clock
        officer = {"Authorization": "Bearer " + Tokens(running.config.directory).add(
            "za-officer", Role.OFFICER, now_ms())}
        keyed = {**officer, "Idempotency-Key": "first"}
        first = await client.post(f"{API}/certificates", headers=keyed,
                                  json=certificate_json("ZA-2026-0001", "ZA", "IN"))
        assert first.status == 201
        node.clock = lambda: right() + 365 * 86_400_000  # judged at once, not at a sweep
        response = await client.post(f"{API}/certificates", headers=officer,
                                     json=certificate_json("ZA-2026-0002", "ZA", "IN"))
        assert response.status == 503 and response.headers["Retry-After"] == "60"
        assert (await response.json())["error"] == "node.clock_disagrees"
        response = await client.post(f"{API}/certificates/ZA-2026-0001/cancel",
                                     headers=officer, json={"reason": "wrong weight"})
        assert response.status == 503
        replayed = await client.post(f"{API}/certificates", headers=keyed,
                                     json=certificate_json("ZA-2026-0001", "ZA", "IN"))
        assert replayed.status == 201 and replayed.headers["Idempotent-Replayed"] == "true"
        assert [r.number for r in running.node.records()] == ["ZA-2026-0001"]
        assert running.node.records()[0].state is State.ISSUED
        node.clock = right
        response = await client.post(f"{API}/certificates", headers=officer,
                                     json=certificate_json("ZA-2026-0002", "ZA", "IN"))
        assert response.status == 201


def test_tokens_added_and_revoked_at_once_are_all_kept(tmp_path: Path) -> None:
    """`kpnode token add` and `revoke` each read tokens.json, changed it and wrote it back
    through one shared temporary file: run at once, a revoke that said 'revoked' was
    undone, a token reported as made was missing, and the file could be left as invalid
    JSON (every API call then a 503)."""
    tokens = Tokens(tmp_path)
    victims = [tokens.add(f"victim-{i}", Role.OFFICER, now_ms()) for i in range(4)]
    script = ("import sys; from pathlib import Path; from node.tokens import Tokens, Role\n"
              "t = Tokens(Path(sys.argv[1])); who = sys.argv[2]\n"
              "if who.startswith('victim'): t.revoke(who)\n"
              "else:\n"
              "    for i in range(5): t.add(f'{who}-{i}', Role.MONITOR, 0)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), who])
             for who in [*(f"adder{i}" for i in range(6)), *(f"victim-{i}" for i in range(4))]]
    assert [p.wait(timeout=60) for p in procs] == [0] * len(procs)
    fresh = Tokens(tmp_path)
    names = {e["name"] for e in fresh.entries()}
    assert names == {f"adder{i}-{j}" for i in range(6) for j in range(5)}
    assert all(fresh.authenticate(v) is None for v in victims)
    assert not list(tmp_path.glob("*.tmp"))


async def _every_page(s: Served, query: str, limit: int,
                      between: Callable[[], None]) -> list[str]:
    """Page with after=0, then next, until next is null; ``between`` after the first."""
    seen: list[str] = []
    after: str | None = "0"
    while after is not None:
        r = await s.client.get(f"{API}/certificates?limit={limit}&after={after}{query}",
                               headers=s.auth("monitor"))
        assert r.status == 200, await r.text()
        answer = await r.json()
        seen += [c["number"] for c in answer["certificates"]]
        if after == "0":
            between()
        after = answer["next"]
    return seen


async def test_paging_by_position_misses_nothing_while_records_change(
        pair: tuple[Served, Served]) -> None:
    """By offset over state=issued, a back office missed 100 certificates still issued when
    receipts for the first 100 came in between pages; by creation time, a certificate made
    after the clock was set back was never listed and another was listed twice."""
    za, india = pair
    za.node.issue_many([certificate(f"ZA-2026-{i:05d}", "ZA", "IN") for i in range(1500)])
    carry(za.node, {"IN": india.node})
    rows = india.node.store.due(now_ms=2**62, limit=100)
    right = za.node.clock

    def receipts_arrive_and_the_clock_goes_back() -> None:
        with india.node.store.transaction():
            india.node.store.mark_published([r.seq for r in rows], 0)
        for row in rows:
            za.node.handle_batch([Delivery(row.frame)])
        za.node.clock = lambda: right() - 5_000
        za.node.issue(certificate("ZA-2026-NEW01", "ZA", "IN"))
        za.node.clock = right

    seen = await _every_page(za, "&state=issued", 500,
                             receipts_arrive_and_the_clock_goes_back)
    issued = {r.number for r in za.node.records(states=[State.ISSUED])}
    assert len(issued) == 1401 and issued <= set(seen) and len(seen) == len(set(seen))
    everything = await _every_page(za, "", 400, lambda: None)
    assert len(everything) == len(set(everything)) == 1501
    refused = await za.client.get(f"{API}/certificates?after=0&offset=5",
                                  headers=za.auth("monitor"))
    assert refused.status == 400


async def test_an_unknown_query_parameter_is_refused_not_ignored(
        pair: tuple[Served, Served]) -> None:
    """`status=cancelled` for `state=cancelled` gave every certificate, unfiltered; a
    second `side=` was dropped without a word."""
    za, _ = pair
    await issue(za, "ZA-2026-0001")
    for query in ("status=cancelled", "side=export&side=import", "quarterly=1"):
        path = "statistics" if query.startswith("quarter") else "certificates"
        r = await za.client.get(f"{API}/{path}?{query}", headers=za.auth("monitor"))
        assert r.status == 400, (query, r.status)
        assert (await r.json())["problems"][0]["path"] in ("status", "side", "quarterly")
    r = await za.client.get(f"{API}/certificates?state=issued&state=delivered",
                            headers=za.auth("monitor"))
    assert r.status == 200 and (await r.json())["total"] == 1


async def test_a_node_without_a_key_that_may_sign_answers_503_not_a_refusal(
        tmp_path: Path) -> None:
    """With its key revoked the node answered 422 key.revoked, which the docs give to what
    the Scheme's rules forbid: a back office would mark the certificate refused for good,
    though nothing was done and the same call succeeds once the node has a valid key."""
    import dataclasses

    from node.chair import revoke_key, sign_registry
    from tests.webutil import serve

    network = create_network(tmp_path, ["ZA", "IN"], ["amqp://127.0.0.1:1/"])
    node = Node.open(network.configs["ZA"])
    za = await serve(node)
    try:
        key = bytes(node.signing_key().verify_key)
        revoked = dataclasses.replace(revoke_key(network.registry, key, now_ms()),
                                      version=2)
        (verdict,) = node.handle_batch([Delivery(sign_registry(revoked, network.chair_key,
                                                               1))])
        assert verdict.dead_letter is None
        r = await za.client.post(f"{API}/certificates", headers=za.auth("officer"),
                                 json=certificate_json("ZA-2026-0001", "ZA", "IN"))
        assert (r.status, (await r.json())["error"]) == (503, "key.revoked")
        assert node.records() == []
    finally:
        await za.client.close()
        node.close()


async def test_a_certificates_history_says_whether_it_has_left_the_node(
        pair: tuple[Served, Served]) -> None:
    """Issue is accepted and queued while the broker is down, or the partner has no inbox
    yet; the record said 'issued' either way, and only /status, per recipient, showed that
    nothing had left. Each outgoing message in the history now says where it stands."""
    za, _ = pair
    await issue(za, "ZA-2026-0001")

    async def outbox() -> Any:
        r = await za.client.get(f"{API}/certificates/ZA-2026-0001", headers=za.auth("monitor"))
        (out,) = [h for h in (await r.json())["history"] if h["direction"] == "out"]
        return out["outbox"]

    waiting = await outbox()
    assert waiting["published_at"] is None and waiting["attempts"] == 0
    (row,) = za.node.store.due(now_ms=2**62, limit=10)
    with za.node.store.transaction():
        za.node.store.mark_failed(row.seq, "unroutable: no inbox for IN", 2**40)
    failed = await outbox()
    assert (failed["published_at"], failed["last_error"], failed["next_attempt_at"]) == (
        None, "unroutable: no inbox for IN", 2**40)
    with za.node.store.transaction():
        za.node.store.mark_published([row.seq], 1_700_000_000_000)
    sent = await outbox()
    assert sent["published_at"] == 1_700_000_000_000 and sent["next_attempt_at"] is None


async def test_no_answer_of_the_api_is_cached(pair: tuple[Served, Served]) -> None:
    """Certificates, partners and volumes went out without Cache-Control, so a proxy or a
    browser could keep them on disk."""
    za, _ = pair
    await issue(za, "ZA-2026-0001")
    for path, headers in (("/certificates", za.auth("monitor")), ("/certificates", {}),
                          ("/certificates/ZA-2026-0001", za.auth("monitor")),
                          ("/nowhere", za.auth("monitor"))):
        r = await za.client.get(API + path, headers=headers)
        assert r.headers.get("Cache-Control") == "no-store", (path, r.status)


async def test_a_token_revoked_while_its_body_arrives_does_not_act(
        pair: tuple[Served, Served]) -> None:
    """The token was checked when the headers came; the body may take up to 15 s more. A
    token made a monitor's, or revoked, meanwhile issued the certificate all the same."""
    za, _ = pair
    tokens = za.context.tokens

    async def post_while(change: Callable[[], None], number: str, token: str) -> Any:
        body = json.dumps(certificate_json(number, "ZA", "IN")).encode()

        async def slowly() -> AsyncIterator[bytes]:
            yield body[:10]
            await asyncio.sleep(0.3)
            change()
            yield body[10:]
        return await za.client.post(f"{API}/certificates", data=slowly(),
                                    headers={"Authorization": f"Bearer {token}",
                                             "Content-Type": "application/json",
                                             "Idempotency-Key": number})

    def demote() -> None:  # by hand: the file says the officer's token is a monitor's
        data = json.loads(tokens.path.read_text())
        for entry in data["tokens"]:
            entry["role"] = "monitor" if entry["name"] == "za-officer" else entry["role"]
        replaced = tokens.path.with_suffix(".new")
        replaced.write_text(json.dumps(data))
        replaced.replace(tokens.path)
    response = await post_while(demote, "ZA-2026-0001", za.tokens["officer"])
    assert response.status == 403, await response.text()
    assert (await response.json())["error"] == "auth.forbidden"
    clerk = tokens.add("za-clerk", Role.OFFICER, now_ms())
    response = await post_while(lambda: tokens.revoke("za-clerk"), "ZA-2026-0002", clerk)
    assert response.status == 401, await response.text()
    assert (await response.json())["error"] == "auth.bad_token"
    assert za.node.records() == [] and za.node.store.backlog() == []
    assert [(e["status"], e["role"]) for e in api_entries(za.node)] == [
        (403, "monitor"), (401, "officer")]


async def test_every_scheme_and_calendar_problem_comes_with_its_field(
        pair: tuple[Served, Served]) -> None:
    """validate promises every problem with its field path: a certificate to a suspended
    partner, for another authority and expired came back as one problem with the path ''
    and the first reason, the others only in its text; one dated ahead, and a confirmation
    received after today, named no field either."""
    za, india = pair
    today = date.today()
    bad = certificate_json("ZA-2026-0001", "ZA", "XX", issuing_authority="ZA-OTHER",
                           issued_on=(today - timedelta(days=3)).isoformat(),
                           expires_on=(today - timedelta(days=1)).isoformat())
    response = await za.client.post(f"{API}/certificates/validate",
                                    headers=za.auth("monitor"), json=bad)
    assert response.status == 200
    found = [(p["path"], p["reason"]) for p in (await response.json())["problems"]]
    assert found == [("destination", "participant.suspended"),
                     ("issuing_authority", "authority.unknown"),
                     ("expires_on", "certificate.expired"),
                     ("issuing_authority", "authority.unknown")], found
    ahead = certificate_json("ZA-2026-0002", "ZA", "IN",
                             issued_on=(today + timedelta(days=5)).isoformat(),
                             expires_on=(today + timedelta(days=50)).isoformat())
    response = await za.client.post(f"{API}/certificates", headers=za.auth("officer"),
                                    json=ahead)
    assert response.status == 400
    assert [(p["path"], p["reason"]) for p in (await response.json())["problems"]] == [
        ("issued_on", "field.bad_date")]
    await issue(za, "ZA-2026-0003")
    carry(za.node, {"IN": india.node})
    response = await india.client.post(
        f"{API}/certificates/ZA-2026-0003/confirm", headers=india.auth("officer"),
        json={"received_on": (today + timedelta(days=1)).isoformat()})
    assert response.status == 400
    assert [(p["path"], p["reason"]) for p in (await response.json())["problems"]] == [
        ("received_on", "field.bad_date")]


async def test_a_query_string_on_an_action_is_refused_not_ignored(
        pair: tuple[Served, Served]) -> None:
    """The actions take their arguments in the body. A back office that put them in the
    query (`confirm?received_on=...`, `certificates?dry_run=true`) got them ignored: a
    confirmation received today, signed for good, and a certificate issued for real."""
    za, india = pair
    await issue(za, "ZA-2026-0001")
    carry(za.node, {"IN": india.node})
    yesterday = (date.today() - timedelta(days=1)).isoformat()
    r = await india.client.post(f"{API}/certificates/ZA-2026-0001/confirm?received_on="
                                f"{yesterday}", headers=india.auth("officer"))
    assert r.status == 400, await r.text()
    assert [(p["path"], p["reason"]) for p in (await r.json())["problems"]] == [
        ("received_on", "field.unknown")]
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0001").state is State.RECEIVED
    body = certificate_json("ZA-2026-0002", "ZA", "IN")
    for path in ("certificates?dry_run=true", "certificates/validate?strict=1",
                 "certificates/ZA-2026-0001/cancel?reason=x",
                 "certificates/ZA-2026-0001/replace?reason=x"):
        r = await za.client.post(f"{API}/{path}", headers=za.auth("officer"),
                                 json=body if "cancel" not in path else {"reason": "x"})
        assert r.status == 400, (path, await r.text())
        assert (await r.json())["problems"][0]["reason"] == "field.unknown"
    assert [r.number for r in za.node.records()] == ["ZA-2026-0001"]
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0001").state is State.ISSUED


def test_the_documented_idempotency_key_is_the_one_the_node_takes() -> None:
    """The document allowed any 1 to 255 characters; a key with a space, or a letter
    outside ASCII, was a 400 (idempotency.bad_key) a client built from it could not expect."""
    import re

    from node.api import IDEMPOTENCY_KEY

    (schema,) = {p["schema"]["pattern"] for item in openapi_document()["paths"].values()
                 for op in item.values() for p in op.get("parameters", ())
                 if p["name"] == "Idempotency-Key"}
    documented = re.compile(schema)
    for key in ("a", "x" * 255, "x" * 256, "", "two words", "k\t", "café", "~!{}",
                "550e8400-e29b-41d4-a716-446655440000"):
        assert bool(documented.match(key)) == bool(IDEMPOTENCY_KEY.match(key)), key


async def test_a_confirm_line_of_the_wrong_type_says_which_type(
        pair: tuple[Served, Served]) -> None:
    """Every wrong field of a confirm's line said 'wrong type (amounts are integers)', the
    HS code too, which is a string."""
    za, _ = pair
    response = await za.client.post(
        f"{API}/certificates/ZA-2026-0404/confirm", headers=za.auth("officer"),
        json={"received_on": "2026-11-30", "lines": [
            {"hs_code": 7102, "carats_hundredths": "12", "usd_cents": 1}]})
    problems = {p["path"]: p["message"] for p in (await response.json())["problems"]}
    assert problems == {"lines[0].hs_code": "must be a string",
                        "lines[0].carats_hundredths": "must be an integer"}, problems


async def test_a_body_its_content_encoding_does_not_describe_is_a_400_not_a_node_failure(
        pair: tuple[Served, Served]) -> None:
    """A body sent as gzip (or deflate) that is not was a 500 node.processing_failed with
    a traceback in the node's log: the docs tell a client to retry that, and the retry
    met the same 500. In the console, aiohttp's bare plain-text 500."""
    za, _ = pair
    garbled = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    for path in ("certificates/validate", "certificates", "certificates/ZA-2026-0001/cancel"):
        response = await za.client.post(f"{API}/{path}", data=b"not gzip at all",
                                         headers={**za.auth("officer"), **garbled,
                                                  "Idempotency-Key": "k-1"})
        assert response.status == 400, (path, await response.text())
        assert (await response.json())["error"] == "request.malformed"
    assert za.node.records() == [] and za.node.store.backlog() == []
    assert [e["status"] for e in api_entries(za.node)] == [400, 400, 400]
    # The same body, encoded as it says, is taken.
    response = await za.client.post(
        f"{API}/certificates", headers={**za.auth("officer"), **garbled},
        data=gzip.compress(json.dumps(certificate_json("ZA-2026-0001", "ZA", "IN")).encode()))
    assert response.status == 201, await response.text()
    await za.client.get("/console/login")  # the login form's cookie, as a browser has it
    response = await za.client.post("/console/login", data=b"token=x&csrf=x", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "deflate"})
    assert response.status == 400, await response.text()
    assert (await za.client.get("/console/login")).status == 200  # the client goes on


async def test_a_query_parameter_a_get_does_not_list_is_refused_not_ignored(
        pair: tuple[Served, Served]) -> None:
    """The document says a query parameter a call does not list is a 400; showing one
    certificate, the status and the document itself ignored any: `?side=import` on an
    export came back with the export, as if it had been asked for, without a word."""
    za, _ = pair
    await issue(za, "ZA-2026-0001")
    for path in ("certificates/ZA-2026-0001?side=import", "status?verbose=1",
                 "openapi.json?format=yaml"):
        r = await za.client.get(f"{API}/{path}", headers=za.auth("monitor"))
        assert r.status == 400, (path, r.status)
        problems = (await r.json())["problems"]
        assert [(p["path"], p["reason"]) for p in problems] == [
            (path.partition("?")[2].partition("=")[0], "field.unknown")], problems
        assert "JSON body" not in problems[0]["message"]  # a GET has none
    for path in ("certificates/ZA-2026-0001", "status", "openapi.json"):
        assert (await za.client.get(f"{API}/{path}", headers=za.auth("monitor"))).status == 200
    documented = openapi_document()["paths"]
    for path in ("/certificates/{number}", "/status", "/openapi.json"):
        assert "400" in documented[path]["get"]["responses"], path
