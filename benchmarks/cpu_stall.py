"""CPU-bound work under bursty load: where a slow run loses its time (issue 16).

    python -m benchmarks.cpu_stall [--runs 10] [--tasks 400] [--ms 20] [--load bursty|steady|none]
                                   [--options JSON]

Issue 16 saw 400 tasks of 20 ms on ``--processes 2 --threads 1`` take 6.0 and 7.8 s in 2 of 6
runs of the side-by-side harness (ideal 4.1 s), on a machine where other libraries' workers
started and stopped between measurements. A steady competing load did not reproduce it
(docs/benchmarks.md), so this tool models the bursty kind and records where the time goes.

One worker manager (``python -m coretask.worker --processes 2 --threads 1``) stays up for all
runs, against a redis-server of its own. Each run enqueues the tasks as one batch while the
processor is paused, then resumes it; each task spins ``--ms`` of its thread's CPU and records
its process, start and end. Per run: the wall time from resume to the last end, the ideal
(the tasks' summed thread CPU / 2), and for each worker process the tasks it ran, its busy
time and its longest gap between tasks while tasks were still queued. A stall has one of two
signatures: a process with a long gap (it was not given work: a wake-up or a fetch went
wrong), or busy times far above the tasks' CPU (it had work but not the core: the OS
scheduler, other load, SCHED_BATCH).

``--load bursty``: during every run a generator starts a Python process every 50-400 ms that
burns one core for 50-600 ms (about one core busy on average, arriving in bursts, as workers of
other libraries starting, warming up and stopping); ``steady``: one process burning a core all
run; ``none``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from coretask import Options, TaskProcessor
from coretask.embedded.servers import RedisServer, find_server_binary

QUEUE = "default"
PREFIX = "{stall}"
URL_ENV = "BENCH_STALL_REDIS_URL"
OPTIONS_ENV = "BENCH_STALL_OPTIONS"
LOG_KEY = "bench:stall:log"
ROOT = Path(__file__).resolve().parent.parent
BURN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"

_conn: redis.Redis | None = None


def spin(ms: float) -> None:
    """The task: ``ms`` of this thread's CPU, then its pid, start, end and CPU in one RPUSH."""
    global _conn
    if _conn is None:
        _conn = redis.Redis.from_url(os.environ[URL_ENV])
    start, c0 = time.time(), time.thread_time()
    x = 0
    while time.thread_time() - c0 < ms / 1000.0:
        for i in range(500):
            x += i
    _conn.rpush(LOG_KEY, f"{os.getpid()} {start!r} {time.time()!r} {time.thread_time() - c0!r}")


def processor() -> TaskProcessor:
    """The worker's app (``--app benchmarks.cpu_stall:processor``)."""
    extra = json.loads(os.environ.get(OPTIONS_ENV) or "{}")
    return TaskProcessor(Options(redis=os.environ[URL_ENV], prefix=PREFIX, queues=[QUEUE], **extra))


class Load:
    """Competing CPU load on this machine while a run lasts."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.rnd = kind, random.Random(seed)
        self.stop = threading.Event()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        if self.kind != "none":
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        for p in self.procs:
            p.kill()
            p.wait()

    def _burn(self, seconds: float) -> None:
        self.procs.append(subprocess.Popen([sys.executable, "-c", BURN, str(seconds)]))
        self.procs = [p for p in self.procs if p.poll() is None]

    def _run(self) -> None:
        if self.kind == "steady":
            self._burn(3600)
            return
        while not self.stop.wait(self.rnd.uniform(0.05, 0.4)):
            self._burn(self.rnd.uniform(0.05, 0.6))


def run_once(p: TaskProcessor, r: redis.Redis, tasks: int, ms: float, load: str, seed: int) -> dict[str, object]:
    r.delete(LOG_KEY)
    p.pause()
    task = importlib.import_module("benchmarks.cpu_stall").spin     # by its name, not __main__'s
    p.enqueue_batch(QUEUE, "t", lambda b: [b.enqueue(task, ms) for _ in range(tasks)])
    with Load(load, seed):
        t0 = time.time()
        p.resume()
        deadline = time.monotonic() + 120
        while r.llen(LOG_KEY) < tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{r.llen(LOG_KEY)} of {tasks} tasks done after 120 s")
            time.sleep(0.01)
    log = [line.decode().split() for line in r.lrange(LOG_KEY, 0, -1)]
    rows = sorted((float(s), float(e), float(c), pid) for pid, s, e, c in log)
    end = max(e for _, e, _, _ in rows)
    last_start = rows[-1][0]
    per: dict[str, dict[str, float]] = {}
    for pid in sorted({row[3] for row in rows}):
        mine = [row for row in rows if row[3] == pid]
        gaps = [(b[0] - a[1], a[1] - t0) for a, b in zip(mine, mine[1:])]
        first_gap = (mine[0][0] - t0, 0.0)
        # the longest wait for a next task while tasks were still queued (before the last start)
        waits = [g for g in [first_gap, *gaps] if g[1] < last_start - t0]
        per[pid] = {"tasks": len(mine), "busy_s": sum(e - s for s, e, _, _ in mine),
                    "cpu_s": sum(c for _, _, c, _ in mine),
                    "gap_ms": max(waits)[0] * 1000 if waits else 0.0,
                    "gap_at_s": max(waits)[1] if waits else 0.0}
    work = sum(c for _, _, c, _ in rows)
    return {"wall_s": end - t0, "ideal_s": work / 2, "efficiency": work / 2 / (end - t0), "per": per,
            "load1": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_stall", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=400)
    ap.add_argument("--ms", type=float, default=20.0)
    ap.add_argument("--load", choices=("bursty", "steady", "none"), default="bursty")
    ap.add_argument("--options", metavar="JSON", default="",
                    help='extra Options for producer and worker, e.g. \'{"sched_batch": false}\'')
    a = ap.parse_args(argv)
    server = RedisServer(binary=find_server_binary("redis7")).start()
    os.environ[URL_ENV] = server.url
    os.environ[OPTIONS_ENV] = a.options
    r = redis.Redis.from_url(server.url)
    p = processor()
    worker = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "benchmarks.cpu_stall:processor",
                               "--processes", "2", "--threads", "1", "--log-level", "WARNING"],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    results = []
    try:
        deadline = time.monotonic() + 30
        while len(p.get_workers()) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the two worker processes did not register in 30 s")
            time.sleep(0.05)
        run_once(p, r, 20, a.ms, "none", 0)       # warm-up: imports, connections
        print(f"{a.tasks} tasks of {a.ms:g} ms on 2 processes x 1 thread, load {a.load}, "
              f"options {a.options or 'default'}")
        print(f"{'run':>3} {'wall s':>7} {'ideal s':>7} {'eff':>6} {'load1':>5}   per process: tasks, busy s, "
              f"task CPU s, longest wait for work ms (at s)")
        for i in range(a.runs):
            res = run_once(p, r, a.tasks, a.ms, a.load, i)
            results.append(res)
            procs = "; ".join(f"{v['tasks']:.0f}, {v['busy_s']:.2f}, {v['cpu_s']:.2f}, {v['gap_ms']:.0f} "
                              f"({v['gap_at_s']:.2f})" for v in res["per"].values())  # type: ignore[union-attr]
            print(f"{i + 1:>3} {res['wall_s']:>7.2f} {res['ideal_s']:>7.2f} {res['efficiency']:>6.1%} "
                  f"{res['load1']:>5.2f}   {procs}", flush=True)
    finally:
        worker.terminate()
        worker.wait(60)
        p.close()
        server.stop()
    walls = [float(res["wall_s"]) for res in results]  # type: ignore[arg-type]
    effs = [float(res["efficiency"]) for res in results]  # type: ignore[arg-type]
    print(f"wall s: median {statistics.median(walls):.2f}, worst {max(walls):.2f}; "
          f"efficiency: median {statistics.median(effs):.1%}, worst {min(effs):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
