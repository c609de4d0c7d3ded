"""Options: the one configuration object of a TaskProcessor, validated when it is built.

Durations accept a ``timedelta`` or a number of seconds. Every default is a named constant
below so that documentation, the CLI and the code agree.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, UnknownOption
from .middleware import check_middleware
from .models import worker_scopes

if TYPE_CHECKING:
    from .context import TaskContext
    from .encoding import Serializer
    from .models import BatchInfo

__all__ = ["Options"]

DEFAULT_REDIS = "redis://localhost:6379/0"
DEFAULT_PREFIX = "{coretask}"
DEFAULT_QUEUES = ("default",)
DEFAULT_PROCESSES = 1
DEFAULT_MAX_WORKERS = 4
DEFAULT_RETRIES = 3
DEFAULT_INVISIBILITY = timedelta(minutes=5)
DEFAULT_BASE_FREQUENCY = timedelta(seconds=5)
DEFAULT_PUSHBACK_FREQUENCY = timedelta(seconds=10)
DEFAULT_CLEANUP_FREQUENCY = timedelta(minutes=5)
DEFAULT_RETENTION = timedelta(days=7)
DEFAULT_SHUTDOWN_TIMEOUT = timedelta(seconds=30)
DEFAULT_CANCEL_GRACE = timedelta(seconds=3)
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
DEFAULT_WAIT_TIMEOUT = timedelta(seconds=1)
DEFAULT_BUSY_TIMEOUT = timedelta(seconds=5)
SERIALIZER_NAMES = ("json", "dill")
MAX_SHARDS = 256

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_DURATIONS = ("invisibility", "base_frequency", "pushback_frequency", "cleanup_frequency",
              "retention", "shutdown_timeout", "cancel_grace", "wait_timeout", "busy_timeout")
_OPTIONAL_DURATIONS = ("timeout", "result_ttl", "task_retention")     # None = off
_CALLBACKS = ("on_task_failed_delay", "on_task_error", "on_task_start", "on_task_end",
              "on_batch_end", "resolver", "execute")


def _default_resolver(cls: type) -> Any:
    return cls()


@dataclasses.dataclass(kw_only=True)
class Options:
    """Everything a TaskProcessor and its workers need to know.

    redis: a redis-py URL (``rediss://`` for TLS); ``cluster=True`` selects the cluster client.
    prefix: every key and channel lives under it; written as a hash tag (``{name}``) all keys
      share one Redis Cluster slot, which multi-key scripts require there.
    shards: how many hash tags the deployment spreads over (default 1: one slot, as before). On
      a Redis Cluster each shard's slot lies on another master when the masters hold equal slot
      ranges, so N shards use N masters; a tenant's work stays in one shard (every script stays
      atomic), task and batch ids name their shard, workers fetch from all of them, pause and
      tenant limits hold on all of them (docs/scale-out.md). Going from 1 to N moves no key:
      tenants that have work already stay on shard 0.
    shard_map: tenant -> shard for tenants placed by hand (a big tenant on a shard of its own);
      the others are placed by a stable hash of their name, recorded on first use.
    queues: fetch order; the first queue with ready work wins. With strict_queues (the default),
      enqueueing to a queue not listed here (a task, a batch, a continuation, a schedule) raises
      ConfigurationError naming the known queues, since no worker of this processor would fetch
      it; strict_queues=False allows it, for producers that feed another deployment's queues.
    processes x max_workers: worker processes started by the manager, threads per process.
    sched_batch: on Linux, task threads run under the SCHED_BATCH policy: the same share of the
      CPU, but a thread that wakes up does not preempt them. The worker's own threads (the fetch
      loop, the control thread that aborts canceled tasks, lease renewal) then get a core the
      moment they need one instead of queueing behind CPU-bound tasks; without it a cancel
      behind a hundred busy threads took several times longer (docs/decisions.md).
    retries: how many attempts of a task may fail in all: the failure that reaches it dead-letters
      the task (retries=3: at most 3 attempts; on_task_failed_delay is asked with 2, then 1).
      0 is read as 1: one attempt, never retried. A lost lease (dead worker) consumes one too.
    invisibility: how long a task stays leased without renewal before it is redelivered.
    base_frequency: polling interval when no pub/sub event arrives.
    pushback_frequency: interval of the expired-lease check.
    cleanup_frequency / retention: how often, and after how long, finished batches are deleted.
    deadletter: keep tasks whose retries are exhausted (else they are discarded).
    on_task_failed_delay(ctx, retries_left) -> timedelta | None: delay before the next attempt;
      retries_left is what remains after this failure (always >= 1: not asked before burial).
    on_task_error(ctx, exc), on_task_start(ctx), on_task_end(ctx), on_batch_end(batch_info):
      hooks; an exception in a hook is logged and never loses the task. A hook may be
      ``async def``: it is awaited in the task's thread (an async on_task_failed_delay's delay
      is honoured). The hooks are one built-in middleware, the innermost (coretask.middleware).
    middleware: an ordered list of middleware instances (coretask.Middleware subclasses or any
      objects with some of its methods: before_enqueue, after_enqueue, before_task, after_task,
      on_retry, on_dead, on_batch_end, on_worker_start, on_worker_stop); the first is the
      outermost layer. Stored as a tuple. See docs/middleware.md.
    resolver(cls) -> instance: builds the object a method task runs on.
    serializer: "json" (default, safe), "dill" (lambdas, closures, any object) or an object with
      ``name``, ``dumps(call) -> bytes`` and ``loads(bytes) -> call``.
    execute(ctx): handler of low-level ``TaskData(topic, data)`` tasks.
    wait_replicas / wait_timeout: when wait_replicas > 0, enqueue_task, batch commits and
      cancel_batch send WAIT after their write and raise ReplicationError when fewer replicas
      acknowledged it within wait_timeout (see docs/operations.md, failover).
    busy_timeout: how long a call keeps retrying, with exponential backoff, while the server
      refuses it for now: LOADING (a restart reading its dataset), BUSY (a long script), MISCONF
      (a failed snapshot blocks writes), TRYAGAIN / ASK (a slot migration), CLUSTERDOWN. Past it
      the call raises StoreUnavailable with ``reason`` naming the reply (see
      coretask/gateway/refusals.py and docs/operations.md, Faults and recovery).
    signing_key: bytes or str (at least 16 bytes), or a list of them for rotation (the first
      signs, every one verifies): every payload is HMAC-SHA256-signed at enqueue, and workers
      dead-letter unread any task whose signature is missing or wrong (README, Security).
    allowed_modules: module name prefixes ("myapp.tasks" covers it and its submodules, "tests."
      every module under tests); a target elsewhere is refused at enqueue and dead-lettered,
      never imported, in a worker. None: any module except coretask's deny-list.
    allow_unsigned_pickle: let a non-JSON serializer run without signing_key (whoever can write
      the Redis keys can then run code on the workers).
    max_tasks_per_process / max_memory_per_process: worker recycling (manager processes only; an
      embedded ``run()`` ignores them). A worker process that has taken max_tasks_per_process
      tasks, or whose resident memory (RSS, in MiB: 1 = 1024 * 1024 bytes) exceeds
      max_memory_per_process after a task, stops fetching, finishes its running tasks and exits
      with code 4; the manager starts a fresh one at once (not counted as a crash). None = off.
    max_crashes: a worker process that dies (segfault, os._exit, killed, MemoryError) hands its
      tasks back without consuming a retry; they then run one at a time, each alone in a process,
      so the task that crashes alone is known. It is dead-lettered as WorkerLost, with its own exit
      code, after max_crashes such crashes (crashes never consume retries).
    timeout: the default time limit of a task's attempt (a task's own ``timeout=`` wins). Past
      it the task is aborted as a cancel aborts it (``ctx.cancelled``, then TaskTimeout raised in
      its thread); the attempt counts as failed. A task that ignores it is ended with its process
      after cancel_grace (its other tasks go back uncharged). None = no limit.
    result_ttl: keep every task's return value this long (a task's own ``keep_result=`` wins);
      ``get_result`` reads it. None = not kept (no cost).
    task_retention: keep the record of every finished task this long, so ``get_task`` shows how
      it ended (state, duration, error). None = off: at 10,000 tasks/s an hour of records is
      several gigabytes (README, Results and task state).
    eager: run every task in the calling thread as it is enqueued, with no Redis at all (for
      tests and scripts; coretask/eager.py, docs/testing.md). Enqueueing encodes, checks, signs
      and calls middleware as always; the task then runs through a worker's runner (hooks,
      retries in place without waiting their delay, time limits, results, continuations) and
      its state lives in this process's memory, where get_task, get_result and get_batch read
      it. Schedules are stored, never ticked. Leases, fairness, pause and cancels from other
      processes are not emulated.
    eager_propagate: in eager mode, a task that fails for good (retries exhausted, or refused)
      raises its exception from the enqueue call that ran it; False records it as a dead task
      (get_dead_tasks, get_result raises TaskFailed) and raises nothing.
    """

    redis: str = dataclasses.field(default_factory=lambda: os.environ.get("CORETASK_REDIS_URL", DEFAULT_REDIS))
    cluster: bool = False
    prefix: str = DEFAULT_PREFIX
    shards: int = 1
    shard_map: Mapping[str, int] | None = None
    queues: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_QUEUES))
    strict_queues: bool = True
    processes: int = DEFAULT_PROCESSES
    max_workers: int = DEFAULT_MAX_WORKERS
    sched_batch: bool = True
    retries: int = DEFAULT_RETRIES
    invisibility: timedelta = DEFAULT_INVISIBILITY
    base_frequency: timedelta = DEFAULT_BASE_FREQUENCY
    pushback_frequency: timedelta = DEFAULT_PUSHBACK_FREQUENCY
    cleanup_frequency: timedelta = DEFAULT_CLEANUP_FREQUENCY
    retention: timedelta = DEFAULT_RETENTION
    shutdown_timeout: timedelta = DEFAULT_SHUTDOWN_TIMEOUT
    cancel_grace: timedelta = DEFAULT_CANCEL_GRACE
    deadletter: bool = True
    deadletter_schedules: bool = False
    use_cron_seconds: bool = False
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    tenant_concurrency: int | None = None
    max_tasks_per_process: int | None = None
    max_crashes: int = 2
    max_memory_per_process: int | None = None
    wait_replicas: int = 0
    wait_timeout: timedelta = DEFAULT_WAIT_TIMEOUT
    busy_timeout: timedelta = DEFAULT_BUSY_TIMEOUT
    on_task_failed_delay: Callable[[TaskContext, int], timedelta | None] | None = None
    on_task_error: Callable[[TaskContext, BaseException], Any] | None = None
    on_task_start: Callable[[TaskContext], Any] | None = None
    on_task_end: Callable[[TaskContext], Any] | None = None
    on_batch_end: Callable[[BatchInfo], Any] | None = None
    middleware: Sequence[object] = ()
    resolver: Callable[[type], Any] = _default_resolver
    serializer: str | Serializer = "json"
    execute: Callable[[TaskContext], Any] | None = None
    signing_key: bytes | str | Sequence[bytes | str] | None = None
    allowed_modules: Sequence[str] | None = None
    allow_unsigned_pickle: bool = False
    timeout: timedelta | None = None
    result_ttl: timedelta | None = None
    task_retention: timedelta | None = None
    eager: bool = False
    eager_propagate: bool = True

    def __post_init__(self) -> None:
        for name in _BOOLS:
            # first: a truthy string ("false" from an environment variable) would switch it on
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"Options.{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.redis, str) or not re.match(r"^(redis|rediss|unix)://", self.redis):
            raise ConfigurationError(
                f"Options.redis must be a redis://, rediss:// or unix:// URL, got {_safe(self.redis)!r}")
        if not isinstance(self.prefix, str) or not self.prefix or any(c.isspace() for c in self.prefix):
            raise ConfigurationError(f"Options.prefix must be a non-empty string without spaces, got {self.prefix!r}")
        if self.cluster and not re.search(r"\{[^{}]+\}", self.prefix):
            raise ConfigurationError(
                f"Options.prefix {self.prefix!r} has no hash tag: with cluster=True it must contain one, "
                "such as '{coretask}', so that all coretask keys share one cluster slot (the Lua scripts "
                "touch several keys at once, which Redis Cluster allows only within one slot)")
        _check_int("shards", self.shards, 1)
        if self.shards > MAX_SHARDS:
            raise ConfigurationError(f"Options.shards must be at most {MAX_SHARDS}, got {self.shards}")
        if self.shard_map is not None:
            if not isinstance(self.shard_map, Mapping):
                raise ConfigurationError(f"Options.shard_map must map tenant names to shard numbers, got "
                                         f"{type(self.shard_map).__name__}")
            for tenant, shard in self.shard_map.items():
                if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < self.shards:
                    raise ConfigurationError(
                        f"Options.shard_map[{tenant!r}] is {shard!r}: a shard number from 0 to {self.shards - 1} "
                        f"(Options.shards={self.shards})")
            self.shard_map = dict(self.shard_map)
        if isinstance(self.queues, str) or not self.queues:
            raise ConfigurationError(f"Options.queues must be a non-empty list of queue names, got {self.queues!r}")
        self.queues = list(self.queues)
        for q in self.queues:
            check_queue_name(q, "Options.queues")
        if len(set(self.queues)) != len(self.queues):
            raise ConfigurationError(f"Options.queues lists a queue twice: {self.queues!r}")
        for name, low in (("processes", 1), ("max_workers", 1), ("retries", 0), ("max_payload_bytes", 64),
                          ("wait_replicas", 0), ("max_crashes", 1)):
            _check_int(name, getattr(self, name), low)
        for name in ("tenant_concurrency", "max_tasks_per_process", "max_memory_per_process"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in _DURATIONS:
            setattr(self, name, _duration(name, getattr(self, name)))
        for name in _OPTIONAL_DURATIONS:
            if getattr(self, name) is not None:
                setattr(self, name, _duration(name, getattr(self, name)))
        for name in _CALLBACKS:
            value = getattr(self, name)
            if (value is not None or name == "resolver") and not callable(value):
                allowed = "callable" if name == "resolver" else "callable or None"
                raise ConfigurationError(f"Options.{name} must be {allowed}, got {type(value).__name__}")
        self.middleware = check_middleware(self.middleware)
        if isinstance(self.serializer, str):
            if self.serializer not in SERIALIZER_NAMES:
                raise ConfigurationError(
                    f"Options.serializer must be one of {', '.join(SERIALIZER_NAMES)} or a serializer object, "
                    f"got {self.serializer!r}")
        elif not all(hasattr(self.serializer, a) for a in ("name", "dumps", "loads")):
            raise ConfigurationError("Options.serializer object must have 'name', 'dumps' and 'loads'")
        from .signing import check_allowed_modules, check_signing_keys
        self.signing_key = check_signing_keys(self.signing_key)
        self.allowed_modules = check_allowed_modules(self.allowed_modules)

    def __repr__(self) -> str:  # the dataclass repr would show the password of the redis URL
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["redis"] = _safe(self.redis)
        shown["signing_key"] = "***" if self.signing_key else None   # nor the signing keys
        return f"Options({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def replace(self, **changes: Any) -> Options:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_enqueue_queue(self, queue: object, what: str = "queue") -> str:
        """A queue a task may be enqueued to: a valid name and, with strict_queues, one of
        Options.queues (else no worker of this processor would ever fetch it)."""
        name = check_queue_name(queue, what)
        if self.strict_queues and name not in self.queues:
            close = difflib.get_close_matches(name, self.queues, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"{what} {name!r} is not in Options.queues {self.queues}{hint}: no worker of this processor "
                "fetches it; add it to Options.queues, or set Options(strict_queues=False) in a producer "
                "that feeds another deployment's queues")
        return name


_FIELDS = frozenset(f.name for f in dataclasses.fields(Options))
_BOOLS = tuple(f.name for f in dataclasses.fields(Options) if f.type in ("bool", bool))
# what other parts of coretask (the worker's --threads, Flask's CORETASK_THREADS) or other
# libraries call an option
ALIASES = {"threads": "max_workers", "concurrency": "max_workers", "workers": "processes",
           "max_retries": "retries", "url": "redis", "redis_url": "redis"}


def _refuse_unknown(init: Callable[..., None]) -> Callable[..., None]:
    """Options(retrys=3) would be a TypeError about __init__; say what was meant instead."""

    @functools.wraps(init)
    def __init__(self: Options, *args: Any, **kwargs: Any) -> None:
        unknown = [name for name in kwargs if name not in _FIELDS]
        if unknown:
            raise UnknownOption("; ".join(_unknown_option(name) for name in unknown))
        init(self, *args, **kwargs)

    return __init__


def _unknown_option(name: str) -> str:
    if name in ALIASES:
        return f"unknown option {name!r}; the option is {ALIASES[name]!r}"
    close = difflib.get_close_matches(name, sorted(_FIELDS), n=1, cutoff=0.6)
    if close:
        return f"unknown option {name!r}; did you mean {close[0]!r}?"
    return f"unknown option {name!r}; the options are: {', '.join(sorted(_FIELDS))}"


Options.__init__ = _refuse_unknown(Options.__init__)  # type: ignore[method-assign]


def check_queue_name(name: object, what: str = "queue") -> str:
    if not isinstance(name, str) or not QUEUE_NAME.match(name):
        raise ConfigurationError(
            f"{what}: queue name {name!r} is not allowed; use 1-100 characters of letters, digits, '_', '.', '-'")
    return name


def check_tenant(tenant: object) -> str:
    if not isinstance(tenant, str):
        raise ConfigurationError(f"a tenant is a string, got {type(tenant).__name__} {tenant!r}")
    if not tenant or len(tenant) > 200 or any(c.isspace() or not c.isprintable() for c in tenant):
        shown = repr(tenant) if len(tenant) <= 60 else f"{tenant[:40]!r}... ({len(tenant)} characters)"
        raise ConfigurationError(f"tenant {shown} is not allowed; use 1-200 printable characters without whitespace")
    return tenant


def check_id(what: str, value: object) -> str:
    """An id given to a lookup or an action (a task's, a batch's): the string an enqueue
    returned. Anything else would reach Redis as a key part and fail there, unexplained."""
    if not isinstance(value, str):
        raise ConfigurationError(f"a {what} id is the string enqueue_{what} returned, got "
                                 f"{type(value).__name__} {value!r}")
    return value


def check_worker(worker: object) -> str:
    """What pause_worker holds: a host name, a manager ("<host>:<pid>"), or the manager of a
    worker process id ("<host>:<pid>:<suffix>")."""
    if not isinstance(worker, str) or not worker or len(worker) > 255 or any(c.isspace() for c in worker):
        raise ConfigurationError(f"worker {worker!r} is not a worker name; give a host name ('web-1'), a manager "
                                 "('web-1:4242', as get_worker_states shows host and pid) or a worker process id")
    host, manager = worker_scopes(worker)
    return manager if manager is not None else host


def wait_seconds(name: str, value: object) -> float:
    """How long a call may block (get_result's ``wait``, wait_for_batch's ``timeout``): a
    timedelta or seconds, 0 or more, as every duration of the API takes it."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0 \
            or seconds == float("inf"):
        raise ConfigurationError(f"{name} must be a timedelta or a number of seconds >= 0, got {value!r}")
    return float(seconds)


def queue_list(text: str | None) -> list[str] | None:
    """A worker's ``--queues`` (comma-separated, priority order): None when not given. Given
    empty, refused: it would quietly serve Options.queues instead."""
    if text is None:
        return None
    names = [q.strip() for q in text.split(",") if q.strip()]
    if not names:
        raise ConfigurationError(f"--queues needs at least one queue name (comma-separated), got {text!r}")
    return names


def check_page(skip: object, take: object) -> None:
    """A page of a list read: a ``take`` of 0 or below would read every entry (Redis counts a
    negative stop from the end), a negative ``skip`` nothing; both refused."""
    for name, value, low in (("skip", skip, 0), ("take", take, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"Options.{name} must be an integer >= {low}, got {value!r}")


def _duration(name: str, value: object) -> timedelta:
    given = value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = timedelta(seconds=value)
        except (ValueError, OverflowError):  # nan, inf, out of timedelta's range
            value = None
    if not isinstance(value, timedelta) or value <= timedelta(0):
        shown = f"{given.total_seconds():g} seconds" if isinstance(given, timedelta) else repr(given)
        raise ConfigurationError(f"Options.{name} must be a positive timedelta or number of seconds, got {shown}")
    return value


def _safe(url: object) -> object:
    """The URL with any password masked, for error messages and logs."""
    return redact_url(url) if isinstance(url, str) else url


def redact_url(url: str) -> str:
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)  # redis-py also reads ?password=
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
