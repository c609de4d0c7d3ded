"""Eager mode (``Options(eager=True)``): tasks run in the thread that enqueued them, at once,
through the same code a worker runs them with, and their state lives in memory.

How it is put together (docs/decisions.md, "Eager mode is a gateway, not a branch"):

* The client is unchanged. It encodes, checks, signs and calls the enqueue middleware as always,
  and writes through its gateway, which in eager mode is a :class:`MemoryGateway`
  (coretask/gateway/memory.py): the scripts' state, in dicts.
* After each call that makes tasks ready (enqueue_task, a batch's commit, append_batch,
  retry_dead_task(s), trigger_schedule), the client calls ``run_ready`` (one attribute test on
  the enqueue path, None when eager mode is off). :class:`EagerRunner` then takes the tasks this
  thread made ready from the gateway, leases each, and hands it to a worker's
  :class:`~coretask.worker.runner.Runner`: the same checks before anything is decoded (signature,
  tenant, allow-list), the same decoding, middleware and hooks, retry decisions, result
  encoding and time limits. The runner's outcome goes back to the gateway as a worker's would.
* A retry runs again at once, in place: its delay is recorded (``retry_delays``), not waited.
  A task enqueued by a running task runs after it, in order, as on a one-thread worker.
* A task that fails for good raises its exception from the call that ran it, once every ready
  task has run (``Options.eager_propagate``; False: it is only dead-lettered).

Not emulated: leases and their renewal, redelivery after a crash, fairness between tenants,
tenant concurrency limits, pause (the flags are stored, nothing is held back), delays (a
``delay_until`` or a retry delay is not waited), cron ticks (schedules are stored, and
``trigger_schedule`` runs one at once), cancels from another process, and a time limit on a
task stuck where no exception reaches (it runs on, as in an embedded worker).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .context import TaskContext
from .encoding import serializer_for
from .errors import TaskCanceled
from .gateway.memory import MemoryGateway
from .gateway.memory_state import WORKER
from .middleware import Chain, Middleware
from .options import Options
from .signing import TaskGuard
from .worker.aborts import Aborts
from .worker.ledger import Ledger, Task
from .worker.runner import Runner

__all__ = ["EagerRunner", "FailureRecorder", "noted"]

log = logging.getLogger(__name__)


class FailureRecorder(Middleware):
    """Sees every task that fails for good: ``on_dead(ctx, error)`` hands the original
    exception to ``sink``. Eager mode and coretask.testing.drain re-raise what it records (with
    :func:`noted`), so a test sees the task's own exception, not a summary of it."""

    def __init__(self, sink: Callable[[TaskContext, BaseException], None]) -> None:
        self.sink = sink

    def on_dead(self, ctx: TaskContext, error: BaseException) -> None:
        self.sink(ctx, error)


def noted(ctx: TaskContext, error: BaseException) -> BaseException:
    """``error`` with a note naming the task that raised it (Python 3.11+), ready to re-raise."""
    note = f"raised by coretask task {ctx.task_id} ({ctx.target}), attempt {ctx.attempt}"
    if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)
    return error


class _Interrupts(Middleware):
    """A KeyboardInterrupt or SystemExit that ends an eager task's body (Ctrl-C in a test run
    lands in the task, which runs in the main thread) stops the run instead of being retried:
    EagerRunner raises it again once the attempt is settled."""

    def __init__(self, local: threading.local) -> None:
        self.local = local

    def after_task(self, ctx: TaskContext, outcome: str, result: Any, error: BaseException | None) -> None:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            self.local.interrupt = error


class _Limits(Aborts):
    """Aborts with a timer per time limit: an eager task has no fetch loop to check deadlines."""

    def __init__(self, grace: float, running: Any) -> None:
        super().__init__(Ledger(1), grace, WORKER, None)
        self._running = running
        self._timers: dict[str, threading.Timer] = {}

    def limit(self, task: Task, seconds: float) -> None:
        timer = threading.Timer(seconds, self._expire, (task,))
        timer.daemon = True
        self._timers[task.id] = timer
        timer.start()

    def _expire(self, task: Task) -> None:
        if self._running(task):
            log.warning("eager task %s %s ran past its time limit of %gs; aborting it", task.id, task.target,
                        task.leased.timeout_ms / 1000)
            self.abort([task], "timeout")

    def disarm(self, task: Task) -> None:
        timer = self._timers.pop(task.id, None)
        if timer is not None:
            timer.cancel()

    def _watch(self, tasks: list[Task]) -> None:
        """No grace watch: the host process cannot be ended for one task (as in an embedded worker)."""


class EagerRunner:
    """Runs the tasks an eager TaskProcessor's calls made ready, in the calling thread."""

    def __init__(self, options: Options, gateway: MemoryGateway, chain: Chain) -> None:
        self.options = options
        self.gateway = gateway
        self._local = threading.local()      # per thread: runner, ledger, active, failures, interrupt
        self.chain = Chain((FailureRecorder(self._failed), _Interrupts(self._local), *chain.middleware),
                           on_task_failed_delay=chain.on_task_failed_delay)
        self._lock = threading.Lock()
        self._running: dict[str, Task] = {}  # every thread's running task, for cancels
        self._guard: TaskGuard | None = None
        self._limits = _Limits(options.cancel_grace.total_seconds(), self._is_running)
        gateway.on_stop = self._stop
        if chain.on_batch_end:
            gateway.on_batch_end = chain.on_batch_end

    # ------------------------------------------------------------------------------- running

    def run_ready(self) -> None:
        """Run every task this thread made ready, and those they make ready, until none is
        left; then raise the first failure for good (Options.eager_propagate). A call from
        inside a running task returns at once: the outer call runs what it made ready next."""
        local = self._local
        if getattr(local, "active", False):
            return
        local.active = True
        local.failures = failures = []
        try:
            while (task_id := self.gateway.take_ready()) is not None:
                self._run(task_id)
        finally:
            local.active = False
            local.failures = []
        if failures and self.options.eager_propagate:
            raise noted(*failures[0])

    def retry_delays(self, task_id: str) -> list[timedelta]:
        """The delays ``on_task_failed_delay`` gave the task's retries, in order (timedelta(0):
        at once). Eager mode records them and runs the retry at once."""
        return [timedelta(milliseconds=ms) for ms in self.gateway.retry_delays(task_id)]

    def _run(self, task_id: str) -> None:
        """Every attempt of one task: a retry runs again here, at once."""
        runner, ledger = self._worker()
        gateway = self.gateway
        while (leased := gateway.lease(task_id)) is not None:
            ctx = TaskContext(task_id=leased.id, queue=leased.queue, tenant=leased.tenant, target=leased.target,
                              attempt=leased.attempt, retries_left=max(leased.retries_left - 1, 0),
                              enqueued_ms=leased.enqueued_ms, batch_id=leased.batch_id,
                              batch_fields=leased.batch_fields, gateway=gateway)
            task = Task(leased.id, leased, ctx)
            with ledger.lock:
                ledger.running[task.id] = task
            with self._lock:
                self._running[task.id] = task
            try:
                runner.execute(task)
            finally:
                with self._lock:
                    self._running.pop(task.id, None)
                self._limits.disarm(task)
            gateway.send_outcomes(WORKER, ledger.take_outcomes())
            interrupt, self._local.interrupt = getattr(self._local, "interrupt", None), None
            if interrupt is not None:
                raise interrupt

    def _worker(self) -> tuple[Runner, Ledger]:
        """This thread's runner and ledger, built on first use: the guard refuses an unsigned
        pickle setup as a worker would (the producer refused the enqueue before already)."""
        local = self._local
        runner = getattr(local, "runner", None)
        if runner is None:
            if self._guard is None:
                self._guard = TaskGuard(self.options)
            local.ledger = Ledger(1)
            runner = local.runner = Runner(local.ledger, self.options, self._guard,
                                           serializer_for(self.options.serializer), self.chain, None, self._limits)
        runner.thread_id = threading.get_ident()
        return runner, local.ledger

    def _failed(self, ctx: TaskContext, error: BaseException) -> None:
        failures = getattr(self._local, "failures", None)
        if failures is not None:
            failures.append((ctx, error))

    def _is_running(self, task: Task) -> bool:
        return self._running.get(task.id) is task

    # ------------------------------------------------------------------------------- cancels

    def _stop(self, task_ids: list[str]) -> None:
        """cancel_task / cancel_batch told running tasks to stop: tasks of other threads are
        aborted as a worker aborts them (ctx.cancelled, then TaskCanceled in their thread); a
        task that canceled itself gets TaskCanceled from its cancel call."""
        with self._lock:
            tasks = [self._running[i] for i in task_ids if i in self._running]
        mine = getattr(self._local, "runner", None)
        here = [t for t in tasks if t.runner is not None and t.runner is mine]
        self._limits.abort([t for t in tasks if t not in here], "canceled")
        for task in here:
            task.abort_reason = "canceled"
            task.ctx._mark_aborted()
            task.ctx._wake_cancelled()
        if here:
            raise TaskCanceled(f"task {here[0].id} was canceled by its own call")
