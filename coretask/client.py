"""Client: the synchronous, thread-safe API that TaskProcessor (coretask/processor.py) offers.

Every method is one or a few round trips through the gateway; every state change is one Lua
script. A producer never needs a running worker, and a client is cheap to share between threads
(redis-py connection pool).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, cast

from .batch import BATCH_OPTIONS, BatchBlock, BatchBuilder
from .encoding import Call, TaskData
from .errors import ConfigurationError, ReplicationError
from .gateway import Gateway
from .introspection import Introspection
from .middleware import Chain, EnqueueMessage
from .models import BatchInfo, worker_scopes
from .options import Options, check_id, check_queue_name, check_tenant, check_worker, wait_seconds
from .producing import Producer
from .schedules import Schedules
from .tenancy import TenantAdmin

log = logging.getLogger(__name__)

__all__ = ["Client"]


class Client(Introspection, Schedules, TenantAdmin):
    """Enqueue tasks and batches, control processing, inspect state (TaskProcessor adds run()).

    Delivery contract: at least once. A task may run twice if its worker dies mid-task (it is
    then redelivered); it never runs zero times once enqueue_task returned.
    """

    # Eager mode (Options.eager, coretask/eager.py): runs the tasks a call made ready, in the
    # calling thread. None otherwise: then the calls below pay one attribute test for it.
    _run_ready: Callable[[], None] | None = None

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise ConfigurationError("pass either an Options object or keyword options, not both")
        if options is not None and not isinstance(options, Options):
            hint = "TaskProcessor(**options) or TaskProcessor(Options(**options))" if isinstance(options, dict) \
                else "TaskProcessor(Options(redis=...)) or TaskProcessor(redis=...)"
            raise ConfigurationError(f"TaskProcessor takes an Options object, got {type(options).__name__}: use {hint}")
        self.options = options if options is not None else Options(**kwargs)
        self.gateway: Gateway
        if self.options.eager:      # the scripts' state in memory, no connection (gateway/memory.py)
            from .gateway.memory import MemoryGateway
            self.gateway = MemoryGateway(self.options)
        elif self.options.shards > 1:     # one Gateway per shard behind the same interface
            from .gateway.shards import ShardedGateway
            self.gateway = cast(Gateway, ShardedGateway(self.options))
        else:
            self.gateway = Gateway(self.options)
        self.chain = Chain.from_options(self.options)
        self.producer = Producer(self.options, self.chain)

    # ------------------------------------------------------------------------------ enqueue

    def enqueue_task(self, queue: str, tenant: str, fn: Callable[..., Any] | Call | TaskData, *args: Any,
                     delay_until: datetime | timedelta | float | None = None, retries: int | None = None,
                     key: str | None = None, key_ttl: timedelta | float | None = None,
                     timeout: timedelta | float | None = None, keep_result: timedelta | float | None = None,
                     **kwargs: Any) -> str:
        """Enqueue ``fn(*args, **kwargs)``; returns the task id. One round trip.

        ``delay_until``: an aware datetime, a timedelta from now, or epoch seconds (a number
        before the year 2000 is refused: it was meant as a delay, which is a timedelta).
        ``retries``: overrides Options.retries for this task.
        ``key``: an idempotency key (per tenant): while a task enqueued with it is queued,
        delayed or running, and for ``key_ttl`` (a timedelta or seconds) after it ended, another
        enqueue with the key enqueues nothing and returns that task's id.
        ``timeout``: this task's time limit (a timedelta or seconds; default Options.timeout).
        ``keep_result``: keep the return value this long for get_result (default
        Options.result_ttl; None there: not kept).
        Use ``coretask.call(fn, ...)`` when fn has keyword arguments named like these options.
        """
        self.options.check_enqueue_queue(queue)
        check_tenant(tenant)
        pr = self.producer
        options = (delay_until, retries, key, key_ttl, timeout, keep_result)
        if options != (None,) * 6:          # the check costs a microsecond: not paid when none is given
            pr.check_clash("enqueue_task", fn, args, dict(zip(BATCH_OPTIONS[1:], options)))
        idem, key_ttl_ms = pr.idempotency(key, key_ttl)
        controls = pr.controls(timeout, keep_result)
        enc = pr.encode_call(fn, args, kwargs)
        task_id = self.gateway.new_id(tenant)
        n_retries, due_ms = pr.retries(retries), pr.due_ms(delay_until)
        chain = self.chain
        message = None
        if chain.before_enqueue or chain.after_enqueue:
            message = EnqueueMessage(task_id, queue, tenant, enc.target, None, pr.due_epoch_ms(due_ms), n_retries)
            if chain.before_enqueue:
                chain.before_enqueue(message)
                if message.headers:
                    enc = pr.with_headers(enc, message.headers)
        try:
            if idem:
                holder = self.gateway.enqueue_keyed(task_id, queue, tenant, enc.payload, enc.serializer, enc.target,
                                                    n_retries, due_ms, pr.sign(task_id, tenant, queue, enc), idem,
                                                    key_ttl_ms, controls)
                if holder is not None:     # the key is held: nothing enqueued
                    log.debug("key %r of tenant %s is held by task %s; nothing enqueued", idem, tenant, holder)
                    if message is not None and chain.after_enqueue:
                        chain.after_enqueue(dataclasses.replace(message, held_by=holder))
                    return holder
            else:
                self.gateway.enqueue(task_id, queue, tenant, enc.payload, enc.serializer, enc.target, n_retries,
                                     due_ms, pr.sign(task_id, tenant, queue, enc), controls)
        except ReplicationError as exc:   # Options.wait_replicas: enqueued, not yet replicated
            exc.task_id = task_id
            if message is not None and chain.after_enqueue:
                chain.after_enqueue(message)          # written (on the master)
            raise
        except Exception as exc:
            if message is not None and chain.after_enqueue:
                chain.after_enqueue(dataclasses.replace(message, error=exc))
            raise
        # code -1 means the id exists: a retried call whose first attempt had landed
        log.debug("enqueued %s %s queue=%s tenant=%s", task_id, enc.target, queue, tenant)
        if message is not None and chain.after_enqueue:
            chain.after_enqueue(message)
        if self._run_ready is not None:
            self._run_ready()
        return task_id

    def enqueue_batch(self, queue: str, tenant: str, build: Callable[[BatchBuilder], Any],
                      scope: str | None = None) -> str:
        """Build a batch with ``build(batch)`` (batch.enqueue / batch.continue_with) and write it
        atomically; returns the batch id."""
        with self.batch(queue, tenant, scope=scope) as b:
            build(b)
        assert b.id is not None
        return b.id

    def batch(self, queue: str, tenant: str, scope: str | None = None) -> BatchBlock:
        """``with processor.batch(queue, tenant) as batch: batch.enqueue(...)``; ``batch.id`` is
        set on exit. An exception inside the block enqueues nothing; after the block, the batch
        takes no more tasks (append_batch adds to it)."""
        self.options.check_enqueue_queue(queue)
        check_tenant(tenant)
        return BatchBlock(self._batch_block(queue, tenant, scope))

    @contextlib.contextmanager
    def _batch_block(self, queue: str, tenant: str, scope: str | None) -> Iterator[BatchBuilder]:
        builder = BatchBuilder(self.gateway, self.producer, queue, tenant, self.gateway.new_id(tenant), scope, "create")
        yield from _staged(builder)
        if self._run_ready is not None:
            self._run_ready()

    def append_batch(self, queue: str, tenant: str, batch_id: str, build: Callable[[BatchBuilder], Any]) -> bool:
        """Add tasks (and continuations) to an existing batch of this tenant. Returns False for
        an unknown, other tenant's or canceled batch. Appending to a finished batch re-opens it;
        continuations that already ran do not run again."""
        self.options.check_enqueue_queue(queue)
        check_tenant(tenant)
        builder = BatchBuilder(self.gateway, self.producer, queue, tenant, batch_id, None, "append")
        try:
            build(builder)
            committed = builder._commit()
        except BaseException as exc:
            builder._abort(exc)
            raise
        if self._run_ready is not None:
            self._run_ready()
        return committed

    def cancel_batch(self, batch_id: str, tenant: str | None = None) -> bool:
        """Cancel a running batch at once: queued and delayed tasks never start, running ones are
        aborted, continuations never run. False when unknown, finished, or (with ``tenant``)
        another tenant's."""
        return self.gateway.cancel_batch(check_id("batch", batch_id), tenant)

    # -------------------------------------------------------------------------- single tasks

    def cancel_task(self, task_id: str, tenant: str | None = None) -> bool:
        """Cancel one task: queued or delayed, it never starts; running, it is aborted as a
        batch cancel aborts its tasks (``ctx.cancelled``, then TaskCanceled). Counted canceled in
        its tenant's statistics and in its batch. False when unknown, finished (a task that
        returned first is done), dead, already canceled, or (with ``tenant``) another tenant's."""
        return self.gateway.cancel_task(check_id("task", task_id), tenant)

    def delete_task(self, task_id: str, tenant: str | None = None) -> bool:
        """Delete a queued, delayed or dead task (or a continuation waiting for its batch),
        leaving no trace in the counters: it leaves its batch (total and remaining -1), a dead
        one stays counted failed. False when unknown, running (use cancel_task), finished, or
        (with ``tenant``) another tenant's."""
        return self.gateway.delete_task(check_id("task", task_id), tenant)

    def retry_dead_task(self, task_id: str, retries: int | None = None, tenant: str | None = None) -> bool:
        """Move one dead-lettered task back to work with ``retries`` retries (default
        Options.retries), as retry_dead_tasks does. False when it is not a dead task (of
        ``tenant``); a dead task of a canceled batch is discarded instead (False)."""
        moved = self.gateway.retry_dead_task(check_id("task", task_id), tenant, self.producer.retries(retries))
        if self._run_ready is not None:
            self._run_ready()
        return moved

    def discard_dead_task(self, task_id: str, tenant: str | None = None) -> bool:
        """Delete one dead-lettered task (its batch keeps counting it failed)."""
        return self.gateway.delete_task(check_id("task", task_id), tenant, dead_only=True)

    # ------------------------------------------------------------------------- pause/resume

    def pause(self, requeue_running: bool = False) -> None:
        """Stop all fetching everywhere; effective for every worker once this returns. Running
        tasks finish, unless ``requeue_running``: then they are aborted and handed back to
        their queues without consuming a retry."""
        self.gateway.pause("all", True, requeue=requeue_running)

    def resume(self) -> None:
        self._pause("all", False, "")

    @property
    def is_paused(self) -> bool:
        return self.gateway.is_paused()

    def pause_queue(self, queue: str) -> None:
        """Pause one queue on every worker. A name that is neither in Options.queues nor ever
        held work is refused (a misspelt name would pause nothing), unless strict_queues is off
        (a producer that feeds another deployment's queues)."""
        name = check_queue_name(queue)
        if self.options.strict_queues:
            self._check_known_queue(name, "To pause a queue another deployment serves, use a processor with "
                                          "Options(strict_queues=False)")
        self._pause("queue", True, name)

    def resume_queue(self, queue: str) -> None:
        self._pause("queue", False, check_queue_name(queue))

    def get_paused_queues(self) -> list[str]:
        return self.gateway.paused_queues()

    def pause_tenant(self, tenant: str) -> None:
        self._pause("tenant", True, check_tenant(tenant))

    def resume_tenant(self, tenant: str) -> None:
        self._pause("tenant", False, check_tenant(tenant))

    def pause_worker(self, worker: str) -> int:
        """Stop one host's or one worker manager's processes from starting tasks, as pause()
        does for all of them: effective once this returns; their running tasks finish, and the
        other workers take the work (drain a machine before maintenance, or take a misbehaving
        one out without stopping it). ``worker`` is a host name ("web-1"), a manager
        ("web-1:4242": host and manager pid, as get_worker_states shows them) or a worker
        process id (its manager is paused). Returns how many live worker processes it holds
        now; 0 when none matches, and the pause then holds any that starts later on that host
        or manager."""
        name = check_worker(worker)
        self._pause("worker", True, name)
        return sum(1 for w in self.gateway.worker_heartbeats() if name in worker_scopes(w))

    def resume_worker(self, worker: str) -> None:
        """Undo pause_worker (the same name, or a process id of that manager)."""
        self._pause("worker", False, check_worker(worker))

    def get_paused_workers(self) -> list[str]:
        """The hosts and managers paused by pause_worker."""
        return self.gateway.paused_workers()

    def _pause(self, scope: str, on: bool, name: str) -> None:
        self.gateway.pause(scope, on, name)

    # -------------------------------------------------------------------------- dead letters

    def retry_dead_tasks(self, queue: str, retries: int | None = None, count: int | None = None) -> int:
        """Move dead-lettered tasks back to work (oldest first) with ``retries`` retries: the
        oldest ``count``, or all of them (None). Returns how many moved."""
        n = self._dead_count(queue, count)
        if n is None:
            return 0
        moved = self.gateway.retry_dead(queue, self.producer.retries(retries), n)
        if self._run_ready is not None:
            self._run_ready()
        return moved

    def discard_dead_tasks(self, queue: str, count: int | None = None) -> int:
        """Delete dead-lettered tasks (oldest first): the oldest ``count``, or all of them
        (None). Returns how many were deleted; their batches keep counting them failed."""
        n = self._dead_count(queue, count)
        return 0 if n is None else self.gateway.discard_dead(queue, n)

    def _check_known_queue(self, name: str, fix: str = "") -> None:
        """Refuse a queue that is neither in Options.queues nor ever held work: a misspelt name
        would change nothing and say so quietly."""
        if name in self.options.queues:
            return
        seen = self.gateway.queue_names()     # names only: get_queues would read every count too
        if name not in seen:
            known = list(dict.fromkeys([*self.options.queues, *seen]))
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigurationError(
                f"queue {name!r} is not a queue of this deployment (not in Options.queues, never held work)"
                + (f"; did you mean {close[0]!r}?" if close else f"; the queues are: {', '.join(known)}.")
                + (" " + fix if fix else ""))

    def _dead_count(self, queue: str, count: int | None) -> int | None:
        """The scripts' count for a bulk dead-letter call (0 = all), or None when ``count`` is 0
        (nothing to do: a computed ``min(n, limit)`` must never read as "all"). An unknown
        queue is refused (_check_known_queue)."""
        check_queue_name(queue)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ConfigurationError(f"count must be a whole number of tasks >= 0, or None for all of them; "
                                     f"got {count!r}")
        self._check_known_queue(queue)
        if count == 0:
            return None
        return count or 0

    # ------------------------------------------------------------------------------ waiting

    def wait_for_batch(self, batch_id: str, timeout: timedelta | float = 60.0, poll: float = 0.05) -> BatchInfo:
        """Block until the batch is finished (or canceled and drained); TimeoutError otherwise.
        An id that names no batch is refused at once (ConfigurationError), not waited on."""
        deadline = time.monotonic() + wait_seconds("timeout", timeout)
        while True:
            info = self.get_batch(batch_id)
            if info is None:
                raise ConfigurationError(f"batch {batch_id} is unknown (never created, or deleted after its "
                                         "retention): nothing to wait for")
            if info.finished and info.remaining == 0:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout}s: {info.state}, {info.done} done, "
                                   f"{info.failed} failed, {info.canceled} canceled, {info.remaining} remaining")
            time.sleep(poll)

    def close(self) -> None:
        self.gateway.close()


def _staged(builder: BatchBuilder) -> Iterator[BatchBuilder]:
    try:
        yield builder
        builder._commit()
    except BaseException as exc:
        builder._abort(exc)
        raise
