"""Prometheus metrics (``pip install 'coretask[prometheus]'``): a middleware for producers and
workers, and a collector of the Redis-side gauges.

``Options(middleware=[PrometheusMiddleware()])`` counts, in the process it runs in:

=====================================  =========  =============================================
coretask_tasks_enqueued_total          counter    queue, tenant: tasks written (after_enqueue)
coretask_enqueue_errors_total          counter    queue, error: enqueues that raised and wrote
                                                  nothing (error: the exception's class name)
coretask_tasks_finished_total          counter    queue, tenant, task, outcome: attempts that
                                                  ended, outcome succeeded, failed, retried,
                                                  dead, canceled or timeout (:data:`OUTCOMES`)
coretask_task_duration_seconds         histogram  queue, task: time of an attempt, middleware
                                                  inside it included
coretask_task_wait_seconds             histogram  queue: from due (enqueue, or delay_until) to
                                                  the first attempt's start (server clock)
coretask_tasks_running                 gauge      queue: attempts running now
coretask_worker_processes              gauge      worker processes (or embedded runs) up
=====================================  =========  =============================================

and :class:`RedisCollector` reads, at each scrape, what Redis counts for the whole deployment
(counters the scripts keep, never a scan): ``coretask_queue_tasks{queue,state}`` with state
queued, in_flight, delayed, dead; ``coretask_queue_paused{queue}``; ``coretask_paused``;
``coretask_paused_tenants``; ``coretask_workers`` (worker
processes with a fresh heartbeat); ``coretask_quarantined_tasks``; ``coretask_redis_up``.
``python -m coretask --app M:A metrics --port P`` serves it.

Worker processes are many and replaced under recycling: ``python -m coretask.worker
--metrics-port P`` runs them in prometheus_client's multiprocess mode and serves their sum from
the manager (coretask/contrib/prometheus_server.py, docs/observability.md).

**Task labels** (``task``: the target, ``module:qualname``) are as many as the task functions
the code has; ``task_label=False`` drops them.

**Tenant labels** are bounded: ``tenant_label=False`` drops the label; else the first
``max_tenants`` tenants keep their names and the others count as "other"; or
``tenant_label=fn`` maps a tenant to its label (``lambda t: t if t in PAYING else "other"``),
the same in every process. "First" is per process, except in multiprocess mode (worker
processes under ``--metrics-port``), where the processes of one manager, replaced ones included,
share one list of admitted names (a file in the metrics directory, appended under a lock): each
process would otherwise admit its own first ``max_tenants``, and the counts of ended processes
keep their labels, so recycling would grow the series without bound.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import ConfigurationError, TaskTimeout
from ..middleware import CANCELED, HANDED_BACK, SUCCEEDED, EnqueueMessage, Middleware, WorkerInfo
from . import require

__all__ = ["PrometheusMiddleware", "RedisCollector", "OUTCOMES", "DEFAULT_MAX_TENANTS", "OTHER"]

# an attempt that ran past its time limit counts "timeout" when it is retried, "dead" (or
# "failed" with Options.deadletter off) when it was the last: "dead" matches the dead letters
# Redis counts
OUTCOMES = ("succeeded", "failed", "retried", "dead", "canceled", "timeout")
DEFAULT_MAX_TENANTS = 50
OTHER = "other"          # the tenant label of tenants past max_tenants
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TENANTS_FILE = "tenants.txt"     # in the multiprocess directory: the admitted tenant names, one a line
DURATION_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600)
WAIT_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
HEARTBEAT_FRESH = 60.0   # seconds: a worker whose heartbeat is older does not count as up

_METRICS: dict[tuple[int, bool], dict[str, Any]] = {}     # per registry and label set: defined once
_METRICS_LOCK = threading.Lock()


class _SharedTenants:
    """The admitted tenant names of every process of one manager (module docstring): a file
    read and appended under an exclusive lock, once per tenant a process has not decided yet."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit

    def admit(self, tenant: str) -> bool:
        import fcntl

        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)       # released when the file closes
            f.seek(0)
            names = f.read().split()
            if tenant in names:
                return True
            if len(names) >= self.limit:
                return False
            f.write(tenant + "\n")              # tenant names hold no whitespace (check_tenant)
            return True


def _prometheus() -> Any:
    return require("prometheus_client", "prometheus", "coretask.contrib.prometheus")


def _define(registry: Any, with_tenant: bool, with_task: bool, duration_buckets: Sequence[float],
            wait_buckets: Sequence[float]) -> dict[str, Any]:
    """The metric objects for ``registry``: created once per process (prometheus_client refuses
    a name registered twice), shared by every middleware instance on that registry."""
    pc = _prometheus()
    key = (id(registry), with_tenant, with_task)
    with _METRICS_LOCK:
        if key in _METRICS:
            return _METRICS[key]
        tenant = ["tenant"] if with_tenant else []
        task = ["task"] if with_task else []
        m = {
            "enqueued": pc.Counter("coretask_tasks_enqueued", "Tasks enqueued (written to Redis)",
                                   ["queue", *tenant], registry=registry),
            "enqueue_errors": pc.Counter("coretask_enqueue_errors", "Enqueues that raised and wrote nothing",
                                         ["queue", "error"], registry=registry),
            "finished": pc.Counter("coretask_tasks_finished", "Task attempts that ended, by outcome",
                                   ["queue", *tenant, *task, "outcome"], registry=registry),
            "duration": pc.Histogram("coretask_task_duration_seconds", "Time of a task attempt", ["queue", *task],
                                     buckets=duration_buckets, registry=registry),
            "wait": pc.Histogram("coretask_task_wait_seconds", "From due to the start of the first attempt",
                                 ["queue"], buckets=wait_buckets, registry=registry),
            "running": pc.Gauge("coretask_tasks_running", "Task attempts running now", ["queue"],
                                multiprocess_mode="livesum", registry=registry),
            "workers": pc.Gauge("coretask_worker_processes", "Worker processes (or embedded runs) up",
                                multiprocess_mode="livesum", registry=registry),
        }
        _METRICS[key] = m
        return m


class PrometheusMiddleware(Middleware):
    """Counts enqueues and task attempts into prometheus_client metrics (module docstring).

    ``registry``: where the metrics live (default: prometheus_client's global REGISTRY, which
    its multiprocess mode and ``start_http_server`` use). ``tenant_label``: True (bounded by
    ``max_tenants``), False (no tenant label) or a function tenant -> label. ``task_label``:
    the ``task`` label (the target) on finished attempts and durations.
    ``duration_buckets`` / ``wait_buckets``: histogram bucket bounds in seconds.

    Thread-safe; per attempt it costs a few dictionary lookups and lock-protected increments."""

    def __init__(self, *, registry: Any = None, tenant_label: bool | Callable[[str], str] = True,
                 max_tenants: int = DEFAULT_MAX_TENANTS, task_label: bool = True,
                 duration_buckets: Sequence[float] = DURATION_BUCKETS,
                 wait_buckets: Sequence[float] = WAIT_BUCKETS) -> None:
        pc = _prometheus()
        if isinstance(max_tenants, bool) or not isinstance(max_tenants, int) or max_tenants < 0:
            raise ConfigurationError(f"PrometheusMiddleware(max_tenants=...) must be an integer >= 0, "
                                     f"got {max_tenants!r}")
        if not (isinstance(tenant_label, bool) or callable(tenant_label)):
            raise ConfigurationError("PrometheusMiddleware(tenant_label=...) must be True, False or a function "
                                     f"tenant -> label, got {type(tenant_label).__name__}")
        self.registry = registry if registry is not None else pc.REGISTRY
        self.with_tenant = tenant_label is not False
        self._label_of = tenant_label if callable(tenant_label) and not isinstance(tenant_label, bool) else None
        self.max_tenants = max_tenants
        self._tenants: set[str] = set()
        self._others: set[str] = set()       # decided "other": final, the admitted list only grows
        self._tenants_lock = threading.Lock()
        directory = os.environ.get(MULTIPROC_ENV)
        self._shared = _SharedTenants(os.path.join(directory, TENANTS_FILE), max_tenants) if directory else None
        self._local = threading.local()      # per task thread: start time and fate of the attempt
        self.with_task = bool(task_label)
        m = _define(self.registry, self.with_tenant, self.with_task, tuple(duration_buckets), tuple(wait_buckets))
        self._enqueued, self._finished, self._enqueue_errors = m["enqueued"], m["finished"], m["enqueue_errors"]
        self._duration, self._wait = m["duration"], m["wait"]
        self._running, self._workers = m["running"], m["workers"]
        # labelled children by label values: labels() takes a lock and builds a key per call
        self._per_queue: dict[str, tuple[Any, Any, Any]] = {}
        self._counted: dict[tuple[Any, ...], Any] = {}

    def tenant(self, tenant: str) -> str:
        """The label value of ``tenant`` (module docstring: bounded cardinality)."""
        if self._label_of is not None:
            return str(self._label_of(tenant))
        if tenant in self._tenants:
            return tenant
        if tenant in self._others:
            return OTHER
        with self._tenants_lock:
            if self._shared is not None:
                admitted = self._shared.admit(tenant)
            else:
                admitted = len(self._tenants) < self.max_tenants
            (self._tenants if admitted else self._others).add(tenant)
        return tenant if admitted else OTHER

    def _labels(self, queue: str, tenant: str) -> tuple[str, ...]:
        return (queue, self.tenant(tenant)) if self.with_tenant else (queue,)

    def _queue(self, queue: str) -> tuple[Any, Any]:
        """(running, wait) of ``queue``, made once per queue."""
        found = self._per_queue.get(queue)
        if found is None:
            found = self._per_queue[queue] = (self._running.labels(queue), self._wait.labels(queue))
        return found

    def _counter(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """The child of ``metric`` for ``labels``, made once (bounded: queues x tenant labels x outcomes)."""
        key = (id(metric), *labels)
        found = self._counted.get(key)
        if found is None:
            found = self._counted[key] = metric.labels(*labels)
        return found

    # ------------------------------------------------------------------------------ producer

    def after_enqueue(self, message: EnqueueMessage) -> None:
        if message.error is not None:
            self._counter(self._enqueue_errors, (message.queue, type(message.error).__name__)).inc()
        elif message.held_by is None:       # a held idempotency key wrote nothing
            self._counter(self._enqueued, self._labels(message.queue, message.tenant)).inc()

    # -------------------------------------------------------------------------------- worker

    def before_task(self, ctx: Any) -> None:
        local = self._local
        local.start = time.perf_counter()
        local.fate = None
        running, wait = self._queue(ctx.queue)
        running.inc()
        if ctx.due_ms:
            wait.observe(max(time.time() * 1000 - ctx.due_ms, 0) / 1000)

    def on_retry(self, ctx: Any, error: BaseException, delay: Any) -> None:
        self._local.fate = "retried"

    def on_dead(self, ctx: Any, error: BaseException) -> None:
        self._local.fate = "dead"

    def after_task(self, ctx: Any, outcome: str, result: Any, error: BaseException | None) -> None:
        local = self._local
        start = getattr(local, "start", None)
        running, _ = self._queue(ctx.queue)
        running.dec()
        task = (ctx.target,) if self.with_task else ()
        if start is not None:
            self._counter(self._duration, (ctx.queue, *task)).observe(time.perf_counter() - start)
            local.start = None
        if outcome == HANDED_BACK:          # not ended: it runs again, uncharged
            return
        if outcome == SUCCEEDED:
            label = "succeeded"
        elif outcome == CANCELED:
            label = "canceled"
        elif isinstance(error, TaskTimeout) and getattr(local, "fate", None) == "retried":
            label = "timeout"
        else:
            label = getattr(local, "fate", None) or "failed"
        local.fate = None
        self._counter(self._finished, (*self._labels(ctx.queue, ctx.tenant), *task, label)).inc()

    def on_worker_start(self, worker: WorkerInfo) -> None:
        self._workers.inc()

    def on_worker_stop(self, worker: WorkerInfo) -> None:
        self._workers.dec()

    def __repr__(self) -> str:
        tenant = "off" if not self.with_tenant else ("custom" if self._label_of else f"max {self.max_tenants}")
        return f"PrometheusMiddleware(tenant_label={tenant})"


class RedisCollector:
    """A prometheus_client collector of the deployment-wide gauges Redis keeps (module
    docstring), read through the processor's public API at each scrape: a few pipelined reads
    per queue, never a scan. A scrape while Redis is unreachable gives ``coretask_redis_up 0``
    and nothing else, rather than an error page."""

    def __init__(self, processor: Any, *, heartbeat_fresh: float = HEARTBEAT_FRESH) -> None:
        self.processor = processor
        self.heartbeat_fresh = heartbeat_fresh

    def describe(self) -> list[Any]:
        return []        # no description: registering it does not scrape Redis

    def collect(self) -> Iterator[Any]:
        core = require("prometheus_client.core", "prometheus", "coretask.contrib.prometheus")
        up = core.GaugeMetricFamily("coretask_redis_up", "1 when the last scrape read Redis")
        p = self.processor
        try:
            queues = {q.name: q for q in p.get_queues()}
            for name in p.options.queues:
                if name not in queues:
                    queues[name] = p.get_queue(name)
            workers = p.get_workers()
            quarantined = p.get_quarantined_count()
            everything_paused, tenants_paused = p.is_paused, len(p.get_paused_tenants())
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        tasks = core.GaugeMetricFamily("coretask_queue_tasks", "Tasks of a queue by state (Redis counters)",
                                       labels=["queue", "state"])
        paused = core.GaugeMetricFamily("coretask_queue_paused", "1 while the queue is paused", labels=["queue"])
        for name in sorted(queues):
            q = queues[name]
            for state, value in (("queued", q.queued), ("in_flight", q.in_flight), ("delayed", q.delayed),
                                 ("dead", q.dead)):
                tasks.add_metric([name, state], value)
            paused.add_metric([name], 1 if q.paused else 0)
        alive = core.GaugeMetricFamily("coretask_workers", "Worker processes with a heartbeat in the last "
                                       f"{self.heartbeat_fresh:g}s")
        alive.add_metric([], sum(1 for age in workers.values() if age <= self.heartbeat_fresh))
        quarantine = core.GaugeMetricFamily("coretask_quarantined_tasks", "Damaged task records set aside")
        quarantine.add_metric([], quarantined)
        # the global pause holds every queue without pausing any one of them: its own gauge, so
        # that an alert on "nothing is processed" can tell a pause from an outage
        stopped = core.GaugeMetricFamily("coretask_paused", "1 while pause() holds every queue")
        stopped.add_metric([], 1 if everything_paused else 0)
        held = core.GaugeMetricFamily("coretask_paused_tenants", "Tenants paused (pause_tenant)")
        held.add_metric([], tenants_paused)
        yield from (up, tasks, paused, stopped, held, alive, quarantine)


def serve_redis_metrics(processor: Any, port: int, addr: str = "0.0.0.0") -> tuple[Any, Any]:
    """Serve :class:`RedisCollector` on http://addr:port/metrics from a daemon thread (its own
    registry: nothing else of this process). Returns prometheus_client's (server, thread)."""
    pc = _prometheus()
    registry = pc.CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(processor))
    return pc.start_http_server(port, addr=addr, registry=registry)
