"""Each example runs, against the suite's server."""
from __future__ import annotations

import importlib
import os
import signal
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


def _fresh_example():
    """examples.flask_app imported anew, so that it reads this test's environment (``from
    examples import flask_app`` would return the package attribute left by an earlier import)."""
    sys.modules.pop("examples.flask_app", None)
    return importlib.import_module("examples.flask_app")


def test_flask_example_with_a_real_worker_from_flask_coretask_worker(standalone, prefix, tmp_path, monkeypatch):
    # Given the example app and its worker started as `flask --app examples.flask_app coretask worker`
    env = dict(os.environ, CORETASK_REDIS_URL=standalone.url, EXAMPLE_PREFIX=prefix, PYTHONPATH=str(ROOT))
    flask_bin = os.path.join(os.path.dirname(sys.executable), "flask")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([flask_bin, "--app", "examples.flask_app", "coretask", "worker",
                                 "--processes", "2", "--threads", "4"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        monkeypatch.setenv("CORETASK_REDIS_URL", standalone.url)
        monkeypatch.setenv("EXAMPLE_PREFIX", prefix)
        flask_app = _fresh_example()
        client = flask_app.app.test_client()

        # When routes enqueue a task and a batch
        assert client.post("/signup", json={"email": "ada@example.com"}).status_code == 202
        batch_id = client.post("/newsletter", json={"emails": ["a@x.org", "b@x.org"]},
                               headers={"X-Tenant": "acme"}).get_json()["batch_id"]

        # Then the worker's processes run them inside the app context and the route reports the batch
        r = standalone.client()
        wait_until(lambda: r.llen(f"{prefix}:sent") == 3, 30, lambda: f"3 mails sent; log:\n{log.read_text()}")
        assert sorted(r.lrange(f"{prefix}:sent", 0, -1)) == [b"a@x.org", b"ada@example.com", b"b@x.org"]
        wait_until(lambda: client.get(f"/batches/{batch_id}", headers={"X-Tenant": "acme"}).get_json()["state"]
                   == "succeeded", 15, "batch succeeded")
        # And a worker registered with the app's processes, seen through the extension's processor
        processor = flask_app.coretask.processor_for(flask_app.app)
        wait_until(lambda: len(processor.get_workers()) == 2, 15, "2 worker processes registered")
    finally:
        # And SIGTERM stops it cleanly
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, log.read_text()


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


def test_flask_coretask_dashboard_serves_the_apps_processor(standalone, prefix, tmp_path):
    # Given the example app's dashboard started as `flask --app examples.flask_app coretask dashboard`
    env = dict(os.environ, CORETASK_REDIS_URL=standalone.url, EXAMPLE_PREFIX=prefix, PYTHONPATH=str(ROOT))
    flask_bin = os.path.join(os.path.dirname(sys.executable), "flask")
    proc = subprocess.Popen([flask_bin, "--app", "examples.flask_app", "coretask", "dashboard", "--port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()                       # "coretask dashboard on http://127.0.0.1:PORT/ ..."
        url = line.split(" on ", 1)[1].split()[0] if " on http" in line else ""
        assert url.startswith("http://127.0.0.1:"), line
        # Then it serves the app's processor: its prefix, on loopback, with no password needed there
        import urllib.request
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "coretask" in page and prefix in page
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
