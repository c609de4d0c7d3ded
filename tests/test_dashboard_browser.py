"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright for Python
(launched with the system binary; Playwright's own browser download is never used), against the
suite's real server and an embedded worker, served by the standalone app on a free port.
Every test fails on any console error or uncaught page error.

Set CORETASK_DASHBOARD_SCREENSHOTS=docs/img to write the screenshots the README shows.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import uuid
from datetime import timedelta
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from playwright import sync_api

from coretask import ScheduleData, TaskProcessor, cli  # noqa: E402
from coretask.dashboard.server import create_app, make_server  # noqa: E402
from tests import tasks as t_tasks  # noqa: E402
from tests import tasks_dashboard as td  # noqa: E402
from tests.conftest import ROOT, wait_until  # noqa: E402

expect = sync_api.expect
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("CORETASK_DASHBOARD_SCREENSHOTS")

if CHROMIUM is None:     # a missing browser fails the run: a skip would hide the dashboard untested
    raise RuntimeError("the browser tests need Debian's chromium on PATH (apt-get install chromium; .ci/run "
                       "installs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Dash:
    """A served dashboard and a page on it that records every console error."""

    def __init__(self, url: str, page: Any) -> None:
        self.url, self.page = url, page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("dialog", lambda d: d.accept())      # destructive actions ask first: say yes

    def go(self, path: str) -> Any:
        response = self.page.goto(self.url + path)
        assert response is not None and response.ok, f"{path}: {response and response.status}"
        return self.page

    def shot(self, name: str) -> None:
        if SHOTS:
            out = ROOT / SHOTS
            out.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(out / f"dashboard-{name}.png"), full_page=False)


@pytest.fixture
def dash(browser: Any, processor: TaskProcessor) -> Iterator[Dash]:
    srv = make_server(create_app(processor), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    context.set_default_timeout(10_000)
    d = Dash(f"http://127.0.0.1:{srv.server_port}", context.new_page())
    try:
        yield d
        assert d.errors == [], "\n".join(d.errors)
    finally:
        context.close()
        srv.shutdown()
        thread.join(10)


@pytest.fixture
def processor(make_processor: Callable[..., TaskProcessor]) -> TaskProcessor:
    return make_processor(max_workers=4, task_retention=120)


def test_every_page_loads_without_console_errors(dash: Dash, processor: TaskProcessor,
                                                 embedded_worker: Callable[..., Any]) -> None:
    # Given finished and dead work of two tenants, a schedule and a running worker
    embedded_worker(processor)
    done = processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(td.noop, i) for i in range(5)],
                                   scope="import <b>2026</b>")
    dead = processor.enqueue_task("default", "acme", td.fail, "<script>alert(1)</script>", retries=0)
    processor.enqueue_task("default", "globex", td.steps, 40, 0.05)
    processor.upsert_schedule(ScheduleData("nightly-report", "acme", "default", None, "0 3 * * *",
                                           "Europe/Paris"), td.noop)
    processor.wait_for_batch(done, 20)
    wait_until(lambda: (t := processor.get_task(dead)) is not None and t.state == "dead", 20, "a dead task")
    wait_until(lambda: processor.get_worker_states(), 20, "a worker heartbeat")

    # When every page is opened, Then each shows its content, and the console stays clean
    page = dash.go("/")
    expect(page.locator("#pause-state")).to_have_text("running")
    expect(page.locator("td[data-text='q:default:dead']")).to_have_text("1")
    bars = page.locator("svg[data-chart='hour'] rect.p")
    expect(bars).to_have_count(60)
    assert max(bars.evaluate_all("rs => rs.map(r => +r.getAttribute('height'))")) > 0   # this minute's work
    dash.shot("overview")
    dash.go("/queues/default")
    expect(page.locator(".error-message").first).to_have_text("<script>alert(1)</script>")
    dash.shot("queue")
    dash.go("/batches?tenant=acme")
    expect(page.locator(f"[data-text='b:{done}:state']")).to_have_text("succeeded")
    dash.shot("batches")
    dash.go(f"/batches/{done}")
    expect(page.locator(".scope")).to_have_text("import <b>2026</b>")
    dash.go("/schedules?tenant=acme")
    expect(page.get_by_text("Europe/Paris").first).to_be_visible()
    dash.shot("schedules")
    dash.go("/tenants")
    expect(page.get_by_role("link", name="globex")).to_be_visible()
    dash.shot("tenants")
    dash.go("/workers")
    expect(page.locator("tbody tr").first).to_contain_text(processor.get_worker_states()[0].host)
    expect(page.locator("tbody tr").first).to_contain_text(" MB")
    dash.shot("workers")
    dash.go(f"/tasks/{dead}")
    expect(page.locator("#task-state")).to_have_text("dead")
    expect(page.locator(".traceback")).to_contain_text("ValueError")
    dash.shot("task")
    # a page that is left open keeps polling without errors
    expect(page.locator("body")).to_have_attribute("data-updated", re.compile(r"^\d+$"))


def test_pause_and_resume_and_a_cli_pause_shows_within_two_seconds(dash: Dash, processor: TaskProcessor) -> None:
    page = dash.go("/")
    # When the switch is clicked (and the confirmation accepted), Then processing is paused
    page.get_by_role("button", name="Pause").click()
    expect(page.locator(".flash")).to_contain_text("Paused everything")
    expect(page.locator("#pause-state")).to_have_text("paused")
    assert processor.is_paused
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#pause-state")).to_have_text("running")
    assert not processor.is_paused
    # When the CLI pauses, Then the open page shows it within two seconds, without a reload
    page.evaluate("window.__same_page = true")
    assert cli.main(["pause"], processor=processor) == cli.OK
    expect(page.locator("#pause-state")).to_have_text("paused", timeout=2000)
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
    assert cli.main(["resume"], processor=processor) == cli.OK
    expect(page.locator("#pause-state")).to_have_text("running", timeout=2000)
    assert page.evaluate("window.__same_page") is True


def test_batch_progress_moves_live_and_cancel_stops_a_running_batch(dash: Dash, processor: TaskProcessor,
                                                                    embedded_worker: Callable[..., Any]) -> None:
    # Given a batch of 20 tasks of 0.6 s (3 s on 4 threads), and a page open on it before the worker starts
    quick = processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(td.steps, 4, 0.15) for _ in range(20)])
    page = dash.go(f"/batches/{quick}")
    expect(page.locator("#batch-done")).to_have_text("0")
    page.evaluate("window.__same_page = true")
    embedded_worker(processor)
    # Then the page shows the count move and the batch end, without a reload
    seen: set[int] = set()
    done_text = page.locator("#batch-done")
    wait_until(lambda: seen.add(int(done_text.text_content() or 0)) or 20 in seen, 30, lambda: f"counts {seen}")
    assert len(seen - {0, 20}) >= 1, f"the page never showed a count between 0 and 20: {sorted(seen)}"
    expect(page.locator("#batch-state")).to_have_text("succeeded")
    assert page.evaluate("window.__same_page") is True
    assert page.locator(f"progress[data-bar='b:{quick}']").evaluate("el => el.value / el.max") == 1

    # Given a batch of long tasks that are running
    slow = processor.enqueue_batch("default", "acme", lambda b: [b.enqueue(td.steps, 200, 0.1) for _ in range(3)])
    wait_until(lambda: processor.get_batch(slow).running == 3, 20, "3 running tasks")
    page = dash.go(f"/batches/{slow}")
    expect(page.locator("#batch-state")).to_have_text("running")
    dash.shot("batch")
    # When Cancel is clicked, Then the batch is canceled and its tasks are aborted
    page.get_by_role("button", name="Cancel batch").click()
    expect(page.locator(".flash")).to_contain_text(f"Batch {slow} canceled")
    expect(page.locator("#batch-state")).to_have_text("canceled")
    info = processor.wait_for_batch(slow, 20)
    assert info.state == "canceled" and info.canceled == 3 and info.done == 0
    expect(page.get_by_role("button", name="Cancel batch")).to_be_hidden()


def test_a_page_whose_task_is_gone_says_so_and_stops_claiming_it_is_live(dash: Dash,
                                                                          processor: TaskProcessor) -> None:
    # Given a task's page open (a delayed task), and the task deleted meanwhile (as a finished
    # task that keeps no record leaves)
    tid = processor.enqueue_task("default", "acme", td.steps, 1, 0.01, delay_until=timedelta(hours=1))
    page = dash.go(f"/tasks/{tid}")
    expect(page.locator(".live-dot")).to_be_visible()
    assert processor.delete_task(tid)
    # Then the open page says so above its last state and no longer shows itself as live
    expect(page.locator("#gone")).to_contain_text("no longer kept")
    expect(page.locator(".live-dot")).to_be_hidden()
    # And the page, loaded again, says what is gone and why, with the navigation (a bare 404 before)
    response = page.goto(f"{dash.url}/tasks/{tid}")
    assert response is not None and response.status == 404
    expect(page.locator("#not-found")).to_contain_text(f"task {tid} is not visible here")
    expect(page.locator("#not-found")).to_contain_text("task_retention")
    expect(page.get_by_role("link", name="Tenants")).to_be_visible()
    # (the browser reports each 404 answer on the console: those are this test's, and expected)
    dash.errors[:] = [e for e in dash.errors if "404" not in e]


def test_retry_a_dead_task_and_find_it_by_id(dash: Dash, processor: TaskProcessor,
                                             embedded_worker: Callable[..., Any]) -> None:
    # Given a task that failed once with no retries left: dead
    embedded_worker(processor)
    key = "dash-" + uuid.uuid4().hex
    task_id = processor.enqueue_task("default", "acme", t_tasks.fail_times, key, 1, retries=0)
    wait_until(lambda: (t := processor.get_task(task_id)) is not None and t.state == "dead", 20, "a dead task")
    # When its id is typed into the search box
    page = dash.go("/")
    page.get_by_role("searchbox").fill(task_id)
    page.get_by_role("searchbox").press("Enter")
    # Then its page shows it dead; When Retry is clicked, Then it runs again and succeeds
    expect(page.locator("h1")).to_contain_text(task_id)
    expect(page.locator("#task-state")).to_have_text("dead")
    page.get_by_role("button", name="Retry").click()
    expect(page.locator(".flash")).to_contain_text("moved back to work")
    expect(page.locator("#task-state")).to_have_text("succeeded")   # live, from the page's twin
    assert processor.get_task(task_id).state == "succeeded"
    # And an unknown id says so
    page.get_by_role("searchbox").fill("no-such-id")
    page.get_by_role("searchbox").press("Enter")
    expect(page.locator("#not-found")).to_contain_text("no-such-id")
    dash.errors = [e for e in dash.errors if "404" not in e]   # the not-found page itself answers 404


def test_trigger_a_schedule(dash: Dash, processor: TaskProcessor) -> None:
    processor.upsert_schedule(ScheduleData("hourly-sync", "acme", "default", None, "0 * * * *"), td.noop)
    assert processor.get_schedule("hourly-sync").last_run is None
    page = dash.go("/schedules?tenant=acme")
    page.get_by_role("button", name="Trigger now").click()
    expect(page.locator(".flash")).to_contain_text("Schedule hourly-sync: one run enqueued now (task ")
    info = processor.get_schedule("hourly-sync")
    assert info.last_run is not None and info.last_task_id is not None
    expect(page.locator(f"a[href$='/tasks/{info.last_task_id}']")).to_be_visible()
    assert processor.get_task(info.last_task_id).state == "queued"
    # When it is paused, Then the page and the store say so, and Resume undoes it
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(page.locator(".flash")).to_contain_text("Schedule hourly-sync paused")
    expect(page.locator("#schedule-1")).to_contain_text("paused")
    assert processor.get_schedule("hourly-sync").paused
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.locator(".flash")).to_contain_text("Schedule hourly-sync resumed")
    expect(page.locator("#schedule-1")).to_contain_text("active")
    assert not processor.get_schedule("hourly-sync").paused
    # When it is canceled, Then it is gone (its run stays queued)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".flash")).to_contain_text("Schedule hourly-sync canceled")
    assert processor.get_schedule("hourly-sync") is None
    assert processor.get_task(info.last_task_id).state == "queued"


def test_a_schedules_failed_run_shows_on_its_row(dash: Dash, processor: TaskProcessor,
                                                 embedded_worker: Callable[..., Any]) -> None:
    # Given a schedule whose run failed for good (discarded, as schedule runs are by default)
    processor.upsert_schedule(ScheduleData("broken-sync", "acme", "default", None, "0 * * * *", retries=0),
                              td.fail, "the API said no")
    run = processor.trigger_schedule("broken-sync")
    embedded_worker(processor)
    wait_until(lambda: processor.get_schedule("broken-sync").failures == 1, 10, "the run failed")
    # When the schedules page is shown, Then its row says so, with the error and the run's id
    page = dash.go("/schedules?tenant=acme")
    row = page.locator("#schedule-1")
    expect(row).to_contain_text("ValueError: the API said no")
    expect(row.locator(f"a[href$='/tasks/{run}']")).to_have_count(2)     # last run, and last failed run


def test_pause_and_resume_a_workers_manager(dash: Dash, processor: TaskProcessor,
                                            embedded_worker: Callable[..., Any]) -> None:
    # Given a worker in this process (its manager: this host and pid)
    embedded_worker(processor)
    wait_until(lambda: processor.get_workers(), 10, "a heartbeat")
    manager = f"{socket.gethostname()}:{os.getpid()}"
    page = dash.go("/workers")
    # When its manager is paused on the workers page
    page.get_by_role("button", name="Pause manager").click()
    expect(page.locator(".flash")).to_contain_text(f"Worker {manager} paused: its 1 processes finish")
    # Then the store and the page say so, and a fetch of it leases nothing
    assert processor.get_paused_workers() == [manager] and processor.get_worker_states()[0].paused
    expect(page.locator("#paused-workers")).to_contain_text(manager)
    expect(page.locator("tbody tr").first).to_contain_text("paused")
    # When it is resumed there, Then it runs work again
    page.get_by_role("button", name=f"Resume {manager}").click()
    expect(page.locator(".flash")).to_contain_text(f"Worker {manager} resumed")
    assert processor.get_paused_workers() == []
    expect(page.locator("#paused-workers")).to_have_count(0)
    task_id = processor.enqueue_task("default", "acme", td.noop)
    wait_until(lambda: processor.get_tenant_stats("acme").done == 1, 10, f"task {task_id} ran")


def test_tenant_limit_and_pause(dash: Dash, processor: TaskProcessor) -> None:
    processor.enqueue_task("default", "acme", td.noop)
    page = dash.go("/tenants")
    page.get_by_label("concurrency limit of acme").fill("3")
    page.get_by_role("button", name="Set").click()
    expect(page.locator(".flash")).to_contain_text("Tenant acme: at most 3 tasks at once")
    assert processor.get_tenant_stats("acme").limit == 3
    page.get_by_role("button", name="Pause").click()
    expect(page.locator(".flash")).to_contain_text("Tenant acme paused")
    assert processor.is_tenant_paused("acme") and not processor.is_paused
    # a resume made elsewhere shows on the open page without a reload
    processor.resume_tenant("acme")
    expect(page.get_by_role("button", name="Pause")).to_be_visible(timeout=2000)
