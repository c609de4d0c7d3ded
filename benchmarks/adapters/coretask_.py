"""coretask adapter.

Workers: ``python -m coretask.worker --app benchmarks.adapters.coretask_:processor
--processes P --threads 8`` (2 processes x 8 threads on this 2-core machine;
``--threads 1`` for CPU efficiency, ``--threads 100`` for the cancel-latency measurement).
Bulk API: ``TaskProcessor.enqueue_batch``.

This module is also the worker's app module: ``processor`` is built lazily
(module ``__getattr__``) from BENCH_REDIS_URL, so importing the module needs
no Redis and no coretask until the attribute is used. With BENCH_SHOW_CORETASK set
(benchmarks.compare), building it prints the imported ``coretask.__file__`` to stderr.
Only coretask's public API is used (``Options``, ``TaskProcessor``, ``python -m
coretask.worker``), so the same adapter drives any coretask tree.

Extra measurements (coretask only), see ``extra_measurements``:
cancel latency (``cancel_batch``) and pause latency (``pause``/``resume``).
If the API they need is not there yet they report "pending".
"""

import json
import os
import random
import sys
import threading
import time

from .. import tasks
from ..common import (OPTIONS_ENV, SHOW_CORETASK_ENV, SHOW_CORETASK_TAG, SPIN_END_KEY, SPIN_START_KEY, START_KEY,
                      Deadline, Pending, percentile, redis_url, wait_until)
from . import _base

NAME = "coretask"
DISTS = ("coretask",)
WORKER_CONFIG = ("python -m coretask.worker --processes P --threads 8 (--threads 1 for CPU efficiency, "
                 "--threads 100 for cancel latency)")
QUEUE = "default"
KIND = "bench"
PREFIX = "{bench}"

FUNCS = {"noop": tasks.noop, "cpu": tasks.cpu, "record": tasks.record_start, "spin": tasks.spin}


def make_processor(processes=2, max_workers=8):
    from coretask import Options, TaskProcessor

    if os.environ.get(SHOW_CORETASK_ENV):
        import coretask

        print("%s%s (pid %d)" % (SHOW_CORETASK_TAG, coretask.__file__, os.getpid()), file=sys.stderr, flush=True)
    extra = json.loads(os.environ.get(OPTIONS_ENV) or "{}")   # benchmarks.compare --after-options
    names = extra.pop("middleware", None)
    if isinstance(names, str):
        extra["middleware"] = observability_middleware(names)
    return TaskProcessor(Options(redis=redis_url(), prefix=PREFIX, queues=[QUEUE],
                                 processes=processes, max_workers=max_workers, **extra))


OBSERVABILITY = ("prometheus", "otel", "otel-sdk")


def _middleware_names():
    """The names of ``{"middleware": "prometheus,otel-sdk"}`` in the extra Options, or ()."""
    names = json.loads(os.environ.get(OPTIONS_ENV) or "{}").get("middleware")
    return tuple(n.strip() for n in names.split(",") if n.strip()) if isinstance(names, str) else ()


def observability_middleware(text):
    """The middleware a comma-separated list names (coretask[prometheus] / coretask[otel]):
    "prometheus" counts into prometheus_client (the workers then run in multiprocess mode, served
    by the manager: worker_command adds --metrics-port 0); "otel" traces through the OpenTelemetry
    API with no SDK (the no-op tracer); "otel-sdk" configures the SDK in each process with a
    batch span processor whose exporter drops the spans, so what is measured is making them."""
    out = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name == "prometheus":
            from coretask.contrib.prometheus import PrometheusMiddleware
            out.append(PrometheusMiddleware())
        elif name in ("otel", "otel-sdk"):
            from coretask.contrib.otel import TracingMiddleware
            if name == "otel-sdk":
                _otel_sdk()
            out.append(TracingMiddleware())
        else:
            raise ValueError("unknown middleware %r in %s; use any of %s"
                             % (name, OPTIONS_ENV, ", ".join(OBSERVABILITY)))
    return out


def _otel_sdk():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)


def __getattr__(name):
    if name == "processor":
        p = make_processor()
        globals()["processor"] = p
        return p
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def _p():
    return sys.modules[__name__].processor


def version():
    try:
        import coretask
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return "coretask (not importable: %s)" % e
    v = _base.dist_versions(DISTS)
    if "not installed" in v:
        v = "coretask %s (checkout)" % getattr(coretask, "__version__", "?")
    return v


def enqueue_one(task, *args):
    _p().enqueue_task(QUEUE, KIND, FUNCS[task], *args)


def single_enqueue(n, task="noop"):
    p, fn = _p(), FUNCS[task]
    for _ in range(n):
        p.enqueue_task(QUEUE, KIND, fn)


def _enqueue_batch(p, fn, argss):
    if not hasattr(p, "enqueue_batch"):
        raise Pending("TaskProcessor.enqueue_batch not implemented yet")
    return p.enqueue_batch(QUEUE, KIND, lambda b: [b.enqueue(fn, *a) for a in argss])


def bulk_enqueue(n, task="noop", chunk=1000):
    p, fn = _p(), FUNCS[task]
    for k in _base.chunks(n, chunk):
        _enqueue_batch(p, fn, [()] * k)
    return n


def worker_command(processes, threads):
    cmd = [sys.executable, "-m", "coretask.worker", "--app", "benchmarks.adapters.coretask_:processor",
           "--processes", str(processes), "--threads", str(threads), "--log-level", "WARNING"]
    if "prometheus" in _middleware_names():
        cmd += ["--metrics-port", "0", "--metrics-addr", "127.0.0.1"]   # multiprocess mode, as deployed
    return cmd


def start_workers(processes, threads):
    import coretask.worker  # noqa: F401 - fail fast (ImportError -> "pending") before spawning

    return _base.start(worker_command(processes, threads), "coretask-workers")


def stop_workers(handle):
    _base.stop(handle)


def flush():
    _base.flush_redis()


# --------------------------------------------------------------------------
# coretask-only measurements


def _batch_id(ret):
    for attr in ("id", "batch_id", "bid"):
        v = getattr(ret, attr, None)
        if v is not None:
            return v
    return ret


def measure_cancel(ctx):
    """Cancel latency: N spinning tasks in one batch, all running, then cancel_batch.

    Latency of a task = the time its thread left the task (recorded in the
    task's ``finally``) minus the moment cancel_batch returned.
    """
    p = _p()
    if not hasattr(p, "cancel_batch"):
        raise Pending("TaskProcessor.cancel_batch not implemented yet")
    n, threads = ctx.counts["cancel_tasks"], ctx.counts["cancel_threads"]
    r = _base.bench_redis()
    handle = start_workers(2, threads)
    try:
        ctx.warm_up(handle)
        ret = _enqueue_batch(p, tasks.spin, [(i, 30.0) for i in range(n)])
        bid = _batch_id(ret)
        # Wait until all are running, or until the count stops growing for 2 s.
        last, last_change = -1, time.monotonic()
        end = time.monotonic() + ctx.deadline(n, rate=20)
        while True:
            started = r.hlen(SPIN_START_KEY)
            if started != last:
                last, last_change = started, time.monotonic()
            if started >= n or (started > 0 and time.monotonic() - last_change > 5.0):
                break
            handle.check()
            if time.monotonic() > end:
                raise Deadline("spinning tasks did not start (%d/%d)" % (started, n))
            time.sleep(0.02)
        running = {k.decode() for k in r.hkeys(SPIN_START_KEY)}
        p.cancel_batch(bid)
        t0 = time.time()
        try:
            wait_until(lambda: len(running & {k.decode() for k in r.hkeys(SPIN_END_KEY)}) >= len(running),
                       timeout=40, what="cancelled tasks to leave", interval=0.02, check=handle.check)
        except Deadline:
            pass  # report what left; the rest count as not cancelled
        ends = {k.decode(): float(v) for k, v in r.hgetall(SPIN_END_KEY).items()}
        lat = [(ends[s] - t0) * 1000 for s in running if s in ends]
        # a task that ran to its natural end (30 s) or never left was not cancelled
        not_cancelled = len(running) - sum(1 for x in lat if x < 25_000)
        # percentiles over all running tasks; one that never left counts as the 40 s wait
        full = lat + [40_000.0] * (len(running) - len(lat))
        return {"p50": percentile(full, 50), "p99": percentile(full, 99),
                "running": len(running), "enqueued": n, "left": len(lat), "not_cancelled": not_cancelled,
                "threads": threads}
    finally:
        stop_workers(handle)


def measure_pause(ctx):
    """Pause latency: under a steady stream of tasks, pause(); latency = latest
    task start time recorded minus the moment pause() returned (0 if nothing
    started after it). p99 over the trials; resume() between trials."""
    p = _p()
    if not hasattr(p, "pause") or not hasattr(p, "resume"):
        raise Pending("TaskProcessor.pause/resume not implemented yet")
    trials = ctx.counts["pause_trials"]
    r = _base.bench_redis()
    handle = start_workers(2, 8)
    stop = threading.Event()
    seq = [0]
    errors = []

    def stream():
        try:
            prod = make_processor()
            rnd = random.Random(7)
            while not stop.is_set():
                prod.enqueue_task(QUEUE, KIND, tasks.record_start, seq[0])
                seq[0] += 1
                time.sleep(rnd.uniform(0.002, 0.008))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=stream, daemon=True)
    try:
        ctx.warm_up(handle)
        th.start()
        lats, flowing = [], []
        for _ in range(trials):
            time.sleep(0.7)
            handle.check()
            if errors:
                raise errors[0]
            before = time.time()
            p.pause()
            t0 = time.time()
            time.sleep(1.0)
            starts = [float(v) for v in r.hvals(START_KEY)]
            # sanity: the stream was really being processed right before pause()
            flowing.append(sum(1 for s in starts if before - 0.5 <= s < before))
            latest = max(starts) if starts else t0
            lats.append(max(0.0, latest - t0) * 1000)
            p.resume()
        if min(flowing) == 0:
            raise RuntimeError("no task started in the 0.5 s before pause() in some trial (%s): "
                               "the stream was not flowing" % flowing)
        return {"p99": percentile(lats, 99), "p50": percentile(lats, 50), "trials": len(lats),
                "min_started_in_last_0.5s": min(flowing), "raw_ms": [round(x, 3) for x in lats]}
    finally:
        stop.set()
        th.join(timeout=5)
        stop_workers(handle)


def extra_measurements():
    return {"cancel_latency": measure_cancel, "pause_latency": measure_pause}
