"""Control: the pub/sub thread of a worker process.

Messages carry no authority of their own: each one only makes the worker re-read state that
the API wrote with a script (the fetch script reads the pause flags). A cancel is the one
message acted on at once, since a round trip would cost its latency target several times over
(with many CPU-bound task threads, the control thread waits for the GIL again after each one):
it names the batch and its cancel key, a random token that batch_commit stored in the batch's
hash and that reached this worker with the batch's fields when it fetched the batch's tasks.
Only a client that can read the batch's hash can forge it; a cancel without the key (a batch
committed before keys existed, a continuation fetched without fields) is verified by reading
the batch's state. A lost message only delays an idle worker until its next poll.
"""
from __future__ import annotations

import hmac
import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..context import TaskContext
    from .process import WorkerProcess

log = logging.getLogger(__name__)

BACKOFF_MAX = 5.0


def cancel_key(ctx: TaskContext) -> str | None:
    """The batch's cancel key among the batch fields the task was fetched with."""
    key = ctx.batch_field(b"ck")
    return key.decode() if key is not None else None


class Control:
    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coretask-control", daemon=True)
        self.subscribed = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _run(self) -> None:
        w = self.worker
        delay = 0.1
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = w.store.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(w.store.keys.events)
                if pubsub.connection is not None:
                    # redis-py may also reconnect and re-subscribe by itself, inside get_message
                    pubsub.connection.register_connect_callback(self._reconnected)
                self.subscribed.set()
                w.wake.set()          # events may have been missed while disconnected
                delay = 0.1
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is not None and msg.get("type") == "message":
                        self.handle(msg["data"].decode(errors="replace"))
            except Exception as exc:
                self.subscribed.clear()
                if self._stop.is_set():
                    break
                log.warning("worker %s: pub/sub connection lost (%s); reconnecting in %.1fs",
                            w.id, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _reconnected(self, _connection: object) -> None:
        """redis-py re-established the subscription on its own: events published meanwhile were
        missed, so re-read the state as after any reconnection."""
        self.worker.maintenance.schedules.poke()
        self.worker.wake.set()

    def handle(self, message: str) -> None:
        w = self.worker
        k = w.store.keys
        if message.startswith("c:"):
            batch_id, _, key = message[2:].partition(":")
            mine = w.running_of(batch_id)
            if not mine:
                return                # nothing of that batch runs here
            if key and any(hmac.compare_digest(cancel_key(t.ctx) or "", key) for t in mine):
                canceled = True
            else:
                canceled = w.store.redis.hget(k.batch(batch_id), "state") == b"canceled"
            if canceled:
                n = w.abort_where("canceled", batch_id)
                log.info("worker %s: batch %s canceled, aborting %d running tasks", w.id, batch_id, n)
        elif message == "pr":
            if w.store.redis.exists(k.paused):
                n = w.abort_where("requeue")
                log.info("worker %s: paused with requeue, handing back %d running tasks", w.id, n)
        else:
            if message in ("s", "r"):     # schedules changed / resumed: re-read the next tick
                w.maintenance.schedules.poke()
            w.wake.set()
