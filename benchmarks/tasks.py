"""Task bodies shared by every library adapter.

Each adapter wraps these plain module-level functions with its own library's
decorator (or, for rq and coretask, enqueues them directly), so every library
runs exactly the same code. The Redis connection comes from BENCH_REDIS_URL
(set by the harness) and is created once per process (re-created after a fork).
"""

import os
import time

from .common import (CPU_KEY, CPU_LOOPS_ENV, CPU_WORK_KEY, NOOP_KEY, SPIN_END_KEY, SPIN_START_KEY,
                     START_KEY, cpu_body, redis_url)

_conn = None
_conn_pid = None
_loops = None


def conn():
    global _conn, _conn_pid
    if _conn is None or _conn_pid != os.getpid():
        import redis

        _conn = redis.Redis.from_url(redis_url())
        _conn_pid = os.getpid()
    return _conn


def _cpu_loops():
    global _loops
    if _loops is None:
        _loops = int(os.environ.get(CPU_LOOPS_ENV) or 500_000)
    return _loops


def noop():
    """One INCR on the no-op counter."""
    conn().incr(NOOP_KEY)


def cpu():
    """~20 ms of pure-Python work (loop count calibrated by the harness).

    Then, in one round trip, adds the CPU time this thread spent in the work
    (time.thread_time, so waiting for the GIL or for a core does not count)
    and INCRs the counter.
    """
    t0 = time.thread_time()
    cpu_body(_cpu_loops())
    work = time.thread_time() - t0
    conn().pipeline(transaction=False).incrbyfloat(CPU_WORK_KEY, work).incr(CPU_KEY).execute()


def record_start(seq):
    """Record time.time() at the very start of the task, keyed by sequence number."""
    t = time.time()
    conn().hset(START_KEY, str(seq), repr(t))


def _spin_for(seconds):
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        for i in range(2000):
            x += i


def spin(seq, max_seconds=30.0):
    """Busy pure-Python loop for up to ``max_seconds``; records start and leave times.

    Used by the coretask cancel-latency measurement. Everything is inside
    ``try`` so that a cancellation raised asynchronously in the task's thread
    (even while it is still writing its start time) always reaches the
    ``finally``, which records the moment the thread left the task body. The
    loop runs in a frame of its own: Python 3.13 may unwind the frame an
    asynchronous exception lands in past that frame's ``finally``.
    """
    try:
        conn().hset(SPIN_START_KEY, str(seq), repr(time.time()))
        _spin_for(max_seconds)
    finally:
        left = time.time()
        # bookkeeping only. The abort may have landed inside the start write's redis-py call and
        # left the shared client's connection unusable: a failed write is retried on a
        # connection of its own.
        for attempt in range(3):
            try:
                if attempt == 0:
                    conn().hset(SPIN_END_KEY, str(seq), repr(left))
                else:
                    import redis

                    own = redis.Redis.from_url(redis_url())
                    own.hset(SPIN_END_KEY, str(seq), repr(left))
                    own.close()
                break
            except BaseException:  # noqa: BLE001
                continue
