"""Typed messages between the gateway and its callers: what a script is told and what it answers.

Positional replies (the fetch script's runs of 12 values, complete.lua's groups of four) are
turned into these records in exactly one place, the gateway method that calls the script, so
the worker never counts positions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["Ack", "DueSchedule", "DueSchedules", "Failure", "FetchReply", "Leased", "Outcomes", "Recovered",
           "Release", "TickResult", "parse_fetch_reply"]

FETCH_FIELDS = 12  # values per task in fetch.lua's reply (see its header)


@dataclasses.dataclass(frozen=True, slots=True)
class Leased:
    """One task a fetch leased to a worker process. ``token`` is the lease token (the attempt
    number as text) that every acknowledgement must present; ``batch_fields`` is the batch's
    hash (flat field/value list) when the reply carried it with this task's batch; ``signature``
    and ``stored_tenant`` are checked by coretask.signing.TaskGuard before anything is decoded.
    ``retries_left`` is the task's field r as stored: the attempts it may still fail, this one
    included (the worker's ``ctx.retries_left`` is one less: what is left should this one fail)."""

    id: str
    token: str
    attempt: int
    payload: bytes
    serializer: str
    target: str
    queue: str
    tenant: str
    batch_id: str | None
    retries_left: int
    enqueued_ms: int
    batch_fields: list[bytes] | None
    signature: str
    stored_tenant: str


@dataclasses.dataclass(frozen=True, slots=True)
class FetchReply:
    paused: bool
    next_due_ms: int        # -1: nothing delayed
    now_ms: int             # the server clock when the script ran
    tasks: list[Leased]


def parse_fetch_reply(reply: list[Any]) -> FetchReply:
    """fetch.lua's reply as records; the batch fields, sent once per batch per reply, are
    handed to every task of that batch."""
    tasks = []
    batch_fields: dict[str, list[bytes]] = {}
    for i in range(3, len(reply), FETCH_FIELDS):
        (tid, attempt, payload, ser, target, q, tenant, batch, retries, enqueued, binfo, seal) = \
            reply[i:i + FETCH_FIELDS]
        batch_id = batch.decode() or None
        if binfo:
            batch_fields[batch_id] = binfo
        tasks.append(Leased(
            id=tid.decode(), token=str(attempt), attempt=int(attempt), payload=payload, serializer=ser.decode(),
            target=target.decode(), queue=q.decode(), tenant=tenant.decode(), batch_id=batch_id,
            retries_left=int(retries), enqueued_ms=int(enqueued or 0),
            batch_fields=batch_fields.get(batch_id) if batch_id else None,
            signature=seal[0].decode(), stored_tenant=seal[1].decode()))
    return FetchReply(paused=bool(reply[0]), next_due_ms=int(reply[1]), now_ms=int(reply[2]), tasks=tasks)


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """A finished task: succeeded (``ok``) or ended by its abort (``canceled``)."""

    task_id: str
    token: str
    outcome: Literal["ok", "canceled"]
    duration_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt. ``bury``: never retry (the task cannot succeed, e.g. unloadable);
    ``delay_ms``: wait before the retry (0: at once)."""

    task_id: str
    token: str
    error_type: str
    message: str
    traceback: str
    duration_ms: int
    delay_ms: int = 0
    bury: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """A task handed back to the head of its queue without consuming a retry."""

    task_id: str
    token: str


@dataclasses.dataclass(slots=True)
class Outcomes:
    """What a worker process has to tell Redis: sent together, in one round trip, with its
    next fetch."""

    acks: list[Ack] = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    releases: list[Release] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.failures or self.releases)

    def __len__(self) -> int:
        return len(self.acks) + len(self.failures) + len(self.releases)

    def task_ids(self) -> set[str]:
        return ({a.task_id for a in self.acks} | {f.task_id for f in self.failures}
                | {r.task_id for r in self.releases})

    def prepend(self, older: Outcomes) -> None:
        """Put outcomes that may not have reached Redis back in front of newer ones."""
        self.acks[:0] = older.acks
        self.failures[:0] = older.failures
        self.releases[:0] = older.releases


@dataclasses.dataclass(frozen=True, slots=True)
class Recovered:
    requeued: int
    buried: int
    canceled: int

    def __bool__(self) -> bool:
        return bool(self.requeued or self.buried or self.canceled)


@dataclasses.dataclass(frozen=True, slots=True)
class DueSchedule:
    id: str
    tick_ms: int
    cron: str
    timezone: str
    seconds: bool
    version: bytes      # opaque: handed back to the compare-and-set as read


@dataclasses.dataclass(frozen=True, slots=True)
class DueSchedules:
    now_ms: int
    paused: bool
    next_ms: int        # earliest tick after now, -1 = none
    due: list[DueSchedule]


@dataclasses.dataclass(frozen=True, slots=True)
class TickResult:
    """schedule_tick.lua's answer: code 1 enqueued, 2 skipped (unique), 3 skipped (expired),
    0 lost the compare-and-set, -1 paused, -2 unknown schedule; ``score_ms`` the schedule's
    next tick after the call (-1: none)."""

    code: int
    now_ms: int
    score_ms: int
