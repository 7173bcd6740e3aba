"""io_serial through reloads (issue 18 item 3), on a real pseudo-terminal pair (tests/serial_pty).

A rebuilt io_serial on the same device with the same line settings keeps the open port: the
same SerialLink and descriptor and conn.id, never closed, and not one byte the device sends
during the swaps is lost or reordered, half-read frames included. A changed baud rate or
device reopens the port and the reload report says so.
"""

import asyncio
import os

import pytest
import yaml
from helpers import running, scenario_from_yaml
from serial_pty import PtyDevice, serial_scenario, wait_until, wait_up

from fluxrig.runtime.reload import ReloadError

BAUD = 115_200
CHAR_TIME = 10 / BAUD  # 8N1: 10 bits per character


@pytest.fixture
def link(tmp_path):
    return str(tmp_path / "ttyRELOAD0")


@pytest.fixture
def device(link):
    dev = PtyDevice(link)
    yield dev
    dev.close()


def scenario(link, n: int, **extra) -> str:
    text = serial_scenario(link, baudrate=BAUD, delimiter_append=True, **extra)
    return text.replace("version: '1'", f"version: 'v{n}'")


async def stream(device, lines: int, stop: asyncio.Event) -> int:
    """The device sends numbered lines paced at 115,200 baud until `stop` (or `lines`)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sent_bytes = 0
    i = 0
    while i < lines and not stop.is_set():
        chunk = b"".join(b"%06d\n" % k for k in range(i, i + 16))
        await device.write(chunk)
        i += 16
        sent_bytes += len(chunk)
        await asyncio.sleep(max(0.0, t0 + sent_bytes * CHAR_TIME - loop.time()))
    return i


async def test_20_reloads_changing_inter_frame_delay_keep_the_device_open_and_lose_no_byte(link, device):
    async with running(scenario(link, 0), env={}) as rt:
        ser = rt.gears["ser"]
        await wait_up(ser)
        first_link, conn_id = ser.link, ser.conn_id
        fd_stat = os.fstat(first_link.fd)
        stop = asyncio.Event()
        writer = asyncio.create_task(stream(device, 10**9, stop))
        reports = []
        for n in range(1, 21):
            await asyncio.sleep(0.05)
            reports.append(await rt.swap(scenario_from_yaml(scenario(link, n, inter_frame_delay=f"{n}ms"), env={})))
            await wait_until(lambda: rt.gears["ser"].link is not None, 5, "the handed-over link")
        stop.set()
        sent = await writer
        got = await rt.gears["catch"].wait(sent, timeout=10)
        assert [m.raw for m in got] == [b"%06d" % k for k in range(sent)]  # nothing lost, doubled or reordered
        assert sent > 1000
        ser = rt.gears["ser"]
        assert all(r.rebuilt == ["ser"] and r.handover["ser"] == {"device": "handover"} for r in reports)
        assert ser.link is first_link and ser.conn_id == conn_id  # the same open, never closed
        st = os.fstat(ser.link.fd)
        assert (st.st_dev, st.st_ino, st.st_rdev) == (fd_stat.st_dev, fd_stat.st_ino, fd_stat.st_rdev)
        m = ser.metrics()
        assert m["opens"] == 1 and m["reconnects"] == 0 and m["adopted"] == 1
        assert ser.endpoint.frame_gap == 0.020  # the new setting applies
        assert {m.meta["conn.id"] for m in got} == {conn_id}


async def test_a_frame_half_read_at_the_swap_is_carried_over(link, device):
    async with running(scenario(link, 0), env={}) as rt:
        await wait_up(rt.gears["ser"])
        for n in range(1, 4):
            await device.write(b"half-")
            await wait_until(lambda n=n: rt.gears["ser"].link.bytes_in >= 10 * (n - 1) + 5, 5, "the first half")
            await rt.swap(scenario_from_yaml(scenario(link, n, write_timeout=f"{n + 1}s"), env={}))
            await device.write(b"done\n")
            got = await rt.gears["catch"].wait(n)
            assert got[-1].raw == b"half-done"
        assert not rt.gears["catch"].got["in_err"]


async def test_writes_during_reloads_all_reach_the_device_in_order(link, device):
    async with running(scenario(link, 0), env={}) as rt:
        await wait_up(rt.gears["ser"])
        total = 0
        for n in range(1, 11):
            swap = asyncio.create_task(
                rt.swap(scenario_from_yaml(scenario(link, n, inter_frame_delay=f"{n % 2}ms"), env={}))
            )
            for _ in range(20):  # pushed while the swap runs: to the old or the new gear
                await rt.gears["feed"].push(b"w%04d" % total)
                total += 1
                await asyncio.sleep(0)
            await swap
        data = await device.read_exactly(total * 6, timeout=10)
        assert data == b"".join(b"w%04d\n" % k for k in range(total))
        assert not rt.gears["catch"].got["in_err"]


async def test_a_changed_baud_rate_reopens_the_device_and_says_so(link, device):
    async with running(scenario(link, 0), env={}) as rt:
        old = rt.gears["ser"]
        await wait_up(old)
        report = await rt.swap(scenario_from_yaml(serial_scenario(link, baudrate=9600, delimiter_append=True), env={}))
        assert report.handover["ser"] == {"device": "reopen", "reason": "baudrate changed"}
        new = rt.gears["ser"]
        await wait_up(new, 3)
        assert new.link is not None and new.conn_id != old.conn_id and old.link is None
        assert new.metrics()["adopted"] == 0 and new.settings.baudrate == 9600
        await device.write(b"after\n")
        assert (await rt.gears["catch"].wait(1))[0].raw == b"after"


async def test_a_changed_device_opens_the_new_one_and_says_so(link, device, tmp_path):
    other = PtyDevice(str(tmp_path / "ttyOTHER"))
    try:
        async with running(scenario(link, 0), env={}) as rt:
            await wait_up(rt.gears["ser"])
            report = await rt.swap(scenario_from_yaml(scenario(other.link, 1), env={}))
            assert report.handover["ser"] == {"device": "reopen", "reason": "port changed"}
            await wait_up(rt.gears["ser"], 3)
            await other.write(b"other\n")
            assert (await rt.gears["catch"].wait(1))[0].raw == b"other"
    finally:
        other.close()


async def test_a_framing_change_keeps_the_device_and_says_the_partial_frame_is_not_carried(link, device):
    async with running(scenario(link, 0), env={}) as rt:
        ser = rt.gears["ser"]
        await wait_up(ser)
        first = ser.link
        report = await rt.swap(scenario_from_yaml(scenario(link, 1, delimiter=";"), env={}))
        assert report.handover["ser"]["device"] == "handover"
        assert "framing changed" in report.handover["ser"]["reason"]
        await wait_until(lambda: rt.gears["ser"].link is not None, 5, "the handed-over link")
        assert rt.gears["ser"].link is first
        await device.write(b"semi;colon;")
        got = await rt.gears["catch"].wait(2)
        assert [m.raw for m in got] == [b"semi", b"colon"]


async def test_a_rolled_back_swap_leaves_the_device_with_the_running_gear(link, device):
    import test_runtime  # noqa: F401  registers test_recorder

    async with running(scenario(link, 0), env={}) as rt:
        ser = rt.gears["ser"]
        await wait_up(ser)
        first = ser.link
        doc = yaml.safe_load(scenario(link, 1, inter_frame_delay="5ms"))
        doc["gears"].append({"name": "bad", "type": "test_recorder", "config": {"fail_start": True}})
        failing = yaml.safe_dump(doc)
        with pytest.raises(ReloadError):
            await rt.swap(scenario_from_yaml(failing, env={}))
        assert rt.gears["ser"] is ser and ser.link is first and ser.endpoint._successor is None
        await device.write(b"still\n")
        assert (await rt.gears["catch"].wait(1))[0].raw == b"still"
        # and a later reload hands it over as usual
        report = await rt.swap(scenario_from_yaml(scenario(link, 2, inter_frame_delay="5ms"), env={}))
        assert report.handover["ser"] == {"device": "handover"}
        await wait_until(lambda: rt.gears["ser"].link is first, 5, "the handed-over link")


async def test_a_pyserial_url_link_in_thread_mode_is_handed_over_too():
    # socket:// (a TCP "device server"): the link reads in the gear's executor, which moves along
    conns = []

    async def serve(r, w):
        conns.append((r, w))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"socket://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with running(serial_scenario(url, delimiter_append=True), env={}) as rt:
            await wait_up(rt.gears["ser"])
            assert rt.gears["ser"].link.mode == "thread"
            await wait_until(lambda: conns)
            r, w = conns[0]
            for n in range(1, 6):
                w.write(b"in%d-" % n)
                await w.drain()
                await rt.swap(
                    scenario_from_yaml(serial_scenario(url, delimiter_append=True, write_timeout=f"{n}s"), env={})
                )
                w.write(b"done\n")
                assert (await rt.gears["catch"].wait(n))[-1].raw == b"in%d-done" % n
                await rt.gears["feed"].push(b"out%d" % n)
                assert await asyncio.wait_for(r.readline(), 3) == b"out%d\n" % n
            assert len(conns) == 1 and rt.gears["ser"].metrics()["adopted"] == 1
    finally:
        server.close()
        await server.wait_closed()
