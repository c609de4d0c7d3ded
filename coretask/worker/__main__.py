"""``python -m coretask.worker --app MODULE:ATTRIBUTE``: the worker manager."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from ..appload import app_loader
from ..cli import port_number
from ..errors import ConfigurationError
from ..logs import LOG_FORMATS, configure
from ..options import queue_list
from .manager import Manager


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coretask.worker", description=__doc__)
    ap.add_argument("--app", required=True, help="MODULE:ATTRIBUTE of a TaskProcessor")
    ap.add_argument("--queues", help="comma-separated queues in priority order (overrides Options.queues)")
    ap.add_argument("--processes", type=int, help="worker processes (overrides Options.processes)")
    ap.add_argument("--threads", type=int, help="threads per process (overrides Options.max_workers)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                    help="json: one JSON object per line, with the task fields (coretask/logs.py)")
    ap.add_argument("--metrics-port", type=port_number, help="serve the worker processes' Prometheus metrics, summed, "
                    "on this port (coretask[prometheus]; docs/observability.md)")
    ap.add_argument("--metrics-addr", default="0.0.0.0", help="address of the metrics endpoint (default 0.0.0.0)")
    ap.add_argument("--metrics-dir", help="multiprocess directory (default: $PROMETHEUS_MULTIPROC_DIR, else a "
                    "temporary one); emptied at start")
    args = ap.parse_args(argv)
    try:
        load = app_loader(args.app, max_workers=args.threads, processes=args.processes,
                          queues=queue_list(args.queues))
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(load, log_level=getattr(logging, args.log_level), log_format=args.log_format,
               metrics_port=args.metrics_port, metrics_addr=args.metrics_addr, metrics_dir=args.metrics_dir)


def run(load: Callable[[], Any], *, log_level: int = logging.INFO, log_format: str = "text",
        metrics_port: int | None = None, metrics_addr: str = "0.0.0.0", metrics_dir: str | None = None) -> int:
    """Configure logging, start the metrics endpoint when asked (before the app is loaded here
    or in any worker process: multiprocess mode is chosen at import), run the manager until it
    stops. Shared by this command and ``flask coretask worker``. Returns the exit code."""
    configure(log_level, log_format)
    metrics = None
    try:
        if metrics_port is not None:
            from ..contrib.prometheus_server import WorkerMetricsServer

            metrics = WorkerMetricsServer(metrics_port, addr=metrics_addr, directory=metrics_dir)
            metrics.prepare()
        manager = Manager(load, log_level=log_level, log_format=log_format,
                          on_child_exit=metrics.child_exited if metrics is not None else None)
        if metrics is not None:
            metrics.start()
        return manager.run()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:            # the metrics port is taken
        print(f"error: cannot serve metrics on {metrics_addr}:{metrics_port}: {exc}", file=sys.stderr)
        return 2
    finally:
        if metrics is not None:
            metrics.close()


if __name__ == "__main__":
    sys.exit(main())
