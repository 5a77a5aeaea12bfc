"""A node's Ed25519 signing key at rest: plain or passphrase-encrypted, owner-readable only.

Two file formats, told apart by their first character:

* **plain** — the 32-byte seed as hex, one line. What ``kpnode init`` writes.
* **encrypted** — a JSON object ``{"format": "kpx-encrypted-key-v1", "kdf": "argon2id",
  "opslimit", "memlimit", "salt", "box", "public_key"}``: the seed in a PyNaCl ``SecretBox``
  (XSalsa20-Poly1305) under a key derived from the passphrase with Argon2id, and the public
  key in hex. The KDF parameters are kept in the file so they can be raised later without
  breaking old files; the default is libsodium's *moderate* level (256 MiB, about 1-3 s on
  a small server), paid once when the node starts and once per CLI command that signs.

A node's key is a :class:`NodeKey`: its public half is read at once (from the clear
``public_key``), its private half only when it first signs, so commands that only read
(status, list, show, key show, verify-log, stats) need no passphrase. A file written before
``public_key`` was kept has to be decrypted for its public key, as before.

The passphrase comes from ``KPX_KEY_PASSPHRASE``, else the file named by
``KPX_KEY_PASSPHRASE_FILE`` (a container secret), else a prompt when a terminal is
attached; otherwise the node refuses to start with a one-line reason. Whatever the format,
a key file that its group or others can read is refused: a key that may have been copied
is a key to revoke, not to use.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.utils
from nacl.secret import SecretBox
from nacl.signing import SignedMessage, SigningKey, VerifyKey

from node.config import ConfigError
from node.files import read_secret, write_whole
from node.jsontext import parse_json

ENCRYPTED_FORMAT = "kpx-encrypted-key-v1"
ENV_PASSPHRASE = "KPX_KEY_PASSPHRASE"
ENV_PASSPHRASE_FILE = "KPX_KEY_PASSPHRASE_FILE"
#: (opslimit, memlimit) presets; tests use "interactive" to stay fast
STRENGTHS: Mapping[str, tuple[int, int]] = {
    "moderate": (argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE),
    "interactive": (argon2id.OPSLIMIT_INTERACTIVE, argon2id.MEMLIMIT_INTERACTIVE),
}
#: refuse absurd parameters in a file (a hostile file must not make us allocate 64 GiB)
_MAX_MEMLIMIT = 1 << 31
_MAX_OPSLIMIT = 64
MIN_PASSPHRASE = 12


class KeyFileError(ConfigError):
    """The key file is missing, unsafe, malformed or cannot be unlocked."""


def _derive(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return argon2id.kdf(SecretBox.KEY_SIZE, passphrase.encode(), salt,
                        opslimit=opslimit, memlimit=memlimit)


def encrypt_seed(seed: bytes, passphrase: str, strength: str = "moderate") -> str:
    """The encrypted file's text for ``seed``."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise KeyFileError(f"passphrase too short: use at least {MIN_PASSPHRASE} characters")
    opslimit, memlimit = STRENGTHS[strength]
    salt = nacl.utils.random(argon2id.SALTBYTES)
    box = SecretBox(_derive(passphrase, salt, opslimit, memlimit)).encrypt(seed)
    public = bytes(SigningKey(seed).verify_key)
    return json.dumps({"format": ENCRYPTED_FORMAT, "kdf": "argon2id", "opslimit": opslimit,
                       "memlimit": memlimit, "salt": salt.hex(), "box": bytes(box).hex(),
                       "public_key": public.hex()},
                      indent=1) + "\n"


@dataclass(frozen=True)
class _Sealed:
    """An encrypted key file's fields, checked for form (no passphrase needed)."""

    opslimit: int
    memlimit: int
    salt: bytes
    box: bytes
    public_key: bytes | None  # absent from files written before it was kept


def _read_encrypted(text: str, path: Path) -> _Sealed:
    try:
        data = parse_json(text)
        if data.get("format") != ENCRYPTED_FORMAT or data.get("kdf") != "argon2id":
            raise ValueError(f"unknown format {data.get('format')!r}")
        opslimit, memlimit = int(data["opslimit"]), int(data["memlimit"])
        salt, box = bytes.fromhex(data["salt"]), bytes.fromhex(data["box"])
        public = data.get("public_key")
        public_key = None if public is None else bytes.fromhex(public)
        if not (0 < opslimit <= _MAX_OPSLIMIT and 0 < memlimit <= _MAX_MEMLIMIT):
            raise ValueError("key derivation parameters out of range")
        if len(salt) != argon2id.SALTBYTES:
            raise ValueError("bad salt length")
        if len(box) != SecretBox.NONCE_SIZE + SecretBox.MACBYTES + 32:
            # A box of any other length cannot hold a seed: not a wrong passphrase.
            raise ValueError("the encrypted seed has the wrong length")
        if public_key is not None and len(public_key) != 32:
            raise ValueError("the public key is not 32 bytes")
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise KeyFileError(f"encrypted signing key {path} is malformed: {exc}") from None
    return _Sealed(opslimit, memlimit, salt, box, public_key)


def decrypt_seed(text: str, passphrase: str, path: Path) -> bytes:
    sealed = _read_encrypted(text, path)
    try:
        seed = SecretBox(_derive(passphrase, sealed.salt, sealed.opslimit,
                                 sealed.memlimit)).decrypt(sealed.box)
    except nacl.exceptions.CryptoError:
        raise KeyFileError(f"wrong passphrase for signing key {path}") from None
    if len(seed) != 32:
        raise KeyFileError(f"encrypted signing key {path} does not hold a 32-byte seed")
    if sealed.public_key is not None and bytes(SigningKey(seed).verify_key) != sealed.public_key:
        # Edited by hand, or pieced together from two files: which half to believe?
        raise KeyFileError(f"signing key {path}: its public_key is not that of the key it "
                           "holds")
    return seed


def passphrase_from_environment(environ: Mapping[str, str] = os.environ,
                                prompt: Callable[[str], str] | None = None) -> str | None:
    """The passphrase from the environment, a secret file, or a terminal prompt."""
    if environ.get(ENV_PASSPHRASE):
        return environ[ENV_PASSPHRASE]
    secret = environ.get(ENV_PASSPHRASE_FILE)
    if secret:
        # as a broker password's file: one that others may read exposes the key with it
        try:
            # a passphrase may end in spaces; the file's line ending is not part of it
            return read_secret(Path(secret), ENV_PASSPHRASE_FILE).rstrip("\r\n")
        except ConfigError as exc:
            raise KeyFileError(str(exc)) from None
    if prompt is not None:
        return prompt("passphrase for the node's signing key: ")
    if sys.stdin.isatty():
        # Asked once a process: every key of a node is under the one passphrase, and a
        # node with rotated keys would otherwise ask for it once per key file.
        if not _typed:
            _typed.append(getpass.getpass("passphrase for the node's signing key: "))
        return _typed[0]
    return None


#: the passphrase typed at this process's terminal, once asked
_typed: list[str] = []


def write_signing_key(path: Path, key: SigningKey, *, passphrase: str | None = None,
                      strength: str = "moderate") -> None:
    """Write a new key file, mode 0600, never over an existing one, and whole or not at
    all: written under a temporary name, then linked to its own. A file made empty by a
    command stopped between its creation and its write (Ctrl-C, kill -9, a full disk)
    stopped every later command of the node, which reads every key file it has."""
    text = (bytes(key).hex() + "\n" if passphrase is None
            else encrypt_seed(bytes(key), passphrase, strength))
    write_whole(path, text, exclusive=True)


def is_encrypted(path: Path) -> bool:
    try:
        return path.read_text().lstrip().startswith("{")
    except OSError:
        return False


def _key_text(path: Path) -> str:
    """A key file's text; refused when missing, unreadable, or readable by others."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise KeyFileError(f"signing key {path} not found") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"signing key {path} is neither hex nor an encrypted key") from None
    if mode & 0o077:
        raise KeyFileError(f"signing key {path} is readable by others (mode "
                           f"{mode & 0o777:o}); chmod 600 it, and consider the key exposed")
    return text


def read_signing_key(path: Path, *, passphrase: str | None = None) -> SigningKey:
    """Load a key file. An encrypted one needs ``passphrase`` or
    :func:`passphrase_from_environment`; a file others can read is refused."""
    return _signing_key(path, _key_text(path), passphrase)


def _signing_key(path: Path, text: str, passphrase: str | None = None) -> SigningKey:
    if text.startswith("{"):
        if passphrase is None:
            passphrase = passphrase_from_environment()
        if passphrase is None:
            raise KeyFileError(f"signing key {path} is encrypted: set {ENV_PASSPHRASE} or "
                               f"{ENV_PASSPHRASE_FILE}, or run from a terminal")
        return SigningKey(decrypt_seed(text, passphrase, path))
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"signing key {path} is neither hex nor an encrypted key") from None
    if len(seed) != 32:
        raise KeyFileError(f"signing key {path} must hold a 32-byte seed")
    return SigningKey(seed)


class NodeKey:
    """One of a node's signing keys: the public half known from the start, the private
    half read from its file when the key first signs (or :meth:`unlock` is called)."""

    def __init__(self, path: Path, public_key: bytes, key: SigningKey | None = None) -> None:
        self.path = path
        self.verify_key = VerifyKey(public_key)
        self._key = key

    @property
    def unlocked(self) -> bool:
        return self._key is not None

    def unlock(self) -> SigningKey:
        """The private key, decrypted once (with the passphrase from the environment or
        the terminal); :class:`KeyFileError` when it cannot be."""
        if self._key is None:
            key = read_signing_key(self.path)
            if key.verify_key != self.verify_key:  # the file changed since it was read
                raise KeyFileError(f"signing key {self.path} changed while the node had it "
                                   "open; run the command again")
            self._key = key
        return self._key

    def sign(self, message: bytes) -> SignedMessage:
        return self.unlock().sign(message)

    def __bytes__(self) -> bytes:
        """The seed, as ``bytes(SigningKey)`` gives it (unlocking the key)."""
        return bytes(self.unlock())


def read_node_key(path: Path) -> NodeKey:
    """A node's key file, the private half left in it when it is encrypted (and says its
    public key); every fault of the file's form is found here all the same."""
    text = _key_text(path)
    if text.startswith("{"):
        sealed = _read_encrypted(text, path)
        if sealed.public_key is not None:
            return NodeKey(path, sealed.public_key)
    key = _signing_key(path, text)
    return NodeKey(path, bytes(key.verify_key), key)


def require_passphrase_of(paths: Iterable[Path], passphrase: str) -> None:
    """Raise KeyFileError unless ``passphrase`` opens every encrypted key file among
    ``paths``: a node starts with one passphrase, so a key under another locks it out."""
    for path in paths:
        if not is_encrypted(path):
            continue
        try:
            read_signing_key(path, passphrase=passphrase)
        except KeyFileError as exc:
            raise KeyFileError(f"{exc}: a node's keys all open with the one passphrase it "
                               "starts with; give that of its encrypted keys. Nothing was "
                               "written") from None


def lacks_public_key(path: Path) -> bool:
    """An encrypted key file written before the public key was kept in it: commands that
    only read need the passphrase for it until ``kpnode key encrypt`` writes it anew."""
    text = _key_text(path)
    return text.startswith("{") and _read_encrypted(text, path).public_key is None


def encrypt_key_file(path: Path, passphrase: str, strength: str = "moderate") -> None:
    """Encrypt a plain key file in place, or write an encrypted one anew under the same
    passphrase (atomically: a new file renamed over it)."""
    key = read_signing_key(path, passphrase=passphrase if is_encrypted(path) else None)
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    write_signing_key(tmp, key, passphrase=passphrase, strength=strength)
    os.replace(tmp, path)
