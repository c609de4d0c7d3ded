"""Formatting of results: the stdout table and results/latest.md."""

import json

COLUMNS = [
    # (header, measurement key, field in median, format)
    ("single enq/s", "single_enqueue", "value", "{:,.0f}"),
    ("bulk enq/s", "bulk_enqueue", "value", "{:,.0f}"),
    ("no-op/s 1 proc", "noop_1p", "value", "{:,.0f}"),
    ("no-op/s 2 proc", "noop_2p", "value", "{:,.0f}"),
    ("CPU eff. 2 proc", "cpu_efficiency", "value", "{:.0%}"),
    ("latency p50 ms", "latency", "p50", "{:.1f}"),
    ("latency p99 ms", "latency", "p99", "{:.1f}"),
    ("RSS growth MB", "rss_growth", "value", "{:+.1f}"),
]

EXTRA_COLUMNS = [
    ("cancel p50 ms", "cancel_latency", "p50", "{:.1f}"),
    ("cancel p99 ms", "cancel_latency", "p99", "{:.1f}"),
    ("cancel: running", "cancel_latency", "running", "{:.0f}"),
    ("cancel: not cancelled", "cancel_latency", "not_cancelled", "{:.0f}"),
    ("pause p99 ms", "pause_latency", "p99", "{:.1f}"),
]

MEANINGS = [
    ("single enq/s", "tasks enqueued per second by one producer, one library call per no-op task "
                     "(no workers running)."),
    ("bulk enq/s", "the same with the library's bulk API (rq `enqueue_many`, celery `group().apply_async()`, "
                   "dramatiq `group().run()`, coretask `enqueue_batch`; huey has none: n/a), in chunks of 1,000."),
    ("no-op/s 1 proc / 2 proc", "N no-op tasks (one INCR each) are queued first, then the workers are started; "
                                "the processing rate while the counter goes from 10% to 90% of N (worker start-up "
                                "is in the raw runs: `first_task_after_s`, and `with_start_up` = N / (start of the "
                                "worker command to the counter reaching N))."),
    ("CPU eff. 2 proc", "tasks of ~20 ms pure-Python work on 2 worker processes, one task at a time per process "
                        "(already started and idle): "
                        "ideal time = total CPU work / 2, where the total is the sum of each task's own thread CPU "
                        "time measured in the worker (`time.thread_time`); efficiency = ideal / actual (time from "
                        "the first enqueue to the last task done). 100% = both cores fully used by task code."),
    ("latency p50/p99 ms", "idle workers (2 processes); tasks sent one at a time with a random 10-30 ms pause; "
                           "latency = time.time() at the start of the task body minus time.time() just before "
                           "the enqueue call."),
    ("RSS growth MB", "sum of RSS of the worker processes (the worker command and all its descendants, psutil) "
                      "after N no-op tasks minus before them (after a 200-task warm-up)."),
    ("cancel p50/p99 ms (coretask)", "a batch of spinning pure-Python tasks, all running (2 processes x many "
                                     "threads), then `cancel_batch`; latency = each task's thread leaving the task "
                                     "(`finally`) minus the return of `cancel_batch`; a task that ran to its "
                                     "natural end (30 s) or did not leave within 40 s counts as not cancelled "
                                     "(and as 40 s in the percentiles)."),
    ("pause p99 ms (coretask)", "under a steady stream of tasks, `pause()`; latency = latest task start "
                                "recorded minus the return of `pause()` (0 if none started after it); "
                                "p99 over the trials."),
]


def cell(res, key, field, fmt):
    m = (res.get("measurements") or {}).get(key)
    if m is None:
        if res.get("error"):
            return "pending" if str(res["error"]).startswith("pending") else "error"
        return "-"
    status = m.get("status")
    if status in ("n/a", "pending"):
        return status
    med = m.get("median") or {}
    v = med.get(field)
    if v is None:
        return "error" if status == "error" else "-"
    s = fmt.format(v)
    if status == "error":
        s += "*"  # some runs failed
    return s


def _has_extras(data):
    return any(any(k in (r.get("measurements") or {}) for _, k, _, _ in EXTRA_COLUMNS) for r in data["results"])


def _rows(data, columns):
    return [[r["library"]] + [cell(r, k, f, fmt) for _, k, f, fmt in columns] for r in data["results"]]


def _extra_rows(data):
    """Rows of the coretask-only table: only libraries that have those measurements."""
    return [row for row, r in zip(_rows(data, EXTRA_COLUMNS), data["results"])
            if r["library"] == "coretask" or any(k in (r.get("measurements") or {}) for _, k, _, _ in EXTRA_COLUMNS)]


def _text_table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def _md_table(headers, rows, numeric=True):
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join(["---"] + [("---:" if numeric else "---")] * (len(headers) - 1)) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(out)


def table_text(data):
    m = data["meta"]
    s = "Medians of %d run(s)%s\n" % (m["runs"], " (--short)" if m["short"] else "")
    s += _text_table(["library"] + [c[0] for c in COLUMNS], _rows(data, COLUMNS))
    if _has_extras(data):
        s += "\n\n" + _text_table(["library"] + [c[0] for c in EXTRA_COLUMNS], _extra_rows(data))
    errs = errors(data)
    if errs:
        s += "\n\nErrors:\n" + "\n".join("  %s / %s: %s" % e for e in errs)
    return s


def row_text(res):
    cells = ["%s=%s" % (h, cell(res, k, f, fmt)) for h, k, f, fmt in COLUMNS + EXTRA_COLUMNS
             if (res.get("measurements") or {}).get(k) is not None or k not in ("cancel_latency", "pause_latency")]
    s = "-- %s (%s, %.0f s): %s" % (res["library"], res.get("version"), res.get("suite_seconds", 0), "; ".join(cells))
    if res.get("error"):
        s += "\n   ERROR: " + str(res["error"])
    return s


def errors(data):
    out = []
    for r in data["results"]:
        if r.get("error"):
            out.append((r["library"], "suite", _one_line(r["error"])))
        for k, m in (r.get("measurements") or {}).items():
            if m.get("status") in ("error", "pending"):
                out.append((r["library"], k, m["status"] + ": " + _one_line(m.get("error"))))
    return out


def _one_line(s, n=400):
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _round(v):
    if isinstance(v, float):
        return float("%.4g" % v)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def markdown(data):
    m = data["meta"]
    mach = m["machine"]
    c = m["counts"]
    L = []
    L.append("# Benchmarks: coretask vs rq, celery, dramatiq, huey")
    L.append("")
    L.append("Generated by `%s` on %s (took %.0f s). Medians of %d run(s) per figure; the private "
             "Redis is FLUSHALLed before every run.%s"
             % (m["command"], m["date"], m["duration_s"], m["runs"],
                " **Short (smoke-test) mode: small task counts, numbers are indicative only.**" if m["short"] else ""))
    L.append("")
    L.append("## Results")
    L.append("")
    L.append(_md_table(["library"] + [x[0] for x in COLUMNS], _rows(data, COLUMNS)))
    L.append("")
    if _has_extras(data):
        L.append("coretask-only:")
        L.append("")
        L.append(_md_table(["library"] + [x[0] for x in EXTRA_COLUMNS], _extra_rows(data)))
        L.append("")
    L.append("`n/a` = the library has no such API; `pending` = the coretask API is not there yet; "
             "`error` = the measurement failed (see Errors); `*` = some runs failed.")
    L.append("")
    L.append("Task counts: single enqueue %s, bulk enqueue %s, no-op throughput %s, CPU %s x %.1f ms "
             "(%d loop iterations), latency %s, RSS %s; coretask cancel %s tasks on 2 x %s threads, "
             "pause %s trials."
             % (f"{c['single']:,}", f"{c['bulk']:,}", f"{c['noop']:,}", c["cpu"], m["cpu_task_ms"],
                m["cpu_loops"], c["latency"], f"{c['rss']:,}", c["cancel_tasks"], c["cancel_threads"],
                c["pause_trials"]))
    L.append("")
    L.append("## What the figures mean")
    L.append("")
    for k, v in MEANINGS:
        L.append("- **%s**: %s" % (k, v))
    L.append("")
    L.append("All libraries run the same task bodies (`benchmarks/tasks.py`): a no-op that does one `INCR`, a "
             "calibrated ~20 ms sum of squares, and a task that records `time.time()` at its start. "
             "No library keeps results (fire-and-forget).")
    L.append("")
    L.append("## Machine")
    L.append("")
    for k, label in (("uname", "uname -a"), ("cpu_model", "CPU"), ("cores", "cores"), ("memory", "memory"),
                     ("python", "Python"), ("redis", "Redis server"), ("redis_py", "redis-py"),
                     ("hiredis", "hiredis"), ("psutil", "psutil")):
        L.append("- %s: `%s`" % (label, mach.get(k)))
    L.append("- 1-minute load average before the run: `%s`" % m.get("loadavg_before"))
    L.append("")
    L.append("## Libraries and worker configuration")
    L.append("")
    rows = []
    for r in data["results"]:
        rows.append([r["library"], r.get("version") or "?", r.get("worker_config") or "?",
                     "`%s`" % (r.get("worker_commands") or {}).get("2p", "?"),
                     "%s s" % r.get("suite_seconds", "?"),
                     "%s / %s" % (r.get("loadavg_at_start", "?"), r.get("loadavg_at_end", "?"))])
    L.append(_md_table(["library", "version", "configuration", "worker command (2 processes)",
                        "suite time", "load avg start / end"], rows, numeric=False))
    L.append("")
    L.append("The 1-minute load average at the start and end of each library's suite shows whether "
             "anything else was using the %s cores during the measurement." % mach.get("cores"))
    L.append("")
    for r in data["results"]:
        if r.get("doc"):
            L.append("<details><summary>%s adapter notes</summary>" % r["library"])
            L.append("")
            L.append(r["doc"])
            L.append("")
            L.append("</details>")
            L.append("")
    L.append("## Commands")
    L.append("")
    L.append("```")
    L.append("python -m benchmarks            # full run (3 runs per figure)")
    L.append("python -m benchmarks --short    # smoke test, small counts, 1 run")
    L.append(m["command"] + "    # this report")
    L.append("```")
    L.append("")
    errs = errors(data)
    if errs:
        L.append("## Errors")
        L.append("")
        for lib, key, msg in errs:
            L.append("- %s / %s: %s" % (lib, key, msg.replace("\n", " ")))
        L.append("")
    L.append("## Raw runs")
    L.append("")
    for r in data["results"]:
        L.append("### %s" % r["library"])
        L.append("")
        for k, mm in (r.get("measurements") or {}).items():
            runs = [_round(x) for x in mm.get("runs") or []]
            L.append("- %s (%s): %s" % (k, mm.get("status"), json.dumps(runs)))
        L.append("")
    return "\n".join(L) + "\n"
