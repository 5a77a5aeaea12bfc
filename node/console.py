"""The web console: server-rendered pages for a national authority's officers.

Incoming certificates awaiting arrival (with a confirm form), outgoing ones by state with
overdue loops highlighted, an issue form, dead letters, partners and the registry, and the
quarter's statistics with a chart. Plain HTML with inline CSS, one small inline script and
an inline SVG chart: nothing is fetched from the internet, so it works on an isolated
network. An officer logs in with an API token (``kpnode token add NAME --role officer``);
the session is a random cookie (HttpOnly, SameSite=Strict) held in memory, and every form
carries the session's CSRF token. Actions go through the same Node methods as the API and
the CLI, and each is chained into the evidence log with who did it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import quote, unquote

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from node.httpserver import IDLE_SECONDS
from node.machine import OPEN_STATES, Record, Side, State, day_of, is_overdue
from node.service import CommandRefused, Node
from node.stats import ALL, Quarter
from node.store import StoreError
from node.tokens import Principal, TokenError, token_hash
from node.views import (
    carats,
    history_json,
    parse_amount,
    parse_date,
    parse_whole_number,
    record_note,
    usd,
)
from node.webcontext import (
    CLOCK_DISAGREES,
    WEB_CONTEXT,
    WebContext,
    quarter_of,
    refusal_problems,
    refusal_status,
)
from protocol import HS_CODES, Line, ValidationError, validate_certificate
from protocol.schema import CERTIFICATE_NUMBER

log = structlog.get_logger("kpx.console")

CONSOLE_PREFIX = "/console"
SESSION_COOKIE = "kpx_session"
LOGIN_COOKIE = "kpx_login"
SESSION_SECONDS = 8 * 3600
#: however busy, a session ends this long after its login
SESSION_MAX_SECONDS = 12 * 3600
#: a login form: a CSRF token and a token of some 50 characters, URL-encoded
LOGIN_FORM_BYTES = 4096


@dataclass(slots=True)
class Session:
    principal: Principal
    csrf: str
    expires_at: float
    #: the hash of the token logged in with: the session lives only while the token does
    token_hash: str
    ends_at: float


SESSIONS = web.AppKey("kpx_console_sessions", dict[str, Session])
SESSION = web.RequestKey("kpx_console_session", Session)

FLASH = {
    "issued": "Certificate {n} issued and sent to the importer.",
    "confirmed": "Import {n} confirmed; the exporter is told.",
    "cancelled": "Certificate {n} cancelled; the importer is told.",
}

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2430;background:#f4f6f8}
header{background:#17324d;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;
 align-items:center;flex-wrap:wrap}
header b{font-size:1.15em}header a{color:#cfe3f7;text-decoration:none}
header a.on{color:#fff;border-bottom:2px solid #f5b942}
header form{margin-left:auto}main{padding:1em 1.4em;max-width:1200px}
table{border-collapse:collapse;width:100%;background:#fff;margin:.6em 0 1.4em}
th,td{border-bottom:1px solid #dde3ea;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#e9eef3;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.overdue td{background:#fde2e1}.badge{display:inline-block;padding:0 .45em;
 border-radius:.6em;font-size:.85em;background:#dde3ea}
.s-confirmed{background:#cdeccd}.s-received,.s-delivered,.s-issued{background:#fff1c2}
.s-rejected,.s-cancelled,.s-expired{background:#f7c9c6}.s-replaced{background:#e3dcf5}
.flash{background:#dff3df;border:1px solid #9ccf9c;padding:.5em .8em}
.error{background:#fde2e1;border:1px solid #e39a95;padding:.5em .8em}
button,input[type=submit]{background:#17324d;color:#fff;border:0;padding:.35em .9em;
 border-radius:3px;cursor:pointer}button.danger{background:#a33}
input,select{padding:.25em;border:1px solid #b9c3ce;border-radius:3px}
fieldset{border:1px solid #cfd7df;background:#fff;margin:.8em 0}label{display:inline-block;
 margin:.2em .8em .2em 0}.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde3ea;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.6em}tr.total td{font-weight:600}.muted{color:#66717d}
"""

SCRIPT = """
document.querySelectorAll('form[data-confirm]').forEach(function(f){
  f.addEventListener('submit',function(e){if(!window.confirm(f.dataset.confirm))
    e.preventDefault();});});
document.querySelectorAll('input[data-filter]').forEach(function(box){
  box.addEventListener('input',function(){var q=box.value.toLowerCase();
    document.querySelectorAll(box.dataset.filter+' tbody tr').forEach(function(tr){
      tr.style.display=tr.textContent.toLowerCase().indexOf(q)<0?'none':'';});});});
"""

NAV = (("", "Overview"), ("incoming", "Incoming"), ("outgoing", "Outgoing"),
       ("issue", "Issue"), ("dead-letters", "Dead letters"), ("partners", "Partners"),
       ("statistics", "Statistics"))


def h(value: object) -> str:
    return escape(str(value), quote=True)


def page(request: web.Request, title: str, body: str, *, active: str | None = None,
         status: int = 200) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    session: Session | None = request.get(SESSION)
    nonce = secrets.token_urlsafe(16)
    nav = ""
    if session is not None:
        links = "".join(f'<a href="{CONSOLE_PREFIX}/{path}"'
                        f'{" class=on" if path == active else ""}>{h(name)}</a>'
                        for path, name in NAV)
        nav = (f"{links}<form method=post action='{CONSOLE_PREFIX}/logout'>"
               f"<span class=muted>{h(session.principal.name)} "
               f"({h(session.principal.role)})</span> {csrf_field(session)}"
               "<button>Log out</button></form>")
    flash = ""
    code = request.query.get("flash")
    number = request.query.get("n", "")
    # The URL is anyone's to write: name only a certificate this node holds, so a link
    # cannot put words of its own into a message the officer trusts.
    if code in FLASH and CERTIFICATE_NUMBER.fullmatch(number) and ctx.node.find(number):
        flash = f"<p class=flash>{h(FLASH[code].format(n=number))}</p>"
    html = (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width'>"
            f"<title>{h(title)} · kpx {h(ctx.node.me)}</title><style>{CSS}</style></head>"
            f"<body><header><b>kpx · {h(ctx.node.me)}</b>{nav}</header><main>"
            f"<h1>{h(title)}</h1>{flash}{body}</main>"
            f"<script nonce='{nonce}'>{SCRIPT}</script></body></html>")
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; "
           "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
           "base-uri 'none'")
    return web.Response(text=html, status=status, content_type="text/html",
                        headers={"Content-Security-Policy": csp,
                                 "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "same-origin",
                                 "Cache-Control": "no-store"})


def csrf_field(session: Session) -> str:
    return f"<input type=hidden name=csrf value='{h(session.csrf)}'>"


def csrf_matches(sent: object, expected: str) -> bool:
    """Whether a form's CSRF field is ``expected``, compared in constant time."""
    # As bytes: compare_digest refuses non-ASCII text with a TypeError, which a form
    # posted by anyone would turn into a 500.
    return hmac.compare_digest(str(sent or "").encode(), expected.encode())


def see(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location)


# -- sessions, login, CSRF ---------------------------------------------------------------


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await _in_session(request, handler)
    except StoreError as exc:
        # Another process holding the database's lock, a full disk: the API's 503 too.
        log.error("store failed", error=str(exc), path=request.path)
        return page(request, "Unavailable", "<p class=error>The node's database cannot be "
                    "used now; see the node's log. Look at the certificate's state before "
                    "you try again.</p>", status=503)


async def _in_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path.removeprefix(CONSOLE_PREFIX)
    if request.method == "POST" and from_another_site(request):
        record_refused(request, None, 403)
        return page(request, "Refused", "<p class=error>A form sent from another site is "
                    "not taken; open the console's own page and send it from there.</p>",
                    status=403)
    if path in ("/login", "/login/"):
        return await handler(request)
    sessions: dict[str, Session] = request.app[SESSIONS]
    sid = request.cookies.get(SESSION_COOKIE, "")
    session = sessions.get(sid)
    now = time.monotonic()
    if session is not None and min(session.expires_at, session.ends_at) >= now:
        try:
            principal = request.app[WEB_CONTEXT].tokens.holder_of(session.token_hash)
        except TokenError as exc:
            return tokens_unreadable(request, exc)
        if principal is None:  # revoked since login
            del sessions[sid]
            session = None
        else:
            session.principal = principal
    if session is None or min(session.expires_at, session.ends_at) < now:
        sessions.pop(sid, None)
        if request.method == "GET":
            raise see(login_url(request.path_qs))
        if request.method == "POST":  # an action refused: anonymous, as the API's 401s
            record_refused(request, None, 401)
        return page(request, "Session expired", "<p>Please <a href='"
                    f"{CONSOLE_PREFIX}/login'>log in</a> again.</p>", status=401)
    session.expires_at = now + SESSION_SECONDS
    request[SESSION] = session
    if request.method == "POST":
        form = await read_form(request)
        # Asked again once the form is in: it may take up to IDLE_SECONDS to arrive, and a
        # token revoked (or made a monitor's) meanwhile must not act on the earlier check.
        try:
            principal = request.app[WEB_CONTEXT].tokens.holder_of(session.token_hash)
        except TokenError as exc:
            return tokens_unreadable(request, exc)
        if principal is None:
            sessions.pop(sid, None)
            record_refused(request, None, 401)
            return page(request, "Session ended", "<p>Your token was revoked. Please <a "
                        f"href='{CONSOLE_PREFIX}/login'>log in</a> again.</p>", status=401)
        session.principal = principal
        if not csrf_matches(form.get("csrf"), session.csrf):
            record_refused(request, session.principal, 403)
            return page(request, "Refused", "<p class=error>The form's security token does "
                        "not match this session; reload the page and try again.</p>",
                        status=403)
    return await handler(request)


def from_another_site(request: web.Request) -> bool:
    """Whether the browser says another page than the console's own made it send this.

    The CSRF tokens stop other sites, but their login form's half is a cookie, and cookies
    are not kept apart by port or by subdomain: a page on another port of the same host,
    or on a sibling subdomain, could plant its own and log the officer's browser into the
    attacker's session. Browsers say who asked in Sec-Fetch-Site, which no page can set
    and no proxy needs to rewrite ('same-site' is such a neighbour; 'none' the officer's
    own typing or bookmark). One without the header (an old browser, a script) is left
    to the tokens."""
    return request.headers.get("Sec-Fetch-Site", "").strip().lower() in ("cross-site",
                                                                          "same-site")


def login_url(after: str) -> str:
    """The login page, told to go back to ``after`` (a console page asked for) once
    logged in; the console's home needs no telling."""
    if after_login(after) == f"{CONSOLE_PREFIX}/":
        return f"{CONSOLE_PREFIX}/login"
    return f"{CONSOLE_PREFIX}/login?next={quote(after, safe='/')}"


def after_login(asked: object) -> str:
    """Where a login goes: the console page ``asked`` for, if it is one, else the home.
    Only a path of this console: a login form posted with another site's address would
    otherwise send the officer there, logged in and trusting it (an open redirect)."""
    home = f"{CONSOLE_PREFIX}/"
    if (not isinstance(asked, str) or not asked.startswith(home) or "\\" in asked
            or "//" in asked or not asked.isprintable() or len(asked) > 2000
            or asked.split("?")[0].rstrip("/") in (f"{CONSOLE_PREFIX}/login",
                                                   f"{CONSOLE_PREFIX}/logout")):
        return home
    # A browser resolves dot segments, written '%2e' too: /console/../api is not the
    # console's, nor /console/./login the login page, which the check above lets pass.
    if {".", ".."} & set(unquote(asked.split("?")[0]).split("/")):
        return home
    return asked


def tokens_unreadable(request: web.Request, exc: TokenError) -> web.Response:
    log.error("tokens file unreadable", error=str(exc))
    return page(request, "Unavailable", "<p class=error>The node cannot read its tokens "
                "file; see its log.</p>", status=503)


async def get_login(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(24)
    response = page(request, "Log in", login_form(token, "", request.query.get("next")))
    response.set_cookie(LOGIN_COOKIE, token, path=CONSOLE_PREFIX, httponly=True,
                        samesite="Strict", secure=over_https(request))
    return response


def over_https(request: web.Request) -> bool:
    """Whether the browser reached us over HTTPS, so cookies get the Secure flag. Behind
    a proxy that ends TLS, aiohttp sees plain HTTP; the proxy's X-Forwarded-Proto says
    https. Believing it unchecked is safe: it can only add the flag, to the sender's
    own cookie."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0]
    return request.secure or forwarded.strip().lower() == "https"


def login_form(csrf: str, error: str, after: object = None) -> str:
    going = after_login(after)
    return (f"{error}<form method=post action='{CONSOLE_PREFIX}/login'>"
            f"<input type=hidden name=csrf value='{h(csrf)}'>"
            + (f"<input type=hidden name=next value='{h(going)}'>"
               if going != f"{CONSOLE_PREFIX}/" else "") +
            "<label>Token <input type=password name=token size=50 autocomplete=off "
            "autofocus></label> <button>Log in</button></form>"
            "<p class=muted>A token comes from <code>kpnode token add NAME --role officer"
            "</code> on the node.</p>")


async def read_form(request: web.Request) -> Any:
    """The posted form; one that is not UTF-8 (or not a form) is a 400, not a 500, and so
    is one with a file. A body still coming after IDLE_SECONDS is a 408: the server's idle
    limit covers headers only, and a connection trickling its body would hold one of its
    few slots for ever."""
    try:
        async with asyncio.timeout(IDLE_SECONDS):
            form = await request.post()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the form took too long to arrive") from None
    except (UnicodeDecodeError, ValueError, LookupError):
        raise web.HTTPBadRequest(text="the form could not be read (it must be UTF-8)") from None
    except web.RequestPayloadError:
        # gzip that is not, say: aiohttp's bare 500 otherwise. The rest of the body cannot
        # be read past, so the connection ends with the answer (the API's request.malformed).
        refused = web.HTTPBadRequest(text="the form could not be decoded as its "
                                     "Content-Encoding says")
        refused.force_close()
        raise refused from None
    # No console form has a file: one posted as a field would reach the handlers as a
    # FileField, whose str() (a Python repr, with a memory address) was signed as text.
    if any(isinstance(value, web.FileField) for value in form.values()):
        raise web.HTTPBadRequest(text="the console's forms take text fields only, no files")
    return form


async def post_login(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB_CONTEXT]
    # Anyone may post here: read no more than a login form needs, or each connection
    # could make the node hold a megabyte before any token is checked.
    if request.content_length is None or request.content_length > LOGIN_FORM_BYTES:
        return page(request, "Log in", "<p class=error>A login form is at most "
                    f"{LOGIN_FORM_BYTES} bytes with a Content-Length.</p>", status=413)
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected:  # no login form was fetched: nothing to read the body for
        return page(request, "Log in", login_form("", "<p class=error>The login form "
                    "expired; try again.</p>"), status=403)
    form = await read_form(request)
    if not expected or not csrf_matches(form.get("csrf"), expected):
        return page(request, "Log in", login_form(expected, "<p class=error>The login form "
                    "expired; try again.</p>", form.get("next")), status=403)
    try:
        principal = ctx.tokens.authenticate(str(form.get("token", "")).strip())
    except TokenError as exc:
        log.error("tokens file unreadable", error=str(exc))
        principal = None
    ctx.record_call(principal, "POST", request.path, 303 if principal else 401, via="console")
    if principal is None:
        return page(request, "Log in", login_form(expected, "<p class=error>Unknown or "
                    "revoked token.</p>", form.get("next")), status=401)
    sid = secrets.token_urlsafe(32)
    now = time.monotonic()
    sessions: dict[str, Session] = request.app[SESSIONS]
    # The browser's earlier session, if any, ends here: it would otherwise stay usable
    # (its cookie copied, say) until it timed out, though the officer logged in anew.
    sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
    for old, s in list(sessions.items()):  # ended ones are otherwise dropped only when used
        if min(s.expires_at, s.ends_at) < now:
            del sessions[old]
    sessions[sid] = Session(
        principal, secrets.token_urlsafe(32), now + SESSION_SECONDS,
        token_hash(str(form.get("token", "")).strip()), now + SESSION_MAX_SECONDS)
    response = see(after_login(form.get("next")))
    response.set_cookie(SESSION_COOKIE, sid, path=CONSOLE_PREFIX, httponly=True,
                        samesite="Strict", secure=over_https(request))
    response.del_cookie(LOGIN_COOKIE, path=CONSOLE_PREFIX)
    raise response


async def post_logout(request: web.Request) -> web.StreamResponse:
    request.app[SESSIONS].pop(request.cookies.get(SESSION_COOKIE, ""), None)
    response = see(f"{CONSOLE_PREFIX}/login")
    response.del_cookie(SESSION_COOKIE, path=CONSOLE_PREFIX)
    raise response


def record_refused(request: web.Request, principal: Principal | None, status: int) -> None:
    """Chain an action refused before it was tried into the evidence log, as the API
    does every call: who tried what is the log's to show, not only what was done. Without
    a session (``None``) it is an ``anonymous`` entry, within the API's hourly budget."""
    request.app[WEB_CONTEXT].record_call(principal, request.method, request.path, status,
                                         certificate=request.match_info.get("number"),
                                         via="console")


def officer(request: web.Request) -> Principal | web.Response:
    """The session's principal if it may act, else the refusal (recorded) to answer."""
    session: Session = request[SESSION]
    principal = session.principal
    if not principal.may_act:
        record_refused(request, principal, 403)
        return page(request, "Refused", f"<p class=error>{h(principal.name)} is a "
                    f"{h(principal.role)}: only an officer may issue, confirm or cancel."
                    "</p>", status=403)
    return principal


def acting(request: web.Request) -> Principal | web.Response:
    """As ``officer``, and refused while the node distrusts its clock. The issue and
    confirm forms ask the clock themselves, so that they come back as typed."""
    principal = officer(request)
    if isinstance(principal, web.Response):
        return principal
    if not request.app[WEB_CONTEXT].clock_agrees():
        record_refused(request, principal, 503)
        return page(request, "Not now", f"<p class=error>{h(CLOCK_DISAGREES)}.</p>",
                    status=503)
    return principal


# -- tables ------------------------------------------------------------------------------


def badge(state: State | str) -> str:
    return f"<span class='badge s-{h(state)}'>{h(state)}</span>"


def in_path(number: str) -> str:
    """A certificate number as one path segment: numbers may hold '/' (SPEC: the pattern
    [A-Z]{2}[A-Z0-9/-]{1,38}), which a route's {number} matches only encoded."""
    return h(quote(number, safe=""))


def number_link(number: str) -> str:
    return f"<a href='{CONSOLE_PREFIX}/certificate/{in_path(number)}'>{h(number)}</a>"


def records_table(records: Sequence[Record], today: dt.date, *, table_id: str,
                  actions: Callable[[Record], str] | None = None) -> str:
    if not records:
        return "<p class=muted>None.</p>"
    rows = []
    for r in records:
        c = r.certificate
        overdue = is_overdue(r, today)
        note = record_note(r)
        if overdue:
            note = f"OVERDUE: {note}" if note else "OVERDUE"
        rows.append(
            f"<tr{' class=overdue' if overdue else ''} data-number='{h(r.number)}'>"
            f"<td>{number_link(r.number)}</td><td>{h(r.partner)}</td><td>{badge(r.state)}</td>"
            f"<td class=n>{carats(c.carats_hundredths)}</td><td class=n>{usd(c.usd_cents)}</td>"
            f"<td class=n>{c.parcels}</td><td>{c.issued_on}</td><td>{c.expires_on}</td>"
            f"<td>{h(note)}</td>{f'<td>{actions(r)}</td>' if actions else ''}</tr>")
    head = "".join(f"<th>{x}</th>" for x in ("number", "partner", "state", "carats", "US$",
                                              "parcels", "issued", "expires", "note"))
    return (f"<table id={table_id}><thead><tr>{head}{'<th></th>' if actions else ''}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def filter_box(table_id: str) -> str:
    return (f"<input data-filter='#{table_id}' placeholder='filter…' size=30 "
            f"aria-label='filter the table'>")


async def dead_letter_count(ctx: WebContext) -> int | None:
    """The dead-letter queue's depth, or None (shown as ?) while the broker cannot say."""
    if ctx.dead_letter_depth is None:
        return None
    try:
        return await ctx.dead_letter_depth()
    except Exception as exc:  # a console page must not fail because the broker is away
        log.warning("dead-letter depth unknown", error=str(exc))
        return None


def today_of(ctx: WebContext) -> dt.date:
    return day_of(ctx.node.clock())


# -- pages -------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    node, today = ctx.node, today_of(ctx)
    # Counted in SQL, and only open and expired loops read: not every record of years.
    count = node.store.count_records
    waiting = count(side=Side.IMPORT, states=[State.RECEIVED])
    open_out = count(side=Side.EXPORT, states=OPEN_STATES)
    overdue = [r for r in node.records(states=[*OPEN_STATES, State.EXPIRED])
               if is_overdue(r, today)]
    closed = count(states=[State.CONFIRMED])
    depth = await dead_letter_count(ctx)
    cards = "".join(f"<div class=card><b>{n}</b>{h(what)}</div>" for n, what in (
        (waiting, "incoming awaiting arrival"), (open_out, "outgoing open"),
        (len(overdue), "overdue loops"), (closed, "loops closed"),
        ("?" if depth is None else depth, "dead letters"),
        (node.registry.version, "registry version")))
    # What the node knows of itself and a monitor must see first: counted from outside,
    # a node that consumes nothing looks as healthy as one that does.
    alarms = "".join(f"<p class=error>Not ready: {h(why)}</p>" for why in ctx.not_ready())
    body = (f"{alarms}<div class=cards>{cards}</div><h2>Overdue loops</h2>"
            + records_table(overdue, today, table_id="overdue"))
    return page(request, f"{node.me} · {node.config.authority}", body, active="")


#: Closed loops a page lists, the newest: after some years a node holds tens of thousands,
#: and a page of them all would take seconds to make and be of no use to read.
CLOSED_SHOWN = 200


def latest(node: Node, side: Side, states: list[State]) -> tuple[list[Record], str]:
    """The newest CLOSED_SHOWN records of ``side`` in ``states``, and a note when there
    are more (where to find them). One more is read to know, not all of them counted
    (a count at a hub's size took longer than the page)."""
    shown = node.records(side=side, states=states, last=CLOSED_SHOWN + 1)
    if len(shown) <= CLOSED_SHOWN:
        return shown, ""
    return shown[1:], (f"<p class=muted>The newest {CLOSED_SHOWN} only; for the others, "
                       "<code>kpnode list</code> or <code>GET /api/v1/certificates</code>."
                       "</p>")


@dataclass(slots=True)
class Kept:
    """A confirmation that was refused, shown again as the officer entered it."""

    number: str
    values: Mapping[str, str]
    problems: Sequence[str]


#: the confirm form's fields besides one carats and one US$ per line
CONFIRM_FIELDS = ("parcels", "received_on", "remarks")


async def incoming(request: web.Request) -> web.Response:
    return incoming_page(request)


def incoming_page(request: web.Request, kept: Kept | None = None,
                  status: int = 200) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    session: Session = request[SESSION]
    today = today_of(ctx)
    waiting = ctx.node.records(side=Side.IMPORT, states=[State.RECEIVED])
    # Expired imports are loops to chase: all listed, ahead of the newest closed ones.
    expired = ctx.node.records(side=Side.IMPORT, states=[State.EXPIRED])
    closed, more = latest(ctx.node, Side.IMPORT,
                          [s for s in State if s not in (State.RECEIVED, State.EXPIRED)])
    others = expired + closed

    def confirm_form(r: Record) -> str:
        if not session.principal.may_act:
            return ""
        c = r.certificate
        v = {**{f"carats{i}": carats(line.carats_hundredths).replace(",", "")
                for i, line in enumerate(c.lines)},
             **{f"usd{i}": usd(line.usd_cents).replace(",", "") for i, line in enumerate(c.lines)},
             "parcels": str(c.parcels), "received_on": today.isoformat(), "remarks": ""}
        again = False
        if kept is not None and kept.number == r.number:
            again = True
            v.update({k: x for k, x in kept.values.items() if k in v})
        lines = "".join(
            f"<div>{h(line.hs_code)}: <label>carats <input name=carats{i} size=10 "
            f"value='{h(v[f'carats{i}'])}'></label>"
            f"<label>US$ <input name=usd{i} size=12 "
            f"value='{h(v[f'usd{i}'])}'></label></div>"
            for i, line in enumerate(c.lines))
        return (f"<form method=post action='{CONSOLE_PREFIX}/incoming/{in_path(r.number)}/confirm' "
                f"class=confirm>{csrf_field(session)}<button>Confirm arrival</button>"
                f"<details{' open' if again else ''}><summary>arrived differently…</summary>"
                f"<small>0 carats and US$ 0 for a line that did not arrive</small>"
                f"{lines}<label>parcels <input name=parcels size=4 value='{h(v['parcels'])}'>"
                f"</label><label>received on <input type=date name=received_on "
                f"value='{h(v['received_on'])}'></label><label>remarks <input name=remarks "
                f"value='{h(v['remarks'])}'></label></details></form>")
    error = ""
    if kept is not None:
        error = (f"<div class=error><b>Confirming {h(kept.number)} was refused; nothing was "
                 "signed. Correct the form below and confirm again:</b><ul>"
                 + "".join(f"<li>{h(p)}</li>" for p in kept.problems) + "</ul></div>")
    body = (f"{error}<h2>Awaiting arrival</h2>{filter_box('waiting')}"
            + records_table(waiting, today, table_id="waiting", actions=confirm_form)
            + "<h2>Other imports</h2>" + filter_box("imports")
            + records_table(others, today, table_id="imports") + more)
    return page(request, "Incoming certificates", body, active="incoming", status=status)


async def confirm_import(request: web.Request) -> web.StreamResponse:
    principal = officer(request)
    if isinstance(principal, web.Response):
        return principal
    ctx = request.app[WEB_CONTEXT]
    number = request.match_info["number"]
    form = await read_form(request)
    record = ctx.node.store.get(Side.IMPORT, number)
    problems: list[str] = []
    lines: list[Line] = []
    parcels: int | None = None
    received_on: dt.date | None = None
    if record is not None:
        for i, line in enumerate(record.certificate.lines):
            try:
                lines.append(Line(
                    hs_code=line.hs_code,
                    carats_hundredths=parse_amount(typed_or(form, f"carats{i}", carats(
                        line.carats_hundredths)), "carats", zero=True),
                    usd_cents=parse_amount(typed_or(form, f"usd{i}", usd(line.usd_cents)),
                                           "US$", zero=True)))
            except ValueError as exc:
                problems.append(f"{line.hs_code}: {exc}")
        # Each checked and named apart: one message for both blamed the parcels for a
        # date the calendar lacks (2026-02-30), and left a second mistake for next time.
        try:
            parcels = parse_whole_number(typed_or(form, "parcels",
                                                  str(record.certificate.parcels)).strip())
        except ValueError as exc:
            problems.append(f"parcels: {exc}")
        try:
            received_on = (parse_date(str(form["received_on"]).strip())
                           if form.get("received_on") else None)
        except ValueError as exc:
            problems.append(f"received on: {exc}")
    status = 400
    if not ctx.clock_agrees():  # a refusal as any other: the form comes back as typed
        problems.append(f"{CLOCK_DISAGREES}.")
        status = 503
    elif not problems:
        try:
            ctx.node.confirm(number, lines=tuple(lines) or None, parcels=parcels,
                             received_on=received_on, remarks=str(form.get("remarks", "")))
            status = 303
        except CommandRefused as exc:
            problems = [f"{p['path']}: {p['message']} [{p['reason']}]".lstrip(": ")
                        for p in refusal_problems(exc.refusal)]
            status = refusal_status(exc.refusal)
    ctx.record_call(principal, "POST", request.path, status, certificate=number,
                    via="console")
    if status == 303:
        raise see(f"{CONSOLE_PREFIX}/incoming?flash=confirmed&n={quote(number, safe='')}")
    if record is not None and record.state is State.RECEIVED:
        # still awaiting confirmation: the form again, as the officer filled it in
        entered = (*CONFIRM_FIELDS, *(f"{x}{i}" for x in ("carats", "usd")
                                      for i in range(len(record.certificate.lines))))
        values = {k: str(form.get(k, "")) for k in entered if k in form}
        return incoming_page(request, Kept(number, values, problems), status)
    return refused_page(request, f"Confirming {number} was refused", problems, status,
                        back="incoming")


def typed_or(form: Mapping[str, Any], name: str, declared: str) -> str:
    """A confirm form's field as typed, or ``declared`` when the form has no such field
    (a client posting none means as declared, as the API's empty body). A field the
    officer emptied stays empty, and is refused: taken as declared, a line cleared as
    'did not arrive' would be signed as having arrived in full."""
    return str(form[name]) if name in form else declared


def refused_page(request: web.Request, title: str, problems: Iterable[str],
                 status: int, *, back: str) -> web.Response:
    # a plain link: the console's Content-Security-Policy blocks javascript: URLs
    items = "".join(f"<li>{h(p)}</li>" for p in problems)
    return page(request, title, f"<div class=error><ul>{items}</ul></div>"
                f"<p><a href='{CONSOLE_PREFIX}/{back}'>back</a></p>", status=status)


async def outgoing(request: web.Request) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    session: Session = request[SESSION]
    today = today_of(ctx)
    open_states = [*OPEN_STATES, State.EXPIRED]
    records = ctx.node.records(side=Side.EXPORT, states=open_states)
    closed, more = latest(ctx.node, Side.EXPORT, [s for s in State if s not in open_states])
    records += closed

    def cancel_form(r: Record) -> str:
        if not session.principal.may_act or r.state not in OPEN_STATES | {State.EXPIRED}:
            return ""
        return (f"<form method=post action='{CONSOLE_PREFIX}/outgoing/{in_path(r.number)}/cancel' "
                f"data-confirm='Cancel {h(r.number)}? The importer is told.'>"
                f"{csrf_field(session)}<input name=reason placeholder='reason' required "
                "size=14> <button class=danger>Cancel</button></form>")
    parts = [filter_box("outgoing-all")]
    order = (State.ISSUED, State.DELIVERED, State.EXPIRED, State.CONFIRMED, State.REJECTED,
             State.CANCELLED, State.REPLACED)
    counts = " · ".join(
        f"{badge(s)} {ctx.node.store.count_records(side=Side.EXPORT, states=[s])}"
        for s in order)
    parts.append(f"<p>{counts}</p>")
    ordered = sorted(records, key=lambda r: (order.index(r.state), r.number))
    parts.append(records_table(ordered, today, table_id="outgoing-all", actions=cancel_form))
    parts.append(more)
    return page(request, "Outgoing certificates", "".join(parts), active="outgoing")


async def cancel_export(request: web.Request) -> web.StreamResponse:
    principal = acting(request)
    if isinstance(principal, web.Response):
        return principal
    ctx = request.app[WEB_CONTEXT]
    number = request.match_info["number"]
    form = await read_form(request)
    try:
        ctx.node.cancel(number, str(form.get("reason", "")))
    except CommandRefused as exc:
        status = refusal_status(exc.refusal)
        ctx.record_call(principal, "POST", request.path, status, certificate=number,
                        via="console")
        return refused_page(request, f"Cancelling {number} was refused",
                            [str(exc.refusal)], status, back="outgoing")
    ctx.record_call(principal, "POST", request.path, 303, certificate=number, via="console")
    raise see(f"{CONSOLE_PREFIX}/outgoing?flash=cancelled&n={quote(number, safe='')}")


ISSUE_FIELDS = ("number", "destination", "origins", "exporter_name", "exporter_address",
                "importer_name", "importer_address", "parcels", "issued_on", "expires_on",
                "remarks")


def issue_form(request: web.Request, values: Mapping[str, str], problems: Sequence[str]) -> str:
    ctx = request.app[WEB_CONTEXT]
    session: Session = request[SESSION]
    today = today_of(ctx)
    v = {"number": f"{ctx.node.me}-{today.year}-", "origins": ctx.node.me,
         "parcels": "1", "issued_on": today.isoformat(),
         "expires_on": (today + dt.timedelta(days=60)).isoformat(), **values}
    partners = [p for p in ctx.node.registry.update.participants if p.code != ctx.node.me]
    options = "".join(f"<option value='{h(p.code)}'"
                      f"{' selected' if v.get('destination') == p.code else ''}>"
                      f"{h(p.code)} · {h(p.name)} ({h(p.status)})</option>" for p in partners)

    def field(name: str, label: str, size: int = 30, kind: str = "text") -> str:
        return (f"<label>{h(label)} <input type={kind} name={name} size={size} "
                f"value='{h(v.get(name, ''))}'></label>")
    lines = "".join(
        f"<div><label>HS <select name=hs{i}><option value=''>—</option>"
        + "".join(f"<option{' selected' if v.get(f'hs{i}') == code else ''}>{code}</option>"
                  for code in sorted(HS_CODES))
        + f"</select></label>{field(f'carats{i}', 'carats', 12)}"
        f"{field(f'usd{i}', 'US$', 14)}</div>" for i in range(3))
    error = ""
    if problems:
        error = ("<div class=error><b>Not issued:</b><ul>"
                 + "".join(f"<li>{h(p)}</li>" for p in problems) + "</ul></div>")
    return (f"{error}<form method=post action='{CONSOLE_PREFIX}/issue' id=issue>"
            f"{csrf_field(session)}<fieldset><legend>Certificate</legend>"
            f"{field('number', 'number', 20)}<label>importing Participant "
            f"<select name=destination>{options}</select></label>"
            f"{field('origins', 'origin(s), comma-separated', 12)}"
            f"{field('parcels', 'parcels', 4)}{field('issued_on', 'issued', 12, 'date')}"
            f"{field('expires_on', 'expires', 12, 'date')}</fieldset>"
            f"<fieldset><legend>Exporter and importer</legend>"
            f"<div>{field('exporter_name', 'exporter')}"
            f"{field('exporter_address', 'address', 40)}</div>"
            f"<div>{field('importer_name', 'importer')}"
            f"{field('importer_address', 'address', 40)}</div></fieldset>"
            f"<fieldset><legend>Goods (carats and US$ with up to two decimals)</legend>{lines}"
            f"</fieldset>{field('remarks', 'remarks', 60)}"
            "<p><button>Sign and send</button></p></form>")


async def get_issue(request: web.Request) -> web.Response:
    principal = request[SESSION].principal
    if not principal.may_act:  # as the other pages, no form the role may not send
        return page(request, "Issue a certificate", f"<p class=muted>{h(principal.name)} is "
                    f"a {h(principal.role)}: only an officer may issue certificates.</p>",
                    active="issue")
    return page(request, "Issue a certificate", issue_form(request, {}, []), active="issue")


async def post_issue(request: web.Request) -> web.StreamResponse:
    principal = officer(request)
    if isinstance(principal, web.Response):
        return principal
    ctx = request.app[WEB_CONTEXT]
    form = await read_form(request)
    values = {k: str(form.get(k, "")).strip() for k in
              (*ISSUE_FIELDS, *(f"{x}{i}" for x in ("hs", "carats", "usd") for i in range(3)))}
    problems: list[str] = []
    lines = []
    for i in range(3):
        if not values[f"hs{i}"]:
            # A line with amounts but no HS code is a slip, not an empty line: skipped,
            # the certificate would be signed without goods the officer typed in.
            if values[f"carats{i}"] or values[f"usd{i}"]:
                problems.append(f"line {i + 1}: choose its HS code, or clear its carats "
                                "and US$")
            continue
        try:
            lines.append({"hs_code": values[f"hs{i}"],
                          "carats_hundredths": parse_amount(values[f"carats{i}"], "carats"),
                          "usd_cents": parse_amount(values[f"usd{i}"], "US$")})
        except ValueError as exc:
            problems.append(f"line {i + 1}: {exc}")
    parcels = 0
    try:
        parcels = parse_whole_number(values["parcels"].strip())
    except ValueError as exc:  # the validator would call the officer's text "a string"
        problems.append(f"parcels: {exc}")
    data = {
        "number": values["number"], "issuer": ctx.node.me,
        "issuing_authority": ctx.node.config.authority, "destination": values["destination"],
        "origins": [o.strip().upper() for o in values["origins"].split(",") if o.strip()],
        "exporter": {"name": values["exporter_name"], "address": values["exporter_address"]},
        "importer": {"name": values["importer_name"], "address": values["importer_address"]},
        "lines": lines, "parcels": parcels, "issued_on": values["issued_on"],
        "expires_on": values["expires_on"], "remarks": values["remarks"],
    }
    status = 400
    if not ctx.clock_agrees():  # a refusal as any other: the form comes back as typed
        problems.append(f"{CLOCK_DISAGREES}.")
        status = 503
    elif not problems:
        try:
            ctx.node.issue(validate_certificate(data))
            status = 303
        except ValidationError as exc:
            problems = [f"{p.path}: {p.message} [{p.reason}]" for p in exc.problems]
        except CommandRefused as exc:
            problems = [f"{p['message']} [{p['reason']}]"
                        for p in refusal_problems(exc.refusal)]
            status = refusal_status(exc.refusal)
    ctx.record_call(principal, "POST", request.path, status, certificate=values["number"],
                    via="console")
    if status == 303:
        raise see(f"{CONSOLE_PREFIX}/outgoing?flash=issued&n={quote(values['number'], safe='')}")
    return page(request, "Issue a certificate", issue_form(request, values, problems),
                active="issue", status=status)


async def certificate(request: web.Request) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    number = request.match_info["number"]
    records = ctx.node.find(number)
    if not records:
        return page(request, "Not found", f"<p>No certificate {h(number)} at this node.</p>",
                    status=404)
    today = today_of(ctx)
    parts = [records_table(records, today, table_id="records")]
    for r in records:
        c = r.certificate
        parts.append(
            f"<table><tr><th>exporter</th><td>{h(c.exporter.name)}, {h(c.exporter.address)}"
            f"</td></tr><tr><th>importer</th><td>{h(c.importer.name)}, "
            f"{h(c.importer.address)}</td></tr><tr><th>origins</th>"
            f"<td>{h(', '.join(c.origins))}</td></tr><tr><th>lines</th><td>"
            + "<br>".join(f"{h(x.hs_code)}: {carats(x.carats_hundredths)} ct, "
                          f"US$ {usd(x.usd_cents)}" for x in c.lines)
            + "</td></tr>"
            + "".join(f"<tr class=overdue><th>discrepancy</th><td>{h(d.field)}: declared "
                      f"{h(d.declared)}, received {h(d.received)}</td></tr>"
                      for d in r.discrepancies)
            + (f"<tr><th>note</th><td>{h(r.rejection_text)}</td></tr>"
               if r.rejection_text else "")
            + (f"<tr><th>remarks</th><td>{h(c.remarks)}</td></tr>" if c.remarks else "")
            + (f"<tr><th>received</th><td>{h(r.confirmation.received_on.isoformat())}"
               + (f"; the importer's remarks: {h(r.confirmation.remarks)}"
                  if r.confirmation.remarks else "") + "</td></tr>"
               if r.confirmation is not None else "")
            + "</table>")
    history = history_json(ctx.node.store, number, records)
    rows = "".join(f"<tr><td>{x['seq']}</td><td>{h(x['direction'])}</td><td>{h(x['kind'])}"
                   f"</td><td>{h(x['from'])} → {h(x['to'])}</td><td><code>"
                   f"{h(x['message_id'])}</code></td><td><code>{h(x['frame_sha256'][:16])}"
                   "</code></td></tr>" for x in history)
    parts.append("<h2>Signed history</h2><table id=history><thead><tr><th>#</th><th>dir</th>"
                 "<th>kind</th><th>from → to</th><th>message id</th><th>frame sha256</th>"
                 f"</tr></thead><tbody>{rows}</tbody></table>")
    return page(request, f"Certificate {number}", "".join(parts))


async def dead_letters(request: web.Request) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    depth = await dead_letter_count(ctx)
    refused = ctx.node.store.refused_messages(200)
    rows = "".join(f"<tr><td>{dt.datetime.fromtimestamp(at / 1000, dt.UTC):%Y-%m-%d %H:%M:%S}"
                   " UTC</td>"
                   f"<td>{h(sender)}</td><td>{h(kind)}</td><td><code>{h(mid)}</code></td>"
                   f"<td>{h(reason or '')}</td><td>"
                   + (f"<code>{h(answer)}</code>" if answer else "<span class=muted>none"
                      "</span>") + "</td></tr>"
                   for at, sender, kind, mid, reason, answer in refused)
    body = (f"<div class=cards><div class=card><b>{'?' if depth is None else depth}</b>"
            "messages in the broker's dead-letter queue</div></div>"
            "<p class=muted>Messages that failed to parse, verify or validate are copied to "
            "the dead-letter queue with the reason. Below: the authentic messages this node "
            "refused, and the signed rejection that answered each (none to a rejection, a "
            "pong or a registry update, nor while no key could sign).</p>"
            "<table id=refused><thead><tr><th>received</th><th>from</th><th>kind</th>"
            "<th>message id</th><th>reason</th><th>answered by</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
    return page(request, "Dead letters", body, active="dead-letters")


async def partners(request: web.Request) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    registry = ctx.node.registry
    counts: dict[str, dict[str, int]] = {}
    open_states = {str(s) for s in OPEN_STATES}
    for (partner, _, state), n in ctx.node.store.partner_counts().items():
        entry = counts.setdefault(partner, {"open": 0, "expired": 0, "ended": 0})
        # an expired loop is neither open nor ended: nobody answered it; "ended" and not
        # "closed", which the overview keeps for confirmed loops
        entry["open" if state in open_states else "expired" if state == State.EXPIRED
              else "ended"] += n
    rows = []
    for p in registry.update.participants:
        authorities = "<br>".join(
            f"{h(a.id)} · {h(a.name)} · keys "
            + ", ".join(f"<code>{k.public_key.hex()[:16]}</code>" for k in a.keys)
            for a in p.authorities) or "<span class=muted>no node</span>"
        c = counts.get(p.code, {"open": 0, "expired": 0, "ended": 0})
        rows.append(f"<tr><td>{h(p.code)}</td><td>{h(p.name)}</td><td>{badge(p.status)}</td>"
                    f"<td>{authorities}</td><td class=n>{c['open']}</td>"
                    f"<td class=n>{c['expired']}</td><td class=n>{c['ended']}</td></tr>")
    embargo = ", ".join(registry.update.embargoed_origins) or "none"
    body = (f"<p>Registry version <b>{registry.version}</b>, signed by the KP Chair. "
            f"Embargoed origins: {h(embargo)}.</p>{filter_box('partners')}"
            "<table id=partners><thead><tr><th>code</th><th>name</th><th>status</th>"
            "<th>authorities</th><th>open loops</th><th>expired</th>"
            "<th title='confirmed, cancelled, replaced or rejected'>ended</th></tr>"
            "</thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    return page(request, "Partners and registry", body, active="partners")


def bar_chart(figures: Mapping[str, Any]) -> str:
    """Exports and imports in US$ per partner, as inline SVG."""
    by_partner: dict[str, list[int]] = {}
    for row in figures.get("trade", []):
        if row["partner"] != ALL and row["hs_code"] == ALL:  # one total per partner
            i = 0 if row["flow"] == "exports" else 1
            by_partner.setdefault(row["partner"], [0, 0])[i] += int(row["usd_cents"])
    if not by_partner:
        return "<p class=muted>No trade this quarter yet.</p>"
    top = max(max(v) for v in by_partner.values()) or 1
    group, bar, height, left = 70, 24, 180, 60
    width = max(320, left + group * len(by_partner) + 20)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 60}' "
             f"role=img aria-label='US$ value per partner' id=chart>"]
    for tick in range(5):
        y = 10 + height - height * tick / 4
        parts.append(f"<line x1='{left}' x2='{width - 10}' y1='{y:.0f}' y2='{y:.0f}' "
                     "stroke='#dde3ea'/><text x='{0}' y='{1:.0f}' font-size='10' "
                     "text-anchor='end'>{2}</text>".format(
                         left - 4, y + 3, usd(top * tick // 4).split('.')[0]))
    for n, (partner, values) in enumerate(sorted(by_partner.items())):
        x = left + 10 + n * group
        for i, (value, colour) in enumerate(zip(values, ("#17324d", "#f5b942"), strict=True)):
            bh = height * value / top
            parts.append(f"<rect x='{x + i * bar}' y='{10 + height - bh:.1f}' width='{bar - 2}' "
                         f"height='{bh:.1f}' fill='{colour}'><title>{h(partner)} "
                         f"{'exports' if i == 0 else 'imports'}: US$ {usd(value)}</title></rect>")
        parts.append(f"<text x='{x + bar}' y='{height + 26}' font-size='12' "
                     f"text-anchor='middle'>{h(partner)}</text>")
    parts.append(f"<rect x='{left}' y='{height + 38}' width='12' height='12' fill='#17324d'/>"
                 f"<text x='{left + 16}' y='{height + 48}' font-size='12'>exports</text>"
                 f"<rect x='{left + 90}' y='{height + 38}' width='12' height='12' "
                 f"fill='#f5b942'/><text x='{left + 106}' y='{height + 48}' "
                 "font-size='12'>imports (US$)</text></svg>")
    return "".join(parts)


async def statistics(request: web.Request) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    try:
        quarter = Quarter.parse(request.query["quarter"]) if "quarter" in request.query \
            else quarter_of(today_of(ctx))
    except ValueError as exc:
        return page(request, "Statistics", f"<p class=error>{h(exc)}</p>", status=400)
    figures = await ctx.figures(quarter)
    tables = []
    for key in ("exports", "imports"):
        rows = "".join(f"<tr{' class=total' if ALL in (x['partner'], x['hs_code']) else ''}>"
                       f"<td>{h(x['partner'])}</td><td>{h(x['hs_code'])}</td>"
                       f"<td class=n>{x['certificates']}</td>"
                       f"<td class=n>{carats(x['carats_hundredths'])}</td>"
                       f"<td class=n>{usd(x['usd_cents'])}</td></tr>"
                       for x in figures.get("trade", []) if x["flow"] == key)
        tables.append(f"<h2>{key.capitalize()}</h2><table id={key}><thead><tr><th>partner</th>"
                      "<th>HS code</th><th>certificates</th><th>carats</th><th>US$</th></tr>"
                      f"</thead><tbody>{rows}</tbody></table>")
    body = (f"<form method=get><label>Quarter <input name=quarter value='{quarter}' size=8>"
            f"</label> <button>Show</button></form>{bar_chart(figures)}{''.join(tables)}")
    return page(request, f"Statistics {quarter}", body, active="statistics")


def console_app(context: WebContext) -> web.Application:
    """The console as an application to mount with ``app.add_subapp(CONSOLE_PREFIX, ...)``."""
    app = web.Application(middlewares=[console_middleware])
    app[WEB_CONTEXT] = context
    app[SESSIONS] = {}
    app.router.add_get("/login", get_login)
    app.router.add_post("/login", post_login)
    app.router.add_post("/logout", post_logout)
    app.router.add_get("/", overview)
    app.router.add_get("/incoming", incoming)
    app.router.add_post("/incoming/{number}/confirm", confirm_import)
    app.router.add_get("/outgoing", outgoing)
    app.router.add_post("/outgoing/{number}/cancel", cancel_export)
    app.router.add_get("/issue", get_issue)
    app.router.add_post("/issue", post_issue)
    app.router.add_get("/certificate/{number}", certificate)
    app.router.add_get("/dead-letters", dead_letters)
    app.router.add_get("/partners", partners)
    app.router.add_get("/statistics", statistics)
    return app
