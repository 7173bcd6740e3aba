"""What the TCP I/O gears (`io_tcp`, `io_iso8583`) share: endpoint config keys, the endpoint's
lifecycle, the `conn.close` kill switch, what a reload does with live connections, metrics.

Reload (issue 18). A rebuilt server gear on the same bind address takes a duplicate of the
listening socket (no connection attempt is refused). Its live connections then go one of three
ways, chosen per gear by `on_reload`, and `self.handover` says which and how many (the reload
report carries it):

* `handover` (the default): the new gear adopts them (same sockets and conn ids, a half-read
  frame carried over; the new timeouts and limits apply from the next frame). A client gear
  dialing the same address keeps its established link the same way. Where that is not safe (the
  framing, the TLS settings, the mode or the address changed: the old framer or session cannot
  serve the new config) the gear falls back to `drain` and the report names the reason.
* `drain` (the nginx way): the old version keeps its connections, reading and answering them
  under its old settings, until each closes or `drain_timeout` has passed; then it stops reading,
  answers what it has read and closes them. New connections go to the new gear at once. The
  swap does not wait for it (the runtime lets the old version linger, `Gear.linger`); replies
  the new graph produces for those connections are written by the old version (`predecessor`).
* `reset`: the old connections are closed at once when the old version retires, counted
  (`connections_reset_on_reload`) and logged. A rolled-back swap undoes drain and reset.

A subclass supplies `SOURCE` (the `flux.source` label), `new_framer()` and `on_frame(conn,
frame)`, and encodes egress in `process` (which first hands a reply for a connection the old
version still serves to it: `predecessor_for`).
"""

from __future__ import annotations

import asyncio
import socket

from ..durations import parse_duration
from ..errors import ConfigError, GearError
from ..net import tls as T
from ..net.tcp import TcpEndpoint, parse_hostport
from ..runtime.gear import Gear
from ..runtime.states import GearState
from ..wire import meta as M

__all__ = ["TcpGearBase", "endpoint_schema", "endpoint_problems", "DUR", "ON_RELOAD", "DRAIN_GRACE"]

DUR = {"type": "string", "format": "duration"}

#: What a rebuilt gear does with the live connections of the version it replaces.
ON_RELOAD = ("handover", "drain", "reset")
#: Seconds a draining old version has, once drain_timeout has passed, to answer what it read.
DRAIN_GRACE = 2.0


def endpoint_schema(*, bind: str, idle: str, read: str, write: str, reconnect: str) -> dict:
    """Schema properties of the connection keys, with the gear's own defaults."""
    return {
        "mode": {"type": "string", "enum": ["server", "client"], "description": "listen or dial"},
        "bind": {"type": "string", "default": bind, "description": "server: host:port to listen on"},
        "connect": {"type": "string", "description": "client: host:port to dial"},
        "max_connections": {
            "type": "integer",
            "minimum": 0,
            "default": 4096,
            "description": "server: excess connections are closed at once; 0 = unlimited",
        },
        "max_connections_per_ip": {
            "type": "integer",
            "minimum": 0,
            "default": 64,
            "description": "server: connections one source address may hold (excess closed at once); 0 = unlimited",
        },
        "idle_timeout": {
            **DUR,
            "default": idle,
            "description": "close a connection with no frame for this long; 0s = never",
        },
        "read_timeout": {
            **DUR,
            "default": read,
            "description": "close when a started frame is not complete in time; 0s = never",
        },
        "write_timeout": {**DUR, "default": write, "description": "close a peer that stops reading for this long"},
        "connect_timeout": {**DUR, "default": "5s", "description": "client: dial timeout"},
        "reconnect_wait": {
            **DUR,
            "default": reconnect,
            "description": "client: first redial delay (doubles each failure)",
        },
        "reconnect_max": {**DUR, "default": "30s", "description": "client: longest redial delay"},
        "tls": T.tls_schema(),
        "on_reload": {
            "type": "string",
            "enum": list(ON_RELOAD),
            "default": "handover",
            "description": "when a reload rebuilds this gear: handover (the new gear adopts the live "
            "connections; falls back to drain where the change cannot apply to them: framing, tls, "
            "address), drain (the old version serves its connections until they close or "
            "drain_timeout, new ones go to the new gear) or reset (closed at once, counted)",
        },
        "drain_timeout": {
            **DUR,
            "default": "30s",
            "description": "on_reload drain: longest the old version keeps serving its connections",
        },
        "max_buffered_messages": {
            "type": "integer",
            "minimum": 0,
            "default": 1000,
            "description": "outbound messages held while no peer is connected (oldest dropped)",
        },
    }


def endpoint_problems(config: dict):
    """Cross-key checks of mode/bind/connect/tls."""
    mode = config.get("mode")
    yield from T.problems(config.get("tls"), mode)
    if mode == "client" and not config.get("connect"):
        yield "connect", "mode=client needs connect (host:port)"
    key = "bind" if mode == "server" else "connect"
    addr = config.get(key)
    if isinstance(addr, str) and addr:
        try:
            parse_hostport(addr)
        except ValueError as exc:
            yield key, str(exc)


class TcpGearBase(Gear):
    SOURCE = "tcp"

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        c = config
        self.tls = None
        if c.get("tls") is not None:
            try:
                cfg = T.TlsConfig.parse(c["tls"], ctx.scenario_dir, c["mode"])
                self.tls = T.TlsMaterial(cfg, self.log, name)
            except ConfigError as exc:
                raise GearError("bad_tls", f"{name}: {exc}") from exc
        self.endpoint = TcpEndpoint(
            name=name,
            mode=c["mode"],
            address=c["bind"] if c["mode"] == "server" else c["connect"],
            framer_factory=self.new_framer,
            on_frame=self.on_frame,
            on_frames=self.on_frames,
            log=self.log,
            control=ctx.control,
            source_label=f"{self.SOURCE}_{c['mode']}" if self.SOURCE == "io_tcp" else self.SOURCE,
            max_connections=c["max_connections"],
            max_connections_per_ip=c.get("max_connections_per_ip", 64),
            idle_timeout=parse_duration(c["idle_timeout"]),
            read_timeout=parse_duration(c["read_timeout"]),
            write_timeout=parse_duration(c["write_timeout"]),
            connect_timeout=parse_duration(c["connect_timeout"]),
            reconnect_wait=parse_duration(c["reconnect_wait"]),
            reconnect_max=parse_duration(c["reconnect_max"]),
            max_buffered=c["max_buffered_messages"],
            tls=self.tls,
        )
        self._unsub = None
        self._inherited_sock: socket.socket | None = None
        self._adopt_from: TcpEndpoint | None = None
        self.on_reload = c.get("on_reload", "handover")
        self.drain_timeout = parse_duration(c.get("drain_timeout", "30s"))
        self.handover: dict = {}  # what the last reload handed this gear (for the reload report)
        # reload, drain or reset: the version this one replaces, and what it is to do on retiring
        self._retiring: tuple[TcpGearBase, str, str] | None = None
        self.predecessor: TcpGearBase | None = None  # drain: still serves its own connections
        self._successor: TcpGearBase | None = None  # whose predecessor we are (relinked at stop)
        self._reset_for: TcpGearBase | None = None  # on retiring, reset for this successor
        self.reset_on_reload = 0  # connections closed at once for this gear (on_reload: reset)

    def new_framer(self):
        raise NotImplementedError  # each TCP gear names its framing

    async def on_frame(self, conn, frame: bytes) -> None:
        raise NotImplementedError  # each TCP gear turns frames into messages its own way

    #: `async on_frames(conn, frames)`, for a gear that takes the frames of one read at once
    #: (fluxrig.net.tcp); None: one on_frame per frame.
    on_frames = None

    def framing_key(self) -> object:
        """What decides how bytes become frames: equal keys mean a connection's framer (and the
        half-read frame in it) carries over to the rebuilt gear unchanged."""
        return dict(self._framer_cfg)

    def _unsafe(self, old: TcpGearBase) -> str:
        """Why `old`'s live connections cannot be adopted by this gear ("" when they can)."""
        if old.config.get("mode") != self.config.get("mode"):
            return "mode changed"
        key = "connect" if self.config.get("mode") == "client" else "bind"
        if old.config.get(key) != self.config.get(key):
            return f"{key} changed"
        if old.framing_key() != self.framing_key():
            return "framing changed"
        if old.config.get("tls") != self.config.get("tls"):
            return "tls changed"
        return ""

    def handover_from(self, old) -> None:
        """Keep listening through a reload: take a duplicate of the running server's socket
        when the bind address is unchanged (the old gear then closes only its own descriptor).
        Then, per `on_reload` (module docstring): adopt its live connections at start
        (TcpEndpoint.adopt), or have it drain or reset them when it retires. Nothing is done
        to the running gear before start(), so a swap refused at build time changes nothing."""
        ep = getattr(old, "endpoint", None)
        if not isinstance(ep, TcpEndpoint) or old.MANIFEST.type != self.MANIFEST.type:
            return
        mode = self.config.get("mode")
        if (
            mode == "server"
            and old.config.get("mode") == mode
            and old.config.get("bind") == self.config.get("bind")
            and ep.listen_socket is not None
        ):
            sock = ep.listen_socket
            self._inherited_sock = socket.fromfd(sock.fileno(), sock.family, sock.type)
        unsafe = self._unsafe(old)
        if self.on_reload == "handover" and not unsafe:
            self._adopt_from = ep
            self._retiring = (old, "handover", "")
            return
        if self.on_reload == "reset":
            self._retiring = (old, "reset", "on_reload: reset")
        else:
            self._retiring = (old, "drain", "on_reload: drain" if self.on_reload == "drain" else unsafe)

    async def start(self) -> None:
        self._unsub = self.ctx.control.subscribe(self.name, self._on_control, replay_last=False)
        old, self._adopt_from = self._adopt_from, None
        if old is not None:  # before start: a client's dial loop then waits on the adopted link
            n = self.endpoint.adopt(old)
            self.handover = {"connections": "handover", "count": n}
            # an older version still draining serves on: its replies route through us now
            self.predecessor = self._retiring[0].predecessor
            if self.predecessor is not None:
                self.predecessor._successor = self
            if n:
                self.log.info("%s: reload: adopted %d open connections", self.name, n)
        elif self._retiring is not None:
            self._mark_retiring()
        await self.endpoint.start(sock=self._inherited_sock)
        self._inherited_sock = None

    def _mark_retiring(self) -> None:
        # At start, not in handover_from: a rolled-back swap stops this gear, and stop() unmarks.
        old, how, reason = self._retiring
        n = len(old.endpoint.connections)
        self.handover = {"connections": how, "count": n, "reason": reason}
        if how == "drain":
            old.linger = self.drain_timeout + DRAIN_GRACE
            self.predecessor, old._successor = old, self
            old.endpoint.successor = self.endpoint  # what its listener still accepts is ours
            if n:
                self.log.warning(
                    "%s: reload (%s): the old version keeps serving its %d open connections until they "
                    "close or drain_timeout=%gs; new connections come here",
                    self.name,
                    reason,
                    n,
                    self.drain_timeout,
                )
        else:
            old._reset_for = self
            if n:
                self.log.warning("%s: reload (%s): %d open connections will be closed at once", self.name, reason, n)

    def _unmark_retiring(self) -> None:
        old = self._retiring[0] if self._retiring is not None else None
        if old is not None and old.state is GearState.STARTED:  # our swap was rolled back
            old.linger = 0.0
            old._reset_for = None
            if old.endpoint.successor is self.endpoint:
                old.endpoint.successor = None
            if old._successor is self:
                old._successor = None
        succ = self._successor
        if succ is not None and succ.predecessor is self:  # an older draining version skips us
            succ.predecessor = self.predecessor
            if self.predecessor is not None:
                self.predecessor._successor = succ
        # no chain of old versions through reloads
        self.predecessor = self._successor = self._retiring = None

    def predecessor_for(self, msg) -> TcpGearBase | None:
        """The draining old version that serves the connection `msg` is addressed to, if any:
        its reply is written by it (with its framing), not refused as conn_gone here."""
        prev = self.predecessor
        if prev is None:
            return None
        conn_id = msg.meta.get(M.CONN_ID)
        if not conn_id or conn_id in self.endpoint.connections:
            return None
        while prev is not None:
            if conn_id in prev.endpoint.connections:
                return prev
            prev = prev.predecessor
        return None

    def _on_control(self, cmd: dict) -> None:
        if cmd.get("cmd") == M.CONN_CLOSE:
            args = cmd.get("args") or {}
            self.endpoint.close_connection(
                str(args.get("conn_id", "")), f"kill switch: {args.get('reason', 'conn.close')}"
            )

    async def drain(self, deadline: float) -> None:
        if self._reset_for is not None:
            conns = [c for c in self.endpoint.connections.values() if not c.closed]
            for conn in conns:
                conn.abort("reload: on_reload reset")
            self._reset_for.reset_on_reload += len(conns)
            if conns:
                self.log.warning("%s: reload: closed %d connections at once (on_reload: reset)", self.name, len(conns))
        elif self.linger:
            await self._serve_until_closed(deadline - DRAIN_GRACE)
            deadline = asyncio.get_running_loop().time() + DRAIN_GRACE
        await self.endpoint.drain(deadline)

    async def _serve_until_closed(self, until: float) -> None:
        """on_reload drain: no new connection (the listener closes, a client does not redial),
        the open ones served as before until they close or `until` (loop time)."""
        ep = self.endpoint
        ep.stop_accepting()
        loop = asyncio.get_running_loop()
        start, n = loop.time(), len(ep.connections)
        while any(not c.closed for c in ep.connections.values()) and loop.time() < until:
            await asyncio.sleep(0.02)
        left = sum(1 for c in ep.connections.values() if not c.closed)
        self.log.info(
            "%s (retired): drained after %.1fs: %d of %d connections closed by their peers, %d closed at drain_timeout",
            self.name,
            loop.time() - start,
            n - left,
            n,
            left,
        )

    async def stop(self) -> None:
        if self._unsub:
            self._unsub()
            self._unsub = None
        self._unmark_retiring()
        await self.endpoint.stop()

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.endpoint.metrics())
        m["connections_reset_on_reload"] = self.reset_on_reload
        prev = self.predecessor
        m["connections_draining"] = (
            len(prev.endpoint.connections) if prev is not None and prev.state is not GearState.STOPPED else 0
        )
        return m
