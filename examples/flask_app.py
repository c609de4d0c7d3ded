"""A Flask app on coretask's Flask extension: enqueue from a route, report a batch's progress.

    export CORETASK_REDIS_URL=redis://localhost:6379/0
    flask --app examples.flask_app run                  # the web app
    flask --app examples.flask_app coretask worker      # its worker (same config, app context)
    flask --app examples.flask_app coretask status      # any `python -m coretask` command

Configuration comes from ``CORETASK_*`` keys of ``app.config`` (here two of them from the
environment).
"""
from __future__ import annotations

import os

import redis
from flask import Flask, current_app, jsonify, request

from coretask.flask import CoreTask

coretask = CoreTask()


def send_welcome_email(address: str) -> None:
    """The background work. It runs inside the app's context, so it reads the app's config and
    extensions as a view would (here: records the 'sent' mail in Redis)."""
    config = current_app.config
    redis.Redis.from_url(config["CORETASK_REDIS_URL"]).rpush(config["MAIL_OUTBOX"], address)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(CORETASK_REDIS_URL=os.environ.get("CORETASK_REDIS_URL", "redis://localhost:6379/0"),
                      CORETASK_PREFIX=os.environ.get("EXAMPLE_PREFIX", "{example}"),
                      CORETASK_QUEUES="default,mail")
    app.config.setdefault("MAIL_OUTBOX", app.config["CORETASK_PREFIX"] + ":sent")
    coretask.init_app(app)

    @app.post("/signup")
    def signup():  # type: ignore[no-untyped-def]
        address = request.get_json(force=True)["email"]
        task_id = coretask.enqueue_task("mail", _tenant(), send_welcome_email, address)
        return jsonify(task_id=task_id), 202

    @app.post("/newsletter")
    def newsletter():  # type: ignore[no-untyped-def]
        addresses = request.get_json(force=True)["emails"]
        with coretask.batch("mail", _tenant(), scope="newsletter") as batch:
            for a in addresses:
                batch.enqueue(send_welcome_email, a)
        return jsonify(batch_id=batch.id), 202

    @app.get("/batches/<batch_id>")
    def batch_status(batch_id: str):  # type: ignore[no-untyped-def]
        info = coretask.get_batch(batch_id, tenant=_tenant())
        if info is None:
            return jsonify(error="not found"), 404
        return jsonify(state=info.state, total=info.total, done=info.done, failed=info.failed,
                       remaining=info.remaining)

    return app


def _tenant() -> str:
    return request.headers.get("X-Tenant", "public")


app = create_app()
