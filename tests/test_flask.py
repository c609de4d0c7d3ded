"""The Flask extension: config from app.config, tasks inside the app context, and the
``flask coretask`` commands, with a real Flask app, a real server and real workers."""
from __future__ import annotations

import gc
import weakref

import pytest
import redis
from flask import Flask, current_app

from coretask import TaskProcessor
from coretask.errors import ConfigurationError
from coretask.flask import CoreTask, options_from_config
from tests.conftest import FAST, wait_until


def record_app_name(key: str) -> None:
    """A task that only works inside an app context: it reads the app's name and config."""
    config = current_app.config
    client(config).rpush(key, f"{current_app.name}:{config['GREETING']}")


def client(config) -> redis.Redis:  # type: ignore[no-untyped-def]
    """A client for the app's server: a cluster client on a cluster (the key's slot may be another node's)."""
    if config["CORETASK_CLUSTER"]:
        from redis.cluster import RedisCluster
        return RedisCluster.from_url(config["CORETASK_REDIS_URL"])
    return redis.Redis.from_url(config["CORETASK_REDIS_URL"])


def test_config_keys_map_to_options_and_a_typo_names_the_key_meant():
    # Given config keys, one with an alias (THREADS), one comma-separated list, one duration
    options = options_from_config({"CORETASK_REDIS_URL": "redis://h:1/0", "CORETASK_THREADS": 7,
                                   "CORETASK_QUEUES": "high, low", "CORETASK_TIMEOUT": 30,
                                   "CORETASK_DASHBOARD_PASSWORD": "s3cret", "SECRET_KEY": "x"})
    # Then they set the matching Options fields; the dashboard's and Flask's own keys are ignored
    assert (options.redis, options.max_workers, options.queues) == ("redis://h:1/0", 7, ["high", "low"])
    assert options.timeout.total_seconds() == 30
    # And a misspelt key is refused at start-up, naming the key it probably meant
    with pytest.raises(ConfigurationError, match=r"CORETASK_RETRYS \(did you mean CORETASK_RETRIES\?\)"):
        options_from_config({"CORETASK_RETRYS": 3})
    # And a bad value fails as Options would, naming the option
    with pytest.raises(ConfigurationError, match="CORETASK_PROCESSES: Options.processes"):
        options_from_config({"CORETASK_PROCESSES": 0})
    # And values read from the environment as text are taken as what they say
    text = options_from_config({"CORETASK_CLUSTER": "false", "CORETASK_DEADLETTER": "no", "CORETASK_EAGER": "True",
                                "CORETASK_PROCESSES": "3", "CORETASK_THREADS": " 12 ", "CORETASK_TIMEOUT": "30",
                                "CORETASK_RESULT_TTL": "2.5"})
    assert (text.cluster, text.deadletter, text.eager, text.processes, text.max_workers) == (False, False, True, 3, 12)
    assert (text.timeout.total_seconds(), text.result_ttl.total_seconds()) == (30, 2.5)
    with pytest.raises(ConfigurationError, match="Options.cluster must be True or False, got 'maybe'"):
        options_from_config({"CORETASK_CLUSTER": "maybe"})
    # And two keys for one option (an alias and the name) are refused, not decided by their order
    with pytest.raises(ConfigurationError, match="CORETASK_THREADS and CORETASK_MAX_WORKERS both set "
                                                 "Options.max_workers: keep one of them"):
        options_from_config({"CORETASK_THREADS": 4, "CORETASK_MAX_WORKERS": 8})
    with pytest.raises(ConfigurationError, match="both set Options.redis"):
        options_from_config({"CORETASK_REDIS": "redis://a:1/0", "CORETASK_REDIS_URL": "redis://b:1/0"})


def _app(url: str, prefix: str, cluster: bool, **config) -> Flask:
    app = Flask("shop")
    app.config.update(CORETASK_REDIS_URL=url, CORETASK_PREFIX=prefix, CORETASK_CLUSTER=cluster,
                      GREETING="hello", **{f"CORETASK_{k.upper()}": v for k, v in FAST.items()}, **config)
    return app


def test_tasks_run_inside_the_app_context_and_the_extension_acts_as_the_processor(server, prefix, embedded_worker):
    # Given an app with the extension, configured from app.config only
    app = _app(server.url, prefix, server.cluster)
    ext = CoreTask(app)
    processor = ext.processor_for(app)
    assert isinstance(processor, TaskProcessor) and processor.options.prefix == prefix
    key = f"{prefix}:out"

    # When a view enqueues through the extension and a worker runs the tasks
    @app.post("/go")
    def go():  # type: ignore[no-untyped-def]
        return {"task": ext.enqueue_task("default", "acme", record_app_name, key)}

    client = app.test_client()
    task_ids = [client.post("/go").get_json()["task"] for _ in range(3)]
    embedded_worker(processor)

    # Then each task saw the app through current_app (no "working outside of application context")
    r = server.client()
    wait_until(lambda: r.llen(key) == 3, 20, "3 tasks ran")
    assert r.lrange(key, 0, -1) == [b"shop:hello"] * 3
    assert all(ext.get_task(t) is None or ext.get_task(t).state != "dead" for t in task_ids)


def test_flask_cli_mirrors_the_coretask_commands(server, prefix):
    # Given an app with the extension
    app = _app(server.url, prefix, server.cluster)
    ext = CoreTask(app)
    runner = app.test_cli_runner()

    # When pause / status / resume run as flask commands
    result = runner.invoke(args=["coretask", "pause"])
    # Then they act on the app's processor, as python -m coretask would
    assert result.exit_code == 0, result.output
    assert ext.processor_for(app).is_paused
    status = runner.invoke(args=["coretask", "status", "--json"])
    assert status.exit_code == 0 and '"paused": true' in status.output, status.output
    assert runner.invoke(args=["coretask", "resume"]).exit_code == 0
    assert not ext.processor_for(app).is_paused
    # And the command list is the CLI's (one parser owns the arguments)
    listing = runner.invoke(args=["coretask", "--help"]).output
    for name in ("worker", "status", "batch", "cancel", "dead", "task", "tenants", "trigger", "dashboard", "metrics"):
        assert f"  {name}" in listing, listing
    # And a bad argument is reported by that parser with its usage, not a traceback
    bad = runner.invoke(args=["coretask", "batches"])
    assert bad.exit_code == 2 and "tenant" in bad.output


def test_flask_commands_refuse_an_eager_app():
    # Given an app whose processor runs in eager mode (nothing of it is in Redis)
    app = Flask("tests")
    app.config.update(CORETASK_EAGER=True)
    CoreTask(app)
    runner = app.test_cli_runner()
    # Then the admin commands refuse, exit 2, instead of pausing nothing and saying they did
    for args in (["coretask", "pause"], ["coretask", "status"]):
        res = runner.invoke(args=args)
        assert res.exit_code == 2 and "eager mode" in res.output, (args, res.output)
    # and so does the worker's loader
    from coretask.flask import load_from_flask
    with pytest.raises(ConfigurationError, match="eager mode"):
        with app.app_context():
            load_from_flask("tests.test_flask:eager_app")


def eager_app() -> Flask:
    app = Flask("eager")
    app.config.update(CORETASK_EAGER=True)
    CoreTask(app)
    return app


def test_flask_coretask_worker_runs_a_factory_app_that_imports_current_app(server, prefix):
    import json
    import os
    import subprocess
    import sys

    from tests import flask_factory_app
    from tests.conftest import ROOT

    # Given a factory-only app module that imports current_app at module level
    env = dict(os.environ, PYTHONPATH=str(ROOT), FACTORY_APP_REDIS_URL=server.url, FACTORY_APP_PREFIX=prefix,
               FACTORY_APP_CLUSTER="1" if server.cluster else "0", FACTORY_APP_OPTIONS=json.dumps(FAST))
    key = f"{prefix}:factory-out"
    os.environ.update({k: env[k] for k in env if k.startswith("FACTORY_APP_")})   # the same app, here
    try:
        app = flask_factory_app.create_app()
    finally:
        for k in [k for k in os.environ if k.startswith("FACTORY_APP_")]:
            del os.environ[k]
    with app.app_context():
        flask_factory_app.coretask.enqueue_task("default", "acme", flask_factory_app.record_app_name, key)
    # When `flask coretask worker` runs it
    worker = subprocess.Popen([sys.executable, "-m", "flask", "--app", "tests.flask_factory_app", "coretask", "worker",
                               "--processes", "1", "--threads", "1"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        r = server.client()
        # Then the worker starts (the proxy is not taken for an app of its own) and the task runs in the app
        wait_until(lambda: r.llen(key) == 1 or worker.poll() is not None, 30, "the task ran")
        assert worker.poll() is None, worker.communicate()[0]
        assert r.lrange(key, 0, -1) == [b"factory-shop"]
    finally:
        worker.terminate()
        out = worker.communicate(timeout=30)[0]
    assert worker.returncode == 0, out


def test_an_app_built_per_test_is_freed_with_its_processor_and_close_releases_it_at_once(server, prefix):
    # Given one module-level extension, as in an app factory, and apps built and dropped in turn
    ext = CoreTask()
    refs = []
    for i in range(5):
        app = _app(server.url, f"{prefix}{i}", server.cluster)
        ext.init_app(app)
        with app.app_context():
            ext.enqueue_task("default", "acme", record_app_name, f"{prefix}:out")
        refs.append((weakref.ref(app), weakref.ref(ext.processor_for(app))))
        del app
    # Then nothing keeps a dropped app, its processor or its connections alive (the extension
    # held every app it was given, and its processor)
    gc.collect()
    assert [(a(), p()) for a, p in refs] == [(None, None)] * 5
    # And close() releases an app's processor at once, and unbinds it
    app = _app(server.url, prefix, server.cluster)
    ext.init_app(app)
    processor = ext.processor_for(app)
    processor.get_queues()
    ext.close(app)
    with pytest.raises(ConfigurationError, match="not bound to this app"):
        ext.processor_for(app)


def test_outside_an_app_context_the_one_bound_app_is_used_and_two_are_refused(server, prefix):
    ext = CoreTask()
    first = _app(server.url, prefix + "a", server.cluster)
    ext.init_app(first)
    assert ext.processor.options.prefix == prefix + "a"
    second = _app(server.url, prefix + "b", server.cluster)
    ext.init_app(second)
    with pytest.raises(ConfigurationError, match="bound to 2 apps and no app context is active.*processor_for\\(app\\)"):
        ext.processor
    with second.app_context():
        assert ext.processor.options.prefix == prefix + "b"
    assert ext.processor_for(first).options.prefix == prefix + "a"
    ext.close(first)
    ext.close(second)
