"""A node's configuration file (``node.toml`` in the node's directory) and its key files.

Relative paths in the file are relative to the node's directory, so a directory can be
moved or mounted as a volume as a whole.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from node.brokerurl import broker_url_problem
from protocol.schema import AUTHORITY_ID, PARTICIPANT_CODE

CONFIG_NAME = "node.toml"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


class ConfigError(Exception):
    """The configuration or a key file is missing or wrong; the message says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    directory: Path
    participant: str
    authority: str
    broker_urls: tuple[str, ...] = (DEFAULT_BROKER,)
    #: RabbitMQ user the node logs in as; sent as the validated ``user_id`` when set.
    broker_user: str | None = None
    #: refuse a message whose validated ``user_id`` is not its signed sender's broker user
    #: (a locked-down broker, where every node logs in as ``kpx-<code>``)
    check_broker_user: bool = False
    chair_public_key: bytes = b""
    registry_file: str = "registry.kpx"
    database: str = "node.sqlite3"
    signing_key_file: str = "node.key"
    prefetch: int = 256
    delivery_limit: int = 5
    declare_topology: bool = True
    #: send a certificate again (same message id) when no receipt came back in this time
    resend_after_seconds: int = 3600
    #: /metrics, /healthz and /readyz (node/httpserver.py): off unless ``http_port`` is set;
    #: 0 picks a free port (tests). Loopback by default: put a proxy in front to expose it.
    http_host: str = "127.0.0.1"
    http_port: int | None = None

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def database_path(self) -> Path:
        return self.path(self.database)

    @property
    def registry_path(self) -> Path:
        return self.path(self.registry_file)

    def signing_key(self) -> SigningKey:
        from node.keyfile import read_signing_key  # keyfile's errors are ConfigErrors

        return read_signing_key(self.path(self.signing_key_file))

    def rotated_keys(self) -> tuple[SigningKey, ...]:
        """Keys made by ``kpnode key new`` (``keys/*.key``) for a rotation: the node signs
        with one of them once the registry says it is valid (see Node.signing_key)."""
        from node.keyfile import read_signing_key

        folder = self.path(KEYS_DIR)
        if not folder.is_dir():
            return ()
        return tuple(read_signing_key(p) for p in sorted(folder.glob("*.key")))


ENV_PREFIX = "KPX_"
#: where ``kpnode key new`` puts keys for a rotation
KEYS_DIR = "keys"
#: settings whose environment value is a comma-separated list
_LIST_SETTINGS = {"broker_urls"}


def environment_overrides(environ: Mapping[str, str]) -> dict[str, object]:
    """``KPX_<SETTING>`` overrides ``<setting>`` of node.toml (e.g. ``KPX_BROKER_URLS``,
    comma-separated; ``KPX_BROKER_USER``), so containers can be configured from outside."""
    settings = {f for f in NodeConfig.__dataclass_fields__ if f != "directory"}
    found: dict[str, object] = {}
    for name in settings:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is None:
            continue
        if name in _LIST_SETTINGS:
            found[name] = [v.strip() for v in value.split(",") if v.strip()]
        elif value.lower() in ("true", "false"):
            found[name] = value.lower() == "true"
        else:
            found[name] = value
    return found


def load_config(directory: Path | str) -> NodeConfig:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {CONFIG_NAME} in {directory} (run 'kpnode init' first, or "
                          "pass --dir)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    data.update(environment_overrides(os.environ))
    known = {f for f in NodeConfig.__dataclass_fields__ if f != "directory"}
    unknown = sorted(set(data) - known - {"chair_public_key", "signing_key"})
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    try:
        participant = str(data["participant"])
        authority = str(data.get("authority", participant))
        chair = bytes.fromhex(str(data["chair_public_key"]))
    except KeyError as exc:
        raise ConfigError(f"{path}: missing setting {exc.args[0]}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: chair_public_key must be hex: {exc}") from exc
    if not PARTICIPANT_CODE.fullmatch(participant):
        raise ConfigError(f"{path}: participant must be a two-letter code, not {participant!r}")
    if not AUTHORITY_ID.fullmatch(authority) or not authority.startswith(participant):
        raise ConfigError(f"{path}: authority {authority!r} must start with {participant}")
    if len(chair) != 32:
        raise ConfigError(f"{path}: chair_public_key must be 32 bytes (64 hex characters)")
    urls = data.get("broker_urls", [DEFAULT_BROKER])
    if isinstance(urls, str):
        urls = [urls]
    for url in urls:
        if (problem := broker_url_problem(str(url))) is not None:
            raise ConfigError(f"{path}: broker_urls: {problem}")
    try:
        return NodeConfig(
            directory=directory, participant=participant, authority=authority,
            broker_urls=tuple(str(u) for u in urls), broker_user=data.get("broker_user") or None,
            chair_public_key=chair, registry_file=str(data.get("registry_file", "registry.kpx")),
            database=str(data.get("database", "node.sqlite3")),
            signing_key_file=str(data.get("signing_key_file", "node.key")),
            prefetch=int(data.get("prefetch", 256)),
            delivery_limit=int(data.get("delivery_limit", 5)),
            declare_topology=bool(data.get("declare_topology", True)),
            check_broker_user=bool(data.get("check_broker_user", False)),
            resend_after_seconds=int(data.get("resend_after_seconds", 3600)),
            http_host=str(data.get("http_host", "127.0.0.1")),
            http_port=None if data.get("http_port") in (None, "") else int(data["http_port"]),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: a setting has the wrong type: {exc}") from exc


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(config: NodeConfig) -> Path:
    lines = [
        "# kpx node configuration. Paths are relative to this directory.",
        f"participant = {_toml_value(config.participant)}",
        f"authority = {_toml_value(config.authority)}",
        f"broker_urls = {_toml_value(list(config.broker_urls))}",
        f"chair_public_key = {_toml_value(config.chair_public_key.hex())}",
        f"registry_file = {_toml_value(config.registry_file)}",
        f"database = {_toml_value(config.database)}",
        f"signing_key_file = {_toml_value(config.signing_key_file)}",
        f"prefetch = {config.prefetch}",
        f"delivery_limit = {config.delivery_limit}",
        f"declare_topology = {_toml_value(config.declare_topology)}",
        f"check_broker_user = {_toml_value(config.check_broker_user)}",
        f"resend_after_seconds = {config.resend_after_seconds}",
    ]
    if config.http_port is not None:
        lines.append(f"http_host = {_toml_value(config.http_host)}")
        lines.append(f"http_port = {config.http_port}")
    if config.broker_user:
        lines.append(f"broker_user = {_toml_value(config.broker_user)}")
    path = config.directory / CONFIG_NAME
    path.write_text("\n".join(lines) + "\n")
    return path
