"""Idempotency keys: ``enqueue_task(..., key=..., key_ttl=...)`` and ``batch.enqueue(key=...)``
enqueue nothing while a task holding the key (per tenant) is queued, delayed or running, and for
key_ttl after it ended, and return that task's id; twenty producers racing on one key create one
task; every way a task ends gives its key up."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

import coretask
from coretask import ConfigurationError
from tests import tasks, tasks_batch
from tests.conftest import wait_until

HOUR = timedelta(hours=1)


def counts(p, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


def state(p, task_id: str) -> str | None:
    info = p.get_task(task_id)
    return None if info is None else info.state


def test_a_key_held_by_a_queued_delayed_or_running_task_enqueues_nothing(make_processor, embedded_worker, r, prefix):
    processor = make_processor(queues=["default", "low"])
    out = prefix + ":out"
    processor.pause()
    # Given a queued task and a delayed one, each enqueued with a key
    queued = processor.enqueue_task("default", "acme", tasks.record, out, 1, key="order-42:email")
    delayed = processor.enqueue_task("default", "acme", tasks.record, out, 2, key="order-43:email", delay_until=HOUR)
    # When they are enqueued again with their keys (other arguments, delays, queues)
    again = [processor.enqueue_task("default", "acme", tasks.record, out, 9, key="order-42:email"),
             processor.enqueue_task("low", "acme", tasks.record, out, 9, key="order-42:email", delay_until=HOUR),
             processor.enqueue_task("default", "acme", tasks.record, out, 9, key="order-43:email")]
    # Then each returns the id of the task that holds the key and nothing more is enqueued
    assert again == [queued, queued, delayed]
    assert counts(processor) == (1, 0, 1, 0) and counts(processor, "low") == (0, 0, 0, 0)
    # And the same key of another tenant, or another key, is another task
    other = processor.enqueue_task("default", "globex", tasks.record, out, 3, key="order-42:email")
    assert other not in (queued, delayed)
    assert processor.enqueue_task("default", "acme", tasks.record, out, 4, key="order-44:email") not in (queued,)
    assert counts(processor) == (3, 0, 1, 0)
    # And a tenant with ':' in its name does not share keys with a shorter one ("a:b"+"c" vs "a"+"b:c")
    ab = processor.enqueue_task("default", "a:b", tasks.record, out, 5, key="c")
    a = processor.enqueue_task("default", "a", tasks.record, out, 6, key="b:c")
    assert ab != a and processor.get_task(ab).tenant == "a:b" and processor.get_task(a).tenant == "a"
    # And through a tenant view the key is the view's tenant's
    assert processor.tenant("acme").enqueue_task("default", tasks.record, out, 9, key="order-42:email") == queued
    # When a worker runs a keyed task that is still running, the key is still held
    spin = prefix + ":spin"
    running = processor.enqueue_task("default", "acme", tasks_batch.spin_ctx, spin, 1.0, key="spin")
    processor.resume()
    embedded_worker(processor)
    wait_until(lambda: r.llen(spin + ":started"), 10, "keyed task running")
    assert state(processor, running) == "running"
    assert processor.enqueue_task("default", "acme", tasks_batch.spin_ctx, spin, 1.0, key="spin") == running
    # And once it ended (no key_ttl), the key is free: the next enqueue is a new task
    wait_until(lambda: state(processor, running) is None, 10, "keyed task done")
    fresh = processor.enqueue_task("default", "acme", tasks.record, out, 7, key="spin")
    assert fresh != running


def test_twenty_producers_racing_on_one_key_create_one_task(make_processor, prefix):
    # Given twenty producers (each its own processor and connection), released at once
    producers = [make_processor() for _ in range(20)]
    barrier = threading.Barrier(20)
    got: list[str] = []
    lock = threading.Lock()

    def produce(p) -> None:
        barrier.wait()
        task_id = p.enqueue_task("default", "acme", tasks.record, prefix + ":out", 1, key="the-one")
        with lock:
            got.append(task_id)

    threads = [threading.Thread(target=produce, args=(p,)) for p in producers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then exactly one task exists and every producer got its id
    assert len(got) == 20 and len(set(got)) == 1
    assert counts(producers[0]) == (1, 0, 0, 0)
    assert [t.id for t in producers[0].get_tasks_in_queue("default")] == got[:1]


def test_key_ttl_holds_the_key_after_the_task_ended(processor, embedded_worker, r, prefix):
    # Given a keyed task with a key_ttl of 1.5 s that runs to its end
    out = prefix + ":out"
    embedded_worker(processor)
    first = processor.enqueue_task("default", "acme", tasks.record, out, 1, key="k", key_ttl=timedelta(seconds=1.5))
    wait_until(lambda: r.llen(out) == 1 and state(processor, first) is None, 10, "first run done")
    ended = time.monotonic()
    # When the key is used again within key_ttl
    again = processor.enqueue_task("default", "acme", tasks.record, out, 2, key="k", key_ttl=1.5)
    # Then nothing is enqueued and the finished task's id comes back
    assert again == first
    # And once key_ttl has passed (polled until a deadline), the key enqueues a new task
    fresh = wait_until(lambda: (lambda t: t if t != first else None)(
        processor.enqueue_task("default", "acme", tasks.record, out, 3, key="k")), 10, "the key to expire")
    assert time.monotonic() - ended >= 1.4
    wait_until(lambda: r.lrange(out, 0, -1) == [b"1", b"3"], 10, "the new task ran")
    assert fresh != first


@pytest.mark.parametrize("end", ["canceled", "deleted", "dead", "dead then discarded"])
def test_every_end_of_a_keyed_task_gives_its_key_up(processor, embedded_worker, r, prefix, end):
    # Given a keyed task (no key_ttl) that ends the way under test
    out = prefix + ":out"
    if end.startswith("dead"):
        task_id = processor.enqueue_task("default", "acme", tasks.always_fail, "x", retries=0, key="k")
        embedded_worker(processor)
        wait_until(lambda: state(processor, task_id) == "dead", 10, "dead")
        if end == "dead then discarded":
            assert processor.discard_dead_task(task_id)
    else:
        processor.pause()
        task_id = processor.enqueue_task("default", "acme", tasks.record, out, 1, key="k", delay_until=HOUR)
        assert (processor.cancel_task if end == "canceled" else processor.delete_task)(task_id)
    # Then the key is free: the next enqueue with it is a new task, and no key is left behind
    fresh = processor.enqueue_task("default", "acme", tasks.record, out, 2, key="k", delay_until=HOUR)
    assert fresh != task_id
    keys = processor.gateway.keys
    assert r.get(keys.idempotency("acme", "k")) == fresh.encode()
    assert processor.cancel_task(fresh) and r.exists(keys.idempotency("acme", "k")) == 0


@pytest.mark.parametrize("how", ["one", "queue"])
def test_a_retried_dead_letter_takes_its_key_back_unless_another_task_holds_it(processor, embedded_worker, r,
                                                                              prefix, how):
    # Given two keyed tasks that died (no key_ttl: both keys were freed when they were buried),
    # and one whose key_ttl keeps its key naming it
    keys = processor.gateway.keys
    a = processor.enqueue_task("default", "acme", tasks.always_fail, "x", retries=0, key="a")
    b = processor.enqueue_task("default", "acme", tasks.always_fail, "x", retries=0, key="b")
    c = processor.enqueue_task("default", "acme", tasks.always_fail, "x", retries=0, key="c", key_ttl=HOUR)
    stop = embedded_worker(processor)
    wait_until(lambda: state(processor, a) == state(processor, b) == state(processor, c) == "dead", 10, "all dead")
    stop.set()
    assert r.exists(keys.idempotency("acme", "a"), keys.idempotency("acme", "b")) == 0
    assert r.get(keys.idempotency("acme", "c")) == f"f:{c}".encode()
    # And key "b" was claimed meanwhile by a new task
    processor.pause()
    other = processor.enqueue_task("default", "acme", tasks.record, prefix + ":out", 1, key="b")
    # When both dead letters are moved back to work
    if how == "one":
        assert processor.retry_dead_task(a) and processor.retry_dead_task(b) and processor.retry_dead_task(c)
    else:
        assert processor.retry_dead_tasks("default") == 3
    assert state(processor, a) == state(processor, b) == state(processor, c) == "queued"
    # Then the retried task holds its free key again: enqueuing with it returns the retried task
    assert r.get(keys.idempotency("acme", "a")) == a.encode() and r.get(keys.idempotency("acme", "c")) == c.encode()
    assert processor.enqueue_task("default", "acme", tasks.record, prefix + ":out", 2, key="a") == a
    # And the key another task claimed meanwhile stays with that task
    assert r.get(keys.idempotency("acme", "b")) == other.encode()
    assert processor.enqueue_task("default", "acme", tasks.record, prefix + ":out", 3, key="b") == other
    assert counts(processor) == (4, 0, 0, 0)
    # And once the retried task ends, its key is given up as any keyed task's is
    assert processor.cancel_task(a) and r.exists(keys.idempotency("acme", "a")) == 0


def test_a_canceled_running_keyed_task_keeps_its_key_for_key_ttl(processor, embedded_worker, r, prefix):
    spin = prefix + ":spin"
    task_id = processor.enqueue_task("default", "acme", tasks_batch.spin_ctx, spin, 30, key="k", key_ttl=HOUR)
    embedded_worker(processor)
    wait_until(lambda: r.llen(spin + ":started"), 10, "running")
    assert processor.cancel_task(task_id)
    wait_until(lambda: state(processor, task_id) is None, 10, "aborted")
    assert processor.get_tenant_stats("acme").canceled == 1
    assert processor.enqueue_task("default", "acme", tasks.record, spin, 1, key="k") == task_id
    assert counts(processor) == (0, 0, 0, 0)


def test_batch_enqueue_with_a_key(processor, embedded_worker, r, prefix):
    out = prefix + ":out"
    processor.pause()
    # Given a queued task holding key "a"
    holder = processor.enqueue_task("default", "acme", tasks.record, out, "single", key="a")
    # When a batch enqueues tasks with keys "a" (held), "b" twice, and plain tasks around them
    ids: dict[str, str] = {}
    with processor.batch("default", "acme") as batch:
        ids["p1"] = batch.enqueue(tasks.record, out, "p1")
        ids["a"] = batch.enqueue(tasks.record, out, "a", key="a")
        ids["b1"] = batch.enqueue(tasks.record, out, "b1", key="b", key_ttl=HOUR)
        ids["b2"] = batch.enqueue(tasks.record, out, "b2", key="b")
        ids["p2"] = batch.enqueue(tasks.record, out, "p2")
    # Then a keyed task whose key is held is not added: its enqueue returns the holder's id, and
    # the batch counts only the tasks it added
    assert ids["a"] == holder and ids["b2"] == ids["b1"]
    info = processor.get_batch(batch.id)
    assert (info.total, info.remaining) == (3, 3)
    assert counts(processor) == (4, 0, 0, 0)
    # And a batch's keyed task holds its key against single enqueues too
    assert processor.enqueue_task("default", "acme", tasks.record, out, "x", key="b") == ids["b1"]
    # When they run, the batch succeeds and key "b" is held for its key_ttl
    processor.resume()
    embedded_worker(processor)
    assert processor.wait_for_batch(batch.id, 10).state == "succeeded"
    assert sorted(r.lrange(out, 0, -1)) == sorted([b"single", b"p1", b"b1", b"p2"])
    assert processor.enqueue_task("default", "acme", tasks.record, out, "x", key="b") == ids["b1"]
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "counters settle")


def test_a_batch_that_raises_gives_its_keys_up(processor, prefix):
    with pytest.raises(RuntimeError):
        with processor.batch("default", "acme") as batch:
            staged = batch.enqueue(tasks.record, prefix + ":out", 1, key="k", key_ttl=HOUR)
            raise RuntimeError("build failed")
    fresh = processor.enqueue_task("default", "acme", tasks.record, prefix + ":out", 2, key="k")
    assert fresh != staged and counts(processor) == (1, 0, 0, 0)


def test_key_and_key_ttl_are_enqueue_options_and_call_passes_them_to_the_function(processor, embedded_worker, r,
                                                                                   prefix):
    # coretask.call carries keyword arguments named like the options to the function itself
    out = prefix + ":out"
    t1 = processor.enqueue_task("default", "acme", coretask.call(tasks.record, key=out, value="via call"))
    t2 = processor.enqueue_task("default", "acme", coretask.call(tasks.record, key=out, value="again"))
    assert t1 != t2                                  # no idempotency key was given
    embedded_worker(processor)
    wait_until(lambda: sorted(r.lrange(out, 0, -1)) == [b"again", b"via call"], 10, "both ran")
    # and bad option values are refused before anything is written
    for kwargs in ({"key": ""}, {"key": 5}, {"key": "x" * 1001}, {"key_ttl": 5}, {"key": "k", "key_ttl": 0},
                   {"key": "k", "key_ttl": -1.0}, {"key": "k", "key_ttl": "1h"}):
        with pytest.raises(ConfigurationError):
            processor.enqueue_task("default", "acme", tasks.record, out, 1, **kwargs)
    with pytest.raises(ConfigurationError, match=r"\(10000 characters\)") as info:   # quoted in part
        processor.enqueue_task("default", "acme", tasks.record, out, 1, key="x" * 10_000)
    assert len(str(info.value)) < 300
