"""coretask: reliable background tasks for synchronous Python on Redis, Valkey and ElastiCache.

Delivery contract: at least once — a task may run twice if its worker dies mid-task, never zero
times once ``enqueue_task`` has returned.

The public names below are imported on first use (PEP 562), so that importing a submodule
alone stays cheap: pytest imports the plugin ``coretask.testing`` in every run of a project that
has coretask installed, and that must not cost the whole library (redis-py, the worker) when no
test uses it. ``from coretask import TaskProcessor`` works as always.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import BatchBuilder
    from .context import TaskContext
    from .encoding import Call, Serializer, TaskData, call
    from .errors import (ConfigurationError, CoreTaskError, EnqueueError, LeaseLost, PayloadTooLarge,
                         ReplicationError, ResultCanceled, ResultPending, ResultUnavailable, ScriptError, SerializationError,
                         StoreError, StoreFull, StoreUnavailable, TargetError, TaskCanceled, TaskFailed,
                         TaskLoadError, TaskRefused, TaskTimeout, UnknownOption)
    from .middleware import Middleware
    from .models import (BatchInfo, DeadTask, HistoryPoint, Progress, QuarantinedTask, QueueInfo, ShardInfo, TaskInfo,
                         WorkerState)
    from .options import Options
    from .processor import TaskProcessor
    from .schedules import ScheduleData, ScheduleInfo

__version__ = "0.1.0"

__all__ = [
    # client
    "TaskProcessor", "Options", "BatchBuilder", "TaskContext", "Middleware",
    # schedules
    "ScheduleData", "ScheduleInfo",
    # what can be enqueued
    "call", "Call", "TaskData", "Serializer",
    # introspection views
    "TaskInfo", "QueueInfo", "BatchInfo", "DeadTask", "QuarantinedTask", "Progress", "WorkerState", "HistoryPoint",
    "ShardInfo",
    # errors
    "CoreTaskError", "ConfigurationError", "EnqueueError", "SerializationError", "TargetError",
    "PayloadTooLarge", "TaskLoadError", "TaskRefused", "StoreError", "StoreFull", "ScriptError", "LeaseLost",
    "TaskCanceled", "ReplicationError", "StoreUnavailable", "UnknownOption", "TaskTimeout", "TaskFailed",
    "ResultUnavailable", "ResultPending", "ResultCanceled",
]

# where each public name is defined (the errors: coretask.errors)
_HOME = {"TaskProcessor": "processor", "Options": "options", "BatchBuilder": "batch", "TaskContext": "context",
         "Middleware": "middleware", "ScheduleData": "schedules", "ScheduleInfo": "schedules",
         "call": "encoding", "Call": "encoding", "TaskData": "encoding", "Serializer": "encoding",
         "TaskInfo": "models", "QueueInfo": "models", "BatchInfo": "models", "DeadTask": "models",
         "QuarantinedTask": "models", "Progress": "models", "WorkerState": "models", "HistoryPoint": "models",
         "ShardInfo": "models"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME.get(name, 'errors')}"), name)
    globals()[name] = value          # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
