"""Hand-off: an idle worker process is handed a new task by the enqueue itself (lua/_lib.lua
idle_taker, worker/loop.py), under the same pauses and limits a fetch obeys, and nothing is
lost when its wait is interrupted, its reply is lost or the process dies.

Every check polls with a deadline (``wait_until``); nothing sleeps to assert timing.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import uuid

import pytest

from coretask.gateway import Outcomes
from coretask.gateway.records import parse_handoff
from coretask.worker import leases, loop, maintenance
from tests import tasks_handoff as th
from tests import tasks_worker as tw
from tests.conftest import wait_until
from tests.test_tls_acl import acl_rules, new_prefix


@pytest.fixture(autouse=True)
def _gate():
    th.gate.clear()
    th.ran.clear()
    yield
    th.gate.set()


def server_ms(r) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def waiting(r, prefix: str, queue: str = "default", for_ms: int = 0) -> list[str]:
    """Worker ids registered for ``queue`` whose registration lasts ``for_ms`` more at least."""
    now = server_ms(r)
    return [w.decode() for w, deadline in r.zrange(f"{prefix}:idlers:{queue}", 0, -1, withscores=True)
            if deadline > now + for_ms and r.hexists(f"{prefix}:idle", w)]


def record(r, prefix: str, task_id: str) -> list[bytes | None]:
    return r.hmget(f"{prefix}:t:{task_id}", "st", "w", "a")


@pytest.fixture
def long_waits(monkeypatch, make_processor):
    """``long_waits()``: a processor whose idle workers wait 30 s for a hand-off (no timer of
    theirs comes sooner): only a hand-off or a wake-up can end the wait before that."""
    monkeypatch.setattr(loop, "HANDOFF_WAIT", 30.0)
    monkeypatch.setattr(maintenance, "REPORT_INTERVAL", 60.0)
    monkeypatch.setattr(maintenance, "SILENT_WORKER_S", 120.0)
    monkeypatch.setattr(leases, "HEARTBEAT_INTERVAL", 60.0)     # an embedded worker renews its own leases
    return lambda **extra: make_processor(base_frequency=60, pushback_frequency=60, cleanup_frequency=60,
                                          invisibility=600, **extra)


# ------------------------------------------------------------------- handed off in the call

def test_an_idle_worker_is_leased_a_new_task_by_the_enqueue_itself(long_waits, embedded_worker, r, prefix):
    # Given a worker process with nothing to do: its fetch registered it as idle (for 30 s here,
    # so that the registration cannot lapse between this check and the enqueue)
    processor = long_waits()
    embedded_worker(processor)
    (worker,) = wait_until(lambda: waiting(r, prefix, for_ms=20_000), 10, "the worker registered as idle")

    # When a task is enqueued
    task_id = processor.enqueue_task("default", "acme", th.hold, "a")

    # Then it was leased to that worker before the call returned (no fetch in between): running,
    # its first attempt, in the worker's lease set and the lease deadlines, counted in flight
    assert record(r, prefix, task_id) == [b"running", worker.encode(), b"1"]
    assert r.hexists(f"{prefix}:wl:{worker}", task_id)
    assert r.zscore(f"{prefix}:leases", task_id) is not None
    q = processor.get_queue("default")
    assert (q.queued, q.in_flight) == (0, 1)
    assert processor.get_tenant_stats("acme").running == 1
    # ... and the registration is spent: one hand-off per wait
    assert not r.hexists(f"{prefix}:idle", worker)
    # ... and the task runs, once, and is acknowledged
    th.gate.set()
    wait_until(lambda: th.ran == ["a"], 10, "the task ran")
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 10, "the task acknowledged")
    stats = processor.get_tenant_stats("acme")
    assert (stats.done, stats.running) == (1, 0)


def test_a_queue_with_tasks_waiting_is_served_by_fetches_in_turn(processor, embedded_worker, r, prefix):
    # Given tenants' tasks already waiting in the queue (the ring decides who is next)
    processor.pause()
    for i in range(3):
        processor.enqueue_task("default", f"t{i}", th.note, f"w{i}")
    assert processor.get_queue("default").queued == 3
    embedded_worker(processor)
    processor.resume()
    # Then the new task does not jump the queue: all four run, the waiting ones by fetches
    wait_until(lambda: len(th.ran) == 3, 10, "the waiting tasks ran")
    processor.enqueue_task("default", "t0", th.note, "new")
    wait_until(lambda: len(th.ran) == 4, 10, "the new task ran")
    assert sorted(th.ran[:3]) == ["w0", "w1", "w2"] and th.ran[3] == "new"


HOLDS = {"pause": (lambda p: p.pause(), lambda p: p.resume()),
         "pause_queue": (lambda p: p.pause_queue("default"), lambda p: p.resume_queue("default")),
         "pause_tenant": (lambda p: p.pause_tenant("acme"), lambda p: p.resume_tenant("acme")),
         # the embedded worker runs in this process: its host, or its manager (this pid)
         "pause_worker host": (lambda p: p.pause_worker(socket.gethostname()),
                               lambda p: p.resume_worker(socket.gethostname())),
         "pause_worker manager": (lambda p: p.pause_worker(f"{socket.gethostname()}:{os.getpid()}"),
                                  lambda p: p.resume_worker(f"{socket.gethostname()}:{os.getpid()}"))}


@pytest.mark.parametrize("hold_by", sorted(HOLDS))
def test_no_hand_off_while_paused(processor, embedded_worker, r, prefix, hold_by):
    hold, release = HOLDS[hold_by]
    embedded_worker(processor)
    wait_until(lambda: waiting(r, prefix), 10, "the worker registered as idle")
    hold(processor)
    task_id = processor.enqueue_task("default", "acme", th.note, "paused")
    assert record(r, prefix, task_id) == [b"queued", None, b"0"]
    release(processor)
    wait_until(lambda: th.ran == ["paused"], 10, "the task ran after the resume")


# ------------------------------------------------------------------- the wait and its end

def test_work_that_is_not_handed_off_ends_the_wait(long_waits, embedded_worker, r, prefix):
    p = long_waits()
    embedded_worker(p)
    wait_until(lambda: waiting(r, prefix, for_ms=20_000), 10, "the worker waiting for 30 s")
    # When a batch is published (its tasks reach the queue by the batch's own script)
    p.enqueue_batch("default", "acme", lambda b: [b.enqueue(th.note, f"b{i}") for i in range(3)])
    # Then the worker's wait ends at once (the event, not its timeout) and the tasks run
    wait_until(lambda: len(th.ran) == 3, 10, "the batch ran within 10 s of a 30 s wait")


@pytest.mark.parametrize("limited_by", ["set_tenant_limit", "Options.tenant_concurrency"])
def test_no_hand_off_past_the_tenants_concurrency_limit(long_waits, embedded_worker, r, prefix, limited_by):
    # Given two worker processes waiting for 30 s, and a tenant limited to one running task (its
    # own limit, or the workers' default one, which the enqueue learns from their registration)
    if limited_by == "set_tenant_limit":
        p1, p2 = long_waits(), long_waits()
        p1.set_tenant_limit("acme", 1)
    else:
        p1, p2 = long_waits(tenant_concurrency=1), long_waits(tenant_concurrency=1)
    embedded_worker(p1)
    embedded_worker(p2)
    wait_until(lambda: len(waiting(r, prefix, for_ms=20_000)) == 2, 10, "both workers waiting")
    first = p1.enqueue_task("default", "acme", th.hold, "first")
    assert record(r, prefix, first)[0] == b"running"
    (other,) = waiting(r, prefix, for_ms=20_000)

    # When a second task of the tenant is enqueued while the first runs
    second = p1.enqueue_task("default", "acme", th.hold, "second")

    # Then the waiting worker is not handed it (the limit holds)
    assert record(r, prefix, second) == [b"queued", None, b"0"]
    wait_until(lambda: waiting(r, prefix) == [other], 10, "the other worker waiting again")
    # ... and it runs once the first one ended (its end makes room, which wakes the waiting worker)
    th.gate.set()
    wait_until(lambda: sorted(th.ran) == ["first", "second"], 10, "both ran, one after the other")


def test_stop_ends_the_wait_and_leaves_nothing_behind(long_waits, embedded_worker, r, prefix):
    p = long_waits()
    stop = embedded_worker(p)
    (worker,) = wait_until(lambda: waiting(r, prefix, for_ms=20_000), 10, "the worker waiting for 30 s")
    stop.set()
    stop.thread.join(10)
    assert not stop.thread.is_alive(), "the worker still waited after its stop"
    assert not r.hexists(f"{prefix}:idle", worker)
    assert r.zcard(f"{prefix}:idlers:default") == 0
    assert not r.exists(f"{prefix}:inbox:{worker}")


# --------------------------------------------------------------- the gateway's side

def test_a_lease_left_in_the_inbox_is_given_back_by_leave(processor, r, prefix):
    g = processor.gateway
    # Given a worker registered by its fetch and a task handed to it that it never received
    reply = g.exchange("w-lost", Outcomes(), 4, 60_000, 0, ["default"], idle_ms=5_000)
    assert g.idle_registered(reply, 5_000) > 0
    task_id = processor.enqueue_task("default", "acme", th.note, "lost")
    assert record(r, prefix, task_id) == [b"running", b"w-lost", b"1"]

    # When the worker leaves (its wait failed, or it stops)
    (left,) = g.idle_leave("w-lost")

    # Then leave returns the lease, complete, and clears the registration and the inbox
    (leased,) = left.tasks
    assert (leased.id, leased.token, leased.queue, leased.tenant, leased.attempt) == (task_id, "1", "default",
                                                                                       "acme", 1)
    assert leased.target.endswith("tasks_handoff:note") and leased.retries_left >= 1
    assert not r.exists(f"{prefix}:inbox:w-lost") and not r.hexists(f"{prefix}:idle", "w-lost")
    # ... so that the next task is not handed off but queued
    nxt = processor.enqueue_task("default", "acme", th.note, "next")
    assert record(r, prefix, nxt)[0] == b"queued"


def test_wake_ends_a_wait_once_and_a_spent_registration_needs_none(processor, r, prefix):
    g = processor.gateway
    g.exchange("w-wake", Outcomes(), 4, 60_000, 0, ["default"], idle_ms=5_000)
    g.idle_wake("w-wake")
    assert g.await_handoff("w-wake", 5) is None            # the wake-up element, at once
    assert not r.hexists(f"{prefix}:idle", "w-wake")
    g.idle_wake("w-wake")                                   # no registration: nothing pushed
    assert not r.exists(f"{prefix}:inbox:w-wake")

    # a registration spent by a hand-off: the wake pushes nothing after the lease
    g.exchange("w-wake", Outcomes(), 4, 60_000, 0, ["default"], idle_ms=5_000)
    task_id = processor.enqueue_task("default", "acme", th.note, "x")
    g.idle_wake("w-wake")
    got = g.await_handoff("w-wake", 5)
    assert got is not None and [t.id for t in got.tasks] == [task_id]
    assert not r.exists(f"{prefix}:inbox:w-wake")


def test_a_registration_past_its_deadline_takes_nothing(processor, r, prefix):
    g = processor.gateway
    reply = g.exchange("w-late", Outcomes(), 4, 60_000, 0, ["default"], idle_ms=50)
    deadline = reply.now_ms + 50
    wait_until(lambda: server_ms(r) > deadline, 5, "the registration's deadline passed")
    task_id = processor.enqueue_task("default", "acme", th.note, "late")
    assert record(r, prefix, task_id) == [b"queued", None, b"0"]
    assert not r.hexists(f"{prefix}:idle", "w-late")        # dropped by the enqueue that found it late
    assert not r.exists(f"{prefix}:inbox:w-late")


def test_no_registration_when_the_fetch_leased_something_or_is_paused(processor, r, prefix):
    g = processor.gateway
    processor.enqueue_task("default", "acme", th.note, "ready")
    reply = g.exchange("w-busy", Outcomes(), 4, 60_000, 0, ["default"], idle_ms=5_000)
    assert len(reply.tasks) == 1 and g.idle_registered(reply, 5_000) == 0
    assert not r.hexists(f"{prefix}:idle", "w-busy")
    processor.pause()
    reply = g.exchange("w-busy", Outcomes(), 4, 60_000, 0, ["default"], idle_ms=5_000)
    assert reply.paused and g.idle_registered(reply, 5_000) == 0
    assert not r.hexists(f"{prefix}:idle", "w-busy")


# ------------------------------------------------------------------------ a dead process

def test_a_task_handed_to_a_process_that_dies_runs_once_elsewhere(processor, start_manager, r, prefix):
    # Given a worker process that waits up to 2 s for a hand-off
    m = start_manager(processes=1, threads=2, base_frequency=5, pushback_frequency=5, cleanup_frequency=5)
    (child,) = m.wait_children(1)
    (worker,) = wait_until(lambda: waiting(r, prefix, for_ms=1_000), 20, "the worker waiting")
    # When it freezes, is handed a task, and is killed
    os.kill(child.pid, signal.SIGSTOP)
    key = prefix + ":handed"
    task_id = processor.enqueue_task("default", "acme", tw.mark, key, 1)
    assert record(r, prefix, task_id)[:2] == [b"running", worker.encode()]
    os.kill(child.pid, signal.SIGKILL)
    # Then the manager takes back what the dead process held, its registration and inbox too
    m.wait_ended(child)
    wait_until(lambda: not r.hexists(f"{prefix}:idle", worker), 20, "the dead worker's registration gone")
    assert not r.exists(f"{prefix}:inbox:{worker}")
    # ... and the task runs exactly once, in another process
    wait_until(lambda: r.get(key + ":total") == b"1", 30, "the task ran after the crash")
    assert r.hget(key, "1") == b"1"
    assert str(child.pid).encode() not in r.smembers(key + ":pids")
    assert m.terminate() == 0


def test_a_short_socket_timeout_in_the_url_shortens_the_wait(server, processor_on, embedded_worker, r, prefix,
                                                             caplog):
    # Given a URL whose socket timeout (1.5 s) is under the 2 s a worker would wait
    p = processor_on(server.url + "?socket_timeout=1.5", cluster=server.cluster)
    assert p.gateway.handoff_wait_s == 0.5
    with caplog.at_level(logging.WARNING, logger="coretask.worker.loop"):
        embedded_worker(p)
        # Then the worker registers for at most 0.5 s at a time, and renews it, never timing out
        seen: set[float] = set()

        def renewed() -> bool:
            now = server_ms(r)
            for _, deadline in r.zrange(f"{prefix}:idlers:default", 0, -1, withscores=True):
                assert deadline <= now + 500
                seen.add(deadline)
            return len(seen) >= 4
        wait_until(renewed, 10, "four registrations in a row")
        p.enqueue_task("default", "acme", th.note, "short")
        wait_until(lambda: th.ran == ["short"], 10, "the task ran")
    assert "waiting for work failed" not in caplog.text


# ------------------------------------------------------------------- an ACL from before

def test_an_acl_user_that_may_not_block_falls_back_and_says_what_to_add(own_server, processor_on, embedded_worker,
                                                                        caplog):
    # Given the documented ACL user of before hand-offs existed (no BLPOP)
    server = own_server()
    prefix, password = new_prefix(), "s3cret-" + uuid.uuid4().hex[:8]
    rules = [rule for rule in acl_rules(prefix, password) if rule != "+blpop"]
    assert len(rules) == len(acl_rules(prefix, password)) - 1
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "coretask", *rules)
    p = processor_on(f"redis://coretask:{password}@{server.host}:{server.port}/0", prefix, wait_replicas=0)
    with caplog.at_level(logging.WARNING, logger="coretask.worker.loop"):
        embedded_worker(p)
        # Then the worker says once what to add, and stops waiting for hand-offs
        wait_until(lambda: "add +blpop" in caplog.text, 10, "the warning that names the fix")
        with server.client() as admin:
            wait_until(lambda: not admin.hlen(f"{prefix}:idle"), 10, "the registration ended")
        # ... and every task still runs: enqueue hands off nothing, workers fetch on wake-ups
        for i in range(5):
            p.enqueue_task("default", "acme", th.note, f"n{i}")
        wait_until(lambda: sorted(th.ran) == [f"n{i}" for i in range(5)], 10, "the five tasks ran")
    assert caplog.text.count("add +blpop") == 1


# --------------------------------------------------------------------- the packed reply

def test_a_handed_off_payload_of_any_bytes_arrives_whole(processor, r, prefix):
    g = processor.gateway
    g.exchange("w-bin", Outcomes(), 4, 60_000, 0, ["default"], idle_ms=5_000)
    payload = bytes(range(256)) + b"[3:x:]12:"
    assert g.enqueue("bin1", "default", "acme", payload, "json", "m:f", 3, 0, "sig") == 1
    (left,) = g.idle_leave("w-bin")
    (task,) = left.tasks
    assert (task.payload, task.signature, task.retries_left, task.stored_tenant) == (payload, "sig", 3, "acme")


@pytest.mark.parametrize("bad", [b"", b"5:abc", b"[9:1:a", b"[2:1:a1:b", b"[-1:", b"1:a", b"[3:1:a"])
def test_a_damaged_hand_off_is_refused_with_the_reason(bad):
    with pytest.raises(ValueError):
        parse_handoff(bad)
