"""Finding the user's TaskProcessor from a ``MODULE:ATTRIBUTE`` string (CLI and child processes)."""
from __future__ import annotations

import difflib
import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .processor import TaskProcessor


def load_processor(app: str) -> TaskProcessor:
    """Import ``module:attribute``; the attribute is a TaskProcessor or a callable returning one.
    The current directory is importable, as for ``python -m``."""
    from .processor import TaskProcessor

    module_name, _, attr = app.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--app must look like MODULE:ATTRIBUTE (e.g. myapp.tasks:processor), got {app!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--app {app}: module {module_name!r} cannot be imported: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"--app {app}: {module_name} has no attribute {attr!r}") from None
    _refuse_flask(app, module_name, obj)
    if not isinstance(obj, TaskProcessor) and callable(obj):
        try:
            obj = obj()
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(f"--app {app}: calling {attr}() to build the TaskProcessor failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
        _refuse_flask(app, module_name, obj)      # an app factory
    if not isinstance(obj, TaskProcessor):
        raise ConfigurationError(f"--app {app} is a {type(obj).__name__}, not a TaskProcessor")
    return refuse_eager(obj, f"--app {app}", "point --app at a processor without eager=True")


def _refuse_flask(app: str, module_name: str, obj: object) -> None:
    """A Flask app or coretask's Flask extension (told by class, without importing Flask): its
    worker starts through Flask's CLI, which builds the app and its config first."""
    for cls in type(obj).__mro__:
        kind = {("flask.app", "Flask"): "a Flask app",
                ("coretask.flask", "CoreTask"): "coretask's Flask extension (CoreTask)"}.get(
                    (cls.__module__, cls.__name__))
        if kind is not None:
            raise ConfigurationError(
                f"--app {app} is {kind}: its worker and commands run through Flask's CLI (`flask --app "
                f"{module_name} coretask worker`, `flask --app {module_name} coretask status`; docs/flask.md), "
                "or point --app at a TaskProcessor (or a function returning one)")


def refuse_eager(processor: TaskProcessor, what: str, fix: str) -> TaskProcessor:
    """``processor``, unless it runs in eager mode: then nothing is in Redis for a worker or the
    admin CLI (a pause would pause nothing and say it did)."""
    if processor.eager is not None:
        raise ConfigurationError(f"{what} runs in eager mode (Options(eager=True)): its tasks run and stay in "
                                 "the process that enqueues them, so a worker or the admin CLI has nothing to work "
                                 f"on; {fix}")
    return processor


def with_overrides(processor: TaskProcessor, **changes: object) -> TaskProcessor:
    """The same processor, or a new one with some options changed (CLI flags win)."""
    from .processor import TaskProcessor

    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return processor
    if "queues" in changes and processor.options.strict_queues:
        _check_served_queues(processor, list(changes["queues"]))  # type: ignore[call-overload]
    return TaskProcessor(processor.options.replace(**changes))


def _check_served_queues(processor: TaskProcessor, queues: list[str]) -> None:
    """``--queues`` naming a queue that is neither in Options.queues nor ever held work: no
    producer of this deployment can feed it (strict_queues refuses it at enqueue), so it is a
    misspelling, refused before a worker waits on it forever. A queue another deployment feeds
    has held work; one that has not yet: strict_queues=False."""
    configured = list(processor.options.queues)
    unknown = [q for q in queues if q not in configured]
    if not unknown:
        return
    try:
        seen = processor.gateway.queue_names()
    except Exception:      # Redis not up: nothing to compare; the worker says so when it meets it
        return
    for queue in unknown:
        if queue not in seen:
            close = difflib.get_close_matches(queue, configured + seen, n=1)
            raise ConfigurationError(
                f"--queues {queue}: queue {queue!r} is not in Options.queues ({', '.join(configured)}) and has "
                f"never held work" + (f"; did you mean {close[0]!r}?" if close else "") + " A queue that other "
                "producers feed: set Options(strict_queues=False), or add it to Options.queues")


def app_loader(app: str, **overrides: object) -> Callable[[], TaskProcessor]:
    """A picklable callable that loads ``app`` and applies the overrides (None values are left
    out): what the worker manager calls, in itself and in every spawned child."""
    return functools.partial(_load_with_overrides, app, {k: v for k, v in overrides.items() if v is not None})


def _load_with_overrides(app: str, overrides: dict[str, object]) -> TaskProcessor:
    return with_overrides(load_processor(app), **overrides)
