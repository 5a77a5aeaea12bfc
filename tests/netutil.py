"""Test helpers shared by the node tests: certificates, hand-carried message passing, queue
depths."""

from __future__ import annotations

import contextlib
import itertools
import os
import string
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import aio_pika
import pytest

from node.service import Delivery, Node, Verdict
from protocol import Certificate, Line, Party, validate_certificate


def certificate_json(number: str, issuer: str, destination: str, **changes: Any) -> dict[str, Any]:
    today = date.today()
    data: dict[str, Any] = {
        "number": number,
        "issuer": issuer,
        "issuing_authority": f"{issuer}-KPA",
        "destination": destination,
        "origins": [issuer],
        "exporter": {"name": f"{issuer} Mining Ltd", "address": f"1 Main Road, {issuer}"},
        "importer": {"name": f"{destination} Diamond Traders",
                     "address": f"2 Bourse, {destination}"},
        "lines": [
            {"hs_code": "7102.31", "carats_hundredths": 250_000, "usd_cents": 40_000_000},
            {"hs_code": "7102.21", "carats_hundredths": 30_000, "usd_cents": 10_000_000},
        ],
        "parcels": 3,
        "issued_on": today.isoformat(),
        "expires_on": (today + timedelta(days=60)).isoformat(),
        "remarks": "",
    }
    data.update(changes)
    return data


def certificate(number: str, issuer: str, destination: str, **changes: Any) -> Certificate:
    return validate_certificate(certificate_json(number, issuer, destination, **changes))


# One iterator for the whole session. It lives here, not in a test module: pytest imports a
# test module under its own name as well as under ``tests.``, which would make two iterators
# hand out the same codes (and two tests share one queue).
_codes = itertools.product(string.ascii_uppercase[::-1], repeat=2)


def fresh_codes(n: int) -> list[str]:
    """Two-letter codes no other test uses, so each test has its own queues."""
    return ["".join(next(_codes)) for _ in range(n)]


def carry(sender: Node, nodes: dict[str, Node]) -> list[tuple[str, Verdict]]:
    """Move everything in ``sender``'s outbox to its recipients, as the broker would."""
    verdicts = []
    rows = sender.store.due(now_ms=2**62, limit=10_000)
    with sender.store.transaction():
        sender.store.mark_published([r.seq for r in rows], 0)
    for row in rows:
        target = nodes[row.recipient]
        (verdict,) = target.handle_batch([Delivery(row.frame)])
        verdicts.append((row.kind, verdict))
    return verdicts


@contextlib.contextmanager
def writes_cut_short(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every file written through ``os.fdopen`` meanwhile (``node.files.write_whole``'s
    temporary file) is stopped at its first write, as Ctrl-C would stop a command between
    a file's creation and its contents."""
    real_fdopen = os.fdopen

    class Cut:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: object) -> int:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(os, "fdopen", lambda *a, **k: Cut(real_fdopen(*a, **k)))
        yield


__all__ = ["Line", "Party", "carry", "certificate", "certificate_json", "fresh_codes",
           "writes_cut_short"]


async def queue_depth(amqp_url: str, queue: str) -> int:
    """Messages ready in a queue, by passive declare."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
