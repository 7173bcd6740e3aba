"""Shadow-swap reload: only what changed is rebuilt, nothing queued is lost, failures roll back."""

import asyncio
import os
import signal
import sys
import time

import pytest
from helpers import ROOT, free_port, scenario_from_yaml, tcp_lines, wait_port

from fluxrig.runtime import Runtime
from fluxrig.runtime.reload import ReloadError

sys.path.insert(0, os.path.join(ROOT, "bench"))


def echo(port, tag="A", gw_extra="", bind=None):
    return f"""
meta: {{version: "{tag}"}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{bind or port}", delimiter_append: true{gw_extra}}}
  - name: xf
    type: map
    config: {{ops: [{{set: raw, value: "{tag}:{{{{ raw }}}}"}}]}}
wires:
  - {{from: gw.out, to: xf.in}}
  - {{from: xf.out, to: gw.in}}
"""


async def test_only_the_changed_gear_is_rebuilt_and_connections_survive():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"1\n")
        assert await r.readline() == b"A:1\n"
        gw_before = rt.gears["gw"]
        report = await rt.swap(scenario_from_yaml(echo(port, "B")))
        assert report.ok and report.kept == ["gw"] and report.rebuilt == ["xf"]
        assert rt.gears["gw"] is gw_before
        w.write(b"2\n")
        assert await r.readline() == b"B:2\n"  # same connection, new map
        assert report.cutover_ms < 5
        w.close()
    finally:
        await rt.shutdown(1)


async def test_invalid_or_failing_scenarios_leave_the_graph_serving():
    import test_runtime  # noqa: F401  registers test_recorder

    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        failing = (
            echo(port, "B").replace(
                "wires:", "  - {name: bad, type: test_recorder, config: {fail_start: true}}\nwires:"
            )
            + "  - {from: xf.out, to: bad.in}\n"
        )
        with pytest.raises(ReloadError, match="bad failed to start") as ei:
            await rt.swap(scenario_from_yaml(failing))
        assert not ei.value.report.ok
        assert set(rt.gears) == {"gw", "xf"}
        assert rt.gears["xf"].state == "started"
        assert await tcp_lines(port, [b"still"]) == [b"A:still"]
    finally:
        await rt.shutdown(1)


async def test_rebuilt_server_inherits_the_listening_socket():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    refused = 0
    stop = False

    async def hammer():
        nonlocal refused
        while not stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
            except ConnectionRefusedError:
                refused += 1
            await asyncio.sleep(0.001)

    h = asyncio.create_task(hammer())
    try:
        for i in range(10):
            extra = f", idle_timeout: {i + 1}m"
            report = await rt.swap(scenario_from_yaml(echo(port, "A", gw_extra=extra)))
            assert "gw" in report.rebuilt
        stop = True
        await h
        assert refused == 0
        assert await tcp_lines(port, [b"x"]) == [b"A:x"]
    finally:
        stop = True
        await rt.shutdown(1)


async def test_changed_bind_opens_the_new_address_first():
    port, port2 = free_port(), free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        await rt.swap(scenario_from_yaml(echo(port, "A", bind=port2)))
        assert await tcp_lines(port2, [b"moved"]) == [b"A:moved"]
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await rt.shutdown(1)


async def test_added_and_removed_gears():
    port = free_port()
    rt = Runtime(scenario_from_yaml(echo(port, "A")))
    await rt.start()
    try:
        text = echo(port, "A").replace("wires:", "  - {name: log, type: sink, config: {mode: 'null'}}\nwires:")
        text += "  - {from: gw.out, to: log.in}\n"
        report = await rt.swap(scenario_from_yaml(text))
        assert report.added == ["log"] and report.kept == ["gw", "xf"]
        assert await tcp_lines(port, [b"a"]) == [b"A:a"]
        assert rt.gears["log"].counters.messages_in == 1  # fan-out now copies to the sink
        report = await rt.swap(scenario_from_yaml(echo(port, "A")))
        assert report.removed == ["log"]
        assert await tcp_lines(port, [b"b"]) == [b"A:b"]
    finally:
        await rt.shutdown(1)


@pytest.mark.slow
def test_100_sighup_reloads_at_1000_msgs_per_s_lose_nothing():
    import reload as reload_bench

    result = reload_bench.run(reloads=100, rate=1000, clients=4)
    print(result)
    assert result["reloads"] == 100
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert result["resets"] == 0


def test_sighup_with_an_invalid_file_keeps_serving(start_rack, rack_env, tmp_path):
    port = free_port()
    path = tmp_path / "s.yaml"
    path.write_text(echo(port, "A"))
    rack = start_rack("run", "--scenario", str(path))
    wait_port(port)
    path.write_text(echo(port, "B").replace("type: map", "type: nope"))
    rack.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert asyncio.run(tcp_lines(port, [b"x"])) == [b"A:x"]
    path.write_text(echo(port, "B"))
    rack.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert asyncio.run(tcp_lines(port, [b"y"])) == [b"B:y"]
    code, _out, err = rack.stop()
    assert code == 0
    assert "reload refused" in err and "unknown gear type: nope" in err
    assert '"event":"reload"' in err
