"""MemoryState: the records eager mode keeps (coretask/gateway/memory.py) and the transitions
the Lua scripts' shared helpers make on them (_lib.lua: finish, bury, retry_or_bury,
settle_batch, close_batch_if_done, release_continuations, claim_key / release_key), written
once, under one lock, for the gateway methods built on them.

Records use the scripts' field names (``q``, ``tn``, ``st``, ``r``, ``a``, ...; ``_lib.lua``'s key
map), so the introspection code that reads a Redis hash reads these unchanged (:func:`as_hash`).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from ..models import BatchInfo
from ..options import Options
from .records import Ack, Controls, Failure, Release

__all__ = ["MemoryState", "as_hash", "now_ms", "page", "WORKER", "WAITING"]

WORKER = "eager"     # field w of a running task
WAITING = ("queued", "delayed", "waiting")


def now_ms() -> int:
    return int(time.time() * 1000)


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def as_hash(record: dict[str, Any]) -> dict[bytes, bytes]:
    """A record in the form the Redis client returns a hash in (bytes to bytes)."""
    return {k.encode(): _b(v) for k, v in record.items() if v is not None}


def page(items: Sequence[str], start: int, stop: int) -> list[str]:
    """LRANGE's slice: ``stop`` inclusive, negative indexes from the end."""
    n = len(items)
    start, stop = (start + n if start < 0 else start), (stop + n if stop < 0 else stop)
    return list(items[max(start, 0):stop + 1])


class MemoryState:
    """Every record of one eager processor under one re-entrant lock, and the transitions
    shared by the gateway methods. ``on_stop(task_ids)`` is called (last, outside the lock) with
    running tasks that cancel_task / cancel_batch told to stop; ``on_batch_end(info)`` once for
    every batch that ends (both set by coretask/eager.py)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._deadletter = "1" if options.deadletter else "0"
        self._deadletter_schedules = "1" if options.deadletter_schedules else "0"
        self.on_stop: Callable[[list[str]], None] | None = None
        self.on_batch_end: Callable[[BatchInfo], None] | None = None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)       # a task reached its final state
        self._local = threading.local()                       # .ready: ids this thread made ready
        self._tasks: dict[str, dict[str, Any]] = {}
        self._ready: dict[str, dict[str, deque[str]]] = {}    # queue -> tenant -> ids (FIFO)
        self._dead: dict[str, list[str]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._conts: dict[str, list[str]] = {}                # batch -> continuation ids not yet released
        self._batch_ids: dict[str, list[str]] = {}            # batch -> its task ids, in publication order
        self._results: dict[str, list[str]] = {}              # batch -> finished ids that keep results
        self._staged: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        self._publishing: dict[tuple[str, str], list[str]] = {}
        self._idem: dict[str, tuple[str, float | None]] = {}  # key -> (task id, expiry; None while it lives)
        self._stats: dict[str, Counter[str]] = {}
        self._limits: dict[str, int] = {}
        self._paused: set[tuple[str, str]] = set()
        self._schedules: dict[str, dict[str, Any]] = {}
        self._delays: dict[str, list[int]] = {}
        self._ended: list[str] = []
        self._stopping: list[str] = []

    # ========================================================================== storing

    def _store(self, task_id: str, queue: str, tenant: str, payload: bytes, serializer: str, target: str,
               retries: int, due_ms: int, signature: str, controls: Controls, st: str = "queued") -> dict[str, Any]:
        now = now_ms()
        t: dict[str, Any] = dict(q=queue, tn=tenant, p=payload, s=serializer, tg=target, r=retries, a=0, e=now, st=st)
        if due_ms:
            t["d"] = now - due_ms if due_ms < 0 else due_ms     # recorded; eager mode does not wait for it
        if signature:
            t["sg"] = signature
        for name, value in zip(("to", "kr", "kt"), controls.argv()):
            if value:
                t[name] = value
        self._tasks[task_id] = t
        self._stats.setdefault(tenant, Counter())
        return t

    # ============================================================== settling an attempt

    def _complete(self, ack: Ack) -> None:
        t = self._running(ack.task_id, ack.token)
        if t is None:
            return
        self._drop_lease(t)
        if ack.outcome != "ok":
            self._end_canceled(ack.task_id, t, ack.duration_ms)
            return
        self._release_key(ack.task_id)
        self._finish(ack.task_id, t, "succeeded", ack.duration_ms, rv=ack.result or None)
        self._stats[t["tn"]]["done"] += 1
        self._settle(t.get("b"), "done", ack.duration_ms)

    def _fail(self, f: Failure) -> None:
        t = self._running(f.task_id, f.token)
        if t is None:
            return
        self._drop_lease(t)
        if "cx" in t or self._batch_canceled(t.get("b")):
            self._end_canceled(f.task_id, t, f.duration_ms)
            return
        b = self._batches.get(t.get("b") or "")
        if b is not None:
            b["dur"] += f.duration_ms
        left = t["r"] - 1
        if left > 0 and not f.bury:
            t.update(r=left, et=f.error_type, em=f.message, st="queued")
            self._forget_attempt(t)
            self._delays.setdefault(f.task_id, []).append(f.delay_ms)    # recorded, not waited
            self._ready_list(t).append(f.task_id)                         # eager.py runs it again at once
            return
        t["r"] = 0
        held = t.get("ik"), t.get("ikt", 0)
        self._release_key(f.task_id)
        stats = self._stats[t["tn"]]
        stats["failed"] += 1
        error = dict(et=f.error_type, em=f.message, etb=f.traceback)
        keep = self._deadletter_schedules if "sch" in t else self._deadletter
        sched = self._schedules.get(t.get("sch", ""))
        if sched is not None:      # bury (_lib.lua): the schedule tells its runs' failures
            sched.update(nf=sched.get("nf", 0) + 1, lf=now_ms(), le=f"{f.error_type}: {f.message}"[:500],
                         lft=f.task_id)
        if keep == "1":
            stats["dead"] += 1
            now = now_ms()
            t.update(st="dead", da=now, fa=now, du=f.duration_ms, **error)
            if held[0] is not None:
                t.update(xk=held[0], xkt=held[1])       # _reclaim_key, on a retry
            self._dead.setdefault(t["q"], []).append(f.task_id)
            self._notify_done(f.task_id, t)
        else:
            self._finish(f.task_id, t, "failed", f.duration_ms, **error)
        self._settle(t.get("b"), "failed", 0)

    def _release(self, r: Release) -> None:
        t = self._running(r.task_id, r.token)
        if t is not None:
            self._drop_lease(t)
            self._forget_attempt(t)
            t["st"] = "queued"
            self._ready_list(t).appendleft(r.task_id)
            self._ready_here().appendleft(r.task_id)

    def _running(self, task_id: str, token: str) -> dict[str, Any] | None:
        t = self._tasks.get(task_id)
        return t if t is not None and t["st"] == "running" and str(t["a"]) == token else None

    @staticmethod
    def _forget_attempt(t: dict[str, Any]) -> None:
        """Back to work: the last attempt's worker, start and progress go (_lib.lua forget_attempt)."""
        for name in ("w", "ls", "pg", "pt", "pm"):
            t.pop(name, None)

    def _drop_lease(self, t: dict[str, Any]) -> None:
        b = self._batches.get(t.get("b") or "")
        if b is not None:
            b["run"] -= 1

    def _end_canceled(self, task_id: str, t: dict[str, Any], duration_ms: int) -> None:
        self._release_key(task_id)
        self._finish(task_id, t, "canceled", duration_ms)
        if t.get("b"):
            self._settle(t["b"], "canceled", duration_ms)
        else:
            self._stats[t["tn"]]["canceled"] += 1

    def _finish(self, task_id: str, t: dict[str, Any], state: str, duration_ms: int, **extra: Any) -> None:
        """A final state; the record is kept (eager mode's task_retention), the result only
        when the task keeps it (kr), as complete.lua keeps it."""
        t.update(st=state, fa=now_ms(), du=duration_ms, **{k: v for k, v in extra.items() if v is not None})
        if not t.get("kr"):
            t.pop("rv", None)
        self._notify_done(task_id, t)

    def _notify_done(self, task_id: str, t: dict[str, Any]) -> None:
        if t.get("kr") and t.get("b"):
            self._results.setdefault(t["b"], []).append(task_id)
        self._changed.notify_all()

    # ======================================================================= batch bookkeeping

    def _settle(self, batch_id: str | None, field: str, duration_ms: int) -> None:
        b = self._batches.get(batch_id or "")
        if b is None:
            return
        b[field] += 1
        if field == "canceled":
            self._stats[b["tn"]]["canceled"] += 1
        b["dur"] += max(duration_ms, 0)
        b["remaining"] -= 1
        self._close_if_done(batch_id)   # type: ignore[arg-type]

    def _close_if_done(self, batch_id: str) -> None:
        b = self._batches[batch_id]
        if b["remaining"] > 0 or b["state"] != "running":
            return
        state = "failed" if b["failed"] > 0 else "succeeded"
        self._count_batch(b["tn"], "running", state)
        b.update(state=state, ended=now_ms())
        self._ended.append(batch_id)
        self._release_continuations(batch_id)

    def _release_continuations(self, batch_id: str) -> None:
        failed = self._batches[batch_id]["failed"]
        conts = self._conts.get(batch_id, [])
        for cid in list(conts):
            t = self._tasks[cid]
            if t["on"] == "complete" or (t["on"] == "success" and failed == 0):
                conts.remove(cid)
                del t["on"]
                t["st"] = "queued"
                self._push(cid)

    def _count_batch(self, tenant: str, old: str | None, new: str) -> None:
        stats = self._stats.setdefault(tenant, Counter())
        if old:
            stats["b_" + old] -= 1
        stats["b_" + new] += 1

    def _batch_canceled(self, batch_id: str | None) -> bool:
        b = self._batches.get(batch_id or "")
        return b is not None and b["state"] == "canceled"

    def _after(self) -> None:
        """Outside the lock, last: tell eager.py about ended batches and tasks told to stop (the
        latter may raise TaskCanceled into a task that canceled itself)."""
        with self._lock:
            ended, self._ended = self._ended, []
            stopping, self._stopping = self._stopping, []
            infos = [BatchInfo.from_hash(b, as_hash(self._batches[b])) for b in ended]
        if self.on_batch_end is not None:
            for info in infos:
                self.on_batch_end(info)
        if stopping and self.on_stop is not None:
            self.on_stop(stopping)

    # ============================================================= queues and idempotency

    def _ready_here(self) -> deque[str]:
        ready = getattr(self._local, "ready", None)
        if ready is None:
            ready = self._local.ready = deque()
        return ready

    def _ready_list(self, t: dict[str, Any]) -> deque[str]:
        return self._ready.setdefault(t["q"], {}).setdefault(t["tn"], deque())

    def _push(self, task_id: str) -> None:
        """Ready: counted in its queue, and on this thread's list for eager.py to run."""
        self._ready_list(self._tasks[task_id]).append(task_id)
        self._ready_here().append(task_id)

    def _unready(self, task_id: str, t: dict[str, Any]) -> None:
        try:
            self._ready_list(t).remove(task_id)
        except ValueError:
            pass

    def _unqueue(self, task_id: str, t: dict[str, Any]) -> bool:
        """Take a waiting task out of where it waits; False when it does not wait."""
        if t["st"] in ("queued", "delayed"):
            self._unready(task_id, t)
        elif t["st"] == "waiting":
            self._conts.get(t.get("cb", ""), []).remove(task_id)
        else:
            return False
        return True

    def _forget(self, task_id: str) -> None:
        self._release_key(task_id, forget=True)
        self._tasks.pop(task_id, None)

    def _claim(self, name: str, task_id: str) -> str | None:
        held = self._idem.get(name)
        if held is not None:
            holder, expires = held
            if expires is None or expires > time.monotonic():
                return holder
        self._idem[name] = (task_id, None)
        return None

    def _reclaim_key(self, task_id: str) -> None:
        """reclaim_key (_lib.lua): a retried dead letter takes back its key when it is free or
        still names it (key_ttl); a key another task holds meanwhile stays with that task."""
        t = self._tasks[task_id]
        name, ttl = t.pop("xk", None), t.pop("xkt", 0)
        if name is None:
            return
        if self._idem.get(name, ("",))[0] == task_id:
            self._idem[name] = (task_id, None)
        elif self._claim(name, task_id) is not None:
            return
        t.update(ik=name, ikt=ttl)

    def _release_key(self, task_id: str, forget: bool = False) -> None:
        t = self._tasks.get(task_id) or {}
        name = t.pop("ik", None)
        ttl = t.pop("ikt", 0)
        if name is None or self._idem.get(name, ("",))[0] != task_id:
            return
        if ttl and not forget and not self._batch_canceled(t.get("b")):
            self._idem[name] = (task_id, time.monotonic() + ttl / 1000)
        else:
            del self._idem[name]

