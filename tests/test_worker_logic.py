"""The worker's pure logic, without a server: ledger bookkeeping, recycling limits, lease
timings, aborts and their cancel_grace watch, backoff, error formatting and the schedule timer.

Where a component needs a gateway, it gets a small hand-written fake of the *gateway interface*
(coretask/gateway/gateway.py) with only the methods that component calls; Redis itself is never
faked. The behaviour against real servers is covered by the functional suite (test_worker.py,
test_schedules.py, test_reconnect.py, ...), which stays."""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from coretask import Options, TaskCanceled, TaskTimeout
from coretask.middleware import Chain
from coretask.context import TaskContext
from coretask.gateway import Ack, DueSchedule, DueSchedules, Failure, Leased, Release, TickResult
from coretask.worker.aborts import Aborts
from coretask.worker.leases import MIN_RENEW_INTERVAL, LeaseTimings, Leases
from coretask.worker.ledger import SHORT_TASK_MS, Ledger, Task
from coretask.worker.loop import Recycling
from coretask.worker.maintenance import BACKOFF_MAX, BACKOFF_START, Maintenance
from coretask.worker.runner import _failure, format_error
from coretask.worker.schedules import DUE_PER_CALL, ScheduleTimer

URL = "redis://127.0.0.1:1/0"   # Options never connects; nothing listens there anyway


def options(**kw: Any) -> Options:
    return Options(redis=URL, **kw)


class Extender:
    """What TaskContext.extend_lock needs from the gateway; unused by these tests."""

    def extend(self, task_id: str, token: str, lease_ms: int) -> int:
        raise AssertionError("extend_lock is not exercised here")


def make_task(tid: str, *, attempt: int = 1, batch: str | None = None, target: str = "tests.tasks:add",
              timeout_ms: int = 0) -> Task:
    leased = Leased(id=tid, token=str(attempt), attempt=attempt, payload=b"{}", serializer="json",
                    target=target, queue="default", tenant="acme", batch_id=batch, retries_left=2,
                    enqueued_ms=1, batch_fields=None, signature="", stored_tenant="acme", timeout_ms=timeout_ms)
    ctx = TaskContext(task_id=tid, queue="default", tenant="acme", target=target, attempt=attempt,
                      retries_left=2, batch_id=batch, gateway=Extender())
    return Task(tid, leased, ctx)


def fail(task: Task, duration_ms: int = 3) -> Failure:
    return Failure(task.id, task.token, "ValueError", "boom", "tb", duration_ms)


# ============================================================================== Ledger

def test_admit_makes_tasks_running_and_queues_them() -> None:
    ledger = Ledger(4)
    a, b = make_task("a"), make_task("b")
    ledger.admit([a, b])
    assert ledger.running == {"a": a, "b": b}
    assert ledger.inbox.get_nowait() is a
    assert ledger.inbox.get_nowait() is b
    assert ledger.inbox.empty()
    assert ledger.tasks_taken == 2
    assert ledger.is_running(a)
    assert not ledger.is_running(make_task("a"))     # same id, another object: not this lease


def test_succeeded_records_an_ok_ack() -> None:
    ledger = Ledger(4)
    task = make_task("a", attempt=3)
    ledger.admit([task])
    ledger.succeeded(task, 12)
    assert ledger.pending.acks == [Ack("a", "3", "ok", 12, "default", "acme")]   # where fetch counted it
    assert not ledger.pending.failures and not ledger.pending.releases
    assert "a" not in ledger.running
    assert ledger.tasks_done == 1


@pytest.mark.parametrize("reason, expected", [
    ("canceled", Ack("a", "2", "canceled", 8, "default", "acme")),
    (None, Ack("a", "2", "canceled", 8, "default", "acme")),      # TaskCanceled without an abort mark counts canceled
    ("requeue", Release("a", "2", "default", "acme")),
    ("shutdown", Release("a", "2", "default", "acme")),
])
def test_aborted_records_cancel_or_hand_back(reason: str | None, expected: Ack | Release) -> None:
    ledger = Ledger(4)
    task = make_task("a", attempt=2)
    ledger.admit([task])
    task.abort_reason = reason
    ledger.aborted(task, 8)
    assert list(ledger.pending.acks) + list(ledger.pending.releases) == [expected]
    assert not ledger.pending.failures
    assert ledger.running == {}
    assert ledger.tasks_done == 1


def test_failed_records_the_failure() -> None:
    ledger = Ledger(4)
    task = make_task("a")
    ledger.admit([task])
    f = fail(task, 40)
    ledger.failed(task, f)
    assert ledger.pending.failures == [f]
    assert not ledger.pending.acks and not ledger.pending.releases
    assert ledger.running == {}


def test_take_outcomes_returns_everything_once() -> None:
    ledger = Ledger(4)
    a, b, c = make_task("a"), make_task("b"), make_task("c")
    ledger.admit([a, b, c])
    ledger.succeeded(a, 1)
    ledger.failed(b, fail(b))
    c.abort_reason = "requeue"
    ledger.aborted(c, 1)
    taken = ledger.take_outcomes()
    assert taken.task_ids() == {"a", "b", "c"} and len(taken) == 3
    assert not ledger.pending
    again = ledger.take_outcomes()
    assert not again and again is not taken
    ledger.succeeded(make_task("d"), 1)
    assert len(taken) == 3                   # a new outcome goes to the new pending, not the taken one


def test_restore_puts_older_outcomes_in_front() -> None:
    ledger = Ledger(4)
    a, b, c = make_task("a"), make_task("b"), make_task("c")
    ledger.admit([a, b, c])
    ledger.succeeded(a, 1)
    ledger.failed(b, fail(b))
    older = ledger.take_outcomes()           # the round trip carrying these fails...
    ledger.succeeded(c, 1)                   # ...while another task finishes
    ledger.restore(older)
    assert [x.task_id for x in ledger.pending.acks] == ["a", "c"]
    assert [x.task_id for x in ledger.pending.failures] == ["b"]
    assert len(ledger.take_outcomes()) == 3


def test_known_ids_covers_running_and_pending() -> None:
    ledger = Ledger(4)
    a, b, c = make_task("a"), make_task("b"), make_task("c")
    ledger.admit([a, b, c])
    ledger.succeeded(a, 1)
    c.abort_reason = "shutdown"
    ledger.aborted(c, 1)
    assert ledger.known_ids() == {"a", "b", "c"}
    ledger.take_outcomes()                   # sent: no longer this process's business
    assert ledger.known_ids() == {"b"}


def test_release_unstarted_hands_back_only_queued_running_tasks() -> None:
    ledger = Ledger(4)
    a, b, c = make_task("a", attempt=1), make_task("b", attempt=4), make_task("c", attempt=5)
    ledger.admit([a, b, c])
    assert ledger.inbox.get_nowait() is a    # a runner started a: it is not handed back
    del ledger.running["b"]                  # b left the running set while still queued
    ledger.release_unstarted()
    assert ledger.pending.releases == [Release("c", "5", "default", "acme")]
    assert ledger.running == {"a": a}
    assert ledger.inbox.empty()


def test_release_running_hands_back_every_running_task() -> None:
    ledger = Ledger(4)
    a, b, c = make_task("a", attempt=1), make_task("b", attempt=2), make_task("c")
    ledger.admit([a, b, c])
    ledger.succeeded(c, 1)
    stuck = ledger.release_running()
    assert set(map(id, stuck)) == {id(a), id(b)}
    assert ledger.running == {}
    assert ledger.pending.acks == [Ack("c", "1", "ok", 1, "default", "acme")]      # earlier outcomes kept
    assert sorted(ledger.pending.releases, key=lambda r: r.task_id) == [Release("a", "1", "default", "acme"),
                                                                                  Release("b", "2", "default", "acme")]
    assert ledger.release_running() == []


def test_free_counts_threads_without_a_task_and_is_zero_when_quiet() -> None:
    ledger = Ledger(4)
    assert ledger.free() == 4
    a, b = make_task("a"), make_task("b")
    ledger.admit([a, b])
    assert ledger.free() == 2
    ledger.succeeded(a, 1)
    assert ledger.free() == 3
    ledger.quiet = True
    assert ledger.free() == 0


def test_moving_average_and_short() -> None:
    ledger = Ledger(4)
    assert ledger.avg_ms == SHORT_TASK_MS
    assert not ledger.short()                # starts as "long"
    task = make_task("a")
    ledger.admit([task])
    ledger.succeeded(task, 0)
    assert ledger.avg_ms == pytest.approx(SHORT_TASK_MS * 0.9)   # weight 0.1 for the newest
    assert ledger.short()
    task = make_task("b")
    ledger.admit([task])
    ledger.failed(task, fail(task, 1000))    # failures count too
    assert ledger.avg_ms == pytest.approx(SHORT_TASK_MS * 0.81 + 100)
    assert not ledger.short()
    for i in range(200):                     # converges back below the threshold
        task = make_task(f"s{i}")
        ledger.admit([task])
        ledger.succeeded(task, 1)
    assert ledger.avg_ms == pytest.approx(1, abs=0.01)
    assert ledger.short()


def make_short(ledger: Ledger) -> None:
    ledger.avg_ms = 1.0


def test_short_tasks_wake_the_loop_only_when_half_the_threads_are_free() -> None:
    ledger = Ledger(4)
    make_short(ledger)
    tasks = [make_task(str(i)) for i in range(4)]
    ledger.admit(tasks)
    ledger.wake.clear()
    ledger.succeeded(tasks[0], 0)            # 1 free of 4
    assert ledger.short()
    assert not ledger.wake.is_set()
    ledger.failed(tasks[1], fail(tasks[1], 0))   # 2 free of 4: half
    assert ledger.wake.is_set()


def test_a_quiet_ledger_wakes_the_loop_on_every_finished_task() -> None:
    ledger = Ledger(4)
    make_short(ledger)
    tasks = [make_task(str(i)) for i in range(4)]
    ledger.admit(tasks)
    ledger.quiet = True
    ledger.wake.clear()
    ledger.succeeded(tasks[0], 0)
    assert ledger.wake.is_set()


def test_long_tasks_wake_the_loop_on_every_finished_task() -> None:
    ledger = Ledger(4)
    tasks = [make_task(str(i)) for i in range(4)]
    ledger.admit(tasks)
    ledger.wake.clear()
    ledger.succeeded(tasks[0], 50)
    assert not ledger.short()
    assert ledger.wake.is_set()
    ledger.wake.clear()
    tasks[1].abort_reason = "canceled"
    ledger.aborted(tasks[1], 50)
    assert ledger.wake.is_set()


def test_drained() -> None:
    ledger = Ledger(2)
    assert ledger.drained()
    task = make_task("a")
    ledger.admit([task])
    assert not ledger.drained()              # running
    ledger.succeeded(task, 1)
    assert not ledger.drained()              # outcome not sent yet
    ledger.take_outcomes()
    assert ledger.drained()


def test_running_of_a_batch() -> None:
    ledger = Ledger(4)
    a, b, c = make_task("a", batch="B"), make_task("b", batch="B"), make_task("c")
    ledger.admit([a, b, c])
    assert {t.id for t in ledger.running_of("B")} == {"a", "b"}
    assert {t.id for t in ledger.running_of(None)} == {"a", "b", "c"}
    assert ledger.running_of("other") == []


def test_the_loop_buries_tasks_whose_fetch_reply_entry_did_not_read(caplog) -> None:
    # Given a reply with one readable task and two that did not read (one without an id)
    from coretask.gateway import FetchReply, Unreadable
    from coretask.worker.loop import Loop

    ledger = Ledger(4)
    loop = Loop("w1", ledger, SimpleNamespace(handoffs=False), options(), SimpleNamespace(), SimpleNamespace(),
                SimpleNamespace(), None)
    good = make_task("a").leased
    reply = FetchReply(paused=False, next_due_ms=-1, now_ms=1, tasks=[good], unreadable=[
        Unreadable("b", "3", "default", "acme", "field 'r' (retries left) is not a number: b'3.5'"),
        Unreadable(None, None, "", "", "the id is not UTF-8 text")])
    # When the loop admits it
    with caplog.at_level(logging.ERROR, logger="coretask.worker.loop"):
        assert [t.id for t in loop._admit(reply)] == ["a"]
    # Then the readable one runs, and the other is buried with the next round trip (never left
    # leased to this live process, nor handed back to be fetched again as it is)
    assert list(ledger.running) == ["a"]
    assert ledger.pending.failures == [Failure(
        "b", "3", "CorruptTask", "the fetch reply for task b cannot be read: field 'r' (retries left) is not a "
        "number: b'3.5'", "", 0, bury=True, queue="default", tenant="acme")]
    assert ledger.wake.is_set() and "b" in ledger.known_ids()
    assert "the id is not UTF-8 text" in caplog.text


# ============================================================================ LeaseTimings

@pytest.mark.parametrize("invisibility, lease_ms, renew_every", [
    (300, 300_000, 5.0),                     # the heartbeat's interval: an idle worker looks alive
    (15, 15_000, 5.0),
    (12, 12_000, 4.0),
    (timedelta(seconds=3), 3000, 1.0),
    (0.9, 900, 0.3),
    (0.1, 100, MIN_RENEW_INTERVAL),          # a third would be 33 ms: floored
    (0.15, 150, MIN_RENEW_INTERVAL),         # exactly the floor
])
def test_lease_timings(invisibility: float | timedelta, lease_ms: int, renew_every: float) -> None:
    timings = LeaseTimings.of(options(invisibility=invisibility))
    assert timings.lease_ms == lease_ms
    assert timings.renew_every == pytest.approx(renew_every)
    assert MIN_RENEW_INTERVAL == 0.05


def test_lease_ms_is_the_invisibility_in_whole_milliseconds() -> None:
    # invisibility=1.001 s is 1001 ms; int(1.001 * 1000) truncates 1000.9999999999999 to 1000
    assert LeaseTimings.of(options(invisibility=timedelta(milliseconds=1001))).lease_ms == 1001


def test_leases_takes_its_timings_from_options() -> None:
    leases = Leases(SimpleNamespace(), options(invisibility=6))
    assert leases.timings == LeaseTimings(lease_ms=6000, renew_every=2.0)


# ================================================================================ Recycling

def test_recycling_caps_the_fetch_and_goes_quiet_at_max_tasks(caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(4)
    recycling = Recycling(options(max_tasks_per_process=5), ledger, "w1")
    assert recycling.limit(4) == 4
    ledger.admit([make_task(str(i)) for i in range(3)])
    assert recycling.limit(4) == 2           # only 5 - 3 more may be taken
    assert recycling.reason is None and not ledger.quiet
    ledger.admit([make_task("3"), make_task("4")])
    with caplog.at_level(logging.INFO, logger="coretask.worker.loop"):
        assert recycling.limit(4) == 0
    assert ledger.quiet
    assert recycling.reason is not None and "max_tasks_per_process=5" in recycling.reason
    assert "recycling" in caplog.text
    assert recycling.limit(4) == 0           # stays quiet
    assert ledger.free() == 0


def test_recycling_without_limits_passes_free_through() -> None:
    ledger = Ledger(8)
    recycling = Recycling(options(), ledger, "w1")
    ledger.admit([make_task(str(i)) for i in range(1000)])
    ledger.tasks_done = 1000
    for free in (0, 1, 8):
        assert recycling.limit(free) == free
    assert recycling.reason is None and not ledger.quiet


class FakeProcess:
    def __init__(self, rss: int) -> None:
        self.rss = rss
        self.reads = 0

    def memory_info(self) -> SimpleNamespace:
        self.reads += 1
        return SimpleNamespace(rss=self.rss)


def test_recycling_reads_memory_after_tasks_end_and_goes_quiet_over_the_limit() -> None:
    ledger = Ledger(4)
    recycling = Recycling(options(max_memory_per_process=100), ledger, "w1")
    recycling._process = proc = FakeProcess(rss=50 * 1024 * 1024)
    assert recycling.limit(3) == 3
    assert proc.reads == 0                   # no task ended: no reading
    ledger.tasks_done = 1
    assert recycling.limit(3) == 3
    assert proc.reads == 1
    assert recycling.limit(3) == 3
    assert proc.reads == 1                   # once per change of tasks_done
    proc.rss = 101 * 1024 * 1024
    ledger.tasks_done = 2
    assert recycling.limit(3) == 0
    assert ledger.quiet and recycling.reason is not None
    assert "max_memory_per_process=100" in recycling.reason


# =================================================================================== Aborts

class FakeRunner:
    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.raised: list[type] = []

    def abort(self, task_id: str, exc: type = TaskCanceled) -> bool:
        self.aborted.append(task_id)
        self.raised.append(exc)
        return True


def test_a_time_limit_aborts_its_task_with_task_timeout_once_it_is_due() -> None:
    ledger = Ledger(4)
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=None)
    limited, other = make_task("a", timeout_ms=200), make_task("b")
    runner = FakeRunner()
    limited.runner = runner
    ledger.admit([limited, other])
    ledger.wake.clear()
    aborts.limit(limited, 0.2)
    assert ledger.wake.is_set()              # the loop's wait is recomputed for the new deadline
    now = time.monotonic()
    assert 0.1 < aborts.check(now) - now <= 0.2     # not due yet: its deadline is the next one
    assert runner.aborted == [] and limited.abort_reason is None
    aborts.check(now + 0.25)
    assert (limited.abort_reason, runner.raised, other.abort_reason) == ("timeout", [TaskTimeout], None)
    assert limited.ctx.cancelled.is_set()
    # a limit whose task already ended does nothing
    done = make_task("c", timeout_ms=10)
    aborts.limit(done, 0.01)
    assert aborts.check(now + 1) is not None      # only the grace watch of "a" is left
    assert done.abort_reason is None


GRACE = 3.0


def test_abort_marks_each_task_once() -> None:
    ledger = Ledger(4)
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=None)
    started, queued = make_task("a"), make_task("b")
    runner = FakeRunner()
    started.runner = runner                  # b has not started: no runner yet
    ledger.admit([started, queued])
    waiting = started.ctx.cancelled          # made before the abort: woken by it
    ledger.wake.clear()

    assert aborts.abort([started, queued], "canceled") == [started, queued]
    assert started.abort_reason == queued.abort_reason == "canceled"
    assert waiting.is_set() and waiting.wait(0)
    assert threading.Event.is_set(waiting)   # really set: a thread blocked in wait() wakes up
    assert queued.ctx.cancelled.is_set()     # made after the abort: set at once
    assert runner.aborted == ["a"]
    assert ledger.wake.is_set()              # the watch is armed: the loop must look

    ledger.wake.clear()
    assert aborts.abort([started, queued], "shutdown") == []
    assert started.abort_reason == "canceled"    # the first reason stays
    assert runner.aborted == ["a"]
    assert not ledger.wake.is_set()


def test_abort_batch_aborts_only_that_batch() -> None:
    ledger = Ledger(4)
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=None)
    a, b, c = make_task("a", batch="B"), make_task("b", batch="B"), make_task("c", batch="C")
    ledger.admit([a, b, c])
    assert aborts.abort_batch("B", "canceled") == 2
    assert c.abort_reason is None and not c.ctx.cancelled.is_set()
    assert aborts.abort_batch(None, "shutdown") == 1     # only c was not aborted yet
    assert c.abort_reason == "shutdown"


def test_check_returns_the_next_deadline() -> None:
    ledger = Ledger(4)
    stuck: list[str] = []
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=stuck.append)
    assert aborts.check(time.monotonic()) is None        # nothing watched
    task = make_task("a")
    ledger.admit([task])
    before = time.monotonic()
    aborts.abort([task], "canceled")
    after = time.monotonic()
    deadline = aborts.check(after)
    assert deadline is not None and before + GRACE <= deadline <= after + GRACE
    assert aborts.check(after) == deadline    # still watched
    assert stuck == []


def test_check_calls_on_stuck_past_the_grace() -> None:
    ledger = Ledger(4)
    stuck: list[str] = []
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=stuck.append)
    task = make_task("a", target="tests.tasks:spin")
    ledger.admit([task])
    aborts.abort([task], "canceled")
    deadline = aborts.check(time.monotonic())
    assert deadline is not None
    assert aborts.check(deadline - 0.001) == deadline and stuck == []
    assert aborts.check(deadline) is None
    assert len(stuck) == 1
    assert "a" in stuck[0] and "tests.tasks:spin" in stuck[0] and "3s" in stuck[0]


def test_check_ignores_tasks_no_longer_running() -> None:
    ledger = Ledger(4)
    stuck: list[str] = []
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=stuck.append)
    done, replaced = make_task("a"), make_task("b")
    ledger.admit([done, replaced])
    aborts.abort([done, replaced], "canceled")
    ledger.aborted(done, 5)                  # reported in time
    ledger.running["b"] = make_task("b")     # same id, a new lease: not the aborted task
    assert aborts.check(time.monotonic() + GRACE + 1) is None
    assert stuck == []
    assert aborts.check(time.monotonic() + GRACE + 1) is None    # and no longer watched


def test_check_without_on_stuck_logs_and_stops_watching(caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(4)
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=None)
    a, b = make_task("a", target="tests.tasks:spin"), make_task("b", target="tests.tasks:loop")
    ledger.admit([a, b])
    aborts.abort([a, b], "canceled")
    deadline = aborts.check(time.monotonic())
    assert deadline is not None
    with caplog.at_level(logging.ERROR, logger="coretask.worker.aborts"):
        assert aborts.check(deadline + 1) is None
    errors = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert len(errors) == 2                  # each stuck task is reported, none stops the others
    assert "task a tests.tasks:spin ignored its abort for 3s" in errors[0]
    assert "task b tests.tasks:loop ignored its abort" in errors[1]
    assert ledger.is_running(a) and ledger.is_running(b)    # they run on: not handed back
    assert not ledger.pending
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="coretask.worker.aborts"):
        assert aborts.check(deadline + 10) is None
    assert caplog.records == []              # no longer watched: never reported again


def test_clear_stops_watching() -> None:
    ledger = Ledger(4)
    stuck: list[str] = []
    aborts = Aborts(ledger, GRACE, "w1", on_stuck=stuck.append)
    task = make_task("a")
    ledger.admit([task])
    aborts.abort([task], "shutdown")
    aborts.clear()
    assert aborts.check(time.monotonic() + GRACE + 1) is None
    assert stuck == []


# ============================================================================== Maintenance

class MaintenanceGateway:
    """The gateway methods Maintenance._unreceived calls; any other call fails the test."""

    def __init__(self, leased: set[str], holders: dict[str, tuple[str | None, str, str]]) -> None:
        self.leased = leased
        self.holders = holders
        self.calls: list[tuple[str, Any]] = []

    def leased_to(self, worker_id: str) -> set[str]:
        self.calls.append(("leased_to", worker_id))
        return set(self.leased)

    def lease_holders(self, ids: list[str]) -> list[tuple[str | None, str, str]]:
        self.calls.append(("lease_holders", list(ids)))
        return [self.holders[i] for i in ids]

    def release(self, worker_id: str, releases: list[Release]) -> int:
        self.calls.append(("release", list(releases)))
        return len(releases)


def make_maintenance(gateway: Any = None, *, renew_own_leases: bool = False,
                     **kw: Any) -> tuple[Maintenance, Ledger]:
    opts = options(**kw)
    gateway = gateway if gateway is not None else SimpleNamespace()
    ledger = Ledger(4)
    aborts = Aborts(ledger, 1.0, "w1", on_stuck=None)
    timer = ScheduleTimer(gateway, opts, "w1")
    m = Maintenance("w1", ledger, gateway, Leases(gateway, opts), opts, aborts, timer, Chain.from_options(opts),
                    renew_own_leases=renew_own_leases)
    return m, ledger


def test_backoff_doubles_to_a_cap_and_connected_resets() -> None:
    m, _ = make_maintenance()
    stop = threading.Event()
    stop.set()                               # wait() returns at once
    assert m.delay == BACKOFF_START == 0.1
    seen = []
    for _ in range(8):
        m.backoff(stop)
        seen.append(m.delay)
    assert seen == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert BACKOFF_MAX == 5.0
    m.connected()
    assert m.delay == BACKOFF_START
    m.backoff(stop)
    assert m.delay == pytest.approx(0.2)


def test_backoff_waits_the_current_delay_on_stop() -> None:
    m, _ = make_maintenance()
    waits: list[float] = []
    stop = SimpleNamespace(wait=waits.append)
    m.backoff(stop)                          # type: ignore[arg-type]
    m.backoff(stop)                          # type: ignore[arg-type]
    m.connected()
    m.backoff(stop)                          # type: ignore[arg-type]
    assert waits == pytest.approx([0.1, 0.2, 0.1])


def test_an_outage_is_said_once_reminded_every_30s_and_its_end_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    from coretask.errors import StoreUnavailable
    from coretask.throttle import OUTAGE_REMIND, Outage
    clock = [100.0]
    outage = Outage(logging.getLogger("test.outage"), clock=lambda: clock[0])
    down = StoreUnavailable("Redis at redis://h:1/0 cannot be reached (ConnectionError)")
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        outage.reachable("w1")                   # never lost: nothing to say
        for _ in range(100):                     # every part of a process fails, twice a second
            outage.failed("w1", down)
            clock[0] += 0.5
        outage.reachable("w1")                   # back after 50 s: one line
        outage.reachable("w1")
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines[0].startswith("w1: Redis at redis://h:1/0 cannot be reached") and "retries on its own" in lines[0]
    assert lines[1] == f"w1: Redis still cannot be reached after {OUTAGE_REMIND:.0f}s (60 more failed calls): {down}"
    assert lines[2] == "w1: Redis answers again after 50.0s" and len(lines) == 3
    # and only a server that cannot be reached is an outage: credentials, one shard of several,
    # or any other error are logged where they happen
    assert Outage.covers(down)
    assert not Outage.covers(StoreUnavailable("refused", reason="auth"))
    assert not Outage.covers(StoreUnavailable("shard 1 down", shard=1))
    assert not Outage.covers(ConnectionError("down"))


def test_backoff_makes_the_unreceived_timer_due_at_once(caplog: pytest.LogCaptureFixture) -> None:
    gateway = MaintenanceGateway(
        leased={"a", "b", "c", "d", "e", "f"},
        holders={"c": ("2", "running", "w1"),     # leased here, never received: handed back
                 "d": ("1", "running", "w2"),     # meanwhile leased elsewhere
                 "e": (None, "running", "w1"),    # no token: gone
                 "f": ("3", "queued", "w1")})     # meanwhile recovered
    m, ledger = make_maintenance(gateway)
    a, b = make_task("a"), make_task("b")
    ledger.admit([a, b])
    ledger.succeeded(b, 1)                   # a running, b's outcome pending: both known
    far = time.monotonic() + 3600
    for name in m.due:                       # every timer ran just now
        m.due[name] = far
    m.schedules.dirty, m.schedules.due = False, far
    stop = threading.Event()
    stop.set()
    m.backoff(stop)
    assert m.due["unreceived"] == 0.0
    with caplog.at_level(logging.WARNING, logger="coretask.worker.maintenance"):
        wait = m.tick()
    assert gateway.calls == [("leased_to", "w1"),
                             ("lease_holders", ["c", "d", "e", "f"]),
                             ("release", [Release("c", "2")])]
    assert "failed" not in caplog.text               # no other timer ran (it would fail here)
    assert "handed 1 back" in caplog.text
    assert m.due["unreceived"] > time.monotonic()    # re-armed
    assert 0 < wait <= m.intervals["unreceived"]


def test_maintenance_timers() -> None:
    m, _ = make_maintenance(pushback_frequency=2, cleanup_frequency=30)
    assert m.intervals == {"expired": 2.0, "cleanup": 30.0, "publish": 2.0, "unreceived": 2.0, "dataset": 2.0,
                           "report": 5.0, "silent": 30.0}
    m, _ = make_maintenance(renew_own_leases=True, invisibility=9, on_batch_end=lambda info: None)
    assert m.intervals["renew"] == 3.0
    assert m.intervals["hooks"] == 0.2


# =================================================================================== runner

def raise_and_catch(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_format_error_type_message_and_traceback() -> None:
    etype, message, tb = format_error(raise_and_catch(KeyError("missing")))
    assert etype == "KeyError"
    assert message == "'missing'"
    assert tb.startswith("Traceback (most recent call last)")
    assert "raise_and_catch" in tb
    assert tb.rstrip().endswith("KeyError: 'missing'")


def test_format_error_truncates_message_and_keeps_the_traceback_tail() -> None:
    text = "".join(f"{i:05d}" for i in range(3000))    # 15000 characters, each position distinct
    etype, message, tb = format_error(raise_and_catch(ValueError(text)))
    assert etype == "ValueError"
    assert message == text[:2000]
    assert len(tb) == 8000
    assert tb.endswith(text[-7000:] + "\n")  # the tail, where the exception line ends
    assert "Traceback" not in tb             # the head went


def test_format_error_of_an_unraised_exception() -> None:
    etype, message, tb = format_error(RuntimeError("never raised"))
    assert (etype, message) == ("RuntimeError", "never raised")
    assert "RuntimeError: never raised" in tb


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def test_format_error_of_an_exception_whose_str_raises() -> None:
    etype, message, tb = format_error(raise_and_catch(Unprintable()))
    assert etype == "Unprintable"
    assert message == "<unprintable Unprintable object>"
    assert "Unprintable" in tb


def test_failure_record() -> None:
    task = make_task("a", attempt=4)
    f = _failure(task, raise_and_catch(ZeroDivisionError("division by zero")), 17, delay_ms=2500)
    assert (f.task_id, f.token, f.error_type, f.message) == ("a", "4", "ZeroDivisionError", "division by zero")
    assert f.duration_ms == 17 and f.delay_ms == 2500 and f.bury is False
    assert "ZeroDivisionError" in f.traceback
    buried = _failure(task, Unprintable(), 0, bury=True)
    assert buried.bury is True and buried.delay_ms == 0
    assert buried.message == "<unprintable Unprintable object>"


# ============================================================================ ScheduleTimer

def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp() * 1000)


NOW_MS = ms(2024, 1, 2, 10, 30, 0)


class ScheduleGateway:
    """schedule_due and claim_ticks, as ScheduleTimer calls them."""

    def __init__(self, due: DueSchedules, scores: dict[str, int] | None = None) -> None:
        self.due = due
        self.scores = scores or {}
        self.due_calls: list[int] = []
        self.claims: list[tuple[DueSchedule, str, int]] | None = None

    def schedule_due(self, limit: int) -> DueSchedules:
        self.due_calls.append(limit)
        return self.due

    def claim_ticks(self, claims: list[tuple[DueSchedule, str, int]]) -> list[TickResult]:
        assert self.claims is None, "one round trip per turn"
        self.claims = list(claims)
        return [TickResult(1, self.due.now_ms, self.scores.get(d.id, nxt)) for d, _, nxt in claims]


def schedule(sid: str, tick_ms: int, cron: str, tz: str = "Etc/UTC", seconds: bool = False) -> DueSchedule:
    return DueSchedule(sid, tick_ms, cron, tz, seconds, b"v-" + sid.encode())


def timer(gateway: ScheduleGateway, base: float = 60.0) -> ScheduleTimer:
    return ScheduleTimer(gateway, options(base_frequency=base), "w1")  # type: ignore[arg-type]


def test_next_tick_is_computed_from_the_later_of_now_and_the_tick() -> None:
    due = DueSchedules(now_ms=NOW_MS, paused=False, next_ms=-1, due=[
        # down for a day: one catch-up run, then the next hour after now (not after the tick)
        schedule("hourly", ms(2024, 1, 1, 9, 0, 0), "0 * * * *"),
        # a tick ahead of the server clock (skew): the next one after the tick itself
        schedule("quarter", ms(2024, 1, 2, 10, 45, 0), "*/15 * * * *"),
        schedule("noon-paris", ms(2023, 12, 31, 11, 0, 0), "0 12 * * *", "Europe/Paris"),
        schedule("secs", NOW_MS - 1000, "*/20 * * * * *", seconds=True),
    ])
    gateway = ScheduleGateway(due)
    timer(gateway)._run_once()
    assert gateway.due_calls == [DUE_PER_CALL]
    assert gateway.claims is not None
    nxt = {d.id: n for d, _, n in gateway.claims}
    assert nxt == {"hourly": ms(2024, 1, 2, 11, 0, 0),
                   "quarter": ms(2024, 1, 2, 11, 0, 0),
                   "noon-paris": ms(2024, 1, 2, 11, 0, 0),   # 12:00 CET
                   "secs": ms(2024, 1, 2, 10, 30, 20)}
    assert [d for d, _, _ in gateway.claims] == due.due      # each claim presents what was read
    task_ids = [tid for _, tid, _ in gateway.claims]
    assert len(set(task_ids)) == 4 and all(len(t) == 32 for t in task_ids)


def test_wait_is_the_time_to_the_earliest_tick_capped_at_base_frequency() -> None:
    due = DueSchedules(now_ms=NOW_MS, paused=False, next_ms=NOW_MS + 40_000,
                       due=[schedule("a", NOW_MS, "0 * * * *"), schedule("b", NOW_MS, "0 * * * *")])
    # the claims' answers may name an earlier next tick than the read did
    wait = timer(ScheduleGateway(due, {"a": NOW_MS + 90_000, "b": NOW_MS + 7_500}))._run_once()
    assert wait == pytest.approx(7.5)
    wait = timer(ScheduleGateway(due, {"a": -1, "b": -1}))._run_once()
    assert wait == pytest.approx(40.0)                 # the read's next tick
    wait = timer(ScheduleGateway(due, {"a": -1, "b": -1}), base=5.0)._run_once()
    assert wait == pytest.approx(5.0)                  # capped at base_frequency
    late = DueSchedules(now_ms=NOW_MS, paused=False, next_ms=NOW_MS - 5, due=[])
    assert timer(ScheduleGateway(late))._run_once() == 0.0    # never negative


def test_no_schedule_at_all_waits_base_frequency() -> None:
    gateway = ScheduleGateway(DueSchedules(now_ms=NOW_MS, paused=False, next_ms=-1, due=[]))
    assert timer(gateway, base=7.0)._run_once() == pytest.approx(7.0)
    assert gateway.claims is None            # no round trip for nothing


def test_paused_waits_idle_without_claims() -> None:
    due = DueSchedules(now_ms=NOW_MS, paused=True, next_ms=NOW_MS + 1000,
                       due=[schedule("a", NOW_MS - 1000, "* * * * *")])
    gateway = ScheduleGateway(due)
    assert timer(gateway, base=7.0)._run_once() == pytest.approx(7.0)
    assert gateway.claims is None


def test_a_full_page_of_due_ticks_reads_again_at_once() -> None:
    due = DueSchedules(now_ms=NOW_MS, paused=False, next_ms=NOW_MS + 60_000,
                       due=[schedule(f"s{i}", NOW_MS, "0 * * * *") for i in range(DUE_PER_CALL)])
    gateway = ScheduleGateway(due)
    assert timer(gateway)._run_once() == 0.0
    assert gateway.claims is not None and len(gateway.claims) == DUE_PER_CALL


def test_unknown_timezone_is_skipped_with_an_error(caplog: pytest.LogCaptureFixture) -> None:
    due = DueSchedules(now_ms=NOW_MS, paused=False, next_ms=-1, due=[
        schedule("mars", NOW_MS - 1000, "0 * * * *", "Mars/Olympus_Mons"),
        schedule("ok", NOW_MS - 1000, "0 * * * *"),
    ])
    gateway = ScheduleGateway(due)
    with caplog.at_level(logging.ERROR, logger="coretask.worker.schedules"):
        wait = timer(gateway, base=3600)._run_once()
    assert gateway.claims is not None
    assert [d.id for d, _, _ in gateway.claims] == ["ok"]
    assert "schedule mars cannot be evaluated here" in caplog.text
    assert wait == pytest.approx((ms(2024, 1, 2, 11, 0, 0) - NOW_MS) / 1000)

    only_bad = ScheduleGateway(DueSchedules(now_ms=NOW_MS, paused=False, next_ms=-1, due=due.due[:1]))
    timer(only_bad)._run_once()
    assert only_bad.claims is None           # nothing to claim: no round trip


def test_a_full_page_of_unevaluable_schedules_does_not_spin() -> None:
    # schedule_due.lua returns the due ticks oldest first; ticks that cannot be evaluated here
    # stay due, so a page made only of them comes back on every read. Reading again at once
    # (wait 0) would then call Redis in a tight loop and never reach the schedules behind them.
    due = DueSchedules(now_ms=NOW_MS, paused=False, next_ms=NOW_MS + 60_000,
                       due=[schedule(f"bad{i}", NOW_MS - 1000, "0 * * * *", "Mars/Olympus_Mons")
                            for i in range(DUE_PER_CALL)])
    gateway = ScheduleGateway(due)
    logging.getLogger("coretask.worker.schedules").disabled = True
    try:
        wait = timer(gateway, base=5.0)._run_once()
    finally:
        logging.getLogger("coretask.worker.schedules").disabled = False
    assert gateway.claims is None
    assert wait > 0


def test_run_arms_due_and_survives_errors(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def schedule_due(self, limit: int) -> DueSchedules:
            raise ConnectionError("down")

    t = ScheduleTimer(Broken(), options(base_frequency=5), "w1")  # type: ignore[arg-type]
    assert t.next_due() == 0.0               # dirty at start: due at once
    before = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="coretask.worker.schedules"):
        t.run_if_due(before)
    assert "schedule timer failed" in caplog.text
    assert not t.dirty
    assert t.next_due() >= before + 1.0      # ERROR_RETRY
    t.poke()
    assert t.next_due() == 0.0
