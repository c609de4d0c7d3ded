"""``python -m coretask.worker --app MODULE:ATTRIBUTE``: the worker manager."""
from __future__ import annotations

import argparse
import logging
import sys

from ..appload import app_loader
from ..errors import ConfigurationError
from ..logs import LOG_FORMATS, configure
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
    ap.add_argument("--metrics-port", type=int, help="serve the worker processes' Prometheus metrics, summed, "
                    "on this port (coretask[prometheus]; docs/observability.md)")
    ap.add_argument("--metrics-addr", default="0.0.0.0", help="address of the metrics endpoint (default 0.0.0.0)")
    ap.add_argument("--metrics-dir", help="multiprocess directory (default: $PROMETHEUS_MULTIPROC_DIR, else a "
                    "temporary one); emptied at start")
    args = ap.parse_args(argv)
    level = getattr(logging, args.log_level)
    configure(level, args.log_format)
    metrics = None
    if args.metrics_port is not None:
        from ..contrib.prometheus_server import WorkerMetricsServer

        metrics = WorkerMetricsServer(args.metrics_port, addr=args.metrics_addr, directory=args.metrics_dir)
        try:
            metrics.prepare()         # before the app is loaded here and in any worker process
        except ConfigurationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        load = app_loader(args.app, max_workers=args.threads, processes=args.processes,
                          queues=args.queues.split(",") if args.queues else None)
        manager = Manager(load, log_level=level, log_format=args.log_format,
                          on_child_exit=metrics.child_exited if metrics is not None else None)
        if metrics is not None:
            metrics.start()
        return manager.run()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:            # the metrics port is taken
        print(f"error: cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {exc}", file=sys.stderr)
        return 2
    finally:
        if metrics is not None:
            metrics.close()


if __name__ == "__main__":
    sys.exit(main())
