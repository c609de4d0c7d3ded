"""Flask integration: ``CoreTask(app)`` or ``CoreTask().init_app(app)``.

What it adds over a bare TaskProcessor, for a Flask app:

- configuration from ``app.config``: every ``CORETASK_<OPTION>`` key sets the Options field of
  that name (``CORETASK_REDIS_URL`` -> ``redis``, ``CORETASK_THREADS`` -> ``max_workers``,
  ``CORETASK_QUEUES`` may be a comma-separated string); an unknown key is an error that names the
  option it probably meant, at start-up rather than at the first enqueue;
- tasks run inside ``app.app_context()`` (``current_app``, ``g`` and extensions bound to the app
  work in task code), pushed by a middleware that is the outermost layer, so every other
  middleware and hook sees the context too;
- ``flask coretask worker | status | pause | resume | ...``: the same commands as
  ``python -m coretask`` and ``python -m coretask.worker``, with the processor taken from the app
  instead of ``--app MODULE:ATTRIBUTE``. The worker's processes rebuild the app the way the
  ``flask`` command found it (``--app`` / ``FLASK_APP`` / ``app.py``), so an app factory works.

Flask is an optional dependency (``pip install coretask[flask]``): this module is the only one
that imports it, and nothing in coretask imports this module.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import threading
import weakref
from typing import Any

try:
    import click
    from flask import Flask
    from flask.cli import AppGroup, ScriptInfo, with_appcontext
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("coretask.flask needs Flask: pip install 'coretask[flask]'") from exc

from .appload import refuse_eager
from .errors import ConfigurationError
from .middleware import Middleware
from .options import Options, queue_list
from .processor import TaskProcessor

__all__ = ["CoreTask", "AppContextMiddleware", "options_from_config"]

CONFIG_PREFIX = "CORETASK_"
# config keys whose name is not the Options field's, and keys read by other parts of coretask
ALIASES = {"REDIS_URL": "redis", "THREADS": "max_workers"}
RESERVED = ("DASHBOARD_",)   # CORETASK_DASHBOARD_* belong to the dashboard command
_FIELDS = {f.name for f in dataclasses.fields(Options)}


_TYPES = {f.name: str(f.type) for f in dataclasses.fields(Options)}
NOT_EAGER = "run the commands with CORETASK_EAGER off (eager mode is for tests)"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_text(field: str, value: Any) -> Any:
    """A yes/no, whole-number or seconds option given as text (a config read from the
    environment) as its value; anything else as given, for Options to accept or refuse by name."""
    if not isinstance(value, str):
        return value
    kind, text = _TYPES[field], value.strip().lower()
    if kind == "bool" and text in _TRUE + _FALSE:
        return text in _TRUE
    if kind in ("int", "int | None") and text.lstrip("-").isdigit():
        return int(text)
    if kind in ("timedelta", "timedelta | None"):     # seconds, as Options takes a number
        try:
            return float(text)
        except ValueError:
            return value
    return value


def options_from_config(config: Any, **overrides: Any) -> Options:
    """Options from the ``CORETASK_*`` keys of a Flask config (keyword overrides win)."""
    given: dict[str, Any] = {}
    source: dict[str, str] = {}         # field -> the key that set it
    unknown: list[str] = []
    for key, value in config.items():
        if not key.startswith(CONFIG_PREFIX):
            continue
        name = key[len(CONFIG_PREFIX):]
        if name.startswith(RESERVED):
            continue
        field = ALIASES.get(name, name.lower())
        if field not in _FIELDS:
            unknown.append(key)
            continue
        if field in source:     # CORETASK_THREADS and CORETASK_MAX_WORKERS: which one holds would be chance
            raise ConfigurationError(f"{source[field]} and {key} both set Options.{field}: keep one of them")
        if field == "queues" and isinstance(value, str):
            value = [q.strip() for q in value.split(",") if q.strip()]
        given[field] = _from_text(field, value)
        source[field] = key
    if unknown:
        keys = sorted(f"{CONFIG_PREFIX}{n.upper()}" for n in _FIELDS) + [CONFIG_PREFIX + a for a in ALIASES]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ConfigurationError(
            f"unknown coretask config key(s): {', '.join(hints)}; a CORETASK_<NAME> key sets "
            f"Options.<name> (see coretask.Options), plus CORETASK_REDIS_URL and CORETASK_THREADS")
    given.update(overrides)
    try:
        return Options(**given)
    except ConfigurationError as exc:      # name the config key the value came from
        keys = [key for field, key in source.items() if field not in overrides and f"Options.{field} " in str(exc)]
        if keys:
            raise ConfigurationError(f"{keys[0]}: {exc}") from None
        raise


class AppContextMiddleware(Middleware):
    """Runs each task inside ``app.app_context()``.

    The context is pushed in ``before_task`` and popped in ``after_task``, which the chain calls
    once per ``before_task`` whatever happened, in the task's own thread; a thread-local stack
    keeps nested runs (eager tasks enqueued from a task) paired.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._local = threading.local()

    def before_task(self, ctx: Any) -> None:
        stack = self._local.__dict__.setdefault("stack", [])
        app_ctx = self.app.app_context()
        app_ctx.push()
        stack.append(app_ctx)

    def after_task(self, ctx: Any, outcome: Any, result: Any, error: Any) -> None:
        stack = self._local.__dict__.get("stack")
        if stack:
            stack.pop().pop()


PROCESSOR_KEY = "coretask.processor"    # app.extensions: the app's own TaskProcessor


class CoreTask:
    """The Flask extension. ``coretask = CoreTask(app)``, or ``CoreTask()`` then ``init_app(app)``
    in an app factory.

    It builds one TaskProcessor per app, kept on the app (``app.extensions``), never on the
    extension: the extension is a module global that outlives the apps a test suite builds one
    per test, and would keep each app, its processor and its connections alive. Attribute access
    falls through to the processor, so ``coretask.enqueue_task(...)``, ``coretask.batch(...)``
    and ``coretask.get_batch(...)`` work as on a processor. Options given as keywords win over
    config.
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self._options = options
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        options = options_from_config(app.config, **self._options)
        options = options.replace(middleware=[AppContextMiddleware(app), *options.middleware])
        app.extensions[PROCESSOR_KEY] = TaskProcessor(options)
        app.extensions["coretask"] = self
        self._apps.add(app)
        app.cli.add_command(_cli_group(self))

    def processor_for(self, app: Flask | None = None) -> TaskProcessor:
        """The processor of ``app``; by default the current app's, or, outside an app context,
        the one app this extension is bound to (with several, which one is ambiguous: refused)."""
        if app is None:
            from flask import current_app, has_app_context

            if has_app_context():
                app = current_app._get_current_object()  # type: ignore[attr-defined]
            else:
                apps = list(self._apps)
                if len(apps) > 1:
                    raise ConfigurationError(
                        f"CoreTask is bound to {len(apps)} apps and no app context is active, so which app's "
                        "processor is meant is ambiguous: use coretask.processor_for(app), or run inside "
                        "`with app.app_context():`")
                app = apps[0] if apps else None
        processor = app.extensions.get(PROCESSOR_KEY) if app is not None else None
        if processor is None or app not in self._apps:
            raise ConfigurationError("CoreTask is not bound to this app: call CoreTask(app) or init_app(app) first")
        return processor

    @property
    def processor(self) -> TaskProcessor:
        return self.processor_for()

    def close(self, app: Flask | None = None) -> None:
        """Close the processor of ``app`` (default: as ``processor_for``) and unbind the app: its
        connections are released now rather than when the app is garbage-collected (a test
        fixture's teardown)."""
        processor = self.processor_for(app)
        for bound in list(self._apps):
            if bound.extensions.get(PROCESSOR_KEY) is processor:
                self._apps.discard(bound)
                del bound.extensions[PROCESSOR_KEY]
        processor.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.processor_for(), name)


def load_from_flask(app_import_path: str | None) -> TaskProcessor:
    """What each worker process calls to get its processor: build the Flask app as the ``flask``
    command found it and take the extension's processor (picklable through functools.partial)."""
    app = ScriptInfo(app_import_path=app_import_path).load_app()
    # Flask's app finder, run while the flask command's app context is active, takes a module's
    # imported ``current_app`` for a Flask instance (a factory-only module has no other): the
    # proxy stands for the app the command made, which is the one the extension knows
    app = getattr(app, "_get_current_object", lambda: app)()
    ext = app.extensions.get("coretask")
    if not isinstance(ext, CoreTask):
        raise ConfigurationError(f"the Flask app {app.name!r} has no CoreTask extension: call CoreTask(app)")
    return refuse_eager(ext.processor_for(app), f"the Flask app {app.name!r}", NOT_EAGER)


def _cli_group(ext: CoreTask) -> click.Group:
    from . import cli

    group = AppGroup("coretask", help="coretask: run workers, inspect and steer processing.")

    @group.command("worker", help="run the worker manager (as python -m coretask.worker)")
    @click.option("--queues", help="comma-separated queues in priority order")
    @click.option("--processes", type=int, help="worker processes")
    @click.option("--threads", type=int, help="threads per process")
    @click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
    @click.option("--log-format", default="text", type=click.Choice(["text", "json"]),
                  help="json: one JSON object per line (coretask/logs.py)")
    @click.option("--metrics-port", type=int, help="serve the worker processes' Prometheus metrics on this port")
    @click.option("--metrics-addr", default="0.0.0.0", help="address of the metrics endpoint")
    @click.option("--metrics-dir", help="multiprocess directory (emptied at start)")
    @click.pass_context
    def worker(ctx: click.Context, queues: str | None, processes: int | None, threads: int | None,
               log_level: str, log_format: str, metrics_port: int | None, metrics_addr: str,
               metrics_dir: str | None) -> None:
        import logging

        from .worker.__main__ import run

        info = ctx.ensure_object(ScriptInfo)
        try:
            names = queue_list(queues)
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from None
        load = functools.partial(_load_with_overrides, info.app_import_path,
                                 {"max_workers": threads, "processes": processes, "queues": names})
        ctx.exit(run(load, log_level=getattr(logging, log_level), log_format=log_format, metrics_port=metrics_port,
                     metrics_addr=metrics_addr, metrics_dir=metrics_dir))

    for name, text in cli.command_help().items():
        group.add_command(_passthrough(ext, name, text))
    return group


def _load_with_overrides(app_import_path: str | None, overrides: dict[str, Any]) -> TaskProcessor:
    from .appload import with_overrides

    return with_overrides(load_from_flask(app_import_path), **overrides)


def _passthrough(ext: CoreTask, name: str, text: str) -> click.Command:
    """``flask coretask NAME ARGS...`` runs ``python -m coretask NAME ARGS...`` on the app's
    processor: one parser (coretask.cli) owns the arguments, so the two never drift apart."""

    @click.command(name, help=text, add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @with_appcontext
    def command(args: tuple[str, ...]) -> None:
        from . import cli

        try:
            processor = refuse_eager(ext.processor_for(), "the Flask app", NOT_EAGER)
        except ConfigurationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        sys.exit(cli.main([name, *args], processor=processor))

    return command
