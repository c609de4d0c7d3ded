"""Eager mode (Options(eager=True)): tasks run at enqueue, in the calling thread, through the
real encoding, middleware and runner, with their state in memory and no Redis at all. No server
is started by this file: every processor points at a port where nothing listens, so any
attempt to reach Redis would fail the test with StoreUnavailable."""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from datetime import date, timedelta
from typing import Any

import pytest

from coretask import (BatchInfo, ConfigurationError, DeadTask, Middleware, Options, PayloadTooLarge, QueueInfo,
                      ScheduleData, SerializationError, TargetError, TaskData, TaskFailed, TaskInfo, TaskProcessor,
                      TaskTimeout)
from coretask.embedded.servers import free_port
from coretask.gateway import Gateway
from coretask.gateway.memory import MemoryGateway
from coretask.models import TaskOutcome
from tests import tasks_eager as T
from tests.tasks_eager import SEEN, Boom

NOWHERE = f"redis://127.0.0.1:{free_port()}/0"      # nothing listens here


@pytest.fixture(autouse=True)
def _clean() -> None:
    SEEN.clear()
    T.EVENTS.clear()


def eager(**options: Any) -> TaskProcessor:
    p = TaskProcessor(Options(eager=True, redis=NOWHERE, **options))
    SEEN["processor"].append(p)
    return p


class Recorder(Middleware):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def before_enqueue(self, message: Any) -> None:
        self.calls.append(("before_enqueue", message.target.split(":")[1]))

    def after_enqueue(self, message: Any) -> None:
        self.calls.append(("after_enqueue", message.target.split(":")[1]))

    def before_task(self, ctx: Any) -> None:
        self.calls.append(("before_task", ctx.attempt))

    def after_task(self, ctx: Any, outcome: str, result: Any, error: BaseException | None) -> None:
        self.calls.append(("after_task", outcome, result))

    def on_retry(self, ctx: Any, error: BaseException, delay: timedelta | None) -> None:
        self.calls.append(("on_retry", delay))

    def on_dead(self, ctx: Any, error: BaseException) -> None:
        self.calls.append(("on_dead", type(error).__name__))

    def on_batch_end(self, batch: BatchInfo) -> None:
        self.calls.append(("on_batch_end", batch.state, batch.done, batch.failed))


# --------------------------------------------------------------------------------- no Redis

def test_an_eager_processor_never_reaches_redis() -> None:
    # Given an eager processor whose URL points where nothing listens
    p = eager(result_ttl=60)

    # When every kind of call is made
    tid = p.enqueue_task("default", "acme", T.add, 2, 3)
    bid = p.enqueue_batch("default", "acme", lambda b: b.enqueue(T.add, 1, 1))
    p.upsert_schedule(ScheduleData("s1", "acme", "default", None, "0 * * * *"), T.add, 0, 0)

    # Then each answers from memory, with the real API's types
    assert p.get_result(tid) == 5
    assert isinstance(p.get_task(tid), TaskInfo) and p.get_task(tid).state == "succeeded"
    assert isinstance(p.get_batch(bid), BatchInfo) and p.get_batch(bid).state == "succeeded"
    assert p.get_queues() == [QueueInfo(name="default", queued=0, in_flight=0, delayed=0, dead=0, paused=False)]
    assert p.get_tenant_stats("acme").done == 2
    assert [s.id for s in p.get_schedules("acme")] == ["s1"]
    assert isinstance(p.gateway, MemoryGateway)


def test_eager_mode_off_costs_one_attribute_and_builds_the_real_gateway() -> None:
    p = TaskProcessor(Options(redis=NOWHERE))
    assert p._run_ready is None and p.eager is None
    assert type(p.gateway) is Gateway


def test_worker_side_calls_and_run_say_eager_mode_has_no_worker() -> None:
    p = eager()
    with pytest.raises(ConfigurationError, match="eager mode"):
        p.run(threading.Event())
    with pytest.raises(ConfigurationError, match=r"eager mode \(Options\(eager=True\)\)"):
        p.gateway.renew("w", 1000)


def test_eager_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="Options.eager must be True or False"):
        Options(eager="yes")
    with pytest.raises(ConfigurationError, match="Options.eager_propagate"):
        Options(eager_propagate=None)


# ---------------------------------------------------------------------- encoding and checks

def test_the_task_runs_at_once_with_arguments_that_went_through_json() -> None:
    p = eager()
    tid = p.enqueue_task("default", "acme", T.weekday, date(2024, 1, 1), keep_result=60)
    assert SEEN["weekday"] == ["date"]              # revived from the payload's ISO string
    assert p.get_result(tid) == "Monday"
    info = p.get_task(tid)
    assert (info.state, info.attempt, info.worker, info.args_preview) == (
        "succeeded", 1, "eager", '{"args": ["2024-01-01"], "kwargs": {}}')


def test_what_a_worker_would_refuse_is_refused_at_enqueue_and_never_runs() -> None:
    p = eager(max_payload_bytes=64, allowed_modules=["tests."])
    with pytest.raises(SerializationError, match="arguments do not match"):
        p.enqueue_task("default", "acme", T.add, 1)
    with pytest.raises(PayloadTooLarge):
        p.enqueue_task("default", "acme", T.add, "x" * 100, "y")
    with pytest.raises(TargetError, match="refused"):
        p.enqueue_task("default", "acme", os.getpid)           # the deny-list
    with pytest.raises(TargetError):
        p.enqueue_task("default", "acme", math.floor, 1.5)     # outside allowed_modules
    with pytest.raises(TargetError):
        p.enqueue_task("default", "acme", lambda: None)        # not importable by reference under JSON
    with pytest.raises(ConfigurationError, match="not in Options.queues"):
        p.enqueue_task("nowhere", "acme", T.add, 1, 2)
    with pytest.raises(ConfigurationError, match="signing key|signing_key"):
        eager(serializer="dill").enqueue_task("default", "acme", T.add, 1, 2)
    assert SEEN["add"] == [] and p.get_queues() == []


def test_a_result_that_cannot_be_kept_fails_the_task_as_in_a_worker() -> None:
    p = eager()
    with pytest.raises(SerializationError, match="cannot be stored as JSON"):
        p.enqueue_task("default", "acme", T.unjsonable, keep_result=60)


def test_dill_with_a_signing_key_carries_a_closure_and_verifies_its_signature() -> None:
    p = eager(serializer="dill", signing_key="k" * 32, result_ttl=60)
    base = 40
    tid = p.enqueue_task("default", "acme", lambda n: base + n, 2)
    assert p.get_result(tid) == 42


def test_task_data_goes_to_options_execute() -> None:
    p = eager(execute=T.on_topic)
    p.enqueue_task("default", "acme", TaskData("resize", b"\x00\x01"))
    assert SEEN["topic"] == [("resize", b"\x00\x01")]


# ------------------------------------------------------------------- middleware and retries

def test_middleware_and_hooks_see_an_enqueue_then_the_run_in_the_real_order() -> None:
    rec = Recorder()
    hooks: list[str] = []
    p = eager(middleware=[rec], on_task_start=lambda ctx: hooks.append("start"),
              on_task_end=lambda ctx: hooks.append("end"))
    p.enqueue_task("default", "acme", T.add, 2, 3)
    assert rec.calls == [("before_enqueue", "add"), ("after_enqueue", "add"), ("before_task", 1),
                         ("after_task", "succeeded", 5)]
    assert hooks == ["start", "end"]


def test_retries_run_again_in_place_and_record_their_delay_without_waiting() -> None:
    rec = Recorder()
    p = eager(middleware=[rec], retries=3, on_task_failed_delay=lambda ctx, left: timedelta(minutes=left))
    started = time.monotonic()
    tid = p.enqueue_task("default", "acme", T.fail_times, "f", 2, keep_result=60)
    assert time.monotonic() - started < 30          # two retries of minutes each were not waited for
    assert p.get_result(tid) == "ok" and p.get_task(tid).attempt == 3
    assert p.eager.retry_delays(tid) == [timedelta(minutes=2), timedelta(minutes=1)]
    assert [c for c in rec.calls if c[0] in ("on_retry", "after_task")] == [
        ("on_retry", timedelta(minutes=2)), ("after_task", "failed", None),
        ("on_retry", timedelta(minutes=1)), ("after_task", "failed", None), ("after_task", "succeeded", "ok")]


def test_a_task_that_fails_for_good_raises_its_own_exception_from_the_enqueue() -> None:
    errors: list[str] = []
    p = eager(retries=2, on_task_error=lambda ctx, exc: errors.append(type(exc).__name__))
    with pytest.raises(Boom, match="bad input") as raised:
        p.enqueue_task("default", "acme", T.boom, "bad input")
    assert SEEN["boom"] == ["bad input", "bad input"] and errors == ["Boom", "Boom"]
    if sys.version_info >= (3, 11):
        assert "raised by coretask task" in raised.value.__notes__[0]
    (dead,) = p.get_dead_tasks("default")
    assert isinstance(dead, DeadTask) and dead.error_type == "Boom" and "raise Boom" in dead.traceback
    with pytest.raises(TaskFailed, match="Boom: bad input"):
        p.get_result(dead.id)


def test_eager_propagate_false_records_the_failure_as_a_dead_task() -> None:
    p = eager(retries=1, eager_propagate=False)
    tid = p.enqueue_task("default", "acme", T.boom, "quiet")           # no exception
    assert p.get_task(tid).state == "dead"
    assert p.get_tenant_stats("acme").dead == 1
    with pytest.raises(TaskFailed) as failed:
        p.get_result(tid)
    assert failed.value.error_type == "Boom"
    # a dead task retried runs again at once (and fails again here)
    assert p.retry_dead_task(tid, retries=1) is True
    assert SEEN["boom"] == ["quiet", "quiet"] and p.get_task(tid).state == "dead"
    assert p.discard_dead_tasks("default") == 1 and p.get_task(tid) is None


def test_time_limits_abort_a_task_that_runs_past_them() -> None:
    p = eager(retries=1)
    with pytest.raises(TaskTimeout, match="time limit"):
        p.enqueue_task("default", "acme", T.spin, 30, timeout=0.2)
    ctx = SEEN["spin"][0]
    assert "finished" not in SEEN["spin"] and ctx.cancelled.is_set()
    (dead,) = p.get_dead_tasks("default")
    assert dead.timed_out


# --------------------------------------------------------------------- batches and continuations

def test_a_batch_runs_its_tasks_then_its_continuation_with_results() -> None:
    rec = Recorder()
    p = eager(middleware=[rec], result_ttl=60)
    bid = p.enqueue_batch("default", "acme", lambda b: (
        [b.enqueue(T.add, i, i) for i in range(3)], b.continue_with(T.summary)))
    info = p.get_batch(bid)
    assert (info.state, info.total, info.done, info.remaining) == ("succeeded", 3, 3, 0)
    assert SEEN["summary"] == [(bid, 3, 0)]             # the continuation saw the finished batch
    results = p.get_batch_results(bid)
    assert all(isinstance(r, TaskOutcome) for r in results) and [r.value for r in results] == [0, 2, 4]
    assert rec.calls.count(("on_batch_end", "succeeded", 3, 0)) == 1
    # the context manager form and a tenant view enqueue the same way
    with p.batch("default", "acme") as batch:
        batch.enqueue(T.add, 5, 5)
    assert p.get_batch(batch.id).done == 1
    view_bid = p.tenant("other").enqueue_batch("default", lambda b: b.enqueue(T.add, 7, 7))
    assert p.tenant("other").get_batch(view_bid).done == 1 and p.tenant("acme").get_batch(view_bid) is None
    assert SEEN["add"][-2:] == [(5, 5), (7, 7)]


def test_a_failing_task_fails_its_batch_runs_complete_continuations_then_raises() -> None:
    p = eager(retries=1)
    with pytest.raises(Boom):
        p.enqueue_batch("default", "acme", lambda b: (
            b.enqueue(T.boom, "one"), b.enqueue(T.add, 1, 2),
            b.continue_with(T.summary, on="complete"), b.continue_with(T.add, 9, 9, on="success")))
    (info,) = p.get_batches("acme")
    assert (info.state, info.done, info.failed, info.total) == ("failed", 1, 1, 2)
    assert SEEN["summary"] == [(info.id, 1, 1)]
    assert (9, 9) not in SEEN["add"] and (1, 2) in SEEN["add"]     # every task ran before the raise


def test_append_to_a_finished_batch_reopens_it_and_runs_the_new_task() -> None:
    p = eager()
    bid = p.enqueue_batch("default", "acme", lambda b: b.enqueue(T.add, 1, 1))
    assert p.append_batch("default", "acme", bid, lambda b: b.enqueue(T.add, 2, 2)) is True
    info = p.get_batch(bid)
    assert (info.state, info.total, info.done) == ("succeeded", 2, 2) and SEEN["add"] == [(1, 1), (2, 2)]


def test_a_task_canceling_its_own_batch_stops_there_and_the_rest_never_runs() -> None:
    p = eager()
    bid = p.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(T.cancel_own_batch), b.enqueue(T.add, 1, 1), b.continue_with(T.summary)))
    assert SEEN["cancel_own"] == ["before"]
    assert SEEN["add"] == [] and SEEN["summary"] == []
    info = p.get_batch(bid)
    assert (info.state, info.canceled, info.remaining, info.total) == ("canceled", 2, 0, 2)


def test_cancel_task_from_another_thread_aborts_the_running_task() -> None:
    # Given an eager task running in a thread of its own
    p = eager()
    box: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: box.update(tid=p.enqueue_task("default", "acme", T.spin, 30)))
    runner.start()
    assert T.EVENTS["spin"].wait(10)
    ctx = SEEN["spin"][0]

    # When this thread cancels it
    assert p.cancel_task(ctx.task_id) is True
    runner.join(10)

    # Then it was aborted in its thread and counted canceled; a cancel is no error to raise
    assert not runner.is_alive() and box["tid"] == ctx.task_id
    assert ctx.cancelled.is_set() and "finished" not in SEEN["spin"]
    assert p.get_task(ctx.task_id).state == "canceled" and p.get_tenant_stats("acme").canceled == 1


# -------------------------------------------------------------------------------- the rest

def test_the_context_has_ids_tenant_attempt_progress() -> None:
    p = eager(result_ttl=60)
    tid = p.enqueue_task("default", "t1", T.context)
    got = p.get_result(tid)
    assert got == {"task_id": tid, "batch_id": None, "tenant": "t1", "attempt": 1, "queue": "default",
                   "cancelled": False}
    assert p.get_task(tid).progress.fraction == 0.5
    bid = p.enqueue_batch("default", "t1", lambda b: b.enqueue(T.context))
    assert SEEN["ctx"][-1].batch_id == bid and SEEN["ctx"][-1].batch.total == 1


def test_a_task_enqueued_by_a_running_task_runs_after_it_in_order() -> None:
    p = eager()
    p.enqueue_task("default", "acme", T.chain, 2)
    assert SEEN["chain"] == ["start 2", "end 2", "start 1", "end 1", "start 0", "end 0"]


def test_idempotency_keys_hold_in_eager_mode() -> None:
    p = eager()
    first = p.enqueue_task("default", "acme", T.add, 1, 1, key="k", key_ttl=timedelta(hours=1))
    again = p.enqueue_task("default", "acme", T.add, 1, 1, key="k")
    assert again == first and SEEN["add"] == [(1, 1)]
    other = p.enqueue_task("default", "acme", T.add, 2, 2, key="k2")     # no key_ttl: free once it ended
    assert p.enqueue_task("default", "acme", T.add, 2, 2, key="k2") != other and len(SEEN["add"]) == 3


def test_schedules_are_stored_not_run_and_trigger_runs_one_now() -> None:
    p = eager()
    assert p.upsert_schedule(ScheduleData("hourly", "acme", "default", "mail", "0 * * * *"), T.add, 4, 4) is True
    (info,) = p.get_schedules("acme")
    assert (info.cron, info.target, info.next_run is not None) == ("0 * * * *", "tests.tasks_eager:add", True)
    assert SEEN["add"] == [] and p.get_schedules_count() == 1
    assert p.trigger_schedule("hourly") is not None
    assert SEEN["add"] == [(4, 4)] and p.get_schedule("hourly").last_task_id is not None
    # a pause is stored as on a server, and an upsert keeps it
    assert p.pause_schedule("hourly") is True and p.get_schedule("hourly").paused
    p.upsert_schedule(ScheduleData("hourly", "acme", "default", "mail", "0 * * * *"), T.add, 4, 4)
    assert p.get_schedule("hourly").paused and p.pause_schedule("hourly", tenant="other") is False
    assert p.resume_schedule("hourly") is True and not p.get_schedule("hourly").paused
    assert p.cancel_schedule("hourly", "acme") is True and p.get_schedules_count() == 0
    assert p.pause_schedule("hourly") is False


def test_delay_until_is_recorded_and_not_waited() -> None:
    seen: list[Any] = []

    class Due(Middleware):
        def before_enqueue(self, message: Any) -> None:
            seen.append(message.due)

    p = eager(middleware=[Due()])
    tid = p.enqueue_task("default", "acme", T.add, 1, 1, delay_until=timedelta(hours=1))
    assert SEEN["add"] == [(1, 1)] and p.get_task(tid).state == "succeeded"
    assert seen[0] is not None and seen[0].timestamp() > time.time() + 3000


def test_a_queued_task_canceled_before_its_turn_never_runs() -> None:
    p = eager()
    p.enqueue_task("default", "acme", T.enqueue_then_cancel, 3)
    (child,) = SEEN["child"]
    assert SEEN["child_state"] == ["queued"]         # it waits for its parent to return
    assert SEEN["add"] == [] and p.get_task(child).state == "canceled"
    assert p.get_tenant_stats("acme").canceled == 1


def test_a_coroutine_function_runs_to_completion() -> None:
    p = eager(result_ttl=60)
    assert p.get_result(p.enqueue_task("default", "acme", T.double, 21)) == 42


def test_threads_share_an_eager_processor_each_running_its_own_tasks() -> None:
    p = eager()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                p.enqueue_task("default", f"t{n}", T.add, n, i)
        except BaseException as exc:     # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(SEEN["add"]) == sorted((n, i) for n in range(4) for i in range(20))
    assert [p.get_tenant_stats(f"t{n}").done for n in range(4)] == [20] * 4


def test_on_batch_end_reports_a_canceled_batch() -> None:
    rec = Recorder()
    p = eager(middleware=[rec])
    p.enqueue_batch("default", "acme", lambda b: (b.enqueue(T.cancel_own_batch), b.enqueue(T.add, 1, 1)))
    assert [c for c in rec.calls if c[0] == "on_batch_end"] == [("on_batch_end", "canceled", 0, 0)]


def test_a_keyboard_interrupt_in_a_task_stops_the_run_instead_of_being_retried() -> None:
    p = eager(retries=3, eager_propagate=False)
    with pytest.raises(KeyboardInterrupt):
        p.enqueue_task("default", "acme", T.interrupted)
    assert SEEN["interrupted"] == ["ran"]


def test_a_worker_and_the_cli_refuse_an_eager_app(capsys: pytest.CaptureFixture[str]) -> None:
    from coretask.cli import main as cli
    from coretask.worker.__main__ import main as worker

    assert worker(["--app", "tests.tasks_eager:eager_app"]) == 2
    assert "runs in eager mode" in capsys.readouterr().err
    assert cli(["--app", "tests.tasks_eager:eager_app", "status"]) == 2
    assert "point --app at a processor without eager=True" in capsys.readouterr().err


def test_the_memory_gateway_answers_every_gateway_call_the_api_makes() -> None:
    """A Gateway method the API calls (client, batch, schedules, tenancy, introspection, the
    task context) that MemoryGateway does not define would fall through to Redis-side code and
    raise in eager mode: a method added to the API must get its memory counterpart."""
    import ast
    from pathlib import Path

    import coretask
    from coretask.gateway.memory import MemoryGateway

    package = Path(coretask.__file__).parent
    called: dict[str, str] = {}
    for name in ("client", "batch", "schedules", "tenancy", "introspection", "context", "producing"):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr in ("gateway", "_gw", "_gateway")) or (
                    isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "gw"):
                called.setdefault(node.attr, f"coretask/{name}.py:{node.lineno}")
    assert len(called) > 30, called          # the scan found the calls
    own = {n for cls in MemoryGateway.__mro__ if cls is not Gateway and cls is not object for n in vars(cls)}
    missing = {n: where for n, where in called.items() if n not in own}
    assert not missing, f"MemoryGateway (coretask/gateway/memory*.py) lacks: {missing}"


def test_the_dashboard_reads_answer_from_memory_too() -> None:
    # a continuation on="success" of a batch that failed waits for ever: it is listed
    p = eager(retries=1, eager_propagate=False)
    bid = p.enqueue_batch("default", "acme", lambda b: (b.enqueue(T.boom, "x"), b.continue_with(T.summary)))
    (waiting,) = p.gateway.continuation_ids(bid, 0, -1)
    assert p.get_task(waiting).state == "waiting" and SEEN["summary"] == []
    assert p.gateway.leased_page(0, -1) == ([], 0) and p.gateway.delayed_page(0, -1) == ([], 0)
    assert p.gateway.history([1, 2]) == [{}, {}] and p.gateway.worker_details(["w"]) == [(0, {})]
