"""The docker-compose topology without containers, then a fourth Participant joining it.

Everything goes through the commands an operator types, in the order README's compose
section and deploy/RUNBOOK.md give them: ``kpnode deploy network`` (what the compose
bootstrap runs; only the broker's host differs), the definitions imported into a local
``rabbitmq-server`` (compose loads the same file at boot), the Chair's registry published
with its own restricted user, and each node as a ``kpnode run`` process on its own
restricted user. The second half is the runbook's "Joining a new Participant".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.localbroker import LocalBroker, ensure_rabbitmq_installed
from tests.netutil import certificate_json

pytestmark = pytest.mark.broker

KPNODE = [sys.executable, "-m", "node.cli"]


def kpnode(*args: str, check: bool = True) -> Any:
    done = subprocess.run([*KPNODE, *args, "--json"], capture_output=True, text=True,
                          timeout=120, check=False, env=_env())
    if check and done.returncode != 0:
        raise AssertionError(f"kpnode {' '.join(args)} exited {done.returncode}: "
                             f"{done.stderr.strip()}")
    return json.loads(done.stdout) if done.stdout.strip() else None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPX_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


class Nodes:
    """``kpnode run`` processes, stopped with SIGTERM (each by its own pid) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, directory: Path) -> None:
        log = (self.logs / f"{directory.name}.log").open("wb")
        self.processes[directory.name] = subprocess.Popen(
            [*KPNODE, "run", "--dir", str(directory)], stdout=log, stderr=subprocess.STDOUT,
            env=_env())

    def check_alive(self) -> None:
        for code, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"kpnode run for {code} exited {process.returncode}: "
                                     + (self.logs / f"{code}.log").read_text()[-2000:])

    def stop(self) -> dict[str, int | None]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for code, process in self.processes.items():
            try:
                codes[code] = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[code] = None
        return codes


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    ensure_rabbitmq_installed()
    with LocalBroker() as b:
        yield b


def wait_for_state(nodes: Nodes, directory: Path, number: str, wanted: str,
                   timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        nodes.check_alive()
        shown = kpnode("show", number, "--dir", str(directory), check=False)
        states = [r["state"] for r in (shown or {}).get("records", [])]
        if wanted in states:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{number} at {directory.name}: {states}, never {wanted}")
        time.sleep(0.5)


def close_loop(nodes: Nodes, base: Path, number: str, exporter: str, importer: str) -> None:
    cert = base / f"{number}.json"
    cert.write_text(json.dumps(certificate_json(number, exporter, importer)))
    kpnode("issue", str(cert), "--dir", str(base / exporter))
    wait_for_state(nodes, base / importer, number, "received")
    kpnode("confirm", number, "--dir", str(base / importer))
    wait_for_state(nodes, base / exporter, number, "confirmed")


def test_compose_topology_closes_loops_and_a_fourth_participant_joins(
        broker: LocalBroker, tmp_path: Path) -> None:
    base = tmp_path / "kpx"
    template = f"amqp://{{user}}:{{password}}@127.0.0.1:{broker.amqp_port}/kpx"
    nodes = Nodes(tmp_path)
    try:
        # -- the compose network: bootstrap, broker definitions, registry, three nodes ----
        made = kpnode("deploy", "network", "--dir", str(base), "--participants", "ZA,EU,IN",
                      "--broker", template)
        assert made["created"] and made["nodes"] == ["EU", "IN", "ZA"]
        chair_key = made["chair_public_key"]
        broker.import_definitions(made["definitions"])
        chair_password = base / "chair" / "broker-passwords" / "kpx-chair.password"
        publish = ["deploy", "publish-registry", str(base / "chair" / "registry.kpx"),
                   "--broker", template, "--password-file", str(chair_password),
                   "--chair-key", chair_key]
        assert kpnode(*publish)["version"] == 1
        for code in ("ZA", "EU", "IN"):
            nodes.start(base / code)
        close_loop(nodes, base, "ZA-2026-0001", "ZA", "IN")
        close_loop(nodes, base, "IN-2026-0001", "IN", "EU")
        # A second bootstrap run (a compose restart) changes nothing. One with other options
        # would say nothing and change nothing the nodes use, or split them from the broker
        # (definitions for another vhost): refused, and the definitions stay as they are.
        definitions = (base / "broker" / "definitions.json").read_bytes()
        for changed, says in ((["--participants", "ZA,EU,IN,BW"], "BW not provisioned"),
                              (["--vhost", "other"], "provisioned for vhost 'kpx'"),
                              (["--broker", template.replace("127.0.0.1", "10.0.0.9")],
                               "nodes use other broker URLs")):
            options = ["--broker", template, *changed] if changed[0] != "--broker" else changed
            refused = subprocess.run([*KPNODE, "deploy", "network", "--dir", str(base),
                                      *options], capture_output=True, text=True, timeout=120,
                                     check=False, env=_env())
            assert refused.returncode == 3 and says in refused.stderr, refused.stderr
        assert (base / "broker" / "definitions.json").read_bytes() == definitions
        assert not kpnode("deploy", "network", "--dir", str(base), "--participants",
                          "ZA,EU,IN", "--broker", template)["created"]

        # -- RUNBOOK: joining a new Participant (BW) ---------------------------------------
        joined = kpnode("init", "--participant", "BW", "--dir", str(base / "BW"),
                        "--chair-key", chair_key)
        chair = str(base / "chair")
        kpnode("registry", "add-participant", "BW", "--name", "Botswana", "--key",
               joined["public_key"], "--dir", chair)
        password = chair_password.read_text().strip()
        published = kpnode("registry", "publish", "--dir", chair, "--broker",
                           template.format(user="kpx-chair", password=password))
        assert published["version"] == 2
        defs = kpnode("deploy", "definitions", "--registry",
                      str(base / "chair" / "registry.kpx"), "--chair-key", chair_key,
                      "--out", str(base / "broker" / "definitions.json"),
                      "--passwords", str(base / "chair" / "broker-passwords"))
        assert defs["registry_version"] == 2
        broker.import_definitions(defs["definitions"])
        (base / "BW" / "registry.kpx").write_bytes((base / "chair" / "registry.kpx").read_bytes())
        kpnode("deploy", "configure", "--dir", str(base / "BW"), "--broker", template,
               "--password-file", str(base / "chair" / "broker-passwords" / "kpx-bw.password"))
        nodes.start(base / "BW")
        close_loop(nodes, base, "BW-2026-0001", "BW", "ZA")
        close_loop(nodes, base, "EU-2026-0001", "EU", "BW")
        # The Participants already running kept their users: nothing was reissued.
        close_loop(nodes, base, "ZA-2026-0002", "ZA", "EU")
        # compose's bootstrap, run again with its first list, is not refused for BW
        assert not kpnode("deploy", "network", "--dir", str(base), "--participants",
                          "ZA,EU,IN", "--broker", template)["created"]
    finally:
        exits = nodes.stop()
    assert exits == {"ZA": 0, "EU": 0, "IN": 0, "BW": 0}
    for code in ("ZA", "EU", "IN", "BW"):
        assert kpnode("verify-log", "--dir", str(base / code))["ok"]
