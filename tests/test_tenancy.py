"""Multi-tenancy: fair queues, per-tenant concurrency limits, per-tenant pause, the tenant-scoped
view ``processor.tenant(name)``, per-tenant statistics and the ``tenants`` / ``tenant`` CLI.

Orders of execution are observed through a Redis list that every task appends to; a "fake
worker" is the test calling the Lua scripts itself with a worker id of its own, so that every
intermediate state of the ring, the running counts and the counters can be checked exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest

from coretask import ConfigurationError, ScheduleData, TaskProcessor
from coretask.gateway import Ack, Failure, Release
import coretask.tenancy
from coretask.tenancy import TenantStats, TenantView
from tests import tasks
from tests import tasks_tenancy as tt
from tests.conftest import FAST, ROOT, wait_until

HOUR = timedelta(hours=1)
FAR = "0 0 1 1 *"    # a cron schedule that never ticks during a test


# ------------------------------------------------------------------------------- helpers

def fetch_as(p: TaskProcessor, worker: str, n: int, *, lease_ms: int = 60_000, deflim: int = 0,
             queues: list[str] | None = None) -> list[dict[str, str]]:
    """Run the fetch script as ``worker``; returns the leased tasks (id, token, tenant, queue)."""
    reply = p.gateway.fetch(worker, n, lease_ms, deflim, queues or p.options.queues)
    return [dict(id=t.id, token=t.token, tenant=t.tenant, queue=t.queue) for t in reply.tasks]


def complete(p: TaskProcessor, worker: str, t: dict[str, str], outcome: str = "ok") -> list[int]:
    return p.gateway.complete(worker, [Ack(t["id"], t["token"], outcome, 3)])  # type: ignore[arg-type]


def fail(p: TaskProcessor, worker: str, t: dict[str, str], *, delay_ms: int = 0, bury: bool = False) -> int:
    return p.gateway.fail(worker, Failure(t["id"], t["token"], "ValueError", "bad", "Traceback: bad", 3,
                                          delay_ms=delay_ms, bury=bury))


def release(p: TaskProcessor, worker: str, t: dict[str, str]) -> int:
    return p.gateway.release(worker, [Release(t["id"], t["token"])])


def recover(p: TaskProcessor, mode: str, worker: str = "") -> list[int]:
    res = (p.gateway.recover_worker(worker, "worker lost", True) if mode == "worker"
           else p.gateway.recover_expired("worker lost", 100))
    return [res.requeued, res.buried, res.canceled]


def lines(r, key: str) -> list[str]:
    return [v.decode() for v in r.lrange(key, 0, -1)]


def ring(r, p: TaskProcessor, queue: str = "default") -> list[str]:
    return [v.decode() for v in r.lrange(p.gateway.keys.ring(queue), 0, -1)]


def trun(r, p: TaskProcessor, tenant: str) -> int:
    """The tenant's running count as the scripts keep it (P:trun)."""
    return int(r.hget(p.gateway.keys.trun, tenant) or 0)


def leased(r, p: TaskProcessor, tenant: str) -> int:
    """Ground truth for the running count: leases held by tasks of the tenant (a test-only scan)."""
    k = p.gateway.keys
    ids = [i.decode() for i in r.zrange(k.leases, 0, -1)]
    return sum(1 for i in ids if r.hget(k.task(i), "tn") == tenant.encode())


def dump(r, prefix: str) -> dict[str, Any]:
    """Every key under the prefix with its type and value (a test-only scan), to prove that a
    refused call changed nothing at all."""
    state: dict[str, Any] = {}
    for key in sorted(r.scan_iter(match=prefix + "*", count=1000)):
        kind = r.type(key).decode()
        value = {"string": r.get, "hash": r.hgetall, "set": r.smembers, "list": lambda k: r.lrange(k, 0, -1),
                 "zset": lambda k: r.zrange(k, 0, -1, withscores=True)}[kind](key)
        state[key.decode()] = (kind, value)
    return state


def positions(order: list[str], prefix: str) -> list[int]:
    return [i for i, name in enumerate(order) if name.startswith(prefix)]


# ----------------------------------------------------------------------------- fairness

def test_small_tenant_is_served_within_25_tasks_of_a_10000_task_backlog(make_processor, embedded_worker, r, prefix):
    key = prefix + ":order"
    p = make_processor(max_workers=1)
    # Given tenant A with 10,000 queued tasks (one batch) and a single-threaded worker working on them
    p.enqueue_batch("default", "A", lambda b: [b.enqueue(tt.step, key, "A") for _ in range(10_000)])
    embedded_worker(p)
    wait_until(lambda: r.llen(key) >= 20, 30, "A's backlog to be under way")
    # When tenant B enqueues 10 tasks (the list's length once enqueue_batch returned bounds the
    # number of tasks that ran before B's tasks were published from above)
    p.enqueue_batch("default", "B", lambda b: [b.enqueue(tt.step, key, f"B{i}") for i in range(10)])
    mark = r.llen(key)
    wait_until(lambda: r.llen(key) >= mark + 25, 30, "25 more tasks")
    # Then all of B's tasks ran within the next 25 tasks executed, in their order, every other
    # task (A and B served in turn), while A's backlog was still far from done
    order = lines(r, key)
    b = positions(order, "B")
    assert [order[i] for i in b] == [f"B{i}" for i in range(10)]
    assert b[-1] < mark + 25 and all(y - x <= 2 for x, y in pairwise(b)), (mark, b)
    assert p.get_tenant_stats("A").queued["default"] > 5000
    # And B's tasks enqueued one at a time, each after the previous ran, run within 3 tasks of
    # their enqueue (at most the task in flight and one of A's come first; the list's length
    # once enqueue_task returned bounds the number of tasks that ran before it from above)
    for i in range(5):
        p.enqueue_task("default", "B", tt.step, key, f"b{i}")
        after = r.llen(key)
        wait_until(lambda i=i: f"b{i}" in lines(r, key), 10, f"b{i}")
        assert lines(r, key).index(f"b{i}") <= after + 2, (after, lines(r, key)[after - 3:after + 5])


def test_small_tenants_finish_long_before_a_big_one_under_two_processes(processor, start_manager, r, prefix):
    key = prefix + ":order"
    # Given three tenants with 3000, 300 and 30 queued tasks, the biggest enqueued first
    for tenant, n in (("big", 3000), ("mid", 300), ("small", 30)):
        processor.enqueue_batch("default", tenant, lambda b, t=tenant, n=n: [b.enqueue(tt.step, key, t)
                                                                               for _ in range(n)])
    # When two worker processes run them
    start_manager(processes=2, threads=2)
    wait_until(lambda: r.llen(key) == 3330, 90, "all 3330 tasks")
    # Then the tenants are served in turn: the small tenant is done within its fair share of the
    # first tasks, the middle one long before the big one, which runs alone at the end. The list
    # is the order the tasks ran in, not the order they were leased in: a task thread descheduled
    # between its lease and its first line (four threads on two busy cores, on a cluster's six
    # servers) lets dozens of later tasks pass it, so the small tenant's share is judged on its
    # first 27 of 30 tasks (on the cluster, 2 runs in 11 had one small task run at position
    # 141-176; in the runs that recorded it, 29 of 30 had run by position 89 and one straggled)
    order = lines(r, key)
    last = {t: max(positions(order, t)) for t in ("big", "mid", "small")}
    assert sorted(positions(order, "small"))[26] < 3 * 30 + 30, positions(order, "small")
    assert last["small"] < last["mid"] < last["big"], last
    assert last["mid"] < 30 + 2 * 300 + 200, last
    assert order[last["mid"] + 1:] == ["big"] * (3329 - last["mid"])
    assert positions(order, "small")[0] < 10 and positions(order, "mid")[0] < 10


def test_retried_and_delayed_tasks_stay_fair(make_processor, embedded_worker, r, prefix):
    key, flag = prefix + ":order", prefix + ":flag"
    # C's failures are retried after 0.2 s (through the delayed set), B's at once
    p = make_processor(max_workers=1, on_task_failed_delay=lambda ctx, left: (
        timedelta(seconds=0.2) if ctx.tenant == "C" else None))
    # Given tenant A with 6000 queued tasks and a single-threaded worker working on them
    p.enqueue_batch("default", "A", lambda b: [b.enqueue(tt.step, key, "A") for _ in range(6000)])
    embedded_worker(p)
    wait_until(lambda: r.llen(key) >= 20, 30, "A's backlog to be under way")

    # When a task of B fails three times (each retry going back to B's list at once); the
    # list's length once enqueue_task returned bounds the tasks that ran before it from above
    p.enqueue_task("default", "B", tt.step_fail, key, "B", 3, retries=4)     # 4 attempts may fail
    mark = r.llen(key)
    wait_until(lambda: "B#4" in lines(r, key), 10, "B's fourth attempt")
    # Then every attempt ran within 3 tasks of the previous one
    order = lines(r, key)
    b = positions(order, "B#")
    assert [order[i] for i in b] == ["B#1", "B#2", "B#3", "B#4"]
    assert b[0] <= mark + 2 and all(y - x <= 3 for x, y in pairwise(b)), (mark, b)

    # When 10 delayed tasks of D come due at once, and a task of C fails once (retried after 0.2 s)
    when = time.time() + 0.3
    for i in range(10):
        p.enqueue_task("default", "D", tt.step, key, f"D{i}", delay_until=when)
    p.enqueue_task("default", "C", tt.step_fail, key, "C", 1, retries=2)
    wait_until(lambda: {f"D{i}" for i in range(10)} | {"C#2"} <= set(lines(r, key)), 10, "D's tasks and C's retry")
    # Then D's tasks ran interleaved with A's (alternating), and neither D nor C's retry waited
    # for A's backlog, which is still queued
    order = lines(r, key)
    d = positions(order, "D")
    assert d[-1] - d[0] <= 2 * 10 + 2, d
    assert p.get_tenant_stats("A").queued["default"] > 1000

    # When a dead-lettered task of E is retried with retry_dead_tasks
    r.set(flag, 1)
    p.enqueue_task("default", "E", tt.fail_while, flag, key, "E", retries=0)
    wait_until(lambda: p.get_queue("default").dead == 1, 10, "E's task dead-lettered")
    r.delete(flag)
    assert p.retry_dead_tasks("default") == 1
    mark = r.llen(key)
    wait_until(lambda: "E" in lines(r, key), 10, "E's retried task")
    # Then it ran within 3 tasks, A's backlog still queued
    assert lines(r, key).index("E") <= mark + 2
    assert p.get_tenant_stats("A").queued["default"] > 500


def test_every_way_back_to_ready_goes_through_the_tenants_list(processor, r):
    p = processor
    # Given tenant A with 30 ready tasks and tenant B with one
    p.enqueue_batch("default", "A", lambda b: [b.enqueue(tasks.count, "x") for _ in range(30)])
    b_id = p.enqueue_task("default", "B", tasks.count, "x", retries=4)   # 3 failures and a recovery below

    def fetch_two_expecting_b(why: str) -> dict[str, str]:
        got = fetch_as(p, "w1", 2)
        assert sorted(t["tenant"] for t in got) == ["A", "B"], (why, got, ring(r, p))
        return next(t for t in got if t["tenant"] == "B")

    # When a fake worker takes two tasks: one of each tenant, and B leaves the ring (list empty)
    t = fetch_two_expecting_b("first fetch")
    assert t["id"] == b_id and ring(r, p) == ["A"]
    # Then after each way a task goes back to ready, B is in the ring again and its task is among
    # the next two fetched, whatever A's backlog
    recover(p, "worker", "w1")                     # the worker died: redelivered (A's too)
    assert "B" in ring(r, p) and r.lrange(p.gateway.keys.ready("default", "B"), 0, -1) == [b_id.encode()]
    t = fetch_two_expecting_b("redelivery")
    assert release(p, "w1", t) == 1                # handed back (shutdown, pause with requeue)
    t = fetch_two_expecting_b("release")
    assert fail(p, "w1", t) == 1                   # failed: retried at once
    t = fetch_two_expecting_b("retry")
    assert fail(p, "w1", t, delay_ms=1) == 1       # failed: retried after a delay
    due = time.time() + 0.01
    wait_until(lambda: time.time() > due, 1, "the retry's due time")
    t = fetch_two_expecting_b("delayed retry")
    assert fail(p, "w1", t, bury=True) == 2        # dead-lettered, then retried from the dead letters
    assert ring(r, p) == ["A"]
    assert p.retry_dead_tasks("default") == 1
    t = fetch_two_expecting_b("dead letter retry")
    recover(p, "worker", "w1")
    got = fetch_as(p, "w2", 2, lease_ms=1)         # leased by a worker that then stops renewing
    assert {x["tenant"] for x in got} == {"A", "B"}
    expired = time.time() + 0.01
    wait_until(lambda: time.time() > expired, 1, "the leases' deadline")
    assert recover(p, "expired") == [2, 0, 0]
    t = fetch_two_expecting_b("lease expiry")
    assert t["id"] == b_id
    assert p.get_tenant_stats("B").running == 1 and leased(r, p, "B") == 1


def test_a_canceled_batch_leaves_a_shared_queue_in_one_fetch_not_one_task_per_turn(processor, r):
    p = processor
    # Given tenant A's batch of 300 queued tasks ahead of tenant B's 300 single tasks, in one queue
    batch_id = p.enqueue_batch("default", "A", lambda b: [b.enqueue(tasks.count, "x") for _ in range(300)])
    for _ in range(300):
        p.enqueue_task("default", "B", tasks.count, "x")
    assert ring(r, p) == ["A", "B"] and p.get_queue("default").queued == 600
    # When A's batch is canceled and a worker fetches a single task
    assert p.cancel_batch(batch_id) is True
    got = fetch_as(p, "w1", 1)
    # Then that one fetch dropped every task of the canceled batch (each dropped task kept A's
    # turn, where each used to pass it to B, one task of B leased per task of A dropped) and
    # leased B's first
    assert [t["tenant"] for t in got] == ["B"]
    assert r.llen(p.gateway.keys.ready("default", "A")) == 0 and ring(r, p) == ["B"]
    assert p.get_queue("default").queued == 299 and p.get_tenant_stats("A").queued == {"default": 0}
    info = p.get_batch(batch_id)
    assert (info.state, info.canceled, info.remaining) == ("canceled", 300, 0)
    # And the turns of live tenants still alternate after it
    p.enqueue_task("default", "A", tasks.count, "x")
    assert [t["tenant"] for t in fetch_as(p, "w1", 4)] == ["B", "A", "B", "B"]


def test_a_tenant_view_retries_and_discards_only_its_own_dead_letters_in_bulk(processor, r):
    p = processor
    # Given dead letters of two tenants, interleaved in one queue's dead list
    ids: dict[str, list[str]] = {"A": [], "B": []}
    for i in range(6):
        tenant = "AB"[i % 2]
        ids[tenant].append(p.enqueue_task("default", tenant, tasks.count, "x"))
    for t in fetch_as(p, "w1", 6):
        assert fail(p, "w1", t, bury=True) == 2
    assert p.get_queue("default").dead == 6
    a = p.tenant("A")
    # When A retries its oldest one, then discards the rest of its own
    assert a.retry_dead_tasks("default", count=1) == 1
    assert p.get_task(ids["A"][0]).state == "queued"
    assert a.discard_dead_tasks("default") == 2
    # Then B's three are untouched, and a count of 0 or another tenant's view changes nothing more
    assert sorted(d.id for d in p.get_dead_tasks("default")) == sorted(ids["B"])
    assert a.retry_dead_tasks("default") == 0 and p.tenant("B").discard_dead_tasks("default", count=0) == 0
    assert p.tenant("B").retry_dead_tasks("default", retries=2) == 3 and p.get_queue("default").dead == 0


def test_a_bulk_retry_misses_none_of_its_dead_letters_when_another_hand_removes_entries_meanwhile(
        processor, monkeypatch):
    p = processor
    monkeypatch.setattr(coretask.tenancy, "DEAD_SCAN", 2)     # pages of two: the race within a few entries
    # Given a dead list B, B, A, A, A
    order = ["B", "B", "A", "A", "A"]
    ids = [p.enqueue_task("default", tenant, tasks.count, "x") for tenant in order]
    leased = {t["id"]: t for t in fetch_as(p, "w1", 5)}
    for task_id in ids:
        assert fail(p, "w1", leased[task_id], bury=True) == 2
    assert [d.id for d in p.get_dead_tasks("default")] == ids
    # When A retries all of its own while an operator discards B's first entry in the middle of it
    a = p.tenant("A")
    own = a.retry_dead_task
    raced: list[bool] = []

    def retry_and_race(task_id: str, retries: int | None = None) -> bool:
        if not raced:
            raced.append(p.discard_dead_task(ids[0]))     # the pages move under the scan
        return own(task_id, retries)

    monkeypatch.setattr(a, "retry_dead_task", retry_and_race)
    # Then every one of A's three is back at work, and B's other entry is untouched
    assert a.retry_dead_tasks("default") == 3 and raced == [True]
    assert [p.get_task(i).state for i in ids[2:]] == ["queued"] * 3
    assert [d.id for d in p.get_dead_tasks("default")] == [ids[1]]


# -------------------------------------------------------------------- concurrency limits

def held(r, key: str, what: str, tenant: str) -> int:
    return r.llen(f"{key}:{what}:{tenant}")


def peak(r, key: str, tenant: str) -> int:
    return max((int(v) for v in r.lrange(f"{key}:peak:{tenant}", 0, -1)), default=0)


def test_tenant_concurrency_caps_each_tenant_across_processes_without_blocking_others(
        make_processor, start_manager, r, prefix):
    p = make_processor(tenant_concurrency=3)
    key = prefix + ":h"
    # Given a default limit of 3 (Options.tenant_concurrency), an override of 5 for globex, 20
    # tasks each of acme (no override) and globex that run until released, and 2 x 8 threads
    p.set_tenant_limit("globex", 5)
    for tenant in ("acme", "globex"):
        p.enqueue_batch("default", tenant, lambda b, t=tenant: [b.enqueue(tt.hold, key, t, 0.03) for _ in range(20)])
    start_manager(processes=2, threads=8, tenant_concurrency=3)
    # When the workers start them
    wait_until(lambda: held(r, key, "started", "acme") == 3 and held(r, key, "started", "globex") == 5, 20,
               "3 tasks of acme and 5 of globex running")
    # Then exactly 3 of acme and 5 of globex run at once, although 8 threads are idle, and the
    # others wait in their queue
    for _ in range(30):
        assert (trun(r, p, "acme"), trun(r, p, "globex")) == (3, 5)
        time.sleep(0.005)
    a, g = p.get_tenant_stats("acme"), p.get_tenant_stats("globex")
    assert (a.running, a.queued, a.limit) == (3, {"default": 17}, 3)
    assert (g.running, g.queued, g.limit) == (5, {"default": 15}, 5)
    assert (peak(r, key, "acme"), peak(r, key, "globex")) == (3, 5)
    # When they are released (each task then runs 30 ms), and the running counts are sampled
    r.set(key + ":go", 1)
    samples = []
    deadline = time.monotonic() + 30
    while held(r, key, "done", "acme") + held(r, key, "done", "globex") < 40:
        samples.append((trun(r, p, "acme"), trun(r, p, "globex"), p.get_tenant_stats("acme").running))
        assert time.monotonic() < deadline, "the 40 tasks did not finish in 30 s"
    # Then no sample, and no task's own count of running tasks, ever exceeded a limit, both
    # tenants ran side by side, and every slot was given back at the end
    assert max(s[0] for s in samples) <= 3 and max(s[2] for s in samples) <= 3 and max(s[1] for s in samples) <= 5
    assert any(s[0] > 0 and s[1] > 0 for s in samples)
    assert (peak(r, key, "acme"), peak(r, key, "globex")) == (3, 5)
    wait_until(lambda: not r.hgetall(p.gateway.keys.trun), 5, "every running count back to 0")
    assert (p.get_tenant_stats("acme").done, p.get_tenant_stats("globex").done) == (20, 20)

    # Given 8 more tasks of acme, held, 3 of them running
    key2 = prefix + ":h2"
    for _ in range(8):
        p.enqueue_task("default", "acme", tt.hold, key2, "acme")
    wait_until(lambda: held(r, key2, "started", "acme") == 3 and trun(r, p, "acme") == 3, 10, "3 tasks running")
    # When acme's limit is raised to 6
    p.set_tenant_limit("acme", 6)
    # Then 3 more start at once: no task of acme finished, so no freed slot re-admitted them
    wait_until(lambda: held(r, key2, "started", "acme") == 6 and trun(r, p, "acme") == 6, 5, "6 tasks running")
    assert held(r, key2, "done", "acme") == 0 and p.get_tenant_stats("acme").queued == {"default": 2}
    # When the override is removed again (back to the default of 3)
    p.set_tenant_limit("acme", None)
    # Then the 6 running tasks go on and the 2 waiting ones stay queued until slots free up
    assert p.get_tenant_stats("acme").limit == 3
    for _ in range(30):
        assert (held(r, key2, "started", "acme"), trun(r, p, "acme")) == (6, 6)
        time.sleep(0.005)
    assert p.get_tenant_stats("acme").queued == {"default": 2}
    r.set(key2 + ":go", 1)
    wait_until(lambda: held(r, key2, "done", "acme") == 8, 10, "all 8 tasks done")
    wait_until(lambda: trun(r, p, "acme") == 0, 5, "acme's running count back to 0")


def test_tenant_slots_are_released_on_every_exit_path(make_processor, r):
    p = make_processor(queues=["default", "low"])
    k = p.gateway.keys

    def check(tenant: str, n: int) -> None:
        assert trun(r, p, tenant) == n == leased(r, p, tenant) == p.get_tenant_stats(tenant).running

    def only(tenant: str, got: list[dict[str, str]]) -> list[dict[str, str]]:
        return [t for t in got if t["tenant"] == tenant]

    # Given acme limited to 2, with 8 queued tasks, and globex (no limit) with 3
    p.set_tenant_limit("acme", 2)
    for i in range(8):
        p.enqueue_task("default", "acme", tasks.count, "x")
    for i in range(3):
        p.enqueue_task("default", "globex", tasks.count, "x")
    # When a fake worker asks for 10 tasks
    got = fetch_as(p, "w1", 10)
    # Then it gets 2 of acme and all of globex; acme left the ring, capped in queue default
    a = only("acme", got)
    assert (len(a), len(only("globex", got))) == (2, 3)
    check("acme", 2)
    assert "acme" not in ring(r, p) and r.smembers(f"{k.prefix}:capped:acme") == {b"default"}
    assert fetch_as(p, "w1", 10) == []
    # And each way a task stops running gives its slot back and re-admits acme at once
    assert complete(p, "w1", a.pop()) == [1]                   # completed
    check("acme", 1)
    assert "acme" in ring(r, p) and not r.exists(f"{k.prefix}:capped:acme")
    a += fetch_as(p, "w1", 10)
    check("acme", 2)
    assert fail(p, "w1", a.pop()) == 1                         # failed (retried)
    check("acme", 1)
    a += fetch_as(p, "w1", 10)
    assert release(p, "w1", a.pop()) == 1                      # handed back
    check("acme", 1)
    a += fetch_as(p, "w1", 10)
    check("acme", 2)
    assert fetch_as(p, "w1", 10) == []
    assert recover(p, "worker", "w1") == [5, 0, 0]             # its worker died (globex's too)
    check("acme", 0)
    check("globex", 0)
    got = fetch_as(p, "w2", 10, lease_ms=1)                    # its lease expired
    assert (len(only("acme", got)), len(only("globex", got))) == (2, 3)
    check("acme", 2)
    expired = time.time() + 0.01
    wait_until(lambda: time.time() > expired, 1, "the leases' deadline")
    assert recover(p, "expired") == [5, 0, 0]
    check("acme", 0)

    # Given initech limited to 2, with a batch of 5 tasks, 2 of them running
    p.set_tenant_limit("initech", 2)
    batch = p.enqueue_batch("low", "initech", lambda b: [b.enqueue(tasks.count, "x") for _ in range(5)])
    running = fetch_as(p, "w3", 10, queues=["low"])
    assert len(running) == 2
    # When the batch is canceled: the running tasks still hold their slots until they answer
    assert p.cancel_batch(batch) is True
    check("initech", 2)
    # Then the slot of one acknowledged as aborted, and of one that failed meanwhile, are freed
    assert complete(p, "w3", running[0], "canceled") == [1]
    check("initech", 1)
    assert fail(p, "w3", running[1]) == 3
    check("initech", 0)
    # And the queued tasks of the canceled batch are dropped, never leased
    assert fetch_as(p, "w3", 10, queues=["low"]) == []
    s = p.get_tenant_stats("initech")
    assert (s.canceled, s.queued["low"], s.running, s.batches["canceled"]) == (5, 0, 0, 1)
    assert r.hget(k.trun, "initech") is None


def test_kill_9_of_a_worker_leaks_no_tenant_slot(make_processor, start_manager, r, prefix):
    p = make_processor()
    key = prefix + ":h"
    started, done = f"{key}:started:acme", f"{key}:done:acme"
    # Given acme limited to 2, with 6 tasks that run until released, 2 of them running
    p.set_tenant_limit("acme", 2)
    for _ in range(6):
        p.enqueue_task("default", "acme", tt.hold, key, "acme")
    m = start_manager(processes=1, threads=4)
    wait_until(lambda: r.llen(started) == 2 and trun(r, p, "acme") == 2, 20, "2 tasks of acme running")
    (child,) = m.wait_children(1)
    dead_pid = child.pid
    # When the worker process is killed with SIGKILL
    child.kill()
    # Then the manager takes its tasks back, giving their slots back: the two it ran go to
    # isolation (which runs them one at a time, alone, within the tenant's limit), the new worker
    # process runs acme's tasks up to the limit, and the running count is what truly runs,
    # whatever the interleaving
    def new_starts() -> int:
        return sum(1 for v in r.lrange(started, 0, -1) if int(v) != dead_pid)

    wait_until(lambda: new_starts() >= 2, 30, "tasks running in the new processes")
    wait_until(lambda: trun(r, p, "acme") == leased(r, p, "acme") == p.get_tenant_stats("acme").running == 2,
               10, "the running count matching the leases")
    s = p.get_tenant_stats("acme")
    isolated = r.llen(p.gateway.keys.isolated("default"))
    assert s.queued["default"] + isolated + s.running == 6
    # When they are released
    r.set(key + ":go", 1)
    # Then all 6 tasks complete (the 2 killed ones once more) and no slot stays taken
    wait_until(lambda: r.llen(done) == 6, 20, "all 6 tasks done")
    wait_until(lambda: p.get_tenant_stats("acme").done == 6, 5, "6 acknowledgements")
    assert r.hget(p.gateway.keys.trun, "acme") is None and p.get_tenant_stats("acme").running == 0
    assert r.zcard(p.gateway.keys.leases) == 0
    assert all(int(v) != dead_pid for v in r.lrange(done, 0, -1))


# ---------------------------------------------------------------------------- pause/resume

def test_paused_tenant_stays_queued_in_every_queue_while_others_run(make_processor, embedded_worker, r, prefix):
    key = prefix + ":order"
    p = make_processor(queues=["default", "low"], max_workers=2)
    view = p.tenant("acme")
    # Given tenant acme paused (through its view)
    view.pause()
    assert view.is_paused and p.is_tenant_paused("acme") and not p.is_tenant_paused("globex")
    assert p.get_paused_tenants() == ["acme"] and view.get_stats().paused
    # And tasks of acme and globex in both queues, some due in 0.3 s, and a running worker
    when = time.time() + 0.3
    for tenant in ("acme", "globex"):
        for queue in ("default", "low"):
            for i in range(3):
                p.enqueue_task(queue, tenant, tt.step, key, f"{tenant}-{queue}-{i}")
        p.enqueue_task("default", tenant, tt.step, key, f"{tenant}-delayed", delay_until=when)
    embedded_worker(p)
    # When globex's tasks, the delayed one included, have all run
    wait_until(lambda: len(positions(lines(r, key), "globex")) == 7, 10, "globex's 7 tasks")
    # Then none of acme's ran: they wait in acme's lists of both queues (the delayed one too)
    wait_until(lambda: p.get_tenant_stats("acme").queued == {"default": 4, "low": 3}, 5, "acme's delayed task due")
    assert positions(lines(r, key), "acme") == []
    # And a task of acme enqueued while paused stays queued too, while one of globex runs
    p.enqueue_task("low", "acme", tt.step, key, "acme-late")
    p.enqueue_task("low", "globex", tt.step, key, "globex-late")
    wait_until(lambda: "globex-late" in lines(r, key), 10, "globex's late task")
    assert positions(lines(r, key), "acme") == []
    assert p.get_tenant_stats("acme").queued == {"default": 4, "low": 4}
    assert "acme" not in ring(r, p, "default") + ring(r, p, "low")
    # When acme is resumed
    view.resume()
    # Then all 8 of its tasks run, and it is no longer listed as paused
    wait_until(lambda: len(positions(lines(r, key), "acme")) == 8, 10, "acme's 8 tasks")
    assert not view.is_paused and p.get_paused_tenants() == []
    assert p.get_tenant_stats("acme").queued == {"default": 0, "low": 0}


# ------------------------------------------------------------------------- tenant view

def test_tenant_view_cannot_see_or_change_another_tenants_work(make_processor, r, prefix):
    p = make_processor(queues=["default", "low"])
    out = prefix + ":out"
    acme, globex = p.tenant("acme"), p.tenant("globex")
    assert isinstance(acme, TenantView) and acme.tenant == "acme" and repr(acme) == "<TenantView 'acme'>"
    with pytest.raises(ConfigurationError, match="tenant"):
        p.tenant("has space")

    def sched(sid: str, tenant: str = "") -> ScheduleData:
        return ScheduleData(id=sid, tenant=tenant, queue="default", scope=None, cron=FAR)

    # Given, for each of acme and globex: a batch (a task delayed by an hour and a continuation),
    # a schedule, a queued task and a dead-lettered task
    ids: dict[str, dict[str, str]] = {}
    for view in (acme, globex):
        t = view.tenant
        def build(b: Any, t: str = t) -> None:
            b.enqueue(tt.step, out, f"{t}-batch", delay_until=HOUR)
            b.continue_with(tt.step, out, f"{t}-cont")

        if t == "acme":
            with view.batch("default", scope=f"{t} work") as b:
                build(b)
            batch_id = b.id
        else:
            batch_id = view.enqueue_batch("default", build, scope=f"{t} work")
        assert view.upsert_schedule(sched(f"{t}-sched"), tt.step, out, f"{t}-sched") is True
        queued = view.enqueue_task("default", tt.step, out, f"{t}-queued")
        view.enqueue_task("low", tasks.always_fail, retries=0)
        (leased_task,) = fetch_as(p, "w", 1, queues=["low"])
        assert fail(p, "w", leased_task) == 2
        ids[t] = dict(batch=batch_id, queued=queued, dead=leased_task["id"])
    gb = ids["globex"]["batch"]
    before = dump(r, prefix)

    # When acme's view (and the unscoped API given tenant acme) reads, appends to, cancels,
    # waits for, triggers, replaces and deletes globex's batch and schedule
    assert acme.get_batch(gb) is None
    assert acme.append_batch("default", gb, lambda b: b.enqueue(tt.step, out, "intruder")) is False
    assert acme.cancel_batch(gb) is False
    with pytest.raises(ConfigurationError, match="not a batch of tenant 'acme'"):
        acme.wait_for_batch(gb, timeout=0.1)
    assert acme.get_schedule("globex-sched") is None
    assert acme.trigger_schedule("globex-sched") is None
    assert acme.cancel_schedule("globex-sched") is False
    with pytest.raises(ConfigurationError, match="another tenant"):
        acme.upsert_schedule(sched("globex-sched"), tt.step, out, "intruder")
    with pytest.raises(ConfigurationError, match="names tenant 'globex'"):
        acme.upsert_schedule(sched("new-sched", "globex"), tt.step, out, "intruder")
    assert p.append_batch("default", "acme", gb, lambda b: b.enqueue(tt.step, out, "intruder")) is False
    assert p.cancel_batch(gb, tenant="acme") is False
    assert p.get_batch(gb, tenant="acme") is None
    assert p.trigger_schedule("globex-sched", tenant="acme") is None
    assert p.cancel_schedule("globex-sched", "acme") is False
    # And lists what it can see
    assert [b.id for b in acme.get_batches()] == [ids["acme"]["batch"]] and acme.get_batches_count() == 1
    assert [s.id for s in acme.get_schedules()] == ["acme-sched"] and acme.get_schedules_count() == 1
    assert [t.id for t in acme.get_tasks_in_queue("default")] == [ids["acme"]["queued"]]
    assert [t.id for t in acme.get_dead_tasks("low")] == [ids["acme"]["dead"]]
    stats = acme.get_stats()
    assert isinstance(stats, TenantStats)
    assert (stats.tenant, stats.queued, stats.dead, stats.failed, stats.batches["running"]) == \
        ("acme", {"default": 1, "low": 0}, 1, 1, 1)
    # Then nothing of anybody's changed at all, and globex's things are still there for globex
    assert dump(r, prefix) == before
    assert globex.get_batch(gb).state == "running" and globex.get_schedule("globex-sched") is not None
    assert [t.id for t in globex.get_dead_tasks("low")] == [ids["globex"]["dead"]]
    # And pausing through acme's view pauses acme only
    acme.pause()
    assert (acme.is_paused, globex.is_paused, p.get_paused_tenants()) == (True, False, ["acme"])
    acme.resume()
    assert not acme.is_paused and p.get_paused_tenants() == []

    # When each view acts on its own things, it can
    for view in (acme, globex):
        t = view.tenant
        mine = ids[t]["batch"]
        assert view.get_batch(mine).tenant == t and view.get_schedule(f"{t}-sched").tenant == t
        assert view.append_batch("default", mine, lambda b, t=t: b.enqueue(tt.step, out, f"{t}-appended")) is True
        assert view.get_batch(mine).total == 2
        assert view.trigger_schedule(f"{t}-sched") is not None
        run = view.get_schedule(f"{t}-sched").last_task_id
        assert p.get_task(run).tenant == t
        assert view.cancel_schedule(f"{t}-sched") is True and view.get_schedules_count() == 0
        assert view.cancel_batch(mine) is True and view.get_batch(mine).state == "canceled"
        assert view.wait_for_batch(mine, timeout=5).canceled == 2
        assert {x.tenant for x in view.get_tasks_in_queue("default")} == {t}
    # And the unscoped API checks the tenant it is given when appending
    other = p.enqueue_batch("default", "globex", lambda b: b.enqueue(tt.step, out, "x", delay_until=HOUR))
    assert p.append_batch("default", "acme", other, lambda b: b.enqueue(tt.step, out, "y")) is False
    assert p.append_batch("default", "globex", other, lambda b: b.enqueue(tt.step, out, "y")) is True
    assert p.get_batch(other).total == 2


# --------------------------------------------------------------------------- statistics

def stats_of(p: TaskProcessor, tenant: str) -> dict[str, Any]:
    s = p.get_tenant_stats(tenant)
    return dict(queued=s.queued, running=s.running, done=s.done, failed=s.failed, canceled=s.canceled, dead=s.dead,
                batches={k: v for k, v in s.batches.items() if v})


def test_tenant_statistics_are_exact_after_a_mixed_workload(make_processor, embedded_worker, r, prefix):
    out, flag, key = prefix + ":out", prefix + ":flag", prefix + ":h"
    p = make_processor(queues=["default", "low"], max_workers=4, retention=3600)
    none = {"default": 0, "low": 0}
    r.set(flag, 1)     # tasks fail_while(flag) fail while it is set
    embedded_worker(p)
    # Given acme's batch b1 (5 tasks and a continuation) and b2 (3 tasks and 2 that fail with no
    # retry), 3 single tasks and 2 that fail with no retry (dead-lettered after b2's)
    b1 = p.enqueue_batch("default", "acme", lambda b: (
        [b.enqueue(tt.step, out, "ok") for _ in range(5)], b.continue_with(tt.step, out, "cont")))
    b2 = p.enqueue_batch("default", "acme", lambda b: (
        [b.enqueue(tt.step, out, "ok") for _ in range(3)],
        [b.enqueue(tt.fail_while, flag, out, "retried", retries=0) for _ in range(2)]))
    wait_until(lambda: p.get_queue("default").dead == 2, 10, "b2's 2 dead tasks")
    for _ in range(3):
        p.enqueue_task("default", "acme", tt.step, out, "ok")
    for _ in range(2):
        p.enqueue_task("default", "acme", tt.fail_while, flag, out, "discarded", retries=0)
    # And batch b3: a running task and 4 delayed by an hour; and globex: 2 tasks and a dead one
    b3 = p.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tt.hold, key, "acme"), [b.enqueue(tt.step, out, "never", delay_until=HOUR) for _ in range(4)]))
    for _ in range(2):
        p.enqueue_task("low", "globex", tt.step, out, "ok")
    p.enqueue_task("low", "globex", tt.fail_while, flag, out, "globex", retries=0)
    wait_until(lambda: r.llen(out) == 14 and p.get_queue("default").dead == 4 and p.get_queue("low").dead == 1
               and r.llen(f"{key}:started:acme") == 1, 10, "the workload")
    assert stats_of(p, "acme") == dict(queued=none, running=1, done=12, failed=4, canceled=0, dead=4,
                                       batches={"running": 1, "succeeded": 1, "failed": 1})
    # When b3 is canceled (its running task aborted)
    assert p.cancel_batch(b3) is True
    wait_until(lambda: p.get_batch(b3).remaining == 0 and p.get_tenant_stats("acme").running == 0, 10, "the abort")
    # Then acme's counters say exactly what happened
    assert stats_of(p, "acme") == dict(queued=none, running=0, done=12, failed=4, canceled=5, dead=4,
                                       batches={"succeeded": 1, "failed": 1, "canceled": 1})
    # When the 2 oldest dead letters (b2's) are retried and now succeed, and the others discarded
    r.delete(flag)
    assert p.retry_dead_tasks("default", count=2) == 2
    wait_until(lambda: p.get_tenant_stats("acme").done == 14, 10, "the 2 retried tasks")
    assert p.get_batch(b2).state == "succeeded"
    assert stats_of(p, "acme") == dict(queued=none, running=0, done=14, failed=2, canceled=5, dead=2,
                                       batches={"succeeded": 2, "canceled": 1})
    assert p.discard_dead_tasks("default") == 2
    # Then the counters follow, each tenant's only its own
    assert stats_of(p, "acme") == dict(queued=none, running=0, done=14, failed=2, canceled=5, dead=0,
                                       batches={"succeeded": 2, "canceled": 1})
    assert stats_of(p, "globex") == dict(queued=none, running=0, done=2, failed=1, canceled=0, dead=1, batches={})
    assert p.get_queue("low").dead == 1 and p.get_queue("default").dead == 0
    assert lines(r, out).count("retried") == 2 and "discarded" not in lines(r, out) and "never" not in lines(r, out)
    assert (p.get_tenant_stats("acme").limit, p.get_tenant_stats("acme").paused) == (None, False)
    # And get_tenants lists the tenants in name order, paged
    assert p.get_tenants() == ["acme", "globex"] and p.get_tenants_count() == 2
    assert (p.get_tenants(0, 1), p.get_tenants(1, 5), p.get_tenants(2, 5)) == (["acme"], ["globex"], [])

    # When the batches are older than the retention period of a worker's cleanup
    cleaner = make_processor(queues=["default", "low"], retention=0.2, cleanup_frequency=0.2)
    embedded_worker(cleaner)
    wait_until(lambda: p.get_batches_count("acme") == 0, 10, "acme's batches deleted")
    # Then they no longer count by state, while the task counters keep the tenant's history
    assert [p.get_batch(b) for b in (b1, b2)] == [None, None]
    assert stats_of(p, "acme") == dict(queued=none, running=0, done=14, failed=2, canceled=5, dead=0, batches={})
    raw = r.hgetall(p.gateway.keys.tstats("acme"))
    assert all(int(raw.get(f"b_{s}".encode(), 0)) == 0 for s in ("running", "succeeded", "failed", "canceled"))


# -------------------------------------------------------------------------------- CLI

def run_cli(prefix: str, *args: str, options: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(dict(FAST, **(options or {}))),
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "coretask", "--app", "tests.app:processor", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return res.stdout


def test_cli_tenants_and_tenant(make_processor, r, prefix):
    p = make_processor(queues=["default", "low"])
    # Given acme with 3 queued tasks in default and 1 in low, one running, one dead, a batch,
    # paused and limited to 4; globex with one queued task; and initech with only a schedule
    for _ in range(3):
        p.enqueue_task("default", "acme", tasks.count, "x")
    p.enqueue_batch("low", "acme", lambda b: [b.enqueue(tasks.count, "x") for _ in range(3)])
    (a, _running) = fetch_as(p, "w", 2, queues=["low"])
    assert fail(p, "w", a, bury=True) == 2
    p.enqueue_task("default", "globex", tasks.count, "x")
    p.upsert_schedule(ScheduleData(id="nightly", tenant="initech", queue="default", scope=None, cron=FAR),
                      tasks.count, "x")
    p.pause_tenant("acme")
    p.set_tenant_limit("acme", 4)
    # When the tenants are listed, as a table and as JSON
    text = ok(run_cli(prefix, "tenants"))
    doc = json.loads(ok(run_cli(prefix, "tenants", "--json")))
    # Then every tenant is there in name order with its numbers
    rows = [line.split() for line in text.splitlines()]
    assert rows[0] == ["TENANT", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELED", "DEAD", "PAUSED", "LIMIT"]
    assert rows[1:4] == [["acme", "4", "1", "0", "1", "0", "1", "yes", "4"],
                         ["globex", "1", "0", "0", "0", "0", "0", "no", "-"],
                         ["initech", "0", "0", "0", "0", "0", "0", "no", "-"]]
    assert "3 shown of 3 tenants" in text
    assert doc["count"] == 3 and [t["tenant"] for t in doc["tenants"]] == ["acme", "globex", "initech"]
    assert doc["tenants"][0] == dict(tenant="acme", queued={"default": 3, "low": 1}, running=1, done=0, failed=1,
                                     canceled=0, dead=1, paused=True, limit=4,
                                     batches={"running": 1, "succeeded": 0, "failed": 0, "canceled": 0}, shard=0)
    paged = json.loads(ok(run_cli(prefix, "tenants", "--skip", "1", "--take", "1", "--json")))
    assert paged["count"] == 3 and [t["tenant"] for t in paged["tenants"]] == ["globex"]
    # When one tenant is shown
    shown = ok(run_cli(prefix, "tenant", "acme")).splitlines()
    one = json.loads(ok(run_cli(prefix, "tenant", "globex", "--json")))
    # Then its statistics are printed; the JSON form is get_tenant_stats
    assert shown[:8] == ["tenant:   acme", "paused:   yes", "limit:    4", "running:  1", "done:     0",
                         "failed:   1", "canceled: 0", "dead:     1"]
    assert shown[8:] == ["queued:   default=3 low=1", "batches:  running=1 succeeded=0 failed=0 canceled=0"]
    assert one == json.loads(json.dumps(p.get_tenant_stats("globex").__dict__))
    # And with Options.tenant_concurrency the default limit is shown; an unknown tenant exits 1
    assert json.loads(ok(run_cli(prefix, "tenant", "globex", "--json", options={"tenant_concurrency": 2})))["limit"] == 2
    missing = run_cli(prefix, "tenant", "nobody")
    assert missing.returncode == 1 and "tenant nobody not found" in missing.stderr
    p.set_tenant_limit("newcomer", 2)      # no work yet, but a limit: known
    assert json.loads(ok(run_cli(prefix, "tenant", "newcomer", "--json")))["limit"] == 2
    assert json.loads(ok(run_cli(prefix, "tenants", "--json", "--skip", "5")))["tenants"] == []


def test_every_paged_read_refuses_a_page_that_would_read_everything_or_nothing(processor):
    # Given a tenant with a batch and queued work (a take of 0 or -1 would be a Redis stop of
    # -1: every entry)
    batch = processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(tasks.count, "k") for _ in range(3)])
    view = processor.tenant("acme")
    reads = {
        "get_tasks_in_queue": lambda s, t: processor.get_tasks_in_queue("default", s, t),
        "get_dead_tasks": lambda s, t: processor.get_dead_tasks("default", s, t),
        "get_running_tasks": lambda s, t: processor.get_running_tasks(s, t),
        "get_delayed_tasks": lambda s, t: processor.get_delayed_tasks(s, t, tenant="acme"),
        "get_quarantined": lambda s, t: processor.get_quarantined(s, t),
        "get_batch_results": lambda s, t: processor.get_batch_results(batch, s, t),
        "get_batch_tasks": lambda s, t: processor.get_batch_tasks(batch, skip=s, take=t),
        "get_batches": lambda s, t: processor.get_batches("acme", s, t),
        "get_schedules": lambda s, t: processor.get_schedules("acme", s, t),
        "get_tenants": lambda s, t: processor.get_tenants(s, t),
        "view.get_tasks_in_queue": lambda s, t: view.get_tasks_in_queue("default", s, t),
        "view.get_dead_tasks": lambda s, t: view.get_dead_tasks("default", s, t),
        "view.get_batches": lambda s, t: view.get_batches(s, t),
    }
    for name, read in reads.items():
        # When a page is asked with take 0 or below, a negative skip, or no number: refused, named
        for skip, take, said in ((0, 0, "take"), (0, -1, "take"), (-1, 5, "skip"), (0, "5", "take"), (True, 5, "skip")):
            with pytest.raises(ConfigurationError, match=f"{said} must be an integer >= "):
                read(skip, take)
        # And a proper page reads as before
        assert isinstance(read(0, 2), list), name
    assert len(processor.get_tasks_in_queue("default", 0, 2)) == 2 and len(processor.get_batch_tasks(batch, take=1)) == 1
    assert processor.get_batch_continuations(batch, take=1) == []
    with pytest.raises(ConfigurationError, match="take must be an integer >= 1"):
        processor.get_batch_continuations(batch, take=0)
    # (and a tenant that is not a string says so)
    with pytest.raises(ConfigurationError, match="a tenant is a string, got int 5"):
        processor.enqueue_task("default", 5, tasks.count, "k")
