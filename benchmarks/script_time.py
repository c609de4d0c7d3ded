"""Server time of each hot script call, from SLOWLOG: where a task's Redis CPU goes.

    python -m benchmarks.script_time [--calls 300] [--rounds 3] [--batch 8]

``benchmarks.redis_cost`` gives the whole server's CPU per task, which moves by +-20% between
runs on a shared VM. This one times single script calls the way Redis itself does (SLOWLOG
``duration``: the command's execution, without its network I/O), for the calls a busy worker
makes, and reports medians; between two trees or two versions of a script it resolves a few
microseconds. Phases, ``--batch`` (n) tasks of one tenant each:

* ``enqueue``: one ``enqueue_task``;
* ``lease n``: a fetch that leases n ready tasks and acknowledges nothing;
* ``acknowledge n``: a fetch that acknowledges n tasks and leases nothing;
* ``turn n``: a busy worker's turn, n acknowledgements and n leases in one call;
* ``empty``: a fetch with nothing to do (the script's fixed cost: its library prelude, the
  clock, the delayed and pause checks).

Starts its own redis-server (Redis 7 from coretask.embedded.servers; never the machine's 6379).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import redis

from benchmarks.redis_cost import noop
from coretask import Options, TaskProcessor
from coretask.embedded.servers import RedisServer, find_server_binary
from coretask.gateway.gateway import Gateway
from coretask.gateway.records import Ack, FetchReply, Outcomes

QUEUE, TENANT, WORKER = "default", "t", "bench-worker"
LEASE_MS = 60_000
OFF = 10_000_000        # slowlog-log-slower-than that records nothing


class Timer:
    """Collects the SLOWLOG durations of the calls made inside ``timed``; everything else runs
    with the log off, so the preparation is never counted."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        r.config_set("slowlog-max-len", 100_000)
        r.config_set("slowlog-log-slower-than", OFF)

    def timed(self, fn: Callable[[], Any]) -> Any:
        self.r.config_set("slowlog-log-slower-than", 0)
        try:
            return fn()
        finally:
            self.r.config_set("slowlog-log-slower-than", OFF)

    def take(self) -> list[int]:
        """The durations (us) of the script calls logged since the last take."""
        got = [e["duration"] for e in self.r.slowlog_get(100_000)
               if e["command"].split(b" ", 1)[0].upper() in (b"EVALSHA", b"EVAL", b"FCALL")]
        self.r.slowlog_reset()
        return got


def run_round(url: str, calls: int, n: int) -> dict[str, float]:
    """Median server time per call of each phase in one round (a fresh database)."""
    r = redis.Redis.from_url(url)
    r.flushall()
    p = TaskProcessor(Options(redis=url, prefix="{st}", queues=[QUEUE]))
    gw = p.gateway
    assert isinstance(gw, Gateway)
    timer = Timer(r)

    def fill() -> None:
        for _ in range(n):
            p.enqueue_task(QUEUE, TENANT, noop)

    def fetch(acks: list[Ack], want: int) -> FetchReply:
        return gw.exchange(WORKER, Outcomes(acks=acks), want, LEASE_MS, 0, [QUEUE])

    def acks_of(reply: FetchReply) -> list[Ack]:
        assert len(reply.tasks) == n, f"leased {len(reply.tasks)} tasks, expected {n}"
        return [Ack(t.id, t.token, "ok", 1, t.queue, t.tenant) for t in reply.tasks]

    out: dict[str, list[int]] = {}
    try:
        timer.take()
        for _ in range(calls):
            timer.timed(lambda: p.enqueue_task(QUEUE, TENANT, noop))
        out["enqueue"] = timer.take()
        r.flushall()
        pending: list[Ack] = []
        for _ in range(calls):
            fill()
            pending = acks_of(timer.timed(lambda: fetch([], n)))
            out.setdefault(f"lease {n}", []).extend(timer.take())
            timer.timed(lambda: fetch(pending, 0))
            out.setdefault(f"acknowledge {n}", []).extend(timer.take())
        fill()
        pending = acks_of(fetch([], n))
        timer.take()
        for _ in range(calls):
            fill()
            pending = acks_of(timer.timed(lambda: fetch(pending, n)))
        out[f"turn {n}"] = timer.take()
        fetch(pending, 0)
        for _ in range(calls):
            timer.timed(lambda: fetch([], n))
        out["empty"] = timer.take()
        if p.get_tenant_stats(TENANT).done != 2 * calls * n + n:
            raise AssertionError("the acknowledgements did not all count: the measurement is void")
    finally:
        p.close()
    return {phase: statistics.median(v) for phase, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.script_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="tasks per fetch call (a worker's free threads)")
    a = ap.parse_args(argv)
    server = RedisServer(binary=find_server_binary("redis7")).start()
    try:
        rounds = [run_round(server.url, a.calls, a.batch) for _ in range(a.rounds)]
    finally:
        server.stop()
    print(f"Server time per script call (SLOWLOG), median of {a.rounds} rounds of {a.calls} calls; "
          f"{a.batch} tasks per fetch (load1 {os.getloadavg()[0]:.2f})")
    print(f"{'call':<18}{'us/call':>9}{'us/task':>9}   rounds")
    for phase in rounds[0]:
        v = [rd[phase] for rd in rounds]
        per = a.batch if phase.endswith(f" {a.batch}") else 1
        print(f"{phase:<18}{statistics.median(v):>9.1f}{statistics.median(v) / per:>9.1f}   "
              + " / ".join(f"{x:.1f}" for x in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
