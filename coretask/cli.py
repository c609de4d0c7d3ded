"""``python -m coretask --app MODULE:ATTRIBUTE COMMAND``: look at and steer a coretask deployment.

A thin layer over the TaskProcessor API: every command is one or two of its calls. Output is
an aligned table for people, or JSON with ``--json`` (``batch --watch --json``: one JSON object
per line, each time the numbers change). Times are shown in UTC, and say so. Exit codes: 0 done,
1 not found (or nothing to do, as canceling a finished batch; or ``batch --watch`` saw the batch
end failed or canceled), 2 usage error, 3 Redis unreachable or refused the command, 141 the
reader of the output went away (``status | head -1``: the command stops quietly, like any tool
killed by SIGPIPE).

``python -m coretask demo [--tasks N] [--processes N]`` runs the demo (coretask.embedded.demo),
which builds its own processor and server: no ``--app``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .appload import load_processor
from .processor import TaskProcessor
from .errors import ConfigurationError, CoreTaskError, StoreUnavailable
from .models import BatchInfo, DeadTask, Progress, worker_scopes
from .options import check_queue_name, check_tenant, check_worker, redact_url

OK, NOT_FOUND, USAGE, UNAVAILABLE = 0, 1, 2, 3
SETTLE_MARGIN = 3.0     # seconds past cancel_grace a watch waits for a canceled batch's last counts
FAILED = 1                   # batch --watch: the batch ended failed or canceled
BROKEN_PIPE = 128 + 13       # what a shell shows for a tool ended by SIGPIPE
CLEAR_TO_EOL = "\033[K"      # ANSI: erase the rest of the line (a shorter bar leaves nothing behind)


class Out:
    """Where results go: tables and lines for people, JSON for machines."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def data(self, obj: Any, *, line: bool = False) -> None:
        text = json.dumps(obj, default=_jsonable, separators=(",", ":") if line else None,
                          indent=None if line else 2, ensure_ascii=False)
        print(text, flush=True)

    @staticmethod
    def table(headers: list[str], rows: list[list[Any]]) -> None:
        cells = [[_cell(v) for v in row] for row in rows]
        right = [bool(cells) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows)
                 for i in range(len(headers))]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

        def fmt(values: list[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

        print(fmt(headers))
        for c in cells:
            print(fmt(c))
        if not cells:
            print("(none)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.strftime("%Y-%m-%d %H:%M:%S local time")
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- commands

def cmd_status(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    queues, paused, paused_queues = _queues(p), p.is_paused, p.get_paused_queues()
    paused_tenants, paused_workers = p.get_paused_tenants(), p.get_paused_workers()
    workers = p.get_worker_states()
    quarantined = p.get_quarantined_count()
    shards = p.get_shards() if p.options.shards > 1 else []
    if out.json:
        out.data({"redis": redact_url(p.options.redis), "prefix": p.options.prefix, "paused": paused,
                  "shards": [dataclasses.asdict(s) for s in shards],
                  "paused_queues": paused_queues, "paused_tenants": paused_tenants, "paused_workers": paused_workers,
                  "queues": queues, "schedules": p.get_schedules_count(), "quarantined": quarantined,
                  "workers": [{"id": w.id, "host": w.host, "pid": w.pid, "manager": w.manager, "running": w.running,
                               "heartbeat_age": round(w.heartbeat_age, 3), "paused": w.paused} for w in workers]})
        return OK
    print(f"redis:  {redact_url(p.options.redis)}  prefix {p.options.prefix}")
    print(f"paused: {'yes (everything)' if paused else 'no'}"
          f"{'; queues paused: ' + ', '.join(paused_queues) if paused_queues else ''}"
          f"{'; tenants paused: ' + ', '.join(paused_tenants) if paused_tenants else ''}"
          f"{'; workers paused: ' + ', '.join(paused_workers) if paused_workers else ''}")
    print(f"schedules: {p.get_schedules_count()}  tenants: {p.get_tenants_count()}")
    if quarantined:
        print(f"quarantined: {quarantined} damaged task records (python -m coretask quarantine)")
    print()
    _queue_table(out, queues, paused)
    if shards:
        print()
        out.table(["SHARD", "PREFIX", "QUEUED", "IN FLIGHT", "DELAYED", "DEAD"],
                  [[s.index, s.prefix, s.queued, s.in_flight, s.delayed, s.dead] for s in shards])
    print()
    out.table(["WORKER", "HOST", "PID", "MANAGER", "RUNNING", "HEARTBEAT AGE (s)", "PAUSED"],
              [[w.id, w.host, w.pid, w.manager, w.running, round(w.heartbeat_age, 1), w.paused] for w in workers])
    return OK


def cmd_queues(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    queues = _queues(p)
    out.data(queues) if out.json else _queue_table(out, queues, p.is_paused)
    return OK


def _queues(p: TaskProcessor) -> list[Any]:
    known = {q.name: q for q in p.get_queues()}
    names = list(p.options.queues) + sorted(n for n in known if n not in p.options.queues)
    return [known.get(n) or p.get_queue(n) for n in names]


def _queue_table(out: Out, queues: list[Any], everything_paused: bool) -> None:
    """PAUSED is the queue's own pause; under a global pause every queue reads "all" (a queue
    shown as not paused then would read as one where work can start)."""
    out.table(["QUEUE", "QUEUED", "IN FLIGHT", "DELAYED", "DEAD", "PAUSED"],
              [[q.name, q.queued, q.in_flight, q.delayed, q.dead, "all" if everything_paused else q.paused]
               for q in queues])


def _known_queue(p: TaskProcessor, name: str) -> bool:
    """A queue of this deployment: in Options.queues, or one that has held work."""
    return name in p.options.queues or name in p.gateway.queue_names()


def cmd_pause(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    pause = a.command == "pause"
    if sum(1 for given in (a.queue, a.tenant and not a.schedule, a.schedule, a.worker) if given) > 1:
        _err("give one of a queue, --tenant, --schedule (with --tenant: that tenant's schedule) or --worker")
        return USAGE
    if getattr(a, "requeue_running", False) and (a.queue or a.tenant or a.schedule or a.worker):
        _err("--requeue-running goes with pausing everything (no queue, --tenant, --schedule or --worker)")
        return USAGE
    if a.worker:
        return _pause_worker(p, a, out, pause)
    if a.schedule:
        if not (p.pause_schedule if pause else p.resume_schedule)(a.schedule, a.tenant):
            whose = f" of tenant {a.tenant}" if a.tenant else ""
            _err(f"schedule {a.schedule}{whose} not found ({a.run_as} schedules TENANT lists a tenant's schedules)")
            return NOT_FOUND
        return _said(out, {"paused": pause, "schedule": a.schedule},
                     f"{a.command}d schedule {a.schedule}" + (": its ticks enqueue nothing until resumed" if pause else ""))
    # a misspelt name would pause (or resume) nothing and say it did (an invalid one: usage error)
    if a.queue:
        check_queue_name(a.queue, a.command)
    if a.tenant:
        check_tenant(a.tenant)
    if a.tenant and not p.gateway.tenant_known(a.tenant) and a.tenant not in p.get_paused_tenants():
        _err(f"tenant {a.tenant} not found (no work of it was ever enqueued); to {a.command} a tenant ahead of its "
             f"first task, use the API: processor.{a.command}_tenant({a.tenant!r})")
        return NOT_FOUND
    if a.queue and not _known_queue(p, a.queue) and a.queue not in p.get_paused_queues():
        _err(f"queue {a.queue} not found; the queues are: {', '.join(q.name for q in _queues(p))}")
        return NOT_FOUND
    # said as it was found: "paused queue x" twice would read as two changes
    if a.tenant:
        was = p.is_tenant_paused(a.tenant)
        (p.pause_tenant if pause else p.resume_tenant)(a.tenant)
        return _said(out, {"paused": pause, "tenant": a.tenant, "changed": was != pause},
                     _pause_said(a.command, f"tenant {a.tenant}", was == pause))
    if a.queue:
        was = a.queue in p.get_paused_queues()
        (p.pause_queue if pause else p.resume_queue)(a.queue)
    else:
        was = p.is_paused
        p.pause(requeue_running=getattr(a, "requeue_running", False)) if pause else p.resume()
    return _said(out, {"paused": pause, "queue": a.queue, "changed": was != pause},
                 _pause_said(a.command, f"queue {a.queue}" if a.queue else "everything", was == pause))


def _pause_said(command: str, what: str, unchanged: bool) -> str:
    return f"{what} was already {command}d" if unchanged else f"{command}d {what}"


def _pause_worker(p: TaskProcessor, a: argparse.Namespace, out: Out, pause: bool) -> int:
    name = check_worker(a.worker)
    live = p.get_worker_states()
    matched = [w.id for w in live if name in worker_scopes(w.id)]
    if pause and not matched and name not in p.get_paused_workers():
        # a misspelt name would pause nothing now and say it did; ahead of a start: the API
        known = sorted({s for w in live for s in worker_scopes(w.id) if s})
        _err(f"no live worker process runs on host or manager {name!r}; the hosts and managers are: "
             f"{', '.join(known) or '(none)'}; to pause one ahead of its start, use the API: "
             f"processor.pause_worker({name!r})")
        return NOT_FOUND
    if not pause and name not in p.get_paused_workers():
        _err(f"worker {name!r} is not paused; paused: {', '.join(p.get_paused_workers()) or '(none)'}")
        return NOT_FOUND
    (p.pause_worker if pause else p.resume_worker)(name)
    return _said(out, {"paused": pause, "worker": name, "processes": matched},
                 f"{a.command}d worker {name} ({len(matched)} live processes)"
                 + (": they finish their running tasks and start no other until resumed" if pause else ""))


def cmd_rebalance(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    if _unknown_tenant(p, a, a.tenant):
        return NOT_FOUND
    if p.options.shards > 1 and not p.is_tenant_paused(a.tenant):
        _err(f"tenant {a.tenant} is not paused: pause it first ({a.run_as} pause --tenant {a.tenant}), so that no "
             "worker takes a task while it moves; resume it afterwards")
        return USAGE
    before = p.get_tenant_shard(a.tenant)
    moved, kept = p.rebalance_tenant(a.tenant, a.to)
    why = "tasks of batches stay with their batch" + (
        "" if p.options.signing_key else "; signed tasks stay unless the rebalance runs with Options.signing_key")
    return _said(out, {"tenant": a.tenant, "from": before, "to": a.to, "moved": moved, "left_in_batches": kept},
                 f"tenant {a.tenant}: new work goes to shard {a.to} "
                 f"({'as before' if before == a.to else f'was {before}'}); {moved} queued or delayed "
                 f"tasks moved, {kept} left where they are ({why}); resume the tenant when ready "
                 f"({a.run_as} resume --tenant {a.tenant})")


def _said(out: Out, obj: dict[str, Any], text: str) -> int:
    out.data(obj) if out.json else print(text)
    return OK


def cmd_batches(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    batches = p.get_batches(a.tenant, a.skip, a.take)
    count = p.get_batches_count(a.tenant)
    if not count and _unknown_tenant(p, a, a.tenant):
        return NOT_FOUND
    if out.json:
        out.data({"tenant": a.tenant, "count": count, "batches": batches})
        return OK
    out.table(["BATCH", "STATE", "TOTAL", "DONE", "FAILED", "CANCELED", "REMAINING", "CREATED", "SCOPE"],
              [[b.id, b.state, b.total, b.done, b.failed, b.canceled, b.remaining, b.created, b.scope]
               for b in batches])
    print(f"{len(batches)} shown of {count} batches of tenant {a.tenant}")
    return OK


def cmd_batch(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    info = p.get_batch(a.id)
    if info is None:
        _err(f"batch {a.id} not found")
        return NOT_FOUND
    if not a.watch:
        if out.json:
            out.data(info)
        else:
            for field in dataclasses.fields(info):
                print(f"{field.name + ':':<11}{_cell(getattr(info, field.name))}")
            print(progress(info))
        return OK
    tty = sys.stdout.isatty() and not out.json
    last = None
    settle_by: float | None = None
    try:
        while True:
            shown = (info.state, info.done, info.failed, info.canceled, info.remaining, info.total)
            if shown != last:
                if out.json:
                    out.data(info, line=True)
                elif tty:                    # redraw in place: back to the start, then clear the rest
                    print("\r" + progress(info) + CLEAR_TO_EOL, end="", flush=True)
                else:
                    print(progress(info), flush=True)
                last = shown
            if info.finished:
                # a canceled batch's running tasks are still being aborted: their counts land
                # within cancel_grace (a task stuck in C code: with its process, a moment later)
                if settle_by is None:
                    settle_by = time.monotonic() + p.options.cancel_grace.total_seconds() + SETTLE_MARGIN
                if info.remaining == 0 or time.monotonic() > settle_by:
                    break
            time.sleep(a.interval)
            nxt = p.get_batch(a.id)
            if nxt is None:
                if tty:
                    print(flush=True)
                    tty = False
                _err(f"batch {a.id} was deleted (retention) while watched; last seen {info.state}")
                return NOT_FOUND
            info = nxt
    finally:
        if tty:
            print(flush=True)               # the shell's prompt starts on a line of its own
    return FAILED if info.state in ("failed", "canceled") else OK


def progress(b: BatchInfo, width: int = 30) -> str:
    settled = b.done + b.failed + b.canceled
    filled = width * settled // b.total if b.total else width
    pct = 100 * settled // b.total if b.total else 100
    return (f"[{'#' * filled}{'.' * (width - filled)}] {pct:3d}% {settled}/{b.total}  done={b.done} "
            f"failed={b.failed} canceled={b.canceled} remaining={b.remaining}  {b.state}")


def cmd_cancel(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    if p.cancel_batch(a.id):
        return _said(out, {"id": a.id, "canceled": True}, f"batch {a.id} canceled")
    info = p.get_batch(a.id)
    why = "not found" if info is None else f"already {info.state}"
    if out.json:
        out.data({"id": a.id, "canceled": False, "reason": why})
    else:
        _err(f"batch {a.id} {why}; nothing canceled")
    return NOT_FOUND


TASK_FIELDS = ("id", "state", "queue", "tenant", "target", "batch_id", "attempt", "retries_left", "worker",
               "enqueued_at", "started_at", "finished_at", "duration")


def cmd_task(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    """One task: state, progress, then its result or error when it has finished."""
    info = p.get_task(a.id)
    if info is None:
        _err(f"task {a.id} not found (unknown, or finished and not kept: Options.task_retention keeps "
             "finished tasks' records)")
        return NOT_FOUND
    outcome: dict[str, Any] = {}
    if info.finished:
        try:
            outcome["result"] = p.get_result(a.id)
        except CoreTaskError as exc:
            outcome["outcome"] = f"{type(exc).__name__}: {exc}"
    if out.json:
        out.data({**dataclasses.asdict(info), **outcome})
        return OK
    for name in TASK_FIELDS:
        value = getattr(info, name)
        if name == "duration" and value is not None:
            value = f"{value:.3f}s"
        print(f"{name + ':':<14}{_cell(value)}")
    print(f"{'args:':<14}{info.args_preview}")
    if info.progress is not None:
        print(f"{'progress:':<14}{task_progress(info.progress)}")
    if info.error_type:
        print(f"{'error:':<14}{info.error_type}: {info.error_message}")
    if "result" in outcome:
        print(f"{'result:':<14}{json.dumps(outcome['result'], default=repr, ensure_ascii=False)}")
    elif info.finished and outcome.get("outcome", "").startswith("ResultUnavailable"):
        print(f"{'result:':<14}(not kept: enqueue with keep_result=... to keep it)")
    if info.problem:
        print(f"{'problem:':<14}{info.problem}")
    return OK


def task_progress(pr: Progress, width: int = 30) -> str:
    """A bar when the total is known, else the count; then the message."""
    if pr.fraction is not None:
        fraction = min(max(pr.fraction, 0.0), 1.0)
        filled = int(width * fraction)
        text = f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}% {pr.done:g}/{pr.total:g}"
    else:
        text = f"{pr.done:g} done"
    return text + (f"  {pr.message}" if pr.message else "")


def cmd_cancel_task(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    before = p.get_task(a.id)
    if p.cancel_task(a.id):
        running = before is not None and before.state == "running"
        text = f"task {a.id} {'told to stop (it was running)' if running else 'canceled'}"
        return _said(out, {"id": a.id, "canceled": True, "was": before.state if before else None}, text)
    return _not_done(out, a.id, "canceled", "nothing canceled", p.get_task(a.id))


def cmd_delete_task(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    before = p.get_task(a.id)
    if p.delete_task(a.id):
        return _said(out, {"id": a.id, "deleted": True, "was": before.state if before else None},
                     f"task {a.id} deleted")
    info = p.get_task(a.id)
    hint = "; cancel it with cancel-task" if info is not None and info.state == "running" else ""
    return _not_done(out, a.id, "deleted", "nothing deleted" + hint, info)


def _not_done(out: Out, task_id: str, field: str, what: str, info: Any) -> int:
    """A single-task command that changed nothing: say why (exit 1)."""
    why = ("not found" if info is None else
           f"already {info.state}" if info.state in ("succeeded", "failed", "canceled") else f"is {info.state}")
    if out.json:
        out.data({"id": task_id, field: False, "reason": why})
    else:
        _err(f"task {task_id} {why}; {what}")
    return NOT_FOUND


def _dead_by_id(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    task_id = a.retry_id or a.discard_id
    info = p.get_task(task_id)
    if info is None or info.state != "dead" or info.queue != a.queue:
        why = "not found" if info is None else (f"is {info.state}" if info.state != "dead" else
                                                f"is a dead task of queue {info.queue}")
        if out.json:
            out.data({"queue": a.queue, "id": task_id, "retried" if a.retry_id else "discarded": False,
                      "reason": why})
        else:
            _err(f"task {task_id} {why}, not a dead task of queue {a.queue}; nothing changed")
        return NOT_FOUND
    if a.retry_id:
        done = p.retry_dead_task(task_id, retries=a.retries)
        obj, text = {"queue": a.queue, "id": task_id, "retried": done}, f"dead task {task_id} moved back to work"
    else:
        done = p.discard_dead_task(task_id)
        obj, text = {"queue": a.queue, "id": task_id, "discarded": done}, f"dead task {task_id} discarded"
    if not done:      # it left the dead list meanwhile (or its batch was canceled: discarded)
        return _not_done(out, task_id, "retried" if a.retry_id else "discarded", "nothing changed",
                         p.get_task(task_id))
    return _said(out, obj, text)


def cmd_dead(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    queue = p.get_queue(a.queue)
    if not _known_queue(p, a.queue) and not queue.dead:
        _err(f"queue {a.queue} not found; the queues are: {', '.join(q.name for q in _queues(p))}")
        return NOT_FOUND
    if a.retries is not None and a.retry is None and not a.retry_id:
        _err("--retries goes with --retry or --retry-id (the retries granted to the tasks moved back)")
        return USAGE
    if a.retry_id or a.discard_id:
        return _dead_by_id(p, a, out)
    if a.retry is not None:
        n = p.retry_dead_tasks(a.queue, retries=a.retries, count=a.retry or None)
        return _said(out, {"queue": a.queue, "retried": n}, f"{n} dead tasks of queue {a.queue} moved back to work")
    if a.discard is not None:
        n = p.discard_dead_tasks(a.queue, count=a.discard or None)
        return _said(out, {"queue": a.queue, "discarded": n}, f"{n} dead tasks of queue {a.queue} discarded")
    tasks = p.get_dead_tasks(a.queue, a.skip, a.take)
    if out.json:
        out.data({"queue": a.queue, "count": queue.dead, "tasks": tasks})
        return OK
    out.table(["TASK", "TARGET", "TENANT", "ERROR", "DEAD AT", "ARGS"],
              [[t.id, t.target, t.tenant, _dead_error(t), t.dead_at, t.args_preview[:50]] for t in tasks])
    print(f"{len(tasks)} shown of {queue.dead} dead tasks in queue {a.queue}")
    return OK


def _dead_error(t: DeadTask) -> str:
    text = f"damaged record: {t.problem}" if t.problem else f"{t.error_type}: {t.error_message}"
    return text.replace("\n", " ")[:60]


def cmd_quarantine(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    tasks = p.get_quarantined(a.skip, a.take)
    count = p.get_quarantined_count()
    if out.json:
        out.data({"count": count, "tasks": tasks})
        return OK
    out.table(["TASK", "REASON"], [[t.id, t.reason.replace("\n", " ")] for t in tasks])
    print(f"{len(tasks)} shown of {count} quarantined tasks")
    return OK


def cmd_schedules(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    schedules = p.get_schedules(a.tenant, a.skip, a.take)
    count = p.get_schedules_count(a.tenant)
    if not count and _unknown_tenant(p, a, a.tenant):
        return NOT_FOUND
    if out.json:
        out.data({"count": count, "schedules": schedules})
        return OK
    out.table(["ID", "CRON", "TIMEZONE", "NEXT RUN", "LAST RUN", "UNIQUE", "QUEUE", "SCOPE", "PAUSED SINCE",
               "SKIPPED U/E/P", "FAILED", "LAST FAILURE"],
              [[s.id, s.cron, s.timezone, s.next_run, s.last_run, s.unique, s.queue, s.scope, s.paused_since,
                f"{s.skipped_unique}/{s.skipped_expired}/{s.skipped_paused}", s.failures,
                f"{_cell(s.last_failure)} {s.last_error}" if s.last_failure else None]
               for s in schedules])
    print(f"{len(schedules)} shown of {count} schedules")
    return OK


def cmd_trigger(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    task_id = p.trigger_schedule(a.id)
    if task_id is None:
        _err(f"schedule {a.id} not found")
        return NOT_FOUND
    return _said(out, {"triggered": a.id, "task_id": task_id},
                 f"schedule {a.id}: one run enqueued now, task {task_id} ({a.run_as} task {task_id})")


def cmd_tenants(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    stats = [p.get_tenant_stats(t) for t in p.get_tenants(a.skip, a.take)]
    count = p.get_tenants_count()
    if out.json:
        out.data({"count": count, "tenants": stats})
        return OK
    sharded = p.options.shards > 1
    out.table(["TENANT", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELED", "DEAD", "PAUSED", "LIMIT"]
              + ["SHARD"] * sharded,
              [[s.tenant, sum(s.queued.values()), s.running, s.done, s.failed, s.canceled, s.dead, s.paused, s.limit]
               + [s.shard] * sharded for s in stats])
    print(f"{len(stats)} shown of {count} tenants")
    return OK


def _unknown_tenant(p: TaskProcessor, a: argparse.Namespace, tenant: str) -> bool:
    """Says so when the tenant never had work (a misspelt name would list nothing and exit 0)."""
    if p.gateway.tenant_known(tenant):
        return False
    _err(f"tenant {tenant} not found (no work of it was ever enqueued); the tenants: {a.run_as} tenants")
    return True


def cmd_tenant(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    s = p.get_tenant_stats(a.id)
    if _unknown_tenant(p, a, a.id):
        return NOT_FOUND
    if out.json:
        out.data(s)
        return OK
    for name in ("tenant", "paused", "limit", "running", "done", "failed", "canceled", "dead"):
        print(f"{name + ':':<10}{_cell(getattr(s, name))}")
    if p.options.shards > 1:
        print(f"{'shard:':<10}{s.shard}")
    print(f"{'queued:':<10}{' '.join(f'{q}={n}' for q, n in s.queued.items()) or '-'}")
    print(f"{'batches:':<10}{' '.join(f'{st}={n}' for st, n in s.batches.items())}")
    return OK


def cmd_metrics(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    """Serve the Redis-side gauges (coretask/contrib/prometheus.py RedisCollector) until stopped."""
    from .contrib.prometheus import serve_redis_metrics

    try:
        server, _ = serve_redis_metrics(p, a.port, a.addr)
    except OSError as exc:
        _err(f"cannot serve metrics on {a.addr}:{a.port}: {exc}")
        return USAGE
    port, host = server.server_port, _host(a.addr)
    _said(out, {"metrics": f"http://{host}:{port}/metrics"}, f"serving coretask metrics on http://{host}:{port}"
          "/metrics (Ctrl-C stops)")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()


def _bind_problem(host: str, port: int) -> str:
    """Why (host, port) cannot be bound: the port in use, an address not this machine's..."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the server refused it"


def cmd_dashboard(p: TaskProcessor, a: argparse.Namespace, out: Out) -> int:
    """Serve the web dashboard until interrupted (coretask/dashboard/server.py)."""
    try:
        from .dashboard import server
    except ImportError as exc:
        _err(f"{exc}")
        return USAGE
    password = server.password_from(a.password)
    server.check_bind(a.host, password, a.no_auth)      # ConfigurationError: exit 2 with its message
    app = server.create_app(p, read_only=a.read_only, password=password)
    try:
        with contextlib.redirect_stderr(io.StringIO()):    # Werkzeug's own words, said once below
            srv = server.make_server(app, a.host, a.port)
    except (OSError, SystemExit) as exc:
        # Werkzeug prints why it could not bind and exits: the reason is asked of the OS again
        reason = _bind_problem(a.host, a.port) if isinstance(exc, SystemExit) else str(exc)
        _err(f"cannot serve the dashboard on {a.host}:{a.port}: {reason}; choose another --port or --host")
        return USAGE
    auth = "password (HTTP basic auth)" if password else "no password"
    print(f"coretask dashboard on http://{_host(a.host)}:{srv.server_port}/ ({auth}"
          f"{', read-only' if a.read_only else ''}); Ctrl-C stops it", flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return OK


def _host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# ------------------------------------------------------------------------------------ parser

def port_number(text: str) -> int:
    """argparse type of a --port (the worker's --metrics-port too)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if text == "all":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return int(text)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value
    return parse


def _command_of(argv: list[str]) -> str | None:
    """The first word that is neither an option nor --app's value: the command."""
    words = iter(argv)
    for word in words:
        if word == "--app":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _app_of(argv: list[str]) -> str | None:
    for i, word in enumerate(argv):
        if word == "--app" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--app="):
            return word.split("=", 1)[1]
    return os.environ.get("CORETASK_APP")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    ap = argparse.ArgumentParser(prog="python -m coretask", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", default=os.environ.get("CORETASK_APP"),
                    help="MODULE:ATTRIBUTE of your TaskProcessor (default: $CORETASK_APP)")
    ap.add_argument("--json", action="store_true", default=False, help="print JSON")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ap.commands = sub.choices  # type: ignore[attr-defined]   # for command_help()

    def cmd(name: str, fn: Callable[..., int], text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=text, description=text)
        sp.set_defaults(fn=fn)
        return sp

    cmd("status", cmd_status, "queues with counts, workers with heartbeat age, paused state")
    cmd("queues", cmd_queues, "queues with queued, in-flight, delayed and dead counts")
    sp = cmd("pause", cmd_pause, "pause everything, one queue, one tenant (--tenant), one schedule (--schedule) or "
             "one host's or manager's workers (--worker)")
    sp.add_argument("queue", nargs="?")
    sp.add_argument("--tenant", help="pause this tenant's work only")
    sp.add_argument("--schedule", metavar="ID", help="pause this cron schedule only: its ticks enqueue nothing "
                    "until resumed (upserting it again keeps the pause)")
    sp.add_argument("--worker", metavar="HOST[:PID]", help="pause the worker processes of one host, or of one "
                    "manager (host:pid, the MANAGER column of status): they finish their running tasks and start no other")
    sp.add_argument("--requeue-running", action="store_true",
                    help="also abort running tasks and hand them back (no retry consumed)")
    sp = cmd("resume", cmd_pause, "resume everything, one queue, one tenant (--tenant), one schedule (--schedule) "
             "or one host's or manager's workers (--worker)")
    sp.add_argument("queue", nargs="?")
    sp.add_argument("--tenant", help="resume this tenant's work only")
    sp.add_argument("--schedule", metavar="ID", help="resume this cron schedule only")
    sp.add_argument("--worker", metavar="HOST[:PID]", help="resume one host's or manager's worker processes")
    sp = cmd("rebalance", cmd_rebalance, "move a paused tenant to another shard (Options.shards): its new work "
             "goes there, its queued and delayed tasks move there task by task")
    sp.add_argument("tenant")
    sp.add_argument("--to", type=int, required=True, help="the shard number (0 .. shards - 1)")
    sp = cmd("batches", cmd_batches, "a tenant's batches, newest first")
    sp.add_argument("tenant")
    sp.add_argument("--skip", type=_at_least(0), default=0)
    sp.add_argument("--take", type=_at_least(1), default=25)
    sp = cmd("batch", cmd_batch, "one batch's statistics")
    sp.add_argument("id")
    sp.add_argument("--watch", action="store_true", help="show a live progress bar until the batch finishes")
    sp.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes with --watch")
    cmd("cancel", cmd_cancel, "cancel a batch: queued tasks never start, running ones are aborted").add_argument("id")
    cmd("task", cmd_task, "one task: state, attempt, worker, progress, and its result or error once "
        "finished").add_argument("id")
    cmd("cancel-task", cmd_cancel_task, "cancel one task: queued or delayed it never starts, running it is "
        "aborted").add_argument("id")
    cmd("delete-task", cmd_delete_task, "delete one queued, delayed or dead task").add_argument("id")
    sp = cmd("dead", cmd_dead, "list dead-lettered tasks of a queue, or retry / discard them")
    sp.add_argument("queue")
    act = sp.add_mutually_exclusive_group()
    act.add_argument("--retry", type=_count, metavar="N|all", help="move N back to work, oldest first (shard by shard, with Options.shards)")
    act.add_argument("--discard", type=_count, metavar="N|all", help="delete N, oldest first (shard by shard, with Options.shards)")
    act.add_argument("--retry-id", metavar="ID", help="move the dead task ID back to work")
    act.add_argument("--discard-id", metavar="ID", help="delete the dead task ID")
    sp.add_argument("--retries", type=int, help="retries granted to tasks moved back (default Options.retries)")
    sp.add_argument("--skip", type=_at_least(0), default=0)
    sp.add_argument("--take", type=_at_least(1), default=25)
    sp = cmd("quarantine", cmd_quarantine, "tasks whose records were too damaged to dead-letter (no readable "
             "queue), with the reason")
    sp.add_argument("--skip", type=_at_least(0), default=0)
    sp.add_argument("--take", type=_at_least(1), default=25)
    sp = cmd("schedules", cmd_schedules, "a tenant's cron schedules with next and last run")
    sp.add_argument("tenant")
    sp.add_argument("--skip", type=_at_least(0), default=0)
    sp.add_argument("--take", type=_at_least(1), default=25)
    cmd("trigger", cmd_trigger, "enqueue one run of a schedule now (the next tick does not move)").add_argument("id")
    sp = cmd("tenants", cmd_tenants, "tenants in name order with their counters, paused state and limit")
    sp.add_argument("--skip", type=_at_least(0), default=0)
    sp.add_argument("--take", type=_at_least(1), default=25)
    cmd("tenant", cmd_tenant, "one tenant's statistics: queued per queue, running, done, failed, canceled, "
        "dead, batches by state").add_argument("id")
    sp = cmd("metrics", cmd_metrics, "serve Prometheus gauges read from Redis (queue depth by state, workers, "
             "paused queues) on --port; needs coretask[prometheus]")
    sp.add_argument("--port", type=port_number, required=True, help="port of http://ADDR:PORT/metrics (0: any free port)")
    sp.add_argument("--addr", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    sp = cmd("dashboard", cmd_dashboard, "serve the web dashboard (needs coretask[dashboard]); loopback only "
             "unless a password is set")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sp.add_argument("--port", type=port_number, default=8080, help="port (default 8080; 0 picks a free one)")
    sp.add_argument("--password", default=None,
                    help="HTTP basic auth password, any user name (default: $CORETASK_DASHBOARD_PASSWORD)")
    sp.add_argument("--no-auth", action="store_true", help="serve a non-loopback address without a password")
    sp.add_argument("--read-only", action="store_true", help="show everything, offer and accept no action")
    return ap


def command_help() -> dict[str, str]:
    """Each command's name and one-line help (the Flask integration mirrors them; not demo,
    which starts its own server)."""
    commands: dict[str, argparse.ArgumentParser] = build_parser().commands  # type: ignore[attr-defined]
    return {name: sp.description or "" for name, sp in commands.items() if name != "demo"}


def main(argv: list[str] | None = None, processor: TaskProcessor | None = None) -> int:
    """Run one command; ``processor`` (the Flask integration's) replaces ``--app``, and is left
    open for its owner."""
    try:
        code = _main(argv, processor)
        sys.stdout.flush()              # what is still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        # the reader went away (`status | head -1`): stop quietly, with no traceback; the output
        # still buffered goes nowhere, so that the interpreter's own flush at exit cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE


def _main(argv: list[str] | None, given: TaskProcessor | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:                 # its own processor and server: before --app is required
        from .embedded.demo import main as demo

        return demo(argv[1:])
    ap = build_parser()
    if given is None and _command_of(argv) == "worker":     # the worker is a command of its own
        app = _app_of(argv) or "MODULE:ATTRIBUTE"
        _err(f"the worker is started by its own command: python -m coretask.worker --app {app} "
             "[--processes N] [--threads N] [--queues a,b] (python -m coretask.worker --help)")
        return USAGE
    args = ap.parse_args(argv)
    # how the user runs a command, for the hints that name another one
    args.run_as = "flask coretask" if given is not None else f"python -m coretask --app {args.app or 'APP'}"
    if given is not None:
        processor = given
    else:
        if not args.app:
            ap.error("--app MODULE:ATTRIBUTE (or $CORETASK_APP) is required")
        try:
            processor = load_processor(args.app)
        except ConfigurationError as exc:
            _err(str(exc))
            return USAGE
        except StoreUnavailable as exc:     # a cluster client reads the slot map as it is made
            _err(redact_url(str(exc)))
            return UNAVAILABLE
    import redis

    try:
        processor.gateway.check_shard_count()   # views of another shard count would miss work
        return int(args.fn(processor, args, Out(args.json)))
    except ConfigurationError as exc:
        _err(str(exc))
        return USAGE
    except StoreUnavailable as exc:            # its message names the masked URL and what to check
        _err(redact_url(str(exc)))
        return UNAVAILABLE
    except (redis.RedisError, CoreTaskError) as exc:
        _err(f"{type(exc).__name__} from {redact_url(processor.options.redis)}: "
             f"{redact_url(str(exc))}")
        return UNAVAILABLE
    except KeyboardInterrupt:
        return 0 if args.command == "metrics" else 130
    finally:
        if given is None:
            processor.close()
