"""coretask: reliable background tasks for synchronous Python on Redis, Valkey and ElastiCache.

Delivery contract: at least once — a task may run twice if its worker dies mid-task, never zero
times once ``enqueue_task`` has returned.
"""
from __future__ import annotations

from .batch import BatchBuilder
from .processor import TaskProcessor
from .context import TaskContext
from .encoding import Call, Serializer, TaskData, call
from .errors import (ConfigurationError, CoreTaskError, EnqueueError, LeaseLost, PayloadTooLarge,
                     ReplicationError, ScriptError, SerializationError, StoreError, StoreFull, StoreUnavailable,
                     ResultPending, ResultUnavailable, TargetError, TaskCanceled, TaskFailed, TaskLoadError,
                     TaskRefused, TaskTimeout, UnknownOption)
from .middleware import Middleware
from .models import BatchInfo, DeadTask, Progress, QuarantinedTask, QueueInfo, TaskInfo, WorkerState, HistoryPoint
from .options import Options
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
    # errors
    "CoreTaskError", "ConfigurationError", "EnqueueError", "SerializationError", "TargetError",
    "PayloadTooLarge", "TaskLoadError", "TaskRefused", "StoreError", "StoreFull", "ScriptError", "LeaseLost",
    "TaskCanceled", "ReplicationError", "StoreUnavailable", "UnknownOption", "TaskTimeout", "TaskFailed",
    "ResultUnavailable", "ResultPending",
]
