"""io_serial over real pseudo-terminals: every framing both ways, split reads, bad CRC,
oversize frames, unplug/replug, writes while down, timeouts, pacing, validation."""

import asyncio
import time

import pytest
import serial
from helpers import running, scenario_from_yaml
from serial_pty import PtyDevice, serial_scenario, wait_until, wait_up

from fluxrig.errors import ScenarioError
from fluxrig.framing import make_framer
from fluxrig.framing.serial import crc16_modbus


@pytest.fixture
def link(tmp_path):
    return str(tmp_path / "ttyFLUX0")


@pytest.fixture
def device(link):
    dev = PtyDevice(link)
    yield dev
    dev.close()


def events_of(rt, gear="ser"):
    seen = []
    rt.control.subscribe(f"link.{gear}", seen.append)
    return seen


FRAMINGS = {
    "delimiter": ({"framing": "delimiter", "delimiter_append": True}, [b"alpha", b"b\x00\xff\xc0", b"gamma delta"]),
    "length_prefix": ({"framing": "length_prefix"}, [b"alpha", b"\n\x00\xc0", b"x" * 300]),
    "fixed": ({"framing": "fixed", "fixed_size": 5}, [b"abcde", b"\x00\x01\x02\x03\x04", b"zz\nzz"]),
    "slip": ({"framing": "slip"}, [b"alpha", b"\xc0\xdb\xc0", b"end\xdb"]),
    "none": ({"framing": "none"}, [b"raw bytes \x00\xff", b"more"]),
    "idle_gap": ({"framing": "idle_gap", "idle_gap_ms": 80}, [b"alpha", b"\n\x00beta\xc0"]),
    "modbus_rtu": (
        {"framing": "modbus_rtu", "idle_gap_ms": 80},
        [bytes.fromhex("01030000000A"), bytes.fromhex("0110000100020400010002")],
    ),
}
TIMED_SILENCE = 0.25  # between frames on the idle-gap framings (gap 80 ms)


@pytest.mark.parametrize("framing", list(FRAMINGS))
async def test_every_framing_both_directions_split_at_every_byte(framing, link, device):
    cfg, payloads = FRAMINGS[framing]
    encoder = make_framer(cfg)
    wire = [encoder.encode(p) for p in payloads]
    timed = framing in ("idle_gap", "modbus_rtu")
    async with running(serial_scenario(link, **cfg), env={}) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        await wait_up(ser)

        # device -> out, first whole (timed: one write per frame), then one byte per read
        for rounds, bytewise in enumerate((False, True)):
            for w in wire:
                if bytewise:
                    await device.write_each_byte(w, ser)
                else:
                    await device.write(w)
                if timed:
                    await asyncio.sleep(TIMED_SILENCE)
            want = len(payloads) * (rounds + 1)
            if framing == "none":
                total = sum(len(w) for w in wire) * (rounds + 1)
                await wait_until(lambda total=total: sum(len(m.raw) for m in catch.got["in"]) >= total)
            else:
                await catch.wait(want)
        got = [m.raw for m in catch.got["in"]]
        if framing == "none":
            assert b"".join(got) == b"".join(wire) * 2
            assert any(len(g) == 1 for g in got)  # the byte-wise pass really was split
        else:
            assert got == payloads * 2
        assert catch.got["in_err"] == []
        m = catch.got["in"][0]
        assert m.meta["serial.port"] == link and m.meta["flux.source"] == "io_serial"
        assert m.meta["conn.id"] == ser.conn_id and m.meta["conn.gear"] == "ser"

        # in -> device: each payload framed the same way
        for p in payloads:
            await rt.gears["feed"].push(p)
        assert await device.read_exactly(sum(map(len, wire))) == b"".join(wire)
        metrics = ser.metrics()
        assert metrics["frames_out"] == len(payloads)
        assert metrics["bytes_out"] == sum(map(len, wire))
        assert metrics["bytes_in"] == 2 * sum(map(len, wire))


async def test_slow_consumer_pauses_reading_and_loses_nothing(link, device, monkeypatch):
    import fluxrig.gears.io_serial as io_serial

    monkeypatch.setattr(io_serial, "INBOX_HIGH", 64)
    monkeypatch.setattr(io_serial, "INBOX_LOW", 8)
    lines = [b"line %05d" % i for i in range(600)]
    async with running(serial_scenario(link, catch_delay=0.0005), env={}) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        await wait_up(ser)
        await device.write(b"".join(x + b"\n" for x in lines), timeout=20)
        await catch.wait(len(lines), timeout=20)
        assert [m.raw for m in catch.got["in"]] == lines
        assert ser.metrics()["read_pauses"] >= 1 and ser.link is not None and not ser.link.paused


async def test_modbus_bad_crc_goes_to_error_and_later_frames_survive(link, device):
    good = bytes.fromhex("01030000000AC5CD")  # read 10 holding registers from slave 1
    assert crc16_modbus(good[:-2]).to_bytes(2, "little") == good[-2:]
    bad = good[:-1] + b"\xce"
    async with running(
        serial_scenario(link, framing="modbus_rtu", baudrate=19200, parity="E", idle_gap_ms=40), env={}
    ) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        await wait_up(ser)
        for frame in (good, bad, good):
            await device.write(frame)
            await asyncio.sleep(0.15)
        await catch.wait(2)
        errs = await catch.wait(1, "in_err")
        assert [m.raw for m in catch.got["in"]] == [good[:-2], good[:-2]]
        err = errs[0]
        assert err.meta["error.reason"] == "crc_mismatch"
        assert err.meta["error.crc_expected"] == "CDC5" and err.meta["error.crc_actual"] == "CEC5"
        assert err.raw == bad and err.meta["conn.id"] == ser.conn_id
        # a frame too short to hold a CRC is a bad frame, not a crash
        await device.write(b"\x01\x03")
        await asyncio.sleep(0.15)
        assert (await catch.wait(2, "in_err"))[1].meta["error.reason"] == "bad_frame"
        assert ser.metrics()["framing_errors_crc_mismatch"] == 1
        # egress appends the CRC, low byte first
        await rt.gears["feed"].push(good[:-2])
        assert await device.read_exactly(8) == good


@pytest.mark.parametrize("bytewise", [False, True])
async def test_oversize_line_goes_to_error_then_framing_resumes_after_its_delimiter(link, device, bytewise):
    stream = b"ok1\n" + b"x" * 100 + b"\nok2\n" + b"y" * 40 + b"\nok3\n"
    async with running(serial_scenario(link, framing="delimiter", max_frame_bytes=16), env={}) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        await wait_up(ser)
        if bytewise:
            await device.write_each_byte(stream, ser)
        else:
            await device.write(stream)
        await catch.wait(3)
        errs = await catch.wait(2, "in_err")
        assert [m.raw for m in catch.got["in"]] == [b"ok1", b"ok2", b"ok3"]
        assert {e.meta["error.reason"] for e in errs} == {"frame_too_large"}
        assert errs[0].meta["error.limit"] == "16"
        assert ser.link is not None  # the line stays open: a serial line resynchronises
        assert ser.metrics()["resync_discarded"] > 0


async def test_oversize_length_prefix_resynchronises_on_silence(link, device):
    async with running(
        serial_scenario(link, framing="length_prefix", max_frame_bytes=64, resync_gap_ms=60), env={}
    ) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        await wait_up(ser)
        await device.write(b"\x00\x03one" + b"\x03\xe8" + b"z" * 200)  # a 1000-byte frame announced
        await asyncio.sleep(0.2)
        await device.write(b"\x00\x03two")
        await catch.wait(2)
        assert [m.raw for m in catch.got["in"]] == [b"one", b"two"]
        err = (await catch.wait(1, "in_err"))[0]
        assert err.meta["error.reason"] == "frame_too_large" and err.meta["error.size"] == "1000"


async def test_oversize_slip_and_idle_gap(link, device):
    async with running(serial_scenario(link, framing="slip", max_frame_bytes=8), env={}) as rt:
        catch = rt.gears["catch"]
        await wait_up(rt.gears["ser"])
        await device.write(b"\xc0short\xc0" + b"L" * 50 + b"\xc0after\xc0")
        await catch.wait(2)
        assert [m.raw for m in catch.got["in"]] == [b"short", b"after"]
        assert (await catch.wait(1, "in_err"))[0].meta["error.reason"] == "frame_too_large"
    device2 = PtyDevice(link)
    try:
        async with running(serial_scenario(link, framing="idle_gap", idle_gap_ms=50, max_frame_bytes=8), env={}) as rt:
            catch = rt.gears["catch"]
            await wait_up(rt.gears["ser"])
            await device2.write(b"tiny")
            await asyncio.sleep(0.2)
            await device2.write(b"M" * 30)
            await asyncio.sleep(0.2)
            await device2.write(b"next")
            await catch.wait(2)
            assert [m.raw for m in catch.got["in"]] == [b"tiny", b"next"]
            assert (await catch.wait(1, "in_err"))[0].meta["error.reason"] == "frame_too_large"
    finally:
        device2.close()


async def test_unplug_and_replug_by_removing_and_recreating_the_device_link(link, device):
    async with running(
        serial_scenario(link, delimiter_append=True, reconnect_wait="50ms", reconnect_max="200ms"), env={}
    ) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        seen = events_of(rt)
        await wait_up(ser)
        first = ser.conn_id
        await device.write(b"before\n")
        await catch.wait(1)
        device.unplug()
        await wait_until(lambda: ser.link is None, what="conn.down")
        await asyncio.sleep(0.4)  # a few reopen attempts fail: the node is gone
        assert ser.metrics()["open_failures"] >= 1
        replug = PtyDevice(link)  # a new pty: another /dev/pts/N behind the same link
        try:
            await wait_up(ser, 3)
            assert ser.conn_id != first
            await replug.write(b"after\n")
            msgs = await catch.wait(2)
            assert [m.raw for m in msgs] == [b"before", b"after"]
            assert msgs[0].meta["conn.id"] == first and msgs[1].meta["conn.id"] == ser.conn_id
            await rt.gears["feed"].push(b"to the new device")
            assert await replug.read_exactly(18) == b"to the new device\n"
            assert [e["cmd"] for e in seen] == ["conn.up", "conn.down", "conn.up"]
            assert seen[1]["args"]["conn_id"] == first and seen[1]["args"]["reason"]
            assert seen[2]["args"]["conn_id"] == ser.conn_id
            assert ser.metrics()["reconnects"] == 1
        finally:
            replug.close()


async def test_link_repointed_at_another_device_is_noticed(link, device):
    async with running(serial_scenario(link, device_check_interval="50ms", reconnect_wait="50ms"), env={}) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        await wait_up(ser)
        first = ser.conn_id
        other = PtyDevice(link)  # the same name now leads elsewhere; the old pty is still alive
        try:
            await wait_until(lambda: ser.link is not None and ser.conn_id != first, 3, "the reopen")
            await other.write(b"from the new one\n")
            assert (await catch.wait(1))[0].raw == b"from the new one"
            assert "now names another device" in ser.down_reason or "gone" in ser.down_reason
        finally:
            other.close()


async def test_device_absent_at_start_then_plugged_in_with_backoff(link):
    async with running(serial_scenario(link, reconnect_wait="50ms", reconnect_max="400ms"), env={}) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        seen = events_of(rt)
        await wait_until(lambda: seen, what="the first conn.down")
        assert seen[0]["cmd"] == "conn.down" and "cannot open" in seen[0]["args"]["reason"]
        await asyncio.sleep(0.8)
        # attempts at about 0, 0.05, 0.15, 0.35, 0.75 s: doubling waits, not one every 50 ms
        assert 3 <= ser.metrics()["open_failures"] <= 6, ser.metrics()["open_failures"]
        assert [e["cmd"] for e in seen] == ["conn.down"]  # said once, not per attempt
        dev = PtyDevice(link)
        try:
            await wait_up(ser, 3)
            await dev.write(b"late\n")
            assert (await catch.wait(1))[0].raw == b"late"
        finally:
            dev.close()


async def test_writes_while_down_go_to_error(link, device):
    async with running(serial_scenario(link, on_down="error", reconnect_wait="50ms"), env={}) as rt:
        ser, catch, feed = rt.gears["ser"], rt.gears["catch"], rt.gears["feed"]
        await wait_up(ser)
        device.unplug()
        await wait_until(lambda: ser.link is None)
        await feed.push(b"nobody home")
        err = (await catch.wait(1, "in_err"))[0]
        assert err.raw == b"nobody home" and err.meta["error.reason"] == "device_down"
        assert ser.metrics()["down_errors"] == 1


async def test_writes_while_down_queue_bounded_oldest_dropped_counted_then_flushed(link, device):
    async with running(
        serial_scenario(
            link, on_down="queue", max_queued=3, delimiter_append=True, reconnect_wait="50ms", reconnect_max="100ms"
        ),
        env={},
    ) as rt:
        ser, catch, feed = rt.gears["ser"], rt.gears["catch"], rt.gears["feed"]
        await wait_up(ser)
        device.unplug()
        await wait_until(lambda: ser.link is None)
        for i in range(5):
            await feed.push(b"m%d" % i)
        errs = await catch.wait(2, "in_err")
        assert [(e.raw, e.meta["error.reason"]) for e in errs] == [(b"m0", "queue_overflow"), (b"m1", "queue_overflow")]
        assert ser.metrics()["queued"] == 3 and ser.metrics()["queue_dropped"] == 2
        replug = PtyDevice(link)
        try:
            await wait_up(ser, 3)
            assert await replug.read_exactly(9) == b"m2\nm3\nm4\n"
            await feed.push(b"m5")
            assert await replug.read_exactly(3) == b"m5\n"
            assert ser.metrics()["queued"] == 0
        finally:
            replug.close()


async def test_write_timeout_when_the_device_does_not_drain(link, device):
    async with running(serial_scenario(link, framing="none", write_timeout="200ms"), env={}) as rt:
        ser, catch, feed = rt.gears["ser"], rt.gears["catch"], rt.gears["feed"]
        await wait_up(ser)
        t0 = time.monotonic()
        while not catch.got["in_err"] and time.monotonic() - t0 < 10:
            await feed.push(b"w" * 4096)  # the device (pty master) never reads
        err = catch.got["in_err"][0]
        assert err.meta["error.reason"] == "write_timeout" and "write_timeout" in err.meta["error.detail"]
        assert ser.metrics()["write_timeouts"] >= 1
        assert ser.link is not None  # a slow device is not a gone device
        await device.read_for(0.05)  # the device reads again: the line works again
        await feed.push(b"after")
        got = b""
        for _ in range(100):
            got += await device.read_for(0.02)
            if got.endswith(b"after"):
                break
        assert got.endswith(b"after")


async def test_inter_frame_delay_spaces_frames_on_the_wire(link, device):
    async with running(serial_scenario(link, framing="none", baudrate=115200, inter_frame_delay="60ms"), env={}) as rt:
        ser, feed = rt.gears["ser"], rt.gears["feed"]
        await wait_up(ser)
        reader = asyncio.ensure_future(device.read_timed(24, timeout=5))
        for i in range(4):
            await feed.push(b"frame%d" % i)  # returns once written: the pacing waits in here
        chunks = await reader
        starts = []
        for t, c in chunks:
            starts.extend([t] * (len(c) // 6))
        assert b"".join(c for _, c in chunks) == b"frame0frame1frame2frame3"
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert len(gaps) == 3 and min(gaps) >= 0.05, gaps


async def test_modbus_frames_written_keep_the_framing_silence_between_them(link, device):
    async with running(serial_scenario(link, framing="modbus_rtu", baudrate=115200, idle_gap_ms=40), env={}) as rt:
        ser, feed = rt.gears["ser"], rt.gears["feed"]
        await wait_up(ser)
        reader = asyncio.ensure_future(device.read_timed(16, timeout=5))
        await feed.push(bytes.fromhex("01030000000A"))
        await feed.push(bytes.fromhex("01030000000A"))
        chunks = await reader
        assert b"".join(c for _, c in chunks) == bytes.fromhex("01030000000AC5CD") * 2
        assert len(chunks) == 2 and chunks[1][0] - chunks[0][0] >= 0.035


async def test_kill_switch_closes_and_reopens_with_a_new_conn_id(link, device):
    async with running(serial_scenario(link, reconnect_wait="50ms"), env={}) as rt:
        ser = rt.gears["ser"]
        seen = events_of(rt)
        await wait_up(ser)
        first = ser.conn_id
        rt.control.publish("ser", {"cmd": "conn.close", "args": {"conn_id": first, "reason": "operator"}})
        await wait_until(lambda: ser.link is not None and ser.conn_id != first, 3, "the reopen")
        assert [e["cmd"] for e in seen] == ["conn.up", "conn.down", "conn.up"]
        assert "kill switch: operator" in seen[1]["args"]["reason"]


async def test_exclusive_open_keeps_a_second_opener_out(link, device):
    async with running(serial_scenario(link), env={}) as rt:
        await wait_up(rt.gears["ser"])
        with pytest.raises(serial.SerialException, match="exclusively lock"):
            serial.Serial(link, exclusive=True)


async def test_rs485_on_a_port_without_it_is_a_clear_error_not_a_crash(link, device, caplog):
    async with running(serial_scenario(link, rs485={"rts_level_for_tx": True}, reconnect_wait="50ms"), env={}) as rt:
        ser = rt.gears["ser"]
        await wait_until(lambda: ser.metrics()["open_failures"] >= 1)
        assert ser.link is None
        assert "RS485" in caplog.text and "does not support" in caplog.text


async def test_reload_with_changed_config_closes_then_reopens(link, device):
    text = serial_scenario(link, baudrate=9600, delimiter_append=True)
    async with running(text, env={}) as rt:
        old = rt.gears["ser"]
        await wait_up(old)
        report = await rt.swap(scenario_from_yaml(serial_scenario(link, baudrate=19200, delimiter_append=True), env={}))
        assert report.ok and report.rebuilt == ["ser"]
        new = rt.gears["ser"]
        assert new is not old and old.link is None
        await wait_up(new, 3)
        assert new.conn_id != old.conn_id and new.settings.baudrate == 19200
        await device.write(b"reloaded\n")
        assert (await rt.gears["catch"].wait(1))[0].raw == b"reloaded"


async def test_url_ports_use_the_bounded_executor_loop_and_socket(tmp_path):
    # loop:// echoes writes back as reads, inside pyserial (no file descriptor: thread mode)
    async with running(serial_scenario("loop://", delimiter_append=True), env={}) as rt:
        ser, catch = rt.gears["ser"], rt.gears["catch"]
        await wait_up(ser)
        assert ser.link.mode == "thread"
        await rt.gears["feed"].push(b"looped")
        assert (await catch.wait(1))[0].raw == b"looped"

    # socket:// to a TCP "device server": reads, writes, and a reconnect when it hangs up
    conns = []

    async def serve(r, w):
        conns.append((r, w))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running(
            serial_scenario(f"socket://127.0.0.1:{port}", delimiter_append=True, reconnect_wait="50ms"), env={}
        ) as rt:
            ser, catch = rt.gears["ser"], rt.gears["catch"]
            await wait_up(ser)
            await wait_until(lambda: conns)
            r, w = conns[0]
            w.write(b"from tcp\n")
            await w.drain()
            assert (await catch.wait(1))[0].raw == b"from tcp"
            await rt.gears["feed"].push(b"to tcp")
            assert await asyncio.wait_for(r.readline(), 3) == b"to tcp\n"
            first = ser.conn_id
            w.close()
            await wait_until(
                lambda: len(conns) == 2 and ser.link is not None and ser.conn_id != first, 5, "the reconnect"
            )
    finally:
        server.close()
        await server.wait_closed()


def problems(**config) -> str:
    with pytest.raises(ScenarioError) as exc:
        scenario_from_yaml(serial_scenario(config.pop("port", "/dev/ttyUSB0"), **config), env={})
    return "\n".join(map(str, exc.value.problems))


def test_config_validation_messages():
    assert "'even' is not a parity letter: use N (none), E (even)" in problems(parity="even")
    assert "0 is not a usable baud rate" in problems(baudrate=0)
    assert "9 data bits: use 5, 6, 7 or 8" in problems(bytesize=9)
    assert "3 stop bits: use 1, 1.5 or 2" in problems(stopbits=3)
    assert "XON/XOFF removes bytes 0x11 and 0x13" in problems(framing="modbus_rtu", xonxoff=True)
    assert "needs a local serial device" in problems(port="socket://127.0.0.1:1", rs485=True)
    assert "unknown pyserial URL scheme 'bogus'" in problems(port="bogus://x")
    assert "must not be shorter than reconnect_wait" in problems(reconnect_wait="10s", reconnect_max="1s")
    assert "fixed_size" in problems(framing="fixed")
    assert "required" in problems(port="") or "is required" in problems(port="")
    # and a good one builds
    scenario_from_yaml(
        serial_scenario("/dev/ttyUSB0", framing="modbus_rtu", baudrate=19200, parity="E", rs485=True), env={}
    )


@pytest.mark.slow
async def test_115200_baud_stream_for_10_seconds_without_loss(link, device, record_property):
    """Both directions at line rate: the device sends numbered lines at 115,200 baud for 10 s,
    the gear echoes each line back (out -> in); every line must come back, in order."""
    baud, seconds = 115200, 10.0
    rate = baud / 10  # bytes per second, 8N1
    text = f"""
meta: {{version: '1'}}
gears:
  - name: ser
    type: io_serial
    config: {{port: "{link}", baudrate: {baud}, framing: delimiter, delimiter_append: true}}
wires:
  - {{from: ser.out, to: ser.in}}
"""
    async with running(text, env={}) as rt:
        ser = rt.gears["ser"]
        await wait_up(ser)
        lines = []
        received = bytearray()
        sent = 0
        t0 = time.monotonic()
        seq = 0
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                break
            budget = int(elapsed * rate) - sent
            chunk = bytearray()
            while len(chunk) < budget:
                line = b"%08d:%s\n" % (seq, b"0123456789abcdefghijklmnopqrstuvwxyz"[: seq % 37])
                lines.append(line)
                chunk += line
                seq += 1
            if chunk:
                await device.write(bytes(chunk))
                sent += len(chunk)
            device._read_now()
            await asyncio.sleep(0.005)
        duration = time.monotonic() - t0
        expected = b"".join(lines)
        deadline = time.monotonic() + 5
        while len(device.buf) < len(expected) and time.monotonic() < deadline:
            device._read_now()
            await asyncio.sleep(0.01)
        received = bytes(device.buf)
        m = ser.metrics()
    assert received == expected, (len(received), len(expected))
    assert m["frames_in"] == m["frames_out"] == len(lines)
    achieved = sent / duration
    record_property(
        "serial_115200",
        {"bytes_each_way": sent, "lines": len(lines), "seconds": round(duration, 2), "bytes_per_s": round(achieved)},
    )
    print(
        f"\n115200-baud run: {sent} bytes each way, {len(lines)} lines, {duration:.2f} s, "
        f"{achieved:.0f} B/s (line rate {rate:.0f} B/s), lost 0"
    )
    assert achieved >= 0.97 * rate


UVLOOP_CASES = [
    ("modbus_crc", lambda link, dev: test_modbus_bad_crc_goes_to_error_and_later_frames_survive(link, dev)),
    ("idle_gap", lambda link, dev: test_every_framing_both_directions_split_at_every_byte("idle_gap", link, dev)),
    ("slip", lambda link, dev: test_every_framing_both_directions_split_at_every_byte("slip", link, dev)),
    ("replug", lambda link, dev: test_unplug_and_replug_by_removing_and_recreating_the_device_link(link, dev)),
    ("write_timeout", lambda link, dev: test_write_timeout_when_the_device_does_not_drain(link, dev)),
]


@pytest.mark.parametrize("case", [c for c, _ in UVLOOP_CASES])
def test_under_uvloop(case, tmp_path):
    """`fluxrig run` uses uvloop when installed: its add_reader/add_writer and timers too."""
    uvloop = pytest.importorskip("uvloop")
    link = str(tmp_path / "ttyUV0")
    dev = PtyDevice(link)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(dict(UVLOOP_CASES)[case](link, dev))
    finally:
        dev.close()
