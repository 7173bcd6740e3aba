"""Renaming a Rack end to end (issue 13): a real Mixer (nats-server child, DuckDB) and real
Racks on loopback, the Mixer's HTTP API as the operator.

Rack `edge` sends guaranteed-lane messages to a file sink on Rack `hub`. It is cut off from
the Snake (a TCP proxy), so its messages queue in its lane WAL under `flux.msg.edge...`; the
operator renames it `edge2` and activates a scenario version that deploys the generator on
`edge2`; the link comes back. The Rack learns its new name without a restart (the Snake
refuses its former subjects, it asks for its passport), sends the queued records under the
new name (`migrated`), runs the new version, and every message reaches the hub exactly once.
Also: a taken name (409), an invalid one (400 naming the field), a removed Rack (409).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from mixer_fixtures import *  # noqa: F401,F403 (fixtures: mixer, agent_factory)
from mixer_fixtures import make_mixer, run_cli, wait_for
from test_mixer_lanes import RackRunner, TcpProxy, rack_config, sink_lines

from fluxrig.wire import subjects as S

pytestmark = pytest.mark.timeout(60)

SCENARIO = """
meta: {{name: lane, version: "{version}"}}
racks: [{{name: {rack}}}, {{name: hub}}]
gears:
  - {{name: gen, type: generator, deploy: {rack},
     config: {{count: {count}, interval: {interval}, template: {{raw: "{prefix}{{{{ seq }}}}"}}}}}}
  - {{name: store, type: sink, deploy: hub, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: gen.out, to: store.in}}
"""


@pytest.fixture
async def snake_mixer(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    try:
        yield m
    finally:
        await m.stop()


@pytest.fixture
async def api(snake_mixer):
    async with httpx.AsyncClient(
        base_url=snake_mixer.api_url, headers={"Authorization": f"Bearer {snake_mixer.api_token}"}, timeout=10
    ) as client:
        yield client


async def _activate(m, text: str, racks: list[RackRunner]) -> str:
    stored, _ = m.scenarios.import_text(text)
    await m.controller.activate_scenario(stored)
    for r in racks:
        await wait_for(lambda r=r: r.rack.agent.applied_version == stored.version, timeout=15,
                       what=f"{r.config.base.name} applied {stored.version}")  # fmt: skip
        assert r.rack.agent.apply_state == "applied", r.rack.agent.apply_reason
    return stored.version


def _assert_each_once(lines: list[dict], prefix: str, count: int) -> None:
    raws = [line["raw"] for line in lines if line["raw"].startswith(prefix)]
    want = [f"{prefix}{i}" for i in range(1, count + 1)]
    assert len(raws) == len(set(raws)), f"{len(raws) - len(set(raws))} {prefix}* messages doubled"
    assert sorted(raws, key=lambda r: int(r[len(prefix) :])) == want, f"lost: {sorted(set(want) - set(raws))[:10]}"


async def test_a_rack_renamed_while_cut_off_sends_its_queued_records_under_its_new_name(tmp_path, snake_mixer, api):
    proxy = TcpProxy(snake_mixer.snake.port)
    await proxy.start()
    edge = RackRunner(rack_config(tmp_path, "edge", f"tls://127.0.0.1:{proxy.port}", snake_mixer))
    hub = RackRunner(rack_config(tmp_path, "hub", snake_mixer.snake.url, snake_mixer))
    out = tmp_path / "store.jsonl"
    n, k = 300, 40
    try:
        await edge.start()
        await hub.start()
        v1 = SCENARIO.format(version=1, rack="edge", count=n, interval="5ms", prefix="m", path=out)
        await _activate(snake_mixer, v1, [edge, hub])
        await wait_for(lambda: len(sink_lines(out)) >= 30, timeout=15, what="traffic flowing")
        await proxy.cut()
        await wait_for(lambda: not edge.rack.agent.connected.is_set(), timeout=5, what="edge cut off")
        gen = edge.rack.runtime.gears["gen"]
        await wait_for(lambda: gen.counters.messages_out >= n, timeout=15, what="every m* in the lane WAL")
        queued = edge.rack.bus.metrics()["backlog_records"]
        assert queued > 0, "nothing waits in the lane WAL: the cut came too late"
        at_hub = len(sink_lines(out))
        assert at_hub < n

        # The operator's refusals first: the Rack is untouched by them.
        r = await api.post("/api/v1/racks/hub/rename", json={"name": "edge"})
        assert r.status_code == 409, r.text
        r = await api.post("/api/v1/racks/edge/rename", json={"name": "Edge.2"})
        assert r.status_code == 400 and r.json()["field"] == "name", r.text
        r = await api.post("/api/v1/racks/edge/rename", json={})
        assert r.status_code == 400 and "name" in r.json()["error"], r.text
        before = (await api.get("/api/v1/racks/edge")).json()

        r = await api.post("/api/v1/racks/edge/rename", json={"name": "edge2"})
        assert r.status_code == 200, r.text
        renamed = r.json()
        assert renamed["name"] == "edge2" and renamed["id"] == before["id"]
        assert renamed["status"] in ("active", "offline")  # as it was: a rename keeps the status
        assert (await api.get("/api/v1/racks/edge")).status_code == 404
        shown = (await api.get("/api/v1/racks/edge2")).json()
        renames = [e for e in shown["events"] if e["event"] == "rename"]
        assert len(renames) == 1 and "name=edge->edge2" in renames[0]["detail"], shown["events"]
        assert renames[0]["from"] == renames[0]["to"] == before["status"], renames
        audit = (await api.get("/api/v1/audit", params={"path": "/api/v1/racks/edge/rename"})).json()
        assert [a["status"] for a in audit].count(200) == 1, audit

        # The scenario names Racks: a version that deploys the generator on edge2 (new messages v*).
        v2 = SCENARIO.format(version=2, rack="edge2", count=k, interval="5ms", prefix="v", path=out)
        version2 = await _activate(snake_mixer, v2, [hub])
        assert len(sink_lines(out)) == at_hub  # the queued m* are still in edge's WAL
        await proxy.restore()
        await wait_for(lambda: edge.rack.agent.rack_name == "edge2", timeout=15, what="edge learns its new name")
        await wait_for(lambda: edge.rack.agent.applied_version == version2, timeout=15, what="edge2 applies version 2")
        await wait_for(lambda: len(sink_lines(out)) >= n + k, timeout=20, what="every message at the hub")
        await asyncio.sleep(0.3)  # a doubled message would land now
        lines = sink_lines(out)
        assert len({line["id"] for line in lines}) == len(lines), "a flux id arrived twice"
        _assert_each_once(lines, "m", n)
        _assert_each_once(lines, "v", k)
        assert len(lines) == n + k
        em = edge.rack.bus.metrics()
        assert em["migrated"] > 0, em
        assert em["foreign_dropped"] == 0 and em["undecodable_records"] == 0, em
        assert em["backlog_records"] == 0, em
        hm = hub.rack.bus.metrics()
        assert hm["stale_acked"] == 0, hm  # the hub's input follows the new subject (graph.py)
        assert edge.rack.agent.name_recoveries >= 1  # learnt by asking, not by a restart
        await wait_for(lambda: snake_mixer.registry.get("edge2").apply_state == "applied", what="edge2's apply report")

        # A removed Rack is not renamed (409 by its id; its former name is no Rack's: 404).
        assert (await api.delete(f"/api/v1/racks/{renamed['id']}")).status_code == 200
        r = await api.post(f"/api/v1/racks/{renamed['id']}/rename", json={"name": "edge3"})
        assert r.status_code == 409, r.text
        assert (await api.post("/api/v1/racks/edge2/rename", json={"name": "edge3"})).status_code == 404
    finally:
        await edge.stop()
        await hub.stop()
        await proxy.cut()


RECEIVER = """
meta: {{name: lane, version: "{version}"}}
racks: [{{name: edge}}, {{name: {hub}}}]
gears:
  - {{name: gen, type: generator, deploy: edge,
     config: {{count: {count}, interval: 5ms, template: {{raw: "{prefix}{{{{ seq }}}}"}}}}}}
  - {{name: store, type: sink, deploy: {hub}, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: gen.out, to: store.in}}
"""


async def test_a_receiving_rack_renamed_while_stopped_gets_everything_sent_meanwhile(tmp_path, snake_mixer, api):
    """The hub stops, the edge sends on (JetStream holds it for `in-hub`), the operator renames
    the hub `hub2`: its consumer is carried over to `in-hub2` from its ack floor, so nothing
    sent meanwhile is skipped; the hub comes back (it learns its name), runs what it ran, and
    a version naming hub2 later keeps the consumer's place. Every message arrives once."""
    edge = RackRunner(rack_config(tmp_path, "edge", snake_mixer.snake.url, snake_mixer))
    hub = RackRunner(rack_config(tmp_path, "hub", snake_mixer.snake.url, snake_mixer))
    out = tmp_path / "store.jsonl"
    n, k = 400, 40
    js = snake_mixer.js
    try:
        await edge.start()
        await hub.start()
        v1 = RECEIVER.format(version=1, hub="hub", count=n, prefix="m", path=out)
        await _activate(snake_mixer, v1, [edge, hub])
        await wait_for(lambda: len(sink_lines(out)) >= 50, timeout=15, what="traffic flowing")
        await hub.stop()
        at_stop = len(sink_lines(out))
        await wait_for(lambda: edge.rack.runtime.gears["gen"].counters.messages_out >= n, timeout=15,
                       what="every m* sent")  # fmt: skip
        assert len(sink_lines(out)) == at_stop < n

        r = await api.post("/api/v1/racks/hub/rename", json={"name": "hub2"})
        assert r.status_code == 200, r.text
        names = [c.name for c in await js.consumers_info(S.STREAM_MSG)]
        assert "in-hub2" in names and "in-hub" not in names, names
        info = await js.consumer_info(S.STREAM_MSG, "in-hub2")
        assert info.num_pending > 0 and info.delivered.consumer_seq == 0, info  # waits for hub2, from the floor
        assert snake_mixer.controller.lanes.stats["carried_over"] == 1

        await hub.start()
        await wait_for(lambda: hub.rack.agent.rack_name == "hub2", timeout=15, what="hub learns its new name")
        await wait_for(lambda: len(sink_lines(out)) >= n, timeout=20, what="every m* at the renamed hub")
        # A version naming hub2: the carried consumer keeps its place (no replay, no skip).
        v2 = RECEIVER.format(version=2, hub="hub2", count=k, prefix="v", path=out)
        await _activate(snake_mixer, v2, [edge, hub])
        await wait_for(lambda: len(sink_lines(out)) >= n + k, timeout=20, what="every v* too")
        await asyncio.sleep(0.3)  # a doubled message would land now
        lines = sink_lines(out)
        _assert_each_once(lines, "m", n)
        _assert_each_once(lines, "v", k)
        assert len(lines) == n + k
        cfg = (await js.consumer_info(S.STREAM_MSG, "in-hub2")).config
        assert cfg.metadata.get("fluxrig_rack_id") == r.json()["id"] and "fluxrig_carried_from" not in cfg.metadata
    finally:
        await edge.stop()
        await hub.stop()


async def test_a_connected_pending_rack_renamed_by_the_cli_carries_on_under_its_new_name(mixer, agent_factory):
    """The online case, through `fluxrig admin racks rename`: the Rack hears the new passport on
    its former ctrl subject and reconnects under the new name without a restart; the status
    (pending) stays, and approving it by its new name works."""
    agent = await agent_factory("solo")
    await wait_for(lambda: agent.passport is not None and agent.connected.is_set(), what="solo enrolled")
    other = await agent_factory("other")
    await wait_for(lambda: other.passport is not None, what="other enrolled")
    code, out = await run_cli(mixer, "admin", "racks", "rename", "solo", "--name", "Solo.2", "-f")
    assert code == 2 and "--name" in out, out  # refused before any request
    code, out = await run_cli(mixer, "admin", "racks", "rename", "solo", "--name", "other", "-f")
    assert code == 1 and "taken" in out, out
    code, out = await run_cli(mixer, "admin", "racks", "rename", "solo", "--name", "solo-2", "-f", "--json")
    assert code == 0, out
    row = json.loads(out)
    assert row["name"] == "solo-2" and row["status"] == "pending"
    await wait_for(lambda: agent.rack_name == "solo-2" and agent.connected.is_set(), what="solo is solo-2")
    beats = mixer.controller.counters["heartbeats"]
    await wait_for(lambda: mixer.controller.counters["heartbeats"] >= beats + 3, what="heartbeats as solo-2")
    assert mixer.registry.get("solo-2").status == "pending"
    code, out = await run_cli(mixer, "admin", "racks", "approve", "solo-2")
    assert code == 0 and "active" in out, out
    await wait_for(lambda: agent.status == "active", what="solo-2 active")
    assert other.rack_name == "other"
