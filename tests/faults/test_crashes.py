"""Crashes charge only the culprit: a worker process that dies (segfault, os._exit, a MemoryError
under an address-space limit) hands every task it ran back without consuming a retry; they run
again one at a time, each alone in the manager's isolation process, so the task that crashes
alone is named and dead-lettered with its own exit code, and every innocent task succeeds."""
from __future__ import annotations

import pytest

from tests import tasks_worker as tw
from tests.conftest import wait_until

EXIT_CODES = {"segfault": "exit code -11", "exit": "exit code 17", "memory": "exit code 5, MemoryError in a task"}


@pytest.mark.parametrize("how", ["segfault", "exit", "memory"])
def test_a_crash_charges_only_the_task_that_caused_it(processor, start_manager, r, prefix, how):
    # Given one worker process of 4 threads, three innocent tasks with no retry to spare, and a
    # task that ends its process while the innocent ones run beside it
    m = start_manager(processes=1, threads=4, max_crashes=2)
    m.wait_children(1)
    key = prefix + ":crash"
    innocents = [processor.enqueue_task("default", "acme", tw.innocent, f"{prefix}:i{n}", 1.5, retries=0)
                 for n in range(3)]
    wait_until(lambda: all(r.llen(f"{prefix}:i{n}:started") for n in range(3)), 20, "the innocent tasks running")
    culprit = processor.enqueue_task("default", "acme", tw.crash, key, how, 0.3, retries=0)

    # When the workers have dealt with it
    wait_until(lambda: processor.get_queue("default").dead == 1, 60, "the culprit dead-lettered")
    wait_until(lambda: all(r.llen(f"{prefix}:i{n}:finished") for n in range(3)), 30, "the innocent tasks done")

    # Then the culprit is dead-lettered as WorkerLost naming its own crash: its first crash, in
    # company, charged nobody; then it crashed the isolation process twice, alone (max_crashes=2);
    # no retry was consumed
    [dead] = processor.get_dead_tasks("default")
    assert dead.id == culprit and dead.error_type == "WorkerLost"
    assert EXIT_CODES[how] in dead.error_message, dead.error_message
    assert dead.retries_left == 0
    pids = [int(p) for p in r.lrange(key, 0, -1)]
    assert len(pids) == 3 and len(set(pids)) == 3 and r.llen(key + ":survived") == 0
    # and every innocent task succeeded (retries=0: a charged crash would have buried it)
    for n in range(3):
        finished = [int(a) for a in r.lrange(f"{prefix}:i{n}:finished", 0, -1)]
        assert len(finished) == 1
        starts = [s.decode().split(":") for s in r.lrange(f"{prefix}:i{n}:started", 0, -1)]
        assert all(left == "0" for _, left, _ in starts)      # retries never charged
    # (a done task's record goes with its acknowledgement, which may follow the run by a turn)
    wait_until(lambda: all(processor.get_task(t) is None for t in innocents), 10, "the innocent tasks acknowledged")
    # and the counts reconcile, the isolation process ended, the worker process serves on
    wait_until(lambda: (processor.get_queue("default").queued, processor.get_queue("default").in_flight) == (0, 0),
               10, "nothing queued or in flight")
    stats = processor.get_tenant_stats("acme")
    assert (stats.done, stats.dead, stats.running) == (3, 1, 0)
    after = processor.enqueue_task("default", "acme", tw.add, prefix + ":after", 1)
    wait_until(lambda: r.scard(prefix + ":after") == 1, 20, "a task after the crashes")
    wait_until(lambda: processor.get_task(after) is None, 10, "the task after the crashes acknowledged")
    assert "run one at a time, each alone in an isolation process" in m.log()
    assert m.log().count(f"task {culprit} was the only one running") == 2
