"""TLS to the broker: an ``amqps://`` URL with client-certificate options in node.toml is
taken as it is by the node and turned by the AMQP client into the TLS context it uses."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from pathlib import Path

import aiormq
import pytest
from aiormq.connection import SSLContextProvider

from node.config import ConfigError, load_config
from node.network import create_network, init_node


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



def test_a_tls_file_that_is_missing_is_named(tmp_path: Path) -> None:
    """CONFIG.md's TLS URL with a cafile not (yet) on the machine: `kpnode run` retried for
    60 s and `kpnode status` reported '[Errno 2] No such file or directory', naming no file."""
    missing = tmp_path / "tls" / "ca.pem"
    network = create_network(tmp_path, ["ZA"],
                             [f"amqps://kpx-za:s3cret@127.0.0.1:1/kpx?cafile={missing}"])
    node = network.configs["ZA"].directory
    done = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--dir",
                           str(node)], capture_output=True, text=True, timeout=120,
                          check=False)
    error = json.loads(done.stdout)["broker"]["error"]
    assert f"cafile {missing}" in error and "s3cret" not in error, error


def test_an_option_the_amqp_client_would_ignore_is_refused(tmp_path: Path) -> None:
    """A misspelt option (`cafle=`) was dropped silently by the AMQP client, which then
    verified the broker against the system's CAs; and TLS options on an amqp:// URL were
    never used: plain AMQP went to the TLS port."""
    node = tmp_path / "ZA"
    init_node(node, "ZA", chair_public_key=bytes(32))
    toml = node / "node.toml"
    text = toml.read_text()
    for url, says in (
            ("amqps://kpx-za:s3cret@mq.example:5671/kpx?cafle=/tls/ca.pem",
             "unknown option cafle"),
            ("amqp://kpx-za:s3cret@mq.example:5671/kpx?cafile=/tls/ca.pem",
             "cafile is a TLS option: the URL must be amqps://")):
        toml.write_text(text.replace('broker_urls = ["amqp://guest:guest@127.0.0.1:5672/"]',
                                     f'broker_urls = ["{url}"]'))
        with pytest.raises(ConfigError) as refused:
            load_config(node, environ={})
        assert says in str(refused.value) and "s3cret" not in str(refused.value)
    # What CONFIG.md shows stays accepted.
    good = ("amqps://kpx-za@mq.example:5671/kpx?cafile=/tls/ca.pem&certfile=/tls/za.pem"
            "&keyfile=/tls/za.key&auth=external&heartbeat=30")
    toml.write_text(text.replace('broker_urls = ["amqp://guest:guest@127.0.0.1:5672/"]',
                                 f'broker_urls = ["{good}"]'))
    assert load_config(node, environ={}).broker_urls == (good,)


@pytest.mark.parametrize("option", ["reconnect_interval=5", "fail_fast=0", "timeout=120"])
def test_an_option_the_nodes_connection_never_uses_is_refused(
        tmp_path: Path, option: str) -> None:
    """The allow-list took reconnect_interval and fail_fast, which only aio-pika's
    RobustConnection reads (kpx connects with a plain aio_pika.Connection and reconnects by
    itself), and timeout, which aiormq parses and never uses (kpx passes its own connect
    timeout): each was accepted at start and then dropped, as a misspelt option was."""
    import aio_pika
    from aio_pika.connection import make_url

    url = f"amqps://kpx-za:s3cret@mq.example:5671/kpx?cafile=/tls/ca.pem&{option}"
    name = option.split("=")[0]
    # not read by what kpx connects with (the class's own parsing: an instance wants an
    # event loop, and this test has none once another test closed it)
    assert name not in aio_pika.Connection._parse_parameters(dict(make_url(url).query))
    node = tmp_path / "ZA"
    init_node(node, "ZA", chair_public_key=bytes(32))
    toml = node / "node.toml"
    toml.write_text(toml.read_text().replace(
        'broker_urls = ["amqp://guest:guest@127.0.0.1:5672/"]', f'broker_urls = ["{url}"]'))
    with pytest.raises(ConfigError) as refused:
        load_config(node, environ={})
    assert f"unknown option {name}" in str(refused.value)
    assert "s3cret" not in str(refused.value)
