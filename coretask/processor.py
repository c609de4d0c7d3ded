"""TaskProcessor: the client API plus the one thing a client cannot do alone, run a worker.

The API (coretask/client.py) and the worker (coretask/worker/) are peers that both stand on the
gateway; neither imports the other. This module sits above both, so that ``processor.run()``
(the seed's "custom background worker": a worker loop inside the caller's process) stays one
call on the object users already have, and so that eager mode (coretask/eager.py), which runs
tasks through a worker's runner at enqueue, is attached here.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .client import Client
from .errors import ConfigurationError
from .options import Options
from .worker.process import WorkerProcess

if TYPE_CHECKING:
    from .eager import EagerRunner

__all__ = ["TaskProcessor"]


class TaskProcessor(Client):
    """The entry point: enqueue tasks and batches, control processing, inspect state, and run a
    worker loop in this process.

    Delivery contract: at least once. A task may run twice if its worker dies mid-task (it is
    then redelivered; a crash charges only its culprit); it never runs zero times once enqueue_task returned.

    With ``Options(eager=True)`` every task runs in the thread that enqueued it, at once, and no
    Redis is used (docs/testing.md); ``eager`` is then the :class:`~coretask.eager.EagerRunner`
    (``processor.eager.retry_delays(task_id)``), else None.
    """

    eager: EagerRunner | None = None

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        if self.options.eager:      # imported only then: eager mode costs nothing when it is off
            from .eager import EagerRunner
            from .gateway.memory import MemoryGateway
            assert isinstance(self.gateway, MemoryGateway)
            self.eager = EagerRunner(self.options, self.gateway, self.chain)
            self._run_ready = self.eager.run_ready

    def run(self, stop_event: threading.Event, *, worker_id: str | None = None) -> None:
        """Run a worker loop in this process (threads only) until ``stop_event`` is set."""
        if self.eager is not None:
            raise ConfigurationError("this TaskProcessor runs in eager mode (Options(eager=True)): its tasks run "
                                     "when they are enqueued, so there is no worker to run; leave eager off to "
                                     "run a worker")
        WorkerProcess(self, worker_id=worker_id, renew_own_leases=True).run(stop_event)
