"""SPEC.md is enough: a verifier written from it alone agrees with every vector.

``tests/independent_verifier.py`` imports nothing from ``protocol``. Here it must reach
every vector's verdict, stage and reason, the same problems (as a multiset, SPEC.md §7.9)
and the same decoded content. A differential property test then feeds both verifiers the
same signed, randomly damaged bodies and requires the same answers.
"""

from __future__ import annotations

import ast
import copy
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol import ProtocolError, Reason, SignatureError, open_frame
from protocol.frame import seal_body

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import independent_verifier as iv  # noqa: E402

DATA = iv.load(str(HERE.parent / "protocol" / "vectors" / "frames.json"))
VECTORS: list[dict[str, Any]] = DATA["vectors"]
TRUSTED = iv.trusted_keys(DATA)
ALLOWED_IMPORTS = {"__future__", "typing", "msgpack", "nacl", "hashlib", "struct", "json"}


def test_imports_only_msgpack_nacl_and_stdlib_basics() -> None:
    tree = ast.parse((HERE / "independent_verifier.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    assert "protocol" not in imported


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_independent_verifier_agrees(vector: dict[str, Any]) -> None:
    got = iv.verify(iv.frame_of(vector), TRUSTED)
    assert got.verdict == vector["verdict"]
    assert got.stage == vector["stage"]
    assert got.reason == vector.get("reason")
    expected = Counter((p["path"], p["reason"]) for p in vector.get("problems", []))
    assert Counter(got.problems or []) == expected
    if vector["verdict"] == "accept":
        assert got.body["kind"] == vector["kind"]
        assert iv.as_json(got.body) == vector["content"]


def test_canonical_encoder_matches_msgpack() -> None:
    """The hand-written §6.2 encoder and msgpack-python agree on every accepted body."""
    for vector in VECTORS:
        if vector["verdict"] == "accept":
            body = iv.decode(iv.frame_of(vector)[24:-64])
            assert iv.encode(body) == msgpack.packb(_sorted(body), use_bin_type=True)
    for n in (0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32, -33,
              -128, -129, -(2**15), -(2**15) - 1, -(2**31), -(2**31) - 1, -(2**63)):
        assert iv.encode(n) == msgpack.packb(n), n
    for size in (0, 31, 32, 255, 256, 65535, 65536):
        assert iv.encode("x" * size) == msgpack.packb("x" * size, use_bin_type=True)
        assert iv.encode(b"x" * size) == msgpack.packb(b"x" * size, use_bin_type=True)
    for size in (0, 15, 16, 65535, 65536):
        assert iv.encode([0] * size) == msgpack.packb([0] * size)
        m = {f"k{i:05}": 0 for i in range(size)}
        assert iv.encode(m) == msgpack.packb(m)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda k: k.encode())}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


# -- differential: the reference and the independent verifier on damaged bodies ----------------

ZA_KEY = SigningKey(bytes.fromhex(next(k for k in DATA["keys"] if k["name"] == "za")
                                  ["seed_hex"]))
ZA_TRUSTED = {**TRUSTED}
BASES = [iv.decode(iv.frame_of(v)[24:-64]) for v in VECTORS if v["verdict"] == "accept"]

odd_values = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, 2**53, 2**53 + 1, 10**12, 10**12 + 1, 10**15 + 1, 1_000_001]),
    st.floats(allow_nan=False, width=64),
    st.text(max_size=6),
    st.sampled_from(["", "ZA", "EU", "KPCS", "*", "za", "ZAF", "MIXED", "7102.10", "7102.31",
                     "7102.99", "2026-01-05", "2026-02-30", "1970-01-01", "ZA/1", "BW/1",
                     "ZA-X", "active", "paused", "body.schema", "x" * 65, "é" * 201,
                     "certificate", "registry_update", "ping", "0123456789abcdef"]),
    st.binary(max_size=33), st.sampled_from([b"\x00" * 16, b"\x00" * 32]),
    st.lists(st.integers(0, 3), max_size=4),
    st.dictionaries(st.sampled_from(["name", "address", "x"]), st.text(max_size=3),
                    max_size=2),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def damaged_bodies(draw: st.DrawFn) -> Any:
    body = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(odd_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "name", "kind", "nonce"]))] = draw(odd_values)
        else:
            parent.append(draw(odd_values))
    return body


def reference(frame: bytes) -> tuple[str, str | None, Counter[tuple[str, str]]]:
    def lookup(kid: bytes) -> bytes:
        if kid not in ZA_TRUSTED:
            raise SignatureError(Reason.KEY_UNKNOWN, "unknown")
        return ZA_TRUSTED[kid]

    try:
        open_frame(frame, lookup)
    except ProtocolError as exc:
        return "reject", str(exc.reason), Counter((p.path, str(p.reason)) for p in exc.problems)
    return "accept", None, Counter()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_bodies())
def test_both_verifiers_agree_on_damaged_bodies(body: Any) -> None:
    frame = seal_body(msgpack.packb(_sorted(body), use_bin_type=True), ZA_KEY)
    got = iv.verify(frame, ZA_TRUSTED)
    verdict, reason, problems = reference(frame)
    assert (got.verdict, got.reason) == (verdict, reason)
    if len(problems) < 100:
        assert Counter(got.problems or []) == problems


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_both_verifiers_agree_on_arbitrary_bodies(body: bytes) -> None:
    frame = seal_body(body, ZA_KEY)
    got = iv.verify(frame, ZA_TRUSTED)
    verdict, reason, problems = reference(frame)
    assert (got.verdict, got.reason) == (verdict, reason)
    assert Counter(got.problems or []) == problems
