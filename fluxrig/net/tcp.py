"""A framed TCP endpoint (server or client) shared by `io_tcp` and `io_iso8583`.

The endpoint is a thin asyncio adapter: bytes go into a sans-IO framer, complete frames go
to the gear's `on_frame(conn, frame)` coroutine, replies come back through `send()`.

Each connection owns one pump task. `data_received` only feeds the framer and queues
frames; the pump awaits `on_frame` for each, so the whole pipeline's backpressure reaches
the socket: past `INBOX_HIGH` queued frames the transport stops reading and the peer's TCP
window closes. A gear that gives `on_frames(conn, frames)` gets what is queued in batches of up
to `FRAME_BATCH_MAX` instead, in order: a guaranteed wire then makes a pipelining peer's frames
durable in one WAL commit, not one commit per frame. Replies written while the pump handles a
batch are corked into one write at the end of the batch (one syscall for many pipelined
replies).

Limits and timers: `max_connections` (excess connections closed at once and counted),
`max_connections_per_ip` (the same, per source address: one host cannot take every slot),
`max_frame_bytes` (enforced by the framer; the connection is closed with a logged reason),
`idle_timeout` (no complete frame for that long), `read_timeout` (a frame started but not
finished), `write_timeout` (a peer that stops reading), client reconnect with exponential
backoff from `reconnect_wait` to `reconnect_max`, `conn.up`/`conn.down` events on the
control subject `link.<gear>`. Log lines a peer can provoke (refusals, closes, losses) go
through a fluxrig.logs.LogLimiter: a few per connection and a bounded number per gear in each
window, then "N similar lines suppressed".

TLS (`tls`, a fluxrig.net.tls.TlsMaterial): a server listens with a context whose SNI callback
moves every handshake to the newest certificates, a client dials with the newest context and
the configured server name (SNI + hostname check); a failed handshake never reaches
`connection_made` (nothing is read from an unauthenticated peer) and a client retries it with
backoff like any dial failure, logged as a warning.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable

from ..errors import FluxError, FramingError, GearError
from ..ids import uuid7
from ..logs import LogLimiter
from ..wire import meta as M
from ..wire.messages import LinkEvent
from .addr import is_loopback

__all__ = ["TcpEndpoint", "Connection", "parse_hostport", "INBOX_HIGH", "INBOX_LOW", "FRAME_BATCH_MAX"]

INBOX_HIGH = 2048  # queued frames per connection before reading pauses
INBOX_LOW = 256  # ... and when it resumes
#: Frames handed to a gear's on_frames at once: bounds what a kill or a reload between two
#: batches still lets through, and the size of one WAL group commit per connection.
FRAME_BATCH_MAX = 64
MAX_BUFFERED_DEFAULT = 1000
MAX_PER_IP_DEFAULT = 64  # connections one source address may hold on a server
LOG_BURST_PER_CONN = 5  # log lines per connection per window ...
LOG_BURST_PER_GEAR = 50  # ... and per gear, before lines are only counted
LOG_WINDOW = 10.0


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

    def __init__(self, endpoint: TcpEndpoint):
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
        self.counted_ip: str | None = None  # the per-IP slot this connection holds

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
            M.CONN_ID: self.conn_id,
            M.PEER_IP: str(peer[0]),
            M.PEER_PORT: str(peer[1]),
            M.SOURCE: self.ep.source_label,
            M.CONN_GEAR: self.ep.name,  # where a kill switch for this connection is addressed
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
        try:
            while True:
                if inbox:
                    self._cork = cork = []
                    try:
                        while inbox:
                            # self.ep read per frame (batch): a reload may hand this connection
                            # to the rebuilt gear's endpoint (TcpEndpoint.adopt) between two.
                            ep = self.ep
                            if ep.on_frames is not None and len(inbox) > 1:
                                n = min(len(inbox), FRAME_BATCH_MAX)
                                await ep.on_frames(self, [inbox.popleft() for _ in range(n)])
                            else:
                                await ep.on_frame(self, inbox.popleft())
                    finally:
                        self._cork = None
                        if cork and not self.closed:
                            self._write_now(b"".join(cork))
                    if self.poisoned and not inbox:
                        # close (not abort) so the replies just written still reach the peer
                        self.ep.say(
                            logging.WARNING,
                            self.conn_id,
                            "%s: closing connection %s: %s",
                            self.ep.name,
                            self.conn_id,
                            self.poisoned,
                        )
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
            except TimeoutError:
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
            self.ep.say(
                logging.WARNING,
                self.conn_id,
                "%s: closing connection %s from %s:%s: %s",
                self.ep.name,
                self.conn_id,
                self.meta.get(M.PEER_IP),
                self.meta.get(M.PEER_PORT),
                reason,
            )
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
        on_frames: Callable[[Connection, list[bytes]], Awaitable[None]] | None = None,
        control=None,
        source_label: str = "io_tcp",
        max_connections: int = 4096,
        max_connections_per_ip: int = MAX_PER_IP_DEFAULT,
        idle_timeout: float = 0.0,
        read_timeout: float = 0.0,
        write_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 1.0,
        reconnect_max: float = 30.0,
        max_buffered: int = MAX_BUFFERED_DEFAULT,
        on_connect: Callable[[Connection], None] | None = None,
        tls=None,
    ):
        if mode not in ("server", "client"):
            raise FluxError(f"{name}: mode must be server or client, not {mode!r}")
        self.name = name
        self.mode = mode
        self.host, self.port = parse_hostport(address, "0.0.0.0" if mode == "server" else "127.0.0.1")
        self.framer_factory = framer_factory
        self.on_frame = on_frame
        self.on_frames = on_frames
        self.log = log
        self.control = control
        self.source_label = source_label
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.per_ip: dict[str, int] = {}
        self.limiter = LogLimiter(log, burst=LOG_BURST_PER_CONN, gear_burst=LOG_BURST_PER_GEAR, window=LOG_WINDOW)
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.reconnect_max = reconnect_max
        self.max_buffered = max_buffered
        self.on_connect = on_connect
        self.tls = tls
        self.connections: dict[str, Connection] = {}
        self.buffered: deque = deque()
        self.draining = False
        self.stopped = False
        self.server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._dialer: asyncio.Task | None = None
        self._client_conn: Connection | None = None
        self._client_lost: asyncio.Event | None = None
        self.handed_to: TcpEndpoint | None = None  # reload: who took our connections (adopt)
        self.adopted_from: TcpEndpoint | None = None  # ... and whom we took them from
        # reload: the rebuilt gear's endpoint; a connection our listener still accepts is its
        self.successor: TcpEndpoint | None = None
        # client: a gear that signs its leg on (io_iso8583 network_management) gates the link:
        # conn.up and the outbound traffic wait for open_link(); None = the link is not open
        self.link_gate = False
        self.opened: Connection | None = None
        self.counters = {
            "connections_adopted": 0,
            "connections_total": 0,
            "connections_rejected": 0,
            "connections_rejected_per_ip": 0,
            "framing_errors": 0,
            "idle_closed": 0,
            "buffered_dropped": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.mode == "server":
            extra = {}
            if self.tls is not None:
                extra = {"ssl": self.tls.server_context(), "ssl_handshake_timeout": self.tls.cfg.handshake_timeout}
            if sock is not None:
                self.server = await loop.create_server(lambda: Connection(self), sock=sock, **extra)
            else:
                self.server = await loop.create_server(
                    lambda: Connection(self), self.host or None, self.port, reuse_address=True, backlog=1024, **extra
                )
            bound = self.server.sockets[0].getsockname()
            self.port = bound[1]
            how = "TLS" if self.tls is not None else "plain TCP"
            self.log.info("%s: listening on %s:%d (%s)", self.name, bound[0], bound[1], how)
            if self.tls is None and not is_loopback(bound[0]):
                self.log.warning(
                    "%s: accepting plain TCP on %s:%d: traffic is unencrypted (add a tls block to encrypt it)",
                    self.name,
                    bound[0],
                    bound[1],
                )
        else:
            self._client_lost = asyncio.Event()
            self._dialer = loop.create_task(self._dial_loop(), name=f"tcp-dial:{self.name}")
            self._tasks.append(self._dialer)
        if self.idle_timeout or self.read_timeout:
            self._tasks.append(loop.create_task(self._sweep(), name=f"tcp-sweep:{self.name}"))

    @property
    def listen_socket(self) -> socket.socket | None:
        return self.server.sockets[0] if self.server and self.server.sockets else None

    def stop_accepting(self) -> None:
        """No new connection: the listener closes (a reload's successor holds a duplicate of
        it), a client does not redial; the open connections are read and served as before."""
        if self.server is not None:
            self.server.close()
        if self._dialer is not None:
            self._dialer.cancel()

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
        back = self.adopted_from
        if back is not None and back.handed_to is self and not back.stopped and not back.draining:
            # The swap that built us was rolled back: the gear still running takes its
            # connections back instead of losing them with us.
            back.handed_to = None
            back.adopt(self)
        handed, self.handed_to = self.handed_to, None
        # A connection our listener accepted just before it closed has its connection_made
        # still to come (queued by the loop, or after its TLS handshake): it goes to the
        # endpoint that took ours over, not to the floor.
        self.successor = handed
        if handed is not None:
            # no chain of retired endpoints through reloads: an adopted transport still holds
            # the asyncio server (and so this endpoint) that accepted it, but nothing after it
            handed.adopted_from = None
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
        if self.server is not None and handed is None:
            # (after a handover the old server still counts the adopted transports as its
            # own, and wait_closed would wait for them, i.e. for days)
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except (TimeoutError, Exception):
                pass

    # -- connections ---------------------------------------------------------------------------
    def say(self, level: int, key, msg: str, *args) -> None:
        """A log line a peer can provoke: rate-limited per `key` (connection) and per gear."""
        self.limiter.log_line(level, key, msg, *args)

    def _admit(self, conn: Connection) -> bool:
        nxt = self.successor
        if nxt is not None and not nxt.stopped:
            # accepted by our listener (its duplicate is the successor's) during a reload: the
            # rebuilt gear's connection, not one to close when we retire
            conn.ep = nxt
            return nxt._admit(conn)
        ip = conn.meta.get(M.PEER_IP, "")
        if self.stopped or (self.max_connections and len(self.connections) >= self.max_connections):
            self.counters["connections_rejected"] += 1
            self.say(
                logging.WARNING,
                None,
                "%s: refusing connection from %s: max_connections=%d reached",
                self.name,
                ip,
                self.max_connections,
            )
            conn.closed = True
            conn.transport.abort()
            return False
        if (
            self.mode == "server"
            and self.max_connections_per_ip
            and self.per_ip.get(ip, 0) >= self.max_connections_per_ip
        ):
            self.counters["connections_rejected_per_ip"] += 1
            self.say(
                logging.WARNING,
                ip,
                "%s: refusing connection from %s: max_connections_per_ip=%d reached",
                self.name,
                ip,
                self.max_connections_per_ip,
            )
            conn.closed = True
            conn.transport.abort()
            return False
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        conn.counted_ip = ip
        self.connections[conn.conn_id] = conn
        self.counters["connections_total"] += 1
        if self.mode == "server":  # the id an operator needs for `fluxrig admin conn close`
            self.say(
                logging.INFO,
                ip,
                "%s: connection %s from %s:%s",
                self.name,
                conn.conn_id,
                conn.meta.get(M.PEER_IP),
                conn.meta.get(M.PEER_PORT),
            )
        if self.mode == "client":
            self._client_conn = conn
        if self.on_connect is not None:
            self.on_connect(conn)
        if self.buffered and (self.mode == "client" or len(self.connections) == 1) and not self.link_gate:
            pending, self.buffered = self.buffered, deque()
            for data in pending:
                conn._write_now(data)
        return True

    def _forget(self, conn: Connection, exc) -> None:
        if self.connections.pop(conn.conn_id, None) is None:
            return
        ip = conn.counted_ip
        if ip is not None:
            left = self.per_ip.get(ip, 1) - 1
            if left > 0:
                self.per_ip[ip] = left
            else:
                self.per_ip.pop(ip, None)
        if self.mode == "client" and self._client_conn is conn:
            self._client_conn = None
            announced = self.opened is conn or not self.link_gate
            self.opened = None
            if announced:
                self._link(False, conn)
            if self._client_lost is not None:
                self._client_lost.set()
        if exc is not None and not conn.close_reason:
            self.say(logging.INFO, conn.conn_id, "%s: connection %s lost: %s", self.name, conn.conn_id, exc)

    def _link(self, up: bool, conn: Connection | None) -> None:
        if self.control is not None:
            event = LinkEvent(up, self.name, conn.conn_id if conn else "")
            self.control.publish(M.link_topic(self.name), event.to_dict())

    async def _dial_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.reconnect_wait
        while not self.stopped:
            held = self._client_conn
            if held is not None and not held.closed:
                # adopted through a reload (adopt): keep it until it drops, then redial
                self._client_lost.clear()
                await self._client_lost.wait()
                if not self.stopped:
                    await asyncio.sleep(self.reconnect_wait)
                continue
            extra = {}
            if self.tls is not None:
                extra = {
                    "ssl": self.tls.client_context(),
                    "server_hostname": self.tls.server_hostname(self.host),
                    "ssl_handshake_timeout": self.tls.cfg.handshake_timeout,
                }
            try:
                _t, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: Connection(self), self.host, self.port, **extra),
                    self.connect_timeout + (self.tls.cfg.handshake_timeout if self.tls is not None else 0),
                )
            except ssl.SSLError as exc:
                # A TLS failure is a configuration or identity problem, not a network blip.
                self.log.warning(
                    "%s: TLS handshake with %s:%d failed (%s); retrying in %.1fs",
                    self.name,
                    self.host,
                    self.port,
                    getattr(exc, "verify_message", None) or exc.reason or exc,
                    wait,
                )
                await asyncio.sleep(wait)
                wait = min(wait * 2, self.reconnect_max)
                continue
            except (TimeoutError, OSError) as exc:
                self.log.info(
                    "%s: cannot reach %s:%d (%s); retrying in %.1fs",
                    self.name,
                    self.host,
                    self.port,
                    exc or "timeout",
                    wait,
                )
                await asyncio.sleep(wait)
                wait = min(wait * 2, self.reconnect_max)
                continue
            if conn.closed:
                await asyncio.sleep(wait)
                continue
            wait = self.reconnect_wait
            self.log.info("%s: connected to %s:%d as %s", self.name, self.host, self.port, conn.conn_id)
            self._client_lost.clear()
            if not self.link_gate:
                self.open_link(conn)
            await self._client_lost.wait()
            if not self.stopped:
                await asyncio.sleep(self.reconnect_wait)

    def open_link(self, conn: Connection) -> None:
        """The client link is usable: conn.up, and what was buffered while it was not is written.
        Called at connect, or by a gating gear once the leg is signed on (link_gate)."""
        if conn.closed or conn is not self._client_conn or self.opened is conn:
            return
        self.opened = conn
        self._link(True, conn)
        if self.buffered:
            pending, self.buffered = self.buffered, deque()
            for data in pending:
                conn._write_now(data)

    async def _sweep(self) -> None:
        period = min(t for t in (self.idle_timeout, self.read_timeout) if t) / 4
        period = max(0.01, min(period, 1.0))
        while True:
            await asyncio.sleep(period)
            self.limiter.flush(self.name)
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
        if self.handed_to is not None:
            # A reply from the graph we were retired from: the successor owns the link now.
            await self.handed_to.send(data, conn_id)
            return
        if conn_id and (self.mode == "server" or conn_id in self.connections):
            # A client has one link: a conn.id from another gear's connection is not ours to
            # honour, so only a server (or a matching client id) routes strictly by it.
            conn = self.connections.get(conn_id)
            if conn is None:
                raise GearError("conn_gone", f"connection {conn_id} is not open on {self.name}")
            await conn.write(data)
            return
        if self.mode == "client":
            conn = self._client_conn if not self.link_gate or self.opened is self._client_conn else None
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
            self.say(
                logging.WARNING,
                None,
                "%s: outbound buffer full (%d); oldest message dropped",
                self.name,
                self.max_buffered,
            )
        self.buffered.append(data)

    # -- reload handover (fluxrig.gears.tcp_base) --------------------------------------------------
    def adopt(self, old: TcpEndpoint) -> int:
        """Take over `old`'s open connections: the same sockets, conn ids and framers (bytes of
        a half-read frame stay buffered, so the framing must be unchanged: the caller checks).
        From the next frame they go to this endpoint's gear, and this endpoint's timeouts and
        limits apply (a lower max_connections refuses new peers, it never cuts adopted ones).
        Replies `old` still sends (frames in flight in the graph it came from) are routed here.
        Returns how many connections were adopted."""
        moved = 0
        for conn in list(old.connections.values()):
            old.connections.pop(conn.conn_id, None)
            ip = conn.counted_ip
            if ip is not None:
                left = old.per_ip.get(ip, 1) - 1
                if left > 0:
                    old.per_ip[ip] = left
                else:
                    old.per_ip.pop(ip, None)
            if conn.closed:
                continue
            conn.ep = self
            self.connections[conn.conn_id] = conn
            if old._client_conn is conn:  # a client's link: ours now, no conn.down/conn.up
                old._client_conn = None
                self._client_conn = conn
                if old.opened is conn or not old.link_gate:
                    self.opened = conn  # open (signed on) with the old gear: open with us
                old.opened = None
            if ip is not None:
                self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            moved += 1
        if old.buffered:
            self.buffered.extend(old.buffered)
            old.buffered.clear()
        self.counters["connections_adopted"] += moved
        old.handed_to = self
        old.successor = self
        self.successor = None
        self.adopted_from = old
        return moved

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
        m["log_lines_suppressed"] = self.limiter.suppressed_total
        if self.tls is not None:
            m.update(self.tls.metrics())
        return m
