"""Prometheus metrics (coretask/contrib/prometheus.py, prometheus_server.py): the values the
middleware counts, read from prometheus_client's registry; the manager's endpoint summing worker
processes that recycle, scraped over HTTP; the Redis-side gauges of ``python -m coretask metrics``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from coretask import Options, StoreUnavailable, TaskProcessor
from coretask.contrib import require
from coretask.contrib.prometheus import PrometheusMiddleware, RedisCollector
from coretask.errors import ConfigurationError
from tests import tasks
from tests.conftest import ROOT, Target, wait_until
from tests.test_logs_json import spawn_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics; {(sample name, sorted labels): value}. {} while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for m in registry.collect() for s in m.samples if s.name == name]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (others, such as the
    task label, summed over)."""
    return sum(v for s, v in samples(registry, name) if labels.items() <= s.items())


def test_missing_extra_names_the_pip_command() -> None:
    with pytest.raises(ConfigurationError, match=r"pip install 'coretask\[nope\]'"):
        require("coretask_no_such_module", "nope", "a feature")


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="max_tenants"):
        PrometheusMiddleware(registry=CollectorRegistry(), max_tenants=-1)
    with pytest.raises(ConfigurationError, match="tenant_label"):
        PrometheusMiddleware(registry=CollectorRegistry(), tenant_label="yes")  # type: ignore[arg-type]


def test_middleware_counts_every_outcome(make_processor: Callable[..., TaskProcessor],
                                         embedded_worker: Callable[[TaskProcessor], threading.Event],
                                         prefix: str) -> None:
    # Given an embedded worker with the middleware on a registry of the test's own
    reg = CollectorRegistry()
    p = make_processor(middleware=[PrometheusMiddleware(registry=reg)], max_workers=4)
    embedded_worker(p)
    # When tasks succeed, fail until dead, get canceled and time out
    ok = [p.enqueue_task("default", "acme", tasks.record, f"{prefix}:ok", i) for i in range(2)]
    with p.batch("default", "acme") as b:              # a batch's task counts once committed
        ok.append(b.enqueue(tasks.record, f"{prefix}:ok", 2))
        assert value(reg, "coretask_tasks_enqueued_total", queue="default", tenant="acme") == 2
    bad = p.enqueue_task("default", "acme", tasks.always_fail, retries=2)
    spinning = p.enqueue_task("default", "other-co", tasks.spin, f"{prefix}:spin", 30)
    wait_until(lambda: tasks.R().llen(f"{prefix}:spin:started"), 20, "spin to start")
    assert value(reg, "coretask_tasks_running", queue="default") >= 1
    assert p.cancel_task(spinning)
    late = p.enqueue_task("default", "acme", tasks.spin, f"{prefix}:late", 30, timeout=0.3, retries=2)
    finished = "coretask_tasks_finished_total"
    # (a time-out that is retried counts "timeout"; the last one, dead-lettered, "dead", as Redis does)
    wait_until(lambda: value(reg, finished, queue="default", tenant="acme", outcome="timeout") == 1
               and value(reg, finished, queue="default", tenant="acme", task="tests.tasks:spin", outcome="dead") == 1
               and value(reg, finished, queue="default", tenant="acme", outcome="dead") == 2
               and value(reg, finished, queue="default", tenant="other-co", outcome="canceled") == 1
               and value(reg, finished, queue="default", tenant="acme", outcome="succeeded") == 3, 30,
               lambda: f"outcomes counted: {samples(reg, finished)}")
    # Then every attempt is counted once, by outcome, and timed
    assert value(reg, finished, queue="default", tenant="acme", outcome="retried") == 1   # bad's first attempt
    assert value(reg, finished, queue="default", tenant="acme", outcome="failed") == 0
    assert value(reg, "coretask_tasks_enqueued_total", queue="default", tenant="acme") == 5
    assert value(reg, "coretask_tasks_enqueued_total", queue="default", tenant="other-co") == 1
    assert value(reg, "coretask_task_duration_seconds_count", queue="default") == 8   # 3 + 2 + 1 + 2 attempts
    assert value(reg, "coretask_task_duration_seconds_count", task="tests.tasks:record") == 3   # by task too
    assert value(reg, "coretask_task_duration_seconds_sum", task="tests.tasks:spin") >= 0.6    # timed out twice
    assert value(reg, "coretask_task_wait_seconds_count", queue="default") == 6         # first attempts only
    assert value(reg, "coretask_tasks_running", queue="default") == 0
    assert value(reg, "coretask_worker_processes") == 1
    assert ok and bad and late


def test_delayed_task_waits_from_its_due_time(make_processor: Callable[..., TaskProcessor],
                                              embedded_worker: Callable[[TaskProcessor], threading.Event],
                                              prefix: str) -> None:
    from datetime import timedelta
    reg = CollectorRegistry()
    p = make_processor(middleware=[PrometheusMiddleware(registry=reg)])
    embedded_worker(p)
    p.enqueue_task("default", "acme", tasks.record, f"{prefix}:d", 1, delay_until=timedelta(seconds=1.5))
    wait_until(lambda: value(reg, "coretask_task_wait_seconds_count", queue="default") == 1, 20, "the delayed task")
    # waited from due, not from enqueue: well under the 1.5 s delay (the worker polls at most every 0.5 s)
    assert value(reg, "coretask_task_wait_seconds_sum", queue="default") < 1.0


def test_tenant_label_is_bounded(make_processor: Callable[..., TaskProcessor],
                                 embedded_worker: Callable[[TaskProcessor], threading.Event], prefix: str) -> None:
    kept, dropped = CollectorRegistry(), CollectorRegistry()
    p = make_processor(middleware=[PrometheusMiddleware(registry=kept, max_tenants=2),
                                   PrometheusMiddleware(registry=dropped, tenant_label=False)])
    embedded_worker(p)
    for tenant in ("t1", "t2", "t3", "t4"):
        p.enqueue_task("default", tenant, tasks.record, f"{prefix}:t", tenant)
    finished = "coretask_tasks_finished_total"
    wait_until(lambda: value(dropped, finished, queue="default", outcome="succeeded") == 4, 20, "4 tasks")
    tenants = {s.labels["tenant"] for m in kept.collect() for s in m.samples if s.name == finished}
    assert tenants == {"t1", "t2", "other"}
    assert value(kept, finished, queue="default", tenant="other", outcome="succeeded") == 2
    assert value(kept, "coretask_tasks_enqueued_total", queue="default", tenant="other") == 2
    assert all("tenant" not in s.labels for m in dropped.collect() for s in m.samples)
    custom = PrometheusMiddleware(registry=CollectorRegistry(), tenant_label=lambda t: t if t == "vip" else "rest")
    assert (custom.tenant("vip"), custom.tenant("x")) == ("vip", "rest")


def test_manager_serves_worker_counts_across_recycling(server: Target, prefix: str, processor: TaskProcessor,
                                                       tmp_path: Path) -> None:
    # Given a manager serving metrics, whose worker processes recycle every 3 tasks
    port = free_port()
    directory = tmp_path / "metrics"
    m = spawn_worker(tmp_path / "worker.log", prefix, "--metrics-port", str(port), "--metrics-dir", str(directory),
                     app="tests.obs_app:processor", env={"CORETASK_TEST_OBS": "prometheus"},
                     max_tasks_per_process=3)
    try:
        # When 10 tasks run, in at least 4 processes one after another
        for i in range(10):
            processor.enqueue_task("default", "acme", tasks.record_pid, f"{prefix}:pids", i)
        ok = (("coretask_tasks_finished_total", (("outcome", "succeeded"), ("queue", "default"),
                                                 ("task", "tests.tasks:record_pid"), ("tenant", "acme"))))
        samples = wait_until(lambda: (s := scrape(port)).get(ok) == 10 and s, 60,
                             lambda: f"10 counted on the endpoint: {scrape(port).get(ok)}\n{m.log()[-2000:]}")
        pids = {v.decode().split(":")[1] for v in tasks.R().lrange(f"{prefix}:pids", 0, -1)}
        assert len(pids) >= 4, pids
        # Then no count was lost with the processes replaced, and their files were folded
        assert samples[("coretask_task_duration_seconds_count",
                        (("queue", "default"), ("task", "tests.tasks:record_pid")))] == 10
        wait_until(lambda: (directory / "counter_archive.db").exists(), 20, "the archive of ended processes")
        wait_until(lambda: scrape(port).get(("coretask_worker_processes", ())) == 1, 20,
                   "one live worker process counted")
        live_counter_files = [f for f in os.listdir(directory)
                              if f.startswith("counter_") and f != "counter_archive.db"]
        assert len(live_counter_files) <= 2, live_counter_files      # the live process (and one being replaced)
        assert scrape(port).get(ok) == 10                              # still 10 after the folding
    finally:
        m.terminate()


def test_tenant_labels_stay_bounded_across_recycled_processes(server: Target, prefix: str, processor: TaskProcessor,
                                                             tmp_path: Path) -> None:
    # Given a manager serving metrics with max_tenants=3, whose worker processes recycle every 2 tasks
    port = free_port()
    m = spawn_worker(tmp_path / "worker.log", prefix, "--metrics-port", str(port), "--metrics-dir",
                     str(tmp_path / "metrics"), app="tests.obs_app:processor",
                     env={"CORETASK_TEST_OBS": "prometheus", "CORETASK_TEST_MAX_TENANTS": "3"}, max_tasks_per_process=2)
    try:
        # When 12 tasks of 12 tenants run, one after another, in at least 6 processes
        for i in range(12):
            processor.enqueue_task("default", f"tenant-{i}", tasks.record_pid, f"{prefix}:pids", i)
        finished = "coretask_tasks_finished_total"
        counted = wait_until(lambda: (s := scrape(port)) and sum(v for (name, _), v in s.items() if name == finished)
                             == 12 and s, 60, lambda: f"12 counted\n{m.log()[-2000:]}")
        pids = {v.decode().split(":")[1] for v in tasks.R().lrange(f"{prefix}:pids", 0, -1)}
        assert len(pids) >= 6, pids
        # Then the processes shared one list of admitted names: 3 tenants keep theirs, 9 count as other
        labels = {dict(lb)["tenant"]: v for (name, lb), v in counted.items() if name == finished}
        assert len(labels) == 4 and labels.pop("other") == 9 and all(v == 1 for v in labels.values()), labels
    finally:
        m.terminate()


def test_a_metrics_directory_another_live_manager_serves_is_refused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from coretask.contrib.prometheus_server import ENV, OWNER_FILE, WorkerMetricsServer

    monkeypatch.setenv(ENV, str(tmp_path / "unused"))      # prepare() exports the directory: undone after
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"")
    (directory / OWNER_FILE).write_text(str(os.getppid()))     # a live process: "another manager"
    with pytest.raises(ConfigurationError, match=f"in use by the manager with pid {os.getppid()}: give each manager"):
        WorkerMetricsServer(0, directory=str(directory)).prepare()
    assert (directory / "counter_123.db").exists() and (directory / OWNER_FILE).read_text() == str(os.getppid())
    # A directory whose manager is gone is taken over (and emptied)
    (directory / OWNER_FILE).write_text("999999999")
    server = WorkerMetricsServer(0, directory=str(directory))
    server.prepare()
    assert not (directory / "counter_123.db").exists() and (directory / OWNER_FILE).read_text() == str(os.getpid())
    server.close()
    assert not (directory / OWNER_FILE).exists()


def test_metrics_command_serves_redis_gauges(server: Target, prefix: str, processor: TaskProcessor) -> None:
    # Given 3 queued tasks, 1 delayed and a paused queue, no worker
    for i in range(3):
        processor.enqueue_task("default", "acme", tasks.record, f"{prefix}:q", i)
    from datetime import timedelta
    processor.enqueue_task("default", "acme", tasks.record, f"{prefix}:q", 9, delay_until=timedelta(hours=1))
    processor.pause_queue("default")
    processor.pause()
    processor.pause_tenant("acme")
    port = free_port()
    env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "coretask", "--app", "tests.app:processor", "metrics",
                             "--port", str(port), "--addr", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        samples = wait_until(lambda: scrape(port), 20, "the metrics endpoint")
    finally:
        proc.terminate()
        proc.wait(10)
    def gauge(state: str) -> float:
        return samples[("coretask_queue_tasks", (("queue", "default"), ("state", state)))]
    assert (gauge("queued"), gauge("delayed"), gauge("in_flight"), gauge("dead")) == (3, 1, 0, 0)
    assert samples[("coretask_queue_paused", (("queue", "default"),))] == 1
    # and the global pause and the paused tenants, which no queue's gauge shows
    assert (samples[("coretask_paused", ())], samples[("coretask_paused_tenants", ())]) == (1, 1)
    assert samples[("coretask_redis_up", ())] == 1
    assert samples[("coretask_workers", ())] == 0


def test_redis_collector_reports_redis_down() -> None:
    from coretask import Options, TaskProcessor as TP
    p = TP(Options(redis=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(RedisCollector(p))
        assert reg.get_sample_value("coretask_redis_up") == 0
        assert reg.get_sample_value("coretask_queue_tasks", {"queue": "default", "state": "queued"}) is None
    finally:
        p.close()


def test_an_enqueue_that_raises_is_counted_as_an_error_not_as_enqueued() -> None:
    reg = CollectorRegistry()
    p = TaskProcessor(Options(redis="redis://127.0.0.1:1/0", middleware=[PrometheusMiddleware(registry=reg)]))
    with pytest.raises(StoreUnavailable):
        p.enqueue_task("default", "acme", tasks.record, "k", 1)
    p.close()
    assert value(reg, "coretask_enqueue_errors_total", queue="default", error="StoreUnavailable") == 1
    assert value(reg, "coretask_tasks_enqueued_total") == 0


def test_the_task_label_can_be_dropped(make_processor: Callable[..., TaskProcessor],
                                       embedded_worker: Callable[[TaskProcessor], threading.Event],
                                       prefix: str) -> None:
    reg = CollectorRegistry()
    p = make_processor(middleware=[PrometheusMiddleware(registry=reg, task_label=False)])
    embedded_worker(p)
    p.enqueue_task("default", "acme", tasks.record, f"{prefix}:ok", 1)
    wait_until(lambda: value(reg, "coretask_tasks_finished_total", outcome="succeeded") == 1, 10, "counted")
    assert all("task" not in labels for labels, _ in samples(reg, "coretask_tasks_finished_total"))
    assert all("task" not in labels for labels, _ in samples(reg, "coretask_task_duration_seconds_count"))
