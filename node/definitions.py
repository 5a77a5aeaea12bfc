"""RabbitMQ definitions for a locked-down kpx broker, derived from the signed registry.

Pure: :func:`broker_definitions` turns a registry and the broker users' password hashes into
the JSON document RabbitMQ loads at boot (``load_definitions``) or with ``rabbitmqctl
import_definitions``. The topology (exchanges, queue arguments, bindings) comes from
:mod:`node.transport`, so a broker loaded from definitions is exactly the one a node would
have declared itself.

Who may do what (RabbitMQ checks configure / write / read against these regexes):

* ``kpx-<code>``, one per Participant: **configure** only its own ``kpx.claim.CODE``, the
  exclusive queue a consuming node holds so that a second node for the Participant cannot
  consume beside it (it cannot declare, bind or delete anything else), **write** only to
  the exchanges ``kpx`` (to any Participant) and ``kpx.dlx`` (its own refusals: a topic
  permission holds it to its own code as routing key), **read** only its own inbox and
  dead-letter queue. Messages carry its
  name as the validated ``user_id``, so it cannot publish as another.
* ``kpx-chair``: writes only to ``kpx.registry`` (the fanout that reaches every inbox),
  reads and configures nothing.
* ``kpx-admin``: the operator (management UI, ``rabbitmqctl``-like HTTP API); full rights.

A withdrawn Participant gets no user; its queues stay (definitions only ever add) until an
operator deletes them.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import Any

from node.service import broker_user_for
from node.transport import (
    DEAD_LETTER_EXCHANGE,
    EXCHANGE,
    EXCHANGES,
    REGISTRY_EXCHANGE,
    claim_queue,
    dead_letter_arguments,
    dead_letter_queue,
    inbox_arguments,
    inbox_queue,
)
from protocol import ParticipantStatus, RegistryUpdate

DEFAULT_VHOST = "kpx"
CHAIR_USER = "kpx-chair"
ADMIN_USER = "kpx-admin"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: bounds a dead-letter queue that a flood of refused input could otherwise grow without
#: limit; past it the refusing node's publish is nacked and the original stays unacknowledged
DEAD_LETTER_MAX_BYTES = 1 << 30
NOTHING = "^$"
#: rabbitmq.conf lines every kpx broker needs (deploy/rabbitmq/20-kpx.conf, the local
#: brokers of the demo and tests). consumer_timeout: a node holds its deliveries
#: unacknowledged while its database cannot commit (a full disk); RabbitMQ 3.10's default
#: of 30 minutes then takes them back, each return counting towards the delivery limit,
#: so five such returns (2.5 h) would dead-letter messages never processed. A week.
BROKER_CONFIG = ("consumer_timeout = 604800000",)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))
    with a 4-byte salt."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("the salt is 4 bytes")
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def broker_users(registry: RegistryUpdate) -> list[str]:
    """The broker users a registry calls for: every Participant not withdrawn (a suspended
    one still reads the answers to what it sent), then the Chair and the operator."""
    return [broker_user_for(p.code) for p in registry.participants
            if p.status != ParticipantStatus.WITHDRAWN] + [CHAIR_USER, ADMIN_USER]


def _exactly(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def broker_definitions(registry: RegistryUpdate, hashes: Mapping[str, str], *,
                       vhost: str = DEFAULT_VHOST, delivery_limit: int = 5) -> dict[str, Any]:
    """The definitions document; ``hashes`` maps every user of :func:`broker_users` to its
    :func:`password_hash`."""
    missing = [u for u in broker_users(registry) if u not in hashes]
    if missing:
        raise ValueError(f"no password hash for {', '.join(missing)}")
    codes = [p.code for p in registry.participants if p.status != ParticipantStatus.WITHDRAWN]

    def user(name: str, tags: list[str]) -> dict[str, Any]:
        return {"name": name, "password_hash": hashes[name],
                "hashing_algorithm": HASHING_ALGORITHM, "tags": tags}

    def permission(name: str, configure: str, write: str, read: str) -> dict[str, str]:
        return {"user": name, "vhost": vhost, "configure": configure, "write": write,
                "read": read}

    def queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "vhost": vhost, "durable": True, "auto_delete": False,
                "arguments": arguments}

    def binding(source: str, queue_name: str, routing_key: str) -> dict[str, Any]:
        return {"source": source, "vhost": vhost, "destination": queue_name,
                "destination_type": "queue", "routing_key": routing_key, "arguments": {}}

    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []
    for code in codes:
        queues.append(queue(inbox_queue(code), inbox_arguments(code, delivery_limit)))
        queues.append(queue(dead_letter_queue(code), dead_letter_arguments()))
        bindings.append(binding(EXCHANGE, inbox_queue(code), code))
        bindings.append(binding(REGISTRY_EXCHANGE, inbox_queue(code), ""))
        bindings.append(binding(DEAD_LETTER_EXCHANGE, dead_letter_queue(code), code))
    return {
        "users": [user(broker_user_for(c), []) for c in codes]
        + [user(CHAIR_USER, []), user(ADMIN_USER, ["administrator"])],
        "vhosts": [{"name": vhost}],
        "permissions": [
            permission(broker_user_for(c), _exactly(claim_queue(c)),
                       _exactly(EXCHANGE, DEAD_LETTER_EXCHANGE),
                       _exactly(inbox_queue(c), dead_letter_queue(c)))
            for c in codes
        ] + [
            permission(CHAIR_USER, NOTHING, _exactly(REGISTRY_EXCHANGE), NOTHING),
            permission(ADMIN_USER, ".*", ".*", ".*"),
        ],
        # Each node's user may publish to the dead-letter exchange under its own code
        # only: without this, ZA could fill BE's dead-letter queue (to its size cap, after
        # which BE could no longer dead-letter and its inbox would stall).
        "topic_permissions": [
            {"user": broker_user_for(c), "vhost": vhost, "exchange": DEAD_LETTER_EXCHANGE,
             "write": _exactly(c), "read": ".*"}
            for c in codes
        ],
        "exchanges": [
            {"name": name, "vhost": vhost, "type": kind.value, "durable": True,
             "auto_delete": False, "internal": False, "arguments": {}}
            for name, kind in EXCHANGES
        ],
        "queues": queues,
        "bindings": bindings,
        "policies": [
            {"vhost": vhost, "name": "kpx-dead-letters",
             "pattern": "^" + re.escape(dead_letter_queue("")), "apply-to": "queues",
             "priority": 0,
             "definition": {"max-length-bytes": DEAD_LETTER_MAX_BYTES,
                            "overflow": "reject-publish"}},
        ],
    }
