"""Huey adapter.

Workers: ``huey_consumer benchmarks.adapters.huey_.huey -k process -w P -q``
(process workers, as Huey recommends for CPU-bound work; P=2 on this machine;
the thread count is ignored). RedisHuey with default blocking dequeue
(BRPOP, read_timeout 1 s) and default result store (no-op tasks return None,
so nothing is stored). Huey has no bulk-enqueue API (``Task.map`` is a loop of
single enqueues), so bulk enqueue is reported as n/a.
"""

from huey import RedisHuey
from redis import ConnectionPool

from .. import tasks
from ..common import redis_url
from . import _base

NAME = "huey"
DISTS = ("huey",)
WORKER_CONFIG = "huey_consumer -k process -w P (RedisHuey, blocking BRPOP dequeue)"

huey = RedisHuey("bench", connection_pool=ConnectionPool.from_url(redis_url(), socket_timeout=10,
                                                                  socket_connect_timeout=5))

noop = huey.task(name="bench.noop")(tasks.noop)
cpu = huey.task(name="bench.cpu")(tasks.cpu)
record_start = huey.task(name="bench.record")(tasks.record_start)

TASKS = {"noop": noop, "cpu": cpu, "record": record_start}


def version():
    return _base.dist_versions(DISTS)


def enqueue_one(task, *args):
    TASKS[task](*args)


def single_enqueue(n, task="noop"):
    t = TASKS[task]
    for _ in range(n):
        t()


def bulk_enqueue(n, task="noop"):
    return None  # no bulk API


def worker_command(processes, threads):
    return [_base.venv_bin("huey_consumer"), "benchmarks.adapters.huey_.huey",
            "-k", "process", "-w", str(processes), "-q"]


def start_workers(processes, threads):
    return _base.start(worker_command(processes, threads), "huey-workers")


def stop_workers(handle):
    _base.stop(handle)


def flush():
    _base.flush_redis()
