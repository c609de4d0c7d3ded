"""Task functions for the task-control tests: time limits, results, progress (workers import
them by reference)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

from coretask import TaskContext
from tests.tasks import R
from tests.tasks_batch import spin_ctx


def spin(key: str, seconds: float, ctx: TaskContext) -> str:
    """tasks_batch.spin_ctx (pure Python; records what ended it and whether ctx.cancelled was
    set), returning a value to keep."""
    spin_ctx(key, seconds, ctx)
    return "spun"


def sleeper(key: str, seconds: float) -> None:
    """Blocked in time.sleep: no asynchronous exception lands until it returns."""
    R().rpush(key + ":started", os.getpid())
    time.sleep(seconds)
    R().rpush(key + ":finished", 1)


def waits_for_child(key: str) -> None:
    """Starts a child process and waits for it in C (waitpid): no asynchronous exception lands."""
    child = subprocess.Popen(["sleep", "600"])
    R().rpush(key + ":child", child.pid)
    child.wait()
    R().rpush(key + ":finished", 1)


def sibling(key: str, seconds: float, ctx: TaskContext) -> None:
    """Sleeps on its first attempt only; records attempt, retries left and pid on each start."""
    R().rpush(key + ":started", json.dumps([ctx.attempt, ctx.retries_left, os.getpid()]))
    if ctx.attempt == 1:
        time.sleep(seconds)
    R().rpush(key + ":finished", 1)


def value(x: object) -> object:
    return {"echo": x, "list": [1, 2.5, "three"], "none": None}


def flaky(key: str) -> int:
    """Fails on its first attempt, returns the attempt number on the next."""
    n = R().incr(key)
    if n == 1:
        raise ValueError("first attempt fails")
    return n


def fail(message: str) -> None:
    raise RuntimeError(message)


def after(seconds: float, key: str) -> str:
    """Sleeps, then records the moment it returns (time.time) and returns "done"."""
    time.sleep(seconds)
    R().set(key, repr(time.time()))
    return "done"


def big(n: int) -> str:
    return "x" * n


def unstorable() -> object:
    return {1, 2, 3}       # a set: JSON cannot carry it


def progress_burst(key: str, calls: int, ctx: TaskContext) -> None:
    """Reports progress ``calls`` times as fast as it can, then waits until told to end, so its
    last reported value can be read while it still runs."""
    for i in range(1, calls + 1):
        ctx.set_progress(i, calls, f"step {i}")
    R().rpush(key + ":reported", 1)
    deadline = time.monotonic() + 30
    while not R().exists(key + ":end") and time.monotonic() < deadline:
        time.sleep(0.02)


def progress_then_return(calls: int, ctx: TaskContext) -> None:
    """Reports progress ``calls`` times as fast as it can and returns at once: the throttle
    still holds the last value when the task ends."""
    for i in range(1, calls + 1):
        ctx.set_progress(i, calls)


def progress_then_fail(calls: int, ctx: TaskContext) -> None:
    """Reports progress, then fails: the attempt's progress must not outlive it."""
    for i in range(1, calls + 1):
        ctx.set_progress(i, calls, f"step {i}")
    raise RuntimeError(f"planned failure after {calls} steps")


def wait_for(key: str) -> None:
    """Runs until the test sets ``key + ':end'`` (at most 30 s)."""
    R().rpush(key + ":started", 1)
    deadline = time.monotonic() + 30
    while not R().exists(key + ":end") and time.monotonic() < deadline:
        time.sleep(0.02)


async def awaiting(key: str, seconds: float) -> None:
    """Awaits asyncio.sleep: idle in the event loop's select, where no thread exception lands.
    Records its start, and how it left (the CancelledError its await raised, in a finally)."""
    R().rpush(key + ":started", time.time())
    outcome = "returned"
    try:
        await asyncio.sleep(seconds)
    except BaseException as exc:
        outcome = type(exc).__name__
        raise
    finally:
        R().rpush(key + ":left", json.dumps({"at": time.time(), "outcome": outcome}))


def row_loop(key: str) -> None:
    """A data job's loop that logs a bad row and goes on: ``except Exception`` around each row."""
    R().rpush(key + ":started", 1)
    for i in range(100_000):
        try:
            time.sleep(0.01)
            R().set(key + ":row", i)
        except Exception:                               # must not swallow the abort
            R().rpush(key + ":swallowed", i)
