"""fluxrig.net.serial_endpoint on its own (no gear, no runtime) over real pseudo-terminals:
open and meta, unplug/replug with a new conn.id, the kill switch's close, write pacing from
the end of the frame on the wire, the queue's bound while down, reload hand-over, drain, stop,
a failing sink, typed errors."""

import asyncio
import contextlib
import logging
import time

import pytest
import serial
from serial_pty import PtyDevice, wait_until, wait_up

from fluxrig.errors import ConfigError, FluxError, GearError
from fluxrig.framing import make_framer
from fluxrig.net.serial_endpoint import (
    DeviceDown,
    DeviceWriteTimeout,
    OnDown,
    QueueOverflow,
    SerialEndpoint,
)
from fluxrig.net.serial_ingress import Fault, Ingress
from fluxrig.net.serial_port import SerialSettings
from fluxrig.wire.meta import CONN_GEAR, CONN_ID, LINK_DOWN, LINK_UP, SERIAL_PORT, SOURCE

LOG = logging.getLogger("test.serial_endpoint")


class Sink:
    """A SerialSink that keeps what it is given; `fail` makes the next calls raise."""

    def __init__(self, delay: float = 0.0):
        self.frames: list[tuple[dict, bytes]] = []
        self.faults: list[tuple[dict, Fault]] = []
        self.undelivered: list[tuple[object, GearError]] = []
        self.fail: list[BaseException] = []
        self.delay = delay

    async def on_frame(self, meta, frame):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail.pop(0)
        self.frames.append((dict(meta), frame))

    async def on_fault(self, meta, fault):
        self.faults.append((dict(meta), fault))

    async def on_undelivered(self, tag, error):
        self.undelivered.append((tag, error))


class Events:
    """A ControlPublisher that records link events."""

    def __init__(self):
        self.seen: list[dict] = []

    def publish(self, subject, cmd):
        assert subject == "link.ep"
        self.seen.append(cmd)
        return 1

    @property
    def cmds(self) -> list[str]:
        return [e["cmd"] for e in self.seen]


def make(port: str, sink=None, events=None, framing=None, baudrate=115200, **kw) -> SerialEndpoint:
    cfg = framing or {"framing": "delimiter"}
    settings = SerialSettings(port, baudrate=baudrate)
    kw.setdefault("reconnect_wait", 0.05)
    kw.setdefault("reconnect_max", 0.1)
    return SerialEndpoint(
        name="ep",
        settings=settings,
        ingress=Ingress(make_framer(cfg), cfg, settings.char_time),
        sink=sink if sink is not None else Sink(),
        log=LOG,
        control=events if events is not None else Events(),
        **kw,
    )


@contextlib.asynccontextmanager
async def started(ep: SerialEndpoint):
    await ep.start()
    try:
        yield ep
    finally:
        await ep.stop()


@pytest.fixture
def link(tmp_path):
    return str(tmp_path / "ttyEP0")


@pytest.fixture
def device(link):
    dev = PtyDevice(link)
    yield dev
    dev.close()


async def test_open_read_write_and_the_meta_of_each_frame(link, device):
    sink, events = Sink(), Events()
    async with started(make(link, sink, events)) as ep:
        await wait_up(ep)
        await device.write(b"one\ntwo\n")
        await wait_until(lambda: len(sink.frames) == 2)
        assert [f for _, f in sink.frames] == [b"one", b"two"]
        meta = sink.frames[0][0]
        assert meta == {SERIAL_PORT: link, SOURCE: "io_serial", CONN_ID: ep.conn_id, CONN_GEAR: "ep"}
        await ep.send(b"reply\n")
        assert await device.read_exactly(6) == b"reply\n"
        assert events.seen == [{"cmd": LINK_UP, "args": {"conn_id": ep.conn_id, "port": link}}]
        m = ep.metrics()
        assert (m["frames_in"], m["frames_out"], m["bytes_in"], m["bytes_out"], m["link_up"]) == (2, 1, 8, 6, 1)


async def test_unplug_then_replug_reopens_with_a_new_conn_id(link, device):
    sink, events = Sink(), Events()
    async with started(make(link, sink, events)) as ep:
        await wait_up(ep)
        first = ep.conn_id
        await device.write(b"before\n")
        await wait_until(lambda: sink.frames)
        device.unplug()
        await wait_until(lambda: ep.link is None, what="the loss")
        assert events.cmds == [LINK_UP, LINK_DOWN]
        assert events.seen[1]["args"]["conn_id"] == first and events.seen[1]["args"]["reason"] == ep.down_reason
        await asyncio.sleep(0.3)  # the node is gone: reopen attempts fail, and say so only once
        assert ep.stats["open_failures"] >= 2 and events.cmds == [LINK_UP, LINK_DOWN]
        replug = PtyDevice(link)
        try:
            await wait_up(ep, 3)
            assert ep.conn_id != first and events.cmds == [LINK_UP, LINK_DOWN, LINK_UP]
            assert events.seen[2]["args"]["conn_id"] == ep.conn_id
            await replug.write(b"after\n")
            await wait_until(lambda: len(sink.frames) == 2)
            assert [(m[CONN_ID], f) for m, f in sink.frames] == [(first, b"before"), (ep.conn_id, b"after")]
            assert ep.metrics()["reconnects"] == 1 and ep.metrics()["opens"] == 2
        finally:
            replug.close()


async def test_close_connection_is_the_kill_switch(link, device):
    events = Events()
    async with started(make(link, events=events)) as ep:
        await wait_up(ep)
        first = ep.conn_id
        assert ep.close_connection("0123456789abcdef", "not this one") is False
        assert ep.link is not None
        t0 = time.monotonic()
        assert ep.close_connection(first, "kill switch: operator") is True
        await wait_until(lambda: ep.link is not None and ep.conn_id != first, 3, "the reopen")
        assert time.monotonic() - t0 >= 0.045  # after reconnect_wait, not at once
        assert events.cmds == [LINK_UP, LINK_DOWN, LINK_UP]
        assert events.seen[1]["args"]["reason"] == "kill switch: operator"
        assert ep.close_connection("", "no id: whichever is open") is True


async def test_pacing_counts_the_silence_from_when_the_frame_left_the_wire(link, device):
    # 1200 baud 8N1: a character takes 1/120 s, so a 12-byte frame is 100 ms on the wire even
    # though the pty takes it at once. With a 30 ms gap, frames must start >= 130 ms apart.
    async with started(make(link, baudrate=1200, frame_gap=0.03)) as ep:
        await wait_up(ep)
        wire = ep.settings.char_time * 12
        assert wire == pytest.approx(0.1)
        reader = asyncio.ensure_future(device.read_timed(36, timeout=5))
        for i in range(3):
            await ep.send(b"frame %04d\r\n" % i)
        chunks = await reader
        assert b"".join(c for _, c in chunks) == b"frame 0000\r\nframe 0001\r\nframe 0002\r\n"
        starts = [t for t, c in chunks for _ in range(len(c) // 12)]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert len(gaps) == 2 and min(gaps) >= wire + 0.03 - 0.005, gaps


async def test_no_pacing_without_a_gap(link, device):
    async with started(make(link, baudrate=1200)) as ep:
        await wait_up(ep)
        t0 = time.monotonic()
        for i in range(5):
            await ep.send(b"frame %04d\r\n" % i)
        assert time.monotonic() - t0 < 0.4  # 500 ms of wire time, but nobody asked for silence
        assert len(await device.read_exactly(60)) == 60


async def test_queue_while_down_is_bounded_oldest_dropped_then_flushed_in_order(link):
    sink = Sink()
    async with started(make(link, sink, on_down=OnDown.QUEUE, max_queued=3)) as ep:
        await wait_until(lambda: ep.stats["open_failures"] >= 1, what="a failed open")
        for i in range(5):
            await ep.send(b"m%d\n" % i, tag=f"msg{i}")
        assert [t for t, _ in sink.undelivered] == ["msg0", "msg1"]
        err = sink.undelivered[0][1]
        assert isinstance(err, QueueOverflow) and err.reason == "queue_overflow" and err.limit == 3
        assert err.port == link and "max_queued=3" in err.detail
        m = ep.metrics()
        assert (m["queued"], m["queue_dropped"], m["link_up"]) == (3, 2, 0)
        dev = PtyDevice(link)
        try:
            await wait_up(ep, 3)
            assert await dev.read_exactly(9) == b"m2\nm3\nm4\n"
            await ep.send(b"m5\n")
            assert await dev.read_exactly(3) == b"m5\n"
            assert ep.queued == 0 and ep.metrics()["frames_out"] == 4
        finally:
            dev.close()


async def test_on_down_error_raises_device_down(link):
    async with started(make(link)) as ep:
        await wait_until(lambda: ep.stats["open_failures"] >= 1, what="a failed open")
        with pytest.raises(DeviceDown) as exc:
            await ep.send(b"nobody\n", tag="t")
        assert exc.value.reason == "device_down" and exc.value.port == link
        assert "cannot open" in exc.value.why and ep.metrics()["down_errors"] == 1


async def test_write_timeout_is_typed_and_the_link_stays_open(link, device):
    async with started(make(link, framing={"framing": "none"}, write_timeout=0.2)) as ep:
        await wait_up(ep)
        with pytest.raises(DeviceWriteTimeout) as exc:
            for _ in range(200):  # the device (pty master) never reads: the kernel buffer fills
                await ep.send(b"w" * 4096)
        err = exc.value
        assert err.reason == "write_timeout" and err.timeout == 0.2 and 0 <= err.written < err.size == 4096
        assert ep.link is not None and ep.stats["write_timeouts"] == 1


async def test_stop_closes_the_port_drops_and_counts_the_queue_and_is_idempotent(link, device):
    events = Events()
    ep = make(link, events=events, on_down="queue")
    await ep.start()
    await wait_up(ep)
    with pytest.raises(serial.SerialException):
        serial.Serial(link, exclusive=True)  # held while open
    device.unplug()
    await wait_until(lambda: ep.link is None)
    await ep.send(b"left over\n", tag="x")
    t0 = time.monotonic()
    await ep.stop()
    assert time.monotonic() - t0 < 1.5  # inside the runtime's 2 s per stop
    assert ep.released.is_set() and ep.stats["queue_dropped"] == 1 and ep.queued == 0
    await ep.stop()
    with pytest.raises(DeviceDown):  # stopping: refused even with on_down=queue
        await ep.send(b"late\n")
    dev = PtyDevice(link)
    try:
        with serial.Serial(link, exclusive=True):  # the lock is gone
            pass
        await asyncio.sleep(0.2)
        assert ep.link is None  # and nothing reopens it
    finally:
        dev.close()


async def test_stop_while_open_says_conn_down_stopping(link, device):
    events = Events()
    ep = make(link, events=events)
    await ep.start()
    await wait_up(ep)
    await ep.stop()
    assert events.cmds == [LINK_UP, LINK_DOWN] and events.seen[1]["args"]["reason"] == "stopping"
    with serial.Serial(link, exclusive=True):
        pass


async def test_take_over_waits_for_the_old_endpoint_and_inherits_its_queue(link):
    old_sink, new_sink = Sink(), Sink()
    old = make(link, old_sink, on_down="queue")
    new = make(link, new_sink, on_down="queue")
    await old.start()
    try:
        await wait_until(lambda: old.stats["open_failures"] >= 1)
        await old.send(b"q1\n", tag=1)
        await old.send(b"q2\n", tag=2)
        new.take_over(old, wait=5.0)
        await new.start()
        await asyncio.sleep(0.2)
        assert new.stats["opens"] == new.stats["open_failures"] == 0  # it waits, it does not try
        await old.drain(asyncio.get_running_loop().time() + 1)
        assert (old.queued, new.queued) == (0, 2) and old_sink.undelivered == []
        await old.stop()
        dev = PtyDevice(link)
        try:
            await wait_up(new, 3)
            assert await dev.read_exactly(6) == b"q1\nq2\n"
        finally:
            dev.close()
    finally:
        await old.stop()
        await new.stop()


async def test_drain_pauses_reading_hands_on_what_was_read_and_reports_the_queue(link, device):
    sink = Sink()
    async with started(make(link, sink, framing={"framing": "length_prefix"}, on_down="queue")) as ep:
        await wait_up(ep)
        await device.write(b"\x00\x04done\x00\x09part")  # a whole frame, then 4 of 9 bytes
        await wait_until(lambda: ep.link.bytes_in == 12)
        await ep.drain(asyncio.get_running_loop().time() + 1)
        assert [f for _, f in sink.frames] == [b"done"]
        assert [f.reason for _, f in sink.faults] == ["truncated_frame"]
        assert ep.link.paused
        await device.write(b"\x00\x07ignored")
        await asyncio.sleep(0.05)
        assert len(sink.frames) == 1
    # no device and no successor: a frame still queued at drain goes back to the sink as device_down
    sink2 = Sink()
    async with started(make(link + "-absent", sink2, on_down="queue")) as ep:
        await wait_until(lambda: ep.stats["open_failures"] >= 1)
        await ep.send(b"stuck\n", tag="s")
        await ep.drain(asyncio.get_running_loop().time() + 1)
        ((tag, err),) = sink2.undelivered
        assert tag == "s" and isinstance(err, DeviceDown)


async def test_a_failing_sink_is_counted_and_the_reader_goes_on(link, device, caplog):
    sink = Sink()
    sink.fail = [RuntimeError("a bug downstream"), FluxError("lane full")]
    async with started(make(link, sink)) as ep:
        await wait_up(ep)
        await device.write(b"a\nb\nc\n")
        await wait_until(lambda: sink.frames)
        assert [f for _, f in sink.frames] == [b"c"] and ep.stats["emit_dropped"] == 2
        assert "a bug downstream" in caplog.text and "lane full" in caplog.text


async def test_backpressure_pauses_reading_at_inbox_high_and_loses_nothing(link, device):
    sink = Sink(delay=0.0005)
    async with started(make(link, sink, inbox_high=16, inbox_low=4)) as ep:
        await wait_up(ep)
        lines = [b"%04d" % i for i in range(300)]
        await device.write(b"".join(x + b"\n" for x in lines), timeout=10)
        await wait_until(lambda: len(sink.frames) == 300, 10)
        assert [f for _, f in sink.frames] == lines
        assert ep.stats["read_pauses"] >= 1 and not ep.link.paused


async def test_framing_faults_reach_the_sink_and_are_counted_by_reason(link, device):
    sink = Sink()
    cfg = {"framing": "delimiter", "max_frame_bytes": 8}
    async with started(make(link, sink, framing=cfg)) as ep:
        await wait_up(ep)
        await device.write(b"ok\n" + b"x" * 30 + b"\nok2\n")
        await wait_until(lambda: len(sink.frames) == 2)
        ((meta, fault),) = sink.faults
        assert fault.reason == "frame_too_large" and meta[CONN_ID] == ep.conn_id
        m = ep.metrics()
        assert m["framing_errors"] == 1 and m["framing_errors_frame_too_large"] == 1 and m["resync_discarded"] > 0


def test_impossible_parameters_are_config_errors(link):
    for kw, key in (
        ({"max_queued": 0}, "max_queued"),
        ({"write_timeout": 0}, "write_timeout"),
        ({"reconnect_wait": 2.0, "reconnect_max": 1.0}, "reconnect_max"),
        ({"inbox_high": 8, "inbox_low": 8}, "inbox_low"),
        ({"on_down": "drop"}, "on_down"),
    ):
        with pytest.raises(ConfigError) as exc:
            make(link, **kw)
        assert exc.value.key == key, kw
