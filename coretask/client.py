"""TaskProcessor: the synchronous, thread-safe client API.

Every method is one or a few round trips; every state change is one Lua script. A producer
never needs a running worker, and a TaskProcessor is cheap to share between threads (redis-py
connection pool).
"""
from __future__ import annotations

import contextlib
import logging
import os
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from .batch import BatchBuilder
from .encoding import Call, Encoded, TaskData, encode, serializer_for
from .errors import ConfigurationError, ReplicationError
from .introspection import Introspection
from .models import BatchInfo
from .options import Options, check_queue_name, check_tenant
from .schedules import Schedules
from .signing import signer_for, unsigned_pickle_problem
from .gateway.transport import Store
from .tenancy import TenantAdmin

log = logging.getLogger(__name__)

__all__ = ["TaskProcessor"]


class TaskProcessor(Introspection, Schedules, TenantAdmin):
    """The entry point: enqueue tasks and batches, control processing, inspect state.

    Delivery contract: at least once. A task may run twice if its worker dies mid-task (it is
    then redelivered and consumes a retry); it never runs zero times once enqueue_task returned.
    """

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise ConfigurationError("pass either an Options object or keyword options, not both")
        self.options = options if options is not None else Options(**kwargs)
        self.store = Store(self.options)
        self._serializer = serializer_for(self.options.serializer)
        self._signer = signer_for(self.options)                    # None: payloads go unsigned
        self._unsigned_pickle = unsigned_pickle_problem(self.options)  # set: refuse to enqueue

    # ------------------------------------------------------------------------------ enqueue

    def enqueue_task(self, queue: str, tenant: str, fn: Callable[..., Any] | Call | TaskData, *args: Any,
                     delay_until: datetime | timedelta | float | None = None, retries: int | None = None,
                     **kwargs: Any) -> str:
        """Enqueue ``fn(*args, **kwargs)``; returns the task id. One round trip.

        ``delay_until``: an aware datetime, a timedelta from now, or epoch seconds.
        ``retries``: overrides Options.retries for this task.
        Use ``coretask.call(fn, ...)`` when fn has keyword arguments named like these options.
        """
        check_queue_name(queue)
        check_tenant(tenant)
        enc = self._encode(self._as_call(fn, args, kwargs))
        task_id = os.urandom(16).hex()
        k = self.store.keys
        try:
            code, _ = self.store.run("enqueue", [k.task(task_id), k.queues],
                                     [k.prefix, task_id, queue, tenant, enc.payload, enc.serializer,
                                      enc.target, self._retries(retries), self._due_ms(delay_until),
                                      self._sign(task_id, tenant, queue, enc)],
                                     durable=True)
        except ReplicationError as exc:   # Options.wait_replicas: enqueued, not yet replicated
            exc.task_id = task_id
            raise
        # code -1 means the id exists: a retried call whose first attempt had landed
        log.debug("enqueued %s %s queue=%s tenant=%s", task_id, enc.target, queue, tenant)
        return task_id

    def enqueue_batch(self, queue: str, tenant: str, build: Callable[[BatchBuilder], Any],
                      scope: str | None = None) -> str:
        """Build a batch with ``build(batch)`` (batch.enqueue / batch.continue_with) and write it
        atomically; returns the batch id."""
        with self.batch(queue, tenant, scope=scope) as b:
            build(b)
        assert b.id is not None
        return b.id

    @contextlib.contextmanager
    def batch(self, queue: str, tenant: str, scope: str | None = None) -> Iterator[BatchBuilder]:
        """``with processor.batch(queue, tenant) as batch: batch.enqueue(...)``; ``batch.id`` is
        set on exit. An exception inside the block enqueues nothing."""
        check_queue_name(queue)
        check_tenant(tenant)
        builder = BatchBuilder(self, queue, tenant, uuid.uuid4().hex, scope, "create")
        yield from _staged(builder)

    def append_batch(self, queue: str, tenant: str, batch_id: str, build: Callable[[BatchBuilder], Any]) -> bool:
        """Add tasks (and continuations) to an existing batch of this tenant. Returns False for
        an unknown, other tenant's or canceled batch. Appending to a finished batch re-opens it;
        continuations that already ran do not run again."""
        check_queue_name(queue)
        check_tenant(tenant)
        builder = BatchBuilder(self, queue, tenant, batch_id, None, "append")
        try:
            build(builder)
            return builder._commit()
        except BaseException:
            builder._abort()
            raise

    def cancel_batch(self, batch_id: str, tenant: str | None = None) -> bool:
        """Cancel a running batch at once: queued and delayed tasks never start, running ones are
        aborted, continuations never run. False when unknown, finished, or (with ``tenant``)
        another tenant's."""
        k = self.store.keys
        return bool(self.store.run("cancel_batch", [k.batch(batch_id), k.bend],
                                   [k.prefix, batch_id, tenant or ""], durable=True))

    # ------------------------------------------------------------------------- pause/resume

    def pause(self, requeue_running: bool = False) -> None:
        """Stop all fetching everywhere; effective for every worker once this returns. Running
        tasks finish, unless ``requeue_running``: then they are aborted and handed back to
        their queues without consuming a retry."""
        self._pause("all", True, "")
        if requeue_running:
            self.store.publish("pr")

    def resume(self) -> None:
        self._pause("all", False, "")

    @property
    def is_paused(self) -> bool:
        return bool(self.store.redis.exists(self.store.keys.paused))

    def pause_queue(self, queue: str) -> None:
        self._pause("queue", True, check_queue_name(queue))

    def resume_queue(self, queue: str) -> None:
        self._pause("queue", False, check_queue_name(queue))

    def get_paused_queues(self) -> list[str]:
        return sorted(m.decode() for m in self.store.redis.smembers(self.store.keys.pausedq))

    def pause_tenant(self, tenant: str) -> None:
        self._pause("tenant", True, check_tenant(tenant))

    def resume_tenant(self, tenant: str) -> None:
        self._pause("tenant", False, check_tenant(tenant))

    def _pause(self, scope: str, on: bool, name: str) -> None:
        k = self.store.keys
        self.store.run("pause", [k.paused, k.pausedq, k.pausedt, k.queues],
                       [k.prefix, scope, "1" if on else "0", name])

    # -------------------------------------------------------------------------- dead letters

    def retry_dead_tasks(self, queue: str, retries: int | None = None, count: int | None = None) -> int:
        """Move dead-lettered tasks back to work (oldest first) with ``retries`` retries."""
        k = self.store.keys
        return int(self.store.run("dead_retry", [k.dead(check_queue_name(queue))],
                                  [k.prefix, self._retries(retries), count or 0]))

    def discard_dead_tasks(self, queue: str, count: int | None = None) -> int:
        k = self.store.keys
        return int(self.store.run("dead_discard", [k.dead(check_queue_name(queue))], [k.prefix, count or 0]))

    # ------------------------------------------------------------------------------ running

    def run(self, stop_event: threading.Event, *, worker_id: str | None = None) -> None:
        """Run a worker loop in this process (threads only) until ``stop_event`` is set."""
        from .worker.process import WorkerProcess

        WorkerProcess(self, worker_id=worker_id, renew_own_leases=True).run(stop_event)

    def wait_for_batch(self, batch_id: str, timeout: float = 60.0, poll: float = 0.05) -> BatchInfo:
        """Block until the batch is finished (or canceled and drained); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get_batch(batch_id)
            if info is not None and info.finished and info.remaining == 0:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout}s: {info}")
            time.sleep(poll)

    def close(self) -> None:
        self.store.redis.close()

    # ------------------------------------------------------------------------------ helpers

    def _as_call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | TaskData:
        if isinstance(fn, (Call, TaskData)):
            if args or kwargs:
                raise ConfigurationError(f"{type(fn).__name__} already carries its arguments; pass none besides it")
            return fn
        return Call(fn, args, kwargs)

    def _encode(self, call: Call | TaskData) -> Encoded:
        """encode() with this processor's serializer, size limit and allow-list; refuses a pickle
        serializer without a signing key (see coretask.signing)."""
        if self._unsigned_pickle and not isinstance(call, TaskData):
            raise ConfigurationError(f"enqueue refused: {self._unsigned_pickle}")
        return encode(call, self._serializer, self.options.max_payload_bytes,
                      self.options.allowed_modules)  # type: ignore[arg-type]

    def _sign(self, task_id: str, tenant: str, queue: str, enc: Encoded) -> str:
        """The task's signature (field sg), or "" when Options.signing_key is not set."""
        return self._signer.sign_task(task_id, tenant, queue, enc) if self._signer else ""

    def _retries(self, retries: int | None) -> int:
        if retries is None:
            return self.options.retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, got {retries!r}")
        return retries

    @staticmethod
    def _due_ms(delay_until: datetime | timedelta | float | None) -> int:
        if delay_until is None:
            return 0
        # rounded up: a due time between two milliseconds must not let the task start early
        if isinstance(delay_until, timedelta):
            return math.ceil((time.time() + delay_until.total_seconds()) * 1000)
        if isinstance(delay_until, datetime):
            return math.ceil(delay_until.timestamp() * 1000)
        if isinstance(delay_until, (int, float)) and not isinstance(delay_until, bool):
            return math.ceil(delay_until * 1000)
        raise ConfigurationError(f"delay_until must be a datetime, timedelta or epoch seconds, got {delay_until!r}")


def _staged(builder: BatchBuilder) -> Iterator[BatchBuilder]:
    try:
        yield builder
        builder._commit()
    except BaseException:
        builder._abort()
        raise
