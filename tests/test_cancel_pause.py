"""Cancel a batch (queued, delayed and running tasks, a stuck task's process) and pause/resume
(global, per queue, with running tasks handed back)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta

import pytest

from coretask import ConfigurationError, TaskCanceled
from coretask.worker.control import Frames
from coretask.worker.process import WorkerProcess
from tests import tasks, tasks_batch
from tests.conftest import wait_until

HOUR = timedelta(hours=1)

NEGATIVE_WINDOW = 1.2   # > 2 x base_frequency (0.5 s): time in which a fetch that should not happen would


def started(r, key: str) -> int:
    return r.llen(key + ":started")


# -------------------------------------------------------------------------------- cancel

def test_cancel_drops_queued_and_delayed_tasks_and_continuations(processor, embedded_worker, r, prefix):
    # Given a batch of 5 queued tasks, 3 delayed by 1.5 s and a continuation, and no worker yet
    out = prefix + ":out"
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (
        [b.enqueue(tasks.record, out, i) for i in range(5)],
        [b.enqueue(tasks.record, out, i, delay_until=timedelta(seconds=1.5)) for i in range(3)],
        b.continue_with(tasks.record, out, "continuation", on="complete")))
    # When it is canceled
    assert processor.cancel_batch(batch_id) is True
    # Then get_batch shows it canceled at once, every task counted canceled
    info = processor.get_batch(batch_id)
    assert (info.state, info.total, info.canceled, info.remaining, info.done) == ("canceled", 8, 8, 0, 0)
    assert info.ended is not None
    # And canceling again, or an unknown batch, or with another tenant's name, does nothing
    assert processor.cancel_batch(batch_id) is False
    assert processor.cancel_batch("no-such-batch") is False
    other = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, out, 9, delay_until=HOUR))
    assert processor.cancel_batch(other, tenant="someone-else") is False
    assert processor.get_batch(other).state == "running"
    # When a worker runs past the delayed tasks' due time
    embedded_worker(processor)
    wait_until(lambda: processor.get_queue("default").delayed == 1 and processor.get_queue("default").queued == 0,
               10, "queued and due tasks of the canceled batch dropped")
    # Then none of them (nor the continuation) ever started, and the counts did not move
    assert r.llen(out) == 0
    info = processor.get_batch(batch_id)
    assert (info.state, info.canceled, info.remaining, info.done, info.failed) == ("canceled", 8, 0, 0, 0)


def test_cancel_aborts_running_task_with_ctx_cancelled_then_task_canceled(processor, embedded_worker, r, prefix):
    # Given a running batch task looping in pure Python for 60 s, and a task of another batch
    spin, other = prefix + ":spin", prefix + ":other"
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks_batch.spin_ctx, spin, 60, retries=3), b.continue_with(tasks.count, prefix + ":cont")))
    other_id = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.sleep_then_record, other, 1.0))
    embedded_worker(processor)
    wait_until(lambda: started(r, spin) and started(r, other), 10, "both tasks running")
    # When the batch is canceled
    assert processor.cancel_batch(batch_id)
    assert processor.get_batch(batch_id).state == "canceled"
    # Then the spinning task leaves with ctx.cancelled set and TaskCanceled raised in its thread
    wait_until(lambda: r.llen(spin + ":left"), 10, "spinning task aborted")
    assert json.loads(r.lindex(spin + ":left", 0)) == {"cancelled": True, "outcome": "TaskCanceled"}
    info = processor.wait_for_batch(batch_id, 10)
    assert (info.state, info.canceled, info.remaining, info.done) == ("canceled", 1, 0, 0)
    # And the other batch's task was not touched; the canceled one was not retried or buried
    assert processor.wait_for_batch(other_id, 10).state == "succeeded"
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks")
    assert started(r, spin) == 1 and processor.get_queue("default").dead == 0
    assert r.get(prefix + ":cont") is None


def test_cancel_message_carries_the_batch_cancel_key_and_the_worker_aborts_without_reading_back(
        make_processor, embedded_worker, r, prefix):
    # Given a running batch task, and a worker whose reads of batch hashes are recorded
    spin = prefix + ":spin"
    p = make_processor()
    batch_id = p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_batch.spin_ctx, spin, 60))
    worker_side = make_processor()
    reads: list[tuple] = []
    real_hget = worker_side.gateway.transport.redis.hget
    worker_side.gateway.transport.redis.hget = lambda *a: (reads.append(a), real_hget(*a))[1]   # type: ignore[method-assign]
    embedded_worker(worker_side)
    wait_until(lambda: started(r, spin), 10, "task running")
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(f"{prefix}:ev")
    # When the batch is canceled
    assert p.cancel_batch(batch_id)
    # Then the message names the batch and the random key stored with it at commit
    key = r.hget(f"{prefix}:b:{batch_id}", "ck").decode()
    assert len(key) == 24
    deadline = time.monotonic() + 5
    messages = []
    while time.monotonic() < deadline and not messages:
        m = listener.get_message(timeout=0.2)
        if m and m["data"].startswith(b"c:"):
            messages.append(m["data"].decode())
    listener.close()
    assert messages == [f"c:{batch_id}:{key}"]
    # And the worker aborted the task on the key alone, without reading the batch's state
    wait_until(lambda: r.llen(spin + ":left"), 10, "spinning task aborted")
    assert json.loads(r.lindex(spin + ":left", 0)) == {"cancelled": True, "outcome": "TaskCanceled"}
    assert not [a for a in reads if a[0] == f"{prefix}:b:{batch_id}"], reads


def test_task_that_turns_its_abort_into_an_error_is_counted_canceled_not_retried(processor, embedded_worker, r, prefix):
    # Given a running task with 3 retries that raises ValueError when aborted
    key = prefix + ":k"
    batch_id = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_batch.spin_then_fail, key, 60,
                                                                             retries=3))
    embedded_worker(processor)
    wait_until(lambda: started(r, key), 10, "task running")
    # When its batch is canceled
    assert processor.cancel_batch(batch_id)
    # Then it is counted canceled, never retried, never dead-lettered
    info = processor.wait_for_batch(batch_id, 10)
    assert (info.canceled, info.failed, info.remaining) == (1, 0, 0)
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks")
    q = processor.get_queue("default")
    assert (q.queued, q.delayed, q.dead, started(r, key)) == (0, 0, 0, 1)


def test_cancel_ends_process_of_blocked_task_after_grace_and_hands_back_others(processor, start_manager, r, prefix):
    # Given one worker process (4 threads, cancel_grace 1 s) running a batch's pure-Python task
    # and its task blocked in time.sleep(60), plus two tasks of no batch, sleeping on their first attempt
    spin, block, plain = prefix + ":spin", prefix + ":block", prefix + ":plain"
    m = start_manager(processes=1, threads=4, cancel_grace=1.0)
    (child,) = m.wait_children(1)
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks_batch.spin_ctx, spin, 60), b.enqueue(tasks.block, block, 60)))
    plain_ids = [processor.enqueue_task("default", "acme", tasks_batch.first_attempt_long, f"{plain}{i}", 60, True,
                                        retries=2) for i in range(2)]
    wait_until(lambda: started(r, spin) and started(r, block) and all(started(r, f"{plain}{i}") for i in range(2)),
               20, "four tasks running")
    # When the batch is canceled
    assert processor.cancel_batch(batch_id)
    assert processor.get_batch(batch_id).state == "canceled"
    # Then the spinning task is aborted at once; the blocked one ends with its process after the grace
    wait_until(lambda: r.llen(spin + ":left"), 10, "spinning task aborted")
    assert json.loads(r.lindex(spin + ":left", 0)) == {"cancelled": True, "outcome": "TaskCanceled"}
    m.wait_ended(child, 15)
    new = wait_until(lambda: [c for c in m.children() if c.pid != child.pid], 20, "replacement worker process")
    # And the batch counts both tasks canceled, neither finished
    info = processor.wait_for_batch(batch_id, 10)
    assert (info.state, info.canceled, info.remaining, info.done, info.failed) == ("canceled", 2, 0, 0, 0)
    assert r.llen(block + ":finished") == 0
    # And the other in-flight tasks were handed back without consuming a retry and complete later
    wait_until(lambda: all(r.llen(f"{plain}{i}:finished") for i in range(2)), 20, "handed-back tasks complete")
    for i in range(2):
        starts = [json.loads(x) for x in r.lrange(f"{plain}{i}:started", 0, -1)]
        # (ctx.retries_left: what is left should the attempt fail; retries=2 leaves 1 on both)
        assert [(a, left) for a, left, _ in starts] == [(1, 1), (2, 1)]
        assert starts[1][2] == new[0].pid
        assert [json.loads(x) for x in r.lrange(f"{plain}{i}:finished", 0, -1)] == [[2, 1]]
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks")
    q = processor.get_queue("default")
    assert (q.queued, q.dead, q.delayed) == (0, 0, 0)
    assert all(processor.get_task(t) is None for t in plain_ids)   # completed tasks are deleted
    assert "ignored its abort" in m.log()


def test_manager_ends_a_process_whose_canceled_task_holds_the_gil(processor, start_manager, r, prefix):
    # Given one worker process (4 threads, cancel_grace 1 s) running three tasks of one batch: a
    # regex backtracking in C while holding the GIL (nothing else in the process runs, not even its
    # own abort watch), a cooperative pure-Python loop and a time.sleep(60); and a task of no batch
    regex, spin, block, plain = prefix + ":regex", prefix + ":spin", prefix + ":block", prefix + ":plain"
    m = start_manager(processes=1, threads=4, cancel_grace=1.0)
    (child,) = m.wait_children(1)
    plain_id = processor.enqueue_task("default", "acme", tasks_batch.first_attempt_long, plain, 30, False, retries=0)
    wait_until(lambda: started(r, plain), 20, "the plain task running")
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks_batch.spin_ctx, spin, 60), b.enqueue(tasks.block, block, 60)))
    wait_until(lambda: started(r, spin) and started(r, block), 20, "spin and block running")
    processor.append_batch("default", "acme", batch_id, lambda b: b.enqueue(tasks_batch.catastrophic_regex, regex))
    wait_until(lambda: started(r, regex), 20, "the regex running")
    # When the batch is canceled
    assert processor.cancel_batch(batch_id)
    # Then the manager ends the process within about a second after the grace, the batch counts
    # its three tasks canceled, and none of them finished
    m.wait_ended(child, 20)
    info = processor.wait_for_batch(batch_id, 15)
    assert (info.state, info.canceled, info.remaining, info.done, info.failed) == ("canceled", 3, 0, 0, 0)
    assert r.llen(regex + ":finished") == 0 and r.llen(block + ":finished") == 0
    assert "ignored its abort (batch canceled)" in m.log()
    # And a new process took over, and the task of no batch was handed back without consuming a
    # retry (retries=0: a charged crash would have dead-lettered it) and completed there
    new = wait_until(lambda: [c for c in m.children() if c.pid != child.pid], 20, "replacement worker process")
    wait_until(lambda: r.llen(plain + ":finished"), 20, "the handed-back task completes")
    starts = [json.loads(x) for x in r.lrange(plain + ":started", 0, -1)]
    assert [(a, left) for a, left, _ in starts] == [(1, 0), (2, 0)] and starts[1][2] == new[0].pid
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks")
    q = processor.get_queue("default")
    assert (q.queued, q.dead, q.delayed) == (0, 0, 0) and processor.get_task(plain_id) is None


def test_embedded_worker_lets_a_blocked_aborted_task_run_out_without_handing_back_others(
        make_processor, embedded_worker, r, prefix):
    # Given an embedded worker (threads only, cancel_grace 0.3 s) running a batch task blocked in
    # time.sleep(2) and a task of no batch sleeping 2.5 s
    p = make_processor(cancel_grace=0.3)
    block, plain = prefix + ":block", prefix + ":plain"
    batch_id = p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.block, block, 2))
    p.enqueue_task("default", "acme", tasks.sleep_then_record, plain, 2.5)
    embedded_worker(p)
    wait_until(lambda: started(r, block) and started(r, plain), 10, "both tasks running")
    # When the batch is canceled (the process cannot be ended for one stuck thread)
    assert p.cancel_batch(batch_id)
    # Then the blocked task runs out and is counted canceled, and the other task ran exactly once
    info = p.wait_for_batch(batch_id, 10)
    assert (info.state, info.canceled, info.done) == ("canceled", 1, 0)
    wait_until(lambda: r.llen(plain) == 1 and p.get_queue("default").in_flight == 0, 10, "other task done")
    assert started(r, plain) == 1 and p.get_queue("default").queued == 0


def test_forged_cancel_or_requeue_message_aborts_nothing(processor, embedded_worker, r, prefix):
    # Given a running batch task that spins for 1.5 s
    key = prefix + ":spin"
    batch_id = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_batch.spin_ctx, key, 1.5))
    embedded_worker(processor)
    wait_until(lambda: started(r, key), 10, "task running")
    # (the control thread subscribes concurrently with the first fetch: "x" only wakes the loop)
    wait_until(lambda: r.publish(f"{prefix}:ev", "x") >= 1, 10, "the worker subscribed")
    # When someone publishes "c:<batch>", "c:<batch>:<a made-up cancel key>" and "pr" on the
    # events channel without canceling or pausing
    assert r.publish(f"{prefix}:ev", f"c:{batch_id}") >= 1
    assert r.publish(f"{prefix}:ev", f"c:{batch_id}:{'0' * 24}") >= 1
    assert r.publish(f"{prefix}:ev", f"c:{batch_id}:") >= 1
    assert r.publish(f"{prefix}:ev", "pr") >= 1
    # Then the task runs to its end and the batch succeeds
    info = processor.wait_for_batch(batch_id, 10)
    assert (info.state, info.done, info.canceled) == ("succeeded", 1, 0)
    assert json.loads(r.lindex(key + ":left", 0)) == {"cancelled": False, "outcome": "returned"}


def test_a_cancel_missed_while_unsubscribed_aborts_the_task_on_resubscription(make_processor, r, prefix):
    # Given a worker running a spinning batch task, whose control thread drops cancel messages
    # (as if they were published while its subscription was down)
    key = prefix + ":spin"
    p = make_processor()
    w = WorkerProcess(p, renew_own_leases=True)
    dropped: list[str] = []
    handle = w.control.handle
    w.control.handle = lambda m, c="": dropped.append(m) if m.startswith("c:") else handle(m, c)  # type: ignore
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    thread.start()
    try:
        batch_id = p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_batch.spin_ctx, key, 30))
        wait_until(lambda: started(r, key), 10, "task running")
        # When the batch is canceled and the message is lost
        assert p.cancel_batch(batch_id)
        wait_until(lambda: dropped, 10, "the cancel message reached the worker (and was dropped)")
        assert r.llen(key + ":left") == 0
        # ... and the subscription is then cut, so that the worker subscribes again
        kill = {"target_nodes": "all"} if p.options.cluster else {}
        assert r.client_kill_filter(_type="pubsub", **kill)
        # Then on resubscribing it finds the batch canceled and aborts the task
        wait_until(lambda: r.llen(key + ":left"), 10, "the task aborted")
        assert json.loads(r.lindex(key + ":left", 0)) == {"cancelled": True, "outcome": "TaskCanceled"}
        wait_until(lambda: p.get_batch(batch_id).canceled == 1, 10, "counted canceled")
    finally:
        stop.set()
        thread.join(15)


# --------------------------------------------------------------------------------- pause

def test_pause_stops_every_worker_and_resume_runs_all(processor, start_manager, r, prefix):
    # Given 2 worker processes that are running tasks
    out = prefix + ":out"
    m = start_manager(processes=2, threads=2)
    m.wait_children(2)
    processor.enqueue_task("default", "acme", tasks.record, out, -1)
    wait_until(lambda: r.llen(out) == 1, 20, "workers up")
    wait_until(lambda: len(processor.get_workers()) == 2, 10, "2 worker heartbeats")
    # When everything is paused and 50 tasks are enqueued
    processor.pause()
    assert processor.is_paused
    for i in range(50):
        processor.enqueue_task("default", "acme", tasks.record, out, i)
    time.sleep(NEGATIVE_WINDOW)
    # Then no worker fetched any of them
    assert r.llen(out) == 1
    q = processor.get_queue("default")
    assert (q.queued, q.in_flight) == (50, 0)
    # When resumed, all of them run
    processor.resume()
    assert not processor.is_paused
    wait_until(lambda: r.llen(out) == 51, 20, "all 50 tasks")


def test_a_paused_manager_takes_nothing_while_other_workers_take_its_share(processor, start_manager,
                                                                           embedded_worker, r, prefix):
    # Given a worker manager of 2 processes, and a worker in this process (another manager)
    out, host = prefix + ":out", socket.gethostname()
    m = start_manager(processes=2, threads=2)
    m.wait_children(2)
    wait_until(lambda: len(processor.get_workers()) == 2, 10, "2 worker heartbeats")
    manager = f"{host}:{m.pid}"
    # When that manager is paused (by a process id of it: its manager is what pauses)
    child = next(w.id for w in processor.get_worker_states() if w.manager == manager)
    assert processor.pause_worker(child) == 2
    assert processor.get_paused_workers() == [manager]
    states = processor.get_worker_states()
    assert [w.paused for w in states] == [True, True] and {w.manager for w in states} == {manager}
    stop = embedded_worker(processor)
    for i in range(30):
        processor.enqueue_task("default", "acme", tasks.record_pid, out, i)
    # Then every task runs in the other worker
    wait_until(lambda: r.llen(out) == 30, 20, "30 tasks")
    assert {v.decode().split(":")[1] for v in r.lrange(out, 0, -1)} == {str(os.getpid())}
    # And a whole host pauses every manager on it: a fetch as any process there leases nothing
    assert processor.pause_worker(host) == 3
    processor.enqueue_task("default", "acme", tasks.record_pid, out, "held")
    held = processor.gateway.fetch(f"{host}:1:x", 4, 60_000, 0, ["default"])
    assert held.paused and held.tasks == []
    # When the other worker has stopped (before the host resumes: it would take the held task)
    # and the manager is resumed, the manager runs the rest
    stop.set()
    stop.thread.join(20)
    assert not stop.thread.is_alive()
    processor.resume_worker(host)
    processor.resume_worker(manager)
    assert processor.get_paused_workers() == [] and not any(w.paused for w in processor.get_worker_states())
    for i in range(10):
        processor.enqueue_task("default", "acme", tasks.record_pid, out, 100 + i)
    wait_until(lambda: r.llen(out) == 41, 20, "the held task and 10 more")
    children = {str(c.pid) for c in m.children()}
    assert {v.decode().split(":")[1] for v in r.lrange(out, 30, -1)} <= children


def test_pause_worker_refuses_a_name_that_is_no_worker_name(processor):
    for bad in ("", "web 1", 7):
        with pytest.raises(ConfigurationError, match="is not a worker name"):
            processor.pause_worker(bad)
    assert processor.pause_worker("web-9") == 0 and processor.get_paused_workers() == ["web-9"]


def test_workers_started_while_paused_start_paused(processor, embedded_worker, r, prefix):
    # Given a paused processor with queued tasks
    out = prefix + ":out"
    processor.pause()
    for i in range(5):
        processor.enqueue_task("default", "acme", tasks.record, out, i)
    # When a worker starts
    embedded_worker(processor)
    time.sleep(NEGATIVE_WINDOW)
    # Then it takes nothing until resume()
    assert r.llen(out) == 0 and processor.get_queue("default").queued == 5
    processor.resume()
    wait_until(lambda: r.llen(out) == 5, 10, "tasks after resume")


def test_pause_queue_refuses_a_queue_the_deployment_does_not_have(make_processor, r, prefix):
    p = make_processor(queues=["default", "low"])
    # A misspelt name is refused with the queue it resembles; nothing is paused
    with pytest.raises(ConfigurationError, match="queue 'defualt' is not a queue of this deployment.*did you mean "
                                                 "'default'"):
        p.pause_queue("defualt")
    assert p.get_paused_queues() == []
    # A queue that held work (fed by another deployment's producer) can be paused, as can a configured one
    make_processor(strict_queues=False).enqueue_task("elsewhere", "acme", tasks.record, prefix + ":x", 1)
    p.pause_queue("elsewhere")
    p.pause_queue("low")
    # ... and any name by a producer that feeds other deployments (strict_queues off)
    make_processor(strict_queues=False).pause_queue("theirs")
    assert p.get_paused_queues() == ["elsewhere", "low", "theirs"]


def test_pause_queue_stops_only_that_queue(make_processor, embedded_worker, r, prefix):
    # Given a worker serving queues a and b, with queue a paused
    p = make_processor(queues=["a", "b"])
    p.pause_queue("a")
    assert p.get_paused_queues() == ["a"] and not p.is_paused
    embedded_worker(p)
    # When tasks are enqueued to both queues
    for i in range(5):
        p.enqueue_task("a", "acme", tasks.record, prefix + ":a", i)
        p.enqueue_task("b", "acme", tasks.record, prefix + ":b", i)
    # Then queue b runs while queue a waits
    wait_until(lambda: r.llen(prefix + ":b") == 5, 10, "queue b")
    time.sleep(NEGATIVE_WINDOW)
    assert r.llen(prefix + ":a") == 0 and p.get_queue("a").paused and p.get_queue("a").queued == 5
    # When queue a is resumed, its tasks run
    p.resume_queue("a")
    assert p.get_paused_queues() == []
    wait_until(lambda: r.llen(prefix + ":a") == 5, 10, "queue a after resume")


def test_running_tasks_finish_when_paused(processor, embedded_worker, r, prefix):
    # Given a running task that sleeps 1 s
    key = prefix + ":k"
    processor.enqueue_task("default", "acme", tasks.sleep_then_record, key, 1.0)
    embedded_worker(processor)
    wait_until(lambda: started(r, key), 10, "task running")
    # When everything is paused
    processor.pause()
    # Then the running task still finishes
    wait_until(lambda: r.llen(key) == 1, 10, "running task finished")
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "ack")
    assert processor.get_queue("default").queued == 0


def test_pause_requeue_running_hands_tasks_back_without_a_retry(processor, embedded_worker, r, prefix):
    # Given two running tasks with 2 retries each, long on their first attempt
    keys = [f"{prefix}:t{i}" for i in range(2)]
    ids = [processor.enqueue_task("default", "acme", tasks_batch.first_attempt_long, k, 60, False, retries=2)
           for k in keys]
    embedded_worker(processor)
    wait_until(lambda: all(started(r, k) for k in keys), 10, "tasks running")
    # When everything is paused with requeue_running
    processor.pause(requeue_running=True)
    # Then both are aborted and back in the queue, with their retries untouched
    wait_until(lambda: processor.get_queue("default").queued == 2, 10, "tasks handed back")
    assert processor.get_queue("default").in_flight == 0
    for t in ids:
        info = processor.get_task(t)
        assert (info.state, info.retries_left) == ("queued", 2)
    time.sleep(NEGATIVE_WINDOW)
    assert all(started(r, k) == 1 for k in keys)       # not run again while paused
    # When resumed, they run again (attempt 2, retries still untouched: ctx.retries_left, what is
    # left should the attempt fail, is 1 on both attempts) and complete
    processor.resume()
    wait_until(lambda: all(r.llen(k + ":finished") for k in keys), 10, "tasks complete after resume")
    for k in keys:
        assert [json.loads(x)[:2] for x in r.lrange(k + ":started", 0, -1)] == [[1, 1], [2, 1]]
    assert processor.get_queue("default").dead == 0


def test_task_threads_run_under_sched_batch_unless_disabled(make_processor, embedded_worker, r, prefix):
    # Given two workers on different queues, one with the default options, one with sched_batch off
    default = make_processor(queues=["on"])
    off = make_processor(queues=["off"], sched_batch=False)
    embedded_worker(default)
    embedded_worker(off)
    # When each runs a task that reads its thread's scheduling policy
    default.enqueue_task("on", "acme", tasks_batch.record_sched_policy, prefix + ":on")
    off.enqueue_task("off", "acme", tasks_batch.record_sched_policy, prefix + ":off")
    wait_until(lambda: r.llen(prefix + ":on") and r.llen(prefix + ":off"), 10, "both tasks ran")
    # Then the default worker's task thread is SCHED_BATCH (the worker's own threads preempt it)
    assert int(r.lindex(prefix + ":on", 0)) == os.SCHED_BATCH
    # And with sched_batch=False the thread keeps the ordinary policy
    assert int(r.lindex(prefix + ":off", 0)) == os.SCHED_OTHER


def test_ctx_cancelled_reads_set_from_the_abort_mark_and_wakes_waiters(processor):
    # Given two task contexts: one whose event a thread already waits on, one never looked at
    from coretask.context import TaskContext
    waited, fresh = (TaskContext(task_id=t, queue="q", tenant="acme", target="x", attempt=1, retries_left=0,
                                 batch_id=None, gateway=processor.gateway) for t in ("t1", "t2"))
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(waited.cancelled.wait(30)))
    waiter.start()
    # When both are aborted (the mark first, then the wake-up, as the control thread does)
    for ctx in (waited, fresh):
        ctx._mark_aborted()
    # Then both read as cancelled at once, before any wake-up
    assert waited.cancelled.is_set() and fresh.cancelled.is_set()
    with pytest.raises(TaskCanceled):
        fresh.raise_if_cancelled()
    # And the waiting thread returns True once woken, long before its 30 s timeout
    waited._wake_cancelled()
    waiter.join(10)
    assert woke == [True]


def test_control_thread_stop_ends_its_blocking_read(processor):
    # Given a worker's control thread, subscribed and blocked reading its socket (no timeout)
    w = WorkerProcess(processor)
    w.control.start()
    assert w.control.subscribed.wait(10)
    # When it is stopped
    w.control.stop()
    # Then the thread has ended (stop() shuts the socket down; it waits at most 3 s)
    assert not w.control._thread.is_alive()


# ----------------------------------------------------------------- the subscription reader

def test_the_subscription_reader_parses_frames_split_at_any_byte():
    # Given what a subscribed connection receives: the confirmation, two messages (RESP2) and
    # a RESP3 push, as one byte stream
    stream = (b"*3\r\n$9\r\nsubscribe\r\n$4\r\nct:e\r\n:1\r\n"
              b"*3\r\n$7\r\nmessage\r\n$4\r\nct:e\r\n$13\r\nc:b1:k\r\ney\r\nz\r\n"
              b"*3\r\n$7\r\nmessage\r\n$4\r\nct:e\r\n$2\r\npr\r\n"
              b">3\r\n$7\r\nmessage\r\n$4\r\nct:e\r\n$0\r\n\r\n")
    expected = [[b"subscribe", b"ct:e", 1], [b"message", b"ct:e", b"c:b1:k\r\ney\r\nz"],
                [b"message", b"ct:e", b"pr"], [b"message", b"ct:e", b""]]
    # When it arrives whole, byte by byte, or cut at every position
    assert Frames().feed(stream) == expected
    frames, got = Frames(), []
    for i in range(len(stream)):
        got += frames.feed(stream[i:i + 1])
    assert got == expected
    for cut in range(len(stream)):
        frames = Frames()
        # Then the same frames come out, each once, a payload containing CRLF intact
        assert frames.feed(stream[:cut]) + frames.feed(stream[cut:]) == expected
    # And a frame of a type a subscription never receives is reported, not skipped
    with pytest.raises(ConnectionError, match="unexpected reply"):
        Frames().feed(b"!5\r\nboom!\r\n")


def test_the_control_thread_resyncs_only_once_the_server_confirmed_every_channel(processor):
    # Given a worker's control thread reading a socket it was handed, before the server's
    # confirmation of its two channels (redis-py's subscribe() returns once the command is sent)
    w = WorkerProcess(processor)
    seen: list[str] = []
    w.control._resync = lambda: seen.append("resync")      # type: ignore[method-assign]
    w.control.handle = lambda message, channel="": seen.append(message)   # type: ignore[method-assign]
    ours, server = socket.socketpair()
    reader = threading.Thread(target=w.control._read, args=(ours, {b"ct:e", b"ct:f"}), daemon=True)
    reader.start()
    try:
        # When the first confirmation arrives: not subscribed yet, nothing re-read
        server.sendall(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nct:e\r\n:1\r\n")
        assert not w.control.subscribed.wait(0.2) and seen == []
        # Then the second, and a message behind it: the state is re-read first, then the message
        server.sendall(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nct:f\r\n:2\r\n"
                       b"*3\r\n$7\r\nmessage\r\n$4\r\nct:f\r\n$1\r\np\r\n")
        assert w.control.subscribed.wait(10)
        wait_until(lambda: seen == ["resync", "p"], 10, "resync, then the message")
    finally:
        w.control._stop.set()
        server.close()
        reader.join(10)
    assert not reader.is_alive()


# ------------------------------------------------------------- forged messages, every state

def forged_messages(batch_id: str) -> list[str]:
    """Every message type the control thread knows, as someone who can publish but not write
    the coretask keys would send them: events, pause/resume, a requeue, and cancels of a running
    batch without its key, with a made-up key, and of an unknown batch."""
    return ["p", "r", "pr", "s", "d", "f:default", f"c:{batch_id}", f"c:{batch_id}:{'0' * 24}",
            f"c:{batch_id}:", "c:no-such-batch", "zz"]


@pytest.mark.parametrize("state", ["running", "paused", "paused with requeue", "canceled"])
def test_no_forged_message_changes_anything_in_any_state(make_processor, r, prefix, state):
    # Given a worker whose control thread records what it handled and whose loop records, per
    # fetch, how many messages had been handled before it and whether it found the pause
    p = make_processor()
    w = WorkerProcess(p, renew_own_leases=True)
    handled: list[str] = []
    fetches: list[tuple[int, bool, int]] = []      # (messages handled before, paused, tasks leased)
    handle, exchange = w.control.handle, p.gateway.exchange

    def recording_handle(message: str, channel: str = "") -> None:
        handle(message, channel)
        handled.append(message)

    def recording_exchange(*args: object, **kwargs: object):
        before = len(handled)
        reply = exchange(*args, **kwargs)           # type: ignore[arg-type]
        fetches.append((before, reply.paused, len(reply.tasks)))
        return reply

    w.control.handle = recording_handle             # type: ignore[method-assign]
    p.gateway.exchange = recording_exchange         # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(w.control.subscribed.is_set, 10, "the worker subscribed")
        # and two running batch tasks, A and C, that spin for 3 s
        a_key, c_key = prefix + ":a", prefix + ":c"
        a = p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_batch.spin_ctx, a_key, 3.0))
        c = p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_batch.spin_ctx, c_key, 3.0))
        wait_until(lambda: started(r, a_key) == 1 and started(r, c_key) == 1, 10, "A and C running")
        # and the state under test, reached through the API
        if state == "paused":
            p.pause()
        elif state == "paused with requeue":
            p.pause(requeue_running=True)
            wait_until(lambda: r.llen(a_key + ":left") == 1 and r.llen(c_key + ":left") == 1, 10,
                       "A and C handed back")
        elif state == "canceled":
            assert p.cancel_batch(a)
            wait_until(lambda: r.llen(a_key + ":left") == 1, 10, "A aborted by its cancel")
        queued = p.enqueue_task("default", "acme", tasks.record, prefix + ":q", "late")
        legit = len(handled)

        # When every message type is forged (cancels naming C, the batch that must survive)
        forged = forged_messages(c)
        for message in forged:
            assert r.publish(f"{prefix}:ev", message) >= 1
        wait_until(lambda: len(handled) >= legit + len(forged), 10, "every forged message handled")
        wait_until(lambda: any(before >= legit + len(forged) for before, _, _ in fetches), 10,
                   "a fetch after the forged messages")

        # Then nothing changed: the pause holds (or never came), no running task was aborted
        # by a message, and a paused worker leased nothing
        after = [(paused, n) for before, paused, n in fetches if before >= legit + len(forged)]
        paused = state in ("paused", "paused with requeue")
        assert p.is_paused is paused
        assert all(pz == paused for pz, _ in after)
        if paused:
            assert all(n == 0 for _, n in after) and r.llen(prefix + ":q") == 0
            p.resume()
        info_c = p.wait_for_batch(c, 20)
        assert (info_c.state, info_c.done, info_c.canceled) == ("succeeded", 1, 0)
        info_a = p.wait_for_batch(a, 20)
        if state == "canceled":
            assert (info_a.state, info_a.canceled) == ("canceled", 1)
        else:
            assert (info_a.state, info_a.done) == ("succeeded", 1)
        # the runs that ended by a message: only the legitimate requeue and cancel
        left = {k: [json.loads(x)["outcome"] for x in r.lrange(k + ":left", 0, -1)] for k in (a_key, c_key)}
        expected = {"running": ([], []), "paused": ([], []), "canceled": (["TaskCanceled"], []),
                    "paused with requeue": (["TaskCanceled"], ["TaskCanceled"])}[state]
        assert [o for o in left[a_key] if o != "returned"] == expected[0]
        assert [o for o in left[c_key] if o != "returned"] == expected[1]
        wait_until(lambda: r.llen(prefix + ":q") == 1 and p.get_task(queued) is None, 10, "the queued task ran")
    finally:
        stop.set()
        thread.join(30)
