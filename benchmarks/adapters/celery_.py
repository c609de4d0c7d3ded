"""Celery adapter.

Workers: ``celery -A benchmarks.adapters.celery_:app worker -P prefork -c P``
with ``--without-gossip --without-mingle --without-heartbeat`` (the usual
advice for a Redis broker) and default prefetch (multiplier 4, fair
scheduling). Prefork with concurrency = number of cores (2) is Celery's
recommended pool for CPU-bound Python; the thread count is ignored.
No result backend (``task_ignore_result``): fire-and-forget.
Bulk API: ``group(sig for ...).apply_async()`` (one producer, one connection).
"""

from celery import Celery, group

from .. import tasks
from ..common import redis_url
from . import _base

NAME = "celery"
DISTS = ("celery", "kombu")
WORKER_CONFIG = ("celery worker -P prefork -c P --without-gossip --without-mingle "
                 "--without-heartbeat (prefetch multiplier 4, no result backend)")
QUEUE = "bench"

app = Celery("bench", broker=redis_url(), set_as_current=False)
app.conf.update(
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    broker_transport_options={"socket_timeout": 10, "socket_connect_timeout": 5},
)

noop = app.task(name="bench.noop", ignore_result=True)(tasks.noop)
cpu = app.task(name="bench.cpu", ignore_result=True)(tasks.cpu)
record_start = app.task(name="bench.record", ignore_result=True)(tasks.record_start)

TASKS = {"noop": noop, "cpu": cpu, "record": record_start}


def version():
    return _base.dist_versions(DISTS)


def enqueue_one(task, *args):
    TASKS[task].apply_async(args)


def single_enqueue(n, task="noop"):
    t = TASKS[task]
    for _ in range(n):
        t.delay()


def bulk_enqueue(n, task="noop", chunk=1000):
    t = TASKS[task]
    for k in _base.chunks(n, chunk):
        group(t.s() for _ in range(k)).apply_async()
    return n


def worker_command(processes, threads):
    return [_base.venv_bin("celery"), "-A", "benchmarks.adapters.celery_:app", "worker",
            "-P", "prefork", "-c", str(processes), "-Q", QUEUE, "-l", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", "bench%d@%%h" % processes]


def start_workers(processes, threads):
    return _base.start(worker_command(processes, threads), "celery-workers")


def stop_workers(handle):
    _base.stop(handle)


def flush():
    """FLUSHALL, then re-declare the queue binding.

    Kombu's Redis transport keeps exchange->queue bindings in
    ``_kombu.binding.*`` keys and caches "already declared" per connection, so
    after a FLUSHALL the producer would publish into a missing table. Declaring
    the queue again restores the binding.
    """
    _base.flush_redis()
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        for q in app.amqp.queues.values():
            q(ch).declare()
