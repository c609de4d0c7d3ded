"""Structured logs: the fields every task event carries, and a one-object-per-line JSON formatter.

Why: operators ship worker logs to Loki, Elasticsearch or CloudWatch, where a field is a query
(``task_id = "..."``) and a sentence is a full-text search. Every task event (started,
succeeded, failed, dead-lettered, canceled, timed out, handed back) is logged with ``extra``
fields (:data:`TASK_FIELDS` and ``event``), so a formatter sees them as attributes of the
record; :class:`JsonFormatter` writes them out with the message. The plain text format is
unchanged: the fields add nothing to it.

``python -m coretask.worker --log-format json`` installs the formatter in the manager and in
every worker process. Elsewhere: ``handler.setFormatter(coretask.logs.JsonFormatter())``.

Cost: the extra dict is built only when the logger is enabled for the event's level (the
success and start events are DEBUG, so a worker at INFO builds nothing per task for them).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["JsonFormatter", "TASK_FIELDS", "EVENTS", "LOG_FORMATS", "TEXT_FORMAT", "configure"]

# the fields of every task event, in the order the JSON formatter writes them
TASK_FIELDS = ("event", "task_id", "target", "queue", "tenant", "batch_id", "attempt", "duration_ms",
               "retries_left", "next_delay_ms", "error_type")
EVENTS = ("task_started", "task_succeeded", "task_failed", "task_dead", "task_canceled", "task_timeout",
          "task_handed_back")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"

# attributes every LogRecord has: anything else on a record came from ``extra``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record and line: ``ts`` (UTC, ISO 8601 with milliseconds),
    ``level``, ``logger``, ``pid``, ``thread``, ``message``, then every ``extra`` field (task
    fields first), and ``exc`` with the formatted traceback when there is one. Values JSON
    cannot carry are written with ``repr``; a newline inside a message stays escaped, so a
    line is always one record."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        attrs = record.__dict__
        for name in TASK_FIELDS:
            if name in attrs:
                doc[name] = attrs[name]
        for name, value in attrs.items():
            if name not in _STANDARD and name not in doc:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=repr, ensure_ascii=False, separators=(",", ":"))


def configure(level: int, log_format: str = "text") -> None:
    """The root logger's handler for a coretask process (manager or worker): stderr, in the
    plain text format or JSON. Raises ValueError naming the choices for an unknown format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is unknown; use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
