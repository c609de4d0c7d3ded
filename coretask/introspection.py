"""Read-only queries of a TaskProcessor: queues, tasks, dead letters, batches, workers.

Reads are plain commands (pipelined), never scripts: they change nothing, and a snapshot that is
a few milliseconds stale is fine for a dashboard.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, ResultCanceled, ResultPending, ResultUnavailable, TaskFailed
from .models import (BatchInfo, DeadTask, Progress, QuarantinedTask, QueueInfo, TaskInfo, TaskOutcome, WorkerState,
                     HistoryPoint, ShardInfo, ms_to_dt, to_int, worker_scopes)
from .options import Options, check_id, check_page, check_queue_name, check_tenant, wait_seconds
from .results import decode_result

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["Introspection"]

PREVIEW = 120
WAIT_SLICE = 5.0     # seconds per blocking wait of get_result (well under the socket timeout)
HISTORY_MINUTES = 24 * 60   # how far back the per-minute history goes (its keys expire after 25 h)
FILTER_SCAN = 1000   # running/delayed entries examined per call when filtering by queue or tenant


class Introspection:
    gateway: Gateway
    options: Options

    def get_queues(self) -> list[QueueInfo]:
        return [self.get_queue(n) for n in self.gateway.queue_names()]

    def get_shards(self) -> list[ShardInfo]:
        """Each shard's prefix and task counts over every queue (one row unless Options.shards
        is above 1), read from the counters the scripts keep."""
        out = []
        for i, g in enumerate(self.gateway.parts()):
            rows = [g.queue_counts(q) for q in g.queue_names()]
            out.append(ShardInfo(index=i, prefix=g.keys.prefix, queued=sum(r[0] for r in rows),
                                 in_flight=sum(r[1] for r in rows), delayed=sum(r[2] for r in rows),
                                 dead=sum(r[3] for r in rows)))
        return out

    def get_queue(self, name: str) -> QueueInfo:
        ready, inflight, delayed, dead, paused = self.gateway.queue_counts(check_queue_name(name))
        return QueueInfo(name=name, queued=ready, in_flight=inflight, delayed=delayed, dead=dead, paused=paused)

    def get_tasks_in_queue(self, queue: str, skip: int = 0, take: int = 25) -> list[TaskInfo]:
        """Ready tasks of a queue, tenant by tenant (tenants in name order, FIFO within one)."""
        check_page(skip, take)
        gw = self.gateway
        ids: list[str] = []
        tenants = gw.queue_tenants(check_queue_name(queue))
        for tenant, n in zip(tenants, gw.ready_counts(queue, tenants)):     # one round trip for all counts
            if len(ids) >= take:
                break
            if skip >= n:
                skip -= n
                continue
            ids += gw.ready_ids(queue, tenant, skip, skip + take - len(ids) - 1)
            skip = 0
        return [t for t in self._tasks(ids, TaskInfo) if t is not None]

    def get_dead_tasks(self, queue: str, skip: int = 0, take: int = 25) -> list[DeadTask]:
        check_page(skip, take)
        ids = self.gateway.dead_ids(check_queue_name(queue), skip, skip + take - 1)
        return [t for t in self._tasks(ids, DeadTask) if t is not None]

    def get_running_tasks(self, skip: int = 0, take: int = 25, queue: str | None = None,
                          tenant: str | None = None) -> list[TaskInfo]:
        """Running tasks, soonest lease deadline first. Filtered by ``queue`` / ``tenant``, the
        filter looks at the first FILTER_SCAN running tasks past ``skip`` (running tasks are
        bounded by the workers' threads, so that is all of them in any usual deployment)."""
        check_page(skip, take)
        if queue is None and tenant is None:
            ids, _ = self.gateway.leased_page(skip, skip + take - 1)
            return [t for t in self._tasks(ids, TaskInfo) if t is not None]
        ids, _ = self.gateway.leased_page(0, skip + FILTER_SCAN - 1)
        return self._filtered(ids, skip, take, queue, tenant)

    def get_running_count(self) -> int:
        return self.gateway.leased_page(0, 0)[1]

    def get_delayed_tasks(self, skip: int = 0, take: int = 25, queue: str | None = None,
                          tenant: str | None = None) -> list[TaskInfo]:
        """Delayed and retrying tasks, soonest due first (filtered as get_running_tasks does)."""
        check_page(skip, take)
        if queue is None and tenant is None:
            rows, _ = self.gateway.delayed_page(skip, skip + take - 1)
            return [t for t in self._tasks([i for i, _ in rows], TaskInfo) if t is not None]
        rows, _ = self.gateway.delayed_page(0, skip + FILTER_SCAN - 1)
        return self._filtered([i for i, _ in rows], skip, take, queue, tenant)

    def _filtered(self, ids: list[str], skip: int, take: int, queue: str | None, tenant: str | None) -> list[TaskInfo]:
        """The page ``skip:skip+take`` of the tasks among ``ids`` in ``queue`` / of ``tenant``:
        two fields read per candidate, whole records for the page only."""
        mine = [i for i, (q, tn) in zip(ids, self.gateway.task_places(ids))
                if (queue is None or q == queue) and (tenant is None or tn == tenant)]
        return [t for t in self._tasks(mine[skip:skip + take], TaskInfo) if t is not None]

    def get_delayed_count(self) -> int:
        return self.gateway.delayed_page(0, 0)[1]

    def get_quarantined(self, skip: int = 0, take: int = 25) -> list[QuarantinedTask]:
        """Tasks taken out of circulation because their records were damaged beyond a dead
        letter (not even the queue readable), oldest first, each with the reason."""
        check_page(skip, take)
        return [QuarantinedTask(id=i, reason=why) for i, why in self.gateway.quarantined(skip, take)]

    def get_quarantined_count(self) -> int:
        return self.gateway.quarantine_count()

    def get_task(self, task_id: str) -> TaskInfo | None:
        """The task's state: queued, delayed, running (worker, started, attempt, progress),
        dead, or finished when its record is kept (Options.task_retention, keep_result); None
        when unknown or no longer kept. A dead task reads as a DeadTask."""
        return self._tasks([check_id("task", task_id)], None)[0]

    def get_result(self, task_id: str, wait: timedelta | float | None = None, tenant: str | None = None) -> Any:
        """The return value of a task that keeps its result (``keep_result=`` or
        ``Options.result_ttl``). Raises TaskFailed for a task that failed for good (its last
        error; ``error_type == "TaskTimeout"`` for a time-out), ResultCanceled for a canceled one; ResultPending while it has not finished (with ``wait`` seconds:
        after blocking that long, woken the moment it finishes); ResultUnavailable when the task
        is unknown (or another ``tenant``'s), its result was not kept, or has expired."""
        check_id("task", task_id)
        deadline = None if wait is None else time.monotonic() + wait_seconds("wait", wait)
        while True:
            (h,) = self.gateway.task_hashes([task_id])
            if isinstance(h, str) or not h or (tenant is not None and h.get(b"tn", b"").decode() != tenant):
                raise ResultUnavailable(f"task {task_id} is unknown, or its record has expired (a task that "
                                        "does not keep its result leaves no record once it finished: enqueue it "
                                        "with keep_result=... or set Options.result_ttl)")
            state = h.get(b"st", b"").decode()
            if state in ("succeeded", "failed", "canceled", "dead"):
                return self._outcome(task_id, state, h)
            if not to_int(h.get(b"kr")):    # said while it runs: polling would end in "unknown"
                raise ResultUnavailable(f"task {task_id} does not keep its result: enqueue it with keep_result=... "
                                        "(or set Options.result_ttl) to read it with get_result")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is None or remaining <= 0:
                raise ResultPending(f"task {task_id} has not finished (it is {state or 'unknown'})")
            self.gateway.wait_finished(task_id, min(remaining, WAIT_SLICE))

    def get_batch_results(self, batch_id: str, skip: int = 0, take: int = 100) -> list[TaskOutcome]:
        """The finished tasks of a batch whose tasks keep their results, in the order they
        finished (a continuation reads them page by page); values of expired records are gone,
        and tasks that keep no result are not listed. ResultUnavailable for a batch id that is
        unknown (or expired): a mistyped id must not read as "no results yet"."""
        check_page(skip, take)
        ids = self.gateway.batch_result_ids(check_id("batch", batch_id), skip, skip + take - 1)
        if not ids and self.get_batch(batch_id) is None:
            raise ResultUnavailable(f"batch {batch_id} is unknown, or its record has expired")
        out = []
        for task_id, h in zip(ids, self.gateway.task_hashes(ids)):
            if isinstance(h, str) or not h:
                continue
            state = h.get(b"st", b"").decode()
            try:
                out.append(TaskOutcome(task_id, state, self._outcome(task_id, state, h)))
            except TaskFailed as exc:
                out.append(TaskOutcome(task_id, state, None, exc.error_type, exc.error_message))
            except ResultCanceled as exc:
                out.append(TaskOutcome(task_id, state, None, "TaskCanceled", str(exc)))
            except ResultUnavailable as exc:
                out.append(TaskOutcome(task_id, state, None, "ResultUnavailable", str(exc)))
        return out

    def _outcome(self, task_id: str, state: str, h: dict[bytes, bytes]) -> Any:
        """A finished record's value, or the exception its outcome stands for."""
        if state == "succeeded":
            if b"rv" not in h:
                raise ResultUnavailable(f"task {task_id} succeeded; its result was not kept (keep_result=...)")
            # a record kept longer by Options.task_retention still holds the value: keep_result
            # is its reader's promise, so the value reads as expired once keep_result has passed
            finished_ms = to_int(h.get(b"fa"))
            kept_until = finished_ms + to_int(h.get(b"kr"))
            if finished_ms and kept_until < time.time() * 1000:
                raise ResultUnavailable(f"task {task_id} succeeded; its result expired at "
                                        f"{ms_to_dt(kept_until):%Y-%m-%d %H:%M:%S} UTC (keep_result)")
            return decode_result(task_id, h[b"rv"], self.options)
        if state == "canceled":
            raise ResultCanceled(f"task {task_id} was canceled: it has no result")
        etype, message = h.get(b"et", b"").decode(errors="replace"), h.get(b"em", b"").decode(errors="replace")
        raise TaskFailed(f"task {task_id} failed: {etype}: {message}", task_id=task_id, error_type=etype,
                         error_message=message, traceback=h.get(b"etb", b"").decode(errors="replace"))

    def _tasks(self, ids: list[str], cls: type | None) -> list[Any]:
        """Task views, None for a task that no longer exists. Any stored value reads: a field
        that is damaged (or a key of the wrong type) is named in ``problem``, never raised.
        ``cls`` None: DeadTask for a dead task, TaskInfo for any other."""
        out = []
        for i, h in self.gateway.tasks_as_they_are(ids):    # a task rebalance moved: its new id
            if isinstance(h, str):          # the key holds another Redis type
                out.append((cls or TaskInfo)(id=i, queue="", tenant="", target="", args_preview="", retries_left=0,
                               enqueued_at=None, state="unreadable", problem=h))
                continue
            if not h:
                out.append(None)
                continue
            out.append(_task_view(i, h, cls or (DeadTask if h.get(b"st") == b"dead" else TaskInfo)))
        return out

    # ------------------------------------------------------------------------------ batches

    def get_batch(self, batch_id: str, tenant: str | None = None) -> BatchInfo | None:
        """The batch's statistics, or None when unknown (or, with ``tenant``, another tenant's)."""
        h = self.gateway.batch_hash(check_id("batch", batch_id))
        if not h or b"tn" not in h or (tenant is not None and h[b"tn"].decode() != tenant):
            return None
        return BatchInfo.from_hash(batch_id, h)

    def get_batch_continuations(self, batch_id: str, take: int = 100, *, tenant: str | None = None) -> list[TaskInfo]:
        """The batch's continuations that have not been released yet (they run once it
        finishes); [] when unknown or (with ``tenant``) another tenant's."""
        check_page(0, take)
        if self.get_batch(batch_id, tenant) is None:
            return []
        ids = self.gateway.continuation_ids(batch_id, 0, take - 1)
        return [t for t in self._tasks(ids, TaskInfo) if t is not None]

    def get_batch_tasks(self, batch_id: str, skip: int = 0, take: int = 25, *,
                        tenant: str | None = None) -> list[TaskInfo]:
        """The batch's tasks in the order they were published to their queues (queued, delayed,
        running, dead, or finished and kept), ``skip``/``take`` over that order; a task whose
        record is gone (finished and not kept, or deleted) is left out, so a page may hold
        fewer than ``take``. [] when unknown or (with ``tenant``) another tenant's."""
        check_page(skip, take)
        if self.get_batch(batch_id, tenant) is None:
            return []
        ids, _ = self.gateway.batch_task_ids(batch_id, skip, skip + take - 1)
        return [t for t in self._tasks(ids, TaskInfo) if t is not None]

    def get_batches(self, tenant: str, skip: int = 0, take: int = 25) -> list[BatchInfo]:
        """A tenant's batches, newest first."""
        check_page(skip, take)
        return [BatchInfo.from_hash(b, h) for b, h in self.gateway.batch_page(check_tenant(tenant), skip, take)]

    def get_batches_count(self, tenant: str) -> int:
        return self.gateway.batch_count(check_tenant(tenant))

    def get_worker_states(self) -> list[WorkerState]:
        """Every worker process with a heartbeat: host, pid, tasks it holds, heartbeat age, and
        what it reports about itself (threads, queues, start, memory); ordered by id (so a
        host's processes sit together)."""
        beats = sorted(self.gateway.worker_heartbeats().items())
        details = self.gateway.worker_details([w for w, _ in beats])
        paused = set(self.gateway.paused_workers())
        now = time.time() * 1000
        out = []
        for (wid, hb), (running, info) in zip(beats, details):
            host, manager = worker_scopes(wid)
            pid = info.get("pid") or (manager or "").rpartition(":")[2]
            out.append(WorkerState(
                id=wid, host=info.get("host") or host, pid=int(pid) if pid.isdigit() else None, running=running,
                heartbeat_age=max(now - hb, 0) / 1000, last_heartbeat=ms_to_dt(hb),
                threads=to_int(info["threads"]) if "threads" in info else None,
                queues=tuple(q for q in info.get("queues", "").split(",") if q),
                started=ms_to_dt(info.get("started")), memory=to_int(info["rss"]) if "rss" in info else None,
                manager=manager, paused=host in paused or manager in paused))
        return out

    def get_history(self, minutes: int = 60, step: int = 1, queue: str | None = None) -> list[HistoryPoint]:
        """Attempts ended and failed per ``step`` minutes over the last ``minutes`` minutes
        (at most 24 hours), oldest first, the current minute last; all queues, or one. Read
        from per-minute counters the scripts keep (never scanned)."""
        if not 1 <= minutes <= HISTORY_MINUTES or step < 1 or minutes % step:
            raise ConfigurationError(f"get_history: minutes must be 1..{HISTORY_MINUTES} and a multiple of step "
                                     f"(got minutes={minutes}, step={step})")
        now_minute = self.gateway.server_time_ms() // 60000
        first = now_minute - minutes + 1
        rows = self.gateway.history(range(first, now_minute + 1))
        points = []
        for i in range(0, minutes, step):
            processed = failed = 0
            for h in rows[i:i + step]:
                for field, n in h.items():
                    kind, _, q = field.partition(":")
                    if queue is None or q == queue:
                        processed += n if kind == "p" else 0
                        failed += n if kind == "f" else 0
            start = datetime.fromtimestamp((first + i) * 60, tz=timezone.utc)
            points.append(HistoryPoint(start, step, processed, failed))
        return points

    def get_workers(self) -> dict[str, float]:
        """Worker ids with the age in seconds of their last heartbeat."""
        now = time.time() * 1000
        return {w: (now - hb) / 1000 for w, hb in self.gateway.worker_heartbeats().items()}


NUMERIC = {"r": "retries", "e": "enqueued", "da": "dead at", "a": "attempt", "ls": "lease start",
           "fa": "finished at", "du": "duration", "to": "time limit"}


def _task_view(task_id: str, h: dict[bytes, bytes], cls: type) -> Any:
    s = {key.decode(errors="replace"): (v.decode(errors="replace") if key != b"p" else v) for key, v in h.items()}
    problems = [f"field {f!r} ({what}) is not a number: {s[f][:40]!r}" for f, what in NUMERIC.items()
                if f in s and not _is_int(s[f])]
    for f, what in (("q", "queue"), ("tn", "tenant"), ("tg", "target")):
        if not s.get(f):
            problems.append(f"field {f!r} ({what}) is missing")
    preview = _preview(s.get("p", b""), s.get("s", ""))
    if preview.startswith("<unreadable"):
        problems.append(f"payload: {preview[1:-1]}")
    fields: dict[str, Any] = dict(
        id=task_id, queue=s.get("q", ""), tenant=s.get("tn", ""), target=s.get("tg", ""), args_preview=preview,
        retries_left=to_int(s.get("r")), enqueued_at=ms_to_dt(s.get("e")), state=s.get("st", ""),
        batch_id=s.get("b") or None, problem="; ".join(problems) or None, attempt=to_int(s.get("a")),
        worker=s.get("w") or None, started_at=ms_to_dt(s.get("ls")), progress=_progress(s),
        finished_at=ms_to_dt(s.get("fa")), duration=to_int(s.get("du")) / 1000 if "du" in s else None,
        error_type=s.get("et", ""), error_message=s.get("em", ""), traceback=s.get("etb", ""),
        timeout=to_int(s.get("to")) / 1000 if s.get("to") else None,
        due_at=ms_to_dt(s.get("d")) if s.get("st") == "delayed" else None)
    if cls is DeadTask:
        fields.update(dead_at=ms_to_dt(s.get("da")))
    return cls(**fields)


def _progress(s: dict[str, Any]) -> Progress | None:
    if "pg" not in s:
        return None
    try:
        return Progress(_number(s["pg"]), _number(s["pt"]) if s.get("pt") else None, s.get("pm") or None)
    except ValueError:
        return None


def _number(text: str) -> float:
    """A progress figure as the task gave it: set_progress(8, 20) reads back 8 and 20, not 8.0."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _preview(payload: bytes | str, serializer: str) -> str:
    if serializer == "json":
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            text = json.dumps({"args": doc.get("a", []), "kwargs": doc.get("k", {})}, ensure_ascii=False)
        except ValueError as exc:
            text = f"<unreadable payload: {str(exc)[:60]}>"
    else:
        text = f"<{len(payload)} bytes, {serializer}>"
    return text if len(text) <= PREVIEW else text[:PREVIEW - 1] + "…"
