"""`io_serial`: framed serial I/O (RS-232 / RS-485 / USB adapters / pyserial URLs).

Ports: `out` carries frames read from the device (meta `serial.port`, `flux.source=io_serial`,
`conn.id`: one per open of the device, `conn.gear`); `in` takes messages whose `raw` is written
as one frame. A serial gear has one link, so `conn.id` on `in` is ignored (a reply from a TCP
client reaches the device whatever its id). `error` gets malformed input (`crc_mismatch`,
`bad_frame`, `frame_too_large`, `bad_length_prefix`, `truncated_frame`) and writes that could
not be made (`device_down`, `queue_overflow`, `write_timeout`, `encode_error`).

I/O (fluxrig.net.serial_port): a local device is read through `loop.add_reader` on its file
descriptor (O_NONBLOCK, no thread); a pyserial URL (rfc2217://, socket://, loop://) through a
bounded executor of 2 threads per gear. Framing is the shared framer family (`make_framer`),
plus serial resynchronisation (fluxrig.net.serial_ingress): a bad CRC or bad frame goes to
`error` and later frames are kept; an oversize frame goes to `error`, the framer is reset and
input is skipped to the next frame boundary (a serial line cannot be closed like a socket).

The device comes and goes (fluxrig.net.serial_endpoint supervises it): it is opened in the
background (start never fails because the device is absent), lost on a read/write OSError, a
hang-up or its node vanishing (checked every `device_check_interval`), and reopened with
backoff from `reconnect_wait` to `reconnect_max`. Each open publishes `conn.up`, each loss
`conn.down` on `link.<gear>`; a first failed open publishes `conn.down` too. The kill switch
`conn.close` (subject `<gear>`) closes the port; it is reopened after `reconnect_wait` with a
new conn.id. Writes while down: `on_down: error` sends them to `error` (reason device_down);
`on_down: queue` keeps up to `max_queued` (oldest dropped, counted, and sent to `error` as
queue_overflow) and writes them in order on the next open. Egress: `write_timeout` (a device
that takes no byte for that long: error, output discarded); a silence of `inter_frame_delay`
(and, for idle_gap / modbus_rtu, the framing gap) between frames, measured from when the
previous frame has left the wire at the line's speed.

Reload (issue 18): an unchanged io_serial is kept as it is. A rebuilt one on the same device
with the same line settings (port, baudrate, bytesize, parity, stopbits, flow control, rs485,
exclusive) takes the open device over when the old version retires: the same descriptor and
conn.id, never closed, reading never paused, so no byte the device sends meanwhile is lost;
the half-read frame carries over too when the framing keys are unchanged (a changed
inter_frame_delay, write_timeout, on_down... applies from the next frame). A changed line
setting cannot apply to an open port here, so the old version closes it and the new one
reopens it (bytes sent in that window are lost); the reload report says which happened and
why (`handover`: {"device": "handover" | "reopen", "reason": ...}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from ..durations import parse_duration
from ..errors import FluxError, GearError
from ..framing.config import FRAMINGS, framing_schema, make_framer
from ..framing.errors import EncodeError
from ..msg import FluxMsg
from ..net.serial_endpoint import INBOX_HIGH, INBOX_LOW, SerialEndpoint
from ..net.serial_ingress import Fault, Ingress
from ..net.serial_port import SerialLink, SerialSettings, is_url, url_problem
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..wire.meta import CONN_CLOSE

__all__ = ["IoSerialGear", "INBOX_HIGH", "INBOX_LOW", "MAX_BAUDRATE", "SCHEMA", "HANDOVER_SLACK"]

#: Seconds beyond the Rack's drain + cleanup timeouts a reloaded gear waits for its old version
#: to let go of the device before opening it anyway.
HANDOVER_SLACK = 5.0

MAX_BAUDRATE = 12_000_000  # FTDI high-speed parts; anything above is a typo
PARITIES = {"N": "none", "E": "even", "O": "odd", "M": "mark", "S": "space"}
#: Framings whose bytes may be 0x11 / 0x13, which XON/XOFF flow control swallows.
BINARY_FRAMINGS = (
    "modbus_rtu",
    "slip",
    "length_prefix",
    "length_prefix2",
    "length_prefix4",
    "len2_be",
    "len2_le",
    "len4_be",
    "bcd2",
)

DUR = {"type": "string", "format": "duration"}
_FRAMING = framing_schema(FRAMINGS)
# Let make_framer choose the limit per framing (1 MiB, or 256 for modbus_rtu).
_FRAMING["max_frame_bytes"] = {
    **_FRAMING["max_frame_bytes"],
    "default": None,
    "description": "Largest frame accepted (default 1 MiB; modbus_rtu 256). A larger "
    "one goes to error and input is skipped to the next frame boundary.",
}
_FRAMING["framing"]["description"] += (
    " Serial: idle_gap (a silence of idle_gap_chars character times ends a "
    "frame) and modbus_rtu (t3.5 gap plus CRC-16 check)."
)

RS485_SCHEMA = {
    "type": ["boolean", "object"],
    "default": False,
    "description": "RS-485 half duplex with the kernel toggling RTS (Linux TIOCSRS485; local devices only): "
    "true, or a map of rts_level_for_tx, rts_level_for_rx, loopback, delay_before_tx, "
    "delay_before_rx (seconds)",
    "properties": {
        "rts_level_for_tx": {"type": "boolean", "default": True},
        "rts_level_for_rx": {"type": "boolean", "default": False},
        "loopback": {"type": "boolean", "default": False},
        "delay_before_tx": {"type": "number", "minimum": 0},
        "delay_before_rx": {"type": "number", "minimum": 0},
    },
    "additionalProperties": False,
}

SCHEMA = {
    "type": "object",
    "properties": {
        "port": {
            "type": "string",
            "description": "device path (/dev/ttyUSB0, /dev/serial/by-id/...) or a "
            "pyserial URL (rfc2217://host:port, socket://host:port, loop://)",
        },
        "baudrate": {"type": "integer", "default": 9600, "description": "bits per second (9600, 19200, 115200, ...)"},
        "bytesize": {"type": "integer", "default": 8, "description": "data bits: 5, 6, 7 or 8"},
        "parity": {"type": "string", "default": "N", "description": "N (none), E (even), O (odd), M (mark), S (space)"},
        "stopbits": {"type": "number", "default": 1, "description": "1, 1.5 or 2"},
        "rtscts": {"type": "boolean", "default": False, "description": "hardware flow control (RTS/CTS)"},
        "xonxoff": {"type": "boolean", "default": False, "description": "software flow control (XON/XOFF; text only)"},
        "rs485": RS485_SCHEMA,
        "exclusive": {
            "type": "boolean",
            "default": True,
            "description": "lock the device (flock) so a second program cannot open it; local devices only",
        },
        **_FRAMING,
        "resync_gap_ms": {
            "type": "number",
            "default": None,
            "description": "after an oversize frame with a framing that has no boundary marker "
            "(length prefix, fixed): silence that restarts framing (default: 20 "
            "character times, at least 20 ms)",
        },
        "on_down": {
            "type": "string",
            "enum": ["error", "queue"],
            "default": "error",
            "description": "writes while the device is absent: error (to the error port, reason "
            "device_down) or queue (up to max_queued, written on reconnect)",
        },
        "max_queued": {
            "type": "integer",
            "minimum": 1,
            "default": 1000,
            "description": "on_down=queue: frames held; the oldest is dropped, counted and sent to error",
        },
        "write_timeout": {
            **DUR,
            "default": "5s",
            "description": "longest the device may take no byte of a frame (held off by CTS/XOFF, "
            "stuck); then error write_timeout and its output is discarded",
        },
        "inter_frame_delay": {**DUR, "default": "0s", "description": "silence between frames written (slow devices)"},
        "reconnect_wait": {**DUR, "default": "1s", "description": "first delay before reopening (doubles per failure)"},
        "reconnect_max": {**DUR, "default": "30s", "description": "longest delay between reopen attempts"},
        "open_timeout": {**DUR, "default": "10s", "description": "longest one open may take (network URLs)"},
        "device_check_interval": {
            **DUR,
            "default": "1s",
            "description": "how often the device node is checked to still exist; 0s = never",
        },
    },
    "required": ["port"],
    "additionalProperties": False,
}


def _rs485_settings(value) -> dict | None:
    if value is False or value is None:
        return None
    if value is True:
        return {}
    return dict(value)


@register
class IoSerialGear(Gear):
    # The gear only: config schema and checks, the endpoint's construction, frames to messages
    # (it is the endpoint's SerialSink), the kill switch, metrics. What happens to the device
    # (open, loss, reopen, pacing, queueing) is SerialEndpoint's job. No class docstring: the
    # manifest's doc is the module's (`__doc__` in a class body would be the class's own).
    MANIFEST = Manifest(
        "io_serial",
        "Framed serial port (device or pyserial URL); reconnects by itself",
        category="io",
        schema=SCHEMA,
        terminus="io",
        doc=__doc__,
    )
    SOURCE = "io_serial"

    @staticmethod
    def validate_config(config: dict):
        port = config.get("port")
        if not isinstance(port, str) or not port.strip():
            yield "port", "a device path (/dev/ttyUSB0) or a pyserial URL (rfc2217://host:4000) is required"
        elif is_url(port):
            problem = url_problem(port)
            if problem:
                yield "port", problem
            if config.get("rs485"):
                yield "rs485", f"RS-485 RTS toggling needs a local serial device; {port} is a pyserial URL"
        baud = config.get("baudrate")
        if isinstance(baud, int) and not isinstance(baud, bool) and not 1 <= baud <= MAX_BAUDRATE:
            yield (
                "baudrate",
                (
                    f"{baud} is not a usable baud rate: give bits per second between 1 and "
                    f"{MAX_BAUDRATE} (common: 9600, 19200, 38400, 57600, 115200)"
                ),
            )
        if config.get("bytesize") not in (5, 6, 7, 8):
            yield "bytesize", f"{config.get('bytesize')!r} data bits: use 5, 6, 7 or 8"
        parity = config.get("parity")
        if parity not in PARITIES:
            yield (
                "parity",
                (f"{parity!r} is not a parity letter: use N (none), E (even), O (odd), M (mark) or S (space)"),
            )
        stop = config.get("stopbits")
        if isinstance(stop, bool) or stop not in (1, 1.5, 2):
            yield "stopbits", f"{stop!r} stop bits: use 1, 1.5 or 2"
        if config.get("xonxoff") and config.get("framing") in BINARY_FRAMINGS:
            yield (
                "xonxoff",
                (
                    f"XON/XOFF removes bytes 0x11 and 0x13 from the data, which framing="
                    f"{config.get('framing')} carries: use rtscts or no flow control"
                ),
            )
        durations = {}
        for key in (
            "write_timeout",
            "inter_frame_delay",
            "reconnect_wait",
            "reconnect_max",
            "open_timeout",
            "device_check_interval",
        ):
            try:
                durations[key] = parse_duration(config.get(key))
            except ValueError:
                pass  # the schema check already says so
        for key in ("write_timeout", "reconnect_wait", "open_timeout"):
            if durations.get(key) == 0:
                yield key, "must be more than 0s"
        if durations.get("reconnect_max", 1) < durations.get("reconnect_wait", 0):
            yield "reconnect_max", "must not be shorter than reconnect_wait"
        gap = config.get("resync_gap_ms")
        if isinstance(gap, (int, float)) and not isinstance(gap, bool) and gap <= 0:
            yield "resync_gap_ms", "must be > 0"
        try:
            make_framer(config)
        except FluxError as exc:
            yield getattr(exc, "key", None) or "framing", str(exc).split(": ", 1)[-1]
        except (ValueError, TypeError) as exc:
            yield "framing", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        c = config
        settings = SerialSettings(
            c["port"],
            c["baudrate"],
            c["bytesize"],
            c["parity"],
            c["stopbits"],
            c["rtscts"],
            c["xonxoff"],
            _rs485_settings(c["rs485"]),
            c["exclusive"],
        )
        self._encoder = make_framer(c)
        gap = c.get("resync_gap_ms")
        ingress = Ingress(make_framer(c), c, settings.char_time, None if gap is None else gap / 1000.0)
        # Egress pacing: the framing gap of timed framings is part of the frame on the wire.
        framing_gap = self._encoder.gap if getattr(self._encoder, "timed", False) else 0.0
        self.endpoint = SerialEndpoint(
            name=name,
            settings=settings,
            ingress=ingress,
            sink=self,
            log=self.log,
            control=ctx.control,
            source_label=self.SOURCE,
            write_timeout=parse_duration(c["write_timeout"]),
            reconnect_wait=parse_duration(c["reconnect_wait"]),
            reconnect_max=parse_duration(c["reconnect_max"]),
            open_timeout=parse_duration(c["open_timeout"]),
            check_interval=parse_duration(c["device_check_interval"]),
            on_down=c["on_down"],
            max_queued=c["max_queued"],
            frame_gap=max(parse_duration(c["inter_frame_delay"]), framing_gap),
            # read here, not as defaults, so a test can lower them on this module
            inbox_high=INBOX_HIGH,
            inbox_low=INBOX_LOW,
        )
        self._unsub = None
        self._framing_key = {k: c.get(k) for k in (*_FRAMING, "resync_gap_ms")}
        self.handover: dict = {}  # what the last reload did with the device (the reload report)
        self._handover_plan: dict = {}

    # -- what tests and operators look at (the endpoint's state) --------------------------------
    @property
    def settings(self) -> SerialSettings:
        return self.endpoint.settings

    @property
    def link(self) -> SerialLink | None:
        return self.endpoint.link

    @property
    def conn_id(self) -> str:
        return self.endpoint.conn_id

    @property
    def down_reason(self) -> str:
        return self.endpoint.down_reason

    # -- lifecycle ---------------------------------------------------------------------------
    def handover_from(self, old) -> None:
        """Reload of the same device: the old gear hands its open link over when it retires
        (same line settings) or closes it before this one opens it (module docstring)."""
        if not isinstance(old, IoSerialGear):
            return
        if old.settings.port != self.settings.port:
            self._handover_plan = {"device": "reopen", "reason": "port changed"}
            return
        rc = self.ctx.rack_config
        wait = getattr(rc, "drain_timeout", 35.0) + getattr(rc, "cleanup_timeout", 2.0) + HANDOVER_SLACK
        changed = [
            f.name for f in fields(SerialSettings) if getattr(old.settings, f.name) != getattr(self.settings, f.name)
        ]
        keep_ingress = old._framing_key == self._framing_key
        self.endpoint.take_over(old.endpoint, wait, keep_link=not changed, keep_ingress=keep_ingress)
        if changed:
            self._handover_plan = {"device": "reopen", "reason": ", ".join(changed) + " changed"}
        else:
            self._handover_plan = {"device": "handover"}
            if not keep_ingress:
                self._handover_plan["reason"] = "framing changed: a half-read frame is flushed, not carried"

    async def start(self) -> None:
        self._unsub = self.ctx.control.subscribe(self.name, self._on_control, replay_last=False)
        self.handover, self._handover_plan = self._handover_plan, {}
        if self.handover.get("device") == "reopen":
            self.log.info("%s: reload: %s: the device is closed and reopened", self.name, self.handover["reason"])
        await self.endpoint.start()

    async def drain(self, deadline: float) -> None:
        await self.endpoint.drain(deadline)

    async def stop(self) -> None:
        if self._unsub:
            self._unsub()
            self._unsub = None
        await self.endpoint.stop()

    def _on_control(self, cmd: dict) -> None:
        if cmd.get("cmd") != CONN_CLOSE:
            return
        args = cmd.get("args") or {}
        self.endpoint.close_connection(str(args.get("conn_id") or ""), f"kill switch: {args.get('reason', CONN_CLOSE)}")

    # -- the endpoint's sink: frames and faults in, undelivered frames back -----------------------
    async def on_frame(self, meta: Mapping[str, str], frame: bytes) -> None:
        await self.emit("out", FluxMsg(raw=frame, meta=dict(meta)))

    async def on_fault(self, meta: Mapping[str, str], fault: Fault) -> None:
        await self.emit_error(FluxMsg(raw=fault.sample, meta={**meta, **fault.fields}), fault.reason, fault.detail)

    async def on_undelivered(self, tag: object, error: GearError) -> None:
        if isinstance(tag, FluxMsg):
            await self.emit_error(tag, error.reason, error.detail)

    # -- egress: in -> device ----------------------------------------------------------------------
    async def process(self, port: str, msg: FluxMsg) -> None:
        try:
            data = self._encoder.encode(msg.raw)
        except EncodeError as exc:
            raise GearError("encode_error", str(exc)) from None
        await self.endpoint.send(data, msg)  # its GearErrors (device_down, write_timeout) reach `error`

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.endpoint.metrics())
        return m
