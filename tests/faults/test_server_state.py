"""Faults of the server itself, on a server of the test's own: its script cache flushed while
workers and producers run, and maxmemory reached (noeviction) under producers and workers.

(A server restart with appendonly, a pub/sub connection killed and a producer facing a server
that is down are in tests/test_reconnect.py.)
"""
from __future__ import annotations

import threading
from typing import Any

import pytest

from coretask import StoreFull
from tests import tasks_faults as tf
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts


def counts(p: Any, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


def keyspace(client: Any, prefix: str) -> dict[bytes, Any]:
    """Every key under the prefix with its full content: what a half-written call would change.
    Less what a live worker keeps moving whatever the call under test did: its heartbeat and
    report (P:workers, P:wi:<worker>) and its leases' deadlines (P:leases is compared by member:
    a renewal, every few seconds, may land between two snapshots)."""
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(match=prefix + "*", count=1000):
        if key == f"{prefix}:workers".encode() or key.startswith(f"{prefix}:wi:".encode()):
            continue
        if key == f"{prefix}:leases".encode():
            out[key] = ("zset members", set(client.zrange(key, 0, -1)))
            continue
        kind = client.type(key)
        if kind == b"hash":
            out[key] = ("hash", client.hgetall(key))
        elif kind == b"list":
            out[key] = ("list", client.lrange(key, 0, -1))
        elif kind == b"set":
            out[key] = ("set", client.smembers(key))
        elif kind == b"zset":
            out[key] = ("zset", client.zrange(key, 0, -1, withscores=True))
        elif kind == b"string":
            out[key] = ("string", client.get(key))
        elif kind != b"none":
            out[key] = (kind.decode(), None)
    return out


# ---------------------------------------------------------------------------- SCRIPT FLUSH

def test_script_flush_while_running_scripts_reload_and_every_task_completes(
        own_server, processor_on, faults_manager, r, prefix):
    # Given a manager (2 processes x 4 threads) and a producer on a server of the test's own
    server = own_server()
    producer = processor_on(server.url)
    m = faults_manager(server.url, processes=2, threads=4)
    m.wait_children(2)
    key = prefix + ":flush"
    admin = server.client()
    flushes = [0]
    done = threading.Event()

    def flusher() -> None:
        while not done.wait(0.03):
            admin.script_flush()
            flushes[0] += 1

    # When the script cache is flushed every 30 ms while 300 single tasks and 3 batches of 100
    # are enqueued and run (workers fetching, acknowledging and renewing; the manager renewing
    # leases and recovering)
    t = threading.Thread(target=flusher)
    t.start()
    try:
        singles = [f"s{i}" for i in range(300)]
        batches: dict[str, list[str]] = {}
        for i, tag in enumerate(singles):
            producer.enqueue_task("default", "acme", tf.run, key, tag, 0.002)
            if i % 100 == 99:
                tags = [f"b{i}-{j}" for j in range(100)]
                batches[producer.enqueue_batch("default", "acme", lambda b, tags=tags: [
                    b.enqueue(tf.run, key, x, 0.002) for x in tags])] = tags
        everything = singles + [x for tags in batches.values() for x in tags]
        wait_until(lambda: len(hash_counts(r, key + ":finished")) == len(everything), 60,
                 lambda: f"every task (flushes {flushes[0]}, counts {counts(producer)})")
    finally:
        done.set()
        t.join()

    # Then scripts were reloaded transparently: every task ran exactly once and every counter
    # is exact
    assert flushes[0] >= 10
    wait_until(lambda: counts(producer) == (0, 0, 0, 0), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":started") == {x: 1 for x in everything}
    assert hash_counts(r, key + ":finished") == {x: 1 for x in everything}
    for bid, tags in batches.items():
        b = producer.get_batch(bid)
        assert (b.total, b.done, b.failed, b.canceled, b.remaining) == (100, 100, 0, 0, 0)
    assert producer.get_tenant_stats("acme").done == 600
    log = m.log()
    assert "Traceback" not in log and "ScriptError" not in log and "failed" not in log, log[-3000:]
    assert m.terminate() == 0


# ------------------------------------------------------------------------------ maxmemory

def test_maxmemory_reached_enqueue_raises_store_full_and_writes_nothing(
        own_server, processor_on, embedded_worker, r, prefix):
    # Given a worker and a producer on a server of the test's own, and 3 tasks (1.5 s) running
    server = own_server()
    admin = server.client()
    producer = processor_on(server.url)
    embedded_worker(processor_on(server.url, max_workers=4))
    key = prefix + ":oom"
    inflight = [f"run{i}" for i in range(3)]
    for tag in inflight:
        producer.enqueue_task("default", "acme", tf.run, key, tag, 1.5)
    wait_until(lambda: len(hash_counts(r, key + ":started")) == 3, 10, "3 tasks running")
    producer.pause()              # nothing more is fetched: the queue below only grows
    pad = "x" * 4096
    accepted: list[str] = []

    # When maxmemory (noeviction) is set just above the memory in use, and tasks are enqueued
    # until Redis refuses one
    admin.config_set("maxmemory-policy", "noeviction")
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 512 * 1024)
    error = None
    for i in range(2000):
        try:
            accepted.append(producer.enqueue_task("default", "acme", tf.run, key, f"ok{i}", 0.0, pad))
        except StoreFull as exc:
            error = exc
            break
    assert error is not None, "Redis never refused an enqueue"
    assert "out of memory (maxmemory reached) during enqueue" in str(error)
    assert accepted

    # Then a refused enqueue_task leaves the keyspace exactly as it was (the running tasks'
    # acknowledgements free memory meanwhile: an enqueue that fits again is simply accepted)
    for _ in range(200):
        before = keyspace(admin, prefix)
        try:
            accepted.append(producer.enqueue_task("default", "acme", tf.run, key, f"ok{len(accepted)}", 0.0, pad))
        except StoreFull as exc:
            assert "maxmemory" in str(exc)
            break
    else:
        raise AssertionError("Redis accepted every enqueue")
    assert keyspace(admin, prefix) == before

    # ... and so does a refused batch, also when its first chunks were staged before Redis
    # refused a later one (batch staging is cleaned up, not left to expire)
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 3 * 1024 * 1024)
    before = keyspace(admin, prefix)
    staged_calls = []
    real_run, real_send = producer.gateway.transport.run, producer.gateway.transport.send

    def spy(real: Any) -> Any:
        def call(name: str, *args: Any, **kwargs: Any) -> Any:
            staged_calls.append(name)
            return real(name, *args, **kwargs)
        return call

    producer.gateway.transport.run, producer.gateway.transport.send = spy(real_run), spy(real_send)  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreFull, match="maxmemory"):
            producer.enqueue_batch("default", "acme", lambda b: [
                b.enqueue(tf.run, key, f"batch{j}", 0.0, pad) for j in range(3000)])
    finally:
        producer.gateway.transport.run, producer.gateway.transport.send = real_run, real_send  # type: ignore[method-assign]
    assert staged_calls.count("batch_stage") >= 2, staged_calls    # a chunk was staged, then refused
    assert "batch_abort" in staged_calls
    assert keyspace(admin, prefix) == before

    # ... while the tasks that were running finish and are acknowledged under maxmemory
    wait_until(lambda: all((hash_counts(r, key + ":finished").get(t) or 0) == 1 for t in inflight), 10,
               "the running tasks to finish")
    wait_until(lambda: counts(producer)[1] == 0, 10, "their acknowledgements")

    # When maxmemory is raised again
    admin.config_set("maxmemory", 0)
    producer.resume()
    more = [f"more{i}" for i in range(20)]
    bid = producer.enqueue_batch("default", "acme", lambda b: [b.enqueue(tf.run, key, t, 0.0) for t in more])

    # Then work continues: every accepted task runs exactly once, the refused ones never
    expected = inflight + [f"ok{i}" for i in range(len(accepted))] + more
    wait_until(lambda: len(hash_counts(r, key + ":finished")) == len(expected), 30,
             lambda: f"every accepted task (counts {counts(producer)})")
    wait_until(lambda: counts(producer) == (0, 0, 0, 0), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":started") == {t: 1 for t in expected}
    assert hash_counts(r, key + ":finished") == {t: 1 for t in expected}
    b = producer.get_batch(bid)
    assert (b.total, b.done, b.remaining) == (20, 20, 0)
    assert producer.get_tenant_stats("acme").done == len(expected)
