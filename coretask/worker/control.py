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
A single task's cancel ("x:<task>", cancel_task.lua) is verified by reading the task's mark
(field cx) under the lease token this worker holds; a cancel naming a task this worker does
not run (yet: its fetch reply may still be on the way) is remembered for the loop, which checks
the tasks it admits against it (Ledger.cancels_heard).

redis-py sets up the subscription (authentication, TLS, cluster node); the messages are then
read straight off its socket by this thread (see _read).
"""
from __future__ import annotations

import hmac
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from ..throttle import OUTAGE

if TYPE_CHECKING:
    from ..context import TaskContext
    from ..gateway import Gateway
    from .aborts import Aborts
    from .ledger import Ledger, Task
    from .schedules import ScheduleTimer

log = logging.getLogger(__name__)

BACKOFF_MAX = 5.0


def cancel_key(ctx: TaskContext) -> str | None:
    """The batch's cancel key among the batch fields the task was fetched with."""
    key = ctx.batch_field(b"ck")
    return key.decode() if key is not None else None


class Control:
    def __init__(self, worker_id: str, ledger: Ledger, aborts: Aborts, gateway: Gateway,
                 schedules: ScheduleTimer) -> None:
        self.worker_id = worker_id
        self.ledger = ledger
        self.aborts = aborts
        self.gateway = gateway
        self.schedules = schedules
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coretask-control", daemon=True)
        self.subscribed = threading.Event()
        self._sock: socket.socket | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # ends the blocking recv in _read
            except OSError:
                pass
        self._thread.join(timeout=3)

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.gateway.subscribe()
                sock = self._sock = pubsub.connection._sock      # type: ignore[union-attr]
                sock.settimeout(None)     # see _read
                if self._stop.is_set():
                    break
                delay = 0.1
                self._read(sock, {c.encode() for c in self.gateway.channels()})
            except Exception as exc:
                self.subscribed.clear()
                if self._stop.is_set():
                    break
                if OUTAGE.told(f"worker {self.worker_id}", exc):      # said once for the process, then counted
                    log.debug("worker %s: pub/sub connection lost; reconnecting in %.1fs", self.worker_id, delay)
                else:
                    log.warning("worker %s: pub/sub connection lost (%s); reconnecting in %.1fs",
                                self.worker_id, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            finally:
                self._sock = None
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _read(self, sock: socket.socket, channels: set[bytes]) -> None:
        """Read the subscription straight off its socket: one blocking recv per wake-up. Behind
        many CPU-bound task threads each wait for the GIL lasts a round of switch intervals,
        and redis-py's reader (a poll, then a recv, each giving up the GIL) would cost several
        such waits before a cancel could be acted on. For the same reason the socket has no
        timeout (a timeout makes every recv a poll and then a recv): stop() shuts it down."""
        buf = bytearray(65536)
        view = memoryview(buf)
        frames = Frames()
        pending = getattr(sock, "pending", None)          # TLS: records already decrypted
        unconfirmed = len(channels)
        while not self._stop.is_set():
            n = sock.recv_into(buf)
            if n == 0:
                if self._stop.is_set():
                    return
                raise ConnectionError("the server closed the pub/sub connection")
            received = frames.feed(view[:n])
            while pending is not None and pending():
                received += frames.feed(view[:sock.recv_into(buf)])
            for frame in received:
                if len(frame) == 3 and frame[0] == b"message" and frame[1] in channels:
                    self.handle(frame[2].decode(errors="replace"), frame[1].decode())
                elif unconfirmed and len(frame) == 3 and frame[0] == b"subscribe" and frame[1] in channels:
                    unconfirmed -= 1
                    if not unconfirmed:     # from here on no message is missed: re-read what was
                        self.subscribed.set()
                        self._resync()

    def _resync(self) -> None:
        """Events published before the subscription was (re)established were missed: re-read
        the state they would have announced, including a cancel of a running task or its batch.
        Called once the server has confirmed every channel: redis-py's subscribe() only sends
        the command, and a read on another connection could be served before it."""
        self.schedules.poke()
        for channel in self.gateway.channels():
            self.gateway.wake(self.worker_id, channel)
        self.ledger.wake.set()
        for batch_id in {t.batch_id for t in self.ledger.running_of(None) if t.batch_id}:
            if self._canceled(batch_id):
                self._abort(batch_id, self.ledger.running_of(batch_id), "while unsubscribed")
        self.abort_marked(self.ledger.running_of(None), "while unsubscribed")

    def abort_marked(self, tasks: list[Task], when: str = "") -> None:
        """Abort those of ``tasks`` that cancel_task marked (read back from Redis)."""
        marked = self.gateway.cancel_marks([(t.id, t.token) for t in tasks if t.abort_reason is None])
        mine = [t for t in tasks if t.id in marked]
        if mine:
            self.aborts.abort(mine, "canceled")
            log.info("worker %s: task%s %s canceled%s, aborting", self.worker_id, "s" if len(mine) > 1 else "",
                     ", ".join(t.id for t in mine), f" {when}" if when else "")

    def _canceled(self, batch_id: str) -> bool:
        return self.gateway.batch_state(batch_id) == "canceled"

    def _abort(self, batch_id: str, mine: list[Task], when: str) -> None:
        self.aborts.abort(mine, "canceled")
        log.info("worker %s: batch %s canceled%s, aborting %d running tasks",
                 self.worker_id, batch_id, f" {when}" if when else "", len(mine))

    def handle(self, message: str, channel: str = "") -> None:
        """One message from ``channel`` (one of Gateway.channels(): with shards, each has its own)."""
        if message.startswith("c:"):
            batch_id, _, key = message[2:].partition(":")
            mine = self.ledger.running_of(batch_id)
            if not mine:
                return                # nothing of that batch runs here
            keyed = bool(key) and any(hmac.compare_digest(cancel_key(t.ctx) or "", key) for t in mine)
            if keyed or self._canceled(batch_id):       # a message without the key is verified
                self._abort(batch_id, mine, "")
        elif message.startswith("x:"):
            task_id = message[2:]
            task = self.ledger.running.get(task_id)
            if task is None:
                self.ledger.heard_cancel(task_id)       # its fetch reply may still be on the way
                task = self.ledger.running.get(task_id)     # ... or was admitted meanwhile
            if task is not None:
                self.abort_marked([task])
        elif message == "pr":
            if self.gateway.is_paused_for_requeue():    # a forged "pr" during a plain pause: nothing
                n = self.aborts.abort_batch(None, "requeue")
                log.info("worker %s: paused with requeue, handing back %d running tasks", self.worker_id, n)
        else:
            if message in ("s", "r"):     # schedules changed / resumed: re-read the next tick
                self.schedules.poke()
            self.gateway.wake(self.worker_id, channel)
            self.ledger.wake.set()


class Frames:
    """Incremental parser of the RESP frames a subscribed connection receives: arrays (``*``
    in RESP2, ``>`` for RESP3 pushes) of bulk strings and integers."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes | memoryview) -> list[list[bytes | int]]:
        self.buf += data
        out = []
        while True:
            parsed = self._frame(0)
            if parsed is None:
                return out
            frame, end = parsed
            del self.buf[:end]
            out.append(frame)

    def _line(self, pos: int) -> tuple[bytes, int] | None:
        end = self.buf.find(b"\r\n", pos)
        return None if end < 0 else (bytes(self.buf[pos:end]), end + 2)

    def _frame(self, pos: int) -> tuple[Any, int] | None:
        line = self._line(pos)
        if line is None:
            return None
        head, pos = line
        kind, rest = head[:1], head[1:]
        if kind in (b"*", b">"):
            items = []
            for _ in range(int(rest)):
                item = self._frame(pos)
                if item is None:
                    return None
                value, pos = item
                items.append(value)
            return items, pos
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None, pos
            if len(self.buf) < pos + size + 2:
                return None
            return bytes(self.buf[pos:pos + size]), pos + size + 2
        if kind == b":":
            return int(rest), pos
        if kind in (b"+", b"-"):
            return rest, pos
        raise ConnectionError(f"unexpected reply on the pub/sub connection: {head[:40]!r}")
