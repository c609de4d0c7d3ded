"""Task functions and recording middleware for tests/test_middleware_live.py.

The live tests run an embedded worker (threads in the test process), so tasks and middleware
record in memory here: ``note(key, value)`` appends under a lock, ``notes(key)`` reads a copy.
Keys carry the test's prefix, so tests never see each other's records."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from typing import Any

from coretask import Middleware, TaskContext
from tests.tasks import busy

_lock = threading.Lock()
_notes: dict[str, list[Any]] = defaultdict(list)


def note(key: str, value: Any) -> None:
    with _lock:
        _notes[key].append(value)


def notes(key: str) -> list[Any]:
    with _lock:
        return list(_notes.get(key, ()))


# ------------------------------------------------------------------------------------- tasks

def echo(key: str, value: Any, ctx: TaskContext) -> Any:
    """Returns ``value``; notes its task id and thread."""
    note(key, (ctx.task_id, threading.get_ident()))
    return value


def fail(key: str, message: str, ctx: TaskContext) -> None:
    note(key, (ctx.task_id, ctx.attempt))
    raise RuntimeError(message)


def fail_first(key: str, failures: int, ctx: TaskContext) -> str:
    """Fails its first ``failures`` attempts; notes (attempt, wall time) at each start."""
    note(key, (ctx.attempt, time.time()))
    if ctx.attempt <= failures:
        raise RuntimeError(f"planned failure {ctx.attempt} of {failures}")
    return "finally"


def spin(key: str, seconds: float, ctx: TaskContext) -> str:
    """Pure Python for ``seconds`` (abortable); notes its attempt when it starts."""
    note(key, ctx.attempt)
    busy(seconds)
    return "spun"


def spin_first(key: str, seconds: float, ctx: TaskContext) -> str:
    """Attempt 1 spins (abortable); later attempts return at once."""
    note(key, ctx.attempt)
    if ctx.attempt == 1:
        busy(seconds)
    return f"attempt {ctx.attempt}"


def count(key: str, ctx: TaskContext) -> None:
    note(key, ctx.task_id)


# -------------------------------------------------------------------------------- middleware

class Recorder(Middleware):
    """Records every call as a dict: the method, the calling thread, and what it was given
    (ctx is recorded as its task id and attempt; error as the exception object)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.probe: Any = None      # optional probe(method, *args) -> value recorded as "probe"

    def _rec(self, method: str, ctx: Any = None, **fields: Any) -> None:
        entry = {"method": method, "thread": threading.get_ident(), **fields}
        if ctx is not None:
            entry.update(task=ctx.task_id, attempt=ctx.attempt)
        if self.probe is not None:
            entry["probe"] = self.probe(method, ctx, fields)
        with self.lock:
            self.records.append(entry)

    def calls(self, method: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.records
                    if (method is None or e["method"] == method) and (task is None or e.get("task") == task)]

    def methods(self, task: str) -> list[str]:
        return [e["method"] for e in self.calls(task=task)]

    def before_enqueue(self, message):
        self._rec("before_enqueue", message=message, task=message.task_id)

    def after_enqueue(self, message):
        self._rec("after_enqueue", message=message, task=message.task_id)

    def before_task(self, ctx):
        self._rec("before_task", ctx)

    def after_task(self, ctx, outcome, result, error):
        self._rec("after_task", ctx, outcome=outcome, result=result, error=error)

    def on_retry(self, ctx, error, delay):
        self._rec("on_retry", ctx, error=error, delay=delay)

    def on_dead(self, ctx, error):
        self._rec("on_dead", ctx, error=error)

    def on_batch_end(self, batch):
        self._rec("on_batch_end", batch=batch)

    def on_worker_start(self, worker):
        self._rec("on_worker_start", worker=worker)

    def on_worker_stop(self, worker):
        self._rec("on_worker_stop", worker=worker)


class AsyncRecorder:
    """Duck-typed, async: records the thread each coroutine ran in, after a real suspension."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[tuple[str, str, int]] = []

    async def before_task(self, ctx):
        await asyncio.sleep(0.01)
        with self.lock:
            self.records.append(("before_task", ctx.task_id, threading.get_ident()))

    async def after_task(self, ctx, outcome, result, error):
        await asyncio.sleep(0.01)
        with self.lock:
            self.records.append((f"after_task:{outcome}:{result}", ctx.task_id, threading.get_ident()))


class Exploding(Middleware):
    """Every method raises."""

    def before_enqueue(self, message):
        raise RuntimeError("before_enqueue exploded")

    def after_enqueue(self, message):
        raise RuntimeError("after_enqueue exploded")

    def before_task(self, ctx):
        raise RuntimeError("before_task exploded")

    def after_task(self, ctx, outcome, result, error):
        raise RuntimeError("after_task exploded")

    def on_batch_end(self, batch):
        raise RuntimeError("on_batch_end exploded")
