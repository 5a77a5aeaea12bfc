"""A node's configuration file (``node.toml`` in the node's directory) and its key files.

Relative paths in the file are relative to the node's directory, so a directory can be
moved or mounted as a volume as a whole.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.brokerurl import broker_url_problem
from node.files import write_whole
from protocol.schema import AUTHORITY_ID, PARTICIPANT_CODE

if TYPE_CHECKING:
    from node.keyfile import NodeKey

CONFIG_NAME = "node.toml"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


class ConfigError(Exception):
    """The configuration or a key file is missing or wrong; the message says which."""


#: deliveries of one inbox message before the broker dead-letters it
DEFAULT_DELIVERY_LIMIT = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    directory: Path
    participant: str
    authority: str
    #: no authority in node.toml or the environment: ``authority`` is the default, and the
    #: node takes the one the registry lists its key under instead (Node.open). Not a
    #: setting of node.toml.
    authority_defaulted: bool = False
    broker_urls: tuple[str, ...] = (DEFAULT_BROKER,)
    #: RabbitMQ user the node logs in as; sent as the validated ``user_id`` when set.
    broker_user: str | None = None
    #: refuse a message whose validated ``user_id`` is not its signed sender's broker user
    #: (a locked-down broker, where every node logs in as ``kpx-<code>``)
    check_broker_user: bool = False
    chair_public_key: bytes = b""
    #: Chair keys of before a rotation of the Chair's key: they verify the registries the
    #: node already holds (its database, its evidence log), never a new one
    former_chair_public_keys: tuple[bytes, ...] = ()
    registry_file: str = "registry.kpx"
    database: str = "node.sqlite3"
    signing_key_file: str = "node.key"
    prefetch: int = 256
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    declare_topology: bool = True
    #: send a certificate again (same message id) when no receipt came back in this time
    resend_after_seconds: int = 3600
    #: /metrics, /healthz and /readyz (node/httpserver.py): off unless ``http_port`` is set;
    #: 0 picks a free port (tests). Loopback by default: put a proxy in front to expose it.
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    #: names besides loopback ones that requests for /metrics, /healthz and /readyz may
    #: give as their Host (a container's service name): with any set, or on a loopback
    #: http_host, other names get 421 (DNS rebinding; node/httpserver.py)
    http_allowed_hosts: tuple[str, ...] = ()

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def database_path(self) -> Path:
        return self.path(self.database)

    @property
    def registry_path(self) -> Path:
        return self.path(self.registry_file)

    def signing_key(self) -> NodeKey:
        from node.keyfile import read_node_key  # keyfile's errors are ConfigErrors

        return read_node_key(self.path(self.signing_key_file))

    def rotated_keys(self) -> tuple[NodeKey, ...]:
        """Keys made by ``kpnode key new`` (``keys/*.key``) for a rotation: the node signs
        with one of them once the registry says it is valid (see Node.signing_key)."""
        from node.keyfile import read_node_key

        return tuple(read_node_key(p) for p in self.key_files()[1:])

    def key_files(self) -> list[Path]:
        """Every key file of the node: the configured one, then ``keys/*.key``."""
        folder = self.path(KEYS_DIR)
        rotated = sorted(folder.glob("*.key")) if folder.is_dir() else []
        return [self.path(self.signing_key_file), *rotated]


def node_directory(given: str | None) -> Path:
    """Where a command works: ``--dir``, else ``$KPX_NODE_DIR``, else the current
    directory (for ``kpnode registry`` and ``kpnode chair``, the Chair's directory)."""
    return Path(given or os.environ.get("KPX_NODE_DIR") or ".")


ENV_PREFIX = "KPX_"
#: where ``kpnode key new`` puts keys for a rotation
KEYS_DIR = "keys"
#: held by the running node (kpnode run), which writes its pid into it at start, then a
#: line of the ids of the keys it holds, after HELD_KEYS, and, while it does not consume
#: its inbox because another connection holds it (see Transport.claim_inbox), a line of
#: why, after NOT_CONSUMING
LOCK_NAME = "node.lock"
HELD_KEYS = "keys"
NOT_CONSUMING = "not-consuming"
#: settings whose environment value is a comma-separated list
_LIST_SETTINGS = {"broker_urls", "former_chair_public_keys", "http_allowed_hosts"}


#: KPX_* variables read elsewhere (a command, the logs, the test harness): not settings
_OTHER_VARIABLES = {"node_dir", "key_passphrase", "key_passphrase_file", "log_level",
                    "log_format", "operator", "amqp_url", "docker", "rabbitmq_image",
                    "update_screenshot", "authority_defaulted"}


#: the value of a service link, which Kubernetes (every service of the pod's namespace:
#: kpx-https gives KPX_HTTPS_PORT) and Docker's links set: no setting takes one
_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://\S*")


def misspelt_setting(environ: Mapping[str, str]) -> str | None:
    """Why a ``KPX_*`` variable looks like a setting's misspelt (``KPX_BROKER_URL``), or
    None. Such a variable would be ignored without a word, and the node would run on the
    file's value (or the default broker) instead."""
    settings = sorted(f for f in NodeConfig.__dataclass_fields__
                      if f not in ("directory", "authority_defaulted"))
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        name = variable[len(ENV_PREFIX):].lower()
        if name in settings or name in _OTHER_VARIABLES:
            continue
        if _SERVICE_LINK.fullmatch(environ[variable]):
            continue  # set by the platform for a service named kpx-..., not by a person
        if close := difflib.get_close_matches(name, settings, n=1, cutoff=0.75):
            return (f"{variable} (environment) is not a setting: did you mean "
                    f"{ENV_PREFIX}{close[0].upper()}? (as it is, it would be ignored)")
    return None


def environment_overrides(environ: Mapping[str, str]) -> dict[str, object]:
    """``KPX_<SETTING>`` overrides ``<setting>`` of node.toml (e.g. ``KPX_BROKER_URLS``,
    comma-separated; ``KPX_BROKER_USER``), so containers can be configured from outside.
    Values stay text (lists split); :func:`load_config` reads each as its setting's type."""
    settings = {f for f in NodeConfig.__dataclass_fields__
                if f not in ("directory", "authority_defaulted")}  # not settings
    found: dict[str, object] = {}
    for name in settings:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is None:
            continue
        if name in _LIST_SETTINGS:
            found[name] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            found[name] = value
    return found


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
#: a host name as a Host header gives it, without its port (Compose allows '_' in a
#: service's name)
HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")


def host_name(text: str) -> str | None:
    """``text`` as requests name the host (lower case, no trailing dot, an IPv6 address
    without brackets), or None when it is no host name or address."""
    name = text.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
    except ValueError:
        return name if HOST_NAME.fullmatch(name) else None


def default_authority(participant: str) -> str:
    """The issuing authority a node signs as unless node.toml names another: the id
    ``kpnode init`` and ``kpnode registry add-participant`` give it."""
    return f"{participant}-KPA"


def load_config(directory: Path | str, *, environ: Mapping[str, str] | None = None
                ) -> NodeConfig:
    """The node's configuration: node.toml, with ``KPX_*`` overrides from ``environ``
    (default: the process environment; ``{}`` for the file alone, as it is to be
    rewritten). Every bad value is a :class:`ConfigError` naming the setting and where it
    came from."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if any(directory.glob(".kpx-restore-*")):  # node.backup moves node.toml up last
            raise ConfigError(f"no {CONFIG_NAME} in {directory}: a 'kpnode restore' into it "
                              "was stopped part-way; run that restore again") from None
        raise ConfigError(f"no {CONFIG_NAME} in {directory} (run 'kpnode init' first, or "
                          "pass --dir)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    environ = os.environ if environ is None else environ
    if (misspelt := misspelt_setting(environ)) is not None:
        raise ConfigError(misspelt)
    overrides = environment_overrides(environ)
    data.update(overrides)
    known = {f for f in NodeConfig.__dataclass_fields__
             if f not in ("directory", "authority_defaulted")}
    unknown = sorted(set(data) - known - {"chair_public_key"})
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")

    def where(name: str) -> str:
        return (f"{ENV_PREFIX}{name.upper()} (environment)" if name in overrides
                else f"{path}: {name}")

    def text(name: str, default: str | None = None) -> str:
        value = data.get(name, default)
        if not isinstance(value, str):
            raise ConfigError(f"{where(name)} must be text, not {value!r}")
        return value

    def number(name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = data.get(name, default)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
                or (maximum is not None and value > maximum)):
            bounds = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
            raise ConfigError(f"{where(name)} must be a whole number {bounds}, not {value!r}")
        return value

    def flag(name: str, default: bool) -> bool:
        value = data.get(name, default)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            value = value.strip().lower() in _TRUE
        elif type(value) is int and value in (0, 1):  # `= 1` in the file (TOML's integer)
            value = value == 1
        if not isinstance(value, bool):
            raise ConfigError(f"{where(name)} must be true or false, not {value!r}")
        return value

    if "participant" not in data or "chair_public_key" not in data:
        missing = "participant" if "participant" not in data else "chair_public_key"
        raise ConfigError(f"{path}: missing setting {missing}")
    participant = text("participant")
    authority = text("authority", default_authority(participant))
    try:
        chair = bytes.fromhex(text("chair_public_key"))
    except ValueError as exc:
        raise ConfigError(f"{where('chair_public_key')} must be hex: {exc}") from exc
    if not PARTICIPANT_CODE.fullmatch(participant):
        raise ConfigError(f"{where('participant')} must be a two-letter code, not "
                          f"{participant!r}")
    if not AUTHORITY_ID.fullmatch(authority) or not authority.startswith(participant):
        raise ConfigError(f"{where('authority')} {authority!r} must start with {participant}")
    if not chair:  # as 'kpnode init' without --chair-key leaves it
        raise ConfigError(f"{where('chair_public_key')} is not set: put the KP Chair's "
                          "public key there (64 hex characters, the Chair's chair.pub)")
    if len(chair) != 32:
        raise ConfigError(f"{where('chair_public_key')} must be 32 bytes (64 hex characters)")
    former = data.get("former_chair_public_keys", [])
    if isinstance(former, str):
        former = [former]
    if not isinstance(former, list) or not all(isinstance(k, str) for k in former):
        raise ConfigError(f"{where('former_chair_public_keys')} must be a list of public keys "
                          "(64 hex characters each)")
    try:
        formers = tuple(bytes.fromhex(k) for k in former)
    except ValueError as exc:
        raise ConfigError(f"{where('former_chair_public_keys')} must be hex: {exc}") from exc
    if any(len(k) != 32 for k in formers) or chair in formers:
        raise ConfigError(f"{where('former_chair_public_keys')}: each must be 32 bytes (64 "
                          "hex characters), and not chair_public_key itself")
    urls = data.get("broker_urls", [DEFAULT_BROKER])
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError(f"{where('broker_urls')} must be a list of AMQP URLs")
    for url in urls:
        if (problem := broker_url_problem(url)) is not None:
            raise ConfigError(f"{where('broker_urls')}: {problem}")
    allowed = data.get("http_allowed_hosts", [])
    hosts = ([host_name(h) if isinstance(h, str) else None for h in allowed]
             if isinstance(allowed, list) else [None])
    if not all(hosts):
        raise ConfigError(f"{where('http_allowed_hosts')} must be a list of host names or "
                          f"addresses (no port), not {allowed!r}")
    port = data.get("http_port")
    return NodeConfig(
        directory=directory, participant=participant, authority=authority,
        authority_defaulted="authority" not in data,
        broker_urls=tuple(urls), broker_user=text("broker_user", "") or None,
        chair_public_key=chair, former_chair_public_keys=formers,
        registry_file=text("registry_file", "registry.kpx"),
        database=text("database", "node.sqlite3"),
        signing_key_file=text("signing_key_file", "node.key"),
        prefetch=number("prefetch", 256, 1),
        delivery_limit=number("delivery_limit", DEFAULT_DELIVERY_LIMIT, 1),
        declare_topology=flag("declare_topology", True),
        check_broker_user=flag("check_broker_user", False),
        resend_after_seconds=number("resend_after_seconds", 3600, 1),
        http_host=text("http_host", "127.0.0.1"),
        http_port=None if port in (None, "") else number("http_port", 0, 0, 65535),
        http_allowed_hosts=tuple(h for h in hosts if h),
    )


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


CONFIG_HEADER = "# kpx node configuration. Paths are relative to this directory."
_SETTING_LINE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def _comments_by_setting(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """The comment lines of a node.toml (and the blank lines among them), each block by
    the setting it stands above, and those below the last setting. What a person wrote
    there (who changed the broker, and why) outlives ``write_config``. Lines inside a
    value written over several lines are the value's: its comments go above it."""
    above: dict[str, list[str]] = {}
    block: list[str] = []
    lines = text.splitlines()
    at = 0
    while at < len(lines):
        line = lines[at]
        at += 1
        stripped = line.strip()
        if line == CONFIG_HEADER:
            continue  # written anew
        if not stripped or stripped.startswith("#"):
            block.append(line)
        elif (setting := _SETTING_LINE.match(line)) is not None:
            # A value over several lines (broker_urls a URL a line) is written back on one:
            # the comments inside it go above it, not above the setting after it.
            end = _value_end(lines, at - 1)
            block += [kept for kept in lines[at:end] if kept.strip().startswith("#")]
            at = end
            if any(kept.strip() for kept in block):
                above.setdefault(setting.group(1), []).extend(block)
            block = []
    return above, block if any(kept.strip() for kept in block) else []


def _value_end(lines: list[str], start: int) -> int:
    """The index after the last line of the setting at ``lines[start]``: the first after
    which its lines parse as TOML (only the setting's line, if none does)."""
    for end in range(start + 1, len(lines) + 1):
        try:
            tomllib.loads("\n".join(lines[start:end]))
        except tomllib.TOMLDecodeError:
            continue
        return end
    return start + 1


def write_config(config: NodeConfig) -> Path:
    """Write ``config`` to its node.toml, keeping the comments an existing one has."""
    lines = [
        f"participant = {_toml_value(config.participant)}",
        *([] if config.authority_defaulted
          else [f"authority = {_toml_value(config.authority)}"]),
        f"broker_urls = {_toml_value(list(config.broker_urls))}",
        f"chair_public_key = {_toml_value(config.chair_public_key.hex())}",
        *([f"former_chair_public_keys = "
           f"{_toml_value([k.hex() for k in config.former_chair_public_keys])}"]
          if config.former_chair_public_keys else []),
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
    if config.http_allowed_hosts:
        lines.append(f"http_allowed_hosts = {_toml_value(list(config.http_allowed_hosts))}")
    if config.broker_user:
        lines.append(f"broker_user = {_toml_value(config.broker_user)}")
    path = config.directory / CONFIG_NAME
    try:
        above, below = _comments_by_setting(path.read_text())
    except (OSError, UnicodeDecodeError):
        above, below = {}, []
    written = [CONFIG_HEADER]
    for line in lines:
        written += above.pop(line.split(" = ", 1)[0], [])
        written.append(line)
    # comments above a setting no longer written (a default left out) stay, at the end
    for block in [*above.values(), below]:
        written += block
    # It may hold broker passwords (in broker_urls): readable by the node's user alone.
    write_whole(path, "\n".join(written) + "\n")
    return path
