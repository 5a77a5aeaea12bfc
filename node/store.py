"""SQLite storage of one node: certificates, outbox, inbox, evidence log, registry.

A thin shell: it turns the state machine's records and signed frames into rows and back,
and offers one transaction at a time. Durability choices (see deploy/ docs): WAL journal
with ``synchronous=FULL`` — the node acknowledges a delivery to the broker only after the
commit, so a commit must survive a power cut, not just a process crash (bookkeeping that is
safe to redo may commit with ``durable=False``). Several processes
may write (``kpnode issue`` while ``kpnode run`` is up): every write transaction starts
with ``BEGIN IMMEDIATE`` and waits for the lock.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from node.evidence import GENESIS, Entry, entry_hash
from node.machine import Record, RecordKey, Sealed, Side, State
from protocol import Certificate, ImportConfirmation, ProtocolError
from protocol.codec import pack, unpack
from protocol.schema import validate_certificate, validate_import_confirmation

#: Each migration brings the schema from version i to i+1; never edit one that shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE certificates (
        side TEXT NOT NULL,
        number TEXT NOT NULL,
        partner TEXT NOT NULL,
        state TEXT NOT NULL,
        certificate BLOB NOT NULL,
        certificate_digest BLOB NOT NULL,
        message_id TEXT NOT NULL,
        confirmation BLOB,
        rejection_reason TEXT,
        rejection_text TEXT,
        replaces TEXT,
        replaced_by TEXT,
        issued_on TEXT NOT NULL,
        expires_on TEXT NOT NULL,
        discrepancy INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (side, number)
    );
    CREATE INDEX certificates_by_state ON certificates (state, expires_on);
    CREATE INDEX certificates_by_partner ON certificates (partner);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        recipient TEXT NOT NULL,
        kind TEXT NOT NULL,
        frame BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error TEXT,
        published_at INTEGER
    );
    CREATE INDEX outbox_due ON outbox (published_at, next_attempt_at);
    CREATE TABLE inbox (
        sender TEXT NOT NULL,
        message_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT,
        answer_message_id TEXT,
        PRIMARY KEY (sender, message_id)
    );
    CREATE TABLE evidence (
        seq INTEGER PRIMARY KEY,
        recorded_at INTEGER NOT NULL,
        direction TEXT NOT NULL,
        message_id TEXT NOT NULL,
        certificate TEXT,
        frame BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE INDEX evidence_by_certificate ON evidence (certificate);
    CREATE INDEX evidence_by_message ON evidence (message_id);
    CREATE TABLE registry (
        version INTEGER PRIMARY KEY,
        frame BLOB NOT NULL,
        received_at INTEGER NOT NULL
    );
    """,
    # 2: the HTTP API's idempotency keys, so a retried create returns its first answer
    """
    CREATE TABLE idempotency (
        principal TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        status INTEGER NOT NULL,
        body BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (principal, key)
    );
    """,
    # 3: how often a row reached the broker, apart from failed attempts: the resend of an
    # unanswered certificate backs off per send, and an outage's failures must not stretch
    # that from hours to weeks. Rows sent before: counted once.
    """
    ALTER TABLE outbox ADD COLUMN sends INTEGER NOT NULL DEFAULT 0;
    UPDATE outbox SET sends = 1 WHERE published_at IS NOT NULL;
    """,
    # 4: the relay keeps each recipient's messages in order (Store.due): it asks, per row
    # due, whether an older row to the same recipient waits for a retry.
    """
    CREATE INDEX outbox_waiting ON outbox (recipient, published_at, next_attempt_at);
    """,
    # 5: a certificate that arrives after its replacement is recorded replaced at once
    # (Store.successor); only replacements have the column set.
    """
    CREATE INDEX certificates_by_replaces ON certificates (replaces)
        WHERE replaces IS NOT NULL;
    """,
    # 6: whose records these are (Store.claim), so that a database copied in from another
    # Participant's node is refused instead of being taken for this node's own.
    """
    CREATE TABLE owner (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        participant TEXT NOT NULL
    );
    """,
    # 7: what status, the console and the API read on every call, answered from an index
    # instead of the whole table, which after a few years of trade holds tens of thousands
    # of certificates: the counts per partner, side and state (covering, so no row is
    # read; it serves a partner's records as the old partner index did), a quarter's
    # certificates for the statistics, and records in the order they were made (a page
    # of them no longer sorts them all first).
    """
    DROP INDEX IF EXISTS certificates_by_partner;
    CREATE INDEX IF NOT EXISTS certificates_by_partner_state
        ON certificates (partner, side, state);
    CREATE INDEX IF NOT EXISTS certificates_by_issue ON certificates (issued_on);
    CREATE INDEX IF NOT EXISTS certificates_by_creation ON certificates (created_at, number);
    """,
)

#: the furthest ahead a failed publish is ever retried (the relay's backoff stops there)
MAX_RETRY_DELAY_MS = 60_000


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    message_id: str
    recipient: str
    kind: str
    frame: bytes
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Seen:
    """How an incoming message was decided (its row in the inbox table)."""

    outcome: str  # "accepted" or "refused"
    answer_message_id: str | None
    reason: str | None  # the refusal's reason
    kind: str = ""  # the message's kind, as it came the first time


class StoreError(Exception):
    """The database cannot be used (locked for too long, disk full, corrupt ...)."""


class UnreadableRecord(Exception):
    """One row that kpx did not write as it stands (edited outside kpx). Not a StoreError:
    the store works, so the node goes on with everything else, and a message that needs
    this row is set aside like any message that cannot be processed."""


def require_database(path: Path) -> None:
    """StoreError unless a node's database is there: see ``Store(create=False)``. An
    empty file (truncated, or restored from a backup that was) would be taken by SQLite
    as a new database, with every loop forgotten and numbers issued again."""
    if not path.exists():
        raise StoreError(f"no database at {path} ('kpnode init' creates it; 'kpnode "
                         "restore' brings one back from a backup)")
    wal = path.with_name(path.name + "-wal")
    if path.is_file() and path.stat().st_size == 0 and not (
            wal.exists() and wal.stat().st_size > 0):
        raise StoreError(f"the database {path} is empty (0 bytes): it was truncated or "
                         "replaced. Restore it from a backup ('kpnode restore')")


T = TypeVar("T")


async def read_apart(database: Path, read: Callable[[Store], T]) -> T:
    """``read`` on a connection of its own, in a worker thread: for reads of thousands of
    records (a quarter's statistics, the metrics' open loops) that would otherwise hold a
    running node's event loop, its consumer and its HTTP answers with it, for the whole
    read. WAL lets the connection read beside the node's writes; the loop has the
    interpreter back every few milliseconds."""
    def run() -> T:
        # Used by the thread that made it, only. Not migrated: the running node's store is
        # already, and a migration's check takes the write lock, which another process
        # (a CLI command, a sqlite3 shell) may hold for long where a read needs none.
        store = Store(database, create=False, migrate=False)
        try:
            return read(store)
        finally:
            store.close()
    return await asyncio.to_thread(run)


def is_store_fault(exc: BaseException) -> bool:
    """Whether an exception says the database cannot be used (as opposed to a constraint,
    a wrong value or a bug in a statement): SQLite's operational and internal errors, and
    the bare DatabaseError it raises for a damaged file ("database disk image is
    malformed", "file is not a database")."""
    return (isinstance(exc, sqlite3.OperationalError | sqlite3.InternalError)
            or type(exc) is sqlite3.DatabaseError)


class Store:
    def __init__(self, path: Path | str, *, timeout: float = 30.0, create: bool = True,
                 owner: str | None = None, migrate: bool = True) -> None:
        """Open (``create``: or make) the database at ``path``. A node opens its own with
        ``create=False``: a database gone missing (a volume not mounted, a typo in
        ``node.toml``) must be an error, not a fresh empty store that forgets every loop.
        With ``owner``, another Participant's database is refused before anything in it
        changes, and one without an owner is claimed (:meth:`claim`). ``migrate=False``
        leaves the schema as it is, for a reader of a store its node has migrated."""
        self.path = Path(path)
        if not create:
            require_database(self.path)
        try:
            # Made readable by its owner only, as the key is: it holds every certificate,
            # party and value. SQLite gives the -wal and -shm files the database's mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot create the database {self.path}: "
                             f"{exc.strerror or exc}") from exc
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            if owner is not None and (problem := self._not_owned_by(owner)) is not None:
                raise problem
            if migrate:
                self._migrate()
            if owner is not None:
                self.claim(owner)
        except sqlite3.Error as exc:  # not a database, a directory, no permission ...
            raise StoreError(f"cannot open the database {self.path}: {exc}") from exc
        except StoreError:
            self.db.close()
            raise
        self._last_hash: tuple[int, bytes] | None = None

    def wait_for_locks(self, seconds: float) -> None:
        """How long a transaction waits for another process's write lock before it fails
        with StoreError (30 s unless set)."""
        self.db.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        with self.transaction():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                # Written by a newer kpx: this one would misread or damage it.
                raise StoreError(f"the database {self.path} has schema version {version}; "
                                 f"this kpx knows up to {len(MIGRATIONS)}. Run the kpx "
                                 "version that wrote it (or newer)")
            for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={i}")

    def claim(self, participant: str) -> None:
        """Make sure these are ``participant``'s records: StoreError if the database is
        another Participant's. One made before kpx recorded its owner is claimed now,
        unless its own certificates are numbered for someone else."""
        if (problem := self._not_owned_by(participant)) is not None:
            raise problem
        if self._table_exists("owner"):
            with self.transaction():
                self.db.execute("INSERT OR IGNORE INTO owner (only, participant) "
                                "VALUES (1, ?)", (participant,))

    def _not_owned_by(self, participant: str) -> StoreError | None:
        """Why these are not ``participant``'s records, or None; reads only, so that it can
        run before a migration changes a database that is not this node's."""
        if self._table_exists("owner"):
            row = self.db.execute("SELECT participant FROM owner").fetchone()
            if row is not None:
                return None if row[0] == participant else self._not_ours(
                    participant, f"Participant {row[0]}")
        if self._table_exists("certificates"):
            foreign = self.db.execute(
                "SELECT number FROM certificates WHERE side = ? AND substr(number, 1, ?)"
                " != ? LIMIT 1", (Side.EXPORT.value, len(participant), participant)
            ).fetchone()
            if foreign is not None:
                return self._not_ours(participant, f"a node that exported {foreign[0]}")
        return None

    def _not_ours(self, participant: str, owner: str) -> StoreError:
        return StoreError(f"the database {self.path} holds the records of {owner}, not of "
                          f"{participant}: a database copied from another node? Put this "
                          "node's own back, or restore its backup ('kpnode restore')")

    def _table_exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                               "name = ?", (name,)).fetchone() is not None

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """One write transaction; rolled back if the block raises.

        ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL``):
        a process crash still keeps it, a power cut may undo it. Only for bookkeeping whose
        loss is repaired by doing the work again, such as marking outbox rows sent (lost,
        they are sent again with the same id and the receiver recognises them). The next
        durable commit makes it durable too: the WAL is one file, synced up to its end."""
        if not durable:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot start a transaction on {self.path}: {exc}") from exc
            self._last_hash = None
            try:
                yield
            except BaseException as exc:
                self._roll_back()
                if is_store_fault(exc):
                    # A full disk, an I/O error, a lock held too long, a damaged file: a
                    # fault of the store, not of what was being written, so the caller
                    # holds its work and retries instead of taking it for a poison message
                    # (which a damaged database made of every delivery: each dead-lettered
                    # after the delivery limit).
                    raise StoreError(f"cannot write to {self.path}: {exc}") from exc
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._roll_back()
                raise StoreError(f"cannot commit to {self.path}: {exc}") from exc
        finally:
            if not durable:
                self.db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that all see the database as it was at the first of them, however long
        they take: a read transaction, not a write one, so a running node goes on
        committing meanwhile (WAL). For work that reads the same tables more than once
        (``verify-log`` reads the log twice) and must not find the one read newer than
        the other. Not inside another transaction: SQLite has no nested ones."""
        self.db.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            self._roll_back()  # nothing was written: ends the read transaction

    def _roll_back(self) -> None:
        # SQLite rolls back by itself on some errors (a full disk): a second ROLLBACK would
        # fail and hide the first error.
        if self.db.in_transaction:
            with suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")

    # -- certificates ----------------------------------------------------------------

    def save(self, records: Iterable[Record]) -> None:
        self.db.executemany(
            """INSERT INTO certificates (side, number, partner, state, certificate,
                   certificate_digest, message_id, confirmation, rejection_reason,
                   rejection_text, replaces, replaced_by, issued_on, expires_on, discrepancy,
                   created_at, updated_at)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT (side, number) DO UPDATE SET
                   state=excluded.state, confirmation=excluded.confirmation,
                   rejection_reason=excluded.rejection_reason,
                   rejection_text=excluded.rejection_text, replaced_by=excluded.replaced_by,
                   discrepancy=excluded.discrepancy, updated_at=excluded.updated_at""",
            [
                (
                    str(r.side), r.number, r.partner, str(r.state),
                    pack(r.certificate.to_wire()), r.certificate_digest, r.message_id,
                    pack(r.confirmation.to_wire()) if r.confirmation else None,
                    r.rejection_reason, r.rejection_text, r.replaces, r.replaced_by,
                    r.certificate.issued_on.isoformat(), r.certificate.expires_on.isoformat(),
                    int(bool(r.discrepancies)), r.updated_at, r.updated_at,
                )
                for r in records
            ],
        )

    _COLUMNS = """side, number, partner, state, certificate, certificate_digest, message_id,
                  confirmation, rejection_reason, rejection_text, replaces, replaced_by,
                  updated_at"""

    def load(self, keys: Iterable[RecordKey]) -> dict[RecordKey, Record]:
        found: dict[RecordKey, Record] = {}
        for side, number in keys:
            row = self.db.execute(
                f"SELECT {self._COLUMNS} FROM certificates WHERE side=? AND number=?",
                (str(side), number),
            ).fetchone()
            if row is not None:
                found[(side, number)] = _record(row)
        return found

    def get(self, side: Side, number: str) -> Record | None:
        return self.load([(side, number)]).get((side, number))

    def find(self, number: str) -> list[Record]:
        rows = self.db.execute(
            f"SELECT {self._COLUMNS} FROM certificates WHERE number=? ORDER BY side", (number,)
        )
        return [_record(row) for row in rows]

    def successor(self, number: str, partner: str) -> Record | None:
        """The certificate received from ``partner`` as the replacement of ``number`` and
        not refused, if one came before ``number`` itself (machine.Before)."""
        # Asked for every certificate that arrives. Left to choose, SQLite takes the index
        # on (partner, side, state), which reads all of a partner's imports (5 ms per
        # message at 60,000 records) where this one holds only replacements.
        row = self.db.execute(
            f"SELECT {self._COLUMNS} FROM certificates INDEXED BY certificates_by_replaces "
            "WHERE replaces=? AND side=? AND partner=? AND state<>? ORDER BY created_at "
            "LIMIT 1",
            (number, str(Side.IMPORT), partner, str(State.REJECTED)),
        ).fetchone()
        return None if row is None else _record(row)

    def early_cancellations(self, sender: str, number: str) -> list[bytes]:
        """Frames that may be a cancellation of ``number`` which ``sender`` sent and this
        node accepted before it held the certificate (machine.Before): the inbox says it
        was accepted, the evidence log keeps its frame. The log has no sender column and
        senders choose their message ids, so another sender's frame may share the id: the
        caller keeps only a frame whose signed sender and number are the ones asked for."""
        rows = self.db.execute(
            "SELECT e.frame FROM evidence e JOIN inbox i ON i.sender=? AND "
            "i.message_id=e.message_id WHERE e.certificate=? AND e.direction='in' AND "
            "i.kind='cancellation' AND i.outcome='accepted' ORDER BY e.seq",
            (sender, number))
        return [bytes(row[0]) for row in rows]

    def records(self, *, side: Side | None = None, states: Iterable[State] = (),
                partner: str | None = None, expiring_before: str | None = None,
                issued_between: tuple[date, date] | None = None, limit: int | None = None,
                offset: int = 0, last: int | None = None,
                unreadable: list[UnreadableRecord] | None = None) -> list[Record]:
        """Records in the order they were made; ``limit`` and ``offset`` page in SQL, so a
        page costs what it holds, not what the node has recorded in all its years.
        ``last`` keeps only the ``last`` made, still oldest first (the tail of a list, read
        from its end: what it holds, not the years before it).

        A row kpx cannot read raises :class:`UnreadableRecord`, unless ``unreadable`` is
        given: then it is left out and added there, for work that should go on with every
        other record (the sweep's expiry, the metrics)."""
        return list(self.each_record(side=side, states=states, partner=partner,
                                     expiring_before=expiring_before,
                                     issued_between=issued_between, limit=limit,
                                     offset=offset, last=last, unreadable=unreadable))

    def each_record(self, *, side: Side | None = None, states: Iterable[State] = (),
                    partner: str | None = None, expiring_before: str | None = None,
                    issued_between: tuple[date, date] | None = None,
                    limit: int | None = None, offset: int = 0, last: int | None = None,
                    unreadable: list[UnreadableRecord] | None = None) -> Iterator[Record]:
        """:meth:`records` one at a time, as they are read: a caller that writes each out
        (``kpnode list`` of a node's years) holds one, not tens of thousands. Read to the
        end (or closed) before the next write: the open read holds a snapshot."""
        if last is not None and limit is not None:
            raise ValueError("last and limit are each a page of their own")
        # The tail is read newest first along certificates_by_creation, stopping at
        # ``last`` (0.2 ms for the newest 200 of 60,000); left to itself, SQLite chose the
        # filters' index and sorted every match (36 ms).
        where, args = self._where(side=side, states=states, partner=partner,
                                  expiring_before=expiring_before,
                                  issued_between=issued_between, by_index=last is None)
        page = "" if limit is None else f" LIMIT {int(limit)} OFFSET {int(offset)}"
        chosen = "certificates"
        if last is not None:
            chosen = (f"(SELECT {self._COLUMNS}, created_at FROM certificates WHERE {where} "
                      f"ORDER BY created_at DESC, number DESC LIMIT {int(last)})")
            where = "1=1"
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM {chosen} WHERE {where} "
                               f"ORDER BY created_at, number{page}", args)
        for row in rows:
            try:
                yield _record(row)
            except UnreadableRecord as exc:
                if unreadable is None:
                    raise
                unreadable.append(exc)

    def records_after(self, after: int, limit: int, *, side: Side | None = None,
                      states: Iterable[State] = (), partner: str | None = None,
                      ) -> tuple[list[Record], int]:
        """A page of records in the order the node first recorded them, from just after
        position ``after`` (0: the first), and the position of the page's last record.

        The position is the row's own (SQLite's rowid, kept when a record changes), so
        paging on from it neither skips nor repeats a record when others change state
        between pages or the wall clock is set back, as paging by offset over a filter
        or by creation time would."""
        where, args = self._where(side=side, states=states, partner=partner)
        rows = self.db.execute(
            f"SELECT {self._COLUMNS}, rowid FROM certificates WHERE {where} AND rowid > ? "
            f"ORDER BY rowid LIMIT {int(limit)}", [*args, after]).fetchall()
        return [_record(row[:-1]) for row in rows], (int(rows[-1][-1]) if rows else after)

    def count_records(self, *, side: Side | None = None, states: Iterable[State] = (),
                      partner: str | None = None) -> int:
        """How many :meth:`records` would return, without reading them."""
        where, args = self._where(side=side, states=states, partner=partner)
        return int(self.db.execute(f"SELECT count(*) FROM certificates WHERE {where}",
                                   args).fetchone()[0])

    @staticmethod
    def _where(*, side: Side | None, states: Iterable[State], partner: str | None,
               expiring_before: str | None = None,
               issued_between: tuple[date, date] | None = None,
               by_index: bool = True) -> tuple[str, list[str]]:
        """The filters as SQL. ``by_index=False`` keeps SQLite from reading by their
        indexes (a column named ``+column`` is not looked up in an index), for a read
        that walks another index and stops early."""
        c = "" if by_index else "+"
        where, args = ["1=1"], []
        if side is not None:
            where.append(f"{c}side=?")
            args.append(str(side))
        state_list = [str(s) for s in states]
        if state_list:
            where.append(f"{c}state IN ({','.join('?' * len(state_list))})")
            args.extend(state_list)
        if partner is not None:
            where.append(f"{c}partner=?")
            args.append(partner)
        if expiring_before is not None:
            where.append(f"{c}expires_on < ?")
            args.append(expiring_before)
        if issued_between is not None:
            where.append(f"{c}issued_on BETWEEN ? AND ?")
            args.extend(d.isoformat() for d in issued_between)
        return " AND ".join(where), args

    def column_mismatches(self) -> list[str]:
        """Rows whose issued_on or expires_on column says another date than their
        certificate: the statistics select a quarter by the column, so such a row (only an
        edit outside kpx writes one) would drop out of its quarter unseen."""
        found = []
        for side, number, issued_on, expires_on, blob in self.db.execute(
                "SELECT side, number, issued_on, expires_on, certificate FROM certificates "
                "ORDER BY side, number"):
            try:
                certificate = _certificate(blob)
            except UnreadableRecord as exc:
                found.append(f"{side} {number}: {exc}")
                continue
            for column, value, day in (("issued_on", issued_on, certificate.issued_on),
                                       ("expires_on", expires_on, certificate.expires_on)):
                if value != day.isoformat():
                    found.append(f"{side} {number}: its {column} column says {value}, its "
                                 f"certificate {day.isoformat()}")
        return found

    def partner_counts(self) -> dict[tuple[str, str, str], int]:
        """Certificates per (partner, side, state)."""
        rows = self.db.execute("SELECT partner, side, state, count(*) FROM certificates "
                               "GROUP BY 1, 2, 3")
        return {(partner, side, state): n for partner, side, state, n in rows}

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self.db.execute("SELECT side, state, count(*) FROM certificates GROUP BY 1, 2")
        return {(side, state): n for side, state, n in rows}

    # -- outbox ----------------------------------------------------------------------

    def enqueue(self, messages: Iterable[Sealed], now_ms: int) -> None:
        """Queue signed frames for the relay. Re-queuing a frame already sent (the answer
        to a duplicate) sends the very same bytes again."""
        self.db.executemany(
            """INSERT INTO outbox (message_id, recipient, kind, frame, created_at,
                   next_attempt_at) VALUES (?,?,?,?,?,?)
               ON CONFLICT (message_id) DO UPDATE SET published_at=NULL,
                   next_attempt_at=excluded.next_attempt_at""",
            [(m.envelope.message_id, m.envelope.recipient, str(m.envelope.kind), m.frame,
              now_ms, now_ms) for m in messages],
        )

    def logged(self, direction: str, message_id: str, frame: bytes) -> bool:
        """Whether the evidence log holds these very bytes under this message id."""
        return self.db.execute(
            "SELECT 1 FROM evidence WHERE message_id=? AND direction=? AND frame=? LIMIT 1",
            (message_id, direction, frame)).fetchone() is not None

    def sending(self, message_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Where each of these outgoing messages stands in the outbox: when the broker took
        it (``published_at``, None while it waits), how often it was tried, the last error,
        the next try. A message not in the outbox has none."""
        ids = list(message_ids)
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):  # SQLite's bound on parameters
            chunk = ids[start:start + 500]
            for row in self.db.execute(
                    "SELECT message_id, published_at, attempts, last_error, next_attempt_at "
                    f"FROM outbox WHERE message_id IN ({','.join('?' * len(chunk))})", chunk):
                found[str(row[0])] = {"published_at": row[1], "attempts": int(row[2]),
                                      "last_error": row[3],
                                      "next_attempt_at": None if row[1] else row[4]}
        return found

    def outbox_frame(self, message_id: str) -> bytes | None:
        row = self.db.execute("SELECT frame FROM outbox WHERE message_id=?",
                              (message_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def sent_confirmation(self, number: str, recipient: str) -> str | None:
        """The message id of the import confirmation this node sent ``recipient`` for
        certificate ``number``, if it did."""
        row = self.db.execute(
            "SELECT o.message_id FROM evidence e JOIN outbox o ON o.message_id = e.message_id"
            " WHERE e.certificate = ? AND e.direction = 'out' AND o.kind = ?"
            " AND o.recipient = ? ORDER BY e.seq DESC LIMIT 1",
            (number, "import_confirmation", recipient)).fetchone()
        return None if row is None else str(row[0])

    def requeue(self, message_id: str, now_ms: int) -> None:
        """Queue a sent message again (a resend, a restore). Its ``created_at`` becomes now:
        the column says since when a row waits to be sent (the outbox's oldest age in
        status and /metrics, and nothing else reads it). Kept from the first queueing, a
        resend that met a broker down for a minute showed an outbox stuck for days. A row
        not yet sent (an answer asked for again by a duplicate) keeps its age: it has
        waited all along, and a partner's hourly resends would otherwise hide that."""
        self.db.execute("UPDATE outbox SET created_at=CASE WHEN published_at IS NULL "
                        "THEN created_at ELSE ? END, published_at=NULL, next_attempt_at=? "
                        "WHERE message_id=?", (now_ms, now_ms, message_id))

    def unanswered(self, now_ms: int, after_ms: int) -> list[str]:
        """Message ids of issued certificates (or replacements) sent but not yet receipted,
        whose resend is due: ``after_ms`` after the last send, doubling per send (failed
        attempts to publish do not count)."""
        rows = self.db.execute(
            """SELECT o.message_id, o.published_at, o.sends FROM certificates c
               JOIN outbox o ON o.message_id = c.message_id
               WHERE c.side = 'export' AND c.state = 'issued'
                 AND o.published_at IS NOT NULL AND o.published_at <= ?""",
            (now_ms - after_ms,))
        return [mid for mid, sent, sends in rows
                if sent + after_ms * 2 ** min(max(sends - 1, 0), 10) <= now_ms]

    def undo_clock_step(self, now_ms: int) -> int:
        """Times in the outbox that only a clock running ahead could have written (NTP
        stepping it back, a VM restored from a snapshot): sends after now, retries planned
        further ahead than any backoff plans. Left, they would hold resends and retries
        back by the size of the step; taken as now, they wait as planned. Returns how many
        rows moved."""
        moved = self.db.execute("UPDATE outbox SET published_at=? WHERE published_at > ?",
                                (now_ms, now_ms)).rowcount
        moved += self.db.execute(
            "UPDATE outbox SET next_attempt_at=? WHERE published_at IS NULL "
            "AND next_attempt_at > ?", (now_ms, now_ms + MAX_RETRY_DELAY_MS)).rowcount
        return moved

    def due(self, now_ms: int, limit: int) -> list[OutboxRow]:
        """The rows to publish now, oldest first — but none behind an older row to the same
        recipient that waits for its retry: messages to one Participant leave in the order
        they were written. A certificate whose publish failed must not be overtaken by its
        own cancellation or replacement, which the importer would refuse as naming a
        certificate it does not know, and then take the certificate as open."""
        rows = self.db.execute(
            """SELECT seq, message_id, recipient, kind, frame, attempts, last_error
               FROM outbox o
               WHERE published_at IS NULL AND next_attempt_at <= :now
                 AND NOT EXISTS (SELECT 1 FROM outbox w
                                 WHERE w.published_at IS NULL AND w.next_attempt_at > :now
                                   AND w.recipient = o.recipient AND w.seq < o.seq)
               ORDER BY seq LIMIT :limit""",
            {"now": now_ms, "limit": limit},
        )
        return [OutboxRow(*row) for row in rows]

    def mark_published(self, seqs: Iterable[int], now_ms: int) -> None:
        self.db.executemany("UPDATE outbox SET published_at=?, attempts=attempts+1, "
                            "sends=sends+1, last_error=NULL WHERE seq=?",
                            [(now_ms, s) for s in seqs])

    def mark_failed(self, seq: int, error: str, retry_at_ms: int) -> None:
        self.db.execute("UPDATE outbox SET attempts=attempts+1, last_error=?, "
                        "next_attempt_at=? WHERE seq=?", (error, retry_at_ms, seq))

    def backlog(self) -> list[OutboxRow]:
        rows = self.db.execute(
            """SELECT seq, message_id, recipient, kind, frame, attempts, last_error FROM outbox
               WHERE published_at IS NULL ORDER BY seq""")
        return [OutboxRow(*row) for row in rows]

    def outbox_summary(self) -> list[tuple[str, int, int, int, str | None]]:
        """Per recipient, what is not yet sent: (recipient, messages, oldest created_at —
        since when it waits, see requeue —, most attempts, the newest error) — for status
        and metrics, without loading frames."""
        rows = self.db.execute(
            """SELECT recipient, count(*), min(created_at), max(attempts),
                   (SELECT last_error FROM outbox e WHERE e.recipient = o.recipient
                      AND e.published_at IS NULL AND e.last_error IS NOT NULL
                    ORDER BY e.seq DESC LIMIT 1)
               FROM outbox o WHERE published_at IS NULL GROUP BY recipient
               ORDER BY recipient""")
        return [(str(r), int(n), int(oldest), int(attempts), None if err is None else str(err))
                for r, n, oldest, attempts, err in rows]

    def unanswered_summary(self) -> list[tuple[str, int, int]]:
        """Per partner, certificates (and replacements) this node has already sent again
        for want of a receipt, and still has none: (partner, certificates, oldest
        created_at). Their messages left the outbox (the partner's inbox holds them), so
        the outbox shows nothing: a partner's node down for hours or days is seen here
        only. A resend (``sends`` above 1) means ``resend_after_seconds`` passed unanswered."""
        rows = self.db.execute(
            """SELECT c.partner, count(*), min(c.created_at) FROM certificates c
               JOIN outbox o ON o.message_id = c.message_id
               WHERE c.side = 'export' AND c.state = 'issued' AND o.sends > 1
               GROUP BY c.partner ORDER BY c.partner""")
        return [(str(p), int(n), int(oldest)) for p, n, oldest in rows]

    def sent_at(self, message_id: str) -> tuple[int | None, str | None] | None:
        """(published_at, last_error) of one outbox message, ``None`` if not in the outbox."""
        row = self.db.execute("SELECT published_at, last_error FROM outbox WHERE message_id=?",
                              (message_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def withdraw(self, message_id: str, *, sent_too: bool = False) -> bool:
        """Take a message not yet sent out of the outbox (a ping nobody can receive), or
        with ``sent_too`` one sent as well (an answer about to be signed afresh: queued
        under a new seq, a confirm of the old bytes the relay has in flight cannot mark
        the new ones sent)."""
        cursor = self.db.execute("DELETE FROM outbox WHERE message_id=?"
                                 + ("" if sent_too else " AND published_at IS NULL"),
                                 (message_id,))
        return cursor.rowcount > 0

    # -- inbox -----------------------------------------------------------------------

    def seen(self, sender: str, message_id: str) -> Seen | None:
        """How this sender's message was decided, if it was processed before.

        Keyed by sender too, so one Participant cannot pre-empt another's message id."""
        row = self.db.execute("SELECT outcome, answer_message_id, reason, kind FROM inbox "
                              "WHERE sender=? AND message_id=?", (sender, message_id)).fetchone()
        return None if row is None else Seen(row[0], row[1], row[2], row[3])

    def remember(self, message_id: str, sender: str, kind: str, outcome: str,
                 reason: str | None, answer_message_id: str | None, now_ms: int) -> None:
        self.db.execute(
            "INSERT INTO inbox (message_id, sender, kind, received_at, outcome, reason, "
            "answer_message_id) VALUES (?,?,?,?,?,?,?)",
            (message_id, sender, kind, now_ms, outcome, reason, answer_message_id),
        )

    def refused_messages(self, limit: int
                         ) -> list[tuple[int, str, str, str, str | None, str | None]]:
        """``(received_at, sender, kind, message id, reason, answer's message id)`` of the
        newest refusals; the answer is None where none was sent (a rejection, pong or
        registry update is never answered, nor anything while no key could sign)."""
        rows = self.db.execute("SELECT received_at, sender, kind, message_id, reason, "
                               "answer_message_id FROM inbox WHERE outcome='refused' "
                               "ORDER BY received_at DESC LIMIT ?", (limit,))
        return [(int(a), str(b), str(c), str(d), None if e is None else str(e),
                 None if f is None else str(f)) for a, b, c, d, e, f in rows]

    # -- evidence log ----------------------------------------------------------------

    def append_evidence(self, direction: str, frame: bytes, message_id: str,
                        certificate: str | None, now_ms: int) -> int:
        """Chain one verbatim frame onto the log; returns its sequence number (asking the
        log afterwards could name another writer's entry). Call inside a transaction."""
        if self._last_hash is None:
            row = self.db.execute("SELECT seq, hash FROM evidence ORDER BY seq DESC LIMIT 1")
            last = row.fetchone()
            self._last_hash = (last[0], last[1]) if last else (0, GENESIS)
        prev_seq, prev_hash = self._last_hash
        seq = prev_seq + 1
        digest = entry_hash(prev_hash, seq, now_ms, direction, message_id, certificate, frame)
        self.db.execute(
            "INSERT INTO evidence (seq, recorded_at, direction, message_id, certificate, frame,"
            " hash) VALUES (?,?,?,?,?,?,?)",
            (seq, now_ms, direction, message_id, certificate, frame, digest),
        )
        self._last_hash = (seq, digest)
        return seq

    def evidence(self, certificate: str | None = None) -> Iterator[Entry]:
        query = ("SELECT seq, recorded_at, direction, message_id, certificate, frame, hash "
                 "FROM evidence")
        args: tuple[str, ...] = ()
        if certificate is not None:
            query += " WHERE certificate=?"
            args = (certificate,)
        for row in self.db.execute(query + " ORDER BY seq", args):
            yield Entry(*row)

    def evidence_after(self, seq: int) -> list[Entry]:
        """Entries appended after entry ``seq`` (what arrived since a point in time)."""
        rows = self.db.execute("SELECT seq, recorded_at, direction, message_id, certificate, "
                               "frame, hash FROM evidence WHERE seq > ? ORDER BY seq", (seq,))
        return [Entry(*row) for row in rows]

    def last_evidence_seq(self) -> int:
        return int(self.db.execute("SELECT coalesce(max(seq), 0) FROM evidence").fetchone()[0])

    def evidence_frame(self, message_id: str) -> bytes | None:
        row = self.db.execute("SELECT frame FROM evidence WHERE message_id=? ORDER BY seq "
                              "LIMIT 1", (message_id,)).fetchone()
        return None if row is None else bytes(row[0])

    # -- idempotency keys (HTTP API) -------------------------------------------------

    def idempotent_answer(self, principal: str, key: str) -> tuple[bytes, int, bytes] | None:
        """``(request fingerprint, status, body)`` of the first call made with this key."""
        row = self.db.execute("SELECT fingerprint, status, body FROM idempotency WHERE "
                              "principal=? AND key=?", (principal, key)).fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]), bytes(row[2]))

    def remember_idempotent(self, principal: str, key: str, fingerprint: bytes, status: int,
                            body: bytes, now_ms: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO idempotency (principal, key, fingerprint, "
                        "status, body, created_at) VALUES (?,?,?,?,?,?)",
                        (principal, key, fingerprint, status, body, now_ms))

    # -- registry --------------------------------------------------------------------

    def save_registry(self, version: int, frame: bytes, now_ms: int) -> None:
        # Only a registry the node took is saved, and it is the one the node holds: a row
        # at its version or above was signed by a former Chair key (forged, perhaps, with
        # the key a rotation retired, at a version as high as the wire allows) and this
        # one, the current key's, replaced it. Kept, it must not come back at a start:
        # after the Chair's next rotation both keys are former ones, and the newest row by
        # version was the forged one again. Its frame stays in the evidence log, where
        # verify-log learns its keys.
        self.db.execute("DELETE FROM registry WHERE version >= ?", (version,))
        self.db.execute("INSERT INTO registry (version, frame, received_at) VALUES (?,?,?)",
                        (version, frame, now_ms))

    def registry_frames(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.execute("SELECT frame FROM registry "
                                                      "ORDER BY version")]

    def latest_registry_frame(self) -> bytes | None:
        row = self.db.execute("SELECT frame FROM registry ORDER BY version DESC LIMIT 1")
        found = row.fetchone()
        return None if found is None else bytes(found[0])


def _record(row: tuple[Any, ...]) -> Record:
    (side, number, partner, state, certificate, digest, message_id, confirmation,
     rejection_reason, rejection_text, replaces, replaced_by, updated_at) = row
    try:
        return Record(
            side=Side(str(side)), number=str(number), partner=str(partner),
            state=State(str(state)), certificate=_certificate(certificate),
            certificate_digest=bytes(digest), message_id=str(message_id),
            updated_at=int(updated_at),
            confirmation=_confirmation(confirmation) if confirmation is not None else None,
            rejection_reason=_opt(rejection_reason), rejection_text=_opt(rejection_text),
            replaces=_opt(replaces), replaced_by=_opt(replaced_by),
        )
    except (ValueError, TypeError, UnreadableRecord) as exc:
        # Only an edit outside kpx writes such a row; acting on a guess would be worse.
        raise UnreadableRecord(f"the database holds a record kpx cannot read ({side} "
                               f"{number}: {exc}); it was changed outside kpx: restore it "
                               "from a backup") from None


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


def _certificate(blob: bytes) -> Certificate:
    return _parsed_certificate(bytes(blob))


@lru_cache(maxsize=4096)
def _parsed_certificate(blob: bytes) -> Certificate:
    # A loop loads its certificate at every step (receipt, confirmation, its answers);
    # parsing the same bytes again each time cost a busy node about 5 % of its CPU. The bytes
    # are the key, so a cached value is exactly what parsing them would give (Certificate
    # is immutable); errors are not cached.
    try:
        return validate_certificate(unpack(blob))
    except ProtocolError as exc:
        raise UnreadableRecord(f"stored certificate does not parse: {exc}") from exc


def _confirmation(blob: bytes) -> ImportConfirmation:
    try:
        return validate_import_confirmation(unpack(bytes(blob)))
    except ProtocolError as exc:
        raise UnreadableRecord(f"stored confirmation does not parse: {exc}") from exc
