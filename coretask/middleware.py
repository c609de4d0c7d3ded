"""Middleware: the hook protocol of coretask, and the built-in middleware for the Options hooks.

``Options(middleware=[...])`` takes an ordered list of objects with any of the methods of
:class:`Middleware` (subclassing it is optional: any object that has some of them works)::

    before_enqueue(message)                   producer, before a task is written
    after_enqueue(message)                    producer, once it is written (a batch: after the commit)
    before_task(ctx)                          worker, task thread, before the task is loaded and run
    after_task(ctx, outcome, result, error)   worker, task thread, once per before_task, whatever happened
    on_retry(ctx, error, delay)               the attempt failed and the task will run again
    on_dead(ctx, error)                       the attempt failed and the task will not run again
    on_batch_end(batch)                       a batch finished or was canceled (BatchInfo), once
    on_worker_start(worker) / on_worker_stop(worker)   a worker process (or embedded run) (WorkerInfo)

**Order.** The list is an onion, like nested ``with`` blocks: the first middleware is the
outermost layer. Opening calls (``before_enqueue``, ``before_task``, ``on_worker_start``) run in
list order; closing calls (``after_enqueue``, ``after_task``, ``on_retry``, ``on_dead``,
``on_batch_end``, ``on_worker_stop``) in reverse list order. A middleware therefore sees the
task after everything outside it has set up and before anything outside it tears down: a
tracing middleware listed before a metrics one has its span open while the metrics middleware
measures, and still open when the metrics middleware records.

**The built-in hooks.** ``Options.on_task_start``, ``on_task_end``, ``on_task_error`` and
``on_batch_end`` are one built-in middleware, :class:`OptionsHooks`, placed *last* in the list:
the innermost layer, nearest to the task. Middleware that establish a context in
``before_task`` (a tracing span, an application or database context, context variables) have
it in place when ``on_task_start`` runs and still in place when ``on_task_end`` and
``on_task_error`` run; a timing middleware counts the hooks as part of the task, which is where
they run. ``on_task_failed_delay`` is not a notification but a question whose answer matters;
:meth:`Chain.retry_delay` asks it (see :func:`call_hook`).

**Async.** A method (or hook) that is ``async def``, or that returns an awaitable, is awaited
before the call returns, in the calling thread (the task's thread in a worker): with
``asyncio.run`` when that thread has no running event loop, else (a producer calling
``enqueue_task`` from async code) on a short-lived helper thread that the caller waits for. Each
such call runs in a fresh event loop, so context variables it sets do not outlive it: set those
in a plain method.

**Errors.** An exception raised by a method (or hook) is logged with ``log.exception`` naming
the middleware class and method, and goes no further: the next middleware still runs, the task
is run once and acknowledged as it would be without middleware, an enqueue still happens.
Middleware can observe but not veto. ``KeyboardInterrupt`` and ``SystemExit`` are not caught.

**Cost.** :class:`Chain` collects, once, per method, the callables that define it (a
:class:`Middleware` subclass defines only what it overrides); a method nobody defines is an
empty tuple, so ``if chain.before_task: chain.before_task(ctx)`` costs a truth test when no
middleware or hook is configured.

Middleware objects are shared by all threads of a process: keep their state thread-safe.

Layering: this module belongs to the base layer (errors, options, models, encoding, targets,
signing, cron, context) and imports nothing else from coretask; ``options`` imports
:func:`check_middleware` from here, so this module never imports ``options``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import difflib
import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .models import BatchInfo

__all__ = [
    "Middleware", "EnqueueMessage", "WorkerInfo", "Chain", "Calls", "OptionsHooks", "call_hook",
    "check_middleware", "METHODS", "OUTCOMES", "SUCCEEDED", "FAILED", "CANCELED", "HANDED_BACK",
]

log = logging.getLogger(__name__)

# after_task's ``outcome``
SUCCEEDED = "succeeded"      # the body returned; ``result`` is what it returned
FAILED = "failed"            # the body raised, or the task could not be loaded or was refused
CANCELED = "canceled"        # aborted: it or its batch was canceled (never retried, never dead-lettered)
HANDED_BACK = "handed_back"  # aborted to run again later: pause(requeue_running=True), shutdown
OUTCOMES = (SUCCEEDED, FAILED, CANCELED, HANDED_BACK)

# every method of the protocol, with the number of arguments it is called with
_ARITY = {
    "before_enqueue": 1, "after_enqueue": 1,
    "before_task": 1, "after_task": 4,
    "on_retry": 3, "on_dead": 2,
    "on_batch_end": 1,
    "on_worker_start": 1, "on_worker_stop": 1,
}
METHODS = tuple(_ARITY)
OPENING = ("before_enqueue", "before_task", "on_worker_start")   # list order; the rest reversed
_MISSPELT_CUTOFF = 0.85     # difflib ratio above which a public name is taken for a misspelt method


# ------------------------------------------------------------------------------------ messages

@dataclasses.dataclass(frozen=True)
class EnqueueMessage:
    """What a producer is about to write (before_enqueue) or has written (after_enqueue).

    task_id, queue, tenant: the task's; target: ``module:qualname`` (``topic:NAME`` for a
    TaskData); batch_id: None for a single task; due_ms: the due time in milliseconds since the
    epoch, 0 to run at once; retries: how many attempts may fail in all (Options.retries); continue_on: for a batch
    continuation, ``"success"`` or ``"complete"``, else None.
    headers: string headers a ``before_enqueue`` may add (W3C trace context): they travel in the
    task's JSON envelope, covered by its signature, and a worker shows them as ``ctx.headers``
    (other serializers carry none). Written to only in before_enqueue.
    held_by: in after_enqueue, None when the task was written; the id of the task that holds
    the enqueue's idempotency key when nothing was written (a single task's enqueue_task).
    error: in after_enqueue, None when the task was written (or its key was held); the
    exception that kept it from being written (Redis unreachable, a batch whose block raised),
    which the caller gets right after: a span opened in before_enqueue closes with it.
    """

    task_id: str
    queue: str
    tenant: str
    target: str
    batch_id: str | None = None
    due_ms: int = 0
    retries: int = 0
    continue_on: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    held_by: str | None = None
    error: BaseException | None = None

    @property
    def due(self) -> datetime | None:
        """The due time as an aware datetime (UTC), None when the task runs at once."""
        return datetime.fromtimestamp(self.due_ms / 1000, tz=timezone.utc) if self.due_ms else None


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker process (or an embedded ``TaskProcessor.run``): its id, the queues it fetches
    from in order, its task threads, its process id and host name."""

    worker_id: str
    queues: tuple[str, ...]
    threads: int
    pid: int
    host: str


# ---------------------------------------------------------------------------------- protocol

class Middleware:
    """Base class of middleware; every method is a no-op. Subclass it and override what you
    need (only overridden methods are ever called), or write any object with some of these
    methods: the protocol is duck-typed. A method may be ``async def``; it is awaited in the
    calling thread. What a method raises is logged and ignored. See the module docstring for
    the order of calls."""

    def before_enqueue(self, message: EnqueueMessage) -> None:
        """In the producer, before the task is written (for a batch: as each task is added)."""

    def after_enqueue(self, message: EnqueueMessage) -> None:
        """In the producer, after the task is written (for a batch: after the commit, per task),
        or after enqueue_task found its idempotency key held and wrote nothing
        (``message.held_by`` names the holder), so that what before_enqueue opened is closed."""

    def before_task(self, ctx: Any) -> None:
        """In the task's thread, before the task is loaded and run (ctx: TaskContext)."""

    def after_task(self, ctx: Any, outcome: str, result: Any, error: BaseException | None) -> None:
        """In the task's thread (the one before_task ran in), exactly once after every
        before_task, before the task is acknowledged. ``outcome`` is SUCCEEDED (``result`` is
        the return value, ``error`` None), FAILED (``error`` is the exception: the body's, or a
        TaskLoadError / TaskRefused), CANCELED or HANDED_BACK (``error`` is what ended the body,
        usually TaskCanceled); ``result`` is None unless SUCCEEDED."""

    def on_retry(self, ctx: Any, error: BaseException, delay: timedelta | None) -> None:
        """The attempt failed with ``error``; the task runs again after ``delay`` (None: at once).
        Called before after_task."""

    def on_dead(self, ctx: Any, error: BaseException) -> None:
        """The attempt failed with ``error`` and the task will not run again: its retries are
        exhausted, or it could not be loaded or was refused. Called whether Options.deadletter
        keeps it or discards it, before after_task."""

    def on_batch_end(self, batch: BatchInfo) -> None:
        """A batch finished or was canceled; called once per batch, in one worker process."""

    def on_worker_start(self, worker: WorkerInfo) -> None:
        """A worker process (or embedded run) is ready, before its first fetch."""

    def on_worker_stop(self, worker: WorkerInfo) -> None:
        """A worker process (or embedded run) stopped: its tasks finished or were handed back."""


# --------------------------------------------------------------------------- calling, awaiting

def _describe(fn: Any) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if owner is not None and name is not None and not inspect.ismodule(owner):
        return f"{type(owner).__name__}.{name}"
    return getattr(fn, "__qualname__", None) or name or type(fn).__name__


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _run_awaitable(awaitable: Any) -> Any:
    """Run ``awaitable`` to completion in this thread, or, when this thread already runs an
    event loop (which must not be blocked re-entrantly), on a helper thread; return its value."""
    coro = awaitable if asyncio.iscoroutine(awaitable) else _awaited(awaitable)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:   # handed to the waiting caller, which logs it
            box["error"] = exc

    helper = threading.Thread(target=run, name="coretask-middleware-await", daemon=True)
    helper.start()
    helper.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _call(fn: Callable[..., Any], args: tuple[Any, ...], label: str | None = None) -> Any:
    """fn(*args), awaited if it returns an awaitable; an exception is logged and gives None."""
    try:
        value = fn(*args)
        if value is not None and inspect.isawaitable(value):
            value = _run_awaitable(value)
        return value
    except Exception:
        log.exception("%s raised; ignored, coretask goes on", label or f"middleware {_describe(fn)}")
        return None


def call_hook(fn: Callable[..., Any] | None, *args: Any) -> Any:
    """Call a hook whose value matters (``on_task_failed_delay``) with the semantics of a
    middleware call: an awaitable result is awaited in this thread, an exception is logged and
    gives None. ``fn`` None gives None."""
    if fn is None:
        return None
    return _call(fn, args, f"hook {_describe(fn)}")


class Calls(tuple):  # type: ignore[type-arg]
    """The callables that define one middleware method, in call order. Falsy when empty;
    calling it calls each in turn with :func:`call_hook`'s semantics and returns None."""

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        for fn in self:
            _call(fn, args)


def _defined(mw: object) -> tuple[str, ...]:
    """The protocol methods ``mw`` defines: for a Middleware subclass, those it overrides."""
    if isinstance(mw, OptionsHooks):
        return mw._defined_methods          # only the methods whose hooks are set
    found = []
    for name in METHODS:
        fn = getattr(mw, name, None)
        if fn is None:
            continue
        if isinstance(mw, Middleware) and getattr(fn, "__func__", None) is getattr(Middleware, name):
            continue        # the base class's no-op
        found.append(name)
    return tuple(found)


# ------------------------------------------------------------------------- the built-in hooks

class OptionsHooks(Middleware):
    """The Options hooks as one middleware, with today's calling rules:

    * ``on_task_start(ctx)``: before_task, for every attempt (also one that cannot be loaded);
    * ``on_task_error(ctx, exc)``: after_task with outcome FAILED (a failure, a load error, a
      refused task), never for CANCELED or HANDED_BACK; before on_task_end;
    * ``on_task_end(ctx)``: after_task, whatever the outcome;
    * ``on_batch_end(batch_info)``: on_batch_end.

    Each hook is called on its own (one raising does not skip the next) and may be async.
    Only the methods whose hooks are set take part in the chain."""

    def __init__(self, *, on_task_start: Callable[..., Any] | None = None,
                 on_task_end: Callable[..., Any] | None = None,
                 on_task_error: Callable[..., Any] | None = None,
                 on_batch_end: Callable[..., Any] | None = None) -> None:
        self.on_task_start = on_task_start
        self.on_task_end = on_task_end
        self.on_task_error = on_task_error
        self.on_batch_end_hook = on_batch_end
        defined = []
        if on_task_start is not None:
            defined.append("before_task")
        if on_task_end is not None or on_task_error is not None:
            defined.append("after_task")
        if on_batch_end is not None:
            defined.append("on_batch_end")
        self._defined_methods = tuple(defined)

    @classmethod
    def from_options(cls, options: Any) -> OptionsHooks | None:
        """The built-in middleware for ``options``, or None when none of its hooks is set."""
        hooks = cls(on_task_start=getattr(options, "on_task_start", None),
                    on_task_end=getattr(options, "on_task_end", None),
                    on_task_error=getattr(options, "on_task_error", None),
                    on_batch_end=getattr(options, "on_batch_end", None))
        return hooks if hooks._defined_methods else None

    def before_task(self, ctx: Any) -> None:
        if self.on_task_start is not None:
            _call(self.on_task_start, (ctx,), "hook Options.on_task_start")

    def after_task(self, ctx: Any, outcome: str, result: Any, error: BaseException | None) -> None:
        if outcome == FAILED and self.on_task_error is not None:
            _call(self.on_task_error, (ctx, error), "hook Options.on_task_error")
        if self.on_task_end is not None:
            _call(self.on_task_end, (ctx,), "hook Options.on_task_end")

    def on_batch_end(self, batch: BatchInfo) -> None:
        if self.on_batch_end_hook is not None:
            _call(self.on_batch_end_hook, (batch,), "hook Options.on_batch_end")

    def __repr__(self) -> str:
        return f"OptionsHooks({', '.join(self._defined_methods)})"


# ------------------------------------------------------------------------------------ the chain

class Chain:
    """The middleware of a processor, precomputed once: per method, a :class:`Calls` of the
    callables that define it, in call order (opening methods in list order, closing methods
    in reverse). Use ``if chain.before_task: chain.before_task(ctx)`` on hot paths.

    ``Chain(middleware, on_task_failed_delay=None)`` takes the list as is;
    :meth:`from_options` appends the built-in :class:`OptionsHooks` when a hook is set."""

    __slots__ = (*METHODS, "middleware", "on_task_failed_delay")

    before_enqueue: Calls
    after_enqueue: Calls
    before_task: Calls
    after_task: Calls
    on_retry: Calls
    on_dead: Calls
    on_batch_end: Calls
    on_worker_start: Calls
    on_worker_stop: Calls

    def __init__(self, middleware: Iterable[object] = (), *,
                 on_task_failed_delay: Callable[..., Any] | None = None) -> None:
        self.middleware: tuple[object, ...] = tuple(middleware)
        self.on_task_failed_delay = on_task_failed_delay
        defined = [(mw, _defined(mw)) for mw in self.middleware]
        for name in METHODS:
            order = defined if name in OPENING else defined[::-1]
            setattr(self, name, Calls(getattr(mw, name) for mw, names in order if name in names))

    @classmethod
    def from_options(cls, options: Any) -> Chain:
        """The chain of an Options: its ``middleware``, then the built-in OptionsHooks (the
        innermost layer) when any of its hooks is set, and its ``on_task_failed_delay``."""
        middleware = tuple(getattr(options, "middleware", ()) or ())
        hooks = OptionsHooks.from_options(options)
        if hooks is not None:
            middleware += (hooks,)
        return cls(middleware, on_task_failed_delay=getattr(options, "on_task_failed_delay", None))

    def has(self, name: str) -> bool:
        """Whether any middleware defines method ``name`` (e.g. "on_batch_end": whether this
        process should drain the batch-end queue)."""
        if name not in _ARITY:
            raise ValueError(f"unknown middleware method {name!r}; known: {', '.join(METHODS)}")
        return bool(getattr(self, name))

    def retry_delay(self, ctx: Any, retries_left: int) -> timedelta | None:
        """Ask ``on_task_failed_delay(ctx, retries_left)`` (awaited if async; an exception is
        logged) and normalise its answer: a timedelta, or seconds as a number; None (at once)
        for None, zero or less, or a value of another type (logged)."""
        fn = self.on_task_failed_delay
        if fn is None:
            return None
        return as_delay(call_hook(fn, ctx, retries_left))

    def __repr__(self) -> str:
        parts = [f"{name}=[{', '.join(_describe(fn) for fn in getattr(self, name))}]"
                 for name in METHODS if getattr(self, name)]
        return f"Chain({', '.join(parts)})"


def as_delay(value: object) -> timedelta | None:
    """on_task_failed_delay's answer as a positive timedelta, or None for "at once"."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            log.warning("on_task_failed_delay returned %r; retrying at once", value)
            return None
        try:
            value = timedelta(seconds=value)
        except OverflowError:
            log.warning("on_task_failed_delay returned %r seconds, out of range; retrying at once", value)
            return None
    if not isinstance(value, timedelta):
        log.warning("on_task_failed_delay returned %r (%s); expected a timedelta, seconds or None; "
                    "retrying at once", value, type(value).__name__)
        return None
    return value if value > timedelta(0) else None


# ---------------------------------------------------------------------------------- validation

def check_middleware(value: object) -> tuple[object, ...]:
    """Validate ``Options.middleware``; returns it as a tuple. Raises ConfigurationError for a
    value that is not a list, a class instead of an instance, a public name that looks like a
    misspelt method, an object that defines no method, a method that is not callable or cannot
    take the arguments it is called with."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigurationError(
            f"Options.middleware must be a list of middleware objects, got {type(value).__name__}: "
            "Options(middleware=[MyMiddleware()])")
    items = tuple(value)
    for i, mw in enumerate(items):
        where = f"Options.middleware[{i}]"
        if isinstance(mw, type):
            raise ConfigurationError(
                f"{where}: {mw.__name__} is a class; pass an instance: Options(middleware=[{mw.__name__}()])")
        name = type(mw).__name__
        for attr in dir(mw):
            if attr.startswith("_") or attr in _ARITY:
                continue
            close = difflib.get_close_matches(attr.lower(), METHODS, n=1, cutoff=_MISSPELT_CUTOFF)
            if close:
                raise ConfigurationError(
                    f"{where}: middleware {name} has method {attr!r}; did you mean {close[0]!r}?")
        methods = _defined(mw)
        if not methods:
            raise ConfigurationError(
                f"{where}: {name} defines none of the middleware methods ({', '.join(METHODS)})")
        for method in methods:
            fn = getattr(mw, method)
            if not callable(fn):
                raise ConfigurationError(
                    f"{where}: {name}.{method} must be a method, got {type(fn).__name__}")
            _check_signature(where, name, method, fn)
    return items


_PARAMS = {
    "before_enqueue": "message", "after_enqueue": "message", "before_task": "ctx",
    "after_task": "ctx, outcome, result, error", "on_retry": "ctx, error, delay", "on_dead": "ctx, error",
    "on_batch_end": "batch", "on_worker_start": "worker", "on_worker_stop": "worker",
}


def _check_signature(where: str, name: str, method: str, fn: Callable[..., Any]) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):       # a builtin or C callable without a signature: trust it
        return
    try:
        sig.bind(*([None] * _ARITY[method]))
    except TypeError:
        raise ConfigurationError(
            f"{where}: {name}.{method}{sig} cannot be called as {method}({_PARAMS[method]})") from None
