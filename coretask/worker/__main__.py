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
    args = ap.parse_args(argv)
    level = getattr(logging, args.log_level)
    configure(level, args.log_format)
    try:
        load = app_loader(args.app, max_workers=args.threads, processes=args.processes,
                          queues=args.queues.split(",") if args.queues else None)
        manager = Manager(load, log_level=level, log_format=args.log_format)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return manager.run()


if __name__ == "__main__":
    sys.exit(main())
