"""Worker processes for real: ``python -m coretask.worker`` managers with child processes that
are killed, terminated and orphaned, the CLI, and the embedded ``processor.run`` loop.

Every check polls with a deadline (``wait_until``); nothing sleeps to assert timing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

import psutil  # type: ignore[import-untyped]
import pytest

from tests import tasks
from tests import tasks_worker as tw
from tests.conftest import ROOT, wait_until

# ------------------------------------------------------------------------------------ helpers

def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_children(m) -> set[int]:
    return {c.pid for c in m.children() if alive(c.pid)}


def runs(r, key: str) -> list[tuple[int, int, int]]:
    """(attempt, retries_left, pid) per line that tasks_worker.sleep_with_context wrote
    (ctx.retries_left: what is left should that attempt fail; 2 on a first attempt of retries=3)."""
    out = []
    for v in r.lrange(key, 0, -1):
        attempt, left, pid = (int(x) for x in v.decode().split("|"))
        out.append((attempt, left, pid))
    return out


def counters(processor, queue: str = "default") -> tuple[int, int]:
    q = processor.get_queue(queue)
    return q.queued, q.in_flight


def workers_started(m) -> int:
    return m.log().count(" started: queues=")


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("CORETASK_TEST_PREFIX", None)
    return subprocess.run([sys.executable, "-m", "coretask.worker", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# ------------------------------------------------------------------------- 1. exactly once

def test_ten_thousand_tasks_over_two_processes_run_exactly_once(processor, start_manager, r, prefix):
    # Given a manager with 2 processes x 4 threads
    key = prefix + ":marks"
    m = start_manager(processes=2, threads=4)
    assert len(m.wait_children(2)) == 2

    # When 10,000 tasks are enqueued while it runs
    n = 10_000
    for i in range(n):
        processor.enqueue_task("default", "acme", tw.mark, key, i)

    # Then every task ran, counted by the tasks themselves
    wait_until(lambda: int(r.get(key + ":total") or 0) >= n, 120, "10,000 task runs")
    wait_until(lambda: counters(processor) == (0, 0), 10, "0 queued / 0 in flight")
    # ... exactly once each: 10,000 distinct indexes, each counted once, no extra run
    marks = r.hgetall(key)
    assert len(marks) == n
    assert {int(k) for k in marks} == set(range(n))
    assert [k for k, v in marks.items() if int(v) != 1] == []
    assert int(r.get(key + ":total")) == n
    # ... and nothing is left in flight, leased or dead
    q = processor.get_queue("default")
    assert (q.queued, q.in_flight, q.delayed, q.dead) == (0, 0, 0, 0)
    assert r.zcard(prefix + ":leases") == 0
    # ... by both worker processes
    assert {int(p) for p in r.smembers(key + ":pids")} == live_children(m)
    assert m.terminate() == 0


# ----------------------------------------------------------------- 2. restart within a second

def test_manager_restarts_a_killed_worker_process_within_a_second(processor, start_manager, r, prefix):
    # Given a manager with 2 running worker processes
    m = start_manager(processes=2, threads=2)
    m.wait_children(2)
    wait_until(lambda: workers_started(m) == 2, 20, "both workers started")
    before = live_children(m)
    victim = min(before)

    # When one of them is killed with SIGKILL
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    # Then a new worker process appears within 1.5 s of the kill
    new = wait_until(lambda: live_children(m) - before, 1.5, "a new worker process")
    assert time.monotonic() - killed_at < 1.5
    assert not alive(victim)
    assert len(live_children(m)) == 2
    # ... and it serves tasks
    (new_pid,) = new
    key = prefix + ":served"
    wait_until(lambda: workers_started(m) == 3, 20, "the new worker started")
    for i in range(20):
        processor.enqueue_task("default", "acme", tw.add, key, i)
    wait_until(lambda: r.scard(key) == 20, 20, "20 tasks after the restart")
    assert f"worker process {victim} died (exit code -9)" in m.log()
    assert new_pid in live_children(m)
    assert m.terminate() == 0


def test_worker_processes_silent_for_a_minute_are_forgotten(processor, embedded_worker, r, prefix):
    # Given the heartbeat of a process that vanished without a goodbye (its manager was killed
    # with it) two minutes ago, and one of a minute ago less a few seconds
    now_ms = int(r.time()[0]) * 1000
    r.hset(prefix + ":workers", mapping={"ghost:1:aa": now_ms - 120_000, "late:2:bb": now_ms - 50_000})
    r.hset(prefix + ":wi:ghost:1:aa", mapping={"host": "ghost", "pid": 1})
    # When a worker runs its maintenance
    embedded_worker(processor)
    # Then the silent one is forgotten, with what it said about itself; the others stay
    wait_until(lambda: "ghost:1:aa" not in processor.get_workers(), 10, "the silent process forgotten")
    assert not r.exists(prefix + ":wi:ghost:1:aa")
    assert "late:2:bb" in processor.get_workers() and len(processor.get_workers()) == 2


def test_an_idle_worker_on_the_default_lease_keeps_a_fresh_heartbeat(processor, start_manager):
    # Given a manager whose leases last the default 5 minutes, with nothing to do
    m = start_manager(processes=1, threads=2, invisibility=300)
    m.wait_children(1)
    first = wait_until(lambda: processor.get_worker_states(), 20, "the worker's first heartbeat")[0]
    # Then its heartbeat is written again within seconds (status, the dashboard and the workers
    # metric read an old one as a dead worker), not at the lease's renewal every 100 s
    again = wait_until(lambda: [w for w in processor.get_worker_states()
                                if w.id == first.id and w.last_heartbeat > first.last_heartbeat], 12,
                       "a second heartbeat")[0]
    assert again.heartbeat_age < 10
    assert m.terminate() == 0


# ------------------------------------------------------------- 3. kill -9 mid-task: redelivery

def test_worker_killed_mid_task_redelivers_it_alone_without_consuming_a_retry(processor, start_manager, r, prefix):
    # Given a manager and a 2 s task (3 retries) that has started in one of its processes
    key = prefix + ":slow"
    m = start_manager(processes=1, threads=2)
    task_id = processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 2.0)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")
    [(attempt1, left1, pid1)] = runs(r, key + ":started")

    # When its worker process is killed with SIGKILL
    os.kill(pid1, signal.SIGKILL)

    # Then the manager starts a new worker process, and the task, the only one that was running
    # (so charged one crash of max_crashes), runs again alone in an isolation process, to completion
    wait_until(lambda: r.llen(key + ":finished") == 1, 20, "the redelivered task finished")
    started = runs(r, key + ":started")
    finished = runs(r, key + ":finished")
    assert len(started) == 2
    (attempt2, left2, pid2) = started[1]
    assert (attempt1, left1) == (1, 2)
    # ... without consuming a retry
    assert (attempt2, left2) == (2, 2)
    assert finished == [started[1]]
    assert pid2 != pid1 and not alive(pid1)
    assert f"worker process {pid1} died (exit code -9)" in m.log()
    assert f"task {task_id} was the only one running: charged a crash, to run again alone" in m.log()
    assert "started isolation process" in m.log()
    wait_until(lambda: counters(processor) == (0, 0), 5, "0 queued / 0 in flight")
    wait_until(lambda: pid2 not in live_children(m) and len(live_children(m)) == 1, 10,
               "the isolation process ended, one worker process serves on")
    assert processor.get_task(task_id) is None
    # and only live processes are listed (the killed one and the isolation one are forgotten)
    wait_until(lambda: {w.pid for w in processor.get_worker_states()} == set(live_children(m)), 10,
               lambda: f"only live processes listed: {processor.get_worker_states()}")
    assert m.terminate() == 0


@pytest.mark.parametrize("hold", ["tenant paused", "queue paused", "tenant at its limit"])
def test_an_isolated_task_held_back_waits_in_one_isolation_process(make_processor, start_manager, r, prefix, hold):
    # Given a task running alone in a worker process, whose tenant (or queue) is then paused, or
    # whose tenant a task running under another manager (queue "other") keeps at its limit of 1
    processor = make_processor(strict_queues=False)
    key = prefix + ":slow"
    m = start_manager(processes=1, threads=2)
    if hold == "tenant at its limit":
        # the blocker first: started after the 1 s task, under load it could start after that
        # task had ended, and no task would be left to crash
        start_manager(processes=1, threads=1, queues="other", strict_queues=False)   # a queue of no Options
        processor.enqueue_task("other", "acme", tw.sleep_with_context, prefix + ":blocker", 8.0)
        wait_until(lambda: r.llen(prefix + ":blocker:started") == 1, 20, "the blocker running")
    processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 1.0)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")
    [(_, _, pid1)] = runs(r, key + ":started")
    if hold == "tenant paused":
        processor.pause_tenant("acme")
    elif hold == "queue paused":
        processor.pause_queue("default")
    else:
        processor.set_tenant_limit("acme", 1)
    # When its worker process is killed, and the task goes to isolation behind the hold
    os.kill(pid1, signal.SIGKILL)
    wait_until(lambda: "started isolation process" in m.log(), 20, "an isolation process")
    # Then one isolation process waits for it: none is started again and again meanwhile
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert m.log().count("started isolation process") == 1, m.log()[-2000:]
        time.sleep(0.1)
    assert r.llen(key + ":finished") == 0
    # And once the hold ends, the task runs there
    if hold == "tenant paused":
        processor.resume_tenant("acme")
    elif hold == "queue paused":
        processor.resume_queue("default")
    wait_until(lambda: r.llen(key + ":finished") == 1, 30, "the isolated task ran")
    assert m.log().count("started isolation process") == 1
    assert m.terminate() == 0


# ------------------------------------------------------------------------ 4. SIGTERM, graceful

def test_sigterm_lets_a_running_task_finish_and_exits_0(processor, start_manager, r, prefix):
    # Given a manager (shutdown_timeout 5 s) running a 1.5 s task
    key = prefix + ":slow"
    m = start_manager(processes=1, threads=2, shutdown_timeout=5)
    task_id = processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 1.5)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")
    children = live_children(m)

    # When the manager gets SIGTERM
    m.proc.send_signal(signal.SIGTERM)

    # Then it exits with code 0 only after the task finished and was acknowledged
    assert m.proc.wait(15) == 0
    assert runs(r, key + ":finished") == runs(r, key + ":started")
    assert len(runs(r, key + ":started")) == 1
    assert counters(processor) == (0, 0)
    assert processor.get_task(task_id) is None
    assert r.zcard(prefix + ":leases") == 0
    # ... and its worker processes are gone
    wait_until(lambda: not any(alive(p) for p in children), 5, "worker processes gone")


def test_sigterm_hands_back_a_task_longer_than_shutdown_timeout_without_consuming_a_retry(
        processor, start_manager, r, prefix):
    # Given a manager with shutdown_timeout 1 s running a 4 s task
    key = prefix + ":slow"
    m = start_manager(processes=1, threads=2, shutdown_timeout=1)
    task_id = processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 4.0)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")

    # When the manager gets SIGTERM
    m.proc.send_signal(signal.SIGTERM)

    # Then it exits with code 0 and the task is back in its queue, its retries untouched
    assert m.proc.wait(15) == 0
    info = processor.get_task(task_id)
    assert info is not None
    assert (info.state, info.retries_left) == ("queued", 3)
    assert counters(processor) == (1, 0)
    assert r.llen(key + ":finished") == 0
    # And the log names it: in the deadline's summary, and on a line of its own (blocked in a
    # sleep, its abort could not land, so its runner never reported it)
    assert f"handing them back: {task_id} (tests.tasks_worker:sleep_with_context)" in m.log()
    assert f"task {task_id} tests.tasks_worker:sleep_with_context handed back at shutdown" in m.log()

    # When a new manager starts
    start_manager(processes=1, threads=2)

    # Then the task runs to completion there, still with all its retries
    wait_until(lambda: r.llen(key + ":finished") == 1, 20, "the task finished under the new manager")
    (first, second) = runs(r, key + ":started")
    assert first[:2] == (1, 2)
    assert second[:2] == (2, 2)
    assert runs(r, key + ":finished") == [second]
    wait_until(lambda: counters(processor) == (0, 0), 5, "0 queued / 0 in flight")
    assert processor.get_task(task_id) is None


def test_a_time_limit_still_holds_while_a_sigterm_drains(processor, start_manager, r, prefix):
    # Given a manager with a long shutdown_timeout running a task with a 1.5 s time limit
    key = prefix + ":spin"
    m = start_manager(processes=1, threads=2, shutdown_timeout=30)
    task_id = processor.enqueue_task("default", "acme", tasks.spin, key, 60, timeout=1.5, retries=1)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")
    # When the manager gets SIGTERM
    m.proc.send_signal(signal.SIGTERM)
    # Then the task is aborted at its time limit (failed: a timeout is no hand-back), and the
    # manager exits then, not at the end of shutdown_timeout
    assert m.proc.wait(15) == 0
    assert processor.get_tenant_stats("acme").failed == 1 and r.llen(key + ":finished") == 0
    assert "ran past its time limit of 1.5s" in m.log()
    assert processor.get_task(task_id) is None or processor.get_task(task_id).state != "queued"


def test_sigterm_acknowledges_a_task_that_returns_when_aborted_at_the_deadline(
        processor, start_manager, r, prefix):
    # Given a manager with shutdown_timeout 1 s running a long task that, when aborted, catches
    # TaskCanceled, wraps up and returns normally
    key = prefix + ":wrap"
    m = start_manager(processes=1, threads=2, shutdown_timeout=1)
    task_id = processor.enqueue_task("default", "acme", tw.wrap_up_on_abort, key, 60.0)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")

    # When the manager gets SIGTERM and the shutdown deadline passes
    m.proc.send_signal(signal.SIGTERM)

    # Then the task, which finished, is acknowledged rather than handed back (it would run again)
    assert m.proc.wait(15) == 0
    assert r.llen(key + ":finished") == 1
    assert processor.get_task(task_id) is None
    assert counters(processor) == (0, 0)
    assert r.zcard(prefix + ":leases") == 0
    assert processor.get_tenant_stats("acme").done == 1


def test_sigterm_keeps_leases_alive_while_tasks_drain(processor, start_manager, r, prefix):
    # Given manager A running a 3.5 s task with invisibility 1.5 s and shutdown_timeout 8 s,
    # and a second manager B serving the same queue
    key = prefix + ":slow"
    opts = {"invisibility": 1.5, "shutdown_timeout": 8}
    a = start_manager(processes=1, threads=2, **opts)
    task_id = processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 3.5)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started in A")
    b = start_manager(processes=1, threads=2, **opts)
    wait_until(lambda: workers_started(b) == 1, 20, "B's worker started")

    # When A gets SIGTERM (and stops its lease renewal loop) while the task still runs
    a.proc.send_signal(signal.SIGTERM)

    # Then A finishes the task and exits 0, and B never ran it: its lease did not expire
    # while A was draining, although draining took longer than the invisibility
    assert a.proc.wait(20) == 0
    assert len(runs(r, key + ":finished")) == 1
    assert runs(r, key + ":started") == runs(r, key + ":finished")
    assert processor.get_task(task_id) is None
    assert counters(processor) == (0, 0)
    assert "recovered expired leases" not in b.log()
    assert b.terminate() == 0


# ---------------------------------------------------------------------- 5. SIGKILL of manager

def test_manager_sigkill_workers_exit_and_their_tasks_complete_under_a_new_manager(
        processor, start_manager, r, prefix):
    # Given manager A (2 processes) running two 4 s tasks
    key = prefix + ":slow"
    opts = {"invisibility": 2, "shutdown_timeout": 1}
    a = start_manager(processes=2, threads=1, **opts)
    ids = [processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 4.0) for _ in range(2)]
    wait_until(lambda: r.llen(key + ":started") == 2, 20, "both tasks started")
    orphans = live_children(a)
    assert {pid for _, _, pid in runs(r, key + ":started")} == orphans
    try:
        # When the manager itself is killed with SIGKILL
        os.kill(a.pid, signal.SIGKILL)
        a.proc.wait(5)

        # Then its worker processes exit by themselves within a few seconds
        wait_until(lambda: not any(alive(p) for p in orphans), 5, "orphaned worker processes gone")
    finally:
        kill_pids(orphans)

    # When a second manager starts
    b = start_manager(processes=1, threads=2, **opts)

    # Then both tasks complete there, each once, and nothing is left in flight; the exiting
    # workers kept their leases while draining and handed the tasks back at their shutdown
    # deadline, so no retry was consumed
    wait_until(lambda: r.llen(key + ":finished") == 2, 20, "both tasks finished under B")
    finished = runs(r, key + ":finished")
    assert {pid for _, _, pid in finished} == live_children(b)
    assert [(attempt, left) for attempt, left, _ in finished] == [(2, 2), (2, 2)]
    wait_until(lambda: counters(processor) == (0, 0), 5, "0 queued / 0 in flight")
    assert [processor.get_task(t) for t in ids] == [None, None]
    assert b.terminate() == 0


def test_manager_killed_while_its_workers_start_leaves_no_orphans(start_manager):
    # Given a manager whose worker processes have just been spawned (still importing)
    m = start_manager(processes=2, threads=1)
    pids = wait_until(lambda: [c.pid for c in m.children()], 10, "worker processes spawned")
    try:
        # When the manager is killed with SIGKILL before they armed their parent-death signal
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait(5)

        # Then they notice and exit by themselves anyway
        wait_until(lambda: not any(alive(p) for p in pids), 5, "worker processes gone")
    finally:
        kill_pids(pids)


def test_whole_manager_group_killed_tasks_come_back_after_invisibility(processor, start_manager, r, prefix):
    # Given manager A running a 2 s task with invisibility 2 s
    key = prefix + ":slow"
    a = start_manager(processes=1, threads=2, invisibility=2)
    task_id = processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 2.0)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")
    orphans = live_children(a)

    # When the manager and its worker processes are all killed at once (the host went away)
    a.kill_all()
    wait_until(lambda: not any(alive(p) for p in orphans), 5, "worker processes gone")
    info = processor.get_task(task_id)
    assert info is not None and info.state == "running"

    # Then a second manager takes the task back once its lease expired and completes it,
    # which consumed one retry
    b = start_manager(processes=1, threads=2, invisibility=2)
    wait_until(lambda: r.llen(key + ":finished") == 1, 20, "the task finished under B")
    (first, second) = runs(r, key + ":started")
    assert first[:2] == (1, 2)
    assert second[:2] == (2, 1)
    assert runs(r, key + ":finished") == [second]
    assert second[2] in live_children(b)
    assert "recovered expired leases: requeued=1" in b.log()
    wait_until(lambda: counters(processor) == (0, 0), 5, "0 queued / 0 in flight")
    assert b.terminate() == 0


# ------------------------------------------------------------ 6. a task that kills its process

def test_task_killing_its_own_process_is_dead_lettered_after_max_crashes(processor, start_manager, r, prefix):
    # Given a task that ends its own process (2 retries, max_crashes 2) among 30 ordinary tasks
    key = prefix + ":killer"
    others = prefix + ":others"
    m = start_manager(processes=2, threads=2, max_crashes=2)
    killer = processor.enqueue_task("default", "acme", tw.kill_own_process_pid, key, retries=2)
    for i in range(30):
        processor.enqueue_task("default", "acme", tw.add, others, i)

    # When the workers run them
    wait_until(lambda: processor.get_queue("default").dead == 1, 30, "the killer dead-lettered")

    # Then the killer ran until it had crashed a process twice while running alone (its first
    # crash may have had company: then nobody was charged and it ran again alone), each time in
    # a process that died (crashes are counted apart from retries);
    # its dead letter names the last one, with no retries left (a dead letter runs again by hand)
    pids = [int(p) for p in r.lrange(key, 0, -1)]
    assert len(pids) in (2, 3)
    [dead] = processor.get_dead_tasks("default")
    assert dead.id == killer
    assert dead.error_type == "WorkerLost"
    assert f"worker process {pids[-1]} died (exit code 17)" in dead.error_message
    assert dead.retries_left == 0
    assert not any(alive(p) for p in pids)
    # ... while the other tasks were all served, and new ones still are
    wait_until(lambda: r.scard(others) == 30, 20, "30 ordinary tasks")
    for i in range(30, 40):
        processor.enqueue_task("default", "acme", tw.add, others, i)
    wait_until(lambda: r.scard(others) == 40, 20, "10 more ordinary tasks")
    assert {int(x) for x in r.smembers(others)} == set(range(40))
    wait_until(lambda: counters(processor) == (0, 0), 5, "0 queued / 0 in flight")
    wait_until(lambda: len(live_children(m)) == 2, 10, "two worker processes (the isolation one ended)")
    assert m.log().count("died (exit code 17)") == len(pids)
    # And a lone crash is logged as the culprit's, not also as tasks going back uncharged
    assert m.log().count("go back uncharged") == len(pids) - 2
    # When its dead letter is sent back to work, it gets its crash budget back: two more crashes
    assert processor.retry_dead_task(killer) is True
    wait_until(lambda: r.llen(key) == len(pids) + 2 and processor.get_queue("default").dead == 1, 30,
               "crashed twice more, dead-lettered again")
    assert "charged a crash, to run again alone" in m.log()
    assert m.terminate() == 0


# ------------------------------------------------------------------------------------- 7. CLI

def test_cli_flags_override_the_app_options(make_processor, start_manager, r, prefix):
    # Given an app whose options say queues=["default"], 1 process x 4 threads,
    # and work waiting in "default" (from a producer that also feeds "other")
    processor = make_processor(strict_queues=False)
    assert processor.options.queues == ["default"]
    assert (processor.options.processes, processor.options.max_workers) == (1, 4)
    key = prefix + ":cc"
    for i in range(5):
        processor.enqueue_task("default", "acme", tw.add, prefix + ":default", i)

    # When the manager starts with --queues other --processes 2 --threads 3
    # and twelve 0.7 s tasks arrive in "other"
    m = start_manager(processes=2, threads=3, queues="other", strict_queues=False)
    m.wait_children(2)
    wait_until(lambda: workers_started(m) == 2, 20, "both workers started")
    for _ in range(12):
        processor.enqueue_task("other", "acme", tw.concurrency, key, 0.7)

    # Then 2 worker processes of 3 threads each serve "other" (6 at once at the peak), and
    # nothing of "default"
    wait_until(lambda: int(r.get(key + ":done") or 0) == 12, 30, "12 tasks of 'other'")
    assert int(r.get(key + ":max")) == 6
    assert m.log().count("started: queues=other threads=3") == 2
    wait_until(lambda: counters(processor, "other") == (0, 0), 5, "'other' drained")
    assert counters(processor, "default") == (5, 0)
    assert not r.exists(prefix + ":default")
    assert len(live_children(m)) == 2
    assert m.terminate() == 0


def test_a_misspelt_queue_to_serve_is_refused_or_named_at_start(make_processor, start_manager, prefix):
    # Given a deployment (Options.queues ["default"]) whose queue "mail" has held work, fed by a
    # producer that may feed queues of no Options (strict_queues off)
    make_processor(strict_queues=False).enqueue_task("mail", "acme", tw.add, prefix + ":mail", 1)
    # When a manager starts on --queues default,mial: a queue neither configured nor ever fed
    m = start_manager(queues="default,mial")
    # Then it ends at once, exit 2, naming the queue, the one meant and the way out
    assert m.proc.wait(30) == 2
    assert ("--queues mial: queue 'mial' is not in Options.queues (default) and has never held work; "
            "did you mean 'mail'?") in m.log() and "strict_queues=False" in m.log()
    # And with strict_queues off, it starts, and says the queue never held work while 'mail' has
    m = start_manager(queues="default,mial", strict_queues=False)
    wait_until(lambda: "queue 'mial' has never held work, and queue 'mail' has" in m.log(), 20, "the warning")
    assert "is 'mial' a misspelling" in m.log()
    assert m.terminate() == 0


@pytest.mark.parametrize("app, message", [
    ("no_such_module_xyz:processor", "module 'no_such_module_xyz' cannot be imported"),
    ("tests.app", "must look like MODULE:ATTRIBUTE"),
    ("tests.tasks:no_such_attribute", "has no attribute 'no_such_attribute'"),
    ("tests.app:processor", "not a TaskProcessor"),      # None without the test environment
    ("tests.tasks:record", "calling record() to build the TaskProcessor failed"),
    ("tests.flask_factory_app:coretask", "is coretask's Flask extension (CoreTask): its worker and commands run "
                                         "through Flask's CLI (`flask --app tests.flask_factory_app coretask worker`"),
])
def test_cli_bad_app_exits_2_with_a_clear_message(app, message):
    # When the worker CLI is started with an --app that does not name a TaskProcessor
    res = run_cli("--app", app)

    # Then it exits with code 2 and a one-line error naming the problem, no traceback
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_bad_flag_value_exits_2(server, prefix):
    # Given a valid app
    env = dict(os.environ, PYTHONPATH=str(ROOT), CORETASK_TEST_PREFIX=prefix)
    # When --processes is 0
    res = subprocess.run([sys.executable, "-m", "coretask.worker", "--app", "tests.app:processor",
                          "--processes", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30, check=False)
    # Then it exits with code 2 and names the option
    assert res.returncode == 2, res.stderr
    assert "processes" in res.stderr and "Traceback" not in res.stderr
    # And so for --queues given empty (it would otherwise serve Options.queues instead)
    res = subprocess.run([sys.executable, "-m", "coretask.worker", "--app", "tests.app:processor",
                          "--queues", " , "], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 2 and "--queues needs at least one queue name" in res.stderr, res.stderr


def test_cli_help():
    # When the worker CLI is asked for help
    res = run_cli("--help")
    # Then it prints its usage and exits 0
    assert res.returncode == 0
    for flag in ("--app", "--queues", "--processes", "--threads", "--log-level"):
        assert flag in res.stdout


# -------------------------------------------------------------------------------- 8. embedded

def test_embedded_run_returns_after_the_running_task_finishes(make_processor, r, prefix):
    # Given processor.run(stop_event) in a thread, running a 1.5 s task (shutdown_timeout 5 s)
    processor = make_processor(shutdown_timeout=5)
    key = prefix + ":slow"
    task_id = processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 1.5)
    stop = threading.Event()
    t = threading.Thread(target=processor.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_until(lambda: r.llen(key + ":started") == 1, 10, "the task started")

        # When the stop event is set while the task runs
        stop.set()

        # Then run() returns once the task finished and was acknowledged
        t.join(15)
        assert not t.is_alive(), "run() did not return"
        assert runs(r, key + ":finished") == runs(r, key + ":started")
        assert len(runs(r, key + ":finished")) == 1
        assert counters(processor) == (0, 0)
        assert processor.get_task(task_id) is None
    finally:
        stop.set()
        t.join(15)


# ---------------------------------------------------------------- 9. lease renewal by manager

def test_manager_renews_leases_of_a_task_longer_than_invisibility(processor, start_manager, r, prefix):
    # Given a manager (2 processes, both recovering expired leases every 0.2 s) with
    # invisibility 1.5 s
    key = prefix + ":slow"
    m = start_manager(processes=2, threads=2, invisibility=1.5)
    m.wait_children(2)

    # When a 4 s task runs
    task_id = processor.enqueue_task("default", "acme", tw.sleep_with_context, key, 4.0)
    wait_until(lambda: r.llen(key + ":started") == 1, 20, "the task started")
    first_deadline = wait_until(lambda: r.zscore(prefix + ":leases", task_id), 5, "a lease")

    # Then its lease is pushed forward while it runs
    wait_until(lambda: (r.zscore(prefix + ":leases", task_id) or 0) > first_deadline + 1000, 5,
               "a renewed lease")
    # ... and it is never redelivered: it runs exactly once, on its first attempt
    wait_until(lambda: r.llen(key + ":finished") == 1, 20, "the task finished")
    assert runs(r, key + ":started") == runs(r, key + ":finished")
    [(attempt, left, _)] = runs(r, key + ":finished")
    assert (attempt, left) == (1, 2)
    wait_until(lambda: counters(processor) == (0, 0), 5, "0 queued / 0 in flight")
    assert "recovered expired leases" not in m.log()
    assert m.terminate() == 0


def test_a_free_thread_beside_long_tasks_starts_new_work_at_once_after_short_ones(make_processor, embedded_worker,
                                                                                  r, prefix):
    # Given a worker of 4 threads that has run short tasks (so it groups its round trips), whose
    # timers are the defaults (it sleeps up to 5 s without an event)
    p = make_processor(max_workers=4, base_frequency=5, pushback_frequency=5, cleanup_frequency=60)
    embedded_worker(p)
    for _ in range(30):
        p.enqueue_task("default", "acme", tasks.count, prefix + ":n")
    wait_until(lambda: int(r.get(prefix + ":n") or 0) == 30, 20, "the short tasks")
    # and then runs 3 long ones: one thread is left free
    for i in range(3):
        p.enqueue_task("default", "acme", tasks.block, f"{prefix}:long{i}", 4)
    wait_until(lambda: all(r.llen(f"{prefix}:long{i}:started") for i in range(3)), 20, "3 long tasks running")
    # When a short task is enqueued
    tid = p.enqueue_task("default", "acme", tasks.count, prefix + ":n", keep_result=60)
    # Then the free thread runs it and it is acknowledged well within base_frequency (the loop
    # held its round trip for half of its threads to be free: until a long task ended, or 5 s)
    assert p.get_result(tid, wait=2) is None
    wait_until(lambda: p.get_queue("default").in_flight == 3, 2, "the short task acknowledged")
    assert not any(r.llen(f"{prefix}:long{i}:finished") for i in range(3))     # (no long task ended meanwhile)


def test_short_tasks_are_acknowledged_and_fetched_in_groups(make_processor, embedded_worker, r, prefix):
    # Given 600 tasks of one INCR queued for an embedded worker with 8 threads whose round trips
    # are recorded
    from tests import tasks
    p = make_processor(max_workers=8)
    p.enqueue_batch("default", "acme", lambda b: [b.enqueue(tasks.count, prefix + ":n") for _ in range(600)])
    acks_per_call: list[int] = []
    fetch_sizes: list[int] = []
    real = p.gateway.transport.run_many

    def recording(calls):  # type: ignore[no-untyped-def]
        for name, _keys, args in calls:
            if name == "fetch":     # the acknowledgements ride in the fetch (ARGV[7]: how many)
                fetch_sizes.append(int(args[2]))
                if int(args[6]):
                    acks_per_call.append(int(args[6]))
        return real(calls)

    p.gateway.transport.run_many = recording  # type: ignore[method-assign]
    # When the worker runs them all
    embedded_worker(p)
    wait_until(lambda: int(r.get(prefix + ":n") or 0) == 600, 60, "600 tasks")
    # Then, once the tasks are known to be short, a round trip waits for half of the threads:
    # acknowledgements travel several per call and fetches ask for several tasks (a round trip
    # per finished task would make both one). Typically, not always: a wait that times out
    # (a thread slow to finish on a loaded machine) sends what it has.
    grouped = acks_per_call[20:]
    assert grouped and sorted(grouped)[len(grouped) // 2] >= 4, acks_per_call
    asked = sorted(f for f in fetch_sizes[20:] if f > 0)
    assert asked and asked[len(asked) // 2] >= 4, fetch_sizes
