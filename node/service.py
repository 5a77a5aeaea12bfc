"""The node service: the state machine applied to the store, one transaction per decision.

This is where design principle 4 is kept. A command or a batch of deliveries is decided
by :mod:`node.machine`, and its records, its evidence entries and its outgoing frames (the
outbox) are committed together; only then are deliveries acknowledged to the broker and
frames published. Nothing here touches the network: :mod:`node.runner` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from datetime import date
from pathlib import Path

import structlog

from node.config import NodeConfig
from node.keyfile import NodeKey
from node.machine import (
    Admitted,
    Before,
    Context,
    Decision,
    Known,
    Record,
    Refusal,
    Sealed,
    Side,
    State,
    admit,
    arriving,
    cancel,
    confirm,
    expire,
    issue,
    linked,
    ping,
    receive,
    rejection_for,
    side_of,
    signed_afresh,
    touches,
    with_valid_key,
)
from node.registry import (
    Registry,
    newer,
    open_registry_frame,
    own_key_fault,
    registered_authority,
    signed_by,
    signing_key_choice,
)
from node.store import Store, UnreadableRecord
from protocol import (
    Cancellation,
    Certificate,
    Envelope,
    ImportConfirmation,
    Kind,
    Line,
    ProtocolError,
    Receipt,
    Rejection,
    Replacement,
    key_id,
    parse_frame,
    seal,
)
from protocol.codec import decode_body
from protocol.frame import Signer

log = structlog.get_logger("kpx.node")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def broker_user_for(participant: str) -> str:
    """The RabbitMQ user a Participant's node logs in as (deploy/ creates them)."""
    return f"kpx-{participant.lower()}"


class CommandRefused(Exception):
    """A local command (issue, confirm ...) was refused; ``refusal`` says why."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as the broker handed it over."""

    body: bytes
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    """A shipment as the importing authority received it, for :meth:`Node.confirm_many`.
    ``lines`` and ``parcels`` default to what the certificate declared."""

    number: str
    _: KW_ONLY
    lines: tuple[Line, ...] | None = None
    parcels: int | None = None
    received_on: date | None = None
    remarks: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a delivery once the batch is committed."""

    #: set when the delivery must go to the dead-letter queue (then be acknowledged)
    dead_letter: Refusal | None = None
    duplicate: bool = False
    #: the message's kind once it could be read (for metrics); None for unreadable bytes
    kind: str | None = None
    #: the frame is in the evidence log (and a refusal recorded with it): nothing is lost
    #: if its dead-letter copy cannot be made
    kept: bool = False


def certificate_of(envelope: Envelope) -> str | None:
    """The certificate number a message is about, for indexing the evidence log."""
    payload = envelope.payload
    if isinstance(payload, Certificate | Replacement):
        return arriving(envelope)
    if isinstance(payload, Receipt | ImportConfirmation | Cancellation | Rejection):
        return payload.certificate
    return None


#: Called with a command's record inside the command's transaction: what it writes to the
#: store commits with the command or not at all (the API stores its idempotent answer so).
OnCommit = Callable[[Record], None]


class Node:
    """One Participant's node over its store. Synchronous and single-threaded by design:
    the runner calls it from the event loop, the CLI calls it directly."""

    def __init__(self, config: NodeConfig, store: Store, signing_key: Signer,
                 registry: Registry, *, check_broker_user: bool = False,
                 clock: Callable[[], int] = now_ms,
                 other_keys: Sequence[Signer] = ()) -> None:
        self.config = config
        self.store = store
        #: the configured key first, then keys rotated in under keys/ (see signing_key)
        self.signing_keys: tuple[Signer, ...] = (signing_key, *other_keys)
        self.registry = registry
        self.check_broker_user = check_broker_user
        self.clock = clock
        self.me = config.participant
        #: called after a commit that queued frames, so the relay can publish at once
        self.on_outbox: Callable[[], None] = lambda: None
        #: called after each commit with the records it changed (a back office listening
        #: for arrivals, say), so nobody has to poll the store
        self.on_records: Callable[[Sequence[Record]], None] = lambda records: None
        #: when the last transaction committed (``clock``, ms): from then on what it changed
        #: is recorded, visible and durable. Its evidence is stamped with the transaction's
        #: start, before a batch's other messages and the fsync; an ``on_records`` listener
        #: that times what it hears (the simulation's desks) reads this instead.
        self.committed_at: int | None = None
        self._changed: list[Record] = []
        #: log lines of the transaction under way, written once it commits (see _transaction)
        self._events: list[tuple[str, str, dict[str, object]]] = []

    def signing_key(self, at_ms: int | None = None) -> Signer:
        """The key to sign with now: of the node's keys, the newest one the registry holds
        valid for this authority; the configured key when none is (local commands that
        send are then refused, see :func:`with_valid_key`, and ``kpnode status`` says
        why)."""
        at = self.clock() if at_ms is None else at_ms
        choice = signing_key_choice(self.registry, self.me, self.config.authority,
                                    [bytes(k.verify_key) for k in self.signing_keys], at)
        return self.signing_keys[choice or 0]
    @classmethod
    def open(cls, config: NodeConfig, *, check_broker_user: bool = False) -> Node:
        """Open the node's store and the newest verified registry (file or database)."""
        signing_key = config.signing_key()
        other_keys = config.rotated_keys()
        store = Store(config.database_path, create=False, owner=config.participant)
        try:
            registry = load_registry(config, store)
        except BaseException:
            store.close()
            raise
        if config.authority_defaulted and (listed := registered_authority(
                registry, config.participant,
                [bytes(k.verify_key) for k in (signing_key, *other_keys)], now_ms())):
            # node.toml names none: the node signs as the registry lists its key, which
            # is what an older kpx's default (the bare code) meant where it worked.
            config = dataclasses.replace(config, authority=listed)
        return cls(config, store, signing_key, registry, check_broker_user=check_broker_user,
                   other_keys=other_keys)

    def close(self) -> None:
        self.store.close()

    def context(self, now: int | None = None) -> Context:
        at = self.clock() if now is None else now
        key = self.signing_key(at)
        fault = own_key_fault(self.registry, self.me, self.config.authority,
                              bytes(key.verify_key), at)
        return Context(me=self.me, registry=self.registry,
                       chair_public_key=self.config.chair_public_key,
                       own_authority=self.config.authority, now_ms=at,
                       sign=lambda envelope: seal(envelope, key), key_fault=fault)

    # -- committing a decision -------------------------------------------------------

    def _commit(self, ctx: Context, decision: Decision, incoming: Admitted | None = None) -> None:
        """Write a decision's effects. Call inside a store transaction."""
        store = self.store
        if incoming is not None:
            env = incoming.envelope
            # A registry update taken from the registry file (load_registry, by any command
            # that opened the node) is in the log already: the broker's copy of the same
            # frame is applied all the same, but not logged twice.
            if not (env.kind is Kind.REGISTRY_UPDATE
                    and store.logged("in", env.message_id, incoming.frame.raw)):
                store.append_evidence("in", incoming.frame.raw, env.message_id,
                                      certificate_of(env), ctx.now_ms)
        store.save(decision.records)
        self._changed.extend(decision.records)
        for sealed in decision.send:
            store.append_evidence("out", sealed.frame, sealed.envelope.message_id,
                                  certificate_of(sealed.envelope), ctx.now_ms)
        store.enqueue(decision.send, ctx.now_ms)
        if decision.registry is not None:
            store.save_registry(decision.registry.version, decision.registry.frame, ctx.now_ms)
            self.registry = decision.registry
        cause = incoming.envelope if incoming is not None else None
        for r in decision.records:
            # One line per state change, with what caused it: an incoming message (its id
            # and kind) or a local command (no cause). Logged once the transaction commits.
            self._after_commit("info", "certificate",
                node=self.me, number=r.number, side=str(r.side), state=str(r.state),
                partner=r.partner, message_id=r.message_id,
                cause_message_id=cause.message_id if cause else None,
                cause_kind=str(cause.kind) if cause else "command",
                discrepancies=len(r.discrepancies) or None)

    def _command(self, decide: Callable[[Context], Decision],
                 on_commit: OnCommit | None = None) -> Decision:
        (decision,) = self._commands([decide], on_commit=on_commit)
        if decision.refusal is not None:
            raise CommandRefused(decision.refusal)
        return decision

    def _commands(self, decides: Sequence[Callable[[Context], Decision]], *,
                  on_commit: OnCommit | None = None) -> list[Decision]:
        """Decide and commit several commands in one transaction, in order, each seeing the
        ones before it. A refused command changes nothing and comes back with its refusal;
        the others still commit. One commit (one fsync) for all is what lets a busy
        authority's back office issue or confirm hundreds per second. ``on_commit`` gets
        the first command's record inside the transaction, when it was not refused."""
        decisions = []
        with self._transaction():
            ctx = self.context()
            for decide in decides:
                try:
                    decision = with_valid_key(ctx, decide(ctx))
                except CommandRefused as exc:
                    decision = Decision(refusal=exc.refusal)
                if decision.refusal is None:
                    self._commit(ctx, decision)
                decisions.append(decision)
            if on_commit is not None and decisions[0].refusal is None \
                    and decisions[0].records:
                on_commit(decisions[0].records[0])
        if any(d.send for d in decisions):
            self.on_outbox()
        return decisions

    def unlock(self) -> None:
        """Read the private half of every key of the node (an encrypted one asks for the
        passphrase): :class:`~node.keyfile.KeyFileError` when one cannot be."""
        for key in self.signing_keys:
            if isinstance(key, NodeKey):
                key.unlock()

    def _after_commit(self, level: str, event: str, **fields: object) -> None:
        """Log ``event`` once the transaction under way commits, and not if it does not:
        a batch held back while the disk is full would log it again at every retry."""
        self._events.append((level, event, fields))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """A store transaction whose changed records go to ``on_records`` once committed."""
        # Keys first: what the transaction signs must not wait, holding the database's
        # write lock, for a passphrase typed at a terminal.
        self.unlock()
        self._changed, self._events = [], []
        try:
            with self.store.transaction():
                yield
        except BaseException:
            # A state change that did not commit is no state change: a batch held back
            # while the disk is full would log the same ones again on every retry.
            self._changed, self._events = [], []
            raise
        self.committed_at = self.clock()
        changed, self._changed = self._changed, []
        events, self._events = self._events, []
        for level, name, fields in events:
            getattr(log, level)(name, **fields)
        if changed:
            self.on_records(changed)

    # -- local commands --------------------------------------------------------------

    def issue(self, certificate: Certificate, *, on_commit: OnCommit | None = None) -> Record:
        return self._command(self._issuing(certificate), on_commit).records[0]

    def issue_many(self, certificates: Sequence[Certificate]) -> list[Record | Refusal]:
        """Issue several certificates in one transaction: each one's record, or its refusal
        (a refused certificate does not stop the others)."""
        return _outcomes(self._commands([self._issuing(c) for c in certificates]))

    def _issuing(self, certificate: Certificate) -> Callable[[Context], Decision]:
        def decide(ctx: Context) -> Decision:
            return issue(ctx, certificate, self.store.load([(Side.EXPORT, certificate.number)]))
        return decide

    def check_issue(self, certificate: Certificate) -> Refusal | None:
        """What ``issue`` would say, without signing or storing anything (``validate``)."""
        ctx = self.context()
        known = self.store.load([(Side.EXPORT, certificate.number)])
        return with_valid_key(ctx, issue(ctx, certificate, known)).refusal

    def replace(self, number: str, certificate: Certificate, reason: str, *,
                on_commit: OnCommit | None = None) -> Record:
        def decide(ctx: Context) -> Decision:
            old = self._require(Side.EXPORT, number)
            return issue(ctx, certificate,
                         self.store.load([(Side.EXPORT, certificate.number)]), (old, reason))
        return self._command(decide, on_commit).records[0]

    def cancel(self, number: str, reason: str, *, on_commit: OnCommit | None = None) -> Record:
        def decide(ctx: Context) -> Decision:
            return cancel(ctx, self._require(Side.EXPORT, number), reason)
        return self._command(decide, on_commit).records[0]

    def confirm(self, number: str, *, lines: tuple[Line, ...] | None = None,
                parcels: int | None = None, received_on: date | None = None,
                remarks: str = "", on_commit: OnCommit | None = None) -> Record:
        arrival = Arrival(number, lines=lines, parcels=parcels, received_on=received_on,
                          remarks=remarks)
        return self._command(self._confirming(arrival), on_commit).records[0]

    def confirm_many(self, arrivals: Sequence[Arrival]) -> list[Record | Refusal]:
        """Confirm several arrivals in one transaction: each one's record, or its refusal."""
        return _outcomes(self._commands([self._confirming(a) for a in arrivals]))

    def _confirming(self, arrival: Arrival) -> Callable[[Context], Decision]:
        def decide(ctx: Context) -> Decision:
            return confirm(ctx, self._require(Side.IMPORT, arrival.number), lines=arrival.lines,
                           parcels=arrival.parcels, received_on=arrival.received_on,
                           remarks=arrival.remarks)
        return decide

    def ping(self, partner: str, nonce: bytes) -> Sealed:
        return self._command(lambda ctx: ping(ctx, partner, nonce)).send[0]

    def expire_overdue(self, unreadable: list[UnreadableRecord] | None = None
                       ) -> list[Record]:
        """Expire every open loop past its certificate's expiry. With ``unreadable``, a
        record kpx cannot read is added there and the others expire all the same."""
        def decide(ctx: Context) -> Decision:
            today = ctx.today.isoformat()
            return expire(ctx, self.store.records(states=(State.ISSUED, State.DELIVERED,
                                                          State.RECEIVED),
                                                  expiring_before=today,
                                                  unreadable=unreadable))
        return list(self._command(decide).records)

    def resend_unanswered(self, after_ms: int) -> list[str]:
        """Queue again, byte for byte, certificates still without a receipt: the first
        time ``after_ms`` after they were sent, then after twice as long each time."""
        now = self.clock()
        with self.store.transaction():
            if moved := self.store.undo_clock_step(now):
                log.warning("the clock stepped back: outbox times ahead of now taken as now",
                            rows=moved)
            due = self.store.unanswered(now, after_ms)
            for message_id in due:
                self.store.requeue(message_id, now)
        if due:
            self.on_outbox()
        return due

    def _require(self, side: Side, number: str) -> Record:
        record = self.store.get(side, number)
        if record is None:
            other = self.store.get(Side.IMPORT if side is Side.EXPORT else Side.EXPORT, number)
            hint = f" (it is an {other.side} here)" if other else ""
            raise CommandRefused(Refusal("certificate.unknown",
                                         f"no {side} certificate {number}{hint}"))
        return record

    # -- incoming messages -----------------------------------------------------------

    def handle_batch(self, deliveries: Sequence[Delivery]) -> list[Verdict]:
        """Decide and commit a batch of deliveries in one transaction.

        Returns one verdict per delivery, in order. Raises (nothing committed) only when
        the store fails: the caller must then leave the deliveries unacknowledged.
        """
        registry = self.registry
        try:
            with self._transaction():
                ctx = self.context()
                verdicts = []
                for delivery in deliveries:
                    verdict = self._handle(ctx, delivery)
                    verdicts.append(verdict)
                    if ctx.registry is not self.registry:
                        ctx = self.context(ctx.now_ms)
        except BaseException:
            self.registry = registry  # a registry update in the batch was rolled back too
            raise
        self.on_outbox()
        return verdicts

    def _handle(self, ctx: Context, delivery: Delivery) -> Verdict:
        expected = broker_user_for if self.check_broker_user else None
        admitted = admit(ctx, delivery.body, delivery.user_id, expected)
        if isinstance(admitted, Refusal):
            return self._refused_at_admission(ctx, admitted, delivery)
        env = admitted.envelope
        seen = self.store.seen(env.sender, env.message_id)
        if seen is not None:
            answer_id = seen.answer_message_id
            if answer_id is not None:
                self._answer_again(ctx, answer_id)
            # SPEC §13: a repeated id is a duplicate, whatever it carries. One that carries
            # another kind of message is a sender's fault (an id used twice): answered as
            # the first was, and not processed, neither applied again nor answered anew.
            reused = bool(seen.kind) and seen.kind != str(env.kind)
            number = None if reused else arriving(env)
            if number is not None and (confirmed := self.store.sent_confirmation(
                    number, env.sender)) is not None:
                # An exporter sends a certificate again when it has no receipt, as after a
                # restore from a backup; one restored to before our confirmation would
                # never learn of it otherwise, and the loop would stay open on its side.
                self._answer_again(ctx, confirmed)
            if env.kind is Kind.RECEIPT and not reused:
                # Applied again: it can only move an issued certificate to delivered, and
                # one is issued again when the importer refused its replacement (it is
                # resent, and the importer answers with the receipt it sent before).
                again = receive(ctx, admitted, self._known(env))
                if again.records:
                    self._commit(ctx, again, admitted)
            if reused:  # said, so that the partner can be told
                self._after_commit("warning", "a message id used before came again with "
                                   "another kind of message: taken for a duplicate, not "
                                   "processed; the sender reused the id",
                                   message_id=env.message_id, sender=env.sender,
                                   kind=str(env.kind), first_kind=seen.kind)
            self._after_commit("info", "duplicate", message_id=env.message_id,
                               sender=env.sender, kind=str(env.kind),
                               answered_again=answer_id is not None)
            if seen.outcome == "refused":
                # Its dead-letter copy may never have been made (the node stopped between
                # the commit and the copy): made again, or it would be acknowledged away
                # with its only trace in the evidence log. A second copy is harmless.
                before = Refusal(seen.reason or "unknown", "refused when it first came; "
                                "delivered again", answer_to=env.sender,
                                in_reply_to=env.message_id, certificate=certificate_of(env))
                return Verdict(dead_letter=before, duplicate=True, kind=str(env.kind),
                               kept=True)
            return Verdict(duplicate=True, kind=str(env.kind))
        known = self._known(env)
        decision = receive(ctx, admitted, known, self._before(env, known))
        refusal = decision.refusal
        if refusal is not None and not refusal.final:
            # Nothing written, nothing remembered: judged afresh when it comes again.
            self._after_commit("warning", "held: dated ahead of this node's clock; "
                               "dead-lettered, not answered", message_id=env.message_id,
                               sender=env.sender, kind=str(env.kind), text=refusal.text,
                               certificate=refusal.certificate)
            return Verdict(dead_letter=refusal, kind=str(env.kind))
        self._commit(ctx, decision, admitted)
        self.store.remember(env.message_id, env.sender, str(env.kind),
                            "refused" if refusal else "accepted",
                            refusal.reason if refusal else None,
                            decision.answer.envelope.message_id if decision.answer else None,
                            ctx.now_ms)
        if refusal is not None:
            self._after_commit("warning", "refused", message_id=env.message_id,
                               sender=env.sender, kind=str(env.kind),
                               reason=refusal.reason, text=refusal.text,
                               certificate=refusal.certificate)
        return Verdict(dead_letter=refusal, kind=str(env.kind), kept=True)

    def _known(self, env: Envelope) -> Known:
        """The records a message touches, and those they link to (machine.linked)."""
        known = self.store.load(touches(env, self.me))
        if more := [k for k in linked(known) if k not in known]:
            known = {**known, **self.store.load(more)}
        return known

    def _answer_again(self, ctx: Context, answer_id: str) -> None:
        """The same answer again, byte for byte, or signed afresh where its recipient
        refuses the stored bytes' key (machine.signed_afresh)."""
        frame = self.store.outbox_frame(answer_id)
        afresh = signed_afresh(ctx, frame) if frame is not None else None
        if afresh is None:
            self.store.requeue(answer_id, ctx.now_ms)
            return
        log.warning("answer signed afresh: its recipient refuses the key it was signed with",
                    message_id=answer_id, recipient=afresh.envelope.recipient,
                    kind=str(afresh.envelope.kind))
        self.store.withdraw(answer_id, sent_too=True)
        self._commit(ctx, Decision(send=(afresh,)))

    def _before(self, env: Envelope, known: Known) -> Before:
        """What came for an arriving certificate before it did (machine.Before)."""
        number = arriving(env)
        if number is None or (Side.IMPORT, number) in known:
            return Before()
        cancellation = None
        for frame in self.store.early_cancellations(env.sender, number):
            # Logged with a certificate number, a frame passed admission: its signed
            # sender is the one whose key signed it.
            earlier = decode_body(parse_frame(frame).body)
            if (earlier.sender == env.sender and isinstance(earlier.payload, Cancellation)
                    and earlier.payload.certificate == number):
                cancellation = earlier.payload
                break
        return Before(cancellation, self.store.successor(number, env.sender))

    def _refused_at_admission(self, ctx: Context, refusal: Refusal,
                              delivery: Delivery) -> Verdict:
        """A delivery that failed before it became a message. Only an authentic sender
        (the signature verified) gets a signed rejection, and the frame is kept as
        evidence; anything else is dead-lettered and logged, never answered."""
        self._after_commit("warning", "refused", reason=refusal.reason, text=refusal.text,
                           sender=refusal.answer_to, message_id=refusal.in_reply_to)
        answer = rejection_for(ctx, refusal)
        if answer is None:
            return Verdict(dead_letter=refusal)
        frame_id = refusal.in_reply_to or ""
        # Only under a message id: a frame that could not be decoded has none, and all
        # such frames share '' in the log, where comparing against each would slow every
        # delivery as the log grows (its signer is a peer, at worst a newer one).
        if frame_id and self.store.logged("in", frame_id, delivery.body):
            # These very bytes are in the log already: refused and answered when they
            # first came, or accepted then. Answered again, every copy that anyone who
            # got the frame publishes here would make this node sign and send a rejection
            # to its signer. Refused afresh all the same, and dead-lettered again.
            return Verdict(dead_letter=refusal, kept=True)
        self.store.append_evidence("in", delivery.body, frame_id, None, ctx.now_ms)
        self._commit(ctx, Decision(send=(answer,)))
        return Verdict(dead_letter=refusal, kept=True)

    # -- queries -----------------------------------------------------------------

    def records(self, *, side: Side | None = None, states: Sequence[State] = (),
                partner: str | None = None, issued_between: tuple[date, date] | None = None,
                limit: int | None = None, offset: int = 0, last: int | None = None,
                ) -> list[Record]:
        return self.store.records(side=side, states=states, partner=partner,
                                  issued_between=issued_between, limit=limit, offset=offset,
                                  last=last)

    def find(self, number: str) -> list[Record]:
        return self.store.find(number)


def _outcomes(decisions: Sequence[Decision]) -> list[Record | Refusal]:
    return [d.refusal if d.refusal is not None else d.records[0] for d in decisions]


def load_registry(config: NodeConfig, store: Store) -> Registry:
    """The newest registry the node holds: its file or its database, whichever is newer.

    Both are verified against the Chair's key; a file that fails is an error, not
    silently ignored, because the operator put it there."""
    best: Registry | None = None
    # Held before a rotation of the Chair's key: a former key verifies them (it verified
    # them when they came); what arrives from now on needs the current one.
    former = config.former_chair_public_keys
    frames = store.registry_frames()
    # The newest the current Chair key signed, else the newest of all: the one the node
    # held last, since save_registry drops the rows a registry it took replaced (newer()).
    current = key_id(config.chair_public_key)
    held = [f for f in frames if _signer(f) == current][-1:] or frames[-1:]
    for frame in held:
        try:
            best = open_registry_frame(frame, config.chair_public_key, former)
        except ProtocolError as exc:
            # Every command fails here; the likelier cause is the key it was checked with.
            raise RegistryFileError(
                f"the registry in the database does not verify against chair_public_key "
                f"(node.toml, or KPX_CHAIR_PUBLIC_KEY if set): {exc}. After a rotation of "
                "the Chair's key, list the key it replaced in former_chair_public_keys"
                ) from exc
    path: Path = config.registry_path
    if path.exists():
        data = path.read_bytes()
        try:
            from_file = open_registry_frame(data, config.chair_public_key, former)
        except ProtocolError as exc:
            if str(exc.reason).startswith("frame."):  # no signed frame: no key to blame
                draft = data.lstrip()[:1] == b"{"
                raise RegistryFileError(
                    f"{path} is not a signed registry ({exc})"
                    + (": it holds JSON, as the Chair's draft registry.json does"
                       if draft else "")
                    + "; put the Chair-signed registry.kpx there") from exc
            raise RegistryFileError(f"{path} does not verify against chair_public_key "
                                    f"(node.toml, or KPX_CHAIR_PUBLIC_KEY if set): {exc}"
                                    ) from exc
        if newer(best, from_file, config.chair_public_key) and not signed_by(
                from_file, config.chair_public_key):
            raise RegistryFileError(
                f"{path} (version {from_file.version}) is signed by a former Chair key and "
                "is newer than the registry this node holds: a registry from before the "
                "rotation is taken only as it came then; ask the Chair for one its current "
                "key signed")
        if newer(best, from_file, config.chair_public_key):
            best = from_file
            with store.transaction():
                store.save_registry(best.version, best.frame, now_ms())
                # Kept as evidence too, so verify-log knows every key that ever signed.
                store.append_evidence("in", best.frame, best.message_id, None, now_ms())
    if best is None:
        raise RegistryFileError(f"no registry: put the Chair-signed registry at {path}")
    return best


def _signer(frame: bytes) -> bytes | None:
    try:
        return parse_frame(frame).key_id
    except ProtocolError:
        return None  # verified below, if it is the one taken


class RegistryFileError(Exception):
    """The registry file is missing or does not verify against the Chair's key."""


__all__ = ["Arrival", "CommandRefused", "Delivery", "Node", "Verdict", "broker_user_for",
           "certificate_of", "now_ms", "side_of"]
