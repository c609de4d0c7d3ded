"""Task functions that the schedule tests run. Each records, in a Redis list the test names, the
tick it was enqueued for (field ``sk`` of its own task hash) and when it was enqueued (``e``), so
a test can check one run per tick, no gap, and enqueue latency without trusting worker clocks."""
from __future__ import annotations

import time

from coretask import TaskContext
from tests.tasks import R


def _tick_and_enqueued(prefix: str, ctx: TaskContext) -> str:
    sk, e = R().hmget(f"{prefix}:t:{ctx.task_id}", "sk", "e")
    return f"{int(sk)}:{int(e)}"


def record_tick(key: str, prefix: str, ctx: TaskContext) -> None:
    """Records "<tick ms>:<enqueued ms>"."""
    R().rpush(key, _tick_and_enqueued(prefix, ctx))


def slow_tick(key: str, prefix: str, seconds: float, ctx: TaskContext) -> None:
    """Records "<tick ms>:<start s>:<end s>" after running for ``seconds``."""
    tick = _tick_and_enqueued(prefix, ctx).split(":")[0]
    start = time.time()
    time.sleep(seconds)
    R().rpush(key, f"{tick}:{start}:{time.time()}")


def mark(key: str, value: str) -> None:
    R().rpush(key, value)


def fail_always(key: str) -> None:
    R().incr(key)
    raise RuntimeError("scheduled run fails on purpose")
