"""Reload handover of live TCP connections (issue 18): a rebuilt server gear on the same bind
address adopts the connections of the one it replaces (same sockets, conn ids, half-read
frames), the new timeouts apply to them, and a rolled-back swap gives them back. The
on_reload drain and reset choices (and the drain fallback of a framing change) are in
test_reload_policies."""

import asyncio

import pytest
from helpers import free_port, scenario_from_yaml
from test_reload import echo
from test_tls_links import client_ctx, echo_server, pki  # noqa: F401  (pki: the fixture)

from fluxrig.runtime import Runtime
from fluxrig.runtime.reload import ReloadError

CLIENTS = 16
RELOADS = 10


async def ask(r, w, line: bytes, timeout: float = 5.0) -> bytes:
    w.write(line + b"\n")
    await w.drain()
    return (await asyncio.wait_for(r.readline(), timeout)).rstrip(b"\n")


async def test_16_clients_survive_10_reloads_changing_idle_timeout():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        peers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CLIENTS)]
        for i, (r, w) in enumerate(peers):
            assert await ask(r, w, b"hello%d" % i) == b"A:hello%d" % i
        ids_before = set(rt.gears["gw"].endpoint.connections)
        assert len(ids_before) == CLIENTS
        # one client is mid-frame across every reload: its bytes must be carried over
        half_r, half_w = peers[0]
        for n in range(RELOADS):
            half_w.write(b"par")
            await half_w.drain()
            await asyncio.sleep(0.02)
            old = rt.gears["gw"]
            report = await rt.swap(scenario_from_yaml(echo(port, "A", gw_extra=f", idle_timeout: {n + 2}m")))
            assert "gw" in report.rebuilt
            gw = rt.gears["gw"]
            assert gw is not old and gw.endpoint.idle_timeout == (n + 2) * 60
            assert gw.handover == {"connections": "handover", "count": CLIENTS}
            assert report.handover == {"gw": gw.handover}
            assert type(report).from_dict(report.as_dict()).handover == report.handover
            assert set(gw.endpoint.connections) == ids_before  # the same connections, not new ones
            half_w.write(b"tial\n")
            await half_w.drain()
            assert (await asyncio.wait_for(half_r.readline(), 5)).rstrip(b"\n") == b"A:partial"
            for i, (r, w) in enumerate(peers):
                assert await ask(r, w, b"r%d-c%d" % (n, i)) == b"A:r%d-c%d" % (n, i)
        assert rt.gears["gw"].metrics()["connections_active"] == CLIENTS
        for _r, w in peers:
            w.close()
    finally:
        await rt.shutdown(1)


async def test_the_new_idle_timeout_applies_to_adopted_connections():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A", gw_extra=", idle_timeout: 10m")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"1") == b"A:1"
        await rt.swap(scenario_from_yaml(echo(port, "A", gw_extra=", idle_timeout: 300ms")))
        # silent now: the rebuilt gear's 300 ms idle timeout closes it (the old one waited 10m)
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert rt.gears["gw"].metrics()["idle_closed"] == 1
    finally:
        await rt.shutdown(1)


async def test_replies_in_flight_in_the_old_graph_reach_the_adopted_connection():
    # map rebuilt with the server: a frame read before the swap is answered by the old map
    # through the old gear, which routes the reply to the connection's new owner.
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        peers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        for n in range(6):
            tag = "B" if n % 2 else "A"
            for i, (_r, w) in enumerate(peers):
                w.write(b"".join(b"m%d-%d-%d\n" % (n, i, k) for k in range(50)))
            swap = asyncio.create_task(
                rt.swap(scenario_from_yaml(echo(port, tag, gw_extra=f", idle_timeout: {n + 1}m")))
            )
            for i, (r, _w) in enumerate(peers):
                for k in range(50):
                    line = (await asyncio.wait_for(r.readline(), 5)).rstrip(b"\n")
                    assert line.split(b":", 1)[1] == b"m%d-%d-%d" % (n, i, k)
                    assert line.split(b":", 1)[0] in (b"A", b"B")
            await swap
        for _r, w in peers:
            w.close()
    finally:
        await rt.shutdown(1)


async def test_a_rolled_back_swap_gives_the_connections_back():
    import test_runtime  # noqa: F401  registers test_recorder

    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"1") == b"A:1"
        failing = (
            echo(port, "A", gw_extra=", idle_timeout: 7m").replace(
                "wires:", "  - {name: bad, type: test_recorder, config: {fail_start: true}}\nwires:"
            )
            + "  - {from: xf.out, to: bad.in}\n"
        )
        with pytest.raises(ReloadError):
            await rt.swap(scenario_from_yaml(failing))
        assert await ask(r, w, b"still") == b"A:still"
        assert len(rt.gears["gw"].endpoint.connections) == 1
        # and the next good reload hands it over again
        await rt.swap(scenario_from_yaml(echo(port, "A", gw_extra=", idle_timeout: 8m")))
        assert await ask(r, w, b"again") == b"A:again"
        w.close()
    finally:
        await rt.shutdown(1)


async def test_iso8583_server_keeps_its_terminals_when_limits_and_timeouts_change():
    from test_io_iso8583 import MSG_0800, frame
    from test_io_iso8583 import echo as iso_echo

    port = free_port()
    rt = Runtime(scenario_from_yaml(iso_echo(port)))
    await rt.start()
    try:
        peers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        data = frame("len2_be", MSG_0800)
        for n in range(5):
            for _r, w in peers:  # every terminal is mid-frame at the swap
                w.write(data[:7])
                await w.drain()
            await asyncio.sleep(0.02)
            extra = f", max_connections: {100 + n}, idle_timeout: {20 + n}s, read_timeout: {6 + n}s"
            await rt.swap(scenario_from_yaml(iso_echo(port, extra).replace("'1'", f"'{n + 2}'")))
            iso = rt.gears["iso"]
            assert iso.endpoint.max_connections == 100 + n and iso.handover["count"] == 8
            for r, w in peers:
                w.write(data[7:])
                await w.drain()
                assert await asyncio.wait_for(r.readexactly(len(data)), 5) == data
        for _r, w in peers:
            w.close()
    finally:
        await rt.shutdown(1)


async def test_a_rebuilt_client_keeps_its_established_link():
    accepted = []
    got = asyncio.Queue()

    async def upstream(r, w):
        accepted.append(w)
        while line := await r.readline():
            await got.put(line)

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    port = free_port()

    def scenario(n):
        return f"""
meta: {{version: "{n}"}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}"}}
  - name: up
    type: io_tcp
    config: {{mode: client, connect: "127.0.0.1:{up_port}", delimiter_append: true, idle_timeout: {n + 1}m}}
wires:
  - {{from: gw.out, to: up.in}}
"""

    rt = Runtime(scenario_from_yaml(scenario(0)))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"first\n")
        assert await asyncio.wait_for(got.get(), 5) == b"first\n"
        for n in range(1, 6):
            report = await rt.swap(scenario_from_yaml(scenario(n)))
            assert report.handover["up"] == {"connections": "handover", "count": 1}
            w.write(b"after%d\n" % n)
            assert await asyncio.wait_for(got.get(), 5) == b"after%d\n" % n
        assert len(accepted) == 1  # never redialed
        # and when the link drops, the rebuilt gear redials as usual
        accepted[0].close()
        deadline = asyncio.get_running_loop().time() + 5
        while len(accepted) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert len(accepted) == 2
        w.close()
    finally:
        await rt.shutdown(1)
        server.close()


async def test_tls_connections_are_handed_over_and_a_tls_change_is_not(pki):  # noqa: F811
    port = free_port()
    tls = f'{{cert: "{pki["cert"]}", key: "{pki["key"]}"}}'
    text = echo_server(port, tls)
    rt = Runtime(scenario_from_yaml(text))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki), server_hostname="switch.test")
        assert await ask(r, w, b"one") == b"ONE"
        for n in range(3):
            changed = text.replace("tls:", f"idle_timeout: {n + 6}m, tls:").replace("'1'", f"'{n + 2}'")
            report = await rt.swap(scenario_from_yaml(changed))
            assert report.handover["gw"] == {"connections": "handover", "count": 1}
            assert await ask(r, w, b"two%d" % n) == b"TWO%d" % n
        # a changed tls block is never applied to a session negotiated under the old one: the
        # old version serves it on (on_reload drain fallback) until drain_timeout, then closes it
        stricter = text.replace(f'key: "{pki["key"]}"', f'key: "{pki["key"]}", min_version: "1.3"')
        stricter = stricter.replace("tls:", "drain_timeout: 500ms, tls:")
        report = await rt.swap(scenario_from_yaml(stricter.replace("'1'", "'9'")))
        assert report.handover["gw"] == {"connections": "drain", "count": 1, "reason": "tls changed"}
        assert await ask(r, w, b"old") == b"OLD"
        assert await asyncio.wait_for(r.read(), 5) == b""
    finally:
        await rt.shutdown(1)


async def test_16_clients_under_traffic_through_20_reloads_lose_nothing():
    # reloads alternate the server's idle_timeout and the map's output while every client
    # keeps 8 lines in flight: every line is answered once, in order, by either version
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    stop = asyncio.Event()
    counts = [0] * CLIENTS

    async def client(i):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sent = got = 0
        try:
            while not stop.is_set() or got < sent:
                while sent - got < 8 and not stop.is_set():
                    w.write(b"c%d-%d\n" % (i, sent))
                    sent += 1
                line = (await asyncio.wait_for(r.readline(), 5)).rstrip(b"\n")
                tag, _, body = line.partition(b":")
                assert tag in (b"A", b"B") and body == b"c%d-%d" % (i, got), line
                got += 1
            counts[i] = got
        finally:
            w.close()

    try:
        tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        await asyncio.sleep(0.1)
        for n in range(20):
            text = echo(port, "A", gw_extra=f", idle_timeout: {n + 2}m") if n % 2 else echo(port, "B" if n % 4 else "A")
            await rt.swap(scenario_from_yaml(text.replace('version: "A"', f'version: "v{n}"')))
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert all(c > 0 for c in counts)
        assert rt.gears["gw"].metrics()["connections_total"] == 0  # nobody reconnected to the new gear
        assert rt.gears["gw"].metrics()["connections_adopted"] == CLIENTS
    finally:
        stop.set()
        await rt.shutdown(1)


@pytest.mark.slow
def test_bench_rebuild_io_hands_every_connection_over_and_loses_nothing():
    # bench/reload.py --rebuild-io through SIGHUP on a real Rack: 16 clients, map-only reloads
    # as the baseline, then reloads that rebuild the server gear every time
    import sys

    from helpers import ROOT

    sys.path.insert(0, f"{ROOT}/bench")
    import reload as reload_bench

    result = reload_bench.run_rebuild_io(reloads=100, rate=1000, clients=16)  # the load
    print(result)
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["resets"] == 0
    phase = result["rebuild_io"]
    assert phase["reloads_rebuilding_io"] >= 50  # SIGHUPs may coalesce on a loaded box
    assert phase["connections_handed_over"] == 16 * phase["reloads_rebuilding_io"]
    assert phase["connections_not_handed_over"] == 0
    assert result["baseline"]["reloads_rebuilding_io"] == 0


async def test_pyiso8583_terminals_under_traffic_through_20_reloads_of_the_iso_server():
    # the authorizer scenario: 8 terminals (pyiso8583) keep 4 requests each in flight while the
    # acquirer server's max_connections, idle_timeout and read_timeout change at every reload
    import iso8583
    from test_iso_authorizer import SPEC, authorizer_text, request

    port = free_port()
    base = authorizer_text(port)
    rt = Runtime(scenario_from_yaml(base))
    await rt.start()
    stop = asyncio.Event()
    counts = [0] * 8

    async def terminal(i):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sent = got = 0
        try:
            while not stop.is_set() or got < sent:
                while sent - got < 4 and not stop.is_set():
                    w.write(request("0200", "%06d" % (i * 100_000 + sent)))
                    sent += 1
                size = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 5), "big")
                doc, _ = iso8583.decode(await r.readexactly(size), SPEC)
                assert doc["t"] == "0210" and doc["11"] == "%06d" % (i * 100_000 + got) and doc["39"] == "00"
                got += 1
            counts[i] = got
        finally:
            w.close()

    try:
        tasks = [asyncio.create_task(terminal(i)) for i in range(8)]
        await asyncio.sleep(0.1)
        for n in range(20):
            ind = "\n      "  # the acquirer's config is a block mapping
            extra = f"max_connections: {100 + n}{ind}read_timeout: {5 + n % 3}s{ind}idle_timeout: {5 + n}m"
            text = base.replace("idle_timeout: 5m", extra).replace("version: 1.0.0", f"version: 1.0.{n + 1}")
            report = await rt.swap(scenario_from_yaml(text))
            assert report.rebuilt == ["acquirer"] and report.handover["acquirer"]["connections"] == "handover"
            await asyncio.sleep(0.03)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert all(c > 0 for c in counts)
        m = rt.gears["acquirer"].metrics()
        assert (
            m["connections_total"] == 0
            and m["connections_adopted"] == 8
            and rt.gears["acquirer"].endpoint.max_connections == 119
        )
    finally:
        stop.set()
        await rt.shutdown(1)
