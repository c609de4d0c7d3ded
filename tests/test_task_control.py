"""Task control: time limits, results, task state by id and progress, on real servers and
worker processes (issue: "Every task under control")."""
from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import psutil
import pytest
import redis

from coretask import (ConfigurationError, PayloadTooLarge, Progress, ResultCanceled, ResultPending, ResultUnavailable,
                      ScheduleData, TaskFailed)
from tests import tasks, tasks_batch, tasks_control
from tests.conftest import process_ended, wait_until
from tests.test_cli import cli, ok   # noqa: F401  (the cli fixture)

HOUR = timedelta(hours=1)


def left(r, key: str) -> list[dict]:
    return [json.loads(x) for x in r.lrange(key + ":left", 0, -1)]


# ---------------------------------------------------------------------------------- time limits

def test_a_task_past_its_time_limit_gets_task_timeout_in_place_and_is_retried(processor, embedded_worker, r, prefix):
    # Given a pure-Python task with a 0.3 s limit and two attempts, and one without a limit
    key, free = prefix + ":spin", prefix + ":free"
    tid = processor.enqueue_task("default", "acme", tasks_control.spin, key, 30, timeout=0.3, retries=2)
    other = processor.enqueue_task("default", "acme", tasks_control.spin, free, 0.5, keep_result=60)
    assert processor.get_task(tid).timeout == 0.3 and processor.get_task(other).timeout is None
    embedded_worker(processor)
    # Then each attempt is aborted as a cancel aborts it (ctx.cancelled set, then TaskTimeout
    # raised in its thread), and counted a failure: retried once, then dead-lettered as TaskTimeout
    wait_until(lambda: processor.get_queue("default").dead == 1, 15, "the task dead-lettered")
    assert left(r, key) == [{"cancelled": True, "outcome": "TaskTimeout"}] * 2
    (dead,) = processor.get_dead_tasks("default")
    assert dead.id == tid and dead.error_type == "TaskTimeout" and dead.timed_out
    assert "time limit of 0.3s" in dead.error_message and dead.attempt == 2
    # And the task without a limit ran its 0.5 s out
    assert processor.get_result(other, wait=10) == "spun"


def test_time_limits_come_from_options_batches_and_schedules(make_processor, embedded_worker, r, prefix):
    # Given Options(timeout=0.3), a batch task with its own limit and a schedule's run with one
    # (retries=1: one attempt each, so a schedule's run that timed out is not retried while the
    # others are still being checked)
    p = make_processor(timeout=0.3, retries=1)
    by_default = p.enqueue_task("default", "acme", tasks_control.spin, prefix + ":a", 30, retries=0)
    longer = p.enqueue_task("default", "acme", tasks_control.spin, prefix + ":b", 0.6, timeout=5, keep_result=60)
    batch_id = p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_control.spin, prefix + ":c", 30,
                                                                      timeout=0.2, retries=0))
    p.upsert_schedule(ScheduleData("nightly", "acme", "default", None, "0 3 * * *", timeout=0.2),
                      tasks_control.spin, prefix + ":d", 30)
    assert p.trigger_schedule("nightly")
    embedded_worker(p)
    # Then the three with short limits time out; the one whose own limit is longer finishes
    info = p.wait_for_batch(batch_id, 15)
    assert (info.failed, info.done) == (1, 0)
    wait_until(lambda: len(left(r, prefix + ":a")) and len(left(r, prefix + ":d")), 15, "both timed out")
    for k in ("a", "c", "d"):
        assert left(r, f"{prefix}:{k}") == [{"cancelled": True, "outcome": "TaskTimeout"}]
    assert p.get_result(longer, wait=10) == "spun"
    assert p.get_task(by_default).error_type == "TaskTimeout"


def test_a_blocked_task_past_its_limit_ends_its_process_and_only_it_is_charged(processor, start_manager, r, prefix):
    # Given one worker process (4 threads, cancel_grace 1 s): a task blocked in time.sleep(600)
    # with a 1 s limit and two siblings of no limit sleeping through their first attempt
    block, sib = prefix + ":block", prefix + ":sib"
    m = start_manager(processes=1, threads=4, cancel_grace=1.0)
    (child,) = m.wait_children(1)
    tid = processor.enqueue_task("default", "acme", tasks_control.sleeper, block, 600, timeout=1, retries=0,
                                 keep_result=60)
    sibs = [processor.enqueue_task("default", "acme", tasks_control.sibling, f"{sib}{i}", 60, retries=0)
            for i in range(2)]
    wait_until(lambda: r.llen(block + ":started") and all(r.llen(f"{sib}{i}:started") for i in range(2)), 20,
               "three tasks running")
    # Then after limit + grace the process hands the siblings back and exits; a new one takes over
    m.wait_ended(child, 20)
    new = wait_until(lambda: [c for c in m.children() if c.pid != child.pid], 20, "a replacement process")
    # And the blocked task's attempt is charged: dead-lettered (retries=0) as TaskTimeout
    with pytest.raises(TaskFailed, match="time limit of 1s") as failed:
        processor.get_result(tid, wait=15)
    assert failed.value.error_type == "TaskTimeout"
    assert r.llen(block + ":finished") == 0
    # And the siblings ran again, uncharged (retries=0: a charged attempt would be dead), once each
    wait_until(lambda: all(r.llen(f"{sib}{i}:finished") for i in range(2)), 20, "the siblings finish")
    for i in range(2):
        starts = [json.loads(x) for x in r.lrange(f"{sib}{i}:started", 0, -1)]
        assert [(a, lft) for a, lft, _ in starts] == [(1, 0), (2, 0)] and starts[1][2] == new[0].pid
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks")
    assert processor.get_queue("default").dead == 1 and all(processor.get_task(s) is None for s in sibs)


def test_a_stuck_timed_out_task_waits_its_retry_delay_and_its_child_process_ends_with_it(processor, start_manager,
                                                                                        r, prefix):
    # Given a task with a 1 s limit that waits in C for a child process it started (`sleep 600`),
    # two attempts, and a worker whose on_task_failed_delay asks for 3 s
    key = prefix + ":child"
    m = start_manager(processes=1, threads=2, cancel_grace=1.0, retry_delay_s=3)
    (first,) = m.wait_children(1)
    tid = processor.enqueue_task("default", "acme", tasks_control.waits_for_child, key, timeout=1, retries=2)
    child = psutil.Process(int(wait_until(lambda: r.lindex(key + ":child", 0), 20, "the child process")))
    # Then the worker process ends after limit + grace, and the child process ends with it
    m.wait_ended(first, 20)
    wait_until(lambda: process_ended(child), 10, "the task's child process ended")
    # And the failed attempt waits its retry delay (it was retried at once) and is logged as failed
    wait_until(lambda: processor.get_task(tid).state == "delayed", 10, "the task delayed for its retry")
    assert "failed on attempt 1" in m.log() and "retrying in 3s" in m.log()
    # And the last attempt is dead-lettered with its run time (limit + grace; it read 0)
    wait_until(lambda: processor.get_queue("default").dead == 1, 30, "the task dead-lettered")
    dead = processor.get_task(tid)
    assert dead.error_type == "TaskTimeout" and dead.attempt == 2
    assert dead.duration is not None and dead.duration >= 2.0
    assert r.llen(key + ":child") == 2 and r.llen(key + ":finished") == 0
    assert "ended 1 process(es) its tasks had started (sleep[" in m.log()


def test_a_task_holding_the_gil_past_its_limit_is_ended_by_the_manager(processor, start_manager, r, prefix):
    # Given a regex backtracking in C (it holds its process's GIL: nothing else there runs, not
    # even the process's own watch) with a 1 s limit, beside a sibling task
    regex, sib = prefix + ":regex", prefix + ":sib"
    m = start_manager(processes=1, threads=4, cancel_grace=1.0)
    (child,) = m.wait_children(1)
    s = processor.enqueue_task("default", "acme", tasks_control.sibling, sib, 60, retries=0)
    wait_until(lambda: r.llen(sib + ":started"), 20, "the sibling running")
    tid = processor.enqueue_task("default", "acme", tasks_batch.catastrophic_regex, regex, timeout=1, retries=0)
    wait_until(lambda: r.llen(regex + ":started"), 20, "the regex running")
    # Then the manager, which holds no task, ends the process after limit + grace + its margin
    m.wait_ended(child, 20)
    assert "past its time limit" in m.log()
    # And only the regex is charged (dead-lettered as TaskTimeout), the sibling runs again uncharged
    wait_until(lambda: processor.get_queue("default").dead == 1, 15, "the regex task dead-lettered")
    dead = processor.get_task(tid)
    assert dead.error_type == "TaskTimeout"
    assert dead.duration is not None and dead.duration >= 2.0    # it ran its limit and the grace, at least
    wait_until(lambda: r.llen(sib + ":finished"), 20, "the sibling finishes")
    assert [json.loads(x)[:2] for x in r.lrange(sib + ":started", 0, -1)] == [[1, 0], [2, 0]]
    wait_until(lambda: processor.get_task(s) is None, 10, "the sibling acknowledged")


# ------------------------------------------------------------------------------------ results

def test_results_values_errors_and_pending(processor, embedded_worker, r, prefix):
    # Given tasks that keep their results: one returning data, one failing, one retried once
    ok_id = processor.enqueue_task("default", "acme", tasks_control.value, "hi", keep_result=60)
    bad = processor.enqueue_task("default", "acme", tasks_control.fail, "boom", keep_result=60, retries=0)
    flaky = processor.enqueue_task("default", "acme", tasks_control.flaky, prefix + ":n", keep_result=60, retries=2)
    plain = processor.enqueue_task("default", "acme", tasks_control.value, 1)
    # Then before any worker runs, each is pending
    with pytest.raises(ResultPending):
        processor.get_result(ok_id)
    with pytest.raises(ResultPending):
        processor.get_result(ok_id, wait=0.2)
    # but one that keeps nothing says so at once, not "pending" and then "unknown"
    with pytest.raises(ResultUnavailable, match="does not keep its result: enqueue it with keep_result") as nothing:
        processor.get_result(plain)
    assert not isinstance(nothing.value, ResultPending)
    embedded_worker(processor)
    assert processor.get_result(ok_id, wait=10) == {"echo": "hi", "list": [1, 2.5, "three"], "none": None}
    with pytest.raises(TaskFailed) as info:
        processor.get_result(bad, wait=10)
    assert info.value.error_type == "RuntimeError" and info.value.error_message == "boom"
    assert "tasks_control.py" in info.value.traceback and info.value.task_id == bad
    # And a retried task's result is the one of the attempt that succeeded
    assert processor.get_result(flaky, wait=10) == 2
    assert processor.get_task(flaky).attempt == 2
    # And a task that keeps nothing, or an unknown id, has no result, with the reason
    wait_until(lambda: processor.get_task(plain) is None, 10, "the plain task done")
    with pytest.raises(ResultUnavailable, match="unknown"):
        processor.get_result(plain)
    with pytest.raises(ResultUnavailable):
        processor.get_result("no-such-task", wait=0.1)
    # And kept records expire: memory stays bounded
    assert 0 < r.pttl(f"{prefix}:t:{ok_id}") <= 60_000
    assert 0 < r.pttl(f"{prefix}:t:{ok_id}:done") <= 60_000


def test_get_result_wait_returns_within_50_ms_of_completion(processor, embedded_worker, r, prefix):
    embedded_worker(processor)
    lags = []
    for i in range(5):
        key = f"{prefix}:end{i}"
        tid = processor.enqueue_task("default", "acme", tasks_control.after, 0.3, key, keep_result=60)
        assert processor.get_result(tid, wait=5) == "done"
        lags.append(time.time() - float(r.get(key)))
    # woken by the completion itself, not by polling: the median lag is far under 50 ms
    assert sorted(lags)[2] < 0.05, lags


def test_many_waiters_all_wake_and_wait_ends_with_result_pending(processor, embedded_worker, r, prefix):
    key = prefix + ":w"
    tid = processor.enqueue_task("default", "acme", tasks_control.wait_for, key, keep_result=60)
    results: list[object] = []
    waiters = [threading.Thread(target=lambda: results.append(processor.get_result(tid, wait=20))) for _ in range(4)]
    for t in waiters:
        t.start()
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":started"), 10, "the task running")
    with pytest.raises(ResultPending, match="running"):
        processor.get_result(tid, wait=0.2)
    with pytest.raises(ResultPending, match="running"):           # a timedelta, as every duration takes
        processor.get_result(tid, wait=timedelta(milliseconds=200))
    for bad in ("1", -1, float("nan")):
        with pytest.raises(ConfigurationError, match="wait must be a timedelta or a number of seconds >= 0"):
            processor.get_result(tid, wait=bad)
    r.set(key + ":end", 1)
    for t in waiters:
        t.join(15)
    assert results == [None] * 4


def test_an_abort_is_not_swallowed_by_except_exception_in_the_task(processor, embedded_worker, r, prefix):
    # Given a running task whose loop catches Exception around each row, and a time-limited one
    key = prefix + ":rows"
    tid = processor.enqueue_task("default", "acme", tasks_control.row_loop, key, keep_result=60)
    timed = processor.enqueue_task("default", "acme", tasks_control.row_loop, key + ":t", timeout=0.5, retries=0,
                                   keep_result=60)
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":started") and r.llen(key + ":t:started"), 10, "both running")
    # When one is canceled
    assert processor.cancel_task(tid)
    # Then it ends at once, canceled: the abort went through its except Exception, not into it
    with pytest.raises(ResultCanceled):
        processor.get_result(tid, wait=5)
    # And the other ends at its time limit, failed with TaskTimeout
    with pytest.raises(TaskFailed) as failed:
        processor.get_result(timed, wait=5)
    assert failed.value.error_type == "TaskTimeout"
    assert r.llen(key + ":swallowed") == 0 and r.llen(key + ":t:swallowed") == 0


def test_canceled_and_unstorable_results(processor, embedded_worker, r, prefix):
    processor.pause()
    canceled = processor.enqueue_task("default", "acme", tasks_control.value, 1, keep_result=60)
    assert processor.cancel_task(canceled)
    with pytest.raises(ResultCanceled, match="was canceled: it has no result"):
        processor.get_result(canceled)
    too_big = processor.enqueue_task("default", "acme", tasks_control.big, 2_000_000, keep_result=60)
    unstorable = processor.enqueue_task("default", "acme", tasks_control.unstorable, keep_result=60)
    processor.resume()
    embedded_worker(processor)
    # a value that cannot be kept fails the task for good (running it again returns the same)
    with pytest.raises(TaskFailed) as big_info:
        processor.get_result(too_big, wait=10)
    assert big_info.value.error_type == PayloadTooLarge.__name__ and "max_payload_bytes" in str(big_info.value)
    with pytest.raises(TaskFailed, match="cannot be stored as JSON"):
        processor.get_result(unstorable, wait=10)
    assert processor.get_queue("default").dead == 2


def test_result_ttl_option_and_batch_results_by_page(make_processor, embedded_worker, r, prefix):
    p = make_processor(result_ttl=60)
    batch_id = p.enqueue_batch("default", "acme", lambda b: [b.enqueue(tasks_control.value, i) for i in range(5)]
                               + [b.enqueue(tasks_control.fail, "no", retries=0)])
    embedded_worker(p)
    p.wait_for_batch(batch_id, 15)
    first, second = p.get_batch_results(batch_id, 0, 4), p.get_batch_results(batch_id, 4, 4)
    assert len(first) == 4 and len(second) == 2
    outcomes = first + second
    assert sorted(o.value["echo"] for o in outcomes if o.state == "succeeded") == [0, 1, 2, 3, 4]
    (failed,) = [o for o in outcomes if o.state == "dead"]
    assert (failed.error_type, failed.error_message, failed.value) == ("RuntimeError", "no", None)
    # and an id that names no batch (or another tenant's) is said to be unknown, not "no results"
    for read in (lambda: p.get_batch_results("f" * 32), lambda: p.tenant("other").get_batch_results(batch_id)):
        with pytest.raises(ResultUnavailable, match="is unknown, or its record has expired"):
            read()


def test_a_result_expires_at_keep_result_when_the_record_is_retained_longer(make_processor, embedded_worker):
    # Given records retained an hour, and a task that keeps its result 1 s
    p = make_processor(task_retention=3600)
    tid = p.enqueue_task("default", "acme", tasks_control.value, 7, keep_result=1)
    embedded_worker(p)
    assert p.get_result(tid, wait=10)["echo"] == 7
    # Then past keep_result the value reads as expired (it read on for the hour), while the
    # record itself is still there for get_task
    with pytest.raises(ResultUnavailable, match="result expired at .* UTC \\(keep_result\\)"):
        wait_until(lambda: p.get_result(tid) and False, 10, "the result expired")
    assert p.get_task(tid).state == "succeeded"


# --------------------------------------------------------------------------- task state by id

def test_task_state_queued_delayed_running_and_finished_with_retention(make_processor, embedded_worker, r, prefix):
    p = make_processor(task_retention=60)
    key = prefix + ":run"
    p.pause()
    queued = p.enqueue_task("default", "acme", tasks_control.wait_for, key)
    delayed = p.enqueue_task("default", "acme", tasks.record, prefix + ":x", delay_until=HOUR)
    failing = p.enqueue_task("default", "acme", tasks_control.fail, "bad", retries=0)
    assert p.get_task(queued).state == "queued" and p.get_task(queued).attempt == 0
    assert p.get_task(delayed).state == "delayed"
    p.resume()
    embedded_worker(p)
    wait_until(lambda: r.llen(key + ":started"), 10, "the task running")
    running = p.get_task(queued)
    assert (running.state, running.attempt) == ("running", 1)
    assert running.worker and running.started_at is not None and running.finished_at is None
    r.set(key + ":end", 1)
    done = wait_until(lambda: (t := p.get_task(queued)) is not None and t.finished and t, 10, "the task finished")
    assert done.state == "succeeded" and done.duration > 0 and done.finished_at >= done.started_at
    assert 0 < r.pttl(f"{prefix}:t:{queued}") <= 60_000
    # a failure's record is the dead letter (kept until retried or discarded), with its error
    dead = wait_until(lambda: p.get_task(failing).state == "dead" and p.get_task(failing), 10, "dead")
    assert (dead.error_type, dead.error_message) == ("RuntimeError", "bad")
    # and the result was not kept: the state says how it ended, get_result says why nothing is there
    with pytest.raises(ResultUnavailable, match="not kept"):
        p.get_result(queued)
    assert p.cancel_task(delayed)
    assert p.get_task(delayed).state == "canceled"


def test_without_retention_a_finished_task_is_gone(processor, embedded_worker, r, prefix):
    tid = processor.enqueue_task("default", "acme", tasks.record, prefix + ":x")
    embedded_worker(processor)
    wait_until(lambda: r.llen(prefix + ":x"), 10, "the task ran")
    wait_until(lambda: processor.get_task(tid) is None, 10, "its record deleted")
    assert r.exists(f"{prefix}:t:{tid}:done") == 0


# ----------------------------------------------------------------------------------- progress

def test_progress_is_throttled_and_its_last_value_shows(processor, embedded_worker, r, prefix, server):
    # Given keyspace notifications on the task's hash (each write to it is one event), from the
    # server that holds it (in a cluster: the master of the prefix's slot; notifications are per node)
    key = prefix + ":p"
    tid = processor.enqueue_task("default", "acme", tasks_control.progress_burst, key, 20_000)
    if server.cluster:
        node = r.get_node_from_key(f"{prefix}:t:{tid}")
        r = redis.Redis(host=node.host, port=node.port)
    r.config_set("notify-keyspace-events", "Kh")
    events = r.pubsub()
    events.subscribe(f"__keyspace@0__:{prefix}:t:{tid}")
    try:
        wait_until(lambda: events.get_message(timeout=0.1), 5, "subscribed")
        embedded_worker(processor)
        wait_until(lambda: r.llen(key + ":reported"), 20, "20,000 progress reports made")
        # Then the last value shows while the task still runs
        shown = wait_until(lambda: (t := processor.get_task(tid)).progress is not None
                           and t.progress.done == 20_000 and t.progress, 5, "the last report shown")
        assert shown == Progress(20_000, 20_000, "step 20000") and shown.fraction == 1.0
        # And the hash was written a handful of times, not 20,000
        writes = 0
        while (m := events.get_message(timeout=0.2)) is not None:
            writes += m["data"] == b"hset"
        assert 1 <= writes <= 40, writes
    finally:
        r.set(key + ":end", 1)
        events.close()
        r.config_set("notify-keyspace-events", "")


def test_a_finished_task_shows_its_last_progress_report(processor, embedded_worker):
    # Given a task that keeps its record and reports 1..500 in a burst, then returns
    tid = processor.enqueue_task("default", "acme", tasks_control.progress_then_return, 500, keep_result=60)
    embedded_worker(processor)
    processor.get_result(tid, wait=20)
    # Then its record shows the last report (the throttle held it back; it is written as the task ends)
    progress = processor.get_task(tid).progress
    assert progress == Progress(500, 500, None)
    assert type(progress.done) is int and type(progress.total) is int      # as reported, not 500.0


def test_set_progress_refuses_what_is_not_a_number(processor):
    from coretask import TaskContext
    ctx = TaskContext(task_id="t", queue="q", tenant="acme", target="m:f", attempt=1, retries_left=0,
                      batch_id=None, gateway=processor.gateway)
    with pytest.raises(TypeError, match="done must be a number"):
        ctx.set_progress("half")
    with pytest.raises(TypeError, match="message"):
        ctx.set_progress(1, 2, message=3)


def test_a_task_back_at_work_shows_no_worker_start_or_progress_of_its_last_attempt(make_processor, embedded_worker):
    # Given a task that reports progress and then fails, once with a retry an hour away, and
    # once more to the dead letters
    p = make_processor(on_task_failed_delay=lambda ctx, left: timedelta(hours=1))
    tid = p.enqueue_task("default", "acme", tasks_control.progress_then_fail, 3, retries=2)
    embedded_worker(p)
    # When its first attempt failed: the task waits for its retry
    t = wait_until(lambda: (t := p.get_task(tid)).state == "delayed" and t, 10, "the retry scheduled")
    # Then it shows the error it will be retried after, and nothing that describes a run: no
    # worker, no start, no progress (what it showed while it ran, see the test above)
    assert (t.attempt, t.retries_left, t.error_type) == (1, 1, "RuntimeError")
    assert (t.worker, t.started_at, t.progress) == (None, None, None), t
    # When a bury (retries=1) dead-letters it, the dead letter keeps where and when it ran
    dead = p.enqueue_task("default", "acme", tasks_control.progress_then_fail, 2, retries=1)
    d = wait_until(lambda: (d := p.get_task(dead)).state == "dead" and d, 10, "dead-lettered")
    assert d.worker is not None and d.started_at is not None and d.progress == Progress(2, 2, "step 2")
    # ... and retried from the dead letters, it is queued without them
    p.pause()
    assert p.retry_dead_task(dead, retries=1) is True
    q = p.get_task(dead)
    assert q.state == "queued" and (q.worker, q.started_at, q.progress) == (None, None, None), q


# ---------------------------------------------------------------------------------------- CLI

def test_cli_task_shows_state_progress_and_result(make_processor, embedded_worker, cli, r, prefix):  # noqa: F811
    p = make_processor()
    key = prefix + ":c"
    tid = p.enqueue_task("default", "acme", tasks_control.progress_burst, key, 10, keep_result=60)
    embedded_worker(p)
    wait_until(lambda: (t := p.get_task(tid)) is not None and t.progress is not None and t.progress.done == 10,
               10, "progress reported")
    text = ok(cli("task", tid))
    assert "state:        running" in text and "100% 10/10  step 10" in text and " UTC" in text
    r.set(key + ":end", 1)
    p.get_result(tid, wait=10)
    done = json.loads(ok(cli("task", tid, "--json")))
    assert done["state"] == "succeeded" and done["result"] is None and done["progress"]["done"] == 10
    missing = cli("task", "no-such-task")
    assert missing.returncode == 1 and "not found" in missing.stderr
