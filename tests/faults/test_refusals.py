"""Replies by which a server refuses a call for now (coretask/gateway/refusals.py): BUSY (a script
running past busy-reply-threshold), MISCONF (a failed snapshot blocks writes) and LOADING (a
restart reading a large dataset), each met by a worker manager and a producer under load on a
server of the test's own. The transport waits each one out for Options.busy_timeout; past it
the call raises StoreUnavailable with ``reason``; nothing is lost and the worker keeps running.

These need a single server of their own, not the session's: under --server cluster that would
be Redis 7 again, which the redis7 run covers (CI leaves the file out of its cluster run). Each server kind answers
with its own text (Redis 6.2 wraps a MISCONF met inside a script in a script error), which is
why they do run on redis7, redis62 and valkey8.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from redis.backoff import NoBackoff
from redis.retry import Retry

from coretask import ConfigurationError, Options, StoreUnavailable
from coretask.gateway.refusals import refusal
from tests import tasks_faults as tf
from tests.conftest import wait_until
from tests.faults.conftest import hash_counts
from tests.faults.workload import Producer, reconcile

# leases far longer than any refusal below: a task may run twice only through a bug
PATIENT = dict(invisibility=30.0)
IMPATIENT = 0.4     # busy_timeout (s) of the manager and of the processor that is meant to give up

BUSY_SCRIPT = """
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1])
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return 1
"""


def start(own_server: Any, processor_on: Any, faults_manager: Any, **server: Any) -> tuple[Any, ...]:
    """A server of the test's own, a manager (2 processes, impatient: its calls give up after
    IMPATIENT s and are retried by its loops) and a producer (the default busy_timeout)."""
    s = own_server(**server)
    manager = faults_manager(s.url, processes=2, threads=4, busy_timeout=IMPATIENT, **PATIENT)
    pids = {c.pid for c in manager.wait_children(2)}
    return s, s.client(), processor_on(s.url, **PATIENT), manager, pids


def settle(p: Any, r: Any, producer: Producer, manager: Any, pids: set[int], refused: str,
           may_fail: frozenset[str] = frozenset()) -> None:
    """Then: the producer never failed (but for reasons in ``may_fail``), every acknowledged task
    ran exactly once, the counters reconcile, the refused call left nothing behind, and the
    same worker processes (never restarted) went on."""
    producer.stop()
    unexpected = {t: e for t, e in producer.failed.items() if getattr(e, "reason", None) not in may_fail}
    assert not unexpected, {t: str(e)[:300] for t, e in list(unexpected.items())[:3]}
    reconcile(p, r, producer)
    assert refused not in hash_counts(r, producer.key + ":finished")
    assert manager.proc.poll() is None and {c.pid for c in manager.children()} == pids
    assert "Traceback" not in manager.log(), manager.log()[-3000:]


# ----------------------------------------------------------------------------------- units

def test_refusals_are_recognised_by_reply_code_also_inside_a_script_error() -> None:
    import redis.exceptions as rx
    assert refusal(rx.BusyLoadingError("Redis is loading the dataset in memory")) == "loading"
    assert refusal(rx.ResponseError("BUSY Redis is busy running a script.")) == "busy"
    assert refusal(rx.ResponseError("MISCONF Valkey is configured to save RDB snapshots")) == "misconf"
    assert refusal(rx.ResponseError(   # Redis 6.2, a write refused inside a script
        "Error running script (call to f_82cd): @user_script:1: @user_script: 1: -MISCONF Redis is ...")) == "misconf"
    assert refusal(rx.ClusterDownError("The cluster is down")) == "clusterdown"
    assert refusal(rx.TryAgainError("Multiple keys request during rehashing of slot")) == "tryagain"
    assert refusal(rx.ClusterError("TTL exhausted.")) == "tryagain"
    assert refusal(rx.ResponseError("ERR value is not an integer: BUSY")) is None
    assert refusal(rx.ResponseError("Error running script: user data -BUSY")) is None
    assert refusal(rx.ConnectionError("Connection refused")) is None


def test_busy_timeout_is_a_validated_duration() -> None:
    assert Options().busy_timeout.total_seconds() == 5
    assert Options(busy_timeout=0.25).busy_timeout.total_seconds() == 0.25
    for bad in (0, -1, "5", float("nan"), True):
        with pytest.raises(ConfigurationError, match="busy_timeout"):
            Options(busy_timeout=bad)


# ------------------------------------------------------------------------------------ BUSY

def test_busy_script_calls_wait_it_out_and_an_impatient_call_raises_busy(
        own_server, processor_on, faults_manager, r, prefix):
    # Given a manager and a producer under load, and a busy-reply-threshold of 50 ms
    server, admin, p, manager, pids = start(own_server, processor_on, faults_manager)
    admin.config_set("lua-time-limit", 50)
    producer = Producer(p, prefix + ":busy").start()
    producer.wait_acked(40)

    # When a script runs for 2 s (no other command runs meanwhile; after 50 ms they get BUSY)
    script = threading.Thread(target=lambda: server.client().eval(BUSY_SCRIPT, 0, 2_000_000))
    script.start()
    try:
        wait_until(lambda: _busy(server), 5, "BUSY replies")
        # Then a processor with busy_timeout=0.4 s gives up with a StoreUnavailable that says why
        # and what to do, after its busy_timeout and before the script ends
        impatient = processor_on(server.url, busy_timeout=IMPATIENT)
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            impatient.enqueue_task("default", "acme", tf.run, producer.key, "refused", 0.0)
        took = time.monotonic() - began
        assert info.value.reason == "busy" and IMPATIENT <= took < 1.8, (took, info.value)
        assert "busy running a script" in str(info.value) and "SCRIPT KILL" in str(info.value)
        assert "Options.busy_timeout 0.4 s" in str(info.value) and info.value.url == server.url
    finally:
        script.join(10)
    # ... while the producer's own calls (busy_timeout 5 s) waited and went through
    producer.wait_acked(40)
    settle(p, r, producer, manager, pids, "refused")
    assert "busy running a script" in manager.log()     # its workers met it, said so, and went on


def test_busy_with_wait_replicas_the_durable_path_waits_it_out_too(own_server, processor_on, r, prefix):
    """enqueue with Options.wait_replicas sends EVALSHA and WAIT as one pipeline to one node
    (transport._run_and_wait): a BUSY reply there is waited out the same way."""
    master = own_server(extra_args=["--repl-diskless-sync-delay", "0"])
    replica = own_server(extra_args=["--replicaof", master.host, str(master.port)])
    admin = master.client()
    wait_until(lambda: admin.info("replication").get("slave0", {}).get("state") == "online", 15,
               "the replica to finish its initial sync")
    admin.config_set("lua-time-limit", 50)
    durable = processor_on(master.url, wait_replicas=1, wait_timeout=2.0)
    impatient = processor_on(master.url, wait_replicas=1, wait_timeout=2.0, busy_timeout=IMPATIENT)
    durable.enqueue_task("default", "acme", tf.run, prefix + ":wait", "before", 0.0)   # (scripts loaded)
    script = threading.Thread(target=lambda: master.client().eval(BUSY_SCRIPT, 0, 2_000_000))
    script.start()
    try:
        wait_until(lambda: _busy(master), 5, "BUSY replies")
        with pytest.raises(StoreUnavailable) as info:
            impatient.enqueue_task("default", "acme", tf.run, prefix + ":wait", "refused", 0.0)
        assert info.value.reason == "busy", info.value
        assert _busy(master), "the script ended before the durable enqueue was sent"
        tid = durable.enqueue_task("default", "acme", tf.run, prefix + ":wait", "waited", 0.0)
    finally:
        script.join(10)
    with replica.client() as rc:        # acknowledged by the replica: stored there
        assert rc.exists(f"{prefix}:t:{tid}")
    assert durable.get_queue("default").queued == 2      # "before" and "waited"; the refused one never


def _busy(server: Any) -> bool:
    try:
        with server.client(socket_timeout=1) as c:
            c.get("probe")
    except Exception as exc:        # noqa: BLE001 - the reply is what is looked at
        return refusal(exc) == "busy"
    return False


# --------------------------------------------------------------------------------- MISCONF

def test_misconf_failed_snapshot_writes_wait_until_it_is_fixed(
        own_server, processor_on, faults_manager, r, prefix):
    # Given a server that snapshots and stops writes when a snapshot fails, under load
    server, admin, p, manager, pids = start(own_server, processor_on, faults_manager)
    admin.config_set("save", "3600 1")
    admin.config_set("stop-writes-on-bgsave-error", "yes")
    producer = Producer(p, prefix + ":misconf").start()
    producer.wait_acked(40)

    # When a snapshot fails (the file it would replace is a non-empty directory: root may write
    # anywhere, so an unwritable directory would not do), every write is refused with MISCONF
    blocker = os.path.join(server.dir, "dump.rdb")
    os.makedirs(os.path.join(blocker, "keep"))
    admin.bgsave()
    wait_until(lambda: _bgsave(admin) == (0, "err"), 10, "the snapshot to fail")
    try:
        # Then an impatient processor gives up with reason "misconf", naming the fix
        impatient = processor_on(server.url, busy_timeout=IMPATIENT)
        with pytest.raises(StoreUnavailable) as info:
            impatient.enqueue_task("default", "acme", tf.run, producer.key, "refused", 0.0)
        assert info.value.reason == "misconf", info.value
        assert "stop-writes-on-bgsave-error" in str(info.value) and "BGSAVE" in str(info.value)
        # ... and the worker's calls are refused (it logs why and keeps going)
        wait_until(lambda: "refuses every write" in manager.log(), 10, "the manager to meet MISCONF")
    finally:
        # When the snapshot works again
        os.rmdir(os.path.join(blocker, "keep"))
        os.rmdir(blocker)
        admin.bgsave()
        wait_until(lambda: _bgsave(admin) == (0, "ok"), 10, "a snapshot to succeed")
    # Then the producer's waiting calls went through, and everything reconciles
    producer.wait_acked(40)
    settle(p, r, producer, manager, pids, "refused")


def _bgsave(admin: Any) -> tuple[int, str]:
    info = admin.info("persistence")
    return int(info["rdb_bgsave_in_progress"]), info["rdb_last_bgsave_status"]


# --------------------------------------------------------------------------------- LOADING

def test_loading_after_a_restart_with_a_large_dataset_calls_wait_for_the_load(
        own_server, processor_on, faults_manager, r, prefix):
    # Given a server whose dataset takes seconds to load (key-load-delay: a delay per key), under
    # load. A loading server answers clients only between chunks of its load: Redis 7 and Valkey
    # every loading-process-events-interval-bytes (set to 16 KiB), Redis 6.2 every 2 MiB (fixed),
    # so the values are larger there, and the load longer: a new connection needs several of
    # those answers (handshake, health-check PING) before its call is even refused.
    server, admin, p, manager, pids = start(own_server, processor_on, faults_manager)
    p = processor_on(server.url, busy_timeout=10, **PATIENT)        # (the load plus the restart)
    if server.version >= (7,):
        keys, size, delay = 600, 8 * 1024, 3000
        server.extra_args += ["--loading-process-events-interval-bytes", "16384"]
    else:
        keys, size, delay = 60, 512 * 1024, 40000
    server.extra_args += ["--key-load-delay", str(delay)]       # (from the restart on)
    blob = os.urandom(size)
    pipe = admin.pipeline(transaction=False)
    for i in range(keys):
        pipe.set(f"filler:{i}", blob)
    pipe.execute()
    producer = Producer(p, prefix + ":loading").start()
    producer.wait_acked(40)

    # When it is shut down (saving everything) and restarted: it answers LOADING meanwhile (the
    # producer holds across the shutdown itself, so that no enqueue is caught between running and
    # replying, see Producer.hold, and goes on at once after the restart, into the load)
    producer.hold()
    with server.client(retry=Retry(NoBackoff(), 0)) as once:     # (no reconnecting to a server that left)
        once.shutdown(save=True)
    server.restart()
    producer.resume()
    assert server.client().info("persistence")["loading"] == 1, "the load ended before it was seen"
    # Then an impatient processor gives up with reason "loading". (Without redis-py's health
    # check: on a new connection its PING is refused with LOADING too, and redis-py retries that
    # PING 3 times before the call is even sent, ~0.7 s; on Redis 6.2 several seconds.)
    impatient = processor_on(server.url + "?health_check_interval=0", busy_timeout=IMPATIENT)
    with pytest.raises(StoreUnavailable) as info:
        impatient.enqueue_task("default", "acme", tf.run, producer.key, "refused", 0.0)
    assert info.value.reason == "loading" and "loading its dataset" in str(info.value), info.value
    assert server.client().info("persistence")["loading"] == 1, "the load ended before the refusal"
    # ... while the producer's calls waited for the load and went through
    wait_until(lambda: server.client().info("persistence")["loading"] == 0, 20, "the load to end")
    producer.wait_acked(40)
    # (between the shutdown and the restart the server was not there at all: "unreachable")
    settle(p, r, producer, manager, pids, "refused", may_fail=frozenset({"unreachable"}))
