"""The wire frame: what travels, what is signed, and how it is checked.

::

    offset  size  field
    0       3     magic "KPX"
    3       1     version (1)
    4       16    key id: first 16 bytes of SHA-256 of the signer's Ed25519 public key
    20      4     body length N, unsigned big-endian
    24      N     body: one canonical msgpack map (see protocol.codec)
    24+N    64    Ed25519 signature over DOMAIN || bytes [0, 24+N)

The signature covers the header as well as the body, so the key id and version cannot be
swapped under it, and the domain prefix keeps a kpx signature from meaning anything in
another protocol that uses the same key. The receiver checks size, header and signature
*before* it decodes one byte of the body.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import SignedMessage, VerifyKey

from protocol.codec import decode_body, encode_body
from protocol.errors import FrameError, SignatureError
from protocol.keys import KEY_ID_SIZE, key_id
from protocol.messages import Envelope
from protocol.reasons import Reason

MAGIC = b"KPX"
VERSION = 1
DOMAIN = b"KPX-FRAME-SIGNATURE-V1\x00"
HEADER = struct.Struct(f">3sB{KEY_ID_SIZE}sI")
SIGNATURE_SIZE = 64
OVERHEAD = HEADER.size + SIGNATURE_SIZE
#: Largest frame accepted or produced. A certificate is under 2 KiB; a 60-Participant
#: registry update about 20 KiB.
MAX_FRAME_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """A parsed but not yet verified frame."""

    version: int
    key_id: bytes
    body: bytes
    signature: bytes
    raw: bytes

    @property
    def signing_input(self) -> bytes:
        return DOMAIN + self.raw[: HEADER.size + len(self.body)]

    @property
    def digest(self) -> bytes:
        """SHA-256 of the whole frame: how receipts and the evidence log name it."""
        return hashlib.sha256(self.raw).digest()


@dataclass(frozen=True, slots=True)
class Opened:
    """A frame whose signature verified and whose body is a valid message."""

    frame: Frame
    envelope: Envelope


def parse_frame(data: bytes) -> Frame:
    """Check the frame's shape; raise :class:`FrameError` if it is not a v1 kpx frame."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError(Reason.FRAME_MALFORMED, "frame must be bytes")
    data = bytes(data)
    if len(data) > MAX_FRAME_SIZE:
        raise FrameError(
            Reason.FRAME_TOO_LARGE, f"frame is {len(data)} bytes; the limit is {MAX_FRAME_SIZE}"
        )
    if len(data) < HEADER.size:
        raise FrameError(Reason.FRAME_TRUNCATED, f"frame is only {len(data)} bytes")
    magic, version, kid, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(Reason.FRAME_MALFORMED, "not a kpx frame (bad magic)")
    if version != VERSION:
        raise FrameError(Reason.FRAME_VERSION, f"frame version {version} is not supported")
    expected = OVERHEAD + length
    if len(data) < expected:
        raise FrameError(
            Reason.FRAME_TRUNCATED, f"frame is {len(data)} bytes; its header says {expected}"
        )
    if len(data) > expected:
        raise FrameError(
            Reason.FRAME_MALFORMED, f"{len(data) - expected} bytes follow the signature"
        )
    body = data[HEADER.size : HEADER.size + length]
    return Frame(version, kid, body, data[HEADER.size + length :], data)


def verify_frame(frame: Frame, public_key: bytes) -> None:
    """Raise :class:`SignatureError` unless ``public_key`` signed ``frame``."""
    if key_id(public_key) != frame.key_id:
        raise SignatureError(Reason.KEY_UNKNOWN, "the key offered is not the frame's signer")
    try:
        VerifyKey(public_key).verify(frame.signing_input, frame.signature)
    except BadSignatureError as exc:
        raise SignatureError(Reason.SIGNATURE_INVALID, "signature does not verify") from exc


def open_frame(data: bytes, public_key_for: Callable[[bytes], bytes]) -> Opened:
    """Parse, verify, then decode a frame.

    ``public_key_for(key_id)`` returns the signer's public key, or raises
    :class:`SignatureError` (unknown, revoked, not valid now): the node's key policy.
    Any failure raises a :class:`~protocol.errors.ProtocolError`.
    """
    frame = parse_frame(data)
    verify_frame(frame, public_key_for(frame.key_id))
    return Opened(frame, decode_body(frame.body))


class Signer(Protocol):
    """What signs a frame: a PyNaCl ``SigningKey``, or a key that reads its private half
    only when it first signs (a node's encrypted key)."""

    @property
    def verify_key(self) -> VerifyKey: ...

    def sign(self, message: bytes) -> SignedMessage: ...


def seal(envelope: Envelope, signing_key: Signer) -> bytes:
    """Encode and sign ``envelope``: the bytes that travel."""
    return seal_body(encode_body(envelope), signing_key)


def seal_body(body: bytes, signing_key: Signer) -> bytes:
    """Frame and sign body bytes as they are (test vectors use this for bad bodies)."""
    header = HEADER.pack(MAGIC, VERSION, key_id(bytes(signing_key.verify_key)), len(body))
    if len(header) + len(body) + SIGNATURE_SIZE > MAX_FRAME_SIZE:
        raise FrameError(Reason.FRAME_TOO_LARGE, "message too large to frame")
    signature = signing_key.sign(DOMAIN + header + body).signature
    return header + body + signature
