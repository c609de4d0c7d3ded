"""LogThrottle: mass events are logged once with counts, not once each.

Twenty thousand recovered leases, ten thousand poison tasks or a Redis outage that fails every
timer would otherwise write a line each and bury what matters. The first ``burst`` records of a
kind within ``window`` seconds are logged as they come; the rest are counted and summarised in
one line when the window ends (``flush``, called from the maintenance loop).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["LogThrottle", "OUTAGE", "Outage"]

WINDOW = 10.0
BURST = 3


class LogThrottle:
    def __init__(self, logger: logging.Logger, window: float = WINDOW, burst: int = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.window = window
        self.burst = burst
        self.clock = clock
        self._lock = threading.Lock()     # runner threads and the loop thread log at once
        self._kinds: dict[Hashable, list[Any]] = {}   # key -> [window start, seen, level, what, summary]

    def log(self, key: Hashable, level: int, what: str, msg: str, *args: Any,
            extra: Callable[[], dict[str, Any]] | None = None, summary: dict[str, Any] | None = None) -> None:
        """Log ``msg % args`` unless ``burst`` records of ``key`` were logged in this window;
        ``what`` names the kind in the summary line ("tasks of myapp.tasks:send failed").
        ``extra``: builds the record's structured fields, called only for a record logged.
        ``summary``: the structured fields of the summary line (the event and target the
        records shared), to which ``suppressed`` is added: how many were not logged one by one."""
        now = self.clock()
        with self._lock:
            entry = self._kinds.get(key)
            if entry is not None and now - entry[0] >= self.window:
                self._summarise(entry)
                entry = None
            if entry is None:
                entry = self._kinds[key] = [now, 0, level, what, summary]
            entry[1] += 1
            shown = entry[1] <= self.burst
        if shown:
            self.logger.log(level, msg, *args, extra=extra() if extra is not None else None)

    def flush(self) -> None:
        """Summarise every window that has ended."""
        now = self.clock()
        with self._lock:
            for key, entry in list(self._kinds.items()):
                if now - entry[0] >= self.window:
                    self._summarise(entry)
                    del self._kinds[key]

    def _summarise(self, entry: list[Any]) -> None:
        start, seen, level, what, summary = entry
        if seen > self.burst:
            self.logger.log(level, "%d more: %s (%d in %.0fs, the first %d shown above)",
                            seen - self.burst, what, seen, self.window, self.burst,
                            extra={**summary, "suppressed": seen - self.burst} if summary else None)


OUTAGE_REMIND = 30.0    # seconds between two "still cannot be reached" lines


class Outage:
    """One process's view of a Redis outage, told once. When the server cannot be reached,
    every part of a worker process (its loop, pub/sub, each maintenance timer, the schedule
    timer) and of a manager (renewals, overdue checks) fails on its own and retries on its own;
    a line each would be several a second for as long as the outage lasts, and none would say
    the one thing that matters: the process waits for Redis and resumes by itself. So the first
    failure says that, the rest are counted (a reminder every OUTAGE_REMIND seconds), and the
    first success after them says how long it lasted."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None     # the first failure of the outage
        self._said = 0.0                     # when the last line about it was written
        self._failed = 0                     # failed calls since then

    @staticmethod
    def covers(exc: BaseException) -> bool:
        """A failure this outage tells (the server cannot be reached), not one that needs someone
        to act (refused credentials, a script error), nor one shard of several down (the shards
        say that themselves, gateway/shards.py): those are logged where they happen."""
        from .errors import StoreUnavailable
        return isinstance(exc, StoreUnavailable) and exc.reason == "unreachable" and exc.shard is None

    def told(self, who: str, exc: BaseException) -> bool:
        """Tell ``exc`` as part of the outage when it is one (see covers); False: the caller
        logs it as before."""
        if not self.covers(exc):
            return False
        self.failed(who, exc)
        return True

    def failed(self, who: str, exc: BaseException) -> None:
        now = self.clock()
        with self._lock:
            self._failed += 1
            if self._since is None:
                self._since, self._said, self._failed = now, now, 0
                first = True
            elif now - self._said >= OUTAGE_REMIND:
                self._said, failed, first = now, self._failed, False
                self._failed = 0
            else:
                return
        if first:
            self.logger.warning("%s: %s; every part of this process retries on its own until Redis answers "
                                "(a line every %gs while it does not)", who, exc, OUTAGE_REMIND)
        else:
            self.logger.warning("%s: Redis still cannot be reached after %.0fs (%d more failed calls): %s", who,
                                now - self._since, failed, exc)

    def reachable(self, who: str) -> None:
        """A call succeeded: ends the outage (one line), if there was one."""
        if self._since is None:         # the common case: no lock, no clock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            self.logger.warning("%s: Redis answers again after %.1fs", who, self.clock() - since)


OUTAGE = Outage(logging.getLogger("coretask.outage"))
