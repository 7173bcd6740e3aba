"""One lifecycle: cold start is a swap from the empty graph, the kill switch a swap to it
without drain, and every swap holds the bus, keeps what it keeps and rolls back whole."""

import asyncio
import time

import pytest
from helpers import free_port, scenario_from_yaml, tcp_lines
from test_runtime import BUILT, SEEN, chain

from fluxrig.msg import FluxMsg
from fluxrig.runtime import (
    Gear,
    GearStartError,
    GearState,
    Manifest,
    ReloadError,
    Runtime,
    RuntimeState,
    register,
)
from fluxrig.runtime.bus import MemoryBus
from fluxrig.runtime.lane import Lane

PROBE: dict[str, object] = {}


@register
class ProbeGear(Gear):
    """Test gear: records how many holds the bus had when it started, and whether its drain
    was called (a drain that takes `drain_s` seconds)."""

    MANIFEST = Manifest(
        "test_probe",
        "records its lifecycle (tests only)",
        schema={
            "type": "object",
            "properties": {"drain_s": {"type": "number", "default": 0}},
            "additionalProperties": False,
        },
    )

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        PROBE.setdefault(f"{name}.built", []).append(self)

    async def start(self):
        bus = PROBE.get("bus")
        PROBE[f"{self.name}.holds_at_start"] = bus.holds if bus is not None else None

    async def process(self, port, msg):
        await self.emit("out", msg)

    async def drain(self, deadline):
        PROBE[f"{self.name}.drained"] = True
        await asyncio.sleep(self.config["drain_s"])

    async def stop(self):
        PROBE.setdefault(f"{self.name}.state_in_stop", []).append(self.state)


def echo(port: int, tag: str = "A", extra: str = "") -> str:
    return f"""
meta: {{version: "{tag}"}}
gears:
  - {{name: gw, type: io_tcp, config: {{mode: server, bind: "127.0.0.1:{port}", delimiter_append: true}}}}
  - {{name: xf, type: map, config: {{ops: [{{set: raw, value: "{tag}:{{{{ raw }}}}"}}]}}}}
{extra}
wires:
  - {{from: gw.out, to: xf.in}}
  - {{from: xf.out, to: gw.in}}
"""


FAILING = """
meta: {version: '2'}
gears:
  - {name: ok, type: test_recorder}
  - {name: bad, type: test_recorder, config: {fail_start: true}}
  - {name: src, type: test_pump, config: {n: 1}}
wires:
  - {from: src.out, to: ok.in}
  - {from: src.out, to: bad.in}
"""


async def test_cold_start_is_a_swap_from_the_empty_graph():
    scenario = scenario_from_yaml(chain(3))
    legacy = Runtime(scenario)
    assert legacy.scenario is Runtime.EMPTY and legacy.gears == {}  # nothing runs before start
    fresh = Runtime()
    assert fresh.state is RuntimeState.RUNNING and fresh.scenario is Runtime.EMPTY
    try:
        reports = [await legacy.start(), await fresh.swap(scenario)]
        for rt, report in zip((legacy, fresh), reports, strict=True):
            assert report.ok and report.old_version == "none" and report.new_version == "1"
            assert (report.kept, report.rebuilt, report.added, report.removed) == ([], [], ["src", "a"], [])
            assert rt.scenario is scenario and rt.state is RuntimeState.RUNNING
            assert all(g.state is GearState.STARTED for g in rt.gears.values())
            await asyncio.wait_for(rt.gears["src"].done, 5)
        assert reports[0].as_dict().keys() == reports[1].as_dict().keys()
        again = await legacy.start()  # the same scenario again: every gear kept, nothing restarted
        assert again.ok and again.kept == ["src", "a"] and not again.added
    finally:
        await legacy.shutdown(1)
        await fresh.shutdown(1)


async def test_a_cold_start_that_fails_rolls_back_to_the_empty_graph():
    BUILT.clear()
    rt = Runtime()
    with pytest.raises(GearStartError, match="bad failed to start") as ei:
        await rt.swap(scenario_from_yaml(FAILING))
    assert isinstance(ei.value, ReloadError)  # the Rack catches one error type for every refusal
    report = ei.value.report
    assert not report.ok and report.old_version == "none" and "bad failed to start" in report.reason
    assert BUILT["ok"].state is GearState.STOPPED and BUILT["bad"].state is GearState.STOPPED
    assert BUILT["src"].state is GearState.CREATED
    assert rt.gears == {} and rt.scenario is Runtime.EMPTY and rt.state is RuntimeState.RUNNING
    ok = await rt.swap(scenario_from_yaml(chain(2)))  # the runtime takes the next swap
    try:
        assert ok.ok and ok.added == ["src", "a"]
        await asyncio.wait_for(rt.gears["src"].done, 5)
        assert len(SEEN["a"]) == 2
    finally:
        await rt.shutdown(1)


async def test_a_scenario_that_cannot_be_built_is_refused_with_its_report():
    # A guaranteed wire on a standalone Rack: a valid scenario, refused by the build.
    text = chain(1).replace("to: a.in}", "to: a.in, lane: guaranteed}")
    rt = Runtime()
    with pytest.raises(ReloadError, match="cannot build the new graph: .*needs the guaranteed lane") as ei:
        await rt.swap(scenario_from_yaml(text))
    assert not ei.value.report.ok and ei.value.report.added == ["src", "a"]
    assert rt.gears == {} and rt.state is RuntimeState.RUNNING


async def test_stop_all_empties_the_graph_at_once_and_the_runtime_runs_on():
    port = free_port()
    PROBE.clear()
    slow = "  - {name: slow, type: test_probe, config: {drain_s: 30}}"
    rt = Runtime()
    await rt.swap(scenario_from_yaml(echo(port, "A", slow)))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"1\n")
        assert await reader.readline() == b"A:1\n"
        old = dict(rt.gears)
        t0 = time.monotonic()
        report = await rt.stop_all()
        assert time.monotonic() - t0 < 5  # no 30 s drain: nothing drains
        assert "slow.drained" not in PROBE
        assert report.ok and sorted(report.removed) == ["gw", "slow", "xf"] and report.new_version == "none"
        assert rt.gears == {} and rt.scenario is Runtime.EMPTY and rt.state is RuntimeState.RUNNING
        assert all(g.state is GearState.STOPPED for g in old.values())
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the connection was closed
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # and the listener
        revived = await rt.swap(scenario_from_yaml(echo(port, "B")))  # revive: a swap from empty
        assert revived.old_version == "none" and sorted(revived.added) == ["gw", "xf"]
        assert await tcp_lines(port, [b"2"]) == [b"B:2"]
    finally:
        await rt.shutdown(1)


async def test_a_swap_to_empty_with_drain_lets_gears_drain():
    PROBE.clear()
    rt = Runtime()
    await rt.swap(scenario_from_yaml(chain(1).replace("test_recorder", "test_probe, config: {drain_s: 0.1}")))
    report = await rt.swap(Runtime.EMPTY, timeout=5)
    assert PROBE["a.drained"] is True and report.removed == ["src", "a"]
    await rt.shutdown(1)


async def test_every_swap_holds_the_bus_and_cold_start_too():
    bus = MemoryBus()
    PROBE.clear()
    PROBE["bus"] = bus
    text = """
meta: {version: '1'}
gears:
  - {name: p, type: test_probe}
  - {name: q, type: test_probe}
wires:
  - {from: p.out, to: q.in, lane: guaranteed}
"""
    rt = Runtime(None, "edge", bus=bus)
    await rt.swap(scenario_from_yaml(text))
    try:
        assert PROBE["p.holds_at_start"] == 1 and PROBE["q.holds_at_start"] == 1
        assert bus.holds == 0
        assert [s.consumer for s in bus.sources["flux.msg.edge.p.out"]] == ["edge.q.in.p.out"]
        rebuilt = text.replace("name: q, type: test_probe", "name: q, type: test_probe, config: {drain_s: 0.01}")
        assert (await rt.swap(scenario_from_yaml(rebuilt))).rebuilt == ["q"]
        assert PROBE["q.holds_at_start"] == 1  # the rebuilt q started inside the hold too
        assert len(bus.sources["flux.msg.edge.p.out"]) == 1  # the old input retired
        await rt.gears["p"].emit("out", FluxMsg(raw=b"x"))
        await asyncio.gather(*(lane.join() for lane in rt.lanes))
        assert rt.gears["q"].counters.messages_in == 1
    finally:
        await rt.shutdown(1)


async def test_a_kept_gear_keeps_its_queued_messages_and_its_lane():
    from fluxrig.config import load_config

    cfg = load_config(None, environ={"FLUXRIG_RACK_FUSE_SYNC_CHAINS": "false"})
    text = """
meta: {version: '1'}
gears:
  - {name: src, type: test_pump, config: {n: 0}}
  - {name: a, type: test_recorder}
  - {name: xf, type: map, config: {ops: []}}
wires:
  - {from: src.out, to: a.in}
  - {from: a.out, to: xf.in}
"""
    rt = Runtime(scenario_from_yaml(text), rack_config=cfg.rack)
    await rt.start()
    try:
        a = rt.gears["a"]
        lane = rt.gears["src"].outputs["out"].targets[0]
        assert isinstance(lane, Lane) and lane.gear is a
        gate = asyncio.Event()
        original = a.process

        async def held(port, msg):
            await gate.wait()
            await original(port, msg)

        a.process = held
        for i in range(5):
            await lane.put(FluxMsg(raw=str(i).encode()))
        await asyncio.sleep(0)
        assert lane.depth() >= 4
        report = await rt.swap(scenario_from_yaml(text.replace("ops: []", "ops: [{set: meta.x, value: '1'}]")))
        assert report.kept == ["src", "a"] and report.rebuilt == ["xf"]
        assert rt.gears["a"] is a and rt.gears["src"].outputs["out"].targets[0] is lane  # same lane, same queue
        gate.set()
        await lane.join()
        assert [m.raw for _, m in SEEN["a"]] == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        await rt.shutdown(1)


async def test_a_gear_stopped_by_the_kill_switch_stays_unwired_across_a_reload():
    port = free_port()
    sink = "  - {name: log, type: sink, config: {mode: 'null'}}"
    text = echo(port, "A", sink) + "  - {from: gw.out, to: log.in}\n"
    rt = Runtime()
    await rt.swap(scenario_from_yaml(text))
    try:
        assert await tcp_lines(port, [b"a"]) == [b"A:a"]
        log_gear = rt.gears["log"]
        assert log_gear.counters.messages_in == 1
        assert await rt.stop_gear("log") and not await rt.stop_gear("nope")
        report = await rt.swap(scenario_from_yaml(text.replace('"A:', '"B:').replace('version: "A"', 'version: "B"')))
        assert "log" in report.kept and report.rebuilt == ["xf"]
        assert all(t.gear is not log_gear for t in rt.gears["gw"].outputs["out"].targets)
        assert await tcp_lines(port, [b"b"]) == [b"B:b"]
        assert log_gear.counters.messages_in == 1 and log_gear.state is GearState.STOPPED
    finally:
        await rt.shutdown(1)


async def test_concurrent_swaps_run_one_after_the_other():
    rt = Runtime()
    one, two = scenario_from_yaml(chain(1)), scenario_from_yaml(chain(2).replace("version: '1'", "version: '2'"))
    r1, r2 = await asyncio.gather(rt.swap(one), rt.swap(two))
    try:
        assert r1.ok and r2.ok and r2.old_version == r1.new_version == "1"
        assert rt.scenario is two and r2.rebuilt == ["src"] and r2.kept == ["a"]
    finally:
        await rt.shutdown(1)


async def test_build_then_start_runs_the_gears_that_were_built():
    rt = Runtime(scenario_from_yaml(chain(2)))
    graph = rt.build()
    assert rt.gears is graph.gears and all(g.state is GearState.CREATED for g in graph.gears.values())
    report = await rt.start()
    try:
        assert report.ok and report.added == ["src", "a"]
        assert rt.gears["a"] is graph.gears["a"] and rt.gears["a"].state is GearState.STARTED
    finally:
        await rt.shutdown(1)


async def test_a_rolled_back_reload_stops_the_rebuilt_gears_it_never_started():
    # `src` has no input, so it starts last: `bad` fails first and src's new version never starts.
    text = """
meta: {version: '1'}
gears:
  - {name: src, type: test_probe}
  - {name: sink, type: test_recorder}
wires:
  - {from: src.out, to: sink.in}
"""
    PROBE.clear()
    rt = Runtime()
    await rt.swap(scenario_from_yaml(text))
    try:
        failing = (
            text.replace("type: test_probe}", "type: test_probe, config: {drain_s: 0.01}}").replace(
                "wires:", "  - {name: bad, type: test_recorder, config: {fail_start: true}}\nwires:"
            )
            + "  - {from: src.out, to: bad.in}\n"
        )
        with pytest.raises(GearStartError, match="bad failed to start") as ei:
            await rt.swap(scenario_from_yaml(failing))
        assert ei.value.report.rebuilt == ["src"] and ei.value.report.added == ["bad"]
        running, unstarted = PROBE["src.built"]
        assert rt.gears["src"] is running and running.state is GearState.STARTED
        assert unstarted.state is GearState.STOPPED
        assert rt.gears["sink"].state is GearState.STARTED
    finally:
        await rt.shutdown(1)


async def test_a_gear_is_stopped_before_its_own_stop_runs():
    """An input that checks `gear.state` (the guaranteed lane) must never hand a message to a
    gear whose stop() already closed its files: the state says stopped before stop() runs, on
    the kill switch's path and on shutdown's (regression: a hub restarted mid-stream lost a
    message to a sink closed under it)."""
    PROBE.clear()
    text = """
meta: {version: "1"}
gears:
  - {name: a, type: test_probe}
  - {name: b, type: test_probe}
wires: []
"""
    rt = Runtime()
    await rt.swap(scenario_from_yaml(text))
    assert await rt.stop_gear("a")
    await rt.shutdown(1.0)
    assert PROBE["a.state_in_stop"] == [GearState.STOPPED]
    assert PROBE["b.state_in_stop"] == [GearState.STOPPED]
