"""The TaskProcessor that observability tests' worker processes load (``--app
tests.obs_app:processor``): tests.app's options plus the middleware CORETASK_TEST_OBS names
("prometheus", "otel", comma-separated). With "otel" the worker process configures the
OpenTelemetry SDK and ships every span it ends to a Redis list (CORETASK_TEST_SPANS), where the
test reads them: the SDK's exporters live in one process, the test in another."""
from __future__ import annotations

import json
import os
from typing import Any

from coretask import Options, TaskProcessor


def span_record(span: Any) -> dict[str, Any]:
    """What the tests assert of a finished SDK span, as JSON-able data."""
    return {
        "name": span.name, "kind": span.kind.name, "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent": format(span.parent.span_id, "016x") if span.parent is not None else None,
        "links": [{"trace_id": format(link.context.trace_id, "032x"), "span_id": format(link.context.span_id, "016x")}
                  for link in span.links],
        "attributes": dict(span.attributes or {}), "status": span.status.status_code.name,
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


def _tracing() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from tests.tasks import R

    key = os.environ["CORETASK_TEST_SPANS"]

    class RedisExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            for span in spans:
                R().rpush(key, json.dumps(span_record(span), default=str))
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedisExporter()))
    trace.set_tracer_provider(provider)


def _make() -> TaskProcessor:
    opts = json.loads(os.environ.get("CORETASK_TEST_OPTIONS", "{}"))
    wanted = [w for w in os.environ.get("CORETASK_TEST_OBS", "").split(",") if w]
    middleware: list[Any] = []
    if "otel" in wanted:
        _tracing()
        from coretask.contrib.otel import TracingMiddleware
        middleware.append(TracingMiddleware())
    if "prometheus" in wanted:
        from coretask.contrib.prometheus import PrometheusMiddleware
        middleware.append(PrometheusMiddleware(max_tenants=int(os.environ.get("CORETASK_TEST_MAX_TENANTS", "50"))))
    return TaskProcessor(Options(redis=os.environ["CORETASK_TEST_URL"],
                                 cluster=bool(os.environ.get("CORETASK_TEST_CLUSTER")),
                                 prefix=os.environ["CORETASK_TEST_PREFIX"], middleware=middleware, **opts))


processor = _make() if "CORETASK_TEST_PREFIX" in os.environ else None
