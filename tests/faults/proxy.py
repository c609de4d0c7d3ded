"""A small TCP proxy for fault-injection tests: put it between a worker (or producer) and a real
Redis server, then degrade the network on command.

It runs an asyncio event loop in a daemon thread; every knob is a plain method that is safe to
call from the test's thread:

* ``latency(seconds)``: delay every chunk by ``seconds`` in each direction (one way; a round trip
  gains twice that). Order is kept and throughput is not serialised: each chunk waits until its
  own arrival time plus the latency.
* ``drop()``: reset every open connection now (both sides, RST). New connections are accepted.
* ``hold(direction)``: half-open. Stop forwarding ``"up"`` (client -> server), ``"down"``
  (server -> client) or ``"both"`` without closing anything, on open and new connections alike.
  Held bytes are kept in order and delivered by ``heal()``, as TCP retransmission delivers
  them after a partition ends, even if the client has given up and closed its socket by then:
  its last requests still reach the server late.
* ``heal()``: forward again (and clear the latency).
* ``cut_reply(marker, min_reply=0)``: the next request containing ``marker`` whose reply is at
  least ``min_reply`` bytes is forwarded, and that reply is thrown away while both sides of the
  connection are reset: the server executed the command, the client never learns the outcome (a
  reply lost to a connection reset). Smaller replies pass and keep the cut armed.

``stats()`` counts connections, cuts and forwarded bytes; ``pending`` is the number of chunks
read but not yet delivered (held or delayed). The proxy listens on 127.0.0.1 on a free port
(``proxy.port``, ``proxy.url``).
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any

UP, DOWN = "up", "down"
CHUNK = 65536


class _Pipe:
    """One direction of one connection: chunks wait in order for their due time and for the
    direction to be open."""

    def __init__(self, proxy: Proxy, conn: _Conn, direction: str, writer: asyncio.StreamWriter) -> None:
        self.proxy, self.conn, self.direction, self.writer = proxy, conn, direction, writer
        self.queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if data:
                    self.proxy.pending += 1
                self.queue.put_nowait((time.monotonic(), data or None))
                if not data:
                    return
                if self.direction == UP and self.proxy._cut_marker is not None and self.proxy._cut_marker in data:
                    self.conn.cut_next_reply = True
        except (ConnectionError, OSError, asyncio.CancelledError):
            self.queue.put_nowait((time.monotonic(), None))

    async def pump_out(self) -> None:
        p = self.proxy
        data: bytes | None = None
        try:
            while True:
                arrived, data = await self.queue.get()
                while True:
                    due = arrived + p._latency
                    now = time.monotonic()
                    if now < due:
                        await asyncio.sleep(due - now)
                        continue
                    if self.direction in p._held:
                        await p._healed.wait()
                        continue
                    break
                if data is None:                       # the other side closed: pass it on
                    try:
                        if self.writer.can_write_eof():
                            self.writer.write_eof()
                    except (OSError, RuntimeError):
                        pass
                    return
                chunk, data = data, None
                p.pending -= 1
                if self.direction == DOWN and self.conn.cut_next_reply:
                    self.conn.cut_next_reply = False
                    if p._cut_marker is not None and len(chunk) >= p._cut_min:
                        p._cut_marker = None
                        p.cuts += 1
                        self.conn.reset()
                        return
                self.writer.write(chunk)
                p.forwarded[self.direction] += len(chunk)
                await self.writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            if data is not None:                        # taken from the queue, never delivered
                p.pending -= 1
            while not self.queue.empty():               # thrown away with the connection
                if self.queue.get_nowait()[1] is not None:
                    p.pending -= 1


class _Conn:
    def __init__(self, proxy: Proxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.client, self.server = client, server
        self.cut_next_reply = False
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        up = _Pipe(self.proxy, self, UP, self.server[1])
        down = _Pipe(self.proxy, self, DOWN, self.client[1])
        self.tasks = [asyncio.ensure_future(c) for c in (
            up.pump_in(self.client[0]), up.pump_out(), down.pump_in(self.server[0]), down.pump_out())]
        asyncio.ensure_future(self._finish())

    async def _finish(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.close()

    def reset(self) -> None:
        """Abort both sockets with RST (SO_LINGER 0), as a broken network path would."""
        for _, writer in (self.client, self.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            writer.transport.abort()
        for t in self.tasks:
            t.cancel()

    def close(self) -> None:
        for _, writer in (self.client, self.server):
            writer.transport.close()
        self.proxy._conns.discard(self)


class Proxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self._latency = 0.0
        self._held: set[str] = set()
        self._cut_marker: bytes | None = None
        self._cut_min = 0
        self.pending = 0
        self._conns: set[_Conn] = set()
        self.accepted = 0
        self.cuts = 0
        self.forwarded = {UP: 0, DOWN: 0}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._healed: asyncio.Event

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._healed = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.reset()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    # ------------------------------------------------------------------------------ knobs

    def latency(self, seconds: float) -> None:
        self._latency = float(seconds)

    def drop(self) -> int:
        """Reset every open connection; returns how many there were."""
        return self._call(self._drop())

    async def _drop(self) -> int:
        conns = list(self._conns)
        for c in conns:
            c.reset()
        return len(conns)

    def hold(self, direction: str = "both") -> None:
        if direction not in (UP, DOWN, "both"):
            raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}")
        self._call(self._hold({UP, DOWN} if direction == "both" else {direction}))

    async def _hold(self, directions: set[str]) -> None:
        self._held = set(directions)
        self._healed.clear()

    def heal(self) -> None:
        self._latency = 0.0
        self._call(self._heal())

    async def _heal(self) -> None:
        self._held = set()
        self._healed.set()

    def cut_reply(self, marker: bytes, min_reply: int = 0) -> None:
        self._cut_min = min_reply
        self._cut_marker = marker

    @property
    def armed(self) -> bool:
        return self._cut_marker is not None

    def stats(self) -> dict[str, Any]:
        return dict(accepted=self.accepted, open=len(self._conns), cuts=self.cuts, pending=self.pending,
                    **self.forwarded)

    # ---------------------------------------------------------------------------- private

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        conn = _Conn(self, (reader, writer), server)
        self._conns.add(conn)
        conn.start()
