"""Task lifecycle: priority, delays, retries, dead letters, hooks, unloadable tasks, lease tokens,
lease expiry, extend_lock and the queue counters. Embedded workers run tasks; a "fake worker"
is a test that calls the Lua scripts itself (fetch/complete/fail/release) with a worker id of
its own, so every intermediate state can be observed exactly."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from coretask import ConfigurationError, LeaseLost, TaskContext, TaskProcessor
from coretask.gateway import Ack, Failure, Outcomes, Release
from coretask.producing import Producer
from tests import tasks, tasks_extra
from tests.conftest import wait_until



# ------------------------------------------------------------------------------- helpers

def fetch_as(p: TaskProcessor, worker: str, n: int = 1, lease_ms: int | None = None,
             queues: list[str] | None = None) -> tuple[list[Any], list[dict[str, Any]]]:
    """Run the fetch script as ``worker``; returns the reply head and the leased tasks."""
    if lease_ms is None:
        lease_ms = int(p.options.invisibility.total_seconds() * 1000)
    reply = p.gateway.fetch(worker, n, lease_ms, 0, queues or p.options.queues)
    got = [dict(id=t.id, token=t.token, target=t.target, queue=t.queue, tenant=t.tenant,
                retries_left=t.retries_left, now_ms=reply.now_ms) for t in reply.tasks]
    return [int(reply.paused), reply.next_due_ms, reply.now_ms], got


def complete(p: TaskProcessor, worker: str, tid: str, token: str) -> list[int]:
    return p.gateway.complete(worker, [Ack(tid, token, "ok", 5)])


def fail(p: TaskProcessor, worker: str, tid: str, token: str, *, delay_ms: int = 0, bury: bool = False) -> int:
    return p.gateway.fail(worker, Failure(tid, token, "ValueError", "bad", "Traceback: bad", 5, delay_ms=delay_ms,
                                          bury=bury))


def release(p: TaskProcessor, worker: str, tid: str, token: str) -> int:
    return p.gateway.release(worker, [Release(tid, token)])


def recover_expired(p: TaskProcessor) -> list[int]:
    res = p.gateway.recover_expired("lease expired", 100)
    return [res.requeued, res.buried, res.canceled]


def counts(p: TaskProcessor, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


def snapshot(p: TaskProcessor, r, tid: str, worker: str) -> dict[str, Any]:
    """Everything a stale answer could wrongly change."""
    k = p.gateway.keys
    return dict(task=r.hgetall(k.task(tid)), lease=r.zscore(k.leases, tid), owned=set(r.hkeys(k.worker(worker))),
                counts=counts(p), trun=r.hgetall(k.trun), dead=r.lrange(k.dead("default"), 0, -1),
                ready=r.lrange(k.ready("default", "acme"), 0, -1))


def lines(r, key: str) -> list[str]:
    return [v.decode() for v in r.lrange(key, 0, -1)]


def wait_worker_listening(p: TaskProcessor, r, prefix: str) -> None:
    """An embedded worker is idle and subscribed: a probe task ran and pub/sub has a listener."""
    probe = prefix + ":probe"
    p.enqueue_task(p.options.queues[0], "probe", tasks.record, probe, 1)
    wait_until(lambda: r.llen(probe) == 1, 10, "the probe task")
    if not p.options.cluster:
        wait_until(lambda: dict(r.pubsub_numsub(p.gateway.keys.events)).get(p.gateway.keys.events.encode(), 0) >= 1,
                   10, "the worker's pub/sub subscription")
    wait_until(lambda: p.get_queue(p.options.queues[0]).in_flight == 0, 5, "the probe's ack")


# ------------------------------------------------------------------------------ priority

def test_priority_order_high_before_default_before_low(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    p = make_processor(queues=["high", "default", "low"], max_workers=1)
    # Given tasks in all three queues, enqueued lowest priority first and interleaved
    for i in range(4):
        for queue in ("low", "default", "high"):
            p.enqueue_task(queue, "acme", tasks.record, key, f"{queue}-{i}")
    assert [counts(p, q)[0] for q in ("high", "default", "low")] == [4, 4, 4]
    # When a single-threaded worker starts
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 12, 15, "12 tasks")
    # Then every high task ran before any default task, and those before any low task (FIFO within)
    assert lines(r, key) == [f"{q}-{i}" for q in ("high", "default", "low") for i in range(4)]


# ------------------------------------------------------------------------------- delays

def test_relative_delays_are_counted_on_the_server_clock(processor, r, monkeypatch):
    # Given a producer whose clock is an hour behind the server's
    import coretask.producing
    real = time.time
    monkeypatch.setattr(coretask.producing.time, "time", lambda: real() - 3600)
    k = processor.gateway.keys
    # When a task and a batch task are enqueued with delay_until=30 s
    before = processor.gateway.server_time_ms()
    tid = processor.enqueue_task("default", "acme", tasks.record, "out", 1, delay_until=timedelta(seconds=30))
    bid = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "out", 2,
                                                                          delay_until=timedelta(seconds=30)))
    after = processor.gateway.server_time_ms()
    # Then each is due 30 s after the server's time of the enqueue, not at once (the producer's
    # clock would have made them an hour overdue), and an absolute time is taken as given
    batch_task = next(m.decode() for m in r.zrange(k.delayed, 0, -1) if m.decode() != tid)
    for task_id in (tid, batch_task):
        due = r.zscore(k.delayed, task_id)
        assert before + 30_000 <= due <= after + 30_000, (task_id, due - before)
    assert processor.get_queue("default").delayed == 2 and processor.get_batch(bid).remaining == 1
    assert Producer.due_ms(timedelta(seconds=-5)) == 0 and Producer.due_ms(timedelta(0)) == 0


def test_due_time_is_never_rounded_down():
    # a due time between two milliseconds must not become the earlier one
    assert Producer.due_ms(1700000000.0004) == 1700000000001
    assert Producer.due_ms(1700000000.25) == 1700000000250
    when = datetime(2030, 1, 1, 0, 0, 0, 999, tzinfo=timezone.utc)
    assert Producer.due_ms(when) == int(when.timestamp()) * 1000 + 1


def test_delayed_tasks_start_on_time(processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    # Given an idle worker
    embedded_worker(processor)
    wait_worker_listening(processor, r, prefix)
    # When ten tasks are delayed by 0.3-1.5 s, in scrambled order and in all three forms
    delays = [0.9, 0.3, 1.5, 0.45, 1.2, 0.6, 1.05, 0.35, 0.75, 1.35]
    due: dict[str, float] = {}
    for i, d in enumerate(delays):
        name = f"t{i}"
        when = time.time() + d
        if i % 3 == 0:
            arg: Any = datetime.fromtimestamp(when, tz=timezone.utc)
        elif i % 3 == 1:
            arg = when                                         # epoch seconds
        else:
            arg = timedelta(seconds=d)                          # from now
            when = time.time() + d                             # (bounds the due time from below)
        due[name] = when
        processor.enqueue_task("default", "acme", tasks_extra.record_start_at, key, name, delay_until=arg)
    wait_until(lambda: r.llen(key) == len(delays), 10, "all delayed tasks")
    # Then none started before its due time, and each started within 250 ms after it
    started = {d["name"]: d["t"] for d in map(json.loads, lines(r, key))}
    late = {n: round(started[n] - due[n], 3) for n in due}
    for name in due:
        assert started[name] >= due[name] - 1e-6, (name, late)          # 1 µs: float epoch rounding
        assert started[name] - due[name] < 0.25, (name, late)
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "counters back to zero")


def test_delayed_task_waits_in_the_delayed_set(processor, r, prefix):
    tid = processor.enqueue_task("default", "acme", tasks.record, prefix + ":out", delay_until=timedelta(hours=1))
    info = processor.get_task(tid)
    assert info.state == "delayed"
    assert counts(processor) == (0, 0, 1, 0)
    assert processor.get_tasks_in_queue("default") == []
    # a fetch right now leases nothing
    head, got = fetch_as(processor, "fake-w", 5)
    assert got == []
    assert int(head[1]) == int(r.zscore(processor.gateway.keys.delayed, tid))   # next due time reported


# ------------------------------------------------------------------- retries, dead letters

def test_retries_follow_the_seed_table_then_dead_letter(make_processor, embedded_worker, r, prefix, caplog):
    # The seed's example: retries=3 with the delay table {2: 5 s, 1: 60 s} waits 5 s after the
    # first failure, 60 s after the second, and dead-letters at the third. Same shape, scaled
    # down: {2: 0.3 s, 1: 1.0 s}.
    key = prefix + ":attempts"
    delays = {2: 0.3, 1: 1.0}
    asked: list[tuple[str, int, int]] = []
    failed: list[tuple[int, int, float]] = []       # (attempt, ctx.retries_left, when the failure was seen)

    def failed_delay(ctx: TaskContext, retries_left: int) -> timedelta:
        asked.append((ctx.task_id, retries_left, ctx.attempt))
        return timedelta(seconds=delays[retries_left])

    def on_error(ctx: TaskContext, exc: BaseException) -> None:
        failed.append((ctx.attempt, ctx.retries_left, time.time()))

    p = make_processor(retries=3, on_task_failed_delay=failed_delay, on_task_error=on_error)
    # Given a task that always fails, with retries=3
    tid = p.enqueue_task("default", "acme", tasks_extra.fail_times_timed, key, 100)
    assert p.get_task(tid).retries_left == 3
    # When a worker runs it
    with caplog.at_level("WARNING", logger="coretask.worker.runner"):
        embedded_worker(p)
        wait_until(lambda: counts(p) == (0, 0, 0, 1), 15, lambda: f"the task dead-lettered: {failed}")
    # Then it ran three times in all: the third failure dead-lettered it
    starts = [float(x) for x in lines(r, key)]
    assert len(starts) == 3 and [f[0] for f in failed] == [1, 2, 3], (starts, failed)
    # And each attempt started no earlier than its delay after the failure before it (the task
    # body's clock and the server's are this machine's; the server's has 1 ms resolution)
    assert starts[1] >= failed[0][2] + 0.3 - 0.002, (starts, failed)
    assert starts[2] >= failed[1][2] + 1.0 - 0.002, (starts, failed)
    # And the callback was asked with the retries left after each failure: 2, then 1, and not
    # after the third; ctx.retries_left says the same during each attempt (0 on the last)
    assert asked == [(tid, 2, 1), (tid, 1, 2)]
    assert [f[1] for f in failed] == [2, 1, 0]
    # And the worker logged each failure with its attempt, retries left and what comes next
    logged = [rec.getMessage() for rec in caplog.records if tid in rec.getMessage() and "failed" in rec.getMessage()]
    assert len(logged) == 3, logged
    assert "failed on attempt 1" in logged[0] and "2 retries left, retrying in 0.3s" in logged[0]
    assert "failed on attempt 2" in logged[1] and "1 retries left, retrying in 1s" in logged[1]
    assert "failed on attempt 3" in logged[2] and "0 retries left, dead-lettered" in logged[2]
    assert "RuntimeError: planned failure 3 of 100" in logged[2]
    # And the dead letter keeps the last error
    (dead,) = p.get_dead_tasks("default")
    assert (dead.id, dead.state, dead.retries_left, dead.target) == (tid, "dead", 0,
                                                                      "tests.tasks_extra:fail_times_timed")
    assert dead.error_type == "RuntimeError"
    assert dead.error_message == "planned failure 3 of 100"
    assert "Traceback (most recent call last)" in dead.traceback
    assert "fail_times_timed" in dead.traceback and "RuntimeError: planned failure 3 of 100" in dead.traceback
    assert dead.dead_at is not None and dead.dead_at >= dead.enqueued_at
    assert p.get_task(tid).error_type == "RuntimeError"


def test_retry_without_delay_callback_is_immediate_and_counts_down(processor, embedded_worker, r, prefix):
    key = prefix + ":n"
    tid = processor.enqueue_task("default", "acme", tasks.fail_times, key, 2, retries=3)   # 3 attempts may fail
    embedded_worker(processor)
    wait_until(lambda: r.llen(key + ":ok") == 1, 10, "success on the third attempt")
    assert lines(r, key + ":ok") == ["3"]
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 5, "counters back to zero")
    assert processor.get_task(tid) is None                  # a finished task leaves nothing behind


def test_retry_dead_tasks_then_succeeds(make_processor, embedded_worker, r, prefix):
    key = prefix + ":n"
    p = make_processor(retries=2)
    # Given a task that fails 3 times, with retries=2: dead after attempt 2
    tid = p.enqueue_task("default", "acme", tasks.fail_times, key, 3)
    embedded_worker(p)
    wait_until(lambda: counts(p) == (0, 0, 0, 1), 10, "dead after two attempts")
    assert r.get(key) == b"2"
    with pytest.raises(ConfigurationError, match="not a queue of this deployment"):
        p.retry_dead_tasks("other")          # (a queue that never held work: a misspelt name)
    # When it is retried from the dead letter queue with retries=2 (two more attempts)
    assert p.retry_dead_tasks("default", retries=2) == 1
    # Then attempt 3 fails, attempt 4 succeeds, and nothing is left
    wait_until(lambda: r.llen(key + ":ok") == 1, 10, "success after the dead-letter retry")
    assert lines(r, key + ":ok") == ["4"]
    wait_until(lambda: counts(p) == (0, 0, 0, 0), 5, "counters back to zero")
    assert p.get_dead_tasks("default") == [] and p.get_task(tid) is None


def test_retry_and_discard_dead_tasks_oldest_first(processor, r, prefix):
    # Given three dead tasks (buried by a fake worker)
    ids = [processor.enqueue_task("default", "acme", tasks.record, prefix + ":x", i) for i in range(3)]
    _, got = fetch_as(processor, "fake-w", 3)
    assert [g["id"] for g in got] == ids
    for g in got:
        assert fail(processor, "fake-w", g["id"], g["token"], bury=True) == 2
    assert counts(processor) == (0, 0, 0, 3)
    assert [d.id for d in processor.get_dead_tasks("default")] == ids
    # When the oldest is retried with 2 retries
    assert processor.retry_dead_tasks("default", retries=2, count=1) == 1
    assert counts(processor) == (1, 0, 0, 2)
    (back,) = processor.get_tasks_in_queue("default")
    assert (back.id, back.retries_left, back.state) == (ids[0], 2, "queued")
    assert processor.get_task(ids[0]).error_type == ""       # the old error is cleared
    # And a count of 0 moves or deletes none (a computed min(n, limit) never reads as "all"), a
    # count that is no number of tasks and a queue that is none of the deployment's are refused
    assert processor.retry_dead_tasks("default", count=0) == 0 and processor.discard_dead_tasks("default", count=0) == 0
    assert counts(processor) == (1, 0, 0, 2)
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ConfigurationError, match="count must be a whole number of tasks"):
            processor.discard_dead_tasks("default", count=bad)
    with pytest.raises(ConfigurationError, match="queue 'defualt' is not a queue of this deployment.*default"):
        processor.retry_dead_tasks("defualt")
    assert counts(processor) == (1, 0, 0, 2)
    # And the next one is discarded, then the rest
    assert processor.discard_dead_tasks("default", count=1) == 1
    assert processor.get_task(ids[1]) is None
    assert [d.id for d in processor.get_dead_tasks("default")] == [ids[2]]
    assert processor.discard_dead_tasks("default") == 1
    assert processor.discard_dead_tasks("default") == 0
    assert counts(processor) == (1, 0, 0, 0)
    assert processor.get_task(ids[2]) is None


def test_deadletter_false_discards_exhausted_tasks(make_processor, embedded_worker, r, prefix):
    errors: list[tuple[str, int]] = []
    p = make_processor(deadletter=False, retries=2, on_task_error=lambda ctx, exc: errors.append((ctx.task_id,
                                                                                                 ctx.attempt)))
    tid = p.enqueue_task("default", "acme", tasks.always_fail, "gone")
    embedded_worker(p)
    wait_until(lambda: len(errors) == 2 and p.get_task(tid) is None, 10, "two attempts, then deleted")
    assert errors == [(tid, 1), (tid, 2)]
    wait_until(lambda: counts(p) == (0, 0, 0, 0), 5, "counters back to zero")
    assert r.llen(p.gateway.keys.dead("default")) == 0
    assert not r.exists(p.gateway.keys.task(tid))


def test_on_task_error_receives_context_and_exception(make_processor, embedded_worker):
    seen: list[tuple] = []
    p = make_processor(on_task_error=lambda ctx, exc: seen.append(
        (ctx.task_id, ctx.tenant, ctx.queue, ctx.attempt, ctx.retries_left, ctx.target, type(exc), exc.args)))
    tid = p.enqueue_task("default", "acme", tasks_extra.boom, "no such key", retries=2)
    embedded_worker(p)
    wait_until(lambda: len(seen) == 2, 10, "two on_task_error calls")
    target = "tests.tasks_extra:boom"
    assert seen == [(tid, "acme", "default", 1, 1, target, KeyError, ("no such key",)),
                    (tid, "acme", "default", 2, 0, target, KeyError, ("no such key",))]
    wait_until(lambda: counts(p) == (0, 0, 0, 1), 5, "dead letter")
    assert p.get_dead_tasks("default")[0].error_type == "KeyError"


def test_hooks_that_raise_do_not_lose_tasks(make_processor, embedded_worker, r, prefix):
    calls: list[str] = []

    def raiser(name):
        def hook(*args):
            calls.append(name)
            raise RuntimeError(f"hook {name} is broken")
        return hook

    p = make_processor(retries=2, on_task_start=raiser("start"), on_task_end=raiser("end"),
                       on_task_error=raiser("error"), on_task_failed_delay=raiser("delay"))
    ok_key, flaky_key = prefix + ":ok", prefix + ":flaky"
    # Given a task that succeeds, one that fails once, and one that always fails
    p.enqueue_task("default", "acme", tasks.record, ok_key, "done")
    p.enqueue_task("default", "acme", tasks.fail_times, flaky_key, 1)
    dead = p.enqueue_task("default", "acme", tasks.always_fail, "still dead")
    # When every hook raises
    embedded_worker(p)
    # Then each task still reaches its end: done, retried (at once) then done, dead-lettered
    wait_until(lambda: r.llen(ok_key) == 1 and r.llen(flaky_key + ":ok") == 1, 10, "both successes")
    wait_until(lambda: counts(p) == (0, 0, 0, 1), 10, "only the failing task left, dead")
    assert p.get_dead_tasks("default")[0].id == dead
    assert p.get_dead_tasks("default")[0].error_message == "still dead"
    # and the hooks did run: 5 attempts started and ended, 3 failures, 2 delay questions
    assert sorted(calls) == sorted(["start"] * 5 + ["end"] * 5 + ["error"] * 3 + ["delay"] * 2)


# ----------------------------------------------------------------------- unloadable tasks

def test_unloadable_tasks_are_dead_lettered_and_the_worker_goes_on(make_processor, embedded_worker, r, prefix):
    victim, ok = prefix + ":victim", prefix + ":ok"
    errors: list[tuple[str, str]] = []
    p = make_processor(max_workers=1, max_payload_bytes=4096,
                       on_task_error=lambda ctx, exc: errors.append((ctx.task_id, type(exc).__name__)))
    k = p.gateway.keys
    # Given a corrupted payload, a target that no longer imports, and a payload of an unknown serializer
    corrupt = p.enqueue_task("default", "acme", tasks_extra.victim, victim)
    r.hset(k.task(corrupt), "p", b"\x80{not json")
    moved = p.enqueue_task("default", "acme", tasks_extra.victim, victim)
    doc = json.loads(r.hget(k.task(moved), "p"))
    assert doc["t"] == "tests.tasks_extra:victim"
    doc["t"] = "nonexistent.module:fn"
    r.hset(k.task(moved), mapping={"p": json.dumps(doc), "tg": "nonexistent.module:fn"})
    foreign = p.enqueue_task("default", "acme", tasks_extra.victim, victim)
    r.hset(k.task(foreign), "s", "dill")
    # and envelopes this worker must not guess at: not an object, a newer format version, a
    # field it does not know, and a payload over max_payload_bytes written past enqueue's check
    envelope = {"t": "tests.tasks_extra:victim", "a": [victim], "k": {}}
    odd: dict[str, bytes] = {"listed": json.dumps([envelope]).encode(),
                             "newer": json.dumps({**envelope, "v": 2}).encode(),
                             "extra": json.dumps({**envelope, "deadline": 5}).encode(),
                             "huge": json.dumps({**envelope, "a": [victim, "x" * 8000]}).encode()}
    odd_ids = {}
    for name, payload in odd.items():
        odd_ids[name] = p.enqueue_task("default", "acme", tasks_extra.victim, victim)
        r.hset(k.task(odd_ids[name]), "p", payload)
    # and ordinary tasks behind them
    for i in range(5):
        p.enqueue_task("default", "acme", tasks.record, ok, i)
    assert p.get_task(corrupt).args_preview.startswith("<unreadable payload")
    # When a single-threaded worker runs the queue
    embedded_worker(p)
    # Then the broken ones are dead-lettered at once (on their first attempt, of the 3 they had)
    # with the reason, and show no retries left (a dead letter is retried only by hand)
    wait_until(lambda: counts(p) == (0, 0, 0, 7), 10, "seven dead letters")
    dead = {d.id: d for d in p.get_dead_tasks("default")}
    assert set(dead) == {corrupt, moved, foreign, *odd_ids.values()}
    assert all((d.error_type, d.attempt, d.retries_left) == ("TaskLoadError", 1, 0) for d in dead.values())
    assert "payload cannot be decoded (json)" in dead[corrupt].error_message
    assert "nonexistent.module:fn cannot be imported" in dead[moved].error_message
    assert "No module named 'nonexistent'" in dead[moved].error_message
    assert dead[moved].target == "nonexistent.module:fn"
    assert "serializer 'dill'" in dead[foreign].error_message
    assert "a JSON list, not a task envelope" in dead[odd_ids["listed"]].error_message
    assert "unsupported task format version 2" in dead[odd_ids["newer"]].error_message
    assert "fields ['deadline'] are unknown" in dead[odd_ids["extra"]].error_message
    assert "over max_payload_bytes=4096; refused before decoding" in dead[odd_ids["huge"]].error_message
    assert sorted(errors) == sorted((tid, "TaskLoadError") for tid in dead)
    # And the worker kept serving: the ordinary tasks ran, and a new one still runs
    wait_until(lambda: r.llen(ok) == 5, 10, "ordinary tasks")
    p.enqueue_task("default", "acme", tasks.record, ok, "after")
    wait_until(lambda: r.llen(ok) == 6, 10, "a task after the broken ones")
    assert r.llen(victim) == 0


# --------------------------------------------------------------------------- lease tokens

def test_stale_tokens_change_nothing(make_processor, r, prefix):
    p = make_processor(retries=3)
    k = p.gateway.keys
    tid = p.enqueue_task("default", "acme", tasks.record, prefix + ":out", 1)
    # Given the task leased to worker A (token "1") for 300 ms
    _, (a,) = fetch_as(p, "fake-a", 1, lease_ms=300)
    assert (a["id"], a["token"]) == (tid, "1")
    before = snapshot(p, r, tid, "fake-a")
    assert before["counts"] == (0, 1, 0, 0) and before["task"][b"st"] == b"running"
    # When answers arrive with a wrong token
    assert complete(p, "fake-a", tid, "2") == [0]
    assert fail(p, "fake-a", tid, "0") == 0
    assert fail(p, "fake-a", tid, "7", bury=True) == 0
    assert release(p, "fake-a", tid, "") == 0
    assert complete(p, "fake-a", "no-such-task", "1") == [0]
    # Then nothing changed
    assert snapshot(p, r, tid, "fake-a") == before

    # Given A's lease expired, the task was recovered (one retry used) and leased to worker B
    wait_until(lambda: recover_expired(p)[0] == 1, 5, "the expired lease recovered")
    assert counts(p) == (1, 0, 0, 0)
    assert p.get_task(tid).retries_left == 2
    # a late answer from A while the task waits in the queue changes nothing either
    waiting = snapshot(p, r, tid, "fake-a")
    assert complete(p, "fake-a", tid, "1") == [0]
    assert release(p, "fake-a", tid, "1") == 0
    assert snapshot(p, r, tid, "fake-a") == waiting
    _, (b,) = fetch_as(p, "fake-b", 1)
    assert (b["id"], b["token"], b["retries_left"]) == (tid, "2", 2)
    before = snapshot(p, r, tid, "fake-b")
    assert before["task"][b"w"] == b"fake-b" and before["owned"] == {tid.encode()}
    # When A answers late with its old token, in every way
    assert complete(p, "fake-a", tid, "1") == [0]
    assert fail(p, "fake-a", tid, "1") == 0
    assert fail(p, "fake-a", tid, "1", bury=True) == 0
    assert release(p, "fake-a", tid, "1") == 0
    ctx_a = TaskContext(task_id=tid, queue="default", tenant="acme", target="tests.tasks:record", attempt=1,
                        retries_left=3, enqueued_at=None, batch_id=None, batch=None, gateway=p.gateway)
    with pytest.raises(LeaseLost):
        ctx_a.extend_lock(timedelta(seconds=30))
    # Then B's lease is intact
    assert snapshot(p, r, tid, "fake-b") == before
    assert r.hlen(k.worker("fake-a")) == 0
    # And B's own answer counts, once
    assert complete(p, "fake-b", tid, "2") == [1]
    assert complete(p, "fake-b", tid, "2") == [0]
    assert counts(p) == (0, 0, 0, 0)
    assert p.get_task(tid) is None and r.zscore(k.leases, tid) is None and r.hlen(k.worker("fake-b")) == 0


# ------------------------------------------------------------------- lease expiry, extend

def test_expired_lease_is_redelivered_and_consumes_a_retry(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    p = make_processor(invisibility=1.0, retries=3)
    k = p.gateway.keys
    tid = p.enqueue_task("default", "acme", tasks_extra.record_ctx, key)
    # Given the task leased by a worker that then vanished (never renews, never answers)
    _, (lost,) = fetch_as(p, "vanished-worker", 1)
    leased_at = lost["now_ms"] / 1000
    assert (lost["id"], lost["token"], lost["retries_left"]) == (tid, "1", 3)
    assert counts(p) == (0, 1, 0, 0)
    # When another worker runs (with invisibility=1 s)
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 1, 10, "the redelivered task")
    # Then the task ran again only after the lease expired, with one retry consumed: 2 left, so
    # the attempt it runs now leaves 1 should it fail
    ran = json.loads(lines(r, key)[0])
    assert (ran["id"], ran["attempt"], ran["retries_left"]) == (tid, 2, 1)
    assert ran["t"] >= leased_at + 1.0 - 0.001
    wait_until(lambda: counts(p) == (0, 0, 0, 0), 5, "counters back to zero")
    assert r.hlen(k.worker("vanished-worker")) == 0
    assert complete(p, "vanished-worker", tid, "1") == [0]    # the old worker's late answer is ignored


def test_expired_lease_without_retries_left_is_dead_lettered(make_processor, embedded_worker, r, prefix):
    p = make_processor(invisibility=1.0, retries=0)
    tid = p.enqueue_task("default", "acme", tasks.record, prefix + ":out", 1)
    fetch_as(p, "vanished-worker", 1)
    embedded_worker(p)
    wait_until(lambda: counts(p) == (0, 0, 0, 1), 10, "dead letter after the lease expired")
    (dead,) = p.get_dead_tasks("default")
    assert dead.id == tid and dead.error_type == "WorkerLost"
    assert "lease expired" in dead.error_message
    assert r.llen(prefix + ":out") == 0


def test_extend_lock_keeps_the_lease_beyond_invisibility(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    p = make_processor(invisibility=1.0)
    k = p.gateway.keys
    # Given two tasks leased by a fake worker (no renewal) for invisibility = 1 s
    held = p.enqueue_task("default", "acme", tasks_extra.lease_holder, key)
    control = p.enqueue_task("default", "acme", tasks_extra.lease_holder, key)
    _, got = fetch_as(p, "fake-w", 2)
    assert [g["id"] for g in got] == [held, control]
    leased_ms = got[0]["now_ms"]

    def ctx_for(g: dict[str, Any]) -> TaskContext:
        return TaskContext(task_id=g["id"], queue="default", tenant="acme", target=g["target"],
                           attempt=int(g["token"]), retries_left=g["retries_left"], enqueued_at=None,
                           batch_id=None, batch=None, gateway=p.gateway)

    # When the first task extends its lock to 5 s
    ctx_held, ctx_control = ctx_for(got[0]), ctx_for(got[1])
    ctx_held.extend_lock(timedelta(seconds=5))
    assert r.zscore(k.leases, held) >= leased_ms + 4900
    # and a worker watches for expired leases
    embedded_worker(p)
    # Then the other task's lease expires and it is redelivered (the recovery timer did run)
    wait_until(lambda: lines(r, key) == [control], 10, "the control task redelivered")
    wait_until(lambda: counts(p) == (0, 1, 0, 0), 5, "the control task acknowledged")
    assert time.time() * 1000 >= leased_ms + 1000
    # while the extended one is still leased to the fake worker, untouched
    h = r.hgetall(k.task(held))
    assert (h[b"st"], h[b"w"], h[b"a"], h[b"r"]) == (b"running", b"fake-w", b"1", b"3")
    assert r.hexists(k.worker("fake-w"), held)
    # And the control task's old context lost its lease
    with pytest.raises(LeaseLost):
        ctx_control.extend_lock(timedelta(seconds=5))
    # And the holder can finish it with its token
    assert complete(p, "fake-w", held, ctx_held._token) == [1]
    assert counts(p) == (0, 0, 0, 0)
    assert lines(r, key) == [control]                       # the held task never ran twice


# ------------------------------------------------------------------------ queue counters

def test_acknowledgements_ride_in_the_fetch_and_the_counts_are_written_net(processor, r, prefix):
    # Given four tasks of a tenant limited to two at a time, two of them leased (the tenant
    # then waits at its limit)
    p, k = processor, processor.gateway.keys
    p.set_tenant_limit("acme", 2)
    ids = [p.enqueue_task("default", "acme", tasks.record, prefix + ":out", n) for n in "abcd"]
    turn = p.gateway.exchange("w-x", Outcomes(), 4, 60_000, 0, ["default"])
    first = {t.id: t for t in turn.tasks}
    assert sorted(first) == sorted(ids[:2]) and counts(p) == (2, 2, 0, 0)

    def acks(leased: dict[str, Any]) -> Outcomes:
        return Outcomes(acks=[Ack(t.id, t.token, "ok", 5, t.queue, t.tenant) for t in leased.values()])

    # When the worker's next turn acknowledges both and asks for four
    sent: list[str] = []
    run_many = p.gateway.transport.run_many
    p.gateway.transport.run_many = lambda calls: sent.extend(c[0] for c in calls) or run_many(calls)  # type: ignore
    turn = p.gateway.exchange("w-x", acks(first), 4, 60_000, 0, ["default"])
    assert sent == ["fetch"]
    # Then one script call did both (the acknowledgements travel in the fetch's arguments), the
    # two it acknowledged made room under the limit for the other two, and every count is exact
    second = {t.id: t for t in turn.tasks}
    assert sorted(second) == sorted(ids[2:])
    assert counts(p) == (0, 2, 0, 0) and r.hget(k.trun, "acme") == b"2"
    assert p.get_tenant_stats("acme").done == 2
    assert not any(r.exists(k.task(t)) for t in first) and set(r.hkeys(k.worker("w-x"))) == {t.encode() for t in second}
    # When the deployment is paused and the last turn acknowledges the other two, twice over
    p.pause()
    turn = p.gateway.exchange("w-x", Outcomes(acks=acks(second).acks * 2), 4, 60_000, 0, ["default"])
    # Then the pause holds no acknowledgement back, the repeat counts nothing, and a tenant with
    # nothing running leaves the running counts
    assert turn.paused and not turn.tasks
    assert counts(p) == (0, 0, 0, 0) and p.get_tenant_stats("acme").done == 4
    assert r.hget(k.trun, "acme") is None and r.hlen(k.worker("w-x")) == 0 and r.zcard(k.leases) == 0


def test_queue_counters_are_exact_at_each_step(processor, embedded_worker, r, prefix):
    p = processor
    key = prefix + ":out"
    # enqueue: three ready, one delayed far ahead
    a, b, c = (p.enqueue_task("default", "acme", tasks.record, key, n) for n in "abc")
    later = p.enqueue_task("default", "acme", tasks.record, key, "later", delay_until=timedelta(hours=1))
    assert counts(p) == (3, 0, 1, 0)
    # fetch two
    _, (fa, fb) = fetch_as(p, "fake-w", 2)
    assert (fa["id"], fb["id"]) == (a, b)
    assert counts(p) == (1, 2, 1, 0)
    # complete one
    assert complete(p, "fake-w", a, fa["token"]) == [1]
    assert counts(p) == (1, 1, 1, 0)
    # fail one: back to the queue (tail), one retry used
    assert fail(p, "fake-w", b, fb["token"]) == 1
    assert counts(p) == (2, 0, 1, 0)
    assert p.get_task(b).retries_left == 2
    assert [t.id for t in p.get_tasks_in_queue("default")] == [c, b]
    # fail with a delay: delayed, not queued
    _, (fc,) = fetch_as(p, "fake-w", 1)
    assert fc["id"] == c
    assert counts(p) == (1, 1, 1, 0)
    assert fail(p, "fake-w", c, fc["token"], delay_ms=3_600_000) == 1
    assert counts(p) == (1, 0, 2, 0)
    assert p.get_task(c).state == "delayed"
    # release: back to the head, no retry used
    _, (fb2,) = fetch_as(p, "fake-w", 1)
    assert (fb2["id"], fb2["token"]) == (b, "2")
    assert counts(p) == (0, 1, 2, 0)
    assert release(p, "fake-w", b, fb2["token"]) == 1
    assert counts(p) == (1, 0, 2, 0)
    assert p.get_task(b).retries_left == 2
    # bury: dead
    _, (fb3,) = fetch_as(p, "fake-w", 1)
    assert fail(p, "fake-w", b, fb3["token"], bury=True) == 2
    assert counts(p) == (0, 0, 2, 1)
    # retry the dead one
    assert p.retry_dead_tasks("default") == 1
    assert counts(p) == (1, 0, 2, 0)
    # lease expiry: requeued
    _, (fb4,) = fetch_as(p, "fake-w", 1, lease_ms=50)
    assert counts(p) == (0, 1, 2, 0)
    wait_until(lambda: recover_expired(p)[0] == 1, 5, "expired lease recovered")
    assert counts(p) == (1, 0, 2, 0)
    # a delayed task coming due: delayed -> queued when a fetch promotes it
    p.enqueue_task("default", "acme", tasks.record, key, "soon", delay_until=timedelta(seconds=0.2))
    assert counts(p) == (1, 0, 3, 0)
    wait_until(lambda: fetch_as(p, "fake-w", 0)[0] and counts(p) == (2, 0, 2, 0), 5, "the due task promoted")
    # nothing in any counter went negative, and a worker drains what is ready
    embedded_worker(p)
    wait_until(lambda: counts(p) == (0, 0, 2, 0), 10, "the ready tasks done")
    assert sorted(lines(r, key)) == ["b", "soon"]
    assert {t for t in r.zrange(p.gateway.keys.delayed, 0, -1)} == {c.encode(), later.encode()}
    assert r.hgetall(p.gateway.keys.trun) == {}
