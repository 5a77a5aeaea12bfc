"""The definitions generator, without a broker: who gets a user, and that re-running it keeps
every password (so regenerating after a registry change never locks a running node out)."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from node.config import ConfigError
from node.definitions import broker_definitions, broker_users, password_hash
from node.deploy import UNFINISHED, password_file, provision, write_definitions
from node.network import create_network
from node.registry import open_registry_frame
from node.transport import inbox_arguments
from protocol import ParticipantStatus
from tests.netutil import writes_cut_short


def test_password_hash_is_rabbitmq_sha256_with_a_four_byte_salt() -> None:
    raw = base64.b64decode(password_hash("s3cret", b"\x01\x02\x03\x04"))
    assert raw == b"\x01\x02\x03\x04" + hashlib.sha256(b"\x01\x02\x03\x04s3cret").digest()


def test_users_queues_and_passwords(tmp_path: Path) -> None:
    net = create_network(tmp_path / "net", ["ZA", "IN"], (),
                         others=[("SL", ParticipantStatus.SUSPENDED),
                                 ("XW", ParticipantStatus.WITHDRAWN)])
    assert broker_users(net.registry) == ["kpx-za", "kpx-in", "kpx-sl", "kpx-chair",
                                          "kpx-admin"]
    registry = open_registry_frame((tmp_path / "net/chair/registry.kpx").read_bytes(),
                                   net.chair_public_key)
    out, secrets = tmp_path / "broker/definitions.json", tmp_path / "passwords"
    first = write_definitions(registry, out, secrets, delivery_limit=7)
    assert json.loads(out.read_text()) == first
    assert {q["name"]: q["arguments"] for q in first["queues"]}["kpx.inbox.ZA"] == \
        inbox_arguments("ZA", 7)
    assert "kpx.inbox.XW" not in {q["name"] for q in first["queues"]}
    for user in broker_users(net.registry):
        assert password_file(secrets, user).stat().st_mode & 0o777 == 0o600
        assert password_file(secrets, user).read_text().strip() not in out.read_text()
    before = {u: password_file(secrets, u).read_text() for u in broker_users(net.registry)}
    with pytest.raises(ConfigError, match="virtual host"):  # not a file the broker refuses
        write_definitions(registry, out, secrets, vhost="")
    write_definitions(registry, out, secrets)
    assert before == {u: password_file(secrets, u).read_text()
                      for u in broker_users(net.registry)}


def test_a_password_file_cut_short_is_never_left_under_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'deploy definitions' stopped between a password file's creation and its write
    (Ctrl-C, kill -9, a full disk) left it empty: every later run stopped with 'password
    file ... is empty'. It is written under another name and linked."""
    net = create_network(tmp_path / "net", ["ZA", "IN"], ())
    registry = open_registry_frame((tmp_path / "net/chair/registry.kpx").read_bytes(),
                                   net.chair_public_key)
    out, secrets = tmp_path / "broker/definitions.json", tmp_path / "passwords"
    with writes_cut_short(monkeypatch), pytest.raises(KeyboardInterrupt):
        write_definitions(registry, out, secrets)
    assert list(secrets.iterdir()) == []
    write_definitions(registry, out, secrets)
    assert all(password_file(secrets, u).read_text().strip()
               for u in broker_users(net.registry))


def test_regenerating_without_the_users_passwords_is_refused(tmp_path: Path) -> None:
    """`deploy definitions` without --passwords, over the definitions `deploy network`
    wrote (whose passwords are in chair/broker-passwords), made new passwords for every
    user in broker/passwords: once imported, no node could log in again."""
    done = provision(tmp_path / "net", ["ZA", "IN"], [TEMPLATE])
    out = done.definitions
    before = out.read_text()
    with pytest.raises(ConfigError) as refused:
        write_definitions(done.registry, out, out.parent / "passwords")
    assert "kpx-in, kpx-za" in str(refused.value)
    assert str(done.passwords) in str(refused.value) or "--passwords" in str(refused.value)
    assert out.read_text() == before and not (out.parent / "passwords").exists()
    # With the passwords kept, or for a definitions file not written yet, as before.
    write_definitions(done.registry, out, done.passwords)
    write_definitions(done.registry, tmp_path / "new" / "definitions.json",
                      tmp_path / "new" / "passwords")


def test_a_user_without_a_hash_is_an_error(tmp_path: Path) -> None:
    net = create_network(tmp_path, ["ZA"], ())
    with pytest.raises(ValueError, match="kpx-chair"):
        broker_definitions(net.registry, {"kpx-za": "x"})


TEMPLATE = "amqp://{user}:{password}@127.0.0.1:5672/kpx"


def test_a_deploy_network_that_stopped_part_way_can_be_run_again(tmp_path: Path) -> None:
    """A first run that failed (IN's directory was in use) left the Chair's key and ZA's
    node behind, and every later run failed on them ('chair.key: File exists')."""
    base = tmp_path / "kpx"
    (base / "IN").mkdir(parents=True)
    (base / "IN" / "notes.txt").write_text("someone's\n")
    with pytest.raises(ConfigError, match=r"IN: exists already"):
        provision(base, ["ZA", "IN"], [TEMPLATE])
    assert sorted(p.name for p in base.iterdir()) == ["IN"]  # nothing made, nothing taken
    (base / "IN" / "notes.txt").unlink()
    # A run killed part-way (no clean-up ran) leaves its record: the next starts over.
    (base / "chair").mkdir()
    (base / "chair" / "chair.key").write_text("half a key")
    (base / UNFINISHED).write_text(json.dumps({"made": ["chair", "ZA"], "emptied": ["IN"]}))
    done = provision(base, ["ZA", "IN"], [TEMPLATE])
    assert done.created and sorted(done.node_dirs()) == ["IN", "ZA"]
    assert not (base / UNFINISHED).exists()
    assert done.registry.version == 1 and (base / "broker" / "definitions.json").exists()
    again = provision(base, [], [TEMPLATE])
    assert not again.created and again.chair_public_key == done.chair_public_key
    # A record edited to name anything else removes nothing.
    (base / UNFINISHED).write_text(json.dumps({"made": ["../elsewhere"], "emptied": []}))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="its record is unreadable"):
        provision(base, ["ZA", "IN"], [TEMPLATE])
    assert (tmp_path / "elsewhere").exists() and (base / "ZA" / "node.toml").exists()


def test_deploy_network_cleans_up_only_its_own_and_runs_one_at_a_time(
        tmp_path: Path) -> None:
    """The review found a second run removing what a first, still running, was making, and
    a clean-up following a symbolic link swapped in for a directory it had found empty."""
    base, victim = tmp_path / "kpx", tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("not kpx's\n")
    base.mkdir()
    (base / "IN").symlink_to(victim)
    (base / UNFINISHED).write_text(json.dumps({"made": ["chair"], "emptied": ["IN"]}))
    with pytest.raises(ConfigError, match="IN is a symbolic link now; not emptying it"):
        provision(base, ["ZA", "IN"], [TEMPLATE])
    assert (victim / "data.txt").exists()
    (base / "IN").unlink()
    with pytest.raises(ConfigError, match="stopped part-way: this one starts it over"):
        provision(base, [], [TEMPLATE])
    fd = os.open(base, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        with pytest.raises(ConfigError, match="another 'deploy network' is running"):
            provision(base, ["ZA", "IN"], [TEMPLATE])
        assert (base / UNFINISHED).exists()
    finally:
        os.close(fd)
    assert provision(base, ["ZA", "IN"], [TEMPLATE]).created
    assert not (base / UNFINISHED).exists()


@pytest.mark.parametrize("vhost", ["", " "])
def test_deploy_network_refuses_an_empty_vhost_before_making_anything(
        tmp_path: Path, vhost: str) -> None:
    """57a6a14 refused an empty --vhost in `deploy definitions` only: `deploy network
    --vhost ''` provisioned the vhost 'kpx' without a word (`vhost or DEFAULT_VHOST`), and
    `--vhost ' '` was refused only after the Chair and every node had been made, leaving a
    network its own error called unprovisioned."""
    base = tmp_path / "net"
    with pytest.raises(ConfigError, match="virtual host"):
        provision(base, ["ZA", "IN"], [TEMPLATE], vhost=vhost)
    assert not base.exists() or not any(base.iterdir()), list(base.iterdir())


def test_a_password_secret_owned_by_root_and_readable_by_its_group_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b8191db refused every password file its group may read. A Kubernetes secret is
    mounted owned by root, and a pod that runs as the image's unprivileged user reads it
    through its fsGroup: mode 0440 with `defaultMode: 0400` (the narrowest there is). So
    `deploy configure --password-file` could not read a secret at all in such a pod
    (KPX_KEY_PASSPHRASE_FILE, the passphrase's secret, now follows the same rule). As
    PostgreSQL does for its TLS key: a file owned by root may be read by its group; one
    that others may read, or a group-readable one of any other owner, is still refused."""
    from node.deploy import read_password

    real_stat = Path.stat

    def as_root(path: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)
        fields = list(st)
        fields[4] = 0  # st_uid: as a secret volume mounts it
        return os.stat_result(fields)

    secret = tmp_path / "kpx-za.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o440)
    if os.geteuid() != 0:
        monkeypatch.setattr(Path, "stat", as_root)
    assert read_password(secret) == "s3cret"
    for mode in (0o444, 0o460, 0o404):  # others, or the group writing: refused
        secret.chmod(mode)
        with pytest.raises(ConfigError, match="readable by others"):
            read_password(secret)
    secret.chmod(0o440)
    monkeypatch.setattr(Path, "stat", lambda p, *a, **k: os.stat_result(
        [*list(real_stat(p, *a, **k))[:4], 10001, *list(real_stat(p, *a, **k))[5:]]))
    with pytest.raises(ConfigError, match="readable by others"):  # not root's: refused
        read_password(secret)
