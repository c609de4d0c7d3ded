"""Producer: what every enqueue path shares (single tasks, batches, schedules): turning a call
into a checked, encoded, signed task description. Pure Python, no Redis: the callers hand the
result to the gateway."""
from __future__ import annotations

import functools
import inspect
import math
import time
from datetime import datetime, timedelta
from typing import Any

from .encoding import Call, Encoded, TaskData, encode, serializer_for, with_headers
from .errors import ConfigurationError
from .gateway import NO_CONTROLS, Controls
from .middleware import Chain
from .options import Options
from .signing import Signer, signer_for, unsigned_pickle_problem

__all__ = ["Producer"]

EPOCH_FLOOR = 946684800      # 2000-01-01T00:00:00Z: a smaller number was meant as seconds from now
EPOCH_CEILING = 7_258_118_400   # 2200-01-01: a larger number is not epoch seconds (epoch ms, most likely)
MAX_KEY = 1000               # characters of an idempotency key (enqueue_task(key=...))


class Producer:
    """Encoding, size limit, allow-list, signing and option checks for one Options, and the
    middleware that sees every enqueue (``chain.before_enqueue`` / ``after_enqueue``)."""

    def __init__(self, options: Options, chain: Chain | None = None) -> None:
        self.options = options
        self.chain = chain if chain is not None else Chain.from_options(options)
        self.serializer = serializer_for(options.serializer)
        self.signer: Signer | None = signer_for(options)              # None: payloads go unsigned
        self._unsigned_pickle = unsigned_pickle_problem(options)     # set: refuse to enqueue

    def as_call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | TaskData:
        if isinstance(fn, (Call, TaskData)):
            if args or kwargs:
                raise ConfigurationError(f"{type(fn).__name__} already carries its arguments; pass none besides it")
            return fn
        return Call(fn, args, kwargs)

    def encode(self, call: Call | TaskData) -> Encoded:
        """encode() with this processor's serializer, size limit and allow-list; refuses a pickle
        serializer without a signing key (see coretask.signing)."""
        if self._unsigned_pickle and not isinstance(call, TaskData):
            raise ConfigurationError(f"enqueue refused: {self._unsigned_pickle}")
        return encode(call, self.serializer, self.options.max_payload_bytes,
                      self.options.allowed_modules)  # type: ignore[arg-type]

    def with_headers(self, enc: Encoded, headers: dict[str, str]) -> Encoded:
        """``enc`` carrying the headers middleware added (trace context), size limit checked again."""
        enc = with_headers(enc, headers)
        if len(enc.payload) > self.options.max_payload_bytes:
            from .errors import PayloadTooLarge
            raise PayloadTooLarge(f"the encoded call to {enc.target} with its headers is {len(enc.payload)} bytes, "
                                  f"over max_payload_bytes={self.options.max_payload_bytes}")
        return enc

    def encode_call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Encoded:
        return self.encode(self.as_call(fn, args, kwargs))

    @staticmethod
    def check_clash(call: str, fn: Any, args: tuple[Any, ...], options: dict[str, Any]) -> None:
        """Refuse an enqueue option passed to a call whose task has a parameter of that name
        that ``args`` leave unfilled (``timeout``, most often): which of the two was meant cannot
        be told, and taking the option would run the task with its own default without a word."""
        passed = [name for name, value in options.items() if value is not None]
        if not passed or isinstance(fn, (Call, TaskData)):
            return
        positional, keywords = _parameters(fn)
        clash = [name for name in passed if name in keywords and name not in positional[:len(args)]]
        if clash:
            name = getattr(fn, "__qualname__", None) or repr(fn)
            names = " and ".join(repr(n) for n in clash)
            raise ConfigurationError(
                f"{name} has a parameter named {names}, which {call} also takes as its own option "
                f"({', '.join(n + '=' for n in clash)}): which one was meant cannot be told. To pass it to the task, "
                f"wrap the call: {call}(..., coretask.call({name}, ..., {clash[0]}=...)); the enqueue's own "
                "options go after the call")

    def sign(self, task_id: str, tenant: str, queue: str, enc: Encoded) -> str:
        """The task's signature (field sg), or "" when Options.signing_key is not set."""
        return self.signer.sign_task(task_id, tenant, queue, enc) if self.signer else ""

    def sign_schedule(self, schedule_id: str, tenant: str, queue: str, enc: Encoded) -> str:
        return self.signer.sign_schedule(schedule_id, tenant, queue, enc) if self.signer else ""

    def retries(self, retries: int | None) -> int:
        if retries is None:
            return self.options.retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, got {retries!r}")
        return retries

    def controls(self, timeout: timedelta | float | None = None,
                 keep_result: timedelta | float | None = None) -> Controls:
        """A task's time limit, result keeping and record retention in ms (records.py Controls):
        its own ``timeout`` / ``keep_result`` (a timedelta or seconds) or the Options' defaults
        (timeout, result_ttl, task_retention)."""
        o = self.options
        to = _ms("timeout", timeout if timeout is not None else o.timeout)
        kr = _ms("keep_result", keep_result if keep_result is not None else o.result_ttl)
        kt = _ms("task_retention", o.task_retention)
        return Controls(to, kr, kt) if to or kr or kt else NO_CONTROLS

    @staticmethod
    def idempotency(key: str | None, key_ttl: timedelta | float | None) -> tuple[str, int]:
        """An idempotency key and its key_ttl as the scripts take them: (key, ms); ("", 0) for
        no key. ``key_ttl``: a timedelta or seconds; None keeps the key only while its task lives."""
        if key is None:
            if key_ttl is not None:
                raise ConfigurationError("key_ttl is given without a key")
            return "", 0
        if not isinstance(key, str) or not key or len(key) > MAX_KEY:
            raise ConfigurationError(f"key must be a non-empty string of at most {MAX_KEY} characters, got "
                                     f"{key!r:.80}" + (f" ({len(key)} characters)" if isinstance(key, str) else ""))
        return key, _ms("key_ttl", key_ttl)

    @staticmethod
    def due_ms(delay_until: datetime | timedelta | float | None) -> int:
        """The due time as the scripts take it: epoch ms, 0 for at once, or, for a timedelta,
        minus the delay in ms: the script adds it to the server's clock, so a producer whose
        clock is off still delays by exactly the duration asked for."""
        if delay_until is None:
            return 0
        # rounded up: a due time between two milliseconds must not let the task start early
        if isinstance(delay_until, timedelta):
            return -math.ceil(delay_until.total_seconds() * 1000) if delay_until > timedelta(0) else 0
        if isinstance(delay_until, datetime):
            if delay_until.tzinfo is None or delay_until.utcoffset() is None:
                # read in this machine's zone: datetime.utcnow() + 1 minute would be hours late
                raise ConfigurationError(
                    f"delay_until={delay_until!r} has no time zone, so the time it names depends on the "
                    "producer's zone; pass an aware datetime, e.g. datetime.now(timezone.utc) + "
                    "timedelta(minutes=5), or a timedelta from now")
            return math.ceil(delay_until.timestamp() * 1000)
        if isinstance(delay_until, (int, float)) and not isinstance(delay_until, bool):
            if not math.isfinite(delay_until):
                raise ConfigurationError(f"delay_until={delay_until!r} is not a time; pass a timedelta from now, "
                                         "an aware datetime or epoch seconds")
            if delay_until < EPOCH_FLOOR:
                # 30 meant "in 30 seconds", not 00:00:30 on 1 January 1970 (it would run at once)
                raise ConfigurationError(
                    f"delay_until={delay_until!r} is not an epoch time (it is before the year 2000); for a "
                    f"delay from now pass a timedelta, e.g. delay_until=timedelta(seconds={delay_until!r}), "
                    "or an aware datetime")
            if delay_until > EPOCH_CEILING:
                raise ConfigurationError(
                    f"delay_until={delay_until!r} is not epoch seconds (it is after the year 2200); epoch "
                    f"milliseconds? pass delay_until={delay_until!r} / 1000, or a timedelta from now")
            return math.ceil(delay_until * 1000)
        raise ConfigurationError(f"delay_until must be a datetime, timedelta or epoch seconds, got {delay_until!r}")

    @staticmethod
    def due_epoch_ms(due_ms: int) -> int:
        """A due_ms value as epoch ms on this machine's clock (for middleware messages): a
        relative delay is shown from now; the stored due time is the server's."""
        return math.ceil(time.time() * 1000) - due_ms if due_ms < 0 else due_ms


def _ms(name: str, value: timedelta | float | None) -> int:
    """A positive duration (timedelta or seconds) in ms, rounded up; 0 for None."""
    if value is None:
        return 0
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(f"{name} must be a timedelta or seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        shown = f"{seconds:g} seconds" if isinstance(value, timedelta) else repr(value)   # not days=-1, ...
        raise ConfigurationError(f"{name} must be positive, got {shown}")
    return max(math.ceil(seconds * 1000), 1)


@functools.lru_cache(maxsize=4096)
def _parameter_names(fn: Any) -> tuple[tuple[str, ...], frozenset[str]]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):         # built-ins Python cannot read: no names to clash with
        return (), frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return (tuple(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, kinds[0])),
            frozenset(p.name for p in params if p.kind in kinds))


def _parameters(fn: Any) -> tuple[tuple[str, ...], frozenset[str]]:
    """``fn``'s positional parameters in order, and the names it takes as keywords (cached:
    read on every enqueue that passes an option)."""
    try:
        return _parameter_names(fn)
    except TypeError:                        # unhashable callable
        return _parameter_names.__wrapped__(fn)
