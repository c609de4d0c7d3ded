"""Reconnection: a worker outlives its Redis restarting and its pub/sub connection being killed;
a producer fails fast (StoreUnavailable, naming the masked URL) while Redis is down; WAIT on a
master+replica.

Each test starts a server of its own from the binary of the server under test (Redis 7 under
--server cluster), since it kills or restarts it. Every wait polls with a deadline.
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from coretask import CoreTaskError, Options, ReplicationError, ScheduleData, StoreError, StoreUnavailable
from coretask.embedded.servers import RedisServer, free_port
from tests.conftest import FAST, worker_processes
from tests.tasks_servers import Manager, note, read_notes, wait_until

IDLE = dict(base_frequency=5.0, pushback_frequency=30.0, cleanup_frequency=60.0, invisibility=30.0,
            shutdown_timeout=5.0)


def new_prefix() -> str:
    return "{ct-" + uuid.uuid4().hex[:10] + "}"


def workers(manager: Manager) -> list[psutil.Process]:
    return worker_processes(manager.proc.pid)


def backoff_delays(log: str, what: str) -> list[float]:
    return [float(x) for x in re.findall(what + r".*?(?:reconnecting|retrying) in ([0-9.]+)s", log)]


def check_backoff(delays: list[float]) -> None:
    """Doubling from 0.1 s, capped at 5 s (a reconnect resets it to 0.1 s)."""
    assert delays and delays[0] == 0.1, delays
    for before, after in zip(delays, delays[1:]):
        assert after in (0.1, min(round(before * 2, 1), 5.0)), delays
    assert max(delays) <= 5.0


# ----------------------------------------------------------------------------- restarting

def test_worker_survives_redis_restart_and_no_acknowledged_task_is_lost(
        own_server: Callable[..., RedisServer], processor_on: Any, tmp_path: Path) -> None:
    server = own_server(appendonly=True, extra_args=["--appendfsync", "always"])
    prefix = new_prefix()
    path = str(tmp_path / "notes")
    producer = processor_on(server.url, prefix)
    manager = Manager(server.url, prefix, tmp_path / "manager.log", threads=4, log_level="DEBUG", **FAST)
    try:
        producer.enqueue_task("default", "acme", note, path, "warm-up")
        wait_until(lambda: "warm-up" in read_notes(path), 30, "the worker to start")
        (child,) = workers(manager)

        # N tasks acknowledged as enqueued, held in Redis by a pause, then Redis dies
        producer.pause()
        held = [f"held{i}" for i in range(50)]
        for value in held:
            producer.enqueue_task("default", "acme", note, path, value)
        server.kill()
        # the worker retries with a capped exponential backoff (each delay at DEBUG)
        wait_until(lambda: len(backoff_delays(manager.log(), "pub/sub connection lost")) >= 4, 15,
                   "the worker's pub/sub reconnection attempts")
        wait_until(lambda: len(backoff_delays(manager.log(), "Redis call failed")) >= 3, 15,
                   "the worker's fetch retries")

        server.restart()                    # same port, the AOF is replayed
        producer.resume()
        wait_until(lambda: set(held) <= read_notes(path).keys(), 15,
                   f"every acknowledged task to run after the restart; log:\n{manager.log()[-3000:]}")
        producer.enqueue_task("default", "acme", note, path, "after")
        wait_until(lambda: "after" in read_notes(path), 10, "a task enqueued after the restart")

        # the same worker process did it all: it reconnected rather than being replaced
        assert [c.pid for c in workers(manager)] == [child.pid]
        log = manager.log()
        check_backoff(backoff_delays(log, "pub/sub connection lost"))
        check_backoff(backoff_delays(log, "Redis call failed"))
        # and the worker process said once that Redis could not be reached and it retries on its
        # own (its loop, pub/sub and timers failed many times each), and once that it came back
        lost = re.findall(r"WARNING coretask.outage .*worker [^:]+:[^:]+:[^:]+: Redis at .* cannot be reached.*"
                          r"every part of this process retries on its own", log)
        back = re.findall(r"WARNING coretask.outage .*worker .*: Redis answers again after ([0-9.]+)s", log)
        assert len(lost) == 1 and len(back) == 1 and float(back[0]) > 0, (lost, back)
        assert "Redis call failed" not in "\n".join(l for l in log.splitlines() if " WARNING " in l)
    finally:
        manager.stop()


def test_producer_fails_fast_with_store_unavailable_while_redis_is_down(
        own_server: Callable[..., RedisServer], processor_on: Any, tmp_path: Path) -> None:
    server = own_server()
    p = processor_on(server.url, new_prefix())
    p.enqueue_task("default", "acme", note, str(tmp_path / "n"), "ok")   # connected once
    server.kill()
    for call in (lambda: p.enqueue_task("default", "acme", note, str(tmp_path / "n"), "lost"),
                 lambda: p.enqueue_batch("default", "acme", lambda b: b.enqueue(note, "x", "y")),
                 lambda: p.get_queue("default")):
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"redis://127.0.0.1:{server.port}/0 cannot be reached") as info:
            call()
        assert time.monotonic() - began < 3.0     # pinned retries: 0.1 + 0.2 + 0.4 s, no hang
        assert isinstance(info.value.__cause__, redis.ConnectionError)      # redis-py's error, kept as the cause
    server.restart()                                # (no AOF: it comes back empty)
    p.enqueue_task("default", "acme", note, str(tmp_path / "n"), "again")   # the same object recovers
    assert p.get_queue("default").queued == 1


def test_unreachable_redis_is_store_unavailable_naming_the_masked_url(processor_on: Any) -> None:
    # Given a processor whose URL, with a password, points at a port where nothing listens
    port = free_port()
    p = processor_on(f"redis://:s3cret-pw@127.0.0.1:{port}/0", new_prefix())
    # When it enqueues, builds a batch, upserts a schedule, reads or pauses
    calls = {"enqueue_task": lambda: p.enqueue_task("default", "acme", note, "x", "y"),
             "enqueue_batch": lambda: p.enqueue_batch("default", "acme", lambda b: b.enqueue(note, "x", "y")),
             "upsert_schedule": lambda: p.upsert_schedule(ScheduleData("s", "acme", "default", None, "* * * * *"),
                                                          note, "x", "y"),
             "get_queues": p.get_queues, "get_batch": lambda: p.get_batch("b"), "pause": p.pause}
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable) as info:
            call()
        # Then each raises StoreUnavailable, a coretask error, naming the URL with its password masked
        # and what to check, with redis-py's error as the cause
        text = str(info.value)
        assert isinstance(info.value, StoreError) and isinstance(info.value, CoreTaskError), name
        assert f"redis://:***@127.0.0.1:{port}/0 cannot be reached" in text, (name, text)
        assert "s3cret-pw" not in text and "check that the server is running" in text, (name, text)
        assert info.value.url == f"redis://:***@127.0.0.1:{port}/0"
        assert isinstance(info.value.__cause__, (redis.ConnectionError, redis.TimeoutError)), name


# ---------------------------------------------------------------------------------- pub/sub

def numsub(client: redis.Redis, channel: str) -> int:
    return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))


def test_pubsub_connection_killed_is_reconnected_and_resubscribed(
        own_server: Callable[..., RedisServer], processor_on: Any, embedded_worker: Any,
        tmp_path: Path) -> None:
    server = own_server()
    prefix = new_prefix()
    channel = prefix + ":ev"
    path = str(tmp_path / "notes")
    producer = processor_on(server.url, prefix, **IDLE)
    embedded_worker(processor_on(server.url, prefix, **IDLE))
    admin = server.client(socket_timeout=5)
    try:
        def subscriber() -> int | None:
            clients = admin.client_list(_type="pubsub")
            return int(clients[0]["id"]) if len(clients) == 1 and numsub(admin, channel) == 1 else None

        previous = wait_until(subscriber, 10, "the worker's subscription")
        for round_ in range(4):
            wait_until(lambda: producer.get_queue("default").in_flight == 0)
            if round_:
                assert admin.client_kill_filter(_type="pubsub") == 1
            # rounds 1 and 3 enqueue at once, while the subscription is (probably) not back yet:
            # the worker must re-read the state when it resubscribes; round 2 waits for it first
            if round_ == 2:
                previous = wait_until(lambda old=previous: (s := subscriber()) and s != old and s, 10,
                                      "a new subscription after CLIENT KILL")
            sent = time.time()
            producer.enqueue_task("default", "acme", note, path, f"t{round_}")
            started = wait_until(lambda v=f"t{round_}": read_notes(path).get(v), 6, f"task t{round_}")
            assert started - sent < 1.0, started - sent     # woken by the event, not the 5 s poll
            previous = wait_until(subscriber, 10, "the subscription")
    finally:
        admin.close()


# ------------------------------------------------------------------------------------ WAIT

def test_wait_replicas_with_a_master_and_a_replica(own_server: Callable[..., RedisServer], processor_on: Any,
                                                  tmp_path: Path) -> None:
    master = own_server(extra_args=["--repl-diskless-sync-delay", "0"])
    replica = own_server(extra_args=["--replicaof", master.host, str(master.port)])
    with master.client() as admin:
        wait_until(lambda: admin.info("replication").get("slave0", {}).get("state") == "online", 15,
                   "the replica to finish its initial sync")
    prefix = new_prefix()
    path = str(tmp_path / "notes")
    p = processor_on(master.url, prefix, wait_replicas=1, wait_timeout=2.0)
    tid = p.enqueue_task("default", "acme", note, path, "replicated")
    bid = p.enqueue_batch("default", "acme", lambda b: b.enqueue(note, path, "b"))
    assert p.cancel_batch(bid)
    with replica.client() as r:     # acknowledged means: readable on the replica
        assert r.exists(f"{prefix}:t:{tid}") and r.hget(f"{prefix}:b:{bid}", "state") == b"canceled"

    replica.kill()
    p2 = processor_on(master.url, prefix, wait_replicas=1, wait_timeout=0.2)
    with pytest.raises(ReplicationError, match="only 0 of the 1 replicas") as info:
        p2.enqueue_task("default", "acme", note, path, "unreplicated")
    assert info.value.task_id and (info.value.acknowledged, info.value.required) == (0, 1)
    with pytest.raises(ReplicationError) as info:
        p2.enqueue_batch("default", "acme", lambda b: b.enqueue(note, path, "c"))
    assert info.value.batch_id is not None
    assert p2.get_queue("default").queued == 3        # the master kept every write


def test_wait_options_are_validated() -> None:
    from datetime import timedelta

    from coretask import ConfigurationError

    o = Options(redis="redis://127.0.0.1:1/0")
    assert (o.wait_replicas, o.wait_timeout) == (0, timedelta(seconds=1))
    assert Options(redis="redis://127.0.0.1:1/0", wait_replicas=2, wait_timeout=0.5).wait_timeout == timedelta(seconds=0.5)
    for bad in (dict(wait_replicas=-1), dict(wait_replicas=True), dict(wait_replicas=1.5),
                dict(wait_timeout=0), dict(wait_timeout=-1)):
        with pytest.raises(ConfigurationError, match="wait_"):
            Options(redis="redis://127.0.0.1:1/0", **bad)
