"""Fixtures of the fault-injection suite: servers of a test's own (which it may degrade: SCRIPT
FLUSH, maxmemory), a TCP proxy in front of the session's server, processors on any URL, embedded
workers and worker managers on any URL. Everything is stopped at teardown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coretask import Options, TaskProcessor
from coretask.servers import RedisServer, find_server_binary
from tests.conftest import FAST, ROOT, ManagerProcess, Target
from tests.faults.proxy import Proxy


@pytest.fixture
def own_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., RedisServer]]:
    """``own_server(**kwargs)`` starts a single server from the binary under test (Redis 7 under
    --server cluster) that the test may reconfigure or flush."""
    kind = request.config.getoption("--server")
    binary = find_server_binary("redis7" if kind == "cluster" else kind)
    started: list[RedisServer] = []

    def start(**kwargs: Any) -> RedisServer:
        s = RedisServer(binary=binary, **kwargs)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def proxy(server: Target, own_server: Callable[..., RedisServer]) -> Iterator[Proxy]:
    """A proxy in front of the session's server. A cluster redirects clients to its nodes' own
    addresses, around any proxy, so under --server cluster the proxy fronts a single server of
    the test's own (the tasks still record their runs in the session's cluster)."""
    upstream = own_server() if server.cluster else server.handle
    p = Proxy(upstream.host, upstream.port).start()
    yield p
    p.stop()


@pytest.fixture
def own_processor(prefix: str) -> Iterator[Callable[..., TaskProcessor]]:
    """``own_processor(url, **options)``: a TaskProcessor for this test's prefix on any URL."""
    made: list[TaskProcessor] = []

    def make(url: str, **opts: Any) -> TaskProcessor:
        kw: dict[str, Any] = dict(FAST)
        kw.update(opts)
        p = TaskProcessor(Options(redis=url, prefix=prefix, **kw))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def faults_manager(prefix: str, tmp_path: Path) -> Iterator[Callable[..., ManagerProcess]]:
    """``faults_manager(url, processes=, threads=, **options)``: ``python -m coretask.worker`` for
    ``tests.tasks_faults:app`` against ``url``; its tasks still record into the session's server."""
    started: list[ManagerProcess] = []

    def start(url: str, processes: int = 1, threads: int = 4, **opts: Any) -> ManagerProcess:
        options = dict(FAST)
        options.update(opts)
        env = dict(os.environ, CORETASK_FAULTS_URL=url, CORETASK_TEST_PREFIX=prefix,
                   CORETASK_TEST_OPTIONS=json.dumps(options), PYTHONPATH=str(ROOT))
        log_path = tmp_path / f"faults-manager-{len(started)}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "coretask.worker", "--app", "tests.tasks_faults:app",
                 "--processes", str(processes), "--threads", str(threads)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        m = ManagerProcess(proc, log_path)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill_all()


@pytest.fixture
def embedded() -> Iterator[Callable[[TaskProcessor], threading.Event]]:
    """``embedded(processor)`` runs ``processor.run`` in a thread; returns its stop event."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(p: TaskProcessor) -> threading.Event:
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(stop,), daemon=True)
        t.start()
        stop.thread = t  # type: ignore[attr-defined]   # to join a worker stopped mid-test
        running.append((stop, t))
        return stop

    yield start
    for stop, _ in running:
        stop.set()
    for _, t in running:
        t.join(20)
    assert not any(t.is_alive() for _, t in running), "an embedded worker did not stop"


def hash_counts(r: Any, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(key).items()}


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(cond: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> Any:
    """tests.conftest.wait_until, whose failure message may be computed when it fails (state
    worth seeing then: counters, leases)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text} (last value {value!r})")
        time.sleep(0.02)
