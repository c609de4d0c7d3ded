"""Single-task operations: cancel_task, delete_task, retry_dead_task and discard_dead_task in
every state a task can be in (queued, delayed, waiting continuation, running, dead, finished,
unknown), their counters, the tenant view's ownership checks, the worker's side of a single
cancel (abort, forged messages, a cancel heard before the task was admitted, a GIL-holding
task ended by the manager) and cancel_task racing completion."""
from __future__ import annotations

import json
import random
import threading
import time
from datetime import timedelta

import pytest

from coretask.gateway import Leased
from coretask.worker.ledger import Ledger, Task
from tests import tasks, tasks_batch, tasks_control, tasks_ops
from tests.conftest import wait_until

HOUR = timedelta(hours=1)


def counts(p, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


def tstats(p, tenant: str = "acme") -> tuple[int, int, int, int]:
    s = p.get_tenant_stats(tenant)
    return s.done, s.failed, s.canceled, s.dead


def state(p, task_id: str) -> str | None:
    info = p.get_task(task_id)
    return None if info is None else info.state


def dead_task(p, embedded_worker, message: str = "boom", tenant: str = "acme", worker=True) -> str:
    task_id = p.enqueue_task("default", tenant, tasks.always_fail, message, retries=0)
    if worker:
        embedded_worker(p)
    wait_until(lambda: state(p, task_id) == "dead", 10, "a dead task")
    return task_id


def invariant(info) -> bool:
    return info.total == info.done + info.failed + info.canceled + info.remaining


# ---------------------------------------------------------------------------- cancel_task

def test_cancel_queued_delayed_and_waiting_tasks_they_never_start(processor, embedded_worker, r, prefix):
    # Given, with no worker yet, a queued task, a delayed task (1.5 s), a task of a batch whose
    # other task is delayed by an hour, and that batch's continuation
    out = prefix + ":out"
    queued = processor.enqueue_task("default", "acme", tasks.record, out, "queued")
    delayed = processor.enqueue_task("default", "acme", tasks.record, out, "delayed",
                                     delay_until=timedelta(seconds=1.5))
    ids = {}
    batch_id = processor.enqueue_batch("default", "acme", lambda b: ids.update(
        member=b.enqueue(tasks.record, out, "member"),
        later=b.enqueue(tasks.record, out, "later", delay_until=HOUR),
        cont=b.continue_with(tasks.record, out, "continuation", on="complete")))
    assert counts(processor) == (2, 0, 2, 0)
    # When each is canceled
    assert processor.cancel_task(queued) is True
    assert processor.cancel_task(delayed) is True
    assert processor.cancel_task(ids["member"]) is True
    assert processor.cancel_task(ids["cont"]) is True
    # Then each is gone at once, counted canceled in the tenant's statistics and (the batch's
    # task) in its batch, which still waits for its delayed task
    assert [state(processor, t) for t in (queued, delayed, ids["member"], ids["cont"])] == [None] * 4
    assert counts(processor) == (0, 0, 1, 0)
    assert tstats(processor) == (0, 0, 4, 0)
    info = processor.get_batch(batch_id)
    assert (info.state, info.total, info.canceled, info.remaining) == ("running", 2, 1, 1) and invariant(info)
    # And canceling any of them again, or an unknown task, returns False and changes nothing
    assert not any(processor.cancel_task(t) for t in (queued, delayed, ids["member"], ids["cont"], "no-such-task"))
    assert tstats(processor) == (0, 0, 4, 0)
    # When the batch's last task is canceled too and a worker runs past the delayed task's due time
    assert processor.cancel_task(ids["later"]) is True
    info = processor.get_batch(batch_id)
    assert (info.state, info.total, info.canceled, info.remaining) == ("succeeded", 2, 2, 0) and invariant(info)
    marker = processor.enqueue_task("default", "acme", tasks.record, prefix + ":later", 1,
                                    delay_until=timedelta(seconds=2))
    embedded_worker(processor)
    wait_until(lambda: r.llen(prefix + ":later") == 1, 10, "a later task ran")
    # Then none of the canceled tasks (nor the continuation, canceled before its batch ended) ran
    assert r.lrange(out, 0, -1) == []
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "counters settle")
    assert tstats(processor) == (1, 0, 5, 0) and state(processor, marker) is None


def test_cancel_running_task_aborts_it_within_a_second_and_counts_it_canceled(processor, embedded_worker, r, prefix):
    # Given a running task of no batch, looping in pure Python for 60 s, with 3 retries
    key = prefix + ":spin"
    task_id = processor.enqueue_task("default", "acme", tasks_ops.spin_ctx_timed, key, 60, retries=3)
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":started"), 10, "task running")
    assert state(processor, task_id) == "running"
    # When it is canceled
    t0 = time.time()
    assert processor.cancel_task(task_id) is True
    # Then it leaves within a second with ctx.cancelled set and TaskCanceled raised in its thread
    wait_until(lambda: r.llen(key + ":left"), 5, "task aborted")
    left = json.loads(r.lindex(key + ":left", 0))
    assert left["cancelled"] is True and left["outcome"] == "TaskCanceled"
    assert left["at"] - t0 < 1.0, left["at"] - t0
    # And it is counted canceled (not retried, not dead-lettered) and the counters settle
    wait_until(lambda: tstats(processor) == (0, 0, 1, 0), 5, "counted canceled")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "in flight settles")
    assert state(processor, task_id) is None and r.llen(key + ":started") == 1
    assert processor.get_tenant_stats("acme").running == 0
    # And a second cancel, now that it has ended, returns False
    assert processor.cancel_task(task_id) is False


def test_a_coroutine_task_awaiting_is_canceled_and_timed_out_the_asyncio_way(processor, embedded_worker, r, prefix):
    # Given a coroutine task idle in asyncio.sleep(60), and another with a 0.5 s time limit
    key, late = prefix + ":await", prefix + ":late"
    task_id = processor.enqueue_task("default", "acme", tasks_control.awaiting, key, 60, retries=3)
    timed = processor.enqueue_task("default", "acme", tasks_control.awaiting, late, 60, retries=1, timeout=0.5)
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":started") and r.llen(late + ":started"), 10, "both awaiting")
    # When the first is canceled
    t0 = time.time()
    assert processor.cancel_task(task_id) is True
    # Then its await raises CancelledError within a second (its finally runs), and it counts canceled
    wait_until(lambda: r.llen(key + ":left"), 5, "the coroutine left its await")
    left = json.loads(r.lindex(key + ":left", 0))
    assert left["outcome"] == "CancelledError" and left["at"] - t0 < 1.0, left
    wait_until(lambda: tstats(processor)[2] == 1, 5, "counted canceled")
    # And the other is ended at its time limit the same way, and dead-lettered as TaskTimeout
    wait_until(lambda: processor.get_queue("default").dead == 1, 10, "the timed-out coroutine dead-lettered")
    [dead] = processor.get_dead_tasks("default")
    assert dead.id == timed and dead.error_type == "TaskTimeout"
    assert json.loads(r.lindex(late + ":left", 0))["outcome"] == "CancelledError"
    # And no process was ended for them: both ended within the grace
    assert r.llen(key + ":started") == 1


def test_cancel_running_task_of_a_batch_counts_it_canceled_in_the_batch(processor, embedded_worker, r, prefix):
    # Given a batch of a spinning task and a short one, with a success continuation
    spin, out = prefix + ":spin", prefix + ":out"
    ids = {}
    batch_id = processor.enqueue_batch("default", "acme", lambda b: ids.update(
        spin=b.enqueue(tasks_batch.spin_ctx, spin, 60), short=b.enqueue(tasks.record, out, "short"),
        cont=b.continue_with(tasks.record, out, "continuation")))
    embedded_worker(processor)
    wait_until(lambda: r.llen(spin + ":started") and r.llen(out), 10, "spinning task running, short one done")
    # When the spinning task alone is canceled
    assert processor.cancel_task(ids["spin"]) is True
    # Then it is aborted with ctx.cancelled set, and the batch counts it canceled, not failed
    wait_until(lambda: r.llen(spin + ":left"), 5, "task aborted")
    assert json.loads(r.lindex(spin + ":left", 0)) == {"cancelled": True, "outcome": "TaskCanceled"}
    info = processor.wait_for_batch(batch_id, 10)
    assert (info.total, info.done, info.canceled, info.failed, info.remaining) == (2, 1, 1, 0, 0)
    # A canceled task was withdrawn, not failed: the batch succeeded and its continuation ran
    assert info.state == "succeeded"
    wait_until(lambda: r.lrange(out, 0, -1) == [b"short", b"continuation"], 10, "continuation ran")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "counters settle")
    assert tstats(processor) == (2, 0, 1, 0)


def test_canceled_task_that_turns_its_abort_into_an_error_is_counted_canceled_not_retried(
        processor, embedded_worker, r, prefix):
    key = prefix + ":k"
    task_id = processor.enqueue_task("default", "acme", tasks_batch.spin_then_fail, key, 60, retries=3)
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":started"), 10, "task running")
    assert processor.cancel_task(task_id)
    wait_until(lambda: tstats(processor) == (0, 0, 1, 0), 10, "counted canceled")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "counters settle")
    assert r.llen(key + ":started") == 1 and state(processor, task_id) is None


def test_a_forged_task_cancel_message_aborts_nothing(processor, embedded_worker, r, prefix):
    # Given a running task that spins for 1.5 s, and a worker subscribed to the events
    key = prefix + ":spin"
    task_id = processor.enqueue_task("default", "acme", tasks_batch.spin_ctx, key, 1.5)
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":started"), 10, "task running")
    wait_until(lambda: r.publish(f"{prefix}:ev", "zz") >= 1, 10, "the worker subscribed")
    # When someone publishes a cancel naming it without canceling it
    assert r.publish(f"{prefix}:ev", f"x:{task_id}") >= 1
    assert r.publish(f"{prefix}:ev", "x:") >= 1
    # Then it runs to its end and is counted done
    wait_until(lambda: r.llen(key + ":left"), 10, "task ended")
    assert json.loads(r.lindex(key + ":left", 0)) == {"cancelled": False, "outcome": "returned"}
    wait_until(lambda: tstats(processor) == (1, 0, 0, 0), 5, "counted done")


def test_a_cancel_heard_before_its_task_is_admitted_is_checked_when_it_is():
    # A cancel message may name a task whose fetch reply is still on its way to this worker
    ledger = Ledger(2)
    ledger.heard_cancel("a")
    for i in range(300):                     # bounded: the oldest are forgotten
        ledger.heard_cancel(f"other-{i}")
    ledger.heard_cancel("b")

    def task(task_id: str) -> Task:
        leased = Leased(task_id, "1", 1, b"", "json", "t", "q", "acme", None, 0, 0, None, "", "acme")
        return Task(task_id, leased, None)  # type: ignore[arg-type]

    admitted = [task("a"), task("b"), task("c")]
    assert [t.id for t in ledger.cancels_for(admitted)] == ["b"]
    assert ledger.cancels_for(admitted) == []           # each heard once
    assert len(ledger.cancels_heard) <= 256


def test_a_cancel_missed_while_unsubscribed_aborts_the_task_on_resubscription(make_processor, r, prefix):
    from coretask.worker.process import WorkerProcess
    key = prefix + ":spin"
    p = make_processor()
    w = WorkerProcess(p, renew_own_leases=True)
    dropped: list[str] = []
    handle = w.control.handle
    w.control.handle = lambda m, c="": dropped.append(m) if m.startswith("x:") else handle(m, c)  # type: ignore
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    thread.start()
    try:
        task_id = p.enqueue_task("default", "acme", tasks_batch.spin_ctx, key, 30)
        wait_until(lambda: r.llen(key + ":started"), 10, "task running")
        # When the task is canceled and the message is lost, and the subscription is then cut
        assert p.cancel_task(task_id)
        wait_until(lambda: dropped, 10, "the cancel message reached the worker (and was dropped)")
        assert r.llen(key + ":left") == 0
        kill = {"target_nodes": "all"} if p.options.cluster else {}
        assert r.client_kill_filter(_type="pubsub", **kill)
        # Then on resubscribing it finds the task marked and aborts it
        wait_until(lambda: r.llen(key + ":left"), 10, "the task aborted")
        assert json.loads(r.lindex(key + ":left", 0)) == {"cancelled": True, "outcome": "TaskCanceled"}
        wait_until(lambda: tstats(p) == (0, 0, 1, 0), 10, "counted canceled")
    finally:
        stop.set()
        thread.join(15)


def test_manager_ends_a_process_whose_canceled_task_holds_the_gil(processor, start_manager, r, prefix):
    # Given one worker process (cancel_grace 1 s) running a regex that backtracks in C holding the
    # GIL, and a task of no batch that is sleeping on its first attempt
    regex, plain = prefix + ":regex", prefix + ":plain"
    m = start_manager(processes=1, threads=4, cancel_grace=1.0)
    (child,) = m.wait_children(1)
    plain_id = processor.enqueue_task("default", "acme", tasks_batch.first_attempt_long, plain, 30, True, retries=0)
    wait_until(lambda: r.llen(plain + ":started"), 20, "the plain task running")
    regex_id = processor.enqueue_task("default", "acme", tasks_batch.catastrophic_regex, regex)
    wait_until(lambda: r.llen(regex + ":started"), 20, "the regex running")
    # When the regex task is canceled
    assert processor.cancel_task(regex_id)
    # Then the manager ends the process after the grace and the task is counted canceled
    m.wait_ended(child, 20)
    wait_until(lambda: processor.get_tenant_stats("acme").canceled == 1, 10, "counted canceled")
    assert r.llen(regex + ":finished") == 0 and state(processor, regex_id) is None
    assert "ignored its abort (task canceled)" in m.log()
    # And the other task was handed back without consuming a retry and completed in a new process
    wait_until(lambda: r.llen(plain + ":finished"), 20, "the handed-back task completes")
    starts = [json.loads(x) for x in r.lrange(plain + ":started", 0, -1)]
    assert [(a, left) for a, left, _ in starts] == [(1, 0), (2, 0)]
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "counters settle")
    assert state(processor, plain_id) is None and tstats(processor) == (1, 0, 1, 0)


def test_cancel_task_racing_completion_200_times_ends_each_task_once(make_processor, embedded_worker, r, prefix):
    # Given two embedded workers of 4 threads whose middleware records how each task ended, and
    # 200 tasks of 0-8 ms each, each canceled at a random moment around its run (before it is
    # fetched, while it runs, after it ended)
    outcomes: dict[str, list[str]] = {}
    lock = threading.Lock()

    class Outcomes:
        def after_task(self, ctx, outcome, result, error):
            with lock:
                outcomes.setdefault(ctx.task_id, []).append(outcome)

    p = make_processor(max_workers=4)
    embedded_worker(make_processor(max_workers=4, middleware=[Outcomes()]))
    embedded_worker(make_processor(max_workers=4, middleware=[Outcomes()]))
    out = prefix + ":race"
    rng = random.Random(13)
    results: dict[str, bool] = {}
    ids = []
    for i in range(200):
        task_id = p.enqueue_task("default", "acme", tasks_ops.short, out, str(i), rng.uniform(0, 0.008))
        ids.append(task_id)
        time.sleep(rng.uniform(0, 0.006))
        results[task_id] = p.cancel_task(task_id)
    # Then every task ends exactly once: succeeded (counted done) or canceled, running or not
    wait_until(lambda: all(p.get_task(t) is None for t in ids), 30, "every task ended")
    wait_until(lambda: counts(p) == (0, 0, 0, 0), 10, "queue counters back to 0")
    done, failed, canceled, dead = tstats(p)
    assert (done + canceled, failed, dead) == (200, 0, 0)
    assert all(len(o) == 1 for o in outcomes.values()), outcomes
    ran = {t: o[0] for t, o in outcomes.items()}
    assert set(ran.values()) <= {"succeeded", "canceled"}
    assert done == sum(o == "succeeded" for o in ran.values())
    assert canceled == sum(o == "canceled" for o in ran.values()) + sum(t not in ran for t in ids)
    started = [x.decode() for x in r.lrange(out + ":started", 0, -1)]
    assert len(set(started)) == len(started) <= len(ran)                 # none ran twice
    # a cancel that returned False found the task done already; one that returned True found it
    # waiting (it never ran) or running (it was aborted, or returned before the abort landed)
    assert all(ran.get(t) == "succeeded" for t, ok in results.items() if not ok)
    assert all(results[t] for t in ids if t not in ran)
    assert p.get_tenant_stats("acme").running == 0
    assert 0 < canceled < 200 and sum(not ok for ok in results.values()) > 0, (done, canceled)   # both ways


@pytest.mark.parametrize("end", ["ok", "canceled", "fail", "fail and bury", "release", "recover", "crashed",
                                 "lease expired"])
def test_every_script_that_ends_a_marked_task_counts_it_canceled_unless_it_returned(processor, end):
    # Given a task of a batch and a task of no batch, both with retries, leased to a worker id
    # (no worker: the scripts are driven through the gateway), and both marked by cancel_task
    from coretask.gateway import Ack, Failure, Release
    gw, worker = processor.gateway, "test-worker"
    loose = processor.enqueue_task("default", "acme", tasks.record, "k", 1, retries=3)
    batch_id = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", 2, retries=3))
    leased = {t.id: t for t in gw.fetch(worker, 2, 60_000 if end != "lease expired" else 1, 0, ["default"]).tasks}
    assert loose in leased and len(leased) == 2
    assert all(processor.cancel_task(t) for t in leased) and not any(processor.cancel_task(t) for t in leased)
    # When the tasks end the way under test
    if end in ("ok", "canceled"):
        assert gw.complete(worker, [Ack(t.id, t.token, end, 5) for t in leased.values()]) == [1, 1]
    elif end.startswith("fail"):
        for t in leased.values():
            assert gw.fail(worker, Failure(t.id, t.token, "ValueError", "x", "", 5, bury=end != "fail")) == 3
    elif end == "release":
        assert gw.release(worker, [Release(t.id, t.token) for t in leased.values()]) == 2
    elif end == "recover":
        assert gw.recover_worker(worker, "gone", consume_retry=False).canceled == 2
    elif end == "crashed":
        assert gw.crashed(worker, "crashed", 2)[0].canceled == 2
    else:
        time.sleep(0.05)
        assert gw.recover_expired("lease expired", 100).canceled == 2
    # Then both are gone and counted once: done when they returned first, canceled otherwise,
    # never retried, dead-lettered or handed back; the batch counts its task the same way
    assert [state(processor, t) for t in leased] == [None, None]
    assert counts(processor) == (0, 0, 0, 0) and processor.get_tenant_stats("acme").running == 0
    info = processor.get_batch(batch_id)
    if end == "ok":
        assert tstats(processor) == (2, 0, 0, 0) and (info.done, info.canceled) == (1, 0)
    else:
        assert tstats(processor) == (0, 0, 2, 0) and (info.done, info.canceled) == (0, 1)
    assert (info.state, info.remaining) == ("succeeded", 0) and invariant(info)


def test_cancel_and_delete_isolated_tasks(processor):
    # Given two tasks of a worker process that crashed while running both: isolated, counted ready
    gw, worker = processor.gateway, "test-worker"
    ids = [processor.enqueue_task("default", "acme", tasks.record, "k", i) for i in range(2)]
    assert len(gw.fetch(worker, 2, 60_000, 0, ["default"]).tasks) == 2
    assert gw.crashed(worker, "crashed", 2)[0].requeued == 2
    assert [state(processor, t) for t in ids] == ["isolated", "isolated"] and counts(processor) == (2, 0, 0, 0)
    # When one is canceled and the other deleted
    assert processor.cancel_task(ids[0]) and processor.delete_task(ids[1])
    # Then both left the isolation list and the counters, the canceled one counted canceled
    assert [state(processor, t) for t in ids] == [None, None] and counts(processor) == (0, 0, 0, 0)
    assert gw.isolated_count(["default"]) == 0 and tstats(processor) == (0, 0, 1, 0)


# ---------------------------------------------------------------------------- delete_task

def test_delete_queued_delayed_waiting_and_dead_tasks_leaves_no_trace(processor, embedded_worker, r, prefix):
    out = prefix + ":out"
    processor.pause()
    queued = processor.enqueue_task("default", "acme", tasks.record, out, "queued")
    delayed = processor.enqueue_task("default", "acme", tasks.record, out, "delayed", delay_until=HOUR)
    ids = {}
    batch_id = processor.enqueue_batch("default", "acme", lambda b: ids.update(
        a=b.enqueue(tasks.record, out, "a"), b=b.enqueue(tasks.record, out, "b", delay_until=HOUR),
        cont=b.continue_with(tasks.record, out, "continuation", on="complete")))
    assert counts(processor) == (2, 0, 2, 0)
    # When each is deleted
    assert [processor.delete_task(t) for t in (queued, delayed, ids["a"], ids["cont"])] == [True] * 4
    # Then it is gone with no counter moved, and the batch no longer counts its task
    assert counts(processor) == (0, 0, 1, 0) and tstats(processor) == (0, 0, 0, 0)
    info = processor.get_batch(batch_id)
    assert (info.state, info.total, info.remaining, info.canceled) == ("running", 1, 1, 0) and invariant(info)
    # When the batch's last task is deleted, the batch ends (with nothing to run)
    assert processor.delete_task(ids["b"])
    info = processor.get_batch(batch_id)
    assert (info.state, info.total, info.remaining) == ("succeeded", 0, 0)
    # And deleting again or an unknown task returns False
    assert not any(processor.delete_task(t) for t in (queued, delayed, ids["a"], "no-such-task"))
    # When a dead task is deleted, it leaves the dead list and the tenant's dead count, still
    # counted failed
    processor.resume()
    dead = dead_task(processor, embedded_worker)
    assert tstats(processor) == (0, 1, 0, 1)
    assert processor.delete_task(dead) is True
    assert state(processor, dead) is None and counts(processor)[3] == 0 and tstats(processor) == (0, 1, 0, 0)
    assert r.lrange(out, 0, -1) == []


def test_delete_refuses_a_running_task(processor, embedded_worker, r, prefix):
    key = prefix + ":spin"
    task_id = processor.enqueue_task("default", "acme", tasks_batch.spin_ctx, key, 1.0)
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":started"), 10, "task running")
    assert processor.delete_task(task_id) is False and state(processor, task_id) == "running"
    assert not processor.retry_dead_task(task_id) and not processor.discard_dead_task(task_id)
    assert state(processor, task_id) == "running"
    wait_until(lambda: tstats(processor) == (1, 0, 0, 0), 10, "it completes")
    assert processor.delete_task(task_id) is False


# ------------------------------------------------------------------------ dead letters by id

def test_dead_letters_by_id_retry_and_discard(processor, embedded_worker, r, prefix):
    # Given two dead tasks, one of a batch
    out = prefix + ":flag"
    r.set(out, 1)
    embedded_worker(processor)
    loose = processor.enqueue_task("default", "acme", tasks_batch.fail_while_flag, prefix + ":ok", out, retries=0)
    ids = {}
    batch_id = processor.enqueue_batch("default", "acme", lambda b: ids.update(
        t=b.enqueue(tasks_batch.fail_while_flag, prefix + ":ok", out, retries=0)))
    wait_until(lambda: state(processor, loose) == "dead" and state(processor, ids["t"]) == "dead", 10, "two dead")
    assert processor.get_batch(batch_id).state == "failed"
    # Then get_dead_tasks shows their ids, and cancel_task leaves them alone (they are finished)
    assert {t.id for t in processor.get_dead_tasks("default")} == {loose, ids["t"]}
    assert processor.cancel_task(loose) is False and state(processor, loose) == "dead"
    # When the batch's one is retried by id (with 2 retries) while it still fails, then succeeds
    processor.pause()
    assert processor.retry_dead_task(ids["t"], retries=2) is True
    assert state(processor, ids["t"]) == "queued" and processor.get_task(ids["t"]).retries_left == 2
    info = processor.get_batch(batch_id)
    assert (info.state, info.failed, info.remaining) == ("running", 0, 1)
    assert tstats(processor) == (0, 1, 0, 1)
    r.delete(out)
    processor.resume()
    assert processor.wait_for_batch(batch_id, 10).state == "succeeded"
    # And the loose one is discarded by id
    assert processor.discard_dead_task(loose) is True
    assert processor.get_dead_tasks("default") == [] and tstats(processor) == (1, 1, 0, 0)
    # And by-id calls on tasks that are not dead, or unknown, return False
    queued = processor.enqueue_task("default", "acme", tasks.record, prefix + ":x", 1, delay_until=HOUR)
    assert not any([processor.retry_dead_task(queued), processor.discard_dead_task(queued),
                    processor.retry_dead_task(loose), processor.discard_dead_task("nope")])
    assert state(processor, queued) == "delayed"
    with pytest.raises(Exception, match="retries"):
        processor.retry_dead_task(queued, retries=-1)


# -------------------------------------------------------------------------- tenant view

@pytest.mark.parametrize("where", ["queued", "delayed", "running", "dead"])
def test_tenant_view_neither_sees_nor_touches_another_tenants_task(processor, embedded_worker, r, prefix, where):
    # Given a task of tenant acme in the state under test
    key = prefix + ":k"
    if where == "dead":
        task_id = dead_task(processor, embedded_worker)
    elif where == "running":
        task_id = processor.enqueue_task("default", "acme", tasks_batch.spin_ctx, key, 2.0)
        embedded_worker(processor)
        wait_until(lambda: r.llen(key + ":started"), 10, "task running")
    else:
        processor.pause()
        task_id = processor.enqueue_task("default", "acme", tasks.record, key, 1,
                                         delay_until=HOUR if where == "delayed" else None)
    before = (state(processor, task_id), counts(processor), tstats(processor))
    assert before[0] == where
    # When another tenant's view asks for it and tries every operation on it
    other = processor.tenant("globex")
    assert other.get_task(task_id) is None
    assert [other.cancel_task(task_id), other.delete_task(task_id), other.retry_dead_task(task_id),
            other.discard_dead_task(task_id)] == [False] * 4
    # Then nothing changed; the owner's view sees it
    assert (state(processor, task_id), counts(processor), tstats(processor)) == before
    assert processor.get_task(task_id).tenant == "acme"
    assert processor.tenant("acme").get_task(task_id).id == task_id
    if where == "running":
        assert r.hget(processor.gateway.keys.task(task_id), "cx") is None
        wait_until(lambda: json.loads(r.lindex(key + ":left", 0) or "{}").get("outcome") == "returned", 10,
                   "it ran to its end")
    # And the owner's view can act on it
    mine = processor.tenant("acme")
    if where == "dead":
        assert mine.retry_dead_task(task_id, retries=0) is True
    elif where != "running":
        assert mine.cancel_task(task_id) is True and tstats(processor)[2] == 1
