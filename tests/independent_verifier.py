"""A second kpx v1 verifier, written from ``protocol/SPEC.md`` alone.

It imports nothing from the ``protocol`` package (``tests/test_independent_verifier.py``
checks that): only msgpack, PyNaCl, hashlib, struct and json. Its canonical encoder, its
field rules and its pattern checks are its own, written from the SPEC's tables, so that
agreement with the test vectors shows SPEC.md is enough to build a compatible
implementation. Section numbers (§) refer to SPEC.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

# -- §2-§4: constants -------------------------------------------------------------------------

MAGIC = b"KPX"
VERSION = 1
DOMAIN = b"KPX-FRAME-SIGNATURE-V1\x00"
HEADER_SIZE = 24
SIGNATURE_SIZE = 64
MAX_FRAME = 262144
MAX_DEPTH = 1024
MAX_PROBLEMS = 100


def key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:16]


class Verdict:
    """The outcome of checking one frame (§5)."""

    def __init__(self, stage: str, reason: str | None = None,
                 problems: list[tuple[str, str]] | None = None, body: Any = None) -> None:
        self.stage = stage
        self.reason = reason
        self.problems = problems
        self.body = body  # the decoded envelope of an accepted frame

    @property
    def verdict(self) -> str:
        return "accept" if self.reason is None else "reject"

    def __repr__(self) -> str:
        return f"Verdict({self.stage!r}, {self.reason!r}, {self.problems!r})"


def verify(frame: bytes, trusted: dict[bytes, bytes]) -> Verdict:
    """Steps 1-7 of §5. ``trusted`` maps key ids to public keys."""
    # 1 size
    if len(frame) > MAX_FRAME:
        return Verdict("size", "frame.too_large")
    # 2 header
    if len(frame) < HEADER_SIZE:
        return Verdict("header", "frame.truncated")
    if frame[0:3] != MAGIC:
        return Verdict("header", "frame.malformed")
    if frame[3] != VERSION:
        return Verdict("header", "frame.unsupported_version")
    (n,) = struct.unpack(">I", frame[20:24])
    if len(frame) < 88 + n:
        return Verdict("header", "frame.truncated")
    if len(frame) > 88 + n:
        return Verdict("header", "frame.malformed")
    # 3 key
    public_key = trusted.get(frame[4:20])
    if public_key is None:
        return Verdict("key", "key.unknown")
    # 4 signature
    try:
        VerifyKey(public_key).verify(DOMAIN + frame[: 24 + n], frame[24 + n : 88 + n])
    except BadSignatureError:
        return Verdict("signature", "signature.invalid")
    body = frame[24 : 24 + n]
    # 5 decode
    try:
        value = decode(body)
    except ValueError:
        return Verdict("decode", "body.malformed")
    # 6 schema
    problems = check_envelope(value)
    if problems:
        return Verdict("schema", "body.schema", problems[:MAX_PROBLEMS])
    # 7 canonical
    if encode(value) != body:
        return Verdict("canonical", "body.malformed")
    return Verdict("accept", body=value)


# -- §6.1 decoding -----------------------------------------------------------------------------


def _no_ext(values: list[Any]) -> None:
    # msgpack-python hands ext type -1 (timestamp) over as a Timestamp, not to ext_hook
    if any(isinstance(v, msgpack.Timestamp) for v in values):
        raise ValueError("ext value (timestamp)")


def _ext_hook(code: int, data: bytes) -> Any:
    raise ValueError(f"ext value (type {code})")


def _array_hook(items: list[Any]) -> list[Any]:
    _no_ext(items)
    return items


def _map_hook(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if not isinstance(k, str):
            raise ValueError("map key is not a str")
        if k in out:
            raise ValueError("duplicate key")
        out[k] = v
    _no_ext(list(out.values()))
    return out


def decode(body: bytes) -> Any:
    """One msgpack value under the rules of §6.1; ValueError if any is broken."""
    try:
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=False, use_list=True,
            object_pairs_hook=_map_hook, list_hook=_array_hook, ext_hook=_ext_hook,
        )
    except Exception as exc:  # incomplete, extra bytes, c1, bad UTF-8, our hooks ...
        raise ValueError(f"not msgpack: {exc!r}") from exc
    _no_ext([value])
    # rule 7, counted here (iteratively) rather than trusting the library's stack limit
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise ValueError("nested too deep")
        stack.extend((c, depth + 1) for c in children)
    return value


# -- §6.2 canonical encoding (written from the table, not with msgpack.packb) --------------------


def _length(n: int, small: int | None, small_max: int, forms: list[tuple[int, str, int]]) -> bytes:
    if small is not None and n <= small_max:
        return bytes([small | n])
    for byte, fmt, limit in forms:
        if n <= limit:
            return bytes([byte]) + struct.pack(fmt, n)
    raise ValueError("too long")


def encode(value: Any) -> bytes:
    if value is None:
        return b"\xc0"
    if value is True or value is False:
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int):
        n = value
        if 0 <= n <= 127:
            return bytes([n])
        if n >= 0:
            for byte, fmt, limit in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF),
                                     (0xCE, ">I", 0xFFFFFFFF), (0xCF, ">Q", 2**64 - 1)):
                if n <= limit:
                    return bytes([byte]) + struct.pack(fmt, n)
        if -32 <= n <= -1:
            return struct.pack(">b", n)
        for byte, fmt, low in ((0xD0, ">b", -(2**7)), (0xD1, ">h", -(2**15)),
                               (0xD2, ">i", -(2**31)), (0xD3, ">q", -(2**63))):
            if n >= low:
                return bytes([byte]) + struct.pack(fmt, n)
        raise ValueError("integer out of range")
    if isinstance(value, str):
        data = value.encode("utf-8")
        return _length(len(data), 0xA0, 31, [(0xD9, ">B", 0xFF), (0xDA, ">H", 0xFFFF),
                                             (0xDB, ">I", 0xFFFFFFFF)]) + data
    if isinstance(value, bytes):
        return _length(len(value), None, -1, [(0xC4, ">B", 0xFF), (0xC5, ">H", 0xFFFF),
                                              (0xC6, ">I", 0xFFFFFFFF)]) + value
    if isinstance(value, list):
        return _length(len(value), 0x90, 15, [(0xDC, ">H", 0xFFFF), (0xDD, ">I", 0xFFFFFFFF)]) \
            + b"".join(encode(v) for v in value)
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k.encode("utf-8"))
        return _length(len(keys), 0x80, 15, [(0xDE, ">H", 0xFFFF), (0xDF, ">I", 0xFFFFFFFF)]) \
            + b"".join(encode(k) + encode(value[k]) for k in keys)
    raise ValueError(f"no canonical form for {type(value).__name__}")


# -- §7.3 patterns, by hand ---------------------------------------------------------------------

UPPER = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
LOWER = set("abcdefghijklmnopqrstuvwxyz")
DIGITS = set("0123456789")


def is_code(s: str) -> bool:
    return len(s) == 2 and set(s) <= UPPER


def is_message_id(s: str) -> bool:
    return 16 <= len(s) <= 64 and set(s) <= UPPER | LOWER | DIGITS | {"_", "-"}


def is_cert_number(s: str) -> bool:
    return 3 <= len(s) <= 40 and is_code(s[:2]) and set(s[2:]) <= UPPER | DIGITS | {"/", "-"}


def is_authority_id(s: str) -> bool:
    return (2 <= len(s) <= 40 and is_code(s[:2])
            and set(s[2:]) <= UPPER | LOWER | DIGITS | {"_", ".", "-"})


def is_reason_code(s: str) -> bool:
    parts = s.split(".")
    return len(parts) >= 2 and all(p and set(p) <= LOWER | {"_"} for p in parts)


def is_date_format(s: str) -> bool:
    return (len(s) == 10 and s[4] == "-" and s[7] == "-"
            and all(c in DIGITS for i, c in enumerate(s) if i not in (4, 7)))


def calendar_day(s: str) -> tuple[int, int, int] | None:
    y, m, d = int(s[0:4]), int(s[5:7]), int(s[8:10])
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    days = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    if 1 <= y <= 9999 and 1 <= m <= 12 and 1 <= d <= days[m - 1]:
        return (y, m, d)
    return None


# -- §7 the field walk ---------------------------------------------------------------------------


class Walk:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        self.problems.append((path, f"field.{reason}"))

    @staticmethod
    def at(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    # 7.2
    def fields(self, v: Any, path: str, names: tuple[str, ...]) -> dict[str, Any] | None:
        """The map's fields (missing ones absent), or None when it is no map at all."""
        if not isinstance(v, dict):
            self.add(path, "wrong_type")
            return None
        for k in v:
            if k not in names:
                self.add(self.at(path, k), "unknown")
        for name in names:
            if name not in v:
                self.add(self.at(path, name), "required")
        return v

    # 7.3: returns the value "as received": the str, or "" when missing / not a str
    def text(self, m: dict[str, Any] | None, path: str, name: str, lo: int, hi: int,
             pattern: Any = None) -> str:
        if m is None or name not in m:
            return ""
        return self.text_value(m[name], self.at(path, name), lo, hi, pattern)

    def text_value(self, v: Any, path: str, lo: int, hi: int, pattern: Any = None) -> str:
        if not isinstance(v, str):
            self.add(path, "wrong_type")
            return ""
        if v == "" and lo == 1:
            self.add(path, "empty")
        elif len(v) > hi:
            self.add(path, "too_long")
        elif pattern is not None and not pattern(v):
            self.add(path, "bad_format")
        return v

    def nullable_text(self, m: dict[str, Any] | None, path: str, name: str, hi: int,
                      pattern: Any) -> None:
        if m is not None and name in m and m[name] is not None:
            self.text_value(m[name], self.at(path, name), 1, hi, pattern)

    # 7.4
    def integer(self, m: dict[str, Any] | None, path: str, name: str, lo: int, hi: int,
                nullable: bool = False) -> None:
        if m is None or name not in m:
            return
        v, p = m[name], self.at(path, name)
        if nullable and v is None:
            return
        if isinstance(v, float):
            self.add(p, "float_not_allowed")
        elif not isinstance(v, int) or isinstance(v, bool):
            self.add(p, "wrong_type")
        elif v < lo:
            self.add(p, "not_positive" if lo == 1 else "negative")
        elif v > hi:
            self.add(p, "too_large")

    # 7.5
    def date(self, m: dict[str, Any] | None, path: str, name: str) -> tuple[int, int, int] | None:
        s = self.text(m, path, name, 1, 10, is_date_format)
        if not is_date_format(s):
            return None
        day = calendar_day(s)
        if day is None:
            self.add(self.at(path, name), "bad_date")
        return day

    # 7.6
    def binary(self, m: dict[str, Any] | None, path: str, name: str, size: int) -> None:
        if m is None or name not in m:
            return
        v, p = m[name], self.at(path, name)
        if not isinstance(v, bytes):
            self.add(p, "wrong_type")
        elif len(v) != size:
            self.add(p, "bad_format")

    # 7.7: the items to check, with their paths
    def array(self, m: dict[str, Any] | None, path: str, name: str, lo: int,
              hi: int) -> list[tuple[str, Any]]:
        if m is None or name not in m:
            return []
        v, p = m[name], self.at(path, name)
        if not isinstance(v, list):
            self.add(p, "wrong_type")
            return []
        if len(v) < lo:
            self.add(p, "empty")
        if len(v) > hi:
            self.add(p, "too_long")
            return []
        return [(f"{p}[{i}]", item) for i, item in enumerate(v)]

    def nested(self, m: dict[str, Any] | None, path: str, name: str) -> tuple[Any, str, bool]:
        """The value of a map-typed field; ``False`` when it is missing (7.2 rule 1)."""
        if m is None or name not in m:
            return None, self.at(path, name), False
        return m[name], self.at(path, name), True

    # -- §9 payload types -------------------------------------------------------------------------

    def party(self, m: dict[str, Any] | None, path: str, name: str) -> None:
        v, p, present = self.nested(m, path, name)
        if not present:
            return
        f = self.fields(v, p, ("name", "address"))
        self.text(f, p, "name", 1, 200)
        self.text(f, p, "address", 1, 500)

    def lines(self, m: dict[str, Any] | None, path: str) -> None:
        earlier: set[str] = set()
        for p, item in self.array(m, path, "lines", 1, 3):
            f = self.fields(item, p, ("hs_code", "carats_hundredths", "usd_cents"))
            hs = self.text(f, p, "hs_code", 1, 7)
            if hs:
                if hs not in ("7102.10", "7102.21", "7102.31"):
                    self.add(self.at(p, "hs_code"), "unknown_hs_code")
                elif hs in earlier:
                    self.add(self.at(p, "hs_code"), "duplicate_hs_code")
                earlier.add(hs)
            self.integer(f, p, "carats_hundredths", 1, 10**12)
            self.integer(f, p, "usd_cents", 1, 10**15)

    def certificate(self, v: Any, path: str) -> dict[str, str]:
        """Checks a certificate; returns its issuer and destination as received."""
        f = self.fields(v, path, ("number", "issuer", "issuing_authority", "destination",
                                  "origins", "exporter", "importer", "lines", "parcels",
                                  "issued_on", "expires_on", "remarks"))
        number = self.text(f, path, "number", 1, 40, is_cert_number)
        issuer = self.text(f, path, "issuer", 1, 2, is_code)
        authority = self.text(f, path, "issuing_authority", 1, 40, is_authority_id)
        destination = self.text(f, path, "destination", 1, 2, is_code)
        for p, item in self.array(f, path, "origins", 1, 50):
            origin = self.text_value(item, p, 1, 5)
            if origin and origin != "MIXED" and not is_code(origin):
                self.add(p, "bad_format")
        self.party(f, path, "exporter")
        self.party(f, path, "importer")
        self.lines(f, path)
        self.integer(f, path, "parcels", 1, 1_000_000)
        issued = self.date(f, path, "issued_on")
        expires = self.date(f, path, "expires_on")
        self.text(f, path, "remarks", 0, 2000)
        if number and issuer and not number.startswith(issuer):
            self.add(self.at(path, "number"), "number_prefix")
        if authority and issuer and not authority.startswith(issuer):
            self.add(self.at(path, "issuing_authority"), "bad_format")
        if issuer and issuer == destination:
            self.add(self.at(path, "destination"), "self_trade")
        if issued is not None and expires is not None and expires <= issued:
            self.add(self.at(path, "expires_on"), "expiry_before_issue")
        return {"number": number, "issuer": issuer, "destination": destination}

    def payload(self, kind: str, v: Any, path: str) -> dict[str, str]:
        """Checks the payload of ``kind``; returns the values the party rules need."""
        if kind == "certificate":
            return self.certificate(v, path)
        if kind in ("receipt", "import_confirmation"):
            names: tuple[str, ...] = ("certificate", "certificate_digest")
            if kind == "import_confirmation":
                names += ("destination", "importer", "lines", "parcels", "received_on",
                          "remarks")
            f = self.fields(v, path, names)
            self.text(f, path, "certificate", 1, 40, is_cert_number)
            self.binary(f, path, "certificate_digest", 32)
            if kind == "receipt":
                return {}
            destination = self.text(f, path, "destination", 1, 2, is_code)
            self.party(f, path, "importer")
            self.lines(f, path)
            self.integer(f, path, "parcels", 1, 1_000_000)
            self.date(f, path, "received_on")
            self.text(f, path, "remarks", 0, 2000)
            return {"confirming": destination}
        if kind == "rejection":
            f = self.fields(v, path, ("reason", "text", "certificate", "problems"))
            self.text(f, path, "reason", 1, 64, is_reason_code)
            self.text(f, path, "text", 1, 2000)
            self.nullable_text(f, path, "certificate", 40, is_cert_number)
            for p, item in self.array(f, path, "problems", 0, 100):
                pf = self.fields(item, p, ("path", "reason", "message"))
                self.text(pf, p, "path", 0, 200)
                self.text(pf, p, "reason", 1, 64, is_reason_code)
                self.text(pf, p, "message", 1, 2000)
            return {}
        if kind == "cancellation":
            f = self.fields(v, path, ("certificate", "reason"))
            self.text(f, path, "certificate", 1, 40, is_cert_number)
            self.text(f, path, "reason", 1, 2000)
            return {}
        if kind == "replacement":
            f = self.fields(v, path, ("replaces", "reason", "certificate"))
            replaces = self.text(f, path, "replaces", 1, 40, is_cert_number)
            self.text(f, path, "reason", 1, 2000)
            inner, ipath, present = self.nested(f, path, "certificate")
            parties = self.certificate(inner, ipath) if present else {
                "number": "", "issuer": "", "destination": ""}
            if replaces and replaces == parties["number"]:
                self.add(self.at(path, "replaces"), "bad_format")
            elif replaces and parties["issuer"] and not replaces.startswith(parties["issuer"]):
                self.add(self.at(path, "replaces"), "number_prefix")
            return parties
        if kind == "registry_update":
            f = self.fields(v, path, ("version", "participants", "embargoed_origins"))
            self.integer(f, path, "version", 1, 2**63 - 1)
            codes: list[str] = []
            keys: list[bytes] = []
            for p, item in self.array(f, path, "participants", 0, 500):
                pf = self.fields(item, p, ("code", "name", "status", "authorities"))
                code = self.text(pf, p, "code", 1, 2, is_code)
                if code:
                    codes.append(code)
                self.text(pf, p, "name", 1, 200)
                status = self.text(pf, p, "status", 1, 20)
                if status and status not in ("active", "suspended", "withdrawn"):
                    self.add(self.at(p, "status"), "bad_format")
                for ap, auth in self.array(pf, p, "authorities", 0, 50):
                    af = self.fields(auth, ap, ("id", "name", "keys"))
                    self.text(af, ap, "id", 1, 40, is_authority_id)
                    self.text(af, ap, "name", 1, 200)
                    for kp, key in self.array(af, ap, "keys", 0, 20):
                        kf = self.fields(key, kp, ("public_key", "valid_from", "valid_until",
                                                   "revoked_at"))
                        self.binary(kf, kp, "public_key", 32)
                        pk = kf.get("public_key") if kf is not None else None
                        if isinstance(pk, bytes) and len(pk) == 32:
                            keys.append(pk)
                        self.integer(kf, kp, "valid_from", 0, 2**53)
                        self.integer(kf, kp, "valid_until", 0, 2**53, nullable=True)
                        self.integer(kf, kp, "revoked_at", 0, 2**53, nullable=True)
            for p, item in self.array(f, path, "embargoed_origins", 0, 500):
                self.text_value(item, p, 1, 2, is_code)
            if len(set(codes)) != len(codes) or len(set(keys)) != len(keys):
                self.add(self.at(path, "participants"), "bad_format")
            return {}
        # ping, pong
        f = self.fields(v, path, ("nonce",))
        self.binary(f, path, "nonce", 16)
        return {}


KINDS = ("certificate", "receipt", "import_confirmation", "rejection", "cancellation",
         "replacement", "registry_update", "ping", "pong")


def check_envelope(value: Any) -> list[tuple[str, str]]:
    """§8: every problem of the envelope, as (path, reason)."""
    w = Walk()
    f = w.fields(value, "", ("message_id", "kind", "sender", "recipient", "created_at",
                             "in_reply_to", "payload"))
    w.text(f, "", "message_id", 1, 64, is_message_id)
    kind = w.text(f, "", "kind", 1, 32)
    if kind and kind not in KINDS:
        w.add("kind", "unknown_kind")
    if kind == "registry_update":
        sender = w.text(f, "", "sender", 1, 4, lambda s: s == "KPCS")
        recipient = w.text(f, "", "recipient", 1, 2, lambda s: s == "*")
    else:
        sender = w.text(f, "", "sender", 1, 4, is_code)
        recipient = w.text(f, "", "recipient", 1, 2, is_code)
    w.integer(f, "", "created_at", 0, 2**53)
    w.nullable_text(f, "", "in_reply_to", 64, is_message_id)
    if kind in KINDS and f is not None and "payload" in f:
        parties = w.payload(kind, f["payload"], "payload")
        base = "payload.certificate" if kind == "replacement" else "payload"
        if kind in ("certificate", "replacement"):
            if sender and parties["issuer"] and parties["issuer"] != sender:
                w.add(f"{base}.issuer", "sender_mismatch")
            if recipient and parties["destination"] and parties["destination"] != recipient:
                w.add(f"{base}.destination", "recipient_mismatch")
        if kind == "import_confirmation" and sender and parties["confirming"] and \
                parties["confirming"] != sender:
            w.add("payload.destination", "sender_mismatch")
        if sender and sender == recipient:
            w.add("recipient", "self_trade")
    return w.problems


# -- §12 the vectors file ----------------------------------------------------------------------


def frame_of(vector: dict[str, Any]) -> bytes:
    if "frame_hex" in vector:
        return bytes.fromhex(vector["frame_hex"])
    out = bytearray()
    for seg in vector["frame_segments"]:
        if "hex" in seg:
            out += bytes.fromhex(seg["hex"])
        else:
            out += bytes.fromhex(seg["fill"]) * seg["count"]
    return bytes(out)


def trusted_keys(vectors_file: dict[str, Any]) -> dict[bytes, bytes]:
    out = {}
    for k in vectors_file["keys"]:
        if k["known"]:
            public_key = bytes.fromhex(k["public_key_hex"])
            out[key_id(public_key)] = public_key
    return out


def as_json(value: Any) -> Any:
    """The JSON form of §12: bin as lowercase hex."""
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data
