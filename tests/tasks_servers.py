"""Tasks and helpers of the server-matrix tests (cluster, failover, reconnection, TLS, ACL).

The tasks record into plain files, not into Redis: the servers under test are killed and
restarted, and a worker subprocess must be able to report runs without the server it works for.
A line written with O_APPEND in one write(2) is atomic, so many threads and processes can share
one file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coretask import TaskContext
from tests.conftest import wait_until

if TYPE_CHECKING:
    from coretask import TaskProcessor

ROOT = Path(__file__).resolve().parent.parent


def note(path: str, value: str) -> None:
    """Append ``value`` and the wall-clock time at which the task started."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{value} {time.time():.6f}\n")


def note_slow(path: str, value: str, seconds: float) -> None:
    """Note the start, then take ``seconds`` (in short sleeps, so an abort lands quickly)."""
    note(path, value)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


def wait_for_cancel(path: str, value: str, ctx: TaskContext) -> None:
    """Note the start and wait (up to 20 s) for the batch to be canceled."""
    note(path, value)
    try:
        ctx.cancelled.wait(20)
    finally:
        note(path, value + ":left")


def fail(message: str) -> None:
    raise ValueError(message)


def read_notes(path: str | Path) -> dict[str, float]:
    """value -> time of its first run (a value may run twice: delivery is at least once)."""
    seen: dict[str, float] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return seen
    for line in text.splitlines():
        value, _, when = line.partition(" ")
        if when:
            seen.setdefault(value, float(when))
    return seen


# ------------------------------------------------------------------- worker managers

class Manager:
    """``python -m coretask.worker --app tests.app:processor`` against a server of the test's own
    (tests.app builds its processor from the CORETASK_TEST_* variables given here)."""

    def __init__(self, url: str, prefix: str, log_path: Path, *, cluster: bool = False,
                 processes: int = 1, threads: int = 4, log_level: str = "INFO", **options: Any) -> None:
        env = dict(os.environ, CORETASK_TEST_URL=url, CORETASK_TEST_CLUSTER="1" if cluster else "",
                   CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(options),
                   PYTHONPATH=str(ROOT))
        self.log_path = log_path
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coretask.worker", "--app", "tests.app:processor",
                 "--processes", str(processes), "--threads", str(threads), "--log-level", log_level],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGKILL the manager's whole process group (its workers included)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


# ------------------------------------------------------------------------------ TLS

def make_certificates(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA
    (EC keys: quick to generate). Returns the file paths by name."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    # key usage and key identifiers: Python 3.13's default context verifies with X509_STRICT
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=coretask test CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ids = "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n" + ids)
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n" + ids)
    for name in ("server", "client"):
        openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=coretask test {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {name: str(folder / name) for name in
            ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


# ------------------------------------------------------------------------ a full workload

def exercise(p: TaskProcessor, notes: Path) -> None:
    """Every kind of call coretask makes to Redis, through ``p``, with a worker for ``p``'s
    prefix running: enqueue (ready and delayed), batch with continuation, append, cancel of a
    running task, pause/resume of everything, a queue and a tenant, a tenant limit, dead letters
    (list, retry, discard), schedules, and every introspection call."""
    from coretask import ScheduleData

    path = str(notes)
    tid = p.enqueue_task("default", "acme", note, path, "single")
    p.enqueue_task("default", "acme", note, path, "delayed", delay_until=timedelta(milliseconds=200))
    bid = p.enqueue_batch("default", "acme", lambda b: (
        [b.enqueue(note, path, f"b{i}") for i in range(5)], b.continue_with(note, path, "cont")))
    assert p.append_batch("default", "acme", bid, lambda b: b.enqueue(note, path, "appended"))
    expected = {"single", "delayed", "cont", "appended", *(f"b{i}" for i in range(5))}
    wait_until(lambda: expected <= read_notes(path).keys(), what="the first tasks")
    assert p.wait_for_batch(bid, 10).done == 6

    cb = p.enqueue_batch("default", "acme", lambda b: b.enqueue(wait_for_cancel, path, "running"))
    wait_until(lambda: "running" in read_notes(path), what="the task to cancel")
    assert p.cancel_batch(cb)
    assert p.wait_for_batch(cb, 10).canceled == 1
    wait_until(lambda: "running:left" in read_notes(path), what="the canceled task to end")

    p.pause()
    assert p.is_paused
    held = p.enqueue_task("default", "acme", note, path, "held")
    assert [t.id for t in p.get_tasks_in_queue("default", 0, 10)] == [held]
    p.resume()
    wait_until(lambda: "held" in read_notes(path), what="the task held by pause()")
    p.pause_queue("default")
    assert p.get_paused_queues() == ["default"]
    p.resume_queue("default")
    p.pause_tenant("acme")
    assert p.is_tenant_paused("acme") and p.get_paused_tenants() == ["acme"]
    p.resume_tenant("acme")
    p.set_tenant_limit("acme", 2)
    p.enqueue_task("default", "acme", note, path, "limited")
    wait_until(lambda: "limited" in read_notes(path), what="a task under a tenant limit")
    p.set_tenant_limit("acme", None)

    p.enqueue_task("default", "acme", fail, "planned failure", retries=0)
    wait_until(lambda: p.get_queue("default").dead == 1, what="a dead letter")
    assert p.get_dead_tasks("default")[0].error_type.endswith("ValueError")
    assert p.retry_dead_tasks("default", retries=0) == 1
    wait_until(lambda: p.get_queue("default").dead == 1, what="the retried task to die again")
    assert p.discard_dead_tasks("default") == 1

    assert p.upsert_schedule(ScheduleData(id="yearly", tenant="acme", queue="default", scope="test",
                                          cron="0 0 1 1 *"), note, path, "scheduled")
    assert [s.id for s in p.get_schedules("acme")] == ["yearly"]
    assert p.get_schedule("yearly") is not None and p.get_schedules_count() == 1
    assert p.trigger_schedule("yearly", "acme")
    wait_until(lambda: "scheduled" in read_notes(path), what="a triggered schedule run")
    assert p.cancel_schedule("yearly", "acme")

    assert [q.name for q in p.get_queues()] == ["default"]
    assert p.get_batch(bid) is not None and p.get_batches_count("acme") == 2
    assert {b.id for b in p.get_batches("acme")} == {bid, cb}
    assert p.get_task(tid) is None          # finished tasks are deleted
    assert p.get_workers()
    assert p.get_tenants() == ["acme"] and p.get_tenants_count() == 1
    assert p.get_tenant_stats("acme").done >= 10
