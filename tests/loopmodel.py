"""A model of two nodes and the network between them, driven step by step.

Used by the property test (tests/test_loop_model.py). The network keeps, per direction,
the frames published and not yet delivered (FIFO, as the relay and the broker guarantee,
except that a frame may now and then overtake those in front of it: a relay batch nacked
after the next one was confirmed, a dead letter an operator moved back) and every frame
ever published (any of which may be delivered again, at any time: redelivery). Registry
updates from the Chair reach each node on their own schedule. Time passes for both nodes at
once (their clocks agree), and each node's sweep expires its open loops when it runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from node.chair import embargo, set_status, sign_registry
from node.machine import Side, State
from node.network import create_network
from node.service import CommandRefused, Delivery, Node, now_ms
from protocol import Line, ParticipantStatus
from tests.netutil import certificate

CODES = ("BW", "BE")
OTHER = {"BW": "BE", "BE": "BW"}

# states of one loop both ends may settle in once every message has been delivered
COMPATIBLE = {
    (None, None),
    (State.DELIVERED, State.RECEIVED),   # open: the shipment has not been confirmed yet
    (State.CONFIRMED, State.CONFIRMED),
    (State.CANCELLED, State.CANCELLED),
    (State.REPLACED, State.REPLACED),
    (State.REJECTED, State.REJECTED),
    (State.EXPIRED, State.EXPIRED),      # open until both sweeps found it past its expiry
}
DAY_MS = 86_400_000

Action = tuple[Any, ...]


class Model:
    def __init__(self, base: Path | None = None, *, both_ways: bool = False) -> None:
        self._tmp = None if base is not None else tempfile.mkdtemp(prefix="kpxmodel")
        self.base = base or Path(self._tmp)  # type: ignore[arg-type]
        self.network = create_network(self.base, list(CODES), [])
        self.nodes = {c: Node.open(self.network.configs[c]) for c in CODES}
        self.both_ways = both_ways
        self.exporters = CODES if both_ways else ("BW",)
        self.flight: dict[tuple[str, str], list[bytes]] = {
            (a, b): [] for a in CODES for b in CODES if a != b}
        self.history: dict[tuple[str, str], list[bytes]] = {k: [] for k in self.flight}
        self.registry = self.network.registry
        self.registry_pending: dict[str, list[bytes]] = {c: [] for c in CODES}
        self.numbers: dict[str, list[str]] = {c: [] for c in CODES}
        self.counter = 0
        self.log: list[str] = []
        self.start_ms, self.days = now_ms(), 0
        for n in self.nodes.values():
            n.clock = self._now

    def _now(self) -> int:
        return self.start_ms + self.days * DAY_MS

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- operator actions ---------------------------------------------------------------

    def _new_number(self, issuer: str) -> str:
        self.counter += 1
        return f"{issuer}-{self.counter}"

    def _cert(self, issuer: str, number: str, cd: bool) -> Any:
        origins = [issuer, "CD"] if cd else [issuer]
        today = date.today() + timedelta(days=self.days)
        return certificate(number, issuer, OTHER[issuer], origins=origins,
                           issued_on=today.isoformat(),
                           expires_on=(today + timedelta(days=60)).isoformat())

    def _pick(self, issuer: str, i: int) -> str | None:
        nums = self.numbers[issuer]
        return nums[i % len(nums)] if nums else None

    def issue(self, issuer: str, cd: bool) -> None:
        number = self._new_number(issuer)
        self.numbers[issuer].append(number)
        self._command(f"{issuer}.issue({number}, cd={cd})",
                      lambda: self.nodes[issuer].issue(self._cert(issuer, number, cd)))

    def cancel(self, issuer: str, i: int) -> None:
        number = self._pick(issuer, i)
        if number:
            self._command(f"{issuer}.cancel({number})",
                          lambda: self.nodes[issuer].cancel(number, "issued in error"))

    def replace(self, issuer: str, i: int, cd: bool) -> None:
        old = self._pick(issuer, i)
        if not old:
            return
        number = self._new_number(issuer)
        self.numbers[issuer].append(number)
        self._command(f"{issuer}.replace({old} -> {number}, cd={cd})",
                      lambda: self.nodes[issuer].replace(old, self._cert(issuer, number, cd),
                                                         "wrong"))

    def confirm(self, issuer: str, i: int, differs: bool) -> None:
        number = self._pick(issuer, i)
        if not number:
            return
        importer = self.nodes[OTHER[issuer]]
        kwargs: dict[str, Any] = {}
        if differs:
            kwargs = {"parcels": 2, "lines": (Line(hs_code="7102.31",
                                                   carats_hundredths=249_000,
                                                   usd_cents=40_000_000),)}
        self._command(f"{OTHER[issuer]}.confirm({number}, differs={differs})",
                      lambda: importer.confirm(number, **kwargs))

    def _command(self, label: str, run: Any) -> None:
        try:
            run()
            self.log.append(label)
        except CommandRefused as exc:
            self.log.append(f"{label} refused: {exc.refusal.reason}")

    # -- network ------------------------------------------------------------------------

    def publish(self, sender: str) -> None:
        """The relay takes what is due from ``sender``'s outbox, in order."""
        node = self.nodes[sender]
        rows = node.store.due(now_ms=2**62, limit=10_000)
        if not rows:
            return
        with node.store.transaction():
            node.store.mark_published([r.seq for r in rows], 0)
        for row in rows:
            key = (sender, row.recipient)
            self.flight[key].append(row.frame)
        self.log.append(f"publish {sender}: {[r.kind for r in rows]}")

    def deliver(self, sender: str, count: int, one_batch: bool = False) -> None:
        key = (sender, OTHER[sender])
        frames, self.flight[key] = self.flight[key][:count], self.flight[key][count:]
        if not frames:
            return
        self.log.append(f"deliver {sender}->{OTHER[sender]} x{len(frames)}")
        self.history[key].extend(frames)
        target = self.nodes[OTHER[sender]]
        if one_batch:
            target.handle_batch([Delivery(f) for f in frames])
        else:
            for frame in frames:
                target.handle_batch([Delivery(frame)])

    def overtake(self, sender: str, i: int) -> None:
        """A frame still in flight jumps ahead of the ones published before it."""
        flight = self.flight[(sender, OTHER[sender])]
        if len(flight) < 2:
            return
        k = 1 + i % (len(flight) - 1)
        flight.insert(0, flight.pop(k))
        self.log.append(f"overtake {sender}->{OTHER[sender]} #{k}")

    def duplicate(self, sender: str, i: int) -> None:
        """Any frame delivered before is delivered once more, at any later time (a
        redelivery): never one still waiting for its first delivery, which would overtake
        the messages in front of it."""
        sent = self.history[(sender, OTHER[sender])]
        if not sent:
            return
        self.log.append(f"redeliver {sender}->{OTHER[sender]} #{i % len(sent)}")
        self.nodes[OTHER[sender]].handle_batch([Delivery(sent[i % len(sent)])])

    def resend(self, node: str) -> None:
        due = self.nodes[node].resend_unanswered(0)
        if due:
            self.log.append(f"{node}.resend_unanswered -> {len(due)}")

    def time(self, days: int) -> None:
        """Days pass on both nodes' clocks: what is in flight arrives that much later."""
        self.days += days
        self.log.append(f"{days} days pass")

    def sweep(self, node: str) -> None:
        """``node``'s sweep expires its open loops past their certificate's expiry."""
        if expired := self.nodes[node].expire_overdue():
            self.log.append(f"{node}.sweep expired {[r.number for r in expired]}")

    def chair(self, change: str) -> None:
        """The Chair publishes a new registry version; it reaches each node later."""
        if change == "embargo":
            update = embargo(self.registry, "CD", "CD" not in self.registry.embargoed_origins)
        else:  # suspend / reactivate an exporter
            code = change
            entry = next(p for p in self.registry.participants if p.code == code)
            status = (ParticipantStatus.ACTIVE if entry.status is ParticipantStatus.SUSPENDED
                      else ParticipantStatus.SUSPENDED)
            update = set_status(self.registry, code, status)
        self.registry = dataclasses.replace(update, version=self.registry.version + 1)
        frame = sign_registry(self.registry, self.network.chair_key, now_ms())
        for c in CODES:
            self.registry_pending[c].append(frame)
        self.log.append(f"chair: {change} -> v{self.registry.version}")

    def registry_arrives(self, node: str) -> None:
        if self.registry_pending[node]:
            frame = self.registry_pending[node].pop(0)
            self.nodes[node].handle_batch([Delivery(frame)])
            self.log.append(f"registry reaches {node}")

    # -- the end ------------------------------------------------------------------------

    def drain(self, rounds: int = 8) -> None:
        """Everything is finally delivered: registries, messages, resends; then both sweeps
        run, and what they cause is delivered too."""
        for c in CODES:
            while self.registry_pending[c]:
                self.registry_arrives(c)
        for sweep in (False, True):
            for c in CODES:
                if sweep:
                    self.sweep(c)
            for _ in range(rounds):
                for c in CODES:
                    self.resend(c)
                    self.publish(c)
                for c in CODES:
                    self.deliver(c, 10_000)

    def quiet(self) -> bool:
        return (all(not f for f in self.flight.values())
                and all(not n.store.due(now_ms=2**62, limit=1) for n in self.nodes.values()))

    def disagreements(self) -> list[str]:
        found = []
        for issuer in self.exporters:
            exporter, importer = self.nodes[issuer], self.nodes[OTHER[issuer]]
            for number in self.numbers[issuer]:
                e = exporter.store.get(Side.EXPORT, number)
                i = importer.store.get(Side.IMPORT, number)
                pair = (e.state if e else None, i.state if i else None)
                if pair not in COMPATIBLE:
                    found.append(f"{number}: exporter {pair[0]}, importer {pair[1]}")
                    continue
                if e and i and e.certificate_digest != i.certificate_digest:
                    found.append(f"{number}: digests differ")
                if pair == (State.CONFIRMED, State.CONFIRMED) and e.confirmation != i.confirmation:  # type: ignore[union-attr]
                    found.append(f"{number}: confirmations differ")
                if pair == (State.REPLACED, State.REPLACED) and e.replaced_by != i.replaced_by:  # type: ignore[union-attr]
                    found.append(f"{number}: replaced by {e.replaced_by} / {i.replaced_by}")  # type: ignore[union-attr]
        return found


def run(actions: Sequence[Action], *, both_ways: bool = False, base: Path | None = None
        ) -> tuple[Model, list[str]]:
    """Apply ``actions``, drain, and return the model (open) and its disagreements."""
    model = Model(base, both_ways=both_ways)
    for action in actions:
        getattr(model, action[0])(*action[1:])
    model.drain()
    problems = model.disagreements()
    if not model.quiet():
        problems.append("messages still moving after the drain")
    return model, problems
