"""Damaged task records among healthy ones, script by script (coretask/gateway/lua/_lib.lua:
read_task, take_out). For each script and each field of a task hash it reads, one record is
damaged (field deleted, garbage, a non-integer number, another value; or the whole key of another
Redis type, or gone) among five healthy tasks handled in the same call, and:

- the call succeeds and the healthy tasks are handled as if the damaged one were not there;
- the damaged one is dead-lettered (et CorruptTask, em naming the field) or, when not even its
  queue can be read, quarantined (P:quarantine, with the reason); or, where the script does not
  need that field, handled like the others;
- the counters reconcile: queue ready / in flight / delayed, the tenant's running count, the
  lease set and the worker's set, the tenant's dead count, the batch's numbers. The few counters
  a script cannot know (a running task whose record lost its queue or tenant, when nothing else
  names them) are asserted as exactly that one too high, and the reason says so.

The scripts are called through the gateway as a worker would (tests/test_lifecycle.py's "fake
worker"): acknowledgements carry the queue and tenant the fetch reply named, as the worker's do.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from coretask import QuarantinedTask, TaskProcessor
from coretask.gateway import Ack, Failure, Outcomes, Release
from tests import tasks
from tests.conftest import wait_until
from tests.tasks_corrupt import damage

LEASE_MS = 60_000
W = "fake-w1"


# ------------------------------------------------------------------------------- helpers

def hurt(r: Any, p: TaskProcessor, tid: str, field: str | None, how: str) -> None:
    """tests.tasks_corrupt.damage, plus "value:<text>": the field set to that text."""
    key = p.gateway.keys.task(tid)
    if how.startswith("value:"):
        r.hset(key, field, how[6:])
    else:
        damage(r, key, field, how)


def six(p: TaskProcessor, runs: str, victim_kw: dict[str, Any] | None = None, **kw: Any) -> tuple[list[str], str]:
    """Five healthy tasks and, third in line, the one the test damages (``victim_kw``: its own
    enqueue arguments)."""
    ids = [p.enqueue_task("default", "acme", tasks.record, runs, f"h{i}", **kw) for i in range(2)]
    victim = p.enqueue_task("default", "acme", tasks.record, runs, "victim", **{**kw, **(victim_kw or {})})
    ids += [p.enqueue_task("default", "acme", tasks.record, runs, f"h{i}", **kw) for i in range(2, 5)]
    return ids, victim


def lease_all(p: TaskProcessor, n: int = 6, lease_ms: int = LEASE_MS) -> dict[str, Any]:
    reply = p.gateway.fetch(W, n, lease_ms, 0, ["default"])
    return {t.id: t for t in reply.tasks}


def ack(t: Any, outcome: str = "ok", named: bool = True) -> Ack:
    """The acknowledgement a worker sends (named=False: one that does not name queue and tenant)."""
    return Ack(t.id, t.token, outcome, 3, t.queue if named else "", t.tenant if named else "")  # type: ignore[arg-type]


def failure(t: Any, named: bool = True, **kw: Any) -> Failure:
    return Failure(t.id, t.token, "ValueError", "bad", "Traceback: bad", 3, queue=t.queue if named else "",
                   tenant=t.tenant if named else "", **kw)


def where(p: TaskProcessor, r: Any, tid: str) -> tuple[str, str | None]:
    """Where a task is now: ("dead", em), ("quarantined", reason), ("ready"|"running"|...,
    None) by its state, or ("gone", None)."""
    k = p.gateway.keys
    if tid.encode() in r.lrange(k.dead("default"), 0, -1):
        rec = r.hgetall(k.task(tid))
        assert rec[b"st"] == b"dead" and rec[b"q"] == b"default", rec
        return "dead", rec.get(b"em", b"").decode(errors="replace")
    quarantined = {q.id: q.reason for q in p.get_quarantined()}
    if tid in quarantined:
        return "quarantined", quarantined[tid]
    if not r.exists(k.task(tid)):
        return "gone", None
    return r.hget(k.task(tid), "st").decode(), None


def assert_counts(p: TaskProcessor, r: Any, *, ready: int = 0, inflight: int = 0, delayed: int = 0, dead: int = 0,
                  running: int = 0, leased: int = 0) -> None:
    """Queue counters, as the scripts keep them, against what the lists and sets hold."""
    k = p.gateway.keys
    q = p.get_queue("default")
    assert (q.queued, q.in_flight, q.delayed, q.dead) == (ready, inflight, delayed, dead)
    assert r.llen(k.ready("default", "acme")) == ready
    assert int(r.hget(k.trun, "acme") or 0) == running
    assert r.zcard(k.leases) == leased and r.hlen(k.worker(W)) == leased
    assert r.zcard(k.delayed) == delayed


def assert_set_aside(p: TaskProcessor, r: Any, tid: str, expected: str, snippet: str | None) -> None:
    place, reason = where(p, r, tid)
    assert place == expected, (place, reason)
    if snippet is not None:
        assert reason is not None and snippet in reason, reason
    k = p.gateway.keys
    if expected == "dead":
        rec = r.hgetall(k.task(tid))
        assert rec[b"et"] == b"CorruptTask"
    if expected == "quarantined":
        assert QuarantinedTask(tid, reason) in p.get_quarantined()     # type: ignore[arg-type]
        assert p.get_quarantined_count() == 1
        assert r.type(k.task(tid)) != b"hash" or r.hget(k.task(tid), "st") == b"quarantined"


# ----------------------------------------------------------------------- fetch: ready lists

FETCH_CASES = [
    # field, damage, what happens to the damaged task, the reason (a part of it)
    ("p", "delete", "dead", "field 'p' (payload) is missing"),
    ("s", "delete", "dead", "field 's' (serializer) is missing"),
    ("tg", "delete", "dead", "field 'tg' (target) is missing"),
    ("r", "delete", "dead", "field 'r' (retries) is missing"),
    ("r", "garbage", "dead", "field 'r' (retries) is not a number"),
    ("r", "not-int", "dead", "field 'r' (retries) is not a number: '3.5'"),
    ("e", "not-int", "dead", "field 'e' (enqueued) is not a number"),
    ("a", "garbage", "dead", "field 'a' (attempt) is not a number"),
    ("a", "not-int", "dead", "field 'a' (attempt) is not a number"),
    ("tn", "delete", "dead", "field 'tn' (tenant) is missing"),
    ("q", "delete", "dead", "field 'q' (queue) is missing"),
    ("q", "value:low", "dead", "field 'q' (queue) is 'low', expected 'default'"),
    ("q", "garbage", "dead", "field 'q' (queue) is not a queue name"),
    ("b", "garbage", "dead", "field 'b' (batch) names no batch"),
    (None, "string", "quarantined", "holds a string, not a hash"),
    (None, "list", "quarantined", "holds a list, not a hash"),
    (None, "missing", "quarantined", "is missing"),
    # fields fetch does not need: the task is leased like the others
    ("a", "delete", "running", None),      # HINCRBY starts the attempt count again at 1
    ("e", "delete", "running", None),
    ("b", "delete", "running", None),
    ("cb", "delete", "running", None),
    ("sg", "delete", "running", None),
    ("st", "garbage", "running", None),
    ("d", "garbage", "running", None),
]


@pytest.mark.parametrize("field, how, expected, snippet", FETCH_CASES)
def test_fetch_leases_the_healthy_tasks_and_sets_a_damaged_one_aside(make_processor, r, prefix, field, how,
                                                                       expected, snippet):
    p = make_processor(queues=["default", "low"])
    p.enqueue_task("low", "acme", tasks.record, prefix + ":x", 0)    # queue low is known
    healthy, victim = six(p, prefix + ":runs")
    hurt(r, p, victim, field, how)
    # When one fetch call meets all six
    leased = lease_all(p, 10)
    # Then the healthy five are leased, and the damaged one is set aside (or leased, if harmless)
    n = 6 if expected == "running" else 5
    assert set(healthy) <= set(leased) and len(leased) == n
    assert_set_aside(p, r, victim, expected, snippet)
    dead = 1 if expected == "dead" else 0
    assert_counts(p, r, inflight=n, running=n, leased=n, dead=dead)
    stats = p.get_tenant_stats("acme")
    assert (stats.dead, stats.failed) == (dead, dead)
    # And every lease acknowledges as usual, after which nothing is left counted
    assert p.gateway.complete(W, [ack(t) for t in leased.values()]) == [1] * n
    assert_counts(p, r, dead=dead)
    assert p.get_tenant_stats("acme").done == n


def test_fetch_with_several_damaged_records_and_tenants_in_one_call(make_processor, r, prefix):
    # Given two tenants in one queue, each with healthy tasks and damaged ones between them
    p = make_processor()
    runs = prefix + ":runs"
    good = {t: [p.enqueue_task("default", t, tasks.record, runs, i) for i in range(3)] for t in ("acme", "beta")}
    bad = [p.enqueue_task("default", t, tasks.record, runs, "bad") for t in ("acme", "beta", "acme")]
    hurt(r, p, bad[0], "r", "garbage")
    hurt(r, p, bad[1], None, "string")
    hurt(r, p, bad[2], "p", "delete")
    # When one fetch serves both tenants in turn
    reply = p.gateway.fetch(W, 20, LEASE_MS, 0, ["default"])
    # Then every healthy task is leased, the tenants' running counts are theirs, the damaged are out
    assert {t.id for t in reply.tasks} == {*good["acme"], *good["beta"]}
    k = p.gateway.keys
    assert {t: int(n) for t, n in ((a.decode(), b) for a, b in r.hgetall(k.trun).items())} == {"acme": 3, "beta": 3}
    assert [where(p, r, b)[0] for b in bad] == ["dead", "quarantined", "dead"]
    q = p.get_queue("default")
    assert (q.queued, q.in_flight, q.dead) == (0, 6, 2)
    assert p.gateway.complete(W, [ack(t) for t in reply.tasks]) == [1] * 6
    assert not r.hgetall(k.trun) and r.zcard(k.leases) == 0 and p.get_queue("default").in_flight == 0


# --------------------------------------------------------------------- fetch: delayed tasks

DELAYED_CASES = [
    # field, damage, outcome, reason, the delayed count that stays (its queue unknown)
    ("q", "delete", "quarantined", "field 'q' (queue) is missing (not undone, as unknown: its queue's delayed count)", 1),
    ("q", "value:nosuch", "quarantined", "field 'q' (queue) names no known queue: 'nosuch'", 1),
    ("tn", "delete", "dead", "field 'tn' (tenant) is missing", 0),
    ("tn", "value:has space", "dead", "field 'tn' (tenant) is not a tenant name", 0),
    (None, "string", "quarantined", "holds a string, not a hash", 1),
    (None, "missing", "quarantined", "is missing", 1),
    ("b", "garbage", "dead", "field 'b' (batch) names no batch", 0),    # promoted; the lease refuses it
    ("b", "delete", "running", None, 0),
    ("d", "garbage", "running", None, 0),                                 # the zset's score is the due time
]


@pytest.mark.parametrize("field, how, expected, snippet, stays", DELAYED_CASES)
def test_promoting_delayed_tasks_sets_a_damaged_one_aside(make_processor, r, prefix, field, how, expected, snippet,
                                                           stays):
    p = make_processor()
    healthy, victim = six(p, prefix + ":runs", delay_until=timedelta(milliseconds=300))
    assert p.get_queue("default").delayed == 6
    hurt(r, p, victim, field, how)
    time.sleep(0.4)
    # When a fetch promotes the six due tasks and leases what it can
    leased = lease_all(p, 10)
    n = 6 if expected == "running" else 5
    assert set(healthy) <= set(leased) and len(leased) == n
    assert_set_aside(p, r, victim, expected, snippet)
    k = p.gateway.keys
    assert r.zcard(k.delayed) == 0
    # (a damaged delayed task whose queue cannot be read: nothing else says which queue's delayed
    # count it was in, and the reason says that count stays one too high)
    q = p.get_queue("default")
    assert (q.queued, q.in_flight, q.delayed, q.dead) == (0, n, stays, 1 if expected == "dead" else 0)
    assert p.gateway.complete(W, [ack(t) for t in leased.values()]) == [1] * n
    assert not r.hgetall(k.trun) and r.zcard(k.leases) == 0 and r.hlen(k.worker(W)) == 0


# ------------------------------------------------------------------------------- complete

COMPLETE_CASES = [
    # field, damage, acknowledgements name queue and tenant, code, outcome, reason, (inflight, running) left
    ("a", "delete", True, 2, "dead", "field 'a' (attempt) is missing", (0, 0)),
    ("a", "garbage", True, 2, "dead", "field 'a' (attempt) is not a number", (0, 0)),
    ("st", "delete", True, 2, "dead", "field 'st' (state) is missing", (0, 0)),
    ("st", "value:queued", True, 2, "dead", "field 'st' (state) is 'queued', but the task is leased to worker", (0, 0)),
    (None, "string", True, 2, "quarantined", "holds a string, not a hash", (0, 0)),
    (None, "missing", True, 2, "quarantined", "is missing", (0, 0)),
    # complete needs q and tn only when the acknowledgement does not name them
    ("q", "delete", True, 1, "gone", None, (0, 0)),
    ("tn", "garbage", True, 1, "gone", None, (0, 0)),
    ("b", "garbage", True, 1, "gone", None, (0, 0)),
    ("q", "delete", False, 2, "quarantined", "(not undone, as unknown: its queue's in-flight count)", (1, 0)),
    ("tn", "delete", False, 2, "dead", "(not undone, as unknown: its tenant's running count)", (0, 1)),
]


@pytest.mark.parametrize("field, how, named, code, expected, snippet, left", COMPLETE_CASES)
def test_complete_counts_the_healthy_acks_and_takes_a_damaged_record_out(make_processor, r, prefix, field, how,
                                                                          named, code, expected, snippet, left):
    # (the victim has an idempotency key, so its acknowledgement reads its record: a plain
    # task's does not, below)
    p = make_processor()
    healthy, victim = six(p, prefix + ":runs", victim_kw={"key": "k1"})
    leased = lease_all(p)
    assert len(leased) == 6
    hurt(r, p, victim, field, how)
    # When the worker acknowledges all six in one call
    codes = p.gateway.complete(W, [ack(leased[t], named=named) for t in [*healthy[:2], victim, *healthy[2:]]])
    # Then the healthy five count, and the damaged one is taken out of the worker's hands
    assert codes == [1, 1, code, 1, 1, 1]
    assert_set_aside(p, r, victim, expected, snippet)
    inflight, running = left
    assert_counts(p, r, inflight=inflight, running=running, dead=1 if expected == "dead" else 0)
    assert p.get_tenant_stats("acme").done == (6 if code == 1 else 5)


@pytest.mark.parametrize("field, how", [("a", "delete"), ("a", "garbage"), ("st", "value:queued"),
                                        (None, "string"), (None, "missing")])
def test_a_plain_tasks_acknowledgement_is_vouched_for_by_its_lease(make_processor, r, prefix, field, how):
    # Given a plain task (no batch, key or kept result) whose record was damaged while it ran
    p = make_processor()
    healthy, victim = six(p, prefix + ":runs")
    leased = lease_all(p)
    k = p.gateway.keys
    assert r.hget(k.worker(W), victim) == leased[victim].token.encode()   # the lease entry: its token
    hurt(r, p, victim, field, how)
    # When the worker holding the lease acknowledges it, naming queue and tenant
    codes = p.gateway.complete(W, [ack(leased[t]) for t in [*healthy[:2], victim, *healthy[2:]]])
    # Then the lease vouches for it: it is counted done and its record goes, unread
    assert codes == [1] * 6
    assert where(p, r, victim) == ("gone", None)
    assert_counts(p, r)
    assert p.get_tenant_stats("acme").done == 6 and p.get_quarantined_count() == 0
    # And a stale token (the same task, leased again to the same worker) still counts nothing
    again = p.enqueue_task("default", "acme", tasks.record, prefix + ":runs", "again")
    first = lease_all(p)[again]
    assert p.gateway.release(W, [Release(first.id, first.token, first.queue, first.tenant)]) == 1
    second = lease_all(p)[again]
    assert second.token != first.token
    assert p.gateway.complete(W, [ack(first)]) == [0]
    assert p.gateway.complete(W, [ack(second), ack(second)]) == [1, 0]    # a repeat in one call too
    assert_counts(p, r)
    assert p.get_tenant_stats("acme").done == 7


def test_answers_from_another_worker_for_a_damaged_record_change_nothing(make_processor, r, prefix):
    # Given a task leased to W whose record lost its attempt count while it ran (a keyed one:
    # its acknowledgement reads the record)
    p = make_processor()
    _, victim = six(p, prefix + ":runs", victim_kw={"key": "k1"})
    t = lease_all(p)[victim]
    hurt(r, p, victim, "a", "garbage")
    k = p.gateway.keys
    before = (r.hgetall(k.task(victim)), r.zscore(k.leases, victim), p.get_queue("default"), r.hgetall(k.trun))
    # When another worker answers for it in every way (a late answer after a lease it lost)
    assert p.gateway.complete("fake-w2", [ack(t)]) == [0]
    assert p.gateway.fail("fake-w2", failure(t)) == 0
    assert p.gateway.release("fake-w2", [Release(t.id, t.token, t.queue, t.tenant)]) == 0
    # Then nothing changed: the damage is for the lease holder's answer (or recovery) to meet
    assert (r.hgetall(k.task(victim)), r.zscore(k.leases, victim), p.get_queue("default"), r.hgetall(k.trun)) == before
    assert p.get_quarantined_count() == 0
    # And the holder's answer takes it out
    assert p.gateway.complete(W, [ack(t)]) == [2]
    assert where(p, r, victim)[0] == "dead"


def test_a_repeated_acknowledgement_of_a_completed_task_changes_nothing(make_processor, r, prefix):
    # (a missing record is "damaged" only for the worker holding its lease: a repeat is stale)
    p = make_processor()
    _, victim = six(p, prefix + ":runs")
    t = lease_all(p)[victim]
    assert p.gateway.complete(W, [ack(t)]) == [1]
    assert p.gateway.complete(W, [ack(t)]) == [0]
    assert p.get_quarantined_count() == 0


# ------------------------------------------------------------------------------------ fail

FAIL_CASES = [
    # field, damage, fail's reply, outcome, reason
    ("a", "garbage", 2, "dead", "field 'a' (attempt) is not a number"),
    ("st", "delete", 2, "dead", "field 'st' (state) is missing"),
    ("q", "delete", 2, "dead", "field 'q' (queue) is missing"),
    ("q", "value:nosuch", 2, "dead", "field 'q' (queue) names no known queue: 'nosuch'"),
    ("tn", "delete", 2, "dead", "field 'tn' (tenant) is missing"),
    ("r", "delete", 2, "dead", "field 'r' (retries) is missing"),
    ("r", "not-int", 2, "dead", "field 'r' (retries) is not a number: '3.5'"),
    (None, "string", 2, "quarantined", "holds a string, not a hash"),
    (None, "list", 2, "quarantined", "holds a list, not a hash"),
    # fail needs no usable w (the answering worker is the holder), nor sch before a burial
    ("w", "garbage", 1, "queued", None),
    ("w", "delete", 1, "queued", None),
    ("sch", "garbage", 1, "queued", None),
    ("b", "delete", 1, "queued", None),
]


@pytest.mark.parametrize("field, how, code, expected, snippet", FAIL_CASES)
def test_fail_retries_the_healthy_tasks_and_takes_a_damaged_record_out(make_processor, r, prefix, field, how, code,
                                                                        expected, snippet):
    p = make_processor(retries=2)
    healthy, victim = six(p, prefix + ":runs")
    leased = lease_all(p)
    hurt(r, p, victim, field, how)
    # When the six failures are answered (one script call each, in one round trip)
    replies = [p.gateway.fail(W, failure(leased[t])) for t in [*healthy[:2], victim, *healthy[2:]]]
    # Then the healthy five wait for their retry and the damaged one is out (or retried, if harmless)
    assert replies == [1, 1, code, 1, 1, 1]
    assert_set_aside(p, r, victim, expected, snippet)
    dead = 1 if expected == "dead" else 0
    assert_counts(p, r, ready=6 if code == 1 else 5, dead=dead)
    assert all(t.retries_left == 1 for t in p.get_tasks_in_queue("default"))
    if expected == "dead":   # the attempt's own error is kept beside the damage
        assert "the attempt failed with ValueError: bad" in r.hget(p.gateway.keys.task(victim), "etb").decode()


def test_failures_sent_together_in_one_round_trip(make_processor, r, prefix):
    p = make_processor(retries=2)
    healthy, victim = six(p, prefix + ":runs")
    leased = lease_all(p)
    hurt(r, p, victim, None, "string")
    p.gateway.send_outcomes(W, Outcomes(failures=[failure(t) for t in leased.values()]))
    assert where(p, r, victim)[0] == "quarantined"
    assert_counts(p, r, ready=5)


# --------------------------------------------------------------------------------- release

RELEASE_CASES = [
    ("a", "delete", "dead", "field 'a' (attempt) is missing"),
    ("st", "value:delayed", "dead", "field 'st' (state) is 'delayed', but the task is leased to worker"),
    ("q", "delete", "dead", "field 'q' (queue) is missing"),
    ("tn", "value:has space", "dead", "field 'tn' (tenant) is not a tenant name"),
    (None, "string", "quarantined", "holds a string, not a hash"),
    ("w", "garbage", "queued", None),
    ("b", "delete", "queued", None),
]


@pytest.mark.parametrize("field, how, expected, snippet", RELEASE_CASES)
def test_release_hands_the_healthy_tasks_back_and_takes_a_damaged_record_out(make_processor, r, prefix, field, how,
                                                                             expected, snippet):
    p = make_processor()
    healthy, victim = six(p, prefix + ":runs")
    leased = lease_all(p)
    hurt(r, p, victim, field, how)
    n = p.gateway.release(W, [Release(t.id, t.token, t.queue, t.tenant) for t in leased.values()])
    back = 6 if expected == "queued" else 5
    assert n == back
    assert_set_aside(p, r, victim, expected, snippet)
    assert_counts(p, r, ready=back, dead=1 if expected == "dead" else 0)
    assert {t.id for t in p.get_tasks_in_queue("default")} >= set(healthy)


# --------------------------------------------------------------------------------- recover

RECOVER_CASES = [
    # mode, field, damage, outcome, reason, (inflight, running) left: recover has no other source
    # of a running task's queue and tenant than its record
    ("worker", "st", "value:queued", "dead", "field 'st' (state) is 'queued', expected 'running'", (0, 0)),
    ("worker", "st", "delete", "dead", "field 'st' (state) is missing", (0, 0)),
    ("worker", "r", "garbage", "dead", "field 'r' (retries) is not a number", (0, 0)),
    ("worker", "q", "value:nosuch", "quarantined", "names no known queue: 'nosuch' (not undone, as unknown: "
                                                   "its queue's in-flight count)", (1, 0)),
    ("worker", "tn", "delete", "dead", "field 'tn' (tenant) is missing (not undone, as unknown: its tenant's "
                                       "running count)", (0, 1)),
    ("worker", None, "string", "quarantined", "not a hash (not undone, as unknown: its queue's in-flight "
                                              "count, its tenant's running count)", (1, 1)),
    ("worker", "w", "garbage", "queued", None, (0, 0)),
    ("expired", "r", "not-int", "dead", "field 'r' (retries) is not a number: '3.5'", (0, 0)),
    ("expired", "st", "value:dead", "dead", "field 'st' (state) is 'dead', expected 'running'", (0, 0)),
    ("expired", None, "list", "quarantined", "holds a list, not a hash", (1, 1)),   # (its owner unknown:
    ("expired", None, "missing", "quarantined", "is missing", (1, 1)),              # see the next test)
]


@pytest.mark.parametrize("mode, field, how, expected, snippet, left", RECOVER_CASES)
def test_recover_requeues_the_healthy_tasks_and_takes_a_damaged_record_out(make_processor, r, prefix, mode, field,
                                                                           how, expected, snippet, left):
    p = make_processor(retries=2)
    healthy, victim = six(p, prefix + ":runs")
    leased = lease_all(p, lease_ms=LEASE_MS if mode == "worker" else 1)
    assert len(leased) == 6
    hurt(r, p, victim, field, how)
    time.sleep(0.01)
    # When the worker is recovered as dead (or its leases as expired)
    res = (p.gateway.recover_worker(W, "worker lost", True) if mode == "worker"
           else p.gateway.recover_expired("lease expired", 100))
    # Then the healthy five are requeued with a retry used, and the damaged one is out
    back = 6 if expected == "queued" else 5
    assert (res.requeued, res.buried, res.canceled) == (back, 6 - back, 0)
    assert_set_aside(p, r, victim, expected, snippet)
    inflight, running = left
    k = p.gateway.keys
    q = p.get_queue("default")
    assert (q.queued, q.in_flight, q.dead) == (back, inflight, 1 if expected == "dead" else 0)
    assert int(r.hget(k.trun, "acme") or 0) == running
    owner_unknown = mode == "expired" and how in ("list", "missing")
    assert r.zcard(k.leases) == 0 and r.hlen(k.worker(W)) == (1 if owner_unknown else 0)
    assert {t.id: t.retries_left for t in p.get_tasks_in_queue("default")} == {
        t: 1 for t in [*healthy, *([victim] if back == 6 else [])]}


def test_expired_recovery_takes_an_unreadable_record_out_of_every_live_workers_set(make_processor, r, prefix):
    # Before: HMGET on a key of another type raised, and every later recovery met it first.
    # The record names no owner, so the id leaves the lease set of every worker with a heartbeat
    p = make_processor()
    healthy, victim = six(p, prefix + ":runs")
    lease_all(p, lease_ms=1)
    k = p.gateway.keys
    r.hset(k.workers, W, 1)
    hurt(r, p, victim, None, "string")
    time.sleep(0.01)
    res = p.gateway.recover_expired("lease expired", 100)
    assert (res.requeued, res.buried) == (5, 1)
    assert where(p, r, victim)[0] == "quarantined"
    assert r.hlen(k.worker(W)) == 0 and r.zcard(k.leases) == 0 and p.get_queue("default").queued == 5


@pytest.mark.parametrize("field, how, expected", [("st", "delete", "dead"), ("q", "value:nosuch", "quarantined"),
                                                  (None, "string", "quarantined")])
def test_a_crash_isolates_the_healthy_tasks_and_takes_a_damaged_record_out(make_processor, r, prefix, field, how,
                                                                           expected):
    # Before: crashed.lua read records unchecked: a key of another type stopped it half-way
    p = make_processor()
    healthy, victim = six(p, prefix + ":runs")
    assert len(lease_all(p)) == 6
    hurt(r, p, victim, field, how)
    res, culprit = p.gateway.crashed(W, "worker process 1 died (exit code -11)", 2)
    # Then the five healthy tasks go, uncharged, to the isolation list; the damaged one is out
    assert (res.requeued, res.buried, res.canceled, culprit) == (5, 1, 0, None)
    assert where(p, r, victim)[0] == expected
    k = p.gateway.keys
    assert r.zcard(k.leases) == 0 and r.hlen(k.worker(W)) == 0
    assert sorted(x.decode() for x in r.lrange(k.isolated("default"), 0, -1)) == sorted(healthy)
    assert p.get_queue("default").in_flight == (1 if expected == "quarantined" else 0)


# ----------------------------------------------------------------------------- dead letters

def bury_all(p: TaskProcessor, runs: str) -> tuple[list[str], str]:
    healthy, victim = six(p, runs, retries=0)
    for t in lease_all(p).values():
        assert p.gateway.fail(W, failure(t, bury=True)) == 2
    assert p.get_queue("default").dead == 6
    return healthy, victim


@pytest.mark.parametrize("field, how, expected, snippet", [
    ("q", "delete", "kept", "field 'q' (queue) is missing"),
    ("q", "value:low", "kept", "field 'q' (queue) is 'low', expected 'default'"),
    ("tn", "delete", "kept", "field 'tn' (tenant) is missing"),
    (None, "string", "quarantined", "holds a string, not a hash"),
    (None, "missing", "quarantined", "is missing"),
    ("b", "garbage", "moved", None),      # no such batch: it goes back to work as a task of none
])
def test_dead_retry_moves_the_healthy_back_and_keeps_a_damaged_one(make_processor, r, prefix, field, how, expected,
                                                                   snippet):
    p = make_processor(queues=["default", "low"])
    healthy, victim = bury_all(p, prefix + ":runs")
    hurt(r, p, victim, field, how)
    k = p.gateway.keys
    moved = p.retry_dead_tasks("default", retries=2)
    n = 6 if expected == "moved" else 5
    assert moved == n
    ready = {t.id: t for t in p.get_tasks_in_queue("default")}
    assert set(healthy) <= set(ready) and all(t.retries_left == 2 for t in ready.values())
    dead = [d.decode() for d in r.lrange(k.dead("default"), 0, -1)]
    if expected == "kept":
        # it stays a dead letter, saying why it cannot go back; the tenant's dead count keeps it
        assert dead == [victim]
        rec = r.hgetall(k.task(victim))
        assert rec[b"et"] == b"CorruptTask" and snippet in rec[b"em"].decode()
        assert p.get_tenant_stats("acme").dead == 1
    elif expected == "quarantined":
        assert dead == [] and where(p, r, victim)[0] == "quarantined"
        assert snippet in p.get_quarantined()[0].reason
    else:
        assert dead == [] and r.hget(k.task(victim), "b") is None
    assert p.get_queue("default").queued == n


def test_dead_retry_with_a_count_keeps_a_damaged_letter_in_place(make_processor, r, prefix):
    p = make_processor()
    healthy, victim = bury_all(p, prefix + ":runs")
    k = p.gateway.keys
    order = [d.decode() for d in r.lrange(k.dead("default"), 0, -1)]
    hurt(r, p, order[0], "tn", "delete")          # the oldest dead letter is damaged
    assert p.retry_dead_tasks("default", retries=1, count=2) == 2
    assert [d.decode() for d in r.lrange(k.dead("default"), 0, -1)] == [order[0], *order[3:]]


def test_dead_discard_deletes_a_key_of_another_type_too(make_processor, r, prefix):
    p = make_processor()
    healthy, victim = bury_all(p, prefix + ":runs")
    hurt(r, p, victim, None, "list")
    assert p.discard_dead_tasks("default") == 6
    assert p.get_queue("default").dead == 0 and not r.exists(p.gateway.keys.task(victim))
    assert p.get_tenant_stats("acme").dead == 1   # the damaged one's tenant could not be read


# --------------------------------------------------------------------------------- batches

@pytest.mark.parametrize("field, how, expected, snippet", [
    ("q", "delete", "quarantined", "field 'q' (queue) is missing"),
    ("tn", "delete", "dead", "field 'tn' (tenant) is missing"),
    ("d", "garbage", "dead", "field 'd' (due) is not a number"),
    (None, "string", "quarantined", "holds a string, not a hash"),
])
def test_batch_publication_publishes_the_healthy_and_counts_a_damaged_one_failed(make_processor, r, prefix,
                                                                                  monkeypatch, field, how, expected,
                                                                                  snippet):
    p = make_processor()
    runs = prefix + ":runs"
    real_publish = p.gateway.publish_batch
    monkeypatch.setattr(p.gateway, "publish_batch", lambda *a, **kw: None)     # committed, not published
    ids: list[str] = []
    bid = p.enqueue_batch("default", "acme", lambda b: ids.extend(b.enqueue(tasks.record, runs, i) for i in range(6)))
    ((batch_id, stage),) = p.gateway.unfinished_publications()
    victim = ids[2]
    hurt(r, p, victim, field, how)
    real_publish(batch_id, stage)
    b = p.get_batch(bid)
    assert (b.total, b.failed, b.remaining) == (6, 1, 5)
    assert {t.id for t in p.get_tasks_in_queue("default")} == set(ids) - {victim}
    assert_set_aside(p, r, victim, expected, snippet)
    # And the batch finishes with the five
    leased = lease_all(p)
    assert p.gateway.complete(W, [ack(t) for t in leased.values()]) == [1] * 5
    b = p.get_batch(bid)
    assert (b.state, b.done, b.failed, b.remaining, b.running) == ("failed", 5, 1, 0, 0)
    assert_counts(p, r, dead=1 if expected == "dead" else 0)


@pytest.mark.parametrize("field, how, expected, snippet", [
    ("on", "garbage", "dead", "field 'on' (continuation) holds an unknown value"),
    ("tn", "delete", "dead", "field 'tn' (tenant) is missing"),
    ("q", "delete", "quarantined", "field 'q' (queue) is missing"),
    (None, "string", "quarantined", "holds a string, not a hash"),
])
def test_a_damaged_continuation_does_not_stop_its_batch_from_finishing(make_processor, r, prefix, field, how,
                                                                       expected, snippet):
    p = make_processor()
    runs = prefix + ":runs"
    conts: list[str] = []

    def build(b: Any) -> None:
        for i in range(3):
            b.enqueue(tasks.record, runs, i)
        conts.append(b.continue_with(tasks.record, runs, "then-a", on="complete"))
        conts.append(b.continue_with(tasks.record, runs, "then-b", on="complete"))

    bid = p.enqueue_batch("default", "acme", build)
    hurt(r, p, conts[0], field, how)
    leased = lease_all(p)
    assert len(leased) == 3
    # When the last acknowledgement finishes the batch (and releases its continuations)
    assert p.gateway.complete(W, [ack(t) for t in leased.values()]) == [1, 1, 1]
    # Then the batch is done, the healthy continuation is ready, the damaged one set aside
    b = p.get_batch(bid)
    assert (b.state, b.done, b.remaining) == ("succeeded", 3, 0)
    assert [t.id for t in p.get_tasks_in_queue("default")] == [conts[1]]
    assert_set_aside(p, r, conts[0], expected, snippet)
    assert not r.exists(p.gateway.keys.continuations(bid))


@pytest.mark.parametrize("field, how", [("b", "delete"), ("a", "garbage"), (None, "missing")])
def test_a_batch_tasks_lease_names_its_batch_for_the_acknowledgement(make_processor, r, prefix, field, how):
    # Given a batch of three whose middle task's record was damaged while it ran
    p = make_processor()
    runs = prefix + ":runs"
    bid = p.enqueue_batch("default", "acme", lambda b: [b.enqueue(tasks.record, runs, i) for i in range(3)])
    leased = lease_all(p)
    victim = sorted(leased)[1]
    k = p.gateway.keys
    assert r.hget(k.worker(W), victim) == f"{leased[victim].token}|{bid}".encode()   # token|batch
    hurt(r, p, victim, field, how)
    # When the lease holder acknowledges all three
    assert p.gateway.complete(W, [ack(t) for t in leased.values()]) == [1, 1, 1]
    # Then the batch learns of all three from the leases (not from the damaged record) and finishes
    b = p.get_batch(bid)
    assert (b.state, b.done, b.remaining) == ("succeeded", 3, 0)
    assert where(p, r, victim) == ("gone", None)
    assert_counts(p, r)


def test_batch_commit_leaves_a_damaged_continuation_out(make_processor, r, prefix, monkeypatch):
    p = make_processor()
    runs = prefix + ":runs"
    conts: list[str] = []
    real_commit = p.gateway.commit_batch

    def commit(*a: Any, **kw: Any) -> int:
        hurt(r, p, conts[0], None, "string")       # staged, then damaged before the commit
        return real_commit(*a, **kw)

    monkeypatch.setattr(p.gateway, "commit_batch", commit)

    def build(b: Any) -> None:
        b.enqueue(tasks.record, runs, 1)
        conts.append(b.continue_with(tasks.record, runs, "then-a"))
        conts.append(b.continue_with(tasks.record, runs, "then-b"))

    bid = p.enqueue_batch("default", "acme", build)
    k = p.gateway.keys
    assert [c.decode() for c in r.lrange(k.continuations(bid), 0, -1)] == [conts[1]]
    assert where(p, r, conts[0])[0] == "quarantined"
    (t,) = lease_all(p).values()
    assert p.gateway.complete(W, [ack(t)]) == [1]
    assert [t.id for t in p.get_tasks_in_queue("default")] == [conts[1]]


# ------------------------------------------------------------------- extend, schedule ticks

def test_extend_of_a_record_of_another_type_says_the_lease_is_lost(make_processor, r, prefix):
    p = make_processor()
    _, victim = six(p, prefix + ":runs")
    t = lease_all(p)[victim]
    assert p.gateway.extend(victim, t.token, 30_000) > 0
    hurt(r, p, victim, None, "list")
    assert p.gateway.extend(victim, t.token, 30_000) == 0


def test_a_unique_schedule_whose_last_run_record_is_damaged_still_ticks(make_processor, r, prefix):
    from coretask import ScheduleData
    from coretask.gateway import DueSchedule

    p = make_processor()
    p.upsert_schedule(ScheduleData(id="s1", tenant="acme", queue="default", scope=None, cron="0 0 1 1 *",
                                   unique=True),
                      tasks.record, prefix + ":runs", "tick")
    assert p.trigger_schedule("s1")
    k = p.gateway.keys
    (last,) = [t.id for t in p.get_tasks_in_queue("default")]
    hurt(r, p, last, None, "string")
    h, score = p.gateway.schedule("s1")
    tick = int(score)
    d = DueSchedule("s1", tick, "0 0 1 1 *", "Etc/UTC", False, h[b"v"])
    (res,) = p.gateway.claim_ticks([(d, "run-2", tick + 60_000)])
    assert res.code == 1                                   # enqueued: a damaged last run blocks nothing
    assert r.hget(k.task("run-2"), "sch") == b"s1"


# ------------------------------------------------------------------ with a real worker

def test_a_worker_dead_letters_tasks_whose_fields_it_cannot_read(make_processor, embedded_worker, r, prefix):
    # Given text fields that are not UTF-8 (fetch.lua passes them: only the worker decodes text)
    p = make_processor()
    runs = prefix + ":runs"
    p.pause()
    healthy = [p.enqueue_task("default", "acme", tasks.record, runs, f"h{i}") for i in range(5)]
    bad = {f: p.enqueue_task("default", "acme", tasks.record, runs, "bad") for f in ("tg", "s", "sg", "tn")}
    for f, tid in bad.items():
        hurt(r, p, tid, f, "garbage")
    stop = embedded_worker(p)
    p.resume()
    # Then the healthy tasks run once, each damaged one is dead-lettered with the field named
    wait_until(lambda: r.llen(runs) == 5 and p.get_queue("default").dead == 4, 15, "5 runs and 4 dead letters")
    assert sorted(r.lrange(runs, 0, -1)) == sorted(f"h{i}".encode() for i in range(5))
    dead = {d.id: d for d in p.get_dead_tasks("default")}
    for f, tid in bad.items():
        assert dead[tid].error_type == "CorruptTask"
        assert f"field '{f}'" in dead[tid].error_message and "not UTF-8" in dead[tid].error_message
    wait_until(lambda: p.get_queue("default").in_flight == 0, 5, "the acknowledgements")
    k = p.gateway.keys
    assert not r.hgetall(k.trun) and r.zcard(k.leases) == 0
    assert stop.thread.is_alive()         # type: ignore[attr-defined]
    assert healthy
