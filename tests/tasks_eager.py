"""Task functions of the eager-mode and pytest-plugin tests. Eager tasks run in the test's own
process, so they record what they did in ``SEEN`` (cleared by each test), never in Redis."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import date
from typing import Any

from coretask import TaskContext

SEEN: dict[str, list[Any]] = defaultdict(list)
EVENTS: dict[str, threading.Event] = defaultdict(threading.Event)


def add(a: int, b: int) -> int:
    SEEN["add"].append((a, b))
    return a + b


def weekday(day: date) -> str:
    """Its argument comes back as a date: the payload went through JSON and was revived."""
    SEEN["weekday"].append(type(day).__name__)
    return day.strftime("%A")


def fail_times(key: str, n: int) -> str:
    """Fails the first n attempts, then succeeds."""
    SEEN[key].append("try")
    if len(SEEN[key]) <= n:
        raise RuntimeError(f"planned failure {len(SEEN[key])} of {n}")
    return "ok"


class Boom(Exception):
    """A task's own exception type, which eager mode must raise as it is."""


def boom(message: str) -> None:
    SEEN["boom"].append(message)
    raise Boom(message)


def context(ctx: TaskContext) -> dict[str, Any]:
    ctx.set_progress(1, 2, "half")
    SEEN["ctx"].append(ctx)
    return {"task_id": ctx.task_id, "batch_id": ctx.batch_id, "tenant": ctx.tenant, "attempt": ctx.attempt,
            "queue": ctx.queue, "cancelled": ctx.cancelled.is_set()}


def summary(ctx: TaskContext) -> str:
    """A continuation: its context names the batch it continues."""
    batch = ctx.batch
    SEEN["summary"].append((ctx.batch_id, batch.done if batch else None, batch.failed if batch else None))
    return "summed"


def chain(n: int) -> int:
    """Enqueues its successor from inside the task (through the processor in SEEN)."""
    SEEN["chain"].append(f"start {n}")
    if n > 0:
        SEEN["processor"][0].enqueue_task("default", "acme", chain, n - 1)
    SEEN["chain"].append(f"end {n}")
    return n


def spin(seconds: float, ctx: TaskContext) -> str:
    """Python code where an asynchronous exception can land: time limits and cancels reach it."""
    deadline = time.monotonic() + seconds
    SEEN["spin"].append(ctx)
    EVENTS["spin"].set()
    while time.monotonic() < deadline:
        sum(range(1000))
    SEEN["spin"].append("finished")
    return "finished"


def cancel_own_batch(ctx: TaskContext) -> str:
    SEEN["cancel_own"].append("before")
    SEEN["processor"][0].cancel_batch(ctx.batch_id)
    SEEN["cancel_own"].append("after")       # never reached: the cancel raises TaskCanceled here
    return "not canceled"


def unjsonable() -> object:
    return object()


def on_topic(ctx: TaskContext) -> None:
    """Options.execute: handles TaskData."""
    SEEN["topic"].append((ctx.topic, ctx.data))


async def double(x: int) -> int:
    """A coroutine function: run to completion in the task's thread, as in a worker."""
    return 2 * x


def enqueue_then_cancel(n: int) -> str | None:
    """Enqueues a child and cancels it before returning: the child, still queued, never runs."""
    p = SEEN["processor"][0]
    child = p.enqueue_task("default", "acme", add, n, n)
    SEEN["child"].append(child)
    SEEN["child_state"].append(p.get_task(child).state)
    assert p.cancel_task(child) is True
    return child


def interrupted() -> None:
    SEEN["interrupted"].append("ran")
    raise KeyboardInterrupt


def eager_app() -> Any:
    """An --app that builds an eager processor: the worker and the CLI refuse it."""
    from coretask import Options, TaskProcessor
    return TaskProcessor(Options(eager=True))
