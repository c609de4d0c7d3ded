"""One library's measurements, run in its own process by benchmarks.run.

    python -m benchmarks.suite --lib NAME --spec spec.json --out result.json

Results are written to --out after every measurement, so a suite that is
killed on its time limit still leaves what it had measured.
"""

import argparse
import json
import os
import random
import sys
import time
import traceback

from . import procs
from .common import (CPU_KEY, CPU_WORK_KEY, MEASURE_KEYS, NOOP_KEY, START_KEY, Deadline, Pending,
                     median, percentile, redis_url)

MIB = 1024 * 1024
# No-op throughput is the processing rate between these fractions of the tasks done: worker
# start-up (spawn, imports, first connection; reported as first_task_after_s and in
# with_start_up) and the last stragglers are not part of a processing rate.
STEADY_FROM, STEADY_TO = 0.1, 0.9


class Ctx:
    def __init__(self, adapter, spec):
        self.adapter = adapter
        self.spec = spec
        self.counts = spec["counts"]
        self.short = spec["short"]
        from .adapters import _base

        self.r = _base.bench_redis()

    # -- deadlines -----------------------------------------------------------
    def deadline(self, n, rate=100):
        """Overall limit for processing n tasks at no less than ``rate``/s."""
        return (20 if self.short else 60) + n / float(rate)

    @property
    def stall(self):
        """Fail if a counter has not moved for this many seconds."""
        return 20 if self.short else 60

    def wait_count(self, read, n, handle, what, rate=100, t_start=None, marks=None):
        """Poll ``read()`` until >= n. Returns (t_done, t_first) in monotonic time.
        ``marks``: a dict {fraction: None} filled with (time, count) when the count first
        reaches fraction * n."""
        t_start = time.monotonic() if t_start is None else t_start
        end = t_start + self.deadline(n, rate)
        last, last_change, first = -1, time.monotonic(), None
        while True:
            v = read()
            now = time.monotonic()
            if v > 0 and first is None:
                first = now
            if marks:
                for frac in marks:
                    if marks[frac] is None and v >= frac * n:
                        marks[frac] = (now, v)
            if v >= n:
                return now, first
            if v != last:
                last, last_change = v, now
            if handle is not None:
                handle.check()
            if now > end:
                raise Deadline("timed out after %.0f s waiting for %s (%d/%d)" % (now - t_start, what, v, n))
            if now - last_change > self.stall:
                raise Deadline("no progress for %.0f s waiting for %s (%d/%d)" % (self.stall, what, v, n))
            time.sleep(0.01)

    def counter(self, key):
        return lambda: int(self.r.get(key) or 0)

    # -- workers ---------------------------------------------------------------
    def warm_up(self, handle, n=20):
        """Make sure freshly started workers are consuming, then leave them idle."""
        for _ in range(n):
            self.adapter.enqueue_one("noop")
        self.wait_count(self.counter(NOOP_KEY), n, handle, "warm-up tasks", rate=5)
        time.sleep(0.3)
        self.r.delete(NOOP_KEY)

    def enqueue_many(self, n, task):
        """Fastest way the library offers to queue n tasks (bulk API if any)."""
        try:
            if self.adapter.bulk_enqueue(n, task) is not None:
                return
        except Pending:
            pass  # bulk API not there yet (coretask): fall back to single enqueues
        self.adapter.single_enqueue(n, task)


# ---------------------------------------------------------------------------
# measurements: each returns a dict of numbers for one run ("value" = headline)


def m_single_enqueue(ctx):
    n = ctx.counts["single"]
    t0 = time.perf_counter()
    ctx.adapter.single_enqueue(n)
    dt = time.perf_counter() - t0
    return {"value": n / dt, "seconds": dt, "tasks": n}


def m_bulk_enqueue(ctx):
    n = ctx.counts["bulk"]
    t0 = time.perf_counter()
    ret = ctx.adapter.bulk_enqueue(n)
    dt = time.perf_counter() - t0
    if ret is None:
        return None  # no bulk API -> "n/a"
    return {"value": n / dt, "seconds": dt, "tasks": n}


def _m_noop_throughput(processes):
    def run(ctx):
        n = ctx.counts["noop"]
        ctx.adapter.single_enqueue(n)
        t0 = time.monotonic()
        handle = ctx.adapter.start_workers(processes, 8)
        marks = {STEADY_FROM: None, STEADY_TO: None}
        try:
            t1, first = ctx.wait_count(ctx.counter(NOOP_KEY), n, handle, "%d no-op tasks" % n, t_start=t0,
                                       marks=marks)
        finally:
            ctx.adapter.stop_workers(handle)
        (ta, va), (tb, vb) = marks[STEADY_FROM], marks[STEADY_TO]
        return {"value": (vb - va) / (tb - ta), "seconds": t1 - t0, "tasks": n,
                "with_start_up": n / (t1 - t0), "first_task_after_s": (first - t0) if first else None}
    return run


# CPU-bound work runs one task per process in every library (threads would only share one GIL):
# the configuration each recommends for it. Only dramatiq and coretask take a thread count.
CPU_THREADS = 1


def m_cpu_efficiency(ctx):
    """ideal = total CPU work / 2 processes, where the total CPU work is the sum of
    each task's own thread CPU time measured inside the workers (robust to the
    machine's speed varying between calibration and run)."""
    n = ctx.counts["cpu"]
    handle = ctx.adapter.start_workers(2, CPU_THREADS)
    try:
        ctx.warm_up(handle)
        t0 = time.monotonic()
        ctx.enqueue_many(n, "cpu")
        t1, _ = ctx.wait_count(ctx.counter(CPU_KEY), n, handle, "%d CPU tasks" % n, rate=10, t_start=t0)
    finally:
        ctx.adapter.stop_workers(handle)
    work = float(ctx.r.get(CPU_WORK_KEY) or 0.0)
    ideal = work / 2.0
    return {"value": ideal / (t1 - t0), "actual_s": t1 - t0, "ideal_s": ideal,
            "task_cpu_ms": work / n * 1000, "tasks": n}


def m_latency(ctx):
    n = ctx.counts["latency"]
    rnd = random.Random(42)
    handle = ctx.adapter.start_workers(2, 8)
    try:
        ctx.warm_up(handle)
        enq = {}
        for i in range(n):
            time.sleep(rnd.uniform(0.010, 0.030))
            enq[i] = time.time()
            ctx.adapter.enqueue_one("record", i)
            if i % 20 == 0:
                handle.check()
        ctx.wait_count(lambda: ctx.r.hlen(START_KEY), n, handle, "%d latency tasks" % n, rate=5)
    finally:
        ctx.adapter.stop_workers(handle)
    starts = {int(k): float(v) for k, v in ctx.r.hgetall(START_KEY).items()}
    lat = [(starts[i] - enq[i]) * 1000.0 for i in range(n) if i in starts]
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat), "tasks": len(lat)}


def m_rss_growth(ctx):
    n = ctx.counts["rss"]
    handle = ctx.adapter.start_workers(2, 8)
    try:
        ctx.warm_up(handle, n=200)
        time.sleep(0.5)
        before = procs.tree_rss(handle.pid)
        nproc = procs.tree_size(handle.pid)
        t0 = time.monotonic()
        for k in range(0, n, 1000):
            ctx.enqueue_many(min(1000, n - k), "noop")
            handle.check()
        ctx.wait_count(ctx.counter(NOOP_KEY), n, handle, "%d no-op tasks" % n, t_start=t0)
        time.sleep(0.5)
        after = procs.tree_rss(handle.pid)
    finally:
        ctx.adapter.stop_workers(handle)
    return {"value": (after - before) / MIB, "before_mb": before / MIB, "after_mb": after / MIB,
            "processes": nproc, "tasks": n}


MEASUREMENTS = {
    "single_enqueue": m_single_enqueue,
    "bulk_enqueue": m_bulk_enqueue,
    "noop_1p": _m_noop_throughput(1),
    "noop_2p": _m_noop_throughput(2),
    "cpu_efficiency": m_cpu_efficiency,
    "latency": m_latency,
    "rss_growth": m_rss_growth,
}
assert tuple(MEASUREMENTS) == MEASURE_KEYS


def summarize(runs):
    keys = []
    for r in runs:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    return {k: median([r.get(k) for r in runs]) for k in keys}


def _short_error(e):
    if isinstance(e, Pending):
        return "pending"
    msg = "%s: %s" % (type(e).__name__, e)
    return msg


def run_one(ctx, name, fn, runs):
    rec = {"runs": [], "median": None, "status": "ok", "error": None}
    for i in range(runs):
        ctx.adapter.flush()
        t0 = time.monotonic()
        try:
            value = fn(ctx)
        except Exception as e:  # noqa: BLE001 - a failing measurement is reported, not fatal
            if isinstance(e, Pending) or (ctx.adapter.NAME == "coretask"
                                          and isinstance(e, (ImportError, AttributeError))):
                rec["status"], rec["error"] = "pending", str(e)
            else:
                rec["status"], rec["error"] = "error", _short_error(e)
                rec["traceback"] = traceback.format_exc()
            print("  %-16s run %d: %s" % (name, i + 1, rec["status"].upper() + ": " + str(rec["error"])[:300]),
                  flush=True)
            break
        if value is None:
            rec["status"] = "n/a"
            print("  %-16s n/a (no bulk API)" % name, flush=True)
            break
        value["wall_s"] = round(time.monotonic() - t0, 2)
        rec["runs"].append(value)
        print("  %-16s run %d: %s  (%.1f s)" % (name, i + 1, _fmt_run(value), time.monotonic() - t0), flush=True)
    if rec["runs"]:
        rec["median"] = summarize(rec["runs"])
    try:
        ctx.adapter.flush()
    except Exception:  # noqa: BLE001
        pass
    return rec


def _fmt_run(v):
    return ", ".join("%s=%s" % (k, ("%.4g" % x) if isinstance(x, float) else x) for k, x in v.items()
                     if not isinstance(x, list))


def _loadavg():
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite")
    ap.add_argument("--lib", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    spec = json.load(open(a.spec))
    out = {"library": a.lib, "version": None, "loadavg_at_start": _loadavg(), "worker_config": None,
           "worker_commands": {}, "measurements": {}, "error": None}

    def save():
        with open(a.out + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(a.out + ".tmp", a.out)

    try:
        try:
            from importlib import metadata

            out["version"] = "%s %s" % (a.lib, metadata.version(a.lib))
        except Exception:  # noqa: BLE001
            pass
        from .adapters import load

        adapter = load(a.lib)
        out["version"] = adapter.version()
        out["worker_config"] = adapter.WORKER_CONFIG
        out["doc"] = (adapter.__doc__ or "").strip()
        url = redis_url()
        bindir = os.path.dirname(sys.executable) + os.sep
        for p in (1, 2):
            cmd = " ".join(adapter.worker_command(p, 8)).replace(url, "$BENCH_REDIS_URL")
            out["worker_commands"]["%dp" % p] = cmd.replace(sys.executable, "python").replace(bindir, "")
        save()
        ctx = Ctx(adapter, spec)
        todo = dict(MEASUREMENTS)
        if hasattr(adapter, "extra_measurements"):
            todo.update(adapter.extra_measurements())
        if spec.get("measure"):
            todo = {k: v for k, v in todo.items() if k in spec["measure"]}
        for name, fn in todo.items():
            out["measurements"][name] = run_one(ctx, name, fn, spec["runs"])
            out["loadavg_at_end"] = _loadavg()
            save()
    except Exception as e:  # noqa: BLE001
        pending = a.lib == "coretask" and isinstance(e, (ImportError, AttributeError, Pending))
        out["error"] = ("pending: " if pending else "") + _short_error(e)
        out["traceback"] = traceback.format_exc()
        print("  suite %s: %s" % ("PENDING" if pending else "ERROR", out["error"]), flush=True)
        save()
        return 0 if pending else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
