"""Cron schedules end to end on a real server: exactly one run per tick across processes and
machines, unique and expire skipping, catch-up after downtime, pause, and the schedule API."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from coretask import ConfigurationError, ScheduleData, ScheduleInfo
from coretask.cron import CronSchedule, CronSyntaxError, TimezoneError
from coretask.errors import SerializationError, TargetError
from tests import tasks, tasks_sched
from tests.conftest import wait_until

YEARLY = "0 0 1 1 *"   # never fires during a test unless its tick is moved into the past


def server_ms(p) -> int:
    return p.gateway.server_time_ms()


def ticks(r, key: str) -> list[tuple[int, int]]:
    """(tick ms, enqueued ms) of every recorded run, in tick order."""
    return sorted(tuple(int(x) for x in v.split(b":")[:2]) for v in r.lrange(key, 0, -1))


def move_tick(r, prefix: str, sid: str, score_ms: int) -> None:
    assert r.zadd(f"{prefix}:sdue", {sid: score_ms}, xx=True) == 0  # XX: only an existing tick


def assert_one_run_per_tick(runs: list[tuple[int, int]], n: int) -> None:
    assert len(runs) >= n, runs
    ts = [t for t, _ in runs]
    assert len(set(ts)) == len(ts), f"duplicate runs of a tick: {ts}"
    assert all(t % 1000 == 0 for t in ts), ts
    assert [b - a for a, b in zip(ts, ts[1:])] == [1000] * (len(ts) - 1), f"gap or duplicate: {ts}"
    assert all(0 <= e - t < 1000 for t, e in runs), f"a run enqueued more than 1 s after its tick: {runs}"


# ------------------------------------------------------------------------------ exactly once

def test_per_second_schedule_runs_once_per_tick_across_two_managers(make_processor, start_manager, r, prefix):
    p = make_processor(use_cron_seconds=True)
    key = prefix + ":runs"
    m1 = start_manager(processes=2, threads=2, use_cron_seconds=True)
    m2 = start_manager(processes=1, threads=2, use_cron_seconds=True)   # a second "machine"
    m1.wait_children(2)
    m2.wait_children(1)
    p.upsert_schedule(ScheduleData("every-second", "acme", "default", "per second", "* * * * * *"),
                      tasks_sched.record_tick, key, prefix)
    wait_until(lambda: r.llen(key) >= 12, 30, "12 ticks")
    assert p.cancel_schedule("every-second", "acme")
    assert m1.terminate() == 0 and m2.terminate() == 0
    assert_one_run_per_tick(ticks(r, key), 12)


def test_idle_worker_wakes_for_a_new_schedule_instead_of_polling(make_processor, embedded_worker, r, prefix):
    # base_frequency 30 s: only the "s" event can make the worker see the schedule in time
    p = make_processor(use_cron_seconds=True, base_frequency=30)
    key = prefix + ":runs"
    stop = embedded_worker(p)
    p.enqueue_task("default", "acme", tasks.record, prefix + ":up", 1)
    wait_until(lambda: r.llen(prefix + ":up") == 1, 10, "the worker running")   # then it idles
    p.upsert_schedule(ScheduleData("wake", "acme", "default", None, "* * * * * *"),
                      tasks_sched.record_tick, key, prefix)
    first = int(p.get_schedule("wake").next_run.timestamp() * 1000)
    wait_until(lambda: r.llen(key) >= 3, 6, "3 ticks")
    stop.set()
    runs = ticks(r, key)
    assert runs[0][0] == first
    assert_one_run_per_tick(runs, 3)   # each enqueued < 1 s after its tick: not a 30 s poll


# ------------------------------------------------------------------------- skipping rules

def test_unique_skips_ticks_while_the_previous_run_is_running(make_processor, embedded_worker, r, prefix):
    p = make_processor(use_cron_seconds=True, max_workers=4)
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("uniq", "acme", "default", None, "* * * * * *", unique=True),
                      tasks_sched.slow_tick, key, prefix, 1.5)
    embedded_worker(p)
    wait_until(lambda: r.llen(key) >= 3, 20, "3 finished runs")
    p.cancel_schedule("uniq", "acme")
    runs = sorted(tuple(float(x) for x in v.split(b":")) for v in r.lrange(key, 0, -1))
    for (t1, _, end1), (t2, start2, _) in zip(runs, runs[1:]):
        assert t2 - t1 >= 2000, f"a tick was not skipped while the previous run was running: {runs}"
        assert start2 >= end1, f"two runs overlapped: {runs}"


def test_unique_counts_skipped_ticks_and_frees_after_the_run(make_processor, embedded_worker, r, prefix):
    p = make_processor(use_cron_seconds=True)
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("uniq", "acme", "default", None, "* * * * * *", unique=True),
                      tasks_sched.record_tick, key, prefix)
    p.pause_queue("default")   # runs stay queued: every later tick must be skipped
    stop = embedded_worker(p)
    wait_until(lambda: (p.get_schedule("uniq").skipped_unique or 0) >= 2, 10, "2 skipped ticks")
    assert p.get_queue("default").queued == 1
    p.resume_queue("default")
    wait_until(lambda: r.llen(key) >= 2, 10, "runs after the queue resumed")
    stop.set()


@pytest.mark.parametrize("scope", ["queue", "tenant"])
def test_a_paused_queue_or_tenant_holds_at_most_one_run_of_a_schedule(make_processor, embedded_worker, r, prefix,
                                                                       scope):
    # Given a per-second schedule (not unique) whose queue, or tenant, is paused
    p = make_processor(use_cron_seconds=True)
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("every", "acme", "default", None, "* * * * * *"), tasks_sched.record_tick, key,
                      prefix)
    pause, resume = ((lambda: p.pause_queue("default"), lambda: p.resume_queue("default")) if scope == "queue"
                     else (lambda: p.pause_tenant("acme"), lambda: p.resume_tenant("acme")))
    pause()
    stop = embedded_worker(p)
    # When ticks come due while it is paused, then they move on but one run waits, not one per tick
    wait_until(lambda: (p.get_schedule("every").skipped_unique or 0) >= 3, 15, "3 ticks held")
    assert p.get_queue("default").queued == 1 and r.llen(key) == 0
    # And after resume that one run runs, and ticks enqueue runs again, one per tick
    resume()
    wait_until(lambda: r.llen(key) >= 3, 15, "runs after the resume")
    stop.set()
    # (the held run's tick, then the ticks after resume, one run each: the held ones are skipped)
    ts = [t for t, _ in ticks(r, key)]
    assert len(set(ts)) == len(ts) and ts[1] - ts[0] >= 3000, ts
    assert all(b - a == 1000 for a, b in zip(ts[1:], ts[2:])), ts


def test_expire_skips_a_tick_older_than_expire_after_an_outage(make_processor, embedded_worker, r, prefix):
    p = make_processor()
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("exp", "acme", "default", None, YEARLY, expire=timedelta(seconds=10)),
                      tasks_sched.record_tick, key, prefix)
    outage_tick = server_ms(p) - 60_000          # the worker was down when this tick was due
    move_tick(r, prefix, "exp", outage_tick)
    embedded_worker(p)
    now = datetime.now(timezone.utc)
    wait_until(lambda: p.get_schedule("exp").next_run > now, 10, "the schedule moved to the future")
    info = p.get_schedule("exp")
    assert info.skipped_expired == 1 and info.last_run is None and info.last_task_id is None
    assert info.next_run == CronSchedule(YEARLY).next_after(now)
    assert p.get_queue("default").queued == 0 and r.llen(key) == 0


def test_at_most_one_catch_up_run_after_downtime(make_processor, embedded_worker, r, prefix):
    p = make_processor()
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("catch", "acme", "default", None, "* * * * *"),
                      tasks_sched.record_tick, key, prefix)
    missed = (server_ms(p) // 60_000 - 90) * 60_000   # 90 minute ticks missed
    move_tick(r, prefix, "catch", missed)
    embedded_worker(p)
    wait_until(lambda: r.llen(key) >= 1, 10, "the catch-up run")
    now = datetime.now(timezone.utc)
    info = p.get_schedule("catch")
    assert info.next_run > now - timedelta(seconds=1) and info.next_run <= now + timedelta(minutes=1)
    runs = ticks(r, key)
    assert runs[0][0] == missed
    assert all(t > server_ms(p) - 61_000 for t, _ in runs[1:]), f"a flood of missed ticks: {runs}"
    assert p.get_queue("default").queued == 0


def test_pause_holds_ticks_and_resume_catches_up_once(make_processor, embedded_worker, r, prefix):
    p = make_processor(use_cron_seconds=True)
    key = prefix + ":runs"
    p.pause()
    p.upsert_schedule(ScheduleData("paused", "acme", "default", None, "* * * * * *"),
                      tasks_sched.record_tick, key, prefix)
    held = p.get_schedule("paused").next_run
    embedded_worker(p)
    wait_until(lambda: server_ms(p) > held.timestamp() * 1000 + 2500, 10, "2 ticks passing while paused")
    assert p.get_schedule("paused").next_run == held
    assert r.llen(key) == 0 and p.get_queue("default").queued == 0
    resumed = server_ms(p)
    p.resume()
    wait_until(lambda: r.llen(key) >= 3, 10, "runs after resume")
    p.cancel_schedule("paused", "acme")
    runs = ticks(r, key)
    assert runs[0][0] == int(held.timestamp() * 1000)             # the held tick, once
    assert runs[1][0] >= resumed - 1000, f"missed ticks were flooded after resume: {runs}"
    assert len({t for t, _ in runs}) == len(runs)


def test_a_paused_schedule_skips_its_ticks_keeps_its_pause_through_upsert_and_resumes_without_a_backlog(
        make_processor, embedded_worker, r, prefix):
    p = make_processor(use_cron_seconds=True)
    key = prefix + ":runs"
    data = ScheduleData("nightly", "acme", "default", None, "* * * * * *")
    p.upsert_schedule(data, tasks_sched.record_tick, key, prefix)
    assert p.pause_schedule("nightly") is True
    paused = p.get_schedule("nightly")
    assert paused.paused and paused.paused_since is not None
    assert p.pause_schedule("nightly") is True and p.get_schedule("nightly").paused_since == paused.paused_since
    assert p.pause_schedule("missing") is False and p.resume_schedule("missing") is False
    assert p.pause_schedule("nightly", tenant="other") is False        # another tenant's: unknown
    embedded_worker(p)
    # the ticks move on while paused, each counted, and none enqueues a run
    wait_until(lambda: p.get_schedule("nightly").skipped_paused >= 2, 10, "2 ticks skipped while paused")
    held = p.get_schedule("nightly")
    assert held.next_run > paused.next_run
    assert r.llen(key) == 0 and p.get_queue("default").queued == 0 and held.last_task_id is None
    # an application upserting its schedules at start keeps the operator's pause
    assert p.upsert_schedule(data, tasks_sched.record_tick, key, prefix) is False
    assert p.get_schedule("nightly").paused_since == paused.paused_since
    # a trigger is an explicit request: it runs a paused schedule
    assert p.trigger_schedule("nightly") is not None
    triggered = int(p.get_schedule("nightly").last_run.timestamp() * 1000)
    wait_until(lambda: r.llen(key) == 1, 10, "the triggered run")
    resumed = server_ms(p)
    assert p.resume_schedule("nightly", tenant="acme") is True
    info = p.get_schedule("nightly")
    assert not info.paused and info.paused_since is None and info.skipped_paused >= 2
    wait_until(lambda: r.llen(key) >= 3, 10, "runs after resume")
    p.cancel_schedule("nightly", "acme")
    runs = ticks(r, key)
    assert [t for t, _ in runs].count(triggered) == 1
    ticked = [t for t, _ in runs if t != triggered]
    assert len(ticked) >= 2 and len(set(ticked)) == len(ticked)
    assert min(ticked) >= resumed - 1000, f"ticks missed while paused were run after resume: {runs}"


# ------------------------------------------------------------------------------------ API

def test_upsert_replaces_cron_and_target(make_processor, embedded_worker, r, prefix):
    p = make_processor(use_cron_seconds=True, queues=["default", "low"])
    old, new = prefix + ":old", prefix + ":new"
    assert p.upsert_schedule(ScheduleData("job", "acme", "default", "v1", "0 0 0 1 1 *"), tasks_sched.mark, old, "a")
    v1 = p.get_schedule("job")
    assert (v1.cron, v1.scope, v1.target) == ("0 0 0 1 1 *", "v1", "tests.tasks_sched:mark")
    assert not p.upsert_schedule(ScheduleData("job", "acme", "low", "v2", "* * * * * *", "Europe/Berlin"),
                                 tasks.record, new, "b")
    v2 = p.get_schedule("job")
    assert (v2.cron, v2.scope, v2.queue, v2.timezone, v2.target) == \
        ("* * * * * *", "v2", "low", "Europe/Berlin", "tests.tasks:record")
    assert v2.next_run < v1.next_run
    assert p.get_schedules_count("acme") == 1
    with pytest.raises(ConfigurationError, match="another tenant"):
        p.upsert_schedule(ScheduleData("job", "other", "default", None, "* * * * * *"), tasks.record, new, "c")
    embedded_worker(make_processor(use_cron_seconds=True, queues=["low"]))
    wait_until(lambda: r.llen(new) >= 1, 10, "a run of the new target")
    p.cancel_schedule("job", "acme")
    assert r.llen(old) == 0 and r.lrange(new, 0, 0) == [b"b"]


def test_cancel(make_processor, embedded_worker, r, prefix):
    p = make_processor(use_cron_seconds=True)
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("c", "acme", "default", None, "* * * * * *"), tasks_sched.record_tick, key, prefix)
    embedded_worker(p)
    wait_until(lambda: r.llen(key) >= 1, 10, "a run")
    assert p.cancel_schedule("c", "other") is False             # another tenant's
    assert p.get_schedule("c") is not None
    assert p.cancel_schedule("c", "acme") is True
    assert p.cancel_schedule("c", "acme") is False
    assert p.get_schedule("c") is None and p.get_schedules_count("acme") == 0
    assert r.zscore(f"{prefix}:sdue", "c") is None and not r.exists(f"{prefix}:s:c")
    assert p.trigger_schedule("c") is None


def test_trigger_runs_now_without_moving_the_next_tick(make_processor, embedded_worker, r, prefix):
    p = make_processor()
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("t", "acme", "default", None, YEARLY), tasks_sched.record_tick, key, prefix)
    before = p.get_schedule("t")
    run = p.trigger_schedule("t")
    assert p.trigger_schedule("missing") is None
    after = p.get_schedule("t")
    assert after.next_run == before.next_run
    # the id returned is the run's: it is the schedule's last task and can be followed
    assert run == after.last_task_id and p.get_task(run).state == "queued" and after.last_run is not None
    assert p.get_queue("default").queued == 1
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 1, 10, "the triggered run")
    (tick, enqueued), = ticks(r, key)
    assert tick == enqueued == int(after.last_run.timestamp() * 1000)


def test_get_schedules_and_count(make_processor):
    p = make_processor(queues=["default", "low"])
    before = datetime.now(timezone.utc)
    for sid in ("b", "a", "c"):
        p.upsert_schedule(ScheduleData(sid, "acme", "default", f"scope {sid}", "0 9 * * MON-FRI", "Europe/Berlin",
                                       unique=sid == "a", expire=30 if sid == "b" else None), tasks.record, "k", sid)
    p.upsert_schedule(ScheduleData("z", "other", "low", None, "*/5 * * * *"), tasks.record, "k", "z")
    assert (p.get_schedules_count("acme"), p.get_schedules_count("other"), p.get_schedules_count("nobody"),
            p.get_schedules_count()) == (3, 1, 0, 4)
    page = p.get_schedules("acme", 0, 2)
    assert [s.id for s in page] == ["a", "b"] and [s.id for s in p.get_schedules("acme", 2, 25)] == ["c"]
    a, b = page
    assert isinstance(a, ScheduleInfo)
    assert (a.tenant, a.queue, a.scope, a.cron, a.timezone, a.unique, a.expire, a.last_run) == \
        ("acme", "default", "scope a", "0 9 * * MON-FRI", "Europe/Berlin", True, None, None)
    assert (b.unique, b.expire) == (False, timedelta(seconds=30))
    expected = CronSchedule("0 9 * * MON-FRI", "Europe/Berlin")
    assert a.next_run in (expected.next_after(before), expected.next_after(datetime.now(timezone.utc)))
    assert [s.id for s in p.get_schedules("other")] == ["z"]
    assert p.get_schedule("nope") is None


@pytest.mark.parametrize("cron, seconds, error, words", [
    ("61 * * * *", False, CronSyntaxError, "field 'minute'"),
    ("* 24 * * *", False, CronSyntaxError, "field 'hour'"),
    ("* * 0 * *", False, CronSyntaxError, "field 'day-of-month'"),
    ("* * * FOO *", False, CronSyntaxError, "field 'month'"),
    ("* * * * 8", False, CronSyntaxError, "field 'day-of-week'"),
    ("*/0 * * * * *", True, CronSyntaxError, "field 'second'"),
    ("* * * * * *", False, CronSyntaxError, "seconds"),
    ("* * * * *", True, CronSyntaxError, "expected 6 fields"),
    ("0 * * * * | 0 0 31 2 *", False, CronSyntaxError, "never fires"),
])
def test_invalid_cron_raises_at_upsert_naming_the_field(make_processor, cron, seconds, error, words):
    p = make_processor(use_cron_seconds=seconds)
    with pytest.raises(error, match=words) as exc:
        p.upsert_schedule(ScheduleData("bad", "acme", "default", None, cron), tasks.record, "k", 1)
    assert isinstance(exc.value, ConfigurationError) and isinstance(exc.value, ValueError)
    assert "'bad'" in str(exc.value)
    assert p.get_schedules_count() == 0


def test_invalid_zone_and_target_raise_at_upsert(make_processor):
    p = make_processor()
    with pytest.raises(TimezoneError, match="Mars/Olympus") as exc:
        p.upsert_schedule(ScheduleData("bad", "acme", "default", None, "* * * * *", "Mars/Olympus"), tasks.record, "k")
    assert isinstance(exc.value, ConfigurationError) and isinstance(exc.value, ValueError)
    with pytest.raises(TargetError):
        p.upsert_schedule(ScheduleData("bad", "acme", "default", None, "* * * * *"), lambda: None)
    with pytest.raises(SerializationError, match="'value'"):
        p.upsert_schedule(ScheduleData("bad", "acme", "default", None, "* * * * *"), tasks.record, "k", object())
    with pytest.raises(ConfigurationError, match="expire must be a positive timedelta, seconds or None, got -1$"):
        p.upsert_schedule(ScheduleData("bad", "acme", "default", None, "* * * * *", expire=-1), tasks.record, "k")
    with pytest.raises(ConfigurationError, match="queue name"):
        p.upsert_schedule(ScheduleData("bad", "acme", "no queue", None, "* * * * *"), tasks.record, "k")
    with pytest.raises(ConfigurationError, match="schedule id"):
        p.upsert_schedule(ScheduleData("", "acme", "default", None, "* * * * *"), tasks.record, "k")
    assert p.get_schedules_count() == 0


@pytest.mark.parametrize("deadletter_schedules", [False, True])
def test_deadletter_schedules(make_processor, embedded_worker, r, prefix, deadletter_schedules):
    p = make_processor(retries=5, deadletter=True, deadletter_schedules=deadletter_schedules)
    key = prefix + ":attempts"
    # two attempts: the schedule's own retries win over the Options'
    p.upsert_schedule(ScheduleData("f", "acme", "default", None, YEARLY, retries=2), tasks_sched.fail_always, key)
    assert p.get_schedule("f").failures == 0 and p.get_schedule("f").last_failure is None
    p.trigger_schedule("f")
    run_id = p.get_schedule("f").last_task_id
    plain_id = p.enqueue_task("default", "acme", tasks_sched.fail_always, key + ":plain", retries=2)
    embedded_worker(p)
    wait_until(lambda: r.get(key) == b"2" and r.get(key + ":plain") == b"2", 10, "both tasks tried twice")
    wait_until(lambda: p.get_queue("default").in_flight == 0, 10, "failures recorded")
    dead = {t.id for t in p.get_dead_tasks("default")}
    assert plain_id in dead                                  # ordinary tasks follow Options.deadletter
    if deadletter_schedules:
        assert run_id in dead and p.get_task(run_id).state == "dead"
    else:
        assert run_id not in dead and p.get_task(run_id) is None   # discarded
    # Either way, the schedule tells its failed run: count, time, error and task
    info = p.get_schedule("f")
    assert (info.failures, info.last_failed_task_id) == (1, run_id) and info.last_failure is not None
    assert info.last_error == "RuntimeError: scheduled run fails on purpose"
