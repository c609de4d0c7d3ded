"""Soak test: a long run of coretask under faults, reconciled exactly at the end.

    python -m benchmarks.soak [--tasks N] [--seconds S] [--processes 2] [--threads 8]
                              [--kill-every 3] [--seed 1] [--server redis7] [--report PATH]

A private Redis (never the machine's 6379) serves one worker manager (``python -m
coretask.worker``, P processes x T threads) while a producer enqueues N tasks over about S
seconds: single tasks and batches (each with an ``on="complete"`` continuation) for three tenants.
Meanwhile:

* tasks fail on purpose: each has a plan "fail the first k attempts" (k = 0, 1, 2, or always)
  and a random number of retries (1-4: the attempts that may fail in all); a failed attempt is
  retried after a random short delay
  (``on_task_failed_delay``) or at once;
* random batches are canceled while they run;
* a random worker process is killed with SIGKILL every ``--kill-every`` seconds;
* everything is paused for a moment in the middle (and checked: no task starts while paused).

When the producer is done, the kills stop and the run drains. Then it reconciles exactly:

* every task id enqueued is accounted for as succeeded (its body returned and the task is gone),
  dead (in the dead letter list) or canceled (gone, its batch canceled, its body never returned);
  nothing is left queued, delayed, running or leased;
* each outcome agrees with the task's plan (a task planned to always fail never succeeds; one
  planned to succeed within its retries is dead only if kills used up its attempts);
* every batch has total == done + failed + canceled + remaining with remaining == 0, and
  done / failed equal its succeeded / dead tasks (canceled batches: failed equal, done at most);
  its continuation ran if and only if the batch was not canceled;
* tenant counters: failed == dead == the dead tasks of the tenant, done == the tasks acknowledged
  as succeeded;
* tasks that succeeded ran their body to the end once, except those whose worker was killed
  right after (their body returned in a process that was then killed: at least once, counted).

Worker RSS is sampled every second with psutil (each worker process and the manager). The
report is printed and, with ``--report``, appended to a Markdown file. Exit code 0 when the
reconciliation found nothing wrong.

The task functions below are imported by reference by the worker processes (``--app
benchmarks.soak:app``); they record into the same private server under the run's prefix.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from coretask import TaskContext

ROOT = Path(__file__).resolve().parent.parent
ALWAYS = 99               # "fail the first 99 attempts": never succeeds
QUEUE = "default"
TENANTS = ("acme", "globex", "initech")

# ------------------------------------------------------------------- in the worker processes

_client: Any = None
_client_lock = threading.Lock()


def _r() -> Any:
    global _client
    with _client_lock:
        if _client is None:
            import redis
            _client = redis.Redis.from_url(os.environ["SOAK_URL"])
        return _client


def app() -> Any:
    """The TaskProcessor of the soak's worker processes."""
    from coretask import Options, TaskProcessor
    opts = json.loads(os.environ.get("SOAK_OPTIONS", "{}"))
    return TaskProcessor(Options(redis=os.environ["SOAK_URL"], prefix=os.environ["SOAK_PREFIX"],
                                 on_task_failed_delay=failed_delay, **opts))


def failed_delay(ctx: TaskContext, retries_left: int) -> timedelta | None:
    """Half of the retries wait 10-150 ms in the delayed set, the other half go back at once."""
    n = random.random()
    return timedelta(milliseconds=10 + int(n * 280)) if n < 0.5 else None


def work(key: str, fail_first: int, ms: int, ctx: TaskContext) -> None:
    """Fail attempts 1..fail_first, else take ``ms`` and record the successful run."""
    r = _r()
    r.hincrby(key + ":starts", ctx.task_id, 1)
    if ctx.attempt <= fail_first:
        r.hincrby(key + ":fails", ctx.task_id, 1)
        raise RuntimeError(f"planned failure {ctx.attempt} of {fail_first}")
    if ms:
        time.sleep(ms / 1000)
    pipe = r.pipeline(transaction=True)        # both records or neither, whatever kills us
    pipe.hincrby(key + ":ok", ctx.task_id, 1)
    pipe.rpush(key + ":okpid", f"{ctx.task_id} {os.getpid()}")
    pipe.execute()


# ------------------------------------------------------------------------------ the driver

@dataclasses.dataclass
class Planned:
    id: str
    fail_first: int
    retries: int
    tenant: str
    batch: str | None = None
    continuation: bool = False


@dataclasses.dataclass
class SoakConfig:
    tasks: int = 200_000
    seconds: float | None = None        # spread the enqueues over about this long
    processes: int = 2
    threads: int = 8
    kill_every: float = 3.0
    seed: int = 1
    server: str = "redis7"
    pause_seconds: float = 1.5
    cancel_share: float = 0.15          # share of batches canceled while they run
    drain_timeout: float | None = None
    log_dir: str | None = None
    quiet: bool = False


@dataclasses.dataclass
class SoakReport:
    config: SoakConfig
    started: str = ""
    machine: str = ""
    server: str = ""
    duration: float = 0.0
    enqueued: int = 0
    batches: int = 0
    canceled_batches: int = 0
    kills: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    runs: int = 0
    planned_failures: int = 0
    recovered_after_kill: int = 0
    reran_after_kill: int = 0            # succeeded tasks whose body returned more than once
    dead_by_kills: int = 0               # planned to succeed, dead because kills used their attempts
    paused_ok: bool = False
    rss: dict[str, Any] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    manager_log: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        o, rss, c = self.outcomes, self.rss, self.config
        kills = f"SIGKILL every {c.kill_every:g} s" if c.kill_every > 0 else "no kills"
        rate = self.enqueued / max(self.duration, 1e-9)
        verdict = "exact, no discrepancy" if self.ok else f"{len(self.errors)} DISCREPANCIES"
        return [
            f"- date: {self.started}; machine: {self.machine}; server: {self.server}",
            f"- workers: {c.processes} processes x {c.threads} threads; {kills}; seed {c.seed}",
            (f"- tasks: {self.enqueued:,} enqueued ({self.batches:,} batches, {self.canceled_batches:,} canceled "
             f"while running) in {self.duration:.0f} s ({rate:,.0f} tasks/s end to end)"),
            (f"- outcomes: succeeded {o.get('succeeded', 0):,}, dead {o.get('dead', 0):,}, "
             f"canceled {o.get('canceled', 0):,}; runs {self.runs:,} (planned failures {self.planned_failures:,})"),
            (f"- kills: {self.kills} worker processes; {self.recovered_after_kill} tasks taken back from them; "
             f"{self.reran_after_kill} succeeded tasks ran to the end twice (killed before the acknowledgement); "
             f"{self.dead_by_kills} dead because kills used up their attempts"),
            f"- pause/resume in the middle: {'no task started while paused' if self.paused_ok else 'FAILED'}",
            (f"- worker RSS: manager {rss.get('manager_first_mb', 0):.1f} -> {rss.get('manager_last_mb', 0):.1f} MB; "
             f"worker processes {rss.get('workers_first_mb', 0):.1f} -> {rss.get('workers_last_mb', 0):.1f} MB "
             f"(sum), largest {rss.get('worker_max_mb', 0):.1f} MB, longest-lived worker "
             f"{rss.get('longest_first_mb', 0):.1f} -> {rss.get('longest_last_mb', 0):.1f} MB over "
             f"{rss.get('longest_seconds', 0):.0f} s"),
            f"- reconciliation: {verdict}",
            *[f"  - {e}" for e in self.errors[:20]],
        ]


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.c = config
        self.rnd = random.Random(config.seed)
        self.prefix = "{soak-" + uuid.uuid4().hex[:8] + "}"
        self.key = self.prefix + ":soak"
        self.planned: dict[str, Planned] = {}
        self.batches: dict[str, list[str]] = {}
        self.continuations: dict[str, str] = {}
        self.canceled: set[str] = set()
        self.killed: set[int] = set()
        self.kill_times: list[float] = []
        self.paused = threading.Event()
        self.producing = threading.Event()
        self.report = SoakReport(config)
        self.rss_samples: dict[int, list[tuple[float, int]]] = defaultdict(list)
        self.manager_rss: list[int] = []

    def say(self, text: str) -> None:
        if not self.c.quiet:
            print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)

    # ---------------------------------------------------------------------------------- run

    def run(self) -> SoakReport:
        from coretask import Options, TaskProcessor
        from coretask.embedded.servers import RedisServer, find_server_binary

        rep = self.report
        rep.started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rep.machine = machine()
        began = time.monotonic()
        with RedisServer(binary=find_server_binary(self.c.server)) as server:
            rep.server = f"{Path(server.binary).name} {'.'.join(map(str, server.version))}"
            self.url = server.url
            self.r = server.client()
            self.p = TaskProcessor(Options(redis=server.url, prefix=self.prefix))
            manager = self.start_manager()
            try:
                self.drive(manager)
            finally:
                self.stop_manager(manager)
            rep.duration = time.monotonic() - began
            self.reconcile()
            self.p.close()
        return rep

    def start_manager(self) -> subprocess.Popen[bytes]:
        log_dir = Path(self.c.log_dir or tempfile.mkdtemp(prefix="coretask-soak-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"soak-manager-{self.prefix[6:14]}.log"
        options = {"base_frequency": 1.0, "pushback_frequency": 1.0, "cleanup_frequency": 3600,
                   "invisibility": 10.0, "shutdown_timeout": 10.0, "retention": 86400}
        env = dict(os.environ, SOAK_URL=self.url, SOAK_PREFIX=self.prefix, SOAK_OPTIONS=json.dumps(options),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        with open(self.log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "coretask.worker", "--app", "benchmarks.soak:app",
                 "--processes", str(self.c.processes), "--threads", str(self.c.threads)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.report.manager_log = str(self.log_path)
        deadline = time.monotonic() + 60
        while len(self.children(proc.pid)) < self.c.processes or self.log_text().count(" started: queues=") < \
                self.c.processes:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker manager did not start; log:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return proc

    def stop_manager(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @staticmethod
    def children(pid: int) -> list[Any]:
        import psutil
        try:
            return [c for c in psutil.Process(pid).children()
                    if "resource_tracker" not in " ".join(c.cmdline())]
        except psutil.Error:
            return []

    def drive(self, manager: subprocess.Popen[bytes]) -> None:
        stop = threading.Event()
        self.producing.set()
        helpers = [threading.Thread(target=f, args=(stop, manager), daemon=True, name=f.__name__)
                   for f in (self.killer, self.canceller, self.sampler)]
        for t in helpers:
            t.start()
        try:
            self.produce()
        finally:
            self.producing.clear()
            for t in helpers[:2]:       # no kills nor cancels while draining
                t.join(30)
        self.say(f"enqueued {len(self.planned):,} tasks; {len(self.killed)} kills; draining")
        try:
            self.drain()
        finally:
            stop.set()
            helpers[2].join(10)

    def produce(self) -> None:
        c = self.c
        rnd = self.rnd
        n = c.tasks
        seconds = c.seconds if c.seconds is not None else n / 1500
        start = time.monotonic()
        pause_at = n // 2
        done = 0
        paused_done = False
        last_report = start
        while done < n:
            if not paused_done and done >= pause_at:
                self.pause_check()
                paused_done = True
                start += c.pause_seconds           # the pause is not part of the pacing
            if rnd.random() < 0.3:
                self.enqueue_single()
                done += 1
            else:
                size = min(rnd.randint(10, 120), n - done)
                self.enqueue_batch(size)
                done += size
            ahead = start + seconds * done / n - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                q = self.p.get_queue(QUEUE)
                self.say(f"{done:,}/{n:,} enqueued; queued {q.queued:,}, in flight {q.in_flight}, "
                         f"delayed {q.delayed}, dead {q.dead:,}; kills {len(self.killed)}")

    def plan(self) -> tuple[int, int]:
        x = self.rnd.random()
        fail_first = 0 if x < 0.7 else 1 if x < 0.82 else 2 if x < 0.9 else 4 if x < 0.95 else ALWAYS
        return fail_first, self.rnd.randint(1, 4)       # retries: attempts that may fail in all

    def duration(self) -> int:
        """Milliseconds a successful run takes: mostly nothing, 5% take 50 ms."""
        x = self.rnd.random()
        return 0 if x < 0.5 else 1 if x < 0.75 else 5 if x < 0.95 else 50

    def enqueue_single(self) -> None:
        fail_first, retries = self.plan()
        tenant = self.rnd.choice(TENANTS)
        tid = self.p.enqueue_task(QUEUE, tenant, work, self.key, fail_first, self.duration(),
                                  retries=retries)
        self.planned[tid] = Planned(tid, fail_first, retries, tenant)

    def enqueue_batch(self, size: int) -> None:
        tenant = self.rnd.choice(TENANTS)
        plans = [self.plan() for _ in range(size)]
        made: list[Planned] = []

        def build(b: Any) -> None:
            for fail_first, retries in plans:
                tid = b.enqueue(work, self.key, fail_first, self.duration(), retries=retries)
                made.append(Planned(tid, fail_first, retries, tenant))
            cid = b.continue_with(work, self.key, 0, 0, on="complete")
            made.append(Planned(cid, 0, self.p.options.retries, tenant, continuation=True))

        bid = self.p.enqueue_batch(QUEUE, tenant, build)
        for t in made:
            t.batch = bid
            self.planned[t.id] = t
        self.batches[bid] = [t.id for t in made if not t.continuation]
        self.continuations[bid] = next(t.id for t in made if t.continuation)

    def pause_check(self) -> None:
        """pause(); once the tasks fetched just before it have started, no task may start until
        resume() (the kills are suspended meanwhile: a redelivery would start a task)."""
        self.paused.set()
        time.sleep(0.2)                 # let a kill in progress finish
        self.p.pause()
        time.sleep(0.5)                 # tasks fetched before pause() returned may still start
        before = self.total(":starts")
        time.sleep(self.c.pause_seconds)
        after = self.total(":starts")
        self.p.resume()
        self.paused.clear()
        self.report.paused_ok = after == before
        if after != before:
            self.report.errors.append(f"{after - before} task runs started while everything was paused")
        self.say(f"paused {self.c.pause_seconds:g} s: {after - before} starts meanwhile; resumed")

    def total(self, suffix: str) -> int:
        return sum(int(v) for v in self.r.hvals(self.key + suffix))

    def killer(self, stop: threading.Event, manager: subprocess.Popen[bytes]) -> None:
        if self.c.kill_every <= 0:      # no kills: long-lived workers, for the RSS figures
            return
        rnd = random.Random(self.c.seed + 1)
        while self.producing.is_set() and not stop.wait(self.c.kill_every):
            if self.paused.is_set() or not self.producing.is_set():
                continue
            victims = [c for c in self.children(manager.pid) if c.pid not in self.killed]
            if victims:
                v = rnd.choice(victims)
                try:
                    os.kill(v.pid, signal.SIGKILL)
                    self.killed.add(v.pid)
                    self.kill_times.append(time.monotonic())
                except ProcessLookupError:
                    pass

    def canceller(self, stop: threading.Event, manager: subprocess.Popen[bytes]) -> None:
        rnd = random.Random(self.c.seed + 2)
        seen = 0
        while self.producing.is_set() and not stop.wait(0.05):
            if self.paused.is_set():
                continue
            ids = list(self.batches)
            fresh, seen = ids[seen:], len(ids)
            for bid in fresh:
                if rnd.random() < self.c.cancel_share:
                    # cancel it once some of its tasks ran: a batch canceled while it runs
                    threading.Timer(rnd.uniform(0.0, 0.05), self.cancel, args=(bid,)).start()

    def cancel(self, bid: str) -> None:
        if self.producing.is_set() and not self.paused.is_set() and self.p.cancel_batch(bid):
            self.canceled.add(bid)

    def sampler(self, stop: threading.Event, manager: subprocess.Popen[bytes]) -> None:
        import psutil
        while not stop.wait(1.0):
            now = time.monotonic()
            try:
                self.manager_rss.append(psutil.Process(manager.pid).memory_info().rss)
            except psutil.Error:
                pass
            for c in self.children(manager.pid):
                try:
                    self.rss_samples[c.pid].append((now, c.memory_info().rss))
                except psutil.Error:
                    pass

    def drain(self) -> None:
        timeout = self.c.drain_timeout or max(120.0, self.c.tasks / 200)
        deadline = time.monotonic() + timeout
        k = self.p.gateway.keys
        while True:
            q = self.p.get_queue(QUEUE)
            pipe = self.r.pipeline(transaction=False)
            pipe.zcard(k.leases)
            pipe.scard(k.publishing)
            pipe.zcard(k.delayed)
            leases, publishing, delayed = pipe.execute()
            if (q.queued, q.in_flight, q.delayed, leases, publishing, delayed) == (0, 0, 0, 0, 0, 0):
                return
            if time.monotonic() > deadline:
                self.report.errors.append(
                    f"not drained after {timeout:.0f} s: queued {q.queued}, in flight {q.in_flight}, delayed "
                    f"{q.delayed}, leases {leases}, publishing {publishing}")
                return
            time.sleep(0.2)

    # ---------------------------------------------------------------------------- reconcile

    def reconcile(self) -> None:
        rep, r, k, key = self.report, self.r, self.p.gateway.keys, self.key
        err = rep.errors.append
        rep.enqueued = len(self.planned)
        rep.batches = len(self.batches)
        rep.canceled_batches = len(self.canceled)
        rep.kills = len(self.killed)

        ok = {a.decode(): int(b) for a, b in r.hgetall(key + ":ok").items()}
        starts = {a.decode(): int(b) for a, b in r.hgetall(key + ":starts").items()}
        fails = {a.decode(): int(b) for a, b in r.hgetall(key + ":fails").items()}
        ok_pids: dict[str, list[int]] = defaultdict(list)
        for i in range(0, r.llen(key + ":okpid"), 10_000):
            for entry in r.lrange(key + ":okpid", i, i + 9_999):
                tid, pid = entry.decode().split()
                ok_pids[tid].append(int(pid))
        rep.runs = sum(starts.values())
        rep.planned_failures = sum(fails.values())
        dead_ids = [d.decode() for d in r.lrange(k.dead(QUEUE), 0, -1)]
        dead = set(dead_ids)
        if len(dead) != len(dead_ids):
            err("a task is twice in the dead letter list")
        tkeys = list(r.scan_iter(match=k.prefix + ":t:*", count=2000))
        pipe = r.pipeline(transaction=False)
        for tkey in tkeys:
            pipe.hget(tkey, "st")
        left = {tkey.decode().rsplit(":", 1)[1]: st or b"?" for tkey, st in zip(tkeys, pipe.execute())}
        dead_errors = {}
        pipe = r.pipeline(transaction=False)
        for tid in dead_ids:
            pipe.hget(k.task(tid), "et")
        for tid, et in zip(dead_ids, pipe.execute()):
            dead_errors[tid] = (et or b"").decode()

        outcome: dict[str, str] = {}
        for tid, t in self.planned.items():
            if tid in dead:
                outcome[tid] = "dead"
                if left.get(tid) != b"dead":
                    err(f"task {tid} is in the dead letter list in state {left.get(tid)!r}")
            elif tid in left:
                err(f"task {tid} is unaccounted for: still in state {left[tid].decode()}")
                outcome[tid] = "unaccounted"
            elif ok.get(tid):
                outcome[tid] = "succeeded"
            elif t.batch in self.canceled:
                outcome[tid] = "canceled"
            else:
                err(f"task {tid} is lost: gone from Redis without a successful run, batch {t.batch} not canceled")
                outcome[tid] = "lost"
        extra = set(left) - set(self.planned)
        if extra:
            err(f"{len(extra)} task hashes in Redis that were never enqueued by the soak, e.g. {sorted(extra)[:3]}")
        rep.outcomes = dict(Counter(outcome.values()))

        # outcomes against plans; runs of succeeded tasks
        killed = self.killed
        for tid, t in self.planned.items():
            o = outcome[tid]
            pids = ok_pids.get(tid, [])
            if len(pids) != ok.get(tid, 0):
                err(f"task {tid}: {ok.get(tid, 0)} successful runs counted but {len(pids)} recorded with a pid")
            if len(pids) > 1:
                if any(p in killed for p in pids[:-1]):
                    rep.reran_after_kill += 1
                else:
                    err(f"task {tid} ran to the end {len(pids)} times (pids {pids}) and none of them was killed")
            if o == "succeeded" and t.fail_first == ALWAYS:
                err(f"task {tid} planned to always fail succeeded")
            if o == "dead":
                if t.fail_first < t.retries and not t.continuation:     # it had an attempt left to succeed
                    if dead_errors.get(tid) == "WorkerLost":
                        rep.dead_by_kills += 1
                    else:
                        err(f"task {tid} planned to succeed within its {t.retries} retries is dead "
                            f"({dead_errors.get(tid)}) without kills using its attempts")
                if pids and dead_errors.get(tid) != "WorkerLost":
                    err(f"dead task {tid} ({dead_errors.get(tid)}) has a successful run")
            if t.continuation and o == "dead" and dead_errors.get(tid) != "WorkerLost":
                err(f"continuation {tid} is dead ({dead_errors.get(tid)})")

        # batches
        infos = {}
        for bid in self.batches:
            infos[bid] = self.p.get_batch(bid)
        for bid, ids in self.batches.items():
            b = infos[bid]
            if b is None:
                err(f"batch {bid} is gone")
                continue
            if b.total != len(ids) or b.total != b.done + b.failed + b.canceled + b.remaining or b.remaining != 0:
                err(f"batch {bid}: total {b.total} (enqueued {len(ids)}), done {b.done}, failed {b.failed}, "
                    f"canceled {b.canceled}, remaining {b.remaining}")
            n_ok = sum(1 for i in ids if outcome[i] == "succeeded")
            n_dead = sum(1 for i in ids if outcome[i] == "dead")
            cont = outcome[self.continuations[bid]]
            if bid in self.canceled:
                if b.state != "canceled":
                    err(f"batch {bid} was canceled but is {b.state}")
                if b.failed != n_dead or b.done > n_ok:
                    err(f"canceled batch {bid}: failed {b.failed} vs {n_dead} dead, done {b.done} vs {n_ok} succeeded")
                if cont != "canceled":
                    err(f"canceled batch {bid}: its continuation is {cont}")
            else:
                if (b.done, b.failed) != (n_ok, n_dead):
                    err(f"batch {bid}: done {b.done} / failed {b.failed}, but {n_ok} tasks succeeded / {n_dead} dead")
                if b.state != ("failed" if n_dead else "succeeded"):
                    err(f"batch {bid} is {b.state} with {n_dead} dead tasks")
                if cont != "succeeded" and not (cont == "dead" and dead_errors.get(self.continuations[bid]) == "WorkerLost"):
                    err(f"batch {bid} finished but its continuation is {cont}")

        # tenants and queue counters
        for tenant in TENANTS:
            s = self.p.get_tenant_stats(tenant)
            mine = [t for t in self.planned.values() if t.tenant == tenant]
            n_dead = sum(1 for t in mine if outcome[t.id] == "dead")
            n_ok = sum(1 for t in mine if outcome[t.id] == "succeeded")
            if (s.failed, s.dead) != (n_dead, n_dead):
                err(f"tenant {tenant}: failed {s.failed}, dead {s.dead}, but {n_dead} tasks are dead")
            # done counts acknowledged successes: a succeeded task misses only when its body
            # returned in a process killed before the acknowledgement and its batch was canceled
            # before the redelivery
            unacked = sum(1 for t in mine if outcome[t.id] == "succeeded" and t.batch in self.canceled
                          and any(p in killed for p in ok_pids.get(t.id, [])))
            if not 0 <= n_ok - s.done <= unacked:
                err(f"tenant {tenant}: done {s.done} but {n_ok} tasks succeeded ({unacked} maybe unacknowledged)")
            if s.running:
                err(f"tenant {tenant}: {s.running} tasks still counted as running")
        q = self.p.get_queue(QUEUE)
        if (q.queued, q.in_flight, q.delayed, q.dead) != (0, 0, 0, len(dead)):
            err(f"queue counters: queued {q.queued}, in flight {q.in_flight}, delayed {q.delayed}, "
                f"dead {q.dead} (dead list: {len(dead)})")
        if r.zcard(k.leases):
            err(f"{r.zcard(k.leases)} leases left")

        # kills, from the manager's log
        for line in self.log_text().splitlines():
            if "manager: tasks of" in line and "requeued=" in line:
                parts = dict(p.split("=") for p in line.rsplit(":", 1)[1].split())
                rep.recovered_after_kill += sum(int(v) for v in parts.values())
        if "Traceback" in self.log_text():
            err(f"a traceback in the worker log {self.log_path}")
        self.rss_report()

    def rss_report(self) -> None:
        mb = 1024 * 1024
        rss = self.report.rss
        if self.manager_rss:
            rss["manager_first_mb"], rss["manager_last_mb"] = self.manager_rss[0] / mb, self.manager_rss[-1] / mb
        samples = {pid: s for pid, s in self.rss_samples.items() if s}
        if not samples:
            return
        times = sorted({t for s in samples.values() for t, _ in s})
        first_t, last_t = times[0], times[-1]
        rss["workers_first_mb"] = sum(v for s in samples.values() for t, v in s if t == first_t) / mb
        rss["workers_last_mb"] = sum(v for s in samples.values() for t, v in s if t == last_t) / mb
        rss["worker_max_mb"] = max(v for s in samples.values() for _, v in s) / mb
        longest = max(samples.values(), key=lambda s: s[-1][0] - s[0][0])
        rss["longest_first_mb"], rss["longest_last_mb"] = longest[0][1] / mb, longest[-1][1] / mb
        rss["longest_seconds"] = longest[-1][0] - longest[0][0]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def run_soak(config: SoakConfig) -> SoakReport:
    return Soak(config).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=200_000, help="tasks to enqueue (default 200,000)")
    ap.add_argument("--seconds", type=float, help="spread the enqueues over about S seconds (default N/1500)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--kill-every", type=float, default=3.0,
                    help="seconds between two SIGKILLs of a worker process (0: no kills)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--server", default="redis7", choices=["redis7", "redis62", "valkey8"])
    ap.add_argument("--report", help="append the report to this Markdown file (e.g. benchmarks/results/soak.md)")
    ap.add_argument("--log-dir", help="where the worker manager's log goes (default: a temporary directory)")
    args = ap.parse_args(argv)
    config = SoakConfig(tasks=args.tasks, seconds=args.seconds, processes=args.processes, threads=args.threads,
                        kill_every=args.kill_every, seed=args.seed, server=args.server, log_dir=args.log_dir)
    report = run_soak(config)
    text = "\n".join(report.lines())
    print(text)
    print(f"worker manager log: {report.manager_log}")
    if args.report:
        path = Path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            command = shlex.join(["python", "-m", "benchmarks.soak", *(sys.argv[1:] if argv is None else argv)])
            f.write(f"\n## Soak run {report.started}: `{command}`\n\n{text}\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    # run the module under its importable name: the tasks are enqueued by reference, and worker
    # processes cannot import __main__:work
    from benchmarks.soak import main as _main
    sys.exit(_main())
