"""CPU cost per task of the observability middleware, without Redis: the hooks called exactly as
the producer and the worker's runner call them, on real TaskContext objects.

    python -m benchmarks.observability_cost [--tasks 20000] [--repeats 5]

Each configuration runs in a fresh interpreter (prometheus_client picks its multiprocess mode at
import). Per configuration, ``--repeats`` timings of ``--tasks`` tasks, each task being
``before_enqueue`` + ``after_enqueue`` (producer side; headers written when tracing) and
``before_task`` + ``after_task`` (worker side; ctx.headers read back as the runner does);
the figure is the median of the CPU time (``time.process_time``) per task, in microseconds,
minus that of the empty chain. CPU time, not wall time, so other processes on the machine
disturb it less than a throughput run (they still share caches and cores).

This is the per-task price of the middleware alone; ``python -m benchmarks.compare
--after-options '{"middleware": "prometheus"}'`` measures it end to end with Redis and workers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = ("none", "prometheus", "prometheus-multiprocess", "otel-api", "otel-sdk", "prometheus+otel-sdk")


def _chain(config: str):
    from coretask.middleware import Chain
    middleware = []
    if "prometheus" in config:
        from coretask.contrib.prometheus import PrometheusMiddleware
        middleware.append(PrometheusMiddleware())
    if "otel" in config:
        from coretask.contrib.otel import TracingMiddleware
        if config.endswith("otel-sdk"):
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

            class Drop(SpanExporter):
                def export(self, spans):
                    return SpanExportResult.SUCCESS

            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=1 << 20))
            trace.set_tracer_provider(provider)
        middleware.append(TracingMiddleware())
    return Chain(middleware)


def measure(config: str, tasks: int, repeats: int) -> list[float]:
    """CPU seconds per task, one value per repeat (run in this interpreter)."""
    from coretask.context import TaskContext
    from coretask.encoding import read_headers
    from coretask.middleware import SUCCEEDED, EnqueueMessage

    chain = _chain(config)
    out = []
    for _ in range(repeats):
        started = time.process_time()
        for i in range(tasks):
            task_id = f"{i:032x}"
            message = EnqueueMessage(task_id, "default", f"tenant-{i % 10}", "app.tasks:work")
            if chain.before_enqueue:
                chain.before_enqueue(message)
            if chain.after_enqueue:
                chain.after_enqueue(message)
            ctx = TaskContext(task_id=task_id, queue="default", tenant=message.tenant, target=message.target,
                              attempt=1, retries_left=2, batch_id=None, gateway=None,  # type: ignore[arg-type]
                              enqueued_ms=int(time.time() * 1000), due_ms=int(time.time() * 1000))
            if message.headers:       # what the runner does with a payload that carries them
                ctx.headers = read_headers(b'{"h":' + json.dumps(message.headers).encode() + b',"t":"x"}')
            if chain.before_task:
                chain.before_task(ctx)
            if chain.after_task:
                chain.after_task(ctx, SUCCEEDED, None, None)
        out.append((time.process_time() - started) / tasks)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.observability_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)    # the child's configuration
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.tasks, args.repeats)))
        return 0
    results = {}
    for config in CONFIGS:
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory(prefix="obs-cost-") as d:
            if config == "prometheus-multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = d
            out = subprocess.run([sys.executable, "-m", "benchmarks.observability_cost", "--one", config,
                                  "--tasks", str(args.tasks), "--repeats", str(args.repeats)],
                                 env=env, capture_output=True, text=True, check=True)
        results[config] = statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results["none"]
    print(f"{'configuration':<26}{'us/task':>10}{'overhead us/task':>18}")
    for config, value in results.items():
        print(f"{config:<26}{value * 1e6:>10.2f}{(value - base) * 1e6:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
