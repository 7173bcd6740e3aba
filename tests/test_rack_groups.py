"""Rack groups (issue 17 item 1), end to end: a real Mixer, real in-process Racks enrolled with
labelled tokens. A gear with `deploy: <group>` runs on every active member; a member joining
(approved), leaving (suspended) or going offline changes the group without touching the other
members' passports or gears. Unit checks of the projection rule are at the bottom."""

from __future__ import annotations

import asyncio

import pytest
from fluxrig_mixer.scenarios import project
from group_fixtures import GroupRack, activate_on, group_rack_config
from mixer_fixtures import make_mixer, wait_for

from fluxrig.scenario import build_scenario
from fluxrig.scenario.groups import member_groups, projection_groups, without_groups

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(120)]

POS = {"role": "pos"}

GROUPS = """
meta: {name: groups, version: "1"}
racks:
  - {group: pos, match: {labels: {role: pos}}}
  - {name: solo}
gears:
  - {name: shared, type: sink, deploy: pos, config: {mode: "null"}}
  - {name: everywhere, type: sink, config: {mode: "null"}}
  - {name: alone, type: sink, deploy: solo, config: {mode: "null"}}
"""


@pytest.fixture
async def hub(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"enrollment.offline_after": 3})
    try:
        yield m
    finally:
        await m.stop()


async def _enroll(tmp_path, hub, name, labels, approve=True) -> GroupRack:
    r = GroupRack(group_rack_config(tmp_path, name, hub, labels))
    await r.start(status="pending")
    if approve:
        await hub.controller.approve(name)
        await wait_for(lambda: r.rack.agent.status == "active", timeout=20, what=f"{name} active")
    return r


async def test_group_gears_run_on_every_member_and_membership_changes_touch_no_other(tmp_path, hub):
    racks = [await _enroll(tmp_path, hub, n, POS) for n in ("pos-1", "pos-2", "pos-3")]
    solo = await _enroll(tmp_path, hub, "solo", {"role": "other"})
    try:
        version = await activate_on(hub, GROUPS, racks + [solo])
        for r in racks:
            assert set(r.gears) == {"shared", "everywhere"}, r.name
            assert r.rack.runtime.scenario.groups == frozenset({"pos"})
        assert set(solo.gears) == {"everywhere", "alone"}

        def snapshot():
            return {r.name: (r.serial, {n: id(g) for n, g in r.gears.items()}) for r in racks}

        before = snapshot()

        # Joining: a fourth member, approved by the operator, runs the group's gears ...
        fourth = await _enroll(tmp_path, hub, "pos-4", POS, approve=False)
        racks_all = racks + [fourth]
        assert fourth.gears == {}  # pending: no scenario
        await hub.controller.approve("pos-4")
        await wait_for(lambda: fourth.rack.agent.applied_version == version, timeout=20, what="pos-4 applied")
        assert set(fourth.gears) == {"shared", "everywhere"}
        await asyncio.sleep(1.0)  # several heartbeats: nothing may reach the others
        assert snapshot() == before, "approving a member re-signed or rebuilt another member"

        # Leaving: pos-2 suspended stops its group gear and keeps its own ...
        await hub.controller.suspend("pos-2")
        p2 = racks[1]
        await wait_for(lambda: p2.rack.agent.applied_version == version + "+left-groups", timeout=20,
                       what="pos-2 left the group")  # fmt: skip
        assert p2.rack.agent.apply_state == "applied", p2.rack.agent.apply_reason
        assert set(p2.gears) == {"everywhere"}
        others = [r for r in racks_all if r is not p2]
        assert all("shared" in r.gears for r in others)
        # ... and, activated again, takes it back.
        await hub.controller.activate("pos-2")
        await wait_for(lambda: p2.rack.agent.applied_version == version, timeout=20, what="pos-2 back in the group")
        assert "shared" in p2.gears

        # Offline: pos-3 stops; the Mixer marks it offline; nobody else is touched.
        mid = {r.name: (r.serial, {n: id(g) for n, g in r.gears.items()}) for r in (racks[0], fourth)}
        await racks[2].stop()
        await wait_for(lambda: hub.registry.get("pos-3").status == "offline", timeout=20, what="pos-3 offline")
        await asyncio.sleep(0.6)
        assert {r.name: (r.serial, {n: id(g) for n, g in r.gears.items()}) for r in (racks[0], fourth)} == mid
        racks_all.remove(racks[2])
    finally:
        for r in racks + [solo] + ([fourth] if "fourth" in locals() else []):
            await r.stop()


GROUP_ONLY = """
meta: {name: group-only, version: "1"}
racks:
  - {group: pos, match: {labels: {role: pos}}}
gears:
  - {name: shared, type: sink, deploy: pos, config: {mode: "null"}}
  - {name: everywhere, type: sink, config: {mode: "null"}}
"""


async def test_a_member_approved_while_the_roll_out_runs_gets_the_scenario(tmp_path, hub):
    """A Rack runnable only after the activation is in no wave of the plan: it must get the
    active scenario, not be held at the previous one (no wave would ever send it the target)."""
    first = await _enroll(tmp_path, hub, "pos-1", POS)
    late = await _enroll(tmp_path, hub, "pos-2", POS, approve=False)
    try:
        stored, _ = hub.scenarios.import_text(GROUP_ONLY)
        await hub.controller.activate_scenario(stored)
        # The wave waits for pos-1's heartbeat report, so the plan is still running here.
        assert hub.controller.rollouts.plan["state"] == "running"
        await hub.controller.approve("pos-2")
        for r in (first, late):
            await wait_for(lambda r=r: r.rack.agent.applied_version == stored.version, timeout=20,
                           what=f"{r.name} applied")  # fmt: skip
        assert set(late.gears) == {"shared", "everywhere"}
    finally:
        for r in (first, late):
            await r.stop()


# -- the projection rule (no bus) ----------------------------------------------------------------


def _doc():
    import yaml

    return yaml.safe_load(GROUPS)


def test_membership_is_by_labels_only():
    doc = _doc()
    assert member_groups(doc, {"role": "pos", "zone": "a"}) == ["pos"]
    assert member_groups(doc, {"role": "other"}) == []
    assert member_groups(doc, None) == []
    # Values compare as text: a YAML integer label matches the token's "1".
    doc["racks"][0]["match"]["labels"] = {"zone": 1}
    assert member_groups(doc, {"zone": "1"}) == ["pos"]


def test_projection_names_the_groups_and_validates_on_the_rack():
    proj = project(_doc(), "pos-1", POS, "d")
    assert proj["x-fluxrig"]["groups"] == ["pos"]
    assert [r.get("group") for r in proj["racks"]] == ["pos"]
    assert {g["name"] for g in proj["gears"]} == {"shared", "everywhere"}
    scenario = build_scenario(proj)  # the Rack's own validation accepts `deploy: pos`
    assert scenario.groups == frozenset({"pos"})
    # Another member's projection is the same but for the rack name: no member list in it.
    other = project(_doc(), "pos-9", POS, "d")
    assert {k: v for k, v in other.items() if k != "x-fluxrig"} == {k: v for k, v in proj.items() if k != "x-fluxrig"}
    # A non-member gets no group entry and no group gear.
    none = project(_doc(), "solo", {}, "d")
    assert "shared" not in {g["name"] for g in none["gears"]}
    assert projection_groups(none) == frozenset()


def test_without_groups_drops_group_gears_and_their_wires():
    proj = project(_doc(), "pos-1", POS, "d")
    proj["wires"] = [{"from": "x.out", "to": "shared.in"}, {"from": "a.out", "to": "everywhere.in"}]
    left = without_groups(proj)
    assert {g["name"] for g in left["gears"]} == {"everywhere"}
    assert left["wires"] == [{"from": "a.out", "to": "everywhere.in"}]
    assert projection_groups(left) == frozenset()
    assert "racks" not in left or all(not r.get("group") for r in left["racks"])
    assert projection_groups(proj) == frozenset({"pos"})  # the input is not changed


def test_a_named_rack_without_membership_skips_group_gears():
    from fluxrig.runtime.graph import Runtime

    rt = Runtime(rack_name="pos-1")
    plain = build_scenario(_doc())
    assert {s.name for s in rt.local_specs(plain)} == {"everywhere"}
    member = build_scenario(project(_doc(), "pos-1", POS))
    assert {s.name for s in rt.local_specs(member)} == {"shared", "everywhere"}


SHARED_DOC = """
meta: {name: shared, version: "1"}
racks:
  - {name: edge}
  - {group: work, match: {labels: {role: work}}}
gears:
  - {name: gen, type: generator, deploy: edge, config: {count: 1}}
  - {name: every, type: sink, config: {mode: "null"}}
  - {name: store, type: sink, deploy: work, config: {mode: "null"}}
wires:
  - {from: gen.out, to: store.in}
  - {from: gen.out, to: every.in}
"""


def test_group_inputs_go_to_one_shared_consumer_not_the_members():
    import yaml
    from fluxrig_mixer.groups import group_inputs, group_problems, member_rights
    from fluxrig_mixer.lanes import wanted_consumers
    from fluxrig_mixer.snake import rack_permissions

    doc = yaml.safe_load(SHARED_DOC)
    assert group_inputs(doc) == {"work": ["flux.msg.edge.gen.out"]}
    assert group_problems(doc) == []

    class R:
        def __init__(self, name, labels):
            self.name, self.labels, self.status = name, labels, "active"

    wanted = wanted_consumers(doc, [R("edge", {}), R("w1", {"role": "work"}), R("w2", {"role": "work"})])
    # The members' own consumers keep the global gear's input; the group's goes to grp-work.
    assert wanted == {"grp-work": ["flux.msg.edge.gen.out"], "in-w1": ["flux.msg.edge.gen.out"],
                      "in-w2": ["flux.msg.edge.gen.out"]}  # fmt: skip
    proj = project(doc, "w1", {"role": "work"})
    groups_of = {(e["to"], e.get("group")) for e in proj["x-remote-wires"]}
    assert groups_of == {("store.in", "work"), ("every.in", None)}
    assert member_rights(doc, {"role": "work"}) == ["work"] and member_rights(doc, {}) == []
    pub, _ = rack_permissions("w1", full=True, groups=["work"])
    assert "$JS.API.CONSUMER.MSG.NEXT.flux-msg.grp-work" in pub and "$JS.ACK.flux-msg.grp-work.>" in pub
    assert not any("grp-" in p for p in rack_permissions("w1", full=False, groups=["work"])[0])
    # The group's saga mirror (issue 17 item 4): its subjects and the read side of its own stream only.
    assert {"flux.saf.work.>", "$JS.API.STREAM.INFO.fluxrig-saf-work", "$JS.API.DIRECT.GET.fluxrig-saf-work"} <= set(
        pub
    )
    assert not any("fluxrig-saf-" in p or "flux.saf" in p for p in rack_permissions("w1", full=True)[0])
    assert not any("saf" in p for p in rack_permissions("w1", full=False, groups=["work"])[0])
    # The Rack agrees: its input of store is shared, its input of every is its own.
    from fluxrig.agent.lanes import scenario_from_projection
    from fluxrig.scenario.groups import shared_input

    scenario = scenario_from_projection(proj, "w1")
    shared = {w.dst.gear: shared_input(scenario, w, "w1") for w in scenario.wires}
    assert shared == {"store": "work", "every": None}


def test_a_group_output_across_the_bus_is_refused_as_not_built():
    import yaml
    from fluxrig_mixer.groups import group_problems

    doc = yaml.safe_load(SHARED_DOC)
    doc["gears"].append({"name": "out", "type": "sink", "deploy": "edge", "config": {"mode": "null"}})
    doc["gears"].append({"name": "fwd", "type": "generator", "deploy": "work", "config": {"count": 1}})
    doc["wires"].append({"from": "fwd.out", "to": "out.in"})
    problems = group_problems(doc)
    assert len(problems) == 1 and "not supported yet" in problems[0].message


def test_a_conductor_sharing_reversals_with_another_group_is_refused():
    import yaml
    from fluxrig_mixer.groups import group_problems

    doc = yaml.safe_load(SHARED_DOC)
    doc["gears"].append({"name": "sw", "type": "conductor", "deploy": "work", "config": {"saf": {"group": "work"}}})
    assert group_problems(doc) == []
    doc["gears"][-1]["config"]["saf"]["group"] = "pos"
    (p,) = group_problems(doc)
    assert p.location == f"gears[{len(doc['gears']) - 1}].config.saf.group" and "deployed to work" in p.message


def test_overlapping_stan_ranges_in_a_group_are_found():
    import yaml
    from fluxrig_mixer.groups import stan_overlaps

    doc = yaml.safe_load(GROUPS)
    doc["gears"].append({"name": "switch", "type": "conductor", "deploy": "pos", "config": {}})

    class R:
        def __init__(self, name, lo, hi, labels=POS, status="active"):
            self.name, self.labels, self.status = name, labels, status
            self.stats = {"gears": {"switch": {"saf_stan_lo": lo, "saf_stan_hi": hi}}}

    disjoint = [R("a", 1, 333333), R("b", 333334, 666666), R("c", 666667, 999999)]
    assert stan_overlaps(doc, disjoint) == []
    clash = disjoint + [R("d", 600000, 700000)]
    found = stan_overlaps(doc, clash)
    assert {o.racks for o in found} == {("b", "d"), ("d", "c")}
    assert "give each member its own saf.stan_range" in str(found[0])
    # Not members (labels), suspended or removed Racks do not count.
    assert stan_overlaps(doc, disjoint + [R("x", 1, 9, labels={}), R("y", 1, 9, status="suspended")]) == []
