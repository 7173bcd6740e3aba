"""What the TCP I/O gears (`io_tcp`, `io_iso8583`) share: endpoint config keys, the endpoint's
lifecycle, the `conn.close` kill switch, listener handover on reload, metrics.

A subclass supplies `SOURCE` (the `flux.source` label), `new_framer()` and `on_frame(conn,
frame)`, and encodes egress in `process`.
"""

from __future__ import annotations

import socket

from ..durations import parse_duration
from ..net.tcp import TcpEndpoint, parse_hostport
from ..runtime.gear import Gear

__all__ = ["TcpGearBase", "endpoint_schema", "endpoint_problems", "DUR"]

DUR = {"type": "string", "format": "duration"}


def endpoint_schema(*, bind: str, idle: str, read: str, write: str, reconnect: str) -> dict:
    """Schema properties of the connection keys, with the gear's own defaults."""
    return {
        "mode": {"type": "string", "enum": ["server", "client"], "description": "listen or dial"},
        "bind": {"type": "string", "default": bind, "description": "server: host:port to listen on"},
        "connect": {"type": "string", "description": "client: host:port to dial"},
        "max_connections": {"type": "integer", "minimum": 0, "default": 4096,
                            "description": "server: excess connections are closed at once; 0 = unlimited"},
        "idle_timeout": {**DUR, "default": idle, "description": "close a connection with no frame for this long; 0s = never"},
        "read_timeout": {**DUR, "default": read, "description": "close when a started frame is not complete in time; 0s = never"},
        "write_timeout": {**DUR, "default": write, "description": "close a peer that stops reading for this long"},
        "connect_timeout": {**DUR, "default": "5s", "description": "client: dial timeout"},
        "reconnect_wait": {**DUR, "default": reconnect, "description": "client: first redial delay (doubles each failure)"},
        "reconnect_max": {**DUR, "default": "30s", "description": "client: longest redial delay"},
        "max_buffered_messages": {"type": "integer", "minimum": 0, "default": 1000,
                                  "description": "outbound messages held while no peer is connected (oldest dropped)"},
    }


def endpoint_problems(config: dict):
    """Cross-key checks of mode/bind/connect."""
    mode = config.get("mode")
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
        self.endpoint = TcpEndpoint(
            name=name,
            mode=c["mode"],
            address=c["bind"] if c["mode"] == "server" else c["connect"],
            framer_factory=self.new_framer,
            on_frame=self.on_frame,
            log=self.log,
            control=ctx.control,
            source_label=f"{self.SOURCE}_{c['mode']}" if self.SOURCE == "io_tcp" else self.SOURCE,
            max_connections=c["max_connections"],
            idle_timeout=parse_duration(c["idle_timeout"]),
            read_timeout=parse_duration(c["read_timeout"]),
            write_timeout=parse_duration(c["write_timeout"]),
            connect_timeout=parse_duration(c["connect_timeout"]),
            reconnect_wait=parse_duration(c["reconnect_wait"]),
            reconnect_max=parse_duration(c["reconnect_max"]),
            max_buffered=c["max_buffered_messages"],
        )
        self._unsub = None
        self._inherited_sock: socket.socket | None = None

    def new_framer(self):
        raise NotImplementedError  # each TCP gear names its framing

    async def on_frame(self, conn, frame: bytes) -> None:
        raise NotImplementedError  # each TCP gear turns frames into messages its own way

    def handover_from(self, old) -> None:
        """Keep listening through a reload: take a duplicate of the running server's socket
        when the bind address is unchanged (the old gear then closes only its own descriptor)."""
        ep = getattr(old, "endpoint", None)
        if not isinstance(ep, TcpEndpoint) or old.MANIFEST.type != self.MANIFEST.type:
            return
        if not (old.config.get("mode") == self.config.get("mode") == "server"):
            return
        if old.config.get("bind") != self.config.get("bind") or ep.listen_socket is None:
            return
        sock = ep.listen_socket
        self._inherited_sock = socket.fromfd(sock.fileno(), sock.family, sock.type)

    async def start(self) -> None:
        self._unsub = self.ctx.control.subscribe(self.name, self._on_control, replay_last=False)
        await self.endpoint.start(sock=self._inherited_sock)
        self._inherited_sock = None

    def _on_control(self, cmd: dict) -> None:
        if cmd.get("cmd") == "conn.close":
            args = cmd.get("args") or {}
            self.endpoint.close_connection(str(args.get("conn_id", "")), f"kill switch: {args.get('reason', 'conn.close')}")

    async def drain(self, deadline: float) -> None:
        await self.endpoint.drain(deadline)

    async def stop(self) -> None:
        if self._unsub:
            self._unsub()
            self._unsub = None
        await self.endpoint.stop()

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.endpoint.metrics())
        return m
