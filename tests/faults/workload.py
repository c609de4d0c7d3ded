"""The workload the server-fault tests run while they inject a fault, and the check that
everything reconciles afterwards.

A ``Producer`` thread enqueues tagged tasks (``tests.tasks_faults.run``) at a steady pace, and
every so often a batch of them, through one TaskProcessor; it notes when each enqueue returned
(acknowledged) and what each failed one raised. The tasks count their starts and finishes per
tag in the session's server, never in the server under fault: that is the ground truth.
``reconcile`` then waits until every acknowledged task has run and checks coretask's own
counters against it (queue, tenant, batches).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coretask import CoreTaskError, TaskProcessor
from tests import tasks_faults as tf
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts

QUEUE, TENANT = "default", "acme"


class Producer:
    """Enqueues ``p<i>`` every ``interval`` seconds (and, every ``batch_every`` enqueues, a batch
    of ``batch_size`` tasks ``b<i>-<j>``) until stopped. ``acked``: tag -> time.monotonic() when
    its enqueue returned; ``failed``: tag -> the coretask error its enqueue raised (the tasks of
    a failed batch all share it). Only coretask errors are caught: anything else is a bug the
    thread keeps in ``crash`` for ``stop`` to raise."""

    def __init__(self, processor: TaskProcessor, key: str, *, interval: float = 0.005, seconds: float = 0.0,
                 batch_every: int = 25, batch_size: int = 5) -> None:
        self.processor, self.key = processor, key
        self.interval, self.seconds = interval, seconds
        self.batch_every, self.batch_size = batch_every, batch_size
        self.acked: dict[str, float] = {}
        self.failed: dict[str, CoreTaskError] = {}
        self.batches: dict[str, list[str]] = {}
        self.crash: BaseException | None = None
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._calling = threading.Lock()     # held while an enqueue is in flight
        self._thread = threading.Thread(target=self._run, name="fault-producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def wait_acked(self, n: int, timeout: float = 15) -> None:
        """Until at least ``n`` more tasks than now are acknowledged."""
        goal = len(self.acked) + n
        wait_until(lambda: len(self.acked) >= goal or self.crash, timeout, f"{n} more enqueues")
        assert self.crash is None, self.crash

    def wait_span(self, seconds: float, timeout: float = 30) -> None:
        """Until the acknowledged enqueues span at least ``seconds``."""
        def spanned() -> bool:
            times = list(self.acked.values())
            return bool(times) and max(times) - min(times) >= seconds
        wait_until(lambda: spanned() or self.crash, timeout, f"{seconds} s of enqueues")
        assert self.crash is None, self.crash

    def hold(self) -> None:
        """Stop enqueueing until ``resume``, once the call in flight (if any) has returned: for a
        fault that must not catch a call half-way, such as a server shut down between running a
        script and sending its reply (redis-py resends a call whose reply was lost, so an enqueue
        could be stored twice: a known limit, docs/operations.md)."""
        self._go.clear()
        with self._calling:
            pass

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> Producer:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the producer thread did not stop"
        if self.crash is not None:
            raise AssertionError(f"the producer raised a non-coretask error: {self.crash!r}") from self.crash
        return self

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                if not self._go.wait(0.05):
                    continue
                i += 1
                with self._calling:
                    if self.batch_every and i % self.batch_every == 0:
                        self._batch(i)
                    else:
                        self._single(f"p{i}")
                self._stop.wait(self.interval)
        except BaseException as exc:        # noqa: BLE001 - reported by stop()
            self.crash = exc

    def _single(self, tag: str) -> None:
        try:
            self.processor.enqueue_task(QUEUE, TENANT, tf.run, self.key, tag, self.seconds)
        except CoreTaskError as exc:
            self.failed[tag] = exc
            return
        self.acked[tag] = time.monotonic()

    def _batch(self, i: int) -> None:
        tags = [f"b{i}-{j}" for j in range(self.batch_size)]
        try:
            bid = self.processor.enqueue_batch(QUEUE, TENANT, lambda b: [
                b.enqueue(tf.run, self.key, t, self.seconds) for t in tags])
        except CoreTaskError as exc:
            self.failed.update(dict.fromkeys(tags, exc))
            return
        now = time.monotonic()
        self.acked.update(dict.fromkeys(tags, now))
        self.batches[bid] = tags


@dataclass
class Reconciled:
    """What reconcile found: tags run (with how often), the acknowledged ones that never ran."""
    runs: dict[str, int]
    missing: set[str] = field(default_factory=set)

    @property
    def ran_twice(self) -> set[str]:
        return {t for t, n in self.runs.items() if n > 1}


def counts(p: TaskProcessor) -> tuple[int, int, int, int]:
    q = p.get_queue(QUEUE)
    return q.queued, q.in_flight, q.delayed, q.dead


def reconcile(p: TaskProcessor, r: Any, producer: Producer, *, timeout: float = 30.0, exactly_once: bool = True,
              may_miss: Callable[[str], bool] = lambda tag: False) -> Reconciled:
    """Wait until every acknowledged task ran (except those ``may_miss`` allows to be missing,
    such as enqueues an AOF lost) and nothing is queued or in flight; then check that:

    - nothing ran that was never enqueued (every tag that ran was acknowledged or failed: a
      failed enqueue may have landed, as a connection error leaves it unknown);
    - with ``exactly_once``, no task ran twice (else at least once);
    - the queue is empty (0 queued, in flight, delayed, dead), the tenant runs nothing and its
      done count equals the tasks that ran (each counted once however often it ran; less those
      that ``may_miss`` allows), with none failed or dead; every batch acknowledged (and not
      missing a task) is finished with all its tasks done.
    """
    key = producer.key
    expected = {t for t in producer.acked if not may_miss(t)}

    def settled() -> bool:
        finished = hash_counts(r, key + ":finished")
        return expected <= finished.keys() and counts(p) == (0, 0, 0, 0)

    wait_until(settled, timeout, lambda: (
        f"every acknowledged task to run and the queue to drain: {len(expected - hash_counts(r, key + ':finished').keys())} "
        f"of {len(expected)} not run, queue (queued, in flight, delayed, dead) {counts(p)}"))
    started, finished = hash_counts(r, key + ":started"), hash_counts(r, key + ":finished")
    assert started.keys() == finished.keys(), "a task started but never finished"
    unknown = finished.keys() - producer.acked.keys() - producer.failed.keys()
    assert not unknown, f"tasks ran that were never enqueued: {sorted(unknown)[:10]}"
    if exactly_once:
        twice = {t: n for t, n in finished.items() if n != 1 or started[t] != 1}
        assert not twice, f"tasks ran more than once: {dict(list(twice.items())[:10])}"
    stats = p.get_tenant_stats(TENANT)
    assert (stats.running, sum(stats.queued.values()), stats.failed, stats.dead) == (0, 0, 0, 0), stats
    missing = set(producer.acked) - finished.keys()
    # a task that may be missing may also have run before its record was lost (then its run is
    # recorded here but not counted there)
    slack = sum(1 for t in producer.acked if may_miss(t))
    assert len(finished) - slack <= stats.done <= len(finished), (stats.done, len(finished), len(missing))
    for bid, tags in producer.batches.items():
        if set(tags) & missing:
            continue
        b = p.get_batch(bid)
        assert b is not None and (b.total, b.done, b.failed, b.remaining) == (len(tags), len(tags), 0, 0), b
    return Reconciled(runs=finished, missing=missing)
