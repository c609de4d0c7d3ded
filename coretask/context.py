"""TaskContext: what a running task (and every hook) knows about itself."""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from .errors import LeaseLost, TaskCanceled
from .throttle import LogThrottle

if TYPE_CHECKING:
    from .models import BatchInfo

__all__ = ["TaskContext"]


PROGRESS_INTERVAL = 0.25   # seconds: set_progress writes at most this often per task
_NO_HEADERS: dict[str, str] = {}   # shared by every task without headers: never written to


class LeaseExtender(Protocol):
    """What a context writes through (the gateway has it). ``extend``: push one task's lease
    to now + lease_ms; returns the new deadline, 0 when the token is stale. ``progress``: store
    a running task's progress (nothing when the token is stale)."""

    def extend(self, task_id: str, token: str, lease_ms: int) -> int: ...

    def progress(self, task_id: str, token: str, done: float, total: float | None, message: str | None) -> None: ...


class TaskContext:
    """Passed to a task parameter annotated ``TaskContext`` (or named ``ctx``) and to hooks.

    ``cancelled`` is set the moment the task is being aborted (canceled, its batch canceled, or
    handed back), with :class:`TaskCanceled` raised in its thread right after: clean-up belongs
    in ``try/finally``; waiting on it (``ctx.cancelled.wait(5)`` instead of ``time.sleep(5)``)
    ends a wait that C code would otherwise sit out. ``batch`` holds the batch's statistics as they
    were when the task was fetched. ``attempt`` counts the times the task was fetched (1 on the
    first run). ``retries_left`` is what remains should this attempt fail: the value
    ``on_task_failed_delay`` is then asked with, 0 on the last attempt (with ``retries=3``: 2, 1,
    then 0 on the third attempt, whose failure dead-letters the task).
    ``due_ms``: when the task became due, epoch ms (server clock): its enqueue time, or its
    ``delay_until``; 0 when unknown (a retry, or a task run again after a crash): metrics of
    queue wait read it. ``headers``: the string headers its producer's middleware carried in the
    envelope (W3C ``traceparent`` / ``tracestate`` from the OpenTelemetry middleware), read only
    once the task's signature checked; empty for most tasks. Do not modify either.
    """

    __slots__ = ("task_id", "queue", "tenant", "target", "attempt", "retries_left", "batch_id", "topic",
                 "data", "due_ms", "headers", "_enqueued_ms", "_batch_fields", "_batch", "_cancelled", "_aborted",
                 "_gateway", "_token", "_progress", "__weakref__")

    def __init__(self, *, task_id: str, queue: str, tenant: str, target: str, attempt: int,
                 retries_left: int, batch_id: str | None, gateway: LeaseExtender, enqueued_ms: int | bytes | None = None,
                 batch_fields: list[bytes] | None = None, topic: str | None = None, data: bytes | None = None,
                 enqueued_at: datetime | None = None, batch: BatchInfo | None = None, due_ms: int = 0) -> None:
        self.task_id = task_id
        self.queue = queue
        self.tenant = tenant
        self.target = target
        self.attempt = attempt
        self.retries_left = retries_left
        self.batch_id = batch_id
        self.topic = topic
        self.data = data
        self.due_ms = due_ms
        self.headers: dict[str, str] = _NO_HEADERS
        self._enqueued_ms = int(enqueued_at.timestamp() * 1000) if enqueued_at is not None else enqueued_ms
        self._batch_fields = batch_fields
        self._batch: BatchInfo | None = batch
        self._cancelled: CancelledEvent | None = None
        self._aborted = False
        self._gateway = gateway
        self._token = str(attempt)
        self._progress: _Progress | None = None

    # built on first use: most tasks never look, and the fetch loop's time is the throughput

    @property
    def enqueued_at(self) -> datetime | None:
        from .models import ms_to_dt
        return ms_to_dt(self._enqueued_ms)

    def batch_field(self, name: bytes) -> bytes | None:
        """One raw field of the batch's hash as fetched with the task (None when absent)."""
        f = self._batch_fields or []
        for i in range(0, len(f) - 1, 2):
            if f[i] == name:
                return f[i + 1]
        return None

    @property
    def batch(self) -> BatchInfo | None:
        """The batch's statistics when the task was fetched (None outside a batch)."""
        if self._batch is None and self.batch_id and self._batch_fields:
            from .models import BatchInfo
            f = self._batch_fields
            self._batch = BatchInfo.from_hash(self.batch_id, dict(zip(f[::2], f[1::2])))
        return self._batch

    @property
    def cancelled(self) -> threading.Event:
        """Set when the task is being aborted (batch canceled, handed back, shutdown)."""
        if self._cancelled is None:
            # published before the mark is read: an abort in between wakes this event itself
            self._cancelled = ev = CancelledEvent(self)
            if self._aborted:
                ev.set()
        return self._cancelled

    def _mark_aborted(self) -> None:
        """First half of an abort: a flag, so that the aborting thread raises TaskCanceled in
        every target thread back to back (behind many CPU-bound threads it may not get the GIL
        back for a whole round of switch intervals); ``cancelled`` reads as set from here on."""
        self._aborted = True

    def _wake_cancelled(self) -> None:
        """Second half of an abort: wake threads waiting on ``cancelled``."""
        ev = self._cancelled
        if ev is not None:
            ev.set()

    def extend_lock(self, duration: timedelta) -> None:
        """Keep the task leased for at least ``duration`` from now (server clock). Raises
        LeaseLost when the lease was already taken over: stop work that must not run twice."""
        deadline = self._gateway.extend(self.task_id, self._token, int(duration.total_seconds() * 1000))
        if not deadline:
            raise LeaseLost(f"task {self.task_id}: the lease is no longer held by this worker")

    def set_progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report how far the task got: shown by ``get_task(id).progress`` and the CLI's
        ``task ID`` while it runs (and after, when its record is kept). Cheap to call in a tight
        loop: at most one write per PROGRESS_INTERVAL per task; the latest value of a burst is
        written at the end of the interval."""
        for name, value in (("done", done), ("total", total)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"set_progress: {name} must be a number, got {value!r}")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"set_progress: message must be a string or None, got {message!r}")
        p = self._progress
        if p is None:
            p = self._progress = _Progress(self)
        p.set(done, total, message[:500] if message else message)

    def raise_if_cancelled(self) -> None:
        if self._aborted:
            raise TaskCanceled(f"task {self.task_id} was canceled")

    def __repr__(self) -> str:
        return f"<TaskContext {self.task_id} {self.target} tenant={self.tenant} attempt={self.attempt}>"


class CancelledEvent(threading.Event):
    """``TaskContext.cancelled``: reads as set as soon as the task is marked aborted, before
    the aborting thread gets round to waking its waiters."""

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__()
        self._ctx = ctx

    def is_set(self) -> bool:
        return self._ctx._aborted or super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ctx._aborted or super().wait(timeout)


class _Progress:
    """set_progress's throttle: the first value is written at once, later ones at most once per
    interval; a value held back is written by a timer at the end of the interval, so the last
    report of a burst is never lost."""

    __slots__ = ("ctx", "lock", "value", "written_at", "timer")

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        self.lock = threading.Lock()
        self.value: tuple[float, float | None, str | None] | None = None
        self.written_at = 0.0
        self.timer: threading.Timer | None = None

    def set(self, done: float, total: float | None, message: str | None) -> None:
        import time
        with self.lock:
            self.value = (done, total, message)
            wait = self.written_at + PROGRESS_INTERVAL - time.monotonic()
            if wait > 0:
                if self.timer is None:
                    self.timer = threading.Timer(wait, self.flush)
                    self.timer.daemon = True
                    self.timer.start()
                return
        self.flush()

    def flush(self) -> None:
        import time
        with self.lock:
            value, self.value, self.timer = self.value, None, None
            if value is None:
                return
            self.written_at = time.monotonic()
        ctx = self.ctx
        try:
            ctx._gateway.progress(ctx.task_id, ctx._token, *value)
        except Exception as exc:     # progress is informative: never fail the task for it
            _UNSTORED.log("progress", logging.WARNING, "progress reports not stored",
                          "task %s: progress not stored: %s", ctx.task_id, exc)

    def settle(self) -> None:
        """The task ended: write a value the throttle still holds now, so that a kept record
        shows the last report (not the one before it)."""
        with self.lock:
            timer = self.timer
        if timer is not None:
            timer.cancel()
            self.flush()


# while Redis is away, every running task's reports fail at once: logged a few times per window,
# then counted (the summary comes with the first report that fails after the window)
_UNSTORED = LogThrottle(logging.getLogger(__name__))

