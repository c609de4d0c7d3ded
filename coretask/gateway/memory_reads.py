"""MemoryReads: eager mode's answers to the API's reads (queues, tasks, batches, tenants),
its pause flags and its schedules, from the records of :class:`MemoryState`, in the shapes the
Redis gateway returns them (hashes as bytes, LRANGE pages), so coretask/introspection.py,
tenancy.py and schedules.py read them unchanged. Schedules are stored, never ticked.
"""
from __future__ import annotations

from collections.abc import Sequence

from .memory_state import MemoryState, as_hash, now_ms, page
from .records import NO_CONTROLS, Controls, TickResult

__all__ = ["MemoryReads"]


class MemoryReads(MemoryState):
    """Reads, pause flags, tenant limits and schedules of eager mode."""

    # =================================================================== pause and tenants

    def pause(self, scope: str, on: bool, name: str = "", *, requeue: bool = False) -> bool:
        """Recorded for is_paused and the stats; eager mode holds nothing back."""
        with self._lock:
            (self._paused.add if on else self._paused.discard)((scope, name if scope != "all" else ""))
        return True

    def is_paused(self) -> bool:
        return ("all", "") in self._paused

    def is_paused_for_requeue(self) -> bool:
        return False

    def paused_queues(self) -> list[str]:
        with self._lock:
            return sorted(n for s, n in self._paused if s == "queue")

    def paused_tenants(self) -> list[str]:
        with self._lock:
            return sorted(n for s, n in self._paused if s == "tenant")

    def is_tenant_paused(self, tenant: str) -> bool:
        return ("tenant", tenant) in self._paused

    def paused_workers(self) -> list[str]:
        with self._lock:
            return sorted(n for s, n in self._paused if s == "worker")

    def set_tenant_limit(self, tenant: str, limit: int | None) -> None:
        with self._lock:
            if limit is None:
                self._limits.pop(tenant, None)
            else:
                self._limits[tenant] = limit

    # ============================================================================ reads

    def queue_names(self) -> list[str]:
        with self._lock:        # every read that walks a dict holds the lock: other threads write
            return sorted({t["q"] for t in self._tasks.values()} | set(self._ready) | set(self._dead))

    def queue_counts(self, queue: str) -> tuple[int, int, int, int, bool]:
        with self._lock:
            ready = sum(len(ids) for ids in self._ready.get(queue, {}).values())
            running = sum(1 for t in self._tasks.values() if t["q"] == queue and t["st"] == "running")
            return ready, running, 0, len(self._dead.get(queue, [])), ("queue", queue) in self._paused

    def due_count(self) -> int:
        return 0           # nothing waits for its due time in eager mode

    def queue_tenants(self, queue: str) -> list[str]:
        with self._lock:
            return sorted(self._ready.get(queue, {}))

    def ready_count(self, queue: str, tenant: str) -> int:
        return len(self._ready.get(queue, {}).get(tenant, ()))

    def ready_counts(self, queue: str, tenants: Sequence[str]) -> list[int]:
        with self._lock:
            return [len(self._ready.get(queue, {}).get(t, ())) for t in tenants]

    def ready_ids(self, queue: str, tenant: str, start: int, stop: int) -> list[str]:
        with self._lock:
            return page(list(self._ready.get(queue, {}).get(tenant, ())), start, stop)

    def dead_ids(self, queue: str, start: int, stop: int) -> list[str]:
        with self._lock:
            return page(self._dead.get(queue, []), start, stop)

    def quarantined(self, skip: int, take: int) -> list[tuple[str, str]]:
        return []          # nothing is ever damaged in memory

    def quarantine_count(self) -> int:
        return 0

    def task_hashes(self, task_ids: Sequence[str]) -> list[dict[bytes, bytes] | str]:
        with self._lock:
            return [as_hash(self._tasks[t]) if t in self._tasks else {} for t in task_ids]

    def tasks_as_they_are(self, task_ids: Sequence[str]) -> list[tuple[str, dict[bytes, bytes] | str]]:
        return list(zip(task_ids, self.task_hashes(task_ids)))      # one store: no task moves

    def task_places(self, task_ids: Sequence[str]) -> list[tuple[str, str]]:
        with self._lock:
            return [(str(self._tasks[t].get("q", "")), str(self._tasks[t].get("tn", ""))) if t in self._tasks
                    else ("", "") for t in task_ids]

    def batch_result_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        with self._lock:
            return page(self._results.get(batch_id, []), start, stop)

    def batch_hash(self, batch_id: str) -> dict[bytes, bytes]:
        with self._lock:
            b = self._batches.get(batch_id)
            return as_hash(b) if b is not None else {}

    def batch_state(self, batch_id: str) -> str | None:
        b = self._batches.get(batch_id)
        return b["state"] if b is not None else None

    def batch_page(self, tenant: str, skip: int, take: int) -> list[tuple[str, dict[bytes, bytes]]]:
        with self._lock:
            mine = sorted(((b["created"], i) for i, b in self._batches.items() if b["tn"] == tenant), reverse=True)
            return [(i, as_hash(self._batches[i])) for _, i in mine[skip:skip + take]]

    def batch_count(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for b in self._batches.values() if b["tn"] == tenant)

    def worker_heartbeats(self) -> dict[str, int]:
        return {}

    def worker_details(self, worker_ids: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
        return [(0, {}) for _ in worker_ids]     # no worker process in eager mode

    def leased_page(self, start: int, stop: int) -> tuple[list[str], int]:
        """Running tasks (in eager mode, the ones the calling threads run now), oldest first."""
        with self._lock:
            running = sorted((t["ls"], i) for i, t in self._tasks.items() if t["st"] == "running")
            ids = [i for _, i in running]
            return page(ids, start, stop), len(ids)

    def delayed_page(self, start: int, stop: int) -> tuple[list[tuple[str, int]], int]:
        return [], 0       # nothing waits for its due time in eager mode

    def batch_task_ids(self, batch_id: str, start: int, stop: int) -> tuple[list[str], int]:
        with self._lock:
            ids = self._batch_ids.get(batch_id, [])
            return page(ids, start, stop), len(ids)

    def continuation_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        with self._lock:
            return page(self._conts.get(batch_id, []), start, stop)

    def history(self, minutes: Sequence[int]) -> list[dict[str, int]]:
        return [{} for _ in minutes]          # no per-minute counters are kept in memory

    def tenant_page(self, skip: int, take: int) -> list[str]:
        with self._lock:
            return sorted(self._stats)[skip:skip + take]

    def tenant_count(self) -> int:
        return len(self._stats)

    def tenant_known(self, tenant: str) -> bool:
        return tenant in self._stats or tenant in self._limits or self.is_tenant_paused(tenant)

    def tenant_counters(self, tenant: str) -> tuple[dict[str, int], int, dict[str, int], bool, int | None]:
        with self._lock:
            queued = {q: len(by_tenant.get(tenant, ())) for q, by_tenant in self._ready.items()}
            running = sum(1 for t in self._tasks.values() if t["tn"] == tenant and t["st"] == "running")
            return (queued, running, dict(self._stats.get(tenant, {})), self.is_tenant_paused(tenant),
                    self._limits.get(tenant))

    # ======================================================================== schedules

    def server_time_ms(self) -> int:
        return now_ms()

    def upsert_schedule(self, schedule_id: str, tenant: str, queue: str, scope: str, cron: str, timezone: str,
                        seconds: bool, unique: bool, expire_ms: int, payload: bytes, serializer: str, target: str,
                        retries: int, next_ms: int, signature: str, controls: Controls = NO_CONTROLS) -> int:
        """Stored for get_schedule(s) and trigger_schedule; never ticked in eager mode."""
        with self._lock:
            s = self._schedules.get(schedule_id)
            if s is not None and s["tn"] != tenant:
                return -1
            now = now_ms()
            new = dict(tn=tenant, q=queue, sc=scope, cr=cron, tz=timezone, sec=int(seconds), u=int(unique),
                       x=expire_ms, p=payload, s=serializer, tg=target, r=retries, sg=signature, up=now,
                       v=(s or {}).get("v", 0) + 1, next=next_ms, cd=(s or {}).get("cd", now))
            for name, value in zip(("to", "kr", "kt"), controls.argv()):
                new[name] = value
            for kept in ("lt", "lr", "nu", "nx", "np", "ps", "nf", "lf", "le", "lft"):
                if s is not None and kept in s:
                    new[kept] = s[kept]
            self._schedules[schedule_id] = new
            return 1 if s is None else 2

    def cancel_schedule(self, schedule_id: str, tenant: str) -> bool:
        with self._lock:
            s = self._schedules.get(schedule_id)
            if s is None or s["tn"] != tenant:
                return False
            del self._schedules[schedule_id]
            return True

    def pause_schedule(self, schedule_id: str, on: bool, tenant: str | None) -> int:
        """As schedule_pause.lua: the field ps (paused since ms), kept by upsert_schedule."""
        with self._lock:
            s = self._schedules.get(schedule_id)
            if s is None or (tenant and s["tn"] != tenant):
                return -2
            if on == ("ps" in s):
                return 0
            if on:
                s["ps"] = now_ms()
            else:
                del s["ps"]
            return 1

    def trigger_schedule(self, schedule_id: str, task_id: str, tenant: str | None) -> TickResult:
        """A run now, as schedule_tick.lua's "trigger" enqueues it (eager.py then runs it)."""
        with self._lock:
            s = self._schedules.get(schedule_id)
            now = now_ms()
            if s is None or (tenant and s["tn"] != tenant):
                return TickResult(-2, now, s["next"] if s else -1)
            controls = Controls(s.get("to", 0), s.get("kr", 0), s.get("kt", 0))
            t = self._store(task_id, s["q"], s["tn"], s["p"], s["s"], s["tg"], s["r"], 0, s["sg"], controls)
            t.update(sch=schedule_id, sk=now)
            s.update(lt=task_id, lr=now)
            self._push(task_id)
            return TickResult(1, now, s["next"], task_id)

    def schedule(self, schedule_id: str) -> tuple[dict[bytes, bytes], float | None]:
        with self._lock:
            s = self._schedules.get(schedule_id)
            return (as_hash({k: v for k, v in s.items() if k != "next"}), float(s["next"])) if s else ({}, None)

    def schedules(self, tenant: str, skip: int, take: int) -> list[tuple[str, dict[bytes, bytes], float | None]]:
        with self._lock:
            ids = sorted(i for i, s in self._schedules.items() if s["tn"] == tenant)[skip:skip + take]
        return [(i, *self.schedule(i)) for i in ids]

    def schedule_count(self, tenant: str | None) -> int:
        with self._lock:
            return sum(1 for s in self._schedules.values() if tenant is None or s["tn"] == tenant)


