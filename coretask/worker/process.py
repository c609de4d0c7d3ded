"""WorkerProcess: the fetch loop of one process, its thread pool and its maintenance timers.

One loop thread talks to Redis: each turn it sends, in one pipeline, the acknowledgements that
pool threads queued since the last turn and a fetch sized to the free threads. Pool threads
never touch Redis on the happy path, so the Redis cost per task stays a fraction of a round
trip. The loop sleeps until the earliest of: a pub/sub event, a finished task, the next delayed
task's due time, the next maintenance timer, or base_frequency.

While recent tasks average under SHORT_TASK_MS, the loop waits until half of the threads are
free before its next round trip, so that each script call carries several acknowledgements and
a fetch for several tasks instead of one or two (the per-call cost of the scripts dominates for
tiny tasks). It never leases more tasks than it has free threads: a task leased ahead would
start after a pause() that returned meanwhile (docs/decisions.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from ..context import TaskContext
from ..encoding import serializer_for
from ..signing import TaskGuard
from .control import Control
from .maintenance import Maintenance
from .runner import Runner, format_error

if TYPE_CHECKING:
    from ..client import TaskProcessor

log = logging.getLogger(__name__)

FIELDS = 12  # values per task in the fetch reply
COALESCE = 0.0005  # seconds a busy loop waits for more finished tasks before its round trip
SHORT_TASK_MS = 10.0  # tasks averaging less than this are acknowledged and fetched in groups
SUBSCRIBE_WAIT = 5.0  # seconds the loop waits for the pub/sub subscription before its first fetch
ABORT_SETTLE = 0.5  # seconds shutdown waits for aborted tasks to report before handing them back
MIB = 1024 * 1024


@dataclasses.dataclass(eq=False)
class Fetched:
    id: str
    token: str
    payload: bytes
    serializer: str
    target: str
    queue: str
    tenant: str
    batch_id: str | None
    retries_left: int
    ctx: TaskContext
    runner: Runner | None = None
    abort_reason: str | None = None   # "canceled" | "requeue" | "shutdown" once aborted
    signature: str = ""               # field sg, and the task hash's tenant field: checked by
    stored_tenant: str | None = None  # coretask.signing.TaskGuard before the task is read


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class WorkerProcess:
    def __init__(self, processor: TaskProcessor, *, worker_id: str | None = None,
                 renew_own_leases: bool = False, on_exit_request: Any = None, recycle: bool = False) -> None:
        self.processor = processor
        self.options = processor.options
        self.store = processor.store
        self.serializer = serializer_for(self.options.serializer)
        self.guard = TaskGuard(self.options)   # refuses an unsigned pickle setup; checks every task
        self.id = worker_id or new_worker_id()
        self.threads = self.options.max_workers
        self.inbox: queue.SimpleQueue[Fetched | None] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.running: dict[str, Fetched] = {}
        self.acks: list[Any] = []           # complete.lua argument groups
        self.fails: list[list[Any]] = []    # fail.lua argument lists
        self.releases: list[Any] = []       # release.lua argument pairs
        self.quiet = False                  # stop fetching (shutdown, recycling)
        self.renew_own_leases = renew_own_leases
        self.on_exit_request = on_exit_request  # called when a stuck task forces the process out
        self.control = Control(self)
        self.maintenance = Maintenance(self)
        self.runners = [Runner(self) for _ in range(self.threads)]
        self.tasks_done = 0
        self.avg_ms = SHORT_TASK_MS         # moving average of task durations; starts as "long"
        self.recycle = recycle              # apply max_tasks/max_memory_per_process (manager children)
        self.recycle_reason: str | None = None   # set once a limit is reached: the process then ends
        self.tasks_taken = 0                # tasks fetched by this process
        self._rss_done = 0                  # tasks_done at the last RSS reading (~20 us each)
        self._psutil: Any = None

    # --------------------------------------------------------------------------- the loop

    def run(self, stop: threading.Event) -> None:
        k = self.store.keys
        threads = [threading.Thread(target=r.loop, name=f"coretask-task-{i}", daemon=True)
                   for i, r in enumerate(self.runners)]
        for t in threads:
            t.start()
        self.control.start()
        # a task fetched before the subscription is up would miss a cancel published meanwhile
        # (the control thread re-checks running tasks' batches on every later resubscription)
        self.control.subscribed.wait(SUBSCRIBE_WAIT)
        log.info("worker %s started: queues=%s threads=%d", self.id, ",".join(self.options.queues), self.threads)
        stop_watch = threading.Thread(target=lambda: (stop.wait(), self.wake.set()), daemon=True)
        stop_watch.start()
        fetch_keys = [k.paused, k.pausedq, k.pausedt, k.delayed, k.leases, k.worker(self.id), k.trun, k.tlim]
        fetch_args_tail = [self.options.queues]
        lease_ms = int(self.options.invisibility.total_seconds() * 1000)
        deflim = self.options.tenant_concurrency or 0
        base = self.options.base_frequency.total_seconds()
        try:
            hold_timed_out = False
            while not stop.is_set():
                self.wake.clear()
                free = 0 if self.quiet else self.threads - len(self.running)
                if self.recycle:
                    free = self._recycle_free(free)
                if not hold_timed_out and not self.quiet and free < self.threads // 2 and self._short():
                    # most threads run short tasks: let more finish, so that the next round trip
                    # carries their acknowledgements together and a fetch for several
                    hold_timed_out = not self.wake.wait(min(self.maintenance.tick(), base))
                    continue
                hold_timed_out = False
                calls = self._drain_acks()
                calls.append(("fetch", fetch_keys, [k.prefix, self.id, free, lease_ms, deflim, *fetch_args_tail[0]]))
                try:
                    results = self.store.run_many(calls)
                except Exception as exc:
                    self._requeue_acks(calls[:-1])
                    log.warning("worker %s: Redis call failed (%s: %s); retrying in %.1fs", self.id,
                                type(exc).__name__, exc, self.maintenance._delay)
                    self.maintenance.backoff(stop)
                    continue
                self.maintenance.connected()
                reply = results[-1]
                got = self._dispatch(reply)
                if self.recycle_reason is not None and self._drained():
                    break                         # recycling: every task done and acknowledged
                timeout = self.maintenance.tick()
                if got and got == free and self.threads > len(self.running):
                    continue                      # there may be more, and threads freed up meanwhile
                if reply[1] != -1:
                    timeout = min(timeout, max((int(reply[1]) - int(reply[2])) / 1000, 0.001))
                if self.wake.wait(min(timeout, base)) and self._busy():
                    # a task finished while most threads still work: give the others a moment to
                    # finish too, so one round trip carries several acknowledgements and a fetch
                    # for several threads
                    time.sleep(COALESCE)
        finally:
            self._shutdown(threads)

    def _recycle_free(self, free: int) -> int:
        """Worker recycling: how many tasks this turn may fetch under max_tasks_per_process, and
        the switch to quiet once a limit is reached (the loop ends when all is acknowledged)."""
        o = self.options
        if self.recycle_reason is None:
            if o.max_tasks_per_process is not None and self.tasks_taken >= o.max_tasks_per_process:
                self._start_recycling(f"it took {self.tasks_taken} tasks "
                                      f"(max_tasks_per_process={o.max_tasks_per_process})")
            elif o.max_memory_per_process is not None and self.tasks_done != self._rss_done:
                self._rss_done = self.tasks_done            # read after every turn in which a task ended
                if self._psutil is None:
                    import psutil
                    self._psutil = psutil.Process()
                rss = self._psutil.memory_info().rss
                if rss > o.max_memory_per_process * MIB:
                    self._start_recycling(f"its RSS is {rss / MIB:.0f} MiB "
                                          f"(max_memory_per_process={o.max_memory_per_process} MiB)")
        if self.recycle_reason is not None:
            return 0
        if o.max_tasks_per_process is not None:
            free = min(free, o.max_tasks_per_process - self.tasks_taken)
        return free

    def _start_recycling(self, reason: str) -> None:
        log.info("worker %s: recycling after %d tasks: %s; finishing %d running tasks, then exiting",
                 self.id, self.tasks_done, reason, len(self.running))
        self.recycle_reason = reason
        self.quiet = True

    def _drained(self) -> bool:
        with self.lock:
            return not (self.running or self.acks or self.fails or self.releases)

    def _short(self) -> bool:
        return self.avg_ms < SHORT_TASK_MS

    def _busy(self) -> bool:
        started = len(self.running) - self.inbox.qsize()
        return started > self.threads * 3 // 4 and not self.quiet

    def _drain_acks(self) -> list[tuple[str, list[str], list[Any]]]:
        k = self.store.keys
        with self.lock:
            acks, fails, releases = self.acks, self.fails, self.releases
            self.acks, self.fails, self.releases = [], [], []
        calls: list[tuple[str, list[str], list[Any]]] = []
        if acks:
            calls.append(("complete", [k.leases, k.worker(self.id)], [k.prefix, self.id, *acks]))
        if releases:
            calls.append(("release", [k.leases], [k.prefix, self.id, *releases]))
        for f in fails:
            calls.append(("fail", [k.task(f[0])], [k.prefix, self.id, *f]))
        return calls

    def _requeue_acks(self, calls: list[tuple[str, list[str], list[Any]]]) -> None:
        """Keep acknowledgements that may not have reached Redis; a repeat is harmless (the
        lease token makes the second one a no-op)."""
        with self.lock:
            for name, _, args in calls:
                if name == "complete":
                    self.acks[:0] = args[2:]
                elif name == "release":
                    self.releases[:0] = args[2:]
                else:
                    self.fails.insert(0, args[2:])

    def _dispatch(self, reply: list[Any]) -> int:
        n = 0
        store = self.store
        batch_fields: dict[str, list[bytes]] = {}     # sent once per batch per reply
        for i in range(3, len(reply), FIELDS):
            (tid, attempt, payload, ser, target, q, tenant, batch, retries, enqueued, binfo, seal) = reply[i:i + FIELDS]
            tid_s = tid.decode()
            batch_s = batch.decode() or None
            if binfo:
                batch_fields[batch_s] = binfo
            ctx = TaskContext(task_id=tid_s, queue=q.decode(), tenant=tenant.decode(), target=target.decode(),
                              attempt=int(attempt), retries_left=int(retries), enqueued_ms=enqueued,
                              batch_id=batch_s, batch_fields=batch_fields.get(batch_s) if batch_s else None, store=store)
            task = Fetched(tid_s, str(attempt), payload, ser.decode(), ctx.target, ctx.queue, ctx.tenant,
                           batch_s, ctx.retries_left, ctx, signature=seal[0].decode(), stored_tenant=seal[1].decode())
            with self.lock:
                self.running[tid_s] = task
            self.inbox.put(task)
            n += 1
        self.tasks_taken += n
        return n

    # ---------------------------------------------------------------- called by pool threads

    def _finished(self, task: Fetched, duration_ms: int) -> None:
        self.running.pop(task.id, None)
        self.tasks_done += 1
        self.avg_ms += (duration_ms - self.avg_ms) * 0.1
        if self.threads - len(self.running) >= self.threads // 2 or self.quiet or not self._short():
            self.wake.set()     # else the loop would only wake to wait again: see run()

    def finish_ok(self, task: Fetched, duration_ms: int) -> None:
        with self.lock:
            self.acks += (task.id, task.token, "ok", duration_ms)
            self._finished(task, duration_ms)

    def finish_aborted(self, task: Fetched, duration_ms: int) -> None:
        with self.lock:
            if task.abort_reason in ("requeue", "shutdown"):
                self.releases += (task.id, task.token)
            else:
                self.acks += (task.id, task.token, "canceled", duration_ms)
            self._finished(task, duration_ms)

    def finish_failed(self, task: Fetched, error: BaseException, duration_ms: int, *, bury: bool,
                      delay_ms: int) -> None:
        etype, emsg, etb = format_error(error)
        with self.lock:
            self.fails.append([task.id, task.token, delay_ms, "1" if self.options.deadletter else "0",
                               etype, emsg, etb, duration_ms, "1" if bury else "0",
                               "1" if self.options.deadletter_schedules else "0"])
            self._finished(task, duration_ms)

    # ------------------------------------------------------------------------------ aborts

    def abort(self, task: Fetched, reason: str) -> None:
        self.abort_all([task], reason)

    def abort_where(self, reason: str, batch_id: str | None = None) -> int:
        tasks = self.running_of(batch_id)
        self.abort_all(tasks, reason)
        return len(tasks)

    def abort_all(self, tasks: list[Fetched], reason: str) -> None:
        """Mark each task and raise TaskCanceled in its thread, back to back, before anything
        else: the caller (the control thread) keeps the GIL only until the next switch, and
        behind many CPU-bound task threads getting it back takes a long while. Waking threads
        that wait on ``ctx.cancelled`` and the watch for tasks that ignore the abort come after."""
        aborted = [t for t in tasks if t.abort_reason is None]
        for task in aborted:
            task.abort_reason = reason
            task.ctx._mark_aborted()
            if task.runner is not None:         # set by the runner before the body starts
                task.runner.abort(task.id)
        for task in aborted:
            task.ctx._wake_cancelled()
        self.maintenance.watch_aborts(aborted)

    def running_of(self, batch_id: str | None) -> list[Fetched]:
        # no lock: list() of a dict's values is one C call under the GIL, and the lock could be
        # held by a task thread that is itself waiting for the GIL (a whole round of switches)
        return [t for t in list(self.running.values()) if batch_id is None or t.batch_id == batch_id]

    def force_exit(self, why: str) -> None:
        """A task ignores its abort past cancel_grace: hand every other task back, then end the
        process (the manager starts a new one)."""
        log.error("worker %s: %s; handing back in-flight tasks and exiting", self.id, why)
        k = self.store.keys
        with self.lock:
            pairs = [x for t in self.running.values() for x in (t.id, t.token)]
        calls = self._drain_acks()          # takes self.lock itself (not reentrant)
        if pairs:
            calls.append(("release", [k.leases], [k.prefix, self.id, *pairs]))
        try:
            self.store.run_many(calls)
        except Exception:
            log.exception("worker %s: could not hand tasks back; their leases will expire", self.id)
        if self.on_exit_request is not None:
            self.on_exit_request()

    # ------------------------------------------------------------------------------ shutdown

    def _shutdown(self, threads: list[threading.Thread]) -> None:
        """Stop fetching; let running tasks finish within shutdown_timeout; hand the rest back
        without consuming a retry; flush every acknowledgement."""
        self.quiet = True
        self._hand_back_unstarted()
        deadline = time.monotonic() + self.options.shutdown_timeout.total_seconds()
        renew_every, next_renew = max(self.options.invisibility.total_seconds() / 3, 0.05), 0.0
        while self.running and time.monotonic() < deadline:
            if time.monotonic() >= next_renew:
                # a stopping (or dead) manager no longer renews, nor does the stopped loop: keep
                # the leases of the tasks finishing here, or another worker would run them too
                try:
                    self.maintenance._renew()
                except Exception as exc:
                    log.warning("worker %s: lease renewal while stopping failed: %s", self.id, exc)
                next_renew = time.monotonic() + renew_every
            self._flush_quietly()
            self.wake.wait(0.05)
            self.wake.clear()
        if self.running:
            log.warning("worker %s: %d tasks still running at the shutdown deadline; handing them back",
                        self.id, len(self.running))
            with self.lock:
                leftovers = list(self.running.values())
            self.abort_all(leftovers, "shutdown")
            # each runner reports its task: handed back if the abort landed in the body, but
            # acknowledged if the body had returned already (or swallowed the abort), since a
            # task that finished must not run again
            settle = time.monotonic() + ABORT_SETTLE
            while self.running and time.monotonic() < settle:
                self.wake.wait(0.01)
                self.wake.clear()
            with self.lock:
                stuck = list(self.running.values())
                self.running.clear()
                for t in stuck:               # blocked where an abort cannot reach (C code)
                    self.releases += (t.id, t.token)
        for _ in threads:
            self.inbox.put(None)
        self._flush_quietly()
        self.control.stop()
        self.maintenance.stop()
        log.info("worker %s stopped after %d tasks", self.id, self.tasks_done)

    def _hand_back_unstarted(self) -> None:
        """Fetched tasks no thread has taken yet go back to their queues at once (no retry
        consumed): shutdown waits only for the ones that started."""
        with self.lock:
            while True:
                try:
                    task = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if task is not None and self.running.pop(task.id, None) is not None:
                    self.releases += (task.id, task.token)
        self._flush_quietly()

    def _flush_quietly(self) -> None:
        calls = self._drain_acks()
        if calls:
            try:
                self.store.run_many(calls)
            except Exception:
                self._requeue_acks(calls)
