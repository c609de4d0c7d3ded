"""The dashboard's pages and their live JSON: every number comes from the Scope (public API).

Each page has a ``live`` twin that returns the numbers that move (counts, states, progress) as
``{"text": {key: str}, "bars": {key: [value, max]}, "flags": {key: bool}}``; the page marks the
elements that show them with ``data-text`` / ``data-bar`` / ``data-if`` / ``data-unless`` and
static/dashboard.js polls the twin (see docs/decisions.md: why polling, not server-sent events).
Lists are paginated (PAGE rows) and read by index ranges and counters, never by scanning.
The graphs (processed and failed per minute; not on a tenant's dashboard: the history counters
are per queue) are read from the per-minute counters the scripts keep (get_history).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

try:
    from flask import Blueprint, abort, jsonify, redirect, render_template, request, url_for
    from flask.typing import ResponseReturnValue
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("coretask.dashboard needs Flask: pip install 'coretask[dashboard]'") from exc

from ..errors import ConfigurationError, CoreTaskError
from ..models import BatchInfo, HistoryPoint, TaskInfo
from .scope import Scope

__all__ = ["add_pages"]

PAGE = 25
DAY_CACHE_S = 30.0         # the 24-hour graph (1,440 minute hashes, 15-minute bars) is re-read at most this often
RESULT_CHARS = 10_000      # a result longer than this is cut on the task page
T = "coretask_dashboard/"  # template folder: named so that it never shadows the host app's own


def page_arg(name: str = "page") -> int:
    try:
        return max(int(request.args.get(name, "1")), 1)
    except ValueError:
        return 1


def batch_live(b: BatchInfo, out: dict[str, Any]) -> None:
    k = f"b:{b.id}"
    for field in ("state", "total", "done", "failed", "canceled", "remaining", "running"):
        out["text"][f"{k}:{field}"] = str(getattr(b, field))
    out["text"][f"{k}:duration"] = f"{b.duration:.1f}s"
    out["bars"][k] = [b.done + b.failed + b.canceled, max(b.total, 1)]
    out["flags"][f"{k}:running"] = b.state == "running"


def task_live(t: TaskInfo, out: dict[str, Any]) -> None:
    k = f"t:{t.id}"
    out["text"][f"{k}:state"] = t.state
    out["text"][f"{k}:attempt"] = str(t.attempt)
    if t.progress is not None:
        pr = t.progress
        out["text"][f"{k}:progress"] = progress_text(t)
        out["bars"][k] = [pr.done, pr.total] if pr.total else [0, 1]


def progress_text(t: TaskInfo) -> str:
    pr = t.progress
    if pr is None:
        return ""
    text = f"{pr.done:g}/{pr.total:g}" if pr.total else f"{pr.done:g} done"
    return text + (f" {pr.message}" if pr.message else "")


def fmt_dt(value: datetime | None, zone: str | None = None) -> str:
    """UTC, and saying so; in ``zone`` when given (a schedule's next run in its own zone)."""
    if value is None:
        return "-"
    if zone:
        try:
            return value.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S ") + zone
        except (ZoneInfoNotFoundError, ValueError):
            return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def runtime(t: TaskInfo) -> str:
    if t.started_at is None:
        return "-"
    return f"{(datetime.now(timezone.utc) - t.started_at).total_seconds():.1f}s"


def empty_live() -> dict[str, Any]:
    return {"text": {}, "bars": {}, "flags": {}, "charts": {}}


def seen(found: Any) -> Any:
    """The object, or 404 when the scope does not see it (another tenant's looks exactly like a
    missing one)."""
    if found is None:
        abort(404)
    return found


def live_of(found: Any, fill: Any) -> ResponseReturnValue:
    """A one-object live endpoint's answer: ``fill(found, out)``'s figures as JSON, or 404."""
    out = empty_live()
    fill(seen(found), out)
    return jsonify(out)


def chart_rows(points: list[HistoryPoint]) -> list[list[int]]:
    return [[p.processed, p.failed] for p in points]


def add_pages(bp: Blueprint, scope: Scope) -> None:
    """Register the pages and their live twins on ``bp``."""
    day_cache: list[Any] = [0.0, None]      # (monotonic time read, points): shared by every viewer

    def day_history() -> list[HistoryPoint]:
        now = time.monotonic()
        if day_cache[1] is None or now - day_cache[0] > DAY_CACHE_S:
            day_cache[:] = [now, scope.processor.get_history(24 * 60, 15)]
        return day_cache[1]  # type: ignore[no-any-return]

    def overview_live() -> dict[str, Any]:
        out = empty_live()
        out["flags"]["paused"] = paused = scope.paused
        out["text"]["paused"] = "paused" if paused else "running"
        for q in scope.queues():
            for field in ("queued", "in_flight", "delayed", "dead"):
                value = getattr(q, field)
                out["text"][f"q:{q.name}:{field}"] = "-" if value is None else str(value)
        if not scope.scoped:
            workers = scope.processor.get_worker_states()
            out["text"]["workers"] = str(len(workers))
            out["text"]["running"] = str(sum(w.running for w in workers))
            out["charts"]["hour"] = chart_rows(scope.processor.get_history(60))
        return out

    @bp.get("/")
    def overview() -> ResponseReturnValue:
        workers = [] if scope.scoped else scope.processor.get_worker_states()
        charts = [] if scope.scoped else [
            ("hour", "Last hour, per minute", scope.processor.get_history(60)),
            ("day", "Last 24 hours, per 15 minutes", day_history())]
        return render_template(T + "overview.html", queues=scope.queues(), paused=scope.paused, workers=workers,
                               charts=charts, live=url_for(".live_overview"))

    @bp.get("/live/overview")
    def live_overview() -> ResponseReturnValue:
        return jsonify(overview_live())

    # ------------------------------------------------------------------------- queue

    def queue_or_404(name: str) -> Any:
        for q in scope.queues():
            if q.name == name:
                return q
        abort(404)

    @bp.get("/queues/<name>")
    def queue(name: str) -> ResponseReturnValue:
        q = queue_or_404(name)
        page = page_arg()
        dead_page = max(int(request.args.get("dead_page", "1")) if request.args.get("dead_page", "").isdigit()
                        else 1, 1)
        tenant = None if scope.scoped else (request.args.get("tenant") or None)
        try:
            view = scope.narrowed(tenant)          # ?tenant=: one tenant's tasks in this queue
        except ConfigurationError:
            abort(404)
        tasks = view.tasks_in_queue(name, (page - 1) * PAGE, PAGE)
        dead = view.dead(name, (dead_page - 1) * PAGE, PAGE)
        hour = None if scope.scoped else scope.processor.get_history(60, queue=name)
        tenants = [] if scope.scoped else scope.tenants(0, 100)[0]
        return render_template(T + "queue.html", q=q, tasks=tasks, page=page, more=len(tasks) == PAGE, hour=hour,
                               running=view.running(name), delayed=view.delayed(name), dead=dead,
                               dead_page=dead_page, dead_more=len(dead) == PAGE, tenant=tenant, tenants=tenants,
                               args={"name": name, "tenant": tenant} if tenant else {"name": name},
                               live=url_for(".live_queue", name=name))

    @bp.get("/live/queue/<name>")
    def live_queue(name: str) -> ResponseReturnValue:
        q = queue_or_404(name)
        out = empty_live()
        for field in ("queued", "in_flight", "delayed", "dead"):
            value = getattr(q, field)
            out["text"][f"q:{name}:{field}"] = "-" if value is None else str(value)
        for t in scope.running(name):
            task_live(t, out)
            out["text"][f"t:{t.id}:runtime"] = runtime(t)
        if not scope.scoped:
            out["charts"]["queue-hour"] = chart_rows(scope.processor.get_history(60, queue=name))
        return jsonify(out)

    # ----------------------------------------------------------------------- batches

    def chosen_tenant() -> tuple[str | None, list[str]]:
        """The tenant a per-tenant page shows (?tenant=, else the first), and tenants to pick."""
        if scope.tenant is not None:
            return scope.tenant, [scope.tenant]
        tenants, _ = scope.tenants(0, 100)
        wanted = request.args.get("tenant") or (tenants[0] if tenants else None)
        return wanted, tenants

    @bp.get("/batches")
    def batches() -> ResponseReturnValue:
        tenant, tenants = chosen_tenant()
        page = page_arg()
        rows, count = scope.batches(tenant, (page - 1) * PAGE, PAGE) if tenant else ([], 0)
        return render_template(T + "batches.html", tenant=tenant, tenants=tenants, batches=rows, count=count,
                               page=page, more=page * PAGE < count,
                               live=url_for(".live_batches", tenant=tenant, page=page) if tenant else None)

    @bp.get("/live/batches")
    def live_batches() -> ResponseReturnValue:
        tenant, _ = chosen_tenant()
        out = empty_live()
        if tenant:
            page = page_arg()
            for b in scope.batches(tenant, (page - 1) * PAGE, PAGE)[0]:
                batch_live(b, out)
        return jsonify(out)

    @bp.get("/batches/<batch_id>")
    def batch(batch_id: str) -> ResponseReturnValue:
        b = seen(scope.batch(batch_id))
        page, tpage = page_arg(), page_arg("tpage")
        results = scope.batch_results(batch_id, (page - 1) * PAGE, PAGE)
        tasks = scope.batch_tasks(batch_id, (tpage - 1) * PAGE, PAGE)
        return render_template(T + "batch.html", b=b, continuations=scope.continuations(batch_id),
                               tasks=tasks, tpage=tpage, tmore=(tpage * PAGE) < b.total,
                               results=results, page=page, more=len(results) == PAGE,
                               live=url_for(".live_batch", batch_id=batch_id))

    @bp.get("/live/batch/<batch_id>")
    def live_batch(batch_id: str) -> ResponseReturnValue:
        return live_of(scope.batch(batch_id), batch_live)

    # --------------------------------------------------------------------- schedules

    @bp.get("/schedules")
    def schedules() -> ResponseReturnValue:
        tenant, tenants = chosen_tenant()
        page = page_arg()
        rows, count = scope.schedules(tenant, (page - 1) * PAGE, PAGE) if tenant else ([], 0)
        return render_template(T + "schedules.html", tenant=tenant, tenants=tenants, schedules=rows, count=count,
                               page=page, more=page * PAGE < count)

    # ----------------------------------------------------------------------- tenants

    @bp.get("/tenants")
    def tenants() -> ResponseReturnValue:
        page = page_arg()
        names, count = scope.tenants((page - 1) * PAGE, PAGE)
        stats = [scope.tenant_stats(n) for n in names]
        return render_template(T + "tenants.html", stats=stats, count=count, page=page, more=page * PAGE < count,
                               sharded=scope.processor.options.shards > 1, live=url_for(".live_tenants", page=page))

    @bp.get("/live/tenants")
    def live_tenants() -> ResponseReturnValue:
        page = page_arg()
        out = empty_live()
        for s in (scope.tenant_stats(n) for n in scope.tenants((page - 1) * PAGE, PAGE)[0]):
            out["flags"][f"tn:{s.tenant}:paused"] = s.paused
            for field in ("running", "done", "failed", "canceled", "dead"):
                out["text"][f"tn:{s.tenant}:{field}"] = str(getattr(s, field))
            out["text"][f"tn:{s.tenant}:queued"] = str(sum(s.queued.values()))
        return jsonify(out)

    # ----------------------------------------------------------------------- workers

    @bp.get("/workers")
    def workers() -> ResponseReturnValue:
        if scope.scoped:
            abort(404)          # workers serve every tenant: the operator's page, not a tenant's
        return render_template(T + "workers.html", workers=scope.processor.get_worker_states(),
                               paused_workers=scope.processor.get_paused_workers(), live=url_for(".live_workers"))

    @bp.get("/live/workers")
    def live_workers() -> ResponseReturnValue:
        if scope.scoped:
            abort(404)
        out = empty_live()
        for w in scope.processor.get_worker_states():
            out["text"][f"w:{w.id}:running"] = str(w.running)
            out["text"][f"w:{w.id}:age"] = f"{w.heartbeat_age:.1f}s"
            out["text"][f"w:{w.id}:heartbeat"] = fmt_dt(w.last_heartbeat)
            if w.memory is not None:
                out["text"][f"w:{w.id}:memory"] = f"{w.memory / 1048576:.1f} MB"
        return jsonify(out)

    # ------------------------------------------------------------------- task, search

    @bp.get("/tasks/<task_id>")
    def task(task_id: str) -> ResponseReturnValue:
        t = seen(scope.task(task_id))
        result, outcome = None, None
        if t.finished:
            try:
                result = json.dumps(scope.api.get_result(task_id), default=repr, ensure_ascii=False, indent=2)
                result = result if len(result) <= RESULT_CHARS else result[:RESULT_CHARS] + "…"
            except CoreTaskError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
        timeline = [(label, when) for label, when in (
            ("enqueued", t.enqueued_at), ("due (delayed)", t.due_at), ("started (last attempt)", t.started_at),
            ("finished", t.finished_at), ("dead-lettered", getattr(t, "dead_at", None))) if when is not None]
        timeline.sort(key=lambda row: row[1])
        return render_template(T + "task.html", t=t, result=result, outcome=outcome, timeline=timeline,
                               progress=progress_text(t), live=url_for(".live_task", task_id=task_id))

    @bp.get("/live/task/<task_id>")
    def live_task(task_id: str) -> ResponseReturnValue:
        return live_of(scope.task(task_id), task_live)

    @bp.get("/search")
    def search() -> ResponseReturnValue:
        q = request.args.get("q", "").strip()
        if q and len(q) <= 200:
            if scope.task(q) is not None:
                return redirect(url_for(".task", task_id=q))
            if scope.batch(q) is not None:
                return redirect(url_for(".batch", batch_id=q))
            s = scope.schedule(q)
            if s is not None:
                return redirect(url_for(".schedules", tenant=s.tenant))
        return render_template(T + "search.html", q=q), 404
