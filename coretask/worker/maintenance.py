"""Maintenance: the timers of a worker process, each one atomic Lua and safe to run from every
process at once: expired-lease recovery, lease renewal (embedded mode), retention cleanup,
unfinished batch publications, on_batch_end hooks, the cancel_grace watch on aborts, the hand-back
of tasks leased to this process by a fetch whose reply it never received, the process's report
about itself (host, threads, memory: the dashboard's Workers page), and cron schedule ticks
(armed for the earliest due tick, not polled)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from ..gateway import Gateway, Release
from ..middleware import Chain
from ..models import BatchInfo
from ..options import Options
from .aborts import Aborts
from .leases import Leases
from .ledger import Ledger
from .runner import THROTTLE
from .schedules import ScheduleTimer
from ..throttle import OUTAGE, LogThrottle

log = logging.getLogger(__name__)

HOOK_INTERVAL = 0.2
REPORT_INTERVAL = 5.0      # seconds between a process's reports about itself (the Workers page)
SILENT_WORKER_S = 60.0     # a worker process without a heartbeat this long is gone (heartbeats: every 5 s)
CLEANUP_PER_CALL = 100
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


class Maintenance:
    def __init__(self, worker_id: str, ledger: Ledger, gateway: Gateway, leases: Leases, options: Options,
                 aborts: Aborts, schedules: ScheduleTimer, chain: Chain, *, renew_own_leases: bool) -> None:
        self.worker_id = worker_id
        self.ledger = ledger
        self.gateway = gateway
        self.leases = leases
        self.options = options
        self.aborts = aborts
        self.schedules = schedules
        self.chain = chain
        every = options.pushback_frequency.total_seconds()
        self.intervals = {"expired": every, "cleanup": options.cleanup_frequency.total_seconds(),
                          "publish": every, "unreceived": every, "dataset": every, "report": REPORT_INTERVAL,
                          "silent": SILENT_WORKER_S / 2}
        self.started_ms = int(time.time() * 1000)
        self._process: object | None = None     # psutil.Process, made on the first report
        self.throttle = LogThrottle(log)
        self.marker: str | None = None          # the dataset marker this process last saw
        if chain.on_batch_end:
            # polled only where a middleware (or Options.on_batch_end) wants it: without it, nothing would wake an idle loop every
            # 0.2 s (it sleeps until a pub/sub event, a due time, a timer or base_frequency)
            self.intervals["hooks"] = HOOK_INTERVAL
        if renew_own_leases:
            self.intervals["renew"] = leases.timings.renew_every
        now = time.monotonic()
        self.due = {name: now for name in self.intervals}
        self.delay = BACKOFF_START
        self.lost = False                       # a call failed since the last one that succeeded

    def tick(self) -> float:
        """Run what is due; return seconds until the next timer."""
        now = time.monotonic()
        for name, when in self.due.items():
            if when <= now:
                try:
                    getattr(self, "_" + name)()
                except Exception as exc:
                    if not OUTAGE.told(f"worker {self.worker_id}", exc):
                        self.throttle.log(("maintenance", name), logging.WARNING, f"maintenance {name} failures",
                                          "worker %s: maintenance %s failed: %s", self.worker_id, name, exc)
                self.due[name] = now + self.intervals[name]
        self.throttle.flush()
        THROTTLE.flush()
        abort_deadline = self.aborts.check(now)
        self.schedules.run_if_due(now)
        nxt = min(min(self.due.values()), self.schedules.next_due())
        if abort_deadline is not None:
            nxt = min(nxt, abort_deadline)
        return max(nxt - time.monotonic(), 0.001)

    # ------------------------------------------------------------------------ Redis errors

    def backoff(self, stop: threading.Event) -> None:
        self.lost = True
        self.due["unreceived"] = 0.0    # a fetch may have run without its reply reaching us
        stop.wait(self.delay)
        self.delay = min(self.delay * 2, BACKOFF_MAX)

    def connected(self) -> None:
        """A call succeeded: an outage ends (the one line that says so: throttle.Outage)."""
        if self.lost:
            OUTAGE.reachable(f"worker {self.worker_id}")
            self.lost = False
        self.delay = BACKOFF_START

    # ------------------------------------------------------------------------------ timers

    def _expired(self) -> None:
        res = self.leases.recover_expired()
        if res:
            log.warning("recovered expired leases: requeued=%d buried=%d canceled=%d",
                        res.requeued, res.buried, res.canceled)

    def _unreceived(self) -> None:
        """Hand back the tasks leased to this process that it never received. A fetch whose reply
        is lost (the connection reset after Redis ran the script, or a request held by a broken
        link delivered after the client gave up) leases tasks that no thread here runs, and this
        live process's renewals would keep them leased forever. Runs in the loop thread between
        round trips, so every task this process knows of is running or has an outcome pending;
        the others are released (no retry consumed: they never started here). The release
        presents the token read with the owner, so a task meanwhile recovered and leased
        elsewhere is left alone."""
        leased = self.gateway.leased_to(self.worker_id)
        if not leased:
            return
        unknown = sorted(leased - self.ledger.known_ids())
        if not unknown:
            return
        releases = [Release(tid, token) for tid, (token, state, owner) in
                    zip(unknown, self.gateway.lease_holders(unknown))
                    if state == "running" and owner == self.worker_id and token is not None]
        if releases:
            n = self.gateway.release(self.worker_id, releases)
            log.warning("worker %s: %d tasks were leased to this process by a fetch whose reply was lost; "
                        "handed %d back", self.worker_id, len(releases), n)

    def _dataset(self) -> None:
        """Notice a dataset that vanished under a running deployment (a server restarted without
        persistence, FLUSHALL, a failover to an empty replica): the marker key every worker
        keeps is gone. The process that puts it back logs one error for the deployment; the
        others adopt the new marker quietly."""
        value, created = self.gateway.dataset_marker(uuid.uuid4().hex)    # fresh: a new dataset, a new marker
        if self.marker is not None and value != self.marker:
            if created:
                log.error("the coretask data under prefix %s vanished from %s (a server restarted without "
                          "persistence, FLUSHALL, or a failover to an empty replica): tasks, batches and "
                          "schedules stored before are gone; answers for tasks running now will be ignored",
                          self.gateway.keys.prefix, self.gateway.url)
            else:
                log.debug("worker %s: the dataset marker changed; another process reported it", self.worker_id)
        self.marker = value

    def _renew(self) -> None:
        self.leases.renew(self.worker_id)

    def _silent(self) -> None:
        """Forget worker processes that stopped reporting without a goodbye (status, the dashboard
        and the workers metric would list them for ever)."""
        gone = self.gateway.forget_silent_workers(int(SILENT_WORKER_S * 1000))
        if gone:
            log.info("worker %s: forgot %d worker processes silent for over %gs: %s", self.worker_id, len(gone),
                     SILENT_WORKER_S, ", ".join(gone))

    def _report(self) -> None:
        """Say who this process is and how much memory it holds (read by get_worker_states)."""
        import psutil

        if self._process is None:
            self._process = psutil.Process()
        rss = self._process.memory_info().rss  # type: ignore[attr-defined]
        ttl_ms = int(max(3 * REPORT_INTERVAL, self.options.invisibility.total_seconds()) * 1000)
        self.gateway.report_worker(self.worker_id, {
            "host": socket.gethostname(), "pid": os.getpid(), "threads": self.ledger.threads,
            "queues": ",".join(self.options.queues), "started": self.started_ms, "rss": rss}, ttl_ms)

    def _cleanup(self) -> None:
        ms = int(self.options.retention.total_seconds() * 1000)
        while self.gateway.cleanup(ms, CLEANUP_PER_CALL) == CLEANUP_PER_CALL:
            pass

    def _publish(self) -> None:
        for batch_id, stage in self.gateway.unfinished_publications():
            self.gateway.publish_batch(batch_id, stage)

    def _hooks(self) -> None:
        if not self.chain.on_batch_end:
            return      # leave the queue to processes that have the hook (cleanup trims it)
        while True:
            ended = self.gateway.next_ended_batch()
            if ended is None:
                return
            batch_id, h = ended
            if h and b"tn" in h:                            # not deleted, not a cancel tombstone
                self.chain.on_batch_end(BatchInfo.from_hash(batch_id, h))
