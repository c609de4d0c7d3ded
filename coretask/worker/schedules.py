"""ScheduleTimer: the worker side of cron schedules (the API side is coretask/schedules.py).

A worker reads the due ticks and the server clock (``schedule_due``), computes each next tick
from ``max(now, tick)`` (so a schedule that was down for a day catches up with one run, not a
flood) and claims each tick with a compare-and-set that also enqueues the run. Workers do not
poll: the timer arms itself for the earliest due tick, and upsert, trigger and resume publish
events that poke it.
"""
from __future__ import annotations

import logging
import time
import uuid

from ..cron import parse_cron
from ..gateway import DueSchedule, Gateway
from ..models import ms_to_dt
from ..options import Options
from ..throttle import OUTAGE

__all__ = ["ScheduleTimer"]

log = logging.getLogger(__name__)

DUE_PER_CALL = 100       # due schedules handled per round trip; more are taken on the next turn
ERROR_RETRY = 1.0        # seconds before the timer tries again after a Redis error
SKIPPED = {2: "previous run still active", 3: "expired", 4: "schedule paused"}   # schedule_tick.lua codes


class ScheduleTimer:
    """The schedule timer of one worker process, run from its maintenance loop.

    ``run()`` enqueues every due tick and arms ``due`` (monotonic seconds) for the earliest next
    tick, capped at base_frequency so that a lost pub/sub event costs at most that long.
    ``poke()`` (from the control thread on "s"/"r") makes the next maintenance turn re-read;
    it is a flag rather than a write to ``due`` so a run in progress cannot overwrite it."""

    def __init__(self, gateway: Gateway, options: Options, worker_id: str = "") -> None:
        self.gateway = gateway
        self.worker_id = worker_id
        self.idle = options.base_frequency.total_seconds()
        self.due = 0.0
        self.dirty = True

    def poke(self) -> None:
        self.dirty = True

    def next_due(self) -> float:
        return 0.0 if self.dirty else self.due

    def run_if_due(self, now: float) -> None:
        if self.dirty or self.due <= now:
            self.run()

    def run(self) -> None:
        self.dirty = False
        try:
            wait = self._run_once()
        except Exception as exc:
            if not OUTAGE.told(f"worker {self.worker_id}", exc):
                log.warning("worker %s: schedule timer failed: %s", self.worker_id, exc)
            wait = ERROR_RETRY
        self.due = time.monotonic() + wait

    def _run_once(self) -> float:
        """One read of the due ticks, then one claim per due tick (pipelined); returns the
        seconds to wait before the next read."""
        due = self.gateway.schedule_due(DUE_PER_CALL)
        now, earliest = due.now_ms, due.next_ms
        if due.paused:
            return self.idle      # ticks wait in place; resume publishes "r", which pokes us
        claims: list[tuple[DueSchedule, str, int]] = []
        for d in due.due:
            try:
                nxt = parse_cron(d.cron, d.timezone, d.seconds).next_after_ms(max(now, d.tick_ms))
            except ValueError as exc:  # e.g. a zone this machine's tz database lacks
                log.error("worker %s: schedule %s cannot be evaluated here: %s", self.worker_id, d.id, exc)
                continue
            claims.append((d, uuid.uuid4().hex, nxt))
        results = self.gateway.claim_ticks(claims) if claims else []   # one round trip for a burst
        for (d, _, _), res in zip(claims, results):
            if res.code == 1:   # debug: a per-second schedule would flood an info log
                log.debug("schedule %s: enqueued the run of tick %s", d.id, ms_to_dt(d.tick_ms))
            elif res.code in SKIPPED:
                log.debug("schedule %s: tick %s skipped (%s)", d.id, ms_to_dt(d.tick_ms), SKIPPED[res.code])
            if res.score_ms >= 0:
                earliest = res.score_ms if earliest < 0 else min(earliest, res.score_ms)
        if len(due.due) >= DUE_PER_CALL and claims:
            return 0.0    # a full page claimed: more may be due (a page of unevaluable ones is not re-read at once)
        if earliest < 0:
            return self.idle
        return min(max((earliest - now) / 1000, 0.0), self.idle)
