"""More task functions for test_enqueue / test_lifecycle / test_options (tests/tasks.py is shared
and left untouched). Importable by reference, like every task target."""
from __future__ import annotations

import json
import time
from typing import Any

from coretask import TaskContext
from tests.tasks import R


def record_json(key: str, value: Any = None) -> None:
    R().rpush(key, json.dumps(value))


def options_like(key: str, retries: int, delay_until: str) -> None:
    """Keyword arguments named like enqueue options (coretask.call passes them through)."""
    R().rpush(key, json.dumps({"retries": retries, "delay_until": delay_until,
                               "types": [type(retries).__name__, type(delay_until).__name__]}))


def collections(key: str, tags: set[str], frozen: frozenset[int], pair: tuple[int, str]) -> None:
    """Records the types and values its set, frozenset and tuple arrived as."""
    R().rpush(key, json.dumps([type(tags).__name__, sorted(tags), type(frozen).__name__, sorted(frozen),
                               type(pair).__name__, list(pair)]))


def fetch_like(key: str, timeout: int = 3) -> None:
    """A parameter named like the enqueue option ``timeout``, with a default."""
    R().rpush(key, timeout)


def record_ctx(key: str, ctx: TaskContext) -> None:
    """Records what the task knew about itself, and when it started (epoch seconds)."""
    R().rpush(key, json.dumps({"id": ctx.task_id, "attempt": ctx.attempt, "retries_left": ctx.retries_left,
                               "tenant": ctx.tenant, "queue": ctx.queue, "t": time.time()}))


def record_start_at(key: str, name: str) -> None:
    """Records its name and its start time (epoch seconds), for delay measurements."""
    R().rpush(key, json.dumps({"name": name, "t": time.time()}))


def fail_times_timed(key: str, n: int) -> None:
    """Records each attempt's start time; the first n attempts fail, then it succeeds."""
    R().rpush(key, time.time())
    attempts = R().llen(key)
    if attempts <= n:
        raise RuntimeError(f"planned failure {attempts} of {n}")
    R().rpush(key + ":ok", attempts)


def boom(message: str) -> None:
    raise KeyError(message)


def victim(key: str) -> None:
    """The task tests corrupt in Redis before a worker sees it; it must never run."""
    R().rpush(key, "ran")


def lease_holder(key: str, ctx: TaskContext) -> None:
    R().rpush(key, ctx.task_id)


def annotated_context(key: str, context: TaskContext, suffix: str = "") -> None:
    """The context goes to a parameter annotated TaskContext, whatever its name."""
    R().rpush(key, f"{context.task_id}|{context.tenant}|{context.queue}|{context.attempt}{suffix}")
