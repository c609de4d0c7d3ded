"""Refusals: the replies by which Redis declines to run a command for now, and how long coretask
waits them out.

Every reply below means that the server did not run the command, so sending it again is safe
for any call, including one that is not idempotent:

=============  =============================================================================
reason         reply, and what it means
=============  =============================================================================
loading        LOADING: a restarted server is still reading its dataset into memory
busy           BUSY: a script has run past busy-reply-threshold (lua-time-limit); nothing else
               runs until it ends or is killed
misconf        MISCONF: the last RDB snapshot failed and stop-writes-on-bgsave-error is yes, so
               every write is refused
tryagain       TRYAGAIN (or redis-py giving up after its 16 redirections): the slot is being
               migrated; with the migration guard (transport.py) every script call waits
               the migration out instead of running on a node that holds only part of its keys
ask / moved    ASK, MOVED: the slot is migrating or has moved (redis-py follows these itself;
               they surface only on the WAIT path, which talks to one node)
clusterdown    CLUSTERDOWN: some slot has no reachable master, or this node cannot reach a
               majority of masters (cluster-require-full-coverage yes)
masterdown     MASTERDOWN: a replica lost its master and does not serve stale data
=============  =============================================================================

The transport retries them with exponential backoff for ``Options.busy_timeout`` (5 s by
default), then raises :class:`~coretask.errors.StoreUnavailable` with ``reason`` set to the name
in the first column and a message that says what the reply means and what to do. A worker
treats that like any other unavailable server: it backs off and tries again, losing nothing.
"""
from __future__ import annotations

import random
import re
import time

from redis.exceptions import (AskError, BusyLoadingError, ClusterDownError, ClusterError, MasterDownError,
                              MovedError, ResponseError, SlotNotCoveredError, TryAgainError)

from ..errors import StoreUnavailable

__all__ = ["refusal", "Patience", "refused", "REASONS"]

# Redis 7 and Valkey start the reply with its code, also for a write refused inside a script;
# Redis 6.2 wraps a refusal met inside a script: "Error running script ... @user_script: 1: -MISCONF ..."
_CODE = re.compile(r"(?:^|: -)(LOADING|BUSY|MISCONF|TRYAGAIN|CLUSTERDOWN|MASTERDOWN)\b")

_WHAT = {   # reason -> (what the server said, what to do)
    "loading": ("is still loading its dataset into memory after a restart (LOADING)",
                "wait for the load to end (INFO persistence: loading:0), or raise Options.busy_timeout "
                "above the time a load takes"),
    "busy": ("is busy running a script past busy-reply-threshold (BUSY), and runs nothing else meanwhile",
             "find the script (SLOWLOG GET) and end it with SCRIPT KILL (SHUTDOWN NOSAVE if it has "
             "written), or raise Options.busy_timeout if such scripts are expected"),
    "misconf": ("refuses every write because its last RDB snapshot failed and "
                "stop-writes-on-bgsave-error is yes (MISCONF)",
                "fix the snapshot (the server log and INFO persistence say why: disk full, the "
                "directory of 'CONFIG GET dir' not writable), then BGSAVE; or set "
                "stop-writes-on-bgsave-error no"),
    "tryagain": ("is migrating the hash slot of this prefix between cluster nodes (TRYAGAIN/ASK)",
                 "let the migration finish (redis-cli --cluster check / fix), or raise "
                 "Options.busy_timeout above the time a migration of this slot takes"),
    "ask": ("is migrating the hash slot of this prefix between cluster nodes (ASK)",
            "let the migration finish (redis-cli --cluster check / fix)"),
    "moved": ("kept answering that the hash slot of this prefix moved to another node (MOVED)",
              "with Options.cluster False, the server is a Redis Cluster node: set cluster=True (a "
              "single-server client does not follow MOVED); with it True, check that the cluster's "
              "nodes agree on the slot map (redis-cli --cluster check)"),
    "clusterdown": ("is down (CLUSTERDOWN): a hash slot has no reachable master, or this node "
                    "cannot reach a majority of the masters",
                    "restart the failed masters or let their replicas take over (redis-cli --cluster "
                    "check shows which); calls work again as soon as every slot is served"),
    "masterdown": ("is a replica that lost its master and does not serve stale data (MASTERDOWN)",
                   "restore the master or promote a replica"),
}
REASONS = frozenset(_WHAT) | {"unreachable"}

BACKOFF_FIRST = 0.025       # seconds before the first retry; doubles with every refusal
BACKOFF_CAP = 0.5           # a migration or a load is usually over within a few of these


def refusal(exc: BaseException) -> str | None:
    """The reason (a key of the table above) when ``exc`` is a refusal, else None."""
    if isinstance(exc, BusyLoadingError):
        return "loading"
    if isinstance(exc, MasterDownError):
        return "masterdown"
    if isinstance(exc, (ClusterDownError, SlotNotCoveredError)):   # (redis-py: no node serves the slot)
        return "clusterdown"
    if isinstance(exc, TryAgainError):
        return "tryagain"
    if isinstance(exc, MovedError):
        return "moved"
    if isinstance(exc, AskError):
        return "ask"
    if isinstance(exc, ClusterError) and "TTL exhausted" in str(exc):
        return "tryagain"       # redis-py followed 16 redirections / TRYAGAINs and gave up
    if isinstance(exc, ResponseError):
        match = _CODE.search(str(exc))
        if match:
            return match.group(1).lower()
    return None


class Patience:
    """The retries one call may make: exponential backoff (with jitter, so that many workers do
    not come back in step) until ``seconds`` have passed since the call began. Counting from the
    call's start, not from its first refusal, bounds the whole call: a refused call returns or
    raises within busy_timeout plus one attempt."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.delay = BACKOFF_FIRST
        self.refusals = 0

    @property
    def waited(self) -> float:
        return time.monotonic() - self.started

    def wait(self) -> bool:
        """Sleep before the next attempt; False (at once) when the time is up."""
        now = time.monotonic()
        self.refusals += 1
        left = self.started + self.seconds - now
        if left <= 0:
            return False
        time.sleep(min(self.delay * random.uniform(0.5, 1.0), left))
        self.delay = min(self.delay * 2, BACKOFF_CAP)
        return True


def refused(reason: str, url: str, name: str, patience: Patience | None, exc: BaseException) -> StoreUnavailable:
    """The StoreUnavailable raised when a refusal outlasted Options.busy_timeout (``patience``:
    the retries made), or met a read, which is not retried (None)."""
    what, fix = _WHAT[reason]
    if patience is None:
        tried = f"{name} was refused"
    else:
        tried = (f"{name} was refused {patience.refusals} times over {patience.waited:.1f} s "
                 f"(Options.busy_timeout {patience.seconds:g} s)")
    return StoreUnavailable(f"Redis at {url} {what}: {tried}; {fix}. Last error: {str(exc)[:200]}",
                            url=url, reason=reason)
