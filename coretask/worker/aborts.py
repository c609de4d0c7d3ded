"""Aborts: ending running tasks of this process (batch canceled, pause with requeue, shutdown)
and the cancel_grace watch on tasks that ignore their abort.

An abort is a mark and a raise, back to back for every task, before anything else: the
aborting thread (usually the control thread) keeps the GIL only until the next switch, and
behind many CPU-bound task threads getting it back takes a long while. Waking threads that
wait on ``ctx.cancelled`` and arming the watch come after.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

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
        self._lock = threading.Lock()    # the control thread adds while the loop thread checks

    def abort(self, tasks: list[Task], reason: str) -> list[Task]:
        """Abort the tasks not aborted yet; returns those."""
        aborted = [t for t in tasks if t.abort_reason is None]
        for task in aborted:
            task.abort_reason = reason
            task.ctx._mark_aborted()
            if task.runner is not None:         # set by the runner before the body starts
                task.runner.abort(task.id)
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
        """Act on tasks past their grace; returns the next deadline (monotonic), None if none."""
        if not self._watched:
            return None
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
            return min((d for d, _ in self._watched), default=None)

    def clear(self) -> None:
        with self._lock:
            self._watched.clear()
