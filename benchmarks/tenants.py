"""Fetch cost of fair queues versus the number of tenants and of queued tasks.

    python -m benchmarks.tenants [--runs 3] [--fetch 5000]

Starts its own redis-server (the Redis 7 binary coretask.embedded.servers finds; never the machine's
Redis), fills one queue for each scenario, then calls the fetch script directly with a fake
worker id in a loop, one task per call, as a worker with one free thread does. Two figures per
scenario, each the median of the runs:

* Redis-side: EVALSHA microseconds per fetched task, from INFO commandstats (server CPU only);
* Python-side: fetched tasks per second, round trip included.

DESIGN.md section 6 promises O(1) per fetch: one LINDEX/LPOP/LMOVE on the ring of tenants plus
the tenant's own list. The figures should not depend on the scenario.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import uuid

from coretask import Options, TaskData, TaskProcessor
from coretask.embedded.servers import RedisServer, find_server_binary
from coretask.encoding import encode

QUEUE = "default"
SCENARIOS = [  # label, tenants, tasks per tenant
    ("10 tenants x 5 tasks", 10, 5),
    ("10 tenants x 5,000 tasks", 10, 5_000),
    ("10,000 tenants x 5 tasks", 10_000, 5),
]


def fill(p: TaskProcessor, tenants: int, per_tenant: int) -> int:
    """Enqueue per_tenant tasks for each tenant through the gateway; the tenants' tasks are
    interleaved, as independent producers would write them."""
    enc = encode(TaskData("bench", b"x"), p.producer.serializer, p.options.max_payload_bytes)
    total = 0
    for _ in range(per_tenant):
        for t in range(tenants):
            p.gateway.enqueue(uuid.uuid4().hex, QUEUE, f"tenant-{t:05d}", enc.payload, enc.serializer, enc.target,
                              0, 0, "")
            total += 1
    return total


def evalsha_stats(p: TaskProcessor) -> tuple[int, int]:
    s = p.gateway.transport.redis.info("commandstats").get("cmdstat_evalsha", {})
    return int(s.get("calls", 0)), int(s.get("usec", 0))


def measure(p: TaskProcessor, want: int) -> tuple[int, float, float]:
    """Fetch up to ``want`` tasks one per call; returns (fetched, redis usec/task, tasks/s)."""
    worker = "bench-" + uuid.uuid4().hex[:6]
    p.gateway.fetch(worker, 0, 600_000, 0, [QUEUE])     # load the script
    calls0, usec0 = evalsha_stats(p)
    fetched = 0
    start = time.perf_counter()
    while fetched < want:
        got = len(p.gateway.fetch(worker, 1, 600_000, 0, [QUEUE]).tasks)
        if not got:
            break
        fetched += got
    elapsed = time.perf_counter() - start
    calls1, usec1 = evalsha_stats(p)
    assert calls1 - calls0 == fetched + (1 if fetched < want else 0), "another client used the server"
    return fetched, (usec1 - usec0) / max(fetched, 1), fetched / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tenants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario; the median is shown")
    ap.add_argument("--fetch", type=int, default=5_000, help="tasks fetched per run (at most all queued)")
    a = ap.parse_args(argv)
    server = RedisServer(binary=find_server_binary("redis7")).start()
    try:
        p = TaskProcessor(Options(redis=server.url, prefix="{bench}", queues=[QUEUE]))
        client = server.client()
        version = client.info("server")["redis_version"]
        results: dict[str, list[tuple[int, int, float, float]]] = {label: [] for label, _, _ in SCENARIOS}
        for run in range(a.runs):   # scenarios interleaved, so that a busy machine slows all alike
            for label, tenants, per_tenant in SCENARIOS:
                client.flushall()
                queued = fill(p, tenants, per_tenant)
                gc.collect()
                fetched, usec, rate = measure(p, min(a.fetch, queued))
                assert fetched == min(a.fetch, queued), (fetched, queued)
                results[label].append((queued, fetched, usec, rate))
            print(f"  run {run + 1} of {a.runs} done", flush=True)
        rows = [(label, r[0][0], r[0][1], statistics.median(x[2] for x in r), statistics.median(x[3] for x in r))
                for label, r in results.items()]
        print(f"\nfetch cost per task, one task per call, median of {a.runs} runs (redis {version})\n")
        head = ("scenario", "queued", "fetched", "redis us/task", "python tasks/s")
        print(f"{head[0]:<26}{head[1]:>9}{head[2]:>9}{head[3]:>15}{head[4]:>16}")
        for label, queued, fetched, usec, rate in rows:
            print(f"{label:<26}{queued:>9,}{fetched:>9,}{usec:>15.1f}{rate:>16,.0f}")
        p.close()
        client.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
