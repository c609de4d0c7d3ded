"""The dashboard's actions: POST only, each one public API call through the Scope.

Every action checks, in this order: the dashboard is not read-only (403), the request carries
this session's CSRF token (400), the object is one this dashboard may see (404: another
tenant's id reads as unknown, exactly as through the API). It then answers with a flash message
and a redirect back to the page it came from (``next``, only a path inside the dashboard).
"""
from __future__ import annotations

from collections.abc import Callable

try:
    from flask import Blueprint, abort, flash, redirect, request, url_for
    from flask.typing import ResponseReturnValue
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("coretask.dashboard needs Flask: pip install 'coretask[dashboard]'") from exc

from ..errors import ConfigurationError
from ..models import worker_scopes
from .scope import Scope
from .security import check_csrf

__all__ = ["add_actions"]

TASK_ACTIONS = ("cancel", "delete", "retry", "discard")


def add_actions(bp: Blueprint, scope: Scope, read_only: bool) -> None:
    """Register the POST routes on ``bp``; with ``read_only`` each of them answers 403."""

    @bp.before_request
    def guard() -> None:
        if request.method == "POST":
            if read_only:
                abort(403, description="This dashboard is read-only.")
            check_csrf()

    def back(message: str, category: str = "ok") -> ResponseReturnValue:
        flash(message, f"coretask-{category}")
        root = url_for(".overview")
        target = request.form.get("next", "")
        if not (target.startswith(root) and not target.startswith("//") and "\\" not in target):
            target = root
        return redirect(target, code=303)

    def outcome(done: bool, yes: str, no: str) -> ResponseReturnValue:
        return back(yes if done else no, "ok" if done else "error")

    @bp.post("/do/pause")
    def pause() -> ResponseReturnValue:
        scope.set_paused(True)
        return back(f"Paused {'tenant ' + scope.tenant if scope.tenant else 'everything'}: no worker starts "
                    "another task until you resume.")

    @bp.post("/do/resume")
    def resume() -> ResponseReturnValue:
        scope.set_paused(False)
        return back(f"Resumed {'tenant ' + scope.tenant if scope.tenant else 'everything'}.")

    @bp.post("/do/queue/<name>/<action>")
    def queue_action(name: str, action: str) -> ResponseReturnValue:
        if not any(q.name == name for q in scope.queues()):
            abort(404)
        if action in ("pause", "resume") and not scope.scoped:
            (scope.processor.pause_queue if action == "pause" else scope.processor.resume_queue)(name)
            return back(f"Queue {name} {action}d.")
        if action == "retry-dead":
            n = scope.retry_all_dead(name)
            return back(f"{n} dead task{'' if n == 1 else 's'} of queue {name} moved back to work.")
        if action == "discard-dead":
            n = scope.discard_all_dead(name)
            return back(f"{n} dead task{'' if n == 1 else 's'} of queue {name} discarded.")
        abort(404)

    @bp.post("/do/worker/<name>/<action>")
    def worker_action(name: str, action: str) -> ResponseReturnValue:
        p = scope.processor
        if scope.scoped or action not in ("pause", "resume"):
            abort(404)          # workers serve every tenant: the operator's, not a tenant's
        paused = p.get_paused_workers()
        if action == "resume":
            if name not in paused:
                return back(f"Worker {name} is not paused: nothing changed.", "error")
            p.resume_worker(name)
            return back(f"Worker {name} resumed.")
        if not any(name in worker_scopes(w.id) for w in p.get_worker_states()) and name not in paused:
            return back(f"No live worker process runs on host or manager {name}: nothing changed.", "error")
        n = p.pause_worker(name)
        return back(f"Worker {name} paused: its {n} processes finish their running tasks and start no other "
                    "until you resume it.")

    task_calls: dict[str, Callable[[str], bool]] = {
        "cancel": lambda i: bool(scope.api.cancel_task(i)), "delete": lambda i: bool(scope.api.delete_task(i)),
        "retry": lambda i: bool(scope.api.retry_dead_task(i)),
        "discard": lambda i: bool(scope.api.discard_dead_task(i)),
    }

    @bp.post("/do/task/<task_id>/<action>")
    def task_action(task_id: str, action: str) -> ResponseReturnValue:
        call = task_calls.get(action)
        before = scope.task(task_id)
        if call is None or before is None:
            abort(404)
        done = call(task_id)
        past = {"cancel": "canceled", "delete": "deleted", "retry": "moved back to work", "discard": "discarded"}
        return outcome(done, f"Task {task_id} {past[action]}.",
                       f"Task {task_id} is {before.state}: nothing {past[action].split()[0]}.")

    @bp.post("/do/batch/<batch_id>/cancel")
    def cancel_batch(batch_id: str) -> ResponseReturnValue:
        b = scope.batch(batch_id)
        if b is None:
            abort(404)
        return outcome(bool(scope.api.cancel_batch(batch_id)), f"Batch {batch_id} canceled.",
                       f"Batch {batch_id} is already {b.state}; nothing canceled.")

    @bp.post("/do/schedule/<schedule_id>/<action>")
    def schedule_action(schedule_id: str, action: str) -> ResponseReturnValue:
        info = scope.schedule(schedule_id)
        if info is None or action not in ("trigger", "cancel", "pause", "resume"):
            abort(404)
        if action == "trigger":
            task_id = scope.api.trigger_schedule(schedule_id)
            return outcome(task_id is not None, f"Schedule {schedule_id}: one run enqueued now (task {task_id}).",
                           f"Schedule {schedule_id} is gone.")
        if action in ("pause", "resume"):
            call = scope.api.pause_schedule if action == "pause" else scope.api.resume_schedule
            return outcome(call(schedule_id), f"Schedule {schedule_id} {action}d" + (
                ": its ticks enqueue nothing until it is resumed." if action == "pause" else "."),
                f"Schedule {schedule_id} is gone.")
        return outcome(scope.cancel_schedule(info), f"Schedule {schedule_id} canceled.",
                       f"Schedule {schedule_id} is gone.")

    @bp.post("/do/tenant/<tenant>/<action>")
    def tenant_action(tenant: str, action: str) -> ResponseReturnValue:
        if not scope.owns_tenant(tenant):
            abort(404)
        p = scope.processor
        if not scope.scoped and not p.gateway.tenant_known(tenant) and tenant not in p.get_paused_tenants():
            # the pages link known tenants only: a made-up name would pause or limit nothing visible
            return back(f"Tenant {tenant} not found (no work of it was ever enqueued): nothing changed.", "error")
        if action in ("pause", "resume"):
            if scope.scoped:
                scope.set_paused(action == "pause")
            else:
                scope.set_tenant_paused(tenant, action == "pause")
            return back(f"Tenant {tenant} {action}d.")
        if action == "limit" and not scope.scoped:     # a tenant does not raise its own limit
            text = request.form.get("limit", "").strip()
            try:
                limit = int(text) if text else None
                scope.processor.set_tenant_limit(tenant, limit)
            except (ValueError, ConfigurationError):
                return back(f"Limit {text!r} refused: give a whole number of at least 1, or leave it empty for "
                            "the default.", "error")
            return back(f"Tenant {tenant}: at most {limit} tasks at once." if limit else
                        f"Tenant {tenant}: back to the default concurrency limit.")
        abort(404)
