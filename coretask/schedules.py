"""Cron schedules: the client API (a mixin of the client); the worker's timer that claims the
ticks is coretask/worker/schedules.py.

Why it is built this way:

* A schedule is a hash ``P:s:<id>`` plus its next tick as a score in the zset ``P:sdue``.
  Claiming a tick is one Lua script (``schedule_tick``) that moves the score from this tick to
  the next only if it still equals this tick, and enqueues the run in the same script: any
  number of processes on any number of machines may race for a tick, exactly one enqueues it.
* Cron arithmetic (with its DST rules) lives in Python (:mod:`coretask.cron`), not in Lua. A
  worker reads the due ticks and the server clock (``schedule_due``), computes each next tick
  from ``max(now, tick)`` - so a schedule that was down for a day catches up with one run, not
  a flood - and passes it into the compare-and-set.
* Workers do not poll for ticks: the timer arms itself for the earliest due time, and upsert
  and trigger publish ``"s"`` so idle workers re-read it at once (resume publishes ``"r"``).
"""
from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .cron import parse_cron
from .errors import ConfigurationError
from .models import ms_to_dt
from .options import check_page, check_tenant

if TYPE_CHECKING:
    from datetime import datetime

    from .encoding import Call, TaskData
    from .gateway import Gateway
    from .options import Options
    from .producing import Producer

__all__ = ["ScheduleData", "ScheduleInfo", "Schedules"]

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class ScheduleData:
    """What ``upsert_schedule`` stores. ``cron`` is parsed by :mod:`coretask.cron` in
    ``timezone`` (any IANA zone); with ``Options.use_cron_seconds`` it takes six fields.
    ``unique``: skip a tick while the previous run is still queued, delayed or running.
    ``expire``: skip a tick that could not be enqueued within this time after it was due.
    ``timeout`` / ``keep_result`` / ``retries``: every run's time limit, result keeping and
    retries, as the keywords of enqueue_task (default: the Options')."""

    id: str
    tenant: str
    queue: str
    scope: str | None
    cron: str
    timezone: str = "Etc/UTC"
    unique: bool = False
    expire: timedelta | float | None = None
    timeout: timedelta | float | None = None
    keep_result: timedelta | float | None = None
    retries: int | None = None


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as stored. ``last_run`` is when its latest run was enqueued (tick or
    trigger); ``skipped_unique`` / ``skipped_expired`` / ``skipped_paused`` count ticks that
    enqueued nothing; ``paused_since`` is set while the schedule is paused (pause_schedule).
    ``failures`` counts its runs that failed for good (retries spent; a time limit or a crash
    included), ``last_failure`` / ``last_error`` ("<type>: <message>") / ``last_failed_task_id``
    describe the latest: a failed run is discarded by default (Options.deadletter_schedules),
    so the schedule is where a broken job shows."""

    id: str
    tenant: str
    queue: str
    scope: str | None
    cron: str
    timezone: str
    target: str
    next_run: datetime | None
    last_run: datetime | None
    unique: bool
    expire: timedelta | None
    last_task_id: str | None
    skipped_unique: int
    skipped_expired: int
    paused_since: datetime | None = None
    skipped_paused: int = 0
    failures: int = 0
    last_failure: datetime | None = None
    last_error: str | None = None
    last_failed_task_id: str | None = None

    @property
    def paused(self) -> bool:
        return self.paused_since is not None


def _check_id(schedule_id: object) -> str:
    if not isinstance(schedule_id, str) or not schedule_id or len(schedule_id) > 200 \
            or any(c.isspace() for c in schedule_id):
        raise ConfigurationError(f"schedule id {schedule_id!r} is not allowed; use 1-200 characters without whitespace")
    return schedule_id


def _expire_ms(expire: object) -> int:
    if expire is None:
        return 0
    given = expire
    if isinstance(expire, (int, float)) and not isinstance(expire, bool):
        expire = timedelta(seconds=expire)
    if not isinstance(expire, timedelta) or expire <= timedelta(0):
        raise ConfigurationError(f"ScheduleData.expire must be a positive timedelta, seconds or None, got {given!r}")
    return int(expire.total_seconds() * 1000)


def _s(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


class Schedules:
    """Schedule methods of TaskProcessor (a mixin: it uses the processor's store and encoder)."""

    gateway: Gateway
    options: Options
    producer: Producer
    _run_ready: Callable[[], None] | None

    def upsert_schedule(self, data: ScheduleData, fn: Callable[..., Any] | Call | TaskData,
                        *args: Any, **kwargs: Any) -> bool:
        """Create or replace the schedule ``data.id`` running ``fn(*args, **kwargs)``; True when
        created. Everything is checked before anything is written, with the errors enqueue_task
        raises for the call and a ConfigurationError (CronSyntaxError / TimezoneError) that names
        the bad cron field or zone. Replacing keeps the last run (so ``unique`` still sees it)
        and computes the next tick afresh from the server clock."""
        sid = _check_id(data.id)
        check_tenant(data.tenant)
        self.options.check_enqueue_queue(data.queue, f"schedule {sid!r}: queue")
        if data.scope is not None and not isinstance(data.scope, str):
            raise ConfigurationError(f"ScheduleData.scope must be a string or None, got {data.scope!r}")
        seconds = bool(self.options.use_cron_seconds)
        try:
            sched = parse_cron(data.cron, data.timezone, seconds)
        except ConfigurationError as exc:
            msg = str(exc).replace("pass seconds=True", "set Options.use_cron_seconds=True")
            raise type(exc)(f"schedule {sid!r}: {msg}") from None
        expire_ms = _expire_ms(data.expire)
        pr = self.producer
        controls = pr.controls(data.timeout, data.keep_result)
        enc = pr.encode_call(fn, args, kwargs)
        gw = self.gateway
        now = gw.server_time_ms()
        code = gw.upsert_schedule(sid, data.tenant, data.queue, data.scope or "", sched.expression, data.timezone,
                                  seconds, data.unique, expire_ms, enc.payload, enc.serializer, enc.target,
                                  pr.retries(data.retries), sched.next_after_ms(now),
                                  pr.sign_schedule(sid, data.tenant, data.queue, enc), controls)
        if code == -1:
            raise ConfigurationError(f"schedule id {sid!r} belongs to another tenant; pick another id")
        log.debug("schedule %s %s: %s (%s) -> %s", sid, "created" if code == 1 else "replaced",
                  sched.expression, data.timezone, enc.target)
        return code == 1

    def cancel_schedule(self, schedule_id: str, tenant: str) -> bool:
        """Delete a schedule; False when unknown or another tenant's. Runs already enqueued
        stay queued."""
        return self.gateway.cancel_schedule(schedule_id, tenant)

    def pause_schedule(self, schedule_id: str, tenant: str | None = None) -> bool:
        """Stop a schedule's ticks from enqueuing runs until resume_schedule; False for an
        unknown schedule (or, with ``tenant``, another tenant's). The ticks keep moving while
        paused (each one is counted in ``skipped_paused``), so resuming runs the next tick and
        never a backlog. The pause survives upsert_schedule: an application that registers its
        schedules at every start does not undo an operator's pause. trigger_schedule still runs
        a paused schedule on demand. True also when it was paused already."""
        return self._pause_schedule(schedule_id, True, tenant)

    def resume_schedule(self, schedule_id: str, tenant: str | None = None) -> bool:
        """Undo pause_schedule: the next tick enqueues its run. False for an unknown schedule
        (or another tenant's); True also when it was not paused."""
        return self._pause_schedule(schedule_id, False, tenant)

    def _pause_schedule(self, schedule_id: str, on: bool, tenant: str | None) -> bool:
        code = self.gateway.pause_schedule(_check_id(schedule_id), on, None if tenant is None else check_tenant(tenant))
        if code == 1:
            log.info("schedule %s %s", schedule_id, "paused: its ticks enqueue nothing until resume_schedule"
                     if on else "resumed")
        return code >= 0

    def trigger_schedule(self, schedule_id: str, tenant: str | None = None) -> str | None:
        """Enqueue a run now, without moving the next tick; returns the run's task id (follow it
        with get_task / get_result), None for an unknown schedule (or, with ``tenant``, another
        tenant's: checked inside the script). A manual run is never skipped by ``unique`` or a
        pause (a paused processor just holds it queued), but it counts as the previous run for
        the next ``unique`` tick."""
        res = self.gateway.trigger_schedule(schedule_id, uuid.uuid4().hex, tenant)
        if self._run_ready is not None:      # eager mode runs it now (coretask/eager.py)
            self._run_ready()
        return res.task_id or None

    def get_schedule(self, schedule_id: str) -> ScheduleInfo | None:
        h, score = self.gateway.schedule(schedule_id)
        return _info(schedule_id, h, score) if h else None

    def get_schedules(self, tenant: str, skip: int = 0, take: int = 25) -> list[ScheduleInfo]:
        """A tenant's schedules ordered by id."""
        check_page(skip, take)
        return [_info(sid, h, score) for sid, h, score in self.gateway.schedules(check_tenant(tenant), skip, take)]

    def get_schedules_count(self, tenant: str | None = None) -> int:
        """Schedules of ``tenant``, or of all tenants when None."""
        return self.gateway.schedule_count(None if tenant is None else check_tenant(tenant))


def _info(schedule_id: str, h: dict[bytes, bytes], score: float | None) -> ScheduleInfo:
    expire = int(h.get(b"x", b"0") or 0)
    return ScheduleInfo(
        id=schedule_id, tenant=_s(h.get(b"tn")), queue=_s(h.get(b"q")), scope=_s(h.get(b"sc")) or None,
        cron=_s(h.get(b"cr")), timezone=_s(h.get(b"tz")), target=_s(h.get(b"tg")),
        next_run=ms_to_dt(int(score)) if score is not None else None, last_run=ms_to_dt(h.get(b"lr")),
        unique=h.get(b"u") == b"1", expire=timedelta(milliseconds=expire) if expire else None,
        last_task_id=_s(h.get(b"lt")) or None, skipped_unique=int(h.get(b"nu", b"0")),
        skipped_expired=int(h.get(b"nx", b"0")), paused_since=ms_to_dt(h.get(b"ps")),
        skipped_paused=int(h.get(b"np", b"0")), failures=int(h.get(b"nf", b"0")), last_failure=ms_to_dt(h.get(b"lf")),
        last_error=_s(h.get(b"le")) or None, last_failed_task_id=_s(h.get(b"lft")) or None)
