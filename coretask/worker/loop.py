"""Loop: the fetch loop of one worker process, and its graceful shutdown.

One loop thread talks to Redis: each turn it sends, in one round trip, the outcomes that runner
threads recorded in the ledger since the last turn and a fetch sized to the free threads.
Runner threads never touch Redis on the happy path, so the Redis cost per task stays a fraction
of a round trip. The loop sleeps until the earliest of: a pub/sub event, a finished task, the
next delayed task's due time, the next maintenance timer, or base_frequency.

A process with every thread free whose fetch found nothing is registered as idle by that fetch,
and one of its task threads blocks on the process's inbox (HANDOFF_WAIT at most): an enqueue
then leases the new task to it and pushes the lease there (enqueue.lua), so the task reaches an
idle worker in the enqueue's own round trip and runs in the thread that received it. Anything
else that wakes the loop meanwhile ends the wait through the ledger's Wake (gateway.idle_wake);
docs/decisions.md, "Hand-off".

While recent tasks average under SHORT_TASK_MS, the loop waits (at most HOLD_MAX) until half of
the threads are free before its next round trip, so that each script call carries several
acknowledgements and a fetch for several tasks instead of one or two (the per-call cost of the
scripts dominates for tiny tasks). It never leases more tasks than it has free threads: a task leased ahead would
start after a pause() that returned meanwhile (docs/decisions.md).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..context import TaskContext
from ..errors import ConfigurationError, StoreUnavailable
from ..gateway import Failure, FetchReply, Gateway, Unreadable
from ..options import Options
from ..throttle import OUTAGE
from .aborts import Aborts
from .leases import Leases
from .ledger import Ledger, Task
from .maintenance import Maintenance
from .runner import task_fields

__all__ = ["Loop", "Recycling"]

log = logging.getLogger(__name__)

COALESCE = 0.0005  # seconds a busy loop waits for more finished tasks before its round trip
HOLD_MAX = 0.05    # seconds the loop holds its round trip for short tasks to finish: five times
#                    what "short" means; a thread left free beside long tasks waits no longer
ABORT_SETTLE = 0.5  # seconds shutdown waits for aborted tasks to report before handing them back
SHUTDOWN_POLL = 0.05
SHUTDOWN_NAMED = 20    # tasks named in the shutdown's summary line (each also logs its own line)
HANDOFF_WAIT = 2.0   # seconds an idle registration lasts: a host that dies unseen takes no task after it
HANDOFF_SLACK = 0.005  # the blocking pop outlasts the registration (server clock at both ends) by this much
MIB = 1024 * 1024


class Recycling:
    """Worker recycling (manager children): max_tasks_per_process and max_memory_per_process.
    Once a limit is reached the loop stops fetching and ends when everything is acknowledged."""

    def __init__(self, options: Options, ledger: Ledger, worker_id: str) -> None:
        self.max_tasks = options.max_tasks_per_process
        self.max_mib = options.max_memory_per_process
        self.ledger = ledger
        self.worker_id = worker_id
        self.reason: str | None = None
        self._rss_done = 0              # tasks_done at the last RSS reading (~20 us each)
        self._process: Any = None

    def limit(self, free: int) -> int:
        """How many tasks this turn may fetch; switches to quiet once a limit is reached."""
        ledger = self.ledger
        if self.reason is None:
            if self.max_tasks is not None and ledger.tasks_taken >= self.max_tasks:
                self._start(f"max_tasks_per_process={self.max_tasks} reached")
            elif self.max_mib is not None and ledger.tasks_done != self._rss_done:
                self._rss_done = ledger.tasks_done          # read after every turn in which a task ended
                if self._process is None:
                    import psutil
                    self._process = psutil.Process()
                rss = self._process.memory_info().rss
                if rss > self.max_mib * MIB:
                    self._start(f"its RSS is {rss / MIB:.0f} MiB (max_memory_per_process={self.max_mib} MiB)")
        if self.reason is not None:
            return 0
        if self.max_tasks is not None:
            free = min(free, self.max_tasks - ledger.tasks_taken)
        return free

    def _start(self, reason: str) -> None:
        done, running = self.ledger.tasks_done, len(self.ledger.running)
        log.info("worker %s: recycling after %d task%s: %s; finishing %d running task%s, then exiting",
                 self.worker_id, done, "" if done == 1 else "s", reason, running, "" if running == 1 else "s")
        self.reason = reason
        self.ledger.quiet = True


class Loop:
    def __init__(self, worker_id: str, ledger: Ledger, gateway: Gateway, options: Options, leases: Leases,
                 maintenance: Maintenance, aborts: Aborts, recycling: Recycling | None, *,
                 isolation: bool = False) -> None:
        self.isolation = isolation
        self.worker_id = worker_id
        self.ledger = ledger
        self.gateway = gateway
        self.options = options
        self.leases = leases
        self.maintenance = maintenance
        self.aborts = aborts
        self.recycling = recycling
        self.queues = tuple(options.queues)
        self.default_limit = options.tenant_concurrency or 0
        self.base = options.base_frequency.total_seconds()
        self.wait_cap = min(HANDOFF_WAIT, gateway.handoff_wait_s) if gateway.handoffs else 0.0
        self.handoffs = gateway.handoffs and not isolation and self.wait_cap >= 0.1
        self.leave_pending = False      # a registration may be left (a call failed): end it first

    def run(self, stop: threading.Event) -> None:
        """Turn until ``stop`` is set (or recycling has drained this process)."""
        ledger, maintenance = self.ledger, self.maintenance
        threads = ledger.threads
        lease_ms = self.leases.timings.lease_ms
        hold_timed_out = False
        while not stop.is_set():
            ledger.wake.clear()
            free = ledger.free()
            if self.recycling is not None:
                free = self.recycling.limit(free)
            if not hold_timed_out and not ledger.quiet and free < threads // 2 and ledger.short():
                # most threads run short tasks: let more finish, so that the next round trip
                # carries their acknowledgements together and a fetch for several; briefly (the
                # average is of finished tasks: the ones running may be long, and a free thread
                # and the acknowledgements must not wait for them)
                hold_timed_out = not ledger.wake.wait(min(maintenance.tick(), self.base, HOLD_MAX))
                continue
            hold_timed_out = False
            if self.leave_pending and not self._leave(stop):
                continue
            idle_ms, tick_at = 0, 0.0
            if self.handoffs and free == threads and not ledger.running and (
                    self.recycling is None or self.recycling.reason is None):
                # maintenance runs now, not while registered, and while the outcomes are still
                # in the ledger (its check for leases never received counts them as known)
                tick = maintenance.tick()
                idle_ms, tick_at = int(min(tick, self.base, self.wait_cap) * 1000), time.monotonic() + tick
            outcomes = ledger.take_outcomes()
            try:
                reply = self.gateway.exchange(self.worker_id, outcomes, free, lease_ms, self.default_limit,
                                              self.queues, isolated=self.isolation, idle_ms=idle_ms)
            except Exception as exc:
                self.leave_pending = self.leave_pending or idle_ms > 0
                ledger.restore(outcomes)
                self._failed(exc, stop)
                continue
            maintenance.connected()
            got = len(self._admit(reply))
            if self.recycling is not None and self.recycling.reason is not None and ledger.drained():
                return                            # recycling: every task done and acknowledged
            if self.isolation and not got and not reply.paused and ledger.drained():
                return                            # isolation: nothing left to run alone (none held back)
            registered_ms = self.gateway.idle_registered(reply, idle_ms) if idle_ms else 0
            if registered_ms > 0:
                self._await_handoff(registered_ms / 1000 + HANDOFF_SLACK, tick_at)
                continue
            timeout = maintenance.tick()
            if got and got == free and threads > len(ledger.running):
                continue                          # there may be more, and threads freed up meanwhile
            if reply.next_due_ms != -1:
                timeout = min(timeout, max((reply.next_due_ms - reply.now_ms) / 1000, 0.001))
            if ledger.wake.wait(min(timeout, self.base)) and ledger.busy():
                # a task finished while most threads still work: give the others a moment to
                # finish too, so one round trip carries several acknowledgements and a fetch
                # for several threads
                time.sleep(COALESCE)

    def _await_handoff(self, timeout: float, tick_at: float) -> None:
        """Registered as idle: a task thread waits for the hand-off, so that the task runs in
        the thread that received it (a switch to another thread costs ~0.1 ms on a quiet
        machine, as much as the rest of the path to the task's start). This thread sleeps
        until the wake-up that follows (the wait ended without a task, an event, or the
        handed-off task finished) or the next maintenance timer (``tick_at``), and never runs
        ahead of the wait's end: nothing may run here while a lease may be in the inbox, not
        yet received (maintenance would hand it back)."""
        done = threading.Event()
        self.ledger.inbox.put(lambda: self._receive(timeout, done))
        self.ledger.wake.wait(max(tick_at - time.monotonic(), 0.0) + HANDOFF_SLACK)
        done.wait()

    def _receive(self, timeout: float, done: threading.Event) -> Task | None:
        """In a task thread: wait for a hand-off; the task it brings, to run in this thread.
        Without one, wake the loop to fetch."""
        ledger = self.ledger
        ledger.wake.interrupt = self._interrupt
        try:
            if ledger.wake.is_set():
                self._interrupt()           # an event came during the fetch
            reply = self.gateway.await_handoff(self.worker_id, timeout)
        except ConfigurationError as exc:    # the ACL user may not block: fetch on wake-ups from now on
            self.handoffs = False
            self.leave_pending = True
            log.warning("worker %s: %s", self.worker_id, exc)
            reply = None
        except Exception as exc:
            self.leave_pending = True       # its reply may be lost: the inbox is emptied first
            log.warning("worker %s: waiting for work failed (%s: %s)", self.worker_id, type(exc).__name__, exc)
            reply = None
        finally:
            ledger.wake.interrupt = None
        tasks: list[Task] = []
        try:
            if reply is not None:
                tasks = self._admit(reply, hold_first=True)
        finally:
            done.set()
            if not tasks:
                ledger.wake.set()
        return tasks[0] if tasks else None

    def _interrupt(self) -> None:
        """Wake the blocked wait (called by whichever thread sets the ledger's wake)."""
        try:
            self.gateway.idle_wake(self.worker_id)
        except Exception as exc:    # the wait still ends at its timeout
            log.warning("worker %s: could not end the wait for work early: %s", self.worker_id, exc)

    def _leave(self, stop: threading.Event | None) -> bool:
        """End a registration that may be left and admit what its inbox held; False (after a
        backoff) when Redis could not be reached."""
        try:
            replies = self.gateway.idle_leave(self.worker_id)
        except Exception as exc:
            self._failed(exc, stop)
            return False
        self.leave_pending = False
        for reply in replies:
            self._admit(reply)
        return True

    def _failed(self, exc: Exception, stop: threading.Event | None) -> None:
        """A round trip failed: say so, and back off before the next one (none at shutdown). A
        server that cannot be reached is a warning (it comes back); anything else (refused
        credentials, a script error, a command the server refuses) is an error: it repeats until
        someone acts, and no task is fetched meanwhile."""
        if OUTAGE.told(f"worker {self.worker_id}", exc):      # said once for the process, then counted
            log.debug("worker %s: Redis call failed; retrying in %.1fs", self.worker_id, self.maintenance.delay)
            if stop is not None:
                self.maintenance.backoff(stop)
            return
        transient = isinstance(exc, StoreUnavailable) and exc.reason != "auth"
        log.log(logging.WARNING if transient else logging.ERROR,
                "worker %s: Redis call failed (%s: %s); retrying in %.1fs%s", self.worker_id, type(exc).__name__,
                exc, self.maintenance.delay, "" if transient else "; this worker fetches nothing until it is mended")
        if stop is not None:
            self.maintenance.backoff(stop)

    def _admit(self, reply: FetchReply, hold_first: bool = False) -> list[Task]:
        """Admit the leased tasks into the ledger. A task that cannot be admitted (its reply entry
        did not read, see records.parse_fetch_reply, or its context could not be built) is buried
        with the reason on the next round trip, never left leased to this live process nor
        handed back: the next fetch would return the same entry (docs/decisions.md)."""
        gateway = self.gateway
        # ctx.retries_left: the retries left should this attempt fail (what on_task_failed_delay
        # is then asked with; 0 on the last attempt); the stored count includes this attempt
        tasks = []
        for leased in reply.tasks:
            try:
                tasks.append(Task(leased.id, leased, TaskContext(
                    task_id=leased.id, queue=leased.queue, tenant=leased.tenant, target=leased.target,
                    attempt=leased.attempt, retries_left=max(leased.retries_left - 1, 0),
                    enqueued_ms=leased.enqueued_ms, batch_id=leased.batch_id, batch_fields=leased.batch_fields,
                    gateway=gateway, due_ms=max(leased.enqueued_ms, leased.due_ms) if leased.attempt == 1 else 0)))
            except Exception as exc:
                self._unreadable(Unreadable(leased.id, leased.token, leased.queue, leased.tenant,
                                            f"{type(exc).__name__}: {exc}"))
        for bad in reply.unreadable:
            self._unreadable(bad)
        if tasks:
            self.ledger.admit(tasks, hold=tasks[0] if hold_first else None)
            heard = self.ledger.cancels_for(tasks)
            if heard:       # a cancel_task message named them before they were admitted (control.py)
                self._abort_marked(heard)
        return tasks

    def _abort_marked(self, tasks: list[Task]) -> None:
        try:
            marked = self.gateway.cancel_marks([(t.id, t.token) for t in tasks])
        except Exception as exc:   # the manager's overdue check still ends a marked task
            log.warning("worker %s: could not read cancel marks (%s: %s)", self.worker_id, type(exc).__name__, exc)
            return
        mine = [t for t in tasks if t.id in marked]
        if mine:
            self.aborts.abort(mine, "canceled")
            log.info("worker %s: %d tasks canceled as they were fetched, aborting", self.worker_id, len(mine))

    def _unreadable(self, bad: Unreadable) -> None:
        if bad.id is None or bad.token is None:
            # no id to answer for: the lease is handed back by maintenance (a task leased to this
            # process that it does not know), and fetch.lua's checks take a damaged record out
            log.error("worker %s: a task in the fetch reply cannot be read (%s); its lease will be handed back",
                      self.worker_id, bad.reason)
            return
        message = f"the fetch reply for task {bad.id} cannot be read: {bad.reason}"
        log.error("worker %s: %s; dead-lettering it", self.worker_id, message)
        self.ledger.unreadable(Failure(bad.id, bad.token, "CorruptTask", message, "", 0, bury=True,
                                       queue=bad.queue, tenant=bad.tenant))

    # ------------------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Stop fetching; let running tasks finish within shutdown_timeout; hand the rest back
        without consuming a retry; flush every outcome."""
        ledger = self.ledger
        ledger.quiet = True
        if self.handoffs:
            self._leave(None)           # a hand-off that came last is handed back with the unstarted
        ledger.release_unstarted()
        self.flush()
        deadline = time.monotonic() + self.options.shutdown_timeout.total_seconds()
        next_renew = 0.0
        while ledger.running and time.monotonic() < deadline:
            if time.monotonic() >= next_renew:
                # a stopping (or dead) manager no longer renews, nor does the stopped loop: keep
                # the leases of the tasks finishing here, or another worker would run them too
                try:
                    self.leases.renew(self.worker_id)
                except Exception as exc:
                    log.warning("worker %s: lease renewal while stopping failed: %s", self.worker_id, exc)
                next_renew = time.monotonic() + self.leases.timings.renew_every
            self.flush()
            # time limits still hold while draining (the loop that checks them no longer turns),
            # and a task that ignores its abort past cancel_grace still ends its process
            self.aborts.check(time.monotonic())
            ledger.wake.wait(SHUTDOWN_POLL)
            ledger.wake.clear()
        if ledger.running:
            running = ledger.running_of(None)
            named = ", ".join(f"{t.id} ({t.target})" for t in running[:SHUTDOWN_NAMED])
            more = f" and {len(running) - SHUTDOWN_NAMED} more" if len(running) > SHUTDOWN_NAMED else ""
            log.warning("worker %s: %d tasks still running at the shutdown deadline (shutdown_timeout %gs); "
                        "handing them back: %s%s", self.worker_id, len(running),
                        self.options.shutdown_timeout.total_seconds(), named, more)
            self.aborts.abort(ledger.running_of(None), "shutdown")
            # each runner reports its task: handed back if the abort landed in the body, but
            # acknowledged if the body had returned already (or swallowed the abort), since a
            # task that finished must not run again
            settle = time.monotonic() + ABORT_SETTLE
            while ledger.running and time.monotonic() < settle:
                ledger.wake.wait(0.01)
                ledger.wake.clear()
            for task in ledger.release_running():       # blocked where an abort cannot reach (C code)
                # the runner of such a task never reports it: said here, one line per task
                log.warning("task %s %s handed back at shutdown: it did not stop within %gs of its abort (blocked "
                            "in C code, e.g. a sleep or a socket read); it runs again from the start elsewhere",
                            task.id, task.target, ABORT_SETTLE, extra=task_fields(task, "task_handed_back"))
        self.flush()

    def flush(self) -> None:
        """Send pending outcomes now; keep them for the next try if Redis cannot be reached."""
        outcomes = self.ledger.take_outcomes()
        if outcomes:
            try:
                self.gateway.send_outcomes(self.worker_id, outcomes)
            except Exception:
                self.ledger.restore(outcomes)
