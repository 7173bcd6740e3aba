"""io_iso8583 over loopback: every framing preset, TPDU mirror, garbage peers, timeouts, client leg."""

import asyncio

import pytest
from helpers import free_port, running, scenario_from_yaml

from fluxrig.iso8583.peek import BadFrame, mirror_tpdu, peek
from fluxrig.runtime import ControlBus, Runtime

MSG_0800 = (
    b"0800" + bytes.fromhex("8220000000000000") + bytes.fromhex("0400000000000000") + b"1127120000" + b"000001" + b"301"
)


def echo(port, extra=""):
    return f"""
meta: {{version: '1'}}
gears:
  - name: iso
    type: io_iso8583
    config: {{mode: server, bind: "127.0.0.1:{port}"{extra}}}
wires:
  - {{from: iso.out, to: iso.in}}
"""


def frame(kind: str, body: bytes, includes=False) -> bytes:
    n = len(body)
    if kind == "len2_be":
        return (n + (2 if includes else 0)).to_bytes(2, "big") + body
    if kind == "len2_le":
        return (n + (2 if includes else 0)).to_bytes(2, "little") + body
    if kind == "len4_be":
        return (n + (4 if includes else 0)).to_bytes(4, "big") + body
    if kind == "ascii4":
        return b"%04d" % (n + (4 if includes else 0)) + body
    if kind == "bcd2":
        return bytes.fromhex("%04d" % (n + (2 if includes else 0))) + body
    if kind == "vap":
        return (n + (4 if includes else 0)).to_bytes(2, "big") + b"\x00\x00" + body
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["len2_be", "len2_le", "len4_be", "ascii4", "bcd2", "vap"])
@pytest.mark.parametrize("includes", [False, True])
async def test_every_preset_round_trips(kind, includes):
    port = free_port()
    extra = f", framing: {kind}, includes_header: {str(includes).lower()}"
    async with running(echo(port, extra)):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        data = frame(kind, MSG_0800, includes)
        for b in data:  # one byte at a time
            w.write(bytes([b]))
            await w.drain()
        w.write(data)
        got = await asyncio.wait_for(r.readexactly(2 * len(data)), 3)
        assert got == data * 2
        w.close()


async def test_tpdu_mirrored_on_reply():
    port = free_port()
    async with running(echo(port, ", header_type: tpdu, header_mode: mirror")):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        tpdu = bytes.fromhex("6000120034")
        w.write(frame("len2_be", tpdu + MSG_0800))
        got = await asyncio.wait_for(r.readexactly(2 + 5 + len(MSG_0800)), 3)
        assert got[2:7] == bytes.fromhex("6000340012")
        assert got[7:] == MSG_0800
        w.close()


async def test_header_strip_and_preserve():
    port = free_port()
    async with running(echo(port, ", header_type: fixed, header_size: 3, header_mode: preserve")):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(frame("len2_be", b"HDR" + MSG_0800))
        got = await asyncio.wait_for(r.readexactly(2 + 3 + len(MSG_0800)), 3)
        assert got[2:5] == b"HDR"
        w.close()
    port = free_port()
    async with running(echo(port, ", header_type: tpdu, header_mode: strip")):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(frame("len2_be", bytes(5) + MSG_0800))
        got = await asyncio.wait_for(r.readexactly(2 + len(MSG_0800)), 3)
        assert got[2:] == MSG_0800
        w.close()


async def test_garbage_peer_is_disconnected_others_unaffected():
    port = free_port()
    async with running(echo(port)) as rt:
        good_r, good_w = await asyncio.open_connection("127.0.0.1", port)
        bad_r, bad_w = await asyncio.open_connection("127.0.0.1", port)
        bad_w.write(frame("len2_be", b"GET / HTTP/1.1\r\n\r\n") + frame("len2_be", MSG_0800))
        assert await asyncio.wait_for(bad_r.read(), 3) == b""  # nothing echoed, not even the good frame after
        good_w.write(frame("len2_be", MSG_0800))
        assert (await asyncio.wait_for(good_r.readexactly(2 + len(MSG_0800)), 3))[2:] == MSG_0800
        assert rt.gears["iso"].bad_frames == 1
        good_w.close()


async def test_http_request_on_a_length_header_never_hangs():
    port = free_port()
    async with running(echo(port, ", framing: ascii4")):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # "GET " is not four digits
        assert await asyncio.wait_for(r.read(), 3) == b""


async def test_read_timeout_on_a_half_frame():
    port = free_port()
    async with running(echo(port, ", read_timeout: 200ms")):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(frame("len2_be", MSG_0800)[:10])
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(r.read(), 3) == b""
        assert 0.15 < loop.time() - t0 < 2


async def test_client_leg_link_events_and_reconnect():
    port = free_port()
    text = f"""
meta: {{version: '1'}}
gears:
  - name: host
    type: io_iso8583
    config: {{mode: client, connect: "127.0.0.1:{port}", reconnect_wait: 50ms}}
  - {{name: sink, type: sink, config: {{mode: "null"}}}}
wires:
  - {{from: host.out, to: sink.in}}
"""
    control = ControlBus()
    events = []
    control.subscribe("link.host", lambda c: events.append(c["cmd"]))
    rt = Runtime(scenario_from_yaml(text), control=control)
    await rt.start()
    conns = []

    async def handle(reader, writer):
        conns.append(writer)
        writer.write(frame("len2_be", MSG_0800))
        await writer.drain()

    try:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        for _ in range(100):
            if rt.gears["sink"].counters.messages_in:
                break
            await asyncio.sleep(0.02)
        assert rt.gears["sink"].counters.messages_in == 1
        conns[0].close()  # the host drops the link; the gear redials
        for _ in range(200):
            if events.count("conn.up") >= 2:
                break
            await asyncio.sleep(0.02)
        assert events[:3] == ["conn.up", "conn.down", "conn.up"]
        server.close()
    finally:
        await rt.shutdown(1)


def test_peek_rules():
    assert peek(MSG_0800) == ("0800", 2)
    assert peek(bytes.fromhex("0800") + bytes(8), "bcd") == ("0800", 1)
    assert peek(bytes([0xF0, 0xF2, 0xF0, 0xF0]) + bytes(8), "ebcdic") == ("0200", 1)
    hex_bitmap = b"0200" + b"7234054128C28805"
    assert peek(hex_bitmap) == ("0200", 1)
    for bad in (b"", b"08", b"08x0" + bytes(8), b"0800" + b"\x80" + bytes(6), b"0800" + b"\x80" + bytes(10)):
        with pytest.raises(BadFrame):
            peek(bad)
    assert mirror_tpdu(bytes.fromhex("6000120034")) == bytes.fromhex("6000340012")
