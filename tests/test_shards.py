"""Shards (Options.shards): one deployment over several hash tags. On the session's server: a
tenant's work lands under its shard's prefix and nowhere else, ids name their shard, one worker
runs every shard's tasks exactly once, pause / queue pause / tenant pause hold on every shard
when the call returns, an idle shard costs no fetches, a schedule ticks once per tick on its
tenant's shard, and a deployment that turns sharding on moves no key. The cluster's side (each
shard on another master, a failover that stops only its own shard) is in test_shards_cluster.py.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from collections.abc import Callable
from typing import Any

import pytest

from coretask import ConfigurationError, Options, ScheduleData, StoreUnavailable, TaskProcessor
from coretask.cli import main as cli_main
from coretask.gateway.shards import shard_of_id, shard_prefixes, stable_shard, with_shard
from redis.crc import key_slot
from tests import tasks, tasks_sched
from tests.conftest import wait_until
from tests.test_cancel_pause import NEGATIVE_WINDOW
from tests.test_schedules import assert_one_run_per_tick, ticks

PLACED = {"acme": 0, "globex": 1, "initech": 2}


# ------------------------------------------------------------------------- pure addressing

def test_shard_zero_keeps_the_prefix_and_each_shard_gets_its_own_slot_range() -> None:
    for n in (2, 3, 5, 16):
        prefixes = shard_prefixes("{coretask}", n)
        assert prefixes[0] == "{coretask}" and len(set(prefixes)) == n
        segments = [key_slot(p.encode()) * n // 16384 for p in prefixes]
        assert sorted(segments) == list(range(n)), (n, prefixes)     # one shard per slot range
        assert shard_prefixes("{coretask}", n) == prefixes          # the same in every process
    assert shard_prefixes("app:{jobs}:x", 2)[1].startswith("app:{jobs~1") and shard_prefixes("{a}", 1) == ["{a}"]
    assert shard_prefixes("plain", 3) == ["plain", "plain~1", "plain~2"]     # no tag: a standalone server


def test_ids_name_their_shard_and_shard_zero_ids_are_unchanged() -> None:
    assert with_shard("ab12", 0) == "ab12" and shard_of_id("ab12", 3) == 0
    assert shard_of_id(with_shard("ab12", 2), 3) == 2
    assert shard_of_id("ab12.7", 3) == 0            # a shard this deployment lacks: not found on 0
    assert {stable_shard(f"tenant-{i}", 4) for i in range(40)} == {0, 1, 2, 3}
    assert stable_shard("acme", 7) == stable_shard("acme", 7)


def test_bad_shard_options_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"Options.shards must be an integer >= 1"):
        Options(shards=0)
    with pytest.raises(ConfigurationError, match=r"shard_map\['big'\] is 3: a shard number from 0 to 2"):
        Options(shards=3, shard_map={"big": 3})
    with pytest.raises(ConfigurationError, match="at most 256"):
        Options(shards=1000)


# ------------------------------------------------------------------------- on a real server

@pytest.fixture
def sharded(make_processor: Callable[..., TaskProcessor]) -> Callable[..., TaskProcessor]:
    return lambda **opts: make_processor(**{"shards": 3, "shard_map": PLACED, **opts})


def stored_under(r: Any, p: TaskProcessor, task_id: str) -> list[int]:
    """The shards whose prefix holds the task's record."""
    return [s for s, prefix in enumerate(p.gateway.prefixes) if r.exists(f"{prefix}:t:{task_id}")]


def test_work_lands_on_its_tenants_shard_and_every_task_runs_once(sharded, embedded_worker, r, prefix):
    p = sharded(result_ttl=600)
    out = prefix + ":out"
    # Given tasks and a batch of three tenants placed on shards 0, 1, 2, and of hashed tenants
    ids = {t: [p.enqueue_task("default", t, tasks.record, out, f"{t}:{i}") for i in range(10)] for t in PLACED}
    others = [p.enqueue_task("default", f"tenant-{i}", tasks.record, out, f"tenant-{i}") for i in range(12)]
    batches = {t: p.enqueue_batch("default", t, lambda b, t=t: [b.enqueue(tasks.record, out, f"{t}:b{i}")
                                                                for i in range(5)]) for t in PLACED}
    # Then each id names its tenant's shard and its record is stored there alone
    for tenant, shard in PLACED.items():
        assert {shard_of_id(i, 3) for i in ids[tenant]} == {shard}
        assert stored_under(r, p, ids[tenant][0]) == [shard]
        assert shard_of_id(batches[tenant], 3) == shard
        assert all(shard_of_id(t.id, 3) == shard for t in p.get_batch_tasks(batches[tenant]))
    assert {shard_of_id(i, 3) for i in others} == {0, 1, 2}       # hashed tenants spread
    # and the reads sum the shards
    assert p.get_queue("default").queued == 30 + 12 + 15
    assert p.get_tenants(0, 100)[:3] == ["acme", "globex", "initech"] and p.get_tenants_count() == 15
    assert p.get_tenant_stats("globex").queued == {"default": 15}
    assert [p.get_tenant_stats(t).shard for t in PLACED] == list(PLACED.values())
    assert p.get_tenant_stats("tenant-0").shard == shard_of_id(others[0], 3)

    # When one worker runs
    embedded_worker(p)
    wait_until(lambda: r.llen(out) == 57, 20, "every task")
    # Then every task ran exactly once, every batch succeeded, and the counts reconcile
    runs = [v.decode() for v in r.lrange(out, 0, -1)]
    assert len(set(runs)) == 57
    for tenant in PLACED:
        b = p.wait_for_batch(batches[tenant], 20)
        assert (b.state, b.done, b.total) == ("succeeded", 5, 5)
        assert p.get_tenant_stats(tenant).done == 15
    wait_until(lambda: p.get_queue("default").in_flight == 0, 10, "acknowledgements")
    assert p.get_queue("default").queued == 0
    assert p.get_task(ids["initech"][0]).state == "succeeded"


def test_pause_holds_on_every_shard_when_the_call_returns(sharded, embedded_worker, r, prefix):
    p = sharded()
    out = prefix + ":out"
    embedded_worker(p)
    p.enqueue_task("default", "initech", tasks.record, out, "up")
    wait_until(lambda: r.llen(out) == 1, 10, "the worker running")
    # When everything is paused, then each shard's flag is set before the call returned
    p.pause()
    assert [g.is_paused() for g in p.gateway.shards] == [True, True, True] and p.is_paused
    for tenant in PLACED:
        p.enqueue_task("default", tenant, tasks.record, out, tenant)
    time.sleep(NEGATIVE_WINDOW)
    assert r.llen(out) == 1 and p.get_queue("default").queued == 3
    p.resume()
    wait_until(lambda: r.llen(out) == 4, 10, "all three after resume")
    # Queue and tenant pauses likewise hold on every shard
    p.pause_queue("default")
    assert [g.paused_queues() for g in p.gateway.shards] == [["default"]] * 3
    p.resume_queue("default")
    p.pause_tenant("globex")
    assert [g.is_tenant_paused("globex") for g in p.gateway.shards] == [True, True, True]
    p.enqueue_task("default", "globex", tasks.record, out, "globex-paused")
    p.enqueue_task("default", "acme", tasks.record, out, "acme-runs")
    wait_until(lambda: b"acme-runs" in r.lrange(out, 0, -1), 10, "the other tenant's task")
    time.sleep(NEGATIVE_WINDOW)
    assert b"globex-paused" not in r.lrange(out, 0, -1) and p.is_tenant_paused("globex")
    p.resume_tenant("globex")
    wait_until(lambda: b"globex-paused" in r.lrange(out, 0, -1), 10, "globex after resume")
    # And a worker's pause: every shard's fetch refuses that host
    p.pause_worker("web-7")
    assert [g.paused_workers() for g in p.gateway.shards] == [["web-7"]] * 3
    assert all(g.fetch("web-7:1:x", 4, 60_000, 0, ["default"]).paused for g in p.gateway.shards)
    p.resume_worker("web-7")
    assert p.get_paused_workers() == []


def test_calls_about_an_id_find_its_shard(sharded, embedded_worker, r, prefix):
    p = sharded(result_ttl=600)
    # Given a queued task of shard 2, a batch of shard 1 and a task of shard 1 that keeps a result
    queued = p.enqueue_task("default", "initech", tasks.record, prefix + ":never", 1, delay_until=timedelta(hours=1))
    batch = p.enqueue_batch("default", "globex", lambda b: [b.enqueue(tasks.spin, prefix + ":b", 60)])
    kept = p.enqueue_task("default", "globex", tasks.record, prefix + ":kept", 7)
    assert p.get_task(queued).state == "delayed" and p.get_batch(batch).total == 1
    # When a worker runs and the task and the batch are canceled by id
    embedded_worker(p)
    assert p.get_result(kept, wait=20) is None and p.get_task(kept).state == "succeeded"
    wait_until(lambda: p.get_batch(batch).running == 1, 20, "the batch's task running")
    assert p.cancel_task(queued) and p.cancel_batch(batch)
    # Then both end canceled on their own shard
    assert p.get_task(queued).state == "canceled"
    assert p.wait_for_batch(batch, 20).state == "canceled"
    assert p.tenant("acme").get_batch(batch) is None           # tenant scoping still holds


def test_an_idle_shard_costs_no_fetches(sharded, embedded_worker, r, prefix):
    # base_frequency 30 s: in this test only events make the worker fetch
    p = sharded(base_frequency=30)
    out = prefix + ":out"
    calls = [0, 0, 0]
    for s, g in enumerate(p.gateway.shards):
        def counted(*args: Any, _s: int = s, _f: Any = g.exchange, **kwargs: Any) -> Any:
            calls[_s] += 1
            return _f(*args, **kwargs)
        g.exchange = counted            # type: ignore[method-assign]
    embedded_worker(p)
    wait_until(lambda: all(calls), 10, "the first turn asking every shard")
    first = list(calls)
    # When 20 tasks of shard 1 run one after another
    for i in range(20):
        p.enqueue_task("default", "globex", tasks.record, out, i)
        wait_until(lambda i=i: r.llen(out) == i + 1, 10, f"task {i}")
    # Then shard 1 was asked for each, and the idle shards not once more
    assert calls[1] - first[1] >= 20
    assert (calls[0], calls[2]) == (first[0], first[2]), calls


def test_a_schedule_ticks_once_per_tick_on_its_tenants_shard(sharded, embedded_worker, r, prefix):
    p = sharded(use_cron_seconds=True)
    key = prefix + ":runs"
    shard_prefix = p.gateway.prefixes[2]
    embedded_worker(p)
    embedded_worker(p)          # two workers race for every tick
    p.upsert_schedule(ScheduleData("every-second", "initech", "default", None, "* * * * * *"),
                      tasks_sched.record_tick, key, shard_prefix)
    assert r.exists(f"{shard_prefix}:s:every-second") and not r.exists(f"{p.gateway.prefixes[0]}:s:every-second")
    assert p.get_schedule("every-second").tenant == "initech"
    wait_until(lambda: r.llen(key) >= 4, 15, "4 ticks")
    # a pause by id alone finds the schedule's shard; its ticks there enqueue nothing
    assert p.pause_schedule("every-second") is True
    assert r.hexists(f"{shard_prefix}:s:every-second", "ps")
    runs = r.llen(key)
    wait_until(lambda: p.get_schedule("every-second").skipped_paused >= 2, 15, "2 ticks skipped while paused")
    assert r.llen(key) <= runs + 1            # at most a tick claimed as the pause landed
    assert p.cancel_schedule("every-second", "initech")
    assert_one_run_per_tick(ticks(r, key), 4)
    assert p.get_schedule("every-second") is None and p.pause_schedule("every-second") is False


def test_schedules_of_the_shards_that_answer_tick_while_another_shard_is_down(sharded, embedded_worker, r, prefix,
                                                                               monkeypatch):
    # Given a schedule of initech (shard 2), and shard 1 answering every schedule read with
    # StoreUnavailable, as a master failing over does
    p = sharded(use_cron_seconds=True)
    key = prefix + ":runs"
    p.upsert_schedule(ScheduleData("every-second", "initech", "default", None, "* * * * * *"),
                      tasks_sched.record_tick, key, p.gateway.prefixes[2])

    def down(limit: int) -> Any:
        raise StoreUnavailable("shard 1 cannot be reached (simulated)")

    monkeypatch.setattr(p.gateway.shards[1]._g, "schedule_due", down)
    embedded_worker(p)
    # Then the schedule ticks on its own shard (a down shard kept every shard's schedules still)
    wait_until(lambda: r.llen(key) >= 3, 15, "3 ticks while shard 1 is down")


def test_turning_sharding_on_moves_no_key(make_processor, embedded_worker, r, prefix):
    # Given a one-shard deployment with queued work of tenant "old"
    one = make_processor()
    out = prefix + ":out"
    old = [one.enqueue_task("default", "old", tasks.record, out, i) for i in range(3)]
    before = sorted(r.scan_iter(match=f"{prefix}*")) if not hasattr(r, "get_nodes") else None
    # When the deployment restarts with three shards
    three = make_processor(shards=3)
    # Then "old" stays on shard 0 whatever its hash says, and its keys were not touched
    assert three.gateway.tenant_shard("old") == 0
    if before is not None:
        assert sorted(k for k in r.scan_iter(match=f"{prefix}*") if not k.endswith(b":tshard")) == before
    new = three.enqueue_task("default", "old", tasks.record, out, "new")
    assert shard_of_id(new, 3) == 0 and three.get_task(old[0]).state == "queued"
    # and a worker of the sharded deployment runs the old tasks and the new one
    embedded_worker(three)
    wait_until(lambda: r.llen(out) == 4, 10, "all four")


def test_a_shard_count_other_than_the_deployments_is_refused(make_processor, prefix):
    # Given a deployment whose first worker ran with three shards (its start records the count)
    three = make_processor(shards=3)
    three.gateway.check_shard_count()
    # Then a worker or a CLI command with any other count is refused, naming the count to set
    # (the hash tags of shards 1 and up depend on it: their work would be unseen)
    for other in (1, 2, 4):
        p = make_processor(shards=other)
        with pytest.raises(ConfigurationError, match=f"runs 3 shards .* Options.shards is {other}: .* "
                                                     "Set Options.shards=3"):
            p.run(threading.Event())
        assert cli_main(["status"], processor=p) == 2
    three.gateway.check_shard_count()       # the deployment's own count still passes


def test_pauses_set_before_sharding_hold_on_every_shard_once_a_worker_starts(make_processor, embedded_worker, r,
                                                                           prefix):
    # Given a one-shard deployment paused (globally, and its queue "low", and tenant "old"), with
    # a limit on tenant acme
    one = make_processor(queues=["default", "low"])
    one.pause()
    one.pause_queue("low")
    one.pause_tenant("old")
    one.pause_worker("web-7")
    one.set_tenant_limit("acme", 2)
    # When it restarts with three shards, work lands on shards 1 and 2, and a worker starts
    three = make_processor(queues=["default", "low"], shards=3, shard_map={"acme": 1, "old": 0, "globex": 2})
    out = prefix + ":out"
    for tenant, queue in (("acme", "default"), ("globex", "low"), ("old", "default")):
        three.enqueue_task(queue, tenant, tasks.record, out, tenant)
    embedded_worker(three)
    # Then the worker wrote every flag to every shard before it fetched, and nothing ran
    g = three.gateway
    wait_until(lambda: all(s.is_paused() and s.paused_queues() == ["low"] and s.paused_tenants() == ["old"]
                           and s.paused_workers() == ["web-7"] for s in g.shards), 10, "the flags on every shard")
    assert r.llen(out) == 0 and three.is_paused
    # ... and the limit, which acme's shard now enforces
    wait_until(lambda: [s.tenant_limits() for s in g.shards] == [{"acme": 2}] * 3, 10, "the limit on every shard")
    assert three.get_tenant_stats("acme").limit == 2
    # When the deployment resumes: acme runs; globex waits for its queue, old for its tenant
    three.resume()
    wait_until(lambda: r.lrange(out, 0, -1) == [b"acme"], 10, "acme's task")
    three.resume_queue("low")
    three.resume_tenant("old")
    wait_until(lambda: sorted(r.lrange(out, 0, -1)) == [b"acme", b"globex", b"old"], 10, "the others")


def test_rebalance_moves_a_paused_tenants_work_under_load_nothing_lost_or_doubled(make_processor, embedded_worker,
                                                                                 r, prefix):
    import threading

    p = make_processor(shards=3, result_ttl=600)
    out = prefix + ":out"
    tenant = "wanderer"
    home = p.get_tenant_shard(tenant)
    target = (home + 1) % 3
    # Given a worker busy with another tenant's stream, and the paused tenant's queued, delayed
    # (some due while the move runs) and batch tasks on its shard
    embedded_worker(p)
    p.pause_tenant(tenant)
    queued = [p.enqueue_task("default", tenant, tasks.record, out, f"q{i}") for i in range(300)]
    soon = [p.enqueue_task("default", tenant, tasks.record, out, f"s{i}", delay_until=timedelta(seconds=0.3))
            for i in range(20)]
    later = [p.enqueue_task("default", tenant, tasks.record, out, f"l{i}", delay_until=timedelta(hours=1))
             for i in range(5)]
    batch = p.enqueue_batch("default", tenant, lambda b: [b.enqueue(tasks.record, out, f"b{i}") for i in range(10)])
    stop = threading.Event()
    during: list[str] = []

    def stream() -> None:           # other tenants keep the worker busy; the mover's producer goes on
        i = 0
        while not stop.is_set():
            p.enqueue_task("default", "steady", tasks.record, out, f"steady{i}")
            during.append(p.enqueue_task("default", tenant, tasks.record, out, f"d{i}"))
            i += 1
            stop.wait(0.01)
    feeder = threading.Thread(target=stream, daemon=True)
    feeder.start()
    # and a move cut short: two tasks taken out of their shard and not stored anywhere yet
    cut, _ = p.gateway.shards[home].move_out(tenant, queued[:2], False)
    assert [i for i, _ in cut] == queued[:2] and p.get_task(queued[0]) is not None
    try:
        # When the tenant is rebalanced to another shard while all that runs
        moved, kept = p.rebalance_tenant(tenant, target)
    finally:
        stop.set()
        feeder.join(10)
    # Then new work goes to the new shard, and nothing of the tenant is left queued at home
    assert p.get_tenant_shard(tenant) == target
    assert shard_of_id(p.enqueue_task("default", tenant, tasks.record, out, "after"), 3) == target
    home_gw = p.gateway.shards[home]
    assert sum(home_gw.ready_counts("default", [tenant])) == 10        # the batch's tasks stay with it
    assert kept == 10 and moved >= 300 + 20 + 5 - 0
    assert not home_gw.moving()
    # and every old id still finds its task, on the new shard
    info = p.get_task(later[0])
    assert info is not None and info.state == "delayed"
    assert p.cancel_task(later[0]) and p.get_task(later[0]).state == "canceled"
    assert p.get_task(queued[0]).state == "queued"
    # When the tenant resumes, every task runs exactly once
    p.resume_tenant(tenant)
    expected = {f"q{i}" for i in range(300)} | {f"s{i}" for i in range(20)} | {f"b{i}" for i in range(10)}
    expected |= {f"d{i}" for i in range(len(during))} | {"after"}
    expected |= {f"l{i}" for i in range(1, 5)} - set()        # l0 was canceled; l1..l4 are an hour away

    def ran() -> list[str]:
        return [v.decode() for v in r.lrange(out, 0, -1) if not v.startswith(b"steady")]
    wait_until(lambda: set(ran()) >= expected - {f"l{i}" for i in range(1, 5)}, 30, "every due task")
    runs = ran()
    assert len(runs) == len(set(runs)), "a task ran twice"
    assert not any(v.startswith("l") for v in runs)
    assert p.wait_for_batch(batch, 20).state == "succeeded"
    assert p.get_tenant_stats(tenant).queued == {"default": 0}


def test_dead_letters_of_every_shard_are_retried_and_discarded_all_at_once(sharded, embedded_worker, r, prefix):
    # Given a dead task on each of the three shards
    p = sharded(retries=1)
    for tenant in PLACED:
        p.enqueue_task("default", tenant, tasks.always_fail, "planned")
    embedded_worker(p)
    wait_until(lambda: p.get_queue("default").dead == 3, 10, "three dead letters")
    p.pause()
    # When all of them are retried (no count): every shard's, not none; then all discarded
    assert p.retry_dead_tasks("default") == 3 and p.get_queue("default").queued == 3
    p.resume()
    wait_until(lambda: p.get_queue("default").dead == 3, 10, "dead again")
    assert p.discard_dead_tasks("default") == 3 and p.get_queue("default").dead == 0


KEY = "a-signing-key-of-32-characters-or-more"


def test_rebalance_signs_a_moved_task_again_and_leaves_signed_tasks_it_cannot_sign(make_processor, embedded_worker,
                                                                                   r, prefix):
    # Given a signed deployment of three shards, and tenant "mover" paused with queued, delayed
    # and batch work on shard 0 (its delayed batch task too)
    p = make_processor(shards=3, shard_map=None, signing_key=KEY)
    out = prefix + ":out"
    home = p.gateway.tenant_shard("mover")
    target = (home + 1) % 3
    p.pause_tenant("mover")
    queued = [p.enqueue_task("default", "mover", tasks.record, out, f"q{i}") for i in range(5)]
    soon = p.enqueue_task("default", "mover", tasks.record, out, "soon", delay_until=timedelta(seconds=1))
    batch = p.enqueue_batch("default", "mover", lambda b: (b.enqueue(tasks.record, out, "b0"),
                                                          b.enqueue(tasks.record, out, "b1", delay_until=timedelta(seconds=1))))
    # When a process without the signing key rebalances it: every signed task stays where it is
    # (under a new id its signature would not verify) and is counted as left, with the batch's two
    unsigned = make_processor(shards=3, shard_map=None)
    assert unsigned.rebalance_tenant("mover", target) == (0, 8)
    assert all(shard_of_id(t, 3) == home and p.get_task(t).state == "queued" for t in queued)
    # When one with the key rebalances it back and forth: each moved task is signed again
    assert p.rebalance_tenant("mover", home) == (0, 0)       # (only its new work's shard changed: back)
    assert p.rebalance_tenant("mover", target) == (6, 2)
    assert all(shard_of_id(p.gateway.forwarded(t) or t, 3) == target and p.get_task(t).state == "queued"
               for t in queued)
    # Then, resumed, every task runs once (a worker refuses a task whose signature does not verify)
    p.resume_tenant("mover")
    embedded_worker(p)
    want = {f"q{i}" for i in range(5)} | {"soon", "b0", "b1"}
    wait_until(lambda: {v.decode() for v in r.lrange(out, 0, -1)} == want, 15, "every task of the tenant")
    assert r.llen(out) == len(want) and p.get_queue("default").dead == 0
    assert p.wait_for_batch(batch, 10).state == "succeeded"
    wait_until(lambda: p.get_task(soon) is None, 10, "the delayed task acknowledged")


def test_the_cli_shows_shards_and_rebalances_a_paused_tenant(make_processor, server, prefix):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import FAST, ROOT

    p = make_processor(shards=3)
    tenant = "mover"
    home = p.get_tenant_shard(tenant)
    # (a read: where its first work would go, nothing recorded for a tenant never seen)
    assert home == stable_shard(tenant, 3) and p.gateway.shards[0].placement(tenant) is None
    ids = [p.enqueue_task("default", tenant, tasks.record, prefix + ":out", i) for i in range(5)]
    env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps({**FAST, "shards": 3}),
               PYTHONPATH=str(ROOT))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "coretask", "--app", "tests.app:processor", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    # The status shows each shard with its prefix and counts
    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert "SHARD" in status.stdout and all(x in status.stdout for x in p.gateway.prefixes)
    shards = json.loads(cli("status", "--json").stdout)["shards"]
    assert [s["queued"] for s in shards] == [5 if s["index"] == home else 0 for s in shards]
    # A rebalance of a tenant that is not paused is refused with the fix
    target = (home + 1) % 3
    refused = cli("rebalance", tenant, "--to", str(target))
    assert refused.returncode == 2 and f"python -m coretask --app tests.app:processor pause --tenant {tenant}" in refused.stderr
    # Paused, it moves the tenant's queued tasks, and says so
    assert cli("pause", "--tenant", tenant).returncode == 0 and p.is_tenant_paused(tenant)
    moved = cli("rebalance", tenant, "--to", str(target))
    assert moved.returncode == 0, moved.stderr
    assert f"new work goes to shard {target} (was {home}); 5 queued or delayed tasks moved" in moved.stdout
    assert [s.queued for s in p.get_shards()] == [5 if s == target else 0 for s in range(3)]
    # (the directory says so at once; this process's copy of it is trusted for 5 s more)
    assert p.get_task(ids[0]).state == "queued" and p.gateway.shards[0].placement(tenant) == target
    # (the old id finds the task, which shows the id it has now: its new shard's)
    assert shard_of_id(p.get_task(ids[0]).id, 3) == target and p.get_task(ids[0]).id != ids[0]
    task_out = json.loads(cli("task", ids[0], "--json").stdout)
    assert task_out["id"] == p.get_task(ids[0]).id
    assert cli("resume", "--tenant", tenant).returncode == 0 and not p.is_tenant_paused(tenant)
    tenant_out = cli("tenant", tenant)
    assert f"shard:    {target}" in tenant_out.stdout
    assert json.loads(cli("tenant", tenant, "--json").stdout)["shard"] == target
    header, row = cli("tenants").stdout.splitlines()[:2]
    assert header.split()[-1] == "SHARD" and row.split()[0] == tenant and row.split()[-1] == str(target)


def test_every_gateway_call_has_a_sharded_answer() -> None:
    """A Gateway method the API, the worker or the dashboard calls that ShardedGateway lacked
    would fail only with shards > 1; those it leaves out are the ones it calls on one shard."""
    from coretask.gateway.gateway import Gateway
    from coretask.gateway.shards import ShardedGateway

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}
    per_shard = {"forwarded_id", "move_done", "move_in", "move_out", "moving", "ping", "place", "placement",
                 "tenant_has_history", "tenant_limits"}
    assert public(Gateway) - public(ShardedGateway) == per_shard


def test_the_dashboard_shows_a_sharded_deployment_as_one(sharded, prefix):
    import flask

    from coretask.dashboard import blueprint

    p = sharded(result_ttl=600)
    tasks_of = {t: p.enqueue_task("default", t, tasks.record, prefix + ":out", t) for t in PLACED}
    batch = p.enqueue_batch("default", "initech", lambda b: [b.enqueue(tasks.record, prefix + ":out", 1)])
    app = flask.Flask(__name__)
    app.secret_key = "test"
    app.register_blueprint(blueprint(p), url_prefix="/dash")
    client = app.test_client()
    queue_page = client.get("/dash/queues/default").get_data(as_text=True)
    assert all(task_id[:12] in queue_page for task_id in tasks_of.values())
    for path in ("/dash/", "/dash/tenants", "/dash/batches?tenant=initech", f"/dash/batches/{batch}",
                 f"/dash/tasks/{tasks_of['globex']}", "/dash/workers", "/dash/schedules"):
        assert client.get(path).status_code == 200, path
    assert tasks_of["globex"][:12] in client.get(f"/dash/tasks/{tasks_of['globex']}").get_data(as_text=True)
    tenants_page = client.get("/dash/tenants").get_data(as_text=True)
    assert '<th class="num">shard</th>' in tenants_page
    assert all(f'<td class="num">{shard}</td>' in tenants_page for shard in PLACED.values())
    assert client.get(f"/dash/search?q={batch}").headers["Location"].endswith(f"/dash/batches/{batch}")


def test_closing_never_fails_on_a_shard_found_down(sharded):
    # Given a processor whose shard 0 was found unreachable (marked down: calls to it are refused
    # at once while it is probed in the background)
    p = sharded()
    p.gateway._health.down[0] = True
    from coretask import StoreUnavailable
    with pytest.raises(StoreUnavailable, match="shard 0"):
        p.get_queues()
    # When it is closed (the CLI's exit, an app's shutdown), then nothing is raised
    p.close()
