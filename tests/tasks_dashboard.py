"""Task functions for the dashboard tests (workers import them by reference)."""
from __future__ import annotations

import time

from coretask import TaskContext


def steps(n: int, seconds: float, ctx: TaskContext) -> int:
    """``n`` steps of ``seconds`` each, reporting progress; abortable between steps."""
    for i in range(1, n + 1):
        ctx.set_progress(i, n, f"step {i}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
    return n


def fail(message: str) -> None:
    raise ValueError(message)


def noop(*args: object, **kwargs: object) -> None:
    return None
