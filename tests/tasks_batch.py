"""Task functions and hooks for the batch, cancel/pause and CLI tests (workers import them by
reference), and ``processor``: the app ``tests.app`` builds, plus hooks that record in Redis,
for manager subprocesses started with ``--app tests.tasks_batch:processor``."""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from coretask import Options, TaskCanceled, TaskContext, TaskProcessor
from coretask.models import BatchInfo
from tests.tasks import R, busy


def record_ctx(key: str, ctx: TaskContext) -> None:
    """Records what the task's context says about itself and its batch."""
    b = ctx.batch
    R().rpush(key, json.dumps({
        "task": ctx.task_id, "queue": ctx.queue, "attempt": ctx.attempt, "retries_left": ctx.retries_left,
        "batch_id": ctx.batch_id, "batch": None if b is None else {"id": b.id, "total": b.total, "state": b.state}}))


def fail_while_flag(key: str, flag: str) -> None:
    """Fails while the Redis key ``flag`` exists, then succeeds."""
    if R().exists(flag):
        raise RuntimeError(f"flag {flag} is set")
    R().rpush(key, 1)


def spin_ctx(key: str, seconds: float, ctx: TaskContext) -> None:
    """Pure-Python loop; records on the way out whether ctx.cancelled was set and what ended it."""
    outcome = "returned"
    try:    # the abort may land while the start is being recorded: the test saw it and canceled
        R().rpush(key + ":started", os.getpid())
        busy(seconds)
    except BaseException as exc:
        outcome = type(exc).__name__
        raise
    finally:
        R().rpush(key + ":left", json.dumps({"cancelled": ctx.cancelled.is_set(), "outcome": outcome}))


def spin_then_fail(key: str, seconds: float) -> None:
    """Turns its abort into a different error: still counted canceled, never retried."""
    R().rpush(key + ":started", 1)
    try:
        busy(seconds)
    except TaskCanceled:
        raise ValueError("cleanup failed after the abort") from None


def first_attempt_long(key: str, seconds: float, blocking: bool, ctx: TaskContext) -> None:
    """Attempt 1 runs long (pure Python, or blocked in time.sleep); later attempts return at
    once. Records attempt and retries left on each start and on finishing."""
    R().rpush(key + ":started", json.dumps([ctx.attempt, ctx.retries_left, os.getpid()]))
    if ctx.attempt == 1:
        if blocking:
            time.sleep(seconds)
        else:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass
    R().rpush(key + ":finished", json.dumps([ctx.attempt, ctx.retries_left]))


# --------------------------------------------------------------------- hooks (manager app)

def _prefix() -> str:
    return os.environ["CORETASK_TEST_PREFIX"]


def count_batch_end(info: BatchInfo) -> None:
    """on_batch_end: one INCR per batch id, and the batch's numbers as the hook saw them."""
    R().incr(f"{_prefix()}:hook:end:{info.id}")
    R().rpush(f"{_prefix()}:hook:ends", json.dumps({
        "id": info.id, "state": info.state, "total": info.total, "done": info.done, "failed": info.failed,
        "canceled": info.canceled, "remaining": info.remaining}))


def _make() -> TaskProcessor:
    from tests.app import options_from_env
    return TaskProcessor(Options(redis=os.environ["CORETASK_TEST_URL"],
                                 cluster=bool(os.environ.get("CORETASK_TEST_CLUSTER")),
                                 prefix=_prefix(), on_batch_end=count_batch_end, **options_from_env()))


processor: Any = _make() if "CORETASK_TEST_PREFIX" in os.environ else None


def record_sched_policy(key: str) -> None:
    """Records the scheduling policy of the thread the task runs in."""
    R().rpush(key, os.sched_getscheduler(0))


def catastrophic_regex(key: str) -> None:
    """Holds the GIL in C for hours: ``(a+)+$`` against 40 a's and a b backtracks 2**40 times.
    Nothing in its process, not even the process's own loop thread, runs until it returns.
    An abort that lands between the start mark and the match (the test cancels once it sees
    the mark) is swallowed, so the match always runs: the tests are about a task that holds
    the GIL, not about one canceled before it got there."""
    R().rpush(key + ":started", os.getpid())
    while True:
        try:
            re.match(r"(a+)+$", "a" * 40 + "b")
            break
        except BaseException:       # noqa: B036 (see above)
            continue
    R().rpush(key + ":finished", 1)
