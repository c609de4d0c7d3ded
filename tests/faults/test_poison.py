"""Poison tasks in a real worker process: BaseException subclasses (SystemExit, KeyboardInterrupt,
sys.exit, an application's own), a task returning a huge object, and exceptions whose __str__
fails. In each case the worker process and all its threads survive, the task is retried or
dead-lettered like any failure, and other work goes on.

(A payload over max_payload_bytes, an unimportable target, a corrupted payload and a task that
kills its own process are covered elsewhere: see tests/faults/__init__.py.)
"""
from __future__ import annotations

import psutil

from tests import tasks_faults as tf
from tests import tasks_worker as tw
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts


def counts(p, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


def both_threads_serve(processor, r, key: str) -> None:
    """Four 0.4 s tasks on a 2-thread process: both threads ran at once (none died), and all
    four are acknowledged (the body's last write comes before the acknowledgement)."""
    for _ in range(4):
        processor.enqueue_task("default", "acme", tw.concurrency, key, 0.4)
    wait_until(lambda: int(r.get(key + ":done") or 0) == 4, 20, "the probe tasks")
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 10, "the probes acknowledged")
    assert int(r.get(key + ":max")) == 2


def test_base_exceptions_are_failures_and_the_worker_threads_survive(processor, start_manager, r, prefix):
    # Given one worker process with 2 threads
    key = prefix + ":base"
    m = start_manager(processes=1, threads=2)
    (child,) = m.wait_children(1)
    kinds = ["SystemExit", "KeyboardInterrupt", "exit", "PlannedBaseException"]

    # When tasks raise SystemExit, KeyboardInterrupt, sys.exit("...") and a BaseException
    # subclass of their own (retries=2: two attempts each)
    ids = {kind: processor.enqueue_task("default", "acme", tf.raise_base, key, kind, retries=2) for kind in kinds}

    # Then each is retried once, then dead-lettered with its exception, like any failure
    wait_until(lambda: counts(processor) == (0, 0, 0, 4), 20, "four dead letters")
    assert hash_counts(r, key + ":attempts") == {kind: 2 for kind in kinds}
    dead = {d.id: d for d in processor.get_dead_tasks("default")}
    assert {d.error_type for d in dead.values()} == {"SystemExit", "KeyboardInterrupt", "PlannedBaseException"}
    assert dead[ids["SystemExit"]].error_message == "3"
    assert dead[ids["exit"]].error_message == "planned sys.exit"
    assert dead[ids["PlannedBaseException"]].error_message == "planned, attempt 2"
    assert all(d.retries_left == 0 for d in dead.values())
    # ... in the same worker process, whose two threads both still serve
    assert {int(p) for p in r.smembers(key + ":pids")} == {child.pid}
    both_threads_serve(processor, r, prefix + ":probe")
    assert [c.pid for c in m.children()] == [child.pid]
    assert "died" not in m.log()
    assert processor.get_tenant_stats("acme").dead == 4
    assert m.terminate() == 0


def test_a_task_returning_a_huge_object_completes_and_the_object_is_dropped(processor, start_manager, r, prefix):
    # Given one worker process with 2 threads, its memory measured once warm
    key = prefix + ":huge"
    m = start_manager(processes=1, threads=2)
    (child,) = m.wait_children(1)
    both_threads_serve(processor, r, prefix + ":warm")
    before = psutil.Process(child.pid).memory_info().rss

    # When a task returns a 300 MiB object
    processor.enqueue_task("default", "acme", tf.huge_result, key, 300, retries=0)

    # Then it completes once, the object is not kept (no result backend), and the process
    # goes on serving with both threads
    wait_until(lambda: int(r.get(key + ":runs") or 0) == 1, 20, "the task ran")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 20, "the task acknowledged")
    both_threads_serve(processor, r, prefix + ":after")
    after = psutil.Process(child.pid).memory_info().rss
    assert after - before < 64 * 1024 * 1024, (before, after)
    assert [c.pid for c in m.children()] == [child.pid]
    assert processor.get_tenant_stats("acme").done == 9
    assert m.terminate() == 0


def test_exceptions_whose_str_fails_are_dead_lettered_with_a_placeholder(processor, start_manager, r, prefix):
    # Given one worker process with 2 threads
    key = prefix + ":unprintable"
    m = start_manager(processes=1, threads=2)
    (child,) = m.wait_children(1)

    # When tasks raise an exception whose __str__ (and __repr__) raise, and one whose __str__
    # returns a non-string (retries=2: two attempts each)
    a = processor.enqueue_task("default", "acme", tf.raise_unprintable, key, "raises", retries=2)
    b = processor.enqueue_task("default", "acme", tf.raise_unprintable, key, "not-a-string", retries=2)

    # Then both are retried, then dead-lettered with their type and a placeholder message
    wait_until(lambda: counts(processor) == (0, 0, 0, 2), 20, "two dead letters")
    assert hash_counts(r, key + ":attempts") == {"raises": 2, "not-a-string": 2}
    dead = {d.id: d for d in processor.get_dead_tasks("default")}
    assert dead[a].error_type == "Unprintable"
    assert dead[b].error_type == "NotAString"
    for d in dead.values():
        assert d.error_message == f"<unprintable {d.error_type} object>"
    # ... and the worker goes on with both threads
    both_threads_serve(processor, r, prefix + ":probe")
    assert [c.pid for c in m.children()] == [child.pid]
    assert m.terminate() == 0
