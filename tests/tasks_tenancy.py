"""Task functions of tests/test_tenancy.py (importable by reference, like every task target).
Each records what it did in Redis under keys the test passes."""
from __future__ import annotations

import os
import time

from coretask import TaskContext
from tests.tasks import R

HOLD_LIMIT = 60.0   # a held task never outlives a broken test by more than this


def step(key: str, name: str) -> None:
    """Appends its name to the execution order list ``key``."""
    R().rpush(key, name)


def step_fail(key: str, name: str, failures: int, ctx: TaskContext) -> None:
    """Appends ``name#attempt`` to the order list, and fails its first ``failures`` attempts."""
    R().rpush(key, f"{name}#{ctx.attempt}")
    if ctx.attempt <= failures:
        raise RuntimeError(f"planned failure {ctx.attempt} of {failures}")


def fail_while(flag: str, key: str, name: str) -> None:
    """Fails while the key ``flag`` exists; otherwise appends ``name`` to ``key``."""
    if R().exists(flag):
        raise ValueError(f"{flag} is set")
    R().rpush(key, name)


def hold(key: str, tenant: str, seconds: float = 0.0) -> None:
    """A running task that can be counted and released.

    On start it INCRs ``key:run:<tenant>`` and appends the new value to ``key:peak:<tenant>``
    (so the largest value there is the peak number of the tenant's tasks running at once) and
    its pid to ``key:started:<tenant>``. It then runs for at least ``seconds`` and until the
    key ``key:go`` exists (sleeping in short steps, so an abort lands promptly), DECRs the
    counter and appends its pid to ``key:done:<tenant>``."""
    r = R()
    r.rpush(f"{key}:peak:{tenant}", r.incr(f"{key}:run:{tenant}"))
    r.rpush(f"{key}:started:{tenant}", os.getpid())
    try:
        start = time.monotonic()
        while time.monotonic() - start < HOLD_LIMIT:
            if time.monotonic() - start >= seconds and r.exists(f"{key}:go"):
                break
            time.sleep(0.005)
    finally:
        r.decr(f"{key}:run:{tenant}")
    r.rpush(f"{key}:done:{tenant}", os.getpid())
