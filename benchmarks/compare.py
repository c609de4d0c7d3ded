"""Before/after comparison of coretask alone, alternating runs, medians over rounds.

    python -m benchmarks.compare --before 09c7f1e --after /work/main [--rounds 3] [--short]
                                 [--measure noop_1p,noop_2p,latency,cancel_latency]

Runs under any Python 3.10+ (stdlib only), from the repository root. ``--before`` and
``--after`` are each a directory holding a coretask source tree (used as it is, uncommitted
changes included) or a git ref of this repository (checked out with ``git worktree add
--detach`` into ``benchmarks/.compare/trees/<sha>``, reused by later runs).

Each tree gets a venv of its own, ``benchmarks/.compare/venvs/<tree>-<hash>``: the pins of
``requirements.txt`` the coretask side needs (redis, hiredis, psutil) plus ``pip install -e
TREE`` under those pins; it is rebuilt when the pins, the Python version or the tree's
packaging files change. The harness is always the one of this checkout: its ``benchmarks``
package is copied into a directory with no coretask beside it, which is the working
directory and the only PYTHONPATH entry of the harness, its suite and the worker processes,
so ``coretask`` can only come from the venv, i.e. from the tree under test. That is checked
before the runs (``import coretask`` in each venv, from that directory) and after them (every
process that built the benchmark app printed its ``coretask.__file__`` to its log).

Then ``python -m benchmarks.run --only coretask --runs 1`` runs alternately: before, after,
before, after, ... for ``--rounds`` rounds, each with its own private redis-server. The table
of medians over the rounds and the raw value of every round go to stdout and to
``benchmarks/results/compare-latest.md`` (and ``.json``); each run's own output (latest.md,
latest.json, worker logs) is in ``benchmarks/results/compare/<round>-<side>/``.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import BENCH_DIR, REQUIREMENTS, RESULTS_DIR, ROOT
from .cli import MEASUREMENTS, parse_measure
from .common import OPTIONS_ENV, SHOW_CORETASK_ENV, SHOW_CORETASK_TAG

COMPARE_DIR = BENCH_DIR / ".compare"
TREES_DIR = COMPARE_DIR / "trees"
VENVS_DIR = COMPARE_DIR / "venvs"
RUNS_DIR = RESULTS_DIR / "compare"
# The pins of requirements.txt that the coretask side of the harness needs (the observability
# extras for --after-options '{"middleware": "prometheus,otel-sdk"}', adapters/coretask_.py).
PINNED = ("redis", "hiredis", "psutil", "prometheus-client", "opentelemetry-api", "opentelemetry-sdk")
PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")
DEFAULT_MEASURE = ("noop_1p", "noop_2p", "latency", "cancel_latency")

# (label, measurement, field in the run's figures, format, higher is better); as in report.py
FIGURES = [
    ("single enq/s", "single_enqueue", "value", "{:,.0f}", True),
    ("bulk enq/s", "bulk_enqueue", "value", "{:,.0f}", True),
    ("no-op/s 1 proc", "noop_1p", "value", "{:,.0f}", True),
    ("no-op/s 2 proc", "noop_2p", "value", "{:,.0f}", True),
    ("CPU eff. 2 proc", "cpu_efficiency", "value", "{:.1%}", True),
    ("latency p50 ms", "latency", "p50", "{:.2f}", False),
    ("latency p99 ms", "latency", "p99", "{:.2f}", False),
    ("RSS growth MB", "rss_growth", "value", "{:+.1f}", False),
    ("cancel p50 ms", "cancel_latency", "p50", "{:.1f}", False),
    ("cancel p99 ms", "cancel_latency", "p99", "{:.1f}", False),
    ("pause p99 ms", "pause_latency", "p99", "{:.1f}", False),
]
# Shown in the per-round table only (a cancel figure means little if not all tasks were running).
CHECKS = [
    ("cancel: running", "cancel_latency", "running", "{:.0f}"),
    ("cancel: not cancelled", "cancel_latency", "not_cancelled", "{:.0f}"),
]

_child = None


def _log(msg):
    print("[compare] " + msg, flush=True)


def _die(msg):
    print("benchmarks.compare: " + msg, file=sys.stderr, flush=True)
    sys.exit(2)


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _git(*args, cwd=ROOT):
    p = subprocess.run(["git", *args], cwd=str(cwd), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def _is_tree(coretask_file, tree):
    """``coretask.__file__`` is the package of ``tree`` (exactly: one tree may lie inside the other)."""
    return os.path.realpath(coretask_file) == os.path.realpath(tree / "coretask" / "__init__.py")


# -- the two source trees -------------------------------------------------------------------


class Side:
    def __init__(self, name, spec, tree, commit, kind, changes=None):
        self.name = name            # "before" / "after"
        self.spec = spec            # as given on the command line
        self.tree = tree            # Path of the coretask source tree
        self.commit = commit        # full sha of the tree's HEAD (None if not a git tree)
        self.kind = kind            # "ref" or "path"
        self.changes = changes or []  # uncommitted changes under coretask/ (path trees)
        self.python = None
        self.options = None         # extra Options as JSON (--before-options / --after-options)
        self.coretask_file = None
        self.worker_paths = {}

    def label(self):
        if self.kind == "ref":
            return "%s (%s)" % (self.spec, self.commit[:10])
        s = "%s (HEAD %s" % (self.tree, self.commit[:10] if self.commit else "?")
        if self.changes:
            s += ", %d uncommitted change%s under coretask/" % (len(self.changes), "s" * (len(self.changes) != 1))
        return s + ")"


def prepare_tree(name, spec):
    path = Path(spec).expanduser()
    if path.is_dir():
        tree = path.resolve()
        if not (tree / "coretask" / "__init__.py").is_file():
            _die("--%s %s: no coretask/__init__.py in that directory" % (name, spec))
        rc, commit, _ = _git("rev-parse", "HEAD", cwd=tree)
        _, status, _ = _git("status", "--porcelain", "--", "coretask", cwd=tree)
        changes = [line for line in status.splitlines() if line.strip()]
        return Side(name, spec, tree, commit if rc == 0 else None, "path", changes)
    rc, sha, _ = _git("rev-parse", "--verify", "--quiet", spec + "^{commit}")
    if rc != 0 or not sha:
        _die("--%s %s: neither a directory nor a git ref of %s" % (name, spec, ROOT))
    dest = TREES_DIR / sha[:12]
    if dest.exists():
        _, top, _ = _git("rev-parse", "--show-toplevel", cwd=dest)
        _, head, _ = _git("rev-parse", "HEAD", cwd=dest)
        _, status, _ = _git("status", "--porcelain", "--untracked-files=no", cwd=dest)
        if os.path.realpath(top) == os.path.realpath(dest) and head == sha and not status:
            _log("%s: reusing worktree %s at %s" % (name, dest, sha[:10]))
            return Side(name, spec, dest, sha, "ref")
        _log("%s: %s is stale, checking it out again" % (name, dest))
        _git("worktree", "remove", "--force", str(dest))
        if dest.exists():
            shutil.rmtree(dest)
    _git("worktree", "prune")
    TREES_DIR.mkdir(parents=True, exist_ok=True)
    _log("%s: git worktree add --detach %s %s" % (name, dest, sha[:10]))
    rc, _, err = _git("worktree", "add", "--detach", str(dest), sha)
    if rc != 0:
        _die("git worktree add %s %s failed: %s" % (dest, sha, err))
    return Side(name, spec, dest, sha, "ref")


# -- one venv per tree ----------------------------------------------------------------------


def _pins():
    """The requirements.txt lines of PINNED (as written) and the same without extras."""
    lines = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"[A-Za-z0-9_.-]+", line)
        if m and m.group(0).lower().replace("_", "-") in PINNED:
            lines.append(line)
    missing = set(PINNED) - {re.match(r"[A-Za-z0-9_.-]+", x).group(0).lower() for x in lines}
    if missing:
        _die("%s pins none of: %s" % (REQUIREMENTS, ", ".join(sorted(missing))))
    return lines, [re.sub(r"\[[^\]]*\]", "", x) for x in lines]


def _project_hash(tree):
    parts = [n.encode() + b"\0" + (tree / n).read_bytes() for n in PROJECT_FILES if (tree / n).is_file()]
    return _sha256(b"\0\0".join(parts))


def _pip(py, *args):
    cmd = [str(py), "-m", "pip", "--disable-pip-version-check", *args]
    _log("$ " + " ".join(cmd))
    return subprocess.call(cmd, stdin=subprocess.DEVNULL)


def ensure_venv(side, reinstall=False):
    tree = side.tree
    vdir = VENVS_DIR / ("%s-%s" % (tree.name, _sha256(str(tree).encode())[:10]))
    py = vdir / "bin" / "python"
    state_file = vdir / "compare-state.json"
    pins, constraints = _pins()
    base = {"pins": pins, "python": "%d.%d.%d" % sys.version_info[:3], "base_python": sys.executable}
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    if reinstall or not py.exists() or state.get("base") != base:
        _log("%s: creating %s" % (side.name, vdir))
        VENVS_DIR.mkdir(parents=True, exist_ok=True)
        if subprocess.call([sys.executable, "-m", "venv", "--clear", str(vdir)]) != 0:
            _die("could not create %s" % vdir)
        if _pip(py, "install", "-qq", *pins) != 0:
            _die("pip install %s into %s failed" % (" ".join(pins), vdir))
        state = {"base": base, "coretask": None}
        state_file.write_text(json.dumps(state, indent=2) + "\n")
    want = {"tree": str(tree), "project": _project_hash(tree)}
    if state.get("coretask") != want:
        _log("%s: installing coretask from %s (editable)" % (side.name, tree))
        fd, cons = tempfile.mkstemp(prefix="compare-constraints-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(constraints) + "\n")
        try:
            rc = _pip(py, "install", "-qq", "-c", cons, "-e", str(tree))
        finally:
            os.unlink(cons)
        if rc != 0:
            _die("pip install -e %s into %s failed" % (tree, vdir))
        state["coretask"] = want
        state_file.write_text(json.dumps(state, indent=2) + "\n")
    side.python = py


# -- the harness, with no coretask beside it -------------------------------------------------


def stage_harness():
    """A copy of this checkout's ``benchmarks`` package in a directory of its own."""
    COMPARE_DIR.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="harness-", dir=str(COMPARE_DIR)))
    shutil.copytree(BENCH_DIR, root / "benchmarks",
                    ignore=shutil.ignore_patterns(".venv", ".compare", "results", "__pycache__", "*.pyc"))
    return root


def harness_env(harness_root, options=None):
    """``options``: extra coretask Options for this side, as JSON (BENCH_CORETASK_OPTIONS, read
    by the coretask adapter), e.g. to measure what a feature costs when it is on."""
    env = dict(os.environ)
    env.pop(OPTIONS_ENV, None)
    if options:
        env[OPTIONS_ENV] = options
    env["PYTHONPATH"] = str(harness_root)  # nothing inherited: coretask must come from the venv
    env["BENCH_IN_VENV"] = "1"
    env[SHOW_CORETASK_ENV] = "1"
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONSTARTUP", None)
    return env


def import_check(side, harness_root):
    """``import coretask`` as the worker processes will: same interpreter, directory and path."""
    code = ("import coretask, coretask.worker\n"
            "from coretask import Options, TaskProcessor\n"
            "print(coretask.__file__)\n")
    p = subprocess.run([str(side.python), "-c", code], cwd=str(harness_root), env=harness_env(harness_root),
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        _die("%s: coretask from %s does not import in %s:\n%s" % (side.name, side.tree, side.python, p.stderr))
    path = p.stdout.strip().splitlines()[-1]
    _log("%s: %s -c 'import coretask; print(coretask.__file__)' -> %s" % (side.name, side.python, path))
    if not _is_tree(path, side.tree):
        _die("%s: coretask is imported from %s, not from the tree under test %s" % (side.name, path, side.tree))
    side.coretask_file = path


# -- runs ------------------------------------------------------------------------------------


def _load1():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run_harness(side, harness_root, out_dir, args, tag):
    global _child
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = [str(side.python), "-m", "benchmarks.run", "--only", "coretask", "--runs", "1",
           "--measure", ",".join(args.measure), "--out-dir", str(out_dir),
           "--lib-timeout", str(args.lib_timeout), "--redis-server", args.redis_server]
    if args.short:
        cmd.append("--short")
    _log("%s: %s" % (tag, " ".join(cmd)))
    load_before = _load1()
    t0 = time.monotonic()
    with open(out_dir / "output.txt", "w") as log:
        _child = subprocess.Popen(cmd, cwd=str(harness_root), env=harness_env(harness_root, side.options),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1)
        try:
            for line in _child.stdout:
                log.write(line)
                print("  %s | %s" % (tag, line.rstrip("\n")), flush=True)
            rc = _child.wait()
        finally:
            if _child.poll() is None:  # interrupted: let the harness clean up its processes
                _child.send_signal(signal.SIGINT)
                try:
                    _child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _child.kill()
                    _child.wait()
            _child = None
    seconds = time.monotonic() - t0
    try:
        data = json.loads((out_dir / "latest.json").read_text())
        res = data["results"][0]
    except (OSError, ValueError, LookupError):
        data, res = None, {}
    # every process that built the benchmark app (suite and workers) said which coretask it imported
    paths = {}
    texts = [(out_dir / "output.txt").read_text(errors="replace")]
    texts += [p.read_text(errors="replace") for p in sorted((out_dir / "logs").glob("*.log"))]
    for text in texts:
        for m in re.finditer(re.escape(SHOW_CORETASK_TAG) + r"(\S+)", text):
            paths[m.group(1)] = paths.get(m.group(1), 0) + 1
    return {
        "side": side.name, "rc": rc, "seconds": round(seconds, 1), "out_dir": str(out_dir),
        "loadavg_before": load_before, "loadavg_after": _load1(),
        "error": res.get("error") or (None if data else "no latest.json (harness exit code %s)" % rc),
        "measurements": {k: {"status": m.get("status"), "error": m.get("error"),
                             "figures": (m.get("runs") or [None])[0]}
                         for k, m in (res.get("measurements") or {}).items()},
        "coretask_paths": paths,
        "redis": ((data or {}).get("meta") or {}).get("machine", {}).get("redis"),
    }


def _value(run, key, field):
    m = run["measurements"].get(key) or {}
    fig = m.get("figures") or {}
    v = fig.get(field)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v, fmt):
    return "-" if v is None else fmt.format(v)


# -- report ----------------------------------------------------------------------------------


def summarize(sides, runs, measure):
    rows = []
    for label, key, field, fmt, higher in FIGURES:
        if key not in measure:
            continue
        row = {"figure": label, "measure": key, "field": field, "higher_is_better": higher}
        for side in sides:
            vals = [_value(r, key, field) for r in runs if r["side"] == side.name]
            ok = [v for v in vals if v is not None]
            row[side.name] = {"raw": vals, "median": statistics.median(ok) if ok else None}
        b, a = row["before"]["median"], row["after"]["median"]
        row["change"] = (a / b - 1.0) if (a is not None and b) else None
        rows.append(row)
    return rows


def markdown(meta, sides, runs, rows, measure):
    fmts = {(k, f): fmt for _, k, f, fmt, _ in FIGURES}
    L = ["# coretask before/after: alternating runs, medians of %d" % meta["rounds"], ""]
    L.append("- date: %s; total %.0f s; %s counts%s" % (
        meta["date"], meta["duration_s"], "short (`--short`, indicative only)" if meta["short"] else "full",
        "" if meta["short"] else " (as in docs/benchmarks.md)"))
    L.append("- command: `%s`" % meta["command"])
    L.append("- order: %s" % ", ".join("%s" % r["side"] for r in runs))
    L.append("- harness: `benchmarks/` of %s (commit %s), copied beside no coretask; each run is "
             "`python -m benchmarks.run --only coretask --runs 1 --measure %s%s` with its own private "
             "redis-server (%s)" % (meta["harness_root"], meta["harness_commit"], ",".join(measure),
                                    " --short" if meta["short"] else "", meta.get("redis") or "?"))
    L.append("- machine: %s cores, Python %s; 1-minute load average before each run: %s" % (
        os.cpu_count(), meta["python"], " / ".join(_fmt(r["loadavg_before"], "{:.2f}") for r in runs)))
    L.append("")
    L.append("| side | tree | venv python | `coretask.__file__` (venv check) | imported by the runs' processes |")
    L.append("|---|---|---|---|---|")
    for s in sides:
        seen = "; ".join("%s (%d)" % (p, n) for p, n in sorted(s.worker_paths.items())) or "none reported"
        L.append("| %s | %s | `%s` | `%s` | %s |" % (s.name, s.label(), s.python, s.coretask_file, seen))
    L.append("")
    L.append("Medians over the rounds (raw values in round order):")
    L.append("")
    L.append("| figure | before | after | after vs before | before, raw | after, raw |")
    L.append("|---|---:|---:|---:|---|---|")
    for row in rows:
        fmt = fmts[(row["measure"], row["field"])]
        ch = row["change"]
        chs = "-" if ch is None else "%+.1f%% (%s)" % (ch * 100, "higher is better" if row["higher_is_better"]
                                                    else "lower is better")
        L.append("| %s | %s | %s | %s | %s | %s |" % (
            row["figure"], _fmt(row["before"]["median"], fmt), _fmt(row["after"]["median"], fmt), chs,
            " / ".join(_fmt(v, fmt) for v in row["before"]["raw"]),
            " / ".join(_fmt(v, fmt) for v in row["after"]["raw"])))
    L.append("")
    cols = [(label, k, f, fmt) for label, k, f, fmt, _ in FIGURES if k in measure]
    cols += [c for c in CHECKS if c[1] in measure]
    L.append("Every run:")
    L.append("")
    L.append("| round | side | " + " | ".join(c[0] for c in cols) + " | load1 before | seconds | errors |")
    L.append("|---|---|" + "---:|" * len(cols) + "---:|---:|---|")
    for i, r in enumerate(runs):
        errs = [r["error"]] if r["error"] else []
        errs += ["%s: %s" % (k, (m.get("error") or m.get("status"))[:200])
                 for k, m in r["measurements"].items() if m.get("status") != "ok"]
        errs += ["%s not measured" % k for k in measure if k not in r["measurements"]]
        L.append("| %d | %s | %s | %s | %s | %s |" % (
            i // 2 + 1, r["side"], " | ".join(_fmt(_value(r, k, f), fmt) for _, k, f, fmt in cols),
            _fmt(r["loadavg_before"], "{:.2f}"), _fmt(r["seconds"], "{:.0f}"),
            "; ".join(e.replace("|", "/").replace("\n", " ") for e in errs) or ""))
    L.append("")
    L.append("Each run's own report and worker logs: `%s/<round>-<side>/`." % os.path.relpath(RUNS_DIR, ROOT))
    if meta["short"]:
        L.append("With `--short` the counts are small (no-op 4,000 tasks, latency 50, cancel 40 tasks on "
                 "2 x 20 threads instead of 200 on 2 x 100): a smoke test, not a comparison.")
    return "\n".join(L) + "\n"


def text_table(sides, rows):
    fmts = {(k, f): fmt for _, k, f, fmt, _ in FIGURES}
    head = ["figure", "before", "after", "change", "before raw", "after raw"]
    body = []
    for row in rows:
        fmt = fmts[(row["measure"], row["field"])]
        ch = row["change"]
        body.append([row["figure"], _fmt(row["before"]["median"], fmt), _fmt(row["after"]["median"], fmt),
                     "-" if ch is None else "%+.1f%%" % (ch * 100),
                     " / ".join(_fmt(v, fmt) for v in row["before"]["raw"]),
                     " / ".join(_fmt(v, fmt) for v in row["after"]["raw"])])
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="coretask alone, before vs after: alternating runs of the harness (python -m benchmarks.run "
                    "--only coretask --runs 1), medians over the rounds. Writes "
                    "benchmarks/results/compare-latest.{md,json}.")
    p.add_argument("--before", required=True, metavar="REF_OR_PATH",
                   help="git ref of this repository (checked out with git worktree add) or a coretask source tree")
    p.add_argument("--after", required=True, metavar="REF_OR_PATH", help="same, for the other side")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (before, after) runs; default 3")
    p.add_argument("--before-options", metavar="JSON", help="extra coretask Options for the before side, e.g. "
                   "'{\"result_ttl\": 60}' (the same tree on both sides measures what an option costs); "
                   "'{\"middleware\": \"prometheus,otel-sdk\"}' turns on the observability middleware")
    p.add_argument("--after-options", metavar="JSON", help="same, for the after side")
    p.add_argument("--measure", type=parse_measure, default=list(DEFAULT_MEASURE), metavar="KEY,...",
                   help="measurements (default %s; any of %s)" % (",".join(DEFAULT_MEASURE), ",".join(MEASUREMENTS)))
    p.add_argument("--short", action="store_true", help="the harness's small counts (smoke test, not a comparison)")
    p.add_argument("--lib-timeout", type=float, default=None,
                   help="hard limit in seconds for one run's suite (default 200 with --short, 900 otherwise)")
    p.add_argument("--redis-server", default="/usr/bin/redis-server", help="redis-server binary (default %(default)s)")
    p.add_argument("--reinstall", action="store_true", help="recreate both venvs")
    return p


def _sigterm(signum, frame):
    if _child is not None and _child.poll() is None:
        _child.send_signal(signal.SIGTERM)
    raise SystemExit(128 + signum)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.rounds = max(1, args.rounds)
    if args.lib_timeout is None:
        args.lib_timeout = 200.0 if args.short else 900.0
    signal.signal(signal.SIGTERM, _sigterm)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.monotonic()

    sides = [prepare_tree("before", args.before), prepare_tree("after", args.after)]
    for side, options in zip(sides, (args.before_options, args.after_options)):
        if options:
            json.loads(options)         # refuse a typo before any run
            side.options = options
    for s in sides:
        ensure_venv(s, args.reinstall)
    harness_root = stage_harness()
    runs = []
    try:
        for s in sides:
            import_check(s, harness_root)
        if RUNS_DIR.exists():
            shutil.rmtree(RUNS_DIR)
        for rnd in range(1, args.rounds + 1):
            for s in sides:
                tag = "r%d %s" % (rnd, s.name)
                runs.append(run_harness(s, harness_root, RUNS_DIR / ("%d-%s" % (rnd, s.name)), args, tag))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(harness_root, ignore_errors=True)

    mismatch = []
    for s in sides:
        for r in runs:
            if r["side"] == s.name:
                for path, n in r["coretask_paths"].items():
                    s.worker_paths[path] = s.worker_paths.get(path, 0) + n
        bad = [p for p in s.worker_paths if not _is_tree(p, s.tree)]
        if bad or not s.worker_paths:
            mismatch.append("%s: processes imported coretask from %s, expected %s"
                            % (s.name, ", ".join(bad) or "(nothing reported)", s.tree))

    _, harness_commit, _ = _git("rev-parse", "--short=10", "HEAD")
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "duration_s": round(time.monotonic() - t_start, 1),
        "command": "python -m benchmarks.compare " + " ".join(argv),
        "rounds": args.rounds, "short": args.short, "measure": list(args.measure),
        "harness_root": str(ROOT), "harness_commit": harness_commit,
        "python": sys.version.split()[0],
        "redis": next((r["redis"] for r in runs if r.get("redis")), None),
    }
    rows = summarize(sides, runs, args.measure)
    md = markdown(meta, sides, runs, rows, args.measure)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "compare-latest.md").write_text(md)
    data = {"meta": meta, "rows": rows, "runs": runs,
            "sides": [{"name": s.name, "spec": s.spec, "tree": str(s.tree), "commit": s.commit,
                       "uncommitted": s.changes, "python": str(s.python), "coretask_file": s.coretask_file,
                       "coretask_paths_seen": s.worker_paths} for s in sides]}
    (RESULTS_DIR / "compare-latest.json").write_text(json.dumps(data, indent=2) + "\n")

    print()
    for s in sides:
        print("%-6s %s\n       coretask: %s; seen in the runs' processes: %s" % (
            s.name, s.label(), s.coretask_file,
            ", ".join("%s (%d)" % kv for kv in sorted(s.worker_paths.items())) or "none"))
    print()
    print(text_table(sides, rows))
    missing = [r for r in rows if any(v is None for s in sides for v in r[s.name]["raw"])]
    for m in mismatch:
        print("ERROR: " + m)
    if missing:
        print("WARNING: some runs have no value for: " + ", ".join(r["figure"] for r in missing))
    print("\nwrote %s and %s (%.0f s)" % (RESULTS_DIR / "compare-latest.md", RESULTS_DIR / "compare-latest.json",
                                          meta["duration_s"]))
    return 1 if (mismatch or missing) else 0


if __name__ == "__main__":
    sys.exit(main())
