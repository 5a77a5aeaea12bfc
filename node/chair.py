"""The Chair's tooling: its key, and registries it signs.

The registry is edited as JSON (public keys as hex, instants as ms since the epoch) and
published as a frame signed by the Chair's key: a ``registry_update`` message from
``KPCS`` to ``*``. Nodes are configured with the Chair's public key out of band and accept
nothing else as a registry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from node.jsontext import JsonTextError, parse_json
from node.registry import utc_text
from protocol import (
    BROADCAST,
    CHAIR,
    Authority,
    Envelope,
    ParticipantEntry,
    ParticipantStatus,
    RegistryKey,
    RegistryUpdate,
    seal,
)
from protocol.schema import PARTICIPANT_CODE, parse_registry, validate


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
    """The registry frame; refused (RegistryEditError) when it lists the Chair's own key as
    a Participant's: every node takes a signature by that key for the Chair's, so all that
    Participant sent would be dropped unanswered."""
    chair = bytes(chair_key.verify_key)
    listed = [f"{p.code}/{a.id}" for p in update.participants for a in p.authorities
              for k in a.keys if k.public_key == chair
              and (k.revoked_at is None or k.revoked_at > now_ms)]  # revoked by now only
    if listed:
        raise RegistryEditError(
            f"the Chair's key is listed as a key of {listed[0]}: a Participant needs a key of "
            "its own (kpnode key new); revoke this listing with 'kpnode registry revoke-key "
            f"--key {chair.hex()}'")
    envelope = Envelope(sender=CHAIR, recipient=BROADCAST, created_at=now_ms, payload=update)
    return seal(envelope, chair_key)


def sign_registry_file(source: Path, chair_key: SigningKey, out: Path, now_ms: int) -> int:
    """Sign a registry JSON file into a registry frame file; returns its version."""
    try:
        data = parse_json(source.read_bytes())
    except OSError as exc:
        raise RegistryJsonError(f"cannot read {source}: {exc.strerror}") from exc
    except JsonTextError as exc:
        raise RegistryJsonError(f"{source}: {exc}") from None
    update = registry_from_json(data)
    out.write_bytes(sign_registry(update, chair_key, now_ms))
    return update.version


# -- editing the registry: pure functions, one per Chair decision ------------------------
# Each takes the draft and returns the changed draft, or raises RegistryEditError with a
# one-line reason. The draft keeps the version it will be published under.


class RegistryEditError(Exception):
    """The requested change does not fit the registry (unknown code, key held already...)."""


def _participant_entry(update: RegistryUpdate, code: str) -> ParticipantEntry:
    entry = next((p for p in update.participants if p.code == code), None)
    if entry is None:
        raise RegistryEditError(f"{code} is not in the registry")
    return entry


def _with_entry(update: RegistryUpdate, entry: ParticipantEntry) -> RegistryUpdate:
    rest = [p for p in update.participants if p.code != entry.code]
    return dataclasses.replace(update, participants=tuple(sorted([*rest, entry],
                                                                 key=lambda p: p.code)))


def _key_holder(update: RegistryUpdate, public_key: bytes) -> str | None:
    for p in update.participants:
        for a in p.authorities:
            if any(k.public_key == public_key for k in a.keys):
                return f"{p.code}/{a.id}"
    return None


def _own_authority(code: str, authority: str) -> None:
    # SPEC §9.1: a certificate's issuing_authority starts with its issuer's code, so every
    # certificate of an authority named otherwise would fail at every node.
    if PARTICIPANT_CODE.fullmatch(code) and not authority.startswith(code):
        # (a malformed code gets the protocol's own answer, from _checked)
        raise RegistryEditError(f"authority {authority!r} must start with {code} (e.g. "
                                f"{code}-KPA): certificates name it as their issuing "
                                "authority, and nodes refuse one that does not")


def add_participant(update: RegistryUpdate, code: str, name: str, authority: str,
                    authority_name: str, public_key: bytes, valid_from: int) -> RegistryUpdate:
    _own_authority(code, authority)
    if any(p.code == code for p in update.participants):
        raise RegistryEditError(f"{code} is in the registry already")
    held = _key_holder(update, public_key)
    if held:
        raise RegistryEditError(f"that key belongs to {held} already")
    entry = ParticipantEntry(code=code, name=name, status=ParticipantStatus.ACTIVE,
                             authorities=(Authority(id=authority, name=authority_name, keys=(
                                 RegistryKey(public_key=public_key, valid_from=valid_from),)),))
    return _checked(_with_entry(update, entry))


def add_key(update: RegistryUpdate, code: str, authority: str, public_key: bytes,
            valid_from: int, valid_until: int | None = None,
            authority_name: str | None = None) -> RegistryUpdate:
    """A new key for an authority (a rotation, or a new authority when ``authority_name``
    is given). Existing keys stay valid: end them with :func:`end_key`."""
    entry = _participant_entry(update, code)
    held = _key_holder(update, public_key)
    if held:
        raise RegistryEditError(f"that key belongs to {held} already")
    if valid_until is not None and valid_until <= valid_from:
        raise RegistryEditError("a key's end must come after its start")  # as end_key says
    key = RegistryKey(public_key=public_key, valid_from=valid_from, valid_until=valid_until)
    found = next((a for a in entry.authorities if a.id == authority), None)
    if found is None:
        if authority_name is None:
            known = ", ".join(a.id for a in entry.authorities)
            # A rotation meant for an authority named otherwise than CODE-KPA (add-key's
            # default) must not end up under a new authority the node never signs as.
            rotation = (f" ({code}'s authorities: {known}); for a new key of one of them "
                        f"give --authority {entry.authorities[0].id}"
                        if entry.authorities else "")
            raise RegistryEditError(f"{code} has no authority {authority}{rotation}; to add "
                                    "a new authority, give --authority-name as well")
        _own_authority(code, authority)
        authorities = (*entry.authorities, Authority(id=authority, name=authority_name,
                                                     keys=(key,)))
    elif authority_name is not None and authority_name != found.name:
        # The name was dropped without a word and the key went to the existing authority.
        raise RegistryEditError(f"{code} has an authority {authority} already (named "
                                f"{found.name!r}); to add another, give its id with "
                                "--authority as well as --authority-name")
    else:
        authorities = tuple(dataclasses.replace(a, keys=(*a.keys, key)) if a is found else a
                            for a in entry.authorities)
    return _checked(_with_entry(update, dataclasses.replace(entry, authorities=authorities)))


def _change_key(update: RegistryUpdate, public_key: bytes,
                change: Callable[[RegistryKey], RegistryKey]) -> RegistryUpdate:
    for p in update.participants:
        for a in p.authorities:
            for k in a.keys:
                if k.public_key == public_key:
                    new_a = dataclasses.replace(a, keys=tuple(change(x) if x is k else x
                                                             for x in a.keys))
                    new_p = dataclasses.replace(p, authorities=tuple(
                        new_a if x is a else x for x in p.authorities))
                    return _checked(_with_entry(update, new_p))
    raise RegistryEditError(f"no key {public_key.hex()} in the registry")


def end_key(update: RegistryUpdate, public_key: bytes, at_ms: int,
            now_ms: int) -> RegistryUpdate:
    """The key stays valid until ``at_ms`` (the end of a rotation's overlap).

    An end still to come may move either way; a key that has lapsed by ``now_ms`` is not
    brought back: what it would sign in between could not be told from what someone holding
    a retired key's copy signed meanwhile. A rotation adds a new key instead."""
    def change(k: RegistryKey) -> RegistryKey:
        if at_ms <= k.valid_from:
            raise RegistryEditError("a key's end must come after its start")
        if k.valid_until is not None and k.valid_until <= now_ms and at_ms > k.valid_until:
            raise RegistryEditError(
                f"that key lapsed at {utc_text(k.valid_until)}: a lapsed key is not brought "
                "back (an earlier end is taken); add a new key instead")
        return dataclasses.replace(k, valid_until=at_ms)
    return _change_key(update, public_key, change)


def revoke_key(update: RegistryUpdate, public_key: bytes, at_ms: int) -> RegistryUpdate:
    """Refused from ``at_ms`` on, whatever its validity window said (a compromised key).

    A revocation only ever moves earlier: run again on a key revoked already (a second
    'revoke-key' to be sure, a script run twice), it set the revocation to the new --at,
    default now, and what the key signed in between was accepted again everywhere."""
    def change(k: RegistryKey) -> RegistryKey:
        if k.revoked_at == at_ms:
            return k  # the same revocation again (a script run twice): nothing changes
        if k.revoked_at is not None and at_ms > k.revoked_at:
            raise RegistryEditError(
                f"that key is revoked already, from {utc_text(k.revoked_at)}: a later "
                "revocation would make what it signed in between valid again (an earlier "
                "--at is taken)")
        return dataclasses.replace(k, revoked_at=at_ms)
    return _change_key(update, public_key, change)


def set_status(update: RegistryUpdate, code: str, status: ParticipantStatus) -> RegistryUpdate:
    entry = _participant_entry(update, code)
    if entry.status is status:
        raise RegistryEditError(f"{code} is {status} already")
    if entry.status is ParticipantStatus.WITHDRAWN:
        # No command removes a Participant, and add-participant refuses a code the
        # registry holds: the old advice, 'remove and add it again', could not be followed.
        raise RegistryEditError(
            f"{code} has withdrawn, and no registry command brings a withdrawn Participant "
            "back (it rejoins only through the Plenary). A withdrawal made in error and "
            f"not yet published: in the draft, registry.json, set {code}'s \"status\" "
            "back to \"active\"")
    return _checked(_with_entry(update, dataclasses.replace(entry, status=status)))


def embargo(update: RegistryUpdate, origin: str, embargoed: bool) -> RegistryUpdate:
    current = set(update.embargoed_origins)
    if embargoed == (origin in current):
        raise RegistryEditError(f"origin {origin} is {'' if embargoed else 'not '}embargoed "
                                "already")
    changed = current | {origin} if embargoed else current - {origin}
    return _checked(dataclasses.replace(update, embargoed_origins=tuple(sorted(changed))))


def _checked(update: RegistryUpdate) -> RegistryUpdate:
    """Run the protocol's own validation, so the Chair never signs what nodes refuse."""
    try:
        return registry_from_json(registry_to_json(update))
    except RegistryJsonError as exc:
        raise RegistryEditError(str(exc)) from exc
