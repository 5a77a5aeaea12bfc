"""Files of a node's state and secrets: written whole or not at all, and secrets read
only from files kept private.

A file created first and written after is left empty, or cut short, by a command stopped
in between (Ctrl-C, ``kill -9``, a full disk), and every later command that reads it
refuses it: a key file, a password, node.toml, the tokens. Each is written and synced
under a temporary name in its own directory, then renamed over the old one or linked to
its name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


def write_whole(path: Path, data: bytes | str, *, mode: int = 0o600,
                exclusive: bool = False) -> None:
    """``path`` holds ``data``, or what it held before. ``exclusive`` never writes over
    an existing file (:class:`FileExistsError`), where two commands at once would each
    make a key or a password and one would be lost."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
