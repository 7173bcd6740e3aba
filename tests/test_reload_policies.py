"""`on_reload: handover | drain | reset` (issue 18 item 1), each seen from a real TCP client.

The scenario is tcp-echo (test_reload.echo): server gear `gw`, map `xf` tagging replies with
its version. Every test rebuilds `gw` and watches its live connection: handover keeps the
same socket and loses nothing, drain answers on the old socket (old framing) until
drain_timeout then closes it while new connections go to the new gear, reset closes it at
once and counts it. The report carries the choice and the count in every case.
"""

import asyncio
import logging
import time

import pytest
from helpers import free_port, scenario_from_yaml
from test_reload import echo
from test_reload_handover import ask

from fluxrig.runtime import Runtime
from fluxrig.runtime.reload import ReloadError

LINES = 200  # in flight through the reload


async def pipeline(r, w, tag: bytes, n: int = LINES, end: bytes = b"\n") -> list[bytes]:
    """Write `n` numbered lines at once and read `n` replies (whichever version answers)."""
    w.write(b"".join(b"%s%d%s" % (tag, i, end) for i in range(n)))
    await w.drain()
    return [await asyncio.wait_for(r.readuntil(end), 5) for _ in range(n)]


def bodies(replies: list[bytes], end: bytes = b"\n") -> list[bytes]:
    return [line[: -len(end)].split(b":", 1)[1] for line in replies]


async def closed_within(r, seconds: float) -> float:
    """Seconds until the peer closed (EOF or reset); fails if it stays open longer."""
    t0 = time.monotonic()
    try:
        data = await asyncio.wait_for(r.read(), seconds)
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - t0


async def test_handover_keeps_the_same_socket_and_loses_nothing():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        local = w.get_extra_info("sockname")
        assert await ask(r, w, b"0") == b"A:0"
        conn_ids = set(rt.gears["gw"].endpoint.connections)
        # 200 lines in flight while gw (idle_timeout) and xf (tag) are both rebuilt
        w.write(b"".join(b"h%d\n" % i for i in range(LINES)))
        report = await rt.swap(scenario_from_yaml(echo(port, "B", gw_extra=", on_reload: handover, idle_timeout: 9m")))
        replies = [await asyncio.wait_for(r.readline(), 5) for _ in range(LINES)]
        assert bodies(replies) == [b"h%d" % i for i in range(LINES)]  # none lost, none doubled, in order
        assert report.handover["gw"] == {"connections": "handover", "count": 1}
        assert set(rt.gears["gw"].endpoint.connections) == conn_ids  # the same connection
        assert await ask(r, w, b"after") == b"B:after"  # the new version answers on it
        assert w.get_extra_info("sockname") == local
        assert rt.gears["gw"].metrics()["connections_total"] == 0  # nobody reconnected
        w.close()
    finally:
        await rt.shutdown(1)


async def test_drain_answers_on_the_old_socket_then_closes_it_and_new_clients_get_the_new_gear():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"0") == b"A:0"
        old = rt.gears["gw"]
        w.write(b"".join(b"d%d\n" % i for i in range(LINES)))  # in flight at the swap
        t0 = time.monotonic()
        # the framing changes (delimiter ';'), so the old socket must keep the old framing
        new_text = echo(port, "B", gw_extra=', on_reload: drain, drain_timeout: 3s, delimiter: ";"')
        report = await rt.swap(scenario_from_yaml(new_text))
        assert time.monotonic() - t0 < 2.5  # the swap does not wait for the drain
        assert report.handover["gw"] == {"connections": "drain", "count": 1, "reason": "on_reload: drain"}
        replies = [await asyncio.wait_for(r.readline(), 5) for _ in range(LINES)]
        assert bodies(replies) == [b"d%d" % i for i in range(LINES)]
        # still served by the old version, in its framing (newline), after the cut-over
        assert (await ask(r, w, b"later")).endswith(b":later")
        assert old.endpoint.connections and not rt.gears["gw"].endpoint.connections
        assert rt.gears["gw"].metrics()["connections_draining"] == 1
        # a new client is the new gear's, with the new framing
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"fresh;")
        assert await asyncio.wait_for(r2.readuntil(b";"), 5) == b"B:fresh;"
        assert len(rt.gears["gw"].endpoint.connections) == 1
        # closed at drain_timeout (3 s after the retire), not before
        waited = await closed_within(r, 10)
        assert time.monotonic() - t0 > 2.9, waited
        w2.write(b"still;")
        assert await asyncio.wait_for(r2.readuntil(b";"), 5) == b"B:still;"
        await asyncio.sleep(0.2)
        assert not rt._lingering and old.endpoint.stopped  # retired for good
        w2.close()
        w.close()
    finally:
        await rt.shutdown(1)


async def test_drain_ends_as_soon_as_the_old_connections_close():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"0") == b"A:0"
        old = rt.gears["gw"]
        await rt.swap(scenario_from_yaml(echo(port, "A", gw_extra=", on_reload: drain, drain_timeout: 60s")))
        assert await ask(r, w, b"1") == b"A:1"
        w.close()  # the client leaves: the old version is done
        deadline = time.monotonic() + 5
        while rt._lingering and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not rt._lingering and old.endpoint.stopped
    finally:
        await rt.shutdown(1)


async def test_a_framing_change_under_the_default_falls_back_to_drain_and_says_why():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"1") == b"A:1"
        report = await rt.swap(
            scenario_from_yaml(echo(port, "A", gw_extra=", max_frame_bytes: 4096, drain_timeout: 300ms"))
        )
        assert report.handover["gw"] == {"connections": "drain", "reason": "framing changed", "count": 1}
        assert type(report).from_dict(report.as_dict()).handover == report.handover
        assert await ask(r, w, b"2") == b"A:2"  # served on by the old version
        await closed_within(r, 5)
    finally:
        await rt.shutdown(1)


async def test_reset_closes_at_once_counts_and_logs(caplog):
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        peers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for r, w in peers:
            assert await ask(r, w, b"0") == b"A:0"
        caplog.set_level(logging.WARNING, logger="fluxrig.gear.gw")
        t0 = time.monotonic()
        report = await rt.swap(scenario_from_yaml(echo(port, "B", gw_extra=", on_reload: reset, idle_timeout: 9m")))
        assert report.handover["gw"] == {"connections": "reset", "count": 3, "reason": "on_reload: reset"}
        for r, _w in peers:
            await closed_within(r, 4)
        assert time.monotonic() - t0 < 5  # at once (a drain would hold them for 30 s)
        assert rt.gears["gw"].metrics()["connections_reset_on_reload"] == 3
        assert "closed 3 connections at once (on_reload: reset)" in caplog.text
        r, w = await asyncio.open_connection("127.0.0.1", port)  # the listener never went away
        assert await ask(r, w, b"new") == b"B:new"
        w.close()
    finally:
        await rt.shutdown(1)


@pytest.mark.parametrize("policy", ["drain", "reset"])
async def test_a_rolled_back_swap_undoes_drain_and_reset(policy):
    import test_runtime  # noqa: F401  registers test_recorder

    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"1") == b"A:1"
        failing = (
            echo(port, "A", gw_extra=f", on_reload: {policy}").replace(
                "wires:", "  - {name: bad, type: test_recorder, config: {fail_start: true}}\nwires:"
            )
            + "  - {from: xf.out, to: bad.in}\n"
        )
        with pytest.raises(ReloadError):
            await rt.swap(scenario_from_yaml(failing))
        gw = rt.gears["gw"]
        assert gw.linger == 0 and gw._reset_for is None
        # the next reload keeps (handover) the connection the rolled-back one would have cut
        report = await rt.swap(scenario_from_yaml(echo(port, "B", gw_extra=", idle_timeout: 8m")))
        assert report.handover["gw"] == {"connections": "handover", "count": 1}
        assert await ask(r, w, b"again") == b"B:again"
        w.close()
    finally:
        await rt.shutdown(1)


async def test_reloads_while_an_old_version_drains_still_reach_its_connections():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"0") == b"A:0"
        await rt.swap(scenario_from_yaml(echo(port, "B", gw_extra=", on_reload: drain, drain_timeout: 20s")))
        # two more reloads (one handover, one map change) while the first version drains
        await rt.swap(scenario_from_yaml(echo(port, "A", gw_extra=", on_reload: drain, drain_timeout: 21s")))
        await rt.swap(scenario_from_yaml(echo(port, "B", gw_extra=", on_reload: drain, drain_timeout: 21s")))
        assert await ask(r, w, b"1") == b"B:1"  # through the newest map, written by the old gw
        assert len(rt._lingering) == 1
        # the kill switch ends it at once
        await rt.stop_all()
        await closed_within(r, 3)
        assert not rt._lingering
    finally:
        await rt.shutdown(1)


async def test_shutdown_finishes_a_draining_version_quickly():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    assert await ask(r, w, b"0") == b"A:0"
    await rt.swap(scenario_from_yaml(echo(port, "A", gw_extra=", on_reload: drain, drain_timeout: 60s")))
    t0 = time.monotonic()
    await rt.shutdown(2)
    assert time.monotonic() - t0 < 3
    await closed_within(r, 2)


@pytest.mark.parametrize(
    "policy",
    [
        "handover",
        "drain",
    ],
)  # fmt: skip
async def test_clients_connecting_during_reloads_are_never_cut(policy):
    # a connection the old listener accepts after the new gear started belongs to the new gear.
    # Every peer stays open, and under handover they all end up in one gear: the per-IP limit
    # (64 by default, all peers are 127.0.0.1) is raised so that it is not what refuses them.
    port = free_port()
    limit = ", max_connections_per_ip: 4096"
    rt = Runtime(scenario_from_yaml(echo(port, "A", gw_extra=limit)))
    await rt.start()
    stop = asyncio.Event()
    peers = []

    async def connector():
        while not stop.is_set():
            r, w = await asyncio.open_connection("127.0.0.1", port)
            peers.append((r, w))
            assert (await ask(r, w, b"hi")).endswith(b":hi")
            await asyncio.sleep(0.002)

    try:
        task = asyncio.create_task(connector())
        for n in range(20):
            extra = f", on_reload: {policy}, drain_timeout: 30s, idle_timeout: {n + 2}m{limit}"
            await rt.swap(scenario_from_yaml(echo(port, "B" if n % 2 else "A", gw_extra=extra)))
            await asyncio.sleep(0.01)
        stop.set()
        await task
        assert len(peers) > 20
        for i, (r, w) in enumerate(peers):  # every one still open and answered
            assert (await ask(r, w, b"last%d" % i)).endswith(b":last%d" % i)
        for _r, w in peers:
            w.close()
    finally:
        stop.set()
        await rt.shutdown(1)


async def test_a_client_whose_target_changes_drains_its_old_link_and_dials_the_new_one():
    import serial_pty  # noqa: F401  registers test_serial_catch

    accepted = {"a": [], "b": []}
    ended = {"a": 0, "b": 0}
    got = {"a": asyncio.Queue(), "b": asyncio.Queue()}

    def upstream(name):
        async def serve(r, w):
            accepted[name].append(w)
            while line := await r.readline():
                await got[name].put(line)
            ended[name] += 1

        return serve

    servers = {n: await asyncio.start_server(upstream(n), "127.0.0.1", 0) for n in "ab"}
    ports = {n: s.sockets[0].getsockname()[1] for n, s in servers.items()}
    port = free_port()

    def scenario(target, version):
        return f"""
meta: {{version: "{version}"}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}"}}
  - name: up
    type: io_tcp
    config: {{mode: client, connect: "127.0.0.1:{ports[target]}", delimiter_append: true, drain_timeout: 1s}}
  - name: catch
    type: test_serial_catch
wires:
  - {{from: gw.out, to: up.in}}
  - {{from: up.out, to: catch.in}}
"""

    rt = Runtime(scenario_from_yaml(scenario("a", "1")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"one\n")
        assert await asyncio.wait_for(got["a"].get(), 5) == b"one\n"
        report = await rt.swap(scenario_from_yaml(scenario("b", "2")))
        assert report.handover["up"] == {"connections": "drain", "count": 1, "reason": "connect changed"}
        w.write(b"two\n")
        assert await asyncio.wait_for(got["b"].get(), 5) == b"two\n"  # the new gear dialed b
        # a's link is served on: what a sends still comes in, through the new graph
        accepted["a"][0].write(b"late from a\n")
        caught = await rt.gears["catch"].wait(1)
        assert caught[0].raw == b"late from a"
        # closed at drain_timeout (1 s), and the old version never redials a
        t0 = time.monotonic()
        while rt._lingering and time.monotonic() - t0 < 6:
            await asyncio.sleep(0.05)
        assert not rt._lingering and 0.8 < time.monotonic() - t0 < 6
        await asyncio.sleep(0.5)
        assert ended["a"] == 1 and len(accepted["a"]) == 1 and len(accepted["b"]) == 1
        w.close()
    finally:
        await rt.shutdown(1)
        for s in servers.values():
            s.close()


async def test_an_iso8583_server_with_on_reload_reset_closes_its_terminals_and_counts_them():
    from test_iso_authorizer import authorizer_text, exchange, request

    port = free_port()
    base = authorizer_text(port)
    rt = Runtime(scenario_from_yaml(base))
    await rt.start()
    try:
        peers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.1)
        changed = base.replace("idle_timeout: 5m", "idle_timeout: 6m\n      on_reload: reset")
        report = await rt.swap(scenario_from_yaml(changed.replace("version: 1.0.0", "version: 1.0.1")))
        assert report.handover["acquirer"] == {"connections": "reset", "count": 4, "reason": "on_reload: reset"}
        for r, _w in peers:
            await closed_within(r, 2)
        assert rt.gears["acquirer"].metrics()["connections_reset_on_reload"] == 4
        (ok,) = await exchange(port, [request("0200", "000001")])
        assert ok["39"] == "00"  # new terminals are served by the new gear
    finally:
        await rt.shutdown(1)


async def test_the_gear_kill_switch_also_stops_a_draining_old_version():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(r, w, b"0") == b"A:0"
        await rt.swap(scenario_from_yaml(echo(port, "B", gw_extra=", on_reload: drain, drain_timeout: 60s")))
        assert rt._lingering
        assert await rt.stop_gear("gw")
        await closed_within(r, 2)  # the old version's connection is cut with it
        assert not rt._lingering
    finally:
        await rt.shutdown(1)
