"""Read-only views returned by the introspection API."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

__all__ = ["TaskInfo", "QueueInfo", "BatchInfo", "DeadTask", "QuarantinedTask", "Progress", "TaskOutcome",
           "WorkerState", "HistoryPoint"]

FINISHED = ("succeeded", "failed", "canceled", "dead")   # final states a kept record can show


def ms_to_dt(ms: int | str | bytes | None) -> datetime | None:
    """Epoch milliseconds as an aware UTC datetime; None for an absent or unreadable value (a
    read path shows what it can of a damaged record instead of failing)."""
    if ms in (None, b"", ""):
        return None
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)
    except (ValueError, TypeError, OverflowError, OSError):
        return None


def to_int(value: object, default: int = 0) -> int:
    """A stored counter as an int; ``default`` when absent or unreadable."""
    if value in (None, b"", ""):
        return default
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (ValueError, TypeError):
        return default


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a task reported with ``ctx.set_progress``."""

    done: float
    total: float | None = None
    message: str | None = None

    @property
    def fraction(self) -> float | None:
        """done / total, when the total is known and positive."""
        return self.done / self.total if self.total else None


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A task as stored. ``state``: queued, delayed, running, waiting (a continuation), isolated,
    staged, dead, or, for a finished task whose record is kept (``Options.task_retention`` or
    ``keep_result``), succeeded, failed or canceled. ``attempt`` counts the runs so far;
    ``worker``, ``started_at`` and ``progress`` describe the current (or last) run;
    ``finished_at`` and ``duration`` (seconds) the end; ``error_*`` the last failure (for a task
    waiting for a retry too). ``timed_out``: that failure was its time limit. ``due_at``: when a
    delayed or retrying task becomes ready."""

    id: str
    queue: str
    tenant: str
    target: str
    args_preview: str
    retries_left: int
    enqueued_at: datetime | None
    state: str
    batch_id: str | None = None
    problem: str | None = None      # what is unreadable in the stored record (None: all of it reads)
    attempt: int = 0
    worker: str | None = None
    started_at: datetime | None = None
    progress: Progress | None = None
    finished_at: datetime | None = None
    duration: float | None = None
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    timeout: float | None = None    # the attempt's time limit in seconds (None: no limit)
    due_at: datetime | None = None  # when a delayed (or retrying) task becomes ready

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def timed_out(self) -> bool:
        return self.error_type == "TaskTimeout"


@dataclasses.dataclass(frozen=True)
class DeadTask(TaskInfo):
    dead_at: datetime | None = None


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """One finished task of a batch that kept its results (get_batch_results): ``value`` is the
    return value of a succeeded task; ``error_type`` / ``error_message`` name a failure."""

    task_id: str
    state: str
    value: object = None
    error_type: str = ""
    error_message: str = ""


@dataclasses.dataclass(frozen=True)
class QuarantinedTask:
    """A task whose stored record a script found damaged and could not dead-letter, because not
    even its queue could be read (its key missing or of another Redis type, or no usable queue
    field). It is out of circulation; ``reason`` names what was wrong and where it was met. Its
    record, if any is left, reads with ``get_task``."""

    id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard of the deployment (Options.shards): its key prefix (hash tag) and its tasks
    over every queue."""

    index: int
    prefix: str
    queued: int
    in_flight: int
    delayed: int
    dead: int


@dataclasses.dataclass(frozen=True)
class QueueInfo:
    name: str
    queued: int
    in_flight: int
    delayed: int
    dead: int
    paused: bool


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """A batch's statistics; ``total == done + failed + canceled + remaining`` always holds.
    ``duration`` is the summed run time of its tasks in seconds."""

    id: str
    tenant: str
    scope: str | None
    queue: str
    state: str
    total: int
    done: int
    failed: int
    canceled: int
    remaining: int
    running: int
    duration: float
    created: datetime | None
    started: datetime | None
    ended: datetime | None

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @classmethod
    def from_hash(cls, batch_id: str, h: dict[bytes, bytes]) -> BatchInfo:
        def s(k: str) -> str:
            return h.get(k.encode(), b"").decode(errors="replace")

        def n(k: str) -> int:
            return to_int(h.get(k.encode()))

        return cls(id=batch_id, tenant=s("tn"), scope=s("sc") or None, queue=s("q"), state=s("state"),
                   total=n("total"), done=n("done"), failed=n("failed"), canceled=n("canceled"),
                   remaining=n("remaining"), running=max(n("run"), 0), duration=n("dur") / 1000,
                   created=ms_to_dt(h.get(b"created")), started=ms_to_dt(h.get(b"started")),
                   ended=ms_to_dt(h.get(b"ended")))


@dataclasses.dataclass(frozen=True)
class WorkerState:
    """A worker process as its heartbeat shows it: ``host`` and ``pid`` come from its id
    (``host:pid:suffix``; a manager's children share the manager's pid in their ids),
    ``running`` is how many tasks it holds now, ``heartbeat_age`` the seconds since its last
    heartbeat (renewed every lease renewal; a worker past ``Options.invisibility`` is gone).
    ``threads``, ``queues``, ``started`` and ``memory`` (resident bytes) are what the process
    last reported about itself every few seconds; None (empty) until its first report.
    ``manager`` is "<host>:<manager pid>" from its id (None for an id of another form), what
    pause_worker takes besides the host; ``paused``: its host or its manager is paused."""

    id: str
    host: str
    pid: int | None
    running: int
    heartbeat_age: float
    last_heartbeat: datetime | None
    threads: int | None = None
    queues: tuple[str, ...] = ()
    started: datetime | None = None
    memory: int | None = None
    manager: str | None = None
    paused: bool = False


def worker_scopes(worker_id: str) -> tuple[str, str | None]:
    """The host and the manager ("<host>:<pid>") of a worker process id
    "<host>:<manager pid>:<suffix>": what pause_worker can name (_lib.lua worker_paused reads
    an id the same way); (id, None) for an id of another form."""
    host, sep, rest = worker_id.rpartition(":")
    host, sep2, pid = host.rpartition(":")
    if not sep or not sep2 or not host or not pid.isdigit():
        return worker_id, None
    return host, f"{host}:{pid}"


@dataclasses.dataclass(frozen=True)
class HistoryPoint:
    """Attempts that ended (``processed``: succeeded, failed or canceled) and failed in the
    ``minutes`` minutes starting at ``start`` (UTC)."""

    start: datetime
    minutes: int
    processed: int
    failed: int
