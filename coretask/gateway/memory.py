"""MemoryGateway: the gateway of eager mode (``Options(eager=True)``), holding in this process's
memory what the Lua scripts keep in Redis, so that the API above it runs unchanged.

Why a gateway and not a branch in the client: everything a real enqueue does above the gateway
(queue and tenant checks, encoding, signature binding, size limit, allow-list, pickle policy,
signing, idempotency keys, batch staging, ``before_enqueue`` / ``after_enqueue``) runs as it is,
and every read (get_task, get_result, get_batch, get_batch_results, get_queue, tenant stats)
reads records written in the scripts' own field layout (``_lib.lua``'s key map), so
introspection needs no second implementation. The store never runs a task: it queues what an
enqueue made ready on a list of the calling thread, and ``coretask/eager.py`` (which owns a
worker's runner) takes them from there with :meth:`take_ready`. A real TaskProcessor never
builds this class, so eager mode costs nothing when it is off.

Kept as the scripts keep it: task states (queued, running, succeeded, failed, canceled, dead,
waiting continuations), retries consuming the field ``r``, dead letters, batch counters with
``total == done + failed + canceled + remaining``, continuations, cancel and delete, dead
retries, idempotency keys with key_ttl, progress, results (``rv``, only when kept: keep_result /
result_ttl, as in production), schedules (stored, never ticked; ``trigger_schedule`` enqueues a
run). Different on purpose: finished records are kept for the life of the processor (as if
``task_retention`` were set), so get_task shows how every task ended; a ``delay_until`` is
recorded (field ``d``) and not waited; nothing expires except idempotency keys; pause flags are
stored but hold nothing back. Worker-side calls (fetch, leases, recovery) do not exist here.

Three modules: this one has the methods that change state; memory_state.py the records and the
transitions the scripts share (_lib.lua); memory_reads.py the reads, pause flags and schedules.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigurationError
from ..options import Options
from .gateway import Gateway
from .keys import Keys
from .memory_reads import MemoryReads
from .memory_state import WAITING, WORKER, as_hash, now_ms
from .records import NO_CONTROLS, Controls, Leased, Outcomes

__all__ = ["MemoryGateway"]


class _NoRedis:
    """Stands where the Redis client and transport would be: a Gateway method this class does
    not emulate (a worker's fetch, lease renewal, pub/sub) ends here with an error that says why."""

    def __getattr__(self, name: str) -> Any:
        raise ConfigurationError(
            "this TaskProcessor runs in eager mode (Options(eager=True)): it has no Redis, and what needs one (a "
            "worker, the admin CLI, pub/sub) is not available; test that against a real server (the pytest "
            "plugin's coretask_processor fixture and coretask.testing.drain)")


class _Sent:
    """The reply of a staging call, already there (BatchBuilder reads it with result())."""

    def result(self) -> None:
        return None


class MemoryGateway(MemoryReads, Gateway):
    """The gateway of eager mode: every method the API calls, on the records of MemoryState.
    Thread-safe. Methods of Gateway it does not override (a worker's) raise ConfigurationError."""

    handoffs = False

    def __init__(self, options: Options) -> None:     # not Gateway.__init__: no transport, no connection
        super().__init__(options)
        self.keys = Keys(options.prefix)
        self.url = "memory (Options.eager)"
        self.transport = self._redis = _NoRedis()        # type: ignore[assignment]

    def close(self) -> None:
        """Nothing to close: the memory goes with the processor."""

    def check_shard_count(self, shards: int = 1) -> None:
        """One process's memory: no deployment to compare with."""

    # ================================================================= what eager.py reads

    def take_ready(self) -> str | None:
        """The next task this thread made ready (FIFO), or None."""
        ready = self._ready_here()
        return ready.popleft() if ready else None

    def lease(self, task_id: str) -> Leased | None:
        """Start an attempt of a queued task (attempt + 1, state running), as fetch.lua does;
        None when it no longer waits (canceled, deleted or already run)."""
        with self._lock:
            t = self._tasks.get(task_id)
            if t is None or t["st"] != "queued":
                return None
            self._unready(task_id, t)
            if self._batch_canceled(t.get("b")):
                self._forget(task_id)
                return None
            now = now_ms()
            t.update(st="running", a=t["a"] + 1, w=WORKER, ls=now)
            batch_id = t.get("b") or t.get("cb")
            fields = None
            if batch_id and batch_id in self._batches:
                b = self._batches[batch_id]
                if t.get("b"):
                    b["run"] += 1
                    b.setdefault("started", now)
                fields = [x for k, v in as_hash(b).items() for x in (k, v)]
            return Leased(id=task_id, token=str(t["a"]), attempt=t["a"], payload=t["p"], serializer=t["s"],
                          target=t["tg"], queue=t["q"], tenant=t["tn"], batch_id=batch_id, retries_left=t["r"],
                          enqueued_ms=t["e"], batch_fields=fields, signature=t.get("sg", ""), stored_tenant=t["tn"],
                          timeout_ms=t.get("to", 0), keep_result_ms=t.get("kr", 0))

    def state_of(self, task_id: str) -> str | None:
        t = self._tasks.get(task_id)
        return t["st"] if t is not None else None

    def retry_delays(self, task_id: str) -> list[int]:
        """The delays in ms on_task_failed_delay gave the task's retries (0: at once), in order."""
        return list(self._delays.get(task_id, ()))

    def send_outcomes(self, worker_id: str, outcomes: Outcomes) -> None:
        """What a runner reported, settled as complete.lua, fail.lua and release.lua settle it."""
        with self._lock:
            for ack in outcomes.acks:
                self._complete(ack)
            for failure in outcomes.failures:
                self._fail(failure)
            for release in outcomes.releases:
                self._release(release)
        self._after()

    # ========================================================================== enqueue

    def enqueue(self, task_id: str, queue: str, tenant: str, payload: bytes, serializer: str, target: str,
                retries: int, due_ms: int, signature: str, controls: Controls = NO_CONTROLS) -> int:
        with self._lock:
            if task_id in self._tasks:
                return -1
            self._store(task_id, queue, tenant, payload, serializer, target, retries, due_ms, signature, controls)
            self._push(task_id)
        return 1

    def enqueue_keyed(self, task_id: str, queue: str, tenant: str, payload: bytes, serializer: str, target: str,
                      retries: int, due_ms: int, signature: str, key: str, key_ttl_ms: int,
                      controls: Controls = NO_CONTROLS) -> str | None:
        with self._lock:
            name = self.keys.idempotency(tenant, key)
            holder = self._claim(name, task_id)
            if holder is not None:
                return holder
            t = self._store(task_id, queue, tenant, payload, serializer, target, retries, due_ms, signature, controls)
            t.update(ik=name, ikt=key_ttl_ms)
            self._push(task_id)
        return None

    # =========================================================================== batches

    def stage_batch(self, batch_id: str, stage: str, ttl_ms: int, shapes: Sequence[tuple[Any, ...]],
                    chunk: Sequence[Any]) -> Any:
        with self._lock:
            for i in range(0, len(chunk), 4):
                tid, number, payload, signature = chunk[i:i + 4]
                self._stage(batch_id, stage, shapes[number - 1], tid, payload, signature)
        return _Sent()

    def stage_keyed(self, batch_id: str, stage: str, ttl_ms: int, shape: tuple[Any, ...], entry: Sequence[Any],
                    key: str, key_ttl_ms: int) -> str | None:
        with self._lock:
            name = self.keys.idempotency(shape[1], key)
            holder = self._claim(name, entry[0])
            if holder is not None:
                return holder
            self._stage(batch_id, stage, shape, entry[0], entry[2], entry[3]).update(ik=name, ikt=key_ttl_ms)
        return None

    def _stage(self, batch_id: str, stage: str, shape: tuple[Any, ...], task_id: str, payload: bytes,
               signature: str) -> dict[str, Any]:
        queue, tenant, serializer, target, retries, due_ms, on, controls = shape
        t = self._store(task_id, queue, tenant, payload, serializer, target, retries, due_ms, signature, controls,
                        st="staged")
        tasks, conts = self._staged.setdefault((batch_id, stage), ([], []))
        if on:
            t.update(on=on, cb=batch_id)
            conts.append(task_id)
        else:
            t["b"] = batch_id
            tasks.append(task_id)
        return t

    def commit_batch(self, batch_id: str, stage: str, tenant: str, queue: str, scope: str, mode: str,
                     tasks: int, continuations: int, cancel_key: str) -> int:
        with self._lock:
            staged, conts = self._staged.pop((batch_id, stage), ([], []))
            b = self._batches.get(batch_id)
            if mode == "append":
                if b is None or b["tn"] != tenant or b["state"] == "canceled":
                    self._staged[(batch_id, stage)] = (staged, conts)     # abort_stage removes them
                    return 0
                if staged and b["state"] != "running":       # re-opened; continuations that ran are gone
                    self._count_batch(tenant, b["state"], "running")
                    b["state"] = "running"
                    b.pop("ended", None)
            else:
                b = self._batches[batch_id] = dict(tn=tenant, q=queue, sc=scope, state="running", ck=cancel_key,
                                                   created=now_ms(), total=0, done=0, failed=0, canceled=0,
                                                   remaining=0, run=0, dur=0)
                self._count_batch(tenant, None, "running")
            b["total"] += len(staged)
            b["remaining"] += len(staged)
            for cid in conts:
                self._tasks[cid]["st"] = "waiting"
                self._conts.setdefault(batch_id, []).append(cid)
            if staged:
                self._publishing[(batch_id, stage)] = staged
            if b["state"] == "running":
                self._close_if_done(batch_id)
            elif conts:
                self._release_continuations(batch_id)
        self._after()
        return 1

    def publish_batch(self, batch_id: str, stage: str, chunk: int = 0) -> None:
        with self._lock:
            ids = self._publishing.pop((batch_id, stage), [])
            canceled = self._batch_canceled(batch_id)
            if not canceled:
                self._batch_ids.setdefault(batch_id, []).extend(ids)
            for tid in ids:
                if canceled:
                    self._forget(tid)
                else:
                    self._tasks[tid]["st"] = "queued"
                    self._push(tid)

    def unfinished_publications(self) -> list[tuple[str, str]]:
        return list(self._publishing)

    def abort_stage(self, batch_id: str, stage: str, chunk: int) -> None:
        with self._lock:
            tasks, conts = self._staged.pop((batch_id, stage), ([], []))
            for tid in (*tasks, *conts):
                self._release_key(tid, forget=True)
                self._tasks.pop(tid, None)

    def cancel_batch(self, batch_id: str, tenant: str | None) -> bool:
        with self._lock:
            b = self._batches.get(batch_id)
            if b is None or (tenant and b["tn"] != tenant) or b["state"] != "running":
                return False
            running = max(b["run"], 0)
            dropped = b["remaining"] - running
            b["canceled"] += dropped
            self._stats[b["tn"]]["canceled"] += dropped
            self._count_batch(b["tn"], "running", "canceled")
            b.update(remaining=running, state="canceled", ended=now_ms())
            self._ended.append(batch_id)
            for cid in self._conts.pop(batch_id, []):
                self._tasks.pop(cid, None)
            for tid, t in list(self._tasks.items()):
                if t.get("b") != batch_id:
                    continue
                if t["st"] in WAITING:       # dropped uncounted: the batch counted them above
                    self._unready(tid, t)
                    self._forget(tid)
                elif t["st"] == "running":
                    self._stopping.append(tid)
        self._after()
        return True

    # ===================================================================== single tasks

    def cancel_task(self, task_id: str, tenant: str | None) -> bool:
        with self._lock:
            t = self._tasks.get(task_id)
            if t is None or (tenant and t["tn"] != tenant) or self._batch_canceled(t.get("b")):
                return False
            if t["st"] == "running":
                if "cx" in t:
                    return False
                t["cx"] = now_ms()
                self._stopping.append(task_id)
            elif self._unqueue(task_id, t):
                self._end_canceled(task_id, t, 0)
            else:
                return False
        self._after()
        return True

    def delete_task(self, task_id: str, tenant: str | None, dead_only: bool = False) -> bool:
        with self._lock:
            t = self._tasks.get(task_id)
            if t is None or (tenant and t["tn"] != tenant) or (dead_only and t["st"] != "dead"):
                return False
            if t["st"] == "dead":
                self._dead[t["q"]].remove(task_id)
                self._stats[t["tn"]]["dead"] -= 1
                self._release_key(task_id)
                del self._tasks[task_id]
                return True
            if self._batch_canceled(t.get("b")) or not self._unqueue(task_id, t):
                return False
            self._release_key(task_id)
            del self._tasks[task_id]
            b = self._batches.get(t.get("b") or "")
            if b is not None and b["state"] == "running":
                b["total"] -= 1
                b["remaining"] -= 1
                self._close_if_done(t["b"])
        self._after()
        return True

    def retry_dead_task(self, task_id: str, tenant: str | None, retries: int) -> bool:
        with self._lock:
            t = self._tasks.get(task_id)
            if t is None or t["st"] != "dead" or (tenant and t["tn"] != tenant):
                return False
            return self._revive(task_id, t, retries)

    def retry_dead(self, queue: str, retries: int, count: int) -> int:
        with self._lock:
            ids = list(self._dead.get(queue, []))
            return sum(self._revive(tid, self._tasks[tid], retries) for tid in ids[:count or len(ids)])

    def discard_dead(self, queue: str, count: int) -> int:
        with self._lock:
            ids = list(self._dead.get(queue, []))
            return sum(self.delete_task(tid, None, dead_only=True) for tid in ids[:count or len(ids)])

    def _revive(self, task_id: str, t: dict[str, Any], retries: int) -> bool:
        """dead_retry_task.lua: back to work with a fresh retry budget (a canceled batch's: dropped)."""
        self._dead[t["q"]].remove(task_id)
        stats = self._stats[t["tn"]]
        stats["dead"] -= 1
        if self._batch_canceled(t.get("b")):
            del self._tasks[task_id]
            return False
        b = self._batches.get(t.get("b") or "")
        if b is not None:
            b["failed"] -= 1
            b["remaining"] += 1
            if b["state"] != "running":
                self._count_batch(t["tn"], b["state"], "running")
                b["state"] = "running"
                b.pop("ended", None)
        else:
            t.pop("b", None)        # its batch was deleted (retention)
        stats["failed"] -= 1
        for name in ("et", "em", "etb", "da", "fa", "du", "cr"):
            t.pop(name, None)
        self._forget_attempt(t)
        self._reclaim_key(task_id)
        t.update(r=retries, st="queued")
        self._push(task_id)
        return True

    # ---------------------------------------------------------------- a running task's calls

    def extend(self, task_id: str, token: str, lease_ms: int) -> int:
        t = self._tasks.get(task_id)
        return now_ms() + lease_ms if t is not None and t["st"] == "running" and str(t["a"]) == token else 0

    def progress(self, task_id: str, token: str, done: float, total: float | None, message: str | None) -> None:
        with self._lock:
            t = self._tasks.get(task_id)
            if t is not None and t["st"] == "running" and str(t["a"]) == token:
                t.update(pg=repr(done), pt="" if total is None else repr(total), pm=message or "")

    def wait_finished(self, task_id: str, seconds: float) -> bool:
        """Wait until the task reaches its final state (run by another thread), at most ``seconds``."""
        with self._changed:
            return self._changed.wait_for(lambda: self.state_of(task_id) not in (*WAITING, "running"), seconds)

