"""The web console without a browser: login, sessions, CSRF, roles, pages, evidence."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import date, timedelta
from html import escape
from pathlib import Path

import aiohttp
import pytest

from node import console
from node.evidence import OPERATOR, read_operator_record
from node.machine import Side, State
from node.tokens import Tokens
from tests.netutil import carry, certificate
from tests.webutil import Served, refuse_operator_entries, served_pair

C = "/console"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Served, Served]]:
    async with served_pair(tmp_path) as served:
        yield served


async def login(s: Served, who: str) -> str:
    """Log in through the form; returns the session's CSRF token."""
    page = await (await s.client.get(f"{C}/login")).text()
    csrf = re.search(r"name=csrf value='([^']+)'", page)
    assert csrf is not None
    response = await s.client.post(f"{C}/login", data={"csrf": csrf[1],
                                                       "token": s.tokens[who]})
    assert response.status == 200 and str(response.url).endswith(f"{C}/")
    match = re.search(r"name=csrf value='([^']+)'", await response.text())
    assert match is not None
    return match[1]


def issue_form(csrf: str, number: str) -> dict[str, str]:
    return {"csrf": csrf, "number": number, "destination": "IN", "origins": "ZA",
            "exporter_name": "ZA Mining", "exporter_address": "1 Main Road",
            "importer_name": "IN Traders", "importer_address": "2 Bourse", "parcels": "2",
            "issued_on": date.today().isoformat(),
            "expires_on": (date.today() + timedelta(days=60)).isoformat(), "remarks": "",
            "hs0": "7102.31", "carats0": "1,250.50", "usd0": "200000"}


async def test_pages_need_a_login_and_a_bad_token_is_refused(pair: tuple[Served, Served]) -> None:
    za, _ = pair
    response = await za.client.get(f"{C}/incoming", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == f"{C}/login?next={C}/incoming"
    page = await (await za.client.get(f"{C}/login")).text()
    csrf = re.search(r"name=csrf value='([^']+)'", page)
    assert csrf is not None
    response = await za.client.post(f"{C}/login", data={"csrf": csrf[1], "token": "kpx_no"})
    assert response.status == 401
    response = await za.client.post(f"{C}/login", data={"csrf": "forged", "token":
                                                         za.tokens["officer"]})
    assert response.status == 403
    response = await za.client.post(f"{C}/issue", data={"number": "ZA-1"})
    assert response.status == 401
    assert za.node.records() == []


async def test_a_revoked_token_ends_its_sessions_and_no_session_outlives_a_day(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    za, _ = pair
    csrf = await login(za, "officer")
    assert (await za.client.get(f"{C}/outgoing", allow_redirects=False)).status == 200
    Tokens(za.node.config.directory).revoke("za-officer")
    response = await za.client.get(f"{C}/outgoing", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == f"{C}/login?next={C}/outgoing"
    response = await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0009"))
    assert response.status == 401
    assert za.node.records() == []
    # However busy, a session ends SESSION_MAX_SECONDS after its login.
    monkeypatch.setattr(console, "SESSION_MAX_SECONDS", 0.0)
    page = await (await za.client.get(f"{C}/login")).text()
    login_csrf = re.search(r"name=csrf value='([^']+)'", page)
    assert login_csrf is not None
    response = await za.client.post(f"{C}/login", allow_redirects=False, data={
        "csrf": login_csrf[1], "token": za.tokens["monitor"]})
    assert response.status == 303 and response.headers["Location"] == f"{C}/"
    response = await za.client.get(f"{C}/incoming", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == f"{C}/login?next={C}/incoming"


async def test_a_login_goes_back_to_the_page_asked_for_and_only_to_the_console(
        pair: tuple[Served, Served]) -> None:
    """A link to a certificate, followed while logged out, landed on the console's home
    after the login; the officer had to find the certificate again."""
    za, _ = pair
    asked = f"{C}/outgoing?state=issued"
    response = await za.client.get(asked, allow_redirects=False)
    location = response.headers["Location"]
    assert response.status == 303 and location.startswith(f"{C}/login?next=")
    for going, lands in ((None, asked), ("https://evil.example/console/", f"{C}/"),
                         (f"{C}//evil.example", f"{C}/"), (f"{C}/login", f"{C}/")):
        page = await (await za.client.get(location if going is None else
                                          f"{C}/login?next={going}")).text()
        csrf = re.search(r"name=csrf value='([^']+)'", page)
        shown = re.search(r"name=next value='([^']+)'", page)
        assert csrf is not None
        form = {"csrf": csrf[1], "token": za.tokens["monitor"]}
        if shown is not None:
            form["next"] = shown[1].replace("&amp;", "&")
        response = await za.client.post(f"{C}/login", data=form, allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == lands, going
    # a forged form field is held to the console as well
    page = await (await za.client.get(f"{C}/login")).text()
    csrf = re.search(r"name=csrf value='([^']+)'", page)
    assert csrf is not None
    response = await za.client.post(f"{C}/login", allow_redirects=False, data={
        "csrf": csrf[1], "token": za.tokens["monitor"], "next": "//evil.example/"})
    assert response.headers["Location"] == f"{C}/"


async def test_a_login_does_not_go_out_of_the_console_by_dot_segments(
        pair: tuple[Served, Served]) -> None:
    """'A path of this console only': /console/../api/v1/status starts with /console/
    and passed, and a browser resolves the dot segments (%2e too) to a page outside it."""
    za, _ = pair
    for going in (f"{C}/../api/v1/status", f"{C}/%2e%2e/metrics", f"{C}/./login",
                  f"{C}/incoming/..%2F..", f"{C}/.%2E?x=1"):
        page = await (await za.client.get(f"{C}/login")).text()
        csrf = re.search(r"name=csrf value='([^']+)'", page)
        assert csrf is not None
        response = await za.client.post(f"{C}/login", allow_redirects=False, data={
            "csrf": csrf[1], "token": za.tokens["monitor"], "next": going})
        assert response.headers["Location"] == f"{C}/", going
    assert console.after_login(f"{C}/certificates/ZA-2026-0001") == \
        f"{C}/certificates/ZA-2026-0001"
    assert console.after_login(f"{C}/outgoing?state=issued&partner=..") == \
        f"{C}/outgoing?state=issued&partner=.."  # a query is not a path


async def test_a_new_login_ends_the_browsers_earlier_session(
        pair: tuple[Served, Served]) -> None:
    """Logging in again left the earlier session alive on the server until it timed out:
    its cookie, copied meanwhile, still acted as the officer."""
    za, _ = pair
    await login(za, "officer")
    cookie = za.client.session.cookie_jar.filter_cookies(za.client.make_url(f"{C}/"))
    earlier = cookie[console.SESSION_COOKIE].value
    await login(za, "monitor")
    response = await za.client.get(f"{C}/outgoing", allow_redirects=False,
                                   cookies={console.SESSION_COOKIE: earlier})
    assert response.status == 303  # to the login: the earlier session is gone
    response = await za.client.get(f"{C}/outgoing", allow_redirects=False)
    assert response.status == 200  # the new one works


async def test_an_officer_issues_and_a_form_without_the_csrf_token_is_refused(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    csrf = await login(za, "officer")
    form = issue_form(csrf, "ZA-2026-0100")
    response = await za.client.post(f"{C}/issue", data={**form, "csrf": "wrong"})
    assert response.status == 403
    assert za.node.records() == []
    bad = {**form, "carats0": "12.345"}
    response = await za.client.post(f"{C}/issue", data=bad)
    assert response.status == 400
    assert "at most two decimals" in await response.text()
    bad = {**form, "exporter_name": ""}
    response = await za.client.post(f"{C}/issue", data=bad)
    assert response.status == 400
    assert "exporter.name" in await response.text()
    response = await za.client.post(f"{C}/issue", data=form)
    assert response.status == 200 and "flash=issued" in str(response.url)
    record = za.node.store.get(Side.EXPORT, "ZA-2026-0100")
    assert record is not None
    assert record.certificate.carats_hundredths == 125_050
    assert record.certificate.usd_cents == 20_000_000
    assert "ZA-2026-0100" in await response.text()
    calls = [read_operator_record(e.frame) for e in za.node.store.evidence()
             if e.direction == OPERATOR]
    assert ("za-officer", "console.call", "/console/issue", 303) in {
        (c["operator"], c["action"], c["path"], c["status"]) for c in calls}


async def test_a_monitor_sees_the_pages_but_cannot_confirm(pair: tuple[Served, Served]) -> None:
    za, india = pair
    csrf = await login(za, "officer")
    await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0101"))
    carry(za.node, {"IN": india.node})
    monitor_csrf = await login(india, "monitor")
    page = await (await india.client.get(f"{C}/incoming")).text()
    assert "ZA-2026-0101" in page and "Confirm arrival" not in page
    response = await india.client.post(f"{C}/incoming/ZA-2026-0101/confirm",
                                       data={"csrf": monitor_csrf})
    assert response.status == 403
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0101").state is State.RECEIVED
    for path in ("", "outgoing", "dead-letters", "partners", "statistics",
                 "certificate/ZA-2026-0101", "issue"):
        response = await india.client.get(f"{C}/{path}")
        assert response.status == 200, path
        assert "http://" not in (await response.text()).replace(
            "http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere


async def test_confirming_what_arrived_differently_records_the_discrepancy(
        pair: tuple[Served, Served]) -> None:
    za, india = pair
    csrf = await login(za, "officer")
    await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0102"))
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    response = await india.client.post(f"{C}/incoming/ZA-2026-0102/confirm",
                                       data={"csrf": csrf, "carats0": "1250.00",
                                             "usd0": "200000.00", "parcels": "2",
                                             "received_on": "", "remarks": "short"})
    assert response.status == 200 and "flash=confirmed" in str(response.url)
    record = india.node.store.get(Side.IMPORT, "ZA-2026-0102")
    assert record.state is State.CONFIRMED
    assert any("carats" in d.field for d in record.discrepancies), record.discrepancies
    response = await india.client.post(f"{C}/incoming/ZA-2026-0102/confirm",
                                       data={"csrf": csrf})
    assert response.status == 409
    carry(india.node, {"ZA": za.node})
    page = await (await za.client.get(f"{C}/certificate/ZA-2026-0102")).text()
    assert "import_confirmation" in page and "discrepancy" in page


async def test_a_line_that_did_not_arrive_is_confirmed_as_0_and_0(
        pair: tuple[Served, Served]) -> None:
    """The form lists every declared line, but 0 was refused as 'must be > 0': a line
    that did not arrive could not be confirmed from the console at all."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0104", "ZA", "IN"))  # 7102.31 and 7102.21
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    page = await (await india.client.get(f"{C}/incoming")).text()
    assert "0 carats and US$ 0 for a line that did not arrive" in page
    response = await india.client.post(f"{C}/incoming/ZA-2026-0104/confirm",
                                       data={"csrf": csrf, "carats1": "0", "usd1": "0.00"})
    assert response.status == 200 and "flash=confirmed" in str(response.url)
    record = india.node.store.get(Side.IMPORT, "ZA-2026-0104")
    assert record.confirmation is not None
    assert [x.hs_code for x in record.confirmation.lines] == ["7102.31"]
    assert {d.field for d in record.discrepancies} == {
        "lines[7102.21].carats_hundredths", "lines[7102.21].usd_cents"}


async def test_a_number_with_slashes_can_be_opened_and_confirmed(
        pair: tuple[Served, Served]) -> None:
    """SPEC allows '/' in certificate numbers; the console's links and form actions put
    the number in the path raw, so every such certificate was a 404 in the console."""
    za, india = pair
    za.node.issue(certificate("ZA/2026/0103", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    page = await (await india.client.get(f"{C}/incoming")).text()
    action = re.search(r"action='([^']*/confirm)'", page)
    link = re.search(r"href='([^']*/certificate/[^']*)'", page)
    assert action is not None and link is not None
    assert (await india.client.get(link[1])).status == 200
    # A date fromisoformat reads but a certificate never carries: refused, and the form
    # shown again as entered, to the same action (no javascript: links, which the
    # console's Content-Security-Policy blocks).
    response = await india.client.post(action[1], data={"csrf": csrf,
                                                         "received_on": "20261115"})
    assert response.status == 400
    assert "javascript:" not in (text := await response.text())
    assert f"action='{action[1]}'" in text and "value='20261115'" in text
    response = await india.client.post(action[1], data={"csrf": csrf,
                                                         "received_on": date.today().isoformat()})
    assert response.status == 200 and "flash=confirmed" in str(response.url)
    assert india.node.store.get(Side.IMPORT, "ZA/2026/0103").state is State.CONFIRMED  # type: ignore[union-attr]


async def test_the_login_form_reads_no_more_than_a_login_needs(
        pair: tuple[Served, Served]) -> None:
    """Anyone may post to /login: each such request made the node buffer up to a
    megabyte of form before any token was checked."""
    za, _ = pair
    response = await za.client.post(f"{C}/login", data={"csrf": "x", "token": "y" * 10_000})
    assert response.status == 413
    assert await login(za, "officer")  # a real login still fits


async def test_cookies_are_secure_behind_a_proxy_that_ends_tls(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    plain = await za.client.get(f"{C}/login")
    assert "Secure" not in plain.headers["Set-Cookie"]
    proxied = await za.client.get(f"{C}/login", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in proxied.headers["Set-Cookie"]


async def test_a_login_body_that_never_finishes_is_cut_off(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers in time, body trickling: aiohttp's idle limit covers headers only, so 256
    such logins held every connection slot of the node's HTTP port for ever."""
    za, _ = pair
    monkeypatch.setattr(console, "IDLE_SECONDS", 1.0)
    reader, writer = await asyncio.open_connection(za.client.server.host,
                                                   za.client.server.port)
    writer.write(b"POST /console/login HTTP/1.1\r\nHost: x\r\nCookie: kpx_login=abc\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: 4000\r\n\r\ncsrf=")
    answer = await asyncio.wait_for(reader.readline(), 5.0)
    assert answer.startswith(b"HTTP/1.1 408")
    writer.close()
    # and without the login form's cookie, the body is not waited for at all
    response = await za.client.post(f"{C}/login", data={"csrf": "x", "token": "y"})
    assert response.status == 403


async def test_the_outgoing_page_lists_every_open_loop_and_only_the_newest_closed(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """After years a node holds tens of thousands of closed loops, and each page listed
    them all. Open ones (an officer's work) are all listed; closed ones, the newest."""
    monkeypatch.setattr(console, "CLOSED_SHOWN", 3)
    za, _ = pair
    za.node.issue_many([certificate(f"ZA-2026-{i:04d}", "ZA", "IN") for i in range(10)])
    with za.node.store.transaction():  # the first eight closed, the last two still open
        za.node.store.db.execute("UPDATE certificates SET state = ? WHERE number < ?",
                                 (str(State.CANCELLED), "ZA-2026-0008"))
    await login(za, "monitor")
    page = await (await za.client.get(f"{C}/outgoing")).text()
    listed = set(re.findall(r"ZA-2026-\d{4}", page))
    assert listed == {"ZA-2026-0005", "ZA-2026-0006", "ZA-2026-0007",  # the newest closed
                      "ZA-2026-0008", "ZA-2026-0009"}  # every open one
    assert "The newest 3 only" in page
    monkeypatch.setattr(console, "CLOSED_SHOWN", 8)  # every closed one fits: no note
    page = await (await za.client.get(f"{C}/outgoing")).text()
    assert len(set(re.findall(r"ZA-2026-\d{4}", page))) == 10 and "The newest" not in page


async def test_the_incoming_page_lists_every_expired_import(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """A review found expired imports (loops to chase) counted among the closed ones,
    and so hidden once newer closed imports filled the page."""
    monkeypatch.setattr(console, "CLOSED_SHOWN", 3)
    za, india = pair
    za.node.issue_many([certificate(f"ZA-2026-{i:04d}", "ZA", "IN") for i in range(10)])
    carry(za.node, {"IN": india.node})
    with india.node.store.transaction():
        india.node.store.db.execute("UPDATE certificates SET state = ? WHERE number = ?",
                                    (str(State.EXPIRED), "ZA-2026-0000"))
        india.node.store.db.execute("UPDATE certificates SET state = ? WHERE number > ?",
                                    (str(State.CONFIRMED), "ZA-2026-0000"))
    await login(india, "monitor")
    page = await (await india.client.get(f"{C}/incoming")).text()
    assert set(re.findall(r"ZA-2026-\d{4}", page)) == {
        "ZA-2026-0000", "ZA-2026-0007", "ZA-2026-0008", "ZA-2026-0009"}
    # flagged, without a colon that leads nowhere (the record has no other note)
    row = re.search(r"<tr class=overdue data-number='ZA-2026-0000'>.*?</tr>", page, re.DOTALL)
    assert row is not None and ">OVERDUE<" in row[0]
    # nor does the partners page count an expired loop as ended
    page = await (await india.client.get(f"{C}/partners")).text()
    row = re.search(r"<tr><td>ZA</td>.*?</tr>", page, re.DOTALL)
    assert row is not None
    assert re.findall(r"<td class=n>(\d+)</td>", row[0]) == ["0", "1", "9"]


async def test_an_officer_cannot_issue_while_the_node_distrusts_its_clock(
        pair: tuple[Served, Served]) -> None:
    za, _ = pair
    csrf = await login(za, "officer")
    za.context.clock_agrees = lambda: False
    response = await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0200"))
    assert response.status == 503
    assert "wall clock has jumped ahead" in await response.text()
    assert za.node.records() == []
    za.context.clock_agrees = lambda: True
    response = await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0200"))
    assert response.status == 200
    assert [r.number for r in za.node.records()] == ["ZA-2026-0200"]


async def test_remarks_are_shown_and_notes_hide_nothing(pair: tuple[Served, Served]) -> None:
    """The importer's signed remarks ('seal broken, held by customs') were shown nowhere:
    not by kpnode show, the API's record or the console; a replacement's 'replaces X'
    note hid its discrepancy; dead letters were timed in the server's own zone, unlabelled."""
    import json
    import subprocess
    import sys

    from protocol import Line

    za, india = pair
    nodes = {"ZA": za.node, "IN": india.node}
    za.node.issue(certificate("ZA-2026-0300", "ZA", "IN", remarks="two <b>sealed</b> parcels"))
    carry(za.node, nodes)
    za.node.replace("ZA-2026-0300", certificate("ZA-2026-0301", "ZA", "IN"), "typo")
    carry(za.node, nodes)
    carry(india.node, nodes)
    received = (Line(hs_code="7102.31", carats_hundredths=200_000, usd_cents=40_000_000),
                Line(hs_code="7102.21", carats_hundredths=30_000, usd_cents=10_000_000))
    india.node.confirm("ZA-2026-0301", lines=received, remarks="seal <broken>, held by customs")
    carry(india.node, nodes)
    for s in pair:
        response = await s.client.get("/api/v1/certificates/ZA-2026-0301",
                                      headers=s.auth("monitor"))
        (shown,) = (await response.json())["records"]
        assert shown["confirmation"]["remarks"] == "seal <broken>, held by customs"
        await login(s, "monitor")
        page = await (await s.client.get(f"{C}/certificate/ZA-2026-0301")).text()
        assert "seal &lt;broken&gt;, held by customs" in page
        assert "1 discrepancy(ies); replaces ZA-2026-0300" in page
    page = await (await za.client.get(f"{C}/certificate/ZA-2026-0300")).text()
    assert "two &lt;b&gt;sealed&lt;/b&gt; parcels" in page
    done = subprocess.run([sys.executable, "-m", "node.cli", "show", "ZA-2026-0301", "--dir",
                           str(za.node.config.directory)], capture_output=True, text=True,
                          check=True)
    assert "importer's remarks: seal <broken>, held by customs" in done.stdout
    assert "1 discrepancy(ies); replaces ZA-2026-0300" in done.stdout
    assert json.loads(subprocess.run(
        [sys.executable, "-m", "node.cli", "show", "ZA-2026-0301", "--json", "--dir",
         str(za.node.config.directory)], capture_output=True, text=True, check=True
    ).stdout)["records"][0]["confirmation"]["remarks"] == "seal <broken>, held by customs"
    from node.service import Delivery, now_ms
    from protocol import Envelope, Receipt, seal
    unknown = Envelope(sender="ZA", recipient="IN", created_at=now_ms(),
                       payload=Receipt(certificate="ZA-2026-0999", certificate_digest=bytes(32)))
    india.node.handle_batch([Delivery(seal(unknown, za.node.signing_key()))])
    page = await (await india.client.get(f"{C}/dead-letters")).text()
    assert re.search(r"<td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</td>", page), page


async def test_a_csrf_field_that_is_not_ascii_is_refused_not_a_server_error(
        pair: tuple[Served, Served]) -> None:
    """compare_digest raises TypeError on non-ASCII text: anyone could make the login form,
    and any session's form, answer 500 with a traceback in the log."""
    za, _ = pair
    await za.client.get(f"{C}/login")  # the login cookie
    response = await za.client.post(f"{C}/login", data={"csrf": "\u00e9", "token": "x"})
    assert response.status == 403
    await login(za, "officer")
    response = await za.client.post(f"{C}/issue", data={"csrf": "\u00e9"})
    assert response.status == 403 and "security token" in await response.text()


async def test_the_success_message_names_only_a_certificate_the_node_holds(
        pair: tuple[Served, Served]) -> None:
    """The message after an action is built from the URL, which anyone can write: a link
    could make a trusted page say what its author wanted."""
    za, _ = pair
    csrf = await login(za, "officer")
    response = await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0201"))
    assert "ZA-2026-0201 issued and sent" in await response.text()
    for made_up in ("ZA-2026-0001 was NOT sent: re-issue it to XX", "ZA-2026-9999"):
        page = await (await za.client.get(f"{C}/outgoing", params={
            "flash": "issued", "n": made_up})).text()
        assert "class=flash" not in page and made_up not in page


async def test_the_console_answers_a_refusal_with_the_apis_status(
        pair: tuple[Served, Served]) -> None:
    """An empty reason is the request's fault (400) and an unknown number is 404, as in the
    API; the console answered 409 to every refusal."""
    za, _ = pair
    csrf = await login(za, "officer")
    await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0202"))
    empty = await za.client.post(f"{C}/outgoing/ZA-2026-0202/cancel",
                                 data={"csrf": csrf, "reason": ""})
    unknown = await za.client.post(f"{C}/outgoing/ZA-2026-9999/cancel",
                                   data={"csrf": csrf, "reason": "typo"})
    again = await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0202"))
    assert (empty.status, unknown.status, again.status) == (400, 404, 409)
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0202").state is State.ISSUED


async def test_a_refused_confirmation_keeps_what_the_officer_entered(
        pair: tuple[Served, Served]) -> None:
    """A typo in one amount answered with an error page and a link back to a fresh form:
    every amount, the parcels, the date and the remarks the officer had typed were lost."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0400", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    entered = {"carats0": "2490.5x", "usd0": "399000.00", "carats1": "299.00",
               "usd1": "99000.00", "parcels": "2", "received_on": date.today().isoformat(),
               "remarks": "one parcel's seal broken, held by customs"}
    response = await india.client.post(f"{C}/incoming/ZA-2026-0400/confirm",
                                       data={"csrf": csrf, **entered})
    assert response.status == 400
    text = await response.text()
    assert "2490.5x" in text  # named in the error
    form = re.search(r"<form[^>]*ZA-2026-0400/confirm.*?</form>", text, re.DOTALL)
    assert form is not None and "<details open>" in form[0]
    for name, value in entered.items():
        assert re.search(rf"name={name}\b[^>]*value='{re.escape(escape(value))}'", form[0]), name
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0400").state is State.RECEIVED  # type: ignore[union-attr]
    # corrected, it goes through
    response = await india.client.post(f"{C}/incoming/ZA-2026-0400/confirm",
                                       data={"csrf": csrf, **entered, "carats0": "2490.50"})
    assert response.status == 200 and "flash=confirmed" in str(response.url)
    record = india.node.store.get(Side.IMPORT, "ZA-2026-0400")
    assert record is not None and record.confirmation is not None
    assert record.confirmation.remarks == entered["remarks"]


async def test_the_console_address_without_a_slash_leads_a_logged_in_officer_in(
        pair: tuple[Served, Served]) -> None:
    """/console (the address the README gives) went into the console's sub-application,
    mounted ahead of the redirect meant for it: logged out, its login redirect hid that;
    logged in, an officer got a bare '404: Not Found'."""
    za, _ = pair
    await login(za, "officer")
    response = await za.client.get(C, allow_redirects=False)
    assert response.status in (301, 302, 303, 307, 308)
    assert response.headers["Location"] == f"{C}/"
    response = await za.client.get(C)
    assert response.status == 200 and "<h1>ZA · " in await response.text()


async def test_a_refused_console_action_is_in_the_evidence_log_as_in_the_api(
        pair: tuple[Served, Served]) -> None:
    """The API chains every call, a monitor's 403 too; the console left out the actions
    it refused before acting (a monitor's, a form without the session's CSRF token, one
    while the node distrusts its clock), so the log did not show who had tried."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0500", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    path = f"{C}/incoming/ZA-2026-0500/confirm"
    monitor_csrf = await login(india, "monitor")
    assert (await india.client.post(path, data={"csrf": monitor_csrf})).status == 403
    csrf = await login(india, "officer")
    assert (await india.client.post(path, data={"csrf": "stale"})).status == 403
    india.context.clock_agrees = lambda: False
    assert (await india.client.post(path, data={"csrf": csrf})).status == 503
    calls = {(c["operator"], c["action"], c["path"], c["status"], c.get("certificate"))
             for c in (read_operator_record(e.frame) for e in india.node.store.evidence()
                       if e.direction == OPERATOR)}
    assert {("in-monitor", "console.call", path, 403, "ZA-2026-0500"),
            ("in-officer", "console.call", path, 403, "ZA-2026-0500"),
            ("in-officer", "console.call", path, 503, "ZA-2026-0500")} <= calls, calls
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0500").state is State.RECEIVED  # type: ignore[union-attr]


async def test_a_monitor_is_not_offered_an_issue_form_it_may_not_send(
        pair: tuple[Served, Served]) -> None:
    """The incoming and outgoing pages offer a monitor no confirm or cancel form, but the
    issue page offered the whole form: a monitor filled it in, pressed 'Sign and send'
    and got a 403, with everything typed lost."""
    za, _ = pair
    await login(za, "monitor")
    response = await za.client.get(f"{C}/issue")
    assert response.status == 200
    text = await response.text()
    assert "Sign and send" not in text and "id=issue" not in text
    assert "only an officer may issue" in text
    await login(za, "officer")
    assert "Sign and send" in await (await za.client.get(f"{C}/issue")).text()


async def test_the_issue_form_says_what_is_wrong_with_the_parcels(
        pair: tuple[Served, Served]) -> None:
    """'2.5' or '-1' parcels was answered 'parcels: must be an integer, not a string': the
    form's text went on to the validator as text, and the officer had typed a number."""
    za, _ = pair
    csrf = await login(za, "officer")
    for typed in ("2.5", "-1", "two"):
        response = await za.client.post(f"{C}/issue", data={
            **issue_form(csrf, "ZA-2026-0600"), "parcels": typed})
        assert response.status == 400
        text = await response.text()
        assert "not a string" not in text
        assert "parcels: a whole number in digits 0-9 is required" in text, typed
        assert f"name=parcels size=4 value='{escape(typed)}'" in text
    assert za.node.records() == []


async def test_a_console_action_without_a_session_is_in_the_evidence_log_as_in_the_api(
        pair: tuple[Served, Served]) -> None:
    """A POST with no session (never logged in, expired, or its token revoked since) was
    answered 401 and left no trace, while the API chains every call made without a
    working token as `anonymous` (within the hourly budget): README says every console
    action is chained, refused ones too."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0700", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    path = f"{C}/incoming/ZA-2026-0700/confirm"
    assert (await india.client.post(path, data={"csrf": "none"})).status == 401
    csrf = await login(india, "officer")
    Tokens(india.node.config.directory).revoke("in-officer")
    assert (await india.client.post(path, data={"csrf": csrf})).status == 401
    calls = [read_operator_record(e.frame) for e in india.node.store.evidence()
             if e.direction == OPERATOR]
    refused = [(c["operator"], c["action"], c["method"], c["path"], c["status"])
               for c in calls if c["status"] == 401]
    assert refused == [("anonymous", "console.call", "POST", path, 401)] * 2, calls
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0700").state is State.RECEIVED  # type: ignore[union-attr]


async def test_an_evidence_entry_that_cannot_be_written_changes_no_answer(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """A review found that the console's record of a refusal raised when the evidence log
    could not be written (another process holding the database lock): a monitor's 403
    became a 'database unavailable' page, and an officer's confirmation, done, did too."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0600", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    path = f"{C}/incoming/ZA-2026-0600/confirm"
    refuse_operator_entries(monkeypatch)
    monitor_csrf = await login(india, "monitor")
    assert (await india.client.post(path, data={"csrf": monitor_csrf})).status == 403
    officer_csrf = await login(india, "officer")
    done = await india.client.post(path, data={"csrf": officer_csrf}, allow_redirects=False)
    assert done.status == 303
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0600").state is State.CONFIRMED  # type: ignore[union-attr]


async def test_the_overview_says_when_the_running_node_is_not_ready(
        pair: tuple[Served, Served]) -> None:
    """The console's overview counted loops from the database only: a node that consumed
    nothing (another connection holding its inbox's claim) or whose broker blocked its
    publishes looked as healthy to a monitor as one exchanging."""
    za, _ = pair
    checks = {"broker_connected": True, "consuming": False, "store_writable": True,
              "clock_agrees": True, "publishing_allowed": True}
    za.context.readiness = lambda: checks
    await login(za, "monitor")
    page = await (await za.client.get(f"{C}/")).text()
    assert "Not ready: the running node does not consume its inbox" in page
    checks["consuming"] = True
    page = await (await za.client.get(f"{C}/")).text()
    assert "Not ready" not in page


async def test_a_node_without_its_broker_is_not_said_to_be_blocked_or_claimed(
        pair: tuple[Served, Served]) -> None:
    """Without a broker connection, consuming and publishing_allowed fail too: the overview
    and the served status then also said another connection held the inbox's claim and
    the broker was low on disk or memory, sending the operator after a second node and a
    resource alarm during a plain outage."""
    from node.status import with_readiness

    za, _ = pair
    checks = {"broker_connected": False, "consuming": False, "store_writable": True,
              "clock_agrees": True, "publishing_allowed": False}
    za.context.readiness = lambda: checks
    await login(za, "monitor")
    page = await (await za.client.get(f"{C}/")).text()
    assert page.count("Not ready:") == 1 and "not connected to a broker" in page
    served = with_readiness({"health": "ok", "problems": [], "node": {}}, checks)
    assert [p["text"] for p in served["problems"]] == [
        "the running node is not connected to a broker (it reconnects by itself; its "
        "outbox waits)"]
    assert served["node"]["ready"] == checks  # the checks themselves, all of them
    checks.update(broker_connected=True, publishing_allowed=False, consuming=True)
    page = await (await za.client.get(f"{C}/")).text()  # connected: that is the alarm
    assert page.count("Not ready:") == 1 and "low on disk or memory" in page


async def test_a_token_revoked_while_a_form_arrives_does_not_act(
        pair: tuple[Served, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's token was checked when the request's headers came; the form may take
    up to 15 s more to arrive, and a token revoked (or made a monitor's) meanwhile still
    issued. The holder is asked again once the form is in."""
    za, _ = pair
    csrf = await login(za, "officer")
    holder_of = za.context.tokens.holder_of
    asked: list[object] = []

    def revoked_after_the_headers(token_hash: str) -> object:
        asked.append(token_hash)
        return holder_of(token_hash) if len(asked) == 1 else None  # type: ignore[arg-type]
    monkeypatch.setattr(za.context.tokens, "holder_of", revoked_after_the_headers)
    response = await za.client.post(f"{C}/issue", data=issue_form(csrf, "ZA-2026-0301"),
                                    allow_redirects=False)
    assert response.status == 401 and len(asked) == 2
    assert za.node.records() == []
    monkeypatch.setattr(za.context.tokens, "holder_of", holder_of)
    response = await za.client.get(f"{C}/outgoing", allow_redirects=False)
    assert response.status == 303  # the session ended with the token


async def test_a_form_another_site_made_the_browser_send_is_refused(
        pair: tuple[Served, Served]) -> None:
    """A page on another port of the same host, or a sibling subdomain, can plant the
    login form's cookie (cookies are not kept apart by port or subdomain) and post a login
    with a token of its own: the officer's browser then acts in the attacker's session.
    The browser's Sec-Fetch-Site says another page asked; such posts are refused, logins
    and actions alike, and nothing is done."""
    za, _ = pair
    page = await (await za.client.get(f"{C}/login")).text()
    csrf = re.search(r"name=csrf value='([^']+)'", page)
    assert csrf is not None
    for site in ("same-site", "cross-site", "Cross-Site"):
        response = await za.client.post(f"{C}/login", data={"csrf": csrf[1],
                                                             "token": za.tokens["officer"]},
                                        headers={"Sec-Fetch-Site": site})
        assert response.status == 403, site
        assert "from another site" in await response.text()
    session_csrf = await login(za, "officer")  # no header, as before: the tokens decide
    response = await za.client.post(f"{C}/issue", data=issue_form(session_csrf,
                                                                  "ZA-2026-0301"),
                                    headers={"Sec-Fetch-Site": "same-site"})
    assert response.status == 403
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0301") is None
    for site in ("same-origin", "none"):  # the console's own page; the officer's typing
        response = await za.client.post(f"{C}/issue", data=issue_form(
            session_csrf, f"ZA-2026-03{len(site):02d}"), headers={"Sec-Fetch-Site": site})
        assert response.status == 200, site
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0311") is not None


async def test_an_issue_line_with_amounts_but_no_hs_code_is_refused_not_dropped(
        pair: tuple[Served, Served]) -> None:
    """A line whose HS code was left at '—' was skipped whatever its carats and US$ said:
    the certificate was signed and sent without the goods the officer had typed in."""
    za, _ = pair
    csrf = await login(za, "officer")
    for typed in ({"carats1": "300.00", "usd1": "99000.00"}, {"carats1": "300.00"},
                  {"usd1": "99000"}):
        response = await za.client.post(f"{C}/issue", data={
            **issue_form(csrf, "ZA-2026-0700"), "hs1": "", **typed})
        assert response.status == 400, typed
        text = await response.text()
        assert "line 2: choose its HS code" in text, typed
        for name, value in typed.items():
            assert f"name={name} size=" in text and f"value='{value}'" in text
    assert za.node.records() == []
    # a line left wholly empty is no line
    response = await za.client.post(f"{C}/issue", data={
        **issue_form(csrf, "ZA-2026-0700"), "hs1": "", "carats1": " ", "usd1": ""})
    assert response.status == 200 and "flash=issued" in str(response.url)


async def test_a_confirm_field_the_officer_emptied_is_refused_not_signed_as_declared(
        pair: tuple[Served, Served]) -> None:
    """An amount or the parcels cleared on the form was taken as the declared figure: an
    officer who emptied a line that did not arrive had it signed as arrived in full."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0710", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    for emptied in ({"carats1": "", "usd1": ""}, {"usd0": " "}, {"parcels": ""}):
        response = await india.client.post(f"{C}/incoming/ZA-2026-0710/confirm",
                                           data={"csrf": csrf, **emptied})
        assert response.status == 400, emptied
        text = await response.text()
        assert "nothing was signed" in text and "<details open>" in text, emptied
        assert india.node.store.get(Side.IMPORT, "ZA-2026-0710").state is State.RECEIVED  # type: ignore[union-attr]
    # a client that posts no amounts at all still means as declared
    response = await india.client.post(f"{C}/incoming/ZA-2026-0710/confirm",
                                       data={"csrf": csrf, "carats1": "0", "usd1": "0"})
    assert response.status == 200 and "flash=confirmed" in str(response.url)


async def test_a_refused_confirmation_names_which_of_parcels_and_date_is_wrong(
        pair: tuple[Served, Served]) -> None:
    """A bad parcels count or date was answered 'parcels must be a whole number and the
    date YYYY-MM-DD' alike: for 2026-02-30, written as asked, the officer was left to
    guess, and a wrong date behind wrong parcels went unmentioned."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0720", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    today = date.today().isoformat()
    for typed, said in ((("3", "2026-02-30"), ["received on: day is out of range"]),
                        (("-1", today), ["parcels: a whole number in digits 0-9"]),
                        (("x", "20261115"), ["parcels: a whole number",
                                            "received on: a date YYYY-MM-DD is required"])):
        response = await india.client.post(f"{C}/incoming/ZA-2026-0720/confirm", data={
            "csrf": csrf, "parcels": typed[0], "received_on": typed[1]})
        assert response.status == 400
        text = await response.text()
        assert all(s in text for s in said), (typed, text)
        assert ("parcels:" in text) is (typed[0] != "3")
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0720").state is State.RECEIVED  # type: ignore[union-attr]


async def test_a_form_refused_while_the_node_distrusts_its_clock_comes_back_as_typed(
        pair: tuple[Served, Served]) -> None:
    """The clock's refusal came before the form was read, on a page of its own: a refused
    confirmation lost everything the officer had typed (README: refused, it comes back as
    it was filled in, with the reasons), and so did the issue form."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0730", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    india.context.clock_agrees = lambda: False
    entered = {"carats0": "2490.50", "usd0": "399000.00", "carats1": "0", "usd1": "0",
               "parcels": "2", "remarks": "one parcel held by customs"}
    response = await india.client.post(f"{C}/incoming/ZA-2026-0730/confirm",
                                       data={"csrf": csrf, **entered})
    assert response.status == 503
    text = await response.text()
    assert "wall clock has jumped ahead" in text and "nothing was signed" in text
    form = re.search(r"<form[^>]*ZA-2026-0730/confirm.*?</form>", text, re.DOTALL)
    assert form is not None and "<details open>" in form[0]
    for name, value in entered.items():
        assert re.search(rf"name={name}\b[^>]*value='{re.escape(escape(value))}'", form[0]), name
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0730").state is State.RECEIVED  # type: ignore[union-attr]
    csrf = await login(za, "officer")
    za.context.clock_agrees = lambda: False
    typed = {**issue_form(csrf, "ZA-2026-0731"), "exporter_name": "Kimberley Rough Ltd"}
    response = await za.client.post(f"{C}/issue", data=typed)
    assert response.status == 503
    text = await response.text()
    assert "wall clock has jumped ahead" in text
    assert "value='Kimberley Rough Ltd'" in text and "value='ZA-2026-0731'" in text
    assert za.node.store.get(Side.EXPORT, "ZA-2026-0731") is None


async def test_a_form_with_a_file_is_refused_not_signed_as_its_python_repr(
        pair: tuple[Served, Served]) -> None:
    """A multipart form whose remarks were a file part was confirmed with remarks
    "FileField(name='remarks', filename=..., file=<tempfile... at 0x...>": the form field's
    Python repr, signed and sent to the exporter."""
    za, india = pair
    za.node.issue(certificate("ZA-2026-0740", "ZA", "IN"))
    carry(za.node, {"IN": india.node})
    csrf = await login(india, "officer")
    form = aiohttp.FormData()
    form.add_field("csrf", csrf)
    form.add_field("remarks", b"seal intact", filename="remarks.txt")
    response = await india.client.post(f"{C}/incoming/ZA-2026-0740/confirm", data=form)
    assert response.status == 400
    assert "text fields only" in await response.text()
    assert india.node.store.get(Side.IMPORT, "ZA-2026-0740").state is State.RECEIVED  # type: ignore[union-attr]


async def test_the_dead_letters_page_says_which_refusals_were_answered(
        pair: tuple[Served, Served]) -> None:
    """The page said every refused message was 'answered with a signed rejection', but a
    refused rejection, pong or registry update is never answered, nor is anything while
    no key of the node can sign: it told the officer of rejections never sent."""
    _, india = pair
    store = india.node.store
    with store.transaction():
        store.remember("m-answered", "ZA", "certificate", "refused", "field.bad_format",
                       "r-1234", 1_000)
        store.remember("m-unanswered", "ZA", "rejection", "refused", "certificate.unknown",
                       None, 2_000)
    await login(india, "monitor")
    text = await (await india.client.get(f"{C}/dead-letters")).text()
    assert "each answered with a signed rejection" not in text
    rows = dict(re.findall(r"<code>(m-\w+)</code>.*?<td>(<code>r-1234</code>|"
                           r"<span class=muted>none</span>)</td></tr>", text))
    assert rows == {"m-answered": "<code>r-1234</code>",
                    "m-unanswered": "<span class=muted>none</span>"}, rows
