"""Keys: every key and channel name under one prefix, in one place.

The layout (what each key holds) is documented once, at the top of ``lua/_lib.lua``; scripts
build the keys only they know (a task's batch, a ring) by the same scheme. Python builds every
name it passes to a script or reads here, so a rename is one edit on each side.
"""
from __future__ import annotations

__all__ = ["Keys"]


class Keys:
    """Key and channel names under one prefix; see lua/_lib.lua for what each holds."""

    __slots__ = ("prefix", "queues", "delayed", "leases", "trun", "tlim", "paused", "pausedq", "pausedt", "pausedw",
                 "bend", "bended", "publishing", "workers", "events", "tenants", "sdue", "marker", "quarantine",
                 "quarantine_why", "migration_guard", "tenant_shards", "shard_count", "moving")

    def __init__(self, prefix: str) -> None:
        p = self.prefix = prefix
        self.queues = f"{p}:queues"
        self.delayed = f"{p}:delayed"
        self.leases = f"{p}:leases"
        self.trun = f"{p}:trun"
        self.tlim = f"{p}:tlim"
        self.paused = f"{p}:paused"
        self.pausedq = f"{p}:pausedq"
        self.pausedt = f"{p}:pausedt"
        self.pausedw = f"{p}:pausedw"                 # paused hosts and managers (pause_worker)
        self.bend = f"{p}:bend"
        self.bended = f"{p}:bended"
        self.publishing = f"{p}:publishing"
        self.workers = f"{p}:workers"
        self.events = f"{p}:ev"
        self.tenants = f"{p}:tenants"
        self.sdue = f"{p}:sdue"
        self.marker = f"{p}:marker"
        self.quarantine = f"{p}:quarantine"           # damaged task ids with no queue to dead-letter to
        self.quarantine_why = f"{p}:quarantine:why"   # task id -> reason
        self.migration_guard = f"{p}:migration-guard"  # never written: see transport.py
        self.tenant_shards = f"{p}:tshard"            # tenant -> shard (shard 0 only: gateway/shards.py)
        self.shard_count = f"{p}:shards"              # Options.shards, once above 1 (shard 0 only)
        self.moving = f"{p}:moving"                   # ids taken out by move_out.lua, not yet moved

    # ------------------------------------------------------------------------------ tasks

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:t:{task_id}"

    def forward(self, task_id: str) -> str:
        """P:fw:<id>: the new id of a task that rebalance moved to another shard."""
        return f"{self.prefix}:fw:{task_id}"

    def done(self, task_id: str) -> str:
        """P:t:<id>:done: pushed when a task that keeps its result finished (get_result's wait)."""
        return f"{self.prefix}:t:{task_id}:done"

    def ready(self, queue: str, tenant: str) -> str:
        return f"{self.prefix}:q:{queue}:{tenant}"

    def inbox(self, worker_id: str) -> str:
        """P:inbox:<worker>: hand-offs to an idle worker process (enqueue.lua, idle.lua)."""
        return f"{self.prefix}:inbox:{worker_id}"

    def ring(self, queue: str) -> str:
        return f"{self.prefix}:ring:{queue}"

    def queue_tenants(self, queue: str) -> str:
        return f"{self.prefix}:qt:{queue}"

    def qstats(self, queue: str) -> str:
        return f"{self.prefix}:qs:{queue}"

    def isolated(self, queue: str) -> str:
        return f"{self.prefix}:iso:{queue}"

    def dead(self, queue: str) -> str:
        return f"{self.prefix}:dead:{queue}"

    def worker(self, worker_id: str) -> str:
        """P:wl:<worker>: the process's leases, task id -> lease token (_lib.lua lease_entry)."""
        return f"{self.prefix}:wl:{worker_id}"

    def worker_info(self, worker_id: str) -> str:
        """P:wi:<worker>: what a worker process reports about itself (expires unless renewed)."""
        return f"{self.prefix}:wi:{worker_id}"

    def tstats(self, tenant: str) -> str:
        return f"{self.prefix}:ts:{tenant}"

    def idempotency(self, tenant: str, key: str) -> str:
        """P:key:<tenant>:<key>, an idempotency key (enqueue_task(key=...)). A tenant may contain
        ':' (a key may too): the tenant's '%' and ':' are written %25 and %3A, so that no two
        (tenant, key) pairs share a name."""
        return f"{self.prefix}:key:{tenant.replace('%', '%25').replace(':', '%3A')}:{key}"

    def history(self, minute: int) -> str:
        """P:h:<minute>: per-minute counters of ended and failed attempts (minute = ms // 60000)."""
        return f"{self.prefix}:h:{minute}"

    # ---------------------------------------------------------------------------- batches

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{batch_id}"

    def batches(self, tenant: str) -> str:
        return f"{self.prefix}:batches:{tenant}"

    def staged(self, batch_id: str, stage: str) -> str:
        return f"{self.prefix}:b:{batch_id}:s:{stage}"

    def staged_continuations(self, batch_id: str, stage: str) -> str:
        return f"{self.prefix}:b:{batch_id}:c:{stage}"

    def publication(self, batch_id: str, stage: str) -> str:
        return f"{self.prefix}:b:{batch_id}:p:{stage}"

    def batch_results(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{batch_id}:r"

    def batch_tasks(self, batch_id: str) -> str:
        """P:b:<id>:ids: the batch's task ids in publication order (the batch page lists them)."""
        return f"{self.prefix}:b:{batch_id}:ids"

    def continuations(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{batch_id}:cont"

    def committed_stages(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{batch_id}:k"

    # -------------------------------------------------------------------------- schedules

    def schedule(self, schedule_id: str) -> str:
        return f"{self.prefix}:s:{schedule_id}"

    def tenant_schedules(self, tenant: str) -> str:
        return f"{self.prefix}:sched:{tenant}"
