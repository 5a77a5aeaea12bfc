"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.localbroker import broker_url

# --- Real-broker harness ------------------------------------------------------------------
# One RabbitMQ for the whole session: the broker named by KPX_AMQP_URL, else a container
# when a Docker engine answers, else a private local rabbitmq-server (node/localbroker.py).
# Tests that need it take `amqp_url` and are marked `@pytest.mark.broker`. Tests that need a
# broker of their own (restarts, clusters) start a `LocalBroker` themselves.


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with broker_url() as url:
        yield url


# --- Other fixtures below ------------------------------------------------------------------
