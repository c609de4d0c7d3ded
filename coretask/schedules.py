"""Cron schedules: the client API (a mixin of TaskProcessor) and the worker's schedule timer.

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
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .cron import CronSchedule
from .encoding import Call, Encoded, Serializer, TaskData
from .errors import ConfigurationError
from .models import ms_to_dt
from .options import check_queue_name, check_tenant

if TYPE_CHECKING:
    from datetime import datetime

    from .options import Options
    from .signing import Signer
    from .gateway.transport import Store

__all__ = ["ScheduleData", "ScheduleInfo", "Schedules", "ScheduleTimer"]

log = logging.getLogger(__name__)

DUE_PER_CALL = 100       # due schedules handled per round trip; more are taken on the next turn
ERROR_RETRY = 1.0        # seconds before the timer tries again after a Redis error


@dataclasses.dataclass(frozen=True)
class ScheduleData:
    """What ``upsert_schedule`` stores. ``cron`` is parsed by :mod:`coretask.cron` in
    ``timezone`` (any IANA zone); with ``Options.use_cron_seconds`` it takes six fields.
    ``unique``: skip a tick while the previous run is still queued, delayed or running.
    ``expire``: skip a tick that could not be enqueued within this time after it was due."""

    id: str
    tenant: str
    queue: str
    scope: str | None
    cron: str
    timezone: str = "Etc/UTC"
    unique: bool = False
    expire: timedelta | float | None = None


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as stored. ``last_run`` is when its latest run was enqueued (tick or
    trigger); ``skipped_unique`` / ``skipped_expired`` count ticks that enqueued nothing."""

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


def schedule_key(prefix: str, schedule_id: str) -> str:
    return f"{prefix}:s:{schedule_id}"


def due_key(prefix: str) -> str:
    return f"{prefix}:sdue"


def tenant_key(prefix: str, tenant: str) -> str:
    return f"{prefix}:sched:{tenant}"


@lru_cache(maxsize=1024)
def parse_cron(expression: str, timezone: str, seconds: bool) -> CronSchedule:
    """Parsed schedules are immutable, so every tick of a schedule reuses one parse."""
    return CronSchedule(expression, timezone, seconds=seconds)


def _check_id(schedule_id: object) -> str:
    if not isinstance(schedule_id, str) or not schedule_id or len(schedule_id) > 200 \
            or any(c.isspace() for c in schedule_id):
        raise ConfigurationError(f"schedule id {schedule_id!r} is not allowed; use 1-200 characters without whitespace")
    return schedule_id


def _expire_ms(expire: object) -> int:
    if expire is None:
        return 0
    if isinstance(expire, (int, float)) and not isinstance(expire, bool):
        expire = timedelta(seconds=expire)
    if not isinstance(expire, timedelta) or expire <= timedelta(0):
        raise ConfigurationError(f"ScheduleData.expire must be a positive timedelta, seconds or None, got {expire!r}")
    return int(expire.total_seconds() * 1000)


def _s(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


class Schedules:
    """Schedule methods of TaskProcessor (a mixin: it uses the processor's store and encoder)."""

    store: Store
    options: Options
    _serializer: Serializer
    _as_call: Callable[..., Call | TaskData]
    _encode: Callable[[Call | TaskData], Encoded]
    _signer: Signer | None
    _retries: Callable[[int | None], int]

    def upsert_schedule(self, data: ScheduleData, fn: Callable[..., Any] | Call | TaskData,
                        *args: Any, **kwargs: Any) -> bool:
        """Create or replace the schedule ``data.id`` running ``fn(*args, **kwargs)``; True when
        created. Everything is checked before anything is written, with the errors enqueue_task
        raises for the call and a ConfigurationError (CronSyntaxError / TimezoneError) that names
        the bad cron field or zone. Replacing keeps the last run (so ``unique`` still sees it)
        and computes the next tick afresh from the server clock."""
        sid = _check_id(data.id)
        check_tenant(data.tenant)
        check_queue_name(data.queue)
        if data.scope is not None and not isinstance(data.scope, str):
            raise ConfigurationError(f"ScheduleData.scope must be a string or None, got {data.scope!r}")
        seconds = bool(self.options.use_cron_seconds)
        try:
            sched = parse_cron(data.cron, data.timezone, seconds)
        except ConfigurationError as exc:
            msg = str(exc).replace("pass seconds=True", "set Options.use_cron_seconds=True")
            raise type(exc)(f"schedule {sid!r}: {msg}") from None
        expire_ms = _expire_ms(data.expire)
        enc = self._encode(self._as_call(fn, args, kwargs))
        sig = self._signer.sign_schedule(sid, data.tenant, data.queue, enc) if self._signer else ""
        k = self.store.keys
        now = int(self.store.run("schedule_due", [due_key(k.prefix), k.paused], [k.prefix, 0])[0])
        code, _ = self.store.run(
            "schedule_upsert", [schedule_key(k.prefix, sid), due_key(k.prefix), tenant_key(k.prefix, data.tenant)],
            [k.prefix, sid, data.tenant, data.queue, data.scope or "", sched.expression, data.timezone,
             "1" if seconds else "0", "1" if data.unique else "0", expire_ms, enc.payload, enc.serializer,
             enc.target, self._retries(None), sched.next_after_ms(now), sig])
        if code == -1:
            raise ConfigurationError(f"schedule id {sid!r} belongs to another tenant; pick another id")
        log.debug("schedule %s %s: %s (%s) -> %s", sid, "created" if code == 1 else "replaced",
                  sched.expression, data.timezone, enc.target)
        return code == 1

    def cancel_schedule(self, schedule_id: str, tenant: str) -> bool:
        """Delete a schedule; False when unknown or another tenant's. Runs already enqueued
        stay queued."""
        k = self.store.keys
        return bool(self.store.run("schedule_cancel", [schedule_key(k.prefix, schedule_id), due_key(k.prefix)],
                                   [k.prefix, schedule_id, tenant]))

    def trigger_schedule(self, schedule_id: str, tenant: str | None = None) -> bool:
        """Enqueue a run now, without moving the next tick; False for an unknown schedule (or,
        with ``tenant``, another tenant's: checked inside the script). A
        manual run is never skipped by ``unique`` or a pause (a paused processor just holds
        it queued), but it counts as the previous run for the next ``unique`` tick."""
        k = self.store.keys
        tid = uuid.uuid4().hex
        code, _, _ = self.store.run("schedule_tick", _tick_keys(k.prefix, k.paused, k.queues, schedule_id, tid),
                                    [k.prefix, schedule_id, "trigger", tid, 0, 0, 0, tenant or ""])
        return code == 1

    def get_schedule(self, schedule_id: str) -> ScheduleInfo | None:
        k = self.store.keys
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.hgetall(schedule_key(k.prefix, schedule_id))
        pipe.zscore(due_key(k.prefix), schedule_id)
        h, score = pipe.execute()
        return _info(schedule_id, h, score) if h else None

    def get_schedules(self, tenant: str, skip: int = 0, take: int = 25) -> list[ScheduleInfo]:
        """A tenant's schedules ordered by id."""
        k = self.store.keys
        raw: Any = self.store.redis.zrange(tenant_key(k.prefix, check_tenant(tenant)), skip, skip + take - 1)
        ids = [i.decode() for i in raw]
        pipe = self.store.redis.pipeline(transaction=False)
        for sid in ids:
            pipe.hgetall(schedule_key(k.prefix, sid))
            pipe.zscore(due_key(k.prefix), sid)
        res = pipe.execute()
        return [_info(sid, h, score) for sid, h, score in zip(ids, res[::2], res[1::2]) if h]

    def get_schedules_count(self, tenant: str | None = None) -> int:
        """Schedules of ``tenant``, or of all tenants when None."""
        k = self.store.keys
        key = due_key(k.prefix) if tenant is None else tenant_key(k.prefix, check_tenant(tenant))
        return int(self.store.redis.zcard(key))


def _tick_keys(prefix: str, paused: str, queues: str, schedule_id: str, task_id: str) -> list[str]:
    return [due_key(prefix), schedule_key(prefix, schedule_id), paused, f"{prefix}:t:{task_id}", queues]


def _info(schedule_id: str, h: dict[bytes, bytes], score: float | None) -> ScheduleInfo:
    expire = int(h.get(b"x", b"0") or 0)
    return ScheduleInfo(
        id=schedule_id, tenant=_s(h.get(b"tn")), queue=_s(h.get(b"q")), scope=_s(h.get(b"sc")) or None,
        cron=_s(h.get(b"cr")), timezone=_s(h.get(b"tz")), target=_s(h.get(b"tg")),
        next_run=ms_to_dt(int(score)) if score is not None else None, last_run=ms_to_dt(h.get(b"lr")),
        unique=h.get(b"u") == b"1", expire=timedelta(milliseconds=expire) if expire else None,
        last_task_id=_s(h.get(b"lt")) or None, skipped_unique=int(h.get(b"nu", b"0")),
        skipped_expired=int(h.get(b"nx", b"0")))


class ScheduleTimer:
    """The schedule timer of one worker process, run from its maintenance loop.

    ``run()`` enqueues every due tick and arms ``due`` (monotonic seconds) for the earliest next
    tick, capped at base_frequency so that a lost pub/sub event costs at most that long.
    ``poke()`` (from the control thread on "s"/"r") makes the next maintenance turn re-read;
    it is a flag rather than a write to ``due`` so a run in progress cannot overwrite it."""

    def __init__(self, store: Store, options: Options, worker_id: str = "") -> None:
        self.store = store
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
            log.warning("worker %s: schedule timer failed: %s", self.worker_id, exc)
            wait = ERROR_RETRY
        self.due = time.monotonic() + wait

    def _run_once(self) -> float:
        """One read of the due ticks, then one claim per due tick (pipelined); returns the
        seconds to wait before the next read."""
        k = self.store.keys
        sdue = due_key(k.prefix)
        reply = self.store.run("schedule_due", [sdue, k.paused], [k.prefix, DUE_PER_CALL])
        now, paused, earliest = int(reply[0]), int(reply[1]), int(reply[2])
        if paused:
            return self.idle      # ticks wait in place; resume publishes "r", which pokes us
        calls = []
        for sid_b, tick_b, cron_b, tz_b, sec_b, ver_b in reply[3:]:
            sid, tick = sid_b.decode(), int(float(tick_b))
            try:
                nxt = parse_cron(cron_b.decode(), tz_b.decode(), sec_b == b"1").next_after_ms(max(now, tick))
            except ValueError as exc:  # e.g. a zone this machine's tz database lacks
                log.error("worker %s: schedule %s cannot be evaluated here: %s", self.worker_id, sid, exc)
                continue
            tid = uuid.uuid4().hex
            calls.append(("schedule_tick", _tick_keys(k.prefix, k.paused, k.queues, sid, tid),
                          [k.prefix, sid, "tick", tid, tick, ver_b, nxt]))
        results = self.store.run_many(calls) if calls else []   # one round trip for a burst
        for (_, _, args), (code, _, score) in zip(calls, results):
            if code == 1:   # debug: a per-second schedule would flood an info log
                log.debug("schedule %s: enqueued the run of tick %s", args[1], ms_to_dt(args[4]))
            elif code in (2, 3):
                log.debug("schedule %s: tick %s skipped (%s)", args[1], ms_to_dt(args[4]),
                         "previous run still active" if code == 2 else "expired")
            if int(score) >= 0:
                earliest = int(score) if earliest < 0 else min(earliest, int(score))
        if len(reply) - 3 >= DUE_PER_CALL:
            return 0.0
        if earliest < 0:
            return self.idle
        return min(max((earliest - now) / 1000, 0.0), self.idle)
