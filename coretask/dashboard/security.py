"""CSRF tokens for the dashboard's forms and HTTP basic auth for the standalone server.

Why a token of our own rather than Flask-WTF: one hidden field and one comparison are all the
dashboard needs, and a dependency for that would be heavier than the code. The token is random,
kept in the (signed) Flask session, so it is per browser session; every POST must echo it in the
form field ``csrf_token`` or the header ``X-CSRF-Token``. A page on another site can make the
browser POST, but cannot read the token, so it cannot forge an action. The host app's session
needs ``app.secret_key`` (the standalone server sets a random one).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import secrets

try:
    from flask import abort, current_app, request, session
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("coretask.dashboard needs Flask: pip install 'coretask[dashboard]'") from exc

from ..errors import ConfigurationError

__all__ = ["csrf_token", "check_csrf", "password_ok", "SESSION_KEY", "FORM_FIELD", "HEADER"]

SESSION_KEY = "coretask_csrf"
FORM_FIELD = "csrf_token"
HEADER = "X-CSRF-Token"


def csrf_token() -> str:
    """This session's token (made on first use)."""
    if not current_app.secret_key:
        raise ConfigurationError("the coretask dashboard's actions need app.secret_key (the session carries the "
                                 "CSRF token and the messages): set app.secret_key, or mount it with read_only=True")
    token = session.get(SESSION_KEY)
    if not isinstance(token, str) or len(token) < 32:
        token = session[SESSION_KEY] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Abort with 400 unless the request echoes this session's token."""
    expected = session.get(SESSION_KEY) if current_app.secret_key else None
    given = request.form.get(FORM_FIELD) or request.headers.get(HEADER) or ""
    if not isinstance(expected, str) or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        abort(400, description="The CSRF token is missing or does not match this session: reload the page and "
                               "try again.")


def password_ok(authorization: str | None, password: str) -> bool:
    """Whether a ``Basic`` Authorization header carries ``password`` (any user name)."""
    if not authorization or not authorization.startswith("Basic "):
        return False
    try:
        decoded = base64.b64decode(authorization[6:], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    _, sep, given = decoded.partition(":")
    return bool(sep) and hmac.compare_digest(given.encode(), password.encode())
