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

__all__ = ["LogThrottle"]

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
