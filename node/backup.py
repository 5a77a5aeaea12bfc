"""``kpnode backup`` and ``kpnode restore``: a node's state in one archive, taken live.

The database is copied with SQLite's online backup API, so a backup can be taken while
``kpnode run`` is working: it is a consistent snapshot of one instant, never a torn file.
The archive also holds ``node.toml``, the registry file, the node's **private key** and
the keys made for a rotation (``keys/*.key``), and the API's hashed tokens
(``tokens.json``) — it is written readable by its owner only, and must be kept like the
key itself.

After a restore, messages the node acknowledged after the snapshot are not redelivered by
the broker. Exporters re-send unanswered certificates (``resend_after_seconds``) and the
de-duplicating inbox answers them again; for the rest, restore the newest backup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from node.config import CONFIG_NAME, KEYS_DIR, ConfigError, NodeConfig, load_config
from node.interrupt import sigterm_as_interrupt
from node.machine import Side, State
from node.service import now_ms
from node.store import Store, require_database
from node.tokens import TOKENS_NAME

#: Files of a node directory the archive carries besides the database.
CARRIED = (CONFIG_NAME, TOKENS_NAME)
#: A file in a backup's temporary folder, locked for as long as the backup runs: a folder
#: whose file nobody holds was left by a backup that was killed (``kill -9``, a host that
#: went down), with a partial archive and a snapshot of the database in it.
IN_PROGRESS = ".kpx-backup-in-progress"


def _secrets(config: NodeConfig) -> list[str]:
    """The node directory's files only its owner may read: keys, tokens, the database."""
    folder = config.path(KEYS_DIR)
    rotated = sorted(f"{KEYS_DIR}/{p.name}" for p in folder.glob("*.key")) \
        if folder.is_dir() else []
    return [config.signing_key_file, *rotated, TOKENS_NAME, config.database]


def backup(config: NodeConfig, out: Path) -> list[str]:
    """Write ``out`` (tar.gz, mode 0600); returns the member names.

    The archive is written under a temporary name beside ``out``, synced, and only then
    given its name: a backup cut short (a full disk, a timeout's SIGTERM, a host going
    down) leaves no truncated archive under the name, which would restore as a broken
    one and refuse the retry. The database's snapshot is made beside it too, not in
    ``$TMPDIR``, and removed with it."""
    if out.exists():
        raise ConfigError(f"{out} exists already; not overwriting a backup")
    # Not an empty one (sqlite3.connect would make it), nor another Participant's.
    Store(config.database_path, create=False, owner=config.participant).close()
    folder = out.parent
    if not folder.is_dir():
        raise ConfigError(f"no directory {folder} to write {out.name} into")
    clear_stopped_backups(folder)
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(
                prefix=f".{out.name}.", dir=folder) as tmp, _in_progress(Path(tmp)):
            partial = Path(tmp) / out.name
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            members = _write(config, fd, Path(tmp))
            _give_name(partial, out)
            _sync_directory(folder)
        return members
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(out)
        raise


@contextlib.contextmanager
def _in_progress(scratch: Path) -> Iterator[None]:
    """Hold :data:`IN_PROGRESS` in ``scratch`` locked while the backup runs. It is locked
    under another name and then renamed, so that no other backup ever finds it unlocked
    while this one lives."""
    fd = os.open(scratch / (IN_PROGRESS + ".new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(scratch / (IN_PROGRESS + ".new"), scratch / IN_PROGRESS)
        yield
    finally:
        # gone before the lock is: the folder, removed next, is never taken for a killed
        # backup's by another one meanwhile
        with contextlib.suppress(OSError):
            os.unlink(scratch / IN_PROGRESS)
        os.close(fd)


def clear_stopped_backups(folder: Path) -> list[str]:
    """Remove what killed backups left in ``folder`` (their temporary folders, each with a
    partial archive holding the node's private key); returns their names. A folder is
    removed only when its :data:`IN_PROGRESS` file is there and nobody holds its lock: a
    backup running now (in another process, or on another host sharing the folder) keeps
    its own."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    cleared = []
    for entry in entries:
        if not entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            # for writing: on NFS an exclusive lock needs it
            fd = os.open(entry / IN_PROGRESS, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not a backup's, or gone meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a backup running now
            shutil.rmtree(entry, ignore_errors=True)
            cleared.append(entry.name)
        finally:
            os.close(fd)
    return cleared


def _give_name(partial: Path, out: Path) -> None:
    """Name the finished archive ``out``, never over one that appeared meanwhile."""
    try:
        os.link(partial, out)
    except FileExistsError:
        raise ConfigError(f"{out} exists already; not overwriting a backup") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # No hard links here (vfat, exFAT, many SMB shares): a rename, after one more
        # look, which leaves a moment in which another archive could be replaced.
        if out.exists():
            raise ConfigError(f"{out} exists already; not overwriting a backup") from None
        os.rename(partial, out)


def _sync_directory(folder: Path) -> None:
    """Make a new name in ``folder`` last through a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(config: NodeConfig, fd: int, scratch: Path) -> list[str]:
    members: list[str] = []
    with os.fdopen(fd, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w:gz") as tar:
            # A flat name: `database` may name a subdirectory ("data/node.sqlite3", a
            # volume of its own), which the scratch folder does not have.
            snapshot = scratch / "snapshot.sqlite3"
            source = sqlite3.connect(config.database_path)
            target = sqlite3.connect(snapshot)
            try:
                source.backup(target)
                verdict = _integrity(target)
            finally:
                target.close()
                source.close()
            if verdict != "ok":
                # The backup API copies pages as they are: a damaged database made an
                # archive that 'kpnode restore' refuses, found out only on the day it
                # was needed.
                raise ConfigError(
                    f"the database {config.database_path} fails SQLite's integrity check "
                    f"({verdict}): an archive of it would not restore, so none was written. "
                    "Keep the last good backup; copy the damaged file aside for a closer "
                    "look (deploy/RUNBOOK.md, 'Backing up and restoring a node')")
            tar.add(snapshot, arcname=config.database)
            members.append(config.database)
            snapshot.unlink()
            for name in dict.fromkeys((*CARRIED, config.registry_file, *_secrets(config))):
                if name == config.database:
                    continue
                path = config.path(name)
                if path.exists():
                    tar.add(path, arcname=name)
                    members.append(name)
            taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            stamp = f"kpx backup of {config.participant} taken {taken}\n"
            info = tarfile.TarInfo("BACKUP-INFO")
            info.size = len(stamp)
            info.mtime = int(time.time())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(stamp.encode()))
        raw.flush()
        os.fsync(raw.fileno())
    return members


def _integrity(db: sqlite3.Connection) -> str:
    """SQLite's integrity check of ``db``: "ok", or what it found (its first lines)."""
    try:
        rows = db.execute("PRAGMA integrity_check(5)").fetchall()
    except sqlite3.DatabaseError as exc:  # too damaged to be checked at all
        return str(exc)
    return "; ".join(str(row[0]) for row in rows)


def restore(archive: Path, directory: Path) -> NodeConfig:
    """Unpack a backup into a new or empty node directory and check what was restored.

    The archive is unpacked and checked in a hidden folder inside ``directory`` and its
    files are moved up only when every check passed: a refused or broken archive leaves
    ``directory`` as it was, so a retry with a good one is not refused. The folder is
    inside, not beside: the directory may be a volume's mount point, or sit in a parent
    the node's user may not write, and a rename across either would fail. A restore
    killed part-way leaves that folder (and what it had moved up): the next one in the
    same directory takes both away first."""
    with sigterm_as_interrupt():  # a timeout's SIGTERM cleans up as Ctrl-C does
        if directory.is_dir():
            _clear_interrupted_restore(directory)
        # lost+found: a freshly made ext4 volume mounted as the node directory has one
        if directory.exists() and (not directory.is_dir() or any(
                p.name != "lost+found" for p in directory.iterdir())):
            raise ConfigError(f"{directory} exists and is not an empty directory; restore "
                              "into a new or empty one")
        # what to remove on failure: the first folder this restore creates, if any
        created = next((p for p in (*reversed(directory.parents), directory)
                        if not p.exists()), None)
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        try:
            config = _unpack_and_check(archive, staging)
            # node.toml last: a directory with it (and no staging folder) is a whole node
            names = sorted((e.name for e in staging.iterdir()),
                           key=lambda name: name == CONFIG_NAME)
            # what a restore stopped while moving them up (kill -9) had put there, for
            # the next one to take away (_clear_interrupted_restore)
            (staging / MOVING).write_text(json.dumps(names))
            for name in names:
                (staging / name).rename(directory / name)
            (staging / MOVING).unlink()
            staging.rmdir()
        except BaseException:
            shutil.rmtree(created or staging, ignore_errors=True)
            raise
    return dataclasses.replace(config, directory=directory)


STAGING_PREFIX = ".kpx-restore-"
MOVING = ".moving-up"


def _clear_interrupted_restore(directory: Path) -> None:
    """Take away what a restore stopped part-way (kill -9, a power cut) left in
    ``directory``: its staging folder and the files it had moved up from it, so that the
    restore can simply run again; it refused the directory as not empty. Only when
    everything beside the staging folders is what they say was moved up, and node.toml
    (moved last) is not among it: otherwise the directory is left alone."""
    stagings = [p for p in directory.iterdir()
                if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink()]
    if not stagings:
        return
    moved: set[str] = set()
    for staging in stagings:
        try:
            moved.update(json.loads((staging / MOVING).read_text()))
        except FileNotFoundError:
            pass  # stopped while unpacking: nothing moved up yet
        except (OSError, ValueError, TypeError):
            return
    others = [p for p in directory.iterdir() if p.name != "lost+found" and p not in stagings]
    if any(p.name not in moved or p.name == CONFIG_NAME for p in others):
        return
    for path in [*others, *stagings]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _unpack_and_check(archive: Path, directory: Path) -> NodeConfig:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = tar.getnames()
            if CONFIG_NAME not in names:
                raise ConfigError(f"{archive} is not a kpx backup (no {CONFIG_NAME})")
            tar.extractall(directory, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:  # EOFError: a truncated archive
        raise ConfigError(f"cannot read backup {archive}: {exc}") from exc
    config = load_config(directory)
    inside = directory.resolve()
    for name in (config.database, config.registry_file, config.signing_key_file):
        if not config.path(name).resolve().is_relative_to(inside):
            raise ConfigError(f"the backup's {CONFIG_NAME} names {name!r}, outside the node "
                              "directory; restore it by hand")
    for name in _secrets(config):
        if config.path(name).exists():
            config.path(name).chmod(0o600)
    if config.path(KEYS_DIR).is_dir():  # made by the unpacking, as 'kpnode key new' makes it
        config.path(KEYS_DIR).chmod(0o700)
    require_database(config.database_path)
    db = sqlite3.connect(config.database_path)
    try:
        verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()
    if verdict != "ok":
        raise ConfigError(f"restored database fails its integrity check: {verdict}")
    _send_delivered_again(config)
    return config


def _send_delivered_again(config: NodeConfig) -> None:
    """Queue every certificate the backup holds as delivered, not confirmed, to be sent
    once more. Its importer may have confirmed it since the snapshot, to the node this one
    replaces: it answers a certificate sent again with its receipt and, once confirmed,
    its confirmation (SPEC §13, "Duplicates"), so the loop closes here too instead of
    staying open until it expires."""
    with contextlib.closing(Store(config.database_path, create=False,
                                  owner=config.participant)) as store, store.transaction():
        for record in store.records(side=Side.EXPORT, states=[State.DELIVERED]):
            store.requeue(record.message_id, now_ms())
