"""One open serial port inside the event loop: open, read, write, presence, close (pyserial).

Job: the I/O half of `io_serial`. `open_port(settings)` opens a device path or any pyserial
URL (`serial.serial_for_url`: rfc2217://, socket://, loop://, spy://, hwgrep://, ...) with the
line settings; `SerialLink` then reads and writes it without blocking the loop:

* **fd mode** (a local device: pyserial's POSIX `Serial`, which opens with O_NONBLOCK): the
  loop watches the file descriptor (`loop.add_reader` / `add_writer`); reads are one `os.read`
  of up to READ_CHUNK bytes per readiness, writes are `os.write` with a wait for writability.
  No thread at all.
* **thread mode** (URL handlers, whose bytes live in a socket or a queue inside pyserial, and
  platforms without add_reader): blocking pyserial calls run in the gear's own executor of
  EXECUTOR_THREADS threads (one reads with a READ_POLL timeout, so a stop is prompt; the other
  writes, opens and closes). Read times are when the read returned: coarser than fd mode,
  which matters only for the idle_gap / modbus_rtu framings.

The link calls `on_data(data, now)` for every chunk read (`now` = time.monotonic()) and
`on_lost(reason)` once when the device goes away: a read or write OSError (EIO, ENODEV, ENXIO:
an unplugged USB adapter), a hang-up (a read of nothing after readiness), or the device node
vanishing / pointing at another device (`present()`, polled by the gear: udev removes the node
of an unplugged adapter; a /dev/serial/by-id symlink may be repointed).

Raises: `LinkLost` (write on a lost link), `WriteTimeout` (fd mode: the device took no byte
for write_timeout, e.g. held off by CTS or XOFF; thread mode: pyserial's write_timeout for the
whole write). What the kernel still held for it is discarded, so the next frame does not queue
behind a dead one. `open_port` raises what pyserial raises: SerialException /
OSError (absent, busy, exclusively locked: worth retrying), ValueError / NotImplementedError
(settings the device or platform refuses, e.g. RS-485 on a port without TIOCSRS485).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from dataclasses import dataclass

import serial
import serial.rs485

from ..errors import FluxError

__all__ = [
    "SerialSettings",
    "SerialLink",
    "LinkLost",
    "WriteTimeout",
    "open_port",
    "is_url",
    "url_problem",
    "READ_CHUNK",
    "READ_POLL",
    "EXECUTOR_THREADS",
]

#: Largest single read. A tty's kernel buffer is 4 KiB; more would only be latency.
READ_CHUNK = 4096
#: Thread mode: longest one blocking read waits (bounds how long a stop waits for it).
READ_POLL = 0.1
#: Thread mode: threads per gear (one reader, one for writes / open / close).
EXECUTOR_THREADS = 2

_PARITY_BITS = {"N": 0, "E": 1, "O": 1, "M": 1, "S": 1}


class LinkLost(FluxError):
    """The device went away (unplugged, hung up, node removed); `reason` says how."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class WriteTimeout(FluxError):
    """The device stopped taking bytes for `timeout` seconds; `written` of `size` bytes went."""

    def __init__(self, timeout: float, written: int, size: int):
        self.timeout = timeout
        self.written = written
        self.size = size
        super().__init__(
            f"device took {written} of {size} bytes, then nothing for {timeout:g}s (write_timeout); rest discarded"
        )


def is_url(port: str) -> bool:
    return "://" in port


def url_problem(port: str) -> str | None:
    """Why pyserial would not know this URL's scheme, or None."""
    scheme = port.split("://", 1)[0].lower()
    for package in serial.protocol_handler_packages:
        try:
            importlib.import_module(f".protocol_{scheme}", package)
            return None
        except ImportError:
            continue
    return (
        f"unknown pyserial URL scheme {scheme!r} (known: rfc2217://, socket://, loop://, spy://, "
        "hwgrep://, alt://) ; a local device is a plain path such as /dev/ttyUSB0"
    )


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """Line settings of one port (already validated by the gear)."""

    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    rtscts: bool = False
    xonxoff: bool = False
    rs485: dict | None = None
    exclusive: bool = True

    @property
    def char_time(self) -> float:
        """Seconds one character takes on the line (start + data + parity + stop bits)."""
        return (1 + self.bytesize + _PARITY_BITS.get(self.parity, 0) + self.stopbits) / self.baudrate


def open_port(settings: SerialSettings, write_timeout: float):
    """Open the port with its settings (blocking: run it in an executor). See the module
    docstring for what it raises."""
    port = serial.serial_for_url(settings.port, do_not_open=True)
    port.baudrate = settings.baudrate
    port.bytesize = settings.bytesize
    port.parity = settings.parity
    port.stopbits = settings.stopbits
    port.rtscts = settings.rtscts
    port.xonxoff = settings.xonxoff
    port.timeout = READ_POLL
    port.write_timeout = write_timeout
    if settings.exclusive and not is_url(settings.port):
        port.exclusive = True  # flock(LOCK_EX | LOCK_NB): a second opener fails at once
    if settings.rs485 is not None:
        port.rs485_mode = serial.rs485.RS485Settings(**settings.rs485)
    port.open()
    return port


def _fd_capable(port) -> bool:
    if sys.platform == "win32":
        return False
    posix = getattr(serial, "serialposix", None)
    return posix is not None and isinstance(port, posix.Serial) and isinstance(getattr(port, "fd", None), int)


class SerialLink:
    """One open of the device: reads into `on_data`, writes frames, reports its loss once."""

    def __init__(self, port, settings: SerialSettings, executor, on_data, on_lost):
        self.port = port
        self.settings = settings
        self.executor = executor
        self.on_data = on_data
        self.on_lost = on_lost
        self.loop = asyncio.get_running_loop()
        self.fd_mode = _fd_capable(port)
        self.fd = port.fd if self.fd_mode else -1
        self.lost = ""  # why the link is gone ("" while alive)
        self.closed = False
        self.paused = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._reader: asyncio.Task | None = None
        self._resumed: asyncio.Event | None = None
        self._rdev = None
        self._write_waiter: asyncio.Future | None = None
        if self.fd_mode:
            os.set_blocking(self.fd, False)
            st = os.fstat(self.fd)
            self._rdev = (st.st_rdev, st.st_ino) if st.st_rdev else None

    @property
    def mode(self) -> str:
        return "fd" if self.fd_mode else "thread"

    # -- reading -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.fd_mode:
            self.loop.add_reader(self.fd, self._readable)
        else:
            self._resumed = asyncio.Event()
            self._resumed.set()
            self._reader = self.loop.create_task(self._read_loop(), name=f"serial-read:{self.settings.port}")

    def pause(self) -> None:
        """Stop reading (backpressure): the kernel buffer fills, then RTS/XOFF hold the device
        off when flow control is on; without it the device's further bytes are lost there."""
        if self.paused or self.closed or self.lost:
            return
        self.paused = True
        if self.fd_mode:
            self.loop.remove_reader(self.fd)
        else:
            self._resumed.clear()

    def resume(self) -> None:
        if not self.paused or self.closed or self.lost:
            return
        self.paused = False
        if self.fd_mode:
            self.loop.add_reader(self.fd, self._readable)
        else:
            self._resumed.set()

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lose(f"read failed: {exc.strerror or exc} (errno {exc.errno})")
            return
        if not data:
            # Readiness with nothing to read is a hang-up (the other end of a pty closed, a
            # modem dropped the line).
            self.lose("device hung up")
            return
        self.bytes_in += len(data)
        self.on_data(data, time.monotonic())

    def _read_blocking(self) -> bytes:
        port = self.port
        waiting = port.in_waiting
        return port.read(min(max(waiting, 1), READ_CHUNK))

    async def _read_loop(self) -> None:
        while not self.closed and not self.lost:
            if self.paused:
                await self._resumed.wait()
                continue
            try:
                data = await self.loop.run_in_executor(self.executor, self._read_blocking)
            except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
                # pyserial URL handlers raise a TypeError/AttributeError when closed under a read
                if not self.closed:
                    self.lose(f"read failed: {exc}")
                return
            if data and not self.closed:
                self.bytes_in += len(data)
                self.on_data(data, time.monotonic())

    # -- presence ----------------------------------------------------------------------------
    def present(self) -> str:
        """Empty while the device node still names the open device, else why not (fd mode with
        a device path only; URL handlers report their loss through read/write errors)."""
        if not self.fd_mode or self._rdev is None or self.lost:
            return ""
        try:
            st = os.stat(self.settings.port)
        except FileNotFoundError:
            return f"device node {self.settings.port} is gone"
        except OSError as exc:
            return f"device node {self.settings.port}: {exc.strerror}"
        if (st.st_rdev, st.st_ino) != self._rdev:
            return f"device node {self.settings.port} now names another device"
        return ""

    def lose(self, reason: str) -> None:
        """Mark the link gone (once) and tell the owner; reading stops at once."""
        if self.lost or self.closed:
            return
        self.lost = reason
        if self.fd_mode:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        elif self._resumed is not None:
            self._resumed.set()
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # a write waiting for room learns of the loss now
        self.on_lost(reason)

    # -- writing -----------------------------------------------------------------------------
    async def write(self, data: bytes, timeout: float) -> None:
        """Write one frame; raises LinkLost or WriteTimeout (see the module docstring)."""
        if self.lost or self.closed:
            raise LinkLost(self.lost or "port closed")
        if not self.fd_mode:
            await self._write_thread(data, timeout)
            return
        view = memoryview(data)
        deadline = None
        while view:
            try:
                n = os.write(self.fd, view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self.lose(f"write failed: {exc.strerror or exc} (errno {exc.errno})")
                raise LinkLost(self.lost) from None
            self.bytes_out += n
            view = view[n:]
            if not view:
                return
            if n or deadline is None:
                # The timeout is for a device that takes nothing, not for a long frame on a slow
                # line (64 KiB at 9600 baud need 68 s): every byte taken restarts it.
                deadline = self.loop.time() + timeout
            if not await self._writable(deadline):
                self._discard_output()
                raise WriteTimeout(timeout, len(data) - len(view), len(data))
            if self.lost or self.closed:
                raise LinkLost(self.lost or "port closed")

    async def _writable(self, deadline: float) -> bool:
        fut = self._write_waiter = self.loop.create_future()

        def ready():
            if not fut.done():
                fut.set_result(None)

        self.loop.add_writer(self.fd, ready)
        try:
            await asyncio.wait_for(fut, max(0.0, deadline - self.loop.time()))
            return True
        except TimeoutError:
            return False
        finally:
            self._write_waiter = None
            if not self.lost and not self.closed:
                self.loop.remove_writer(self.fd)

    async def _write_thread(self, data: bytes, timeout: float) -> None:
        self.port.write_timeout = timeout
        try:
            n = await self.loop.run_in_executor(self.executor, self.port.write, data)
        except serial.SerialTimeoutException:
            await self.loop.run_in_executor(self.executor, self._discard_output)
            raise WriteTimeout(timeout, 0, len(data)) from None
        except (serial.SerialException, OSError) as exc:
            self.lose(f"write failed: {exc}")
            raise LinkLost(self.lost) from None
        self.bytes_out += n if isinstance(n, int) else len(data)

    def _discard_output(self) -> None:
        try:
            self.port.reset_output_buffer()
        except Exception:  # a device going away right now: its loss is reported elsewhere
            pass

    # -- closing -----------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop reading and close the port (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.fd_mode:
            if not self.lost:
                self.loop.remove_reader(self.fd)
                self.loop.remove_writer(self.fd)
            self._close_port()
            return
        if self._resumed is not None:
            self._resumed.set()
        reader = self._reader
        if reader is not None and not reader.done():
            try:  # the blocking read returns within READ_POLL
                await asyncio.wait_for(asyncio.shield(reader), READ_POLL * 5)
            except (TimeoutError, Exception):
                reader.cancel()
        await self.loop.run_in_executor(self.executor, self._close_port)

    def _close_port(self) -> None:
        try:
            self.port.close()
        except Exception:  # closing a vanished device may fail; the descriptor is gone anyway
            pass
