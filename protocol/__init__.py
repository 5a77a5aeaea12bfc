"""kpx protocol: typed messages, canonical encoding, the signed frame. Pure code, no I/O.

The usual path::

    frame_bytes = seal(envelope, signing_key)
    opened = open_frame(frame_bytes, public_key_for)   # parse, verify, then decode
"""

from protocol.codec import decode_body, encode_body
from protocol.errors import FrameError, Problem, ProtocolError, SignatureError, ValidationError
from protocol.frame import (
    MAX_FRAME_SIZE,
    Frame,
    Opened,
    open_frame,
    parse_frame,
    seal,
    verify_frame,
)
from protocol.keys import key_id
from protocol.messages import (
    BROADCAST,
    CHAIR,
    HS_CODES,
    Authority,
    Cancellation,
    Certificate,
    Envelope,
    ImportConfirmation,
    Kind,
    Line,
    ParticipantEntry,
    ParticipantStatus,
    Party,
    Payload,
    Ping,
    Pong,
    Receipt,
    RegistryKey,
    RegistryUpdate,
    Rejection,
    Replacement,
    new_message_id,
)
from protocol.reasons import Reason
from protocol.schema import validate_certificate, validate_import_confirmation

__all__ = [
    "BROADCAST", "CHAIR", "HS_CODES", "MAX_FRAME_SIZE", "Authority", "Cancellation",
    "Certificate", "Envelope", "Frame", "FrameError", "ImportConfirmation", "Kind", "Line",
    "Opened", "ParticipantEntry", "ParticipantStatus", "Party", "Payload", "Ping", "Pong",
    "Problem", "ProtocolError", "Reason", "Receipt", "RegistryKey", "RegistryUpdate",
    "Rejection", "Replacement", "SignatureError", "ValidationError", "decode_body",
    "encode_body", "key_id", "new_message_id", "open_frame", "parse_frame", "seal",
    "validate_certificate", "validate_import_confirmation", "verify_frame",
]
