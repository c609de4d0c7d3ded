"""Fixtures of the fault-injection suite: a TCP proxy in front of the session's server and worker
managers on any URL; servers of a test's own (which it may degrade: SCRIPT FLUSH, maxmemory),
processors on any URL and embedded workers come from tests/conftest.py (own_server,
processor_on, embedded_worker). Everything is stopped at teardown."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coretask.embedded.servers import RedisServer
from tests.conftest import ManagerProcess, Target, spawn_manager
from tests.faults.proxy import Proxy


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
def faults_manager(prefix: str, tmp_path: Path) -> Iterator[Callable[..., ManagerProcess]]:
    """``faults_manager(url, processes=, threads=, **options)``: ``python -m coretask.worker`` for
    ``tests.tasks_faults:app`` against ``url``; its tasks still record into the session's server."""
    started: list[ManagerProcess] = []

    def start(url: str, processes: int = 1, threads: int = 4, **opts: Any) -> ManagerProcess:
        m = spawn_manager("tests.tasks_faults:app", tmp_path / f"faults-manager-{len(started)}.log", prefix,
                          processes, threads, env={"CORETASK_FAULTS_URL": url}, **opts)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill_all()


def hash_counts(r: Any, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(key).items()}


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

