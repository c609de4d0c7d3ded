"""The one exception hierarchy of coretask.

Everything coretask raises on purpose derives from :class:`CoreTaskError`, so callers can catch
the library's errors in one clause, except the abort raised inside a running task
(:class:`TaskCanceled`), which is a ``BaseException`` so that ``except Exception`` in task code
does not swallow it. Errors about bad input also derive from the built-in
``TypeError``/``ValueError`` they would be in plain Python, so ``except ValueError`` still works.

::

    CoreTaskError
    ├── ConfigurationError (ValueError)   an option or CLI flag has a value it cannot take
    │   └── UnknownOption (TypeError)     Options(retrys=3): names the option meant, if close
    ├── EnqueueError                      a task was refused before anything was written
    │   ├── SerializationError (TypeError)   an argument the serializer cannot carry
    │   ├── TargetError (ValueError)          a callable that cannot be recorded by reference
    │   └── PayloadTooLarge (ValueError)      an encoded call over max_payload_bytes
    ├── TaskLoadError                     a stored task cannot be turned back into a call
    │   │                                 (module gone, payload corrupted); dead-lettered
    │   └── TaskRefused                   a stored task failed a security check before it was
    │                                     read (signature, tenant, refused target); dead-lettered
    ├── StoreError                        Redis refused a coretask operation
    │   ├── StoreUnavailable              Redis cannot be reached (connection refused, reset or
    │   │                                 timed out), or kept refusing a call for longer than
    │   │                                 Options.busy_timeout (LOADING, BUSY, MISCONF, TRYAGAIN,
    │   │                                 CLUSTERDOWN ...); ``reason`` says which, the message
    │   │                                 names the URL (password masked) and what to do
    │   ├── StoreFull                     Redis hit maxmemory (OOM); nothing was half-written
    │   ├── ScriptError                   a Lua script failed (a bug: please report it)
    │   └── ReplicationError              Options.wait_replicas: the write is on the master but
    │                                     fewer replicas than asked acknowledged it in time
    ├── LeaseLost                         the worker no longer holds the task (ctx.extend_lock)
    ├── TaskFailed                        get_result: the task failed for good (type, message
    │                                     and traceback of its last error; a time-out too)
    └── ResultUnavailable (LookupError)   get_result: no result to give (unknown task, not kept,
        ├── ResultCanceled                or expired); ResultCanceled: the task was canceled;
        └── ResultPending                 ResultPending: not finished yet

    BaseException
    └── TaskCanceled                      control flow: raised inside a running task that (or
        │                                 whose batch) was canceled or that is being handed back;
        │                                 never retried, never dead-lettered
        └── TaskTimeout                   raised inside a task past its time limit (timeout=);
                                          unlike a cancel, the attempt counts as failed

Connection problems (redis-py's ``ConnectionError`` / ``TimeoutError``) surface as
:class:`StoreUnavailable`, with redis-py's exception as its ``__cause__``: they are transient,
and a worker keeps retrying on its own; a producer decides whether to try again. So do replies by
which a server refuses a call for now (LOADING, BUSY, MISCONF, TRYAGAIN, CLUSTERDOWN, ...), once
they have lasted longer than ``Options.busy_timeout``; until then the call is retried.
"""
from __future__ import annotations

__all__ = [
    "CoreTaskError", "ConfigurationError", "EnqueueError", "SerializationError", "TargetError",
    "PayloadTooLarge", "TaskLoadError", "TaskRefused", "StoreError", "StoreFull", "ScriptError", "LeaseLost",
    "TaskCanceled", "ReplicationError", "StoreUnavailable", "UnknownOption", "TaskTimeout", "TaskFailed",
    "ResultUnavailable", "ResultPending", "ResultCanceled",
]


class CoreTaskError(Exception):
    """Root of every error coretask raises on purpose."""


class ConfigurationError(CoreTaskError, ValueError):
    """An option has a value it cannot take; the message names the option and what is allowed."""


class UnknownOption(ConfigurationError, TypeError):
    """A keyword that is not an option (``Options(retrys=3)``); the message names the option it
    resembles. Also a TypeError, as an unknown keyword argument is in plain Python."""


class EnqueueError(CoreTaskError):
    """A task was refused at enqueue; nothing was written to Redis."""


class SerializationError(EnqueueError, TypeError):
    """An argument cannot be carried by the configured serializer."""


class TargetError(EnqueueError, ValueError):
    """The callable cannot be recorded by reference (lambda, local function, not importable)."""


class PayloadTooLarge(EnqueueError, ValueError):
    """The encoded call is larger than ``Options.max_payload_bytes``."""


class TaskLoadError(CoreTaskError):
    """A stored task cannot be turned back into a call; it is dead-lettered, never retried."""


class TaskRefused(TaskLoadError):
    """A stored task failed a check made before its payload is decoded or its module imported:
    a missing or wrong signature (``Options.signing_key``), a task found in another tenant's
    queue than the one it was signed for, or a target on the deny-list or outside
    ``Options.allowed_modules``. It is dead-lettered with the reason, never run or retried."""


class StoreError(CoreTaskError):
    """Redis refused a coretask operation."""


class StoreUnavailable(StoreError):
    """Redis cannot serve coretask now. ``reason`` says why:

    - ``"unreachable"``: the connection was refused, reset or timed out (redis-py's
      ConnectionError or TimeoutError, kept as ``__cause__``);
    - ``"loading"``, ``"busy"``, ``"misconf"``, ``"tryagain"``, ``"ask"``, ``"moved"``,
      ``"clusterdown"``, ``"masterdown"``: the server answered with that refusal (LOADING,
      BUSY, ...) for longer than ``Options.busy_timeout``; it did not run the call
      (coretask/gateway/refusals.py explains each one);
    - ``"auth"``: the server refused the client's credentials (a wrong or missing user name or
      password in the URL): no retry mends it, so a worker manager that meets it at start
      exits with the message instead of waiting.

    ``url`` is the server's URL with its password masked; ``shard`` the shard that failed
    (Options.shards above 1), None otherwise. Transient by nature otherwise: a worker keeps
    retrying on its own; a producer decides whether to try again."""

    def __init__(self, message: str, *, url: str = "", reason: str = "unreachable", shard: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason
        self.shard = shard


class StoreFull(StoreError):
    """Redis reached maxmemory; the operation was rejected as a whole."""


class ScriptError(StoreError):
    """A coretask Lua script failed."""


class ReplicationError(StoreError):
    """With ``Options.wait_replicas``: the write was applied by the master, but WAIT saw fewer
    replicas acknowledge it than required within ``wait_timeout``. The write is not undone; it may
    be lost if the master fails before replicating it. ``task_id`` / ``batch_id`` name what was
    written when the operation created one."""

    def __init__(self, message: str, *, acknowledged: int, required: int,
                 task_id: str | None = None, batch_id: str | None = None) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged
        self.required = required
        self.task_id = task_id
        self.batch_id = batch_id


class LeaseLost(CoreTaskError):
    """The task's lease expired or was taken over; this worker may no longer act for it."""


class TaskCanceled(BaseException):
    """Raised inside a running task to abort it: the task or its batch was canceled, a pause with
    requeue or a shutdown hands it back. A ``BaseException``, as asyncio's ``CancelledError``
    and ``KeyboardInterrupt`` are, so that the ``except Exception:`` of a loop that logs a bad
    row and goes on does not swallow it: a swallowed abort ran on until ``cancel_grace`` ended
    the whole worker process, handing back the other tasks it ran. Clean up in ``try/finally``
    (or catch it by name and raise it again). Outside tasks, ``get_result`` answers a canceled
    task with :class:`ResultCanceled`, an ordinary exception."""


class TaskTimeout(TaskCanceled):
    """Raised inside a task that ran past its time limit (``timeout=``), as a cancel aborts it:
    clean-up written for an abort runs for it too. Unlike a cancel, the attempt counts as
    failed and is retried or dead-lettered as any failure is; ``get_result`` then raises
    :class:`TaskFailed` with ``error_type == "TaskTimeout"``."""


class TaskFailed(CoreTaskError):
    """``get_result``: the task failed for good (retries exhausted, or never retried). Carries
    the last attempt's error as stored: ``error_type``, ``error_message``, ``traceback``."""

    def __init__(self, message: str, *, task_id: str, error_type: str, error_message: str,
                 traceback: str) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback


class ResultUnavailable(CoreTaskError, LookupError):
    """``get_result`` has nothing to return: the task is unknown, its record expired, or it was
    not asked to keep its result (``keep_result=`` / ``Options.result_ttl``)."""


class ResultCanceled(ResultUnavailable):
    """``get_result``: the task was canceled (by cancel_task, or with its batch); it has no
    result."""


class ResultPending(ResultUnavailable):
    """``get_result``: the task has not finished yet (or the wait ended first)."""
