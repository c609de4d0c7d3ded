"""The shortest path end to end, embedded and with a real manager."""
from __future__ import annotations

from tests import tasks
from tests.conftest import wait_until


def test_embedded_worker_runs_enqueued_tasks(processor, embedded_worker, r, prefix):
    key = prefix + ":out"
    ids = [processor.enqueue_task("default", "acme", tasks.record, key, i) for i in range(20)]
    assert len(set(ids)) == 20
    embedded_worker(processor)
    wait_until(lambda: r.llen(key) == 20, 10, "20 results")
    assert sorted(int(x) for x in r.lrange(key, 0, -1)) == list(range(20))
    wait_until(lambda: processor.get_queue("default").in_flight == 0, 5, "acks flushed")
    q = processor.get_queue("default")
    assert (q.queued, q.in_flight, q.delayed, q.dead) == (0, 0, 0, 0)


def test_manager_processes_run_tasks(processor, start_manager, r, prefix):
    key = prefix + ":out"
    for i in range(50):
        processor.enqueue_task("default", "acme", tasks.record_pid, key, i)
    m = start_manager(processes=2, threads=2)
    wait_until(lambda: r.llen(key) == 50, 30, "50 results")
    assert m.terminate() == 0
    values = sorted(int(x.split(b":")[0]) for x in r.lrange(key, 0, -1))
    assert values == list(range(50))
