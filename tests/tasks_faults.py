"""Task functions of the fault-injection suite (tests/faults). Workers import targets by
reference, so they live in an importable module.

Every task records what happened to it in the server under test (``CORETASK_TEST_URL``, the
session's server), never through the proxy nor in a server a test degrades: the records are the
test's ground truth while coretask's own connection is being broken. Records are hashes keyed by
the task's tag (or id): ``<key>:started``, ``<key>:finished`` and friends count runs per task.

``app()`` builds the TaskProcessor of a manager started against another server (a proxy, a
server of the test's own): ``CORETASK_FAULTS_URL`` names it, ``CORETASK_TEST_PREFIX`` and
``CORETASK_TEST_OPTIONS`` (JSON) complete it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any


from coretask import Options, TaskContext, TaskProcessor

from tests.tasks import R  # noqa: E402  (one locked client per process)


def app() -> TaskProcessor:
    opts = json.loads(os.environ.get("CORETASK_TEST_OPTIONS", "{}"))
    return TaskProcessor(Options(redis=os.environ["CORETASK_FAULTS_URL"], prefix=os.environ["CORETASK_TEST_PREFIX"],
                                 **opts))


# ------------------------------------------------------------------------------- counting

def run(key: str, tag: str, seconds: float = 0.0, pad: str = "") -> None:
    """Count a start and, after ``seconds`` (short sleeps, so an abort lands at once), a finish.
    ``pad`` only makes the payload larger."""
    r = R()
    r.hincrby(key + ":started", tag, 1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.01, max(end - time.monotonic(), 0)))
    r.hincrby(key + ":finished", tag, 1)


def run_seen(key: str, tag: str, seconds: float, ctx: TaskContext) -> None:
    """``run`` that also lists each run as ``"<tag> <task id> <attempt>"`` in ``<key>:runs``, so a
    test can tell a redelivery (same id, next attempt) from a task stored twice (attempt 1)."""
    R().rpush(key + ":runs", f"{tag} {ctx.task_id} {ctx.attempt}")
    run(key, tag, seconds)


def run_pid(key: str, tag: str) -> None:
    """Count the run of ``tag`` and which process ran it."""
    pipe = R().pipeline(transaction=False)
    pipe.hincrby(key + ":runs", tag, 1)
    pipe.hincrby(key + ":pids", str(os.getpid()), 1)
    pipe.execute()


def leak_pid(key: str, tag: str, mb: int) -> None:
    """Keep ``mb`` MiB alive for the life of the process (an intentional leak), then count."""
    _LEAK.append(bytearray(mb * 1024 * 1024))   # bytearray() writes zeros: the pages are resident
    run_pid(key, tag)


_LEAK: list[bytearray] = []


# --------------------------------------------------------------------------------- poison

class PlannedBaseException(BaseException):
    """A BaseException subclass of the application's own."""


def raise_base(key: str, kind: str, ctx: TaskContext) -> None:
    """Count the attempt, then raise a BaseException that is not an Exception."""
    R().hincrby(key + ":attempts", kind, 1)
    R().sadd(key + ":pids", os.getpid())
    if kind == "SystemExit":
        raise SystemExit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("planned")
    if kind == "exit":
        import sys
        sys.exit("planned sys.exit")
    raise PlannedBaseException(f"planned, attempt {ctx.attempt}")


def huge_result(key: str, mb: int) -> bytes:
    """Return a ``mb`` MiB object (coretask keeps no results: it must simply be dropped)."""
    R().incr(key + ":runs")
    return b"x" * (mb * 1024 * 1024)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of Unprintable fails")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ of Unprintable fails")


class NotAString(Exception):
    def __str__(self) -> Any:      # str() raises TypeError: __str__ returned non-string
        return 42  # noqa: PLE0307  (on purpose)


def raise_unprintable(key: str, kind: str) -> None:
    R().hincrby(key + ":attempts", kind, 1)
    if kind == "not-a-string":
        raise NotAString()
    raise Unprintable()
