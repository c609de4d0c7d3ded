"""One adapter module per library, all with the same small interface.

Every adapter module exposes:

``NAME``                       library name as shown in the report
``DISTS``                      distribution names whose versions are reported
``WORKER_CONFIG``              one-line description of the worker configuration
``version()``                  "lib x.y.z"
``enqueue_one(task, *args)``   enqueue one task: task in {"noop", "cpu", "record"}
``single_enqueue(n, task)``    n enqueues, one library call per task
``bulk_enqueue(n, task)``      n tasks through the library's bulk API, or None if it has none
``worker_command(p, t)``       the library's own worker CLI for p processes x t threads
``start_workers(p, t)``        start real worker processes (own process group) -> handle
``stop_workers(handle)``       stop them (SIGTERM, grace, SIGKILL of the whole group)
``flush()``                    FLUSHALL the benchmark Redis (+ whatever the library needs after it)

Adapters are imported only inside the per-library suite process, after the
harness has set BENCH_REDIS_URL.
"""

import importlib

MODULES = {
    "rq": "benchmarks.adapters.rq_",
    "celery": "benchmarks.adapters.celery_",
    "dramatiq": "benchmarks.adapters.dramatiq_",
    "huey": "benchmarks.adapters.huey_",
    "coretask": "benchmarks.adapters.coretask_",
}


def load(name):
    return importlib.import_module(MODULES[name])
