"""Worker / server processes: each in its own process group (session), recorded
in a pgid file so the top-level runner can kill anything left behind, even if a
per-library suite process dies."""

import os
import signal
import subprocess
import time
from pathlib import Path

from . import ROOT
from .common import LOG_DIR_ENV, PGID_FILE_ENV


class ProcessGroup:
    def __init__(self, proc, cmd, log_path, label):
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session=True: leader of a new group
        self.cmd = cmd
        self.log_path = log_path
        self.label = label

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, n=25):
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def check(self):
        """Raise if the group leader has exited (used while waiting on it)."""
        rc = self.proc.poll()
        if rc is not None:
            raise RuntimeError("%s exited early with code %s; log tail:\n%s"
                               % (self.label, rc, self.log_tail()))


def _record_pgid(pgid):
    path = os.environ.get(PGID_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write("%d\n" % pgid)


def child_env(extra=None):
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def start_group(cmd, label, env=None, log_name=None):
    log_dir = os.environ.get(LOG_DIR_ENV) or "/tmp"
    log_path = os.path.join(log_dir, "%s-%d.log" % (log_name or label, int(time.time() * 1000)))
    logf = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            cwd=str(ROOT), env=env or child_env(), start_new_session=True,
        )
    finally:
        logf.close()
    _record_pgid(proc.pid)
    return ProcessGroup(proc, cmd, log_path, label)


def kill_pgid(pgid, sig=signal.SIGKILL):
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(group, grace=3.0, sig=signal.SIGTERM):
    """Ask the group's leader to stop, wait up to ``grace`` s, then SIGKILL the whole group.

    Only the leader (the library's CLI process) gets the polite signal, as a
    service manager would send it; it forwards it to its own children. (A
    signal to the whole group would reach pool children twice, directly and
    forwarded, which some libraries treat as "force quit".)
    """
    if group is None:
        return
    try:
        os.kill(group.pid, sig)
    except ProcessLookupError:
        pass
    try:
        group.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # Whatever is left in the group (pool children, orphans): kill it.
    kill_pgid(group.pgid, signal.SIGKILL)
    try:
        group.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def kill_recorded_groups(path, keep=()):
    """SIGKILL every process group listed in the pgid file except ``keep``."""
    try:
        pgids = {int(x) for x in Path(path).read_text().split()}
    except (OSError, ValueError):
        return 0
    n = 0
    for pgid in sorted(pgids - set(keep)):
        if kill_pgid(pgid):
            n += 1
    return n


def tree_rss(pid):
    """RSS in bytes of a process and all its descendants (psutil)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def tree_size(pid):
    import psutil

    try:
        return 1 + len(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return 0
