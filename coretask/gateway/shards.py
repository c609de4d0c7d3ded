"""Shards: one deployment over several hash tags, so that a Redis Cluster spreads its work over
several masters (Options.shards).

Each shard is a whole coretask keyspace under a hash tag of its own, served by an ordinary
Gateway, and every script runs inside one shard: a script's atomicity is what it was with one.
What crosses shards is decided here, and only here:

- placement: a tenant's new work goes to its shard: Options.shard_map, else the directory kept
  on shard 0 (P:tshard), which records a stable hash of the tenant on its first use (a tenant
  that shard 0 knew before sharding was turned on stays there, so an upgrade moves no key);
- addresses: a task's or batch's id ends with its shard (``<hex>.<n>``; shard 0's ids have no
  suffix, as before sharding), so every call about an id goes to exactly one shard;
- workers: the fetch rotates over the shards that may have work; a shard whose fetch came back
  short is skipped until a pub/sub event from it, its next due time or base_frequency says
  otherwise, so an idle shard costs no round trips;
- control: pause, resume and tenant limits are written to every shard before the call returns,
  and each shard's fetch script keeps checking its own flags;
- reads: counts are summed over the shards, lists concatenated (or merged in their order).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ..errors import ConfigurationError, StoreUnavailable, TaskRefused
from ..options import Options
from ..signing import TASK, signer_for
from .gateway import Gateway
from .keys import Keys
from .records import (NO_CONTROLS, Ack, Controls, DueSchedule, DueSchedules, Failure, FetchReply, Outcomes,
                      Overdue, Recovered, Release, TickResult)
from .transport import InFlight, Transport

__all__ = ["ShardedGateway", "shard_prefixes", "shard_of_id", "stable_shard", "with_shard"]

log = logging.getLogger(__name__)

DIRECTORY_TTL = 5.0     # seconds a process trusts its copy of a tenant's directory entry
BACKOFF_START = 0.1     # seconds before the first probe of a shard found down
PROBE_MAX = 1.0         # longest wait between two probes
MOVE_CHUNK = 200        # candidate ids per move_out call (rebalance)

T = TypeVar("T")


def shard_prefixes(prefix: str, n: int) -> list[str]:
    """The key prefix of each of ``n`` shards. Shard 0 keeps ``prefix`` (so that a deployment
    that turns sharding on moves nothing); shard i's hash tag is the prefix's with ``~i`` added
    (then ``.1``, ``.2`` ... until it fits) so that its slot lies in the i-th of n equal slot
    ranges after shard 0's. A cluster whose masters hold equal ranges, as ``redis-cli --cluster
    create`` assigns them, then serves n shards on n masters (or n/masters each)."""
    if n == 1:
        return [prefix]
    tag = re.search(r"\{([^{}]+)\}", prefix)
    if tag is None:     # no hash tag: a standalone server, where names only need to differ
        return [prefix] + [f"{prefix}~{i}" for i in range(1, n)]
    first = _segment(prefix, n)
    out = [prefix]
    for i in range(1, n):
        k = 0
        while True:
            name = f"{tag.group(1)}~{i}" + (f".{k}" if k else "")
            candidate = f"{prefix[:tag.start()]}{{{name}}}{prefix[tag.end():]}"
            if _segment(candidate, n) == (first + i) % n:
                break
            k += 1
        out.append(candidate)
    return out


def _segment(prefix: str, n: int) -> int:
    return key_slot(prefix.encode()) * n // REDIS_CLUSTER_HASH_SLOTS


def stable_shard(tenant: str, n: int) -> int:
    """A tenant's shard by its name alone: the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=8).digest(), "big") % n


def with_shard(raw_id: str, shard: int) -> str:
    return raw_id if shard == 0 else f"{raw_id}.{shard}"


def shard_of_id(some_id: str, n: int) -> int:
    """The shard an id names (0 for an id without a suffix, or one this deployment lacks)."""
    _, dot, tail = some_id.rpartition(".")
    return int(tail) if dot and tail.isdigit() and int(tail) < n else 0


class _Health:
    """Which shards cannot be reached now. The first call that finds a shard down (a master
    failing over, about a second inside redis-py's retries) marks it; from then on calls to it
    fail at once with StoreUnavailable, and a background thread probes it until it answers,
    so that no caller (a worker's turn, its maintenance, a producer) waits on a dead shard
    again while the other shards are served."""

    def __init__(self, shards: list[Gateway], on_up: Callable[[int], None]) -> None:
        self.shards = shards
        self.down = [False] * len(shards)
        self.on_up = on_up
        self._lock = threading.Lock()

    def check(self, shard: int) -> None:
        if self.down[shard]:
            g = self.shards[shard]
            raise StoreUnavailable(f"shard {shard} ({g.keys.prefix}) of Redis at {g.url} cannot be reached; it is "
                                   "probed in the background and used again as soon as it answers", url=g.url,
                                   shard=shard)

    def failed(self, shard: int) -> None:
        with self._lock:
            if self.down[shard]:
                return
            self.down[shard] = True
        g = self.shards[shard]
        log.warning("shard %d (%s) of Redis at %s cannot be reached: skipped, and probed in the background "
                    "until it answers; the other shards carry on", shard, g.keys.prefix, g.url)
        threading.Thread(target=self._probe, args=(shard,), name=f"coretask-shard-{shard}-probe",
                         daemon=True).start()

    def _probe(self, shard: int) -> None:
        wait, since = BACKOFF_START, time.monotonic()
        while True:
            time.sleep(wait)
            try:
                self.shards[shard].ping()
            except Exception:
                wait = min(wait * 2, PROBE_MAX)
                continue
            self.down[shard] = False
            log.warning("shard %d (%s) answers again after %.1fs", shard, self.shards[shard].keys.prefix,
                        time.monotonic() - since)
            self.on_up(shard)
            return


class _Guarded:
    """A shard's Gateway as ShardedGateway calls it: refused at once while the shard is down,
    and marked down by a call that finds it unreachable (_Health)."""

    def __init__(self, gateway: Gateway, shard: int, health: _Health) -> None:
        self._g, self._shard, self._health = gateway, shard, health
        self.keys, self.url = gateway.keys, gateway.url

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._g, name)
        shard, health = self._shard, self._health

        def call(*args: Any, **kwargs: Any) -> Any:
            health.check(shard)
            try:
                return method(*args, **kwargs)
            except StoreUnavailable as exc:
                exc.shard = shard
                health.failed(shard)
                raise
        return call


@dataclasses.dataclass
class _Rotation:
    """One worker process's view of which shards may have work (see the module docstring)."""

    ready: list[bool]
    due_ms: list[int]             # each shard's earliest delayed task (server clock), -1 none
    held: Outcomes = dataclasses.field(default_factory=Outcomes)   # for shards that were down
    start: int = 0                # the shard the next turn asks first
    polled: float = 0.0           # monotonic time every shard was last marked ready
    offset_ms: float = 0.0        # server clock minus local clock, from the last reply
    paused: bool = False


class ShardedGateway:
    """The Gateway interface over ``Options.shards`` shards (module docstring). Thread-safe."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.n = options.shards
        self.prefixes = shard_prefixes(options.prefix, self.n)
        first = Gateway(options.replace(prefix=self.prefixes[0], shards=1, shard_map=None))
        client = first.transport.redis
        plain = [first]
        for p in self.prefixes[1:]:
            o = options.replace(prefix=p, shards=1, shard_map=None)
            plain.append(Gateway(o, Transport(o, client, guard=Keys(p).migration_guard)))
        self._health = _Health(plain, self._shard_up)
        self.shards: list[Gateway] = [cast(Gateway, _Guarded(g, s, self._health)) for s, g in enumerate(plain)]
        self.keys = first.keys              # shard 0's: its name stands for the deployment in logs
        self.transport = first.transport
        self.url = first.url
        self.shard_map = dict(options.shard_map or {})
        self.signer = signer_for(options)   # signs a moved task again: its signature names its id
        self._placed: dict[str, tuple[int, float]] = {}
        self._rotations: dict[str, _Rotation] = {}
        self._lock = threading.Lock()
        self._base = options.base_frequency.total_seconds()

    # ====================================================================== addresses

    def tenant_shard(self, tenant: str, place: bool = True) -> int:
        """Where the tenant's new work goes (module docstring, placement). ``place=False`` for
        a read (get_tenant_shard, the CLI): the shard its first work would go to, unrecorded,
        so that looking up a misspelt name leaves nothing behind."""
        fixed = self.shard_map.get(tenant)
        if fixed is not None:
            return fixed
        now = time.monotonic()
        hit = self._placed.get(tenant)
        if hit is not None and hit[1] > now:
            return hit[0]
        home = self.shards[0]
        shard = home.placement(tenant)
        if shard is None or shard >= self.n:
            guess = 0 if home.tenant_has_history(tenant) else stable_shard(tenant, self.n)
            if not place:
                return guess
            shard = home.place(tenant, guess)
        self._placed[tenant] = (shard, now + DIRECTORY_TTL)
        return shard

    def move_tenant(self, tenant: str, shard: int) -> None:
        """Point the directory at ``shard`` for the tenant's new work (rebalance)."""
        self.shards[0].place(tenant, shard, replace=True)
        self._placed.pop(tenant, None)

    # ====================================================================== rebalance

    def rebalance(self, tenant: str, shard: int) -> tuple[int, int]:
        """Send the tenant's new work to ``shard`` and move its queued and delayed tasks there,
        task by task (move_out.lua, move_in.lua, move_done.lua: each step atomic, each move
        finished by a later call if this one is cut short, nothing run twice or lost: the
        tenant is paused, so no worker takes a task while it moves). A moved task gets an id
        of its new shard; its old id forwards to it. Tasks of batches stay (their batch's
        counters are on their shard) and finish there. Passes repeat until one moves nothing
        (a delayed task fetched into a ready list meanwhile is found by the next pass).
        Returns (tasks moved, tasks of batches left where they are)."""
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self.n:
            raise ConfigurationError(f"shard must be a number from 0 to {self.n - 1}, got {shard!r}")
        if tenant in self.shard_map and self.shard_map[tenant] != shard:
            raise ConfigurationError(f"Options.shard_map places tenant {tenant!r} on shard {self.shard_map[tenant]}: "
                                     f"change shard_map to {shard} in every process instead")
        if not self.is_tenant_paused(tenant):
            raise ConfigurationError(f"tenant {tenant!r} is not paused: pause it first (processor.pause_tenant"
                                     f"({tenant!r}) or `python -m coretask --app APP pause --tenant {tenant}`), so that no "
                                     "worker takes a task while it moves; resume it afterwards")
        self.move_tenant(tenant, shard)
        moved = kept = 0
        while True:
            moved_now = kept = 0
            for s, g in enumerate(self.shards):
                if s == shard:
                    continue
                for old, fields in g.moving():          # a move cut short: finish it first
                    moved_now += self._move(g, old, fields, shard)
                for queue in g.queue_names():
                    n, k = self._move_list(g, shard, tenant, lambda lo, hi, q=queue: g.ready_ids(q, tenant, lo, hi))
                    moved_now, kept = moved_now + n, kept + k
                n, k = self._move_list(g, shard, tenant, lambda lo, hi: [i for i, _ in g.delayed_page(lo, hi)[0]])
                moved_now, kept = moved_now + n, kept + k
            moved += moved_now
            if not moved_now:
                return moved, kept

    def _move_list(self, g: Gateway, shard: int, tenant: str,
                   page: Callable[[int, int], list[str]]) -> tuple[int, int]:
        """Move what move_out takes of a list read page by page; (moved, the tenant's left in place)."""
        moved = kept = start = 0
        while True:
            ids = page(start, start + MOVE_CHUNK - 1)
            if not ids:
                return moved, kept
            taken, left = g.move_out(tenant, ids, self.signer is not None)
            for old, fields in taken:
                moved += self._move(g, old, fields, shard)
            kept += left
            start += len(ids) - len(taken)      # what stayed is ahead of the next page

    def _move(self, source: Gateway, old: str, fields: list[Any], shard: int) -> int:
        new = with_shard(old.rpartition(".")[0] if shard_of_id(old, self.n) else old, shard)
        self.shards[shard].move_in(new, self._signed_again(old, new, fields))
        source.move_done(old, new, int(self.options.retention.total_seconds() * 1000))
        return 1

    def _signed_again(self, old: str, new: str, fields: list[Any]) -> list[Any]:
        """A task's signature names its id (coretask/signing.py), so a moved task's is verified
        under its old id and made again for the new one, with this process's signing_key
        (move_out leaves such tasks in place when there is none). One that does not verify is
        moved as it is: it was refused where it was, and is refused where it goes."""
        f = {bytes(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
        sg = bytes(f.get(b"sg", b"")).decode(errors="replace")
        if self.signer is None or not sg.startswith(TASK + ":"):
            return fields
        text = {name: bytes(f.get(name, b"")).decode(errors="replace") for name in (b"tn", b"q", b"s", b"tg")}
        try:
            again = self.signer.task_moved(sg, old, new, text[b"tn"], text[b"q"], text[b"s"], text[b"tg"],
                                           bytes(f.get(b"p", b"")))
        except TaskRefused:
            return fields
        out = list(fields)
        out[next(i for i in range(0, len(out), 2) if bytes(out[i]) == b"sg") + 1] = again
        return out

    def forwarded(self, task_id: str) -> str | None:
        return self.at(task_id).forwarded_id(task_id)

    def _follow(self, task_id: str) -> str:
        """The id a task has now: its own, or where rebalance moved it (read only when the
        record is missing under the id)."""
        if self.at(task_id).task_hashes([task_id])[0]:
            return task_id
        return self.forwarded(task_id) or task_id

    def new_id(self, tenant: str) -> str:
        return with_shard(os.urandom(16).hex(), self.tenant_shard(tenant))

    def new_id_near(self, other_id: str) -> str:
        return with_shard(os.urandom(16).hex(), shard_of_id(other_id, self.n))

    def at(self, some_id: str) -> Gateway:
        return self.shards[shard_of_id(some_id, self.n)]

    def _grouped(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """Positions of ``ids`` per shard."""
        out: dict[int, list[int]] = {}
        for i, some_id in enumerate(ids):
            out.setdefault(shard_of_id(some_id, self.n), []).append(i)
        return out

    def _per_id(self, ids: Sequence[str], read: Callable[[Gateway, list[str]], list[T]]) -> list[T]:
        """``read`` on each shard for its ids, answers back in the order of ``ids``."""
        out: list[Any] = [None] * len(ids)
        for shard, positions in self._grouped(ids).items():
            for i, value in zip(positions, read(self.shards[shard], [ids[i] for i in positions])):
                out[i] = value
        return out

    def _split(self, outcomes: Outcomes) -> dict[int, Outcomes]:
        out: dict[int, Outcomes] = {}
        for kind in ("acks", "failures", "releases"):
            for o in getattr(outcomes, kind):
                getattr(out.setdefault(shard_of_id(o.task_id, self.n), Outcomes()), kind).append(o)
        return out

    def parts(self) -> list[Gateway]:
        return list(self.shards)

    def channels(self) -> list[str]:
        return [g.keys.events for g in self.shards]

    def close(self) -> None:
        """Never refused: closing is what a caller does after a shard failed (the CLI, an app's
        shutdown), so it goes to shard 0's plain gateway, past the health guard."""
        self._health.shards[0].close()          # one client serves every shard

    def publish(self, message: str) -> None:
        for g in self.shards:
            g.publish(message)

    def subscribe(self) -> Any:
        pubsub = self.transport.redis.pubsub()
        pubsub.subscribe(*self.channels())
        return pubsub

    # ====================================================================== task lifecycle

    def enqueue(self, task_id: str, queue: str, tenant: str, payload: bytes, serializer: str, target: str,
                retries: int, due_ms: int, signature: str, controls: Controls = NO_CONTROLS) -> int:
        return self.at(task_id).enqueue(task_id, queue, tenant, payload, serializer, target, retries, due_ms,
                                        signature, controls)

    def enqueue_keyed(self, task_id: str, queue: str, tenant: str, payload: bytes, serializer: str, target: str,
                      retries: int, due_ms: int, signature: str, key: str, key_ttl_ms: int,
                      controls: Controls = NO_CONTROLS) -> str | None:
        return self.at(task_id).enqueue_keyed(task_id, queue, tenant, payload, serializer, target, retries, due_ms,
                                              signature, key, key_ttl_ms, controls)

    def _shard_up(self, shard: int) -> None:
        for rot in list(self._rotations.values()):
            rot.ready[shard] = True

    def _rotation(self, worker_id: str) -> _Rotation:
        with self._lock:
            rot = self._rotations.get(worker_id)
            if rot is None:
                rot = self._rotations[worker_id] = _Rotation([True] * self.n, [-1] * self.n)
            return rot

    def wake(self, worker_id: str, channel: str) -> None:
        """A pub/sub event came from a shard's channel: that shard may have work for the worker."""
        rot = self._rotations.get(worker_id)
        if rot is not None:
            for shard, g in enumerate(self.shards):
                if g.keys.events == channel:
                    rot.ready[shard] = True

    handoffs = False    # an idle worker waits on every shard: woken by events, not handed tasks
    handoff_wait_s = 0.0

    def exchange(self, worker_id: str, outcomes: Outcomes, free: int, lease_ms: int, default_limit: int,
                 queues: Sequence[str], *, isolated: bool = False, idle_ms: int = 0) -> FetchReply:
        """Outcomes go to their shards; the fetch asks the shards that may have work, starting one
        further each turn (so that no shard waits behind another), until ``free`` tasks came.
        A shard that cannot be reached (its master failing over) is left out for a growing
        while, its outcomes kept for it, so that the other shards' work goes on; only when no
        shard answered does the call fail (and the worker backs off as with one shard)."""
        rot = self._rotation(worker_id)
        held, rot.held = rot.held, Outcomes()
        outcomes = _merged(held, outcomes)
        local_ms = time.time() * 1000
        if time.monotonic() - rot.polled >= self._base:
            rot.ready = [True] * self.n         # the safety net for a lost event, as one shard polls
            rot.polled = time.monotonic()
        server_ms = local_ms + rot.offset_ms
        for s, due in enumerate(rot.due_ms):
            if due != -1 and due <= server_ms:
                rot.ready[s] = True
        split = self._split(outcomes)
        order = [(rot.start + i) % self.n for i in range(self.n)]
        rot.start = (rot.start + 1) % self.n
        tasks, unreadable, paused, now_ms = [], [], None, None
        left, failed, answered = free, None, 0
        for s in order:
            g, mine = self.shards[s], split.pop(s, Outcomes())
            if self._health.down[s]:
                rot.held = _merged(rot.held, mine)
                continue
            try:
                if not (left > 0 and rot.ready[s]):
                    if mine:
                        g.send_outcomes(worker_id, mine)
                        answered += 1
                    continue
                reply = g.exchange(worker_id, mine, left, lease_ms, default_limit, queues, isolated=isolated)
            except Exception as exc:
                rot.held = _merged(rot.held, mine)
                rot.ready[s] = True
                failed = failed or exc
                continue
            answered += 1
            tasks += reply.tasks
            unreadable += reply.unreadable
            paused = reply.paused or bool(paused)
            now_ms = reply.now_ms
            rot.offset_ms = reply.now_ms - local_ms
            rot.due_ms[s] = reply.next_due_ms
            if len(reply.tasks) + len(reply.unreadable) < left:
                rot.ready[s] = False        # drained: skipped until woken
            left -= len(reply.tasks) + len(reply.unreadable)
        if failed is not None and not answered:
            rot.held = held             # the caller keeps ``outcomes`` for its next try
            raise failed
        if paused is not None:
            rot.paused = paused
        dues = [d for d in rot.due_ms if d != -1]
        return FetchReply(paused=rot.paused, next_due_ms=min(dues) if dues else -1,
                          now_ms=int(now_ms if now_ms is not None else local_ms + rot.offset_ms),
                          tasks=tasks, unreadable=unreadable)

    def fetch(self, worker_id: str, free: int, lease_ms: int, default_limit: int,
              queues: Sequence[str]) -> FetchReply:
        return self.exchange(worker_id, Outcomes(), free, lease_ms, default_limit, queues)

    # an idle worker of several shards is never registered for hand-offs (``handoffs``): there
    # is no wait to end and no inbox to empty
    @staticmethod
    def idle_registered(reply: FetchReply, idle_ms: int) -> int:
        return 0

    def await_handoff(self, worker_id: str, timeout_s: float) -> FetchReply | None:
        return None

    def idle_wake(self, worker_id: str) -> None:
        pass

    def idle_leave(self, worker_id: str) -> list[FetchReply]:
        return []

    def send_outcomes(self, worker_id: str, outcomes: Outcomes) -> None:
        rot = self._rotations.get(worker_id)
        if rot is not None:             # what the worker's turns kept for a shard that was down
            held, rot.held = rot.held, Outcomes()
            outcomes = _merged(held, outcomes)
        try:
            for shard, mine in self._split(outcomes).items():
                self.shards[shard].send_outcomes(worker_id, mine)
        except Exception:
            if rot is not None:
                rot.held = _merged(held, rot.held)    # the caller keeps its own ``outcomes``
            raise

    def complete(self, worker_id: str, acks: Sequence[Ack]) -> list[int]:
        return self._per_id([a.task_id for a in acks], lambda g, ids: g.complete(
            worker_id, [a for a in acks if a.task_id in set(ids)]))

    def fail(self, worker_id: str, failure: Failure) -> int:
        return self.at(failure.task_id).fail(worker_id, failure)

    def release(self, worker_id: str, releases: Sequence[Release]) -> int:
        return sum(self.shards[s].release(worker_id, [releases[i] for i in positions])
                   for s, positions in self._grouped([r.task_id for r in releases]).items())

    def _everywhere(self, call: Callable[[Gateway], T]) -> list[T]:
        """``call`` on every shard, for what each must do whatever the others' state: a shard
        that fails does not keep the others from renewing or recovering; the first error is
        raised once every shard was tried."""
        out, error = [], None
        for g in self.shards:
            try:
                out.append(call(g))
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return out

    def recover_worker(self, worker_id: str, reason: str, consume_retry: bool) -> Recovered:
        return _sum_recovered(self._everywhere(lambda g: g.recover_worker(worker_id, reason, consume_retry)))

    def recover_expired(self, reason: str, limit: int) -> Recovered:
        return _sum_recovered(self._everywhere(lambda g: g.recover_expired(reason, limit)))

    def crashed(self, worker_id: str, reason: str, max_crashes: int) -> tuple[Recovered, str | None]:
        """Each shard judges the tasks it holds: a culprit is named only when the crashed
        process ran a single task in all."""
        running = sum(len(g.leased_to(worker_id)) for g in self.shards)
        results = [g.crashed(worker_id, reason, max_crashes, blame=running <= 1) for g in self.shards]
        culprits = [c for _, c in results if c]
        return _sum_recovered(r for r, _ in results), (culprits[0] if culprits else None)

    def isolated_count(self, queues: Sequence[str]) -> int:
        return sum(g.isolated_count(queues) for g in self.shards)

    def renew(self, worker_id: str, lease_ms: int) -> int:
        return sum(self._everywhere(lambda g: g.renew(worker_id, lease_ms)))

    def extend(self, task_id: str, token: str, lease_ms: int) -> int:
        return self.at(task_id).extend(task_id, token, lease_ms)

    def progress(self, task_id: str, token: str, done: float, total: float | None, message: str | None) -> None:
        self.at(task_id).progress(task_id, token, done, total, message)

    def wait_finished(self, task_id: str, seconds: float) -> bool:
        task_id = self._follow(task_id)
        return self.at(task_id).wait_finished(task_id, seconds)

    def overdue(self, worker_id: str, grace_ms: int) -> list[Overdue]:
        return [row for rows in self._everywhere(lambda g: g.overdue(worker_id, grace_ms)) for row in rows]

    def dataset_marker(self, token: str) -> tuple[str, bool]:
        """Every shard's marker: a shard whose data vanished (its master failed over to an empty
        replica) changes the combined value like a whole dataset would."""
        marks = [g.dataset_marker(f"{token}.{i}") for i, g in enumerate(self.shards)]
        return ",".join(v for v, _ in marks), any(c for _, c in marks)

    def forget_worker(self, worker_id: str) -> None:
        self._everywhere(lambda g: g.forget_worker(worker_id))

    def forget_silent_workers(self, silent_ms: int) -> list[str]:
        return sorted({w for ws in self._everywhere(lambda g: g.forget_silent_workers(silent_ms)) for w in ws})

    def report_worker(self, worker_id: str, fields: dict[str, str | int], ttl_ms: int) -> None:
        self.shards[0].report_worker(worker_id, fields, ttl_ms)

    # ============================================================================ control

    def pause(self, scope: str, on: bool, name: str = "", *, requeue: bool = False) -> bool:
        changed = [g.pause(scope, on, name, requeue=requeue) for g in self.shards]
        return any(changed)

    def cancel_batch(self, batch_id: str, tenant: str | None) -> bool:
        return self.at(batch_id).cancel_batch(batch_id, tenant)

    def cancel_task(self, task_id: str, tenant: str | None) -> bool:
        task_id = self._follow(task_id)
        return self.at(task_id).cancel_task(task_id, tenant)

    def delete_task(self, task_id: str, tenant: str | None, dead_only: bool = False) -> bool:
        task_id = self._follow(task_id)
        return self.at(task_id).delete_task(task_id, tenant, dead_only)

    def retry_dead_task(self, task_id: str, tenant: str | None, retries: int) -> bool:
        task_id = self._follow(task_id)
        return self.at(task_id).retry_dead_task(task_id, tenant, retries)

    def cancel_marks(self, tasks: Sequence[tuple[str, str]]) -> set[str]:
        marked: set[str] = set()
        for s, positions in self._grouped([t for t, _ in tasks]).items():
            marked |= self.shards[s].cancel_marks([tasks[i] for i in positions])
        return marked

    def set_tenant_limit(self, tenant: str, limit: int | None) -> None:
        for g in self.shards:
            g.set_tenant_limit(tenant, limit)

    def retry_dead(self, queue: str, retries: int, count: int) -> int:
        """count 0: all of them, on every shard; else up to count in all."""
        done = 0
        for g in self.shards:
            if count == 0 or done < count:
                done += g.retry_dead(queue, retries, count and count - done)
        return done

    def discard_dead(self, queue: str, count: int) -> int:
        done = 0
        for g in self.shards:
            if count == 0 or done < count:
                done += g.discard_dead(queue, count and count - done)
        return done

    def cleanup(self, retention_ms: int, limit: int) -> int:
        return max(self._everywhere(lambda g: g.cleanup(retention_ms, limit)))

    # ============================================================================ batches

    def stage_batch(self, batch_id: str, stage: str, ttl_ms: int, shapes: Sequence[tuple[Any, ...]],
                    chunk: Sequence[Any]) -> InFlight:
        return self.at(batch_id).stage_batch(batch_id, stage, ttl_ms, shapes, chunk)

    def stage_keyed(self, batch_id: str, stage: str, ttl_ms: int, shape: tuple[Any, ...], entry: Sequence[Any],
                    key: str, key_ttl_ms: int) -> str | None:
        return self.at(batch_id).stage_keyed(batch_id, stage, ttl_ms, shape, entry, key, key_ttl_ms)

    def commit_batch(self, batch_id: str, stage: str, tenant: str, queue: str, scope: str, mode: str,
                     tasks: int, continuations: int, cancel_key: str) -> int:
        return self.at(batch_id).commit_batch(batch_id, stage, tenant, queue, scope, mode, tasks, continuations,
                                              cancel_key)

    def publish_batch(self, batch_id: str, stage: str, chunk: int = 500) -> None:
        self.at(batch_id).publish_batch(batch_id, stage, chunk)

    def unfinished_publications(self) -> list[tuple[str, str]]:
        return [p for g in self.shards for p in g.unfinished_publications()]

    def abort_stage(self, batch_id: str, stage: str, chunk: int) -> None:
        self.at(batch_id).abort_stage(batch_id, stage, chunk)

    # ========================================================================== schedules
    # A schedule lives on its tenant's shard; its id is the user's, so an id alone is looked
    # up on every shard (schedules are few and these calls rare), and a due schedule carries
    # the shard it came from to its claim.

    def schedule_due(self, limit: int) -> DueSchedules:
        """The due schedules of every shard that answers: a shard that is down (failing over)
        keeps only its own schedules from ticking, and is asked again within PROBE_MAX."""
        replies, error = [], None
        for s, g in enumerate(self.shards):
            try:
                replies.append((s, g.schedule_due(limit)))
            except StoreUnavailable as exc:
                error = error or exc
        if not replies:
            raise cast(StoreUnavailable, error)
        now = replies[0][1].now_ms
        nexts = [r.next_ms for _, r in replies if r.next_ms != -1]
        if error is not None:
            nexts.append(now + int(PROBE_MAX * 1000))
        due = [dataclasses.replace(d, shard=s) for s, r in replies for d in r.due]
        return DueSchedules(now_ms=now, paused=any(r.paused for _, r in replies),
                            next_ms=min(nexts) if nexts else -1, due=due)

    def server_time_ms(self) -> int:
        return self.shards[0].server_time_ms()

    def claim_ticks(self, claims: Sequence[tuple[DueSchedule, str, int]]) -> list[TickResult]:
        out: list[Any] = [None] * len(claims)
        by_shard: dict[int, list[int]] = {}
        for i, (d, _, _) in enumerate(claims):
            by_shard.setdefault(d.shard, []).append(i)
        for s, positions in by_shard.items():
            mine = [(claims[i][0], with_shard(claims[i][1], s), claims[i][2]) for i in positions]
            for i, res in zip(positions, self.shards[s].claim_ticks(mine)):
                out[i] = res
        return out

    def _schedule_shard(self, schedule_id: str) -> int | None:
        for s, g in enumerate(self.shards):
            if g.schedule(schedule_id)[0]:
                return s
        return None

    def trigger_schedule(self, schedule_id: str, task_id: str, tenant: str | None) -> TickResult:
        s = self._schedule_shard(schedule_id)
        return self.shards[s or 0].trigger_schedule(schedule_id, with_shard(task_id, s or 0), tenant)

    def upsert_schedule(self, schedule_id: str, tenant: str, queue: str, scope: str, cron: str, timezone: str,
                        seconds: bool, unique: bool, expire_ms: int, payload: bytes, serializer: str, target: str,
                        retries: int, next_ms: int, signature: str, controls: Controls = NO_CONTROLS) -> int:
        """On the shard that holds the id already (an update), else on the tenant's."""
        s = self._schedule_shard(schedule_id)
        g = self.shards[s if s is not None else self.tenant_shard(tenant)]
        return g.upsert_schedule(schedule_id, tenant, queue, scope, cron, timezone, seconds, unique, expire_ms,
                                 payload, serializer, target, retries, next_ms, signature, controls)

    def cancel_schedule(self, schedule_id: str, tenant: str) -> bool:
        s = self._schedule_shard(schedule_id)
        return s is not None and self.shards[s].cancel_schedule(schedule_id, tenant)

    def pause_schedule(self, schedule_id: str, on: bool, tenant: str | None) -> int:
        s = self._schedule_shard(schedule_id)
        return -2 if s is None else self.shards[s].pause_schedule(schedule_id, on, tenant)

    def schedule(self, schedule_id: str) -> tuple[dict[bytes, bytes], float | None]:
        s = self._schedule_shard(schedule_id)
        return self.shards[s].schedule(schedule_id) if s is not None else ({}, None)

    def schedules(self, tenant: str, skip: int, take: int) -> list[tuple[str, dict[bytes, bytes], float | None]]:
        rows = sorted(row for g in self.shards for row in g.schedules(tenant, 0, skip + take))
        return rows[skip:skip + take]

    def schedule_count(self, tenant: str | None) -> int:
        return sum(g.schedule_count(tenant) for g in self.shards)

    # ============================================================================== reads

    def check_shard_count(self) -> None:
        self.shards[0].check_shard_count(self.n)

    def carry_controls(self) -> int:
        """A pause or tenant limit set while the deployment had fewer shards lives on shard 0
        alone, and each shard's fetch checks only its own: every worker process carries what
        any shard holds to the shards that lack it before its first fetch, so that turning
        sharding on never resumes what was paused nor lifts a limit. (A resume or a cleared
        limit clears every shard; this only adds.)"""
        written = 0
        if self.is_paused():
            for g in self.shards:
                if not g.is_paused():
                    g.pause("all", True)
                    written += 1
        for scope, held in (("queue", [g.paused_queues() for g in self.shards]),
                            ("tenant", [g.paused_tenants() for g in self.shards]),
                            ("worker", [g.paused_workers() for g in self.shards])):
            for name in sorted(set().union(*held)):
                for g, flags in zip(self.shards, held):
                    if name not in flags:
                        g.pause(scope, True, name)
                        written += 1
        limits = [g.tenant_limits() for g in self.shards]
        for tenant in sorted(set().union(*limits)):
            limit = next(held[tenant] for held in limits if tenant in held)
            for g, held in zip(self.shards, limits):
                if tenant not in held:
                    g.set_tenant_limit(tenant, limit)
                    written += 1
        return written

    def is_paused(self) -> bool:
        return any(g.is_paused() for g in self.shards)

    def is_paused_for_requeue(self) -> bool:
        return any(g.is_paused_for_requeue() for g in self.shards)

    def paused_queues(self) -> list[str]:
        return sorted({q for g in self.shards for q in g.paused_queues()})

    def paused_tenants(self) -> list[str]:
        return sorted({t for g in self.shards for t in g.paused_tenants()})

    def is_tenant_paused(self, tenant: str) -> bool:
        return any(g.is_tenant_paused(tenant) for g in self.shards)

    def paused_workers(self) -> list[str]:
        return sorted({w for g in self.shards for w in g.paused_workers()})

    def queue_names(self) -> list[str]:
        return sorted({q for g in self.shards for q in g.queue_names()})

    def queue_counts(self, queue: str) -> tuple[int, int, int, int, bool]:
        rows = [g.queue_counts(queue) for g in self.shards]
        return (sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows),
                any(r[4] for r in rows))

    def due_count(self) -> int:
        return sum(g.due_count() for g in self.shards)

    def queue_tenants(self, queue: str) -> list[str]:
        return sorted({t for g in self.shards for t in g.queue_tenants(queue)})

    def ready_count(self, queue: str, tenant: str) -> int:
        return sum(g.ready_count(queue, tenant) for g in self.shards)

    def ready_counts(self, queue: str, tenants: Sequence[str]) -> list[int]:
        per_shard = [g.ready_counts(queue, tenants) for g in self.shards]
        return [sum(col) for col in zip(*per_shard)] if tenants else []

    def ready_ids(self, queue: str, tenant: str, start: int, stop: int) -> list[str]:
        return self._concat([g.ready_count(queue, tenant) for g in self.shards],
                            lambda g, lo, hi: g.ready_ids(queue, tenant, lo, hi), start, stop)

    def dead_ids(self, queue: str, start: int, stop: int) -> list[str]:
        return self._concat([g.queue_counts(queue)[3] for g in self.shards],
                            lambda g, lo, hi: g.dead_ids(queue, lo, hi), start, stop)

    def quarantined(self, skip: int, take: int) -> list[tuple[str, str]]:
        return self._concat([g.quarantine_count() for g in self.shards],
                            lambda g, lo, hi: g.quarantined(lo, hi - lo + 1), skip, skip + take - 1)

    def quarantine_count(self) -> int:
        return sum(g.quarantine_count() for g in self.shards)

    def _concat(self, totals: list[int], page: Callable[[Gateway, int, int], list[T]], start: int,
                stop: int) -> list[T]:
        """Items ``start..stop`` (inclusive, Redis style; stop -1: to the end) of the shards'
        lists taken one after another, ``totals`` their lengths."""
        out: list[T] = []
        offset = 0
        for g, n in zip(self.shards, totals):
            lo, hi = max(start - offset, 0), n - 1 if stop < 0 else min(stop - offset, n - 1)
            if lo <= hi:
                out += page(g, lo, hi)
            offset += n
        return out

    def task_hashes(self, task_ids: Sequence[str]) -> list[dict[bytes, bytes] | str]:
        """In order; a task that rebalance moved reads as it is under its new id."""
        return [h for _, h in self.tasks_as_they_are(task_ids)]

    def tasks_as_they_are(self, task_ids: Sequence[str]) -> list[tuple[str, dict[bytes, bytes] | str]]:
        out = list(zip(task_ids, self._per_id(task_ids, lambda g, ids: g.task_hashes(ids))))
        for i, (task_id, h) in enumerate(out):
            if not h:
                new = self.forwarded(task_id)
                if new is not None:
                    out[i] = (new, self.at(new).task_hashes([new])[0])
        return out

    def batch_result_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        return self.at(batch_id).batch_result_ids(batch_id, start, stop)

    def leased_to(self, worker_id: str) -> set[str]:
        return {t for g in self.shards for t in g.leased_to(worker_id)}

    def lease_holders(self, task_ids: Sequence[str]) -> list[tuple[str | None, str | None, str | None]]:
        return self._per_id(task_ids, lambda g, ids: g.lease_holders(ids))

    def task_places(self, task_ids: Sequence[str]) -> list[tuple[str, str]]:
        return self._per_id(task_ids, lambda g, ids: g.task_places(ids))

    def batch_hash(self, batch_id: str) -> dict[bytes, bytes]:
        return self.at(batch_id).batch_hash(batch_id)

    def batch_state(self, batch_id: str) -> str | None:
        return self.at(batch_id).batch_state(batch_id)

    def batch_page(self, tenant: str, skip: int, take: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """Newest first over every shard that holds batches of the tenant (usually one)."""
        counts = [g.batch_count(tenant) for g in self.shards]
        holding = [g for g, n in zip(self.shards, counts) if n]
        if len(holding) <= 1:
            return holding[0].batch_page(tenant, skip, take) if holding else []
        rows = [row for g in holding for row in g.batch_page(tenant, 0, skip + take)]
        rows.sort(key=lambda row: int(row[1].get(b"created", b"0")), reverse=True)
        return rows[skip:skip + take]

    def batch_count(self, tenant: str) -> int:
        return sum(g.batch_count(tenant) for g in self.shards)

    def next_ended_batch(self) -> tuple[str, dict[bytes, bytes]] | None:
        for g in self.shards:
            ended = g.next_ended_batch()
            if ended is not None:
                return ended
        return None

    def leased_page(self, start: int, stop: int) -> tuple[list[str], int]:
        totals = [g.leased_page(0, 0)[1] for g in self.shards]
        return self._concat(totals, lambda g, lo, hi: g.leased_page(lo, hi)[0], start, stop), sum(totals)

    def delayed_page(self, start: int, stop: int) -> tuple[list[tuple[str, int]], int]:
        """Soonest due first across the shards (each shard's page is merged by due time)."""
        pages = [g.delayed_page(0, stop) for g in self.shards]
        rows = sorted((row for page, _ in pages for row in page), key=lambda row: row[1])
        return rows[start:None if stop < 0 else stop + 1], sum(n for _, n in pages)

    def batch_task_ids(self, batch_id: str, start: int, stop: int) -> tuple[list[str], int]:
        return self.at(batch_id).batch_task_ids(batch_id, start, stop)

    def continuation_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        return self.at(batch_id).continuation_ids(batch_id, start, stop)

    def history(self, minutes: Sequence[int]) -> list[dict[str, int]]:
        out: list[dict[str, int]] = [{} for _ in minutes]
        for g in self.shards:
            for merged, h in zip(out, g.history(minutes)):
                for k, v in h.items():
                    merged[k] = merged.get(k, 0) + v
        return out

    def worker_details(self, worker_ids: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
        held = [[n for n, _ in g.worker_details(worker_ids)] for g in self.shards[1:]]
        return [(n + sum(col), info) for (n, info), *col in zip(self.shards[0].worker_details(worker_ids), *held)]

    def worker_heartbeats(self) -> dict[str, int]:
        beats: dict[str, int] = {}
        for g in self.shards:
            for w, hb in g.worker_heartbeats().items():
                beats[w] = max(hb, beats.get(w, 0))
        return beats

    def tenant_page(self, skip: int, take: int) -> list[str]:
        return sorted({t for g in self.shards for t in g.tenant_page(0, skip + take)})[skip:skip + take]

    def tenant_count(self) -> int:
        if self.n == 1:
            return self.shards[0].tenant_count()
        return len({t for g in self.shards for t in g.tenant_page(0, g.tenant_count())})

    def tenant_known(self, tenant: str) -> bool:
        return any(g.tenant_known(tenant) for g in self.shards)

    def tenant_counters(self, tenant: str) -> tuple[dict[str, int], int, dict[str, int], bool, int | None]:
        ready: dict[str, int] = {}
        counters: dict[str, int] = {}
        running, paused, limit = 0, False, None
        for g in self.shards:
            r, n, c, p, lim = g.tenant_counters(tenant)
            for k, v in r.items():
                ready[k] = ready.get(k, 0) + v
            for k, v in c.items():
                counters[k] = counters.get(k, 0) + v
            running, paused, limit = running + n, paused or p, limit if limit is not None else lim
        return ready, running, counters, paused, limit


def _merged(a: Outcomes, b: Outcomes) -> Outcomes:
    if not a:
        return b
    if not b:
        return a
    return Outcomes(a.acks + b.acks, a.failures + b.failures, a.releases + b.releases)


def _sum_recovered(parts: Any) -> Recovered:
    total = [0, 0, 0]
    for r in parts:
        total = [total[0] + r.requeued, total[1] + r.buried, total[2] + r.canceled]
    return Recovered(*total)
