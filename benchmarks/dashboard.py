"""How long each dashboard page takes to render at scale (issue 14: every page under 200 ms).

    python -m benchmarks.dashboard [--tenants 1000] [--batches 10000] [--tasks 1000000] [--runs 5]

Starts its own redis-server (the Redis 7 binary coretask.embedded.servers finds; never the
machine's Redis), fills it through the public API with ``--tasks`` queued tasks in ``--batches``
batches spread over ``--tenants`` tenants (no worker runs, so everything stays queued), plus a
schedule per tenant and some delayed tasks, then renders every page with Flask's test client
and reports the median and the worst of ``--runs`` renders, server round trips included (the
browser's own rendering is not counted). Needs the dashboard extra (Flask).
"""
from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

from coretask import Options, ScheduleData, TaskProcessor
from coretask.embedded.servers import RedisServer, find_server_binary

from .dashboard_tasks import noop

QUEUE = "default"
BUDGET_MS = 200.0


def fill(p: TaskProcessor, tenants: int, batches: int, tasks: int) -> tuple[list[str], str]:
    per_batch = max(tasks // batches, 1)
    names = [f"tenant{i:05d}" for i in range(tenants)]
    t0 = time.monotonic()
    last_batch = ""
    for b in range(batches):
        tenant = names[b % tenants]
        last_batch = p.enqueue_batch(QUEUE, tenant, lambda bb: [bb.enqueue(noop, i) for i in range(per_batch)])
        if b % 1000 == 999:
            print(f"  {b + 1} batches ({(b + 1) * per_batch} tasks) in {time.monotonic() - t0:.0f}s", flush=True)
    for tenant in names:
        p.upsert_schedule(ScheduleData(f"{tenant}-nightly", tenant, QUEUE, None, "0 3 * * *"), noop, 0)
    for i in range(100):
        p.enqueue_task(QUEUE, names[i % tenants], noop, i, delay_until=timedelta(hours=1))
    return names, last_batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    import flask

    from coretask.dashboard import blueprint

    server = RedisServer(binary=find_server_binary("redis7")).start()
    try:
        p = TaskProcessor(Options(redis=server.url, prefix="{bench-dash}"))
        print(f"filling: {args.tasks} tasks in {args.batches} batches of {args.tenants} tenants", flush=True)
        names, batch_id = fill(p, args.tenants, args.batches, args.tasks)
        task_id = p.get_tasks_in_queue(QUEUE, 0, 1)[0].id
        app = flask.Flask("bench")
        app.secret_key = "bench"
        app.register_blueprint(blueprint(p), url_prefix="/d")
        client = app.test_client()
        last = names[-1]
        deep = args.tasks // 2
        pages = ["/d/", "/d/live/overview", f"/d/queues/{QUEUE}", f"/d/queues/{QUEUE}?page={deep // 25}",
                 f"/d/live/queue/{QUEUE}", f"/d/batches?tenant={last}", f"/d/live/batches?tenant={last}",
                 f"/d/batches/{batch_id}", f"/d/live/batch/{batch_id}", f"/d/schedules?tenant={last}", "/d/tenants",
                 f"/d/tenants?page={args.tenants // 25}", "/d/workers", f"/d/tasks/{task_id}",
                 f"/d/search?q={batch_id}"]
        used = server.client().info("memory")["used_memory_human"]
        print(f"\nqueued {p.get_queue(QUEUE).queued}, tenants {p.get_tenants_count()}, Redis memory {used}\n")
        print(f"{'page':<48} {'median ms':>10} {'worst ms':>9}")
        over = 0
        for path in pages:
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                status = client.get(path).status_code
                times.append((time.perf_counter() - t0) * 1000)
                assert status in (200, 302), (path, status)
            med, worst = statistics.median(times), max(times)
            over += med > BUDGET_MS
            print(f"{path.replace(batch_id, '<batch>').replace(task_id, '<task>'):<48} {med:>10.1f} {worst:>9.1f}")
        print(f"\n{len(pages) - over} of {len(pages)} pages under {BUDGET_MS:.0f} ms (median)")
        p.close()
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
