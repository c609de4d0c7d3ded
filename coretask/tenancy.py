"""Tenant-scoped access: ``processor.tenant("acme")`` returns a view of the same API with the
tenant implied. Through a view, another tenant's tasks, batches and schedules do not exist:
reading, canceling, deleting, retrying, appending to or triggering them returns None/False and
changes nothing. Ownership
is checked inside the scripts that change state (never by a read followed by a write), so the
check cannot race with the change.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, ResultUnavailable
from .options import check_page, check_queue_name, check_tenant

if TYPE_CHECKING:
    from .batch import BatchBlock, BatchBuilder
    from .client import Client
    from .gateway import Gateway
    from .options import Options
    from .encoding import Call, TaskData
    from .models import BatchInfo, DeadTask, TaskInfo, TaskOutcome
    from .schedules import ScheduleData, ScheduleInfo

__all__ = ["TenantView", "TenantStats"]

DEAD_SCAN = 1000   # dead letters examined per call when filtering a shared dead list by tenant
BULK_PASSES = 3    # passes over a shared dead list by one bulk retry or discard (_dead_in_bulk)


@dataclasses.dataclass(frozen=True)
class TenantStats:
    """A tenant's numbers, all read from counters the scripts maintain (no scans).
    ``queued`` counts ready tasks per queue; ``batches`` counts batches by state; ``shard`` is
    where its new work goes (always 0 with Options.shards 1; its counts are summed over every
    shard, so a tenant rebalanced while it had work still shows all of it)."""

    tenant: str
    queued: dict[str, int]
    running: int
    done: int
    failed: int
    canceled: int
    dead: int
    batches: dict[str, int]
    paused: bool
    limit: int | None
    shard: int = 0


class TenantView:
    """The TaskProcessor API for one tenant. Obtain it with ``processor.tenant(name)``."""

    def __init__(self, processor: Client, tenant: str) -> None:
        self.processor = processor
        self.tenant = check_tenant(tenant)

    def __repr__(self) -> str:
        return f"<TenantView {self.tenant!r}>"

    # ------------------------------------------------------------------------------ tasks

    def enqueue_task(self, queue: str, fn: Callable[..., Any] | Call | TaskData, *args: Any,
                     delay_until: datetime | timedelta | float | None = None, retries: int | None = None,
                     key: str | None = None, key_ttl: timedelta | float | None = None,
                     timeout: timedelta | float | None = None, keep_result: timedelta | float | None = None,
                     **kwargs: Any) -> str:
        return self.processor.enqueue_task(queue, self.tenant, fn, *args, delay_until=delay_until,
                                           retries=retries, key=key, key_ttl=key_ttl, timeout=timeout,
                                           keep_result=keep_result, **kwargs)

    def get_task(self, task_id: str) -> TaskInfo | None:
        """The task, or None when unknown or another tenant's."""
        info = self.processor.get_task(task_id)
        return info if info is not None and info.tenant == self.tenant else None

    def get_result(self, task_id: str, wait: timedelta | float | None = None) -> Any:
        """As TaskProcessor.get_result; another tenant's task reads as unknown."""
        return self.processor.get_result(task_id, wait, tenant=self.tenant)

    def get_batch_results(self, batch_id: str, skip: int = 0, take: int = 100) -> list[TaskOutcome]:
        if self.get_batch(batch_id) is None:    # another tenant's reads as unknown
            raise ResultUnavailable(f"batch {batch_id} is unknown, or its record has expired")
        return self.processor.get_batch_results(batch_id, skip, take)

    def cancel_task(self, task_id: str) -> bool:
        return self.processor.cancel_task(task_id, tenant=self.tenant)

    def delete_task(self, task_id: str) -> bool:
        return self.processor.delete_task(task_id, tenant=self.tenant)

    def retry_dead_task(self, task_id: str, retries: int | None = None) -> bool:
        return self.processor.retry_dead_task(task_id, retries, tenant=self.tenant)

    def discard_dead_task(self, task_id: str) -> bool:
        return self.processor.discard_dead_task(task_id, tenant=self.tenant)

    def retry_dead_tasks(self, queue: str, retries: int | None = None, count: int | None = None) -> int:
        """This tenant's dead letters in the queue back to work, oldest first: the oldest
        ``count``, or all of them (None), with ``retries`` retries each. Returns how many moved."""
        retries = self.processor.producer.retries(retries)
        return self._dead_in_bulk(queue, count, lambda task_id: self.retry_dead_task(task_id, retries))

    def discard_dead_tasks(self, queue: str, count: int | None = None) -> int:
        """Delete this tenant's dead letters in the queue, oldest first: the oldest ``count``, or
        all of them (None). Returns how many were deleted."""
        return self._dead_in_bulk(queue, count, self.discard_dead_task)

    def _dead_in_bulk(self, queue: str, count: int | None, act: Callable[[str], bool]) -> int:
        """The dead list is shared by the queue's tenants: it is read page by page, the whole
        of it if need be, and each of this tenant's entries is acted on by id (which checks the
        tenant again). The position in the list assumes that only this call removes entries;
        when someone else removes one meanwhile (another tenant's retry, a discard), the pages
        move under it and an entry can be passed over, so a pass that acted is followed by
        another one (at most BULK_PASSES), which acts only on ids it has not acted on before: a
        retried task that dies again at once is not retried twice by one call."""
        p = self.processor
        limit = p._dead_count(queue, count)     # validated; None: nothing to do, 0: all of them
        if limit is None:
            return 0
        acted: set[str] = set()
        for _ in range(BULK_PASSES):
            before, skip = len(acted), 0
            while not limit or len(acted) < limit:
                page = p.get_dead_tasks(queue, skip, DEAD_SCAN)
                if not page:
                    break
                for t in page:
                    if (t.tenant == self.tenant and t.id not in acted and (not limit or len(acted) < limit)
                            and act(t.id)):
                        acted.add(t.id)
                    else:
                        skip += 1       # still in the list, ahead of the next page
            if len(acted) == before or (limit and len(acted) >= limit):
                break
        return len(acted)

    def get_tasks_in_queue(self, queue: str, skip: int = 0, take: int = 25) -> list[TaskInfo]:
        """This tenant's ready tasks in the queue, FIFO."""
        check_page(skip, take)
        p = self.processor
        ids = p.gateway.ready_ids(check_queue_name(queue), self.tenant, skip, skip + take - 1)
        return [t for t in p._tasks(ids, _task_info()) if t is not None]

    def get_dead_tasks(self, queue: str, skip: int = 0, take: int = 25) -> list[DeadTask]:
        """This tenant's dead letters in the queue, oldest first (the dead list is shared by the
        queue's tenants, so this filters at most DEAD_SCAN entries past ``skip``)."""
        check_page(skip, take)
        p = self.processor
        mine = [t for t in p.get_dead_tasks(queue, 0, skip + DEAD_SCAN) if t.tenant == self.tenant]
        return mine[skip:skip + take]

    def get_running_tasks(self, skip: int = 0, take: int = 25, queue: str | None = None) -> list[TaskInfo]:
        """This tenant's running tasks (see TaskProcessor.get_running_tasks)."""
        return self.processor.get_running_tasks(skip, take, queue=queue, tenant=self.tenant)

    def get_delayed_tasks(self, skip: int = 0, take: int = 25, queue: str | None = None) -> list[TaskInfo]:
        """This tenant's delayed and retrying tasks, soonest due first."""
        return self.processor.get_delayed_tasks(skip, take, queue=queue, tenant=self.tenant)

    # ---------------------------------------------------------------------------- batches

    def enqueue_batch(self, queue: str, build: Callable[[BatchBuilder], Any], scope: str | None = None) -> str:
        return self.processor.enqueue_batch(queue, self.tenant, build, scope=scope)

    def batch(self, queue: str, scope: str | None = None) -> BatchBlock:
        return self.processor.batch(queue, self.tenant, scope=scope)

    def append_batch(self, queue: str, batch_id: str, build: Callable[[BatchBuilder], Any]) -> bool:
        return self.processor.append_batch(queue, self.tenant, batch_id, build)

    def cancel_batch(self, batch_id: str) -> bool:
        return self.processor.cancel_batch(batch_id, tenant=self.tenant)

    def get_batch(self, batch_id: str) -> BatchInfo | None:
        return self.processor.get_batch(batch_id, tenant=self.tenant)

    def get_batch_continuations(self, batch_id: str, take: int = 100) -> list[TaskInfo]:
        return self.processor.get_batch_continuations(batch_id, tenant=self.tenant, take=take)

    def get_batch_tasks(self, batch_id: str, skip: int = 0, take: int = 25) -> list[TaskInfo]:
        return self.processor.get_batch_tasks(batch_id, tenant=self.tenant, skip=skip, take=take)

    def get_batches(self, skip: int = 0, take: int = 25) -> list[BatchInfo]:
        return self.processor.get_batches(self.tenant, skip, take)

    def get_batches_count(self) -> int:
        return self.processor.get_batches_count(self.tenant)

    def wait_for_batch(self, batch_id: str, timeout: timedelta | float = 60.0) -> BatchInfo:
        if self.get_batch(batch_id) is None:
            raise ConfigurationError(f"batch {batch_id} is not a batch of tenant {self.tenant!r}")
        return self.processor.wait_for_batch(batch_id, timeout)

    # -------------------------------------------------------------------------- schedules

    def upsert_schedule(self, data: ScheduleData, fn: Callable[..., Any] | Call | TaskData,
                        *args: Any, **kwargs: Any) -> bool:
        """``data.tenant`` may be left empty; any other tenant than the view's is refused."""
        if data.tenant and data.tenant != self.tenant:
            raise ConfigurationError(f"schedule {data.id!r} names tenant {data.tenant!r}, but this view is "
                                     f"for tenant {self.tenant!r}")
        data = dataclasses.replace(data, tenant=self.tenant)
        return self.processor.upsert_schedule(data, fn, *args, **kwargs)

    def cancel_schedule(self, schedule_id: str) -> bool:
        return self.processor.cancel_schedule(schedule_id, self.tenant)

    def get_schedule(self, schedule_id: str) -> ScheduleInfo | None:
        info = self.processor.get_schedule(schedule_id)
        return info if info is not None and info.tenant == self.tenant else None

    def trigger_schedule(self, schedule_id: str) -> str | None:
        return self.processor.trigger_schedule(schedule_id, tenant=self.tenant)

    def pause_schedule(self, schedule_id: str) -> bool:
        return self.processor.pause_schedule(schedule_id, tenant=self.tenant)

    def resume_schedule(self, schedule_id: str) -> bool:
        return self.processor.resume_schedule(schedule_id, tenant=self.tenant)

    def get_schedules(self, skip: int = 0, take: int = 25) -> list[ScheduleInfo]:
        return self.processor.get_schedules(self.tenant, skip, take)

    def get_schedules_count(self) -> int:
        return self.processor.get_schedules_count(self.tenant)

    # ------------------------------------------------------------------ control and stats

    def pause(self) -> None:
        """Pause this tenant only: its tasks stay queued, other tenants' keep running."""
        self.processor.pause_tenant(self.tenant)

    def resume(self) -> None:
        self.processor.resume_tenant(self.tenant)

    @property
    def is_paused(self) -> bool:
        return self.processor.is_tenant_paused(self.tenant)

    def get_stats(self) -> TenantStats:
        return self.processor.get_tenant_stats(self.tenant)


def _task_info() -> type:
    from .models import TaskInfo
    return TaskInfo


class TenantAdmin:
    """Tenant methods of TaskProcessor (a mixin)."""

    gateway: Gateway
    options: Options

    def tenant(self, tenant: str) -> TenantView:
        """A view of this processor for one tenant (see :class:`TenantView`)."""
        return TenantView(self, tenant)  # type: ignore[arg-type]

    def set_tenant_limit(self, tenant: str, limit: int | None) -> None:
        """At most ``limit`` tasks of the tenant run at once across all workers (None: back to
        Options.tenant_concurrency). Enforced by the fetch script; raising a limit re-admits the
        tenant's waiting work at once."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigurationError(f"tenant limit must be an integer >= 1 or None, got {limit!r}")
        self.gateway.set_tenant_limit(check_tenant(tenant), limit)

    def is_tenant_paused(self, tenant: str) -> bool:
        return self.gateway.is_tenant_paused(check_tenant(tenant))

    def get_tenant_shard(self, tenant: str) -> int:
        """The shard the tenant's new work goes to (0 with Options.shards 1). A read: for a
        tenant not seen yet, the shard its first work would go to, nothing recorded."""
        return self.gateway.tenant_shard(check_tenant(tenant), place=False)

    def rebalance_tenant(self, tenant: str, shard: int) -> tuple[int, int]:
        """Move a paused tenant to another shard: its new work goes there from now on, and its
        queued and delayed tasks move there task by task, each move atomic and finished by a
        later call if this one is cut short (docs/scale-out.md). A moved task gets a new id;
        the old one still finds it (get_task, get_result, cancel_task) for Options.retention.
        Tasks of batches stay with their batch and run where they are; so do signed tasks when
        this processor has no Options.signing_key to sign them again under their new id.
        Returns (tasks moved, tasks left in place). Resume the tenant afterwards."""
        return self.gateway.rebalance(check_tenant(tenant), shard)

    def get_paused_tenants(self) -> list[str]:
        return self.gateway.paused_tenants()

    def get_tenants(self, skip: int = 0, take: int = 25) -> list[str]:
        """Tenants with work or history, in name order."""
        check_page(skip, take)
        return self.gateway.tenant_page(skip, take)

    def get_tenants_count(self) -> int:
        return self.gateway.tenant_count()

    def get_tenant_stats(self, tenant: str) -> TenantStats:
        queued, running, c, paused, limit = self.gateway.tenant_counters(check_tenant(tenant))
        return TenantStats(
            tenant=tenant, queued=queued, running=running,
            done=c.get("done", 0), failed=c.get("failed", 0), canceled=c.get("canceled", 0), dead=c.get("dead", 0),
            batches={s: c.get("b_" + s, 0) for s in ("running", "succeeded", "failed", "canceled")},
            paused=paused, limit=limit or self.options.tenant_concurrency,
            shard=self.gateway.tenant_shard(tenant, place=False))
