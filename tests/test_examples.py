"""Each example runs, against the suite's server."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, wait_until


def _run(module: str, server, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CORETASK_REDIS_URL=server.url, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture
def standalone(server):
    """The examples use plain (non-cluster) clients, as a user's first steps would."""
    if server.cluster:
        from coretask.embedded.servers import RedisServer
        with RedisServer() as srv:
            yield srv
    else:
        yield server


def test_script_example_processes_its_batch(standalone):
    out = _run("examples.script", standalone)
    assert out.returncode == 0, out.stderr
    assert "batch succeeded: 30/30 tasks" in out.stdout


def test_cpu_batch_example_spreads_work_over_processes(standalone):
    out = _run("examples.cpu_batch", standalone, "--processes", "2", "--limit", "200000")
    assert out.returncode == 0, out.stderr
    assert "17984 primes below 200000: 40 tasks" in out.stdout


def test_flask_example_enqueues_from_a_route(standalone, prefix, monkeypatch):
    # Given the Flask app configured for the suite's server and a fresh prefix
    monkeypatch.setenv("CORETASK_REDIS_URL", standalone.url)
    monkeypatch.setenv("EXAMPLE_PREFIX", prefix)
    sys.modules.pop("examples.flask_app", None)
    from examples import flask_app
    client = flask_app.app.test_client()

    # When a route enqueues a task and a batch
    resp = client.post("/signup", json={"email": "ada@example.com"}, headers={"X-Tenant": "acme"})
    assert resp.status_code == 202 and resp.get_json()["task_id"]
    resp = client.post("/newsletter", json={"emails": ["a@x.org", "b@x.org"]}, headers={"X-Tenant": "acme"})
    batch_id = resp.get_json()["batch_id"]
    assert client.get(f"/batches/{batch_id}", headers={"X-Tenant": "other"}).status_code == 404

    # Then a worker runs them and the status route reports the finished batch
    import threading
    stop = threading.Event()
    t = threading.Thread(target=flask_app.processor.run, args=(stop,))
    t.start()
    try:
        r = flask_app.processor.gateway.transport.redis
        wait_until(lambda: r.llen(f"{prefix}:sent") == 3, 20, "3 mails sent")
        wait_until(lambda: client.get(f"/batches/{batch_id}", headers={"X-Tenant": "acme"}).get_json()["state"]
                   == "succeeded", 10, "batch succeeded")
    finally:
        stop.set()
        t.join(15)
    assert sorted(r.lrange(f"{prefix}:sent", 0, -1)) == [b"a@x.org", b"ada@example.com", b"b@x.org"]


def test_schedule_example_runs_once_per_tick(standalone):
    out = _run("examples.schedule", standalone, "--seconds", "4")
    assert out.returncode == 0, out.stderr
    runs = [line for line in out.stdout.splitlines() if line.startswith("beat: billing")]
    # 4 s of a per-second schedule, minus worker start-up: a few runs, never more than one per tick
    assert 1 <= len(runs) <= 5, out.stdout
    assert len(set(runs)) == len(runs)


# ------------------------------------------- the examples' tasks under coretask's test support
# The two forms docs/testing.md offers for a user's own tests: eager mode (no server) and the
# pytest plugin's fixtures with drain() (a server the plugin starts, tasks run in this process).

def test_script_example_tasks_in_eager_mode():
    from coretask import Options, TaskProcessor
    from examples.script import word_count

    p = TaskProcessor(Options(eager=True, result_ttl=60))
    batch_id = p.enqueue_batch("default", "me", lambda b: [b.enqueue(word_count, line) for line in ["a b", "c d e"]])
    info = p.get_batch(batch_id)
    assert (info.state, info.done) == ("succeeded", 2)
    assert [r.value for r in p.get_batch_results(batch_id)] == [2, 3]


def test_cpu_batch_example_tasks_drained_by_the_pytest_plugin(coretask_server, coretask_processor, monkeypatch):
    import redis

    from coretask.testing import drain
    from examples import cpu_batch

    monkeypatch.setenv("CORETASK_REDIS_URL", coretask_server.url)     # where the example's tasks write
    batch_id = coretask_processor.enqueue_batch("default", "me", lambda b: (
        [b.enqueue(cpu_batch.count_primes, lo, lo + 250) for lo in range(0, 1000, 250)],
        b.continue_with(cpu_batch.add_up)))
    drain(coretask_processor, timeout=60)
    total = redis.Redis.from_url(coretask_server.url).get(f"{cpu_batch.PREFIX}:total:{batch_id}")
    assert int(total) == 168                                           # primes below 1000
    assert coretask_processor.get_batch(batch_id).state == "succeeded"
