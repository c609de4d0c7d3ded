"""The dashboard through Flask's test client against a real server (the browser tests are in
test_dashboard_browser.py): every page renders from the public API, actions are POSTs guarded
by a per-session CSRF token, read_only refuses them all, a tenant-scoped dashboard cannot see or
steer another tenant's work, task data is escaped, the Redis password never shows, and the
standalone server refuses a non-loopback bind without a password."""
from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

import pytest

import flask

from coretask import ScheduleData, TaskProcessor  # noqa: E402
from coretask import cli  # noqa: E402
from coretask.dashboard import blueprint  # noqa: E402
from coretask.dashboard.server import check_bind, create_app  # noqa: E402
from coretask.dashboard.views import PAGE  # noqa: E402
from coretask.errors import ConfigurationError  # noqa: E402
from tests import tasks_dashboard as td  # noqa: E402
from tests.conftest import wait_until  # noqa: E402

XSS = "<script>alert('x')</script>"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def app_for(target: Any, read_only: bool = False, prefix: str = "/dash") -> Any:
    app = flask.Flask("dash-test")
    app.secret_key = "test-secret"
    app.register_blueprint(blueprint(target, read_only=read_only), url_prefix=prefix)
    return app


def token(client: Any, path: str = "/dash/") -> str:
    page = client.get(path)
    found = TOKEN.search(page.get_data(as_text=True))
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def post_rules(app: Any) -> list[str]:
    """Every POST route of the dashboard, with placeholder values."""
    paths = []
    for rule in app.url_map.iter_rules():
        if "POST" in rule.methods:
            paths.append(re.sub(r"<[^>]+>", "x", rule.rule))
    return paths


@pytest.fixture
def dead_task(processor: TaskProcessor, embedded_worker: Callable[..., Any]) -> str:
    """A dead task of tenant acme whose arguments, batch scope and error message hold <script>."""
    stop = embedded_worker(processor)
    batch_id = processor.enqueue_batch("default", "acme", lambda b: b.enqueue(td.noop, XSS), scope=XSS)
    task_id = processor.enqueue_task("default", "acme", td.fail, XSS, retries=0)
    wait_until(lambda: (t := processor.get_task(task_id)) is not None and t.state == "dead", 20, "a dead task")
    processor.wait_for_batch(batch_id, 20)
    stop.set()
    stop.thread.join(20)
    return task_id


def test_every_page_renders_with_counts_from_the_api(processor: TaskProcessor, dead_task: str) -> None:
    # Given work of two tenants, a schedule and a dead task
    processor.enqueue_task("default", "globex", td.noop, 1)
    processor.upsert_schedule(ScheduleData("nightly", "acme", "default", None, "0 3 * * *", "Europe/Paris"), td.noop)
    batch_id = processor.get_batches("acme")[0].id
    client = app_for(processor).test_client()

    # When every page is read, Then each answers 200 and shows what the API says
    overview = client.get("/dash/").get_data(as_text=True)
    assert "default" in overview and "running" in overview
    queue = client.get("/dash/queues/default").get_data(as_text=True)
    assert dead_task[:12] in queue and "ValueError" in queue and "globex" in queue
    assert batch_id[:12] in client.get("/dash/batches?tenant=acme").get_data(as_text=True)
    assert "succeeded" in client.get(f"/dash/batches/{batch_id}").get_data(as_text=True)
    schedules = client.get("/dash/schedules?tenant=acme").get_data(as_text=True)
    assert "0 3 * * *" in schedules and "Europe/Paris" in schedules and "UTC" in schedules
    tenants = client.get("/dash/tenants").get_data(as_text=True)
    assert "acme" in tenants and "globex" in tenants
    assert client.get("/dash/workers").status_code == 200
    task = client.get(f"/dash/tasks/{dead_task}").get_data(as_text=True)
    assert "dead" in task and "Traceback" in task
    live = client.get(f"/dash/live/batch/{batch_id}").get_json()
    assert live["text"][f"b:{batch_id}:state"] == "succeeded" and live["bars"][f"b:{batch_id}"] == [1, 1]
    assert client.get("/dash/live/overview").get_json()["flags"]["paused"] is False

    # And the search box finds a task and a batch by id, and says when it finds nothing
    assert client.get(f"/dash/search?q={dead_task}").headers["Location"].endswith(f"/dash/tasks/{dead_task}")
    assert client.get(f"/dash/search?q={batch_id}").headers["Location"].endswith(f"/dash/batches/{batch_id}")
    assert client.get("/dash/search?q=nope").status_code == 404


def test_a_post_without_the_csrf_token_is_refused(processor: TaskProcessor) -> None:
    client = app_for(processor).test_client()
    client.get("/dash/")                            # a session exists, with its token
    assert client.post("/dash/do/pause").status_code == 400
    assert client.post("/dash/do/pause", data={"csrf_token": "forged"}).status_code == 400
    assert not processor.is_paused
    # another session's token is no good either
    other = app_for(processor).test_client()
    assert client.post("/dash/do/pause", data={"csrf_token": token(other)}).status_code == 400
    assert not processor.is_paused
    # the session's own token works, and the answer is a message on the page it came from
    answer = client.post("/dash/do/pause", data={"csrf_token": token(client), "next": "/dash/"})
    assert answer.status_code == 303 and processor.is_paused
    assert "Paused everything" in client.get("/dash/").get_data(as_text=True)
    # a redirect target outside the dashboard is ignored
    answer = client.post("/dash/do/resume", data={"csrf_token": token(client), "next": "https://evil.example/"})
    assert answer.headers["Location"].endswith("/dash/") and not processor.is_paused


def test_read_only_hides_and_refuses_every_action(processor: TaskProcessor, dead_task: str) -> None:
    app = app_for(processor, read_only=True)
    client = app.test_client()
    for path in ("/dash/", "/dash/queues/default", f"/dash/tasks/{dead_task}", "/dash/tenants",
                 "/dash/schedules?tenant=acme"):
        html = client.get(path).get_data(as_text=True)
        assert 'method="post"' not in html, path
    rules = post_rules(app)
    assert len(rules) >= 7, rules
    for path in rules + [f"/dash/do/task/{dead_task}/retry", "/dash/do/pause"]:
        assert client.post(path, data={"csrf_token": "x"}).status_code == 403, path
    assert not processor.is_paused and processor.get_task(dead_task).state == "dead"


def test_a_tenant_dashboard_cannot_see_or_steer_another_tenants_work(processor: TaskProcessor,
                                                                      dead_task: str) -> None:
    # Given acme's dead task and batch, and a dashboard scoped to globex
    acme_batch = processor.get_batches("acme")[0].id
    processor.upsert_schedule(ScheduleData("acme-job", "acme", "default", None, "0 3 * * *"), td.noop)
    mine = processor.enqueue_task("default", "globex", td.noop, "globex-arg")
    client = app_for(processor.tenant("globex")).test_client()
    csrf = token(client)

    # Then acme's ids read as unknown, on pages, live endpoints and actions alike
    for path in (f"/dash/tasks/{dead_task}", f"/dash/batches/{acme_batch}", f"/dash/live/task/{dead_task}",
                 f"/dash/live/batch/{acme_batch}", f"/dash/search?q={dead_task}", "/dash/workers",
                 "/dash/live/workers"):
        assert client.get(path).status_code == 404, path
    for path in (f"/dash/do/task/{dead_task}/retry", f"/dash/do/task/{dead_task}/discard",
                 f"/dash/do/batch/{acme_batch}/cancel", "/dash/do/schedule/acme-job/trigger",
                 "/dash/do/schedule/acme-job/cancel", "/dash/do/schedule/acme-job/pause", "/dash/do/tenant/acme/pause",
                 f"/dash/do/worker/{socket.gethostname()}/pause"):
        assert client.post(path, data={"csrf_token": csrf}).status_code == 404, path
    assert processor.get_task(dead_task).state == "dead" and processor.get_schedule("acme-job") is not None
    assert not processor.get_schedule("acme-job").paused and processor.get_paused_workers() == []
    assert not processor.is_tenant_paused("acme")
    # and no page lists them
    for path in ("/dash/queues/default", "/dash/batches?tenant=acme", "/dash/schedules", "/dash/tenants"):
        html = client.get(path).get_data(as_text=True)
        assert dead_task[:12] not in html and acme_batch[:12] not in html and "acme" not in html, path
    # while its own work shows, and its pause switch pauses globex only
    assert mine[:12] in client.get("/dash/queues/default").get_data(as_text=True)
    assert client.post("/dash/do/pause", data={"csrf_token": csrf}).status_code == 303
    assert processor.is_tenant_paused("globex") and not processor.is_paused


def test_task_data_is_escaped(processor: TaskProcessor, dead_task: str) -> None:
    client = app_for(processor).test_client()
    batch_id = processor.get_batches("acme")[0].id
    for path in ("/dash/queues/default", f"/dash/tasks/{dead_task}", f"/dash/batches/{batch_id}",
                 "/dash/batches?tenant=acme"):
        html = client.get(path).get_data(as_text=True)
        assert "<script>alert" not in html, path
    assert "&lt;script&gt;alert" in client.get(f"/dash/tasks/{dead_task}").get_data(as_text=True)
    assert "&lt;script&gt;alert" in client.get(f"/dash/batches/{batch_id}").get_data(as_text=True)
    # and the pages forbid inline scripts, so nothing injected could run
    assert "script-src 'self'" in client.get("/dash/").headers["Content-Security-Policy"]


def test_the_redis_password_never_appears(own_server: Callable[..., Any],
                                          processor_on: Callable[..., TaskProcessor]) -> None:
    secret = "hunter2-very-secret"
    srv = own_server(extra_args=["--requirepass", secret])
    p = processor_on(f"redis://:{secret}@127.0.0.1:{srv.port}/0")
    p.enqueue_task("default", "acme", td.noop)
    client = app_for(p).test_client()
    pages = ["/dash/", "/dash/queues/default", "/dash/tenants", "/dash/batches", "/dash/workers",
             "/dash/schedules", "/dash/live/overview", "/dash/search?q=x"]
    for path in pages:
        body = client.get(path).get_data(as_text=True)
        assert secret not in body, path
    assert "***" in client.get("/dash/").get_data(as_text=True)


def test_standalone_refuses_a_non_loopback_bind_without_a_password(processor: TaskProcessor,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORETASK_DASHBOARD_PASSWORD", raising=False)
    assert cli.main(["dashboard", "--host", "0.0.0.0", "--port", "0"], processor=processor) == cli.USAGE
    err = capsys.readouterr().err
    assert "refusing to serve the dashboard on 0.0.0.0" in err and "--password" in err and "--no-auth" in err
    with pytest.raises(ConfigurationError):
        check_bind("192.168.1.10", None, False)
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", "pw", False)
    check_bind("0.0.0.0", None, True)


def test_standalone_password_is_http_basic_auth(processor: TaskProcessor) -> None:
    import base64

    client = create_app(processor, password="pw").test_client()
    none = client.get("/")
    assert none.status_code == 401 and b"password required" in none.data
    assert "Basic" in client.get("/").headers["WWW-Authenticate"]
    bad = base64.b64encode(b"admin:nope").decode()
    wrong = client.get("/", headers={"Authorization": f"Basic {bad}"})
    assert wrong.status_code == 401 and b"wrong password" in wrong.data
    good = base64.b64encode(b"admin:pw").decode()
    assert client.get("/", headers={"Authorization": f"Basic {good}"}).status_code == 200


def test_the_reads_added_for_the_dashboard(processor: TaskProcessor, embedded_worker: Callable[..., Any]) -> None:
    from datetime import timedelta

    # Given delayed work of two tenants
    later = [processor.enqueue_task("default", t, td.noop, delay_until=timedelta(hours=1)) for t in ("acme", "globex")]
    assert {t.id for t in processor.get_delayed_tasks()} == set(later) and processor.get_delayed_count() == 2
    assert [t.id for t in processor.tenant("acme").get_delayed_tasks()] == [later[0]]
    assert processor.get_delayed_tasks(queue="other") == []
    # and a batch whose continuation waits for it
    batch_id = processor.enqueue_batch("default", "acme", lambda b: (b.enqueue(td.steps, 200, 0.05),
                                                                     b.continue_with(td.noop, "after")))
    assert [t.target for t in processor.get_batch_continuations(batch_id)] == ["tests.tasks_dashboard:noop"]
    assert processor.tenant("globex").get_batch_continuations(batch_id) == []

    # When a worker runs a task of each tenant
    embedded_worker(processor)
    other = processor.enqueue_task("default", "globex", td.steps, 200, 0.05)
    wait_until(lambda: processor.get_running_count() == 2, 20, "2 running tasks")
    # Then the running reads show them, a tenant's view only its own, with worker and progress
    running = processor.get_running_tasks(queue="default")
    assert {t.tenant for t in running} == {"acme", "globex"} and all(t.worker for t in running)
    assert [t.id for t in processor.tenant("globex").get_running_tasks()] == [other]
    # and the worker's state counts the tasks it holds
    states = wait_until(lambda: [w for w in processor.get_worker_states() if w.running == 2], 20, "a heartbeat")
    w = states[0]
    assert w.host and w.heartbeat_age < 30 and w.threads == processor.options.max_workers
    assert w.queues == ("default",) and w.memory and w.memory > 10_000_000 and w.started is not None
    client = app_for(processor).test_client()
    page = client.get("/dash/workers").get_data(as_text=True)
    assert w.id in page and " MB" in page
    assert client.get("/dash/live/workers").get_json()["text"][f"w:{w.id}:running"] == "2"
    for t in running:
        processor.cancel_task(t.id)
    wait_until(lambda: processor.get_running_count() == 0, 20, "the tasks aborted")


def test_the_standalone_command_serves_the_dashboard(server: Any, prefix: str, processor: TaskProcessor) -> None:
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.conftest import FAST, ROOT

    processor.enqueue_task("default", "acme", td.noop)
    env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps(FAST), PYTHONPATH=str(ROOT))
    env.pop("CORETASK_DASHBOARD_PASSWORD", None)
    proc = subprocess.Popen([sys.executable, "-m", "coretask", "--app", "tests.app:processor", "dashboard", "--port",
                             "0", "--read-only"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert found and "read-only" in line, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr
                                               else "")
        with urllib.request.urlopen(found.group(1) + "queues/default", timeout=10) as answer:
            body = answer.read().decode()
        assert answer.status == 200 and "tests.tasks_dashboard:noop" in body and 'method="post"' not in body
    finally:
        proc.terminate()
        proc.wait(10)


def test_history_counts_attempts_per_minute_and_the_overview_draws_it(processor: TaskProcessor, r: Any,
                                                                      prefix: str,
                                                                      embedded_worker: Callable[..., Any]) -> None:
    # Given 5 tasks that succeed and 2 that fail for good
    embedded_worker(processor)
    ok = [processor.enqueue_task("default", "acme", td.noop, i) for i in range(5)]
    bad = [processor.enqueue_task("default", "acme", td.fail, "boom", retries=0) for _ in range(2)]
    wait_until(lambda: all(processor.get_task(t) is None for t in ok)
               and all((x := processor.get_task(t)) is not None and x.state == "dead" for t in bad), 20, "all ended")
    # Then the last hour's history counts 7 attempts ended and 2 failed, by queue
    hour = processor.get_history(60)
    from datetime import datetime, timezone
    assert len(hour) == 60 and 0 <= (datetime.now(timezone.utc) - hour[-1].start).total_seconds() < 120
    assert (sum(p.processed for p in hour), sum(p.failed for p in hour)) == (7, 2)
    assert sum(p.processed for p in processor.get_history(60, queue="default")) == 7
    assert sum(p.processed for p in processor.get_history(60, queue="other")) == 0
    day = processor.get_history(24 * 60, 15)
    assert len(day) == 96 and sum(p.failed for p in day) == 2
    # and its keys expire on their own (bounded memory, never scanned)
    minute = int(hour[-1].start.timestamp()) // 60
    keys = [f"{prefix}:h:{m}" for m in (minute - 1, minute) if r.exists(f"{prefix}:h:{m}")]
    assert keys and all(24 * 3600_000 < r.pttl(k) <= 25 * 3600_000 for k in keys)
    with pytest.raises(ConfigurationError):
        processor.get_history(24 * 60 + 1)

    # And the overview draws it as inline SVG, and its live twin carries the rows
    client = app_for(processor).test_client()
    html = client.get("/dash/").get_data(as_text=True)
    assert 'data-chart="hour"' in html and 'data-chart="day"' in html
    rows = client.get("/dash/live/overview").get_json()["charts"]["hour"]
    assert len(rows) == 60 and sum(p for p, _ in rows) == 7 and sum(f for _, f in rows) == 2
    assert 'data-chart="queue-hour"' in client.get("/dash/queues/default").get_data(as_text=True)
    # not on a tenant's dashboard: the counters are per queue, shared by tenants
    scoped = app_for(processor.tenant("acme")).test_client()
    assert "data-chart" not in scoped.get("/dash/").get_data(as_text=True)


def test_a_bad_tenant_limit_is_refused_with_a_message(processor: TaskProcessor) -> None:
    processor.enqueue_task("default", "acme", td.noop)
    client = app_for(processor).test_client()
    csrf = token(client, "/dash/tenants")
    for bad in ("0", "-2", "many"):
        answer = client.post("/dash/do/tenant/acme/limit", data={"csrf_token": csrf, "limit": bad},
                             follow_redirects=True)
        assert "refused" in answer.get_data(as_text=True), bad
    assert processor.get_tenant_stats("acme").limit == processor.options.tenant_concurrency
    client.post("/dash/do/tenant/acme/limit", data={"csrf_token": csrf, "limit": "2"})
    assert processor.get_tenant_stats("acme").limit == 2
    client.post("/dash/do/tenant/acme/limit", data={"csrf_token": csrf, "limit": ""})
    assert processor.get_tenant_stats("acme").limit == processor.options.tenant_concurrency
    # A tenant that never had work (a made-up or misspelt URL) is neither limited nor paused
    for action, form in (("limit", {"limit": "4"}), ("pause", {})):
        answer = client.post(f"/dash/do/tenant/acme2/{action}", data={"csrf_token": csrf, **form},
                             follow_redirects=True)
        assert "Tenant acme2 not found" in answer.get_data(as_text=True), action
    assert processor.get_paused_tenants() == [] and processor.get_tenant_stats("acme2").limit is None


def test_redis_down_answers_503_with_the_url_masked(processor_on: Callable[..., TaskProcessor]) -> None:
    from coretask.embedded.servers import free_port

    p = processor_on(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0")
    client = app_for(p, read_only=True).test_client()
    for path in ("/dash/", "/dash/live/overview", "/dash/tasks/abc"):
        answer = client.get(path)
        body = answer.get_data(as_text=True)
        assert answer.status_code == 503 and "hunter2-secret" not in body, path
    assert "Redis is not answering" in client.get("/dash/").get_data(as_text=True)


def test_a_delayed_task_shows_when_it_is_due(processor: TaskProcessor) -> None:
    from datetime import timedelta

    task_id = processor.enqueue_task("default", "acme", td.noop, delay_until=timedelta(hours=2))
    info = processor.get_task(task_id)
    assert info.state == "delayed" and info.due_at is not None
    assert 7100 < (info.due_at - info.enqueued_at).total_seconds() < 7300
    html = app_for(processor).test_client().get("/dash/queues/default").get_data(as_text=True)
    assert task_id[:12] in html and info.due_at.strftime("%Y-%m-%d %H:%M:%S UTC") in html


def test_the_queue_page_narrows_to_one_tenant(processor: TaskProcessor) -> None:
    mine = processor.enqueue_task("default", "acme", td.noop, "a")
    theirs = processor.enqueue_task("default", "globex", td.noop, "g")
    client = app_for(processor).test_client()
    everything = client.get("/dash/queues/default").get_data(as_text=True)
    assert mine[:12] in everything and theirs[:12] in everything
    acme = client.get("/dash/queues/default?tenant=acme").get_data(as_text=True)
    assert mine[:12] in acme and theirs[:12] not in acme
    assert client.get("/dash/queues/default?tenant=bad%20name").status_code == 404


def test_a_batch_page_lists_its_tasks_queued_delayed_running_and_kept(processor: TaskProcessor,
                                                                       embedded_worker: Callable[..., Any]) -> None:
    from datetime import timedelta

    # Given a batch of tenant acme: a delayed task, a task that keeps its result, and 60 plain
    # tasks (more than a page), none run yet
    ids: dict[str, str] = {}

    def build(b: Any) -> None:
        ids["delayed"] = b.enqueue(td.noop, "later", delay_until=timedelta(hours=1))
        ids["kept"] = b.enqueue(td.noop, "kept", keep_result=3600)
        for i in range(60):
            ids[f"plain{i}"] = b.enqueue(td.noop, i)
    batch_id = processor.enqueue_batch("default", "acme", build)
    # Then the API lists them in publication order, paged, and only for their tenant
    first = processor.get_batch_tasks(batch_id, take=2)
    assert [(t.id, t.state) for t in first] == [(ids["delayed"], "delayed"), (ids["kept"], "queued")]
    assert len(processor.get_batch_tasks(batch_id, skip=2, take=100)) == 60
    assert [t.id for t in processor.tenant("acme").get_batch_tasks(batch_id, take=1)] == [ids["delayed"]]
    assert processor.tenant("globex").get_batch_tasks(batch_id) == []
    # and the batch page shows the first page of them with their states, the next page the rest
    client = app_for(processor).test_client()
    html = client.get(f"/dash/batches/{batch_id}").get_data(as_text=True)
    assert ids["delayed"][:12] in html and ids["kept"][:12] in html and "tpage=2" in html
    assert html.count(">queued<") == PAGE - 1 and html.count(">delayed<") == 1
    last = client.get(f"/dash/batches/{batch_id}?tpage=3").get_data(as_text=True)
    assert ids["plain59"][:12] in last and ids["delayed"][:12] not in last and "tpage=4" not in last

    # When a worker runs what is due
    embedded_worker(processor)
    wait_until(lambda: processor.get_batch(batch_id).done == 61, 20, "61 tasks done")
    # Then the page still lists the delayed task and the one that kept its result, not the rest
    assert [(t.id, t.state) for t in processor.get_batch_tasks(batch_id, take=100)] == [
        (ids["delayed"], "delayed"), (ids["kept"], "succeeded")]
    html = client.get(f"/dash/batches/{batch_id}").get_data(as_text=True)
    assert ids["kept"][:12] in html and ">succeeded<" in html and ids["plain0"][:12] not in html


def test_a_writable_dashboard_without_a_secret_key_says_what_to_fix(processor):
    app = flask.Flask("no-secret")
    app.register_blueprint(blueprint(processor), url_prefix="/dash")
    res = app.test_client().get("/dash/")
    assert res.status_code == 500
    assert "need app.secret_key" in res.get_data(as_text=True) and "read_only=True" in res.get_data(as_text=True)
