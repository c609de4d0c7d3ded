"""Scope: the one object the dashboard reads and acts through, a TaskProcessor or a TenantView.

Everything the dashboard shows comes from the public read API, and every action is a public API
call, so tenant scoping holds in one place: given ``processor.tenant("acme")`` the dashboard can
only reach what that view reaches (another tenant's task, batch or schedule reads as None and
its actions return False). This class adds no access of its own; it only smooths over the few
places where the processor and the view spell a call differently, and says which pages exist
for a tenant (workers and queue-wide counts are the operator's, not a tenant's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models import BatchInfo, TaskInfo
from ..processor import TaskProcessor
from ..schedules import ScheduleInfo
from ..tenancy import TenantStats, TenantView

__all__ = ["Scope", "QueueRow"]


@dataclass(frozen=True)
class QueueRow:
    """One line of the overview's queue table; None where a tenant's dashboard has no count
    of its own (the in-flight, delayed and dead counters are per queue, shared by tenants)."""

    name: str
    queued: int
    in_flight: int | None
    delayed: int | None
    dead: int | None
    paused: bool


class Scope:
    """What one dashboard may see and steer: a whole processor, or one tenant's view of it."""

    def __init__(self, target: TaskProcessor | TenantView) -> None:
        if isinstance(target, TenantView):
            self.api: Any = target
            self.processor: TaskProcessor = target.processor  # type: ignore[assignment]
            self.tenant: str | None = target.tenant
        elif isinstance(target, TaskProcessor):
            self.api = self.processor = target
            self.tenant = None
        else:
            from ..errors import ConfigurationError
            raise ConfigurationError(f"the dashboard needs a TaskProcessor or processor.tenant(name), "
                                     f"got {type(target).__name__}")

    @property
    def scoped(self) -> bool:
        return self.tenant is not None

    def narrowed(self, tenant: str | None) -> Scope:
        """This scope, or (on a whole processor's dashboard, given a tenant) that tenant's."""
        if not tenant or self.tenant is not None:
            return self
        return Scope(self.processor.tenant(tenant))

    # ----------------------------------------------------------------------------- reads

    @property
    def paused(self) -> bool:
        """The pause switch this dashboard owns: everything, or its tenant."""
        return bool(self.api.is_paused)

    def queues(self) -> list[QueueRow]:
        """The configured queues first, in fetch order, then any other queue that has work."""
        p = self.processor
        configured = list(p.options.queues)
        if self.tenant is not None:
            stats = self.api.get_stats()
            names = configured + sorted(n for n in stats.queued if n not in configured)
            return [QueueRow(n, stats.queued.get(n, 0), None, None, None, False) for n in names]
        known = {q.name: q for q in p.get_queues()}
        names = configured + sorted(n for n in known if n not in configured)
        rows = []
        for n in names:
            q = known.get(n) or p.get_queue(n)
            rows.append(QueueRow(n, q.queued, q.in_flight, q.delayed, q.dead, q.paused))
        return rows

    def queue_exists(self, name: str) -> bool:
        return name in {q.name for q in self.queues()}

    def tasks_in_queue(self, queue: str, skip: int, take: int) -> list[TaskInfo]:
        return list(self.api.get_tasks_in_queue(queue, skip, take))

    def running(self, queue: str | None, skip: int = 0, take: int = 25) -> list[TaskInfo]:
        return list(self.api.get_running_tasks(skip, take, queue=queue))

    def delayed(self, queue: str | None, skip: int = 0, take: int = 25) -> list[TaskInfo]:
        return list(self.api.get_delayed_tasks(skip, take, queue=queue))

    def dead(self, queue: str, skip: int, take: int) -> list[TaskInfo]:
        return list(self.api.get_dead_tasks(queue, skip, take))

    def task(self, task_id: str) -> TaskInfo | None:
        return self.api.get_task(task_id)  # type: ignore[no-any-return]

    def batch(self, batch_id: str) -> BatchInfo | None:
        return self.api.get_batch(batch_id)  # type: ignore[no-any-return]

    def batch_tasks(self, batch_id: str, skip: int, take: int) -> list[TaskInfo]:
        return list(self.api.get_batch_tasks(batch_id, skip=skip, take=take))

    def continuations(self, batch_id: str) -> list[TaskInfo]:
        return list(self.api.get_batch_continuations(batch_id))

    def batch_results(self, batch_id: str, skip: int, take: int) -> list[Any]:
        return list(self.api.get_batch_results(batch_id, skip, take))

    def tenants(self, skip: int, take: int) -> tuple[list[str], int]:
        if self.tenant is not None:
            return [self.tenant], 1
        return self.processor.get_tenants(skip, take), self.processor.get_tenants_count()

    def owns_tenant(self, tenant: str) -> bool:
        return self.tenant is None or tenant == self.tenant

    def tenant_stats(self, tenant: str) -> TenantStats:
        return self.api.get_stats() if self.tenant is not None else self.processor.get_tenant_stats(tenant)

    def batches(self, tenant: str, skip: int, take: int) -> tuple[list[BatchInfo], int]:
        if self.tenant is not None:
            return self.api.get_batches(skip, take), self.api.get_batches_count()
        return self.processor.get_batches(tenant, skip, take), self.processor.get_batches_count(tenant)

    def schedules(self, tenant: str, skip: int, take: int) -> tuple[list[ScheduleInfo], int]:
        if self.tenant is not None:
            return self.api.get_schedules(skip, take), self.api.get_schedules_count()
        return self.processor.get_schedules(tenant, skip, take), self.processor.get_schedules_count(tenant)

    def schedule(self, schedule_id: str) -> ScheduleInfo | None:
        return self.api.get_schedule(schedule_id)  # type: ignore[no-any-return]

    # --------------------------------------------------------------------------- actions

    def set_paused(self, on: bool) -> None:
        if self.tenant is not None:
            self.api.pause() if on else self.api.resume()
        else:
            self.processor.pause() if on else self.processor.resume()

    def set_tenant_paused(self, tenant: str, on: bool) -> None:
        self.processor.pause_tenant(tenant) if on else self.processor.resume_tenant(tenant)

    def cancel_schedule(self, info: ScheduleInfo) -> bool:
        if self.tenant is not None:
            return bool(self.api.cancel_schedule(info.id))
        return self.processor.cancel_schedule(info.id, info.tenant)

    def retry_all_dead(self, queue: str) -> int:
        if self.tenant is None:
            return self.processor.retry_dead_tasks(queue)
        return sum(self.api.retry_dead_task(t.id) for t in self.api.get_dead_tasks(queue, 0, 1000))

    def discard_all_dead(self, queue: str) -> int:
        if self.tenant is None:
            return self.processor.discard_dead_tasks(queue)
        return sum(self.api.discard_dead_task(t.id) for t in self.api.get_dead_tasks(queue, 0, 1000))
