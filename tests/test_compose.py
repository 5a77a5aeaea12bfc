"""docker-compose.yml is a valid Compose file, and it wires what the README says it does.

There is no Docker engine here, but ``config`` needs none: ``docker compose config`` (the
Compose plugin) or, where it is missing, Debian's ``docker-compose`` (installed by
scripts/bootstrap.sh) parses and validates the file against the Compose schema.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from node.definitions import BROKER_CONFIG
from node.runner import DRAIN_SECONDS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail("neither 'docker compose' nor 'docker-compose' is installed: run "
                "scripts/bootstrap.sh (it installs Debian's docker-compose)")


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*compose_command(), "-f", str(file), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=False)


def test_compose_file_is_valid() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_compose_network_has_the_documented_services_and_ports() -> None:
    done = compose("config")
    assert done.returncode == 0, done.stderr
    services = compose("config", "--services").stdout.split()
    assert sorted(services) == ["bootstrap", "node-eu", "node-in", "node-za",
                                "publish-registry", "rabbitmq"]
    text = done.stdout
    # Published on localhost only: the management UI and each node's HTTP port.
    for port in ("15672", "9101", "9102", "9103"):
        assert (f"127.0.0.1:{port}:" in text  # docker-compose 1.x
                or re.search(rf"host_ip: 127\.0\.0\.1\n\s+published: \"?{port}\"?", text)), port
    assert (ROOT / "deploy" / "Dockerfile").is_file()
    # Docker kills a container 10 s after SIGTERM unless told otherwise: too soon for a
    # node's graceful stop (DRAIN_SECONDS to settle its deliveries, as much to flush).
    grace = re.findall(r"stop_grace_period: (\d+)s", text)
    assert len(grace) == 3 and all(int(g) >= 2 * DRAIN_SECONDS + 5 for g in grace), grace
    # A node listens on all addresses in its container: its token-less endpoints answer
    # its service names (and loopback ones) only, not a rebound web page's domain.
    allowed = re.findall(r"KPX_HTTP_ALLOWED_HOSTS: (\S+)", text)
    assert len(allowed) == 3 and all(set(a.split(",")) == {"node-za", "node-eu", "node-in"}
                                     for a in allowed), allowed
    conf = (ROOT / "deploy" / "rabbitmq" / "20-kpx.conf").read_text().splitlines()
    assert set(BROKER_CONFIG) <= set(conf)  # what every kpx broker needs


def test_the_chair_can_edit_and_publish_through_publish_registry() -> None:
    """The runbook has the Chair run `docker compose run --rm publish-registry registry ...
    --dir /kpx/chair`: editing the draft and publishing write into the Chair's volume."""
    service = COMPOSE_FILE.read_text().split("\n  publish-registry:\n", 1)[1].split(
        "\n\n", 1)[0]
    assert re.search(r"- chair:/kpx/chair\n", service), service
    assert "entrypoint" not in service  # the image's: kpnode


def test_an_invalid_compose_file_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("service_healthy", "service_happy", 1))
    assert compose("config", "-q", file=broken).returncode != 0
