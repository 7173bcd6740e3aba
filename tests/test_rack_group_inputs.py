"""Shared group inputs (issue 17 item 2), end to end: a real Mixer (nats-server child, DuckDB),
Rack `edge` (in-process) generating onto a guaranteed wire into gear `store`, deployed to group
`work`: one durable consumer `grp-work` shared by the members, each message processed by one
member. Members are Rack processes (`fluxrig run`), so one can be SIGKILLed mid-run; each writes
its own JSON-lines sink (flushed every line) and the files together are the evidence.

Bounded for a shared 2-core box: 10,000 messages, not the issue's 100,000 (say so in reports).
The SIGKILL and suspension runs are `chaos` (make chaos-test, not make test: about a minute
each on a quiet box); the poison run is light and stays in make test."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from cluster_group import RackProcess, http_get
from fluxrig_mixer.groups import GroupConsumerPolicy
from group_fixtures import GroupRack, group_rack_config
from mixer_fixtures import make_mixer, snake_toml, wait_for

from fluxrig.wire import subjects as S

pytestmark = [
    pytest.mark.mixer,
    pytest.mark.timeout(max(240, int(os.environ.get("FLUXRIG_GROUP_MESSAGES", "10000")) // 50)),
]

#: FLUXRIG_GROUP_MESSAGES=100000 runs the issue's full count (about 5 minutes here).
COUNT = int(os.environ.get("FLUXRIG_GROUP_MESSAGES", "10000"))
SLACK_S = max(150, COUNT // 100)

SHARED = """
meta: {{name: shared, version: "{version}"}}
racks:
  - {{name: edge}}
  - {{group: work, match: {{labels: {{role: work}}}}}}
gears:
  - {{name: gen, type: generator, deploy: edge,
     config: {{count: {count}, interval: "{interval}", template: {{raw: "m{{{{ seq }}}}"}}}}}}
  - {{name: store, type: sink, deploy: work,
     config: {{mode: file, path: "${{SINK_PATH:-/tmp/fluxrig-unused.jsonl}}", flush_every: 1}}}}
wires:
  - {{from: gen.out, to: store.in}}
"""


def lines_of(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by the SIGKILL: its message was not acknowledged, it comes again
    return out


@pytest.fixture
async def hub(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    # Redelivery soon after a member dies (the default ack wait is 30 s): 2 s, then 4 s.
    m.controller.lanes.group_policy = GroupConsumerPolicy(ack_wait=2.0, backoff=(2.0, 4.0), max_deliver=6)
    try:
        yield m
    finally:
        await m.stop()


def _members(tmp_path, hub, n=3):
    out = []
    for i in range(1, n + 1):
        name = f"work-{i}"
        sink = tmp_path / f"sink-{name}.jsonl"
        r = RackProcess(tmp_path, name, snake_toml(hub, labels={"role": "work"}, rack_name=name),
                        env={"SINK_PATH": str(sink)})  # fmt: skip
        r.sink = sink
        out.append(r.start())
    return out


async def _ready(racks):
    for r in racks:
        await wait_for(lambda r=r: _ok(http_get(r.health_port, "/health/work")), timeout=60, what=f"{r.name} ready")


async def _ok(coro) -> bool:
    return (await coro)[0] == 200


@pytest.mark.chaos
async def test_three_members_share_one_consumer_and_a_killed_members_messages_move(tmp_path, hub):
    members = _members(tmp_path, hub)
    # The edge's lane WAL without fsync: a generator waits for each put to be durable, and a
    # 50 ms group commit would pace it at ~20 messages/s; the members are what is under test.
    edge = GroupRack(group_rack_config(tmp_path, "edge", hub, {}, extra='[store]\nwal_fsync = "never"\n'))
    try:
        for r in members:  # enrolled (auto-adopted), no scenario yet
            await wait_for(lambda r=r: _ok(http_get(r.health_port, "/health")), timeout=60, what=f"{r.name} up")
        await edge.start()
        stored, _ = hub.scenarios.import_text(SHARED.format(version=1, count=COUNT, interval="0s"))
        await hub.controller.activate_scenario(stored)
        names = {c.name: c for c in await hub.js.consumers_info(S.STREAM_MSG)}
        assert "grp-work" in names and names["grp-work"].config.max_deliver == 6
        cfg = names["grp-work"].config
        assert (cfg.filter_subjects or [cfg.filter_subject]) == ["flux.msg.edge.gen.out"]
        # No member has a consumer of its own for the group's input.
        assert not {f"in-work-{i}" for i in (1, 2, 3)} & set(names), names
        await _ready(members)

        victim = members[0]
        await wait_for(lambda: len(lines_of(victim.sink)) >= min(COUNT // 10, 1000), timeout=120, what="work-1 busy")
        victim.kill()
        at_kill = len(lines_of(victim.sink))

        def unique():
            return {line["id"] for r in members for line in lines_of(r.sink)}

        await wait_for(lambda: len(unique()) >= COUNT, timeout=SLACK_S, interval=0.5, what="every message at a sink")
        await asyncio.sleep(1.0)
        per_member = {r.name: len(lines_of(r.sink)) for r in members}
        all_lines = [line for r in members for line in lines_of(r.sink)]
        raws = sorted({line["raw"] for line in all_lines}, key=lambda x: int(x[1:]))
        assert raws == [f"m{i}" for i in range(1, COUNT + 1)], "lost messages"
        duplicates = len(all_lines) - len(unique())
        # At least once across a SIGKILL: only what the victim had processed but not yet
        # acknowledged may come again (bounded by one fetch of the victim), never more.
        assert duplicates <= 256, (duplicates, per_member)
        assert per_member["work-2"] > 0 and per_member["work-3"] > 0, per_member
        assert len(lines_of(victim.sink)) == at_kill
        info = await hub.js.consumer_info(S.STREAM_MSG, "grp-work")
        await wait_for(lambda: _settled(hub), timeout=30, what="grp-work holds nothing unacknowledged")
        print(f"per member {per_member}, duplicates after SIGKILL {duplicates}, redelivered "
              f"{info.num_redelivered}")  # fmt: skip
    finally:
        await edge.stop()
        for r in members:
            r.stop()


async def _settled(hub) -> bool:
    info = await hub.js.consumer_info(S.STREAM_MSG, "grp-work")
    return info.num_ack_pending == 0 and info.num_pending == 0


@pytest.mark.chaos
async def test_a_suspended_members_share_moves_to_the_others_and_comes_back(tmp_path, hub):
    members = _members(tmp_path, hub)
    edge = GroupRack(group_rack_config(tmp_path, "edge", hub, {}, extra='[store]\nwal_fsync = "never"\n'))
    try:
        for r in members:
            await wait_for(lambda r=r: _ok(http_get(r.health_port, "/health")), timeout=60, what=f"{r.name} up")
        await edge.start()
        stored, _ = hub.scenarios.import_text(SHARED.format(version=1, count=COUNT, interval="0s"))
        await hub.controller.activate_scenario(stored)
        await _ready(members)
        second = members[1]
        await wait_for(lambda: len(lines_of(second.sink)) >= 200, timeout=120, what="work-2 busy")
        await hub.controller.suspend("work-2")
        await wait_for(lambda: _status(http_get(second.health_port, "/health/work"), 503), timeout=20,
                       what="work-2 left the group")  # fmt: skip
        left_at = len(lines_of(second.sink))
        others_at = sum(len(lines_of(r.sink)) for r in members if r is not second)
        await asyncio.sleep(2.0)
        assert len(lines_of(second.sink)) == left_at, "a suspended member still takes the group's input"
        assert sum(len(lines_of(r.sink)) for r in members if r is not second) > others_at, "nobody took its share"
        await hub.controller.activate("work-2")
        await wait_for(lambda: len(lines_of(second.sink)) > left_at, timeout=60, what="work-2 takes work again")

        def unique():
            return {line["id"] for r in members for line in lines_of(r.sink)}

        await wait_for(lambda: len(unique()) >= COUNT, timeout=SLACK_S, interval=0.5, what="every message at a sink")
        await asyncio.sleep(1.0)
        all_lines = [line for r in members for line in lines_of(r.sink)]
        assert len(all_lines) == len(unique()) == COUNT, "a suspension doubled or lost messages"
    finally:
        await edge.stop()
        for r in members:
            r.stop()


POISON = """
meta: {name: poison, version: "1"}
racks:
  - {name: edge}
  - {group: work, match: {labels: {role: work}}}
gears:
  - {name: gen, type: generator, deploy: edge, config: {count: 1, interval: 10ms, template: {raw: "bad"}}}
  - {name: store, type: sink, deploy: work, config: {mode: "null"}}
wires:
  - {from: gen.out, to: store.in}
"""


async def test_a_message_delivered_too_often_is_parked_as_poison_never_retried(tmp_path, hub):
    hub.controller.lanes.group_policy = GroupConsumerPolicy(ack_wait=1.0, backoff=(), max_deliver=6)
    edge = GroupRack(group_rack_config(tmp_path, "edge", hub, {}))
    member = GroupRack(group_rack_config(tmp_path, "work-1", hub, {"role": "work"}))
    try:
        await edge.start()
        stored, _ = hub.scenarios.import_text(POISON)
        await hub.controller.activate_scenario(stored)
        # Four members die holding it (nobody acks within the ack wait): a raw pull of the
        # group consumer that never acknowledges, four times.
        psub = await hub.js.pull_subscribe_bind("grp-work", stream=S.STREAM_MSG)
        for n in range(1, 5):
            msgs = await psub.fetch(1, timeout=10)
            assert msgs[0].metadata.num_delivered == n
            await asyncio.sleep(1.2)
        await psub.unsubscribe()
        await member.start()
        bus = member.rack.bus
        await wait_for(lambda: bus.metrics()["poison_parked"] == 1, timeout=30, what="the poison message parked")
        parked = os.path.join(member.config.store_dir, "lanes", "parked")
        assert os.listdir(parked), "no parked copy"
        await wait_for(lambda: _settled(hub), timeout=15, what="grp-work settled (acked, not redelivered)")
        await asyncio.sleep(2.5)  # past two ack waits: it is never delivered again
        info = await hub.js.consumer_info(S.STREAM_MSG, "grp-work")
        assert info.num_ack_pending == 0 and info.num_redelivered <= 1
        assert bus.metrics()["poison_parked"] == 1 and bus.metrics()["delivered"] == 0
    finally:
        await member.stop()
        await edge.stop()


async def _status(coro, want: int) -> bool:
    return (await coro)[0] == want


async def test_only_members_may_pull_the_group_consumer_or_use_its_relay(tmp_path, hub):
    import nats
    from mixer_fixtures import rack_nats_options

    edge = GroupRack(group_rack_config(tmp_path, "edge", hub, {}))
    member = GroupRack(group_rack_config(tmp_path, "work-1", hub, {"role": "work"}))
    try:
        await edge.start()
        await member.start()
        stored, _ = hub.scenarios.import_text(POISON)
        await hub.controller.activate_scenario(stored)
        await wait_for(lambda: member.rack.agent.applied_version == stored.version, timeout=20, what="applied")

        async def attempt(agent) -> tuple[bool, bool]:
            p = agent.passport
            errors = []

            async def on_error(exc):
                errors.append(exc)

            nc = await nats.connect(hub.snake.url, **rack_nats_options(agent), inbox_prefix=S.inbox_prefix(p.rack_name),
                                    allow_reconnect=False, connect_timeout=2, error_cb=on_error)  # fmt: skip
            try:
                try:
                    await nc.jetstream().consumer_info(S.STREAM_MSG, "grp-work", timeout=2)
                    pull = True
                except Exception:
                    pull = False
                await nc.subscribe(S.group_relay_all("work"))
                await nc.flush(timeout=2)
                await asyncio.sleep(0.3)
                relay = not any("permissions violation" in str(e).lower() for e in errors)
                return pull, relay
            finally:
                await nc.close()

        assert await attempt(member.rack.agent) == (True, True)
        assert await attempt(edge.rack.agent) == (False, False)
    finally:
        await member.stop()
        await edge.stop()
