"""The node's HTTP API for national systems, ``/api/v1`` (see ``node/openapi.py``).

A thin shell over :class:`node.service.Node`: each handler parses the request, calls the
same Node method ``kpnode`` calls, and answers with the same JSON (``node/views.py``).
Bearer tokens (``node/tokens.py``) carry a role: *officer* may issue, replace, cancel and
confirm; *monitor* may only read. Every call is chained into the evidence log with who
made it (calls without a working token only up to a budget, ``AnonymousBudget``). Calls
that create something take an ``Idempotency-Key``: a retry with the same key gets the
first answer again, byte for byte, and never acts twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from datetime import date
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from node.httpserver import IDLE_SECONDS
from node.jsontext import JsonTextError, parse_json
from node.machine import OPEN_STATES, Record, Side, State, day_of, is_overdue
from node.openapi import openapi_document
from node.service import CommandRefused, Node, OnCommit
from node.stats import Quarter
from node.store import StoreError, UnreadableRecord
from node.tokens import Principal, TokenError, Tokens
from node.views import (
    history_json,
    parse_date,
    parse_whole_number,
    partner_filter,
    record_json,
)
from node.webcontext import (
    CLOCK_DISAGREES,
    WEB_CONTEXT,
    StatisticsProvider,
    StatusProvider,
    WebContext,
    quarter_of,
    refusal_problems,
    refusal_status,
)
from protocol import Certificate, Line, Problem, Reason, ValidationError, validate_certificate

log = structlog.get_logger("kpx.api")

API_PREFIX = "/api/v1"
PRINCIPAL = web.RequestKey("kpx_principal", Principal)
#: the bearer token a call came with, to ask again once its body has arrived
TOKEN = web.RequestKey("kpx_token", str)
#: the certificate a call is about, for its evidence-log entry
CERTIFICATE = web.RequestKey("kpx_certificate", str)
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
MAX_LIST = 5000


#: Retry-After of a 503 for a database or tokens file that cannot be used: the running
#: node retries its own store from 0.5 s doubling to 10 s, so a client need not come
#: back sooner
RETRY_AFTER_SECONDS = 10


class ApiError(Exception):
    """An answer other than success: status, reason code, message, problems."""

    def __init__(self, status: int, reason: str, message: str,
                 problems: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None, *, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.problems = problems or []
        self.headers = headers or {}
        #: end the connection after this answer: the request left it unusable
        self.close = close

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.reason, "message": self.message}
        if self.problems:
            body["problems"] = self.problems
        response = web.json_response(body, status=self.status, headers=self.headers)
        if self.close:
            response.force_close()
        return response


def dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True)


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)


# -- middleware: errors as JSON, authentication, the evidence record ------------------------


@web.middleware
async def no_store(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer, errors too, kept out of caches: certificates, partners and volumes
    are not for a proxy's or a browser's disk."""
    response = await handler(request)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[WEB_CONTEXT]
    try:
        response = await _authenticated(request, handler, ctx.tokens)
    except ApiError as exc:
        response = exc.response()
    except ValidationError as exc:
        response = ApiError(400, str(exc.reason), exc.text,
                            [p.to_wire() for p in exc.problems]).response()
    except CommandRefused as exc:
        refusal = exc.refusal
        response = ApiError(refusal_status(refusal), refusal.reason, refusal.text,
                            refusal_problems(refusal)).response()
    except web.HTTPException as exc:  # the router's 404 and 405
        reason = {404: "request.not_found", 405: "request.method_not_allowed"}.get(
            exc.status, "request.refused")
        response = ApiError(exc.status, reason, exc.reason,
                            headers={k: v for k, v in exc.headers.items()
                                     if k == "Allow"}).response()
    except UnreadableRecord as exc:  # retrying will not help: the operator must restore
        log.error("record unreadable", error=str(exc), path=request.path)
        response = ApiError(500, "node.record_unreadable", str(exc)).response()
    except ConnectionResetError:
        if request.transport is not None and not request.transport.is_closing():
            response = _failed(request)  # another connection's (the broker's): the node's
        else:  # the client went away mid-request: not the node's fault
            log.info("client closed the connection", method=request.method,
                     path=request.path)
            response = ApiError(499, "request.aborted", "the client closed the connection"
                                ).response()
    except StoreError as exc:
        log.error("store failed", error=str(exc), path=request.path)
        return ApiError(503, "node.store_unavailable", "the node's database cannot be used "
                        "now; retry later (with the same Idempotency-Key)",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)}).response()
    except Exception:
        response = _failed(request)
    if request.path != f"{API_PREFIX}/openapi.json":
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            key = ascii(key)[:100]  # as sent, but only ASCII: it may not even be UTF-8
        ctx.record_call(request.get(PRINCIPAL), request.method, request.path_qs,
                        response.status, certificate=request.get(CERTIFICATE),
                        idempotency_key=key)
    return response


def _failed(request: web.Request) -> web.Response:
    """The answer to a call that failed in the node; call it while handling the error."""
    log.exception("API call failed", method=request.method, path=request.path)
    return ApiError(500, "node.processing_failed", "internal error; the node's log has the "
                    "details").response()


async def _authenticated(request: web.Request, handler: Handler,
                         tokens: Tokens) -> web.StreamResponse:
    if request.path == f"{API_PREFIX}/openapi.json":
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "auth.missing_token", "send 'Authorization: Bearer <token>' "
                       "(kpnode token add NAME --role officer|monitor)",
                       headers={"WWW-Authenticate": 'Bearer realm="kpx"'})
    request[PRINCIPAL] = _holder(tokens, token.strip())
    request[TOKEN] = token.strip()
    return await handler(request)


def _holder(tokens: Tokens, token: str) -> Principal:
    """Who holds ``token`` now, or the 401 (or 503) that says why no one can be named."""
    try:
        principal = tokens.authenticate(token)
    except TokenError as exc:
        log.error("tokens file unreadable", error=str(exc))
        raise ApiError(503, "node.tokens_unavailable", "the node cannot read its tokens "
                       "file", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    if principal is None:
        raise _bad_token()
    return principal


def _bad_token() -> ApiError:
    return ApiError(401, "auth.bad_token", "unknown or revoked token",
                    headers={"WWW-Authenticate": 'Bearer realm="kpx", error="invalid_token"'})


def still_officer(request: web.Request) -> None:
    """Ask again, once the body has arrived, whether the call's token may act: a body may
    take up to IDLE_SECONDS to arrive, and a token revoked (or made a monitor's) meanwhile
    must not issue, replace, cancel or confirm on the strength of the check made before."""
    principal = _holder(request.app[WEB_CONTEXT].tokens, request[TOKEN])
    if principal.name != request[PRINCIPAL].name:  # only a hand-edited tokens file
        raise _bad_token()
    request[PRINCIPAL] = principal
    officer(request)


def officer(request: web.Request) -> Principal:
    principal: Principal = request[PRINCIPAL]
    if not principal.may_act:
        raise ApiError(403, "auth.forbidden", f"{principal.name} is a {principal.role}: "
                       "only an officer may issue, replace, cancel or confirm")
    return principal


# -- request bodies ---------------------------------------------------------------------


async def read_body(request: web.Request) -> bytes:
    """The request's body, or a 408 once it has taken IDLE_SECONDS: the server's idle limit
    covers headers only, and a body that never ends (a crashed client, a dropped NAT entry,
    or on purpose) would hold one of the node's few connection slots for good."""
    try:
        async with asyncio.timeout(IDLE_SECONDS):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, "request.timeout", f"the body did not arrive within "
                       f"{IDLE_SECONDS:g} s") from None
    except web.RequestPayloadError:
        # A body its Content-Encoding does not describe (gzip that is not): the client's
        # mistake, which a 500 blamed on the node, and a retry with the same bytes met again.
        # The rest of the body cannot be read past, so the connection ends with the answer
        # (kept open, aiohttp dropped it under the client's next request).
        raise ApiError(400, "request.malformed", "the body could not be decoded as its "
                       "Content-Encoding says", close=True) from None


async def json_body(request: web.Request) -> Any:
    # JSON is UTF-8 (RFC 8259): the bytes are decoded as such, whatever charset the
    # Content-Type names (an unknown one used to be a 500).
    return parse_json_bytes(await read_body(request))


def json_object(data: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(400, "request.malformed", "the body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationError(tuple(Problem(k, Reason.UNKNOWN_FIELD, "unknown field")
                                    for k in unknown), "request is not valid")
    return data


def text_field(data: dict[str, Any], name: str, *, required: bool) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValidationError((Problem(name, Reason.REQUIRED if value is None else
                                       Reason.WRONG_TYPE, "a non-empty string is required"),),
                              "request is not valid")
    return value


def confirm_arguments(data: dict[str, Any]) -> dict[str, Any]:
    """What arrived: ``lines``, ``parcels``, ``received_on``, ``remarks``; absent fields
    mean 'as declared' (and today)."""
    problems: list[Problem] = []
    lines: tuple[Line, ...] | None = None
    if data.get("lines") is not None:
        raw = data["lines"]
        if not isinstance(raw, list) or not raw:
            problems.append(Problem("lines", Reason.WRONG_TYPE, "a non-empty list"))
        else:
            built = []
            for i, item in enumerate(raw):
                fields = ("hs_code", "carats_hundredths", "usd_cents")
                if not isinstance(item, dict) or set(item) != set(fields):
                    problems.append(Problem(f"lines[{i}]", Reason.WRONG_TYPE,
                                            "an object with hs_code, carats_hundredths, "
                                            "usd_cents"))
                    continue
                bad = [f for f, t in zip(fields, (str, int, int), strict=True)
                       if not isinstance(item[f], t) or isinstance(item[f], bool)]
                problems.extend(Problem(f"lines[{i}].{f}", Reason.WRONG_TYPE,
                                        "must be a string" if f == "hs_code"
                                        else "must be an integer") for f in bad)
                if not bad:
                    built.append(Line(hs_code=item["hs_code"],
                                      carats_hundredths=item["carats_hundredths"],
                                      usd_cents=item["usd_cents"]))
            lines = tuple(built)
    parcels = data.get("parcels")
    if parcels is not None and (not isinstance(parcels, int) or isinstance(parcels, bool)):
        problems.append(Problem("parcels", Reason.WRONG_TYPE, "an integer"))
    received_on: date | None = None
    if data.get("received_on") is not None:
        value = data["received_on"]
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            received_on = parse_date(value)
        except ValueError:
            problems.append(Problem("received_on", Reason.BAD_DATE, "a date YYYY-MM-DD"))
    remarks = data.get("remarks")
    if remarks is None:
        remarks = ""
    elif not isinstance(remarks, str):  # false, 0, [] are not 'no remarks'
        problems.append(Problem("remarks", Reason.WRONG_TYPE, "a string"))
    if problems:
        raise ValidationError(tuple(problems), "request is not valid")
    return {"lines": lines, "parcels": parcels, "received_on": received_on,
            "remarks": remarks}


# -- idempotency ------------------------------------------------------------------------


#: what a command's handler gets to keep its answer: called inside the command's own
#: transaction, so the answer is stored if and only if the action happened
Remember = Callable[[web.Response], None]


def answered(status: int, command: Callable[[OnCommit], Record],
             remember: Remember | None) -> web.Response:
    """Run a Node command; its record as JSON with ``status``, remembered (when there is an
    Idempotency-Key) in the same transaction as the action."""
    made: list[web.Response] = []

    def on_commit(record: Record) -> None:
        made.append(ok(record_json(record), status))
        if remember is not None:
            remember(made[0])
    record = command(on_commit)
    return made[0] if made else ok(record_json(record), status)


async def idempotent(request: web.Request,
                     act: Callable[[bytes, Remember | None], web.Response]) -> web.Response:
    """Run ``act`` (given the raw body) once per Idempotency-Key; replay its success."""
    no_query(request)
    key = request.headers.get("Idempotency-Key")
    body = await read_body(request)
    still_officer(request)
    if key is None:
        clock_trusted(request)
        return act(body, None)
    if not IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "idempotency.bad_key", "Idempotency-Key: 1 to 255 visible "
                       "ASCII characters")
    principal: Principal = request[PRINCIPAL]
    fingerprint = hashlib.sha256(b"\n".join([request.method.encode(),
                                             request.path.encode(), same_json(body)])).digest()
    store = request.app[WEB_CONTEXT].node.store
    first = store.idempotent_answer(principal.name, key)
    if first is not None:
        seen, status, answer = first
        if seen != fingerprint:
            raise ApiError(422, "idempotency.key_reused", f"Idempotency-Key {key!r} was "
                           "used for a different request")
        return web.Response(body=answer, status=status, content_type="application/json",
                            charset="utf-8", headers={"Idempotent-Replayed": "true"})
    clock_trusted(request)
    clock = request.app[WEB_CONTEXT].node.clock

    def remember(response: web.Response) -> None:
        assert isinstance(response.body, bytes)
        store.remember_idempotent(principal.name, key, fingerprint, response.status,
                                  response.body, clock())
    return act(body, remember)


def no_query(request: web.Request) -> None:
    """Refuse a query string on a call that takes none: ignored, a POST's
    ``confirm?received_on=...`` signed a confirmation received today, for good, and a
    GET's ``?side=import`` looked like a filter that had been applied."""
    if problems := _query(request, ()):
        raise ValidationError(tuple(problems), "query is not valid")


def clock_trusted(request: web.Request) -> None:
    """Refuse a command (503) while the running node distrusts its wall clock; an answer
    already given under an Idempotency-Key is still replayed."""
    if not request.app[WEB_CONTEXT].clock_agrees():
        raise ApiError(503, "node.clock_disagrees", CLOCK_DISAGREES,
                       headers={"Retry-After": "60"})


def same_json(body: bytes) -> bytes:
    """A body as the idempotency check compares it: the same JSON however spaced or its keys
    ordered (a client may rebuild it for a retry); an empty body as ``{}``; anything that is
    not JSON as its bytes."""
    if not body.strip():
        return b"{}"
    try:
        value = parse_json(body)
    except JsonTextError:
        return body
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def parse_json_bytes(body: bytes) -> Any:
    try:
        return parse_json(body)
    except JsonTextError as exc:
        raise ApiError(400, "request.malformed", f"the body is {exc}") from None


# -- handlers ---------------------------------------------------------------------------


async def get_openapi(request: web.Request) -> web.Response:
    no_query(request)
    return ok(openapi_document())


async def post_validate(request: web.Request) -> web.Response:
    node = request.app[WEB_CONTEXT].node
    no_query(request)
    try:
        certificate = validate_certificate(await json_body(request))
    except ValidationError as exc:
        return ok({"valid": False, "number": None,
                   "problems": [p.to_wire() for p in exc.problems]})
    request[CERTIFICATE] = certificate.number
    refusal = node.check_issue(certificate)
    return ok({"valid": refusal is None, "number": certificate.number,
               "problems": [] if refusal is None else refusal_problems(refusal)})


async def post_issue(request: web.Request) -> web.Response:
    officer(request)
    node = request.app[WEB_CONTEXT].node

    def act(body: bytes, remember: Remember | None) -> web.Response:
        certificate = validate_certificate(parse_json_bytes(body))
        request[CERTIFICATE] = certificate.number
        return answered(201, lambda then: node.issue(certificate, on_commit=then), remember)
    return await idempotent(request, act)


async def post_replace(request: web.Request) -> web.Response:
    officer(request)
    node = request.app[WEB_CONTEXT].node
    number = request[CERTIFICATE] = request.match_info["number"]

    def act(body: bytes, remember: Remember | None) -> web.Response:
        data = json_object(parse_json_bytes(body), {"certificate", "reason"})
        reason = text_field(data, "reason", required=True)
        if "certificate" not in data:
            raise ValidationError((Problem("certificate", Reason.REQUIRED,
                                           "the new certificate"),), "request is not valid")
        try:
            certificate: Certificate = validate_certificate(data["certificate"])
        except ValidationError as exc:
            # Paths from the request body's root, as every other problem's: 'reason:
            # unknown field' for the certificate's own read as the request's reason.
            raise ValidationError(tuple(
                Problem(f"certificate.{p.path}" if p.path else "certificate", p.reason,
                        p.message) for p in exc.problems), exc.text) from None
        return answered(201, lambda then: node.replace(number, certificate, reason,
                                                       on_commit=then), remember)
    return await idempotent(request, act)


async def post_cancel(request: web.Request) -> web.Response:
    officer(request)
    node = request.app[WEB_CONTEXT].node
    number = request[CERTIFICATE] = request.match_info["number"]

    def act(body: bytes, remember: Remember | None) -> web.Response:
        data = json_object(parse_json_bytes(body), {"reason"})
        reason = text_field(data, "reason", required=True)
        return answered(200, lambda then: node.cancel(number, reason, on_commit=then),
                        remember)
    return await idempotent(request, act)


async def post_confirm(request: web.Request) -> web.Response:
    officer(request)
    node = request.app[WEB_CONTEXT].node
    number = request[CERTIFICATE] = request.match_info["number"]

    def act(body: bytes, remember: Remember | None) -> web.Response:
        data = json_object(parse_json_bytes(body) if body.strip() else {},
                           {"lines", "parcels", "received_on", "remarks"})
        arguments = confirm_arguments(data)
        return answered(200, lambda then: node.confirm(number, **arguments, on_commit=then),
                        remember)
    return await idempotent(request, act)


def _query(request: web.Request, single: tuple[str, ...],
           repeatable: tuple[str, ...] = ()) -> list[Problem]:
    """Problems with the query's names: one not known (a typo such as ``status=`` for
    ``state=`` would otherwise give the whole list, unfiltered) or given twice where only
    one value is taken."""
    problems = []
    known = (f"known: {', '.join((*single, *repeatable))}" if single or repeatable else
             "this call takes none" + (": its arguments go in the JSON body"
                                       if request.method == "POST" else ""))
    for name in dict.fromkeys(request.query):
        if name not in single and name not in repeatable:
            problems.append(Problem(name, Reason.UNKNOWN_FIELD,
                                    f"unknown query parameter; {known}"))
        elif name in single and len(request.query.getall(name)) > 1:
            problems.append(Problem(name, Reason.BAD_FORMAT, "given more than once"))
    return problems


async def get_certificates(request: web.Request) -> web.Response:
    node = request.app[WEB_CONTEXT].node
    query = request.query
    problems = _query(request, ("side", "partner", "overdue", "limit", "offset", "after"),
                      ("state",))
    side: Side | None = None
    if "side" in query:
        try:
            side = Side(query["side"])
        except ValueError:
            problems.append(Problem("side", Reason.BAD_FORMAT, "export or import"))
    states: list[State] = []
    for value in query.getall("state", []):
        for one in value.split(","):
            try:
                states.append(State(one))
            except ValueError:
                problems.append(Problem("state", Reason.BAD_FORMAT, f"unknown state {one!r}: "
                                        f"one of {', '.join(s.value for s in State)}"))
    overdue = query.get("overdue", "false")
    if overdue not in ("true", "false"):
        problems.append(Problem("overdue", Reason.BAD_FORMAT, "true or false"))
    limit = _int_query(query.get("limit", "1000"), "limit", 1, MAX_LIST, problems)
    offset = _int_query(query.get("offset", "0"), "offset", 0, 2**62, problems)
    after = (_int_query(query["after"], "after", 0, 2**62, problems)
             if "after" in query else None)
    if after is not None and ("offset" in query or overdue == "true"):
        problems.append(Problem("after", Reason.BAD_FORMAT, "not with offset or overdue"))
    partner: str | None = None
    if query.get("partner"):  # empty, as in a form's "any partner": no filter
        try:
            partner = partner_filter(query["partner"])
        except ValueError as exc:
            problems.append(Problem("partner", Reason.BAD_FORMAT, str(exc)))
    if problems:
        raise ValidationError(tuple(problems), "query is not valid")
    if after is not None:
        total = node.store.count_records(side=side, states=states, partner=partner)
        page, last = node.store.records_after(after, limit, side=side, states=states,
                                              partner=partner)
        return ok({"total": total, "after": after,
                   "next": str(last) if len(page) == limit else None,
                   "certificates": [record_json(r) for r in page]})
    if overdue == "true":
        # Only open and expired loops can be overdue: read those (a node's few in flight),
        # not every record of its years, and apply the one rule to them.
        chase = [s for s in (states or State) if s in OPEN_STATES or s is State.EXPIRED]
        today = day_of(node.clock())
        found = [r for r in node.records(side=side, states=chase, partner=partner)
                 if is_overdue(r, today)] if chase else []
        total, page = len(found), found[offset:offset + limit]
    else:
        total = node.store.count_records(side=side, states=states, partner=partner)
        page = node.records(side=side, states=states, partner=partner, limit=limit,
                            offset=offset)
    return ok({"total": total, "offset": offset,
               "certificates": [record_json(r) for r in page]})


def _int_query(text: str, name: str, low: int, high: int, problems: list[Problem]) -> int:
    try:
        value = parse_whole_number(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        problems.append(Problem(name, Reason.BAD_FORMAT, f"an integer from {low} to {high}"))
        return low
    return value


async def get_certificate(request: web.Request) -> web.Response:
    no_query(request)
    node = request.app[WEB_CONTEXT].node
    number = request[CERTIFICATE] = request.match_info["number"]
    records = node.find(number)
    if not records:
        raise ApiError(404, "certificate.unknown", f"no certificate {number} at this node")
    return ok({"records": [record_json(r) for r in records],
               "history": history_json(node.store, number, records, frames=True)})


async def get_statistics(request: web.Request) -> web.Response:
    ctx = request.app[WEB_CONTEXT]
    if problems := _query(request, ("quarter",)):
        raise ValidationError(tuple(problems), "query is not valid")
    text = request.query.get("quarter")
    try:
        quarter = (Quarter.parse(text) if text is not None
                   else quarter_of(day_of(ctx.node.clock())))
    except ValueError as exc:
        raise ValidationError((Problem("quarter", Reason.BAD_FORMAT, str(exc)),),
                              "query is not valid") from None
    return ok(dict(await ctx.figures(quarter)))


async def get_status(request: web.Request) -> web.Response:
    no_query(request)
    return ok(dict(await request.app[WEB_CONTEXT].status_document()))


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/openapi.json", get_openapi),
    ("POST", "/certificates/validate", post_validate),
    ("POST", "/certificates", post_issue),
    ("GET", "/certificates", get_certificates),
    ("GET", "/certificates/{number}", get_certificate),
    ("POST", "/certificates/{number}/replace", post_replace),
    ("POST", "/certificates/{number}/cancel", post_cancel),
    ("POST", "/certificates/{number}/confirm", post_confirm),
    ("GET", "/statistics", get_statistics),
    ("GET", "/status", get_status),
)


def api_app(node: Node, tokens: Tokens, *, status: StatusProvider | None = None,
            statistics: StatisticsProvider | None = None,
            context: WebContext | None = None) -> web.Application:
    """The API as an application to mount with ``app.add_subapp(API_PREFIX, ...)``."""
    app = web.Application(middlewares=[no_store, api_middleware], client_max_size=1 << 20)
    app[WEB_CONTEXT] = context or WebContext(node, tokens, status=status,
                                             statistics=statistics)
    for method, path, handler in ROUTES:
        if method == "GET":  # HEAD too (RFC 9110 9.3.2): monitoring probes use it
            app.router.add_get(path, handler)
        else:
            app.router.add_route(method, path, handler)
    return app
