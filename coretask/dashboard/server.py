"""The standalone dashboard: ``python -m coretask --app MODULE:ATTR dashboard``.

A small Flask app around the blueprint, served by Werkzeug's threaded server. It binds to
loopback by default. Bound anywhere else it would show (and steer) every tenant's work to
whoever reaches the port, so it refuses to start unless a password is set (``--password`` or
CORETASK_DASHBOARD_PASSWORD; HTTP basic auth, any user name) or ``--no-auth`` says that
something in front of it (a VPN, an authenticating proxy) already decides who gets in.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
from typing import Any

try:
    from flask import Flask, Response, redirect, request, url_for
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the coretask dashboard needs Flask: pip install 'coretask[dashboard]'") from exc

from ..errors import ConfigurationError
from ..processor import TaskProcessor
from ..tenancy import TenantView
from . import blueprint
from .security import password_ok

__all__ = ["create_app", "check_bind", "make_server", "PASSWORD_ENV", "DEFAULT_HOST", "DEFAULT_PORT"]

PASSWORD_ENV = "CORETASK_DASHBOARD_PASSWORD"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
REALM = 'Basic realm="coretask dashboard", charset="UTF-8"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False            # a host name that may resolve anywhere


def check_bind(host: str, password: str | None, no_auth: bool) -> None:
    """Refuse a non-loopback bind with neither a password nor an explicit --no-auth."""
    if password and no_auth:
        raise ConfigurationError("--password and --no-auth contradict each other: pick one")
    if not is_loopback(host) and not password and not no_auth:
        raise ConfigurationError(
            f"refusing to serve the dashboard on {host}, which is not a loopback address, without a password: "
            f"anyone who reaches the port could pause processing and delete tasks. Set --password (or "
            f"${PASSWORD_ENV}) for HTTP basic auth, pass --no-auth if something in front of it already "
            f"authenticates, or bind to 127.0.0.1 (the default)")


def create_app(target: TaskProcessor | TenantView, *, read_only: bool = False, password: str | None = None,
               secret_key: bytes | None = None) -> Flask:
    """The standalone app: the dashboard at /, behind basic auth when ``password`` is set."""
    app = Flask("coretask.dashboard")
    app.secret_key = secret_key or secrets.token_bytes(32)   # sessions die with the process: fine here
    app.config.update(SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_HTTPONLY=True)
    app.register_blueprint(blueprint(target, read_only=read_only), url_prefix="/")

    if password:
        @app.before_request
        def authenticate() -> Any:
            given = request.headers.get("Authorization")
            if not password_ok(given, password):
                said = "wrong password" if given else "password required"
                return Response(f"coretask dashboard: {said}\n", 401, {"WWW-Authenticate": REALM})
            return None

    @app.get("/favicon.ico")
    def favicon() -> Any:       # browsers ask for it; a 404 would be a console error on every page
        return redirect(url_for("coretask_dashboard.static", filename="favicon.svg"))

    return app


def make_server(app: Flask, host: str, port: int) -> Any:
    """A threaded Werkzeug server (``serve_forever()`` / ``shutdown()``); port 0 picks one."""
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server(host, port, app, threaded=True)


def password_from(given: str | None) -> str | None:
    return given or os.environ.get(PASSWORD_ENV) or None
