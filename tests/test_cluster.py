"""Redis Cluster: the hash-tag rule, pub/sub across nodes, failover, and WAIT for replicas.

These tests start clusters of their own from the binary of the server under test (--server
redis62 / valkey8 build their clusters from those binaries; redis7 and cluster use Redis 7), so
every run of the suite covers the cluster code paths. With --server cluster the non-destructive
tests reuse the session's cluster. Every wait polls with a deadline.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
from redis.cluster import ClusterPubSub

from coretask import ConfigurationError, Options, ReplicationError, TaskProcessor
from coretask.embedded.servers import RedisCluster, find_server_binary
from tests.conftest import FAST
from tests.tasks_servers import (
    Manager,
    exercise,
    note,
    note_slow,
    read_notes,
    wait_for_cancel,
    wait_until,
)

# An idle worker of these tests polls only every 5 s: a task that starts sooner was woken by
# pub/sub. (FAST's 0.5 s would hide a lost event.)
IDLE = dict(base_frequency=5.0, pushback_frequency=30.0, cleanup_frequency=60.0, invisibility=30.0,
            shutdown_timeout=5.0)


def new_prefix() -> str:
    return "{ct-" + uuid.uuid4().hex[:10] + "}"


def cluster_binary(config: pytest.Config) -> str:
    kind = config.getoption("--server")
    return find_server_binary("redis7" if kind in ("redis7", "cluster") else kind)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    """The session's cluster under --server cluster, else one of this module's own."""
    if request.config.getoption("--server") == "cluster":
        yield request.getfixturevalue("server").handle
        return
    with RedisCluster(binary=cluster_binary(request.config)) as started:
        yield started


class Processors:
    """TaskProcessors and embedded workers that are always closed and stopped."""

    def __init__(self) -> None:
        self.made: list[TaskProcessor] = []
        self.workers: list[tuple[threading.Event, threading.Thread]] = []

    def __call__(self, url: str, prefix: str, **opts: Any) -> TaskProcessor:
        options = dict(FAST, cluster=True)
        options.update(opts)
        p = TaskProcessor(Options(redis=url, prefix=prefix, **options))
        self.made.append(p)
        return p

    def run(self, p: TaskProcessor) -> None:
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(stop,), daemon=True)
        t.start()
        self.workers.append((stop, t))

    def close(self) -> None:
        for stop, _ in self.workers:
            stop.set()
        for _, t in self.workers:
            t.join(15)
        for p in self.made:
            p.close()
        assert not any(t.is_alive() for _, t in self.workers), "an embedded worker did not stop"


@pytest.fixture
def procs() -> Iterator[Processors]:
    made = Processors()
    yield made
    made.close()


def node_client(cluster: RedisCluster, port: int) -> redis.Redis:
    node = next(n for n in cluster.nodes if n.port == port)
    return node.client(socket_timeout=5)


def numsub(cluster: RedisCluster, port: int, channel: str) -> int:
    with node_client(cluster, port) as c:
        return int(dict(c.pubsub_numsub(channel)).get(channel.encode(), 0))


# ------------------------------------------------------------------------------ hash tags

def test_prefix_without_hash_tag_is_refused_in_cluster_mode() -> None:
    for bad in ("coretask", "{}coretask", "core{task", "coretask}"):
        with pytest.raises(ConfigurationError, match="hash tag"):
            Options(redis="redis://127.0.0.1:1/0", cluster=True, prefix=bad)
    assert Options(redis="redis://127.0.0.1:1/0", cluster=True, prefix="app:{jobs}").prefix == "app:{jobs}"
    assert Options(redis="redis://127.0.0.1:1/0", prefix="coretask").prefix == "coretask"  # standalone: any


def test_every_key_of_a_workload_is_in_the_prefix_slot(cluster: RedisCluster, procs: Processors,
                                                       tmp_path: Path) -> None:
    """A script may touch keys it does not declare (built from the prefix inside Lua); all of
    them must hash to the prefix's slot, or the script would fail (or silently work only on
    a single node)."""
    prefix = new_prefix()
    p = procs(cluster.url, prefix)
    procs.run(procs(cluster.url, prefix))
    exercise(p, tmp_path / "notes")
    slot = p.gateway.transport.redis.keyslot(prefix)
    owner = cluster.master_for_key(prefix)
    with node_client(cluster, owner.port) as direct:
        keys = list(direct.scan_iter(match=prefix + "*", count=1000))
    assert len(keys) > 10
    assert {p.gateway.transport.redis.keyslot(k) for k in keys} == {slot}
    for node in cluster.nodes:   # and nothing of this prefix anywhere else
        if node.port != owner.port and node.running:
            with node.client(socket_timeout=5) as c:
                if c.info("replication")["role"] == "master":
                    assert not list(c.scan_iter(match="*" + prefix + "*", count=1000))


# --------------------------------------------------------------------------------- pub/sub

@pytest.mark.parametrize("where", ["replica", "other-master"])
def test_idle_worker_subscribed_through_another_node_is_woken_promptly(
        cluster: RedisCluster, procs: Processors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    """The scripts PUBLISH on the master of the prefix's slot; a worker whose pub/sub connection
    is on a replica or on another master still hears the fetch event (cluster-wide PUBLISH)."""
    prefix = new_prefix()
    channel = prefix + ":ev"
    producer = procs(cluster.url, prefix, **IDLE)
    worker = procs(cluster.url, prefix, **IDLE)
    client = worker.gateway.transport.redis
    slot_nodes = client.nodes_manager.slots_cache[client.keyslot(channel)]
    owner = slot_nodes[0]
    if where == "replica":
        target = slot_nodes[1]
    else:
        target = next(n for n in client.get_primaries() if n.port != owner.port)
    monkeypatch.setattr(client, "pubsub", lambda **kw: ClusterPubSub(client, node=target, **kw))
    procs.run(worker)
    wait_until(lambda: numsub(cluster, target.port, channel) == 1, what=f"a subscriber on {where}")
    assert numsub(cluster, owner.port, channel) == 0

    path = str(tmp_path / "notes")
    latencies = []
    for i in range(3):
        # idle: nothing in flight, and the loop's next poll is up to 5 s away
        if i:
            wait_until(lambda: producer.get_queue("default").in_flight == 0)
        sent = time.time()
        producer.enqueue_task("default", "acme", note, path, f"t{i}")
        started = wait_until(lambda v=f"t{i}": read_notes(path).get(v), 5, f"task t{i} to start")
        latencies.append(started - sent)
    # typically 1-30 ms; without the event each would take up to base_frequency (5 s)
    assert sorted(latencies)[1] < 0.2 and max(latencies) < 1.0, latencies

    # cancel: the running task of a canceled batch is aborted (it would otherwise wait 20 s)
    bid = producer.enqueue_batch("default", "acme", lambda b: b.enqueue(wait_for_cancel, path, "c"))
    wait_until(lambda: "c" in read_notes(path), 5, "the task to cancel")
    assert producer.cancel_batch(bid)
    wait_until(lambda: "c:left" in read_notes(path), 3, "the canceled task to be aborted")
    # pause with requeue: the running task is aborted and handed back, and runs after resume
    pb = producer.enqueue_batch("default", "acme", lambda b: b.enqueue(wait_for_cancel, path, "p"))
    wait_until(lambda: "p" in read_notes(path), 5, "the task to requeue")
    producer.pause(requeue_running=True)
    wait_until(lambda: "p:left" in read_notes(path), 3, "the running task to be handed back")
    wait_until(lambda: producer.get_queue("default").queued == 1, 3, "the task back in its queue")
    producer.resume()
    wait_until(lambda: _count(path, "p") == 2, 3, "the handed-back task to run again")
    assert producer.cancel_batch(pb)         # (so that the worker stops without waiting for it)
    wait_until(lambda: _count(path, "p:left") == 2, 3, "the task to end")


def _count(path: str, value: str) -> int:
    try:
        return sum(1 for line in Path(path).read_text().splitlines() if line.split(" ")[0] == value)
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------- failover

def test_failover_producers_and_workers_recover(request: pytest.FixtureRequest, procs: Processors,
                                                tmp_path: Path) -> None:
    """SIGKILL the master of the prefix's slot while tasks run: a replica is promoted, the same
    producer object and the same worker manager carry on by themselves within 15 s, and every
    task enqueued after the recovery runs. Tasks enqueued with wait_replicas=1 before the kill
    were on the replica, so they run too (at least once)."""
    with RedisCluster(binary=cluster_binary(request.config)) as cl:
        prefix = new_prefix()
        owner = cl.master_for_key(prefix + ":queues")
        url = next(n for n in cl.nodes if n.port != owner.port).url
        path = str(tmp_path / "notes")
        opts = dict(FAST, invisibility=3.0)
        producer = procs(url, prefix, **opts)
        durable = procs(url, prefix, wait_replicas=1, wait_timeout=2.0, **opts)
        manager = Manager(url, prefix, tmp_path / "manager.log", cluster=True, threads=4, **opts)
        try:
            for i in range(12):
                durable.enqueue_task("default", "acme", note_slow, path, f"mid{i}", 0.3)
            wait_until(lambda: len(read_notes(path)) >= 4, 20, "tasks running before the kill")

            killed = time.monotonic()
            owner.kill()
            errors: list[str] = []
            while True:      # the same producer object, retried by the caller
                try:
                    producer.enqueue_task("default", "acme", note, path, "probe")
                    break
                except Exception as exc:    # ConnectionError, ClusterDownError, ...
                    errors.append(type(exc).__name__)
                    assert time.monotonic() - killed < 15, f"producer not recovered: {errors[-5:]}"
                    time.sleep(0.1)
            recovered = time.monotonic() - killed
            print(f"failover: the producer recovered {recovered:.1f}s after the kill ({len(errors)} errors: "
                  f"{sorted(set(errors))})")
            # (the node master_for_key asks may learn of the promotion a moment later)
            wait_until(lambda: cl.master_for_key(prefix + ":queues").port != owner.port, 5,
                       "every node to see the promoted replica")
            after = [f"after{i}" for i in range(20)]
            for value in after:
                producer.enqueue_task("default", "acme", note, path, value)
            expected = {"probe", *after, *(f"mid{i}" for i in range(12))}
            wait_until(lambda: expected <= read_notes(path).keys(), max(15 - (time.monotonic() - killed), 3),
                       f"every task to run (recovery took {recovered:.1f}s; manager log:\n{manager.log()[-3000:]})")
            assert manager.proc.poll() is None
            print(f"failover: every task ran {time.monotonic() - killed:.1f}s after the kill")

            # the promoted master has no replica now: WAIT cannot be satisfied ...
            with pytest.raises(ReplicationError) as info:
                durable.enqueue_task("default", "acme", note, path, "unreplicated")
            assert info.value.acknowledged == 0 and info.value.required == 1 and info.value.task_id
            # ... until the old master comes back and rejoins as its replica
            owner.restart()
            wait_until(lambda: _enqueue_durably(durable, path, "replicated"), 20, "the old master to rejoin")
            wait_until(lambda: {"unreplicated", "replicated"} <= read_notes(path).keys(), 10)
        finally:
            manager.stop()


def _enqueue_durably(p: TaskProcessor, path: str, value: str) -> bool:
    try:
        p.enqueue_task("default", "acme", note, path, value)
        return True
    except ReplicationError:
        return False


# ------------------------------------------------------------------------------------ WAIT

def test_wait_replicas_on_cluster(cluster: RedisCluster, procs: Processors, tmp_path: Path) -> None:
    prefix = new_prefix()
    path = str(tmp_path / "notes")
    one = procs(cluster.url, prefix, wait_replicas=1, wait_timeout=2.0)
    tid = one.enqueue_task("default", "acme", note, path, "x")
    bid = one.enqueue_batch("default", "acme", lambda b: b.enqueue(note, path, "y"))
    assert one.cancel_batch(bid)
    two = procs(cluster.url, prefix, wait_replicas=2, wait_timeout=0.2)   # each master has one replica
    with pytest.raises(ReplicationError, match="only 1 of the 2 replicas") as info:
        two.enqueue_task("default", "acme", note, path, "z")
    assert (info.value.acknowledged, info.value.required) == (1, 2)
    assert info.value.task_id and info.value.task_id != tid
    with pytest.raises(ReplicationError) as info:
        two.enqueue_batch("default", "acme", lambda b: b.enqueue(note, path, "w"))
    assert info.value.batch_id and one.get_batch(info.value.batch_id) is not None   # written anyway
    assert one.get_queue("default").queued == 3   # x, z, w: the write is not undone


# ------------------------------------------------------------------------------------- ACL

def test_acl_user_on_cluster_runs_everything(cluster: RedisCluster, procs: Processors, tmp_path: Path) -> None:
    """The documented ACL line plus its cluster additions, set on every node."""
    from tests.test_tls_acl import acl_rules

    prefix, password = new_prefix(), "s3cret-" + uuid.uuid4().hex[:8]
    user = "ct" + uuid.uuid4().hex[:8]
    for node in cluster.nodes:
        if node.running:
            with node.client(socket_timeout=5) as admin:
                admin.execute_command("ACL", "SETUSER", user, *acl_rules(prefix, password, cluster=True))
    node = next(n for n in cluster.nodes if n.running)
    url = f"redis://{user}:{password}@{node.host}:{node.port}/0"
    p = procs(url, prefix)
    procs.run(procs(url, prefix))
    exercise(p, tmp_path / "notes")
    with redis.cluster.RedisCluster.from_url(url) as as_user:
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_user.set("{other}:x", 1)
