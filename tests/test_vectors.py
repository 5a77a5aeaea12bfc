"""The test vectors in protocol/vectors/ agree with the reference implementation.

Every vector's verdict, reason, problems and decoded content is checked with the
``protocol`` package; accepted frames must also be reproduced byte for byte by ``seal``;
and the file must be exactly what ``scripts/make_vectors.py`` generates, so the vectors
cannot drift from the code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from nacl.signing import SigningKey

from protocol import Kind, ProtocolError, Reason, SignatureError, key_id, open_frame, seal
from protocol.frame import DOMAIN, MAX_FRAME_SIZE
from protocol.schema import MAX_PROBLEMS

ROOT = Path(__file__).resolve().parents[1]
VECTORS_PATH = ROOT / "protocol" / "vectors" / "frames.json"
DATA: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = DATA["vectors"]
KEYS = {k["name"]: k for k in DATA["keys"]}
TRUSTED = {
    bytes.fromhex(k["key_id_hex"]): bytes.fromhex(k["public_key_hex"])
    for k in DATA["keys"] if k["known"]
}


#: SPEC.md §5: the reasons each stage of the check may fail with
REASONS_OF_STAGE = {
    "size": {"frame.too_large"},
    "header": {"frame.truncated", "frame.malformed", "frame.unsupported_version"},
    "key": {"key.unknown", "key.revoked", "key.not_valid_now"},
    "signature": {"signature.invalid"},
    "decode": {"body.malformed"},
    "schema": {"body.schema"},
    "canonical": {"body.malformed"},
}


def frame_of(vector: dict[str, Any]) -> bytes:
    if "frame_hex" in vector:
        return bytes.fromhex(vector["frame_hex"])
    parts = [
        bytes.fromhex(s["hex"]) if "hex" in s else bytes.fromhex(s["fill"]) * s["count"]
        for s in vector["frame_segments"]
    ]
    return b"".join(parts)


def trusted_key(kid: bytes) -> bytes:
    try:
        return TRUSTED[kid]
    except KeyError:
        raise SignatureError(Reason.KEY_UNKNOWN, f"key {kid.hex()} is not trusted") from None


def to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "scripts" /
                                                  "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    frame = frame_of(vector)
    assert len(frame) == vector["frame_length"]
    if vector["verdict"] == "accept":
        opened = open_frame(frame, trusted_key)
        assert vector["stage"] == "accept"
        assert str(opened.envelope.kind) == vector["kind"]
        assert to_json(opened.envelope.to_wire()) == vector["content"]
        assert opened.frame.digest.hex() == vector["frame_sha256_hex"]
        # the signer reproduces the very same bytes: encoding and signing are deterministic
        signer = SigningKey(bytes.fromhex(vector["signer"]["seed_hex"]))
        assert seal(opened.envelope, signer) == frame
        return
    assert vector["verdict"] == "reject"
    with pytest.raises(ProtocolError) as caught:
        open_frame(frame, trusted_key)
    assert str(caught.value.reason) == vector["reason"]
    # The reference reports no stage, but its reason must be one the vector's stage gives.
    assert vector["reason"] in REASONS_OF_STAGE[vector["stage"]]
    got = [{"path": p.path, "reason": str(p.reason)} for p in caught.value.problems]
    assert got == vector.get("problems", [])


@pytest.mark.parametrize("key", DATA["keys"], ids=[k["name"] for k in DATA["keys"]])
def test_key_material_is_consistent(key: dict[str, Any]) -> None:
    public_key = bytes(SigningKey(bytes.fromhex(key["seed_hex"])).verify_key)
    assert public_key.hex() == key["public_key_hex"]
    assert key_id(public_key).hex() == key["key_id_hex"]
    assert key["key_id_hex"] == hashlib.sha256(public_key).hexdigest()[:32]


def test_vector_signers_are_listed_keys() -> None:
    for vector in VECTORS:
        if vector["signer"] is not None:
            listed = KEYS[vector["signer"]["name"]]
            assert {k: listed[k] for k in vector["signer"]} == vector["signer"]


def test_constants_match_the_code() -> None:
    constants = DATA["constants"]
    assert bytes.fromhex(constants["domain_hex"]) == DOMAIN == b"KPX-FRAME-SIGNATURE-V1\x00"
    assert constants["max_frame_size"] == MAX_FRAME_SIZE
    assert constants["max_problems"] == MAX_PROBLEMS


def test_coverage() -> None:
    """The vectors cover what SPEC.md §12 promises."""
    accepted = {v["kind"] for v in VECTORS if v["verdict"] == "accept"}
    assert accepted == {str(k) for k in Kind}
    reasons = {v.get("reason") for v in VECTORS}
    frame_level = {
        Reason.FRAME_TOO_LARGE, Reason.FRAME_TRUNCATED, Reason.FRAME_MALFORMED,
        Reason.FRAME_VERSION, Reason.KEY_UNKNOWN, Reason.SIGNATURE_INVALID,
        Reason.BODY_MALFORMED, Reason.BODY_SCHEMA,
    }
    assert frame_level <= reasons
    stages = {v["stage"] for v in VECTORS}
    assert stages == {"accept", "size", "header", "key", "signature", "decode", "schema",
                      "canonical"}
    problems = {p["reason"] for v in VECTORS for p in v.get("problems", [])}
    produced_by_v1 = {str(r) for r in Reason if r.startswith("field.")} - {
        str(Reason.BAD_PARTICIPANT_CODE)  # reserved, see SPEC.md §10.2
    }
    assert problems == produced_by_v1
    # §9.7's cross-field rule: one public key under two Participants
    assert "schema/registry-key-listed-twice" in {v["name"] for v in VECTORS}
    assert all(len(v.get("problems", [])) <= MAX_PROBLEMS for v in VECTORS)
    assert any(v["frame_length"] == MAX_FRAME_SIZE for v in VECTORS)
    assert any(v["frame_length"] == MAX_FRAME_SIZE + 1 for v in VECTORS)
    assert VECTORS_PATH.stat().st_size < 300_000


def test_file_equals_generator_output() -> None:
    generator = load_generator()
    expected = generator.render(generator.build())
    assert VECTORS_PATH.read_text(encoding="utf-8") == expected, (
        "protocol/vectors/frames.json is stale: run scripts/make_vectors.py"
    )


def test_vectors_hold_without_msgpacks_c_extension() -> None:
    """SPEC §6.1 rule 7 is kpx's own rule, not the msgpack C extension's stack size: under
    msgpack's pure-Python fallback (MSGPACK_PUREPYTHON, or no wheel for the interpreter)
    every vector keeps its verdict. The fallback once refused the 1024-deep body, which
    the rule allows, as body.malformed instead of body.schema."""
    import os
    import subprocess

    script = (
        "import msgpack, sys\n"
        "assert msgpack.Unpacker.__module__ == 'msgpack.fallback'\n"
        "from tests.test_vectors import VECTORS, frame_of, trusted_key\n"
        "from protocol import ProtocolError, open_frame\n"
        "wrong = []\n"
        "for v in VECTORS:\n"
        "    try:\n"
        "        open_frame(frame_of(v), trusted_key)\n"
        "        got = None\n"
        "    except ProtocolError as exc:\n"
        "        got = str(exc.reason)\n"
        "    if got != v.get('reason'):\n"
        "        wrong.append((v['name'], got))\n"
        "print(wrong)\n"
        "sys.exit(1 if wrong else 0)\n"
    )
    env = {**os.environ, "MSGPACK_PUREPYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
