"""The admin CLI, run as a subprocess: ``python -m coretask --app tests.app:processor COMMAND``."""
from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from coretask.embedded.servers import RedisServer, find_server_binary, free_port
from tests import tasks
from tests.conftest import FAST, ROOT, wait_until

HOUR = timedelta(hours=1)


@pytest.fixture
def cli(server: Any, prefix: str) -> Any:
    def env(url: str | None = None) -> dict[str, str]:
        e = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(FAST),
                 PYTHONPATH=str(ROOT))
        if url is not None:
            e.update(CORETASK_TEST_URL=url, CORETASK_TEST_CLUSTER="")
        return e

    def run(*args: str, url: str | None = None, app: str = "tests.app:processor") -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "coretask", *(["--app", app] if app else []), *args]
        return subprocess.run(cmd, check=False, cwd=ROOT, env=env(url), capture_output=True, text=True, timeout=60)

    def popen(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "coretask", "--app", "tests.app:processor", *args], cwd=ROOT,
                                env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    run.popen = popen  # type: ignore[attr-defined]
    return run


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return res.stdout


def columns_aligned(lines: list[str], header: str) -> None:
    """Every row of a table has its right-aligned numbers ending under the header's column names."""
    head = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = lines[head].split()
    rows = [line for line in lines[head + 1:head + 100] if line.strip() and not line.startswith("(")]
    for col in ("QUEUED", "DEAD"):
        if col in names:
            end = lines[head].index(col) + len(col)
            for row in rows:
                if not row or row.split()[0] in ("WORKER",):
                    break
                assert row[end - 1].isdigit() and (len(row) == end or row[end] == " "), (row, col)


def test_status_and_queues(make_processor, embedded_worker, cli, prefix):
    # Given a worker (heartbeat), a dead task, queued tasks in two queues, and queue low paused
    processor = make_processor(queues=["default", "low"])
    processor.enqueue_task("default", "acme", tasks.always_fail, retries=0)
    embedded_worker(processor)
    wait_until(lambda: processor.get_queue("default").dead == 1 and processor.get_workers(), 10, "a dead task")
    processor.pause_queue("low")
    for i in range(3):
        processor.enqueue_task("low", "acme", tasks.record, "k", i)
    # When status is asked for, as text and as JSON
    text = ok(cli("status"))
    doc = json.loads(ok(cli("status", "--json")))
    # Then it shows the redacted server, paused state, queues with counts and workers with their age
    lines = text.splitlines()
    assert "paused: no; queues paused: low" in text and prefix in text
    columns_aligned(lines, "QUEUE ")
    assert any(line.split()[:5] == ["low", "3", "0", "0", "0"] and line.split()[5] == "yes" for line in lines)
    assert any(line.split()[:6] == ["default", "0", "0", "0", "1", "no"] for line in lines)
    (worker_id, _age), = processor.get_workers().items()
    assert any(line.startswith(worker_id) for line in lines)
    assert doc["paused"] is False and doc["paused_queues"] == ["low"] and doc["prefix"] == prefix
    assert {q["name"]: (q["queued"], q["dead"], q["paused"]) for q in doc["queues"]} == \
        {"default": (0, 1, False), "low": (3, 0, True)}
    (w,) = doc["workers"]
    assert w["id"] == worker_id and -1 < w["heartbeat_age"] < 10   # a beat may land just after "now"
    # And queues lists the same counts
    q = {x["name"]: x for x in json.loads(ok(cli("queues", "--json")))}
    assert (q["low"]["queued"], q["default"]["dead"]) == (3, 1)
    columns_aligned(ok(cli("queues")).splitlines(), "QUEUE ")


def test_pause_and_resume_one_host_or_manager(processor, embedded_worker, cli):
    # Given a worker in this process: host and manager (this pid) as status shows them
    embedded_worker(processor)
    wait_until(lambda: processor.get_workers(), 10, "a heartbeat")
    host, manager = socket.gethostname(), f"{socket.gethostname()}:{os.getpid()}"
    # When a misspelt host is paused, Then it is refused with the names there are
    missing = cli("pause", "--worker", "no-such-host")
    assert missing.returncode == 1 and f"the hosts and managers are: {host}, {manager}" in missing.stderr
    assert processor.get_paused_workers() == []
    # When the manager is paused, Then status shows it, as text and JSON
    said = json.loads(ok(cli("pause", "--worker", manager, "--json")))
    assert said["paused"] is True and said["worker"] == manager and len(said["processes"]) == 1
    doc = json.loads(ok(cli("status", "--json")))
    assert doc["paused_workers"] == [manager] and [w["paused"] for w in doc["workers"]] == [True]
    assert f"workers paused: {manager}" in ok(cli("status"))
    # And a resume of a name that is not paused says so; the manager's resumes
    assert cli("resume", "--worker", host).returncode == 1
    assert "resumed worker" in ok(cli("resume", "--worker", manager))
    assert processor.get_paused_workers() == [] and not processor.get_worker_states()[0].paused


def test_pause_and_resume(processor, cli):
    # When everything, then one queue, is paused and resumed through the CLI
    assert ok(cli("pause")).strip() == "paused everything"
    assert processor.is_paused
    assert json.loads(ok(cli("status", "--json")))["paused"] is True
    # (every queue reads paused "all": "no" would read as a queue where work can start)
    assert [line.split()[-1] for line in ok(cli("queues")).splitlines()[1:]] == ["all"]
    assert json.loads(ok(cli("resume", "--json"))) == {"paused": False, "queue": None, "changed": True}
    assert not processor.is_paused
    assert ok(cli("pause", "default")).strip() == "paused queue default"
    assert ok(cli("pause", "default")).strip() == "queue default was already paused"   # not a second change
    assert processor.get_paused_queues() == ["default"] and not processor.is_paused
    assert "queues paused: default" in ok(cli("status"))
    ok(cli("resume", "default"))
    processor.enqueue_task("default", "acme", tasks.record, "k", 1)
    ok(cli("pause", "--tenant", "acme"))
    assert "tenants paused: acme" in ok(cli("status")) and json.loads(ok(cli("status", "--json")))["paused_tenants"] == ["acme"]
    ok(cli("resume", "--tenant", "acme"))
    # Then the processor's state followed each command
    assert processor.get_paused_queues() == []
    # And a name that is no queue or tenant of the deployment (a typo) is refused: it would pause nothing
    for args, words in ((("pause", "defualt"), "queue defualt not found; the queues are: default"),
                        (("resume", "--tenant", "nobody"), "tenant nobody not found")):
        res = cli(*args)
        assert res.returncode == 1 and words in res.stderr, (res.stdout, res.stderr)
    assert processor.get_paused_queues() == [] and processor.get_paused_tenants() == []


def test_batches_batch_and_cancel(processor, cli):
    # Given two batches of tenant acme, one with a task delayed by an hour
    a = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", 1), scope="first")
    b = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", 2, delay_until=HOUR),
                                scope="second")
    # When batches are listed, then one shown
    text = ok(cli("batches", "acme"))
    doc = json.loads(ok(cli("batches", "acme", "--json")))
    # Then both are there, newest first, with their numbers
    assert doc["count"] == 2 and {x["id"] for x in doc["batches"]} == {a, b}
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["BATCH", "STATE", "TOTAL"]
    assert {line.split()[0] for line in lines[1:3]} == {a, b} and "2 shown of 2 batches" in text
    shown = ok(cli("batch", b))
    assert f"id:        {b}" in shown and "state:     running" in shown and "scope:     second" in shown
    assert "0/1" in shown
    assert json.loads(ok(cli("batch", a, "--json")))["scope"] == "first"
    # When one is canceled
    assert ok(cli("cancel", b)).strip() == f"batch {b} canceled"
    assert processor.get_batch(b).state == "canceled"
    # Then canceling it again, or an unknown batch, exits 1; so does showing an unknown batch
    again = cli("cancel", b)
    assert again.returncode == 1 and "already canceled" in again.stderr
    assert cli("cancel", "no-such-batch").returncode == 1
    missing = cli("batch", "no-such-batch")
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert cli("batches", "nobody", "--json").returncode == 1       # a tenant that never had work: not found


def test_batch_watch_shows_progress_until_finished(make_processor, embedded_worker, cli, r, prefix):
    # Given a batch of 12 tasks of 0.1 s each and nobody running it yet
    p = make_processor(max_workers=2)
    batch_id = p.enqueue_batch("default", "acme", lambda b: [
        b.enqueue(tasks.sleep_then_record, prefix + ":out", 0.1, i) for i in range(12)])
    # When the batch is watched (as text and as JSON lines) while a worker runs it
    text = cli.popen("batch", batch_id, "--watch", "--interval", "0.05")
    lines = cli.popen("--json", "batch", batch_id, "--watch", "--interval", "0.05")
    first, jfirst = text.stdout.readline(), lines.stdout.readline()   # both watching before work starts
    embedded_worker(p)
    out, err = text.communicate(timeout=60)
    jout, _ = lines.communicate(timeout=60)
    out, jout = first + out, jfirst + jout
    # Then it printed a growing progress bar and returned once the batch finished
    assert text.returncode == 0, err
    bars = out.strip().splitlines()
    assert len(bars) >= 3, out
    assert bars[0].startswith("[") and "0/12" in bars[0]
    assert bars[-1].startswith("[" + "#" * 30 + "]") and "100% 12/12" in bars[-1] and bars[-1].endswith("succeeded")
    docs = [json.loads(x) for x in jout.strip().splitlines()]
    assert lines.returncode == 0 and len(docs) >= 3 and docs[-1]["state"] == "succeeded"
    assert all(d["total"] == d["done"] + d["failed"] + d["canceled"] + d["remaining"] for d in docs)
    assert [d["done"] for d in docs] == sorted(d["done"] for d in docs)


def test_batch_watch_exits_1_when_the_batch_failed_or_was_canceled(processor, embedded_worker, cli, prefix):
    # Given a batch with a task that fails (no retry) and a batch canceled while it runs
    failed = processor.enqueue_batch("default", "acme", lambda b: (
        b.enqueue(tasks.record, prefix + ":ok", 1), b.enqueue(tasks.always_fail, "planned", retries=0)))
    canceled = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", 1, delay_until=HOUR))
    embedded_worker(processor)
    wait_until(lambda: processor.get_batch(failed).finished, 10, "the failing batch finished")
    watch = cli.popen("batch", canceled, "--watch", "--interval", "0.05")
    assert "0/1" in watch.stdout.readline()
    processor.cancel_batch(canceled)
    # When each is watched to its end, as text and as JSON lines
    out, err = watch.communicate(timeout=30)
    results = [cli("batch", failed, "--watch"), cli("--json", "batch", failed, "--watch"),
               cli("batch", canceled, "--watch")]
    # Then every watch exits 1, its last line naming the state, and ends with a newline
    assert watch.returncode == 1 and out.rstrip("\n").splitlines()[-1].endswith("canceled"), (out, err)
    assert [x.returncode for x in results] == [1, 1, 1], [(x.stdout, x.stderr) for x in results]
    assert results[0].stdout.endswith("failed\n") and json.loads(results[1].stdout)["state"] == "failed"
    assert results[2].stdout.endswith("canceled\n")
    # while a batch that succeeded exits 0
    good = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, prefix + ":ok", 2))
    wait_until(lambda: processor.get_batch(good).finished, 10, "the good batch finished")
    assert ok(cli("batch", good, "--watch")).endswith("succeeded\n")


def test_batch_watch_of_a_canceled_batch_ends_with_its_final_counts(processor, embedded_worker, cli, prefix):
    # Given a batch of two running tasks, watched as JSON lines
    key = prefix + ":spin"
    batch = processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(tasks.spin, f"{key}{i}", 30)
                                                                  for i in range(2)])
    embedded_worker(processor)
    wait_until(lambda: processor.get_batch(batch).running == 2, 20, "both tasks running")
    watch = cli.popen("--json", "batch", batch, "--watch", "--interval", "0.02")
    assert json.loads(watch.stdout.readline())["running"] == 2
    # When the batch is canceled
    processor.cancel_batch(batch)
    out, err = watch.communicate(timeout=30)
    # Then the watch's last line has the aborted tasks counted, not the moment the state changed
    last = json.loads(out.splitlines()[-1])
    assert watch.returncode == 1 and last["state"] == "canceled", (out, err)
    assert (last["canceled"], last["remaining"]) == (2, 0), out


def test_batch_watch_on_a_terminal_redraws_one_cleared_line(make_processor, embedded_worker, cli, prefix):
    import pty
    # Given a batch of 6 tasks of 0.1 s, watched on a terminal
    p = make_processor(max_workers=1)
    batch_id = p.enqueue_batch("default", "acme", lambda b: [
        b.enqueue(tasks.sleep_then_record, prefix + ":out", 0.1, i) for i in range(6)])
    controller, terminal = pty.openpty()
    env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(FAST), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "coretask", "--app", "tests.app:processor", "batch", batch_id,
                             "--watch", "--interval", "0.05"], cwd=ROOT, env=env, stdout=terminal,
                            stderr=subprocess.PIPE)
    os.close(terminal)
    seen, deadline, working = b"", time.monotonic() + 30, False
    while time.monotonic() < deadline:           # read until the process closes the terminal
        if not select.select([controller], [], [], 0.5)[0]:
            continue
        try:
            chunk = os.read(controller, 4096)
        except OSError:                          # EIO: every writer is gone
            break
        if not chunk:
            break
        seen += chunk
        if not working:                          # the first bar is drawn: now the work starts
            embedded_worker(p)
            working = True
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    os.close(controller)
    text = seen.decode().replace("\r\n", "\n")         # the terminal turns the final newline into CR LF
    # Then every redraw returns to the start of the line and clears what a longer line left,
    # and the output ends with one newline after the last bar
    draws = text.split("\r")[1:]
    assert len(draws) >= 2, text
    assert all(d.startswith("[") and "\x1b[K" in d for d in draws), text
    assert text.endswith("succeeded\x1b[K\n") and text.count("\n") == 1, repr(text)


def test_times_are_shown_with_their_zone(processor, embedded_worker, cli, prefix):
    from coretask import ScheduleData
    # Given a finished batch, a dead task and a schedule
    batch_id = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, prefix + ":x", 1))
    processor.enqueue_task("default", "acme", tasks.always_fail, "planned", retries=0)
    processor.upsert_schedule(ScheduleData("zoned", "acme", "default", None, "0 9 * * *", "Europe/Berlin"),
                              tasks.record, prefix + ":x")
    embedded_worker(processor)
    wait_until(lambda: processor.get_batch(batch_id).finished and processor.get_queue("default").dead == 1, 10,
               "the batch finished and the task dead")
    # When the batch, the dead letters, the batches and the schedules are shown
    shown = {"batch": ok(cli("batch", batch_id)), "dead": ok(cli("dead", "default")),
             "batches": ok(cli("batches", "acme")), "schedules": ok(cli("schedules", "acme"))}
    # Then every time names its zone: UTC in the tables, an offset in JSON
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    for name, text in shown.items():
        times = re.findall(stamp + r"(?: \w+)?", text)
        assert times and all(t.endswith(" UTC") for t in times), (name, text)
    for field in ("created:", "started:", "ended:"):
        assert re.search(field + r"\s+" + stamp + " UTC", shown["batch"]), shown["batch"]
    doc = json.loads(ok(cli("--json", "batch", batch_id)))
    assert all(doc[f].endswith("+00:00") for f in ("created", "started", "ended")), doc


def test_output_cut_short_by_its_reader_ends_quietly(processor, cli, prefix):
    # Given enough queues that status prints more than a pipe holds
    many = make_many_queues(processor, 3000)
    # When its reader stops after one line, in a shell pipeline
    env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(FAST), PYTHONPATH=str(ROOT))
    cmd = f"{sys.executable} -m coretask --app tests.app:processor status | head -1"
    res = subprocess.run(["sh", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    # Then the one line arrives and nothing is said about the broken pipe
    assert res.returncode == 0 and res.stdout.startswith("redis:") and res.stdout.count("\n") == 1, res
    assert res.stderr == "", res.stderr
    # And when the reader is gone before anything is written: exit 141 (as SIGPIPE), no traceback
    for args in (("status",), ("queues",), ("--json", "status")):
        read, write = os.pipe()
        os.close(read)
        proc = subprocess.run([sys.executable, "-m", "coretask", "--app", "tests.app:processor", *args], cwd=ROOT,
                              env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
        os.close(write)
        assert proc.returncode == 141 and proc.stderr == "", (args, proc.returncode, proc.stderr)
    assert many == 3000


def make_many_queues(processor: Any, n: int) -> int:
    """n queues known to the prefix (each received a task that then left), in one pipeline."""
    r = processor.gateway.transport.redis
    r.sadd(processor.gateway.keys.queues, *[f"q{i:05d}" for i in range(n)])
    return int(r.scard(processor.gateway.keys.queues))


def test_dead_list_retry_and_discard(processor, embedded_worker, cli):
    # Given 3 dead tasks in queue default, and processing paused so retried tasks stay queued
    for i in range(3):
        processor.enqueue_task("default", "acme", tasks.always_fail, f"reason {i}", retries=0)
    embedded_worker(processor)
    wait_until(lambda: processor.get_queue("default").dead == 3, 10, "3 dead tasks")
    processor.pause()
    # When they are listed
    text = ok(cli("dead", "default"))
    doc = json.loads(ok(cli("dead", "default", "--json")))
    # Then each shows with its error
    assert doc["count"] == 3 and sorted(t["error_message"] for t in doc["tasks"]) == [f"reason {i}" for i in range(3)]
    assert text.splitlines()[0].split()[:3] == ["TASK", "TARGET", "TENANT"]
    assert text.count("ValueError: reason") == 3 and "3 shown of 3 dead tasks" in text
    # When one is retried, one discarded, then all the rest retried
    assert json.loads(ok(cli("dead", "default", "--retry", "1", "--json"))) == {"queue": "default", "retried": 1}
    assert processor.get_queue("default").queued == 1
    assert "1 dead tasks of queue default discarded" in ok(cli("dead", "default", "--discard", "1"))
    assert "1 dead tasks of queue default moved back" in ok(cli("dead", "default", "--retry", "all"))
    # Then the queue shows the outcome
    q = processor.get_queue("default")
    assert (q.dead, q.queued) == (0, 2)
    # And bad requests are refused: unknown queue (1), bad counts and both actions at once (2)
    assert cli("dead", "nosuchqueue").returncode == 1
    assert cli("dead", "default", "--retry", "0").returncode == 2
    assert cli("dead", "default", "--retry", "1", "--discard", "1").returncode == 2


def test_damaged_task_records_read_as_damaged_everywhere(processor, embedded_worker, cli, r, prefix):
    # Given dead tasks whose stored records were damaged by someone with write access: a payload
    # that is valid JSON but not an object, non-numeric retries and dead-at fields, a missing
    # target, and a task key that holds a string instead of a hash; and a healthy dead task
    for reason in ("damaged", "wrong-type", "healthy"):
        processor.enqueue_task("default", "acme", tasks.always_fail, reason, retries=0)
    embedded_worker(processor)
    wait_until(lambda: processor.get_queue("default").dead == 3, 10, "3 dead tasks")
    dead = {t.error_message: t.id for t in processor.get_dead_tasks("default")}
    k = processor.gateway.keys
    r.hset(k.task(dead["damaged"]), mapping={"p": b"[1, 2]", "r": "x", "da": "soon"})
    r.hdel(k.task(dead["damaged"]), "tg")
    r.delete(k.task(dead["wrong-type"]))
    r.set(k.task(dead["wrong-type"]), "not a hash")
    # and a queued task with the same damage, behind a pause
    processor.pause()
    queued = processor.enqueue_task("default", "acme", tasks.record, prefix + ":never", 1)
    r.hset(k.task(queued), mapping={"p": b"\"text\"", "e": "later"})

    # When every read path is asked for them
    listed = {t.id: t for t in processor.get_dead_tasks("default")}
    in_queue = processor.get_tasks_in_queue("default")
    one = processor.get_task(dead["wrong-type"])
    text = ok(cli("dead", "default"))
    doc = json.loads(ok(cli("dead", "default", "--json")))

    # Then each record reads, a damaged one names what is damaged, a healthy one is intact
    damaged = listed[dead["damaged"]]
    assert "field 'r' (retries) is not a number" in damaged.problem
    assert "field 'da' (dead at) is not a number" in damaged.problem
    assert "field 'tg' (target) is missing" in damaged.problem
    assert "a JSON list, not an object" in damaged.problem and damaged.dead_at is None
    assert one is not None and one.state == "unreadable" and "not a hash" in one.problem
    assert listed[dead["wrong-type"]].state == "unreadable"
    assert listed[dead["healthy"]].problem is None and listed[dead["healthy"]].error_message == "healthy"
    assert [t.id for t in in_queue] == [queued]
    assert "field 'e' (enqueued) is not a number" in in_queue[0].problem and in_queue[0].enqueued_at is None
    assert text.count("damaged record:") == 2 and "ValueError: healthy" in text
    assert {t["id"]: t["problem"] is None for t in doc["tasks"]} == {
        dead["damaged"]: False, dead["wrong-type"]: False, dead["healthy"]: True}


def test_quarantine_lists_records_too_damaged_to_dead_letter(processor, cli, r, prefix):
    # Given nothing quarantined: an empty table, exit 0
    assert "0 shown of 0 quarantined tasks" in ok(cli("quarantine"))
    # Given two queued tasks whose keys were replaced by other Redis types, met by a fetch
    k = processor.gateway.keys
    ids = [processor.enqueue_task("default", "acme", tasks.record, prefix + ":x", i) for i in range(3)]
    r.delete(k.task(ids[0]), k.task(ids[1]))
    r.set(k.task(ids[0]), "not a hash")
    r.rpush(k.task(ids[1]), "not a hash")
    reply = processor.gateway.fetch("fake-w", 10, 60_000, 0, ["default"])
    assert [t.id for t in reply.tasks] == [ids[2]]
    # When the quarantine is listed, as a table and as JSON, and status is shown
    text = ok(cli("quarantine"))
    doc = json.loads(ok(cli("quarantine", "--json")))
    page = json.loads(ok(cli("quarantine", "--json", "--skip", "1", "--take", "1")))
    status = ok(cli("status"))
    status_doc = json.loads(ok(cli("status", "--json")))
    # Then both are there, oldest first, each with the reason naming what is wrong
    lines = text.splitlines()
    assert lines[0].split() == ["TASK", "REASON"]
    assert lines[1].startswith(ids[0]) and "holds a string, not a hash" in lines[1]
    assert lines[2].startswith(ids[1]) and "holds a list, not a hash" in lines[2]
    assert "2 shown of 2 quarantined tasks" in text
    assert doc["count"] == 2 and [t["id"] for t in doc["tasks"]] == ids[:2]
    assert "not a hash" in doc["tasks"][0]["reason"]
    assert [t["id"] for t in page["tasks"]] == [ids[1]] and page["count"] == 2
    assert "quarantined: 2 damaged task records" in status and status_doc["quarantined"] == 2


def test_usage_errors_exit_2(cli):
    assert cli(app="").returncode == 2                                # no --app, no command
    assert cli("status", app="").returncode == 2                      # no --app
    assert cli().returncode == 2                                      # no command
    assert cli("frobnicate").returncode == 2                          # unknown command
    worker = cli("worker", "--processes", "2")                        # the worker's own command, named
    assert worker.returncode == 2 and "python -m coretask.worker --app tests.app:processor" in worker.stderr
    bad = cli("status", app="no_such_module:processor")
    assert bad.returncode == 2 and "cannot be imported" in bad.stderr
    assert cli("pause", "not a queue!").returncode == 2               # invalid queue name
    assert cli("batches").returncode == 2                             # missing argument
    for port in ("-5", "70000"):                                      # not a port: said, not wrapped around
        res = cli("dashboard", "--port", port)
        assert res.returncode == 2 and "port number from 0 to 65535" in res.stderr, res.stderr
    assert "status" in ok(cli("--help", app=""))


def test_a_dashboard_port_in_use_is_a_usage_error(cli):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = cli("dashboard", "--port", str(taken.getsockname()[1]))
    assert res.returncode == 2 and "cannot serve the dashboard on 127.0.0.1" in res.stderr, res.stderr
    assert "Address already in use; choose another --port" in res.stderr
    assert "is in use by another program" not in res.stderr          # said once, by coretask
    # ... and an address that is not this machine's says so, not that a port is in use
    res = cli("dashboard", "--host", "192.0.2.1", "--port", "0", "--no-auth")
    assert res.returncode == 2 and "cannot serve the dashboard on 192.0.2.1:0: Cannot assign requested address" \
        in res.stderr, res.stderr


def test_an_empty_dead_list_and_an_unknown_tenant(cli):
    # a configured queue without dead tasks is found, and empty
    res = cli("--json", "dead", "default")
    assert res.returncode == 0 and json.loads(res.stdout)["count"] == 0, (res.stdout, res.stderr)
    assert cli("dead", "nosuch").returncode == 1
    res = cli("rebalance", "nobody", "--to", "0")
    assert res.returncode == 1 and "tenant nobody not found" in res.stderr, res.stderr
    # a misspelt tenant lists no batches or schedules and says so, as `tenant` does
    for args in (("batches", "nobody"), ("schedules", "nobody"), ("tenant", "nobody")):
        res = cli(*args)
        assert res.returncode == 1 and "tenant nobody not found (no work of it was ever enqueued)" in res.stderr, args
    # --retries without an action to take it is a usage error, not ignored
    res = cli("dead", "default", "--retries", "3")
    assert res.returncode == 2 and "--retries goes with --retry" in res.stderr, res.stderr


def test_redis_password_is_never_printed(cli, tmp_path):
    # Given a server that requires a password, and a URL carrying it
    srv = RedisServer(binary=find_server_binary("redis7"), extra_args=["--requirepass", "s3cret-pw"]).start()
    try:
        url = f"redis://:s3cret-pw@127.0.0.1:{srv.port}/0"
        # When status and queues are shown, as text and JSON
        outputs = [cli("status", url=url), cli("status", "--json", url=url), cli("queues", url=url)]
        # Then they work and show the URL redacted
        assert all(res.returncode == 0 for res in outputs), [(x.stdout, x.stderr) for x in outputs]
        assert "redis://:***@127.0.0.1" in outputs[0].stdout
        # And with a wrong password or an unreachable server: exit 3, the password still hidden
        outputs.append(cli("status", url=f"redis://:wr0ng-pw@127.0.0.1:{srv.port}/0"))
        outputs.append(cli("status", url=f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"))
        assert [x.returncode for x in outputs[3:]] == [3, 3]
        assert "redis://:***@127.0.0.1" in outputs[4].stderr
        for res in outputs:
            assert "s3cret-pw" not in res.stdout + res.stderr and "wr0ng-pw" not in res.stdout + res.stderr
    finally:
        srv.stop()


def test_schedules_trigger_and_schedule_count_in_status(processor, cli, prefix):
    # Given two schedules of tenant acme
    from coretask import ScheduleData
    for sid, cron in (("s-hourly", "0 * * * *"), ("s-daily", "30 2 * * *")):
        processor.upsert_schedule(ScheduleData(id=sid, tenant="acme", queue="default", scope="cli test",
                                               cron=cron, timezone="Europe/Berlin"), tasks.record, prefix + ":x")
    # When the CLI lists them, triggers one, and shows the status
    listed = ok(cli("schedules", "acme"))
    as_json = json.loads(ok(cli("--json", "schedules", "acme")))
    triggered = cli("trigger", "s-daily")
    missing = cli("trigger", "nope")
    status = json.loads(ok(cli("--json", "status")))
    # Then the table shows both, the trigger enqueued one run, and status counts the schedules
    assert "s-hourly" in listed and "s-daily" in listed and "Europe/Berlin" in listed
    assert as_json["count"] == 2 and {s["id"] for s in as_json["schedules"]} == {"s-hourly", "s-daily"}
    assert triggered.returncode == 0 and missing.returncode == 1
    assert processor.get_queue("default").queued == 1
    run = processor.get_schedule("s-daily").last_task_id
    assert f"one run enqueued now, task {run}" in triggered.stdout
    assert status["schedules"] == 2
    # And one schedule pauses and resumes by id; an unknown id and a mixed scope are refused
    paused = cli("pause", "--schedule", "s-hourly")
    assert paused.returncode == 0 and "paused schedule s-hourly" in paused.stdout
    assert processor.get_schedule("s-hourly").paused and not processor.get_schedule("s-daily").paused
    listed = json.loads(ok(cli("--json", "schedules", "acme")))
    assert {s["id"]: s["paused_since"] is not None for s in listed["schedules"]} == {"s-hourly": True, "s-daily": False}
    missing = cli("pause", "--schedule", "nope")
    assert missing.returncode == 1 and "schedule nope not found" in missing.stderr
    assert "python -m coretask --app tests.app:processor schedules TENANT lists" in missing.stderr
    # (with --tenant, another tenant's schedule reads as unknown)
    assert cli("pause", "--schedule", "s-daily", "--tenant", "other").returncode == 1
    assert not processor.get_schedule("s-daily").paused
    both = cli("pause", "default", "--schedule", "s-hourly")
    assert both.returncode == 2 and "give one of" in both.stderr
    assert ok(cli("resume", "--schedule", "s-hourly")) and not processor.get_schedule("s-hourly").paused
