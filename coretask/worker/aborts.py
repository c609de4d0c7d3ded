"""Aborts: ending running tasks of this process (batch canceled, pause with requeue, shutdown,
time limit) and the cancel_grace watch on tasks that ignore their abort.

An abort is a mark and a raise, back to back for every task, before anything else: the
aborting thread (usually the control thread) keeps the GIL only until the next switch, and
behind many CPU-bound task threads getting it back takes a long while. Waking threads that
wait on ``ctx.cancelled`` and arming the watch come after.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from ..errors import TaskCanceled, TaskTimeout
from .ledger import Ledger, Task

__all__ = ["Aborts"]

log = logging.getLogger(__name__)


class Aborts:
    """``on_stuck(why)`` is called from the loop thread when a task still runs ``grace`` seconds
    after its abort (a worker process then hands its other tasks back and exits); None for an
    embedded worker, which cannot end its host process: it logs and lets the task run on."""

    def __init__(self, ledger: Ledger, grace: float, worker_id: str,
                 on_stuck: Callable[[str], None] | None) -> None:
        self.ledger = ledger
        self.grace = grace
        self.worker_id = worker_id
        self.on_stuck = on_stuck
        self._watched: list[tuple[float, Task]] = []
        self._limits: list[tuple[float, int, Task]] = []    # heap of (deadline, seq, task): time limits
        self._seq = itertools.count()
        self._lock = threading.Lock()    # the control thread adds while the loop thread checks

    def limit(self, task: Task, seconds: float) -> None:
        """Arm a task's time limit (called by its runner as the body starts): past it, the loop
        thread aborts the task with reason "timeout" (TaskTimeout raised in its thread)."""
        with self._lock:
            heapq.heappush(self._limits, (time.monotonic() + seconds, next(self._seq), task))
        self.ledger.wake.set()      # the loop's wait may end after the new deadline

    def abort(self, tasks: list[Task], reason: str) -> list[Task]:
        """Abort the tasks not aborted yet; returns those."""
        aborted = [t for t in tasks if t.abort_reason is None]
        exc = TaskTimeout if reason == "timeout" else TaskCanceled
        for task in aborted:
            task.abort_reason = reason
            task.ctx._mark_aborted()
            if task.runner is not None:         # set by the runner before the body starts
                task.runner.abort(task.id, exc)
        for task in aborted:
            task.ctx._wake_cancelled()
        self._watch(aborted)
        return aborted

    def abort_batch(self, batch_id: str | None, reason: str) -> int:
        """Abort the running tasks of one batch (None: every running task); how many."""
        return len(self.abort(self.ledger.running_of(batch_id), reason))

    def _watch(self, tasks: list[Task]) -> None:
        if not tasks:
            return
        deadline = time.monotonic() + self.grace
        with self._lock:
            self._watched += [(deadline, task) for task in tasks]
        self.ledger.wake.set()

    def check(self, now: float) -> float | None:
        """Abort tasks past their time limit, act on tasks past their grace; returns the next
        deadline (monotonic), None if none."""
        next_limit = self._expire_limits(now) if self._limits else None
        if not self._watched:
            return next_limit
        with self._lock:
            watched, self._watched = self._watched, []
        pending = []
        for deadline, task in watched:
            if not self.ledger.is_running(task):
                continue
            if deadline <= now:
                why = f"task {task.id} {task.target} ignored its abort for {self.grace:g}s"
                if self.on_stuck is None:
                    # embedded (threads only): the process cannot be ended for one task; handing
                    # back tasks that go on running here would run them twice. Stop watching.
                    log.error("worker %s: %s; it runs on until it returns", self.worker_id, why)
                    continue
                self.on_stuck(why)
                return None
            pending.append((deadline, task))
        with self._lock:
            self._watched[:0] = pending
            return min([d for d, _ in self._watched] + ([next_limit] if next_limit is not None else []),
                       default=None)

    def _expire_limits(self, now: float) -> float | None:
        expired = []
        with self._lock:
            limits = self._limits
            while limits and limits[0][0] <= now:
                expired.append(heapq.heappop(limits)[2])
            nxt = limits[0][0] if limits else None
        running = [t for t in expired if self.ledger.is_running(t)]
        if running:
            for task in running:
                log.warning("worker %s: task %s %s ran past its time limit of %gs; aborting it", self.worker_id,
                            task.id, task.target, task.leased.timeout_ms / 1000)
            self.abort(running, "timeout")
        return nxt

    def clear(self) -> None:
        with self._lock:
            self._watched.clear()
            self._limits.clear()
