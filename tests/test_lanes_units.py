"""Guaranteed lane without a server: projections become runnable wires, the Mixer computes
each Rack's consumer filter, the lane WAL's policy, the backlog cap, and JetStreamBus over
the in-memory Snake of tests/fake_session.py: batches end to end, a JetStream message acked
only when every record in it was processed by every input, redeliveries (with other batch
boundaries too) processed once and in order, the kill switch holding messages in the
stream, inputs closing with records queued."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import cbor2
import pytest
from fake_session import FakeJetStream, FakeSession

from fluxrig.agent.lanes import JetStreamBus, open_lane_wal, scenario_from_projection
from fluxrig.config import load_config
from fluxrig.errors import LaneFull, ScenarioError
from fluxrig.msg import FluxMsg
from fluxrig.runtime import Runtime
from fluxrig.runtime.bus import MemoryBus, dedup_id
from fluxrig.runtime.states import GearState
from fluxrig.scenario import parse_scenario
from fluxrig.wal import AsyncWal
from fluxrig.wal.record import RecordSizeError
from fluxrig.wire.batch import encode_lane_batch

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
        ("edge.gen.out", "store.in", "guaranteed"),
        ("edge.gen.out", "tap.in", "guaranteed"),
    ]
    assert {(str(w.src), str(w.dst), w.lane) for w in sh.wires} == {
        ("tap.out", "store.in", "guaranteed"),
        ("edge.gen.out", "hub.store.in", "guaranteed"),
        ("edge.gen.out", "hub.tap.in", "guaranteed"),
    }


async def test_runtime_plans_bus_subjects_and_consumer_names_from_projections():
    _doc, edge, hub = projections()
    bus = MemoryBus()
    rt_hub = Runtime(scenario_from_projection(hub, "hub"), rack_name="hub", bus=bus)
    rt_edge = Runtime(scenario_from_projection(edge, "edge"), rack_name="edge", bus=bus)
    outs = sorted(k[1] for k in (lane.key for lane in rt_edge.build().lanes) if k[0] == "bus-out")
    ins = sorted(k[1] for k in (lane.key for lane in rt_hub.build().lanes) if k[0] == "bus-in")
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
        "in-hub": ["flux.msg.edge.gen.out", "flux.msg.hub.tap.out"]
    }
    assert wanted_consumers(doc, [Row("hub", "pending")]) == {
        "in-hub": ["flux.msg.edge.gen.out", "flux.msg.hub.tap.out"]
    }  # its backlog waits for approval
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
    session = FakeSession(FakeJetStream(), "edge")
    session.drop()  # never reaches the Snake
    wal = await open_lane_wal(config)
    bus = JetStreamBus(session, wal, max_backlog_bytes=4000, send_timeout=0.2)
    bus.start()
    out = bus.outbound("flux.msg.edge.gen.out")
    sent = []
    try:
        with pytest.raises(LaneFull, match="wait for the Snake"):
            for _i in range(1000):
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


# -- JetStreamBus over the in-memory Snake ---------------------------------------------------

SUBJECT = "flux.msg.edge.gen.out"


class Collector:
    """The gear end of an input: what deliver() needs, recording what it got."""

    def __init__(self, name: str = "store", delay: float = 0.0):
        self.name = name
        self.state = GearState.STARTED
        self.counters = SimpleNamespace(messages_in=0)
        self.delay = delay
        self.got: list[FluxMsg] = []

    async def process(self, port, msg):
        if self.delay:
            await asyncio.sleep(self.delay)
        self.got.append(msg)

    async def emit_error(self, msg, reason, detail):
        raise AssertionError(f"{reason}: {detail}")

    def raws(self) -> list[str]:
        return [m.raw.decode() for m in self.got]


def fake_snake(ack_wait: float = 30.0) -> FakeJetStream:
    js = FakeJetStream()
    js.add_stream("flux-msg", ["flux.msg.>"])
    js.add_consumer("flux-msg", "in-hub", [SUBJECT], ack_wait=ack_wait)
    return js


def msgs(n: int, start: int = 1) -> list[FluxMsg]:
    out = []
    for i in range(start, start + n):
        m = FluxMsg(raw=b"m%d" % i)
        m.hop(b"g" * 16, b"p" * 16)
        out.append(m)
    return out


def publish_batch(js: FakeJetStream, batch: list[FluxMsg], msg_id: str) -> None:
    js.store(SUBJECT, encode_lane_batch([(dedup_id(m, SUBJECT), m.to_cbor()) for m in batch]), {"Nats-Msg-Id": msg_id})


async def until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def _offline_edge(tmp_path, **wal_options):
    """An edge bus whose lane WAL commits with fsync `always` and whose Snake never answers."""
    session = FakeSession(FakeJetStream(), "edge")
    session.drop()
    wal = await AsyncWal.open(str(tmp_path / "lanes"), fsync="always", **wal_options)
    bus = JetStreamBus(session, wal, send_timeout=0.2)
    bus.start()
    return bus, wal


async def _read_back(wal) -> list[bytes]:
    return [FluxMsg.from_cbor(cbor2.loads(r.payload)[2]).raw for r in await wal.read_from(1, 10_000)]


async def test_a_batch_put_is_made_durable_in_one_commit_and_in_order(tmp_path):
    """put_many (the frames of one TCP read) stages every record before awaiting any: one
    fsync for the batch, where one put per message waits one commit each."""
    bus, wal = await _offline_edge(tmp_path)
    out = bus.outbound(SUBJECT)
    try:
        before = wal.wal.metrics()["commits"]
        batch = msgs(64)
        await out.put_many(batch)
        batched = wal.wal.metrics()["commits"] - before
        before = wal.wal.metrics()["commits"]
        for m in msgs(64, start=65):
            await out.put(m)
        one_by_one = wal.wal.metrics()["commits"] - before
        assert batched <= 2 < 60 <= one_by_one, (batched, one_by_one)
        assert wal.committed_seq == 128 and bus.metrics()["appended"] == 128
        assert await _read_back(wal) == [b"m%d" % i for i in range(1, 129)]
    finally:
        await bus.close()
        await wal.close()


async def test_a_record_the_wal_refuses_mid_batch_stops_the_batch_there(tmp_path):
    """A record too big for the lane WAL in the middle of a batch: those before it are
    durable, the error names the limit, nothing after it is written (as with one put each)."""
    bus, wal = await _offline_edge(tmp_path, max_record_bytes=4096)
    out = bus.outbound(SUBJECT)
    batch = msgs(10)
    batch[5] = FluxMsg(raw=b"x" * 8000)
    batch[5].hop(b"g" * 16, b"p" * 16)
    try:
        with pytest.raises(RecordSizeError, match="4096"):
            await out.put_many(batch)
        assert await _read_back(wal) == [b"m%d" % i for i in range(1, 6)]
        assert bus.metrics()["appended"] == 5
        await out.put_many(msgs(3, start=7))  # the lane goes on
        assert await _read_back(wal) == [b"m%d" % i for i in (1, 2, 3, 4, 5, 7, 8, 9)]
    finally:
        await bus.close()
        await wal.close()


@pytest.fixture
async def hub(tmp_path):
    """A receiving bus over a fake Snake; yields (js, session, bus, start_input)."""
    js = fake_snake(ack_wait=0.3)
    session = FakeSession(js, "hub")
    wal = await AsyncWal.open(str(tmp_path / "hub-lanes"), fsync="never")
    bus = JetStreamBus(session, wal, fetch_timeout=0.05, idle_wait=0.02, retry_wait=0.02, stale_nak_delay=0.05)
    bus.start()
    sources = []

    def start_input(gear, consumer="hub.store.in.gen.out"):
        source = bus.inbound(SUBJECT, consumer, gear, "in")
        source.start()
        sources.append(source)
        return source

    try:
        yield js, session, bus, start_input
    finally:
        await bus.close()
        await wal.close()


def ack_pending(js) -> int:
    return len(js.consumers["in-hub"].pending)


async def test_batches_end_to_end_every_record_once_in_order(tmp_path, hub):
    js, _session, bus, start_input = hub
    edge_wal = await AsyncWal.open(str(tmp_path / "edge-lanes"), fsync="never")
    edge = JetStreamBus(FakeSession(js, "edge"), edge_wal)
    edge.start()
    gear = Collector()
    start_input(gear)
    try:
        out = edge.outbound(SUBJECT)
        sent = msgs(2000)
        await asyncio.gather(*(out.put(m) for m in sent))
        await until(lambda: len(gear.got) == 2000, what="every message at the hub")
        assert gear.raws() == [m.raw.decode() for m in sent]
        em = edge.metrics()
        assert em["published"] == 2000 and em["records_per_batch"] > 10, em
        assert len(js.stored("flux-msg")) == em["batches_published"] < 200
        await until(lambda: ack_pending(js) == 0, what="every JetStream message acked")
        hm = bus.metrics()
        assert hm["delivered"] == 2000 and hm["acked"] == 2000 and hm["acked_msgs"] == em["batches_published"]
    finally:
        await edge.close()
        await edge_wal.close()


async def test_a_batch_cut_differently_after_a_crash_is_processed_once_and_in_order(hub):
    js, _session, bus, start_input = hub
    gear = Collector()
    sent = msgs(30)
    publish_batch(js, sent[:10], "L-w-1-10-10")
    publish_batch(js, sent[5:20], "L-w-6-20-15")  # the sender restarted from record 6, cut otherwise
    publish_batch(js, sent[18:30], "L-w-19-30-12")
    start_input(gear)
    await until(lambda: len(gear.got) == 30 and ack_pending(js) == 0, what="all processed and acked")
    await asyncio.sleep(0.1)
    assert gear.raws() == [f"m{i}" for i in range(1, 31)]
    m = bus.metrics()
    # 5 + 2 records arrived twice: masked as already processed or as still being processed
    assert m["duplicates"] + m["redelivered_in_progress"] == 5 + 2
    assert m["delivered"] == 30 and m["acked_msgs"] == 3


async def test_a_message_waits_for_a_record_still_being_processed_from_another(hub):
    js, _session, bus, start_input = hub
    gear = Collector(delay=0.02)
    sent = msgs(6)
    publish_batch(js, sent[:4], "A")
    publish_batch(js, sent[2:6], "B")  # m3, m4 are queued from A when B arrives
    start_input(gear)
    await until(lambda: len(gear.got) >= 3, what="processing")
    assert ack_pending(js) == 2  # neither acked: A has m4 to go, B waits for m3/m4
    await until(lambda: len(gear.got) == 6 and ack_pending(js) == 0, what="both acked")
    assert gear.raws() == [f"m{i}" for i in range(1, 7)]
    assert bus.metrics()["redelivered_in_progress"] >= 1


async def test_acked_only_when_every_input_has_processed_every_record(hub):
    js, _session, bus, start_input = hub
    fast, slow = Collector("fast"), Collector("slow", delay=0.05)
    start_input(fast, "hub.fast.in.gen.out")
    start_input(slow, "hub.slow.in.gen.out")
    publish_batch(js, msgs(5), "A")
    await until(lambda: len(fast.got) == 5, what="the fast input done")
    assert len(slow.got) < 5 and ack_pending(js) == 1
    await until(lambda: len(slow.got) == 5 and ack_pending(js) == 0, what="acked after the slow one")
    assert fast.raws() == slow.raws() and fast.got[0] is not slow.got[0]  # each input its own copy


async def test_a_redelivery_of_a_processed_message_is_masked(hub):
    js, _session, bus, start_input = hub
    gear = Collector()
    start_input(gear)
    sent = msgs(8)
    publish_batch(js, sent, "A")
    await until(lambda: len(gear.got) == 8, what="processed")
    publish_batch(js, sent[:4], "A-again")  # the same records under another message id
    # One FluxMsg per message, as an older Rack sends: its Nats-Msg-Id is its record id.
    js.store(SUBJECT, sent[6].to_cbor(), {"Nats-Msg-Id": dedup_id(sent[6], SUBJECT)})
    await until(lambda: ack_pending(js) == 0 and bus.metrics()["acked_msgs"] == 3, what="all acked")
    assert len(gear.got) == 8 and bus.metrics()["duplicates"] == 5


async def test_a_single_fluxmsg_from_an_older_rack_is_delivered(hub):
    js, _session, bus, start_input = hub
    gear = Collector()
    start_input(gear)
    (m,) = msgs(1)
    js.store(SUBJECT, m.to_cbor(), {"Nats-Msg-Id": dedup_id(m, SUBJECT)})
    await until(lambda: len(gear.got) == 1 and ack_pending(js) == 0, what="delivered and acked")
    assert gear.got[0].id == m.id


async def test_malformed_messages_are_acknowledged_and_counted(hub):
    js, _session, bus, start_input = hub
    gear = Collector()
    start_input(gear)
    js.store(SUBJECT, b"\x82\x01\xff", {"Nats-Msg-Id": "bad"})
    good = msgs(2)
    js.store(SUBJECT, encode_lane_batch([("r1", b"not a fluxmsg"), (dedup_id(good[0], SUBJECT), good[0].to_cbor())]),
             {"Nats-Msg-Id": "half"})  # fmt: skip
    await until(lambda: ack_pending(js) == 0 and bus.metrics()["acked_msgs"] == 2, what="both acked")
    assert gear.raws() == ["m1"] and bus.metrics()["undecodable_msgs"] == 2


async def test_killed_gear_holds_its_messages_in_jetstream_until_revived(hub):
    js, _session, bus, start_input = hub
    gear = Collector(delay=0.01)
    start_input(gear)
    publish_batch(js, msgs(50), "A")
    await until(lambda: len(gear.got) >= 5, what="processing")
    gear.state = GearState.STOPPED  # the kill switch
    await until(lambda: bus.metrics()["working"] == 0, what="queue given back")
    killed_at = len(gear.got)
    publish_batch(js, msgs(10, start=51), "B")
    await asyncio.sleep(0.3)
    assert len(gear.got) == killed_at < 50 and ack_pending(js) >= 1  # held in the stream
    gear.state = GearState.STARTED
    bus._routes_changed.set()
    await until(lambda: len(gear.got) == 60 and ack_pending(js) == 0, timeout=15, what="all after the revive")
    assert gear.raws() == [f"m{i}" for i in range(1, 61)]
    assert bus.metrics()["given_back"] >= 1


async def test_an_input_closing_gives_back_what_it_holds_and_the_next_gets_it_once(hub):
    js, _session, bus, start_input = hub
    first = Collector(delay=0.01)
    source = start_input(first)
    publish_batch(js, msgs(40), "A")
    await until(lambda: len(first.got) >= 5, what="processing")
    source.close()
    second = Collector()
    start_input(second)
    await until(lambda: len(first.got) + len(second.got) == 40 and ack_pending(js) == 0, timeout=15,
                what="the rest through the new input")  # fmt: skip
    assert first.raws() + second.raws() == [f"m{i}" for i in range(1, 41)]


async def test_fetching_pauses_inside_hold(hub):
    js, _session, bus, start_input = hub
    gear = Collector()
    start_input(gear)
    async with bus.hold():
        await asyncio.sleep(0.1)  # the puller parks
        publish_batch(js, msgs(3), "A")
        await asyncio.sleep(0.2)
        assert gear.got == []
    await until(lambda: len(gear.got) == 3, what="fetched after the hold")


async def test_the_pull_subscription_is_bound_again_after_a_reconnect(hub):
    js, session, bus, start_input = hub
    gear = Collector()
    start_input(gear)
    publish_batch(js, msgs(3), "A")
    await until(lambda: len(gear.got) == 3, what="first")
    session.drop()
    await asyncio.sleep(0.1)
    session.restore()
    publish_batch(js, msgs(3, start=4), "B")
    await until(lambda: len(gear.got) == 6, what="after the reconnect")
    assert gear.raws() == [f"m{i}" for i in range(1, 7)]
