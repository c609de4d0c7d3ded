"""The admin CLI's single-task commands: ``cancel-task ID``, ``delete-task ID`` and dead letters by
id (``dead QUEUE --retry-id ID`` / ``--discard-id ID``), as a subprocess like tests/test_cli.py."""
from __future__ import annotations

import json
from datetime import timedelta

from tests import tasks, tasks_batch
from tests.conftest import wait_until
from tests.test_cli import cli, ok   # noqa: F401  (the cli fixture)

HOUR = timedelta(hours=1)


def test_cancel_task_and_delete_task(processor, embedded_worker, cli, r, prefix):  # noqa: F811
    # Given a running task, then (the queue paused) a queued task and a delayed one
    spin = prefix + ":spin"
    running = processor.enqueue_task("default", "acme", tasks_batch.spin_ctx, spin, 30)
    embedded_worker(processor)
    wait_until(lambda: r.llen(spin + ":started"), 10, "a task running")
    processor.pause_queue("default")
    queued = processor.enqueue_task("default", "acme", tasks.record, prefix + ":out", 1)
    delayed = processor.enqueue_task("default", "acme", tasks.record, prefix + ":out", 2, delay_until=HOUR)
    # When the queued one is canceled (text) and the delayed one deleted (JSON)
    assert ok(cli("cancel-task", queued)).strip() == f"task {queued} canceled"
    assert json.loads(ok(cli("delete-task", delayed, "--json"))) == {"id": delayed, "deleted": True, "was": "delayed"}
    # Then both are gone, the canceled one counted canceled
    assert processor.get_task(queued) is None and processor.get_task(delayed) is None
    assert processor.get_tenant_stats("acme").canceled == 1
    # When the running one is deleted (refused: exit 1, with a hint), then canceled
    refused = cli("delete-task", running)
    assert refused.returncode == 1 and "is running" in refused.stderr and "cancel-task" in refused.stderr
    assert "told to stop" in ok(cli("cancel-task", running))
    # Then it is aborted and counted canceled
    wait_until(lambda: processor.get_tenant_stats("acme").canceled == 2, 10, "the running task canceled")
    # And canceling or deleting a task that is gone, or unknown, exits 1 and says why
    again = cli("cancel-task", queued)
    assert again.returncode == 1 and "not found" in again.stderr
    assert json.loads(cli("cancel-task", "no-such-task", "--json").stdout) == {
        "id": "no-such-task", "canceled": False, "reason": "not found"}
    assert cli("delete-task", "no-such-task").returncode == 1
    assert cli("cancel-task").returncode == 2


def test_dead_shows_ids_and_retries_or_discards_one_by_id(processor, make_processor, embedded_worker, cli, prefix):  # noqa: F811
    # Given three dead tasks in queue default, and processing paused so a retried task stays queued
    ids = [processor.enqueue_task("default", "acme", tasks.always_fail, f"reason {i}", retries=0) for i in range(3)]
    embedded_worker(processor)
    wait_until(lambda: processor.get_queue("default").dead == 3, 10, "3 dead tasks")
    processor.pause()
    # When they are listed, the table and the JSON show each task's id
    text = ok(cli("dead", "default"))
    doc = json.loads(ok(cli("dead", "default", "--json")))
    assert {line.split()[0] for line in text.splitlines()[1:4]} == set(ids)
    assert {t["id"] for t in doc["tasks"]} == set(ids)
    # When one is retried by id (with 5 retries) and another discarded by id
    assert json.loads(ok(cli("dead", "default", "--retry-id", ids[0], "--retries", "5", "--json"))) == {
        "queue": "default", "id": ids[0], "retried": True}
    assert ok(cli("dead", "default", "--discard-id", ids[1])).strip() == f"dead task {ids[1]} discarded"
    # Then the first is queued with its new budget, the second gone, the third still dead
    assert processor.get_task(ids[0]).state == "queued" and processor.get_task(ids[0]).retries_left == 5
    assert processor.get_task(ids[1]) is None
    assert [t.id for t in processor.get_dead_tasks("default")] == [ids[2]]
    # And an id that is not a dead task of that queue exits 1 and changes nothing; both flags, 2
    for args in (("default", "--retry-id", ids[0]), ("default", "--discard-id", ids[1]),
                 ("default", "--discard-id", "no-such-task")):
        res = cli("dead", *args)
        assert res.returncode == 1 and "not a dead task of queue default" in res.stderr, res.stderr
    make_processor(queues=["low"]).enqueue_task("low", "acme", tasks.record, prefix + ":x", 1)
    wrong_queue = cli("dead", "low", "--retry-id", ids[2])
    assert wrong_queue.returncode == 1 and "is a dead task of queue default" in wrong_queue.stderr
    assert processor.get_task(ids[2]).state == "dead"
    assert cli("dead", "default", "--retry-id", ids[2], "--discard-id", ids[2]).returncode == 2
    assert cli("dead", "default", "--retry", "1", "--retry-id", ids[2]).returncode == 2
