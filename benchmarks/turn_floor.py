"""How low a worker's turn can go: server CPU per task of coretask's fetch against the floor of
any Lua lease on the same server, in the same run.

    python -m benchmarks.turn_floor [--tasks 16000] [--rounds 3] [--batch 8]

``benchmarks.redis_cost`` measures what a processed task costs the server with a real worker;
this one asks how much of that any design would pay. One client makes the calls a busy worker
makes (``--batch`` acknowledgements and ``--batch`` leases per round trip, the most a worker with
that many threads may hold: it never leases ahead of its free threads, docs/decisions.md) and
the server's CPU (INFO cpu, ``used_cpu_sys + used_cpu_user``) is divided by the tasks, for:

* ``round trip``: ``EVALSHA`` of ``return 1`` once per ``--batch`` tasks: what the calls cost
  before any script does anything (on a VM, mostly the server's sleep and wake-up per request);
* ``bare turn``: a script with none of coretask's rules: whole messages in one ready list, a
  turn pops ``--batch`` of them, writes their leases (deadline and worker entry) and
  acknowledges the previous ones (reads their entries, removes them, three counters). No
  tenants, fairness, pause or limit checks, batches, delayed tasks, statistics or damaged-record
  checks: the floor of a Lua lease with acknowledgements;
* ``coretask turn``: coretask's own ``exchange`` (fetch.lua), the same number of
  acknowledgements and leases per call, on tasks enqueued with ``enqueue_task``.

Phases alternate within each round; each figure is the median of the rounds. Starts its own
redis-server (Redis 7 from coretask.embedded.servers; never the machine's 6379).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import redis

from benchmarks.redis_cost import noop
from coretask import Options, TaskProcessor
from coretask.embedded.servers import RedisServer, find_server_binary
from coretask.gateway.gateway import Gateway
from coretask.gateway.records import Ack, Outcomes

QUEUE, TENANT, WORKER = "default", "t", "floor-worker"
LEASE_MS = 60_000

# KEYS[1] the ready list of messages ("<32-hex id>|<message>"), KEYS[2] lease deadlines (zset),
# KEYS[3] the worker's lease entries (hash), KEYS[4] queue counters, KEYS[5] tenant counters,
# KEYS[6] the minute's history. ARGV[1] lease deadline ms, ARGV[2] how many to lease,
# ARGV[3..] the ids acknowledged. Reply: the messages leased.
BARE_TURN = """
local acked = {}
for i = 3, #ARGV do acked[#acked + 1] = ARGV[i] end
if #acked > 0 then
  redis.call('HMGET', KEYS[3], unpack(acked))
  redis.call('ZREM', KEYS[2], unpack(acked))
  redis.call('HDEL', KEYS[3], unpack(acked))
  redis.call('HINCRBY', KEYS[4], 'inflight', -#acked)
  redis.call('HINCRBY', KEYS[5], 'done', #acked)
  redis.call('HINCRBY', KEYS[6], 'p', #acked)
end
local msgs = redis.call('LPOP', KEYS[1], tonumber(ARGV[2]))
if not msgs then return {} end
local z, w = {}, {}
for _, m in ipairs(msgs) do
  local id = string.sub(m, 1, 32)
  z[#z + 1] = ARGV[1]; z[#z + 1] = id
  w[#w + 1] = id; w[#w + 1] = '1'
end
redis.call('ZADD', KEYS[2], unpack(z))
redis.call('HSET', KEYS[3], unpack(w))
redis.call('HINCRBY', KEYS[4], 'inflight', #msgs)
return msgs
"""
BARE_KEYS = ["{f}:ready", "{f}:leases", "{f}:wl", "{f}:qs", "{f}:ts", "{f}:h"]


def server_cpu(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def measure(r: redis.Redis, tasks: int, drive: Callable[[], None]) -> float:
    """Server CPU us per task of ``drive`` (less the INFO call that ends the window)."""
    before = server_cpu(r)
    drive()
    return (server_cpu(r) - before) * 1e6 / tasks


def round_trip(r: redis.Redis, tasks: int, batch: int) -> float:
    sha = r.script_load("return 1")

    def drive() -> None:
        for _ in range(tasks // batch):
            r.evalsha(sha, 0)
    return measure(r, tasks, drive)


def bare_turn(r: redis.Redis, tasks: int, batch: int, message: str) -> float:
    r.flushall()
    pipe = r.pipeline(transaction=False)
    for i in range(tasks):
        pipe.rpush(BARE_KEYS[0], f"{i:032x}|{message}")
    pipe.execute()
    turn = r.register_script(BARE_TURN)

    def drive() -> None:
        acked: list[str] = []
        while True:
            got = turn(keys=BARE_KEYS, args=[int(time.time() * 1000) + LEASE_MS, batch, *acked])
            if not got:
                return
            acked = [m[:32].decode() for m in got]
    return measure(r, tasks, drive)


def coretask_turn(r: redis.Redis, url: str, tasks: int, batch: int) -> float:
    r.flushall()
    p = TaskProcessor(Options(redis=url, prefix="{f}", queues=[QUEUE]))
    gw = p.gateway
    assert isinstance(gw, Gateway)
    try:
        for _ in range(tasks):
            p.enqueue_task(QUEUE, TENANT, noop)

        def drive() -> None:
            acks: list[Ack] = []
            while True:
                reply = gw.exchange(WORKER, Outcomes(acks=acks), batch, LEASE_MS, 0, [QUEUE])
                if not reply.tasks and not acks:
                    return
                acks = [Ack(t.id, t.token, "ok", 1, t.queue, t.tenant) for t in reply.tasks]
        cost = measure(r, tasks, drive)
        if p.get_tenant_stats(TENANT).done != tasks:
            raise AssertionError("the acknowledgements did not all count: the measurement is void")
        return cost
    finally:
        p.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.turn_floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=16_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="acknowledgements and leases per call")
    a = ap.parse_args(argv)
    server = RedisServer(binary=find_server_binary("redis7")).start()
    r = redis.Redis.from_url(server.url)
    # a message the size of a no-op task's record fields a worker needs (payload, serializer, target, ...)
    sample = TaskProcessor(Options(redis=server.url, prefix="{sample}", queues=[QUEUE]))
    try:
        sample.enqueue_task(QUEUE, TENANT, noop)
        key = next(iter(r.scan_iter("{sample}:t:*")))
        message = "|".join(v.decode(errors="replace") for v in r.hgetall(key).values())
    finally:
        sample.close()
    rows: dict[str, list[float]] = {"round trip": [], "bare turn": [], "coretask turn": []}
    try:
        for _ in range(a.rounds):
            rows["round trip"].append(round_trip(r, a.tasks, a.batch))
            rows["bare turn"].append(bare_turn(r, a.tasks, a.batch, message))
            rows["coretask turn"].append(coretask_turn(r, server.url, a.tasks, a.batch))
    finally:
        server.stop()
    print(f"Server CPU per task, {a.batch} acknowledgements and leases per call, median of {a.rounds} rounds "
          f"of {a.tasks:,} tasks (message {len(message)} bytes; load1 {os.getloadavg()[0]:.2f})")
    print(f"{'phase':<16}{'us/task':>9}   rounds")
    for phase, v in rows.items():
        print(f"{phase:<16}{statistics.median(v):>9.1f}   " + " / ".join(f"{x:.1f}" for x in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
