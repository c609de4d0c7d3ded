"""The manager's metrics endpoint: worker processes' figures summed, surviving their replacement.

Why this shape: worker processes are many, short-lived under recycling (max_tasks_per_process,
max_memory_per_process) and replaced after crashes, and a scrape of one of them would see only
its own counts, which vanish with it. So ``python -m coretask.worker --metrics-port P`` runs
them in prometheus_client's multiprocess mode: each process writes its metrics to memory-mapped
files in one directory (``PROMETHEUS_MULTIPROC_DIR``, set by the manager before it spawns any),
and the manager, which outlives them all and runs no task, serves their sum on ``/metrics``.

What happens when a worker process ends (:meth:`WorkerMetricsServer.child_exited`, called by
the manager once it has seen the process gone):

* its ``livesum`` gauges (running tasks, worker processes) are removed
  (``multiprocess.mark_process_dead``): a dead process runs nothing;
* its counters and histograms are folded into one archive file per type and its own files
  deleted, under the lock every scrape takes, so counts never go down (Prometheus would read a
  drop as a counter reset) nor twice up, and the number of files, which every scrape reads, stays
  the number of live processes plus two however many processes were replaced.

The directory is emptied when the manager starts: a new manager starts from zero, which
Prometheus handles as a counter reset. A directory of its own is made (and removed at exit)
unless ``--metrics-dir`` or ``PROMETHEUS_MULTIPROC_DIR`` names one. A directory another live
manager serves is refused (its pid is in ``manager.pid``): emptying it would wipe that manager's
counts, and both endpoints would then sum each other's processes.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigurationError
from . import require
from .prometheus import TENANTS_FILE

__all__ = ["WorkerMetricsServer", "ENV"]

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
ARCHIVED = ("counter", "histogram")      # types whose totals outlive the process that counted
OWNER_FILE = "manager.pid"               # the manager that serves the directory


class _Locked:
    """A collector that holds the server's lock while it reads the files, so a scrape never
    sees a dead process's counts both in the archive and in its own file, or in neither."""

    def __init__(self, inner: Any, lock: threading.Lock) -> None:
        self.inner = inner
        self.lock = lock

    def collect(self) -> Iterator[Any]:
        with self.lock:
            metrics = list(self.inner.collect())
        yield from metrics


class WorkerMetricsServer:
    """Prepare the multiprocess directory (:meth:`prepare`, before any worker process starts),
    serve it (:meth:`start`), fold in ended processes (:meth:`child_exited`), clean up (:meth:`close`)."""

    def __init__(self, port: int, *, addr: str = "0.0.0.0", directory: str | None = None) -> None:
        self.port = port
        self.addr = addr
        self.directory = directory or os.environ.get(ENV) or ""
        self._own_dir = not self.directory
        self._lock = threading.Lock()
        self._server: Any = None
        self._claimed = False

    def prepare(self) -> str:
        """Create (or empty) the directory and export it to the processes spawned from now on."""
        require("prometheus_client", "prometheus", "python -m coretask.worker --metrics-port")
        if self._own_dir:
            self.directory = tempfile.mkdtemp(prefix="coretask-metrics-")
        os.makedirs(self.directory, exist_ok=True)
        self._claim()
        for path in glob.glob(os.path.join(self.directory, "*.db")) + [os.path.join(self.directory, TENANTS_FILE)]:
            if os.path.exists(path):
                os.remove(path)
        os.environ[ENV] = self.directory
        return self.directory

    def _claim(self) -> None:
        """Write this manager's pid into the directory, unless another live manager's is there."""
        owner = os.path.join(self.directory, OWNER_FILE)
        try:
            with open(owner, encoding="utf-8") as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and _alive(pid):
            raise ConfigurationError(f"the metrics directory {self.directory} is in use by the manager with pid {pid}: "
                                     "give each manager a directory of its own (--metrics-dir, or leave it and "
                                     f"{ENV} unset for a private one)")
        with open(owner, "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
        self._claimed = True

    def start(self) -> None:
        pc = require("prometheus_client", "prometheus", "python -m coretask.worker --metrics-port")
        from prometheus_client import multiprocess

        registry = pc.CollectorRegistry()
        inner = multiprocess.MultiProcessCollector(pc.CollectorRegistry(), path=self.directory)
        registry.register(_Locked(inner, self._lock))   # type: ignore[arg-type]
        self._server, _ = pc.start_http_server(self.port, addr=self.addr, registry=registry)
        log.info("manager: worker metrics on http://%s:%d/metrics (directory %s)", self.addr,
                 self._server.server_port, self.directory)

    @property
    def bound_port(self) -> int:
        """The port served (the one asked for, or the one the OS chose for port 0)."""
        return int(self._server.server_port) if self._server is not None else self.port

    def child_exited(self, pid: int) -> None:
        """A worker process ended: drop its live gauges, fold its counts into the archive."""
        from prometheus_client import multiprocess

        with self._lock:
            multiprocess.mark_process_dead(pid, self.directory)
            for kind in ARCHIVED:
                own = os.path.join(self.directory, f"{kind}_{pid}.db")
                if os.path.exists(own):
                    self._fold(kind, own)

    def _fold(self, kind: str, own: str) -> None:
        """archive := archive + own, written beside it and renamed over it; then own removed."""
        from prometheus_client.mmap_dict import MmapedDict, mmap_key
        from prometheus_client.multiprocess import MultiProcessCollector

        archive = os.path.join(self.directory, f"{kind}_archive.db")
        files = [own] + ([archive] if os.path.exists(archive) else [])
        merged = MultiProcessCollector.merge(files, accumulate=False)
        tmp = os.path.join(self.directory, f"{kind}_archive.tmp")     # not *.db: never scraped
        if os.path.exists(tmp):
            os.remove(tmp)
        out = MmapedDict(tmp)
        try:
            for metric in merged:
                for s in metric.samples:
                    key = mmap_key(metric.name, s.name, list(s.labels), list(s.labels.values()), metric.documentation)
                    out.write_value(key, s.value, 0.0)
        finally:
            out.close()
        os.replace(tmp, archive)
        os.remove(own)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_dir and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        elif self._claimed:
            try:
                os.remove(os.path.join(self.directory, OWNER_FILE))
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process: alive
        return True
    return True
