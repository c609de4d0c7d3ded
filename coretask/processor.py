"""TaskProcessor: the client API plus the one thing a client cannot do alone, run a worker.

The API (coretask/client.py) and the worker (coretask/worker/) are peers that both stand on the
gateway; neither imports the other. This module sits above both, so that ``processor.run()``
(the seed's "custom background worker": a worker loop inside the caller's process) stays one
call on the object users already have.
"""
from __future__ import annotations

import threading

from .client import Client
from .worker.process import WorkerProcess

__all__ = ["TaskProcessor"]


class TaskProcessor(Client):
    """The entry point: enqueue tasks and batches, control processing, inspect state, and run a
    worker loop in this process.

    Delivery contract: at least once. A task may run twice if its worker dies mid-task (it is
    then redelivered; a crash charges only its culprit); it never runs zero times once enqueue_task returned.
    """

    def run(self, stop_event: threading.Event, *, worker_id: str | None = None) -> None:
        """Run a worker loop in this process (threads only) until ``stop_event`` is set."""
        WorkerProcess(self, worker_id=worker_id, renew_own_leases=True).run(stop_event)
