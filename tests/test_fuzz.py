"""Fuzzing the node's inbound handler: random and mutated frames never crash it, never change
a record, and every one gets a verdict (dead-lettered with a reason).

A bounded hypothesis run (``max_examples`` below) straight through
:meth:`node.service.Node.handle_batch`, the function the consumer calls for every batch, so
no broker is needed. Mutations start from real signed frames of every kind a peer sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.network import create_network
from node.service import Delivery, Node
from protocol import (
    Cancellation,
    Envelope,
    ImportConfirmation,
    Ping,
    Receipt,
    parse_frame,
    seal,
)
from tests.netutil import certificate, fresh_codes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, list[bytes]]]:
    base: Path = tmp_path_factory.mktemp("fuzz")
    peer, me = fresh_codes(2)
    network = create_network(base, [peer, me], [])
    node = Node.open(network.configs[me])
    key = network.configs[peer].signing_key()
    cert = certificate(f"{peer}-2026-1", peer, me)
    first = seal(Envelope(sender=peer, recipient=me, created_at=1, payload=cert), key)
    digest = parse_frame(first).digest
    seeds = [first] + [seal(Envelope(sender=peer, recipient=me, created_at=2, payload=p), key)
                       for p in (Receipt(certificate=cert.number, certificate_digest=digest),
                                 Cancellation(certificate=cert.number, reason="error"),
                                 Ping(nonce=b"\1" * 16))]
    confirmation = ImportConfirmation(certificate=cert.number, certificate_digest=digest,
                                      destination=me, importer=cert.importer,
                                      lines=cert.lines, parcels=cert.parcels,
                                      received_on=cert.issued_on)
    seeds.append(seal(Envelope(sender=peer, recipient=me, created_at=3,
                               payload=confirmation), key))
    yield node, seeds
    node.close()


def snapshot(node: Node) -> tuple[object, ...]:
    store = node.store
    return (store.counts(), len(list(store.evidence())), len(store.backlog()),
            node.registry.version)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    frame = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
        at = draw(st.integers(0, max(0, len(frame) - 1)))
        if how == "flip" and frame:
            frame[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del frame[at:at + draw(st.integers(1, 64))]
        elif how == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            other = draw(st.sampled_from(seeds))
            frame[at:] = other[at:]
    return bytes(frame)


def test_random_and_mutated_frames_change_nothing(world: tuple[Node, list[bytes]]) -> None:
    node, seeds = world
    before = snapshot(node)

    # a splice can rebuild an authentic frame byte for byte: that one is not a bad input
    bad = st.one_of(st.binary(max_size=600), mutated(seeds)).filter(lambda b: b not in seeds)

    @settings(max_examples=400, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(bad, min_size=1, max_size=8))
    def run(bodies: list[bytes]) -> None:
        verdicts = node.handle_batch([Delivery(b) for b in bodies])
        assert len(verdicts) == len(bodies)
        for body, verdict in zip(bodies, verdicts, strict=True):
            assert verdict.dead_letter is not None, body
            assert verdict.dead_letter.reason
        assert snapshot(node) == before

    run()
