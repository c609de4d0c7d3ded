"""Batch building: tasks are staged in bounded chunks, then committed in one script.

The builder never holds more than one chunk of encoded tasks, so a 100,000-task batch enqueues
in bounded memory, and every script call touches at most one chunk, so Redis is never blocked
for long. Staged data is invisible to workers until the commit; on any error it is removed
(and it expires on its own if the producer dies), so a batch lands whole or not at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .encoding import Call, TaskData
from .errors import ConfigurationError, EnqueueError, ReplicationError, StoreError
from .gateway import NO_CONTROLS, Controls
from .middleware import EnqueueMessage

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .gateway import Gateway, InFlight
    from .producing import Producer

__all__ = ["BatchBlock", "BatchBuilder"]

CHUNK = 250                        # tasks per staging call (each call stays well under 50 ms)
CHUNK_BYTES = 1024 * 1024          # payload bytes per staging call (large payloads flush sooner)
STAGE_TTL_MS = 3600 * 1000         # a batch must be built within an hour
CONTINUE_ON = ("success", "complete")
BATCH_OPTIONS = ("queue", "delay_until", "retries", "key", "key_ttl", "timeout", "keep_result")


class BatchBuilder:
    """Collects the tasks and continuations of one batch (or one append to a batch)."""

    def __init__(self, gateway: Gateway, producer: Producer, queue: str, tenant: str, batch_id: str,
                 scope: str | None, mode: str) -> None:
        self._gw = gateway
        self._pr = producer
        self.queue = queue
        self.tenant = tenant
        self.id: str | None = batch_id if mode == "append" else None
        self._batch_id = batch_id
        self._scope = scope
        self._mode = mode
        self._stage = uuid.uuid4().hex[:12]
        self._chunk: list[Any] = []         # per task: id, shape number, payload, signature
        self._shapes: dict[tuple[Any, ...], int] = {}   # what tasks share, sent once per chunk
        self._chunk_bytes = 0
        self._inflight: InFlight | None = None   # the staging call Redis runs while we encode
        self.tasks = 0
        self.continuations = 0
        self._messages: list[EnqueueMessage] = []   # for after_enqueue middleware, after the commit
        self._closed: str | None = None     # why nothing more can be added (committed, discarded)

    def enqueue(self, fn: Callable[..., Any] | Call | TaskData, *args: Any, queue: str | None = None,
                delay_until: datetime | timedelta | float | None = None, retries: int | None = None,
                key: str | None = None, key_ttl: timedelta | float | None = None,
                timeout: timedelta | float | None = None, keep_result: timedelta | float | None = None,
                **kwargs: Any) -> str:
        """Add a task to the batch; returns its id. With an idempotency ``key`` held by another
        task (as for enqueue_task), the task is not added: the batch does not count it, and
        that task's id is returned. A keyed task costs a round trip of its own. ``timeout`` and
        ``keep_result`` as for enqueue_task (a continuation can read the kept results:
        get_batch_results)."""
        self._check_open()
        options = (queue, delay_until, retries, key, key_ttl, timeout, keep_result)
        if options != (None,) * 7:          # the check costs a microsecond: not paid when none is given
            self._pr.check_clash("batch.enqueue", fn, args, dict(zip(BATCH_OPTIONS, options)))
        self.tasks += 1
        return self._add(fn, args, kwargs, queue, delay_until, retries, "", key, key_ttl,
                         self._pr.controls(timeout, keep_result))

    def continue_with(self, fn: Callable[..., Any] | Call | TaskData, *args: Any, queue: str | None = None,
                      on: str = "success", **kwargs: Any) -> str:
        """Run ``fn`` once the batch finishes: on="success" when every task succeeded,
        on="complete" when every task reached a final state. Runs at most once."""
        self._check_open()
        if queue is not None:
            self._pr.check_clash("batch.continue_with", fn, args, {"queue": queue})
        if on not in CONTINUE_ON:
            raise ConfigurationError(f"continue_with(on=...) must be one of {', '.join(CONTINUE_ON)}, got {on!r}")
        self.continuations += 1
        return self._add(fn, args, kwargs, queue, None, None, on, controls=self._pr.controls())

    def _check_open(self) -> None:
        """A task added after the commit would get an id and never be stored: refused instead."""
        if self._closed is not None:
            raise ConfigurationError(
                f"batch {self._batch_id} takes no more tasks: {self._closed}. Add tasks to a batch that "
                f"exists with processor.append_batch({self.queue!r}, {self.tenant!r}, {self._batch_id!r}, build)")

    def _add(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], queue: str | None,
             delay_until: Any, retries: int | None, on: str, key: str | None = None, key_ttl: Any = None,
             controls: Controls = NO_CONTROLS) -> str:
        pr = self._pr
        q = pr.options.check_enqueue_queue(queue) if queue is not None else self.queue
        idem, key_ttl_ms = pr.idempotency(key, key_ttl)
        enc = pr.encode_call(fn, args, kwargs)
        task_id = self._gw.new_id_near(self._batch_id)     # a batch's tasks live on its shard
        shape = (q, self.tenant, enc.serializer, enc.target, pr.retries(retries), pr.due_ms(delay_until), on,
                 controls)
        chain = pr.chain
        if chain.before_enqueue or chain.after_enqueue:
            message = EnqueueMessage(task_id, q, self.tenant, enc.target, self._batch_id, pr.due_epoch_ms(shape[5]),
                                     shape[4], on or None)
            if chain.before_enqueue:
                chain.before_enqueue(message)
                if message.headers:
                    enc = pr.with_headers(enc, message.headers)
            if chain.after_enqueue and not idem:   # kept only when someone wants them after the commit
                self._messages.append(message)
        else:
            message = None
        if not idem:
            number = self._shapes.get(shape)
            if number is None:
                number = self._shapes[shape] = len(self._shapes) + 1
            self._chunk += [task_id, number, enc.payload, pr.sign(task_id, self.tenant, q, enc)]
            self._chunk_bytes += len(enc.payload)
        if idem:
            return self._stage_keyed(task_id, shape, enc.payload, pr.sign(task_id, self.tenant, q, enc), idem,
                                     key_ttl_ms, message)
        if len(self._chunk) >= CHUNK * 4 or self._chunk_bytes >= CHUNK_BYTES:
            self._flush()
        return task_id

    def _stage_keyed(self, task_id: str, shape: tuple[Any, ...], payload: bytes, signature: str, key: str,
                     key_ttl_ms: int, message: EnqueueMessage | None) -> str:
        """Stage a keyed task alone, after the chunk so far, and wait for the reply: staged only
        if it could claim its key (batch_stage.lua); else it is not counted, and the id of the
        task that holds the key is returned."""
        self._flush()
        self._staged_so_far()
        holder = self._gw.stage_keyed(self._batch_id, self._stage, STAGE_TTL_MS, shape,
                                      [task_id, 1, payload, signature], key, key_ttl_ms)
        if holder is not None:
            self.tasks -= 1
            return holder
        if message is not None and self._pr.chain.after_enqueue:
            self._messages.append(message)
        return task_id

    def _flush(self) -> None:
        """Send the chunk without waiting for its reply (read before the next one is sent): the
        next chunk is encoded while Redis stages this one. batch_stage is idempotent, so a call
        whose reply is lost can be sent again."""
        if self._chunk:
            shapes, chunk = list(self._shapes), self._chunk
            self._chunk = []
            self._shapes = {}
            self._chunk_bytes = 0
            self._staged_so_far()
            self._inflight = self._gw.stage_batch(self._batch_id, self._stage, STAGE_TTL_MS, shapes, chunk)

    def _staged_so_far(self) -> None:
        """Wait for the staging call in flight (its error, if any, is raised here)."""
        flight, self._inflight = self._inflight, None
        if flight is not None:
            flight.result()

    def _commit(self) -> bool:
        self._flush()
        self._staged_so_far()
        self._closed = ("it was written when its `with` block (or its build function) ended" if self._mode == "create"
                        else "this append was written when its build function returned")
        try:
            res = self._gw.commit_batch(self._batch_id, self._stage, self.tenant, self.queue, self._scope or "",
                                        self._mode, self.tasks, self.continuations, os.urandom(12).hex())
        except ReplicationError as exc:   # committed on the master; workers finish the publication
            exc.batch_id = self._batch_id
            raise
        if res == -1:
            raise StoreError(f"batch {self._batch_id}: staged data expired before the commit "
                             "(building took over an hour); nothing was enqueued")
        if res == 0:
            self._abort(EnqueueError(f"batch {self._batch_id} could not be appended to (unknown, another tenant's, "
                                     "or canceled); nothing of this append was enqueued"))
            return False
        try:
            self._gw.publish_batch(self._batch_id, self._stage)
        except Exception as exc:  # committed: any worker's maintenance loop finishes the publication
            log.warning("batch %s: publication interrupted (%s: %s); workers will finish it",
                        self._batch_id, type(exc).__name__, exc)
        self.id = self._batch_id
        if self._messages:
            messages, self._messages = self._messages, []
            for message in messages:
                self._pr.chain.after_enqueue(message)
        return True

    def _abort(self, error: BaseException) -> None:
        """Nothing of it is enqueued: the staged data goes, and middleware that saw its tasks in
        before_enqueue hears in after_enqueue that they were not written (``error``)."""
        if self._messages:
            messages, self._messages = self._messages, []
            written = isinstance(error, ReplicationError)     # committed on the master, not yet replicated
            for message in messages:
                self._pr.chain.after_enqueue(message if written else dataclasses.replace(message, error=error))
        if self._mode == "create":
            self._closed = "its `with` block (or build function) raised, so nothing of it was enqueued"
        else:
            self._closed = "this append's build function raised, or the batch could not be appended to"
        self._chunk = []
        self._shapes = {}
        try:
            self._staged_so_far()          # its data is removed below like the rest
        except Exception:
            pass
        self._gw.abort_stage(self._batch_id, self._stage, CHUNK)



class BatchBlock(contextlib.AbstractContextManager["BatchBuilder"]):
    """What ``processor.batch(...)`` returns: a ``with`` block whose builder is committed when
    the block ends. Used without ``with``, it says so instead of an AttributeError."""

    def __init__(self, block: contextlib.AbstractContextManager[BatchBuilder]) -> None:
        self._block = block

    def __enter__(self) -> BatchBuilder:
        return self._block.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        return self._block.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        raise ConfigurationError(f"processor.batch(...) is used in a with block: `with processor.batch(queue, tenant) "
                                 f"as batch: batch.{name}...` (or processor.enqueue_batch(queue, tenant, build)), "
                                 "so that the batch is written whole when the block ends")
