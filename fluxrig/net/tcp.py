"""A framed TCP endpoint (server or client) shared by `io_tcp` and `io_iso8583`.

The endpoint is a thin asyncio adapter: bytes go into a sans-IO framer, complete frames go
to the gear's `on_frame(conn, frame)` coroutine, replies come back through `send()`.

Each connection owns one pump task. `data_received` only feeds the framer and queues
frames; the pump awaits `on_frame` for each, so the whole pipeline's backpressure reaches
the socket: past `INBOX_HIGH` queued frames the transport stops reading and the peer's TCP
window closes. Replies written while the pump handles a batch are corked into one write at
the end of the batch (one syscall for many pipelined replies).

Limits and timers: `max_connections` (excess connections closed at once and counted),
`max_frame_bytes` (enforced by the framer; the connection is closed with a logged reason),
`idle_timeout` (no complete frame for that long), `read_timeout` (a frame started but not
finished), `write_timeout` (a peer that stops reading), client reconnect with exponential
backoff from `reconnect_wait` to `reconnect_max`, `conn.up`/`conn.down` events on the
control subject `link.<gear>`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from typing import Awaitable, Callable

from ..errors import FluxError, FramingError, GearError
from ..ids import uuid7

__all__ = ["TcpEndpoint", "Connection", "parse_hostport", "INBOX_HIGH", "INBOX_LOW"]

INBOX_HIGH = 2048  # queued frames per connection before reading pauses
INBOX_LOW = 256  # ... and when it resumes
MAX_BUFFERED_DEFAULT = 1000


def parse_hostport(text: str, default_host: str = "") -> tuple[str, int]:
    """'host:port', ':port' or '[v6]:port' -> (host, port); ValueError naming the text."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:9000 or :9000)")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port {p} in {text!r} is out of range")
    host = host.strip("[]") or default_host
    return host, p


class Connection(asyncio.Protocol):
    """One TCP connection: framer, inbound frame queue, pump task, corked writes."""

    def __init__(self, endpoint: "TcpEndpoint"):
        self.ep = endpoint
        self.conn_id = uuid7().hex()
        self.transport: asyncio.Transport | None = None
        self.framer = endpoint.framer_factory()
        self.inbox: deque = deque()
        self.meta: dict[str, str] = {}
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False
        self._write_resumed: asyncio.Future | None = None
        self._wakeup: asyncio.Future | None = None
        self._cork: list | None = None
        self.pump: asyncio.Task | None = None
        self.last_frame = time.monotonic()
        self.partial_since = 0.0
        self.close_reason = ""
        self.poisoned = ""  # set after a framing error: finish what was read, then close
        self.bytes_in = 0
        self.bytes_out = 0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername") or ("", 0)
        self.meta = {
            "conn.id": self.conn_id,
            "peer.ip": str(peer[0]),
            "peer.port": str(peer[1]),
            "flux.source": self.ep.source_label,
            "conn.gear": self.ep.name,  # where a kill switch for this connection is addressed
        }
        if not self.ep._admit(self):
            return
        self.pump = asyncio.get_running_loop().create_task(self._pump(), name=f"tcp:{self.ep.name}:{self.conn_id[-8:]}")

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            frames = self.framer.feed(data)
        except FramingError as exc:
            self.ep.counters["framing_errors"] += 1
            good = getattr(exc, "frames", None)
            if not good:
                self.abort(f"framing error: {exc}")
                return
            # Frames completed before the bad one are answered, then the connection closes.
            self.poisoned = f"framing error: {exc}"
            self.transport.pause_reading()
            self.reading_paused = True
            self.inbox.extend(good)
            self._wake()
            return
        if self.framer.buffered:
            if not self.partial_since:
                self.partial_since = time.monotonic()
        else:
            self.partial_since = 0.0
        if frames:
            self.last_frame = time.monotonic()
            self.inbox.extend(frames)
            self._wake()
            if len(self.inbox) >= INBOX_HIGH and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self):
        return False  # close our side too once the pump has drained what arrived

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._wake()
        r = self._write_resumed
        if r is not None and not r.done():
            r.set_result(None)
        self.ep._forget(self, exc)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        r = self._write_resumed
        if r is not None and not r.done():
            r.set_result(None)

    # -- the pump ----------------------------------------------------------------------------
    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        inbox = self.inbox
        on_frame = self.ep.on_frame
        try:
            while True:
                if inbox:
                    self._cork = cork = []
                    try:
                        while inbox:
                            await on_frame(self, inbox.popleft())
                    finally:
                        self._cork = None
                        if cork and not self.closed:
                            self._write_now(b"".join(cork))
                    if self.poisoned and not inbox:
                        # close (not abort) so the replies just written still reach the peer
                        self.ep.log.warning("%s: closing connection %s: %s", self.ep.name, self.conn_id, self.poisoned)
                        self.close(self.poisoned)
                        return
                    if self.reading_paused and len(inbox) <= INBOX_LOW and not self.closed and not self.ep.draining:
                        self.reading_paused = False
                        self.transport.resume_reading()
                    continue
                if self.closed:
                    return
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
        except asyncio.CancelledError:
            raise
        except Exception:
            self.ep.log.exception("connection %s: pump failed; closing", self.conn_id)
            self.abort("internal error in the pipeline")

    def idle(self) -> bool:
        """True when nothing read is waiting or being processed."""
        return not self.inbox and self._cork is None

    # -- writing -----------------------------------------------------------------------------
    def _write_now(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.transport.write(data)

    async def write(self, data: bytes) -> None:
        """Write one framed message; waits (≤ write_timeout) while the peer is not reading."""
        if self.closed:
            raise GearError("conn_gone", f"connection {self.conn_id} is closed")
        if self.writing_paused:
            self._write_resumed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._write_resumed, self.ep.write_timeout)
            except asyncio.TimeoutError:
                self.abort(f"write timeout: peer did not read for {self.ep.write_timeout:g}s")
                raise GearError("write_timeout", f"connection {self.conn_id} stopped reading") from None
            finally:
                self._write_resumed = None
            if self.closed:
                raise GearError("conn_gone", f"connection {self.conn_id} closed while writing")
        cork = self._cork
        if cork is not None:
            cork.append(data)
        else:
            self._write_now(data)

    def close(self, reason: str = "") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.close_reason = self.close_reason or reason
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Close at once (bad frame, timeout): the reason is logged once and frames already
        read from this peer are discarded, not processed."""
        self.inbox.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.close_reason = reason
            self.ep.log.warning("%s: closing connection %s from %s:%s: %s", self.ep.name, self.conn_id,
                                self.meta.get("peer.ip"), self.meta.get("peer.port"), reason)
            self.transport.abort()


class TcpEndpoint:
    """Server or client side of a framed TCP link, owned by one I/O gear."""

    def __init__(
        self,
        *,
        name: str,
        mode: str,
        address: str,
        framer_factory: Callable[[], object],
        on_frame: Callable[[Connection, bytes], Awaitable[None]],
        log: logging.Logger,
        control=None,
        source_label: str = "io_tcp",
        max_connections: int = 4096,
        idle_timeout: float = 0.0,
        read_timeout: float = 0.0,
        write_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 1.0,
        reconnect_max: float = 30.0,
        max_buffered: int = MAX_BUFFERED_DEFAULT,
        on_connect: Callable[[Connection], None] | None = None,
    ):
        if mode not in ("server", "client"):
            raise FluxError(f"{name}: mode must be server or client, not {mode!r}")
        self.name = name
        self.mode = mode
        self.host, self.port = parse_hostport(address, "0.0.0.0" if mode == "server" else "127.0.0.1")
        self.framer_factory = framer_factory
        self.on_frame = on_frame
        self.log = log
        self.control = control
        self.source_label = source_label
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.reconnect_max = reconnect_max
        self.max_buffered = max_buffered
        self.on_connect = on_connect
        self.connections: dict[str, Connection] = {}
        self.buffered: deque = deque()
        self.draining = False
        self.stopped = False
        self.server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._client_conn: Connection | None = None
        self._client_lost: asyncio.Event | None = None
        self.counters = {
            "connections_total": 0,
            "connections_rejected": 0,
            "framing_errors": 0,
            "idle_closed": 0,
            "buffered_dropped": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.mode == "server":
            if sock is not None:
                self.server = await loop.create_server(lambda: Connection(self), sock=sock)
            else:
                self.server = await loop.create_server(
                    lambda: Connection(self), self.host or None, self.port, reuse_address=True, backlog=1024
                )
            bound = self.server.sockets[0].getsockname()
            self.port = bound[1]
            self.log.info("%s: listening on %s:%d", self.name, bound[0], bound[1])
        else:
            self._client_lost = asyncio.Event()
            self._tasks.append(loop.create_task(self._dial_loop(), name=f"tcp-dial:{self.name}"))
        if self.idle_timeout or self.read_timeout:
            self._tasks.append(loop.create_task(self._sweep(), name=f"tcp-sweep:{self.name}"))

    @property
    def listen_socket(self) -> socket.socket | None:
        return self.server.sockets[0] if self.server and self.server.sockets else None

    async def drain(self, deadline: float) -> None:
        """Stop accepting and reading; finish processing frames already read."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections.values()):
            if conn.transport is not None and not conn.reading_paused and not conn.closed:
                conn.reading_paused = True
                conn.transport.pause_reading()
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and any(not c.idle() for c in self.connections.values() if not c.closed):
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.stopped = True
        if self.server is not None:
            self.server.close()
        for t in self._tasks:
            t.cancel()
        for conn in list(self.connections.values()):
            conn.close("stopping")
            if conn.pump is not None:
                conn.pump.cancel()
        self._tasks.clear()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):
                pass

    # -- connections ---------------------------------------------------------------------------
    def _admit(self, conn: Connection) -> bool:
        if self.stopped or (self.max_connections and len(self.connections) >= self.max_connections):
            self.counters["connections_rejected"] += 1
            self.log.warning("%s: refusing connection from %s: max_connections=%d reached", self.name,
                             conn.meta.get("peer.ip"), self.max_connections)
            conn.closed = True
            conn.transport.abort()
            return False
        self.connections[conn.conn_id] = conn
        self.counters["connections_total"] += 1
        if self.mode == "server":  # the id an operator needs for `fluxrig admin conn close`
            self.log.info("%s: connection %s from %s:%s", self.name, conn.conn_id, conn.meta.get("peer.ip"),
                          conn.meta.get("peer.port"))
        if self.mode == "client":
            self._client_conn = conn
        if self.on_connect is not None:
            self.on_connect(conn)
        if self.buffered and (self.mode == "client" or len(self.connections) == 1):
            pending, self.buffered = self.buffered, deque()
            for data in pending:
                conn._write_now(data)
        return True

    def _forget(self, conn: Connection, exc) -> None:
        if self.connections.pop(conn.conn_id, None) is None:
            return
        if self.mode == "client" and self._client_conn is conn:
            self._client_conn = None
            self._link("conn.down", conn)
            if self._client_lost is not None:
                self._client_lost.set()
        if exc is not None and not conn.close_reason:
            self.log.info("%s: connection %s lost: %s", self.name, conn.conn_id, exc)

    def _link(self, cmd: str, conn: Connection | None) -> None:
        if self.control is not None:
            self.control.publish(f"link.{self.name}", {"cmd": cmd, "args": {"conn_id": conn.conn_id if conn else ""}})

    async def _dial_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.reconnect_wait
        while not self.stopped:
            try:
                _t, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: Connection(self), self.host, self.port), self.connect_timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                self.log.info("%s: cannot reach %s:%d (%s); retrying in %.1fs", self.name, self.host, self.port,
                              exc or "timeout", wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, self.reconnect_max)
                continue
            if conn.closed:
                await asyncio.sleep(wait)
                continue
            wait = self.reconnect_wait
            self.log.info("%s: connected to %s:%d as %s", self.name, self.host, self.port, conn.conn_id)
            self._client_lost.clear()
            self._link("conn.up", conn)
            await self._client_lost.wait()
            if not self.stopped:
                await asyncio.sleep(self.reconnect_wait)

    async def _sweep(self) -> None:
        period = min(t for t in (self.idle_timeout, self.read_timeout) if t) / 4
        period = max(0.01, min(period, 1.0))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if conn.closed:
                    continue
                if self.read_timeout and conn.partial_since and now - conn.partial_since > self.read_timeout:
                    self.counters["idle_closed"] += 1
                    conn.abort(f"read timeout: frame incomplete for {self.read_timeout:g}s")
                elif self.idle_timeout and conn.idle() and now - conn.last_frame > self.idle_timeout:
                    self.counters["idle_closed"] += 1
                    conn.abort(f"idle for {self.idle_timeout:g}s")

    # -- egress ----------------------------------------------------------------------------------
    async def send(self, data: bytes, conn_id: str | None) -> None:
        """Write framed `data` to `conn_id`, or route it when no id is given.

        Raises GearError: conn_gone (the named connection is closed: never re-routed),
        ambiguous_connection (no id and several peers), not_connected (client down and
        buffering full).
        """
        if conn_id and (self.mode == "server" or conn_id in self.connections):
            # A client has one link: a conn.id from another gear's connection is not ours to
            # honour, so only a server (or a matching client id) routes strictly by it.
            conn = self.connections.get(conn_id)
            if conn is None:
                raise GearError("conn_gone", f"connection {conn_id} is not open on {self.name}")
            await conn.write(data)
            return
        if self.mode == "client":
            conn = self._client_conn
        else:
            n = len(self.connections)
            if n > 1:
                raise GearError("ambiguous_connection", f"{n} connections open and the message names no conn.id")
            conn = next(iter(self.connections.values())) if n else None
        if conn is not None and not conn.closed:
            await conn.write(data)
            return
        if not self.max_buffered:
            raise GearError("not_connected", f"{self.name} has no connection and buffering is off")
        if len(self.buffered) >= self.max_buffered:
            self.buffered.popleft()
            self.counters["buffered_dropped"] += 1
            self.log.warning("%s: outbound buffer full (%d); oldest message dropped", self.name, self.max_buffered)
        self.buffered.append(data)

    def close_connection(self, conn_id: str, reason: str) -> bool:
        conn = self.connections.get(conn_id)
        if conn is None:
            return False
        conn.abort(reason)
        return True

    def metrics(self) -> dict:
        m = dict(self.counters)
        m["connections_active"] = len(self.connections)
        m["bytes_in"] = sum(c.bytes_in for c in self.connections.values())
        m["bytes_out"] = sum(c.bytes_out for c in self.connections.values())
        m["buffered"] = len(self.buffered)
        return m
