"""Read-only queries of a TaskProcessor: queues, tasks, dead letters, batches, workers.

Reads are plain commands (pipelined), never scripts: they change nothing, and a snapshot that is
a few milliseconds stale is fine for a dashboard.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from .models import BatchInfo, DeadTask, QuarantinedTask, QueueInfo, TaskInfo, ms_to_dt, to_int
from .options import check_queue_name, check_tenant

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["Introspection"]

PREVIEW = 120


class Introspection:
    gateway: Gateway

    def get_queues(self) -> list[QueueInfo]:
        return [self.get_queue(n) for n in self.gateway.queue_names()]

    def get_queue(self, name: str) -> QueueInfo:
        ready, inflight, delayed, dead, paused = self.gateway.queue_counts(check_queue_name(name))
        return QueueInfo(name=name, queued=ready, in_flight=inflight, delayed=delayed, dead=dead, paused=paused)

    def get_tasks_in_queue(self, queue: str, skip: int = 0, take: int = 25) -> list[TaskInfo]:
        """Ready tasks of a queue, tenant by tenant (tenants in name order, FIFO within one)."""
        gw = self.gateway
        ids: list[str] = []
        for tenant in gw.queue_tenants(check_queue_name(queue)):
            if len(ids) >= take:
                break
            n = gw.ready_count(queue, tenant)
            if skip >= n:
                skip -= n
                continue
            ids += gw.ready_ids(queue, tenant, skip, skip + take - len(ids) - 1)
            skip = 0
        return [t for t in self._tasks(ids, TaskInfo) if t is not None]

    def get_dead_tasks(self, queue: str, skip: int = 0, take: int = 25) -> list[DeadTask]:
        ids = self.gateway.dead_ids(check_queue_name(queue), skip, skip + take - 1)
        return [t for t in self._tasks(ids, DeadTask) if t is not None]

    def get_quarantined(self, skip: int = 0, take: int = 25) -> list[QuarantinedTask]:
        """Tasks taken out of circulation because their records were damaged beyond a dead
        letter (not even the queue readable), oldest first, each with the reason."""
        return [QuarantinedTask(id=i, reason=why) for i, why in self.gateway.quarantined(skip, take)]

    def get_quarantined_count(self) -> int:
        return self.gateway.quarantine_count()

    def get_task(self, task_id: str) -> TaskInfo | None:
        return self._tasks([task_id], DeadTask)[0]

    def _tasks(self, ids: list[str], cls: type) -> list[Any]:
        """Task views, None for a task that no longer exists. Any stored value reads: a field
        that is damaged (or a key of the wrong type) is named in ``problem``, never raised."""
        out = []
        for i, h in zip(ids, self.gateway.task_hashes(ids)):
            if isinstance(h, str):          # the key holds another Redis type
                out.append(cls(id=i, queue="", tenant="", target="", args_preview="", retries_left=0,
                               enqueued_at=None, state="unreadable", problem=h))
                continue
            if not h:
                out.append(None)
                continue
            out.append(_task_view(i, h, cls))
        return out

    # ------------------------------------------------------------------------------ batches

    def get_batch(self, batch_id: str, tenant: str | None = None) -> BatchInfo | None:
        """The batch's statistics, or None when unknown (or, with ``tenant``, another tenant's)."""
        h = self.gateway.batch_hash(batch_id)
        if not h or b"tn" not in h or (tenant is not None and h[b"tn"].decode() != tenant):
            return None
        return BatchInfo.from_hash(batch_id, h)

    def get_batches(self, tenant: str, skip: int = 0, take: int = 25) -> list[BatchInfo]:
        """A tenant's batches, newest first."""
        return [BatchInfo.from_hash(b, h) for b, h in self.gateway.batch_page(check_tenant(tenant), skip, take)]

    def get_batches_count(self, tenant: str) -> int:
        return self.gateway.batch_count(check_tenant(tenant))

    def get_workers(self) -> dict[str, float]:
        """Worker ids with the age in seconds of their last heartbeat."""
        now = time.time() * 1000
        return {w: (now - hb) / 1000 for w, hb in self.gateway.worker_heartbeats().items()}


NUMERIC = {"r": "retries", "e": "enqueued", "da": "dead at"}


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
        batch_id=s.get("b") or None, problem="; ".join(problems) or None)
    if cls is DeadTask:
        fields.update(error_type=s.get("et", ""), error_message=s.get("em", ""),
                      traceback=s.get("etb", ""), dead_at=ms_to_dt(s.get("da")))
    return cls(**fields)


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
