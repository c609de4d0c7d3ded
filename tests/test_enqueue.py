"""Enqueue: ids and introspection, refusals at enqueue (nothing written), and every kind of
callable and value that can be enqueued, run end to end by an embedded worker."""
from __future__ import annotations

import functools
import json
import pickle
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

import coretask
from coretask import (
    Call,
    EnqueueError,
    PayloadTooLarge,
    SerializationError,
    TargetError,
    TaskContext,
    TaskData,
    TaskProcessor,
)
from coretask.errors import ConfigurationError
from tests import tasks, tasks_extra
from tests.conftest import wait_until


def keys_under(r, prefix: str) -> list[bytes]:
    return sorted(r.scan_iter(match=prefix + "*", count=1000))


def values(r, key: str) -> list[str]:
    return [v.decode() for v in r.lrange(key, 0, -1)]


# ------------------------------------------------------------------------- ids and TaskInfo

def test_enqueue_returns_unique_ids_and_lists_task_info(processor, r, prefix):
    # Given tasks of two tenants, one with its own retry budget
    key = prefix + ":out"
    before = datetime.now(timezone.utc)
    a1 = processor.enqueue_task("default", "acme", tasks.record, key, 1)
    a2 = processor.enqueue_task("default", "acme", tasks.record, key, value={"n": [1, 2]}, retries=5)
    b1 = processor.enqueue_task("default", "globex", tasks.record, key, "x")
    after = datetime.now(timezone.utc)

    # Then the ids are unique and the queue lists them, tenant by tenant, FIFO within one
    assert len({a1, a2, b1}) == 3
    assert all(isinstance(i, str) and len(i) == 32 for i in (a1, a2, b1))
    listed = processor.get_tasks_in_queue("default", 0, 25)
    assert [t.id for t in listed] == [a1, a2, b1]
    t1, t2, t3 = listed
    assert (t1.queue, t1.tenant, t1.target, t1.state, t1.batch_id) == ("default", "acme", "tests.tasks:record",
                                                                        "queued", None)
    assert json.loads(t1.args_preview) == {"args": [key, 1], "kwargs": {}}
    assert json.loads(t2.args_preview) == {"args": [key], "kwargs": {"value": {"n": [1, 2]}}}
    assert (t1.retries_left, t2.retries_left, t3.retries_left) == (3, 5, 3)
    assert t3.tenant == "globex"
    for t in listed:
        assert t.enqueued_at is not None and t.enqueued_at.tzinfo is not None
        assert before - timedelta(seconds=1) <= t.enqueued_at <= after + timedelta(seconds=1)
    # paging
    assert [t.id for t in processor.get_tasks_in_queue("default", 1, 1)] == [a2]
    assert [t.id for t in processor.get_tasks_in_queue("default", 2, 5)] == [b1]
    assert processor.get_tasks_in_queue("default", 3, 5) == []
    assert processor.get_task(a1).target == "tests.tasks:record"
    q = processor.get_queue("default")
    assert (q.queued, q.in_flight, q.delayed, q.dead) == (3, 0, 0, 0)


def test_long_arguments_are_previewed_shortly(processor):
    tid = processor.enqueue_task("default", "acme", tasks.record, "k", "y" * 5000)
    (info,) = processor.get_tasks_in_queue("default")
    assert info.id == tid
    assert len(info.args_preview) <= 120 and info.args_preview.endswith("…")


# ------------------------------------------------------------------- refusals at enqueue

class Opaque:
    pass


@pytest.mark.parametrize("args,kwargs,param", [
    pytest.param(("k", {1, 2}), {}, "value", id="set"),
    pytest.param(("k", Opaque()), {}, "value", id="object"),
    pytest.param(("k", b"raw"), {}, "value", id="bytes"),
    pytest.param(("k", [1, {"deep": {3}}]), {}, "value", id="nested-set"),
    pytest.param(("k", float("nan")), {}, "value", id="nan"),
    pytest.param(("k",), {"value": frozenset()}, "value", id="keyword"),
    pytest.param((Opaque(),), {}, "key", id="first-parameter"),
    # JSON writes dict keys as strings: {1: "a"} would arrive as {"1": "a"}
    pytest.param(("k", {1: "a"}), {}, "value", id="int-key"),
    pytest.param(("k", [{"rows": ({"ok": 1}, {2.5: "b"})}]), {}, "value", id="nested-float-key"),
])
def test_argument_json_cannot_carry_is_refused_naming_the_parameter(processor, r, prefix, args, kwargs, param):
    with pytest.raises(SerializationError) as info:
        processor.enqueue_task("default", "acme", tasks.record, *args, **kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, EnqueueError)
    message = str(info.value)
    assert f"argument {param!r}" in message
    assert "tests.tasks:record" in message
    assert "dill" in message                       # says what would carry it
    assert keys_under(r, prefix) == []


def _function_in_module(module: str, qualname: str):
    def fn(key):
        return None
    fn.__module__ = module
    fn.__qualname__ = qualname
    fn.__name__ = qualname.rsplit(".", 1)[-1]
    return fn


def _local_function():
    def helper(key):
        return None
    return helper


class CallableObject:
    def __call__(self, key):
        return None


@pytest.mark.parametrize("fn,words", [
    pytest.param(lambda key: None, ["lambda", "JSON serializer", "dill"], id="lambda"),
    pytest.param(_local_function(), ["local function", "_local_function.<locals>.helper", "module level"],
                 id="local-function"),
    pytest.param(_function_in_module("no_such_module_for_coretask", "ghost"),
                 ["no_such_module_for_coretask:ghost", "cannot be imported"], id="bogus-module"),
    pytest.param(_function_in_module("__main__", "main_only"), ["__main__:main_only", "__main__ script"],
                 id="main-module"),
    pytest.param(_function_in_module("tests.tasks", "record"), ["tests.tasks:record", "does not resolve"],
                 id="shadowed-name"),
    pytest.param(_function_in_module("tests.tasks", "missing_attr"), ["tests.tasks:missing_attr", "cannot be imported"],
                 id="missing-attribute"),
    pytest.param(CallableObject(), ["not a function or method"], id="callable-object"),
    pytest.param(functools.partial(tasks.record, "k"), ["not a function or method"], id="partial"),
    pytest.param(42, ["42", "not callable"], id="not-callable"),
])
def test_callable_not_importable_by_reference_is_refused(processor, r, prefix, fn, words):
    with pytest.raises(TargetError) as info:
        processor.enqueue_task("default", "acme", fn, "k")
    assert isinstance(info.value, ValueError) and isinstance(info.value, EnqueueError)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from {info.value}"
    assert keys_under(r, prefix) == []


@pytest.mark.parametrize("args,kwargs,words", [
    pytest.param((), {}, ["missing a required argument: 'key'"], id="missing"),
    pytest.param(("k", 1, 2), {}, ["too many positional arguments"], id="extra-positional"),
    pytest.param(("k",), {"colour": "red"}, ["unexpected keyword argument 'colour'"], id="unknown-keyword"),
    pytest.param(("k", 1), {"value": 2}, ["multiple values for argument 'value'"], id="duplicate"),
    # a misspelt keyword is named, not the parameter it leaves missing
    pytest.param((), {"colour": "red"}, ["unexpected keyword argument 'colour'"], id="unknown-keyword-only"),
    pytest.param(("k",), {"valeu": 2}, ["unexpected keyword argument 'valeu' (did you mean 'value'?)"],
                 id="misspelt-keyword"),
])
def test_arguments_not_matching_the_signature_are_refused(processor, r, prefix, args, kwargs, words):
    with pytest.raises(EnqueueError) as info:
        processor.enqueue_task("default", "acme", tasks.record, *args, **kwargs)
    assert isinstance(info.value, TypeError)
    assert "tests.tasks:record" in str(info.value)
    for word in words:
        assert word in str(info.value)
    assert keys_under(r, prefix) == []


def test_bad_queue_tenant_or_enqueue_option_is_refused(processor, r, prefix):
    with pytest.raises(ConfigurationError, match="queue name 'no spaces'"):
        processor.enqueue_task("no spaces", "acme", tasks.record, "k")
    with pytest.raises(ConfigurationError, match="tenant ''"):
        processor.enqueue_task("default", "", tasks.record, "k")
    with pytest.raises(ConfigurationError, match="delay_until"):
        processor.enqueue_task("default", "acme", tasks.record, "k", delay_until="tomorrow")
    with pytest.raises(ConfigurationError, match="retries"):
        processor.enqueue_task("default", "acme", tasks.record, "k", retries=-1)
    with pytest.raises(ConfigurationError, match="already carries its arguments"):
        processor.enqueue_task("default", "acme", coretask.call(tasks.record, "k"), "extra")
    with pytest.raises(SerializationError, match="TaskData.data must be bytes"):
        processor.enqueue_task("default", "acme", TaskData("topic", "not bytes"))  # type: ignore[arg-type]
    assert keys_under(r, prefix) == []


def test_queue_outside_options_queues_is_refused_naming_the_known_queues(make_processor, r, prefix):
    from coretask import ScheduleData
    p = make_processor(queues=["high", "default"])
    # When a task, a batch, a batch task, a continuation, an append or a schedule names a queue
    # this processor's workers do not fetch (a typo, or a queue of another deployment)
    attempts = {
        "enqueue_task": lambda: p.enqueue_task("hgih", "acme", tasks.record, "k"),
        "tenant view": lambda: p.tenant("acme").enqueue_task("low", tasks.record, "k"),
        "enqueue_batch": lambda: p.enqueue_batch("low", "acme", lambda b: b.enqueue(tasks.record, "k")),
        "batch.enqueue": lambda: p.enqueue_batch("default", "acme", lambda b: (
            b.enqueue(tasks.record, "k", 1), b.enqueue(tasks.record, "k", 2, queue="low"))),
        "continue_with": lambda: p.enqueue_batch("default", "acme", lambda b: (
            b.enqueue(tasks.record, "k", 1), b.continue_with(tasks.record, "k", 2, queue="low"))),
        "append_batch": lambda: p.append_batch("low", "acme", "some-batch", lambda b: b.enqueue(tasks.record, "k")),
        "upsert_schedule": lambda: p.upsert_schedule(ScheduleData("s", "acme", "low", None, "* * * * *"),
                                                     tasks.record, "k"),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ConfigurationError) as info:
            attempt()
        # Then each is refused, naming the queue, the known queues and the way out; nothing is written
        text = str(info.value)
        assert "is not in Options.queues ['high', 'default']" in text and "strict_queues=False" in text, (name, text)
        assert ("'hgih'" in text and "did you mean 'high'?" in text) if name == "enqueue_task" else "'low'" in text
        assert keys_under(r, prefix) == [], name
    assert "schedule 's': queue 'low'" in str(pytest.raises(ConfigurationError, attempts["upsert_schedule"]).value)
    # And a producer for another deployment's queues says so with strict_queues=False
    other = make_processor(queues=["high", "default"], strict_queues=False)
    tid = other.enqueue_task("low", "acme", tasks.record, "k")
    batch = other.enqueue_batch("default", "acme", lambda b: (b.enqueue(tasks.record, "k", queue="low"),
                                                              b.continue_with(tasks.record, "k", queue="low")))
    assert other.upsert_schedule(ScheduleData("s", "acme", "low", None, "* * * * *"), tasks.record, "k")
    assert other.get_task(tid).queue == "low" and other.get_queue("low").queued == 2
    assert other.get_batch(batch).total == 1


def test_a_number_too_small_for_an_epoch_time_as_delay_until_is_refused(processor, r, prefix):
    # When delay_until is a number of seconds meant as "from now" (before the year 2000 as epoch time)
    for value in (30, 0.5, 0, -1, 946684799):
        with pytest.raises(ConfigurationError, match=r"is not an epoch time.*timedelta\(seconds=") as info:
            processor.enqueue_task("default", "acme", tasks.record, "k", delay_until=value)
        assert f"delay_until={value!r}" in str(info.value)
        with pytest.raises(ConfigurationError, match="timedelta"):
            processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", delay_until=value))
    with pytest.raises(ConfigurationError, match="is not a time"):
        processor.enqueue_task("default", "acme", tasks.record, "k", delay_until=float("nan"))
    # and epoch milliseconds (read as seconds: due in the year 58,000, never run) and a naive
    # datetime (read in the producer's zone: utcnow() + 1 minute is hours off) are refused too
    ms = (time.time() + 60) * 1000
    with pytest.raises(ConfigurationError, match=r"is not epoch seconds \(it is after the year 2200\); epoch milliseconds"):
        processor.enqueue_task("default", "acme", tasks.record, "k", delay_until=ms)
    naive = datetime.now() + timedelta(minutes=1)
    with pytest.raises(ConfigurationError, match="has no time zone.*datetime.now\\(timezone.utc\\)"):
        processor.enqueue_task("default", "acme", tasks.record, "k", delay_until=naive)
    with pytest.raises(ConfigurationError, match="has no time zone"):
        processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", delay_until=naive))
    # Then nothing was written, while an epoch time, a timedelta and a datetime are taken
    assert keys_under(r, prefix) == []
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    for value in (soon.timestamp(), timedelta(seconds=30), soon, 946684800):
        processor.enqueue_task("default", "acme", tasks.record, "k", delay_until=value)
    q = processor.get_queue("default")
    assert (q.delayed, q.queued) == (3, 1)          # 946684800 (1 January 2000) is due at once


def test_callable_whose_signature_cannot_be_read_takes_any_arguments(processor, embedded_worker, r, prefix):
    import math
    # Given a built-in whose signature Python cannot read on any supported version (math.log;
    # time.sleep has one from 3.13 on), enqueued with arguments that fit and with one too many
    first = processor.enqueue_task("default", "acme", math.log, 8, 2)
    second = processor.enqueue_task("default", "acme", math.log, 8, 2, "one too many")
    # Then both are accepted (the call itself says whether the arguments fit) and the first runs
    assert processor.get_task(first).target == "math:log"
    embedded_worker(processor)
    wait_until(lambda: processor.get_queue("default").dead == 1 and processor.get_task(first) is None, 10,
               "the first done, the second dead-lettered by its own TypeError")
    (dead,) = processor.get_dead_tasks("default")
    assert dead.id == second and dead.error_type == "TypeError"


def test_payload_over_max_payload_bytes_is_refused_with_both_sizes(make_processor, r, prefix):
    p = make_processor(max_payload_bytes=200)
    p.enqueue_task("default", "acme", tasks.record, "k", "x" * 100)      # fits
    before = keys_under(r, prefix)
    with pytest.raises(PayloadTooLarge) as info:
        p.enqueue_task("default", "acme", tasks.record, "k", "x" * 300)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EnqueueError)
    size = len(json.dumps({"t": "tests.tasks:record", "a": ["k", "x" * 300], "k": {}}, separators=(",", ":")))
    assert f"is {size} bytes" in str(info.value)
    assert "max_payload_bytes=200" in str(info.value)
    assert "tests.tasks:record" in str(info.value)
    with pytest.raises(PayloadTooLarge, match="is 201 bytes, over max_payload_bytes=200"):
        p.enqueue_task("default", "acme", TaskData("blob", b"\0" * 201))
    assert keys_under(r, prefix) == before
    assert p.get_queue("default").queued == 1


# ----------------------------------------------------------------- coretask.call and options

def test_call_passes_option_named_keywords_to_the_task(processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    # Given a task whose own parameters are named retries and delay_until
    tid = processor.enqueue_task("default", "acme",
                                 coretask.call(tasks_extra.options_like, key, retries=5, delay_until="x"))
    # Then they are the task's arguments, not enqueue options: default retries, not delayed
    info = processor.get_task(tid)
    assert info.retries_left == 3 and info.state == "queued"
    assert json.loads(info.args_preview) == {"args": [key], "kwargs": {"retries": 5, "delay_until": "x"}}
    # And the same names given to enqueue_task itself are enqueue options
    tid2 = processor.enqueue_task("default", "acme", tasks_extra.options_like, key, 1, "y", retries=5,
                                  delay_until=timedelta(hours=1))
    info2 = processor.get_task(tid2)
    assert (info2.retries_left, info2.state) == (5, "delayed")
    q = processor.get_queue("default")
    assert (q.queued, q.delayed) == (1, 1)
    # When a worker runs the ready one
    embedded_worker(processor)
    wait_until(lambda: r.llen(key) == 1, 10, "the call task ran")
    assert json.loads(values(r, key)[0]) == {"retries": 5, "delay_until": "x", "types": ["int", "str"]}
    assert isinstance(coretask.call(tasks.record, "k"), Call)


def test_an_option_named_like_an_unfilled_task_parameter_is_refused_with_the_fix(processor, embedded_worker, r,
                                                                                 prefix):
    key = prefix + ":out"
    # Given a task fetch_like(key, timeout=3): enqueued with timeout=10, which was meant cannot be told
    with pytest.raises(ConfigurationError, match=r"fetch_like has a parameter named 'timeout'.*coretask.call\("
                                                 r"fetch_like, \.\.\., timeout=\.\.\.\)"):
        processor.enqueue_task("default", "acme", tasks_extra.fetch_like, key, timeout=10)
    with pytest.raises(ConfigurationError, match="batch.enqueue also takes as its own option"):
        processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks_extra.fetch_like, key, timeout=10))
    assert processor.get_queue("default").queued == 0 and processor.get_batches_count("acme") == 0
    # When the task's argument goes through coretask.call and the option after it, both hold
    tid = processor.enqueue_task("default", "acme", coretask.call(tasks_extra.fetch_like, key, timeout=10),
                                 timeout=5)
    assert processor.get_task(tid).timeout == 5.0
    # ... and an option whose parameter the positional arguments fill is the enqueue's
    tid2 = processor.enqueue_task("default", "acme", tasks_extra.fetch_like, key, 7, timeout=6)
    assert processor.get_task(tid2).timeout == 6.0
    embedded_worker(processor)
    wait_until(lambda: sorted(values(r, key)) == ["10", "7"], 10, "both ran with their own arguments")


# ------------------------------------------------------------ values and callables end to end

def test_dict_keys_come_back_as_their_annotation_names_them(processor, embedded_worker, r, prefix):
    # Given a parameter annotated dict[int, str] (JSON writes the keys as strings)
    key = prefix + ":out"
    processor.enqueue_task("default", "acme", tasks.by_number, key, {1: "one", 20: "twenty"})
    # When a worker runs the task
    embedded_worker(processor)
    wait_until(lambda: r.llen(key) == 1, 10, "the task ran")
    # Then the keys are integers again
    assert values(r, key) == [repr([(1, "one"), (20, "twenty")])]


def test_values_round_trip_by_annotation(processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    point = tasks.Point(1, 2, "a")
    points = [tasks.Point(3, 4), tasks.Point(5, 6, "b")]
    # Given typed arguments, positional and keyword, with and without the Optional one
    processor.enqueue_task("default", "acme", tasks.typed, key, when, date(2024, 2, 29), ident, Decimal("12.340"),
                           tasks.Color.BLUE, point, points)
    processor.enqueue_task("default", "acme", tasks.typed, key, when=when, day=date(2000, 1, 1), ident=ident,
                           amount=Decimal("-0.5"), color=tasks.Color.RED, point=point, points=[],
                           maybe=datetime(2030, 1, 1, tzinfo=timezone.utc))
    # When a worker runs them
    embedded_worker(processor)
    wait_until(lambda: r.llen(key) == 2, 10, "both typed tasks ran")
    # Then each parameter received the type its annotation names, with the same value
    got = values(r, key)
    first = repr(("datetime", when.isoformat(), "date", "UUID", str(ident), "Decimal", "12.340", tasks.Color.BLUE,
                  point, points, "NoneType"))
    second = repr(("datetime", when.isoformat(), "date", "UUID", str(ident), "Decimal", "-0.5", tasks.Color.RED,
                   point, [], "datetime"))
    assert sorted(got) == sorted([first, second])


def test_sets_and_tuples_come_back_as_their_annotation_names_them(processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    # Given a set, a frozenset and a tuple as arguments (JSON carries them as lists)
    tid = processor.enqueue_task("default", "acme", tasks_extra.collections, key, {"b", "a"}, frozenset({3, 1}),
                                 (7, "x"))
    assert json.loads(processor.get_task(tid).args_preview)["args"][1:] == [["a", "b"], [1, 3], [7, "x"]]
    # When a worker runs the task, then each arrives as the type its annotation names
    embedded_worker(processor)
    wait_until(lambda: r.llen(key) == 1, 10, "the task ran")
    assert json.loads(values(r, key)[0]) == ["set", ["a", "b"], "frozenset", [1, 3], "tuple", [7, "x"]]


def test_instance_method_is_resolved_again_at_run_time(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    resolved: list[type] = []

    def resolver(cls):
        resolved.append(cls)
        instance = cls()
        instance.greeting = "resolved"
        return instance

    p = make_processor(resolver=resolver)
    # Given a bound method of an instance whose state must not travel through Redis
    service = tasks.Service()
    service.greeting = "enqueue-time state"
    tid = p.enqueue_task("default", "acme", service.greet, key, "bob")
    p.enqueue_task("default", "acme", service.greet, key, name="ann")
    info = p.get_task(tid)
    assert info.target == "tests.tasks:Service.greet"
    assert json.loads(info.args_preview) == {"args": [key, "bob"], "kwargs": {}}   # no self
    # When the worker runs both
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 2, 10, "both method tasks ran")
    # Then the resolver built a fresh instance for each run
    assert sorted(values(r, key)) == ["resolved ann", "resolved bob"]
    assert resolved == [tasks.Service, tasks.Service]


def test_method_arguments_are_checked_without_self(processor, r, prefix):
    with pytest.raises(EnqueueError, match="missing a required argument: 'name'"):
        processor.enqueue_task("default", "acme", tasks.Service().greet, "k")
    assert keys_under(r, prefix) == []


def test_static_and_class_methods(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    resolved: list[type] = []
    p = make_processor(resolver=lambda cls: resolved.append(cls) or cls())
    s = p.enqueue_task("default", "acme", tasks.Service.static, key)
    c = p.enqueue_task("default", "acme", tasks.Service.klass, key)
    assert p.get_task(s).target == "tests.tasks:Service.static"
    assert p.get_task(c).target == "tests.tasks:Service.klass"
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 2, 10, "static and class method tasks ran")
    assert sorted(values(r, key)) == ["Service", "static"]
    assert resolved == []                    # no instance is needed for either


def test_coroutine_function_runs_to_completion(processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    tid = processor.enqueue_task("default", "acme", tasks.async_record, key, "awaited")
    assert processor.get_task(tid).target == "tests.tasks:async_record"
    embedded_worker(processor)
    wait_until(lambda: r.llen(key) == 1, 10, "the coroutine ran")
    assert values(r, key) == ["awaited"]
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "ack")
    assert processor.get_queue("default").dead == 0


def test_dill_carries_a_lambda_and_a_closure(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    p = make_processor(serializer="dill", allow_unsigned_pickle=True)
    factor = 7
    seen = {"n": 6}

    def closure(k):
        tasks.R().rpush(k, f"closure {factor * seen['n']}")

    # Given a lambda and a closure over local state (both refused by the JSON serializer)
    t1 = p.enqueue_task("default", "acme", lambda k, x: tasks.R().rpush(k, f"lambda {x}"), key, {1, 2})
    t2 = p.enqueue_task("default", "acme", closure, key)
    assert "<lambda>" in p.get_task(t1).target
    assert "closure" in p.get_task(t2).target
    assert "bytes, dill" in p.get_task(t2).args_preview
    seen["n"] = 1000                          # the closure's state was captured at enqueue
    # And the module they use (tests.tasks, holding a live client) travels by name, not by value
    client = tasks.R()
    for tid in (t1, t2):
        assert len(r.hget(p.gateway.keys.task(tid), "p")) < 2000
    # When a dill worker runs them
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 2, 10, "lambda and closure ran")
    assert sorted(values(r, key)) == ["closure 42", "lambda {1, 2}"]
    assert tasks._client is client            # loading did not overwrite the module's state


class MarkedPickle:
    """A user serializer: pickle behind a marker, counting its calls."""

    name = "marked-pickle"
    MARK = b"MP1:"

    def __init__(self) -> None:
        self.dumped = 0
        self.loaded = 0

    def dumps(self, call: Call) -> bytes:
        self.dumped += 1
        return self.MARK + pickle.dumps((call.fn, call.args, call.kwargs))

    def loads(self, payload: bytes) -> Call:
        assert payload.startswith(self.MARK)
        self.loaded += 1
        fn, args, kwargs = pickle.loads(payload[len(self.MARK):])
        return Call(fn, args, kwargs)


def test_custom_serializer_round_trips(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    ser = MarkedPickle()
    p = make_processor(serializer=ser, allow_unsigned_pickle=True)
    # Given a value JSON could not carry, written by the user serializer
    tid = p.enqueue_task("default", "acme", tasks.record, key, value=(1, frozenset({2})))
    assert ser.dumped == 1
    stored = r.hmget(p.gateway.keys.task(tid), "s", "p", "tg")
    assert stored[0] == b"marked-pickle" and stored[1].startswith(MarkedPickle.MARK)
    assert stored[2] == b"tests.tasks:record"
    # When a worker with the same serializer runs it
    embedded_worker(p)
    wait_until(lambda: r.llen(key) == 1, 10, "the task ran")
    assert values(r, key) == [str((1, frozenset({2})))]
    assert ser.loaded == 1


def test_task_data_is_handled_by_execute(make_processor, embedded_worker, prefix):
    seen: list[tuple] = []

    def execute(ctx: TaskContext) -> None:
        seen.append((ctx.topic, ctx.data, ctx.tenant, ctx.queue, ctx.task_id))

    p = make_processor(execute=execute)
    tid = p.enqueue_task("default", "acme", TaskData("invoices.sync", b"\x00\x01payload"))
    info = p.get_task(tid)
    assert info.target == "topic:invoices.sync"
    assert info.args_preview == "<9 bytes, raw>"
    embedded_worker(p)
    wait_until(lambda: seen, 10, "execute called")
    assert seen == [("invoices.sync", b"\x00\x01payload", "acme", "default", tid)]
    wait_until(lambda: p.get_queue("default").in_flight == 0, 5, "ack")
    assert p.get_queue("default").dead == 0


def test_task_data_without_execute_is_dead_lettered(processor, embedded_worker):
    tid = processor.enqueue_task("default", "acme", TaskData("orphans", b"x"))
    embedded_worker(processor)
    wait_until(lambda: processor.get_queue("default").dead == 1, 10, "dead letter")
    (dead,) = processor.get_dead_tasks("default")
    assert dead.id == tid
    assert dead.error_type == "TaskLoadError"
    assert "Options.execute is not set" in dead.error_message


def test_context_is_injected(make_processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    processor = make_processor(queues=["high", "default"])
    # Given tasks whose context parameter is named ctx, or annotated TaskContext
    t1 = processor.enqueue_task("default", "acme", tasks.with_context, key)
    t2 = processor.enqueue_task("high", "globex", tasks_extra.annotated_context, key + ":2", suffix="!")
    # Then the context is not an argument the caller passes or that is stored
    assert json.loads(processor.get_task(t1).args_preview) == {"args": [key], "kwargs": {}}
    with pytest.raises(EnqueueError, match="too many positional arguments"):
        processor.enqueue_task("default", "acme", tasks.with_context, key, "a context?")
    # When they run
    embedded_worker(processor)
    wait_until(lambda: r.llen(key) == 1 and r.llen(key + ":2") == 1, 10, "both context tasks ran")
    # Then each received its own running context
    assert values(r, key) == [f"{t1}|acme|default|1|None|"]
    assert values(r, key + ":2") == [f"{t2}|globex|high|1!"]


def test_processor_is_shareable_between_threads(processor, r, prefix):
    import threading
    ids: list[str] = []
    lock = threading.Lock()

    def produce():
        for i in range(25):
            tid = processor.enqueue_task("default", "acme", tasks.record, "k", i)
            with lock:
                ids.append(tid)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 100
    assert processor.get_queue("default").queued == 100
    assert isinstance(processor, TaskProcessor)
