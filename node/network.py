"""Setting up nodes: one node's directory (``kpnode init``), or a whole local network of
them with a Chair and a signed registry (the demo, the tests, the simulation)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from node.brokerurl import broker_url_problem
from node.chair import sign_registry
from node.config import CONFIG_NAME, ConfigError, NodeConfig, default_authority, write_config
from node.keyfile import KeyFileError, is_encrypted, read_signing_key, write_signing_key
from node.registrytool import ChairDirectory
from node.service import now_ms
from node.store import Store, StoreError
from protocol import (
    Authority,
    ParticipantEntry,
    ParticipantStatus,
    RegistryKey,
    RegistryUpdate,
)
from protocol.schema import AUTHORITY_ID, PARTICIPANT_CODE

NAMES = {
    "ZA": "South Africa", "EU": "European Union", "IN": "India", "BW": "Botswana",
    "AE": "United Arab Emirates", "BE": "Belgium", "RU": "Russian Federation",
    "CA": "Canada", "AU": "Australia", "NA": "Namibia", "AO": "Angola", "CN": "China",
    "US": "United States", "IL": "Israel", "CH": "Switzerland", "SL": "Sierra Leone",
    "CD": "DR Congo", "LS": "Lesotho", "ZW": "Zimbabwe", "TZ": "Tanzania",
}


def init_node(directory: Path, participant: str, *, authority: str | None = None,
              broker_urls: Sequence[str] = (), chair_public_key: bytes = b"") -> NodeConfig:
    """Create a node directory: a fresh Ed25519 key (mode 0600) and ``node.toml``.
    Settings every later command would refuse are refused here, before anything is
    written (ValueError), not after the public key went to the Chair."""
    authority = authority or default_authority(participant)
    if not PARTICIPANT_CODE.fullmatch(participant):
        raise ValueError(f"participant must be a two-letter code in capitals, not "
                          f"{participant!r}")
    if not AUTHORITY_ID.fullmatch(authority) or not authority.startswith(participant):
        raise ValueError(f"authority {authority!r} must start with {participant} (e.g. "
                          f"{default_authority(participant)})")
    if chair_public_key and len(chair_public_key) != 32:
        raise ValueError("the Chair's public key must be 32 bytes (64 hex characters)")
    for url in broker_urls:
        if (problem := broker_url_problem(url)) is not None:
            raise ValueError(f"broker URL {problem}")
    directory.mkdir(parents=True, exist_ok=True)
    config = NodeConfig(directory=directory, participant=participant,
                        authority=authority, chair_public_key=chair_public_key)
    if (directory / CONFIG_NAME).exists():
        raise ConfigError(f"{directory / CONFIG_NAME} exists already; not overwriting it")
    # node.toml is written last: without it, a key and a database that an init stopped
    # part-way left (Ctrl-C, kill -9, a full disk) are taken up again, not refused. The key
    # was never printed, so never sent to the Chair; a database is taken only as init
    # makes it, empty.
    key_path = config.path(config.signing_key_file)
    key = _left_by_init(key_path)
    if config.database_path.exists() and not _empty_database(config.database_path,
                                                             participant):
        raise ConfigError(f"{config.database_path} exists already; not overwriting it")
    if broker_urls:
        config = dataclasses.replace(config, broker_urls=tuple(broker_urls))
    if key is None:
        write_signing_key(key_path, SigningKey.generate())
    Store(config.database_path, owner=participant).close()
    write_config(config)
    return config


def _left_by_init(path: Path) -> SigningKey | None:
    """The plain key an interrupted ``init`` wrote at ``path``, or None if there is none;
    ConfigError for any other file there."""
    if not path.exists():
        return None
    try:
        if not is_encrypted(path):
            return read_signing_key(path)
    except KeyFileError:
        pass
    raise ConfigError(f"{path} exists already; not overwriting it")


def _empty_database(path: Path, participant: str) -> bool:
    """Whether ``path`` is a kpx database of ``participant`` (or of no one) holding
    nothing: what an interrupted ``init`` leaves."""
    wal = path.with_name(path.name + "-wal")
    if path.is_file() and path.stat().st_size == 0 and not (
            wal.exists() and wal.stat().st_size > 0):
        return True  # made, not yet written: its schema was never committed
    try:
        store = Store(path, create=False, owner=participant, migrate=False)
    except StoreError:
        return False
    try:
        tables = [name for (name,) in store.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'owner'")]
        return all(store.db.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone() is None
                   for name in tables)
    except sqlite3.DatabaseError:
        return False
    finally:
        store.close()


@dataclass(frozen=True, slots=True)
class LocalNetwork:
    base: Path
    chair_key: SigningKey
    configs: dict[str, NodeConfig]
    registry: RegistryUpdate

    @property
    def chair_public_key(self) -> bytes:
        return bytes(self.chair_key.verify_key)

    def publish_registry(self, update: RegistryUpdate) -> bytes:
        """Sign ``update`` and put it in every node's registry file; returns the frame."""
        frame = sign_registry(update, self.chair_key, now_ms())
        for config in self.configs.values():
            config.registry_path.write_bytes(frame)
        (self.base / "chair" / "registry.kpx").write_bytes(frame)
        # the Chair's draft moves on, so `kpnode registry --dir BASE/chair` edits from here
        ChairDirectory(self.base / "chair").save(
            dataclasses.replace(update, version=update.version + 1))
        return frame


def create_network(base: Path, codes: Sequence[str], broker_urls: Sequence[str],
                   *, others: Sequence[tuple[str, ParticipantStatus]] = ()) -> LocalNetwork:
    """A Chair and one node per code under ``base``, all active in a signed registry.

    ``others`` adds Participants without a node here (e.g. a suspended one) to the registry.
    """
    base.mkdir(parents=True, exist_ok=True)
    chair_dir = base / "chair"
    chair_dir.mkdir(exist_ok=True)
    chair_key = ChairDirectory(chair_dir).make_key()
    chair_public = bytes(chair_key.verify_key)
    configs = {
        code: init_node(base / code, code, broker_urls=broker_urls, chair_public_key=chair_public)
        for code in codes
    }
    entries = [
        ParticipantEntry(
            code=code, name=NAMES.get(code, code), status=ParticipantStatus.ACTIVE,
            authorities=(Authority(id=c.authority, name=f"{NAMES.get(code, code)} KP authority",
                                   keys=(RegistryKey(public_key=bytes(c.signing_key().verify_key),
                                                     valid_from=0),)),),
        )
        for code, c in configs.items()
    ]
    entries += [ParticipantEntry(code=code, name=NAMES.get(code, code), status=status,
                                 authorities=()) for code, status in others]
    update = RegistryUpdate(version=1, participants=tuple(entries))
    network = LocalNetwork(base, chair_key, configs, update)
    network.publish_registry(update)
    return network
