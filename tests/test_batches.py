"""Batches end to end: atomic building, bounded enqueue of 100,000 tasks, statistics and the
counter identity under concurrency, retention, continuations (exactly once), appends, hooks."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from coretask import BatchInfo, ConfigurationError, StoreUnavailable
from coretask.encoding import Call, encode
from tests import tasks, tasks_batch
from tests.conftest import FAST, ROOT, ManagerProcess, wait_until

HOUR = timedelta(hours=1)


def all_keys(r: Any, prefix: str) -> list[bytes]:
    return sorted(r.scan_iter(match=prefix + "*", count=1000))


def identity(b: BatchInfo) -> bool:
    return b.total == b.done + b.failed + b.canceled + b.remaining


@pytest.fixture
def start_hook_manager(server: Any, prefix: str, tmp_path: Path) -> Any:
    """Like start_manager, for ``tests.tasks_batch:processor`` (the test app plus an
    on_batch_end hook that counts each batch id in Redis)."""
    started: list[ManagerProcess] = []

    def start(processes: int = 2, threads: int = 4, **opts: Any) -> ManagerProcess:
        env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps({**FAST, **opts}),
                   PYTHONPATH=str(ROOT))
        log_path = tmp_path / f"hook-manager-{len(started)}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "tests.tasks_batch:processor",
                                     "--processes", str(processes), "--threads", str(threads)],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(ManagerProcess(proc, log_path))
        return started[-1]

    yield start
    for m in started:
        m.kill_all()


# ------------------------------------------------------------------------------- building

def test_callback_and_context_manager_forms_create_batches(processor, embedded_worker, r, prefix):
    # Given two batches, one built by a callback, one in a with-block
    key = prefix + ":out"
    seen_inside: list[Any] = []
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (
        seen_inside.append(b.id), [b.enqueue(tasks.record, key, i) for i in range(5)]), scope="callback")
    with processor.batch("default", "acme", scope="with-block") as batch:
        for i in range(5, 8):
            batch.enqueue(tasks.record, key, i)
    # Then the callback form returns the id; the with-block sets batch.id on exit only
    assert seen_inside == [None] and batch.id and batch.id != batch_id
    info = processor.get_batch(batch_id)
    assert (info.tenant, info.scope, info.queue, info.state, info.total, info.remaining) == \
        ("acme", "callback", "default", "running", 5, 5)
    assert (info.started, info.ended) == (None, None) and info.created is not None
    assert processor.get_batch(batch.id).scope == "with-block"
    # When a worker runs them
    embedded_worker(processor)
    done = [processor.wait_for_batch(b, 15) for b in (batch_id, batch.id)]
    # Then both succeed with every counter accounted for
    assert [(d.state, d.done, d.failed, d.canceled, d.remaining) for d in done] == \
        [("succeeded", 5, 0, 0, 0), ("succeeded", 3, 0, 0, 0)]
    assert all(d.started and d.ended and d.ended >= d.started for d in done)
    # And an id that names no batch is refused at once, not waited on for the timeout
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="batch nope is unknown"):
        processor.wait_for_batch("nope", 30)
    assert time.monotonic() - started < 5
    assert sorted(int(x) for x in r.lrange(key, 0, -1)) == list(range(8))


def test_bad_continue_on_is_refused(processor, r, prefix):
    with pytest.raises(ConfigurationError, match="on="):
        processor.enqueue_batch("default", "acme", lambda b: b.continue_with(tasks.record, "k", on="always"))
    assert all_keys(r, prefix) == []


@pytest.mark.parametrize("form", ["callback", "with"])
def test_exception_inside_build_leaves_nothing(processor, r, prefix, form):
    # Given a build that stages 2,500 tasks (several chunks) and a continuation, then raises
    def build(b):
        b.continue_with(tasks.record, prefix + ":cont")
        for i in range(2500):
            b.enqueue(tasks.record, prefix + ":out", i, delay_until=timedelta(seconds=60) if i % 2 else None)
        raise KeyError("boom")

    # When the batch is built
    with pytest.raises(KeyError):
        if form == "callback":
            processor.enqueue_batch("default", "acme", build)
        else:
            with processor.batch("default", "acme") as b:
                build(b)
    # Then not a single key exists under the prefix
    assert all_keys(r, prefix) == []
    assert processor.get_batches_count("acme") == 0 and processor.get_queues() == []


def test_a_batch_takes_no_task_after_it_was_written_and_says_how_to_add_one(processor, r, prefix):
    # Given a batch written by its with block, a kept builder of enqueue_batch, and an append
    with processor.batch("default", "acme") as b:
        b.enqueue(tasks.record, prefix + ":out", 1)
    kept = []
    processor.enqueue_batch("default", "acme", kept.append)
    appended = []
    processor.append_batch("default", "acme", b.id, lambda a: (a.enqueue(tasks.record, prefix + ":out", 2),
                                                               appended.append(a)))
    # When a task or continuation is added to any of them afterwards, it is refused with the fix
    for builder in (b, kept[0], appended[0]):
        with pytest.raises(ConfigurationError, match=r"takes no more tasks.*processor.append_batch\('default', 'acme'"):
            builder.enqueue(tasks.record, prefix + ":out", 3)
        with pytest.raises(ConfigurationError, match="takes no more tasks"):
            builder.continue_with(tasks.record, prefix + ":out", "late")
    # ... and so after a block that raised
    with pytest.raises(KeyError), processor.batch("default", "acme") as failed:
        raise KeyError("boom")
    with pytest.raises(ConfigurationError, match="raised, so nothing of it was enqueued"):
        failed.enqueue(tasks.record, prefix + ":out", 4)
    # Then the batch holds exactly what was added in time
    assert processor.get_batch(b.id).total == 2 and processor.get_batches_count("acme") == 2
    # And processor.batch(...) used without `with` says how to use it
    with pytest.raises(ConfigurationError, match="with processor.batch"):
        processor.batch("default", "acme").enqueue(tasks.record, prefix + ":out", 5)
    with pytest.raises(ConfigurationError, match="with processor.batch"):
        processor.tenant("acme").batch("default").enqueue(tasks.record, prefix + ":out", 5)
    assert processor.get_batches_count("acme") == 2


@pytest.mark.parametrize("failing", [2, 3, "commit"])
def test_redis_error_midway_leaves_nothing(processor, r, prefix, monkeypatch, failing):
    # Given a store whose n-th staging call (or the commit) fails as if the connection dropped
    # (a staging call's error surfaces when its reply is read, after it ran)
    real_run, real_send = processor.gateway.transport.run, processor.gateway.transport.send
    calls = {"batch_stage": 0}

    def send(name, keys, args):
        flight = real_send(name, keys, args)
        if name == "batch_stage":
            calls[name] += 1
            if calls[name] == failing:
                def lost():
                    real_result()
                    raise redis.ConnectionError("connection reset by peer (simulated)")
                real_result, flight.result = flight.result, lost
        return flight

    def run(name, keys, args, **kw):
        if name == "batch_commit" and failing == "commit":
            raise redis.ConnectionError("connection reset by peer (simulated)")
        return real_run(name, keys, args, **kw)

    monkeypatch.setattr(processor.gateway.transport, "send", send)
    monkeypatch.setattr(processor.gateway.transport, "run", run)
    # When a 3,500-task batch is built
    with pytest.raises((redis.ConnectionError, StoreUnavailable)):   # the gateway translates the commit's
        processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(tasks.record, "k", i) for i in range(3500)])
    # Then the chunks staged before the error are gone: nothing exists under the prefix
    assert calls["batch_stage"] >= (failing if isinstance(failing, int) else 1)
    assert all_keys(r, prefix) == []


def server_cpu_probe(server: Any) -> Any:
    """Nanoseconds of CPU the server's main thread (where commands run) has used, from Linux
    schedstat: unlike wall time, it does not grow when other processes load the machine."""
    if server.cluster:
        return None
    path = Path(f"/proc/{server.handle.pid}/task/{server.handle.pid}/schedstat")
    return (lambda: int(path.read_text().split()[0])) if path.exists() else None


def test_hundred_thousand_tasks_bounded_memory_short_scripts(processor, embedded_worker, r, prefix, server,
                                                              monkeypatch):
    # Given a 200-character argument, so that 100,000 payloads would take > 20 MB
    n = 100_000
    arg = "x" * 200
    one = len(encode(Call(tasks.record, (prefix + ":never", arg), {}), processor.producer.serializer, 10**6).payload)
    # And every script call timed in server CPU (calls serialized so each delta is its own)
    cpu, store, lock = server_cpu_probe(server), processor.gateway.transport, threading.RLock()
    timed: list[tuple[str, float]] = []

    def timing(fn: Any, name_of: Any) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            with lock:
                t0 = cpu()
                try:
                    return fn(*a, **kw)
                finally:
                    timed.append((name_of(*a), (cpu() - t0) / 1e6))
        return call
    if cpu is not None:
        monkeypatch.setattr(store, "run", timing(store.run, lambda name, *_: name))
        monkeypatch.setattr(store, "run_many", timing(store.run_many, lambda calls: "+".join(c[0] for c in calls)))
        real_send = store.send

        def send_and_wait(name: str, keys: Any, args: Any) -> Any:
            flight = real_send(name, keys, args)
            flight.result()             # the reply is kept: the builder's own result() returns it
            return flight
        monkeypatch.setattr(store, "send", timing(send_and_wait, lambda name, *_: name))
    slowlog = not server.cluster            # CONFIG on every cluster node is out of scope here
    if slowlog:
        old = r.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
        r.config_set("slowlog-log-slower-than", 50_000)   # log every command over 50 ms
        r.slowlog_reset()
    try:
        # When a 100,000-task batch is enqueued under tracemalloc
        tracemalloc.start()
        try:
            def build(b):
                for _ in range(n):
                    b.enqueue(tasks.record, prefix + ":never", arg)
            batch_id = processor.enqueue_batch("default", "acme", build)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Then memory stayed far below the payloads' size, and every task is counted and queued
        assert n * one > 20_000_000
        assert peak < n * one / 5, f"peak {peak} bytes for {n} payloads of {one} bytes"
        info = processor.get_batch(batch_id)
        assert (info.total, info.remaining, info.state) == (n, n, "running")
        assert processor.get_queue("default").queued == n
        # When it is canceled and a worker meets the 100,000 canceled tasks in its queue
        assert processor.cancel_batch(batch_id)
        embedded_worker(processor)
        wait_until(lambda: processor.get_queue("default").queued == 0, 60, "canceled tasks dropped")
        # Then nothing ran and all are counted canceled
        assert r.llen(prefix + ":never") == 0
        info = processor.get_batch(batch_id)
        assert (info.state, info.canceled, info.remaining) == ("canceled", n, 0)
        # And no script call used 50 ms of server CPU (staging, commit, publication, fetches)
        if cpu is not None:
            names = {name for name, _ in timed}
            assert {"batch_stage", "batch_commit", "batch_publish", "cancel_batch"} <= names
            assert sum("fetch" in name for name in names) and len(timed) > 2 * n / 500
            assert max(ms for _, ms in timed) < 50, sorted(timed, key=lambda x: -x[1])[:5]
        # And SLOWLOG (wall time) shows none over 50 ms, unless other processes overload the machine
        if slowlog:
            slow = [e for e in r.slowlog_get(128) if e["command"].upper().startswith(b"EVAL")]
            if os.getloadavg()[0] < 1.5 * (os.cpu_count() or 1):
                assert slow == [], [(e["duration"], e["command"][:80]) for e in slow]
    finally:
        if slowlog:
            r.config_set("slowlog-log-slower-than", old)


# ----------------------------------------------------------------------------- statistics

def test_get_batch_get_batches_and_count(processor, make_processor, r, prefix):
    # Given three batches of tenant acme and one of tenant other
    ids = [processor.enqueue_batch("default", "acme", lambda b, i=i: b.enqueue(tasks.record, "k", i), scope=f"s{i}")
           for i in range(3)]
    other = processor.enqueue_batch("default", "other", lambda b: b.enqueue(tasks.record, "k", 9))
    # Then get_batch finds each (and only for its own tenant when one is given)
    assert processor.get_batch("no-such-batch") is None
    assert processor.get_batch(ids[0], tenant="other") is None
    assert processor.get_batch(ids[0], tenant="acme").scope == "s0"
    # And get_batches lists a tenant's batches newest first, paged, with their count
    assert processor.get_batches_count("acme") == 3 and processor.get_batches_count("other") == 1
    listed = processor.get_batches("acme", 0, 25)
    assert {b.id for b in listed} == set(ids)
    created = [b.created for b in listed]
    assert created == sorted(created, reverse=True)
    assert [b.id for b in processor.get_batches("acme", 1, 1)] == [listed[1].id]
    assert [b.id for b in processor.get_batches("other")] == [other]
    assert processor.get_batches("nobody") == [] and processor.get_batches_count("nobody") == 0


def test_counter_identity_holds_under_concurrent_completion(processor, start_manager, r, prefix):
    # Given a 600-task batch: a fifth always fail with no retry (dead letters), a fifth fail once
    # and succeed on their retry, the rest succeed
    rng = random.Random(7)
    kinds = [rng.choice("ddd" "f" "x") for _ in range(600)]
    key = prefix + ":out"

    def build(b):
        for i, kind in enumerate(kinds):
            if kind == "x":
                b.enqueue(tasks.always_fail, f"planned {i}", retries=0)
            elif kind == "f":
                b.enqueue(tasks.fail_times, f"{prefix}:ft:{i}", 1, retries=2)     # fails once, then succeeds
            else:
                b.enqueue(tasks.record, key, i)
    batch_id = processor.enqueue_batch("default", "acme", build)
    # When 2 worker processes x 8 threads complete it while we sample get_batch in a loop
    start_manager(processes=2, threads=8)
    samples: list[BatchInfo] = []
    deadline = time.monotonic() + 60
    while True:
        info = processor.get_batch(batch_id)
        samples.append(info)
        if info.finished or time.monotonic() > deadline:
            break
    # Then total == done + failed + canceled + remaining on every sample
    bad = [s for s in samples if not identity(s)]
    assert bad == [], bad[:3]
    assert any(0 < s.done < s.total for s in samples), "no sample caught the batch in progress"
    final = samples[-1]
    assert final.finished, final
    failed = kinds.count("x")
    assert (final.state, final.total, final.done, final.failed, final.canceled, final.remaining) == \
        ("failed", 600, 600 - failed, failed, 0, 0)
    assert processor.get_queue("default").dead == failed


def test_finished_batches_are_deleted_after_retention(make_processor, embedded_worker, r, prefix):
    # Given a retention of 1 s, cleaned up every 0.2 s, a finished batch and a canceled one
    p = make_processor(retention=1, cleanup_frequency=0.2, strict_queues=False)   # "elsewhere": nobody's queue
    done_id = p.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks.record, prefix + ":out", 1), b.continue_with(tasks.record, prefix + ":cont", on="success"),
        b.continue_with(tasks.record, prefix + ":never", on="complete", queue="elsewhere")))
    canceled_id = p.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks.record, prefix + ":out", 2, delay_until=HOUR), b.continue_with(tasks.record, "k")))
    assert p.cancel_batch(canceled_id)
    # When a worker runs and cleans up
    embedded_worker(p)
    wait_until(lambda: r.llen(prefix + ":cont") == 1, 10, "success continuation")
    # Then both batches vanish, with every key that names them
    def gone(b: str) -> bool:
        return (p.get_batch(b) is None and not list(r.scan_iter(match=f"{prefix}:b:{b}*"))
                and r.zscore(f"{prefix}:batches:acme", b) is None and r.zscore(f"{prefix}:bend", b) is None)
    wait_until(lambda: gone(done_id) and gone(canceled_id), 10, "batches deleted")
    assert p.get_batches_count("acme") == 0 and r.llen(f"{prefix}:bended") == 0


# -------------------------------------------------------------------------- continuations

def test_continuations_run_exactly_once_under_completion_races(processor, start_manager, r, prefix):
    # Given 30 batches of 8 tasks, each with a success and a complete continuation
    labels = [f"b{i}" for i in range(30)]
    for label in labels:
        processor.enqueue_batch("default", "acme", lambda b, label=label: (
            [b.enqueue(tasks.count, f"{prefix}:task:{label}") for _ in range(8)],
            b.continue_with(tasks.count, f"{prefix}:ok:{label}", on="success"),
            b.continue_with(tasks.count, f"{prefix}:all:{label}", on="complete")))
    # When 8 threads (2 processes x 4) race to complete them
    start_manager(processes=2, threads=4)

    def settled() -> bool:
        q = processor.get_queue("default")
        return q.queued == 0 and q.in_flight == 0 and all(
            r.get(f"{prefix}:ok:{x}") and r.get(f"{prefix}:all:{x}") for x in labels)
    wait_until(settled, 60, "every batch and continuation")
    # Then every continuation ran exactly once, and none is left waiting
    assert [int(r.get(f"{prefix}:task:{x}")) for x in labels] == [8] * 30
    assert [(int(r.get(f"{prefix}:ok:{x}")), int(r.get(f"{prefix}:all:{x}"))) for x in labels] == [(1, 1)] * 30
    assert not list(r.scan_iter(match=f"{prefix}:b:*:cont"))
    assert all(b.state == "succeeded" for b in processor.get_batches("acme", 0, 100))


def test_continuation_conditions_and_their_queue(make_processor, embedded_worker, r, prefix):
    # Given a worker on two queues, and a batch with one failing task and three continuations
    p = make_processor(queues=["default", "high"])
    key = prefix + ":ctx"
    batch_id = p.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks.record, prefix + ":out", 1),
        b.enqueue(tasks.always_fail, retries=0),
        b.continue_with(tasks_batch.record_ctx, key, on="success"),
        b.continue_with(tasks_batch.record_ctx, key, on="complete"),
        b.continue_with(tasks_batch.record_ctx, key, on="complete", queue="high")))
    # When it finishes
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 2, 10, "complete continuations")
    info = p.wait_for_batch(batch_id, 10)
    # Then only the complete continuations ran, each in its own queue, seeing the batch
    assert (info.state, info.done, info.failed) == ("failed", 1, 1)
    ran = [json.loads(x) for x in r.lrange(key, 0, -1)]
    assert sorted(x["queue"] for x in ran) == ["default", "high"]
    assert all(x["batch"]["id"] == batch_id and x["batch"]["total"] == 2 for x in ran)
    wait_until(lambda: p.get_queue("high").in_flight == 0 and p.get_queue("default").in_flight == 0, 5, "acks")
    assert r.llen(key) == 2


def test_dead_task_retried_reopens_batch_and_runs_pending_success_continuation(processor, embedded_worker, r, prefix):
    # Given a batch whose second task fails (no retry) while a flag is set, with both kinds of continuation
    flag = prefix + ":flag"
    r.set(flag, 1)
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks.record, prefix + ":out", 1),
        b.enqueue(tasks_batch.fail_while_flag, prefix + ":out", flag, retries=0),
        b.continue_with(tasks.count, prefix + ":ok", on="success"),
        b.continue_with(tasks.count, prefix + ":all", on="complete")))
    embedded_worker(processor)
    wait_until(lambda: r.get(prefix + ":all"), 10, "complete continuation")
    info = processor.get_batch(batch_id)
    assert (info.state, info.done, info.failed, r.get(prefix + ":ok")) == ("failed", 1, 1, None)
    # When the cause is fixed and the dead task is retried
    r.delete(flag)
    assert processor.retry_dead_tasks("default") == 1
    # Then the batch re-opens, succeeds, and the success continuation runs once; the complete one not again
    wait_until(lambda: r.get(prefix + ":ok"), 10, "success continuation")
    info = processor.wait_for_batch(batch_id, 10)
    assert (info.state, info.done, info.failed, info.remaining) == ("succeeded", 2, 0, 0)
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks")
    assert (int(r.get(prefix + ":ok")), int(r.get(prefix + ":all"))) == (1, 1)


@pytest.mark.parametrize("how", ["by id", "in bulk"])
def test_a_dead_letter_whose_batch_was_deleted_runs_again_as_a_task_of_no_batch(make_processor, embedded_worker, r,
                                                                                prefix, how):
    # Given a batch whose task failed for good, and the batch deleted after its retention
    p = make_processor(retention=1, cleanup_frequency=0.2)
    flag, out = prefix + ":flag", prefix + ":out"
    r.set(flag, 1)
    batch_id = p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_batch.fail_while_flag, out, flag,
                                                                      retries=0))
    embedded_worker(p)
    wait_until(lambda: p.get_queue("default").dead == 1 and p.get_batch(batch_id) is None, 15,
               "dead-lettered, then the batch deleted")
    [dead] = p.get_dead_tasks("default")
    # When it is retried (the cause fixed), then it runs, as a task of no batch
    r.delete(flag)
    assert (p.retry_dead_task(dead.id) if how == "by id" else p.retry_dead_tasks("default") == 1) is True
    wait_until(lambda: r.llen(out) == 1, 10, "the retried task ran")
    assert p.get_queue("default").dead == 0


def test_append_batch(processor, make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    # Given a batch with a success continuation, appended to while nobody runs it
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks.record, key, 1), b.continue_with(tasks.count, prefix + ":ok")))
    assert processor.append_batch("default", "acme", batch_id, lambda b: b.enqueue(tasks.record, key, 2))
    assert processor.get_batch(batch_id).total == 2
    # Then appends are refused for an unknown batch and for another tenant's
    assert processor.append_batch("default", "acme", "no-such-batch", lambda b: b.enqueue(tasks.record, key, 0)) is False
    assert processor.append_batch("default", "other", batch_id, lambda b: b.enqueue(tasks.record, key, 0)) is False
    # And an append whose build raises adds nothing
    def build_then_fail(b):
        b.enqueue(tasks.record, key, 0)
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        processor.append_batch("default", "acme", batch_id, build_then_fail)
    assert processor.get_batch(batch_id).total == 2
    # When it runs to the end
    embedded_worker(processor)
    wait_until(lambda: r.get(prefix + ":ok"), 10, "continuation")
    assert processor.wait_for_batch(batch_id).state == "succeeded"
    # And tasks are appended to the finished batch (its queue paused, so that the live worker
    # cannot finish them before the state is read)
    processor.pause_queue("default")
    assert processor.append_batch("default", "acme", batch_id, lambda b: b.enqueue(tasks.record, key, 3))
    # Then it re-opens (at once), runs them, and the continuation that already ran does not run again
    assert processor.get_batch(batch_id).state == "running"
    processor.resume_queue("default")
    wait_until(lambda: r.llen(key) == 3, 10, "appended task")
    info = processor.wait_for_batch(batch_id)
    assert (info.state, info.total, info.done) == ("succeeded", 3, 3)
    # And a continuation appended to the finished batch runs once, at once
    assert processor.append_batch("default", "acme", batch_id, lambda b: b.continue_with(tasks.count, prefix + ":late"))
    wait_until(lambda: r.get(prefix + ":late"), 10, "late continuation")
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks")
    assert (int(r.get(prefix + ":ok")), int(r.get(prefix + ":late"))) == (1, 1)
    assert sorted(int(x) for x in r.lrange(key, 0, -1)) == [1, 2, 3]
    # And a canceled batch takes no appends
    other = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, key, 9, delay_until=HOUR))
    assert processor.cancel_batch(other)
    assert processor.append_batch("default", "acme", other, lambda b: b.enqueue(tasks.record, key, 0)) is False
    assert processor.get_batch(other).total == 1


# ---------------------------------------------------------------------------------- hooks

def test_task_hooks_see_batch_statistics_and_never_lose_tasks(make_processor, embedded_worker, r, prefix):
    # Given hooks that record what they see, all of which then raise
    seen: dict[str, list[Any]] = {"start": [], "end": [], "error": [], "delay": [], "batch_end": []}
    lock = threading.Lock()

    def hook(name):
        def fn(*args):
            with lock:
                seen[name].append(args)
            raise RuntimeError(f"hook {name} is broken")
        return fn

    p = make_processor(on_task_start=hook("start"), on_task_end=hook("end"), on_task_error=hook("error"),
                       on_task_failed_delay=hook("delay"), on_batch_end=hook("batch_end"))
    batch_id = p.enqueue_batch("default", "acme", lambda b: (
        [b.enqueue(tasks.record, prefix + ":out", i) for i in range(3)],
        b.enqueue(tasks.fail_times, prefix + ":ft", 1, retries=2)))
    # When a worker runs the batch
    embedded_worker(p)
    info = p.wait_for_batch(batch_id, 15)
    wait_until(lambda: seen["batch_end"], 5, "on_batch_end")
    # Then every task ran despite the hooks raising, and the batch succeeded
    assert (info.state, info.done, info.failed) == ("succeeded", 4, 0)
    assert r.llen(prefix + ":out") == 3 and r.llen(prefix + ":ft:ok") == 1
    # And every hook got a context carrying the batch's statistics at fetch time
    wait_until(lambda: len(seen["end"]) == 5, 5, "on_task_end (runs just after the acknowledgement)")
    assert len(seen["start"]) == 5
    for (ctx,) in seen["start"] + seen["end"]:
        assert ctx.batch_id == batch_id and isinstance(ctx.batch, BatchInfo)
        assert ctx.batch.id == batch_id and ctx.batch.total == 4 and ctx.batch.state == "running"
        assert identity(ctx.batch) and ctx.batch.remaining >= 1
    (ctx, exc), = seen["error"]
    assert ctx.batch.total == 4 and isinstance(exc, RuntimeError)
    (ctx, left), = seen["delay"]
    assert ctx.batch_id == batch_id and left == 1
    # And on_batch_end ran once, with the final numbers
    (end,), = seen["batch_end"]
    assert (end.id, end.state, end.done, end.remaining) == (batch_id, "succeeded", 4, 0)


def test_on_batch_end_runs_exactly_once_per_batch_across_processes(processor, start_hook_manager, r, prefix):
    # Given 2 worker processes with an on_batch_end hook that INCRs a counter per batch id
    m = start_hook_manager(processes=2, threads=4)
    m.wait_children(2)
    # When 24 batches finish (some with failures) and 6 more are canceled
    ids = [processor.enqueue_batch("default", "acme", lambda b, i=i: (
        [b.enqueue(tasks.record, prefix + ":out", j) for j in range(4)],
        b.enqueue(tasks.always_fail, retries=0) if i % 3 == 0 else None)) for i in range(24)]
    canceled = [processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", 0, delay_until=HOUR))
                for _ in range(6)]
    assert all(processor.cancel_batch(b) for b in canceled)
    # Then once the hook queue is drained, every batch's hook ran exactly once
    wait_until(lambda: all(r.get(f"{prefix}:hook:end:{b}") for b in ids + canceled), 30, "every on_batch_end")
    wait_until(lambda: r.llen(f"{prefix}:bended") == 0, 10, "hook queue drained")
    assert {b: int(r.get(f"{prefix}:hook:end:{b}")) for b in ids + canceled} == {b: 1 for b in ids + canceled}
    ends = {e["id"]: e for e in map(json.loads, r.lrange(f"{prefix}:hook:ends", 0, -1))}
    assert len(ends) == 30
    assert {ends[b]["state"] for b in canceled} == {"canceled"}
    assert {ends[b]["state"] for b in ids} == {"succeeded", "failed"}
    assert all(ends[b]["remaining"] == 0 for b in ids)


def test_process_without_hook_leaves_batch_end_queue_to_those_with_it(processor, embedded_worker, r, prefix):
    # Given a worker process configured without on_batch_end
    embedded_worker(processor)
    # When a batch finishes
    batch_id = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, prefix + ":out", 1))
    processor.wait_for_batch(batch_id)
    time.sleep(0.5)   # the window in which the hook timer (every 0.2 s) would have popped it
    # Then its id stays queued for a process that has the hook (until retention drops the batch)
    assert r.lrange(f"{prefix}:bended", 0, -1) == [batch_id.encode()]
