"""Who did what through the HTTP API or the web console, as evidence-log entries.

An API call is not a signed message, but the Scheme's audit asks who issued or confirmed a
certificate, so every call is chained into the same hash-chained log as the signed frames,
with direction ``api``: changing or removing one breaks the chain like any other entry.
The entry's bytes are the canonical msgpack of a small map. Pure: no I/O here.
"""

from __future__ import annotations

from typing import Any

from protocol import ProtocolError
from protocol.codec import pack, unpack

#: the evidence-log ``direction`` of an API call entry
AUDIT_DIRECTION = "api"
AUDIT_FIELDS = ("at", "who", "role", "method", "path", "status", "certificate",
                "idempotency_key", "via")


def audit_entry(*, at: int, who: str | None, role: str | None, method: str, path: str,
                status: int, certificate: str | None, idempotency_key: str | None,
                via: str) -> bytes:
    return pack({"at": at, "who": who, "role": role, "method": method, "path": path,
                 "status": status, "certificate": certificate,
                 "idempotency_key": idempotency_key, "via": via})


def read_audit_entry(data: bytes) -> dict[str, Any]:
    """The entry's fields; ``ValueError`` if the bytes are not an API call entry."""
    try:
        value = unpack(data)
    except ProtocolError as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(value, dict) or sorted(value) != sorted(AUDIT_FIELDS):
        raise ValueError(f"an API call entry has exactly the fields {', '.join(AUDIT_FIELDS)}")
    if not isinstance(value["method"], str) or not isinstance(value["status"], int):
        raise ValueError("an API call entry needs a method and a status")
    return value


def audit_problems(data: bytes) -> list[str]:
    try:
        read_audit_entry(data)
    except ValueError as exc:
        return [f"API call entry does not parse: {exc}"]
    return []
