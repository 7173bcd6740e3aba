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

from ..errors import FluxError
from ..framing.config import STREAM_FRAMINGS, framing_schema, make_framer
from ..msg import FluxMsg
from ..runtime.gear import Manifest
from ..runtime.registry import register
from .tcp_base import TcpGearBase, endpoint_problems, endpoint_schema

SCHEMA = {
    "type": "object",
    "properties": {
        **endpoint_schema(bind=":9000", idle="0s", read="0s", write="5s", reconnect="1s"),
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

    async def on_frame(self, conn, frame: bytes) -> None:
        if self._read:
            await self.emit("out", FluxMsg(raw=frame, meta=dict(conn.meta)))

    async def process(self, port: str, msg: FluxMsg) -> None:
        await self.endpoint.send(self._encoder.encode(msg.raw), msg.meta.get("conn.id"))
