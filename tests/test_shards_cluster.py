"""Shards on a Redis Cluster of 3 masters and 3 replicas: each shard's slot is served by another
master (read back with CLUSTER KEYSLOT and CLUSTER NODES), and when one master dies the tenants
of the other shards keep completing tasks while its replica takes over.

Like the cluster fault tests, these start a cluster of their own whatever ``--server`` says (the
tasks record their runs in the session's server, which stays whole); CI runs them once, in the
Redis 7 run.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from collections.abc import Iterator
from typing import Any

import pytest

from coretask import CoreTaskError, TaskProcessor
from coretask.embedded.servers import RedisCluster, RedisServer, find_server_binary
from coretask.gateway.shards import shard_of_id
from tests import tasks
from tests.conftest import wait_until

PLACED = {"acme": 0, "globex": 1, "initech": 2}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(binary=find_server_binary("redis7"), extra_args=["--appendonly", "yes"]) as started:
        yield started


@pytest.fixture
def sharded(cluster: RedisCluster, processor_on: Any) -> TaskProcessor:
    cluster.wait_settled()
    return processor_on(cluster.url, cluster=True, shards=3, shard_map=PLACED, busy_timeout=10.0)


def owner(cluster: RedisCluster, key: str) -> RedisServer:
    """The master serving ``key``'s slot, from CLUSTER KEYSLOT and CLUSTER NODES."""
    return cluster.master_for_key(key)


def test_each_shard_is_served_by_another_master(cluster, sharded):
    p = sharded
    masters = [owner(cluster, prefix) for prefix in p.gateway.prefixes]
    assert len({m.port for m in masters}) == 3
    with cluster.nodes[0].client(decode_responses=True) as c:
        slots = [int(c.execute_command("CLUSTER", "KEYSLOT", f"{prefix}:queues")) for prefix in p.gateway.prefixes]
    assert len(set(s * 3 // 16384 for s in slots)) == 3          # one slot range (one master) each
    # and a tenant's task is stored on its shard's master, not on the others
    for tenant, shard in PLACED.items():
        task_id = p.enqueue_task("default", tenant, tasks.record, "unused", 1, delay_until=timedelta(hours=1))
        assert shard_of_id(task_id, 3) == shard
        holders = [m.port for m in masters if _has(m, f"{p.gateway.prefixes[shard]}:t:{task_id}")]
        assert holders == [masters[shard].port]


def _has(node: RedisServer, key: str) -> bool:
    with node.client() as c:
        try:
            return bool(c.exists(key))
        except Exception:           # MOVED: the key is not this node's
            return False


def test_batches_final_states_and_fairness_hold_on_three_masters(cluster, processor_on, embedded_worker, r, prefix):
    from itertools import pairwise

    from tests import tasks_tenancy as tt

    cluster.wait_settled()
    # Two tenants share shard 1; a third is alone on shard 2; one single-threaded worker
    p = processor_on(cluster.url, cluster=True, shards=3, max_workers=1, result_ttl=600,
                     shard_map={"big": 1, "small": 1, "solo": 2})
    key = prefix + ":order"
    big = p.enqueue_batch("default", "big", lambda b: [b.enqueue(tt.step, key, f"big{i}") for i in range(200)])
    solo = p.enqueue_batch("default", "solo", lambda b: [b.enqueue(tt.step, key, f"solo{i}") for i in range(50)]
                           + [b.enqueue(tasks.always_fail, "planned", retries=1)])
    embedded_worker(p)
    wait_until(lambda: r.llen(key) >= 20, 30, "the backlog under way")
    # When the second tenant of shard 1 enqueues behind the first one's backlog
    mark = r.llen(key)
    small = [p.enqueue_task("default", "small", tt.step, key, f"small{i}") for i in range(10)]
    wait_until(lambda: p.get_batch(big).state != "running" and p.get_batch(solo).state != "running", 60,
               "both batches finished")
    wait_until(lambda: r.llen(key) == 260, 20, "every task")
    # Then within shard 1 its tasks ran in turn with the backlog's, not after it
    order = [v.decode() for v in r.lrange(key, 0, -1)]
    at = [i for i, name in enumerate(order) if name.startswith("small")]
    assert at[0] <= mark + 6 and all(y - x <= 6 for x, y in pairwise(at)), (mark, at)
    # and each task reached exactly one final state, the batches' counts reconcile
    assert len(order) == len(set(order))
    b, s = p.get_batch(big), p.get_batch(solo)
    assert (b.state, b.total, b.done, b.failed, b.canceled, b.remaining) == ("succeeded", 200, 200, 0, 0, 0)
    assert (s.state, s.total, s.done, s.failed, s.remaining) == ("failed", 51, 50, 1, 0)
    assert {p.get_task(t).state for t in small} == {"succeeded"}
    assert p.get_tenant_stats("big").done + p.get_tenant_stats("small").done == 210


class Feeder:
    """One thread per tenant enqueueing a task every ``interval`` seconds; each task records when
    it started in the session's server (``<key>:<tenant>``). Enqueues refused while a shard is
    down are counted, not raised."""

    def __init__(self, p: TaskProcessor, key: str, interval: float = 0.02) -> None:
        self.p, self.key, self.interval = p, key, interval
        self.acked: dict[str, list[str]] = {t: [] for t in PLACED}
        self.refused: dict[str, int] = {t: 0 for t in PLACED}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in PLACED]

    def _run(self, tenant: str) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.p.enqueue_task("default", tenant, tasks.record_start, f"{self.key}:{tenant}", f"{tenant}-{i}")
                self.acked[tenant].append(f"{tenant}-{i}")
            except CoreTaskError:
                self.refused[tenant] += 1
            i += 1
            self.stop.wait(self.interval)

    def __enter__(self) -> Feeder:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def starts(r: Any, key: str) -> list[tuple[str, float]]:
    rows = [v.decode().rsplit(":", 1) for v in r.lrange(key, 0, -1)]
    return [(tag, float(at)) for tag, at in rows]


def longest_gap(times: list[float], start: float, end: float) -> float:
    inside = sorted(t for t in times if start <= t <= end)
    edges = [start, *inside, end]
    return max(b - a for a, b in zip(edges, edges[1:]))


def test_a_master_failing_over_stops_only_its_own_shard(cluster, sharded, embedded_worker, r, prefix):
    p = sharded
    key = prefix + ":starts"
    victim = owner(cluster, p.gateway.prefixes[1])           # serves globex's shard
    embedded_worker(p)
    with Feeder(p, key) as feed:
        wait_until(lambda: all(r.llen(f"{key}:{t}") >= 20 for t in PLACED), 20, "every tenant's tasks running")
        # When shard 1's master dies (kill -9) and its replica takes over
        killed_at = time.time()
        victim.kill()
        wait_until(lambda: feed.refused["globex"] > 0, 20, "enqueues to the dead shard refused")
        wait_until(lambda: owner(cluster, p.gateway.prefixes[1]).port != victim.port, 30, "the replica promoted")
        promoted_at = time.time()
        wait_until(lambda: any(at > promoted_at for _, at in starts(r, f"{key}:globex")), 30,
                   "globex's tasks running again")
        settled_at = time.time()
    # Then the other shards' tenants kept completing tasks throughout: no gap longer than the
    # time the cluster takes to mark the node failed (cluster-node-timeout 2 s)
    for tenant in ("acme", "initech"):
        gap = longest_gap([at for _, at in starts(r, f"{key}:{tenant}")], killed_at, settled_at)
        assert gap < 2.5, (tenant, gap, settled_at - killed_at)
        assert feed.refused[tenant] == 0
    # and every acknowledged task of theirs ran exactly once
    for tenant in ("acme", "initech"):
        wait_until(lambda t=tenant: {tag for tag, _ in starts(r, f"{key}:{t}")} >= set(feed.acked[t]), 30,
                   f"every acknowledged {tenant} task")
        tags = [tag for tag, _ in starts(r, f"{key}:{tenant}")]
        assert len(tags) == len(set(tags))
    victim.restart()                 # back as a replica, for the next test
    cluster.wait_settled()
