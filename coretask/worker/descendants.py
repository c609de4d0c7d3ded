"""Ending the processes a worker process's tasks started, when the worker process is ended.

A task that runs ``subprocess.run(["ffmpeg", ...])`` and is aborted while it waits in C is
ended with its whole worker process (cancel_grace, time limits). Its child would outlive it,
re-parented to init, and go on doing the aborted task's work (a second copy starts when the
task runs again). So whoever ends a worker process ends its descendants too: the worker
itself on its way out, the manager when it has to kill the worker. They are listed before the
worker dies (afterwards they no longer descend from it), asked to stop (SIGTERM), and killed
after a short grace.
"""
from __future__ import annotations

import logging

__all__ = ["descendants_of", "end_descendants", "end_processes"]

log = logging.getLogger(__name__)

DESCENDANTS_GRACE = 1.0   # seconds a task's child has between SIGTERM and SIGKILL
SHOWN_DESCENDANTS = 5     # processes named in the log line


def descendants_of(pid: int) -> list:
    """The live descendants of ``pid`` (psutil processes), children first; [] when it is gone."""
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def end_processes(procs: list, who: str) -> None:
    """SIGTERM each, SIGKILL what still runs DESCENDANTS_GRACE seconds later, and say which
    (``who`` ended them, for the log line). Never raises: its caller is ending a process."""
    import psutil
    try:
        named = []
        for p in procs:
            try:
                named.append(f"{p.name()}[{p.pid}]")
                p.terminate()
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(procs, timeout=DESCENDANTS_GRACE)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
    except Exception as exc:
        log.warning("%s: could not end the processes its tasks started: %s", who, exc)
        return
    if named:
        log.warning("%s: ended %d process(es) its tasks had started (%s)", who, len(named),
                    ", ".join(named[:SHOWN_DESCENDANTS]))


def end_descendants(pid: int, who: str) -> None:
    """End every process ``pid`` started (see the module docstring)."""
    end_processes(descendants_of(pid), who)
