"""`io_tcp`: generic framed TCP I/O, server or client.

Ports: `out` carries frames read from peers (meta `conn.id`, `peer.ip`, `peer.port`,
`flux.source`); `in` takes messages to write: to the connection named by `meta.conn.id`
(never re-routed if it is gone: error `conn_gone`), or, without an id, to the only peer (a
client's link, or a server's single connection; several → error `ambiguous_connection`;
none → buffered up to `max_buffered_messages`, oldest dropped and counted).

Framing is the sans-IO framer family of `fluxrig.framing`; a frame above
`max_frame_bytes` or a malformed prefix closes that connection with a logged reason.
Control: `conn.close {conn_id, reason}` on the control subject named after the gear.
"""

from __future__ import annotations

import socket

from ..durations import parse_duration
from ..errors import FluxError
from ..framing.config import STREAM_FRAMINGS, framing_schema, make_framer
from ..msg import FluxMsg
from ..net.tcp import TcpEndpoint, parse_hostport
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register

DUR = {"type": "string", "format": "duration"}

FRAMING_PROPERTIES = framing_schema(STREAM_FRAMINGS)

SCHEMA = {
    "type": "object",
    "properties": {
        "mode": {"type": "string", "enum": ["server", "client"], "description": "listen or dial"},
        "bind": {"type": "string", "default": ":9000", "description": "server: host:port to listen on"},
        "connect": {"type": "string", "description": "client: host:port to dial"},
        **FRAMING_PROPERTIES,
        "max_connections": {"type": "integer", "minimum": 0, "default": 4096, "description": "server; 0 = unlimited"},
        "idle_timeout": {**DUR, "default": "0s", "description": "close a connection silent this long; 0s = never"},
        "read_timeout": {**DUR, "default": "0s", "description": "close when a started frame is not finished in time"},
        "write_timeout": {**DUR, "default": "5s", "description": "close a peer that stops reading for this long"},
        "connect_timeout": {**DUR, "default": "5s", "description": "client dial timeout"},
        "reconnect_wait": {**DUR, "default": "1s", "description": "client: first redial delay (doubles)"},
        "reconnect_max": {**DUR, "default": "30s", "description": "client: longest redial delay"},
        "max_buffered_messages": {"type": "integer", "minimum": 0, "default": 1000,
                                  "description": "outbound messages held while no peer is connected"},
        "read_responses": {"type": "boolean", "default": True, "description": "client: emit what the peer sends"},
    },
    "required": ["mode"],
    "additionalProperties": False,
}


def inherit_listener(old, new):
    """A duplicate of `old`'s listening socket if `new` listens on the same address, else None."""
    ep = getattr(old, "endpoint", None)
    if not isinstance(ep, TcpEndpoint) or old.MANIFEST.type != new.MANIFEST.type:
        return None
    if not (old.config.get("mode") == new.config.get("mode") == "server"):
        return None
    if old.config.get("bind") != new.config.get("bind"):
        return None
    sock = ep.listen_socket
    if sock is None:
        return None
    return socket.fromfd(sock.fileno(), sock.family, sock.type)


def endpoint_problems(config: dict):
    """Shared checks of mode/bind/connect for the TCP I/O gears."""
    mode = config.get("mode")
    if mode == "client" and not config.get("connect"):
        yield "connect", "mode=client needs connect (host:port)"
    addr = config.get("bind") if mode == "server" else config.get("connect")
    if isinstance(addr, str) and addr:
        try:
            parse_hostport(addr)
        except ValueError as exc:
            yield ("bind" if mode == "server" else "connect"), str(exc)


@register
class IoTcpGear(Gear):
    MANIFEST = Manifest(
        "io_tcp",
        "Framed TCP server or client; replies routed by conn.id",
        category="io",
        schema=SCHEMA,
        terminus="io",
    )

    @staticmethod
    def validate_config(config: dict):
        yield from endpoint_problems(config)
        try:
            make_framer(config)
        except (FluxError, ValueError, TypeError) as exc:
            yield "framing", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        c = config
        self._framer_cfg = dict(c)
        self._read = c["read_responses"] or c["mode"] == "server"
        self.endpoint = TcpEndpoint(
            name=name,
            mode=c["mode"],
            address=c["bind"] if c["mode"] == "server" else c["connect"],
            framer_factory=lambda: make_framer(self._framer_cfg),
            on_frame=self._on_frame,
            log=self.log,
            control=ctx.control,
            source_label=f"io_tcp_{c['mode']}",
            max_connections=c["max_connections"],
            idle_timeout=parse_duration(c["idle_timeout"]),
            read_timeout=parse_duration(c["read_timeout"]),
            write_timeout=parse_duration(c["write_timeout"]),
            connect_timeout=parse_duration(c["connect_timeout"]),
            reconnect_wait=parse_duration(c["reconnect_wait"]),
            reconnect_max=parse_duration(c["reconnect_max"]),
            max_buffered=c["max_buffered_messages"],
        )
        self._encoder = make_framer(self._framer_cfg)
        self._unsub = None
        self._inherited_sock = None

    def handover_from(self, old) -> None:
        """Keep listening through a reload: take a duplicate of the running server's socket
        when the bind address is unchanged (the old gear closes only its own descriptor)."""
        self._inherited_sock = inherit_listener(old, self)

    async def _on_frame(self, conn, frame: bytes) -> None:
        if not self._read:
            return
        msg = FluxMsg(raw=frame, meta=dict(conn.meta))
        await self.emit("out", msg)

    async def start(self) -> None:
        self._unsub = self.ctx.control.subscribe(self.name, self._on_control, replay_last=False)
        await self.endpoint.start(sock=self._inherited_sock)
        self._inherited_sock = None

    def _on_control(self, cmd: dict) -> None:
        if cmd.get("cmd") == "conn.close":
            args = cmd.get("args") or {}
            self.endpoint.close_connection(str(args.get("conn_id", "")), f"kill switch: {args.get('reason', 'conn.close')}")

    async def process(self, port: str, msg: FluxMsg) -> None:
        await self.endpoint.send(self._encoder.encode(msg.raw), msg.meta.get("conn.id"))

    async def drain(self, deadline: float) -> None:
        await self.endpoint.drain(deadline)

    async def stop(self) -> None:
        if self._unsub:
            self._unsub()
        await self.endpoint.stop()

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.endpoint.metrics())
        return m
