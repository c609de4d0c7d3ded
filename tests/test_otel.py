"""OpenTelemetry traces (coretask/contrib/otel.py): PRODUCER spans at enqueue and in batches,
CONSUMER spans around each attempt, linked through the W3C trace context carried in the signed
task envelope; checked with the SDK's in-memory exporter, in process and across a real worker
process (tests/obs_app.py ships that process's spans through Redis)."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coretask import Options, StoreUnavailable, TaskProcessor
from coretask.contrib.otel import TracingMiddleware
from coretask.encoding import read_headers
from coretask.errors import ConfigurationError
from tests import tasks
from tests.conftest import Target, wait_until
from tests.obs_app import span_record
from tests.test_logs_json import spawn_worker

KEY = "k" * 32


def sdk() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def spans(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    return [span_record(s) for s in exporter.get_finished_spans()]


def by_message(found: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {s["attributes"]["messaging.message.id"]: s for s in found if s["kind"] == kind}


def test_parent_option_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="child, link"):
        TracingMiddleware(parent="sibling")


def test_spans_link_producer_and_consumer_in_process(make_processor: Callable[..., TaskProcessor],
                                                     embedded_worker: Callable[[TaskProcessor], threading.Event],
                                                     prefix: str) -> None:
    # Given producer and worker tracing into one in-memory exporter, under an outer span
    provider, exporter = sdk()
    p = make_processor(middleware=[TracingMiddleware(tracer_provider=provider)], signing_key=KEY)
    with provider.get_tracer("test").start_as_current_span("request") as request:
        single = p.enqueue_task("default", "acme", tasks.record, f"{prefix}:s", 1)
        with p.batch("default", "acme") as b:
            in_batch = b.enqueue(tasks.record, f"{prefix}:b", 2)
            failing = b.enqueue(tasks.always_fail, "boom", retries=1)
    producers = by_message(spans(exporter), "PRODUCER")
    # Then each enqueue made a PRODUCER span under the request, with the messaging attributes
    send, create = producers[single], producers[in_batch]
    assert (send["name"], create["name"]) == ("send default", "create default")
    request_id = format(request.get_span_context().span_id, "016x")
    assert send["parent"] == create["parent"] == request_id
    assert send["attributes"] == {
        "messaging.system": "coretask", "messaging.destination.name": "default", "messaging.message.id": single,
        "messaging.operation": "send", "messaging.operation.type": "send", "messaging.operation.name": "send",
        "coretask.tenant": "acme", "coretask.target": "tests.tasks:record"}
    assert create["attributes"]["coretask.batch_id"] == b.id and create["attributes"]["messaging.operation"] == "create"
    # and the stored envelope carries the trace context first, signed with the rest
    payload = tasks.R().hget(f"{prefix}:t:{single}", "p")
    assert read_headers(payload)["traceparent"].startswith(f"00-{send['trace_id']}-{send['span_id']}-")
    # When a worker runs them
    embedded_worker(p)
    wait_until(lambda: len(by_message(spans(exporter), "CONSUMER")) == 3, 20, "3 consumer spans")
    consumers = by_message(spans(exporter), "CONSUMER")
    # Then each CONSUMER span is the child of its producer span, linked to it, in the same trace
    for task_id in (single, in_batch, failing):
        c, pr = consumers[task_id], producers[task_id]
        assert c["name"] == "process default"
        assert (c["trace_id"], c["parent"]) == (pr["trace_id"], pr["span_id"])
        assert c["links"] == [{"trace_id": pr["trace_id"], "span_id": pr["span_id"]}]
        attrs = c["attributes"]
        assert attrs["messaging.operation"] == "process" and attrs["messaging.operation.type"] == "process"
        assert attrs["messaging.system"] == "coretask" and attrs["messaging.destination.name"] == "default"
        assert attrs["coretask.tenant"] == "acme" and attrs["coretask.attempt"] == 1
    assert consumers[in_batch]["attributes"]["coretask.batch_id"] == b.id
    assert "coretask.batch_id" not in consumers[single]["attributes"]
    assert consumers[single]["status"] == "UNSET" and consumers[single]["attributes"]["coretask.outcome"] == "succeeded"
    bad = consumers[failing]
    assert bad["status"] == "ERROR" and bad["attributes"]["coretask.outcome"] == "failed"
    assert bad["attributes"]["error.type"] == "builtins.ValueError"
    exception = [e for e in bad["events"] if e["name"] == "exception"]
    assert exception and exception[0]["attributes"]["exception.type"] == "ValueError"
    assert exception[0]["attributes"]["exception.message"] == "boom"
    assert any(e["name"] == "coretask.dead" for e in bad["events"])


def test_a_send_whose_idempotency_key_is_held_ends_at_once_naming_the_holder(
        make_processor: Callable[..., TaskProcessor], prefix: str) -> None:
    # Given tracing and Prometheus on a producer, and a task holding the key "k1"
    from prometheus_client import CollectorRegistry

    from coretask.contrib.prometheus import PrometheusMiddleware
    provider, exporter = sdk()
    registry = CollectorRegistry()
    p = make_processor(middleware=[TracingMiddleware(tracer_provider=provider), PrometheusMiddleware(registry=registry)])
    first = p.enqueue_task("default", "acme", tasks.record, f"{prefix}:s", 1, key="k1")
    # When the same key is enqueued again (nothing is written)
    assert p.enqueue_task("default", "acme", tasks.record, f"{prefix}:s", 2, key="k1") == first
    # Then its send span has ended already, naming the holder, and only the first counts as enqueued
    sends = [s for s in spans(exporter) if s["name"] == "send default"]
    assert len(sends) == 2 and sends[1]["attributes"]["coretask.held_by"] == first
    assert "coretask.held_by" not in sends[0]["attributes"]
    assert registry.get_sample_value("coretask_tasks_enqueued_total", {"queue": "default", "tenant": "acme"}) == 1


def test_tampered_trace_context_fails_the_signature(make_processor: Callable[..., TaskProcessor],
                                                    embedded_worker: Callable[[TaskProcessor], threading.Event],
                                                    prefix: str) -> None:
    provider, exporter = sdk()
    p = make_processor(middleware=[TracingMiddleware(tracer_provider=provider)], signing_key=KEY)
    task_id = p.enqueue_task("default", "acme", tasks.record, f"{prefix}:t", 1)
    r = tasks.R()
    payload = r.hget(f"{prefix}:t:{task_id}", "p")
    headers = read_headers(payload)
    forged = payload.replace(headers["traceparent"].encode(), b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")
    assert forged != payload
    r.hset(f"{prefix}:t:{task_id}", "p", forged)
    embedded_worker(p)
    wait_until(lambda: p.get_task(task_id) and p.get_task(task_id).state == "dead", 20, "the forged task dead")
    assert p.get_task(task_id).error_type == "TaskRefused"
    assert not r.lrange(f"{prefix}:t", 0, -1)
    consumer = by_message(spans(exporter), "CONSUMER")[task_id]
    assert consumer["trace_id"] != "1" * 32 and consumer["links"] == []   # the forged context was never read


def test_link_mode_starts_a_new_trace(make_processor: Callable[..., TaskProcessor],
                                      embedded_worker: Callable[[TaskProcessor], threading.Event],
                                      prefix: str) -> None:
    provider, exporter = sdk()
    p = make_processor(middleware=[TracingMiddleware(tracer_provider=provider, parent="link")])
    task_id = p.enqueue_task("default", "acme", tasks.record, f"{prefix}:l", 1)
    embedded_worker(p)
    wait_until(lambda: task_id in by_message(spans(exporter), "CONSUMER"), 20, "the consumer span")
    c, pr = by_message(spans(exporter), "CONSUMER")[task_id], by_message(spans(exporter), "PRODUCER")[task_id]
    assert c["parent"] is None and c["trace_id"] != pr["trace_id"]
    assert c["links"] == [{"trace_id": pr["trace_id"], "span_id": pr["span_id"]}]


def test_trace_crosses_a_real_worker_process(server: Target, prefix: str, make_processor: Callable[..., TaskProcessor],
                                             tmp_path: Path) -> None:
    # Given a producer tracing in memory here, and a worker process whose SDK ships its spans to Redis
    provider, exporter = sdk()
    p = make_processor(middleware=[TracingMiddleware(tracer_provider=provider)])
    shipped = f"{prefix}:spans"
    m = spawn_worker(tmp_path / "worker.log", prefix, app="tests.obs_app:processor",
                     env={"CORETASK_TEST_OBS": "otel", "CORETASK_TEST_SPANS": shipped})
    try:
        # When a task succeeds and one fails twice (retried once, then dead)
        ok = p.enqueue_task("default", "acme", tasks.record, f"{prefix}:x", 1)
        bad = p.enqueue_task("default", "acme", tasks.always_fail, "kaput", retries=2)

        def worker_spans() -> list[dict[str, Any]]:
            return [json.loads(v) for v in tasks.R().lrange(shipped, 0, -1)]

        wait_until(lambda: len(worker_spans()) == 3, 30, lambda: f"3 worker spans; log:\n{m.log()[-2000:]}")
    finally:
        m.terminate()
    producers = by_message(spans(exporter), "PRODUCER")
    consumers = [s for s in worker_spans() if s["kind"] == "CONSUMER"]
    assert len(consumers) == 3
    # Then every attempt's CONSUMER span continues its producer's trace from the other process
    for c in consumers:
        pr = producers[c["attributes"]["messaging.message.id"]]
        assert (c["trace_id"], c["parent"]) == (pr["trace_id"], pr["span_id"])
        assert c["links"] == [{"trace_id": pr["trace_id"], "span_id": pr["span_id"]}]
        assert c["attributes"]["messaging.system"] == "coretask"
    attempts = sorted((c["attributes"]["coretask.attempt"], c["status"], c["attributes"]["coretask.outcome"])
                      for c in consumers if c["attributes"]["messaging.message.id"] == bad)
    assert attempts == [(1, "ERROR", "failed"), (2, "ERROR", "failed")]
    first = next(c for c in consumers if c["attributes"]["messaging.message.id"] == bad
                 and c["attributes"]["coretask.attempt"] == 1)
    assert [e["name"] for e in first["events"]] == ["coretask.retry", "exception"]
    assert first["events"][1]["attributes"]["exception.message"] == "kaput"
    assert [c["status"] for c in consumers if c["attributes"]["messaging.message.id"] == ok] == ["UNSET"]


def test_an_enqueue_that_raises_ends_its_send_span_with_the_error() -> None:
    # Given a producer whose Redis cannot be reached
    provider, exporter = sdk()
    p = TaskProcessor(Options(redis="redis://127.0.0.1:1/0", middleware=[TracingMiddleware(tracer_provider=provider)]))
    # When an enqueue raises
    with pytest.raises(StoreUnavailable):
        p.enqueue_task("default", "acme", tasks.record, "k", 1)
    p.close()
    # Then its send span is ended at once, in error, with the exception the caller got
    (send,) = spans(exporter)
    assert send["name"] == "send default" and send["status"] == "ERROR"
    assert send["attributes"]["error.type"] == "coretask.errors.StoreUnavailable"
    assert any(e["name"] == "exception" for e in send["events"])
