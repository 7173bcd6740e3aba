"""io_tcp over real loopback sockets: echo, framing, routing, limits, timeouts, reconnect."""

import asyncio
import struct

import pytest
from helpers import free_port, running, scenario_from_yaml, tcp_lines

from fluxrig.runtime import ControlBus, Runtime


def echo(port, extra="", map_value="{{ raw | upper }}"):
    return f"""
meta: {{version: '1'}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}", delimiter_append: true{extra}}}
  - name: up
    type: map
    config: {{ops: [{{set: raw, value: "{map_value}"}}]}}
wires:
  - {{from: gw.out, to: up.in}}
  - {{from: up.out, to: gw.in}}
"""


async def test_newline_echo_many_clients_routed_by_conn_id():
    port = free_port()
    async with running(echo(port)):

        async def client(i):
            lines = [f"c{i}-{j}".encode() for j in range(50)]
            got = await tcp_lines(port, lines)
            assert got == [x.upper() for x in lines]

        await asyncio.gather(*(client(i) for i in range(20)))


async def test_crlf_and_split_writes():
    port = free_port()
    async with running(echo(port)):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for b in b"ab\r\ncd\n":
            w.write(bytes([b]))
            await w.drain()
        assert await asyncio.wait_for(r.readline(), 3) == b"AB\n"
        assert await asyncio.wait_for(r.readline(), 3) == b"CD\n"
        w.close()


async def test_length_prefix_little_endian_counting_itself():
    port = free_port()
    extra = ", framing: length_prefix, length_size: 4, length_endian: little, length_includes_header: true"
    async with running(echo(port, extra)):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        body = b"x" * 268
        w.write(struct.pack("<I", len(body) + 4) + body)
        hdr = await asyncio.wait_for(r.readexactly(4), 3)
        assert struct.unpack("<I", hdr)[0] == 272
        assert await r.readexactly(268) == b"X" * 268
        w.close()


async def test_oversize_frame_closes_only_that_connection(caplog):
    port = free_port()
    async with running(echo(port, ", max_frame_bytes: 16")) as rt:
        good_r, good_w = await asyncio.open_connection("127.0.0.1", port)
        bad_r, bad_w = await asyncio.open_connection("127.0.0.1", port)
        bad_w.write(b"y" * 64)
        await bad_w.drain()
        assert await asyncio.wait_for(bad_r.read(), 3) == b""  # closed by the gear
        good_w.write(b"still ok\n")
        assert await asyncio.wait_for(good_r.readline(), 3) == b"STILL OK\n"
        assert rt.gears["gw"].endpoint.counters["framing_errors"] == 1
        assert "max_frame_bytes=16" in caplog.text
        good_w.close()


async def test_max_connections():
    port = free_port()
    async with running(echo(port, ", max_connections: 2")) as rt:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        third_r, _ = conns[2]
        assert await asyncio.wait_for(third_r.read(), 3) == b""
        r, w = conns[0]
        w.write(b"a\n")
        assert await asyncio.wait_for(r.readline(), 3) == b"A\n"
        assert rt.gears["gw"].endpoint.counters["connections_rejected"] == 1
        for _, w in conns:
            w.close()


async def test_idle_timeout_enforced():
    port = free_port()
    async with running(echo(port, ", idle_timeout: 200ms")) as rt:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"a\n")
        assert await r.readline() == b"A\n"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(r.read(), 3) == b""
        assert 0.15 < loop.time() - t0 < 1.5
        assert rt.gears["gw"].endpoint.counters["idle_closed"] == 1


async def test_reply_to_a_closed_connection_goes_to_error():
    port = free_port()
    text = f"""
meta: {{version: '1'}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}"}}
  - name: slow
    type: test_recorder
    config: {{delay: 0.3}}
  - {{name: errs, type: test_collect}}
wires:
  - {{from: gw.out, to: slow.in}}
  - {{from: slow.out, to: gw.in}}
  - {{from: gw.error, to: errs.in}}
"""
    import test_gears_logic
    import test_runtime  # noqa: F401  (registers test_recorder)

    test_gears_logic.OUT.clear()
    async with running(text) as rt:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"bye\n")
        await w.drain()
        w.close()
        for _ in range(100):
            if test_gears_logic.OUT:
                break
            await asyncio.sleep(0.02)
        ((_, _, m),) = test_gears_logic.OUT
        assert m.meta["error.reason"] == "conn_gone"
        assert rt.gears["gw"].counters.errors == 1


async def test_client_reconnects_with_backoff_and_publishes_link_events():
    port = free_port()
    received: list[bytes] = []
    accepted = asyncio.Event()

    async def handle(reader, writer):
        accepted.set()
        data = await reader.readline()
        received.append(data)
        writer.write(b"pong\n")
        await writer.drain()
        writer.close()

    text = f"""
meta: {{version: '1'}}
gears:
  - name: gen
    type: generator
    config: {{count: 1, interval: 10ms, start_delay: 50ms, template: {{raw: ping}}}}
  - name: cli
    type: io_tcp
    config: {{mode: client, connect: "127.0.0.1:{port}", reconnect_wait: 50ms, delimiter_append: true}}
  - {{name: c, type: test_collect}}
wires:
  - {{from: gen.out, to: cli.in}}
  - {{from: cli.out, to: c.in}}
"""
    import test_gears_logic

    test_gears_logic.OUT.clear()
    control = ControlBus()
    events: list[str] = []
    control.subscribe("link.cli", lambda cmd: events.append(cmd["cmd"]))
    rt = Runtime(scenario_from_yaml(text), control=control)
    await rt.start()
    try:
        await asyncio.sleep(0.3)  # nobody listening yet: the message waits in the bounded buffer
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await asyncio.wait_for(accepted.wait(), 5)
        for _ in range(100):
            if test_gears_logic.OUT:
                break
            await asyncio.sleep(0.02)
        assert received == [b"ping\n"]
        assert [m.raw for _, _, m in test_gears_logic.OUT] == [b"pong"]
        for _ in range(100):
            if events[-1:] == ["conn.down"]:
                break
            await asyncio.sleep(0.02)
        assert events[:2] == ["conn.up", "conn.down"]
        server.close()
    finally:
        await rt.shutdown(1.0)


async def test_kill_switch_closes_one_connection():
    port = free_port()
    async with running(echo(port)) as rt:
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"x\n")
        await r1.readline()
        conn_id = next(iter(rt.gears["gw"].endpoint.connections))
        rt.control.publish("gw", {"cmd": "conn.close", "args": {"conn_id": conn_id, "reason": "operator"}})
        assert await asyncio.wait_for(r1.read(), 3) == b""
        w2.write(b"y\n")
        assert await asyncio.wait_for(r2.readline(), 3) == b"Y\n"
        w2.close()


async def test_pipelined_backpressure_no_loss():
    """A client that writes 20k lines before reading anything still gets every reply."""
    port = free_port()
    async with running(echo(port)):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        n = 20000
        payload = b"".join(b"line-%d\n" % i for i in range(n))

        async def writer():
            w.write(payload)
            await w.drain()

        wt = asyncio.create_task(writer())
        got = 0
        while got < n:
            line = await asyncio.wait_for(r.readline(), 10)
            assert line == b"LINE-%d\n" % got
            got += 1
        await wt
        w.close()


async def test_drain_pauses_reading_and_finishes_in_flight():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port)))
    await rt.start()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"a\n")
    assert await r.readline() == b"A\n"
    assert await rt.drain(2.0)
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    await rt.stop()
    assert await asyncio.wait_for(r.read(), 2) == b""


async def test_good_frames_before_a_bad_one_are_answered():
    port = free_port()
    async with running(echo(port, ", max_frame_bytes: 16")):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"ok1\nok2\n" + b"z" * 64)  # one read: two good frames, then an oversize one
        assert await asyncio.wait_for(r.readline(), 3) == b"OK1\n"
        assert await asyncio.wait_for(r.readline(), 3) == b"OK2\n"
        assert await asyncio.wait_for(r.read(), 3) == b""
