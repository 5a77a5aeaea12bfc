"""The OpenAPI 3.1 description of ``/api/v1``, served at ``/api/v1/openapi.json``.

Kept as data beside the handlers (``node/api.py``); the tests check that every served route
is described here and every route described here is served, and that the document
validates as OpenAPI 3.1.
"""

from __future__ import annotations

import copy
from typing import Any

from node.machine import Side, State

VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    what = {
        400: "invalid request: every problem with its field path and reason code",
        401: "no token, or an unknown or revoked one",
        403: "the token's role may not do this (a monitor only reads)",
        404: "no such certificate at this node",
        409: "refused by the certificate's state (e.g. already confirmed, already issued)",
        422: "valid, but not allowed under the Scheme's rules (suspended partner, embargoed "
             "origin, expired) or an Idempotency-Key reused for a different request",
        408: "the body did not arrive within 15 s (request.timeout)",
        413: "the body is over 1 MiB (request.refused)",
        500: "the node failed (node.processing_failed); its log has the details. For an "
             "action, retry with the same Idempotency-Key: it acts only if it had not. "
             "node.record_unreadable: a record the call needs was changed outside kpx; "
             "retrying will not help until the operator restores it",
        503: "the node's database or tokens file cannot be used now (node.store_unavailable, "
             "node.tokens_unavailable), or, for an action, the running node distrusts its "
             "wall clock (node.clock_disagrees: see /readyz) or has no key that may sign now "
             "(key.revoked, key.not_valid_now, ...: see kpnode status); nothing was done: "
             "retry, with the same Idempotency-Key. A Retry-After header (seconds) comes "
             "with the first three, where waiting may be enough",
    }
    # Any call can meet a node that fails or whose database is unavailable.
    return {str(s): _json(_ref("Error"), what[s]) for s in sorted({*statuses, 500, 503})}


_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULL_STR = {"type": ["string", "null"]}
_NUMBER = {"name": "number", "in": "path", "required": True, "schema": _STR,
           "description": "certificate number, e.g. ZA-2026-0001; percent-encoded, so a "
                          "'/' in a number is sent as %2F"}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                           "pattern": "^[\\x21-\\x7e]{1,255}$"},
                "description": "retrying with the same key returns the first successful "
                               "answer (header Idempotent-Replayed: true) and never acts "
                               "twice; visible ASCII only, no spaces (else a 400, "
                               "idempotency.bad_key); the same JSON counts as the same "
                               "request, however spaced or ordered. Keys belong to the "
                               "token's name (a token replaced under the same name keeps "
                               "them); a refused call does not use its key up"}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "reason code, e.g. certificate.unknown"},
            "message": _STR,
            "problems": {"type": "array", "items": _ref("Problem")},
        },
    },
    "Problem": {
        "type": "object", "required": ["path", "reason", "message"],
        "properties": {"path": {"type": "string", "description": "e.g. lines[1].usd_cents"},
                       "reason": {"type": "string", "description": "e.g. field.not_positive"},
                       "message": _STR},
    },
    "Party": {"type": "object", "required": ["name", "address"], "additionalProperties": False,
              "properties": {"name": _STR, "address": _STR}},
    "Line": {
        "type": "object", "required": ["hs_code", "carats_hundredths", "usd_cents"],
        "additionalProperties": False,
        "properties": {"hs_code": {"type": "string", "enum": ["7102.10", "7102.21", "7102.31"]},
                       "carats_hundredths": _INT, "usd_cents": _INT},
    },
    "Certificate": {
        "type": "object",
        "description": "the certificate's wire form (protocol/SPEC.md): amounts are integers, "
                       "carats in hundredths, US$ in cents",
        "required": ["number", "issuer", "issuing_authority", "destination", "origins",
                     "exporter", "importer", "lines", "parcels", "issued_on", "expires_on",
                     "remarks"],
        "additionalProperties": False,
        "properties": {
            "number": _STR, "issuer": _STR, "issuing_authority": _STR, "destination": _STR,
            "origins": {"type": "array", "items": _STR}, "exporter": _ref("Party"),
            "importer": _ref("Party"), "lines": {"type": "array", "items": _ref("Line")},
            "parcels": _INT, "issued_on": {"type": "string", "format": "date"},
            "expires_on": {"type": "string", "format": "date"}, "remarks": _STR,
        },
    },
    "Record": {
        "type": "object",
        "description": "one certificate as this node holds it (the same JSON as "
                       "'kpnode show --json')",
        "required": ["side", "number", "partner", "state", "certificate"],
        "properties": {
            "side": {"type": "string", "enum": [s.value for s in Side]},
            "number": _STR, "partner": _STR,
            "state": {"type": "string", "enum": [s.value for s in State]},
            "issued_on": _STR, "expires_on": _STR, "carats_hundredths": _INT,
            "usd_cents": _INT, "parcels": _INT, "certificate_digest": _STR,
            "message_id": _STR, "updated_at": _INT, "rejection_reason": _NULL_STR,
            "rejection_text": _NULL_STR, "replaces": _NULL_STR, "replaced_by": _NULL_STR,
            "confirmation": {"type": ["object", "null"]},
            "discrepancies": {"type": "array", "items": {"type": "object"}},
            "certificate": _ref("Certificate"),
        },
    },
    "HistoryItem": {
        "type": "object",
        "properties": {"seq": _INT, "direction": {"type": "string", "enum": ["in", "out"]},
                       "kind": _STR, "from": _STR, "to": _STR, "message_id": _STR,
                       "in_reply_to": _NULL_STR, "created_at": _INT, "recorded_at": _INT,
                       "frame_sha256": _STR,
                       "frame_base64": {"type": "string",
                                        "description": "the signed frame, verbatim"},
                       "outbox": {
                           "type": ["object", "null"],
                           "description": "outgoing messages: whether the broker took it "
                                          "(published_at, null while it waits), the tries, "
                                          "the last error (e.g. unroutable: no inbox for "
                                          "BW) and the next try",
                           "properties": {"published_at": {"type": ["integer", "null"]},
                                          "attempts": _INT, "last_error": _NULL_STR,
                                          "next_attempt_at": {"type": ["integer", "null"]}}}},
    },
    "Validation": {
        "type": "object", "required": ["valid", "problems"],
        "properties": {"valid": {"type": "boolean"}, "number": _NULL_STR,
                       "problems": {"type": "array", "items": _ref("Problem")}},
    },
    "CancelRequest": {"type": "object", "required": ["reason"], "additionalProperties": False,
                      "properties": {"reason": _STR}},
    "ReplaceRequest": {
        "type": "object", "required": ["reason", "certificate"], "additionalProperties": False,
        "properties": {"reason": _STR, "certificate": _ref("Certificate")},
    },
    "ConfirmRequest": {
        "type": "object", "additionalProperties": False,
        "description": "what arrived; a field left out means 'as declared' (received today)",
        "properties": {"lines": {"type": "array", "items": _ref("Line"),
                                 "description": "every declared line as it arrived, "
                                 "carats_hundredths and usd_cents 0 for one that did "
                                 "not (left out of what is signed); a declared line "
                                 "left out is refused (400, path lines). Lines not "
                                 "declared may be added, as they arrived (0 and 0 "
                                 "only for a declared line)"},
                       "parcels": _INT,
                       "received_on": {"type": "string", "format": "date"},
                       "remarks": _STR},
    },
    "Figures": {
        "type": "object",
        "description": "one row of the trade table; partner or hs_code ALL in total rows",
        "properties": {"flow": {"type": "string", "enum": ["exports", "imports"]},
                       "partner": _STR, "hs_code": _STR, "certificates": _INT,
                       "carats_hundredths": _INT, "usd_cents": _INT},
    },
    "Statistics": {
        "type": "object", "required": ["quarter", "trade"],
        "description": "what 'kpnode stats --json' gives: the trade table, the mirror check "
                       "(declared against confirmed) and the valuation check",
        "properties": {"participant": _STR, "quarter": _STR,
                       "from": {"type": "string", "format": "date"},
                       "to": {"type": "string", "format": "date"},
                       "trade": {"type": "array", "items": _ref("Figures")},
                       "mirror": {"type": "array", "items": {"type": "object"}},
                       "disagreements": {"type": "array", "items": {"type": "object"}},
                       "valuation_threshold_percent": _STR,
                       "valuation_flags": {"type": "array", "items": {"type": "object"}}},
    },
    "Status": {"type": "object", "required": ["participant", "health"],
               "description": "what 'kpnode status --json' gives, with the running "
                              "node's own /readyz checks under node.ready (each failing "
                              "one an error)",
               "properties": {"participant": _STR,
                              "health": {"type": "string", "enum": ["ok", "warning",
                                                                    "error"]},
                              "problems": {"type": "array", "items": {"type": "object"}}}},
}

_WRITE = _errors(400, 401, 403, 404, 408, 409, 413, 422)

_PATHS: dict[str, Any] = {
    "/openapi.json": {"get": {
        "operationId": "openapi", "summary": "this document", "security": [],
        "responses": {"200": _json({"type": "object"}, "the OpenAPI document"),
                      "400": _json(_ref("Error"), "a query string (this call takes none: "
                                   "field.unknown)")}}},
    "/certificates/validate": {"post": {
        "operationId": "validateCertificate",
        "summary": "check a certificate as issuing it would: every problem, nothing sent",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _ref("Certificate")}}},
        "responses": {"200": _json(_ref("Validation"), "the verdict, with every problem"),
                      **_errors(400, 401, 408, 413)}}},
    "/certificates": {
        "post": {
            "operationId": "issueCertificate", "summary": "validate, sign and send (officer)",
            "parameters": [_IDEMPOTENCY],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("Certificate")}}},
            "responses": {"201": _json(_ref("Record"), "issued and queued for the importer"),
                          **_WRITE}},
        "get": {
            "operationId": "listCertificates", "summary": "exports and imports, filtered",
            "parameters": [
                {"name": "side", "in": "query", "schema": {"type": "string",
                                                           "enum": [s.value for s in Side]}},
                {"name": "state", "in": "query", "description": "repeat or comma-separate",
                 "schema": {"type": "array", "items": {"type": "string", "enum":
                                                       [s.value for s in State]}},
                 "style": "form", "explode": True},
                {"name": "partner", "in": "query", "description": "a Participant code, "
                 "either case", "schema": {"type": "string", "pattern": "^[A-Za-z]{2}$"}},
                {"name": "overdue", "in": "query", "schema": {"type": "boolean"},
                 "description": "only overdue loops, as `kpnode status` says: open with "
                                "the certificate expiring within 7 days (or past), or "
                                "expired unconfirmed"},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                            "maximum": 5000, "default": 1000}},
                {"name": "offset", "in": "query", "schema": {"type": "integer",
                                                             "minimum": 0, "default": 0}},
                {"name": "after", "in": "query", "schema": {"type": "string",
                                                            "pattern": "^[0-9]{1,19}$"},
                 "description": "an integer from 0 to 2^62, as a string; "
                                "page by position instead of offset: 0 for the first page, "
                                "then the previous page's `next`, until `next` is null. "
                                "No record is skipped or repeated when records change "
                                "state between pages (as with offset over a filter); not "
                                "with offset or overdue"},
            ],
            "responses": {"200": _json({"type": "object", "properties": {
                "total": _INT, "offset": _INT, "after": _INT,
                "next": {"type": ["string", "null"],
                         "description": "with after: the position to ask after next, "
                                        "null once a page came back short (a last page "
                                        "exactly `limit` long still has one, and the "
                                        "page after it is empty)"},
                "certificates": {"type": "array", "items": _ref("Record")}}},
                "the matching certificates, oldest first"), **_errors(400, 401)}},
    },
    "/certificates/{number}": {"get": {
        "operationId": "showCertificate",
        "summary": "one certificate: this node's record(s) and its signed history",
        "parameters": [_NUMBER],
        "responses": {"200": _json({"type": "object", "properties": {
            "records": {"type": "array", "items": _ref("Record")},
            "history": {"type": "array", "items": _ref("HistoryItem")}}}, "found"),
            **_errors(400, 401, 404)}}},
    "/certificates/{number}/replace": {"post": {
        "operationId": "replaceCertificate",
        "summary": "issue a new certificate replacing one issued in error (officer)",
        "parameters": [_NUMBER, _IDEMPOTENCY],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _ref("ReplaceRequest")}}},
        "responses": {"201": _json(_ref("Record"), "the replacement, issued"), **_WRITE}}},
    "/certificates/{number}/cancel": {"post": {
        "operationId": "cancelCertificate",
        "summary": "cancel an exported certificate before confirmation (officer)",
        "parameters": [_NUMBER, _IDEMPOTENCY],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _ref("CancelRequest")}}},
        "responses": {"200": _json(_ref("Record"), "cancelled; the importer is told"),
                      **_WRITE}}},
    "/certificates/{number}/confirm": {"post": {
        "operationId": "confirmImport",
        "summary": "confirm an import: the shipment arrived (officer)",
        "parameters": [_NUMBER, _IDEMPOTENCY],
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": _ref("ConfirmRequest")}}},
        "responses": {"200": _json(_ref("Record"), "confirmed; the exporter is told"),
                      **_WRITE}}},
    "/statistics": {"get": {
        "operationId": "quarterStatistics",
        "summary": "a quarter's certificate-based trade figures per partner and HS code",
        "parameters": [{"name": "quarter", "in": "query", "description": "default: this one",
                        "schema": {"type": "string", "pattern": "^[0-9]{4}-?Q[1-4]$",
                                   "description": "years 0001 to 9998"}}],
        "responses": {"200": _json(_ref("Statistics"), "the figures"), **_errors(400, 401)}}},
    "/status": {"get": {
        "operationId": "nodeStatus", "summary": "the node's status",
        "responses": {"200": _json(_ref("Status"), "status"), **_errors(400, 401)}}},
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "kpx node API", "version": VERSION,
             "description": "A kpx node's API for a national authority's own systems. Every "
                            "call is recorded in the node's evidence log with the token's "
                            "name. Roles: officer (issue, replace, cancel, confirm) and "
                            "monitor (read only); tokens: 'kpnode token add'. Every GET "
                            "also answers HEAD; a method a path does not serve gets 405 "
                            "(request.method_not_allowed) with an Allow header. A query "
                            "parameter a call does not list is a 400 (field.unknown): the "
                            "POSTs take none, their arguments go in the body."},
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearer": []}],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": _SCHEMAS,
    },
}


def openapi_document() -> dict[str, Any]:
    return copy.deepcopy(_DOCUMENT)
