"""Gateway: one typed method per Lua script, and the reads the API and the worker need.

Each method takes domain values and returns records (coretask/gateway/records.py); the KEYS and
ARGV order of its script is written here once, beside the call, and matches the script's header.
Above this class nobody builds a key list, counts reply positions or holds the Redis client:
the API (client, batch, schedules, tenancy, introspection) and the worker talk to Redis only
through it. Reads are plain commands, pipelined, never scripts: they change nothing, and a
snapshot a few milliseconds old is fine for the CLI and a dashboard.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import redis

from ..errors import ConfigurationError
from ..options import Options
from .keys import Keys
from .records import (NO_CONTROLS, Ack, Controls, DueSchedule, DueSchedules, Failure, FetchReply, Outcomes, Overdue,
                      Recovered, Release, TickResult, parse_fetch_reply, parse_handoff)
from .transport import InFlight, Transport, translated

__all__ = ["Gateway"]

Call = tuple[str, list[str], list[Any]]

PUBLISH_CHUNK = 500     # tasks per batch_publish call (bounded work per script call)


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _ack_args(acks: Sequence[Ack]) -> list[Any]:
    """Acknowledgements as complete.lua and fetch.lua take them: groups of seven."""
    return [v for a in acks for v in (a.task_id, a.token, a.outcome, a.duration_ms, a.queue, a.tenant, a.result)]


def _decoded(values: Any) -> list[str]:
    return [v.decode() for v in values]


_C = TypeVar("_C", bound=type)


def _connection_errors_translated(cls: _C) -> _C:
    """Every public method raises StoreUnavailable, never redis-py's ConnectionError or
    TimeoutError, when Redis cannot be reached (scripts are translated by the transport; this
    covers the reads, which use the client directly, and methods added later)."""
    for name, fn in list(vars(cls).items()):
        if inspect.isfunction(fn) and not name.startswith("_"):
            setattr(cls, name, translated(fn))
    return cls


class OneShard:
    """What a deployment of one shard answers to the questions Options.shards raises (see
    gateway/shards.py, which answers them for several): ids need no shard, there is one part,
    nothing is ever forwarded. No Redis call: the memory gateway of eager mode inherits it."""

    keys: Keys

    def new_id(self, tenant: str) -> str:
        """A new task or batch id for the tenant's work."""
        return os.urandom(16).hex()

    def new_id_near(self, other_id: str) -> str:
        """A new id that lives where ``other_id`` does (the tasks of a batch)."""
        return os.urandom(16).hex()

    def parts(self) -> list[Any]:
        """The gateway of each shard (this one alone)."""
        return [self]

    def channels(self) -> list[str]:
        """The pub/sub channels a worker listens to."""
        return [self.keys.events]

    def wake(self, worker_id: str, channel: str) -> None:
        """An event arrived on ``channel`` (one prefix: nothing to note, the loop fetches)."""

    def tenant_shard(self, tenant: str, place: bool = True) -> int:
        return 0

    def carry_controls(self) -> int:
        """Write the pause flags and tenant limits one shard holds to the shards that lack them
        (one shard: nothing to carry). Returns how many were written."""
        return 0

    def check_shard_count(self) -> None:
        """Refuse an Options.shards other than the deployment's (see Gateway's)."""

    def forwarded(self, task_id: str) -> str | None:
        """The new id of a task that rebalance moved to another shard."""
        return None

    def rebalance(self, tenant: str, shard: int) -> tuple[int, int]:
        raise ConfigurationError("rebalance_tenant needs Options.shards above 1: this deployment has one shard")


@_connection_errors_translated
class Gateway(OneShard):
    """The one door to Redis for one prefix. Thread-safe, as its transport is. Connection
    errors surface as StoreUnavailable naming the server's masked URL."""

    def __init__(self, options: Options, transport: Transport | None = None) -> None:
        self.options = options
        self.keys = Keys(options.prefix)
        self.transport = transport if transport is not None else Transport(options, guard=self.keys.migration_guard)
        self.url = self.transport.url       # the server's URL, password masked
        self._redis = self.transport.redis
        self._deadletter = _flag(options.deadletter)
        self._deadletter_schedules = _flag(options.deadletter_schedules)

    def check_shard_count(self, shards: int = 1) -> None:
        """Refuse a shard count other than the deployment's: the hash tags of shards 1..N-1
        depend on N (shards.shard_prefixes), so another count would leave their work unseen
        and place tenants anew. The count is recorded on shard 0 (``P:shards``) the first time
        a deployment of more than one shard checks it; a one-shard deployment writes nothing
        (its layout stays as it was), so turning sharding on (1 -> N) is the change allowed."""
        key = self.keys.shard_count
        recorded = self._redis.get(key)
        if recorded is None and shards > 1 and not self._redis.set(key, shards, nx=True):
            recorded = self._redis.get(key)             # another first start won: its count stands
        if recorded is not None and int(recorded) != shards:
            raise ConfigurationError(
                f"this deployment runs {int(recorded)} shards (recorded in {key} when it first ran with "
                f"Options.shards={int(recorded)}), and Options.shards is {shards}: shards 1 and up live under "
                f"hash tags that depend on their number, so their work would be unseen. Set "
                f"Options.shards={int(recorded)}; the one change supported is from 1 to N (docs/scale-out.md)")

    def close(self) -> None:
        self._redis.close()

    def placement(self, tenant: str) -> int | None:
        """The tenant's shard in the directory (P:tshard), None when not placed yet."""
        shard = self._redis.hget(self.keys.tenant_shards, tenant)
        return int(shard) if shard is not None else None

    def place(self, tenant: str, shard: int, *, replace: bool = False) -> int:
        """Record the tenant's shard (unless placed already, without ``replace``); the shard
        the directory holds afterwards (another process may have placed it first)."""
        if replace:
            self._redis.hset(self.keys.tenant_shards, tenant, shard)
            return shard
        self._redis.hsetnx(self.keys.tenant_shards, tenant, shard)
        return int(self._redis.hget(self.keys.tenant_shards, tenant) or shard)

    def forwarded_id(self, task_id: str) -> str | None:
        """P:fw:<id> under this prefix (gateway/shards.py reads it on the task's old shard)."""
        new = self._redis.get(self.keys.forward(task_id))
        return new.decode() if new is not None else None

    def move_out(self, tenant: str, task_ids: Sequence[str], can_sign: bool) -> tuple[list[tuple[str, list[Any]]], int]:
        """move_out.lua: of ``task_ids``, the tenant's queued and delayed tasks of no batch (and,
        unless ``can_sign``, not signed under their id), taken out of this prefix's queues:
        (id, flat field/value list) each; and how many of the tenant's were left in place."""
        k = self.keys
        reply = self.transport.run("move_out", [k.moving], [k.prefix, tenant, _flag(can_sign), *task_ids])
        return [(reply[i].decode(), reply[i + 1]) for i in range(1, len(reply), 2)], int(reply[0])

    def move_in(self, task_id: str, fields: Sequence[Any]) -> int:
        """move_in.lua: store a task moved here under ``task_id``; -1 when it was already."""
        k = self.keys
        return int(self.transport.run("move_in", [k.task(task_id), k.queues], [k.prefix, task_id, *fields]))

    def move_done(self, old_id: str, new_id: str, forward_ms: int) -> None:
        k = self.keys
        self.transport.run("move_done", [k.task(old_id), k.moving, k.forward(old_id)], [old_id, new_id, forward_ms])

    def moving(self) -> list[tuple[str, list[Any]]]:
        """Tasks move_out took out whose move did not finish: (id, flat field/value list)."""
        ids = _decoded(self._redis.smembers(self.keys.moving))
        pipe = self._redis.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.keys.task(i))
        return [(i, [v for kv in h.items() for v in kv]) for i, h in zip(ids, pipe.execute()) if h]

    def ping(self) -> None:
        """One cheap read in the prefix's slot: raises when its server cannot be reached."""
        self._redis.exists(self.keys.marker)

    def tenant_has_history(self, tenant: str) -> bool:
        """Whether work of the tenant was ever stored under this prefix (P:tenants)."""
        return self._redis.zscore(self.keys.tenants, tenant) is not None

    def publish(self, message: str) -> None:
        """An event on the prefix's channel. It carries no authority: workers only re-read
        state that a script wrote (worker/control.py)."""
        self._redis.publish(self.keys.events, message)

    def subscribe(self) -> Any:
        """A redis-py PubSub subscribed to the prefix's channel (the worker's control thread
        then reads its socket directly: coretask/worker/control.py)."""
        pubsub = self._redis.pubsub()
        pubsub.subscribe(*self.channels())
        return pubsub

    # ====================================================================== task lifecycle

    def enqueue(self, task_id: str, queue: str, tenant: str, payload: bytes, serializer: str, target: str,
                retries: int, due_ms: int, signature: str, controls: Controls = NO_CONTROLS) -> int:
        """Store a task and make it ready (or delayed). 1 ready, 2 delayed, -1 the id existed
        (a re-sent call whose first attempt had landed)."""
        k = self.keys
        code, _ = self.transport.run(
            "enqueue", [k.task(task_id), k.queues],
            [k.prefix, task_id, queue, tenant, payload, serializer, target, retries, due_ms, signature, 0,
             *controls.argv()],
            durable=True)
        return int(code)

    def enqueue_keyed(self, task_id: str, queue: str, tenant: str, payload: bytes, serializer: str, target: str,
                      retries: int, due_ms: int, signature: str, key: str, key_ttl_ms: int,
                      controls: Controls = NO_CONTROLS) -> str | None:
        """enqueue with an idempotency key (enqueue.lua, KEYS[3]): None when the task was stored
        (or the id existed: a re-sent call), else the id of the task that holds the key (nothing
        was stored). ``key_ttl_ms``: how long the key outlives its task (0: not at all)."""
        k = self.keys
        reply = self.transport.run(
            "enqueue", [k.task(task_id), k.queues, k.idempotency(tenant, key)],
            [k.prefix, task_id, queue, tenant, payload, serializer, target, retries, due_ms, signature, key_ttl_ms,
             *controls.argv()],
            durable=True)
        return reply[2].decode() if int(reply[0]) == 3 else None

    def exchange(self, worker_id: str, outcomes: Outcomes, free: int, lease_ms: int, default_limit: int,
                 queues: Sequence[str], *, isolated: bool = False, idle_ms: int = 0) -> FetchReply:
        """A worker's turn in one round trip: its releases and failures, then a fetch that
        acknowledges its finished tasks and leases up to ``free`` tasks (``isolated``: at most
        one task from the isolation lists, for the manager's isolation worker, fetch_isolated.lua,
        after complete.lua for its acknowledgements). On an error the outcomes may or
        may not have landed; sending them again is harmless (the lease token makes a repeat a
        no-op). ``idle_ms`` > 0: when nothing is leased (and nothing is paused) the worker is
        registered for hand-offs that long (``idle_registered``), and must then call
        ``await_handoff`` before anything else."""
        k = self.keys
        if isolated:
            calls = self._outcome_calls(worker_id, outcomes)
            calls.append(("fetch_isolated", [k.paused, k.pausedt, k.leases, k.worker(worker_id), k.trun, k.tlim,
                                             k.pausedw],
                          [k.prefix, worker_id, lease_ms, min(free, 1), default_limit, *queues]))
        else:
            # the acknowledgements ride in the fetch (one script call: its in-flight and running
            # counts written once, net; docs/decisions.md); releases and failures go before it
            calls = self._outcome_calls(worker_id, dataclasses.replace(outcomes, acks=[]))
            calls.append(("fetch", [k.paused, k.pausedq, k.pausedt, k.delayed, k.leases, k.worker(worker_id),
                                    k.trun, k.tlim, k.pausedw],
                          [k.prefix, worker_id, free, lease_ms, default_limit, idle_ms, len(outcomes.acks),
                           *_ack_args(outcomes.acks), *queues]))
        return parse_fetch_reply(self.transport.run_many(calls)[-1])

    # ---------------------------------------------------------------- hand-off to idle workers

    handoffs = True     # the worker loop may register as idle (one shard; not eager mode)

    @property
    def handoff_wait_s(self) -> float:
        """How long a blocking pop may wait: a second under the client's socket timeout (30 s,
        unless the URL's ?socket_timeout= shortens it), so that no wait ends in a client-side
        timeout."""
        pool = getattr(self._redis, "connection_pool", None) or getattr(self._redis, "nodes_manager", None)
        timeout = (getattr(pool, "connection_kwargs", None) or {}).get("socket_timeout")
        return float("inf") if timeout is None else max(float(timeout) - 1.0, 0.0)

    @staticmethod
    def idle_registered(reply: FetchReply, idle_ms: int) -> int:
        """How long (ms from ``reply.now_ms``) the fetch that gave ``reply`` registered its
        worker for hand-offs: 0 when it did not (it leased something, or everything is
        paused, or it stopped early to call again), as fetch.lua decides."""
        if not idle_ms or reply.paused or reply.tasks or reply.unreadable or reply.next_due_ms == reply.now_ms:
            return 0
        if reply.next_due_ms != -1:
            return min(idle_ms, reply.next_due_ms - reply.now_ms)
        return idle_ms

    def await_handoff(self, worker_id: str, timeout_s: float) -> FetchReply | None:
        """Block on the worker's inbox: the lease an enqueue handed to it, or None (the wait
        ended, or idle_wake woke it). The worker's registration has ended either way (handoff
        and idle_wake end it; a timeout passed its deadline on the server's clock).
        ConfigurationError when the ACL user may not block (the worker then stops waiting)."""
        try:
            got = self._redis.blpop([self.keys.inbox(worker_id)], timeout=timeout_s)
        except redis.exceptions.NoPermissionError as exc:
            raise ConfigurationError(
                f"the Redis user may not run BLPOP ({exc}), so idle workers cannot wait for hand-offs: they "
                "are woken by pub/sub and fetch instead, one round trip more per start; add +blpop to the "
                "user's ACL (docs/operations.md, TLS and ACL)") from exc
        return parse_handoff(got[1]) if got and got[1] else None

    def idle_wake(self, worker_id: str) -> None:
        """End the worker's registration and wake its await_handoff (idle.lua)."""
        self.transport.run("idle", [self.keys.inbox(worker_id)], [self.keys.prefix, worker_id, "wake"])

    def idle_leave(self, worker_id: str) -> list[FetchReply]:
        """End the worker's registration and empty its inbox: the hand-offs it held."""
        items = self.transport.run("idle", [self.keys.inbox(worker_id)], [self.keys.prefix, worker_id, "leave"])
        return [parse_handoff(item) for item in items]

    def fetch(self, worker_id: str, free: int, lease_ms: int, default_limit: int,
              queues: Sequence[str]) -> FetchReply:
        return self.exchange(worker_id, Outcomes(), free, lease_ms, default_limit, queues)

    def send_outcomes(self, worker_id: str, outcomes: Outcomes) -> None:
        calls = self._outcome_calls(worker_id, outcomes)
        if calls:
            self.transport.run_many(calls)

    def _outcome_calls(self, worker_id: str, outcomes: Outcomes) -> list[Call]:
        k = self.keys
        calls: list[Call] = []
        if outcomes.acks:
            calls.append(self._complete_call(worker_id, outcomes.acks))
        if outcomes.releases:
            calls.append(self._release_call(worker_id, outcomes.releases))
        for f in outcomes.failures:
            calls.append(("fail", [k.task(f.task_id)],
                          [k.prefix, worker_id, f.task_id, f.token, f.delay_ms, self._deadletter, f.error_type,
                           f.message, f.traceback, f.duration_ms, _flag(f.bury), self._deadletter_schedules,
                           f.queue, f.tenant]))
        return calls

    def _complete_call(self, worker_id: str, acks: Sequence[Ack]) -> Call:
        k = self.keys
        return "complete", [k.leases, k.worker(worker_id)], [k.prefix, worker_id, *_ack_args(acks)]

    def _release_call(self, worker_id: str, releases: Sequence[Release]) -> Call:
        k = self.keys
        args: list[Any] = [k.prefix, worker_id]
        for r in releases:
            args += (r.task_id, r.token, r.queue, r.tenant)
        return "release", [k.leases], args

    def complete(self, worker_id: str, acks: Sequence[Ack]) -> list[int]:
        """Acknowledge finished tasks; per task 1 counted, 0 stale token (ignored), 2 this
        worker's lease on a damaged record (dead-lettered or quarantined instead)."""
        name, keys, args = self._complete_call(worker_id, acks)
        return [int(c) for c in self.transport.run(name, keys, args)]

    def fail(self, worker_id: str, failure: Failure) -> int:
        """1 requeued for a retry, 2 buried (or a damaged record taken out), 3 counted canceled,
        0 stale token."""
        (name, keys, args), = self._outcome_calls(worker_id, Outcomes(failures=[failure]))
        return int(self.transport.run(name, keys, args))

    def release(self, worker_id: str, releases: Sequence[Release]) -> int:
        """Hand tasks back to the head of their queues, no retry consumed; returns how many."""
        if not releases:
            return 0
        name, keys, args = self._release_call(worker_id, releases)
        return int(self.transport.run(name, keys, args))

    def recover_worker(self, worker_id: str, reason: str, consume_retry: bool) -> Recovered:
        """Take back every task leased to a worker process that is gone."""
        return self._recover("worker", worker_id, reason, 0, consume_retry)

    def recover_expired(self, reason: str, limit: int) -> Recovered:
        """Take back up to ``limit`` tasks whose lease deadline passed (each consumes a retry)."""
        return self._recover("expired", "", reason, limit, True)

    def _recover(self, mode: str, worker_id: str, reason: str, limit: int, consume_retry: bool) -> Recovered:
        k = self.keys
        requeued, buried, canceled = self.transport.run(
            "recover", [k.leases],
            [k.prefix, mode, worker_id, self._deadletter, reason, limit, _flag(consume_retry),
             self._deadletter_schedules])
        return Recovered(int(requeued), int(buried), int(canceled))

    def crashed(self, worker_id: str, reason: str, max_crashes: int, *,
                blame: bool = True) -> tuple[Recovered, str | None]:
        """Take back the tasks of a worker process that crashed (crashed.lua): the one culprit,
        when a single task was running, is charged a crash; several go uncharged to isolation
        (``blame`` False: always, as when the process also ran tasks of other shards).
        Returns (isolated as requeued, buried, canceled) and the culprit's id."""
        k = self.keys
        isolated, buried, canceled, culprit = self.transport.run(
            "crashed", [k.leases, k.worker(worker_id)],
            [k.prefix, worker_id, reason, max_crashes, self._deadletter, self._deadletter_schedules, _flag(blame)])
        return Recovered(int(isolated), int(buried), int(canceled)), (culprit.decode() or None)

    def isolated_count(self, queues: Sequence[str]) -> int:
        """Tasks waiting in the isolation lists of these queues."""
        pipe = self._redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(self.keys.isolated(q))
        return sum(int(n) for n in pipe.execute())

    def renew(self, worker_id: str, lease_ms: int) -> int:
        """Extend the leases of a live worker process's tasks and record its heartbeat."""
        k = self.keys
        return int(self.transport.run("renew", [k.leases, k.worker(worker_id), k.workers], [lease_ms, worker_id]))

    def extend(self, task_id: str, token: str, lease_ms: int) -> int:
        """One task's lease to now + lease_ms; the new deadline, or 0 when the lease was lost."""
        k = self.keys
        return int(self.transport.run("extend", [k.task(task_id), k.leases], [task_id, token, lease_ms]))

    def progress(self, task_id: str, token: str, done: float, total: float | None, message: str | None) -> None:
        """progress.lua: a running task's progress (ignored once the lease token is stale)."""
        self.transport.run("progress", [self.keys.task(task_id)],
                           [token, repr(done), "" if total is None else repr(total), message or ""])

    def wait_finished(self, task_id: str, seconds: float) -> bool:
        """Block until a task that keeps its result reaches its final state (finish in _lib.lua
        pushes to P:t:<id>:done), at most ``seconds``; True when woken. BLMOVE from the list to
        itself wakes this caller without taking the element away (nor the key's expiry), so every
        other waiter wakes too."""
        key = self.keys.done(task_id)
        return self._redis.blmove(key, key, max(seconds, 0.01), "LEFT", "RIGHT") is not None

    def overdue(self, worker_id: str, grace_ms: int) -> list[Overdue]:
        """Tasks of a worker process that ignore their abort (batch canceled, task canceled,
        paused with requeue, or past their time limit) for more than ``grace_ms``."""
        k = self.keys
        reply = self.transport.run("overdue", [k.worker(worker_id), k.paused], [k.prefix, grace_ms])
        return [Overdue(reply[i].decode(), reply[i + 1].decode(), int(reply[i + 2]), reply[i + 3].decode(),
                        int(reply[i + 4])) for i in range(1, len(reply), 5)]

    def dataset_marker(self, token: str) -> tuple[str, bool]:
        """The deployment's dataset marker (P:marker), set to ``token`` when absent: (its value,
        whether this call created it). A marker that changes under a running worker means the
        data vanished (worker/maintenance.py)."""
        key = self.keys.marker
        value = self._redis.get(key)
        if value is not None:
            return value.decode(), False
        created = bool(self._redis.set(key, token, nx=True))
        return (token, True) if created else ((self._redis.get(key) or b"").decode(), False)

    def forget_worker(self, worker_id: str) -> None:
        self._redis.hdel(self.keys.workers, worker_id)
        self._redis.delete(self.keys.worker_info(worker_id))

    def forget_silent_workers(self, silent_ms: int) -> list[str]:
        """Forget the worker processes whose heartbeat is older than ``silent_ms`` (server clock):
        the children of a manager killed with SIGKILL, or of a host that vanished, are never
        forgotten by their manager. Their leases expire on their own (recover_expired)."""
        now = self.server_time_ms()
        silent = [w for w, hb in self.worker_heartbeats().items() if now - hb > silent_ms]
        if silent:      # as forget_worker, for all at once (one slot: the prefix's hash tag)
            self._redis.hdel(self.keys.workers, *silent)
            self._redis.delete(*[self.keys.worker_info(w) for w in silent])
        return silent

    def report_worker(self, worker_id: str, fields: dict[str, str | int], ttl_ms: int) -> None:
        """What a worker process says about itself (host, pid, threads, queues, started, rss),
        kept ``ttl_ms`` unless reported again: a process that vanishes leaves nothing behind."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self.keys.worker_info(worker_id), mapping=fields)
        pipe.pexpire(self.keys.worker_info(worker_id), ttl_ms)
        pipe.execute()

    # ============================================================================ control

    def pause(self, scope: str, on: bool, name: str = "", *, requeue: bool = False) -> bool:
        """scope "all" | "queue" | "tenant" | "worker"; True when the state changed. ``requeue``
        (scope all): the pause also asks workers to hand their running tasks back."""
        k = self.keys
        return bool(self.transport.run("pause", [k.paused, k.pausedq, k.pausedt, k.queues, k.pausedw],
                                       [k.prefix, scope, _flag(on), name, _flag(requeue)]))

    def cancel_batch(self, batch_id: str, tenant: str | None) -> bool:
        k = self.keys
        return bool(self.transport.run("cancel_batch", [k.batch(batch_id), k.bend],
                                       [k.prefix, batch_id, tenant or ""], durable=True))

    def cancel_task(self, task_id: str, tenant: str | None) -> bool:
        """cancel_task.lua: a task waiting to run is canceled now, a running one is marked and
        its worker told (it is counted canceled when it ends). False: unknown, another tenant's,
        finished, dead, already told to stop."""
        k = self.keys
        return bool(self.transport.run("cancel_task", [k.task(task_id)], [k.prefix, task_id, tenant or ""],
                                       durable=True))

    def delete_task(self, task_id: str, tenant: str | None, dead_only: bool = False) -> bool:
        """delete_task.lua: a queued, delayed, waiting or (``dead_only``: only a) dead task."""
        k = self.keys
        return bool(self.transport.run("delete_task", [k.task(task_id)],
                                       [k.prefix, task_id, tenant or "", _flag(dead_only)], durable=True))

    def retry_dead_task(self, task_id: str, tenant: str | None, retries: int) -> bool:
        """dead_retry_task.lua: one dead task back to work with ``retries``; False when it is not
        a dead task (of ``tenant``) or belonged to a canceled batch (then it is discarded)."""
        k = self.keys
        return int(self.transport.run("dead_retry_task", [k.task(task_id)],
                                      [k.prefix, task_id, tenant or "", retries], durable=True)) == 1

    def cancel_marks(self, tasks: Sequence[tuple[str, str]]) -> set[str]:
        """Of (task id, lease token) pairs, the ids whose task still runs under that token and
        carries cancel_task's mark (field cx): what a worker reads before it acts on an "x:"
        message, which carries no authority (worker/control.py)."""
        if not tasks:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for task_id, _ in tasks:
            pipe.hmget(self.keys.task(task_id), "a", "cx")
        return {task_id for (task_id, token), (a, cx) in zip(tasks, pipe.execute())
                if cx is not None and a is not None and a.decode() == token}

    def tenant_limits(self) -> dict[str, int]:
        """Every tenant limit this prefix holds (P:tlim)."""
        return {t.decode(): int(n) for t, n in self._redis.hgetall(self.keys.tlim).items()}

    def set_tenant_limit(self, tenant: str, limit: int | None) -> None:
        k = self.keys
        self.transport.run("tenant_limit", [k.tlim], [k.prefix, tenant, limit or 0])

    def retry_dead(self, queue: str, retries: int, count: int) -> int:
        k = self.keys
        return int(self.transport.run("dead_retry", [k.dead(queue)], [k.prefix, retries, count]))

    def discard_dead(self, queue: str, count: int) -> int:
        k = self.keys
        return int(self.transport.run("dead_discard", [k.dead(queue)], [k.prefix, count]))

    def cleanup(self, retention_ms: int, limit: int) -> int:
        """Delete up to ``limit`` batches that ended more than retention ago; how many."""
        k = self.keys
        return int(self.transport.run("cleanup", [k.bend], [k.prefix, retention_ms, limit]))

    # ============================================================================ batches

    def stage_batch(self, batch_id: str, stage: str, ttl_ms: int, shapes: Sequence[tuple[Any, ...]],
                    chunk: Sequence[Any]) -> InFlight:
        """Send one chunk of staged tasks without waiting (read the reply with .result() before
        the next call). ``shapes``: what tasks share (queue, tenant, serializer, target, retries,
        due ms, continuation condition, Controls); ``chunk``: per task id, shape number, payload,
        signature."""
        k = self.keys
        flat = [v for shape in shapes for v in _shape_argv(shape, "", 0)]       # no idempotency key
        return self.transport.send(
            "batch_stage", [k.staged(batch_id, stage), k.staged_continuations(batch_id, stage), k.queues],
            [k.prefix, ttl_ms, batch_id, len(shapes), *flat, *chunk])

    def stage_keyed(self, batch_id: str, stage: str, ttl_ms: int, shape: tuple[Any, ...], entry: Sequence[Any],
                    key: str, key_ttl_ms: int) -> str | None:
        """Stage one task with an idempotency key, alone and synchronously (batch_stage.lua):
        None when it was staged (it holds the key from now on), else the id of the task that
        holds the key (nothing was staged). ``shape`` as for stage_batch (its tenant names the
        key's tenant); ``entry``: the task's id, shape number 1, payload, signature."""
        k = self.keys
        _, holder = self.transport.run(
            "batch_stage", [k.staged(batch_id, stage), k.staged_continuations(batch_id, stage), k.queues],
            [k.prefix, ttl_ms, batch_id, 1, *_shape_argv(shape, k.idempotency(shape[1], key), key_ttl_ms), *entry])
        return holder.decode() or None

    def commit_batch(self, batch_id: str, stage: str, tenant: str, queue: str, scope: str, mode: str,
                     tasks: int, continuations: int, cancel_key: str) -> int:
        """1 committed, 0 append refused, -1 staged data expired (see batch_commit.lua)."""
        k = self.keys
        return int(self.transport.run(
            "batch_commit",
            [k.batch(batch_id), k.staged(batch_id, stage), k.staged_continuations(batch_id, stage),
             k.publication(batch_id, stage), k.publishing, k.batches(tenant), k.continuations(batch_id),
             k.committed_stages(batch_id)],
            [k.prefix, batch_id, stage, tenant, queue, scope, mode, tasks, continuations, cancel_key],
            durable=True))

    def publish_batch(self, batch_id: str, stage: str, chunk: int = PUBLISH_CHUNK) -> None:
        """Move a committed stage's tasks to their queues, one bounded call after another."""
        k = self.keys
        keys = [k.publication(batch_id, stage), k.publishing]
        while self.transport.run("batch_publish", keys, [k.prefix, batch_id, stage, chunk]):
            pass

    def unfinished_publications(self) -> list[tuple[str, str]]:
        """(batch id, stage) of every committed batch whose tasks are not all published."""
        out = []
        for entry in self._redis.smembers(self.keys.publishing):
            batch_id, _, stage = entry.decode().partition(":")
            out.append((batch_id, stage))
        return out

    def abort_stage(self, batch_id: str, stage: str, chunk: int) -> None:
        """Delete what a failed batch build staged, in bounded calls."""
        k = self.keys
        keys = [k.staged(batch_id, stage), k.staged_continuations(batch_id, stage)]
        while self.transport.run("batch_abort", keys, [k.prefix, chunk]):
            pass

    # ========================================================================== schedules

    def schedule_due(self, limit: int) -> DueSchedules:
        """The server clock, the pause flag and up to ``limit`` due schedules (0: clock only)."""
        k = self.keys
        reply = self.transport.run("schedule_due", [k.sdue, k.paused], [k.prefix, limit])
        due = [DueSchedule(sid.decode(), int(float(tick)), cron.decode(), tz.decode(), sec == b"1", version)
               for sid, tick, cron, tz, sec, version in reply[3:]]
        return DueSchedules(now_ms=int(reply[0]), paused=bool(int(reply[1])), next_ms=int(reply[2]), due=due)

    def server_time_ms(self) -> int:
        return self.schedule_due(0).now_ms

    def _tick_keys(self, schedule_id: str, task_id: str) -> list[str]:
        k = self.keys
        return [k.sdue, k.schedule(schedule_id), k.paused, k.task(task_id), k.queues]

    def claim_ticks(self, claims: Sequence[tuple[DueSchedule, str, int]]) -> list[TickResult]:
        """Claim due ticks (schedule, new task id, next tick ms) in one round trip; each claim
        is a compare-and-set that enqueues the run (schedule_tick.lua)."""
        k = self.keys
        calls: list[Call] = [("schedule_tick", self._tick_keys(d.id, tid),
                              [k.prefix, d.id, "tick", tid, d.tick_ms, d.version, nxt]) for d, tid, nxt in claims]
        return [TickResult(int(c), int(now), int(score)) for c, now, score in self.transport.run_many(calls)]

    def trigger_schedule(self, schedule_id: str, task_id: str, tenant: str | None) -> TickResult:
        k = self.keys
        code, now, score = self.transport.run("schedule_tick", self._tick_keys(schedule_id, task_id),
                                              [k.prefix, schedule_id, "trigger", task_id, 0, 0, 0, tenant or ""])
        return TickResult(int(code), int(now), int(score), task_id if int(code) == 1 else "")

    def upsert_schedule(self, schedule_id: str, tenant: str, queue: str, scope: str, cron: str, timezone: str,
                        seconds: bool, unique: bool, expire_ms: int, payload: bytes, serializer: str, target: str,
                        retries: int, next_ms: int, signature: str, controls: Controls = NO_CONTROLS) -> int:
        """1 created, 2 replaced, -1 the id belongs to another tenant."""
        k = self.keys
        code, _ = self.transport.run(
            "schedule_upsert", [k.schedule(schedule_id), k.sdue, k.tenant_schedules(tenant)],
            [k.prefix, schedule_id, tenant, queue, scope, cron, timezone, _flag(seconds), _flag(unique), expire_ms,
             payload, serializer, target, retries, next_ms, signature, *controls.argv()])
        return int(code)

    def cancel_schedule(self, schedule_id: str, tenant: str) -> bool:
        k = self.keys
        return bool(self.transport.run("schedule_cancel", [k.schedule(schedule_id), k.sdue],
                                       [k.prefix, schedule_id, tenant]))

    def pause_schedule(self, schedule_id: str, on: bool, tenant: str | None) -> int:
        """1 changed, 0 already so, -2 unknown (or, with ``tenant``, another tenant's)."""
        code, _ = self.transport.run("schedule_pause", [self.keys.schedule(schedule_id)],
                                     [schedule_id, _flag(on), tenant or ""])
        return int(code)

    def schedule(self, schedule_id: str) -> tuple[dict[bytes, bytes], float | None]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.schedule(schedule_id))
        pipe.zscore(self.keys.sdue, schedule_id)
        h, score = pipe.execute()
        return h, score

    def schedules(self, tenant: str, skip: int, take: int) -> list[tuple[str, dict[bytes, bytes], float | None]]:
        """A tenant's schedules by id: (id, hash, next tick score); deleted ones left out."""
        ids = _decoded(self._redis.zrange(self.keys.tenant_schedules(tenant), skip, skip + take - 1))
        pipe = self._redis.pipeline(transaction=False)
        for sid in ids:
            pipe.hgetall(self.keys.schedule(sid))
            pipe.zscore(self.keys.sdue, sid)
        res = pipe.execute()
        return [(sid, h, score) for sid, h, score in zip(ids, res[::2], res[1::2]) if h]

    def schedule_count(self, tenant: str | None) -> int:
        return int(self._redis.zcard(self.keys.sdue if tenant is None else self.keys.tenant_schedules(tenant)))

    # ============================================================================== reads

    def is_paused(self) -> bool:
        return bool(self._redis.exists(self.keys.paused))

    def is_paused_for_requeue(self) -> bool:
        """Paused by pause(requeue_running=True): what makes a "pr" message act (pause.lua)."""
        return (self._redis.get(self.keys.paused) or b"").startswith(b"requeue:")

    def paused_queues(self) -> list[str]:
        return sorted(_decoded(self._redis.smembers(self.keys.pausedq)))

    def paused_tenants(self) -> list[str]:
        return sorted(_decoded(self._redis.smembers(self.keys.pausedt)))

    def paused_workers(self) -> list[str]:
        return sorted(_decoded(self._redis.smembers(self.keys.pausedw)))

    def is_tenant_paused(self, tenant: str) -> bool:
        return bool(self._redis.sismember(self.keys.pausedt, tenant))

    def queue_names(self) -> list[str]:
        return sorted(_decoded(self._redis.smembers(self.keys.queues)))

    def queue_counts(self, queue: str) -> tuple[int, int, int, int, bool]:
        """(ready, in flight, delayed, dead, paused), read from the counters the scripts keep."""
        k = self.keys
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(k.qstats(queue), "ready", "inflight", "delayed")
        pipe.llen(k.dead(queue))
        pipe.sismember(k.pausedq, queue)
        (ready, inflight, delayed), dead, paused = pipe.execute()
        return int(ready or 0), int(inflight or 0), int(delayed or 0), int(dead), bool(paused)

    def due_count(self) -> int:
        """Delayed or retrying tasks whose due time has passed on the server's clock but that no
        fetch has moved to their queue yet (coretask.testing.drain waits for them too)."""
        return int(self._redis.zcount(self.keys.delayed, "-inf", self.server_time_ms()))

    def queue_tenants(self, queue: str) -> list[str]:
        """Tenants that ever had ready work in the queue, in name order."""
        return sorted(_decoded(self._redis.smembers(self.keys.queue_tenants(queue))))

    def ready_count(self, queue: str, tenant: str) -> int:
        return int(self._redis.llen(self.keys.ready(queue, tenant)))

    def ready_counts(self, queue: str, tenants: Sequence[str]) -> list[int]:
        """Ready tasks of each tenant in the queue, in one pipelined round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for t in tenants:
            pipe.llen(self.keys.ready(queue, t))
        return [int(n) for n in pipe.execute()]

    def ready_ids(self, queue: str, tenant: str, start: int, stop: int) -> list[str]:
        return _decoded(self._redis.lrange(self.keys.ready(queue, tenant), start, stop))

    def dead_ids(self, queue: str, start: int, stop: int) -> list[str]:
        return _decoded(self._redis.lrange(self.keys.dead(queue), start, stop))

    def quarantined(self, skip: int, take: int) -> list[tuple[str, str]]:
        """Quarantined task ids, oldest first, with the reason each was quarantined: records a
        script could not dead-letter because not even their queue could be read (lua/_lib.lua)."""
        k = self.keys
        ids = self._redis.lrange(k.quarantine, skip, skip + take - 1) if take > 0 else []
        if not ids:
            return []
        reasons = self._redis.hmget(k.quarantine_why, ids)
        return [(i.decode(errors="replace"), (why or b"").decode(errors="replace")) for i, why in zip(ids, reasons)]

    def quarantine_count(self) -> int:
        return int(self._redis.llen(self.keys.quarantine))

    def task_hashes(self, task_ids: Sequence[str]) -> list[dict[bytes, bytes] | str]:
        """The tasks' hashes, in order: {} for a task that no longer exists, the error's text
        for a key that is not a hash (read paths show it, never fail on it)."""
        pipe = self._redis.pipeline(transaction=False)
        for tid in task_ids:
            pipe.hgetall(self.keys.task(tid))
        return [f"the task's key is not a hash: {res}" if isinstance(res, Exception) else res
                for res in pipe.execute(raise_on_error=False)]

    def tasks_as_they_are(self, task_ids: Sequence[str]) -> list[tuple[str, dict[bytes, bytes] | str]]:
        """(id, hash) per task, as task_hashes reads them, with the id a task has now: with
        shards, a task that rebalance moved answers under its new id."""
        return list(zip(task_ids, self.task_hashes(task_ids)))

    def batch_result_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        """Ids of a batch's finished tasks that keep their results (P:b:<id>:r), in order."""
        return _decoded(self._redis.lrange(self.keys.batch_results(batch_id), start, stop))

    def leased_to(self, worker_id: str) -> set[str]:
        """Ids of the tasks leased to one worker process (its leases' hash)."""
        return set(_decoded(self._redis.hkeys(self.keys.worker(worker_id))))

    def lease_holders(self, task_ids: Sequence[str]) -> list[tuple[str | None, str | None, str | None]]:
        """Per task: (lease token, state, worker) as stored, None where absent or unreadable (a
        key of another type, a value that is not UTF-8)."""
        pipe = self._redis.pipeline(transaction=False)
        for tid in task_ids:
            pipe.hmget(self.keys.task(tid), "a", "st", "w")
        return [(None, None, None) if isinstance(row, Exception) else
                tuple(v.decode(errors="replace") if v is not None else None for v in row)  # type: ignore[misc]
                for row in pipe.execute(raise_on_error=False)]

    def task_places(self, task_ids: Sequence[str]) -> list[tuple[str, str]]:
        """Per task: (queue, tenant) as stored, "" where absent or unreadable; two fields per
        task, for filtering a page before reading whole records."""
        pipe = self._redis.pipeline(transaction=False)
        for tid in task_ids:
            pipe.hmget(self.keys.task(tid), "q", "tn")
        return [("", "") if isinstance(row, Exception) else
                tuple((v or b"").decode(errors="replace") for v in row)  # type: ignore[misc]
                for row in pipe.execute(raise_on_error=False)]

    def batch_hash(self, batch_id: str) -> dict[bytes, bytes]:
        return self._redis.hgetall(self.keys.batch(batch_id))  # type: ignore[no-any-return]

    def batch_state(self, batch_id: str) -> str | None:
        state = self._redis.hget(self.keys.batch(batch_id), "state")
        return state.decode() if state is not None else None

    def batch_page(self, tenant: str, skip: int, take: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """A tenant's batches, newest first: (id, hash); deleted ones left out."""
        ids = _decoded(self._redis.zrevrange(self.keys.batches(tenant), skip, skip + take - 1))
        pipe = self._redis.pipeline(transaction=False)
        for b in ids:
            pipe.hgetall(self.keys.batch(b))
        return [(b, h) for b, h in zip(ids, pipe.execute()) if h]

    def batch_count(self, tenant: str) -> int:
        return int(self._redis.zcard(self.keys.batches(tenant)))

    def next_ended_batch(self) -> tuple[str, dict[bytes, bytes]] | None:
        """Pop one finished batch waiting for on_batch_end (one at a time: a crash loses at
        most one): (id, hash); the hash is {} when the batch is already deleted. None: empty."""
        b = self._redis.lpop(self.keys.bended)
        if not b:
            return None
        batch_id = b.decode()
        return batch_id, self.batch_hash(batch_id)

    def leased_page(self, start: int, stop: int) -> tuple[list[str], int]:
        """Running task ids by lease deadline (P:leases), and how many run in all."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrange(self.keys.leases, start, stop)
        pipe.zcard(self.keys.leases)
        ids, n = pipe.execute()
        return _decoded(ids), int(n)

    def delayed_page(self, start: int, stop: int) -> tuple[list[tuple[str, int]], int]:
        """Delayed and retrying task ids with their due ms, soonest first, and the total."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrange(self.keys.delayed, start, stop, withscores=True)
        pipe.zcard(self.keys.delayed)
        rows, n = pipe.execute()
        return [(i.decode(errors="replace"), int(score)) for i, score in rows], int(n)

    def batch_task_ids(self, batch_id: str, start: int, stop: int) -> tuple[list[str], int]:
        """A page of a batch's task ids in publication order (P:b:<id>:ids), and their number."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.lrange(self.keys.batch_tasks(batch_id), start, stop)
        pipe.llen(self.keys.batch_tasks(batch_id))
        ids, n = pipe.execute()
        return _decoded(ids), int(n)

    def continuation_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        """A batch's continuations not yet released (P:b:<id>:cont)."""
        return _decoded(self._redis.lrange(self.keys.continuations(batch_id), start, stop))

    def history(self, minutes: Sequence[int]) -> list[dict[str, int]]:
        """Per minute (ms // 60000): {"p:<queue>": attempts ended, "f:<queue>": failed}, {} for
        a minute with none (or expired); one pipelined HGETALL per minute, keys read by name."""
        pipe = self._redis.pipeline(transaction=False)
        for m in minutes:
            pipe.hgetall(self.keys.history(m))
        return [{k.decode(errors="replace"): int(v) for k, v in h.items()} for h in pipe.execute()]

    def worker_details(self, worker_ids: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
        """Per worker process: how many tasks it holds now (HKEYS of its leases: the documented
        ACL user has no HLEN) and what it last reported about itself ({} when nothing, or
        expired)."""
        pipe = self._redis.pipeline(transaction=False)
        for w in worker_ids:
            pipe.hkeys(self.keys.worker(w))
            pipe.hgetall(self.keys.worker_info(w))
        res = pipe.execute()
        return [(len(n), {k.decode(errors="replace"): v.decode(errors="replace") for k, v in h.items()})
                for n, h in zip(res[::2], res[1::2])]

    def worker_heartbeats(self) -> dict[str, int]:
        """Worker id -> last heartbeat (ms, server clock)."""
        return {w.decode(): int(hb) for w, hb in self._redis.hgetall(self.keys.workers).items()}

    def tenant_page(self, skip: int, take: int) -> list[str]:
        return _decoded(self._redis.zrange(self.keys.tenants, skip, skip + take - 1))

    def tenant_count(self) -> int:
        return int(self._redis.zcard(self.keys.tenants))

    def tenant_known(self, tenant: str) -> bool:
        """Has work or history, is paused, or has a limit."""
        k = self.keys
        pipe = self._redis.pipeline(transaction=False)
        pipe.zscore(k.tenants, tenant)
        pipe.sismember(k.pausedt, tenant)
        pipe.hexists(k.tlim, tenant)
        score, paused, limited = pipe.execute()
        return score is not None or bool(paused) or bool(limited)

    def tenant_counters(self, tenant: str) -> tuple[dict[str, int], int, dict[str, int], bool, int | None]:
        """(ready per queue, running, counters of P:ts:<tenant>, paused, limit override)."""
        k = self.keys
        queues = self.queue_names()
        pipe = self._redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(k.ready(q, tenant))
        pipe.hget(k.trun, tenant)
        pipe.hgetall(k.tstats(tenant))
        pipe.sismember(k.pausedt, tenant)
        pipe.hget(k.tlim, tenant)
        res = pipe.execute()
        lengths, (running, counters, paused, limit) = res[:len(queues)], res[len(queues):]
        return ({q: int(n) for q, n in zip(queues, lengths)}, int(running or 0),
                {key.decode(): int(v) for key, v in counters.items()}, bool(paused),
                int(limit) if limit else None)


def _shape_argv(shape: tuple[Any, ...], key: str, key_ttl_ms: int) -> list[Any]:
    """A batch shape as batch_stage.lua takes it: its first seven values, the idempotency key
    and its key_ttl, then the Controls' three values."""
    *head, controls = shape
    return [*head, key, key_ttl_ms, *controls.argv()]
