"""A supervised serial device for one I/O gear: the twin of `fluxrig.net.tcp.TcpEndpoint`.

Job: everything `io_serial` does with its device apart from turning bytes into messages.
`SerialEndpoint` opens the port in the background (a start never fails because the device is
absent), watches it, notices its loss, reopens it with backoff, reads it into the sans-IO
`Ingress` (framer + resynchronisation, `fluxrig.net.serial_ingress`), hands frames and faults
to its owner one at a time (backpressure reaches the line), and writes frames to it paced and,
while it is down, queued or refused. The port I/O itself is `fluxrig.net.serial_port`.

Contract (the owner is a `SerialSink`, link events go to a `ControlPublisher`):

  start()                    open in the background; returns at once
  send(data, tag)            write one encoded frame, paced; while down: DeviceDown, or queue it
                             (`tag` comes back in `sink.on_undelivered` if it is dropped later)
  close_connection(id, why)  the kill switch: close the link named `id` ("" = the current one);
                             it is reopened after `reconnect_wait` with a new conn.id
  take_over(old, wait, keep_link, keep_ingress)
                             a reload of the same port: inherit what `old` still has queued;
                             keep_link: `old` hands its open link over when it retires (no
                             close, no reopen: the same descriptor and conn.id), else open
                             only after `old` released it (at most `wait` s)
  drain(deadline)            stop reading; hand on what was read; write or report what is queued
  stop()                     close the port, drop (and count) what is queued; idempotent
  metrics()                  counters, link_up, queued, inbox, framing errors by reason

Supervision: an open publishes `conn.up {conn_id, port}` on `link.<name>`; a loss (read/write
OSError, hang-up, node gone or repointed: checked every `check_interval`) publishes
`conn.down {conn_id, port, reason}`; so does the first failed open of a series (said once,
not per attempt). Reopen waits double from `reconnect_wait` to `reconnect_max`; a setting the
device refuses (ValueError / NotImplementedError) waits `reconnect_max` at once. Every open has
a new conn.id, which is in the `meta` handed to the sink with each frame.

Ingress: frames and faults queue in an inbox drained by one pump task that awaits the sink;
past `inbox_high` items the link stops reading (the kernel buffer fills, then RTS/XOFF hold the
device off) and resumes at `inbox_low`. A sink that raises is counted (`emit_dropped`) and the
pump goes on: a bug downstream must not stop the device's reader.

Reload handover (issue 18 item 3): a successor that keeps the link (take_over keep_link) gets
the open device when this endpoint retires, never closed: fluxrig.net.serial_handover.

Egress: `write_timeout` bounds how long the device may take no byte (then DeviceWriteTimeout
and its output is discarded); `frame_gap` seconds of silence are kept between frames, counted
from when the previous frame has left the wire at the line's speed (the kernel buffers it, so
the end of `write` is not the end of the frame). While down, `on_down=error` raises DeviceDown;
`on_down=queue` holds up to `max_queued` frames (the oldest is dropped: QueueOverflow to
`sink.on_undelivered`) and writes them in order on the next open.

Raises (all `GearError`s, so a gear lets them reach the error port): DeviceDown, QueueOverflow
(only to the sink), DeviceWriteTimeout; `ConfigError` for an impossible parameter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from enum import StrEnum
from typing import Protocol

import serial

from ..errors import ConfigError, FluxError, GearError
from ..ids import uuid7
from ..wire.meta import CONN_GEAR, CONN_ID, LINK_DOWN, LINK_UP, SERIAL_PORT, SOURCE, link_topic
from .serial_handover import follow_predecessor, hand_link
from .serial_ingress import Fault, Ingress
from .serial_port import EXECUTOR_THREADS, LinkLost, SerialLink, SerialSettings, WriteTimeout, open_port

__all__ = [
    "SerialEndpoint",
    "SerialSink",
    "ControlPublisher",
    "OnDown",
    "DeviceDown",
    "QueueOverflow",
    "DeviceWriteTimeout",
    "INBOX_HIGH",
    "INBOX_LOW",
    "MAX_QUEUED_DEFAULT",
    "STOP_WAIT",
]

INBOX_HIGH = 2048  # frames read and not yet handed on before reading pauses
INBOX_LOW = 256  # ... and when it resumes
MAX_QUEUED_DEFAULT = 1000  # on_down=queue: frames held while the device is absent
#: Seconds stop() gives the supervisor to close the link and say conn.down before cancelling
#: it; the runtime allows a gear's whole stop 2 s (rack.cleanup_timeout).
STOP_WAIT = 1.0


class OnDown(StrEnum):
    """What `send` does while the device is not open."""

    ERROR = "error"
    QUEUE = "queue"


class DeviceDown(GearError):
    """A frame for a device that is not open (on_down=error, or left over at stop)."""

    def __init__(self, port: str, why: str):
        self.port = port
        self.why = why
        super().__init__("device_down", f"{port} is not open ({why})")


class QueueOverflow(GearError):
    """on_down=queue: the queue held `limit` frames, so the oldest was dropped."""

    def __init__(self, port: str, limit: int):
        self.port = port
        self.limit = limit
        super().__init__("queue_overflow", f"{port} down and max_queued={limit} reached: oldest dropped")


class DeviceWriteTimeout(GearError):
    """The device took no byte for `timeout` s; `written` of `size` bytes went, the rest was discarded."""

    def __init__(self, cause: WriteTimeout):
        self.timeout = cause.timeout
        self.written = cause.written
        self.size = cause.size
        super().__init__("write_timeout", str(cause))


class SerialSink(Protocol):
    """The endpoint's owner (the gear), declared by its shape so a test passes a small fake.

    `meta` is the open's metadata (serial.port, flux.source, conn.id, conn.gear), shared by
    every frame of that open: copy it, do not change it. `on_frame` / `on_fault` may raise a
    FluxError (a full lane): counted as emit_dropped, logged without a stack.
    """

    async def on_frame(self, meta: Mapping[str, str], frame: bytes) -> None: ...

    async def on_fault(self, meta: Mapping[str, str], fault: Fault) -> None: ...

    async def on_undelivered(self, tag: object, error: GearError) -> None: ...


class ControlPublisher(Protocol):
    """Where link events go (the Rack's ControlBus)."""

    def publish(self, subject: str, cmd: dict) -> int: ...


class SerialEndpoint:
    """One serial device of one gear: supervision, ingress pump, paced and queued egress."""

    def __init__(
        self,
        *,
        name: str,
        settings: SerialSettings,
        ingress: Ingress,
        sink: SerialSink,
        log: logging.Logger,
        control: ControlPublisher | None = None,
        source_label: str = "io_serial",
        write_timeout: float = 5.0,
        reconnect_wait: float = 1.0,
        reconnect_max: float = 30.0,
        open_timeout: float = 10.0,
        check_interval: float = 1.0,
        on_down: OnDown | str = OnDown.ERROR,
        max_queued: int = MAX_QUEUED_DEFAULT,
        frame_gap: float = 0.0,
        inbox_high: int = INBOX_HIGH,
        inbox_low: int = INBOX_LOW,
    ):
        for key, value in (
            ("write_timeout", write_timeout),
            ("reconnect_wait", reconnect_wait),
            ("open_timeout", open_timeout),
            ("max_queued", max_queued),
            ("inbox_high", inbox_high),
        ):
            if value <= 0:
                raise ConfigError(f"{name}: {key} must be more than 0, not {value!r}", key)
        if reconnect_max < reconnect_wait:
            raise ConfigError(f"{name}: reconnect_max must not be shorter than reconnect_wait", "reconnect_max")
        if not 0 <= inbox_low < inbox_high:
            raise ConfigError(f"{name}: inbox_low must be in [0, inbox_high)", "inbox_low")
        try:
            self.on_down = OnDown(on_down)
        except ValueError:
            raise ConfigError(f"{name}: on_down must be error or queue, not {on_down!r}", "on_down") from None
        self.name = name
        self.settings = settings
        self.ingress = ingress
        self.sink = sink
        self.log = log
        self.control = control
        self.source_label = source_label
        self.write_timeout = write_timeout
        self.reconnect_wait = reconnect_wait
        self.reconnect_max = reconnect_max
        self.open_timeout = open_timeout
        self.check_interval = check_interval
        self.max_queued = max_queued
        self.frame_gap = frame_gap
        self.inbox_high = inbox_high
        self.inbox_low = inbox_low
        self.link: SerialLink | None = None
        self.conn_id = ""
        self.down_reason = "not opened yet"
        self.draining = False
        self.stopping = False
        #: Set once stop() has closed the port: a successor on the same device may open it.
        self.released = asyncio.Event()
        self.stats = Counter(
            bytes_in=0,
            bytes_out=0,
            frames_in=0,
            frames_out=0,
            opens=0,
            reconnects=0,
            open_failures=0,
            read_pauses=0,
            write_timeouts=0,
            down_errors=0,
            queue_dropped=0,
            emit_dropped=0,
            adopted=0,
        )
        self.fault_counts: Counter = Counter()
        self._meta: Mapping[str, str] = {}
        self._inbox: deque = deque()  # (meta, frame bytes | Fault) read and not yet handed on
        self._queue: deque = deque()  # (tag, encoded bytes) waiting for the device
        self._next_write_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._gone = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._pump_task: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._link_state = ""
        self._previous: SerialEndpoint | None = None
        self._previous_wait = 0.0
        self._successor: SerialEndpoint | None = None
        # reload handover of the open link (take_over keep_link)
        self._keep_link = False
        self._keep_ingress = False
        self._handed_to: SerialEndpoint | None = None  # who took our link
        self._link_ready: asyncio.Event | None = None  # set when our predecessor handed us its link
        self._pump_gate: asyncio.Event | None = None  # set when the predecessor delivered what it read
        self._pumping = False  # a frame is being handed to the sink

    # -- lifecycle ---------------------------------------------------------------------------
    def take_over(self, old: SerialEndpoint, wait: float, keep_link: bool = False, keep_ingress: bool = False) -> None:
        """Reload of the same device: the old endpoint gives this one what it still has queued
        when it drains, and either hands over its open link then (`keep_link`: the line
        settings are unchanged; `keep_ingress`: the framing too, so its half-read frame carries
        over) or closes it before this one opens it (at most `wait` s)."""
        self._previous = old
        self._previous_wait = wait
        self._keep_link = keep_link
        self._keep_ingress = keep_link and keep_ingress
        if keep_link:
            self._link_ready = asyncio.Event()
            self._pump_gate = asyncio.Event()
        old._successor = self

    async def start(self) -> None:
        """Start the pump and the supervisor; the device is opened in the background."""
        loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            EXECUTOR_THREADS, thread_name_prefix=f"serial:{self.name}"
        )
        self._pump_task = loop.create_task(self._pump(), name=f"serial-pump:{self.name}")
        self._supervisor = loop.create_task(self._supervise(), name=f"serial:{self.name}")

    async def drain(self, deadline: float) -> None:
        """Stop reading; hand on what was read; write or report what waits for the device.
        A successor that keeps the link gets it now instead (module docstring)."""
        self.draining = True
        nxt = self._successor
        link = self.link
        loop = asyncio.get_running_loop()
        if link is not None and nxt is not None and nxt._keep_link and not nxt.stopping:
            async with self._write_lock:  # a write of ours in progress finishes first
                hand_link(self, nxt, link)
            while (self._inbox or self._pumping) and loop.time() < deadline:
                await asyncio.sleep(0.002)
            nxt._pump_gate.set()
            await self._hand_over_queue()
            return
        if link is not None:
            link.pause()
        self._cancel_timer()
        self._push(self.ingress.close())
        while self._inbox and loop.time() < deadline:
            await asyncio.sleep(0.005)
        if self._queue and self.link is not None:
            async with self._write_lock:
                await self._flush_queue(self.link)
        await self._hand_over_queue()

    async def stop(self) -> None:
        """Close the port and end the tasks; drop (counted, logged) what is still queued.
        Idempotent. Sets `released`, the signal a successor on the same device waits for."""
        self.stopping = True
        self._stop_event.set()
        self._cancel_timer()
        nxt = self._successor
        if nxt is not None and nxt._pump_gate is not None:
            nxt._pump_gate.set()  # whatever we still held, the successor's frames wait no longer
        prev = self._previous
        if prev is not None and prev._successor is self:  # a rolled-back swap: not its successor
            prev._successor = None
        if self._link_ready is not None:
            self._link_ready.set()  # a write waiting for the link gives up
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            self._gone.set()
            try:  # let it close the link and say conn.down
                await asyncio.wait_for(asyncio.shield(supervisor), STOP_WAIT)
            except Exception:  # timed out, or it failed: either way it must end now
                supervisor.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
        link, self.link = self.link, None
        if link is not None:
            await link.close()
        if self._queue:
            self.log.warning(
                "%s: stopped with %d frames still queued for %s; they are dropped",
                self.name,
                len(self._queue),
                self.settings.port,
            )
            self.stats["queue_dropped"] += len(self._queue)
            self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self.released.set()

    # -- the device: open, watch, lose, reopen --------------------------------------------------
    async def _supervise(self) -> None:
        if self._previous is not None:  # a reload: the old version hands its link over or lets go
            await follow_predecessor(self)
        wait = self.reconnect_wait
        failing = False
        while not self.stopping:
            try:
                port = await self._open()
            except Exception as exc:
                self.stats["open_failures"] += 1
                reason = f"cannot open {self.settings.port}: {exc}"
                if isinstance(exc, (ValueError, NotImplementedError)):
                    # the device or platform refuses a setting: no point hurrying
                    reason += " (a setting this device or platform does not support)"
                    wait = self.reconnect_max
                if not failing:
                    self.log.warning(
                        "%s: %s; retrying every %.1fs up to %.1fs", self.name, reason, wait, self.reconnect_max
                    )
                    self.down_reason = reason
                    if self._link_state != LINK_DOWN:  # a loss already said so
                        self._link_event(LINK_DOWN, "", reason)
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
            if self._handed_to is not None:
                return
            if not self.stopping:
                await self._sleep(self.reconnect_wait)

    async def _open(self):
        fut = self._executor.submit(open_port, self.settings, self.write_timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.open_timeout)
        except TimeoutError:
            fut.add_done_callback(_close_late_open)
            raise TimeoutError(f"open took longer than open_timeout={self.open_timeout:g}s") from None
        except asyncio.CancelledError:
            fut.add_done_callback(_close_late_open)
            raise

    async def _run_link(self, port) -> None:
        self._gone.clear()
        link = SerialLink(port, self.settings, self._executor, self._on_data, self._on_lost)
        self.conn_id = uuid7().hex()
        self._meta = {
            SERIAL_PORT: self.settings.port,
            SOURCE: self.source_label,
            CONN_ID: self.conn_id,
            CONN_GEAR: self.name,
        }
        self.ingress.reset()
        if self.stats["opens"]:
            self.stats["reconnects"] += 1
        self.stats["opens"] += 1
        self.link = link
        link.start()
        if self.draining:
            link.pause()
        s = self.settings
        self.log.info(
            "%s: opened %s (%d %d%s%g, %s mode) as %s",
            self.name,
            s.port,
            s.baudrate,
            s.bytesize,
            s.parity,
            s.stopbits,
            link.mode,
            self.conn_id,
        )
        self._link_event(LINK_UP, self.conn_id, "")
        if self._queue:
            async with self._write_lock:
                await self._flush_queue(link)
        await self._watch(link)

    async def _watch(self, link: SerialLink) -> None:
        """Watch the open `link` until it is lost, stopped or handed to a reload's successor."""
        try:
            while not self._gone.is_set() and not self.stopping:
                try:
                    await asyncio.wait_for(self._gone.wait(), self.check_interval or None)
                except TimeoutError:
                    reason = link.present()
                    if reason:
                        link.lose(reason)
        finally:
            if self._handed_to is None:  # else the successor has it, open
                await self._close_link(link)

    async def _close_link(self, link: SerialLink) -> None:
        reason = link.lost or ("stopping" if self.stopping else "closed")
        self.link = None
        self.down_reason = reason
        self._cancel_timer()
        self._push(self.ingress.close())
        self.stats["bytes_in"] += link.bytes_in
        self.stats["bytes_out"] += link.bytes_out
        await link.close()
        self._link_event(LINK_DOWN, self.conn_id, reason)
        if not self.stopping:
            self.log.warning("%s: %s lost (%s); reopening", self.name, self.settings.port, reason)

    def _on_lost(self, reason: str) -> None:
        self._gone.set()

    async def _sleep(self, seconds: float) -> None:
        try:  # a stop cuts the wait short
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        except TimeoutError:
            pass

    def _link_event(self, cmd: str, conn_id: str, reason: str) -> None:
        self._link_state = cmd
        if self.control is None:
            return
        args = {"conn_id": conn_id, "port": self.settings.port}
        if reason:
            args["reason"] = reason
        self.control.publish(link_topic(self.name), {"cmd": cmd, "args": args})

    def close_connection(self, conn_id: str, reason: str) -> bool:
        """Close the open link if `conn_id` names it ("" names whichever is open: a serial gear
        has one link). It is reopened after reconnect_wait with a new conn.id."""
        link = self.link
        if link is None or (conn_id and conn_id != self.conn_id):
            return False
        link.lose(reason)
        return True

    # -- ingress: bytes -> frames -> sink ---------------------------------------------------------
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
        if len(inbox) >= self.inbox_high and link is not None and not link.paused:
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
        sink = self.sink
        if self._pump_gate is not None:
            # a reload handover: the predecessor delivers what it read before we deliver ours
            await self._pump_gate.wait()
        while True:
            while inbox:
                meta, item = inbox.popleft()
                self._pumping = True
                try:
                    if type(item) is bytes:
                        self.stats["frames_in"] += 1
                        await sink.on_frame(meta, item)
                    else:
                        self.fault_counts[item.reason] += 1
                        await sink.on_fault(meta, item)
                except asyncio.CancelledError:
                    raise
                except FluxError as exc:  # a full lane: expected under overload, no stack needed
                    self.stats["emit_dropped"] += 1
                    self.log.warning("%s: frame dropped: %s", self.name, exc)
                except Exception:  # a bug downstream must not stop the device's reader
                    self.stats["emit_dropped"] += 1
                    self.log.exception("%s: handing on a frame failed", self.name)
                finally:
                    self._pumping = False
                link = self.link
                if link is not None and link.paused and len(inbox) <= self.inbox_low and not self.draining:
                    link.resume()
            self._wake.clear()
            if not inbox:
                await self._wake.wait()

    # -- egress: frames -> device ------------------------------------------------------------------
    async def send(self, data: bytes, tag: object = None) -> None:
        """Write one encoded frame (paced). While down: DeviceDown (on_down=error, or stopping)
        or queued (on_down=queue). Raises DeviceWriteTimeout when the device takes no byte for
        write_timeout (the link stays open: a slow device is not a gone one)."""
        if self.link is None:
            if self._handed_to is not None:  # in flight from the graph we were retired from
                await self._handed_to.send(data, tag)
                return
            ready = self._link_ready
            if ready is not None and not ready.is_set():  # a reload: the link is on its way
                try:
                    await asyncio.wait_for(ready.wait(), self._previous_wait)
                except TimeoutError:
                    pass
                if self.link is not None:
                    await self.send(data, tag)
                    return
            await self._while_down(tag, data)
            return
        async with self._write_lock:
            link = self.link  # the lock may have been held across a loss or a reopen
            if link is None:
                await self._while_down(tag, data)
                return
            try:
                await self._write(link, data)
            except LinkLost:
                await self._while_down(tag, data)
            except WriteTimeout as exc:
                self.stats["write_timeouts"] += 1
                raise DeviceWriteTimeout(exc) from None

    async def _write(self, link: SerialLink, data: bytes) -> None:
        gap = self.frame_gap
        if gap:
            delay = self._next_write_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        started = time.monotonic()
        await link.write(data, self.write_timeout)
        self.stats["frames_out"] += 1
        if gap:
            # The line was idle when the write began, so the frame has left the wire
            # len * char_time later (the kernel buffers it); the silence starts then.
            wire_done = max(started + len(data) * self.settings.char_time, time.monotonic())
            self._next_write_at = wire_done + gap

    async def _while_down(self, tag: object, data: bytes) -> None:
        if self.on_down is OnDown.ERROR or self.stopping:
            self.stats["down_errors"] += 1
            raise DeviceDown(self.settings.port, self.down_reason)
        await self._enqueue(tag, data)

    async def _enqueue(self, tag: object, data: bytes) -> None:
        if len(self._queue) >= self.max_queued:
            old, _ = self._queue.popleft()
            self.stats["queue_dropped"] += 1
            await self.sink.on_undelivered(old, QueueOverflow(self.settings.port, self.max_queued))
        self._queue.append((tag, data))

    async def _flush_queue(self, link: SerialLink) -> None:
        """Write what waited for the device, in order (the caller holds the write lock)."""
        queue = self._queue
        sent = 0
        while queue and self.link is link:
            tag, data = queue[0]
            try:
                await self._write(link, data)
            except LinkLost:
                break  # still queued: the next open flushes it
            except WriteTimeout as exc:
                queue.popleft()
                self.stats["write_timeouts"] += 1
                await self.sink.on_undelivered(tag, DeviceWriteTimeout(exc))
                continue
            queue.popleft()
            sent += 1
        if sent:
            self.log.info("%s: wrote %d queued frames to %s", self.name, sent, self.settings.port)

    async def _hand_over_queue(self) -> None:
        """Retiring with frames still queued: give them to the successor of a reload when it
        queues too, else report each to the sink (never silently dropped)."""
        nxt = self._successor
        while self._queue:
            tag, data = self._queue.popleft()
            if nxt is not None and nxt.on_down is OnDown.QUEUE and not nxt.stopping:
                await nxt._enqueue(tag, data)
            else:
                self.stats["down_errors"] += 1
                await self.sink.on_undelivered(tag, DeviceDown(self.settings.port, "the gear stopped first"))

    # -- observing ---------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    def metrics(self) -> dict:
        m: dict = dict(self.stats)
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
