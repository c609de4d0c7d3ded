"""Redis work per task: server CPU and commands for each enqueued and each processed no-op task.

    python -m benchmarks.redis_cost [--tasks 20000] [--runs 3] [--processes 1] [--threads 8] [--options JSON]

What one Redis master can sustain is its CPU divided by the CPU a task costs it, so this is the
figure that bounds a deployment on one master (issue 16). Measured at the server, so the load
of the machine changes it little: INFO cpu (``used_cpu_sys + used_cpu_user``, the whole server)
and INFO commandstats (every command, a script's inner calls included) before and after each
phase, divided by the tasks:

* enqueue: ``enqueue_task`` one call per task, and ``enqueue_batch`` of all of them;
* process: a real worker manager (``python -m coretask.worker``) runs the tasks; the worker is
  started and idle first, the processor paused while the tasks are enqueued, so the phase
  counts only fetching, running and acknowledging (with the worker's own heartbeats and lease
  renewals during the phase, which are part of what a task costs).

The idle rate (commands and CPU per second of a worker with nothing to do) is shown too. Starts
its own redis-server (the Redis 7 binary coretask.embedded.servers finds; never the machine's
Redis on 6379). Each figure is the median of the runs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import redis

from coretask import Options, TaskProcessor
from coretask.embedded.servers import RedisServer, find_server_binary

QUEUE = "default"
PREFIX = "{cost}"
URL_ENV = "BENCH_COST_REDIS_URL"
OPTIONS_ENV = "BENCH_COST_OPTIONS"     # extra Options as JSON (--options), for producer and worker
ROOT = Path(__file__).resolve().parent.parent


def noop() -> None:
    """The task: nothing, so that everything measured is coretask's."""


def processor() -> TaskProcessor:
    """The worker's app (``--app benchmarks.redis_cost:processor``)."""
    extra = json.loads(os.environ.get(OPTIONS_ENV) or "{}")
    return TaskProcessor(Options(redis=os.environ[URL_ENV], prefix=PREFIX, queues=[QUEUE], **extra))


class Snapshot:
    """Server CPU seconds and per-command call counts at one instant."""

    def __init__(self, r: redis.Redis) -> None:
        cpu = r.info("cpu")
        self.cpu = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
        self.calls = Counter({name[len("cmdstat_"):]: int(v["calls"])
                              for name, v in r.info("commandstats").items()})
        self.at = time.monotonic()

    def minus(self, before: Snapshot) -> tuple[float, Counter[str], float]:
        """(CPU seconds, calls per command, wall seconds) since ``before``, less the two INFO calls."""
        calls = self.calls - before.calls
        calls["info"] -= 2
        return self.cpu - before.cpu, +calls, self.at - before.at


def per_task(cpu: float, calls: Counter[str], n: int) -> dict[str, object]:
    return {"cpu_us": cpu * 1e6 / n, "commands": sum(calls.values()) / n,
            "by_command": {c: k / n for c, k in calls.most_common(16)}}


def run_once(url: str, tasks: int, processes: int, threads: int) -> dict[str, dict[str, object]]:
    r = redis.Redis.from_url(url)
    r.flushall()
    os.environ[URL_ENV] = url
    p = processor()
    noop = importlib.import_module("benchmarks.redis_cost").noop   # by its name, not __main__'s
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    worker = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "benchmarks.redis_cost:processor",
                               "--processes", str(processes), "--threads", str(threads), "--log-level", "WARNING"],
                              cwd=ROOT, env=env, start_new_session=True)
    try:
        _until(lambda: len(p.get_workers()) >= processes, 30, "the worker processes registered")
        time.sleep(1.0)                      # start-up writes settle; then an idle window
        a = Snapshot(r)
        time.sleep(3.0)
        idle_cpu, idle_calls, idle_s = Snapshot(r).minus(a)
        p.pause()
        a = Snapshot(r)
        for _ in range(tasks // 2):
            p.enqueue_task(QUEUE, "t", noop)
        b = Snapshot(r)
        single = b.minus(a)
        p.enqueue_batch(QUEUE, "t", lambda batch: [batch.enqueue(noop) for _ in range(tasks - tasks // 2)])
        c = Snapshot(r)
        batched = c.minus(b)
        p.resume()
        _until(lambda: p.get_tenant_stats("t").done >= tasks, 300, f"{tasks} tasks done")
        process = Snapshot(r).minus(c)
    finally:
        worker.terminate()
        worker.wait(60)
        p.close()
    return {
        "idle per second": {"cpu_us": idle_cpu * 1e6 / idle_s, "commands": sum(idle_calls.values()) / idle_s,
                            "by_command": {c: k / idle_s for c, k in idle_calls.most_common(16)}},
        "enqueue_task": per_task(single[0], single[1], tasks // 2),
        "enqueue_batch": per_task(batched[0], batched[1], tasks - tasks // 2),
        "process": {**per_task(process[0], process[1], tasks), "tasks_per_s": tasks / process[2]},
    }


def _until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.redis_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--options", metavar="JSON", default="",
                    help='extra Options for producer and worker, e.g. \'{"result_ttl": 60}\'')
    a = ap.parse_args(argv)
    os.environ[OPTIONS_ENV] = a.options
    server = RedisServer(binary=find_server_binary("redis7")).start()
    try:
        runs = [run_once(server.url, a.tasks, a.processes, a.threads) for _ in range(a.runs)]
    finally:
        server.stop()
    print(f"Redis work per task, median of {a.runs} runs of {a.tasks:,} no-op tasks "
          f"(worker: {a.processes} process(es) x {a.threads} threads; options {a.options or 'default'}; "
          f"load1 {os.getloadavg()[0]:.2f})")
    print(f"{'phase':<18}{'CPU us':>9}{'commands':>10}   by command (median run)")
    for phase in runs[0]:
        cpu = statistics.median(r[phase]["cpu_us"] for r in runs)  # type: ignore[misc]
        cmds = statistics.median(r[phase]["commands"] for r in runs)  # type: ignore[misc]
        mid = sorted(runs, key=lambda r: r[phase]["commands"])[len(runs) // 2][phase]  # type: ignore[index]
        top = ", ".join(f"{c} {k:.2f}" for c, k in mid["by_command"].items())  # type: ignore[union-attr]
        extra = f"   ({statistics.median(r[phase]['tasks_per_s'] for r in runs):,.0f} tasks/s)" \
            if phase == "process" else ""  # type: ignore[misc]
        print(f"{phase:<18}{cpu:>9.1f}{cmds:>10.2f}   {top}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
