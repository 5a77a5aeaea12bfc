"""The Participant registry as the node sees it: who may trade, and with which keys.

Pure: a :class:`Registry` is built from a registry-update frame that the Chair signed and
answers questions about it. Loading it from a file or the database is the caller's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from protocol import (
    CHAIR,
    Authority,
    Envelope,
    Opened,
    ParticipantEntry,
    ParticipantStatus,
    Reason,
    RegistryKey,
    RegistryUpdate,
    SignatureError,
    decode_body,
    key_id,
    open_frame,
    parse_frame,
)
from protocol.errors import ProtocolError

_STANDING_REASON = {
    ParticipantStatus.SUSPENDED: Reason.PARTICIPANT_SUSPENDED,
    ParticipantStatus.WITHDRAWN: Reason.PARTICIPANT_WITHDRAWN,
}


#: How long after a key lapses what it signed while valid is still accepted: longer than
#: a certificate's resends back off (at most 1,024 hours) and than any outage a queue is
#: meant to ride out. A key that was compromised is revoked instead, which takes effect at
#: once.
LAPSED_GRACE_MS = 90 * 24 * 3_600_000


@dataclass(frozen=True, slots=True)
class KeyOwner:
    participant: str
    authority: Authority
    key: RegistryKey


@dataclass(frozen=True, slots=True)
class Registry:
    """One verified registry version, with its frame kept verbatim for the evidence log."""

    update: RegistryUpdate
    frame: bytes
    message_id: str
    # Looked up on every message checked and every transaction signed: indexed once, not
    # scanned (and every key hashed) per lookup across some sixty Participants.
    _participants: dict[str, ParticipantEntry] = field(
        init=False, repr=False, compare=False, default_factory=dict)
    _owners: dict[bytes, KeyOwner] = field(
        init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        for p in self.update.participants:
            # First listing wins, as a scan in registry order would find it.
            self._participants.setdefault(p.code, p)
            for a in p.authorities:
                for k in a.keys:
                    self._owners.setdefault(key_id(k.public_key), KeyOwner(p.code, a, k))

    @property
    def version(self) -> int:
        return self.update.version

    def participant(self, code: str) -> ParticipantEntry | None:
        return self._participants.get(code)

    def standing(self, code: str) -> Reason | None:
        """``None`` when ``code`` is an active Participant, else why it may not trade."""
        entry = self.participant(code)
        if entry is None:
            return Reason.PARTICIPANT_UNKNOWN
        return _STANDING_REASON.get(entry.status)

    def authority(self, participant: str, authority_id: str) -> Authority | None:
        entry = self.participant(participant)
        if entry is None:
            return None
        return next((a for a in entry.authorities if a.id == authority_id), None)

    def embargoed(self, origin: str) -> bool:
        return origin in self.update.embargoed_origins

    def key_owner(self, kid: bytes) -> KeyOwner | None:
        return self._owners.get(kid)

    def lapsed_key(self, kid: bytes, at_ms: int) -> RegistryKey | None:
        """The key with id ``kid`` if at ``at_ms`` it has lapsed (its ``valid_until`` has
        passed, less than :data:`LAPSED_GRACE_MS` ago) without being revoked: what it
        signed while valid may still arrive (a resend, a duplicate's answer, a queue
        drained after an outage) and is judged by its signed ``created_at``."""
        owner = self.key_owner(kid)
        if owner is None:
            return None
        key = owner.key
        if key.revoked_at is not None and at_ms >= key.revoked_at:
            return None
        if key.valid_until is None or not key.valid_until <= at_ms < (
                key.valid_until + LAPSED_GRACE_MS):
            return None
        return key

    def public_key_for(self, kid: bytes, at_ms: int) -> bytes:
        """The public key with id ``kid`` if it may sign at ``at_ms``; else SignatureError."""
        owner = self.key_owner(kid)
        if owner is None:
            raise SignatureError(Reason.KEY_UNKNOWN, f"key {kid.hex()} is not in the registry")
        key = owner.key
        if key.revoked_at is not None and at_ms >= key.revoked_at:
            raise SignatureError(Reason.KEY_REVOKED, f"key {kid.hex()} of {owner.authority.id} "
                                 "is revoked")
        if at_ms < key.valid_from or (key.valid_until is not None and at_ms >= key.valid_until):
            raise SignatureError(Reason.KEY_NOT_VALID_NOW,
                                 f"key {kid.hex()} of {owner.authority.id} is not valid now")
        return key.public_key


def own_key_fault(registry: Registry, participant: str, authority: str, public_key: bytes,
                  at_ms: int) -> SignatureError | None:
    """Why a node of ``participant``'s ``authority`` may not sign with ``public_key`` at
    ``at_ms`` (every partner would refuse what it signs), or ``None`` when it may."""
    kid = key_id(public_key)
    owner = registry.key_owner(kid)
    if owner is not None and (owner.participant, owner.authority.id) != (participant, authority):
        return SignatureError(Reason.KEY_WRONG_SENDER, f"key {kid.hex()} belongs to "
                              f"{owner.participant}/{owner.authority.id} in the registry, not "
                              f"to {participant}/{authority}")
    try:
        registry.public_key_for(kid, at_ms)
    except SignatureError as exc:
        return exc
    return None


def registered_authority(registry: Registry, participant: str,
                         public_keys: Sequence[bytes], at_ms: int) -> str | None:
    """The authority of ``participant`` the registry lists these keys under: one under
    which a key may sign at ``at_ms`` first (after a rotation the old key's authority may
    be gone), else the first listed; None when none is listed for ``participant``."""
    listed = [owner.authority.id for public in public_keys
              if (owner := registry.key_owner(key_id(public))) is not None
              and owner.participant == participant]
    for public in public_keys:
        owner = registry.key_owner(key_id(public))
        if owner is not None and owner.participant == participant and own_key_fault(
                registry, participant, owner.authority.id, public, at_ms) is None:
            return owner.authority.id
    return listed[0] if listed else None


def key_fault_remedy(fault: ProtocolError, registry: Registry, participant: str,
                     public_key: bytes, at_ms: int) -> str:
    """What an operator does about a node key that cannot sign. A key the registry lists
    for another authority of this Participant is node.toml's ``authority`` not matching
    the registry, which a new key would not cure; a key of another Participant (a key
    file copied from elsewhere) needs a key of the node's own."""
    owner = registry.key_owner(key_id(public_key))
    if fault.reason == Reason.KEY_WRONG_SENDER and owner is not None \
            and owner.participant == participant:
        return (f"the registry lists this key for {owner.authority.id}: set 'authority = "
                f"\"{owner.authority.id}\"' in node.toml, or ask the Chair to list it for "
                "the authority node.toml names")
    if fault.reason == Reason.KEY_UNKNOWN:
        # Most often a new node, or a new key, ahead of the registry it was given: a second
        # new key would only be one more for the Chair to list.
        return (f"this node's registry (version {registry.version}) does not list the key: "
                f"send its public key ({public_key.hex()}) to the Chair to add, or, if the "
                "Chair has added it, install the registry version that lists it")
    if fault.reason == Reason.KEY_NOT_VALID_NOW and owner is not None \
            and owner.key.valid_from > at_ms:
        return (f"the registry lists the key as valid from {utc_text(owner.key.valid_from)}: it "
                "signs from then on, or ask the Chair for an earlier start")
    return "make a new key with 'kpnode key new' for the Chair to add"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: the instants a datetime can hold, in ms since 1970: the wire allows up to 2**53
_EARLIEST_MS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_LATEST_MS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)


def utc_instant(ms: int) -> datetime:
    """An instant in ms since 1970 as a UTC datetime, held to the years 1 to 9999. Signed
    messages and registries may carry instants up to 2**53 ms (year 287396), and a dead
    letter's headers anything: shown or compared by date, those read as the last moment
    a datetime holds instead of ending the command with a ValueError."""
    return _EPOCH + timedelta(milliseconds=min(max(ms, _EARLIEST_MS), _LATEST_MS))


def utc_text(ms: int) -> str:
    """An instant in ms since 1970 as 'YYYY-MM-DD HH:MM:SSZ', for people to read."""
    return utc_instant(ms).strftime("%Y-%m-%d %H:%M:%SZ")


def signing_key_choice(registry: Registry, participant: str, authority: str,
                       public_keys: Sequence[bytes], at_ms: int) -> int | None:
    """Which of a node's own keys to sign with at ``at_ms``: the one the registry lists for
    this authority, valid and not revoked, that became valid last (so a rotated-in key takes
    over at its start time without a restart). ``None`` when none of them is usable."""
    best: tuple[int, int] | None = None
    for index, public in enumerate(public_keys):
        owner = registry.key_owner(key_id(public))
        if owner is None or own_key_fault(registry, participant, authority, public,
                                          at_ms) is not None:
            continue
        if best is None or owner.key.valid_from > best[0]:
            best = (owner.key.valid_from, index)
    return None if best is None else best[1]


def open_registry_frame(frame: bytes, chair_public_key: bytes,
                        former: Sequence[bytes] = ()) -> Registry:
    """Verify a registry-update frame against the Chair's key; raise ProtocolError if bad.

    ``former``: Chair keys of before a rotation of the Chair's key, for a registry the node
    already held then (its database, its evidence log). A registry arriving now must be
    signed by the current key: a former one may be the reason for the rotation."""
    chair_keys = {key_id(k): k for k in (*former, chair_public_key)}

    def chair_only(kid: bytes) -> bytes:
        if kid not in chair_keys:
            raise SignatureError(Reason.KEY_UNKNOWN, "registry is not signed by the Chair's key")
        return chair_keys[kid]

    opened: Opened = open_frame(frame, chair_only)
    return Registry(_registry_update(opened.envelope), frame, opened.envelope.message_id)


def unverified_registry_version(frame: bytes) -> int:
    """The version a registry-update frame names, its shape checked but not its signature
    (that needs the Chair's key): ProtocolError if it is no registry update at all."""
    return _registry_update(decode_body(parse_frame(frame).body)).version


def _registry_update(envelope: Envelope) -> RegistryUpdate:
    if envelope.sender != CHAIR or not isinstance(envelope.payload, RegistryUpdate):
        raise ProtocolError(Reason.BODY_SCHEMA, "frame is not a registry update")
    return envelope.payload


def signed_by(registry: Registry, chair_public_key: bytes) -> bool:
    """Whether ``chair_public_key`` signed ``registry`` (not a former Chair key)."""
    return parse_frame(registry.frame).key_id == key_id(chair_public_key)


def newer(current: Registry | None, candidate: Registry, chair_public_key: bytes) -> bool:
    """Registry versions only move forward, under one Chair key: one the current key
    (``chair_public_key``) signed replaces one a former key signed, whatever their versions.
    A Chair key is rotated because it was exposed; what its holder forged before the nodes
    were reconfigured, they applied, and at a version as high as the wire allows the Chair
    could never sign one above it, nor know which version to go above."""
    if current is None:
        return True
    by_current = signed_by(candidate, chair_public_key)
    if by_current != signed_by(current, chair_public_key):
        return by_current
    return candidate.version > current.version
