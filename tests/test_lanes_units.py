"""Guaranteed lane without a server: projections become runnable wires, the Mixer computes
each Rack's consumer filter, the lane WAL's policy, and the backlog cap (a Rack that never
reaches the Snake: its agent is real and never connected)."""

from __future__ import annotations

import asyncio

import cbor2
import pytest

from fluxrig.agent.agent import AgentConfig, RackAgent
from fluxrig.agent.lanes import JetStreamBus, open_lane_wal, scenario_from_projection
from fluxrig.config import load_config
from fluxrig.errors import LaneFull, ScenarioError
from fluxrig.msg import FluxMsg
from fluxrig.runtime import Runtime
from fluxrig.runtime.bus import MemoryBus, dedup_id
from fluxrig.scenario import parse_scenario

DOC = """
meta: {name: t, version: "1"}
racks: [{name: edge}, {name: hub}]
gears:
  - {name: gen, type: generator, deploy: edge, config: {count: 1}}
  - {name: tap, type: map, deploy: hub, config: {ops: []}}
  - {name: store, type: sink, deploy: hub, config: {mode: "null"}}
wires:
  - {from: gen.out, to: store.in}
  - {from: gen.out, to: tap.in}
  - {from: tap.out, to: store.in, lane: guaranteed}
"""


def projections():
    from fluxrig_mixer.scenarios import project

    doc = parse_scenario(DOC, "yaml")
    return doc, project(doc, "edge"), project(doc, "hub")


def test_projection_becomes_guaranteed_wires_with_rack_endpoints():
    _doc, edge, hub = projections()
    se = scenario_from_projection(edge, "edge")
    sh = scenario_from_projection(hub, "hub")
    assert [(str(w.src), str(w.dst), w.lane) for w in se.wires] == [
        ("edge.gen.out", "store.in", "guaranteed"), ("edge.gen.out", "tap.in", "guaranteed")]
    assert {(str(w.src), str(w.dst), w.lane) for w in sh.wires} == {
        ("tap.out", "store.in", "guaranteed"), ("edge.gen.out", "hub.store.in", "guaranteed"),
        ("edge.gen.out", "hub.tap.in", "guaranteed")}


async def test_runtime_plans_bus_subjects_and_consumer_names_from_projections():
    _doc, edge, hub = projections()
    bus = MemoryBus()
    rt_hub = Runtime(scenario_from_projection(hub, "hub"), rack_name="hub", bus=bus)
    rt_edge = Runtime(scenario_from_projection(edge, "edge"), rack_name="edge", bus=bus)
    rt_hub.build()
    rt_edge.build()
    outs = sorted(k[1] for k in (lane.key for lane in rt_edge.lanes) if k[0] == "bus-out")
    ins = sorted(k[1] for k in (lane.key for lane in rt_hub.lanes) if k[0] == "bus-in")
    assert outs == ["flux.msg.edge.gen.out"]
    assert ins == ["hub.store.in.gen.out", "hub.store.in.tap.out", "hub.tap.in.gen.out"]


def test_a_remote_wire_naming_no_local_gear_is_refused():
    _doc, _edge, hub = projections()
    hub["x-remote-wires"][0]["to"] = "ghost.in"
    with pytest.raises(ScenarioError, match="not a gear of rack hub"):
        scenario_from_projection(hub, "hub")
    _doc, _edge, hub = projections()
    hub["x-remote-wires"][0]["subject"] = "flux.msg.edge.other.out"
    with pytest.raises(ScenarioError, match="does not name its source"):
        scenario_from_projection(hub, "hub")


def test_mixer_consumer_filters_follow_the_wires_into_each_rack():
    from fluxrig_mixer.lanes import inbound_subjects, wanted_consumers

    doc, _e, _h = projections()
    assert inbound_subjects(doc, "hub") == ["flux.msg.edge.gen.out", "flux.msg.hub.tap.out"]
    assert inbound_subjects(doc, "edge") == []

    class Row:
        def __init__(self, name, status="active"):
            self.name, self.status, self.labels = name, status, {}

    assert wanted_consumers(doc, [Row("edge"), Row("hub")]) == {
        "in-hub": ["flux.msg.edge.gen.out", "flux.msg.hub.tap.out"]}
    assert wanted_consumers(doc, [Row("hub", "pending")]) == {
        "in-hub": ["flux.msg.edge.gen.out", "flux.msg.hub.tap.out"]}  # its backlog waits for approval
    assert wanted_consumers(doc, [Row("hub", "removed")]) == {}
    assert wanted_consumers(None, [Row("hub")]) == {}


def _config(tmp_path, fsync: str):
    conf = tmp_path / "fluxrig.toml"
    conf.write_text(f'[base]\nname = "edge"\nstate_dir = "{tmp_path / "state"}"\n[store]\nwal_fsync = "{fsync}"\n')
    return load_config(str(conf), environ={})


@pytest.mark.parametrize("store, lane", [("batch", "always"), ("always", "always"), ("never", "never")])
async def test_lane_wal_policy(tmp_path, store, lane):
    wal = await open_lane_wal(_config(tmp_path, store))
    try:
        assert wal.wal.fsync == lane and wal.wal.max_size_bytes is None
        assert wal.wal.directory.endswith("/state/lanes")
    finally:
        await wal.close()


async def test_offline_backlog_is_capped_by_backpressure_not_by_dropping(tmp_path):
    config = _config(tmp_path, "never")
    agent = RackAgent(AgentConfig(snake_url="nats://127.0.0.1:9", state_dir=str(tmp_path / "state")), lambda d, v: None)
    wal = await open_lane_wal(config)
    bus = JetStreamBus(agent, wal, max_backlog_bytes=4000, send_timeout=0.2)
    bus.start()
    out = bus.outbound("flux.msg.edge.gen.out")
    sent = []
    try:
        with pytest.raises(LaneFull, match="wait for the Snake"):
            for i in range(1000):
                m = FluxMsg(raw=b"x" * 64)
                m.hop(b"g" * 16, b"p" * 16)
                await out.put(m)
                sent.append(m)
        assert 10 < len(sent) < 1000
        m = bus.metrics()
        assert m["lane_full"] == 1 and m["backlog_records"] == len(sent) and m["published"] == 0
    finally:
        await bus.close()
        await wal.close()
    # Nothing was dropped: every record is in the WAL, in order, with its dedup id.
    wal = await open_lane_wal(config)
    try:
        records = await wal.read_from(1, 10_000)
        assert [cbor2.loads(r.payload)[1] for r in records] == [dedup_id(m, "flux.msg.edge.gen.out") for m in sent]
        subject, msg_id, body = cbor2.loads(records[0].payload)
        assert subject == "flux.msg.edge.gen.out" and FluxMsg.from_cbor(body).id == sent[0].id
    finally:
        await wal.close()
    await asyncio.sleep(0)
