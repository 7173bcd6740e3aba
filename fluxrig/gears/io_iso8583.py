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
Timeouts (finite by default, 0s turns one off): `idle_timeout` 15s (no frame), `read_timeout`
5s (a frame started but not finished), `write_timeout` 2s (peer not reading); a server caps
connections per source address (`max_connections_per_ip`, 64). Clients reconnect with backoff and publish
`conn.up`/`conn.down` on `link.<gear>`; replies are routed by `conn.id`.
Network management (client legs, `network_management` block; fluxrig.iso8583.netmgmt): the
gear signs on every new connection (0800 DE 70=001) and announces `conn.up` only once the host
answers 0810 39=00 (until then nothing from the graph is written: it is buffered), sends an echo
test (DE 70=301) every `echo_interval`, closes the link (`conn.down`) after `echo_max_failures`
echoes in a row unanswered in `echo_timeout` or answered other than 00, redials and signs on
again, and signs off (DE 70=002) when it stops (not when a reload hands the link over). The
0810s answering its own 0800s never reach the graph; the host's own 0800s are answered 0810/00.
Every member of a Rack group runs this on its own legs, so a route's failover and round robin
(conductor) see each member's legs as signed on or not through their link events.
TLS: a `tls` block as for io_tcp (server and client, mTLS, SNI/hostname check, certificates
re-read from disk for new handshakes without dropping established ones): fluxrig.net.tls.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import ConfigError, FluxError, GearError
from ..framing.config import ISO_PRESETS, make_framer
from ..iso8583 import SpecError, load_spec
from ..iso8583.netmgmt import NETMGMT_SCHEMA, Down, LegNetMgmt, NetMgmtSettings, Send, Up
from ..iso8583.peek import ENCODINGS, TPDU_LENGTH, BadFrame, mirror_tpdu, peek, split_header
from ..msg import FluxMsg
from ..runtime.gear import Manifest
from ..runtime.registry import register
from ..wire import meta as M
from .codec_iso8583 import resolve_spec
from .tcp_base import TcpGearBase, endpoint_problems, endpoint_schema

__all__ = ["IoIso8583Gear"]

MAX_FRAME = 65535 + 4
NETMGMT_TICK_MAX = 0.25  # seconds between two looks at the echo schedule and timeouts
SIGN_OFF_WAIT_MAX = 1.0  # the longest a stopping leg waits for the answer to its sign-off

SCHEMA = {
    "type": "object",
    "properties": {
        **endpoint_schema(bind=":8583", idle="15s", read="5s", write="2s", reconnect="1s"),
        "framing": {
            "type": "string",
            "enum": list(ISO_PRESETS),
            "default": "len2_be",
            "description": "length header: len2_be (jPOS NAC/Post), len2_le, len4_be (Raw), "
            "ascii4 (ASCIIChannel), bcd2 (NCC), vap (length + 2 reserved bytes)",
        },
        "includes_header": {
            "type": "boolean",
            "default": False,
            "description": "the length value counts the length header's own bytes",
        },
        "header_type": {
            "type": "string",
            "enum": ["none", "tpdu", "fixed"],
            "default": "none",
            "description": "protocol header before the ISO message",
        },
        "header_size": {
            "type": "integer",
            "minimum": 1,
            "maximum": 64,
            "description": "fixed header bytes (header_type=fixed); TPDU is 5",
        },
        "header_mode": {
            "type": "string",
            "enum": ["strip", "preserve", "mirror"],
            "default": "mirror",
            "description": "strip: drop it; preserve: keep in meta and reuse on the reply; "
            "mirror: like preserve, TPDU source/destination swapped",
        },
        "encoding": {
            "type": "string",
            "enum": list(ENCODINGS),
            "default": "ascii",
            "description": "MTI encoding, for the sanity check",
        },
        "heuristic_validation": {
            "type": "boolean",
            "default": True,
            "description": "check MTI and bitmap of every frame; garbage disconnects",
        },
        "max_frame_bytes": {
            "type": "integer",
            "minimum": 16,
            "maximum": 1 << 24,
            "default": MAX_FRAME,
            "description": "larger frames close the connection",
        },
        "network_management": NETMGMT_SCHEMA,
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
        block = config.get("network_management")
        if block is None:
            return
        if config.get("mode") != "client":
            yield "network_management", "only a client leg (mode: client) signs on and sends echo tests"
            return
        try:
            settings = NetMgmtSettings.parse(block)
        except ConfigError as exc:
            yield exc.key or "network_management", str(exc).split(": ", 1)[-1]
            return
        if settings.spec.startswith("moov:"):
            try:
                LegNetMgmt(settings, load_spec(settings.spec)).connected(0.0)  # can it encode an 0800?
            except SpecError as exc:
                yield "network_management.spec", str(exc)
            except ConfigError as exc:
                yield "network_management.spec", str(exc).split(": ", 1)[-1]
        if config.get("header_type", "none") != "none" and not settings.header:
            yield "network_management.header", "the leg has a header_type: name the header bytes (hex) to send"

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
        self._nm: LegNetMgmt | None = None
        self._nm_conn = None  # the connection the state machine is about
        self._nm_task: asyncio.Task | None = None
        block = config.get("network_management")
        if block is not None and not self._server:
            settings = NetMgmtSettings.parse(block)
            try:
                spec = resolve_spec(settings.spec, ctx.scenario_dir)
            except (SpecError, OSError) as exc:
                raise GearError("bad_spec", f"{name}: network_management.spec {settings.spec!r}: {exc}") from exc
            self._nm = LegNetMgmt(settings, spec)
            self.endpoint.link_gate = True  # conn.up and traffic wait for the sign-on's 0810/00
            self.endpoint.on_connect = self._nm_connected

    def new_framer(self):
        try:
            return make_framer(self._framer_cfg)
        except (FluxError, ValueError) as exc:
            raise FluxError(f"{self.name}: bad framing: {exc}") from exc

    # -- network management (client legs) ---------------------------------------------------
    def _nm_connected(self, conn) -> None:
        loop = asyncio.get_running_loop()
        self._nm_conn = conn
        for act in self._nm.connected(loop.time()):
            if isinstance(act, Send):  # the first bytes on a fresh connection: nothing to wait for
                conn._write_now(self._encoder.encode(act.body))
            elif isinstance(act, Up):
                self.endpoint.open_link(conn)
        self.log.info("%s: connected as %s: signing on", self.name, conn.conn_id)

    async def _nm_act(self, conn, actions: list) -> None:
        for act in actions:
            if isinstance(act, Send):
                try:
                    await conn.write(self._encoder.encode(act.body))
                except GearError:
                    return  # the link is gone: the dial loop redials, the next connection signs on
            elif isinstance(act, Up):
                self.log.info("%s: signed on (%s): the leg carries traffic", self.name, conn.conn_id)
                self.endpoint.open_link(conn)
            elif isinstance(act, Down):
                self.log.warning("%s: closing the leg %s: %s; redialing", self.name, conn.conn_id, act.reason)
                conn.abort(act.reason)

    async def _nm_ticker(self) -> None:
        s = self._nm.s
        period = min(NETMGMT_TICK_MAX, s.echo_timeout / 4, (s.echo_interval or NETMGMT_TICK_MAX) / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.01, period))
            conn = self._nm_conn
            if conn is None or self.endpoint.handed_to is not None:
                continue
            if conn.closed or conn.ep is not self.endpoint:
                self._nm.lost()
                self._nm_conn = None
                continue
            acts = self._nm.tick(loop.time())
            if acts:
                await self._nm_act(conn, acts)

    async def _sign_off(self, deadline: float) -> None:
        conn, loop = self._nm_conn, asyncio.get_running_loop()
        if conn is None or conn.closed or conn.ep is not self.endpoint:
            return
        body = self._nm.sign_off(loop.time())
        if body is None:
            return
        try:
            await conn.write(self._encoder.encode(body))
        except GearError:
            return
        until = min(deadline, loop.time() + min(self._nm.s.echo_timeout, SIGN_OFF_WAIT_MAX))
        while self._nm.awaiting and not conn.closed and loop.time() < until:
            await asyncio.sleep(0.01)
        self.log.info("%s: signed off (%s)", self.name, "answered" if not self._nm.awaiting else "not answered")

    async def start(self) -> None:
        await super().start()
        if self._nm is None:
            return
        conn = self.endpoint._client_conn
        if conn is not None and not conn.closed:  # adopted through a reload
            self._nm_conn = conn
            if self.endpoint.opened is conn:
                self._nm.adopted(asyncio.get_running_loop().time())
            else:
                self._nm_connected(conn)
        self._nm_task = asyncio.get_running_loop().create_task(self._nm_ticker(), name=f"netmgmt:{self.name}")

    async def drain(self, deadline: float) -> None:
        if self._nm is not None and self.endpoint.handed_to is None and self._reset_for is None and not self.linger:
            await self._sign_off(deadline)
        await super().drain(deadline)

    async def stop(self) -> None:
        if self._nm_task is not None:
            self._nm_task.cancel()
            self._nm_task = None
        await super().stop()

    # -- frames ---------------------------------------------------------------------------------
    async def on_frame(self, conn, frame: bytes) -> None:
        meta = dict(conn.meta)
        try:
            if self._hsize:
                header, body = split_header(frame, self._hsize)
                if self._keep_header:
                    meta[M.ISO_RAW_HEADER] = "hex:" + header.hex()
            else:
                body = frame
            if self._check:
                mti, bitmaps = peek(body, self._encoding)
                meta[M.ISO_MTI] = mti
                meta[M.ISO_BITMAPS] = str(bitmaps)
            if self._nm is not None and conn is self._nm_conn:
                acts = self._nm.feed(body, asyncio.get_running_loop().time())
                if acts is not None:  # network management of ours: never reaches the graph
                    await self._nm_act(conn, acts)
                    return
        except BadFrame as exc:
            self.bad_frames += 1
            if self._server:
                conn.abort(f"not an ISO 8583 message ({exc})")
            else:
                self.endpoint.say(
                    logging.WARNING,
                    conn.conn_id,
                    "%s: dropping a frame from %s: %s",
                    self.name,
                    meta.get(M.PEER_IP),
                    exc,
                )
            return
        await self.emit("out", FluxMsg(raw=body, meta=meta))

    async def process(self, port: str, msg: FluxMsg) -> None:
        prev = self.predecessor_for(msg)
        if prev is not None:  # a connection the old version drains (on_reload): its framing
            await prev.process(port, msg)
            return
        raw = msg.raw
        if self._keep_header:
            stored = msg.meta.get(M.ISO_RAW_HEADER, "")
            if stored.startswith("hex:"):
                header = bytes.fromhex(stored[4:])
                raw = (mirror_tpdu(header) if self._swap else header) + raw
        await self.endpoint.send(self._encoder.encode(raw), msg.meta.get(M.CONN_ID))

    def metrics(self) -> dict:
        m = super().metrics()
        m["bad_frames"] = self.bad_frames
        if self._nm is not None:
            m.update(self._nm.metrics())
        return m
