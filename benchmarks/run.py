"""The benchmark runner (inside benchmarks/.venv; started by ``python -m benchmarks``).

Starts a private redis-server, calibrates the CPU task, runs each library's
suite in its own process (``benchmarks.suite``) with a hard time limit, kills
every worker process group that is left, then prints the table and writes
``results/latest.md`` and ``results/latest.json``.
"""

import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import LIBRARIES, RESULTS_DIR, ROOT, procs, report
from .cli import build_parser
from .common import (CPU_LOOPS_ENV, LOG_DIR_ENV, MEASURE_KEYS, PGID_FILE_ENV, REDIS_URL_ENV,
                     calibrate_cpu)
from .redis_server import RedisServer

COUNTS_FULL = {"single": 10_000, "bulk": 10_000, "noop": 20_000, "cpu": 400, "latency": 200,
               "rss": 100_000, "cancel_tasks": 200, "cancel_threads": 100, "pause_trials": 10}
COUNTS_SHORT = {"single": 2_000, "bulk": 2_000, "noop": 4_000, "cpu": 40, "latency": 50,
                "rss": 10_000, "cancel_tasks": 40, "cancel_threads": 20, "pause_trials": 3}


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def machine_info(redis_version):
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = "%.1f GiB" % (int(line.split()[1]) / 1024 / 1024)
    except OSError:
        pass
    return {
        "uname": sh(["uname", "-a"]) or " ".join(platform.uname()),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": sys.version.split()[0] + " (" + platform.python_implementation() + ")",
        "redis": redis_version,
        "redis_py": _dist("redis"),
        "hiredis": _dist("hiredis"),
        "psutil": _dist("psutil"),
    }


def _load1():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _dist(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_suite(lib, spec_path, work, timeout):
    out = os.path.join(work, "result-%s.json" % lib)
    cmd = [sys.executable, "-m", "benchmarks.suite", "--lib", lib, "--spec", spec_path, "--out", out]
    print("== %s" % lib, flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=procs.child_env(), stdin=subprocess.DEVNULL,
                            start_new_session=True)
    procs._record_pgid(proc.pid)
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        procs.kill_pgid(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            procs.kill_pgid(proc.pid, signal.SIGKILL)
    try:
        res = json.load(open(out))
    except (OSError, ValueError):
        res = {"library": lib, "version": None, "measurements": {}, "worker_commands": {}}
    if timed_out:
        res["error"] = "suite killed after its %.0f s limit" % timeout
    elif rc != 0 and not res.get("error"):
        res["error"] = "suite exited with code %s" % rc
    res["suite_seconds"] = round(time.monotonic() - t0, 1)
    return res


def main(argv=None):
    args = build_parser().parse_args(argv)
    short = args.short
    runs = args.runs if args.runs is not None else (1 if short else 3)
    runs = max(1, runs)
    libs = args.only or list(LIBRARIES)
    counts = dict(COUNTS_SHORT if short else COUNTS_FULL)
    lib_timeout = args.lib_timeout or (150.0 if short else 3600.0)
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.monotonic()

    signal.signal(signal.SIGTERM, _sigterm)
    work = tempfile.mkdtemp(prefix="bench-run-")
    pgid_file = os.path.join(work, "pgids")
    log_dir = os.path.join(work, "logs")
    os.makedirs(log_dir)
    os.environ[PGID_FILE_ENV] = pgid_file
    os.environ[LOG_DIR_ENV] = log_dir

    server = RedisServer(args.redis_server)
    results = []
    exit_code = 0
    try:
        server.start()
        os.environ[REDIS_URL_ENV] = server.url
        print("redis-server %s on %s (private, --save '' --appendonly no)" % (server.version, server.url),
              flush=True)
        load1 = _load1()
        if load1 is not None and load1 > 1.0:
            print("WARNING: 1-minute load average is %.2f before starting: other processes are using the "
                  "CPU, so the figures will be noisy." % load1, flush=True)
        loops, task_s = calibrate_cpu()
        os.environ[CPU_LOOPS_ENV] = str(loops)
        print("CPU task: %d loop iterations = %.1f ms" % (loops, task_s * 1000), flush=True)
        measure = args.measure
        spec = {"short": short, "runs": runs, "counts": counts, "cpu_loops": loops,
                "cpu_task_seconds": task_s, "measure": measure}
        spec_path = os.path.join(work, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        for lib in libs:
            res = run_suite(lib, spec_path, work, lib_timeout)
            results.append(res)
            # anything a suite left behind (workers of a killed suite): kill it
            procs.kill_recorded_groups(pgid_file, keep=[server.group.pgid])
            print(report.row_text(res), flush=True)
        meta = {
            "date": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "duration_s": round(time.monotonic() - t_start, 1),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
            "short": short, "runs": runs, "counts": counts,
            "cpu_loops": loops, "cpu_task_ms": task_s * 1000,
            "machine": machine_info(server.version),
            "loadavg_before": load1,
            "measure_keys": list(MEASURE_KEYS),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {"meta": meta, "results": results}
        (out_dir / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
        (out_dir / "latest.md").write_text(report.markdown(data))
        print()
        print(report.table_text(data))
        if args.strict and any(not e[2].startswith("pending") for e in report.errors(data)):
            exit_code = 1
        print("\nwrote %s and %s (%.0f s)" % (out_dir / "latest.md", out_dir / "latest.json", meta["duration_s"]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        exit_code = 130
    finally:
        try:
            server.stop()
        finally:
            procs.kill_recorded_groups(pgid_file)
            logs_out = out_dir / "logs"
            try:
                if os.listdir(log_dir):
                    shutil.rmtree(logs_out, ignore_errors=True)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(log_dir, logs_out)
            except OSError:
                pass
            shutil.rmtree(work, ignore_errors=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
