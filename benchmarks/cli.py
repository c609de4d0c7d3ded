"""Command-line options shared by the bootstrap (system Python) and the runner (venv)."""

import argparse

from . import LIBRARIES


def parse_libs(value):
    names = [v.strip().lower().rstrip("_") for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in LIBRARIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            "unknown library %s (choose from %s)" % (", ".join(unknown), ", ".join(LIBRARIES))
        )
    return names


MEASUREMENTS = ("single_enqueue", "bulk_enqueue", "noop_1p", "noop_2p", "cpu_efficiency", "latency",
                "rss_growth", "cancel_latency", "pause_latency")


def parse_measure(value):
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            "unknown measurement %s (choose from %s)" % (", ".join(unknown), ", ".join(MEASUREMENTS)))
    return names


def build_parser(prog="python -m benchmarks"):
    p = argparse.ArgumentParser(
        prog=prog,
        description="Side-by-side benchmark of coretask against rq, celery, dramatiq and huey. "
        "Creates benchmarks/.venv, starts a private redis-server and writes "
        "benchmarks/results/latest.{md,json}.",
    )
    p.add_argument("--short", action="store_true",
                   help="small task counts and 1 run by default (CI smoke test, ~3 min)")
    p.add_argument("--runs", type=int, default=None,
                   help="repetitions of each measurement; the median is reported "
                        "(default 3, or 1 with --short)")
    p.add_argument("--only", type=parse_libs, default=None, metavar="NAME,...",
                   help="comma-separated subset of: " + ",".join(LIBRARIES))
    p.add_argument("--measure", type=parse_measure, default=None, metavar="KEY,...",
                   help="only these measurements: " + ",".join(MEASUREMENTS))
    p.add_argument("--out-dir", default=None,
                   help="where to write latest.md / latest.json (default benchmarks/results)")
    p.add_argument("--redis-server", default="/usr/bin/redis-server",
                   help="redis-server binary to start privately (default /usr/bin/redis-server)")
    p.add_argument("--lib-timeout", type=float, default=None,
                   help="hard limit in seconds for one library's whole suite "
                        "(default 150 with --short, 3600 otherwise)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any measurement failed (pending coretask APIs excepted)")
    p.add_argument("--reinstall", action="store_true",
                   help="recreate benchmarks/.venv even if it looks up to date")
    return p
