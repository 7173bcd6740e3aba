"""`io_tcp`: generic framed TCP I/O, server or client.

Ports: `out` carries frames read from peers (meta `conn.id`, `peer.ip`, `peer.port`,
`flux.source`); `in` takes messages to write: to the connection named by `meta.conn.id`
(never re-routed if it is gone: error `conn_gone`), or, without an id, to the only peer (a
client's link, or a server's single connection; several → error `ambiguous_connection`;
none → buffered up to `max_buffered_messages`, oldest dropped and counted).

Timeouts are finite by default: `idle_timeout` 5m (no complete frame), `read_timeout` 30s (a
frame started and not finished: slowloris), `write_timeout` 5s; `0s` turns one off.
A server also caps connections per source address (`max_connections_per_ip`, 64).

Framing is the sans-IO framer family of `fluxrig.framing`; a frame above
`max_frame_bytes` or a malformed prefix closes that connection with a logged reason.
Control: `conn.close {conn_id, reason}` on the control subject named after the gear.
TLS: a `tls` block (cert/key, ca, client_auth none|optional|required for mTLS, server_name for
the client's SNI and hostname check, min_version) encrypts the link; see fluxrig.net.tls.
Certificate files rewritten on disk apply to the next handshake, established connections keep
theirs. Without it the link is plain TCP (a server on a non-loopback address logs a warning).
Reload: `on_reload` handover (default: the rebuilt gear adopts the live connections; drain
where framing, tls or the address changed), drain (the old version serves its connections
until they close or `drain_timeout`) or reset (closed at once, counted); see tcp_base.
"""

from __future__ import annotations

from ..errors import FluxError
from ..framing.config import STREAM_FRAMINGS, framing_schema, make_framer
from ..msg import FluxMsg
from ..runtime.gear import Manifest
from ..runtime.registry import register
from ..wire import meta as M
from .tcp_base import TcpGearBase, endpoint_problems, endpoint_schema

__all__ = ["IoTcpGear"]

FRAMING_KEYS = tuple(framing_schema(STREAM_FRAMINGS))

SCHEMA = {
    "type": "object",
    "properties": {
        # Finite by default: a peer that connects and says nothing (idle) or trickles a frame
        # byte by byte (read, slowloris) is closed; set 0s to wait forever.
        **endpoint_schema(bind=":9000", idle="5m", read="30s", write="5s", reconnect="1s"),
        **framing_schema(STREAM_FRAMINGS),
        "read_responses": {"type": "boolean", "default": True, "description": "client: emit what the peer sends"},
    },
    "required": ["mode"],
    "additionalProperties": False,
}


@register
class IoTcpGear(TcpGearBase):
    MANIFEST = Manifest(
        "io_tcp",
        "Framed TCP server or client; replies routed by conn.id",
        category="io",
        schema=SCHEMA,
        terminus="io",
    )
    SOURCE = "io_tcp"

    @staticmethod
    def validate_config(config: dict):
        yield from endpoint_problems(config)
        try:
            make_framer(config)
        except (FluxError, ValueError, TypeError) as exc:
            yield "framing", str(exc)

    def __init__(self, name, config, ctx):
        self._framer_cfg = dict(config)
        super().__init__(name, config, ctx)
        self._read = config["read_responses"] or config["mode"] == "server"
        self._encoder = make_framer(self._framer_cfg)

    def new_framer(self):
        return make_framer(self._framer_cfg)

    def framing_key(self) -> object:
        # _framer_cfg is the whole config (timeouts too): only the framing keys decide
        return {k: self._framer_cfg.get(k) for k in FRAMING_KEYS}

    async def on_frame(self, conn, frame: bytes) -> None:
        if self._read:
            await self.emit("out", FluxMsg(raw=frame, meta=dict(conn.meta)))

    async def on_frames(self, conn, frames: list[bytes]) -> None:
        if not self._read:
            return
        meta = conn.meta
        if self.batches_on("out"):
            await self.emit_many("out", [FluxMsg(raw=frame, meta=dict(meta)) for frame in frames])
            return
        for frame in frames:
            await self.emit("out", FluxMsg(raw=frame, meta=dict(meta)))

    async def process(self, port: str, msg: FluxMsg) -> None:
        prev = self.predecessor_for(msg)
        if prev is not None:  # a connection the old version drains: written with its framing
            await prev.process(port, msg)
            return
        await self.endpoint.send(self._encoder.encode(msg.raw), msg.meta.get(M.CONN_ID))
