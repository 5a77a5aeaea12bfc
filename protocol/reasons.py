"""Stable, machine-readable reason codes.

Every refusal in kpx — a frame that does not parse, a field that fails validation, a
certificate the importer will not accept — names one of these codes. They travel in signed
rejections and dead-letter headers, so they are part of the wire contract: never rename
one, only add. ``protocol/SPEC.md`` lists them with their meaning.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # -- the frame (checked before anything is decoded) --------------------------------
    FRAME_TRUNCATED = "frame.truncated"
    FRAME_MALFORMED = "frame.malformed"
    FRAME_TOO_LARGE = "frame.too_large"
    FRAME_VERSION = "frame.unsupported_version"
    SIGNATURE_INVALID = "signature.invalid"
    KEY_UNKNOWN = "key.unknown"
    KEY_REVOKED = "key.revoked"
    KEY_NOT_VALID_NOW = "key.not_valid_now"
    KEY_WRONG_SENDER = "key.wrong_sender"

    # -- the body (after the signature verified) ---------------------------------------
    BODY_MALFORMED = "body.malformed"
    BODY_SCHEMA = "body.schema"

    # -- field-level problems inside body.schema ---------------------------------------
    REQUIRED = "field.required"
    UNKNOWN_FIELD = "field.unknown"
    WRONG_TYPE = "field.wrong_type"
    FLOAT_NOT_ALLOWED = "field.float_not_allowed"
    NOT_POSITIVE = "field.not_positive"
    NEGATIVE = "field.negative"
    TOO_LARGE = "field.too_large"
    TOO_LONG = "field.too_long"
    EMPTY = "field.empty"
    BAD_FORMAT = "field.bad_format"
    BAD_DATE = "field.bad_date"
    UNKNOWN_KIND = "field.unknown_kind"
    UNKNOWN_HS_CODE = "field.unknown_hs_code"
    DUPLICATE_HS_CODE = "field.duplicate_hs_code"
    BAD_PARTICIPANT_CODE = "field.bad_participant_code"
    EXPIRY_BEFORE_ISSUE = "field.expiry_before_issue"
    NUMBER_PREFIX = "field.number_prefix"
    SENDER_MISMATCH = "field.sender_mismatch"
    RECIPIENT_MISMATCH = "field.recipient_mismatch"
    SELF_TRADE = "field.self_trade"

    # -- decisions of the receiving node ------------------------------------------------
    NOT_FOR_US = "message.not_for_us"
    BROKER_USER_MISMATCH = "message.broker_user_mismatch"
    PARTICIPANT_UNKNOWN = "participant.unknown"
    PARTICIPANT_SUSPENDED = "participant.suspended"
    PARTICIPANT_WITHDRAWN = "participant.withdrawn"
    AUTHORITY_UNKNOWN = "authority.unknown"
    ORIGIN_EMBARGOED = "origin.embargoed"
    CERTIFICATE_EXPIRED = "certificate.expired"
    CERTIFICATE_DUPLICATE_NUMBER = "certificate.duplicate_number"
    CERTIFICATE_UNKNOWN = "certificate.unknown"
    CERTIFICATE_WRONG_STATE = "certificate.wrong_state"
    CERTIFICATE_DIGEST_MISMATCH = "certificate.digest_mismatch"
    REGISTRY_STALE = "registry.stale"
    PROCESSING_FAILED = "node.processing_failed"
