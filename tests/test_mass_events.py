"""Mass events are logged once with counts, and a dataset that vanished under a running
deployment is logged once as an error."""
from __future__ import annotations

import json
import logging

from coretask.throttle import LogThrottle
from tests import tasks
from tests.conftest import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_logs_a_burst_then_one_summary_per_window(caplog):
    # Given a throttle of 3 per 10 s on a fake clock
    clock = Clock()
    logger = logging.getLogger("tests.throttle")
    throttle = LogThrottle(logger, window=10.0, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tests.throttle"):
        # When 50 events of one kind and 2 of another come within the window
        for i in range(50):
            throttle.log("a", logging.WARNING, "a events", "a %d", i)
        for i in range(2):
            throttle.log("b", logging.ERROR, "b events", "b %d", i)
        shown = [r.getMessage() for r in caplog.records]
        # Then the first 3 of "a" and both of "b" are logged, nothing more before the window ends
        assert shown == ["a 0", "a 1", "a 2", "b 0", "b 1"]
        throttle.flush()
        assert len(caplog.records) == 5
        # When the window ends: one summary for "a" with its count, none for "b" (all shown)
        clock.now += 10
        throttle.flush()
        assert [r.getMessage() for r in caplog.records[5:]] == [
            "47 more: a events (50 in 10s, the first 3 shown above)"]
        # And a new window logs afresh
        throttle.log("a", logging.WARNING, "a events", "a again")
        assert caplog.records[-1].getMessage() == "a again"
        # And a summary carries the fields its kind was given, with the count suppressed
        for i in range(5):
            throttle.log("c", logging.WARNING, "c events", "c %d", i, summary={"event": "task_dead", "target": "m:f"})
        clock.now += 10
        throttle.flush()
        last = caplog.records[-1]
        assert (last.event, last.target, last.suppressed) == ("task_dead", "m:f", 2)


def test_a_thousand_poison_tasks_log_a_few_lines_and_a_count(make_processor, embedded_worker, r, prefix, caplog):
    # Given 200 tasks whose module is gone (written straight into Redis)
    p = make_processor()
    target = f"gone_{prefix.strip('{}').replace(':', '_')}.module:fn"
    payload = json.dumps({"t": target, "a": [], "k": {}}).encode()
    for i in range(200):
        p.gateway.enqueue(f"poison-{i}", "default", "acme", payload, "json", target, 0, 0, "")
    with caplog.at_level(logging.ERROR, logger="coretask.worker.runner"):
        # When a worker dead-letters them all and its window ends
        embedded_worker(p)
        wait_until(lambda: p.get_queue("default").dead == 200, 30, "200 dead letters")
        wait_until(lambda: any("more: tasks of " + target in m.getMessage() for m in caplog.records), 20,
                   "the summary")
    # Then at most 3 lines name single tasks, and one line counts the rest
    lines = [m.getMessage() for m in caplog.records if target in m.getMessage()]
    singles = [m for m in lines if "cannot be loaded" in m and "more:" not in m]
    summaries = [m for m in lines if "more:" in m]
    assert len(singles) == 3
    assert sum(int(m.split(" more:")[0]) for m in summaries) == 197
    # And the summaries carry the event, target and count as fields, for log-based alerting
    fields = [(rec.event, rec.target, rec.error_type, rec.suppressed) for rec in caplog.records
              if "more:" in rec.getMessage() and target in rec.getMessage()]
    assert {f[:3] for f in fields} == {("task_dead", target, "TaskLoadError")} and sum(f[3] for f in fields) == 197


def test_a_dataset_that_vanishes_is_reported_once(make_processor, embedded_worker, r, prefix, caplog):
    # Given two embedded workers (two "processes" of one deployment) that have seen the dataset
    p = make_processor()
    with caplog.at_level(logging.ERROR, logger="coretask.worker.maintenance"):
        embedded_worker(p)
        embedded_worker(p)
        p.enqueue_task("default", "acme", tasks.record, prefix + ":out", "before")
        wait_until(lambda: r.llen(prefix + ":out") == 1 and r.exists(p.gateway.keys.marker), 10, "a task ran")
        marker = r.get(p.gateway.keys.marker)
        # When every key of the deployment disappears (as after a restart without persistence)
        r.delete(*r.scan_iter(match=f"{prefix}*", count=1000))     # one command: all at once
        # Then one error says so, naming the prefix and the server, and the workers go on
        wait_until(lambda: r.exists(p.gateway.keys.marker) and r.get(p.gateway.keys.marker) != marker, 10,
                   "the marker put back")
        p.enqueue_task("default", "acme", tasks.record, prefix + ":out", "after")
        wait_until(lambda: r.lrange(prefix + ":out", 0, -1) == [b"after"], 10, "a task after the loss")
        errors = [m.getMessage() for m in caplog.records if "vanished" in m.getMessage()]
    assert len(errors) == 1, errors
    assert prefix in errors[0] and "127.0.0.1" in errors[0]
