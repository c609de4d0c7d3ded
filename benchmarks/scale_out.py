"""Scale-out: each Redis Cluster master's CPU per task with one shard and with three.

    python -m benchmarks.scale_out [--tasks 30000] [--runs 3] [--processes 2] [--threads 8]

Starts a cluster of its own (3 masters, 3 replicas, the Redis 7 binary coretask.embedded.servers
finds; never the machine's Redis on 6379) and runs the same workload on it with
``Options(shards=1)`` and ``Options(shards=3)``: 30 tenants (placed round-robin on the shards
with shard_map), their no-op tasks enqueued while the deployment is paused, then a real worker
manager (``python -m coretask.worker``) runs them all. Measured at each master, before and
after the processing phase: INFO cpu (``used_cpu_sys + used_cpu_user``) and INFO commandstats
(every command, a script's inner calls included), divided by the tasks; the wall time gives the
rate, and each master's CPU over the wall time how busy it was. Figures are medians of the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.redis_cost import Snapshot, _until, noop
from coretask import Options, TaskProcessor
from coretask.embedded.servers import RedisCluster, RedisServer, find_server_binary

QUEUE = "default"
PREFIX = "{scale}"
TENANTS = 30
ENV = "BENCH_SCALE"          # JSON: url and shards, for producer and worker
ROOT = Path(__file__).resolve().parent.parent


def _options(url: str, shards: int) -> Options:
    placed = {f"t{i}": i % shards for i in range(TENANTS)} if shards > 1 else None
    return Options(redis=url, cluster=True, prefix=PREFIX, queues=[QUEUE], shards=shards, shard_map=placed)


def processor() -> TaskProcessor:
    """The worker's app (``--app benchmarks.scale_out:processor``)."""
    cfg = json.loads(os.environ[ENV])
    return TaskProcessor(_options(cfg["url"], cfg["shards"]))


def masters(cluster: RedisCluster) -> list[RedisServer]:
    out = []
    for node in cluster.nodes:
        with node.client() as c:
            if c.info("replication")["role"] == "master":
                out.append(node)
    return sorted(out, key=lambda n: n.port)


def run_once(cluster: RedisCluster, shards: int, tasks: int, processes: int, threads: int) -> dict[str, object]:
    nodes = masters(cluster)
    clients = [n.client() for n in nodes]
    for c in clients:
        c.flushall()
    os.environ[ENV] = json.dumps({"url": cluster.url, "shards": shards})
    p = processor()
    p.pause()
    per = tasks // TENANTS
    for i in range(TENANTS):
        p.enqueue_batch(QUEUE, f"t{i}", lambda b: [b.enqueue(noop) for _ in range(per)])
    total = per * TENANTS
    worker = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "benchmarks.scale_out:processor",
                               "--processes", str(processes), "--threads", str(threads), "--log-level", "WARNING"],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    try:
        _until(lambda: len(p.get_workers()) >= processes, 30, "the worker processes registered")
        time.sleep(1.0)
        before = [Snapshot(c) for c in clients]
        p.resume()
        _until(lambda: sum(p.get_tenant_stats(f"t{i}").done for i in range(TENANTS)) >= total, 600,
               f"{total} tasks done")
        after = [Snapshot(c) for c in clients]
    finally:
        worker.terminate()
        worker.wait(60)
        p.close()
        for c in clients:
            c.close()
    deltas = [a.minus(b) for a, b in zip(after, before)]
    wall = max(d[2] for d in deltas)
    return {
        "tasks_per_s": total / wall,
        "cpu_us": [d[0] * 1e6 / total for d in deltas],
        "commands": [sum(d[1].values()) / total for d in deltas],
        "busy": [d[0] / wall for d in deltas],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=30_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args(argv)
    results: dict[int, list[dict[str, object]]] = {1: [], 3: []}
    with RedisCluster(binary=find_server_binary("redis7")) as cluster:
        for _ in range(a.runs):              # alternate, so that drift hits both alike
            for shards in (1, 3):
                results[shards].append(run_once(cluster, shards, a.tasks, a.processes, a.threads))
    print(f"Scale-out on a 3-master cluster, median of {a.runs} runs of {a.tasks:,} no-op tasks of {TENANTS} tenants "
          f"(worker: {a.processes} processes x {a.threads} threads; load1 {os.getloadavg()[0]:.2f})")
    print(f"{'shards':<8}{'tasks/s':>9}   {'CPU us per task, each master':<34}{'commands per task':<26}busy")
    for shards, runs in results.items():
        def med(key: str, i: int) -> float:
            return statistics.median(r[key][i] for r in runs)  # type: ignore[index]
        rate = statistics.median(r["tasks_per_s"] for r in runs)  # type: ignore[misc]
        cpu = " / ".join(f"{med('cpu_us', i):.1f}" for i in range(3))
        cmds = " / ".join(f"{med('commands', i):.2f}" for i in range(3))
        busy = " / ".join(f"{med('busy', i):.0%}" for i in range(3))
        print(f"{shards:<8}{rate:>9,.0f}   {cpu:<34}{cmds:<26}{busy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
