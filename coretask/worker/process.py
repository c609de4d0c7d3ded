"""WorkerProcess: one worker process (or an embedded worker) assembled from its parts.

The parts share a Ledger (worker/ledger.py), never this object: the fetch loop (loop.py), the
runners that execute tasks in pool threads (runner.py), the control thread on pub/sub
(control.py), the maintenance timers (maintenance.py) and the abort watch (aborts.py). This
class builds them, starts and stops their threads, and ends the process for a stuck task.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Protocol

from ..encoding import serializer_for
from ..errors import StoreUnavailable
from ..gateway import Gateway
from ..middleware import Chain, WorkerInfo
from ..options import Options
from ..signing import TaskGuard
from ..throttle import OUTAGE
from .aborts import Aborts
from .control import Control
from .descendants import end_descendants
from .leases import Leases
from .ledger import Ledger
from .loop import Loop, Recycling
from .maintenance import Maintenance
from .runner import Runner
from .schedules import ScheduleTimer

__all__ = ["WorkerProcess", "new_worker_id"]

log = logging.getLogger(__name__)

SUBSCRIBE_WAIT = 5.0  # seconds the loop waits for the pub/sub subscription before its first fetch


class Configured(Protocol):
    """What a worker is built from: a TaskProcessor has both."""

    options: Options
    gateway: Gateway
    chain: Chain


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class WorkerProcess:
    """``on_exit_request``: called when a stuck task forces the process out (after its other
    tasks were handed back); None for an embedded worker, which cannot end its host process.
    ``on_crash``: called when a task raises MemoryError (the process may be unusable for every
    task in it: it ends at once, as a crash, and its tasks run again isolated); None: a
    MemoryError is an ordinary failure (embedded workers).
    ``recycle``: apply max_tasks/max_memory_per_process (manager children).
    ``isolation``: the manager's isolation worker: one thread, tasks from the isolation lists
    only (see crashed.lua), and the loop ends once they are empty."""

    def __init__(self, processor: Configured, *, worker_id: str | None = None, renew_own_leases: bool = False,
                 on_exit_request: Callable[[], None] | None = None, on_crash: Callable[[], None] | None = None,
                 recycle: bool = False, isolation: bool = False) -> None:
        options = self.options = processor.options
        if isolation:
            options = self.options = options.replace(max_workers=1)
        gateway = self.gateway = processor.gateway
        chain = self.chain = processor.chain
        guard = TaskGuard(options)   # refuses an unsigned pickle setup; checks every task
        self.id = worker_id or new_worker_id()
        self.on_exit_request = on_exit_request
        self.ledger = ledger = Ledger(options.max_workers)
        self.leases = Leases(gateway, options)
        self.aborts = Aborts(ledger, options.cancel_grace.total_seconds(), self.id,
                             self.force_exit if on_exit_request is not None else None)
        schedules = ScheduleTimer(gateway, options, self.id)   # armed for the next cron tick
        self.control = Control(self.id, ledger, self.aborts, gateway, schedules)
        self.maintenance = Maintenance(self.id, ledger, gateway, self.leases, options, self.aborts, schedules,
                                       chain, renew_own_leases=renew_own_leases)
        serializer = serializer_for(options.serializer)
        self.runners = [Runner(ledger, options, guard, serializer, chain, on_crash, self.aborts)
                        for _ in range(ledger.threads)]
        self.recycling = Recycling(options, ledger, self.id) if recycle else None
        self.loop = Loop(self.id, ledger, gateway, options, self.leases, self.maintenance, self.aborts,
                         self.recycling, isolation=isolation)

    @property
    def recycle_reason(self) -> str | None:
        """Set once a recycling limit was reached (the process then ends when drained)."""
        return self.recycling.reason if self.recycling is not None else None

    def run(self, stop: threading.Event) -> None:
        ledger = self.ledger
        try:
            self.gateway.check_shard_count()    # ConfigurationError: raised to the caller
        except StoreUnavailable as exc:         # the loop waits for Redis (a manager checked first)
            if not OUTAGE.told(f"worker {self.id}", exc):
                log.warning("worker %s: could not compare Options.shards with the deployment's: %s", self.id, exc)
        threads = [threading.Thread(target=r.loop, name=f"coretask-task-{i}", daemon=True)
                   for i, r in enumerate(self.runners)]
        for t in threads:
            t.start()
        self.control.start()
        # a task fetched before the subscription is up would miss a cancel published meanwhile
        # (the control thread re-checks running tasks' batches on every later resubscription)
        self.control.subscribed.wait(SUBSCRIBE_WAIT)
        log.info("worker %s started: queues=%s threads=%d", self.id, ",".join(self.options.queues), ledger.threads)
        info = WorkerInfo(worker_id=self.id, queues=tuple(self.options.queues), threads=ledger.threads,
                          pid=os.getpid(), host=socket.gethostname())
        if self.chain.on_worker_start:
            self.chain.on_worker_start(info)
        threading.Thread(target=lambda: (stop.wait(), ledger.wake.set()), daemon=True).start()
        try:
            carried = self.gateway.carry_controls()
            if carried:
                log.warning("worker %s: %d pause flags or tenant limits held by some shards only (set before "
                            "Options.shards grew) were written to the others", self.id, carried)
        except Exception as exc:    # the loop waits for Redis as for any call; each shard still checks its own
            log.warning("worker %s: could not compare the shards' pause flags and tenant limits: %s", self.id, exc)
        try:
            self.loop.run(stop)
        finally:
            self.loop.shutdown()
            for _ in threads:
                ledger.inbox.put(None)
            self.control.stop()
            self.aborts.clear()
            if self.chain.on_worker_stop:
                self.chain.on_worker_stop(info)
            log.info("worker %s stopped after %d tasks", self.id, ledger.tasks_done)

    def force_exit(self, why: str) -> None:
        """A task ignores its abort past cancel_grace (or a second stop signal came): hand every
        other task back, then end the process (the manager starts a new one)."""
        log.error("worker %s: %s; handing back in-flight tasks and exiting", self.id, why)
        ledger = self.ledger
        with ledger.lock:
            running = list(ledger.running.values())
        for t in running:
            if t.abort_reason == "timeout" and t.runner is not None:   # its attempt failed: charged
                try:
                    t.runner.fail_stuck(t)
                except Exception:
                    log.exception("worker %s: could not fail timed-out task %s", self.id, t.id)
        outcomes = ledger.take_outcomes()
        charged = {f.task_id for f in outcomes.failures}
        outcomes.releases += [t.release() for t in running if t.id not in charged]
        try:
            self.gateway.send_outcomes(self.id, outcomes)
        except Exception:
            log.exception("worker %s: could not hand tasks back; their leases will expire", self.id)
        end_descendants(os.getpid(), f"worker {self.id}")
        if self.on_exit_request is not None:
            self.on_exit_request()
