"""A real RabbitMQ for tests and the demo: an existing one, a container, or a private local one.

The network tests and ``kpnode demo`` need a real broker, never a mock (design brief, section
4). :func:`broker_url` picks one, in this order:

1. the broker named by ``KPX_AMQP_URL`` (nothing is started);
2. a ``testcontainers`` RabbitMQ container, when a Docker engine answers a quick ping;
3. a throwaway :class:`LocalBroker`: Debian's ``rabbitmq-server`` package (3.10) run as the
   calling user in a temporary directory, on free ports, listening on 127.0.0.1 only.

Why a private instance rather than the packaged service: ``/usr/sbin/rabbitmq-server`` is a
wrapper that switches to the ``rabbitmq`` user and uses the system-wide data directory,
ports and Erlang cookie. Running ``/usr/lib/rabbitmq/bin/rabbitmq-server -detached`` with
``HOME`` and the ``RABBITMQ_*`` variables pointing into one directory gives an instance that
shares nothing with the system one or with other instances, so several can run at once (a
cluster test starts three and joins them), and ``restart()`` keeps its data (durable
queues and persistent messages survive it, which the fault tests rely on).

Each instance (or each cluster, see :meth:`LocalBroker.sibling`) also gets its own ``epmd``
(the Erlang port mapper) on a free port, through ``ERL_EPMD_PORT``: nothing then touches the
machine-wide epmd on 4369, and :meth:`LocalBroker.stop` can end the epmd it caused without
guessing whether someone else uses it.

Measured on the 2-core development machine (RabbitMQ 3.10.8, Erlang 25.2.3): ``start()`` of
a fresh instance without plugins returns in 5.4-5.7 s (``rabbitmqctl wait`` included),
``stop()`` takes about 3.5 s and ``restart()`` about 10 s. With ``rabbitmq_management`` and
``rabbitmq_prometheus`` a start is about as fast, but a stop takes 7-10 s. Three nodes: three
starts 14-18 s, two ``join_cluster`` calls 15 s, stopping all three about 26 s.

``python -m node.localbroker`` starts one for a user, prints its URL on stdout and keeps it
running until SIGINT or SIGTERM; ``--ensure-installed`` only makes sure a broker can be had
(installing the Debian package when needed), for ``scripts/test``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from node.definitions import BROKER_CONFIG

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_SERVER = RABBITMQ_BIN / "rabbitmq-server"
RABBITMQCTL = RABBITMQ_BIN / "rabbitmqctl"

ENV_URL = "KPX_AMQP_URL"
"""Environment variable naming an existing broker; when set, nothing is started."""
ENV_DOCKER = "KPX_DOCKER"
"""Set to ``0`` to skip the Docker probe even when an engine answers."""
ENV_IMAGE = "KPX_RABBITMQ_IMAGE"
"""Container image for the testcontainers path; the default matches the local 3.10."""
DEFAULT_IMAGE = "rabbitmq:3.10"

STATE_FILE = "kpx-broker.json"
LOOPBACK = "127.0.0.1"

# Plugins that open a listener of their own, and the rabbitmq.conf lines that put it on a
# free loopback port (``{port}``) instead of its fixed default, so instances never collide.
PLUGIN_LISTENERS: Mapping[str, tuple[str, ...]] = {
    "rabbitmq_management": ("management.tcp.ip = 127.0.0.1", "management.tcp.port = {port}"),
    "rabbitmq_prometheus": ("prometheus.tcp.ip = 127.0.0.1", "prometheus.tcp.port = {port}"),
    "rabbitmq_stream": ("stream.listeners.tcp.1 = 127.0.0.1:{port}",),
    "rabbitmq_mqtt": ("mqtt.listeners.tcp.1 = 127.0.0.1:{port}",),
    "rabbitmq_stomp": ("stomp.listeners.tcp.1 = 127.0.0.1:{port}",),
}


class BrokerError(RuntimeError):
    """A broker command failed (``rabbitmqctl`` exited non-zero, or timed out)."""


class BrokerUnavailable(BrokerError):
    """No broker could be had: not installed, failed to boot, or not answering."""


# --------------------------------------------------------------------------- installation


def ensure_rabbitmq_installed() -> None:
    """Make sure the Debian ``rabbitmq-server`` package is there, installing it when we may.

    Only root on an apt-based system installs it (it takes seconds); anyone else gets a
    :class:`BrokerUnavailable` that says what to do, rather than a sudo prompt in a test run.
    """
    if RABBITMQ_SERVER.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BrokerUnavailable(
            f"no RabbitMQ: {RABBITMQ_SERVER} is missing; install it (sudo apt-get install "
            f"rabbitmq-server), or set {ENV_URL}=amqp://user:pass@host:5672/ to use an "
            "existing broker"
        )
    print("kpx: rabbitmq-server is not installed; installing the Debian package with apt-get",
          file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "rabbitmq-server"]):
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise BrokerUnavailable(
                f"`{' '.join(command)}` failed (exit {done.returncode}): "
                f"{_tail(done.stdout + done.stderr, 15)}"
            )
    if not RABBITMQ_SERVER.exists():
        raise BrokerUnavailable(f"apt-get installed rabbitmq-server but {RABBITMQ_SERVER} "
                                "is still missing")


def docker_available(timeout: float = 3.0) -> bool:
    """True when testcontainers is importable and a Docker engine answers a ping in time.

    The Docker SDK is asked (not the ``docker`` CLI) because it is what testcontainers uses:
    it honours ``DOCKER_HOST`` the same way. A missing socket fails at once; an engine that
    does not answer fails after ``timeout`` seconds, so the probe never hangs a test run.
    """
    if os.environ.get(ENV_DOCKER, "").strip().lower() in {"0", "false", "no", "off"}:
        return False
    try:
        importlib.import_module("testcontainers.core.container")
        docker: Any = importlib.import_module("docker")
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no SDK, no socket, refused, timed out: all mean "no Docker here"
        return False


# ------------------------------------------------------------------------------ helpers


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _explain(log: str, lines: int = 20) -> str:
    """The part of a RabbitMQ log that says why a boot failed: from its first error on.

    The cause comes first ("You've tried to set ..., but there is no setting with that
    name", "eaddrinuse"); the crash reports and shutdown notices that follow add nothing.
    """
    all_lines = log.strip().splitlines()
    for index, line in enumerate(all_lines):
        if "[error]" in line:
            return "\n".join(all_lines[index:index + lines])
    return "\n".join(all_lines[-lines:])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(count: int, avoid: Sequence[int] = ()) -> list[int]:
    """``count`` distinct ports, free on 127.0.0.1 now, chosen outside the ephemeral range.

    A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, which it
    also uses for the local end of outgoing connections: between choosing it and the node
    binding it, any connection (rabbitmqctl's, a client's) may take it; RabbitMQ then fails
    with ``dist_port_already_used`` or ``eaddrinuse``. Below that range only another
    listener can collide, and a random pick makes two concurrent choosers unlikely to.
    """
    low, high = _ephemeral_range()
    first, last = (10_000, low - 1) if low - 10_000 >= 2_000 else (high + 1, 65_535)
    ports: list[int] = []
    for _ in range(50 * count + 100):
        if len(ports) == count:
            return ports
        port = first + secrets.randbelow(last - first + 1)
        if port not in avoid and port not in ports and _port_is_free(port):
            ports.append(port)
    raise BrokerUnavailable(f"found no {count} free TCP ports between {first} and {last}")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"}


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


# --------------------------------------------------------------------------- LocalBroker


class LocalBroker:
    """A private ``rabbitmq-server`` run as the calling user, all of its state in one directory.

    Layout of ``directory`` (a fresh temporary one unless given)::

        home/.erlang.cookie   HOME for the server and for rabbitmqctl (mode 0400)
        rabbitmq.conf         listeners on 127.0.0.1 only, guest/guest, extra lines
        enabled_plugins       none by default: the fastest start
        rabbitmq-env.conf     empty, so /etc/rabbitmq/rabbitmq-env.conf cannot interfere
        mnesia/ log/          data and logs (log/<nodename>.log)
        rabbitmq.pid          written by the server once it runs
        kpx-broker.json       node name, ports and cookie, reused when the directory is

    A given directory is meant to be reused: the node name (which names the data directory)
    and cookie are kept in ``kpx-broker.json``, and so are the ports while they stay free, so
    a demo broker keeps its queues and its URL from one run to the next.

    Only processes this instance started are ever signalled: the server's pid comes from the
    pid file its own node writes and is checked against its command line (which names this
    instance's ``HOME``) before any signal.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        plugins: Sequence[str] = (),
        cookie: str | None = None,
        epmd_port: int | None = None,
        nodename: str | None = None,
        extra_config: Sequence[str] = (),
        start_timeout: float = 120.0,
    ) -> None:
        """Prepare (not start) an instance.

        ``cookie`` and ``epmd_port`` must be shared by nodes that will form a cluster; use
        :meth:`sibling` rather than passing them by hand. An ``epmd_port`` given here is
        taken to be someone else's epmd and is never stopped; one chosen by this instance
        (or by :meth:`sibling`) is stopped with the last node that used it.
        ``extra_config`` lines are appended to rabbitmq.conf verbatim (e.g.
        ``load_definitions = /path/defs.json``).
        """
        self._owns_directory = directory is None
        self.directory = (Path(tempfile.mkdtemp(prefix="kpx-broker-")) if directory is None
                          else Path(directory).resolve())
        self.directory.mkdir(parents=True, exist_ok=True)
        self.plugins: tuple[str, ...] = tuple(plugins)
        self.extra_config: tuple[str, ...] = tuple(extra_config)
        self.start_timeout = start_timeout
        self.last_start_seconds: float | None = None

        saved = self._load_state()
        self._fixed_ports = False
        self.nodename: str = nodename or str(saved.get("nodename") or
                                             f"kpx-{secrets.token_hex(4)}@localhost")
        self.cookie: str = cookie or str(saved.get("cookie") or secrets.token_hex(20).upper())
        self._owns_epmd = epmd_port is None
        wanted_listeners = sorted(p for p in self.plugins if p in PLUGIN_LISTENERS)
        saved_ports: dict[str, int] = {str(k): int(v)
                                       for k, v in dict(saved.get("ports") or {}).items()}
        ports: dict[str, int] = {}
        names = ["amqp", "dist", *wanted_listeners]
        if epmd_port is None:
            names.append("epmd")
        fresh = iter(_free_ports(len(names), avoid=list(saved_ports.values())))
        for name in names:
            old = saved_ports.get(name)
            ports[name] = old if old is not None and _port_is_free(old) else next(fresh)
        if epmd_port is not None:
            ports["epmd"] = epmd_port
        self.amqp_port: int = ports["amqp"]
        self.dist_port: int = ports["dist"]
        self.epmd_port: int = ports["epmd"]
        self.plugin_ports: dict[str, int] = {p: ports[p] for p in wanted_listeners}
        self._pid: int | None = None
        self._atexit_registered = False

    # ----------------------------------------------------------------- paths and state

    @property
    def home(self) -> Path:
        return self.directory / "home"

    @property
    def pid_file(self) -> Path:
        return self.directory / "rabbitmq.pid"

    @property
    def log_file(self) -> Path:
        """The server's main log: read it when a start fails or a test misbehaves."""
        return self.directory / "log" / f"{self.nodename}.log"

    @property
    def url(self) -> str:
        """AMQP URL of the default virtual host, as the default guest user."""
        return f"amqp://guest:guest@{LOOPBACK}:{self.amqp_port}/"

    @property
    def management_url(self) -> str | None:
        """HTTP API / UI base URL when ``rabbitmq_management`` is enabled, else ``None``."""
        port = self.plugin_ports.get("rabbitmq_management")
        return None if port is None else f"http://{LOOPBACK}:{port}/"

    @property
    def pid(self) -> int | None:
        """OS pid of the running server (``beam.smp``), or ``None`` when it is not running."""
        if self._pid is not None and self._is_ours(self._pid):
            return self._pid
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _load_state(self) -> dict[str, Any]:
        path = self.directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self) -> None:
        ports = {"amqp": self.amqp_port, "dist": self.dist_port, **self.plugin_ports}
        if self._owns_epmd:
            ports["epmd"] = self.epmd_port
        state = {"nodename": self.nodename, "cookie": self.cookie, "ports": ports}
        path = self.directory / STATE_FILE
        path.write_text(json.dumps(state, indent=2) + "\n")
        path.chmod(0o600)

    def _env(self) -> dict[str, str]:
        """Environment for the server and for rabbitmqctl: everything points into our dir.

        Inherited ``RABBITMQ_*`` and ``ERL_*`` variables are dropped: one of them (say
        ``RABBITMQ_ENV_LOADED=1`` from an outer script) would silently change the instance.
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        d = self.directory
        env.update({
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            # Erlang distribution (clustering, rabbitmqctl) on loopback only, through our
            # own epmd.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # Each rabbitmqctl run is an Erlang node listening on a port of this range; the
            # default 11 ports run out when several test runs share the machine.
            "RABBITMQ_CTL_DIST_PORT_MIN": "35672",
            "RABBITMQ_CTL_DIST_PORT_MAX": "35771",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": LOOPBACK,
        })
        return env

    def _write_files(self) -> None:
        d = self.directory
        for sub in ("home", "mnesia", "log"):
            (d / sub).mkdir(exist_ok=True)
        # Erlang refuses a cookie file others can read, and creates a random one when it
        # is missing: write ours first, so every node of a cluster and rabbitmqctl agree.
        cookie_file = self.home / ".erlang.cookie"
        if not cookie_file.exists() or cookie_file.read_text() != self.cookie:
            if cookie_file.exists():
                cookie_file.chmod(0o600)
            cookie_file.write_text(self.cookie)
        cookie_file.chmod(0o400)
        # The file is an Erlang term: the final dot matters ("[]" alone fails the boot).
        (d / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (d / "rabbitmq-env.conf").write_text("")
        lines = [
            "# written by node/localbroker.py; regenerated at every start",
            f"listeners.tcp.1 = {LOOPBACK}:{self.amqp_port}",
            "default_user = guest",
            "default_pass = guest",
            "loopback_users.guest = true",
            "log.console = false",
            "log.file.level = info",
            *BROKER_CONFIG,
        ]
        for plugin, port in self.plugin_ports.items():
            lines.extend(line.format(port=port) for line in PLUGIN_LISTENERS[plugin])
        lines.extend(self.extra_config)
        (d / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        self._save_state()

    def _is_ours(self, pid: int) -> bool:
        """True when ``pid`` is this instance's server: a live Erlang VM with our HOME.

        rabbitmqctl runs in an Erlang VM with the same HOME too; it runs as an escript,
        which the server never does.
        """
        args = _proc_cmdline(pid)
        return (_alive(pid) and bool(args) and Path(args[0]).name.startswith("beam")
                and str(self.home) in args and not any("escript" in arg for arg in args))

    def _find_server(self) -> int | None:
        """Our server's pid: from the pid file, else by scanning /proc for our HOME."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().strip())
            if self._is_ours(pid):
                return pid
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_ours(int(entry.name)):
                return int(entry.name)
        return None

    # ------------------------------------------------------------------------- control

    def ctl(self, *args: str, timeout: float = 120.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS...`` against this node and return its stdout.

        Raises :class:`BrokerError` with the command's output when it fails or times out.
        """
        command = [str(RABBITMQCTL), "-n", self.nodename, *args]
        try:
            done = subprocess.run(command, env=self._env(), cwd=self.directory,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} timed out after {timeout:.0f} s"
                              ) from exc
        if done.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} failed (exit {done.returncode}): "
                              f"{_tail(done.stdout + done.stderr, 20)}")
        return done.stdout

    def start(self) -> None:
        """Start the server and return once it accepts connections.

        Waits with ``rabbitmqctl wait PIDFILE`` (pid file, then distribution, then the
        ``rabbit`` application) for at most ``start_timeout`` seconds. On failure the VM,
        if it is still there, is stopped, and :class:`BrokerUnavailable` carries the tail
        of the server log, which almost always names the cause.
        """
        if self.running:
            return
        try:
            self._start_once()
        except BrokerUnavailable:
            # Ports are chosen free, but another process may take one before the node
            # binds it: on a first start, choose new ones and try once more.
            if self.last_start_seconds is not None or not self._port_was_taken():
                raise
            self._choose_new_ports()
            self._start_once()

    def _port_was_taken(self) -> bool:
        text = self._log_text()
        return "eaddrinuse" in text or "dist_port_already_used" in text

    def _choose_new_ports(self) -> None:
        taken = [self.amqp_port, self.dist_port, self.epmd_port, *self.plugin_ports.values()]
        fresh = iter(_free_ports(2 + len(self.plugin_ports), avoid=taken))
        self.amqp_port, self.dist_port = next(fresh), next(fresh)
        self.plugin_ports = {name: next(fresh) for name in self.plugin_ports}

    def _start_once(self) -> None:
        if not RABBITMQ_SERVER.exists():
            raise BrokerUnavailable(
                f"{RABBITMQ_SERVER} is missing: install rabbitmq-server (or call "
                f"ensure_rabbitmq_installed()), or set {ENV_URL}")
        leftover = self._find_server()
        if leftover is not None:
            raise BrokerUnavailable(
                f"a RabbitMQ from an earlier run still uses {self.directory} (pid {leftover}); "
                f"stop it (kill {leftover}) or use another directory")
        self._write_files()
        self.pid_file.unlink(missing_ok=True)
        began = time.monotonic()
        with (self.directory / "log" / "launch.log").open("ab") as launch_log:
            # A new session: a Ctrl-C meant for pytest or the demo must not reach the server
            # directly; stop() shuts it down in order instead.
            launcher = subprocess.run(
                [str(RABBITMQ_SERVER), "-detached"], env=self._env(), cwd=self.directory,
                stdin=subprocess.DEVNULL, stdout=launch_log, stderr=subprocess.STDOUT,
                start_new_session=True, timeout=60, check=False)
        if launcher.returncode != 0:
            raise BrokerUnavailable(f"rabbitmq-server -detached exited {launcher.returncode}: "
                                    f"{self._log_tail()}")
        self._ensure_cleanup_at_exit()
        problem = self._wait_until_up()
        if problem is not None:
            self._pid = self._find_server()
            self._shutdown(graceful=False)
            if "eaddrinuse" in self._log_text() or self.log_file.exists():
                detail = f"last lines of {self.log_file}:\n{self._log_tail()}"
            else:  # died before its logging was set up: typically a bad rabbitmq.conf
                detail = f"the server said:\n{self._foreground_diagnosis()}"
            raise BrokerUnavailable(f"RabbitMQ node {self.nodename} did not start: {problem}; "
                                    f"{detail}")
        self._pid = self._find_server()
        if self._pid is None:
            raise BrokerUnavailable(f"RabbitMQ node {self.nodename} reported ready but its "
                                    f"process is gone; see {self.log_file}")
        self.last_start_seconds = time.monotonic() - began

    def _wait_until_up(self) -> str | None:
        """Run ``rabbitmqctl wait PIDFILE``; ``None`` once up, else what went wrong.

        While it waits, watch the VM: one that dies before writing its pid file (a bad
        rabbitmq.conf does that) would otherwise keep ``wait`` looking for the file until
        the timeout.
        """
        command = [str(RABBITMQCTL), "-n", self.nodename, "wait",
                   "--timeout", str(int(self.start_timeout)), str(self.pid_file)]
        waiter = subprocess.Popen(command, env=self._env(), cwd=self.directory,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.start_timeout + 15
        absent = 0
        problem: str | None = None
        try:
            while waiter.poll() is None:
                if time.monotonic() > deadline:
                    problem = f"not up within {self.start_timeout:.0f} s"
                    break
                absent = absent + 1 if (not self.pid_file.exists()
                                        and self._find_server() is None) else 0
                if absent >= 3:
                    problem = "the server exited before writing its pid file"
                    break
                time.sleep(0.5)
        finally:  # also on KeyboardInterrupt: never leave the waiter behind
            if waiter.poll() is None:
                waiter.kill()
            output = waiter.communicate()[0]
        if problem is None and waiter.returncode != 0:
            problem = f"rabbitmqctl wait exited {waiter.returncode}: {_tail(output, 3)}"
        return problem

    def _foreground_diagnosis(self, timeout: float = 30.0) -> str:
        """Boot once more in the foreground, only to capture what the server prints.

        A detached VM's output is lost, and errors found before logging is configured
        (an invalid rabbitmq.conf, a distribution port in use) appear nowhere else. Should
        this boot get as far as writing its pid file, the failure was transient: it is
        stopped at once (SIGTERM, then SIGKILL), which is safe because the whole process
        group was started here, in a session of its own.
        """
        self.pid_file.unlink(missing_ok=True)
        with (self.directory / "log" / "diagnosis.log").open("w+b") as out:
            proc = subprocess.Popen([str(RABBITMQ_SERVER)], env=self._env(),
                                    cwd=self.directory, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while (proc.poll() is None and not self.pid_file.exists()
                   and time.monotonic() < deadline):
                time.sleep(0.2)
            got_further = self.pid_file.exists()
            for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            proc.wait()
            out.seek(0)
            text = out.read().decode(errors="replace")
        self.pid_file.unlink(missing_ok=True)
        self._stop_epmd()
        if got_further:
            return "(a second boot, in the foreground, got further: the failure was transient)"
        return _explain(text) or "(nothing)"

    def stop(self, timeout: float = 60.0) -> None:
        """Shut the server down in order (``rabbitmqctl stop``), then make sure it is gone.

        Data stays in the directory (see :meth:`restart`); :meth:`close` also removes it.
        """
        self._pid = self._pid if self._pid is not None and self._is_ours(self._pid) \
            else self._find_server()
        self._shutdown(graceful=True, timeout=timeout)

    def _shutdown(self, *, graceful: bool, timeout: float = 60.0) -> None:
        pid = self._pid
        try:
            if pid is not None and graceful:
                with contextlib.suppress(BrokerError):
                    self.ctl("stop", str(self.pid_file), timeout=timeout)
            if pid is not None and not _wait_gone(pid, 5.0 if graceful else 0.0):
                for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
                    if not self._is_ours(pid):
                        break
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                    if _wait_gone(pid, grace):
                        break
            self._pid = None
        finally:
            # Also when an interrupt cut the stop short: the server may be gone already,
            # and nothing else would end its epmd (it refuses while a server is registered).
            self._stop_epmd()

    def _stop_epmd(self) -> None:
        """End the epmd our nodes (or our cluster's) caused, once no server is registered.

        ``epmd -kill`` refuses while any node is registered. A server still registered means
        a cluster sibling is running: its epmd lives until the last node stops. A
        ``rabbitmqcli-*`` name is a CLI run that has just exited (epmd notices the closed
        connection a moment later), so that refusal is retried briefly. An epmd we were
        handed (``epmd_port=``) is never touched.
        """
        if not self._owns_epmd:
            return
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "ERL_EPMD_PORT": str(self.epmd_port)}

        def epmd(*args: str) -> str:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                done = subprocess.run(["epmd", *args], env=env, stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, timeout=10, check=False)
                return done.stdout + done.stderr
            return ""

        deadline = time.monotonic() + 5.0
        while True:
            listing = epmd("-names")
            if "up and running" not in listing:
                return  # no epmd on our port (any more)
            names = [line.split()[1] for line in listing.splitlines()
                     if line.startswith("name ")]
            if any(not name.startswith("rabbitmqcli") for name in names):
                return  # a sibling's server still uses it
            if not names and "Killed" in epmd("-kill"):
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def restart(self) -> None:
        """Stop, then start again on the same ports, node name and data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and, when this instance created the directory, remove it."""
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _ensure_cleanup_at_exit(self) -> None:
        # A test run that errors out, or a forgotten stop(), must not leave a broker behind.
        if not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True

    def _stop_at_exit(self) -> None:
        # Also reached when a second Ctrl-C cut close() short between its stop and its
        # removal of the directory (Erlang cookie, data files): the directory goes too.
        with contextlib.suppress(Exception):
            if self.running:
                self.stop(timeout=20.0)
        with contextlib.suppress(Exception):
            self._stop_epmd()  # an interrupted stop left the server gone and its epmd up
        if self._owns_directory and not self.running:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _log_text(self) -> str:
        texts = []
        log = self.directory / "log"
        for path in (log / "launch.log", log / "diagnosis.log", self.log_file):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def _log_tail(self, lines: int = 20) -> str:
        return _explain(self._log_text(), lines) or "(no log written)"

    # ------------------------------------------------------------ definitions, clusters

    def import_definitions(self, path: str | os.PathLike[str]) -> None:
        """Load a definitions JSON (users, vhosts, permissions, queues, policies) now."""
        self.ctl("import_definitions", str(Path(path).resolve()))

    def sibling(self, directory: str | os.PathLike[str] | None = None, *,
                plugins: Sequence[str] | None = None,
                extra_config: Sequence[str] = ()) -> LocalBroker:
        """A new (not started) instance that can cluster with this one.

        It shares this instance's Erlang cookie and epmd, which nodes on one host need to
        find and trust each other; the last of them to stop ends the shared epmd.
        """
        other = LocalBroker(directory, plugins=self.plugins if plugins is None else plugins,
                            cookie=self.cookie, epmd_port=self.epmd_port,
                            extra_config=extra_config, start_timeout=self.start_timeout)
        other._owns_epmd = self._owns_epmd
        return other

    def join_cluster(self, other: LocalBroker) -> None:
        """Make this (running) node a member of ``other``'s cluster; its own data is reset."""
        if other.cookie != self.cookie or other.epmd_port != self.epmd_port:
            raise ValueError("nodes of one cluster need the same cookie and epmd port: "
                             "create them with LocalBroker.sibling()")
        self.ctl("stop_app")
        self.ctl("reset")
        self.ctl("join_cluster", other.nodename)
        self.ctl("start_app", timeout=self.start_timeout)

    # -------------------------------------------------------------------- context manager

    def __enter__(self) -> LocalBroker:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LocalBroker({self.nodename!r}, url={self.url!r}, dir={str(self.directory)!r},"
                f" running={self.running})")


# ------------------------------------------------------------------------ broker_url


def container_erl_args() -> str:
    """:data:`BROKER_CONFIG` (``key = value`` lines of the ``rabbit`` application) as the
    ``-rabbit key value`` arguments the RabbitMQ image passes to the broker."""
    pairs = (line.split("=", 1) for line in BROKER_CONFIG)
    return " ".join(f"-rabbit {key.strip()} {value.strip()}" for key, value in pairs)


@contextmanager
def _container_url() -> Iterator[str]:
    """Start a RabbitMQ container with testcontainers and yield its AMQP URL."""
    with warnings.catch_warnings():  # testcontainers warns about its own internals
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module: Any = importlib.import_module("testcontainers.community.rabbitmq")
        except ImportError:  # testcontainers before the "community" split
            module = importlib.import_module("testcontainers.rabbitmq")
    container: Any = module.RabbitMqContainer(os.environ.get(ENV_IMAGE, DEFAULT_IMAGE),
                                              username="guest", password="guest")
    # What every kpx broker needs, as the local broker's rabbitmq.conf has it; the image
    # reads no such file of ours, but takes the same settings as Erlang arguments.
    container.with_env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", container_erl_args())
    container.start()
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        yield f"amqp://guest:guest@{host}:{port}/"
    finally:
        container.stop()


@contextmanager
def broker_url(*, prefer_env: bool = True) -> Iterator[str]:
    """Yield the AMQP URL of a real broker, starting (and finally stopping) one if needed.

    ``KPX_AMQP_URL`` when set (and ``prefer_env``), else a container when Docker answers,
    else a private :class:`LocalBroker` (installing rabbitmq-server first if we may). A
    container that fails to start (no image, no network) falls back to the local broker.
    """
    url = os.environ.get(ENV_URL, "").strip()
    if prefer_env and url:
        yield url
        return
    with contextlib.ExitStack() as stack:
        chosen: str | None = None
        if docker_available():
            try:
                chosen = stack.enter_context(_container_url())
            except Exception as exc:
                print(f"kpx: Docker answered but the RabbitMQ container did not start ({exc}); "
                      "using a local rabbitmq-server", file=sys.stderr, flush=True)
        if chosen is None:
            ensure_rabbitmq_installed()
            chosen = stack.enter_context(LocalBroker()).url
        yield chosen


# ----------------------------------------------------------------------------- main


def _ensure_installed_command() -> int:
    if os.environ.get(ENV_URL, "").strip():
        print(f"kpx: using the broker named by {ENV_URL}", file=sys.stderr)
    elif docker_available():
        print("kpx: a Docker engine answers; tests will use a RabbitMQ container",
              file=sys.stderr)
    else:
        ensure_rabbitmq_installed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.localbroker``: run a broker until SIGINT/SIGTERM; print its URL."""
    parser = argparse.ArgumentParser(
        prog="python -m node.localbroker",
        description="Start a throwaway RabbitMQ (a container when Docker answers, else a "
                    "private local rabbitmq-server), print its AMQP URL on stdout, and keep "
                    "it running until Ctrl-C or SIGTERM.")
    parser.add_argument("--ensure-installed", action="store_true",
                        help=f"only make sure a broker can be had: nothing to do when {ENV_URL} "
                             "is set or Docker answers, else install rabbitmq-server if missing")
    parser.add_argument("--local", action="store_true",
                        help="always a local rabbitmq-server, even when Docker answers")
    parser.add_argument("--dir", type=Path,
                        help="keep the local broker's data here (reused: same queues, same "
                             "URL while its ports stay free); implies --local")
    parser.add_argument("--plugin", action="append", default=[], metavar="NAME",
                        help="enable a plugin, e.g. rabbitmq_management (on a free port); "
                             "implies --local; may be repeated")
    args = parser.parse_args(argv)

    try:
        if args.ensure_installed:
            return _ensure_installed_command()
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)
        with contextlib.ExitStack() as stack:
            if args.local or args.dir or args.plugin:
                ensure_rabbitmq_installed()
                broker = stack.enter_context(LocalBroker(args.dir, plugins=args.plugin))
                url = broker.url
                details = [f"node {broker.nodename}", f"dir {broker.directory}",
                           f"log {broker.log_file}"]
                if broker.management_url:
                    details.append(f"management {broker.management_url}")
                print(f"kpx: RabbitMQ up in {broker.last_start_seconds or 0:.1f} s: "
                      + ", ".join(details), file=sys.stderr)
            else:
                url = stack.enter_context(broker_url(prefer_env=False))
            print(url, flush=True)
            print("kpx: Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
            while not stop.wait(1.0):
                pass
            print("kpx: stopping the broker", file=sys.stderr, flush=True)
    except BrokerUnavailable as exc:
        print(f"kpx: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
