"""Network faults between a worker (or producer) and Redis, injected by tests/faults/proxy.py:
latency, every connection reset at once, a half-open connection that outlives the lease, and a
reply lost to a connection reset after the server executed the script.

Worker A runs embedded (``processor.run``) behind the proxy with ``?socket_timeout=`` in its URL
(redis-py's URL options override coretask's 30 s default), so a connection that stops answering
costs it about a second per attempt instead of 30. Tasks record their runs directly in the
session's server, never through the proxy; every test ends by checking the exact count of runs
of every task and coretask's counters.
"""
from __future__ import annotations

import threading

import pytest
from typing import Any

from coretask.gateway.transport import SCRIPTS
from tests import tasks_faults as tf
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts


def counts(p: Any, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


def all_ran(r: Any, key: str, tags: list[str], field: str = "finished") -> bool:
    done = hash_counts(r, f"{key}:{field}")
    return all(done.get(t, 0) >= 1 for t in tags)


def idle(p: Any) -> bool:
    return counts(p) == (0, 0, 0, 0)


def tenant_counters(p: Any, tenant: str) -> tuple[int, int, int, int]:
    s = p.get_tenant_stats(tenant)
    return s.done, s.failed, s.canceled, s.dead


# ------------------------------------------------------------------------------- latency

def test_latency_50ms_leases_are_kept_and_every_task_runs_exactly_once(
        proxy, processor_on, embedded_worker, server, r, prefix):
    # Given a worker and a producer behind the proxy (invisibility 2 s), and 50 ms of latency
    # each way (+100 ms per round trip)
    proxy.latency(0.05)
    url = proxy.url + "?socket_timeout=2"
    producer = processor_on(url)
    a = processor_on(url, invisibility=2.0, max_workers=8, pushback_frequency=1.0)   # fewer slow timers
    key = prefix + ":lat"
    # When 120 short tasks and 4 tasks longer than the invisibility (3 s) run through it
    tags = [f"s{i}" for i in range(120)] + [f"long{i}" for i in range(4)]
    bid = producer.enqueue_batch("default", "acme", lambda b: [
        b.enqueue(tf.run, key, t, 3.0 if t.startswith("long") else 0.01) for t in tags])
    embedded_worker(a)

    # Then every task finishes, exactly once: the leases of the long ones were renewed through
    # the slow link and never expired
    wait_until(lambda: all_ran(r, key, tags), 60, "every task")
    wait_until(lambda: idle(producer), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":started") == {t: 1 for t in tags}
    assert hash_counts(r, key + ":finished") == {t: 1 for t in tags}
    b = producer.get_batch(bid)
    assert (b.total, b.done, b.failed, b.canceled, b.remaining) == (124, 124, 0, 0, 0)
    assert producer.get_tenant_stats("acme").done == 124
    assert r.zcard(prefix + ":leases") == 0


# ----------------------------------------------------------------------- connection resets

def test_every_connection_reset_mid_run_the_worker_reconnects_and_all_tasks_complete(
        proxy, processor_on, embedded_worker, r, prefix):
    # Given a worker and a producer behind the proxy
    url = proxy.url + "?socket_timeout=2"
    producer = processor_on(url)
    a = processor_on(url, max_workers=8)
    embedded_worker(a)
    key = prefix + ":drop"
    tags = [f"t{i}" for i in range(400)]
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for t in tags:
                producer.enqueue_task("default", "acme", tf.run_seen, key, t, 0.005)
        except BaseException as exc:  # noqa: BLE001  (surfaced by the assertion below)
            errors.append(exc)

    feeder = threading.Thread(target=produce)
    feeder.start()
    # When every connection through the proxy (worker loop, pub/sub, producer) is reset five
    # times while tasks are being enqueued and run
    resets = []
    for i in range(5):
        wait_until(lambda n=i: sum(hash_counts(r, key + ":finished").values()) >= 40 * (n + 1), 30,
                   f"progress before reset {i + 1}")
        resets.append(proxy.drop())
    feeder.join(60)

    # Then the producer never failed, the worker reconnected, and every task ran
    assert not errors, errors
    assert all(n >= 1 for n in resets), resets
    wait_until(lambda: all_ran(r, key, tags), 30,
             lambda: f"every task: counts {counts(producer)}, leases {r.zrange(prefix + ':leases', 0, -1)}, "
                     f"missing {sorted(set(tags) - set(hash_counts(r, key + ':finished')))}")
    wait_until(lambda: idle(producer), 10, "0 queued / 0 in flight")
    # ... exactly once on the worker side: no task was redelivered (a lost acknowledgement is
    # re-sent with its lease token, a lost fetch reply is handed back unstarted). A task runs a
    # second time only when a reset ate the reply to its enqueue and the task had already run
    # and been removed when redis-py re-sent the call (docs/operations.md, "Delivery
    # guarantee"): then it is stored again under the same id and runs with attempt 1. The
    # producer has one call in flight, so each reset can do that to at most one task.
    runs: dict[str, list[tuple[str, int]]] = {}
    for line in r.lrange(key + ":runs", 0, -1):
        tag, tid, attempt = line.decode().split()
        runs.setdefault(tag, []).append((tid, int(attempt)))
    twice = {t: v for t, v in runs.items() if len(v) > 1}
    assert len(twice) <= len(resets), twice
    for tag, seen in twice.items():
        assert len(seen) == 2 and seen[0][0] == seen[1][0] and seen[1][1] == 1, (tag, seen)
    assert hash_counts(r, key + ":started") == {t: len(runs[t]) for t in tags}
    assert hash_counts(r, key + ":finished") == {t: len(runs[t]) for t in tags}
    assert producer.get_tenant_stats("acme").done == 400 + len(twice)
    assert r.zcard(prefix + ":leases") == 0


def test_fetch_reply_lost_to_a_reset_the_tasks_it_leased_are_handed_back(
        proxy, processor_on, embedded_worker, r, prefix):
    # Given an idle worker behind the proxy (4 threads)
    url = proxy.url + "?socket_timeout=2"
    producer = processor_on(server_url(proxy))
    a = processor_on(url, max_workers=4)
    embedded_worker(a)
    key = prefix + ":cut"
    producer.enqueue_task("default", "acme", tf.run, key, "probe")
    wait_until(lambda: all_ran(r, key, ["probe"]), 10, "the worker to start")

    # When the reply to its next fetch that leases tasks is lost to a connection reset (the
    # script ran: Redis leased the tasks to this worker, which never heard of them; redis-py
    # then resends the call on a new connection)
    proxy.cut_reply(SCRIPTS["fetch"].sha.encode(), min_reply=400)
    tags = [f"t{i}" for i in range(8)]
    producer.enqueue_batch("default", "acme", lambda b: [b.enqueue(tf.run, key, t, 0.2) for t in tags])

    # Then the tasks of the lost reply do not stay leased to a live worker forever: they are
    # handed back (no retry consumed) and every task runs exactly once
    wait_until(lambda: proxy.cuts == 1, 10, "the cut")
    wait_until(lambda: all_ran(r, key, tags), 20, f"every task; leases: {r.zrange(prefix + ':leases', 0, -1)}")
    wait_until(lambda: idle(producer), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":started") == {t: 1 for t in ["probe", *tags]}
    assert hash_counts(r, key + ":finished") == {t: 1 for t in ["probe", *tags]}
    assert r.zcard(prefix + ":leases") == 0


def server_url(proxy: Any) -> str:
    return f"redis://{proxy.target[0]}:{proxy.target[1]}/0"


# ----------------------------------------------------------------------------- half-open

def test_half_open_longer_than_invisibility_leases_expire_and_late_acks_change_nothing(
        proxy, processor_on, embedded_worker, r, prefix):
    # Given worker A behind the proxy (invisibility 2 s, 4 threads) running the 2 tasks of a
    # batch (1.5 s each), and a producer talking to Redis directly
    producer = processor_on(server_url(proxy), invisibility=2.0)
    a = processor_on(proxy.url + "?socket_timeout=1", invisibility=2.0, max_workers=4)
    key = prefix + ":half"
    first = ["a0", "a1"]
    bid = producer.enqueue_batch("default", "acme", lambda b: [b.enqueue(tf.run, key, t, 1.5) for t in first])
    embedded_worker(a)
    wait_until(lambda: set(hash_counts(r, key + ":started")) == set(first), 10, "A running both tasks")

    # When A's connection goes half-open (its requests stop reaching Redis, nothing is closed:
    # its next request, a fetch for its 2 free threads, waits in the network), ten more tasks
    # join the batch and worker B, talking to Redis directly, starts
    proxy.hold("up")
    rest = [f"t{i}" for i in range(10)]
    assert producer.append_batch("default", "acme", bid, lambda b: [b.enqueue(tf.run, key, t, 0.2) for t in rest])
    tags = first + rest
    b = processor_on(server_url(proxy), invisibility=2.0, max_workers=4)
    stop_b = embedded_worker(b)

    # Then A's two leases expire (nobody renews them), B takes them back and runs them, and
    # B runs the rest: every task finished, A's two twice (once in A, whose acks are held)
    wait_until(lambda: all_ran(r, key, tags) and idle(producer), 30, "B to run every task")
    expected = {t: 2 if t in first else 1 for t in tags}
    assert hash_counts(r, key + ":started") == expected
    wait_until(lambda: hash_counts(r, key + ":finished") == expected, 10, "A's tasks to finish in A too")
    info = producer.get_batch(bid)
    assert (info.total, info.done, info.failed, info.canceled, info.remaining) == (12, 12, 0, 0, 0)
    assert tenant_counters(producer, "acme") == (12, 0, 0, 0)

    # When B stops, six more tasks are enqueued, and A's link heals: its held requests (the
    # fetch, then the acknowledgements of its two tasks) reach Redis late
    stop_b.set()
    stop_b.thread.join(20)
    assert not stop_b.thread.is_alive()
    snapshot = (producer.get_batch(bid), tenant_counters(producer, "acme"))
    late = [f"late{i}" for i in range(6)]
    for t in late:          # (another tenant: acme's counters must not move any more)
        producer.enqueue_task("default", "other", tf.run, key, t, 0.05)
    proxy.heal()
    wait_until(lambda: proxy.pending == 0, 10, "the held bytes delivered")

    # Then the late acknowledgements change nothing (stale lease tokens), and the late tasks
    # all run in A, exactly once: those the late fetch leased to A (whose reply A no longer
    # reads) are handed back instead of staying leased to a live worker
    assert (producer.get_batch(bid), tenant_counters(producer, "acme")) == snapshot
    wait_until(lambda: all_ran(r, key, late), 30,
             lambda: f"the late tasks: counts {counts(producer)}, leases {r.zrange(prefix + ':leases', 0, -1)}")
    wait_until(lambda: idle(producer), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":started") == {**expected, **{t: 1 for t in late}}
    assert hash_counts(r, key + ":finished") == {**expected, **{t: 1 for t in late}}
    info = producer.get_batch(bid)
    assert (info.total, info.done, info.failed, info.canceled, info.remaining) == (12, 12, 0, 0, 0)
    assert tenant_counters(producer, "acme") == (12, 0, 0, 0)
    assert tenant_counters(producer, "other") == (6, 0, 0, 0)
    assert r.zcard(prefix + ":leases") == 0


@pytest.mark.parametrize("script", ["batch_stage", "batch_commit"])
def test_batch_reply_lost_to_a_reset_the_resent_call_neither_fails_nor_duplicates(
        proxy, processor_on, embedded_worker, r, prefix, script):
    # Given a producer behind the proxy, and a worker of its own
    producer = processor_on(proxy.url + "?socket_timeout=2")
    key = prefix + ":bcut"
    tags = [f"t{i}" for i in range(600)]        # three staging chunks
    producer.enqueue_batch("default", "acme", lambda b: b.enqueue(tf.run, key, "warm-up"))  # scripts loaded

    # When the reply to one of its batch scripts is lost to a connection reset after Redis ran
    # the script (redis-py then sends the same call again on a new connection)
    proxy.cut_reply(SCRIPTS[script].sha.encode())
    bid = producer.enqueue_batch("default", "acme", lambda b: [b.enqueue(tf.run, key, t) for t in tags])

    # Then the batch call returned normally, the re-sent call was recognised (a chunk is not
    # staged twice, a commit does not report "staged data incomplete"), and the batch holds each
    # task once: every task runs once and the counts add up
    assert proxy.cuts == 1
    batch = producer.get_batch(bid)
    assert (batch.total, batch.remaining) == (600, 600)
    embedded_worker(processor_on(server_url(proxy), max_workers=8))
    wait_until(lambda: producer.get_batch(bid).state == "succeeded", 30,
               lambda: f"the batch: {producer.get_batch(bid)}")
    wait_until(lambda: idle(producer), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":started") == {t: 1 for t in ["warm-up", *tags]}
    batch = producer.get_batch(bid)
    assert (batch.total, batch.done, batch.failed, batch.remaining) == (600, 600, 0, 0)
