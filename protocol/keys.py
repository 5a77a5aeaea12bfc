"""Ed25519 keys and the key ids frames name them by."""

from __future__ import annotations

import hashlib

from nacl.signing import SigningKey, VerifyKey

KEY_ID_SIZE = 16
PUBLIC_KEY_SIZE = 32


def key_id(public_key: bytes) -> bytes:
    """The 16-byte id of a public key: the first 16 bytes of its SHA-256."""
    return hashlib.sha256(public_key).digest()[:KEY_ID_SIZE]


def generate_signing_key() -> SigningKey:
    return SigningKey.generate()


def signing_key_from_seed(seed: bytes) -> SigningKey:
    return SigningKey(seed)


def public_key_of(signing_key: SigningKey) -> bytes:
    return bytes(signing_key.verify_key)


def verify_key(public_key: bytes) -> VerifyKey:
    return VerifyKey(public_key)
