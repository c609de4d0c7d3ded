"""OpenTelemetry traces (``pip install 'coretask[otel]'``: opentelemetry-api only; the SDK and
exporters are the application's choice).

``Options(middleware=[TracingMiddleware()])`` on producers and workers gives:

* a PRODUCER span per enqueue: ``send <queue>`` around ``enqueue_task`` (from before the write
  to after it), ``create <queue>`` for each task added to a batch (ended as it is staged: a
  100,000-task batch keeps no span open until its commit). Its context (W3C ``traceparent`` /
  ``tracestate``, through the globally configured propagator) travels in the task's JSON
  envelope, written before the task is signed, so the signature covers it like the rest;
* a CONSUMER span ``process <queue>`` around each attempt in the worker, a child of the
  producer's span (``parent="child"``, the default: one trace from the request that enqueued to
  the task's own spans) or a new trace (``parent="link"``: for tasks that run long after they
  were enqueued); either way it carries a link to the producer span. It is the current span while
  the task body runs, so spans the task makes nest under it. A failed attempt records its
  exception and sets status ERROR; retries and dead-lettering are span events.

Attributes follow the messaging semantic conventions: ``messaging.system`` ("coretask"),
``messaging.destination.name`` (the queue), ``messaging.message.id`` (the task id),
``messaging.operation`` and ``messaging.operation.type`` / ``.name`` (send, create, process),
plus ``coretask.tenant``, ``coretask.batch_id``, ``coretask.attempt``, ``coretask.target``
and, on the consumer span, ``coretask.outcome``.

Only the JSON serializer carries headers: with dill, a custom serializer or ``TaskData`` the
consumer span starts a trace of its own. A worker older than this version dead-letters a task
that carries headers (unknown envelope field "h"): upgrade workers before producers turn
tracing on. With no SDK configured, the API's no-op tracer writes no header and costs little.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from ..errors import ConfigurationError
from ..middleware import FAILED, EnqueueMessage, Middleware
from . import require

__all__ = ["TracingMiddleware", "SYSTEM", "PENDING_MAX", "PENDING_AGE"]

SYSTEM = "coretask"
PENDING_MAX = 10_000     # send spans waiting for after_enqueue; past it the oldest are ended
PENDING_AGE = 60.0       # seconds: a send span whose after_enqueue never came (the write failed,
                         # or an idempotency key was held) is ended once older than this
PARENTS = ("child", "link")


def _otel() -> Any:
    return require("opentelemetry.trace", "otel", "coretask.contrib.otel")


class TracingMiddleware(Middleware):
    """PRODUCER and CONSUMER spans for coretask tasks (module docstring). ``tracer_provider``:
    default the global one (``trace.set_tracer_provider``), looked up lazily, so configuring
    the SDK after building this middleware works. ``parent``: "child" or "link"."""

    def __init__(self, *, tracer_provider: Any = None, parent: str = "child") -> None:
        trace = _otel()
        if parent not in PARENTS:
            raise ConfigurationError(f"TracingMiddleware(parent=...) must be one of {', '.join(PARENTS)}, "
                                     f"got {parent!r}")
        from opentelemetry import context, propagate
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        from .. import __version__
        self._trace, self._context, self._propagate = trace, context, propagate
        self._Link, self._Kind, self._Status, self._Code = Link, SpanKind, Status, StatusCode
        self.tracer = trace.get_tracer("coretask", __version__, tracer_provider=tracer_provider)
        self.parent = parent
        self._pending: OrderedDict[str, tuple[Any, float]] = OrderedDict()   # task id -> (send span, started)
        self._lock = threading.Lock()
        self._local = threading.local()          # per task thread: the consumer span and its context token

    # ------------------------------------------------------------------------------ producer

    def before_enqueue(self, message: EnqueueMessage) -> None:
        batch = message.batch_id is not None
        operation = "create" if batch else "send"
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.destination.name": message.queue,
            "messaging.message.id": message.task_id, "messaging.operation": operation,
            "messaging.operation.type": operation, "messaging.operation.name": operation,
            "coretask.tenant": message.tenant, "coretask.target": message.target,
        }
        if batch:
            attributes["coretask.batch_id"] = message.batch_id
        if message.continue_on:
            attributes["coretask.continue_on"] = message.continue_on
        if message.due_ms:
            attributes["coretask.due_ms"] = message.due_ms
        span = self.tracer.start_span(f"{operation} {message.queue}", kind=self._Kind.PRODUCER, attributes=attributes)
        self._propagate.inject(message.headers, context=self._trace.set_span_in_context(span))
        if batch:
            span.end()           # staged: the batch's commit comes later, for every task at once
            return
        now = time.monotonic()
        with self._lock:
            self._pending[message.task_id] = (span, now)
            stale = []
            while self._pending:
                oldest_id, (oldest, started) = next(iter(self._pending.items()))
                if len(self._pending) <= PENDING_MAX and now - started <= PENDING_AGE:
                    break
                del self._pending[oldest_id]
                stale.append(oldest)
        for old in stale:
            old.set_attribute("coretask.enqueue_confirmed", False)
            old.end()

    def after_enqueue(self, message: EnqueueMessage) -> None:
        if message.batch_id is not None:
            return
        with self._lock:
            entry = self._pending.pop(message.task_id, None)
        if entry is not None:
            span = entry[0]
            if message.held_by is not None:     # nothing written: the key's holder is the task
                span.set_attribute("coretask.held_by", message.held_by)
            if message.error is not None:       # nothing written: the caller gets this error
                self._failed(span, message.error)
            span.end()

    # -------------------------------------------------------------------------------- worker

    def before_task(self, ctx: Any) -> None:
        producer = self._propagate.extract(ctx.headers) if ctx.headers else None
        links = []
        if producer is not None:
            remote = self._trace.get_current_span(producer).get_span_context()
            if remote.is_valid:
                links.append(self._Link(remote))
            else:
                producer = None
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.destination.name": ctx.queue,
            "messaging.message.id": ctx.task_id, "messaging.operation": "process",
            "messaging.operation.type": "process", "messaging.operation.name": "process",
            "coretask.tenant": ctx.tenant, "coretask.attempt": ctx.attempt, "coretask.target": ctx.target,
        }
        if ctx.batch_id:
            attributes["coretask.batch_id"] = ctx.batch_id
        parent = producer if self.parent == "child" and producer is not None else self._context.Context()
        span = self.tracer.start_span(f"process {ctx.queue}", context=parent, kind=self._Kind.CONSUMER,
                                      attributes=attributes, links=links)
        token = self._context.attach(self._trace.set_span_in_context(span))
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append((span, token))

    def on_retry(self, ctx: Any, error: BaseException, delay: Any) -> None:
        span = self._current()
        if span is not None:
            span.add_event("coretask.retry", {"coretask.retries_left": ctx.retries_left,
                                              "coretask.delay_ms": int(delay.total_seconds() * 1000) if delay else 0})

    def on_dead(self, ctx: Any, error: BaseException) -> None:
        span = self._current()
        if span is not None:
            span.add_event("coretask.dead", {"exception.type": f"{type(error).__module__}.{type(error).__qualname__}"})

    def after_task(self, ctx: Any, outcome: str, result: Any, error: BaseException | None) -> None:
        stack = getattr(self._local, "stack", None)
        if not stack:
            return
        span, token = stack.pop()
        try:
            span.set_attribute("coretask.outcome", outcome)
            if outcome == FAILED and error is not None:
                self._failed(span, error)
            span.end()
        finally:
            self._context.detach(token)

    def _failed(self, span: Any, error: BaseException) -> None:
        span.record_exception(error)
        span.set_attribute("error.type", f"{type(error).__module__}.{type(error).__qualname__}")
        span.set_status(self._Status(self._Code.ERROR, f"{type(error).__name__}: {_text(error)}"))

    def _current(self) -> Any:
        stack = getattr(self._local, "stack", None)
        return stack[-1][0] if stack else None

    def __repr__(self) -> str:
        return f"TracingMiddleware(parent={self.parent!r})"


def _text(error: BaseException) -> str:
    try:
        return str(error)[:200]
    except Exception:
        return f"<unprintable {type(error).__name__}>"
