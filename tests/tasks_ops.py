"""Task functions for the single-task operation and idempotency-key tests (workers import them
by reference)."""
from __future__ import annotations

import json
import time

from coretask import TaskContext
from tests.tasks import R, busy


def short(key: str, task_ref: str, seconds: float) -> None:
    """Records its start, runs ``seconds`` of pure Python (abortable), records that it returned."""
    R().rpush(key + ":started", task_ref)
    busy(seconds)
    R().rpush(key + ":finished", task_ref)


def spin_ctx_timed(key: str, seconds: float, ctx: TaskContext) -> None:
    """Pure-Python loop; on the way out records when, whether ctx.cancelled was set and what ended it."""
    outcome = "returned"
    try:    # the abort may land while the start is being recorded: the test saw it and canceled
        R().rpush(key + ":started", time.time())
        busy(seconds)
    except BaseException as exc:
        outcome = type(exc).__name__
        raise
    finally:
        R().rpush(key + ":left", json.dumps({"at": time.time(), "cancelled": ctx.cancelled.is_set(),
                                             "outcome": outcome}))
