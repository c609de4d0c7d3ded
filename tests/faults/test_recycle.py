"""Worker recycling: Options(max_tasks_per_process=N, max_memory_per_process=MiB). A worker
process over either limit stops fetching, finishes its running tasks, flushes their
acknowledgements and exits with code 4; the manager starts a new one at once (no backoff, no
retry consumed: not a crash). Every task still runs exactly once."""
from __future__ import annotations

import re

import psutil
import pytest

from coretask import ConfigurationError, Options
from tests import tasks_faults as tf
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts


def fresh_below(m, limit: int) -> bool:
    try:
        children = m.children()
        return len(children) == 1 and children[0].memory_info().rss < limit
    except psutil.NoSuchProcess:
        return False


def counts(p, queue: str = "default") -> tuple[int, int, int, int]:
    q = p.get_queue(queue)
    return q.queued, q.in_flight, q.delayed, q.dead


@pytest.mark.parametrize("name", ["max_tasks_per_process", "max_memory_per_process"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_recycling_limits_are_validated(name, value):
    with pytest.raises(ConfigurationError, match=f"Options.{name} must be an integer >= 1"):
        Options(redis="redis://127.0.0.1:1/0", **{name: value})
    assert getattr(Options(redis="redis://127.0.0.1:1/0"), name) is None
    assert getattr(Options(redis="redis://127.0.0.1:1/0", **{name: 7}), name) == 7


def test_max_tasks_per_process_50_over_500_tasks(processor, start_manager, r, prefix):
    # Given a manager with 2 processes x 4 threads, each recycled after 50 tasks
    key = prefix + ":rec"
    m = start_manager(processes=2, threads=4, max_tasks_per_process=50)
    m.wait_children(2)

    # When 500 tasks run
    tags = [str(i) for i in range(500)]
    processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(tf.run_pid, key, t) for t in tags])

    # Then every task ran exactly once, nothing was dead-lettered or retried
    wait_until(lambda: len(hash_counts(r, key + ":runs")) == 500, 60,
             lambda: f"500 tasks (counts {counts(processor)}); log:\n{m.log()[-3000:]}")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":runs") == {t: 1 for t in tags}
    assert processor.get_tenant_stats("acme").done == 500
    # ... by successive worker processes: each one that recycled took exactly 50 tasks and
    # exited with the recycling code, replaced at once, not as a crash; the two alive at the end
    # may have shared the last tasks
    log = m.log()
    pids = hash_counts(r, key + ":pids")
    recycled = set(re.findall(r"\[(\d+)\] worker \S+: recycling after \d+ tasks?: "
                              r"max_tasks_per_process=50 reached", log))
    assert len(recycled) >= 8, log
    assert {p: pids.get(p) for p in recycled} == {p: 50 for p in recycled}, pids
    assert len(set(pids) - recycled) <= 2 and max(pids.values()) == 50, pids
    wait_until(lambda: m.log().count("recycled; starting a new one") >= len(recycled), 10,
               lambda: f"the manager replaced {len(recycled)} recycled processes; log:\n{m.log()}")
    assert "died (exit code" not in log and "Traceback" not in log
    assert len(m.wait_children(2)) == 2
    assert m.terminate() == 0


def test_max_memory_per_process_recycles_a_leaking_process(processor, start_manager, r, prefix):
    # Given one worker process (2 threads) recycled above 80 MiB of RSS (it starts near 35)
    key = prefix + ":leak"
    m = start_manager(processes=1, threads=2, max_memory_per_process=80)
    m.wait_children(1)

    # When 24 tasks each leak 16 MiB on purpose
    tags = [str(i) for i in range(24)]
    processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(tf.leak_pid, key, t, 16) for t in tags])

    # Then every task ran exactly once, in successive processes, none of which took more than
    # a few of them before going over the limit and being replaced
    wait_until(lambda: len(hash_counts(r, key + ":runs")) == 24, 60,
             lambda: f"24 tasks (counts {counts(processor)}); log:\n{m.log()[-3000:]}")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 10, "0 queued / 0 in flight")
    assert hash_counts(r, key + ":runs") == {t: 1 for t in tags}
    pids = hash_counts(r, key + ":pids")
    assert len(pids) >= 4, pids
    assert max(pids.values()) <= 6, pids
    log = m.log()
    assert re.search(r"recycling after \d+ tasks?: its RSS is \d+ MiB \(max_memory_per_process=80 MiB\)", log)
    assert log.count("recycled; starting a new one") >= 3
    assert "died (exit code" not in log
    # ... and the one that took the last tasks is replaced too: a fresh process below the limit
    wait_until(lambda: fresh_below(m, 80 * 1024 * 1024), 15, "a fresh worker process below the limit")
    assert m.terminate() == 0


def test_quick_recycles_are_not_crashes_and_get_no_backoff(processor, start_manager, r, prefix):
    # Given one worker process (1 thread) recycled after every task: each lives well under the
    # 5 s that makes a death count towards the restart backoff (which starts after 5 of them)
    key = prefix + ":quick"
    m = start_manager(processes=1, threads=1, max_tasks_per_process=1)
    m.wait_children(1)

    # When 7 tasks run
    tags = [str(i) for i in range(7)]
    processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(tf.run_pid, key, t) for t in tags])

    # Then 7 processes ran one each, and each was replaced at once: no restart backoff
    wait_until(lambda: len(hash_counts(r, key + ":runs")) == 7, 30,
             lambda: f"7 tasks; log:\n{m.log()[-3000:]}")
    assert hash_counts(r, key + ":runs") == {t: 1 for t in tags}
    assert sorted(hash_counts(r, key + ":pids").values()) == [1] * 7
    wait_until(lambda: m.log().count("recycled; starting a new one") == 7, 10, "the 7th recycle")
    wait_until(lambda: counts(processor) == (0, 0, 0, 0), 10, "0 queued / 0 in flight")
    log = m.log()
    assert "restart backoff" not in log and "died (exit code" not in log
    assert m.terminate() == 0


def test_embedded_run_ignores_the_recycling_limits(make_processor, embedded_worker, r, prefix):
    # Given processor.run() (threads only: nothing could replace it) with max_tasks_per_process=2
    p = make_processor(max_tasks_per_process=2, max_memory_per_process=1)
    key = prefix + ":emb"
    embedded_worker(p)
    # When 10 tasks run
    for i in range(10):
        p.enqueue_task("default", "acme", tf.run_pid, key, str(i))
    # Then it runs them all
    wait_until(lambda: len(hash_counts(r, key + ":runs")) == 10, 10, "10 tasks")
    assert hash_counts(r, key + ":runs") == {str(i): 1 for i in range(10)}
