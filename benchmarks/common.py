"""Small helpers shared by the runner, the per-library suite and the task bodies."""

import os
import statistics
import time

# Environment variables the harness sets for itself, for the suite child and
# for every worker process.
REDIS_URL_ENV = "BENCH_REDIS_URL"
CPU_LOOPS_ENV = "BENCH_CPU_LOOPS"
PGID_FILE_ENV = "BENCH_PGID_FILE"
LOG_DIR_ENV = "BENCH_LOG_DIR"
# Set by benchmarks.compare: every process that builds the coretask app prints the coretask it
# imported (to its log), so a before/after run can check each side ran its own tree.
SHOW_CORETASK_ENV = "BENCH_SHOW_CORETASK"
OPTIONS_ENV = "BENCH_CORETASK_OPTIONS"     # extra coretask Options as JSON (benchmarks.compare)
SHOW_CORETASK_TAG = "[bench] coretask imported from "

# Used only if a module is imported without the harness (e.g. to read its
# docstring): a port nobody listens on, so nothing ever touches a real Redis.
UNUSED_URL = "redis://127.0.0.1:1/0"

# Keys written by the task bodies (same for every library).
NOOP_KEY = "bench:noop"            # INCR per no-op task
CPU_KEY = "bench:cpu"              # INCR per finished CPU task
CPU_WORK_KEY = "bench:cpu:work"    # INCRBYFLOAT of each CPU task's thread CPU time (s)
START_KEY = "bench:start"          # HSET seq -> time.time() at task start
SPIN_START_KEY = "bench:spin:start"
SPIN_END_KEY = "bench:spin:end"


def redis_url():
    return os.environ.get(REDIS_URL_ENV) or UNUSED_URL


class Deadline(Exception):
    """A wait ran past its deadline."""


class Pending(Exception):
    """A coretask API the measurement needs does not exist yet."""


def wait_until(predicate, timeout, what, interval=0.005, check=None):
    """Poll ``predicate()`` until truthy; raise Deadline after ``timeout`` s.

    ``check`` is called on every poll and may raise (e.g. a worker died).
    Returns the predicate's value.
    """
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > end:
            raise Deadline("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def percentile(values, q):
    """Nearest-rank-with-interpolation percentile, q in [0, 100]."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cpu_body(loops):
    """The pure-Python CPU work of the CPU task: a sum of squares."""
    s = 0
    for i in range(loops):
        s += i * i
    return s


def calibrate_cpu(target=0.020):
    """Loop count for ~``target`` seconds of cpu_body, and the measured duration."""
    loops = 200_000
    _timed(cpu_body, loops)  # warm up
    took = statistics.median(_timed(cpu_body, loops) for _ in range(9))
    for _ in range(4):  # converge (robust to a busy machine during the probe)
        loops = max(1000, int(loops * target / took))
        took = statistics.median(_timed(cpu_body, loops) for _ in range(9))
        if abs(took - target) / target < 0.05:
            break
    return loops, took


def _timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# Measurement keys in report order (the per-library suite asserts it matches).
MEASURE_KEYS = ("single_enqueue", "bulk_enqueue", "noop_1p", "noop_2p",
                "cpu_efficiency", "latency", "rss_growth")
