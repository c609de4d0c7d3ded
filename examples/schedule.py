"""A cron schedule: a per-second heartbeat (seconds enabled) run by a worker manager.

    python -m examples.schedule [--seconds 5]

Upserts the schedule, starts a worker manager with 2 processes, lets it tick for a few
seconds, and prints one line per run: exactly one run per tick, whatever the number of
processes competing for it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import redis

from coretask import Options, ScheduleData, TaskContext, TaskProcessor

from ._server import redis_url

PREFIX = "{example-schedule}"


def _processor() -> TaskProcessor | None:
    url = os.environ.get("CORETASK_REDIS_URL")
    return TaskProcessor(Options(redis=url, prefix=PREFIX, use_cron_seconds=True)) if url else None


processor = _processor()


def heartbeat(service: str, ctx: TaskContext) -> None:
    redis.Redis.from_url(os.environ["CORETASK_REDIS_URL"]).rpush(f"{PREFIX}:beats", f"{service} {ctx.task_id}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    args = ap.parse_args(argv)
    with redis_url() as url:
        p = TaskProcessor(Options(redis=url, prefix=PREFIX, use_cron_seconds=True))
        r = redis.Redis.from_url(url)
        r.delete(f"{PREFIX}:beats")
        p.upsert_schedule(ScheduleData(id="heartbeat", tenant="ops", queue="default", scope="every second",
                                       cron="* * * * * *", unique=False), heartbeat, "billing")
        worker = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "examples.schedule:processor",
                                   "--processes", "2", "--log-level", "WARNING"])
        try:
            time.sleep(args.seconds)
        finally:
            worker.terminate()
            worker.wait(60)
            p.cancel_schedule("heartbeat", "ops")
        beats = r.lrange(f"{PREFIX}:beats", 0, -1)
        for b in beats:
            print("beat:", b.decode())
        print(f"{len(beats)} runs in {args.seconds:g}s")
        return 0 if beats else 1


if __name__ == "__main__":
    from examples import schedule

    raise SystemExit(schedule.main())
