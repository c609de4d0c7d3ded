"""A factory-only Flask app, as docs/flask.md writes one: no module-level ``app``, and
``current_app`` imported at module level (Flask's app finder, run while the ``flask`` command's
app context is active, sees that proxy as a Flask instance). Configured from the environment
by tests/test_flask.py."""
from __future__ import annotations

import json
import os

import redis
from flask import Flask, current_app

from coretask.flask import CoreTask

coretask = CoreTask()


def record_app_name(key: str) -> None:
    config = current_app.config
    if config["CORETASK_CLUSTER"]:      # the key's slot may be another node's
        from redis.cluster import RedisCluster
        RedisCluster.from_url(config["CORETASK_REDIS_URL"]).rpush(key, current_app.name)
    else:
        redis.Redis.from_url(config["CORETASK_REDIS_URL"]).rpush(key, current_app.name)


def create_app() -> Flask:
    app = Flask("factory-shop")
    app.config.update(CORETASK_REDIS_URL=os.environ["FACTORY_APP_REDIS_URL"],
                      CORETASK_PREFIX=os.environ["FACTORY_APP_PREFIX"],
                      CORETASK_CLUSTER=os.environ.get("FACTORY_APP_CLUSTER") == "1",
                      **{f"CORETASK_{k.upper()}": v for k, v in json.loads(os.environ["FACTORY_APP_OPTIONS"]).items()})
    coretask.init_app(app)
    return app
