"""Leases: renewal and recovery, one implementation for the manager and the worker.

A task leased to a worker process stays leased while someone renews it: the manager for each
child it sees alive (a task stuck in C code holding its process's GIL cannot starve it), or an
embedded worker for itself. A process that is gone has its tasks recovered at once; the lease
deadline is only the backstop for when every renewer died. The timings are derived here, once.
"""
from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

from ..gateway import Gateway, Recovered
from ..options import Options

__all__ = ["LeaseTimings", "Leases"]

log = logging.getLogger(__name__)

EXPIRED_PER_CALL = 100
EXPIRED_REASON = "lease expired: the worker running the task stopped renewing it"
MIN_RENEW_INTERVAL = 0.05
HEARTBEAT_INTERVAL = 5.0    # a renewal is also the process's heartbeat (renew.lua)


@dataclasses.dataclass(frozen=True)
class LeaseTimings:
    lease_ms: int           # a lease's length (Options.invisibility)
    renew_every: float      # seconds between renewals: a third of a lease (so two may fail), or
    #                         the heartbeat interval when that is shorter: the renewal writes the
    #                         heartbeat that status, the dashboard and the workers metric read as
    #                         "alive", and an idle worker on the default 5-minute lease must not
    #                         look dead for 100 s at a time

    @classmethod
    def of(cls, options: Options) -> LeaseTimings:
        seconds = options.invisibility.total_seconds()
        lease_ms = options.invisibility // timedelta(milliseconds=1)    # exact: no float truncation
        return cls(lease_ms=lease_ms, renew_every=max(min(seconds / 3, HEARTBEAT_INTERVAL), MIN_RENEW_INTERVAL))


class Leases:
    def __init__(self, gateway: Gateway, options: Options) -> None:
        self.gateway = gateway
        self.timings = LeaseTimings.of(options)

    def renew(self, worker_id: str) -> int:
        """Extend the leases of a live process's tasks (and its heartbeat); how many."""
        return self.gateway.renew(worker_id, self.timings.lease_ms)

    def recover_worker(self, worker_id: str, reason: str, consume_retry: bool) -> Recovered:
        """Take back every task of a process that is gone and forget its heartbeat."""
        recovered = self.gateway.recover_worker(worker_id, reason, consume_retry)
        self.gateway.forget_worker(worker_id)
        return recovered

    def crashed(self, worker_id: str, reason: str, max_crashes: int) -> tuple[Recovered, str | None]:
        """A process crashed: its tasks go to isolation uncharged, or its one culprit is charged
        (gateway.crashed); its heartbeat is forgotten."""
        result = self.gateway.crashed(worker_id, reason, max_crashes)
        self.gateway.forget_worker(worker_id)
        return result

    def recover_expired(self) -> Recovered:
        """Take back every task whose lease passed its deadline, a bounded batch per call."""
        total = [0, 0, 0]
        while True:
            res = self.gateway.recover_expired(EXPIRED_REASON, EXPIRED_PER_CALL)
            total = [total[0] + res.requeued, total[1] + res.buried, total[2] + res.canceled]
            if res.requeued + res.buried + res.canceled < EXPIRED_PER_CALL:
                return Recovered(*total)
