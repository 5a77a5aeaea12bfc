"""TLS to the broker: an ``amqps://`` URL with client-certificate options in node.toml is
taken as it is by the node and turned by the AMQP client into the TLS context it uses."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import aiormq
import pytest
from aiormq.connection import SSLContextProvider

from node.config import load_config
from node.network import init_node


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_amqps_url_with_client_certificate_reaches_the_tls_context(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, _ = self_signed(tmp_path, "kpx-ca")
    cert, key = self_signed(tmp_path, "kpx-za")
    urls = [f"amqps://kpx-za@broker-{i}.example:5671/kpx?cafile={ca}&certfile={cert}"
            f"&keyfile={key}&auth=external" for i in (1, 2)]
    node = tmp_path / "ZA"
    init_node(node, "ZA", broker_urls=urls, chair_public_key=bytes(32))
    config = load_config(node)
    assert config.broker_urls == tuple(urls)  # a cluster: every endpoint, in order

    connection = aiormq.Connection(config.broker_urls[0])
    assert connection.url.scheme == "amqps" and connection.url.port == 5671
    assert connection.vhost == "kpx"
    assert connection.url.query["auth"] == "external"  # log in by the client certificate
    certs = connection.ssl_certs
    assert (certs.cafile, certs.cert, certs.key, certs.verify) == (str(ca), str(cert),
                                                                   str(key), True)
    context = await SSLContextProvider(ssl_context=None, ssl_certs=certs,
                                       loop=asyncio.get_running_loop()).get_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "kpx-ca"),),)]

    # The same, from the environment, as a container would be configured.
    monkeypatch.setenv("KPX_BROKER_URLS", ",".join(reversed(urls)))
    assert load_config(node).broker_urls == tuple(reversed(urls))

