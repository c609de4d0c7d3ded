"""coretask.middleware without a server: the order of calls, errors that are logged and go no
further, async methods and hooks that are awaited in the calling thread (also from inside a
running event loop), the precomputed chain, the built-in OptionsHooks with today's calling
rules, and the validation of Options.middleware."""
from __future__ import annotations

import ast
import asyncio
import logging
import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import coretask
from coretask import ConfigurationError, Middleware, Options
from coretask.middleware import (CANCELED, FAILED, HANDED_BACK, METHODS, OUTCOMES, SUCCEEDED, Chain,
                                 EnqueueMessage, OptionsHooks, WorkerInfo, as_delay, call_hook)

ROOT = Path(__file__).resolve().parent.parent
CTX = SimpleNamespace(task_id="t1", target="tests.tasks:record")
MSG = EnqueueMessage(task_id="t1", queue="default", tenant="acme", target="tests.tasks:record")
WORKER = WorkerInfo(worker_id="w1", queues=("default",), threads=4, pid=1, host="h")
BOOM = RuntimeError("boom")


class Recorder:
    """Duck-typed (no base class): records ``name.method`` for every call into ``log``."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def _rec(self, method: str) -> None:
        self.log.append(f"{self.name}.{method}")

    def before_enqueue(self, message): self._rec("before_enqueue")
    def after_enqueue(self, message): self._rec("after_enqueue")
    def before_task(self, ctx): self._rec("before_task")
    def after_task(self, ctx, outcome, result, error): self._rec("after_task")
    def on_retry(self, ctx, error, delay): self._rec("on_retry")
    def on_dead(self, ctx, error): self._rec("on_dead")
    def on_batch_end(self, batch): self._rec("on_batch_end")
    def on_worker_start(self, worker): self._rec("on_worker_start")
    def on_worker_stop(self, worker): self._rec("on_worker_stop")


ARGS = {"before_enqueue": (MSG,), "after_enqueue": (MSG,), "before_task": (CTX,),
        "after_task": (CTX, SUCCEEDED, 42, None), "on_retry": (CTX, BOOM, None), "on_dead": (CTX, BOOM),
        "on_batch_end": (SimpleNamespace(id="b1"),), "on_worker_start": (WORKER,), "on_worker_stop": (WORKER,)}


# ------------------------------------------------------------------------------------- order

def test_opening_calls_run_in_list_order_and_closing_calls_in_reverse():
    # Given three middleware
    log: list[str] = []
    chain = Chain([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    # When every method is called once
    order = {}
    for method in METHODS:
        log.clear()
        getattr(chain, method)(*ARGS[method])
        order[method] = "".join(entry[0] for entry in log)
    # Then opening calls go a, b, c and closing calls c, b, a (an onion)
    assert order == {"before_enqueue": "abc", "after_enqueue": "cba", "before_task": "abc", "after_task": "cba",
                     "on_retry": "cba", "on_dead": "cba", "on_batch_end": "cba",
                     "on_worker_start": "abc", "on_worker_stop": "cba"}


def test_a_task_sees_before_in_order_then_after_in_reverse():
    log: list[str] = []
    chain = Chain([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    chain.before_task(CTX)
    chain.on_retry(CTX, BOOM, timedelta(seconds=1))
    chain.after_task(CTX, FAILED, None, BOOM)
    assert log == ["a.before_task", "b.before_task", "c.before_task",
                   "c.on_retry", "b.on_retry", "a.on_retry",
                   "c.after_task", "b.after_task", "a.after_task"]


def test_methods_receive_their_arguments():
    seen: list[tuple[str, tuple[Any, ...]]] = []

    class Spy(Middleware):
        def after_task(self, ctx, outcome, result, error):
            seen.append(("after_task", (ctx, outcome, result, error)))

        def on_retry(self, ctx, error, delay):
            seen.append(("on_retry", (ctx, error, delay)))

        def before_enqueue(self, message):
            seen.append(("before_enqueue", (message,)))

    chain = Chain([Spy()])
    chain.before_enqueue(MSG)
    chain.on_retry(CTX, BOOM, timedelta(seconds=5))
    chain.after_task(CTX, SUCCEEDED, {"x": 1}, None)
    assert seen == [("before_enqueue", (MSG,)), ("on_retry", (CTX, BOOM, timedelta(seconds=5))),
                    ("after_task", (CTX, SUCCEEDED, {"x": 1}, None))]


# ------------------------------------------------------------------------------------ errors

def test_a_raising_middleware_is_logged_and_the_next_one_still_runs(caplog):
    log: list[str] = []

    class Broken(Middleware):
        def before_task(self, ctx):
            raise ValueError("broken before_task")

        def after_task(self, ctx, outcome, result, error):
            raise KeyError("broken after_task")

    chain = Chain([Recorder("a", log), Broken(), Recorder("c", log)])
    with caplog.at_level(logging.ERROR, logger="coretask.middleware"):
        chain.before_task(CTX)            # no exception escapes
        chain.after_task(CTX, SUCCEEDED, None, None)
    # Then the middleware on either side ran, in order
    assert log == ["a.before_task", "c.before_task", "c.after_task", "a.after_task"]
    # And each failure was logged with the class and method, and its traceback
    failures = [r for r in caplog.records if r.name == "coretask.middleware"]
    assert len(failures) == 2
    assert "Broken.before_task" in failures[0].getMessage()
    assert "Broken.after_task" in failures[1].getMessage()
    assert failures[0].exc_info[0] is ValueError and failures[1].exc_info[0] is KeyError


def test_an_async_method_that_raises_is_logged_too(caplog):
    class Broken:
        async def before_task(self, ctx):
            await asyncio.sleep(0)
            raise ValueError("async failure")

    with caplog.at_level(logging.ERROR, logger="coretask.middleware"):
        Chain([Broken()]).before_task(CTX)
    (record,) = [r for r in caplog.records if r.name == "coretask.middleware"]
    assert "Broken.before_task" in record.getMessage() and record.exc_info[0] is ValueError


def test_call_hook_logs_a_failure_and_gives_none(caplog):
    def delay_hook(ctx, retries_left):
        raise RuntimeError("no delay today")

    with caplog.at_level(logging.ERROR, logger="coretask.middleware"):
        assert call_hook(delay_hook, CTX, 2) is None
    (record,) = caplog.records
    assert "delay_hook" in record.getMessage() and record.exc_info[0] is RuntimeError
    assert call_hook(None, CTX, 2) is None
    assert call_hook(lambda ctx, n: n * 2, CTX, 2) == 4


# ------------------------------------------------------------------------------------- async

class AsyncRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    async def before_task(self, ctx):
        await asyncio.sleep(0.01)         # a real suspension: the caller must wait for the rest
        self.events.append(("before_task", threading.get_ident()))

    async def after_task(self, ctx, outcome, result, error):
        await asyncio.sleep(0)
        self.events.append((f"after_task:{outcome}:{result}", threading.get_ident()))


def test_an_async_method_is_awaited_in_the_calling_thread():
    mw = AsyncRecorder()
    chain = Chain([mw])
    chain.before_task(CTX)
    # its side effect happened by the time the call returned, in this very thread
    assert mw.events == [("before_task", threading.get_ident())]
    chain.after_task(CTX, SUCCEEDED, 7, None)
    assert mw.events[-1] == ("after_task:succeeded:7", threading.get_ident())


def test_a_sync_method_returning_an_awaitable_is_awaited():
    done: list[int] = []

    class ReturnsCoroutine:
        def before_task(self, ctx):
            async def later():
                await asyncio.sleep(0)
                done.append(1)
            return later()

    Chain([ReturnsCoroutine()]).before_task(CTX)
    assert done == [1]


def test_an_async_method_is_awaited_when_called_from_inside_a_running_event_loop():
    # Given an async middleware, and a producer calling from inside async code
    mw = AsyncRecorder()
    chain = Chain([mw])

    async def producer():
        chain.before_task(CTX)            # a synchronous API called inside a running loop
        return list(mw.events)            # what had happened when the call returned

    seen = asyncio.run(producer())
    # Then the middleware had run to completion when the call returned (on a helper thread:
    # the caller's own loop cannot be re-entered)
    assert [name for name, _ in seen] == ["before_task"]
    assert seen[0][1] != threading.get_ident()


def test_async_on_task_failed_delay_gives_its_value_through_call_hook_and_retry_delay():
    async def failed_delay(ctx, retries_left):
        await asyncio.sleep(0)
        return timedelta(seconds=retries_left * 10)

    # the coroutine is awaited: its value, not a coroutine object (which meant "no delay")
    assert call_hook(failed_delay, CTX, 2) == timedelta(seconds=20)
    chain = Chain(on_task_failed_delay=failed_delay)
    assert chain.retry_delay(CTX, 3) == timedelta(seconds=30)
    # also from inside a running event loop
    assert asyncio.run(_in_loop(lambda: chain.retry_delay(CTX, 1))) == timedelta(seconds=10)


async def _in_loop(fn):
    return fn()


def test_retry_delay_normalises_the_answer(caplog):
    def chain_for(value: Any) -> Chain:
        return Chain(on_task_failed_delay=lambda ctx, left: value)

    assert chain_for(timedelta(seconds=3)).retry_delay(CTX, 1) == timedelta(seconds=3)
    assert chain_for(2.5).retry_delay(CTX, 1) == timedelta(seconds=2.5)       # seconds, as in Options
    assert chain_for(None).retry_delay(CTX, 1) is None
    assert chain_for(0).retry_delay(CTX, 1) is None
    assert chain_for(timedelta(seconds=-1)).retry_delay(CTX, 1) is None
    assert Chain().retry_delay(CTX, 1) is None
    with caplog.at_level(logging.WARNING, logger="coretask.middleware"):
        for odd in (True, "5", float("nan"), float("inf"), 1e30):
            assert chain_for(odd).retry_delay(CTX, 1) is None, odd
    assert len(caplog.records) == 5        # each odd answer is named in a warning
    assert as_delay(1) == timedelta(seconds=1)


# ----------------------------------------------------------------------------------- the chain

def test_nothing_configured_means_every_method_is_an_empty_tuple():
    for chain in (Chain(), Chain.from_options(Options())):
        for method in METHODS:
            calls = getattr(chain, method)
            assert calls == () and not calls, method
            assert not chain.has(method)
            calls(*ARGS[method])           # calling an empty one does nothing
    assert Chain.from_options(Options()).middleware == ()


def test_only_the_methods_a_middleware_defines_take_part():
    class OnlyBefore(Middleware):
        def before_task(self, ctx):
            pass

    class DuckAfter:
        def after_task(self, ctx, outcome, result, error):
            pass

    before, after = OnlyBefore(), DuckAfter()
    chain = Chain([before, after])
    assert [f.__self__ for f in chain.before_task] == [before]
    assert [f.__self__ for f in chain.after_task] == [after]
    assert {m for m in METHODS if chain.has(m)} == {"before_task", "after_task"}
    with pytest.raises(ValueError, match="before_tsk"):
        chain.has("before_tsk")


def test_has_on_batch_end_tells_whether_a_process_drains_the_batch_end_queue():
    assert not Chain.from_options(Options(on_task_end=print)).has("on_batch_end")
    assert Chain.from_options(Options(on_batch_end=print)).has("on_batch_end")

    class BatchWatcher(Middleware):
        def on_batch_end(self, batch):
            pass

    assert Chain.from_options(Options(middleware=[BatchWatcher()])).has("on_batch_end")


# ------------------------------------------------------------------------- the built-in hooks

def hooks_recording(calls: list[tuple[Any, ...]], **raising: bool) -> dict[str, Any]:
    def hook(name):
        def fn(*args):
            calls.append((name, *args))
            if raising.get(name):
                raise RuntimeError(f"hook {name} is broken")
        return fn
    return {name: hook(name) for name in ("on_task_start", "on_task_end", "on_task_error", "on_batch_end")}


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_options_hooks_keep_todays_calling_rules(outcome):
    calls: list[tuple[Any, ...]] = []
    chain = Chain.from_options(Options(**hooks_recording(calls)))
    error = BOOM if outcome == FAILED else None
    chain.before_task(CTX)
    chain.after_task(CTX, outcome, 42 if outcome == SUCCEEDED else None, error)
    expected = [("on_task_start", CTX)]
    if outcome == FAILED:                          # failures and load errors; never cancels
        expected.append(("on_task_error", CTX, BOOM))
    expected.append(("on_task_end", CTX))          # every outcome, after on_task_error
    assert calls == expected
    # on_retry / on_dead are middleware-only: the hooks see nothing more
    chain.on_retry(CTX, BOOM, None)
    chain.on_dead(CTX, BOOM)
    assert calls == expected


def test_options_on_batch_end_gets_the_batch():
    calls: list[tuple[Any, ...]] = []
    chain = Chain.from_options(Options(**hooks_recording(calls)))
    batch = SimpleNamespace(id="b1", state="succeeded")
    chain.on_batch_end(batch)
    assert calls == [("on_batch_end", batch)]


def test_a_raising_hook_does_not_skip_the_next_hook(caplog):
    calls: list[tuple[Any, ...]] = []
    chain = Chain.from_options(Options(**hooks_recording(calls, on_task_error=True)))
    with caplog.at_level(logging.ERROR, logger="coretask.middleware"):
        chain.after_task(CTX, FAILED, None, BOOM)
    assert [c[0] for c in calls] == ["on_task_error", "on_task_end"]
    (record,) = caplog.records
    assert "Options.on_task_error" in record.getMessage()


def test_async_hooks_are_awaited():
    seen: list[str] = []

    async def on_task_start(ctx):
        await asyncio.sleep(0)
        seen.append("start")

    async def on_task_end(ctx):
        await asyncio.sleep(0)
        seen.append("end")

    chain = Chain.from_options(Options(on_task_start=on_task_start, on_task_end=on_task_end))
    chain.before_task(CTX)
    assert seen == ["start"]
    chain.after_task(CTX, CANCELED, None, None)
    assert seen == ["start", "end"]


def test_options_hooks_are_the_innermost_layer_and_only_present_when_a_hook_is_set():
    log: list[str] = []
    chain = Chain.from_options(Options(
        middleware=[Recorder("a", log)],
        on_task_start=lambda ctx: log.append("on_task_start"),
        on_task_end=lambda ctx: log.append("on_task_end")))
    assert isinstance(chain.middleware[-1], OptionsHooks)
    chain.before_task(CTX)
    chain.after_task(CTX, HANDED_BACK, None, None)
    assert log == ["a.before_task", "on_task_start", "on_task_end", "a.after_task"]
    # only the methods whose hooks are set take part: on_batch_end alone costs the tasks nothing
    only_batch = Chain.from_options(Options(on_batch_end=print))
    assert not only_batch.before_task and not only_batch.after_task and only_batch.on_batch_end
    assert OptionsHooks.from_options(Options()) is None
    assert not any(isinstance(m, OptionsHooks) for m in Chain.from_options(
        Options(middleware=[Recorder("a", log)])).middleware)


def test_on_task_failed_delay_is_carried_by_the_chain():
    chain = Chain.from_options(Options(on_task_failed_delay=lambda ctx, left: left))
    assert chain.retry_delay(CTX, 4) == timedelta(seconds=4)
    assert Chain.from_options(Options()).retry_delay(CTX, 4) is None


# --------------------------------------------------------------------------------- validation

class Timing(Middleware):
    def before_task(self, ctx):
        pass


class Misspelt:
    def before_task(self, ctx):
        pass

    def before_tsk(self, ctx):
        pass


class Nothing:
    def run(self):
        pass


class TooFewArgs:
    def after_task(self, ctx):
        pass


class NotCallable:
    before_task = 5


BAD = [
    pytest.param([Timing], ["Options.middleware[0]", "Timing is a class",
                            "pass an instance: Options(middleware=[Timing()])"], id="class"),
    pytest.param([Timing(), Misspelt()], ["Options.middleware[1]", "middleware Misspelt has method 'before_tsk'",
                                          "did you mean 'before_task'?"], id="misspelt"),
    pytest.param([Nothing()], ["Options.middleware[0]", "Nothing defines none of the middleware methods",
                               "before_task"], id="no-method"),
    pytest.param([Middleware()], ["Middleware defines none"], id="base-class-overrides-nothing"),
    pytest.param([None], ["NoneType defines none"], id="none"),
    pytest.param(Timing(), ["Options.middleware must be a list", "got Timing"], id="not-a-list"),
    pytest.param("Timing", ["Options.middleware must be a list"], id="string"),
    pytest.param([TooFewArgs()], ["TooFewArgs.after_task(ctx)",
                                  "cannot be called as after_task(ctx, outcome, result, error)"], id="signature"),
    pytest.param([NotCallable()], ["NotCallable.before_task must be a method, got int"], id="not-callable"),
]


@pytest.mark.parametrize("value,words", BAD)
def test_bad_middleware_raises_configuration_error(value, words):
    with pytest.raises(ConfigurationError) as info:
        Options(middleware=value)
    for word in words:
        assert word in str(info.value)
    assert isinstance(info.value, ValueError)


def test_misspelt_names_are_matched_case_insensitively_and_only_when_close():
    class Shouting:
        def before_task(self, ctx):
            pass

        def On_Worker_Stopped(self, worker):
            pass

    with pytest.raises(ConfigurationError, match="did you mean 'on_worker_stop'"):
        Options(middleware=[Shouting()])

    class Helpers:                       # public helpers that are nothing like a hook pass
        def before_task(self, ctx):
            pass

        def flush(self):
            pass

        def on_retries_exhausted(self):
            pass

    Options(middleware=[Helpers()])


def test_valid_middleware_is_stored_as_a_tuple_and_survives_replace_and_repr():
    class Duck:
        async def after_task(self, ctx, outcome, result, error=None):
            pass

        def on_dead(self, *args):
            pass

    mws = [Timing(), Duck()]
    o = Options(middleware=mws)
    assert o.middleware == tuple(mws) and isinstance(o.middleware, tuple)
    mws.append(Timing())                 # the caller's list is not shared
    assert len(o.middleware) == 2
    assert o.replace(retries=1).middleware == o.middleware
    assert "middleware=(<" in repr(o) and "Timing" in repr(o)
    assert Options().middleware == ()
    assert coretask.Middleware is Middleware and "Middleware" in coretask.__all__
    with pytest.raises(ConfigurationError, match="is a class"):
        o.replace(middleware=[Timing])


def test_task_processor_keywords_take_middleware():
    p = coretask.TaskProcessor(redis="redis://localhost:1/0", middleware=[Timing()])
    assert isinstance(p.options.middleware[0], Timing)
    p.close()


# --------------------------------------------------------------------------------- messages

def test_messages_are_frozen_and_enqueue_due_reads_as_a_datetime():
    msg = EnqueueMessage(task_id="t", queue="q", tenant="acme", target="m:f", batch_id="b", due_ms=1_700_000_000_000,
                         retries=2)
    assert msg.due is not None and msg.due.timestamp() == 1_700_000_000
    assert MSG.due is None and MSG.batch_id is None and MSG.continue_on is None
    with pytest.raises(AttributeError):
        msg.task_id = "other"            # type: ignore[misc]
    with pytest.raises(AttributeError):
        WORKER.threads = 1               # type: ignore[misc]


# ----------------------------------------------------------------------------------- layering

BASE_LAYER = {"errors", "options", "models", "encoding", "targets", "signing", "cron", "context"}


def test_middleware_imports_only_the_base_layer_and_never_options():
    tree = ast.parse((ROOT / "coretask" / "middleware.py").read_text())
    imported = set()
    for node in ast.walk(tree):           # also imports under TYPE_CHECKING and inside functions
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("coretask"):
            imported.add((node.module or "").split(".")[1] if "." in node.module else "")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("coretask") for a in node.names)
    assert imported <= BASE_LAYER - {"options"}, imported
