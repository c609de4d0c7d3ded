"""A CPU-bound job spread over worker processes: count primes in ranges, in parallel.

    python -m examples.cpu_batch [--processes 2]

Starts a worker manager (one thread per process, since the work holds the GIL), enqueues one
batch, and waits for it; the continuation adds the partial counts up.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import redis

from coretask import Options, TaskContext, TaskProcessor

from ._server import redis_url

PREFIX = "{example-cpu}"


def _processor() -> TaskProcessor | None:
    url = os.environ.get("CORETASK_REDIS_URL")
    return TaskProcessor(Options(redis=url, prefix=PREFIX, max_workers=1)) if url else None


processor = _processor()


def count_primes(lo: int, hi: int, ctx: TaskContext) -> None:
    n = sum(1 for k in range(max(lo, 2), hi) if all(k % d for d in range(2, int(k ** 0.5) + 1)))
    redis.Redis.from_url(os.environ["CORETASK_REDIS_URL"]).hset(f"{PREFIX}:parts:{ctx.batch_id}", f"{lo}", n)


def add_up(ctx: TaskContext) -> None:
    """The continuation: its context names the batch it continues."""
    batch_id = ctx.batch_id
    r = redis.Redis.from_url(os.environ["CORETASK_REDIS_URL"])
    r.set(f"{PREFIX}:total:{batch_id}", sum(int(v) for v in r.hvals(f"{PREFIX}:parts:{batch_id}")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--limit", type=int, default=400_000)
    args = ap.parse_args(argv)
    with redis_url() as url:
        p = TaskProcessor(Options(redis=url, prefix=PREFIX))
        step = args.limit // 40
        worker = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "examples.cpu_batch:processor",
                                   "--processes", str(args.processes), "--threads", "1", "--log-level", "WARNING"])
        try:
            t0 = time.monotonic()
            with p.batch("default", "me", scope="count primes") as b:
                for lo in range(0, args.limit, step):
                    b.enqueue(count_primes, lo, lo + step)
                b.continue_with(add_up)
            assert b.id is not None
            info = p.wait_for_batch(b.id, timeout=300)
            r = redis.Redis.from_url(url)
            deadline = time.monotonic() + 30
            while r.get(f"{PREFIX}:total:{b.id}") is None and time.monotonic() < deadline:
                time.sleep(0.05)
            total = r.get(f"{PREFIX}:total:{b.id}")
            assert info.started and info.ended
            busy = (info.ended - info.started).total_seconds()
            print(f"{int(total or 0)} primes below {args.limit}: {info.total} tasks in {time.monotonic() - t0:.2f}s "
                  f"(worker start-up included); first start to last end {busy:.2f}s for {info.duration:.2f}s of "
                  f"task time on {args.processes} processes (x{info.duration / busy:.2f} parallelism)")
            return 0 if total is not None else 1
        finally:
            worker.terminate()
            worker.wait(60)


if __name__ == "__main__":
    from examples import cpu_batch

    raise SystemExit(cpu_batch.main())
