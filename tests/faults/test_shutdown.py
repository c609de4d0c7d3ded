"""Graceful shutdown under load: SIGTERM to a manager running 100 tasks at once. Every task either
finishes (and is acknowledged) or is handed back within the shutdown deadline; after a second
manager drains the queue, every task ran to completion: an acknowledged task never runs again, a
handed-back one runs once more.

(SIGTERM with a single task, a task longer than shutdown_timeout, lease renewal while draining and
SIGKILL of the manager are in tests/test_worker.py.)
"""
from __future__ import annotations

import random
import signal
import time

from tests import tasks_faults as tf
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts


def counts(p, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


def test_sigterm_with_100_tasks_running_each_finishes_or_is_handed_back_exactly_once(
        processor, start_manager, r, prefix):
    # Given a manager with 2 processes x 50 threads (shutdown_timeout 2 s)
    # running 100 tasks of 0.5-3 s (sleeping in 10 ms steps)
    key = prefix + ":sd"
    opts = {"shutdown_timeout": 2.0}
    a = start_manager(processes=2, threads=50, **opts)
    a.wait_children(2)
    rnd = random.Random(7)
    tags = [f"t{i}" for i in range(100)]
    ids = {t: processor.enqueue_task("default", "acme", tf.run, key, t, round(rnd.uniform(0.5, 3.0), 2))
           for t in tags}
    wait_until(lambda: len(hash_counts(r, key + ":started")) == 100, 30,
             lambda: f"100 tasks running (counts {counts(processor)})")

    # When the manager gets SIGTERM
    a.proc.send_signal(signal.SIGTERM)
    signaled = time.monotonic()

    # Then it exits with 0 within the shutdown deadline (plus a margin)
    assert a.proc.wait(15) == 0
    assert time.monotonic() - signaled < 2.0 + 3.0
    # ... every task either finished and was acknowledged, or was handed back to the queue
    # with its retries untouched; none is left in flight, none started twice
    finished = hash_counts(r, key + ":finished")
    assert set(finished.values()) <= {1}
    infos = {t: processor.get_task(ids[t]) for t in tags}
    acked = {t for t in tags if infos[t] is None}            # acknowledged: deleted
    back = set(tags) - acked
    assert acked <= set(finished.keys())                      # only after the body returned
    assert 0 < len(back - set(finished)) and len(back) < 100
    for t in back:
        assert (infos[t].state, infos[t].retries_left) == ("queued", 3), (t, infos[t])
    # (a handed-back task in `finished` took its abort after its last write: the exception lands
    # at the next bytecode, before the body returns; it runs again, as any task a shutdown
    # interrupts: at least once, never lost)
    late = back & set(finished)
    assert counts(processor) == (len(back), 0, 0, 0)
    assert hash_counts(r, key + ":started") == {t: 1 for t in tags}
    assert processor.get_tenant_stats("acme").done == len(acked)
    assert r.zcard(prefix + ":leases") == 0
    assert "tasks still running at the shutdown deadline (shutdown_timeout 2s); handing them back: " in a.log()

    # When a second manager drains the queue
    b = start_manager(processes=2, threads=50, **opts)
    wait_until(lambda: len(hash_counts(r, key + ":finished")) == 100 and
               sum(hash_counts(r, key + ":finished").values()) == 100 + len(late), 30,
               lambda: f"every task finished (counts {counts(processor)})")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 10, "0 queued / 0 in flight")

    # Then every task ran to completion: once, or again when handed back
    assert hash_counts(r, key + ":finished") == {t: 2 if t in late else 1 for t in tags}
    assert hash_counts(r, key + ":started") == {t: 2 if t in back else 1 for t in tags}
    assert processor.get_tenant_stats("acme").done == 100
    assert [processor.get_task(i) for i in ids.values()] == [None] * 100
    assert b.terminate() == 0
