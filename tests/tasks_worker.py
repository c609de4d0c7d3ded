"""Task functions for tests/test_worker.py. Workers import targets by reference, so they live in
an importable module; each records what it did in Redis under keys the test passes."""
from __future__ import annotations

import os
import time
from typing import Any

import redis

from coretask import TaskCanceled, TaskContext

from tests.tasks import R  # noqa: E402  (one locked client per process)


def mark(key: str, index: int) -> None:
    """Count one run of task ``index``: a per-index hash field, a total, and the process."""
    pipe = R().pipeline(transaction=False)
    pipe.hincrby(key, str(index), 1)
    pipe.incr(key + ":total")
    pipe.sadd(key + ":pids", os.getpid())
    pipe.execute()


def sleep_with_context(key: str, seconds: float, ctx: TaskContext) -> None:
    """Record ``attempt|retries_left|pid`` on start, sleep, then record the pid on finish."""
    R().rpush(key + ":started", f"{ctx.attempt}|{ctx.retries_left}|{os.getpid()}")
    time.sleep(seconds)
    R().rpush(key + ":finished", f"{ctx.attempt}|{ctx.retries_left}|{os.getpid()}")


def wrap_up_on_abort(key: str, seconds: float) -> None:
    """Work in short steps; when aborted, catch TaskCanceled, wrap up and return normally."""
    R().rpush(key + ":started", os.getpid())
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            time.sleep(0.01)
    except TaskCanceled:
        pass
    R().rpush(key + ":finished", os.getpid())


def kill_own_process_pid(key: str) -> None:
    """Record the pid, then end the process abruptly (as a segfault or os._exit in C would)."""
    R().rpush(key, os.getpid())
    os._exit(17)


def add(key: str, value: object) -> None:
    R().sadd(key, str(value))


def concurrency(key: str, seconds: float) -> None:
    """Track how many of these run at once: ``key:max`` ends as the peak."""
    r = R()
    now = r.incr(key + ":running")
    r.eval("if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
           "redis.call('SET', KEYS[1], ARGV[1]) end", 1, key + ":max", now)
    time.sleep(seconds)
    r.decr(key + ":running")
    r.incr(key + ":done")


# ------------------------------------------------------------- crashes (tests/faults/test_crashes.py)

def innocent(key: str, seconds: float, ctx: TaskContext) -> None:
    """Runs a while, then records that it finished: (attempt, retries left, pid) per start."""
    R().rpush(key + ":started", f"{ctx.attempt}:{ctx.retries_left}:{os.getpid()}")
    time.sleep(seconds)
    R().rpush(key + ":finished", ctx.attempt)


def crash(key: str, how: str, after: float) -> None:
    """Ends its own process after ``after`` seconds: a segfault, os._exit(17), or exhausting the
    address space under an RLIMIT_AS it sets for its process (MemoryError)."""
    R().rpush(key, os.getpid())
    time.sleep(after)
    if how == "segfault":
        import ctypes
        ctypes.string_at(0)                      # reads address 0: SIGSEGV
    elif how == "exit":
        os._exit(17)
    elif how == "memory":
        import resource
        import psutil
        limit = psutil.Process().memory_info().vms + 256 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        hog = [bytearray(64 * 1024 * 1024) for _ in range(64)]     # 4 GiB: MemoryError first
        R().rpush(key + ":survived", len(hog))
