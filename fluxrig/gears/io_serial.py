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

The device comes and goes: it is opened in the background (start never fails because the
device is absent), lost on a read/write OSError, a hang-up or its node vanishing (checked every
`device_check_interval`), and reopened with backoff from `reconnect_wait` to `reconnect_max`.
Each open publishes `conn.up`, each loss `conn.down` on `link.<gear>`; a first failed open
publishes `conn.down` too. The kill switch `conn.close` (subject `<gear>`) closes the port; it
is reopened after `reconnect_wait` with a new conn.id. Writes while down: `on_down: error` sends
them to `error` (reason device_down); `on_down: queue` keeps up to `max_queued` (oldest dropped,
counted, and sent to `error` as queue_overflow) and writes them in order on the next open.
Egress: `write_timeout` (a device that takes no byte for that long: error, output discarded);
a silence of `inter_frame_delay` (and, for idle_gap / modbus_rtu, the framing gap) between
frames, measured from when the previous frame has left the wire at the line's speed.

Reload: the device cannot be shared, so a reload that changes this gear's config closes the
port (the old gear drains and stops) before the new gear opens it; bytes the device sends in
that window are lost. An unchanged io_serial is kept open across reloads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import Counter, deque

import serial

from ..durations import parse_duration
from ..errors import FluxError, GearError, LaneFull
from ..framing.config import FRAMINGS, framing_schema, make_framer
from ..framing.errors import EncodeError
from ..ids import uuid7
from ..msg import FluxMsg
from ..net.serial_ingress import Fault, Ingress
from ..net.serial_port import (
    EXECUTOR_THREADS,
    LinkLost,
    SerialLink,
    SerialSettings,
    WriteTimeout,
    is_url,
    open_port,
    url_problem,
)
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register

__all__ = ["IoSerialGear", "INBOX_HIGH", "INBOX_LOW", "MAX_BAUDRATE"]

INBOX_HIGH = 2048  # frames read and not yet emitted before reading pauses
INBOX_LOW = 256  # ... and when it resumes
MAX_BAUDRATE = 12_000_000  # FTDI high-speed parts; anything above is a typo
STOP_WAIT = 1.0  # seconds stop() gives the link to close before cancelling it
PARITIES = {"N": "none", "E": "even", "O": "odd", "M": "mark", "S": "space"}
#: Framings whose bytes may be 0x11 / 0x13, which XON/XOFF flow control swallows.
BINARY_FRAMINGS = ("modbus_rtu", "slip", "length_prefix", "length_prefix2", "length_prefix4", "len2_be",
                   "len2_le", "len4_be", "bcd2")

DUR = {"type": "string", "format": "duration"}
_FRAMING = framing_schema(FRAMINGS)
# Let make_framer choose the limit per framing (1 MiB, or 256 for modbus_rtu).
_FRAMING["max_frame_bytes"] = {**_FRAMING["max_frame_bytes"], "default": None,
                               "description": "Largest frame accepted (default 1 MiB; modbus_rtu 256). A larger "
                                              "one goes to error and input is skipped to the next frame boundary."}
_FRAMING["framing"]["description"] += (" Serial: idle_gap (a silence of idle_gap_chars character times ends a "
                                       "frame) and modbus_rtu (t3.5 gap plus CRC-16 check).")

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
        "port": {"type": "string", "description": "device path (/dev/ttyUSB0, /dev/serial/by-id/...) or a "
                                                  "pyserial URL (rfc2217://host:port, socket://host:port, loop://)"},
        "baudrate": {"type": "integer", "default": 9600, "description": "bits per second (9600, 19200, 115200, ...)"},
        "bytesize": {"type": "integer", "default": 8, "description": "data bits: 5, 6, 7 or 8"},
        "parity": {"type": "string", "default": "N", "description": "N (none), E (even), O (odd), M (mark), S (space)"},
        "stopbits": {"type": "number", "default": 1, "description": "1, 1.5 or 2"},
        "rtscts": {"type": "boolean", "default": False, "description": "hardware flow control (RTS/CTS)"},
        "xonxoff": {"type": "boolean", "default": False, "description": "software flow control (XON/XOFF; text only)"},
        "rs485": RS485_SCHEMA,
        "exclusive": {"type": "boolean", "default": True,
                      "description": "lock the device (flock) so a second program cannot open it; local devices only"},
        **_FRAMING,
        "resync_gap_ms": {"type": "number", "default": None,
                          "description": "after an oversize frame with a framing that has no boundary marker "
                                         "(length prefix, fixed): silence that restarts framing (default: 20 "
                                         "character times, at least 20 ms)"},
        "on_down": {"type": "string", "enum": ["error", "queue"], "default": "error",
                    "description": "writes while the device is absent: error (to the error port, reason "
                                   "device_down) or queue (up to max_queued, written on reconnect)"},
        "max_queued": {"type": "integer", "minimum": 1, "default": 1000,
                       "description": "on_down=queue: frames held; the oldest is dropped, counted and sent to error"},
        "write_timeout": {**DUR, "default": "5s",
                          "description": "longest the device may take no byte of a frame (held off by CTS/XOFF, "
                                         "stuck); then error write_timeout and its output is discarded"},
        "inter_frame_delay": {**DUR, "default": "0s", "description": "silence between frames written (slow devices)"},
        "reconnect_wait": {**DUR, "default": "1s", "description": "first delay before reopening (doubles per failure)"},
        "reconnect_max": {**DUR, "default": "30s", "description": "longest delay between reopen attempts"},
        "open_timeout": {**DUR, "default": "10s", "description": "longest one open may take (network URLs)"},
        "device_check_interval": {**DUR, "default": "1s",
                                  "description": "how often the device node is checked to still exist; 0s = never"},
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
            yield "baudrate", (f"{baud} is not a usable baud rate: give bits per second between 1 and "
                               f"{MAX_BAUDRATE} (common: 9600, 19200, 38400, 57600, 115200)")
        if config.get("bytesize") not in (5, 6, 7, 8):
            yield "bytesize", f"{config.get('bytesize')!r} data bits: use 5, 6, 7 or 8"
        parity = config.get("parity")
        if parity not in PARITIES:
            yield "parity", (f"{parity!r} is not a parity letter: use N (none), E (even), O (odd), "
                             "M (mark) or S (space)")
        stop = config.get("stopbits")
        if isinstance(stop, bool) or stop not in (1, 1.5, 2):
            yield "stopbits", f"{stop!r} stop bits: use 1, 1.5 or 2"
        if config.get("xonxoff") and config.get("framing") in BINARY_FRAMINGS:
            yield "xonxoff", (f"XON/XOFF removes bytes 0x11 and 0x13 from the data, which framing="
                              f"{config.get('framing')} carries: use rtscts or no flow control")
        durations = {}
        for key in ("write_timeout", "inter_frame_delay", "reconnect_wait", "reconnect_max", "open_timeout",
                    "device_check_interval"):
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
        self.settings = SerialSettings(c["port"], c["baudrate"], c["bytesize"], c["parity"], c["stopbits"],
                                       c["rtscts"], c["xonxoff"], _rs485_settings(c["rs485"]), c["exclusive"])
        self.write_timeout = parse_duration(c["write_timeout"])
        self.reconnect_wait = parse_duration(c["reconnect_wait"])
        self.reconnect_max = parse_duration(c["reconnect_max"])
        self.open_timeout = parse_duration(c["open_timeout"])
        self.check_interval = parse_duration(c["device_check_interval"])
        self.on_down = c["on_down"]
        self.max_queued = c["max_queued"]
        self._encoder = make_framer(c)
        gap = c.get("resync_gap_ms")
        self.ingress = Ingress(make_framer(c), c, self.settings.char_time, None if gap is None else gap / 1000.0)
        # Egress pacing: the framing gap of timed framings is part of the frame on the wire.
        self._gap_out = max(parse_duration(c["inter_frame_delay"]), getattr(self._encoder, "gap", 0.0)
                            if getattr(self._encoder, "timed", False) else 0.0)
        self._next_write_at = 0.0
        self.link: SerialLink | None = None
        self.conn_id = ""
        self._meta: dict[str, str] = {}
        self._inbox: deque = deque()
        self._queue: deque = deque()  # (msg, encoded bytes) waiting for the device
        self._timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.Event | None = None
        self._gone: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._write_lock: asyncio.Lock | None = None
        self._pump_task: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._unsub = None
        self._draining = False
        self._stopping = False
        self._previous: IoSerialGear | None = None
        self._successor: IoSerialGear | None = None
        self.released = asyncio.Event()
        self.down_reason = "not opened yet"
        self._link_state = ""
        self.stats = Counter(bytes_in=0, bytes_out=0, frames_in=0, frames_out=0, opens=0, reconnects=0,
                             open_failures=0, read_pauses=0, write_timeouts=0, down_errors=0, queue_dropped=0, emit_dropped=0)
        self.fault_counts: Counter = Counter()

    # -- lifecycle ---------------------------------------------------------------------------
    def handover_from(self, old) -> None:
        """Reload: the old gear must close the device before this one opens it."""
        if isinstance(old, IoSerialGear) and old.settings.port == self.settings.port:
            self._previous = old
            old._successor = self

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._gone = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix=f"serial:{self.name}")
        self._unsub = self.ctx.control.subscribe(self.name, self._on_control, replay_last=False)
        self._pump_task = loop.create_task(self._pump(), name=f"serial-pump:{self.name}")
        self._supervisor = loop.create_task(self._supervise(), name=f"serial:{self.name}")

    async def drain(self, deadline: float) -> None:
        """Stop reading; emit what was read; write or report what waits for the device."""
        self._draining = True
        link = self.link
        if link is not None:
            link.pause()
        self._cancel_timer()
        self._push(self.ingress.close())
        loop = asyncio.get_running_loop()
        while self._inbox and loop.time() < deadline:
            await asyncio.sleep(0.005)
        if self._queue and self.link is not None:
            async with self._write_lock:
                await self._flush_queue(self.link)
        await self._hand_over_queue()

    async def stop(self) -> None:
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()
        if self._unsub:
            self._unsub()
            self._unsub = None
        self._cancel_timer()
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            if self._gone is not None:
                self._gone.set()
            try:  # let it close the link and say conn.down; the runtime allows 2 s per stop
                await asyncio.wait_for(asyncio.shield(supervisor), STOP_WAIT)
            except (asyncio.TimeoutError, Exception):
                supervisor.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
        link, self.link = self.link, None
        if link is not None:
            await link.close()
        if self._queue:
            self.log.warning("%s: stopped with %d frames still queued for %s; they are dropped", self.name,
                             len(self._queue), self.settings.port)
            self.stats["queue_dropped"] += len(self._queue)
            self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self.released.set()

    # -- the device: open, watch, lose, reopen --------------------------------------------------
    async def _supervise(self) -> None:
        prev = self._previous
        if prev is not None:
            rc = self.ctx.rack_config
            limit = getattr(rc, "drain_timeout", 35.0) + getattr(rc, "cleanup_timeout", 2.0) + 5.0
            try:  # a reload: wait for the retiring gear to let go of the device
                await asyncio.wait_for(prev.released.wait(), limit)
            except asyncio.TimeoutError:
                self.log.warning("%s: previous version still holds %s; opening anyway", self.name, self.settings.port)
            self._previous = None
        wait = self.reconnect_wait
        failing = False
        while not self._stopping:
            try:
                port = await self._open()
            except Exception as exc:
                self.stats["open_failures"] += 1
                permanent = isinstance(exc, (ValueError, NotImplementedError))
                reason = f"cannot open {self.settings.port}: {exc}"
                if permanent:  # the device or platform refuses a setting: no point hurrying
                    reason += " (a setting this device or platform does not support)"
                    wait = self.reconnect_max
                if not failing:
                    self.log.warning("%s: %s; retrying every %.1fs up to %.1fs", self.name, reason, wait,
                                     self.reconnect_max)
                    self.down_reason = reason
                    if self._link_state != "conn.down":  # a loss already said so
                        self._link_event("conn.down", "", reason)
                    failing = True
                else:
                    self.log.debug("%s: %s", self.name, reason)
                await self._sleep(wait)
                wait = min(wait * 2, self.reconnect_max)
                continue
            failing = False
            wait = self.reconnect_wait
            try:
                await self._run_link(port)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not leave the device closed for good
                self.log.exception("%s: the link to %s failed; reopening", self.name, self.settings.port)
            if not self._stopping:
                await self._sleep(self.reconnect_wait)

    async def _open(self):
        fut = self._executor.submit(open_port, self.settings, self.write_timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.open_timeout)
        except asyncio.TimeoutError:
            fut.add_done_callback(_close_late_open)
            raise TimeoutError(f"open took longer than open_timeout={self.open_timeout:g}s") from None
        except asyncio.CancelledError:
            fut.add_done_callback(_close_late_open)
            raise

    async def _run_link(self, port) -> None:
        self._gone.clear()
        link = SerialLink(port, self.settings, self._executor, self._on_data, self._on_lost)
        self.conn_id = uuid7().hex()
        self._meta = {"serial.port": self.settings.port, "flux.source": self.SOURCE, "conn.id": self.conn_id,
                      "conn.gear": self.name}
        self.ingress.reset()
        if self.stats["opens"]:
            self.stats["reconnects"] += 1
        self.stats["opens"] += 1
        self.link = link
        link.start()
        if self._draining:
            link.pause()
        self.log.info("%s: opened %s (%d %d%s%g, %s mode) as %s", self.name, self.settings.port,
                      self.settings.baudrate, self.settings.bytesize, self.settings.parity, self.settings.stopbits,
                      link.mode, self.conn_id)
        self._link_event("conn.up", self.conn_id, "")
        if self._queue:
            async with self._write_lock:
                await self._flush_queue(link)
        try:
            while not self._gone.is_set() and not self._stopping:
                try:
                    await asyncio.wait_for(self._gone.wait(), self.check_interval or None)
                except asyncio.TimeoutError:
                    reason = link.present()
                    if reason:
                        link.lose(reason)
        finally:
            reason = link.lost or ("stopping" if self._stopping else "closed")
            self.link = None
            self.down_reason = reason
            self._cancel_timer()
            self._push(self.ingress.close())
            self.stats["bytes_in"] += link.bytes_in
            self.stats["bytes_out"] += link.bytes_out
            await link.close()
            self._link_event("conn.down", self.conn_id, reason)
            if not self._stopping:
                self.log.warning("%s: %s lost (%s); reopening", self.name, self.settings.port, reason)

    def _on_lost(self, reason: str) -> None:
        self._gone.set()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _link_event(self, cmd: str, conn_id: str, reason: str) -> None:
        self._link_state = cmd
        args = {"conn_id": conn_id, "port": self.settings.port}
        if reason:
            args["reason"] = reason
        self.ctx.control.publish(f"link.{self.name}", {"cmd": cmd, "args": args})

    def _on_control(self, cmd: dict) -> None:
        if cmd.get("cmd") != "conn.close":
            return
        args = cmd.get("args") or {}
        link = self.link
        wanted = str(args.get("conn_id") or "")
        if link is not None and (not wanted or wanted == self.conn_id):
            link.lose(f"kill switch: {args.get('reason', 'conn.close')}")

    # -- ingress: bytes -> frames -> out / error -------------------------------------------------
    def _on_data(self, data: bytes, now: float) -> None:
        items = self.ingress.feed(data, now)
        if items:
            self._push(items)
        if self._timer is None and self.ingress.timed:
            self._arm_timer()

    def _push(self, items: list) -> None:
        if not items:
            return
        meta = self._meta
        inbox = self._inbox
        for item in items:
            inbox.append((meta, item))
        self._wake.set()
        link = self.link
        if len(inbox) >= INBOX_HIGH and link is not None and not link.paused:
            self.stats["read_pauses"] += 1
            link.pause()

    def _arm_timer(self) -> None:
        deadline = self.ingress.deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._push(self.ingress.poll(time.monotonic()))
        self._arm_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _pump(self) -> None:
        inbox = self._inbox
        while True:
            while inbox:
                meta, item = inbox.popleft()
                try:
                    if type(item) is bytes:
                        self.stats["frames_in"] += 1
                        await self.emit("out", FluxMsg(raw=item, meta=dict(meta)))
                    else:
                        await self._fault(meta, item)
                except LaneFull as exc:
                    self.stats["emit_dropped"] += 1
                    self.log.warning("%s: frame dropped: %s", self.name, exc)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug downstream must not stop the device's reader
                    self.stats["emit_dropped"] += 1
                    self.log.exception("%s: emitting a frame failed", self.name)
                link = self.link
                if link is not None and link.paused and len(inbox) <= INBOX_LOW and not self._draining:
                    link.resume()
            self._wake.clear()
            if not inbox:
                await self._wake.wait()

    async def _fault(self, meta: dict, fault: Fault) -> None:
        self.fault_counts[fault.reason] += 1
        msg = FluxMsg(raw=fault.sample, meta={**meta, **fault.fields})
        await self.emit_error(msg, fault.reason, fault.detail)

    # -- egress: in -> device ----------------------------------------------------------------------
    async def process(self, port: str, msg: FluxMsg) -> None:
        try:
            data = self._encoder.encode(msg.raw)
        except EncodeError as exc:
            raise GearError("encode_error", str(exc)) from None
        link = self.link
        if link is None:
            await self._while_down(msg, data)
            return
        async with self._write_lock:
            link = self.link  # the lock may have been held across a loss or a reopen
            if link is None:
                await self._while_down(msg, data)
                return
            try:
                await self._write(link, data)
            except LinkLost:
                await self._while_down(msg, data)
            except WriteTimeout as exc:
                self.stats["write_timeouts"] += 1
                raise GearError("write_timeout", str(exc)) from None

    async def _write(self, link: SerialLink, data: bytes) -> None:
        if self._gap_out:
            delay = self._next_write_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        started = time.monotonic()
        await link.write(data, self.write_timeout)
        self.stats["frames_out"] += 1
        if self._gap_out:
            # The line was idle when the write began, so the frame has left the wire
            # len * char_time later (the kernel buffers it); the silence starts then.
            wire_done = max(started + len(data) * self.settings.char_time, time.monotonic())
            self._next_write_at = wire_done + self._gap_out

    async def _while_down(self, msg: FluxMsg, data: bytes) -> None:
        if self.on_down == "error" or self._stopping:
            self.stats["down_errors"] += 1
            raise GearError("device_down", f"{self.settings.port} is not open ({self.down_reason})")
        await self._enqueue(msg, data)

    async def _enqueue(self, msg: FluxMsg, data: bytes) -> None:
        if len(self._queue) >= self.max_queued:
            old, _ = self._queue.popleft()
            self.stats["queue_dropped"] += 1
            await self.emit_error(old, "queue_overflow",
                                  f"{self.settings.port} down and max_queued={self.max_queued} reached: oldest dropped")
        self._queue.append((msg, data))

    async def _flush_queue(self, link: SerialLink) -> None:
        """Write what waited for the device, in order (caller holds the write lock)."""
        queue = self._queue
        sent = 0
        while queue and self.link is link:
            msg, data = queue[0]
            try:
                await self._write(link, data)
            except LinkLost:
                break  # still queued: the next open flushes it
            except WriteTimeout as exc:
                queue.popleft()
                self.stats["write_timeouts"] += 1
                await self.emit_error(msg, "write_timeout", str(exc))
                continue
            queue.popleft()
            sent += 1
        if sent:
            self.log.info("%s: wrote %d queued frames to %s", self.name, sent, self.settings.port)

    async def _hand_over_queue(self) -> None:
        """Retiring with frames still queued: give them to the successor of a reload when it
        queues too, else report each on `error` (never silently dropped)."""
        nxt = self._successor
        while self._queue:
            msg, data = self._queue.popleft()
            if nxt is not None and nxt.on_down == "queue" and not nxt._stopping:
                await nxt._enqueue(msg, data)
            else:
                self.stats["down_errors"] += 1
                await self.emit_error(msg, "device_down", f"{self.settings.port} not open when the gear stopped")

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.stats)
        link = self.link
        if link is not None:
            m["bytes_in"] += link.bytes_in
            m["bytes_out"] += link.bytes_out
        m["link_up"] = 1 if link is not None else 0
        m["queued"] = len(self._queue)
        m["inbox"] = len(self._inbox)
        m["framing_errors"] = sum(self.fault_counts.values())
        for reason, n in self.fault_counts.items():
            m[f"framing_errors_{reason}"] = n
        m["resync_discarded"] = self.ingress.discarded
        return m


def _close_late_open(fut: concurrent.futures.Future) -> None:
    # An open that finished after we gave up on it: close it, or the device stays locked.
    if fut.cancelled() or fut.exception() is not None:
        return
    try:
        fut.result().close()
    except (serial.SerialException, OSError):
        pass
