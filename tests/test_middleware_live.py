"""Middleware on a real server: what a producer and an embedded worker call, in which thread,
with what, and that middleware which raises changes nothing about the tasks. The worker runs
in this process (threads), so the middleware record in memory (tests/tasks_middleware.py)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import pytest

from coretask import BatchInfo, Options, StoreUnavailable, TaskCanceled, TaskProcessor, TaskRefused
from coretask.middleware import EnqueueMessage, WorkerInfo
from tests import tasks_middleware as tm
from tests.conftest import wait_until

ECHO = "tests.tasks_middleware:echo"


def outcomes(rec: tm.Recorder, task: str) -> list[str]:
    return [e["outcome"] for e in rec.calls("after_task", task)]


# ---------------------------------------------------------------------------------- producer

def test_enqueue_task_calls_before_and_after_enqueue_with_the_message(make_processor, prefix):
    # Given a recording middleware that also probes whether the task exists in Redis yet
    rec = tm.Recorder()
    p = make_processor(middleware=[rec], retries=2)
    rec.probe = lambda method, ctx, fields: p.get_task(fields["message"].task_id) is not None
    # When a task is enqueued
    when = time.time() + 3600
    tid = p.enqueue_task("default", "acme", tm.echo, prefix, "hi", delay_until=when)
    # Then before_enqueue saw the message before the task was written, after_enqueue after
    assert [e["method"] for e in rec.calls()] == ["before_enqueue", "after_enqueue"]
    before, after = rec.calls()
    assert (before["probe"], after["probe"]) == (False, True)
    msg = before["message"]
    assert isinstance(msg, EnqueueMessage) and after["message"] == msg
    assert (msg.task_id, msg.queue, msg.tenant, msg.target, msg.batch_id, msg.retries, msg.continue_on) == (
        tid, "default", "acme", ECHO, None, 2, None)
    assert abs(msg.due_ms - when * 1000) <= 1
    # in the producer's thread
    assert before["thread"] == after["thread"] == threading.get_ident()


def test_each_task_of_a_batch_is_announced_and_confirmed_after_the_commit(make_processor, prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec])
    # When a batch of three tasks is enqueued
    with p.batch("default", "acme") as b:
        ids = [b.enqueue(tm.echo, prefix, i, retries=i) for i in range(3)]
        # before_enqueue runs as each task is added, after_enqueue not before the commit
        assert [e["method"] for e in rec.calls()] == ["before_enqueue"] * 3
    # Then every task was confirmed after the commit, with the batch id
    assert [e["method"] for e in rec.calls()] == ["before_enqueue"] * 3 + ["after_enqueue"] * 3
    befores, afters = rec.calls("before_enqueue"), rec.calls("after_enqueue")
    assert [e["message"].task_id for e in befores] == ids
    assert sorted(e["message"].task_id for e in afters) == sorted(ids)
    for e in befores + afters:
        m = e["message"]
        assert (m.batch_id, m.target, m.queue, m.tenant, m.retries) == (b.id, ECHO, "default", "acme",
                                                                        ids.index(m.task_id))


def test_batch_continuation_is_announced_with_continue_on(make_processor, prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec])
    cont: list[str] = []
    batch_id = p.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tm.echo, prefix, 1), cont.append(b.continue_with(tm.count, prefix + ":cont", on="complete"))))
    (msg,) = [e["message"] for e in rec.calls("after_enqueue") if e["message"].task_id == cont[0]]
    assert (msg.continue_on, msg.batch_id, msg.target) == ("complete", batch_id, "tests.tasks_middleware:count")


def test_a_batch_that_is_not_committed_is_never_confirmed(make_processor, prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec])
    try:
        with p.batch("default", "acme") as b:
            b.enqueue(tm.echo, prefix, 1)
            raise KeyError("abandon the batch")
    except KeyError:
        pass
    # its task is announced, then told it was not written, with the error the caller got
    assert [e["method"] for e in rec.calls()] == ["before_enqueue", "after_enqueue"]
    (after,) = rec.calls("after_enqueue")
    assert isinstance(after["message"].error, KeyError) and after["message"].held_by is None
    assert p.get_task(after["message"].task_id) is None


def test_an_enqueue_that_raises_closes_what_before_enqueue_opened(prefix):
    rec = tm.Recorder()
    p = TaskProcessor(Options(redis="redis://127.0.0.1:1/0", middleware=[rec]))     # nothing listens there
    with pytest.raises(StoreUnavailable) as raised:
        p.enqueue_task("default", "acme", tm.echo, prefix, 1)
    p.close()
    assert [e["method"] for e in rec.calls()] == ["before_enqueue", "after_enqueue"]
    (after,) = rec.calls("after_enqueue")
    assert after["message"].error is raised.value


# ------------------------------------------------------------------------------------ worker

def test_a_succeeding_task_sees_before_task_then_after_task_with_its_result(make_processor, embedded_worker,
                                                                            prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec])
    tid = p.enqueue_task("default", "acme", tm.echo, prefix, {"answer": 42})
    embedded_worker(p)
    wait_until(lambda: rec.calls("after_task", tid), 10, "after_task")
    assert rec.methods(tid) == ["before_enqueue", "after_enqueue", "before_task", "after_task"]
    (after,) = rec.calls("after_task", tid)
    assert (after["outcome"], after["result"], after["error"], after["attempt"]) == (
        "succeeded", {"answer": 42}, None, 1)
    # before_task, the body and after_task all ran in the task's thread
    ((_, body_thread),) = tm.notes(prefix)
    (before,) = rec.calls("before_task", tid)
    assert before["thread"] == after["thread"] == body_thread != threading.get_ident()


def test_a_failing_task_gives_on_retry_then_on_dead_and_failed_each_time(make_processor, embedded_worker,
                                                                         prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec], retries=2)      # two attempts may fail
    tid = p.enqueue_task("default", "acme", tm.fail, prefix, "it broke")
    embedded_worker(p)
    wait_until(lambda: rec.calls("after_task", tid) and len(rec.calls("after_task", tid)) == 2, 10,
               "two attempts")
    assert [m for m in rec.methods(tid) if "enqueue" not in m] == ["before_task", "on_retry", "after_task",
                                    "before_task", "on_dead", "after_task"]
    assert outcomes(rec, tid) == ["failed", "failed"]
    (retry,), (dead,) = rec.calls("on_retry", tid), rec.calls("on_dead", tid)
    assert (retry["attempt"], retry["delay"]) == (1, None)            # no on_task_failed_delay: at once
    assert dead["attempt"] == 2
    for e in (retry, dead, *rec.calls("after_task", tid)):
        assert isinstance(e["error"], RuntimeError) and str(e["error"]) == "it broke"
    assert all(e["result"] is None for e in rec.calls("after_task", tid))
    wait_until(lambda: p.get_queue("default").dead == 1, 5, "dead-lettered")
    assert tm.notes(prefix) == [(tid, 1), (tid, 2)]


def test_on_retry_gets_the_delay_from_on_task_failed_delay(make_processor, embedded_worker, prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec], retries=2, on_task_failed_delay=lambda ctx, left: 0.2)
    tid = p.enqueue_task("default", "acme", tm.fail_first, prefix, 1)
    embedded_worker(p)
    wait_until(lambda: "succeeded" in outcomes(rec, tid), 10, "the second attempt")
    (retry,) = rec.calls("on_retry", tid)
    assert retry["delay"] == timedelta(seconds=0.2)
    assert outcomes(rec, tid) == ["failed", "succeeded"] and not rec.calls("on_dead", tid)
    assert rec.calls("after_task", tid)[-1]["result"] == "finally"


def test_a_refused_task_is_dead_at_once_without_a_retry(make_processor, embedded_worker, prefix):
    # Given a producer, and a worker whose allowed_modules refuse the task's module
    producer = make_processor()
    rec = tm.Recorder()
    worker = make_processor(middleware=[rec], retries=3, allowed_modules=["tests.tasks_batch"])
    tid = producer.enqueue_task("default", "acme", tm.echo, prefix, 1)
    embedded_worker(worker)
    wait_until(lambda: rec.calls("after_task", tid), 10, "after_task")
    assert rec.methods(tid) == ["before_task", "on_dead", "after_task"]
    (after,) = rec.calls("after_task", tid)
    assert after["outcome"] == "failed" and isinstance(after["error"], TaskRefused)
    assert isinstance(rec.calls("on_dead", tid)[0]["error"], TaskRefused)
    assert tm.notes(prefix) == []                       # never ran


def test_a_canceled_running_batch_task_gives_after_task_canceled(make_processor, embedded_worker, prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec])
    ids: list[str] = []
    batch_id = p.enqueue_batch("default", "acme", lambda b: ids.append(b.enqueue(tm.spin, prefix, 60, retries=2)))
    embedded_worker(p)
    wait_until(lambda: tm.notes(prefix), 10, "the task running")
    assert p.cancel_batch(batch_id)
    wait_until(lambda: rec.calls("after_task", ids[0]), 10, "after_task of the aborted task")
    (after,) = rec.calls("after_task", ids[0])
    assert (after["outcome"], after["result"]) == ("canceled", None)
    assert isinstance(after["error"], TaskCanceled)
    assert not rec.calls("on_retry") and not rec.calls("on_dead")
    info = p.wait_for_batch(batch_id, 10)
    assert (info.state, info.canceled) == ("canceled", 1)


def test_a_task_handed_back_by_pause_gives_after_task_handed_back(make_processor, embedded_worker, prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec], retries=1)
    tid = p.enqueue_task("default", "acme", tm.spin_first, prefix, 60)
    embedded_worker(p)
    wait_until(lambda: tm.notes(prefix), 10, "the task running")
    p.pause(requeue_running=True)
    wait_until(lambda: rec.calls("after_task", tid), 10, "after_task of the handed-back task")
    assert outcomes(rec, tid) == ["handed_back"]
    p.resume()
    wait_until(lambda: len(outcomes(rec, tid)) == 2, 10, "the second attempt")
    assert outcomes(rec, tid) == ["handed_back", "succeeded"]
    assert rec.calls("after_task", tid)[-1]["result"] == "attempt 2"
    assert not rec.calls("on_retry") and not rec.calls("on_dead")


def test_on_batch_end_gets_the_batch_info_once(make_processor, embedded_worker, r, prefix):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec])
    batch_id = p.enqueue_batch("default", "acme", lambda b: [b.enqueue(tm.echo, prefix, i) for i in range(3)])
    embedded_worker(p)
    p.wait_for_batch(batch_id, 10)
    wait_until(lambda: rec.calls("on_batch_end"), 10, "on_batch_end")
    wait_until(lambda: r.llen(f"{prefix}:bended") == 0, 10, "the batch-end queue drained")
    (end,) = rec.calls("on_batch_end")
    info = end["batch"]
    assert isinstance(info, BatchInfo)
    assert (info.id, info.state, info.total, info.done, info.remaining) == (batch_id, "succeeded", 3, 3, 0)


def test_on_worker_start_and_stop_once_per_worker(make_processor, embedded_worker):
    rec = tm.Recorder()
    p = make_processor(middleware=[rec], max_workers=3, queues=["high", "default"])
    # Given two embedded workers
    stops = [embedded_worker(p), embedded_worker(p)]
    wait_until(lambda: len(rec.calls("on_worker_start")) == 2, 10, "two workers started")
    assert not rec.calls("on_worker_stop")
    # When both stop
    for stop in stops:
        stop.set()
    for stop in stops:
        stop.thread.join(20)                               # type: ignore[attr-defined]
    # Then each reported its stop once, with the same WorkerInfo it started with
    started = [e["worker"] for e in rec.calls("on_worker_start")]
    stopped = [e["worker"] for e in rec.calls("on_worker_stop")]
    assert len(stopped) == 2 and sorted(w.worker_id for w in stopped) == sorted(w.worker_id for w in started)
    assert len({w.worker_id for w in started}) == 2
    for w in started:
        assert isinstance(w, WorkerInfo)
        assert (w.queues, w.threads, w.pid, w.host) == (("high", "default"), 3, os.getpid(), socket.gethostname())


def test_async_middleware_is_awaited_in_the_tasks_thread(make_processor, embedded_worker, prefix):
    mw = tm.AsyncRecorder()
    p = make_processor(middleware=[mw])
    tid = p.enqueue_task("default", "acme", tm.echo, prefix, "v")
    embedded_worker(p)
    wait_until(lambda: len(mw.records) == 2, 10, "both async methods")
    ((_, body_thread),) = tm.notes(prefix)
    assert mw.records == [("before_task", tid, body_thread), ("after_task:succeeded:v", tid, body_thread)]


def test_async_middleware_is_awaited_when_enqueueing_from_async_code(make_processor, prefix):
    seen: list[str] = []

    class AsyncEnqueue:
        async def before_enqueue(self, message):
            await asyncio.sleep(0.01)
            seen.append(message.task_id)

    p = make_processor(middleware=[AsyncEnqueue()])

    async def producer():
        tid = p.enqueue_task("default", "acme", tm.echo, prefix, 1)    # the sync API inside a loop
        return tid, list(seen)

    tid, seen_then = asyncio.run(producer())
    assert seen_then == [tid]


def test_a_raising_middleware_never_loses_nor_repeats_a_task(make_processor, embedded_worker, caplog, prefix):
    # Given a middleware whose every method raises, before a recording one
    rec = tm.Recorder()
    p = make_processor(middleware=[tm.Exploding(), rec])
    # When a batch of five tasks runs
    with caplog.at_level(logging.ERROR):
        batch_id = p.enqueue_batch("default", "acme", lambda b: [b.enqueue(tm.count, prefix) for _ in range(5)])
        embedded_worker(p)
        info = p.wait_for_batch(batch_id, 15)
        wait_until(lambda: len(rec.calls("after_task")) == 5, 10, "every after_task")
        wait_until(lambda: rec.calls("on_batch_end"), 10, "on_batch_end")
    # Then every task ran exactly once and was acknowledged; the counts reconcile
    ran = tm.notes(prefix)
    assert len(ran) == 5 and len(set(ran)) == 5
    assert (info.state, info.total, info.done, info.failed, info.canceled, info.remaining) == (
        "succeeded", 5, 5, 0, 0, 0)
    wait_until(lambda: p.get_queue("default").in_flight == 0, 5, "acknowledged")
    assert p.get_queue("default").dead == 0 and p.get_queue("default").queued == 0
    # And the middleware after it still saw everything
    assert sorted(outcomes(rec, t)[0] for t in ran) == ["succeeded"] * 5
    assert len(rec.calls("before_enqueue")) == len(rec.calls("after_enqueue")) == 5
    # And every failure was logged, naming the class and method
    logged = [rec_.getMessage() for rec_ in caplog.records if rec_.name == "coretask.middleware"]
    for method, n in (("before_enqueue", 5), ("after_enqueue", 5), ("before_task", 5), ("after_task", 5),
                      ("on_batch_end", 1)):
        assert sum(f"Exploding.{method}" in m for m in logged) == n, (method, logged)


# -------------------------------------------------------------------------- the Options hooks

def test_the_options_hooks_still_work_and_async_ones_are_awaited(make_processor, embedded_worker, prefix):
    seen: list[tuple] = []
    lock = threading.Lock()

    def hook(name):
        def fn(*args):
            with lock:
                seen.append((name, *args))
        return fn

    async def on_task_start(ctx):
        await asyncio.sleep(0)
        with lock:
            seen.append(("start", ctx))

    async def failed_delay(ctx, retries_left):
        await asyncio.sleep(0.01)
        return timedelta(seconds=1)

    p = make_processor(retries=2, on_task_start=on_task_start, on_task_end=hook("end"),
                       on_task_error=hook("error"), on_batch_end=hook("batch_end"),
                       on_task_failed_delay=failed_delay)
    ids: list[str] = []
    batch_id = p.enqueue_batch("default", "acme", lambda b: ids.append(b.enqueue(tm.fail_first, prefix, 1)))
    embedded_worker(p)
    info = p.wait_for_batch(batch_id, 15)
    wait_until(lambda: [s for s in seen if s[0] == "batch_end"], 10, "on_batch_end")
    wait_until(lambda: len([s for s in seen if s[0] == "end"]) == 2, 5, "on_task_end twice")
    assert info.done == 1
    # The async delay was honoured: the retry did not start before it
    (a1, t1), (a2, t2) = tm.notes(prefix)
    assert (a1, a2) == (1, 2) and t2 - t1 >= 0.99, t2 - t1
    # And each hook saw what it always did
    with lock:
        names = [s[0] for s in seen]
    assert names.count("start") == 2 and names.count("end") == 2 and names.count("error") == 1
    assert names.index("error") < [i for i, n in enumerate(names) if n == "end"][0]
    (_, ctx, exc), = [s for s in seen if s[0] == "error"]
    assert ctx.task_id == ids[0] and isinstance(exc, RuntimeError) and "planned failure 1" in str(exc)
    (_, end), = [s for s in seen if s[0] == "batch_end"]
    assert isinstance(end, BatchInfo) and (end.id, end.state) == (batch_id, "succeeded")


def test_hooks_are_the_innermost_layer(make_processor, embedded_worker, prefix):
    order: list[str] = []
    lock = threading.Lock()

    class Outer:
        def before_task(self, ctx):
            with lock:
                order.append("outer.before_task")

        def after_task(self, ctx, outcome, result, error):
            with lock:
                order.append("outer.after_task")

    def rec(name):
        def fn(ctx):
            with lock:
                order.append(name)
        return fn

    p = make_processor(middleware=[Outer()], on_task_start=rec("on_task_start"), on_task_end=rec("on_task_end"))
    p.enqueue_task("default", "acme", tm.echo, prefix, 1)
    embedded_worker(p)
    wait_until(lambda: len(order) == 4, 10, "four calls")
    assert order == ["outer.before_task", "on_task_start", "on_task_end", "outer.after_task"]
