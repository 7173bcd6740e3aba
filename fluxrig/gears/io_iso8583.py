"""`io_iso8583`: ISO 8583 over TCP, server (acquirer side) or client (host leg).

Framing presets follow jPOS channels: `len2_be` (NAC/Post), `len2_le`, `len4_be` (Raw),
`ascii4` (ASCIIChannel), `bcd2` (NCC), `vap` (2-byte length + 2 reserved bytes), each with
`includes_header` (the length counts its own bytes).

Headers: `header_type` tpdu (5 bytes) or fixed (`header_size` bytes) is split off every
frame; `header_mode` strip drops it, preserve keeps it in meta `iso8583.raw_header`
(`hex:`) and writes it back on the reply, mirror does the same but swaps a TPDU's source and
destination. A reply without a stored header is sent with none.

Every frame passes a quick MTI/bitmap sanity check (`heuristic_validation`): a server
disconnects a peer that sends garbage, a client drops the frame; both count and log it.
Timeouts: `idle_timeout` (no frame), `read_timeout` (a frame started but not finished),
`write_timeout` (peer not reading). Clients reconnect with backoff and publish
`conn.up`/`conn.down` on `link.<gear>`; replies are routed by `conn.id`.
"""

from __future__ import annotations

from ..errors import FluxError
from ..framing.config import ISO_PRESETS, make_framer
from ..iso8583.peek import ENCODINGS, TPDU_LENGTH, BadFrame, mirror_tpdu, peek, split_header
from ..msg import FluxMsg
from ..runtime.gear import Manifest
from ..runtime.registry import register
from .tcp_base import TcpGearBase, endpoint_problems, endpoint_schema

MAX_FRAME = 65535 + 4

SCHEMA = {
    "type": "object",
    "properties": {
        **endpoint_schema(bind=":8583", idle="15s", read="5s", write="2s", reconnect="1s"),
        "framing": {"type": "string", "enum": list(ISO_PRESETS), "default": "len2_be",
                    "description": "length header: len2_be (jPOS NAC/Post), len2_le, len4_be (Raw), "
                                   "ascii4 (ASCIIChannel), bcd2 (NCC), vap (length + 2 reserved bytes)"},
        "includes_header": {"type": "boolean", "default": False,
                            "description": "the length value counts the length header's own bytes"},
        "header_type": {"type": "string", "enum": ["none", "tpdu", "fixed"], "default": "none",
                        "description": "protocol header before the ISO message"},
        "header_size": {"type": "integer", "minimum": 1, "maximum": 64,
                        "description": "fixed header bytes (header_type=fixed); TPDU is 5"},
        "header_mode": {"type": "string", "enum": ["strip", "preserve", "mirror"], "default": "mirror",
                        "description": "strip: drop it; preserve: keep in meta and reuse on the reply; "
                                       "mirror: like preserve, TPDU source/destination swapped"},
        "encoding": {"type": "string", "enum": list(ENCODINGS), "default": "ascii",
                     "description": "MTI encoding, for the sanity check"},
        "heuristic_validation": {"type": "boolean", "default": True,
                                 "description": "check MTI and bitmap of every frame; garbage disconnects"},
        "max_frame_bytes": {"type": "integer", "minimum": 16, "maximum": 1 << 24, "default": MAX_FRAME,
                            "description": "larger frames close the connection"},
    },
    "required": ["mode"],
    "additionalProperties": False,
}


@register
class IoIso8583Gear(TcpGearBase):
    MANIFEST = Manifest(
        "io_iso8583",
        "ISO 8583 over TCP: jPOS-style length headers, TPDU/fixed headers, sanity check, reconnect",
        category="io",
        schema=SCHEMA,
        terminus="io",
    )
    SOURCE = "iso8583"

    @staticmethod
    def validate_config(config: dict):
        yield from endpoint_problems(config)
        if config.get("header_type") == "fixed" and not config.get("header_size"):
            yield "header_size", "header_type=fixed needs header_size"

    def __init__(self, name, config, ctx):
        self._framer_cfg = {
            "framing": config["framing"],
            "length_includes_header": config["includes_header"],
            "max_frame_bytes": config["max_frame_bytes"],
        }
        super().__init__(name, config, ctx)
        htype = config["header_type"]
        self._hsize = 0 if htype == "none" else TPDU_LENGTH if htype == "tpdu" else config["header_size"]
        self._keep_header = self._hsize and config["header_mode"] != "strip"
        self._swap = htype == "tpdu" and config["header_mode"] == "mirror"
        self._encoding = config["encoding"]
        self._check = config["heuristic_validation"]
        self._server = config["mode"] == "server"
        self._encoder = self.new_framer()
        self.bad_frames = 0

    def new_framer(self):
        try:
            return make_framer(self._framer_cfg)
        except (FluxError, ValueError) as exc:
            raise FluxError(f"{self.name}: bad framing: {exc}") from exc

    async def on_frame(self, conn, frame: bytes) -> None:
        meta = dict(conn.meta)
        try:
            if self._hsize:
                header, body = split_header(frame, self._hsize)
                if self._keep_header:
                    meta["iso8583.raw_header"] = "hex:" + header.hex()
            else:
                body = frame
            if self._check:
                mti, bitmaps = peek(body, self._encoding)
                meta["iso8583.mti"] = mti
                meta["iso8583.bitmaps"] = str(bitmaps)
        except BadFrame as exc:
            self.bad_frames += 1
            if self._server:
                conn.abort(f"not an ISO 8583 message ({exc})")
            else:
                self.log.warning("%s: dropping a frame from %s: %s", self.name, meta.get("peer.ip"), exc)
            return
        await self.emit("out", FluxMsg(raw=body, meta=meta))

    async def process(self, port: str, msg: FluxMsg) -> None:
        raw = msg.raw
        if self._keep_header:
            stored = msg.meta.get("iso8583.raw_header", "")
            if stored.startswith("hex:"):
                header = bytes.fromhex(stored[4:])
                raw = (mirror_tpdu(header) if self._swap else header) + raw
        await self.endpoint.send(self._encoder.encode(raw), msg.meta.get("conn.id"))

    def metrics(self) -> dict:
        m = super().metrics()
        m["bad_frames"] = self.bad_frames
        return m
