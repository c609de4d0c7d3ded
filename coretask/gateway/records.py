"""Typed messages between the gateway and its callers: what a script is told and what it answers.

Positional replies and arguments (the fetch script's runs of 13 values, the acknowledgements'
groups of seven) are turned into and from these records in exactly one place, the gateway
method that calls the script, so the worker never counts positions. A reply entry that cannot be read is never allowed to stop
the worker: parse_fetch_reply reads each task on its own and reports the ones it could not
read as ``Unreadable``, which the worker dead-letters (coretask/worker/loop.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["Ack", "Controls", "DueSchedule", "DueSchedules", "Failure", "FetchReply", "Leased", "Outcomes", "Recovered",
           "Release", "TickResult", "Unreadable", "parse_fetch_reply", "parse_handoff"]

FETCH_FIELDS = 13  # values per task in fetch.lua's reply (see its header)


@dataclasses.dataclass(frozen=True, slots=True)
class Controls:
    """What a task asks of its run besides the call, as stored in its hash (fields to, kr, kt;
    0 = off): its time limit, how long its return value and how long its finished record are
    kept. Scripts that store a task take them as three ARGV values (``argv``)."""

    timeout_ms: int = 0
    keep_result_ms: int = 0
    retain_ms: int = 0

    def argv(self) -> list[int]:
        return [self.timeout_ms, self.keep_result_ms, self.retain_ms]


NO_CONTROLS = Controls()


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
    timeout_ms: int = 0         # field to: the attempt's time limit (0 = none)
    keep_result_ms: int = 0     # field kr: keep the return value this long (0 = not kept)
    due_ms: int = 0             # field d: the due time of a delayed task (0 = none: due at enqueue)


@dataclasses.dataclass(frozen=True, slots=True)
class Overdue:
    """A task that ignored its abort past the grace period (overdue.lua): ``why`` is "canceled"
    (its batch), "task" (cancel_task), "requeue" (a pause that requeues) or "timeout";
    ``ms`` since the abort, ``ran_ms`` since the attempt started (its duration so far)."""

    task_id: str
    why: str
    ms: int
    token: str
    ran_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Unreadable:
    """A task the fetch leased whose reply entry could not be read (``reason`` names the field).
    ``queue`` and ``tenant`` are "" when they could not be read either; ``id`` and ``token``
    are None when even they could not (the lease is then handed back by the worker's check for
    tasks leased to it that it does not know: coretask/worker/maintenance.py)."""

    id: str | None
    token: str | None
    queue: str
    tenant: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class FetchReply:
    paused: bool
    next_due_ms: int        # -1: nothing delayed
    now_ms: int             # the server clock when the script ran
    tasks: list[Leased]
    unreadable: list[Unreadable] = dataclasses.field(default_factory=list)


# fetch.lua's values per task, with the task hash field each comes from ("" where none does)
_ENTRY = (("id", ""), ("attempt", "a"), ("payload", "p"), ("serializer", "s"), ("target", "tg"),
          ("queue", "q"), ("tenant", "tn"), ("batch", "b"), ("retries left", "r"), ("enqueued ms", "e"),
          ("batch fields", ""), ("signature and stored tenant", "sg"), ("time limit and result keeping", "to"))


class _Bad(ValueError):
    pass


def _text(value: Any, position: int) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            pass
    raise _Bad(f"{_label(position)} is not UTF-8 text: {value!r:.60}")


def _int(value: Any, position: int) -> int:
    try:
        if isinstance(value, (bytes, int)) and not isinstance(value, bool):
            return int(value)
    except ValueError:
        pass
    raise _Bad(f"{_label(position)} is not a number: {value!r:.60}")


def _label(position: int) -> str:
    if position == 7:
        return "field 'b' or 'cb' (batch)"
    what, field = _ENTRY[position]
    return f"field '{field}' ({what})" if field else f"the {what}"


def _leased(entry: list[Any], batch_fields: dict[str, list[bytes]]) -> Leased:
    if len(entry) != FETCH_FIELDS:
        raise _Bad(f"the reply holds {len(entry)} values for this task instead of {FETCH_FIELDS}")
    (tid, attempt, payload, ser, target, q, tenant, batch, retries, enqueued, binfo, seal, controls) = entry
    batch_id = _text(batch, 7) or None
    if not isinstance(payload, bytes):
        raise _Bad(f"{_label(2)} is missing")
    if not isinstance(seal, list) or len(seal) != 2:
        raise _Bad(f"{_label(11)} is not a pair: {seal!r:.60}")
    if binfo and not isinstance(binfo, list):
        raise _Bad(f"{_label(10)} is not a list: {binfo!r:.60}")
    signature = _text(seal[0], 11)
    try:
        stored_tenant = seal[1].decode()
    except (AttributeError, UnicodeDecodeError):
        raise _Bad(f"field 'tn' (stored tenant) is not UTF-8 text: {seal[1]!r:.60}") from None
    if not isinstance(controls, list) or len(controls) not in (2, 3):
        raise _Bad(f"{_label(12)} is not a pair or a triple: {controls!r:.60}")
    timeout_ms, keep_ms = (_int(v, 12) if v else 0 for v in controls[:2])
    due_ms = _due(controls[2] if len(controls) == 3 else b"")
    number = _int(attempt, 1)
    leased = Leased(
        id=_text(tid, 0), token=str(number), attempt=number, payload=payload, serializer=_text(ser, 3),
        target=_text(target, 4), queue=_text(q, 5), tenant=_text(tenant, 6), batch_id=batch_id,
        retries_left=_int(retries, 8), enqueued_ms=_int(enqueued, 9) if enqueued else 0,
        batch_fields=(binfo or batch_fields.get(batch_id)) if batch_id else None, signature=signature,
        stored_tenant=stored_tenant, timeout_ms=timeout_ms, keep_result_ms=keep_ms, due_ms=due_ms)
    if binfo and batch_id:
        batch_fields[batch_id] = binfo     # for the batch's later tasks in this reply
    return leased


def _due(value: Any) -> int:
    """Field d as fetch sends it, unchecked: a damaged due time only loses a wait measurement."""
    try:
        return int(value) if value else 0
    except (TypeError, ValueError):
        return 0


def _unreadable(entry: list[Any], reason: str) -> Unreadable:
    def text(position: int) -> str | None:
        try:
            return _text(entry[position], position)
        except (_Bad, IndexError):
            return None

    tid = text(0)
    try:
        token: str | None = str(_int(entry[1], 1))
    except (_Bad, IndexError):
        token = None
    return Unreadable(id=tid, token=token if tid is not None else None, queue=text(5) or "", tenant=text(6) or "",
                      reason=reason)


def parse_fetch_reply(reply: list[Any]) -> FetchReply:
    """fetch.lua's reply as records; the batch fields, sent once per batch per reply, are
    handed to every task of that batch. Each task is read on its own: one that cannot be read
    (fetch.lua checks the record, so only a reply of another version or a field that is not
    UTF-8 text gets here) is reported in ``unreadable`` with the reason, naming the field, and
    the others are unaffected. Only a reply whose first three values do not read raises."""
    tasks = []
    unreadable = []
    batch_fields: dict[str, list[bytes]] = {}
    for i in range(3, len(reply), FETCH_FIELDS):
        entry = reply[i:i + FETCH_FIELDS]
        try:
            tasks.append(_leased(entry, batch_fields))
        except Exception as exc:        # never let one entry stop the others (or the worker)
            unreadable.append(_unreadable(entry, str(exc) if isinstance(exc, _Bad)
                                          else f"{type(exc).__name__}: {exc}"))
    return FetchReply(paused=bool(reply[0]), next_due_ms=int(reply[1]), now_ms=int(reply[2]), tasks=tasks,
                      unreadable=unreadable)


def parse_handoff(packed: bytes) -> FetchReply:
    """A lease handed to an idle worker (enqueue.lua): fetch.lua's reply for one task, packed into
    one list element by _lib.lua pack."""
    values, _ = _unpack(memoryview(packed), 0, len(packed))
    if len(values) != 1 or not isinstance(values[0], list) or len(values[0]) < 3:
        raise ValueError(f"a hand-off is not one array of at least 3 values: {packed!r:.60}")
    reply = values[0]
    return parse_fetch_reply([int(v) for v in reply[:3]] + reply[3:])


def _unpack(data: memoryview, pos: int, end: int) -> tuple[list[Any], int]:
    """The values packed in data[pos:end]: "<length>:<bytes>" each, "[<length>:" before an array."""
    out: list[Any] = []
    while pos < end:
        nested = data[pos] == 0x5B     # "["
        if nested:
            pos += 1
        colon = bytes(data[pos:pos + 21]).index(b":")
        size = int(bytes(data[pos:pos + colon]))
        start = pos + colon + 1
        if size < 0 or start + size > end:
            raise ValueError(f"a packed value of {size} bytes runs past the end of its array")
        out.append(_unpack(data, start, start + size)[0] if nested else bytes(data[start:start + size]))
        pos = start + size
    return out, pos


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """A finished task: succeeded (``ok``) or ended by its abort (``canceled``)."""

    task_id: str
    token: str
    outcome: Literal["ok", "canceled"]
    duration_ms: int
    queue: str = ""         # where the fetch counted the task (Leased.queue / .tenant); "" = unknown
    tenant: str = ""
    result: bytes = b""     # the encoded return value, when the task keeps it (coretask/results.py)


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
    queue: str = ""         # as in Ack
    tenant: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """A task handed back to the head of its queue without consuming a retry."""

    task_id: str
    token: str
    queue: str = ""         # as in Ack
    tenant: str = ""


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
    shard: int = 0      # which shard it came from (Options.shards; gateway/shards.py)


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
    next tick after the call (-1: none); ``task_id`` the run a trigger enqueued ("" otherwise)."""

    code: int
    now_ms: int
    score_ms: int
    task_id: str = ""
