"""Dramatiq adapter.

Workers: ``dramatiq benchmarks.adapters.dramatiq_ --processes P --threads T``
(Dramatiq's own defaults are 2 processes x 8 threads, i.e. the recommended
configuration for this 2-core machine; P=1 for the single-process figure).
RedisBroker with the default middleware, no Results middleware.
Bulk API: ``dramatiq.group([...]).run()`` (note: it enqueues the messages one
by one; Dramatiq has no pipelined enqueue).
"""

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from .. import tasks
from ..common import redis_url
from . import _base

NAME = "dramatiq"
DISTS = ("dramatiq",)
WORKER_CONFIG = "dramatiq --processes P --threads 8 (--threads 1 for CPU efficiency; RedisBroker, default middleware, no results)"
QUEUE = "bench"

broker = RedisBroker(url=redis_url(), socket_timeout=10)
dramatiq.set_broker(broker)

noop = dramatiq.actor(tasks.noop, actor_name="bench_noop", queue_name=QUEUE)
cpu = dramatiq.actor(tasks.cpu, actor_name="bench_cpu", queue_name=QUEUE)
record_start = dramatiq.actor(tasks.record_start, actor_name="bench_record", queue_name=QUEUE)

ACTORS = {"noop": noop, "cpu": cpu, "record": record_start}


def version():
    return _base.dist_versions(DISTS)


def enqueue_one(task, *args):
    ACTORS[task].send(*args)


def single_enqueue(n, task="noop"):
    a = ACTORS[task]
    for _ in range(n):
        a.send()


def bulk_enqueue(n, task="noop", chunk=1000):
    a = ACTORS[task]
    for k in _base.chunks(n, chunk):
        dramatiq.group([a.message() for _ in range(k)]).run()
    return n


def worker_command(processes, threads):
    return [_base.venv_bin("dramatiq"), "benchmarks.adapters.dramatiq_",
            "--processes", str(processes), "--threads", str(threads), "--queues", QUEUE,
            "--worker-shutdown-timeout", "3000"]


def start_workers(processes, threads):
    return _base.start(worker_command(processes, threads), "dramatiq-workers")


def stop_workers(handle):
    _base.stop(handle)


def flush():
    _base.flush_redis()
