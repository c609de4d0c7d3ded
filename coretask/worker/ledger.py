"""Ledger: what the parts of one worker process share, and nothing else.

The fetch loop admits leased tasks; runners take them from the inbox and record how each ended;
the loop sends those outcomes with its next fetch; control and maintenance read which tasks run.
Every one of them gets this object, not the whole worker, so what they share is written down
here: the running tasks, the pending outcomes (typed records, coretask/gateway/records.py), the
lock that guards both, and the event that wakes the loop.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ..context import TaskContext
from ..gateway import Ack, Failure, Leased, Outcomes, Release

if TYPE_CHECKING:
    from .runner import Runner

__all__ = ["Ledger", "Task", "SHORT_TASK_MS"]

SHORT_TASK_MS = 10.0  # tasks averaging less than this are acknowledged and fetched in groups
CANCELS_HEARD = 256   # cancel messages remembered for tasks this process did not run (yet)
AVERAGE_WEIGHT = 0.1  # weight of the newest duration in the moving average


@dataclasses.dataclass(eq=False, slots=True)
class Task:
    """A leased task as this process tracks it: what the fetch returned, the context its body
    sees, the runner executing it, and why it is being aborted (once it is)."""

    id: str
    leased: Leased
    ctx: TaskContext
    runner: Runner | None = None     # set by the runner before the body starts
    abort_reason: str | None = None  # "canceled" | "requeue" | "shutdown" | "timeout" once aborted
    result: Any = None               # what the body returned (for after_task middleware)
    started: float = 0.0             # time.monotonic() as its runner took it up

    @property
    def token(self) -> str:
        return self.leased.token

    @property
    def target(self) -> str:
        return self.leased.target

    @property
    def batch_id(self) -> str | None:
        return self.leased.batch_id

    def ack(self, outcome: Literal["ok", "canceled"], duration_ms: int, result: bytes = b"") -> Ack:
        """Outcomes name the queue and tenant the fetch counted the task under, so the scripts
        undo exactly those counters even if the record was damaged while the task ran."""
        return Ack(self.id, self.token, outcome, duration_ms, self.leased.queue, self.leased.tenant, result)

    def release(self) -> Release:
        return Release(self.id, self.token, self.leased.queue, self.leased.tenant)


class Wake(threading.Event):
    """The loop's wake-up. While the loop blocks in Redis (an idle process waiting for a
    hand-off, worker/loop.py), ``interrupt`` is set, and a wake-up calls it so that the blocking
    call ends too: whoever wakes the loop need not know how it waits."""

    interrupt: Callable[[], None] | None = None

    def set(self) -> None:
        super().set()
        hook = self.interrupt
        if hook is not None:
            hook()


class Ledger:
    """Running tasks and pending outcomes of one worker process, under one lock."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.lock = threading.Lock()
        self.wake = Wake()                     # set when the loop has something to do
        # tasks for the runners; None ends a runner; a callable is a hand-off wait (loop.py)
        self.inbox: queue.SimpleQueue[Task | Callable[[], Task | None] | None] = queue.SimpleQueue()
        self.running: dict[str, Task] = {}     # fetched and not yet reported, by id
        self.pending = Outcomes()              # reported, not yet sent to Redis
        self.quiet = False                     # stop fetching (shutdown, recycling)
        self.tasks_done = 0
        self.tasks_taken = 0
        self.avg_ms = SHORT_TASK_MS            # moving average of task durations; starts as "long"
        # ids named by "x:" cancel messages (unverified) while no such task ran here: a task
        # fetched just before its cancel may be admitted after the message (control.py)
        self.cancels_heard: dict[str, None] = {}

    # ------------------------------------------------------------------------- the loop's side

    def admit(self, tasks: list[Task], hold: Task | None = None) -> None:
        """Tasks a fetch leased to this process: running from now on, queued for the runners
        (all but ``hold``, which the calling task thread runs itself: a hand-off, loop.py)."""
        with self.lock:
            for task in tasks:
                self.running[task.id] = task
        for task in tasks:
            if task is not hold:
                self.inbox.put(task)
        self.tasks_taken += len(tasks)

    def heard_cancel(self, task_id: str) -> None:
        """Remember a cancel message for a task not running here (the newest CANCELS_HEARD)."""
        heard = self.cancels_heard
        heard[task_id] = None
        while len(heard) > CANCELS_HEARD:
            try:
                del heard[next(iter(heard))]
            except (StopIteration, KeyError, RuntimeError):   # the loop thread popped one meanwhile
                break

    def cancels_for(self, tasks: list[Task]) -> list[Task]:
        """Admitted tasks a cancel message named before they were admitted (each heard once)."""
        heard = self.cancels_heard
        if not heard:
            return []
        return [t for t in tasks if heard.pop(t.id, 0) is None]

    def take_outcomes(self) -> Outcomes:
        with self.lock:
            taken, self.pending = self.pending, Outcomes()
        return taken

    def restore(self, outcomes: Outcomes) -> None:
        """Outcomes that may not have reached Redis go back in front; a repeat is harmless
        (the lease token makes the second one a no-op)."""
        with self.lock:
            self.pending.prepend(outcomes)

    def free(self) -> int:
        return 0 if self.quiet else self.threads - len(self.running)

    def drained(self) -> bool:
        with self.lock:
            return not (self.running or self.pending)

    def short(self) -> bool:
        return self.avg_ms < SHORT_TASK_MS

    def busy(self) -> bool:
        started = len(self.running) - self.inbox.qsize()
        return started > self.threads * 3 // 4 and not self.quiet

    def running_of(self, batch_id: str | None) -> list[Task]:
        """Running tasks, of one batch or all (None)."""
        # no lock: list() of a dict's values is one C call under the GIL, and the lock could be
        # held by a task thread that is itself waiting for the GIL (a whole round of switches)
        return [t for t in list(self.running.values()) if batch_id is None or t.batch_id == batch_id]

    def is_running(self, task: Task) -> bool:
        return self.running.get(task.id) is task

    def known_ids(self) -> set[str]:
        """Every task this process runs or still has to report."""
        with self.lock:
            return set(self.running) | self.pending.task_ids()

    def release_unstarted(self) -> None:
        """Fetched tasks no runner has taken yet are handed back (shutdown waits only for the
        ones that started)."""
        with self.lock:
            while True:
                try:
                    task = self.inbox.get_nowait()
                except queue.Empty:
                    return
                if task is not None and self.running.pop(task.id, None) is not None:
                    self.pending.releases.append(task.release())

    def release_running(self) -> list[Task]:
        """Hand back every task still running (blocked where an abort cannot reach)."""
        with self.lock:
            stuck = list(self.running.values())
            self.running.clear()
            self.pending.releases += [t.release() for t in stuck]
        return stuck

    # ----------------------------------------------------------------------- the runners' side

    def succeeded(self, task: Task, duration_ms: int, result: bytes = b"") -> None:
        with self.lock:
            self.pending.acks.append(task.ack("ok", duration_ms, result))
            self._finished(task, duration_ms)

    def aborted(self, task: Task, duration_ms: int) -> None:
        """A requeue or shutdown abort hands the task back; a cancel counts it canceled."""
        with self.lock:
            if task.abort_reason in ("requeue", "shutdown"):
                self.pending.releases.append(task.release())
            else:
                self.pending.acks.append(task.ack("canceled", duration_ms))
            self._finished(task, duration_ms)

    def failed(self, task: Task, failure: Failure) -> None:
        with self.lock:
            self.pending.failures.append(failure)
            self._finished(task, failure.duration_ms)

    def unreadable(self, failure: Failure) -> None:
        """A leased task the loop could not admit (its fetch reply entry did not read): its
        burial goes out with the next round trip."""
        with self.lock:
            self.pending.failures.append(failure)
        self.wake.set()

    def _finished(self, task: Task, duration_ms: int) -> None:
        self.running.pop(task.id, None)
        self.tasks_done += 1
        self.avg_ms += (duration_ms - self.avg_ms) * AVERAGE_WEIGHT
        if self.threads - len(self.running) >= self.threads // 2 or self.quiet or not self.short():
            self.wake.set()     # else the loop would only wake to wait again (worker/loop.py)
