"""RQ adapter.

Workers: ``rq worker-pool bench -n P -w rq.worker.SimpleWorker`` — RQ's own
pool manager with P non-forking SimpleWorker processes (no fork per job; RQ has
no threads, so the thread count is ignored). Jobs are enqueued with
``result_ttl=0`` (fire-and-forget: no result kept, like the other libraries).
Bulk API: ``Queue.enqueue_many`` with ``Queue.prepare_data`` (one pipeline).
"""

from rq import Queue

from .. import tasks
from ..common import redis_url
from . import _base

NAME = "rq"
DISTS = ("rq",)
WORKER_CONFIG = "rq worker-pool -n P -w rq.worker.SimpleWorker (P non-forking worker processes, no threads)"
QUEUE = "bench"

FUNCS = {"noop": tasks.noop, "cpu": tasks.cpu, "record": tasks.record_start}

_queue = None


def _q():
    global _queue
    if _queue is None:
        from redis import Redis

        _queue = Queue(QUEUE, connection=Redis.from_url(redis_url()))
    return _queue


def version():
    return _base.dist_versions(DISTS)


def enqueue_one(task, *args):
    _q().enqueue(FUNCS[task], *args, result_ttl=0)


def single_enqueue(n, task="noop"):
    q, fn = _q(), FUNCS[task]
    for _ in range(n):
        q.enqueue(fn, result_ttl=0)


def bulk_enqueue(n, task="noop", chunk=1000):
    q, fn = _q(), FUNCS[task]
    for k in _base.chunks(n, chunk):
        q.enqueue_many([Queue.prepare_data(fn, result_ttl=0) for _ in range(k)])
    return n


def worker_command(processes, threads):
    return [_base.venv_bin("rq"), "worker-pool", QUEUE, "-n", str(processes),
            "-w", "rq.worker.SimpleWorker", "-u", redis_url(), "-l", "WARNING"]


def start_workers(processes, threads):
    return _base.start(worker_command(processes, threads), "rq-workers")


def stop_workers(handle):
    _base.stop(handle)


def flush():
    _base.flush_redis()
