"""Redis Cluster faults under load: a graceful CLUSTER FAILOVER, the prefix's slot migrated to
another master, and CLUSTERDOWN (two of three masters killed). A worker manager (a real
process) and a producer thread run through each; afterwards every acknowledged task has run
exactly once and coretask's counters reconcile (tests/faults/workload.py).

They do not depend on ``--server``: they start a 6-node cluster of their own (appendonly, so
that killed masters come back with their data), which they fail over, reshard and break; the
tasks record their runs in the session's server, which stays whole. CI runs them once, in the
Redis 7 run. The tests share the cluster and leave it settled (RedisCluster.wait_settled) for
the next one.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from coretask import StoreUnavailable
from coretask.embedded.servers import RedisCluster, RedisServer, find_server_binary
from tests import tasks_faults as tf
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts
from tests.faults.workload import Producer, reconcile

# leases far longer than any fault below: a task may run twice only through a bug
LEASES = dict(invisibility=30.0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(binary=find_server_binary("redis7"), extra_args=["--appendonly", "yes"]) as started:
        yield started


@pytest.fixture
def deployment(cluster: RedisCluster, processor_on: Any, faults_manager: Any, prefix: str) -> Any:
    """``deployment(**options)``: (producer processor, manager, its worker pids) on the test's
    prefix, once the cluster is settled. Their URL names the master of the prefix's slot: the
    cluster client learns the other nodes from that one node, so it must be up whenever a
    process starts (a worker process that starts while it is down cannot connect)."""
    cluster.wait_settled()

    def make(**opts: Any) -> tuple[Any, Any, set[int]]:
        options = dict(LEASES, cluster=True, **opts)
        url = cluster.master_for_key(prefix).url
        p = processor_on(url, **options)
        manager = faults_manager(url, processes=1, threads=4, **options)
        return p, manager, {c.pid for c in manager.wait_children(1)}

    return make


def serving(producer: Producer, r: Any) -> None:
    """Until the producer has 60 more tasks acknowledged and the worker runs them (its process
    is connected: what the test then does to the cluster happens to a running deployment)."""
    producer.wait_acked(60)
    wait_until(lambda: len(hash_counts(r, producer.key + ":finished")) >= 30, 20, "the worker to run tasks")


# ---------------------------------------------------------------------------------- topology

def admin(node: RedisServer) -> redis.Redis:
    return node.client(socket_timeout=10)


def nodes_table(node: RedisServer) -> list[list[str]]:
    with admin(node) as c:
        return [line.split() for line in c.execute_command("CLUSTER", "NODES").decode().splitlines()]


def node_id(node: RedisServer) -> str:
    return next(f[0] for f in nodes_table(node) if "myself" in f[2])


def by_port(cluster: RedisCluster, address: str) -> RedisServer:
    port = int(address.split("@")[0].rsplit(":", 1)[1])
    return next(n for n in cluster.nodes if n.port == port)


def replica_of(cluster: RedisCluster, master: RedisServer) -> RedisServer:
    mid = node_id(master)
    return next(by_port(cluster, f[1]) for f in nodes_table(master) if "slave" in f[2] and f[3] == mid)


def masters(cluster: RedisCluster) -> list[RedisServer]:
    """The masters that serve slots, as the first running node sees them."""
    alive = next(n for n in cluster.nodes if n.running)
    return [by_port(cluster, f[1]) for f in nodes_table(alive) if "master" in f[2] and len(f) > 8]


def refusal_counts(nodes: list[RedisServer]) -> int:
    """TRYAGAIN and ASK replies the nodes have sent (INFO errorstats)."""
    total = 0
    for node in nodes:
        with admin(node) as c:
            stats = c.info("errorstats")
        total += sum(int(stats.get(f"errorstat_{code}", {}).get("count", 0)) for code in ("TRYAGAIN", "ASK"))
    return total


def migrate_slot(cluster: RedisCluster, slot: int, source: RedisServer, target: RedisServer,
                 steps: int = 12, pause: float = 0.1) -> int:
    """Move ``slot`` from source to target as redis-cli --cluster reshard does, in about
    ``steps`` MIGRATE calls with a pause between (so that the workload runs into a migration in
    progress, ~1.2 s, however many keys the slot holds: well within busy_timeout); returns how
    many keys moved."""
    src_id, tgt_id = node_id(source), node_id(target)
    moved = 0
    with admin(source) as src, admin(target) as tgt:
        tgt.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", tgt_id)
        batch = max(1, -(-int(src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) // steps))
        while True:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)       # pacing the migration, not waiting for anything
        for node in [target, source, *(m for m in masters(cluster) if m.port not in (source.port, target.port))]:
            with admin(node) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", tgt_id)
    return moved


def role(node: RedisServer) -> str:
    with admin(node) as c:
        return str(c.info("replication")["role"])


def settle(p: Any, r: Any, producer: Producer, manager: Any, pids: set[int]) -> set[str]:
    """Then: every acknowledged task ran exactly once, the counters reconcile, the same worker
    process carried on. Returns the tags that ran."""
    producer.stop()
    result = reconcile(p, r, producer, timeout=40)
    assert manager.proc.poll() is None and {c.pid for c in manager.children()} == pids
    assert "Traceback" not in manager.log(), manager.log()[-3000:]
    return set(result.runs)


# ---------------------------------------------------------------------------------- failover

def test_graceful_failover_under_load_every_task_runs_exactly_once(cluster, deployment, r, prefix):
    # Given a manager and a producer under load on the prefix's master
    p, manager, pids = deployment()
    owner = cluster.master_for_key(prefix)
    replica = replica_of(cluster, owner)
    producer = Producer(p, prefix + ":failover").start()
    serving(producer, r)

    # When its replica takes over with CLUSTER FAILOVER (the master stops writes, the replica
    # catches up and is promoted: nothing acknowledged is lost)
    with admin(replica) as c:
        c.execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: role(replica) == "master", 15, "the replica to be promoted")
    cluster.wait_settled()
    assert cluster.master_for_key(prefix).port == replica.port

    # Then the same producer and workers carry on (MOVED, NOSCRIPT on the new master: all
    # transparent): no enqueue failed, every task ran exactly once, the counters reconcile
    producer.wait_acked(60)
    settle(p, r, producer, manager, pids)
    assert not producer.failed, {t: str(e)[:300] for t, e in list(producer.failed.items())[:3]}


# ------------------------------------------------------------------------------ migration

def test_slot_migrated_under_load_calls_wait_it_out_and_every_task_runs_exactly_once(cluster, deployment, r, prefix):
    # Given a manager and a producer under load
    p, manager, pids = deployment()
    source = cluster.master_for_key(prefix)
    target = next(m for m in masters(cluster) if m.port != source.port)
    slot = p.gateway.transport.redis.keyslot(prefix)
    refusals_before = refusal_counts([source, target])
    producer = Producer(p, prefix + ":migration").start()
    serving(producer, r)

    # When the prefix's slot (all of its keys: one hash tag) is migrated to another master, a
    # few keys at a time (scripts meet ASK and TRYAGAIN meanwhile: the migration guard makes
    # every call wait, and the transport retries within busy_timeout)
    began = time.monotonic()
    moved = migrate_slot(cluster, slot, source, target)
    took = time.monotonic() - began
    print(f"slot {slot}: {moved} keys migrated in {took:.2f} s under load")
    assert took < 4, f"the migration took {took:.1f} s: the test means it to end within busy_timeout (5 s)"
    cluster.wait_settled()
    assert cluster.master_for_key(prefix).port == target.port and moved > 10, moved
    assert refusal_counts([source, target]) > refusals_before, "no call met the migration"

    # Then no enqueue failed, every task ran exactly once, the counters reconcile
    producer.wait_acked(60)
    settle(p, r, producer, manager, pids)
    assert not producer.failed, {t: str(e)[:300] for t, e in list(producer.failed.items())[:3]}


# ---------------------------------------------------------------------------- CLUSTERDOWN

def test_clusterdown_producers_get_a_clear_error_and_everything_recovers(cluster, deployment, r, prefix):
    # Given a manager and a producer under load (busy_timeout 1.5 s)
    patience = 1.5
    p, manager, pids = deployment(busy_timeout=patience)
    owner = cluster.master_for_key(prefix)
    others = [m for m in masters(cluster) if m.port != owner.port]
    assert len(others) == 2
    producer = Producer(p, prefix + ":down").start()
    serving(producer, r)

    # When the two other masters are killed: the prefix's master cannot reach a majority of the
    # masters, nor can their replicas win an election, and the cluster answers CLUSTERDOWN
    for node in others:
        node.kill()
    try:
        wait_until(lambda: any(getattr(e, "reason", "") == "clusterdown" for e in producer.failed.values()),
                   30, "the producer to meet CLUSTERDOWN")
        # Then an enqueue raises StoreUnavailable naming the reason and what to do, within its
        # busy_timeout (plus one attempt), not a hang nor redis-py's exception; a read too
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            p.enqueue_task("default", "acme", tf.run, producer.key, "direct", 0.0)
        took = time.monotonic() - began
        assert info.value.reason == "clusterdown" and took < patience + 3, (took, info.value)
        text = str(info.value)
        assert "CLUSTERDOWN" in text and "restart the failed masters" in text and "busy_timeout" in text, text
        with pytest.raises(StoreUnavailable) as info:
            p.get_queue("default")
        assert info.value.reason in ("clusterdown", "unreachable"), info.value
    finally:
        # When the masters come back
        for node in others:
            node.restart()
    cluster.wait_settled(40)

    # Then the same producer and workers work again; every acknowledged task ran exactly once,
    # none refused ran, the counters reconcile
    producer.wait_acked(60, timeout=30)
    ran = settle(p, r, producer, manager, pids)
    reasons = {getattr(e, "reason", type(e).__name__) for e in producer.failed.values()}
    assert reasons <= {"clusterdown", "unreachable"}, reasons
    refused = {t for t, e in producer.failed.items() if getattr(e, "reason", "") == "clusterdown"}
    assert refused and not refused & ran and "direct" not in hash_counts(r, producer.key + ":finished")
