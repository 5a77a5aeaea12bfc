"""Files of a node's state and secrets: written whole or not at all, and secrets read
only from files kept private.

A file created first and written after is left empty, or cut short, by a command stopped
in between (Ctrl-C, ``kill -9``, a full disk), and every later command that reads it
refuses it: a key file, a password, node.toml, the tokens. Each is written and synced
under a temporary name in its own directory, then renamed over the old one or linked to
its name; a temporary file that a killed write left there is removed by a later write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

#: a temporary file this old is one a killed write left: a write takes milliseconds
STALE_SECONDS = 600
#: the name of write_whole's temporary file (mkstemp's eight characters before .tmp); its
#: own prefix, for some directories written to are the user's (registrytool's output), where
#: another program's temporaries must never be taken for ours
_TEMPORARY = re.compile(r"\.kpx\..+\.[a-z0-9_]{8}\.tmp")


def write_whole(path: Path, data: bytes | str, *, mode: int = 0o600,
                exclusive: bool = False) -> None:
    """``path`` holds ``data``, or what it held before. ``exclusive`` never writes over
    an existing file (:class:`FileExistsError`), where two commands at once would each
    make a key or a password and one would be lost."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".kpx.{path.name}.",
                               suffix=".tmp")
    try:
        with contextlib.suppress(OSError):  # the cleaning is no reason to fail the write
            _clear_stale(path.parent, os.fstat(fd).st_mtime)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # FileExistsError rather than over an existing file
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # no hard links here (vfat, some SMB shares): a rename after one more look
            if path.exists():
                raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
            os.rename(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _clear_stale(directory: Path, now: float) -> None:
    """Remove what killed writes left in ``directory``: each a whole copy of what it
    wrote, a private key's too, kept there for good (a key's copy outliving the key's
    deletion; a new key has a new name, so not only copies of the file written). Only old
    ones: a write under way in another command is no older than a moment, and its
    temporary file must stay. ``now`` is the directory's own clock, the mtime of the
    temporary file just made: an NFS or SMB server stamps files by its clock, vfat in local
    time, and by the host's a share behind it made a write under way look stale."""
    cutoff = now - STALE_SECONDS
    for left in directory.glob(".kpx.*.tmp"):
        with contextlib.suppress(OSError):
            if not _TEMPORARY.fullmatch(left.name):
                continue
            found = left.lstat()
            # write_whole's temporaries are regular files: a link of the name is not ours
            if stat.S_ISREG(found.st_mode) and found.st_mtime < cutoff:
                left.unlink()


def read_secret(path: Path, what: str) -> str:
    """The text of a file holding a secret (a broker password, the key's passphrase), as
    it is; ``what`` names the file in the errors. Refused when others may read the file, as
    a signing key is (node.keyfile): whoever reads it holds the secret. A file owned by
    root may be read by its group too (PostgreSQL's rule for its TLS key): a Kubernetes
    secret is mounted so, 0440 for the pod's fsGroup, and the image's unprivileged user
    could read it no other way."""
    from node.config import ConfigError  # config writes node.toml with write_whole

    try:
        st = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    mode = st.st_mode
    if mode & (0o037 if st.st_uid == 0 else 0o077):
        raise ConfigError(f"{what} {path} is readable by others (mode {mode & 0o777:o}); "
                          "chmod 600 it, and consider the secret exposed")
    return text
