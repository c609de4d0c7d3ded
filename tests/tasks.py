"""Task functions the tests enqueue. They live in an importable module because workers import
targets by reference. Each records what it did in Redis under a key the test passes."""
from __future__ import annotations

import dataclasses
import enum
import os
import threading
import time
import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import redis

from coretask import TaskContext

_client: Any = None
_client_lock = threading.Lock()


def R() -> Any:
    """One client per process to the server under test, created under a lock: pool threads start
    tasks at the same moment, and a second client built by a racing thread would be dropped and
    its __del__ would close the connection pool that the first one is using."""
    global _client
    with _client_lock:
        if _client is None:
            url = os.environ["CORETASK_TEST_URL"]
            if os.environ.get("CORETASK_TEST_CLUSTER"):
                from redis.cluster import RedisCluster
                _client = RedisCluster.from_url(url)
            else:
                _client = redis.Redis.from_url(url)
        return _client


def record(key: str, value: Any = 1) -> None:
    R().rpush(key, str(value))


def count(key: str) -> None:
    R().incr(key)


def record_pid(key: str, value: Any) -> None:
    R().rpush(key, f"{value}:{os.getpid()}")


def record_start(key: str, value: Any) -> None:
    R().rpush(key, f"{value}:{time.time()}")


def fail_times(key: str, n: int) -> None:
    """Fails the first n attempts, then succeeds; counts attempts in key."""
    attempts = R().incr(key)
    if attempts <= n:
        raise RuntimeError(f"planned failure {attempts} of {n}")
    R().rpush(key + ":ok", attempts)


def always_fail(message: str = "always fails") -> None:
    raise ValueError(message)


def sleep_then_record(key: str, seconds: float, value: Any = 1) -> None:
    R().rpush(key + ":started", value)
    time.sleep(seconds)
    R().rpush(key, value)


def busy(seconds: float) -> None:
    """Pure Python for ``seconds``, in a frame of its own: Python 3.13 may unwind the frame an
    asynchronous exception lands in past its own ``except``/``finally`` (coretask.worker.runner),
    so the tasks that record how they ended loop here, below their handlers."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def spin(key: str, seconds: float) -> None:
    """Pure-Python busy loop: abortable by an asynchronous exception."""
    try:    # the abort may land while the start is being recorded: the test saw it and canceled
        R().rpush(key + ":started", 1)
        busy(seconds)
        R().rpush(key + ":finished", 1)
    finally:
        R().rpush(key + ":left", time.time())


def block(key: str, seconds: float = 60) -> None:
    """Blocked in C (time.sleep): an asynchronous exception cannot land until it returns."""
    R().rpush(key + ":started", os.getpid())
    time.sleep(seconds)
    R().rpush(key + ":finished", 1)


def kill_own_process(key: str) -> None:
    R().incr(key)
    os._exit(17)


def with_context(key: str, ctx: TaskContext) -> None:
    R().rpush(key, f"{ctx.task_id}|{ctx.tenant}|{ctx.queue}|{ctx.attempt}|{ctx.batch_id}|"
                   f"{ctx.batch.total if ctx.batch else ''}")


async def async_record(key: str, value: Any) -> None:
    import asyncio
    await asyncio.sleep(0)
    R().rpush(key, value)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Point:
    x: int
    y: int
    label: str = ""


def typed(key: str, when: datetime, day: date, ident: uuid.UUID, amount: Decimal, color: Color,
          point: Point, points: list[Point], maybe: datetime | None = None) -> None:
    R().rpush(key, repr((type(when).__name__, when.isoformat(), type(day).__name__, type(ident).__name__,
                         str(ident), type(amount).__name__, str(amount), color, point, points,
                         type(maybe).__name__)))


def by_number(key: str, names: dict[int, str]) -> None:
    R().rpush(key, repr(sorted(names.items())))


class Service:
    """A class the resolver builds at run time (methods are recorded by class + name)."""

    instances = 0

    def __init__(self) -> None:
        Service.instances += 1
        self.greeting = "hello"

    def greet(self, key: str, name: str) -> None:
        R().rpush(key, f"{self.greeting} {name}")

    @staticmethod
    def static(key: str) -> None:
        R().rpush(key, "static")

    @classmethod
    def klass(cls, key: str) -> None:
        R().rpush(key, cls.__name__)


def leak(key: str, mb: int) -> None:
    _LEAK.append(bytearray(mb * 1024 * 1024))
    R().rpush(key, os.getpid())


_LEAK: list[bytearray] = []
