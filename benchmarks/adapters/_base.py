"""Helpers shared by the adapters (harness side)."""

import os
import sys
from importlib import metadata

from .. import procs
from ..common import redis_url

_client = None


def bench_redis():
    """Harness-side client for the benchmark Redis (polling counters, FLUSHALL)."""
    global _client
    if _client is None:
        import redis

        _client = redis.Redis.from_url(redis_url(), socket_timeout=10)
    return _client


def flush_redis():
    bench_redis().flushall()


def venv_bin(name):
    """A console script installed next to the running interpreter (the venv)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


def dist_versions(dists):
    out = []
    for d in dists:
        try:
            out.append("%s %s" % (d, metadata.version(d)))
        except metadata.PackageNotFoundError:
            out.append("%s (not installed)" % d)
    return ", ".join(out)


def start(cmd, label):
    return procs.start_group(cmd, label=label, env=procs.child_env())


def stop(handle, grace=2.0):
    procs.stop_group(handle, grace=grace)


def chunks(n, size):
    while n > 0:
        k = min(size, n)
        yield k
        n -= k
