"""Maintenance: the timers of a worker process, each one atomic Lua and safe to run from every
process at once: expired-lease recovery, lease renewal (embedded mode), retention cleanup,
unfinished batch publications, on_batch_end hooks, the cancel_grace watch on aborts, the hand-back
of tasks leased to this process by a fetch whose reply it never received, and cron schedule
ticks (armed for the earliest due tick, not polled)."""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..batch import publish
from ..schedules import ScheduleTimer
from .runner import _hook

if TYPE_CHECKING:
    from .process import Fetched, WorkerProcess

log = logging.getLogger(__name__)

HOOK_INTERVAL = 0.2
EXPIRED_PER_CALL = 100


class Maintenance:
    def __init__(self, worker: WorkerProcess) -> None:
        self.w = worker
        o = worker.options
        now = time.monotonic()
        self.intervals = {
            "expired": o.pushback_frequency.total_seconds(),
            "cleanup": o.cleanup_frequency.total_seconds(),
            "publish": o.pushback_frequency.total_seconds(),
            "unreceived": o.pushback_frequency.total_seconds(),
        }
        if o.on_batch_end is not None:
            # polled only where the hook exists: without it, nothing would wake an idle loop every
            # 0.2 s (it sleeps until a pub/sub event, a due time, a timer or base_frequency)
            self.intervals["hooks"] = HOOK_INTERVAL
        if worker.renew_own_leases:
            self.intervals["renew"] = max(o.invisibility.total_seconds() / 3, 0.05)
        self.due = {name: now for name in self.intervals}
        self.aborts: list[tuple[float, Fetched]] = []
        self._aborts_lock = threading.Lock()
        self._delay = 0.1
        self.schedules = ScheduleTimer(worker.store, o, worker.id)  # armed for the next cron tick

    def tick(self) -> float:
        """Run what is due; return seconds until the next timer."""
        now = time.monotonic()
        for name, when in self.due.items():
            if when <= now:
                try:
                    getattr(self, "_" + name)()
                except Exception as exc:
                    log.warning("worker %s: maintenance %s failed: %s", self.w.id, name, exc)
                self.due[name] = now + self.intervals[name]
        self._check_aborts(now)
        self.schedules.run_if_due(now)
        nxt = min(min(self.due.values()), self.schedules.next_due())
        if self.aborts:
            nxt = min(nxt, min(d for d, _ in self.aborts))
        return max(nxt - time.monotonic(), 0.001)

    def stop(self) -> None:
        self.aborts.clear()

    # ------------------------------------------------------------------------ Redis errors

    def backoff(self, stop: threading.Event) -> None:
        self.due["unreceived"] = 0.0    # a fetch may have run without its reply reaching us
        stop.wait(self._delay)
        self._delay = min(self._delay * 2, 5.0)

    def connected(self) -> None:
        self._delay = 0.1

    # ------------------------------------------------------------------------------ timers

    def _expired(self) -> None:
        k = self.w.store.keys
        o = self.w.options
        while True:
            res = self.w.store.run("recover", [k.leases],
                                   [k.prefix, "expired", "", "1" if o.deadletter else "0",
                                    "lease expired: the worker running the task stopped renewing it",
                                    EXPIRED_PER_CALL, "1", "1" if o.deadletter_schedules else "0"])
            if sum(res):
                log.warning("recovered expired leases: requeued=%d buried=%d canceled=%d", *res)
            if sum(res) < EXPIRED_PER_CALL:
                return

    def _unreceived(self) -> None:
        """Hand back the tasks leased to this process that it never received. A fetch whose reply
        is lost (the connection reset after Redis ran the script, or a request held by a broken
        link delivered after the client gave up) leases tasks that no thread here runs, and this
        live process's renewals would keep them leased forever. Runs in the loop thread between
        round trips, so every task this process knows of is running or has an acknowledgement
        queued; the others are released (no retry consumed: they never started here). The
        release presents the token read with the owner, so a task meanwhile recovered and leased
        elsewhere is left alone."""
        w = self.w
        store, k = w.store, w.store.keys
        leased = store.redis.smembers(k.worker(w.id))
        if not leased:
            return
        with w.lock:
            known = set(w.running)
            known.update(w.acks[0::4])
            known.update(f[0] for f in w.fails)
            known.update(w.releases[0::2])
        unknown = [m.decode() for m in leased if m.decode() not in known]
        if not unknown:
            return
        pipe = store.redis.pipeline(transaction=False)
        for tid in unknown:
            pipe.hmget(k.task(tid), "a", "st", "w")
        pairs: list[str] = []
        for tid, (token, state, owner) in zip(unknown, pipe.execute()):
            if state == b"running" and owner == w.id.encode() and token is not None:
                pairs += [tid, token.decode()]
        if pairs:
            n = store.run("release", [k.leases], [k.prefix, w.id, *pairs])
            log.warning("worker %s: %d tasks were leased to this process by a fetch whose reply was lost; "
                        "handed %d back", w.id, len(pairs) // 2, n)

    def _renew(self) -> None:
        k = self.w.store.keys
        self.w.store.run("renew", [k.leases, k.worker(self.w.id), k.workers],
                         [int(self.w.options.invisibility.total_seconds() * 1000), self.w.id])

    def _cleanup(self) -> None:
        k = self.w.store.keys
        ms = int(self.w.options.retention.total_seconds() * 1000)
        while self.w.store.run("cleanup", [k.bend], [k.prefix, ms, 100]) == 100:
            pass

    def _publish(self) -> None:
        store = self.w.store
        for entry in store.redis.smembers(store.keys.publishing):
            batch_id, _, stage = entry.decode().partition(":")
            publish(store, batch_id, stage)

    def _hooks(self) -> None:
        from ..models import BatchInfo
        store = self.w.store
        hook = self.w.options.on_batch_end
        if hook is None:
            return      # leave the queue to processes that have the hook (cleanup trims it)
        while True:
            b: Any = store.redis.lpop(store.keys.bended)   # one at a time: a crash loses at most one
            if not b:
                return
            h = store.redis.hgetall(store.keys.batch(b.decode()))
            if h and b"tn" in h:                            # not deleted, not a cancel tombstone
                _hook(hook, BatchInfo.from_hash(b.decode(), h))

    # ------------------------------------------------------------------------------ aborts

    def watch_aborts(self, tasks: list[Fetched]) -> None:
        if not tasks:
            return
        deadline = time.monotonic() + self.w.options.cancel_grace.total_seconds()
        with self._aborts_lock:     # called from the control thread while the loop reads the list
            self.aborts += [(deadline, task) for task in tasks]
        self.w.wake.set()

    def _check_aborts(self, now: float) -> None:
        if not self.aborts:
            return
        with self._aborts_lock:
            watched, self.aborts = self.aborts, []
        pending = []
        for deadline, task in watched:
            if task.id not in self.w.running or self.w.running[task.id] is not task:
                continue
            if deadline <= now:
                why = (f"task {task.id} {task.target} ignored its abort for "
                       f"{self.w.options.cancel_grace.total_seconds():g}s")
                if self.w.on_exit_request is None:
                    # embedded (threads only): the process cannot be ended for one task; handing
                    # back tasks that go on running here would run them twice. Stop watching.
                    log.error("worker %s: %s; it runs on until it returns", self.w.id, why)
                    continue
                self.w.force_exit(why)
                return
            pending.append((deadline, task))
        with self._aborts_lock:
            self.aborts[:0] = pending
