"""The Chair's tooling: its key, and registries it signs.

The registry is edited as JSON (public keys as hex, instants as ms since the epoch) and
published as a frame signed by the Chair's key: a ``registry_update`` message from
``KPCS`` to ``*``. Nodes are configured with the Chair's public key out of band and accept
nothing else as a registry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from protocol import BROADCAST, CHAIR, Envelope, RegistryUpdate, seal
from protocol.schema import parse_registry, validate


class RegistryJsonError(Exception):
    """The registry JSON is not valid; the message lists every problem."""


def registry_from_json(data: Any) -> RegistryUpdate:
    """Registry JSON → :class:`RegistryUpdate`, with the protocol's own validation."""
    try:
        wire = _keys_from_hex(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise RegistryJsonError(f"registry JSON: {exc}") from exc
    try:
        return validate(parse_registry, wire, "registry")
    except Exception as exc:
        raise RegistryJsonError(str(exc)) from exc


def registry_to_json(update: RegistryUpdate) -> dict[str, Any]:
    data = update.to_wire()
    for p in data["participants"]:
        for a in p["authorities"]:
            for k in a["keys"]:
                k["public_key"] = k["public_key"].hex()
    return data


def _keys_from_hex(data: Any) -> Any:
    wire = json.loads(json.dumps(data))  # a deep copy we may change
    for p in wire.get("participants", []) if isinstance(wire, dict) else []:
        for a in p.get("authorities", []):
            for k in a.get("keys", []):
                if isinstance(k.get("public_key"), str):
                    k["public_key"] = bytes.fromhex(k["public_key"])
                k.setdefault("valid_from", 0)
                k.setdefault("valid_until", None)
                k.setdefault("revoked_at", None)
    if isinstance(wire, dict):
        wire.setdefault("embargoed_origins", [])
    return wire


def sign_registry(update: RegistryUpdate, chair_key: SigningKey, now_ms: int) -> bytes:
    envelope = Envelope(sender=CHAIR, recipient=BROADCAST, created_at=now_ms, payload=update)
    return seal(envelope, chair_key)


def sign_registry_file(source: Path, chair_key: SigningKey, out: Path, now_ms: int) -> int:
    """Sign a registry JSON file into a registry frame file; returns its version."""
    try:
        data = json.loads(source.read_text())
    except OSError as exc:
        raise RegistryJsonError(f"cannot read {source}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise RegistryJsonError(f"{source}: not JSON: {exc}") from exc
    update = registry_from_json(data)
    out.write_bytes(sign_registry(update, chair_key, now_ms))
    return update.version
