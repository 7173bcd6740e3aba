"""A fake serial device for tests: a real pseudo-terminal pair behind a device link.

`PtyDevice(link)` opens a pty (os.openpty), puts the slave in raw mode (termios, as a serial
port with no line discipline) and points the symlink `link` at the slave: the gear opens
`link` like /dev/ttyUSB0 (or /dev/serial/by-id/...). The test plays the device on the master
side. `unplug()` removes the link and closes the master (the gear's reads then fail with EIO,
as with an unplugged USB adapter); `PtyDevice(link)` again is the device plugged back in (a new
pty, so a new /dev/pts/N). The same device serves the gear's tests (through a scenario:
`serial_scenario`, with a feed and a catch gear) and the endpoint's (a SerialEndpoint opened on
`link` directly).
"""

from __future__ import annotations

import asyncio
import os
import time
import tty

import yaml

from fluxrig.runtime import Gear, Manifest, register

__all__ = ["PtyDevice", "SerialFeedGear", "SerialCatchGear", "serial_scenario", "wait_until", "wait_up"]

_EMPTY = {"type": "object", "properties": {}, "additionalProperties": False}


@register
class SerialFeedGear(Gear):
    """Test source: the test pushes messages with `await gear.push(raw)`."""

    MANIFEST = Manifest("test_serial_feed", "pushes messages given by the test", inputs=(), schema=_EMPTY)

    async def push(self, raw: bytes, **meta) -> None:
        from fluxrig.msg import FluxMsg

        await self.emit("out", FluxMsg(raw=raw, meta=dict(meta)))


@register
class SerialCatchGear(Gear):
    """Test sink: keeps what arrives on `in` (frames) and `in_err` (the error port)."""

    MANIFEST = Manifest(
        "test_serial_catch",
        "collects messages",
        inputs=("in", "in_err"),
        outputs=(),
        schema={
            "type": "object",
            "properties": {"delay": {"type": "number", "default": 0}},
            "additionalProperties": False,
        },
    )

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        self.got: dict[str, list] = {"in": [], "in_err": []}

    async def process(self, port, msg):
        if self.config.get("delay"):
            await asyncio.sleep(self.config["delay"])  # a slow consumer: backpressure tests
        self.got[port].append(msg)

    async def wait(self, n: int, port: str = "in", timeout: float = 5.0) -> list:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.got[port]) < n:
            if loop.time() > deadline:
                raise TimeoutError(
                    f"{len(self.got[port])} of {n} messages on {port}: {[m.raw[:40] for m in self.got[port]]}"
                )
            await asyncio.sleep(0.002)
        return self.got[port]


def serial_scenario(port: str, catch_delay: float = 0, **config) -> str:
    """feed -> ser.in; ser.out -> catch.in; ser.error -> catch.in_err."""
    doc = {
        "meta": {"version": "1"},
        "gears": [
            {"name": "feed", "type": "test_serial_feed"},
            {"name": "ser", "type": "io_serial", "config": {"port": port, **config}},
            {"name": "catch", "type": "test_serial_catch", "config": {"delay": catch_delay}},
        ],
        "wires": [
            {"from": "feed.out", "to": "ser.in"},
            {"from": "ser.out", "to": "catch.in"},
            {"from": "ser.error", "to": "catch.in_err"},
        ],
    }
    return yaml.safe_dump(doc)


async def wait_until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def wait_up(gear, timeout: float = 5.0) -> None:
    """Until `gear` (an io_serial gear or a SerialEndpoint: both have `.link`) has its device open."""
    await wait_until(lambda: gear.link is not None, timeout, f"{gear.name} to open its device")


class PtyDevice:
    def __init__(self, link: str):
        self.link = str(link)
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no CR/LF translation, no signals: a raw line
        os.set_blocking(self.master, False)
        self.slave_name = os.ttyname(self.slave)
        if os.path.lexists(self.link):
            os.unlink(self.link)
        os.symlink(self.slave_name, self.link)
        self.buf = bytearray()
        self.closed = False

    # -- the device talks ------------------------------------------------------------------
    async def write(self, data: bytes, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(bytes(data))
        deadline = loop.time() + timeout
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view:
                if loop.time() > deadline:
                    raise TimeoutError("the gear does not read the pty")
                await asyncio.sleep(0.001)

    async def write_each_byte(self, data: bytes, gear, timeout: float = 5.0) -> None:
        """One byte at a time, each read by the gear before the next is written: every
        possible split point of the stream is exercised."""
        for b in data:
            link = gear.link
            before = link.bytes_in
            await self.write(bytes([b]))
            await wait_until(
                lambda link=link, before=before: link.bytes_in > before or link.lost, timeout, "the gear to read a byte"
            )

    # -- the device listens ----------------------------------------------------------------
    def _read_now(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            self.buf += chunk

    async def read_exactly(self, n: int, timeout: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.buf) < n:
            self._read_now()
            if len(self.buf) >= n:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"read {len(self.buf)} of {n} bytes: {bytes(self.buf)[:80]!r}")
            await asyncio.sleep(0.002)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_for(self, seconds: float) -> bytes:
        """Everything the gear writes within `seconds`."""
        await asyncio.sleep(seconds)
        self._read_now()
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def read_timed(self, n: int, timeout: float = 5.0) -> list[tuple[float, bytes]]:
        """(monotonic time, chunk) for each read until n bytes came: to measure gaps."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got: list[tuple[float, bytes]] = []
        total = 0
        while total < n:
            try:
                chunk = os.read(self.master, 65536)
            except BlockingIOError:
                chunk = b""
            if chunk:
                got.append((time.monotonic(), chunk))
                total += len(chunk)
                continue
            if loop.time() > deadline:
                raise TimeoutError(f"read {total} of {n} bytes")
            await asyncio.sleep(0.0005)
        return got

    # -- unplug ----------------------------------------------------------------------------
    def unplug(self) -> None:
        """The adapter is pulled: its node vanishes and the line hangs up."""
        if self.closed:
            return
        self.closed = True
        if os.path.lexists(self.link):
            os.unlink(self.link)
        os.close(self.master)
        os.close(self.slave)

    def close(self) -> None:
        self.unplug()
