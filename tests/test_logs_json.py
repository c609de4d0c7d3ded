"""Structured logs (coretask/logs.py): task events carry their fields as ``extra``, and
``python -m coretask.worker --log-format json`` writes one JSON object per line, in the manager
and in its worker processes."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coretask import TaskProcessor
from coretask.logs import TASK_FIELDS, JsonFormatter, configure
from tests import tasks, tasks_control
from tests.conftest import FAST, ROOT, ManagerProcess, Target, wait_until


def spawn_worker(log_path: Path, prefix: str, *extra_args: str, app: str = "tests.app:processor",
                 env: dict[str, str] | None = None, **opts: Any) -> ManagerProcess:
    """``python -m coretask.worker`` with extra command-line arguments (conftest's
    spawn_manager takes none), in its own process group."""
    options = dict(FAST, **opts)
    full_env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(options),
                    PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "coretask.worker", "--app", app, "--processes", "1", "--threads", "2",
           *extra_args]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return ManagerProcess(proc, log_path)


def records(m: ManagerProcess) -> list[dict[str, Any]]:
    """Every line of the manager's output as JSON (a line that is not fails the test)."""
    out = []
    for line in m.log().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                pytest.fail(f"a log line is not one JSON object: {line!r}")
    return out


def test_formatter_writes_one_object_per_line_with_task_fields() -> None:
    log = logging.getLogger("coretask.test.json")
    record = log.makeRecord(log.name, logging.WARNING, __file__, 1, "task %s failed\nsecond line", ("abc",), None,
                            extra={"event": "task_failed", "task_id": "abc", "queue": "q", "tenant": "t",
                                   "attempt": 2, "duration_ms": 15, "retries_left": 1, "next_delay_ms": 500,
                                   "batch_id": None, "custom": {1, 2}})
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "task abc failed\nsecond line"
    assert doc["level"] == "WARNING" and doc["logger"] == "coretask.test.json" and doc["pid"] == os.getpid()
    assert doc["ts"].endswith("Z") and "T" in doc["ts"]
    assert {k: doc[k] for k in ("event", "task_id", "queue", "tenant", "attempt", "duration_ms", "retries_left",
                                "next_delay_ms", "batch_id")} == {
        "event": "task_failed", "task_id": "abc", "queue": "q", "tenant": "t", "attempt": 2, "duration_ms": 15,
        "retries_left": 1, "next_delay_ms": 500, "batch_id": None}
    assert doc["custom"] == repr({1, 2})                 # what JSON cannot carry is written with repr
    assert "ValueError: boom" in doc["exc"]
    assert list(doc)[:6] == ["ts", "level", "logger", "pid", "thread", "message"]


def test_configure_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="use one of text, json"):
        configure(logging.INFO, "yaml")


def test_worker_json_logs_carry_every_task_event(server: Target, prefix: str, processor: TaskProcessor,
                                                 tmp_path: Path) -> None:
    # Given a worker started with --log-format json at DEBUG
    m = spawn_worker(tmp_path / "worker.log", prefix, "--log-format", "json", "--log-level", "DEBUG")
    try:
        # When one task succeeds and one fails on every attempt (2 attempts), in a batch
        ok = processor.enqueue_task("default", "acme", tasks.record, f"{prefix}:k", 1)
        with processor.batch("default", "acme") as b:
            bad = b.enqueue(tasks.always_fail, "nope", retries=2)
        # (and one returns a value that cannot be kept: dead at once)
        unkept = processor.enqueue_task("default", "acme", tasks_control.unstorable, keep_result=60)

        def events() -> dict[tuple[str, str], dict[str, Any]]:
            return {(r["task_id"], r["event"]): r for r in records(m) if "event" in r}

        wait_until(lambda: (bad, "task_dead") in events() and (ok, "task_succeeded") in events()
                   and (unkept, "task_dead") in events(), 30, lambda: f"task events in the log:\n{m.log()[-3000:]}")
        # and a running task is canceled, and another runs past its time limit
        spinning = processor.enqueue_task("default", "acme", tasks.spin, f"{prefix}:spin", 30)
        wait_until(lambda: processor.get_task(spinning).state == "running", 20, "the spinning task to start")
        assert processor.cancel_task(spinning)
        late = processor.enqueue_task("default", "acme", tasks.spin, f"{prefix}:late", 30, timeout=0.3, retries=1)
        wait_until(lambda: (spinning, "task_canceled") in events() and (late, "task_timeout") in events(), 30,
                   lambda: f"cancel and time-out events in the log:\n{m.log()[-3000:]}")
        # and one is handed back by a pause with requeue
        paused = processor.enqueue_task("default", "acme", tasks.spin, f"{prefix}:paused", 30)
        wait_until(lambda: tasks.R().llen(f"{prefix}:paused:started"), 20, "the task to pause to start")
        processor.pause(requeue_running=True)
        wait_until(lambda: (paused, "task_handed_back") in events(), 30,
                   lambda: f"the handed-back event in the log:\n{m.log()[-3000:]}")
        processor.resume()
        processor.cancel_task(paused)
        found = events()
    finally:
        m.terminate()
    # Then each event names the task with its fields, and every line of output is JSON
    started = found[(ok, "task_started")]
    assert started["attempt"] == 1 and started["queue"] == "default" and started["tenant"] == "acme"
    done = found[(ok, "task_succeeded")]
    assert done["target"] == "tests.tasks:record" and isinstance(done["duration_ms"], int)
    assert done["batch_id"] is None and done["level"] == "DEBUG" and done["logger"] == "coretask.worker.runner"
    first = found[(bad, "task_failed")]
    assert first["attempt"] == 1 and first["retries_left"] == 1 and first["next_delay_ms"] == 0
    assert first["error_type"] == "ValueError" and first["batch_id"] == b.id and first["level"] == "WARNING"
    dead = found[(bad, "task_dead")]
    assert dead["attempt"] == 2 and dead["retries_left"] == 0 and "dead-lettered" in dead["message"]
    assert set(TASK_FIELDS) <= set(dead)
    not_kept = found[(unkept, "task_dead")]
    assert not_kept["level"] == "ERROR" and "cannot be kept" in not_kept["message"] and set(TASK_FIELDS) <= set(not_kept)
    canceled = found[(spinning, "task_canceled")]
    assert canceled["level"] == "INFO" and canceled["duration_ms"] >= 0 and canceled["tenant"] == "acme"
    back = found[(paused, "task_handed_back")]
    assert back["attempt"] == 1 and back["level"] == "INFO" and back["queue"] == "default"
    timed_out = found[(late, "task_timeout")]
    assert timed_out["error_type"] == "TaskTimeout" and timed_out["retries_left"] == 0
    assert any(r["logger"] == "coretask.worker.manager" for r in records(m))   # the manager's lines too
    assert len({r["pid"] for r in records(m)}) >= 2                          # and the worker process's


def test_flask_worker_takes_the_same_options(server: Target, prefix: str) -> None:
    from coretask.flask import CoreTask
    from tests.test_flask import _app

    app = _app(server.url, prefix, server.cluster)
    CoreTask(app)
    listing = app.test_cli_runner().invoke(args=["coretask", "worker", "--help"]).output
    for option in ("--log-format", "--metrics-port", "--metrics-addr", "--metrics-dir"):
        assert option in listing, listing
    bad = app.test_cli_runner().invoke(args=["coretask", "worker", "--log-format", "yaml"])
    assert bad.exit_code == 2 and "json" in bad.output
