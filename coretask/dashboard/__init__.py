"""The coretask dashboard: a Flask blueprint to mount in your own app, behind your own login.

    app.register_blueprint(coretask.dashboard.blueprint(processor), url_prefix="/tasks")
    app.register_blueprint(coretask.dashboard.blueprint(processor.tenant("acme"), read_only=True),
                           url_prefix="/acme/tasks", name="acme_tasks")

or standalone: ``python -m coretask --app MODULE:ATTR dashboard`` (coretask/dashboard/server.py).

Server-rendered HTML, a small stylesheet and a small script, all shipped in the package: no
build step, nothing loaded from a CDN, works offline. Everything shown is read through the
public API and every action is a public API call (coretask/dashboard/scope.py), so a
tenant-scoped dashboard reaches exactly what ``processor.tenant(name)`` reaches. Flask is an
optional dependency: ``pip install 'coretask[dashboard]'``.
"""
from __future__ import annotations

from typing import Any

try:
    from flask import Blueprint, get_flashed_messages, request
    from flask.wrappers import Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("coretask.dashboard needs Flask: pip install 'coretask[dashboard]'") from exc

from ..errors import ConfigurationError, StoreError
from ..options import redact_url
from ..processor import TaskProcessor
from ..tenancy import TenantView
from .actions import add_actions
from .scope import Scope

NOT_KEPT = ("unknown, another tenant's, or finished and no longer kept (Options.task_retention keeps finished "
            "tasks for a while)")
from .security import csrf_token
from .views import add_pages, fmt_dt, progress_text, runtime

__all__ = ["blueprint", "DEFAULT_POLL_MS"]

DEFAULT_POLL_MS = 1000      # live pages poll their JSON twin this often (docs/decisions.md)

# Only this dashboard's own files: no inline script or style (so an injected <script> in task
# data could not run even if escaping failed), no other origin, no framing by other sites.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'")


def blueprint(target: TaskProcessor | TenantView, read_only: bool = False, *, name: str = "coretask_dashboard",
              poll_ms: int = DEFAULT_POLL_MS) -> Blueprint:
    """A Flask Blueprint showing ``target``: a TaskProcessor (everything) or
    ``processor.tenant(name)`` (that tenant's work only; another tenant's ids answer 404).
    ``read_only``: no action is shown, and every POST answers 403. Actions need the host app's
    ``secret_key`` (the session carries the CSRF token). ``name``: the blueprint's name, to
    mount more than one dashboard in one app."""
    scope = Scope(target)
    bp = Blueprint(name, __name__, template_folder="templates", static_folder="static",
                   static_url_path="/_static")

    @bp.context_processor
    def helpers() -> dict[str, Any]:
        return {"read_only": read_only, "scope": scope, "tenant_scope": scope.tenant, "fmt_dt": fmt_dt,
                "runtime": runtime, "progress_text": progress_text, "poll_ms": poll_ms,
                "csrf_token": (lambda: "") if read_only else csrf_token,
                "redis_url": redact_url(scope.processor.options.redis),
                "prefix": scope.processor.options.prefix,
                "messages": get_flashed_messages(with_categories=True) if not read_only else [],
                "here": request.full_path.rstrip("?")}

    @bp.after_request
    def headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "application/json":
            response.headers["Cache-Control"] = "no-store"
        return response

    @bp.errorhandler(ConfigurationError)
    def misconfigured(exc: ConfigurationError) -> tuple[str, int, dict[str, str]]:
        """The host app's setup is wrong (a writable dashboard without app.secret_key): say what
        to fix on the page, not only in the server's log behind a bare 500."""
        return f"coretask dashboard: {exc}\n", 500, {"Content-Type": "text/plain; charset=utf-8"}

    @bp.errorhandler(StoreError)
    def store_error(exc: StoreError) -> tuple[str, int]:
        """Redis unreachable or refusing: say so (the URL masked), instead of a bare 500."""
        from flask import render_template

        return render_template("coretask_dashboard/unavailable.html", error=redact_url(str(exc)),
                               kind=type(exc).__name__), 503

    @bp.errorhandler(404)
    def not_found(exc: Exception) -> tuple[Any, int]:
        """A page whose object is gone (a task finished and not kept, a batch past its
        retention) says what and why, with the navigation; its live twin answers JSON, which
        tells the open page to stop claiming it is live (dashboard.js)."""
        from flask import jsonify, render_template

        if "/live/" in request.path:
            return jsonify({"gone": True}), 404
        args = request.view_args or {}
        if "task_id" in args:
            what, why = f"task {args['task_id']}", NOT_KEPT
        elif "batch_id" in args:
            what, why = f"batch {args['batch_id']}", "unknown, another tenant's, or past its retention"
        elif "name" in args:
            what, why = f"queue {args['name']}", "not a queue of this deployment"
        else:
            what, why = "this page", "unknown here"
        return render_template("coretask_dashboard/not_found.html", what=what, why=why), 404

    add_pages(bp, scope)
    add_actions(bp, scope, read_only)
    return bp
