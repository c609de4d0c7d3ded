"""Manager: starts N worker processes, keeps their leases alive, replaces the ones that die.

The manager renews the leases of every child it sees alive (one script call per child), so a
task stuck in C code that holds its process's GIL keeps its lease, while the tasks of a child
that died are taken back at once. A crash charges only its culprit: the one task a dead child ran,
or, when it ran several, none of them; those run again one at a time in an isolation process
(crashed.lua) until a crash names its task. The manager also ends a child whose task ignores its
abort past cancel_grace (overdue.lua): it runs no task, so it is never starved of its GIL.
Shutdown is two-phase: SIGTERM/SIGINT asks every child to stop fetching and finish within
shutdown_timeout, handing the rest back; a second signal forces it.
"""
from __future__ import annotations

import ctypes
import difflib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, StoreUnavailable
from ..gateway import Failure, Outcomes, Overdue
from ..logs import configure as configure_logs
from ..signing import TaskGuard
from .descendants import descendants_of, end_processes
from .leases import Leases
from .process import Configured, WorkerProcess, new_worker_id
from ..throttle import OUTAGE, LogThrottle

log = logging.getLogger(__name__)

POLL = 0.1
FORCED_EXIT = 3   # exit code of a child that ended itself for a stuck task
RECYCLE = 4       # exit code of a child that reached max_tasks/max_memory_per_process (not a crash)
MEMORY_ERROR = 5  # exit code of a child that ended itself after a task raised MemoryError (a crash)
SIGNAL_DEBOUNCE = 2.0
OVERDUE_POLL = 0.25        # seconds between checks for tasks that ignore their abort
OVERDUE_MARGIN = 1.0       # seconds past cancel_grace before the manager acts: the process's own
                           # watch hands its tasks back and exits at cancel_grace when it can run
OVERDUE_WHY = {"canceled": "batch canceled", "task": "task canceled", "requeue": "paused with requeue",
               "timeout": "past its time limit"}
QUICK_DEATH = 5.0          # seconds: a child dying sooner counts towards backoff
QUICK_DEATHS_FREE = 5     # restarts without delay before the backoff starts
RESTART_BACKOFF = 0.25
RESTART_BACKOFF_MAX = 10.0
SWITCH_INTERVAL = float(os.environ.get("CORETASK_SWITCH_INTERVAL", "0.0005"))


@dataclass
class Child:
    worker_id: str
    process: Any  # multiprocessing.Process
    started: float
    recovered: bool = False
    failures: int = 0          # consecutive deaths soon after start
    restart_at: float = 0.0
    ended_by_manager: bool = False   # killed for a task that ignored its abort (not a crash)


def child_main(load: Callable[[], Configured], worker_id: str, log_level: int, isolation: bool = False,
               log_format: str = "text") -> None:
    """Entry point of a worker process (spawned, so it imports the app afresh: ``load`` is a
    picklable callable that builds the processor, coretask.appload.app_loader). ``isolation``:
    the isolation worker, which runs the tasks of crashed processes one at a time, then exits.
    ``log_format``: "text" or "json" (coretask/logs.py), as the manager was started with."""
    configure_logs(log_level, log_format)
    _die_with_parent()
    # Pool threads mostly wait on I/O; a short switch interval keeps a thread whose reply has
    # arrived from waiting up to 5 ms for the GIL behind a busy one (the "convoy" effect).
    sys.setswitchinterval(SWITCH_INTERVAL)
    mp_parent = multiprocessing.parent_process()   # the manager's pid even if it is already gone
    parent = mp_parent.pid if mp_parent is not None and mp_parent.pid else os.getppid()
    if os.getppid() != parent:
        # it died before PR_SET_PDEATHSIG was armed: no signal will come, and nobody renews leases
        log.error("worker %s: manager %d was gone before this worker started; exiting", worker_id, parent)
        return
    processor = load()
    stop = threading.Event()
    worker = WorkerProcess(processor, worker_id=worker_id, on_exit_request=lambda: os._exit(FORCED_EXIT),
                           on_crash=lambda: os._exit(MEMORY_ERROR), recycle=not isolation, isolation=isolation)

    first_signal = [0.0]

    def on_signal(signum: int, _frame: Any) -> None:
        # A signal to the whole process group (Ctrl-C, kill -TERM -pgid) reaches this process
        # directly and again through the manager: signals within SIGNAL_DEBOUNCE of the first
        # are the same request. A later one forces the exit, from a thread: the handler runs in
        # the fetch loop's thread, which may hold the locks force_exit needs.
        now = time.monotonic()
        if not stop.is_set():
            first_signal[0] = now
            stop.set()
        elif now - first_signal[0] > SIGNAL_DEBOUNCE:
            log.warning("worker %s: second signal, handing tasks back and exiting now", worker_id)
            threading.Thread(target=worker.force_exit, args=("second stop signal",), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_parent() -> None:
        while not stop.wait(0.5):
            if os.getppid() != parent:
                log.error("worker %s: manager %d is gone; stopping", worker_id, parent)
                stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    worker.run(stop)
    if worker.recycle_reason is not None:
        sys.exit(RECYCLE)           # every task done and acknowledged: the manager starts a fresh one


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when the manager dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Manager:
    """``load``: a picklable callable that builds the processor (in the manager and again in
    every spawned child), e.g. ``coretask.appload.app_loader("myapp.tasks:processor")``."""

    def __init__(self, load: Callable[[], Configured], *, log_level: int = logging.INFO,
                 log_format: str = "text", on_child_exit: Callable[[int], None] | None = None) -> None:
        self.load = load
        processor = load()
        self.options = processor.options
        TaskGuard(self.options)   # ConfigurationError before any child starts (unsigned pickle)
        self.url = processor.gateway.url
        self.leases = Leases(processor.gateway, self.options)
        self.log_level = log_level
        self.log_format = log_format
        self.on_child_exit = on_child_exit    # told each ended worker process's pid (metrics)
        self._reaped: set[int] = set()
        self.children: list[Child] = []
        self.isolation: Child | None = None     # the isolation worker, while crashed tasks wait
        self.stopping = False   # set by the signal handler: a plain flag, never a lock
        self.signals = 0
        self.throttle = LogThrottle(log)   # while Redis is away, every check of every child fails
        self._ctx = multiprocessing.get_context("spawn")

    def _spawn(self, isolation: bool = False) -> Child:
        wid = new_worker_id().rsplit(":", 1)[0] + ":" + os.urandom(3).hex()
        p = self._ctx.Process(target=child_main, args=(self.load, wid, self.log_level, isolation, self.log_format),
                              name=f"coretask-{'isolation' if isolation else 'worker'}-{wid}", daemon=False)
        p.start()
        log.info("manager: started %s process %d (%s)", "isolation" if isolation else "worker", p.pid, wid)
        return Child(wid, p, time.monotonic())

    def _reap(self, child: Child) -> None:
        """Tell ``on_child_exit`` (once per process) that a worker process has ended."""
        pid = child.process.pid
        if self.on_child_exit is None or pid is None or pid in self._reaped or child.process.is_alive():
            return
        self._reaped.add(pid)
        try:
            self.on_child_exit(pid)
        except Exception:
            log.exception("manager: on_child_exit(%d) failed", pid)

    def _check_start(self) -> None:
        """Before any child starts: credentials the server refuses, or an Options.shards other
        than the deployment's, end the manager with the reason (ConfigurationError: the command
        exits 2), as no retry mends them; a server that
        is not up yet is waited for by the workers. Then a queue served here that never held
        work, named like one that has (``--queues defualt``): the workers would wait on it
        forever, so say it at start."""
        try:
            self.leases.gateway.check_shard_count()     # ConfigurationError: exit 2, with the count
            seen = self.leases.gateway.queue_names()
        except StoreUnavailable as exc:
            if exc.reason == "auth":
                raise ConfigurationError(str(exc)) from None
            log.warning("manager %d: %s; the workers wait for it", os.getpid(), exc)
            return
        except Exception:       # nothing to compare: the workers meet it and say so
            return
        for queue in self.options.queues:
            close = [q for q in difflib.get_close_matches(queue, seen, n=1) if q not in self.options.queues]
            if queue not in seen and close:
                log.warning("manager %d: queue %r has never held work, and queue %r has but no worker of this "
                            "manager serves it: is %r a misspelling in --queues or Options.queues?", os.getpid(),
                            queue, close[0], queue)

    def _all(self) -> list[Child]:
        return self.children + ([self.isolation] if self.isolation is not None else [])

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        n = self.options.processes
        log.info("manager %d: %d processes x %d threads, queues %s, redis %s%s", os.getpid(), n,
                 self.options.max_workers, ",".join(self.options.queues), self.url,
                 f", {self.options.shards} shards" if self.options.shards > 1 else "")
        self._check_start()
        self.children = [self._spawn() for _ in range(n)]
        self._isolate_if_waiting()          # crashed tasks a previous manager left isolated
        renew_every = self.leases.timings.renew_every
        next_renew = next_overdue = 0.0
        while not self.stopping:
            if time.monotonic() >= next_overdue:
                self._end_overdue()
                next_overdue = time.monotonic() + OVERDUE_POLL
            for i, child in enumerate(self.children):
                if not child.process.is_alive() and not self.stopping:
                    self._reap(child)
                    if not child.recovered:
                        # a recycled child left nothing leased; should it have (ghost leases, or
                        # a task that called os._exit(4)), its tasks count as after a crash
                        recycled = child.process.exitcode == RECYCLE
                        if recycled:
                            log.info("manager: worker process %d recycled; starting a new one", child.process.pid)
                        self._crashed(child)
                        child.recovered = True
                        # a child that dies right after starting (a broken app, say) is restarted
                        # with capped exponential backoff instead of in a tight loop
                        quick = not recycled and time.monotonic() - child.started < QUICK_DEATH
                        quick = quick and not child.ended_by_manager
                        child.failures = child.failures + 1 if quick else 0
                        backoff = child.failures - QUICK_DEATHS_FREE
                        child.restart_at = time.monotonic() + (
                            min(RESTART_BACKOFF * 2 ** backoff, RESTART_BACKOFF_MAX) if backoff >= 0 else 0)
                        if backoff >= 0:
                            log.warning("manager: %d worker processes in a row died within %gs of starting; "
                                        "restart backoff %.2fs", child.failures, QUICK_DEATH,
                                        child.restart_at - time.monotonic())
                    if time.monotonic() >= child.restart_at:
                        new = self._spawn()
                        new.failures = child.failures
                        self.children[i] = new
            self._watch_isolation()
            self.throttle.flush()
            if time.monotonic() >= next_renew:
                self._renew()
                next_renew = time.monotonic() + renew_every
            time.sleep(POLL)
        return self._shutdown()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("manager: signal %d, stopping workers (up to %gs)", signum,
                     self.options.shutdown_timeout.total_seconds())
            self.stopping = True
        else:
            log.info("manager: signal %d again: already stopping; the workers are told again", signum)
        for c in self._all():
            if c.process.is_alive() and c.process.pid:
                try:
                    os.kill(c.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _crashed(self, child: Child) -> None:
        """A child died on its own: its tasks go to isolation uncharged, or, when it ran one, that
        task is the culprit (gateway.crashed); then isolated tasks get their worker."""
        code = child.process.exitcode
        reason = f"worker process {child.process.pid} died (exit code {code}"
        reason += ", MemoryError in a task)" if code == MEMORY_ERROR else ")"
        if code == FORCED_EXIT:
            log.warning("manager: %s: it ended itself, as a task ignored its abort past cancel_grace; recovering "
                        "its tasks and starting a new one", reason)
        elif code != RECYCLE:
            log.error("manager: %s; recovering its tasks and starting a new one", reason)
        try:
            res, culprit = self.leases.crashed(child.worker_id, reason + " while running the task",
                                               self.options.max_crashes)
        except Exception as exc:
            log.error("manager: could not recover tasks of %s (%s); their leases will expire", child.worker_id, exc)
            return
        uncharged = res.requeued
        if culprit is not None:
            log.error("manager: task %s was the only one running: %s", culprit,
                      "dead-lettered as WorkerLost" if res.buried else "charged a crash, to run again alone")
            uncharged -= 0 if res.buried else 1         # the culprit is isolated too, but charged
        if uncharged:
            log.warning("manager: %d tasks of %s go back uncharged and run one at a time, each alone in "
                        "an isolation process, to find which one crashes it", uncharged, child.worker_id)
        if res.canceled:
            log.info("manager: %d tasks of %s belonged to canceled batches", res.canceled, child.worker_id)
        self._isolate_if_waiting()

    def _isolate_if_waiting(self) -> None:
        """Start the isolation worker when isolated tasks wait and none runs."""
        if self.stopping or (self.isolation is not None and self.isolation.process.is_alive()):
            return
        try:
            waiting = self.leases.gateway.isolated_count(self.options.queues)
        except Exception as exc:
            if not OUTAGE.told("manager", exc):
                log.warning("manager: could not read the isolation lists: %s", exc)
            return
        if waiting:
            self.isolation = self._spawn(isolation=True)

    def _watch_isolation(self) -> None:
        iso = self.isolation
        if iso is None or iso.process.is_alive() or self.stopping:
            return
        self.isolation = None
        self._reap(iso)
        if not iso.recovered:
            iso.recovered = True
            if iso.process.exitcode != 0:     # it crashed, running one task alone: the culprit
                self._crashed(iso)            # (and starts the next isolation process)
                return
            try:                              # done: nothing left to run alone
                self.leases.gateway.forget_worker(iso.worker_id)
            except Exception as exc:
                log.warning("manager: could not forget isolation worker %s: %s", iso.worker_id, exc)
        self._isolate_if_waiting()

    def _end_overdue(self) -> None:
        """Deadlines no task can block: a task told to stop (its batch or itself canceled, or a
        pause with requeue) that still runs OVERDUE_MARGIN after cancel_grace is stuck where its
        own process cannot reach it (C code holding the GIL, which also starves that process's own watch).
        The manager, which runs no task, ends that process and hands its other tasks back
        without consuming a retry; the stuck task counts as canceled (or goes back, for a requeue)."""
        grace_ms = int((self.options.cancel_grace.total_seconds() + OVERDUE_MARGIN) * 1000)
        for child in self._all():
            if child.recovered or not child.process.is_alive():
                continue
            try:
                overdue = self.leases.gateway.overdue(child.worker_id, grace_ms)
            except Exception as exc:
                if not OUTAGE.told("manager", exc):
                    self.throttle.log("overdue", logging.WARNING, "overdue checks failed",
                                      "manager: overdue check for %s failed: %s", child.worker_id, exc)
                continue
            if not overdue:
                continue
            first = overdue[0]
            log.error("manager: task %s ignored its abort (%s) for %.1fs%s; ending worker process %d and "
                      "handing its other tasks back", first.task_id, OVERDUE_WHY.get(first.why, first.why),
                      first.ms / 1000,
                      f" (and {len(overdue) - 1} more)" if len(overdue) > 1 else "", child.process.pid)
            self._kill(child)
            child.ended_by_manager = True
            self._reap(child)
            self._fail_timed_out(child, [o for o in overdue if o.why == "timeout"])
            self._recover(child)
            child.recovered = True

    def _kill(self, child: Child) -> None:
        """Kill a worker process and the processes its tasks started (worker/descendants.py)."""
        procs = descendants_of(child.process.pid)      # listed while they still descend from it
        child.process.kill()
        child.process.join(5)
        end_processes(procs, f"manager, for worker {child.worker_id}")

    def _fail_timed_out(self, child: Child, tasks: list[Overdue]) -> None:
        """Tasks past their time limit whose process had to be ended: each attempt counts as
        failed with TaskTimeout (retried at once, or dead-lettered), before the process's other
        tasks go back uncharged."""
        if not tasks:
            return
        message = (f"the task ran past its time limit and ignored the abort for cancel_grace; worker process "
                   f"{child.process.pid} was ended by the manager")
        failures = [Failure(o.task_id, o.token, "TaskTimeout", message, "", o.ran_ms) for o in tasks]
        try:
            self.leases.gateway.send_outcomes(child.worker_id, Outcomes(failures=failures))
        except Exception as exc:
            log.error("manager: could not record the time-outs of %s (%s); the tasks go back uncharged",
                      child.worker_id, exc)

    def _renew(self) -> None:
        for c in self._all():
            if c.process.is_alive():
                try:
                    self.leases.renew(c.worker_id)
                except Exception as exc:
                    if not OUTAGE.told("manager", exc):
                        self.throttle.log("renew", logging.WARNING, "lease renewals failed",
                                          "manager: lease renewal for %s failed: %s", c.worker_id, exc)
                else:
                    OUTAGE.reachable("manager")

    def _recover(self, child: Child) -> None:
        """Hand a child's tasks back without consuming a retry: the manager ended it (a task
        ignored its abort, or the child outlived the shutdown)."""
        reason = f"worker process {child.process.pid} was ended by the manager while running the task"
        try:
            res = self.leases.recover_worker(child.worker_id, reason, consume_retry=False)
            if res:
                log.warning("manager: tasks of %s: requeued=%d buried=%d canceled=%d", child.worker_id,
                            res.requeued, res.buried, res.canceled)
        except Exception as exc:
            log.error("manager: could not recover tasks of %s (%s); their leases will expire", child.worker_id, exc)

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.options.shutdown_timeout.total_seconds() + 5
        for c in self._all():
            c.process.join(max(deadline - time.monotonic(), 0.1))
        for c in self._all():
            if c.process.is_alive():
                log.error("manager: worker %s did not stop in time; killing it", c.worker_id)
                self._kill(c)
            self._recover(c)
            self._reap(c)
        log.info("manager: stopped")
        return 0
