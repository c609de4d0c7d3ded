"""Manager: starts N worker processes, keeps their leases alive, replaces the ones that die.

The manager renews the leases of every child it sees alive (one script call per child), so a
task stuck in C code that holds its process's GIL keeps its lease, while the tasks of a child
that died are taken back at once, each consuming one retry (the task may be what killed it).
Shutdown is two-phase: SIGTERM/SIGINT asks every child to stop fetching and finish within
shutdown_timeout, handing the rest back; a second signal forces it.
"""
from __future__ import annotations

import ctypes
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

from ..signing import TaskGuard
from .leases import Leases
from .process import Configured, WorkerProcess, new_worker_id

log = logging.getLogger(__name__)

POLL = 0.1
FORCED_EXIT = 3   # exit code of a child that ended itself for a stuck task
RECYCLE = 4       # exit code of a child that reached max_tasks/max_memory_per_process (not a crash)
SIGNAL_DEBOUNCE = 2.0
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


def child_main(load: Callable[[], Configured], worker_id: str, log_level: int) -> None:
    """Entry point of a worker process (spawned, so it imports the app afresh: ``load`` is a
    picklable callable that builds the processor, coretask.appload.app_loader)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
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
                           recycle=True)

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

    def __init__(self, load: Callable[[], Configured], *, log_level: int = logging.INFO) -> None:
        self.load = load
        processor = load()
        self.options = processor.options
        TaskGuard(self.options)   # ConfigurationError before any child starts (unsigned pickle)
        self.url = processor.gateway.url
        self.leases = Leases(processor.gateway, self.options)
        self.log_level = log_level
        self.children: list[Child] = []
        self.stopping = False   # set by the signal handler: a plain flag, never a lock
        self.signals = 0
        self._ctx = multiprocessing.get_context("spawn")

    def _spawn(self) -> Child:
        wid = new_worker_id().rsplit(":", 1)[0] + ":" + os.urandom(3).hex()
        p = self._ctx.Process(target=child_main, args=(self.load, wid, self.log_level),
                              name=f"coretask-worker-{wid}", daemon=False)
        p.start()
        log.info("manager: started worker process %d (%s)", p.pid, wid)
        return Child(wid, p, time.monotonic())

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        n = self.options.processes
        log.info("manager %d: %d processes x %d threads, queues %s, redis %s", os.getpid(), n,
                 self.options.max_workers, ",".join(self.options.queues), self.url)
        self.children = [self._spawn() for _ in range(n)]
        renew_every = self.leases.timings.renew_every
        next_renew = 0.0
        while not self.stopping:
            for i, child in enumerate(self.children):
                if not child.process.is_alive() and not self.stopping:
                    if not child.recovered:
                        # a recycled child left nothing leased; should it have (ghost leases, or
                        # a task that called os._exit(4)), its tasks count as after a crash
                        recycled = child.process.exitcode == RECYCLE
                        if recycled:
                            log.info("manager: worker process %d recycled; starting a new one", child.process.pid)
                        self._recover(child, consume_retry=True)
                        child.recovered = True
                        # a child that dies right after starting (a broken app, say) is restarted
                        # with capped exponential backoff instead of in a tight loop
                        quick = not recycled and time.monotonic() - child.started < QUICK_DEATH
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
        for c in self.children:
            if c.process.is_alive() and c.process.pid:
                try:
                    os.kill(c.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _renew(self) -> None:
        for c in self.children:
            if c.process.is_alive():
                try:
                    self.leases.renew(c.worker_id)
                except Exception as exc:
                    log.warning("manager: lease renewal for %s failed: %s", c.worker_id, exc)

    def _recover(self, child: Child, consume_retry: bool) -> None:
        code = child.process.exitcode
        reason = f"worker process {child.process.pid} died (exit code {code}) while running the task"
        if consume_retry and code not in (FORCED_EXIT, RECYCLE):
            log.error("manager: %s; recovering its tasks and starting a new one", reason.replace(" while running the task", ""))
        try:
            res = self.leases.recover_worker(child.worker_id, reason, consume_retry)
            if res:
                log.warning("manager: tasks of %s: requeued=%d buried=%d canceled=%d", child.worker_id,
                            res.requeued, res.buried, res.canceled)
        except Exception as exc:
            log.error("manager: could not recover tasks of %s (%s); their leases will expire", child.worker_id, exc)

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.options.shutdown_timeout.total_seconds() + 5
        for c in self.children:
            c.process.join(max(deadline - time.monotonic(), 0.1))
        for c in self.children:
            if c.process.is_alive():
                log.error("manager: worker %s did not stop in time; killing it", c.worker_id)
                c.process.kill()
                c.process.join(5)
            self._recover(c, consume_retry=False)
        log.info("manager: stopped")
        return 0
