"""Runner: executes one task at a time in a pool thread, safely abortable from another thread.

Aborting uses an asynchronous exception (``PyThreadState_SetAsyncExc``), which lands at the next
bytecode boundary of the target thread, wherever that is. Two rules keep it from ever hitting
the acknowledgement path:

* the aborting thread raises only while ``current`` names the task it means, and holds
  ``raising`` while it checks and raises;
* the runner, on leaving the body, clears ``current``, waits out any ``raising`` in progress and
  passes a checkpoint inside ``try/except TaskCanceled``, so a raise that raced with the body's
  return is absorbed there. After that, nobody can raise into this thread for this task.

Where the exception is handled depends on the Python version. Up to 3.12 the frame it lands in
sees it first. CPython 3.13 (python/cpython#139622, seen on 3.13.0) may unwind that frame
without running its ``except``/``finally`` blocks, depending on where in a loop it lands, and
hands the exception to the caller. So every frame of the runner in which a raise can land has
a caller that handles it too: the body's window is its own frame (``_invoke``), and the
checkpoints after it are calls, never loops in the frame that catches.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..encoding import HEADERS_START, Serializer, decode, read_headers
from ..errors import PayloadTooLarge, SerializationError, TaskCanceled, TaskLoadError, TaskTimeout
from ..results import encode_result
from ..gateway import Failure
from ..middleware import CANCELED, FAILED, HANDED_BACK, SUCCEEDED, Chain
from .ledger import Task
from ..throttle import LogThrottle

if TYPE_CHECKING:
    from ..options import Options
    from .aborts import Aborts
    from ..signing import TaskGuard
    from .ledger import Ledger

log = logging.getLogger(__name__)
THROTTLE = LogThrottle(log)     # per process: flushed by the maintenance loop

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


def _checkpoint() -> None:
    """A function call: the interpreter delivers pending asynchronous exceptions here."""


class Runner:
    """One pool thread's task execution state. It takes tasks from the ledger's inbox and
    reports each one's outcome back to the ledger."""

    def __init__(self, ledger: Ledger, options: Options, guard: TaskGuard | None = None,
                 serializer: Serializer | None = None, chain: Chain | None = None,
                 on_crash: Callable[[], None] | None = None, aborts: Aborts | None = None) -> None:
        self.on_crash = on_crash
        self.aborts = aborts        # arms time limits (None: limits are not enforced in-process)
        self.ledger = ledger
        self.options = options
        self.chain = chain if chain is not None else Chain()
        self.guard = guard
        self.serializer = serializer
        self.thread_id = 0
        self.current: str | None = None      # task id while its body runs
        self.raising = False
        self.abort_lock = threading.Lock()    # serialises aborters, never taken by the runner
        self._coroutine: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None  # a coroutine task's

    # ------------------------------------------------------------------------ called by aborters

    def abort(self, task_id: str, exc: type[TaskCanceled] = TaskCanceled) -> bool:
        """Raise ``exc`` (TaskCanceled, or its subclass TaskTimeout) in this thread if it is
        inside ``task_id``'s body."""
        with self.abort_lock:
            self.raising = True
            try:
                if self.current != task_id:
                    return False
                running = self._coroutine
                if running is not None:
                    # a coroutine waits in the event loop's select, where no exception lands:
                    # it is cancelled the asyncio way (CancelledError at its await), and its
                    # outcome is read as the abort's (execute: task.abort_reason)
                    try:
                        running[0].call_soon_threadsafe(running[1].cancel)
                        return True
                    except RuntimeError:        # the loop just closed: the body is returning
                        pass
                _set_async_exc(self.thread_id, exc)
                return True
            finally:
                self.raising = False

    # ---------------------------------------------------------------------- the pool thread side

    def loop(self) -> None:
        self.thread_id = threading.get_ident()
        if self.options.sched_batch:
            _sched_batch()
        inbox = self.ledger.inbox
        while True:
            task = inbox.get()
            if task is None:
                return
            try:
                if not isinstance(task, Task):
                    task = task()       # a hand-off wait (loop.py): the task it brought runs here
                    if task is None:
                        continue
                self.execute(task)
            except TaskCanceled:   # _body absorbs every abort (tests/test_runner.py): a bug if seen
                log.error("an abort escaped the bookkeeping of task %s; it may stay in flight", _name(task))
            except BaseException:  # never let the pool thread die
                log.exception("internal error while running task %s", _name(task))

    def execute(self, task: Task) -> None:
        """Load and run one task and report its outcome to the ledger. Middleware sees it
        before it is loaded and once more, whatever happened, before the outcome is recorded
        (so what it writes, a result or history, is in place when the task shows as done)."""
        chain = self.chain
        ctx = task.ctx
        started = task.started = time.monotonic()
        error: BaseException | None = None
        load_error: TaskLoadError | None = None
        debug = log.isEnabledFor(logging.DEBUG)     # once per task: the fields are built only for DEBUG
        if debug:
            log.debug("task %s %s started (attempt %d)", task.id, task.target, ctx.attempt,
                      extra=task_fields(task, "task_started"))
        try:
            self._check(task)      # before before_task: ctx.headers are read only from a checked task
        except TaskLoadError as exc:
            load_error = exc
        if chain.before_task:
            chain.before_task(ctx)
        if load_error is None:
            try:
                inv = self._load(task)
            except TaskLoadError as exc:
                load_error = exc
            else:
                error = self._body(task, inv)
        duration_ms = int((time.monotonic() - started) * 1000)
        if ctx._progress is not None:
            ctx._progress.settle()
        if load_error is not None:
            THROTTLE.log(("unloadable", task.target), logging.ERROR, f"tasks of {task.target} could not be loaded",
                         "task %s %s cannot be loaded: %s; failed for good, no retry: %s", task.id, task.target,
                         load_error, self._buried(),
                         extra=lambda: task_fields(task, "task_dead", duration_ms, retries_left=0, next_delay_ms=None,
                                                   error_type=type(load_error).__name__),
                         summary={"event": "task_dead", "target": task.target,
                                  "error_type": type(load_error).__name__})
            if chain.on_dead:
                chain.on_dead(ctx, load_error)
            if chain.after_task:
                chain.after_task(ctx, FAILED, None, load_error)
            self.ledger.failed(task, _failure(task, load_error, duration_ms, bury=True))
        elif error is None:
            if debug:
                log.debug("task %s %s done in %d ms", task.id, task.target, duration_ms,
                          extra=task_fields(task, "task_succeeded", duration_ms))
            result = b""
            if task.leased.keep_result_ms:
                try:
                    result = encode_result(task.id, task.target, task.result, self.options)
                except (SerializationError, PayloadTooLarge) as exc:   # same value on every run: no retry
                    log.error("task %s %s returned a result that cannot be kept (%s): the task failed for good, "
                              "no retry: %s", task.id, task.target, exc, self._buried(),
                              extra=task_fields(task, "task_dead", duration_ms, retries_left=0, next_delay_ms=None,
                                                error_type=type(exc).__name__))
                    if chain.on_dead:       # buried below: a failed attempt gets on_retry or on_dead
                        chain.on_dead(ctx, exc)
                    if chain.after_task:
                        chain.after_task(ctx, FAILED, None, exc)
                    self.ledger.failed(task, _failure(task, exc, duration_ms, bury=True))
                    return
            if chain.after_task:
                chain.after_task(ctx, SUCCEEDED, task.result, None)
            self.ledger.succeeded(task, duration_ms, result)
        elif task.abort_reason == "timeout":
            timeout = _timeout(task)
            timeout.__cause__ = error
            self._failed(task, timeout, duration_ms)
        elif isinstance(error, TaskCanceled) or task.abort_reason is not None:
            handed_back = task.abort_reason in ("requeue", "shutdown")
            if log.isEnabledFor(logging.INFO):
                log.info("task %s %s aborted (%s) after %d ms", task.id, task.target, task.abort_reason or "canceled",
                         duration_ms, extra=task_fields(task, "task_handed_back" if handed_back else "task_canceled",
                                                        duration_ms))
            if chain.after_task:
                chain.after_task(ctx, HANDED_BACK if handed_back else CANCELED, None, error)
            self.ledger.aborted(task, duration_ms)
        elif isinstance(error, MemoryError) and self.on_crash is not None:
            # any task of this process may have met it: none can be blamed from here, so the
            # process ends as a crash and its tasks run again one at a time (crashed.lua)
            log.error("task %s %s raised MemoryError; ending this worker process", task.id, task.target)
            self.on_crash()
        else:
            self._failed(task, error, duration_ms)

    def fail_stuck(self, task: Task) -> None:
        """A timed-out task ignored its abort past cancel_grace, so its process is about to end
        (called from the loop thread): its attempt is failed here as the task's own thread
        would have failed it, with its run time, the retry delay, the log line and middleware."""
        self._failed(task, _timeout(task, " and ignored the abort for cancel_grace; its worker process ended"),
                     int((time.monotonic() - task.started) * 1000))

    def _failed(self, task: Task, error: BaseException, duration_ms: int) -> None:
        chain = self.chain
        ctx = task.ctx
        # ctx.retries_left: the retries left after this failure (0: it was the last attempt)
        delay = chain.retry_delay(ctx, ctx.retries_left) if ctx.retries_left > 0 else None
        if ctx.retries_left <= 0:
            then = self._buried()
        else:
            then = f"retrying in {delay.total_seconds():g}s" if delay is not None else "retrying at once"
        event = ("task_timeout" if isinstance(error, TaskTimeout) else
                 "task_failed" if ctx.retries_left > 0 else "task_dead")
        what = "were dead-lettered" if event == "task_dead" else "failed"
        THROTTLE.log(("failed", task.target, type(error).__name__, event), logging.WARNING,
                     f"tasks of {task.target} {what} with {type(error).__name__}",
                     "task %s %s failed on attempt %d after %d ms: %s: %s; %d retries left, %s", task.id,
                     task.target, ctx.attempt, duration_ms, type(error).__name__, _message(error),
                     ctx.retries_left, then,
                     extra=lambda: task_fields(task, event, duration_ms, retries_left=ctx.retries_left,
                                               next_delay_ms=_delay_ms(delay) if ctx.retries_left > 0 else None,
                                               error_type=type(error).__name__),
                     summary={"event": event, "target": task.target, "error_type": type(error).__name__})
        if ctx.retries_left > 0:
            if chain.on_retry:
                chain.on_retry(ctx, error, delay)
        elif chain.on_dead:
            chain.on_dead(ctx, error)
        if chain.after_task:
            chain.after_task(ctx, FAILED, None, error)
        self.ledger.failed(task, _failure(task, error, duration_ms, delay_ms=_delay_ms(delay)))

    def _buried(self) -> str:
        """What becomes of a task that fails for good, for the log line that says so."""
        if not self.options.deadletter:
            return "discarded (Options.deadletter is off)"
        if not self.options.deadletter_schedules:       # (a worker cannot tell a schedule's run apart)
            return "dead-lettered (unless it is a schedule's run: those are discarded, Options.deadletter_schedules)"
        return "dead-lettered"

    def _check(self, task: Task) -> None:
        """Signature, tenant, target policy and size: before anything is decoded or imported.
        Then the headers its producer's middleware wrote (trace context) are shown on ctx."""
        leased = task.leased
        assert self.guard is not None
        self.guard.check(leased)
        limit = self.options.max_payload_bytes
        if len(leased.payload) > limit:     # written past enqueue's check: never decoded
            raise TaskLoadError(f"task {task.id} has a {len(leased.payload)}-byte payload, over "
                                f"max_payload_bytes={limit}; refused before decoding")
        if leased.payload.startswith(HEADERS_START) and leased.serializer == "json":
            task.ctx.headers = read_headers(leased.payload)

    def _load(self, task: Task) -> Any:
        leased = task.leased
        assert self.serializer is not None
        if leased.serializer == "raw":
            if self.options.execute is None:
                raise TaskLoadError(f"task {task.id} is a TaskData (topic {leased.target[6:]!r}) but "
                                    "Options.execute is not set")
            task.ctx.topic, task.ctx.data = leased.target[6:], leased.payload
            return None
        return decode(leased.payload, leased.serializer, self.serializer,
                      self.options.allowed_modules)  # type: ignore[arg-type]

    def _body(self, task: Task, inv: Any) -> BaseException | None:
        """Run the task body; returns the exception it raised, or None."""
        ctx = task.ctx
        try:
            if inv is None:
                fn: Callable[..., Any] = self.options.execute  # type: ignore[assignment]
                args: tuple[Any, ...] = (ctx,)
                kwargs: dict[str, Any] = {}
            else:
                fn = inv.target.bind(self.options.resolver)
                args, kwargs = inv.args, inv.kwargs
                if inv.target.context_param:
                    kwargs = {**kwargs, inv.target.context_param: ctx}
        except BaseException as exc:
            return exc
        coroutine = inv is not None and inv.target.is_coroutine
        task.runner = self
        if self.aborts is not None and task.leased.timeout_ms:
            self.aborts.limit(task, task.leased.timeout_ms / 1000)
        try:
            error = self._invoke(task, fn, args, kwargs, coroutine)
        except TaskCanceled as exc:     # landed in _invoke's own frame: see the module docstring
            self.current = None
            error = exc
        # Once ``current`` is cleared, at most two raises can still arrive: one already pending
        # and one an aborter decided on just before. Each _settle absorbs at most one. Nested,
        # not looped: a loop's backward jump would be a delivery point in this very frame.
        try:
            self._settle()
        except TaskCanceled:
            try:
                self._settle()
            except TaskCanceled:
                self._settle()
        return error

    def _invoke(self, task: Task, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                coroutine: bool) -> BaseException | None:
        """The window in which an abort may raise into this thread: ``current`` names the task
        from before the body starts until after it ends."""
        try:
            self.current = task.id
            if task.abort_reason is not None:        # aborted before it started
                raise TaskCanceled(task.abort_reason)
            result = fn(*args, **kwargs)
            if coroutine or asyncio.iscoroutine(result):
                result = asyncio.run(self._awaited(result))
            task.result = result
        except BaseException as exc:
            self.current = None
            return exc
        self.current = None
        return None

    async def _awaited(self, coroutine: Any) -> Any:
        """Run a coroutine task where abort() can cancel it."""
        self._coroutine = (asyncio.get_running_loop(), asyncio.current_task())   # type: ignore[assignment]
        try:
            return await coroutine
        finally:
            self._coroutine = None

    def _settle(self) -> None:
        """Wait out a raise in progress, then pass a checkpoint where a pending one is delivered."""
        while self.raising:
            pass
        _checkpoint()


def task_fields(task: Task, event: str, duration_ms: int | None = None, **more: Any) -> dict[str, Any]:
    """The structured fields of a task event (coretask/logs.py): build them only for a record
    that is logged (``log.isEnabledFor`` first: this runs per task)."""
    ctx = task.ctx
    fields = {"event": event, "task_id": task.id, "target": task.target, "queue": ctx.queue, "tenant": ctx.tenant,
              "batch_id": ctx.batch_id, "attempt": ctx.attempt, "duration_ms": duration_ms}
    fields.update(more)
    return fields


def _name(item: Any) -> str:
    return item.id if isinstance(item, Task) else "(waiting for a hand-off)"


def _delay_ms(delay: Any) -> int:
    """A retry delay (timedelta, None for at once) in ms."""
    return int(delay.total_seconds() * 1000) if delay is not None else 0


def _sched_batch() -> None:
    """Put the calling thread under SCHED_BATCH (Options.sched_batch), where the OS has it."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))     # 0: the calling thread (Linux)
    except OSError as exc:       # a seccomp profile may forbid it: the tasks run all the same
        log.debug("could not set SCHED_BATCH on task thread: %s", exc)


def _timeout(task: Task, then: str = "") -> TaskTimeout:
    """The error of an attempt past its time limit (the task's id and target are beside it)."""
    return TaskTimeout(f"ran past its time limit of {task.leased.timeout_ms / 1000:g}s{then}")


def _failure(task: Task, error: BaseException, duration_ms: int, *, delay_ms: int = 0,
             bury: bool = False) -> Failure:
    etype, message, tb = format_error(error)
    return Failure(task.id, task.token, etype, message, tb, duration_ms, delay_ms=delay_ms, bury=bury,
                   queue=task.leased.queue, tenant=task.leased.tenant)


def _message(exc: BaseException) -> str:
    try:
        return str(exc)[:500]
    except Exception:   # a failing __str__ must not keep the failure from being logged
        return f"<unprintable {type(exc).__name__} object>"


def format_error(exc: BaseException) -> tuple[str, str, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:   # a failing __str__ must not keep the failure from being recorded
        message = f"<unprintable {type(exc).__name__} object>"
    return type(exc).__name__, message[:2000], tb[-8000:]
