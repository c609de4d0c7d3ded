"""A Flask app that enqueues from a route and reports a batch's progress.

    CORETASK_REDIS_URL=redis://localhost:6379/0 flask --app examples.flask_app run
    python -m coretask.worker --app examples.flask_app:processor
"""
from __future__ import annotations

import os

import redis
from flask import Flask, jsonify, request

from coretask import Options, TaskProcessor

processor = TaskProcessor(Options(redis=os.environ.get("CORETASK_REDIS_URL", "redis://localhost:6379/0"),
                                  prefix=os.environ.get("EXAMPLE_PREFIX", "{example}")))
app = Flask(__name__)


def send_welcome_email(address: str) -> None:
    """The background work (here: records the 'sent' mail in Redis)."""
    redis.Redis.from_url(processor.options.redis).rpush(f"{processor.options.prefix}:sent", address)


@app.post("/signup")
def signup():  # type: ignore[no-untyped-def]
    address = request.get_json(force=True)["email"]
    task_id = processor.enqueue_task("default", request.headers.get("X-Tenant", "public"), send_welcome_email, address)
    return jsonify(task_id=task_id), 202


@app.post("/newsletter")
def newsletter():  # type: ignore[no-untyped-def]
    addresses = request.get_json(force=True)["emails"]
    tenant = request.headers.get("X-Tenant", "public")
    with processor.batch("default", tenant, scope="newsletter") as batch:
        for a in addresses:
            batch.enqueue(send_welcome_email, a)
    return jsonify(batch_id=batch.id), 202


@app.get("/batches/<batch_id>")
def batch_status(batch_id: str):  # type: ignore[no-untyped-def]
    info = processor.get_batch(batch_id, tenant=request.headers.get("X-Tenant", "public"))
    if info is None:
        return jsonify(error="not found"), 404
    return jsonify(state=info.state, total=info.total, done=info.done, failed=info.failed,
                   remaining=info.remaining)
