"""Rack groups: which groups a Rack is a member of, and what its projection carries about them.

Job. A scenario's `racks` section declares groups by labels (`{group: pos, match: {labels:
{role: pos}}}`); a gear with `deploy: <group>` runs on every active member of the group
(issue 17 item 1). Membership is decided by the Mixer, which alone knows a Rack's labels (they
come from its enrollment token, never from the Rack): `member_groups(doc, labels)` is that rule,
shared by the Mixer's projection (fluxrig_mixer.scenarios.project) and anything else that must
agree with it (the guaranteed-lane consumers, the tests).

Contract:
  * `group_labels(doc)` -> {group name: match labels} of the declared groups (a group with no
    labels matches nothing: validation refuses it anyway).
  * `member_groups(doc, labels)` -> sorted names of the groups whose every match label is among
    `labels` (values compared as text: `zone: 1` in YAML matches the label `zone=1`).
  * A projection names the groups its Rack was placed in under `x-fluxrig.groups`
    (`projection_groups(doc)` reads it back, bounded by MAX_GROUPS); the Rack runs a gear
    deployed to one of them as its own (fluxrig.runtime.graph) and publishes its outputs on
    its own subjects `flux.msg.<rack>.<gear>.<port>` (its bus user may publish nothing else).
  * `shared_input(scenario, wire)` -> the group whose shared consumer feeds `wire` (a bus wire
    into a gear of one of the Rack's groups from a gear outside that group), else None.
  * `without_groups(doc)` -> the projection with the group gears, their wires and the group
    entries removed: what a member runs once it has left its groups (suspended by the
    operator: its share moves to the others while its own gears keep running).

Membership is never a function of the other members: approving, suspending or losing one
member changes no other member's projection, so their passports and gears are untouched.
"""

from __future__ import annotations

__all__ = [
    "MAX_GROUPS",
    "PROJECTION_KEY",
    "group_labels",
    "member_groups",
    "projection_groups",
    "without_groups",
    "shared_input",
]

#: The most groups one projection may name (a bound on what a passport makes a Rack walk).
MAX_GROUPS = 64
#: Top-level key of a projection that says what it is (rack, digest, groups).
PROJECTION_KEY = "x-fluxrig"


def group_labels(doc: dict) -> dict[str, dict[str, str]]:
    """{group name: match labels (values as text)} of the groups `doc` declares."""
    out: dict[str, dict[str, str]] = {}
    for entry in doc.get("racks") or []:
        if not isinstance(entry, dict) or not entry.get("group") or entry.get("name"):
            continue
        match = entry.get("match")
        labels = match.get("labels") if isinstance(match, dict) else None
        out[str(entry["group"])] = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    return out


def member_groups(doc: dict, labels: dict | None) -> list[str]:
    """Sorted names of the groups of `doc` whose match labels all hold in `labels`."""
    have = {str(k): str(v) for k, v in (labels or {}).items()}
    return sorted(
        name for name, want in group_labels(doc).items() if want and all(have.get(k) == v for k, v in want.items())
    )


def projection_groups(doc: dict) -> frozenset[str]:
    """The groups a projection says its Rack is a member of (empty for a scenario file)."""
    info = doc.get(PROJECTION_KEY)
    groups = info.get("groups") if isinstance(info, dict) else None
    if not isinstance(groups, list):
        return frozenset()
    return frozenset(str(g) for g in groups[:MAX_GROUPS] if isinstance(g, str))


def without_groups(doc: dict) -> dict:
    """`doc` (a projection) minus its group gears, every wire touching them, and its group
    entries; `x-fluxrig.groups` emptied. A new document: `doc` is not changed."""
    groups = projection_groups(doc) | set(group_labels(doc))
    gone = {
        g.get("name")
        for g in doc.get("gears") or []
        if isinstance(g, dict) and isinstance(g.get("deploy"), str) and g["deploy"] in groups
    }

    def touches(w) -> bool:
        if not isinstance(w, dict):
            return False
        ends = [str(w.get("from", "")).split("."), str(w.get("to", "")).split(".")]
        return any((e[-2] if len(e) >= 2 else "") in gone for e in ends)

    out = dict(doc)
    out["gears"] = [g for g in doc.get("gears") or [] if not (isinstance(g, dict) and g.get("name") in gone)]
    out["wires"] = [w for w in doc.get("wires") or [] if not touches(w)]
    if doc.get("x-remote-wires"):
        out["x-remote-wires"] = [w for w in doc["x-remote-wires"] if not touches(w)]
    if doc.get("racks"):
        out["racks"] = [r for r in doc["racks"] if not (isinstance(r, dict) and r.get("group") in groups)]
    info = doc.get(PROJECTION_KEY)
    if isinstance(info, dict):
        out[PROJECTION_KEY] = dict(info, groups=[])
    return out


def shared_input(scenario, wire, rack: str = "") -> str | None:
    """The group whose shared durable consumer (`grp-<group>`) feeds `wire` on Rack `rack`: its
    destination is a gear deployed to one of `scenario.groups` and its source is a gear this
    Rack does not run (another Rack's: in a projection, an `x-remote-wires` entry). A wire from
    a gear running here (a global gear, a gear of the same group) stays with this member."""
    dst = scenario.gear(wire.dst.gear)
    if dst is None or not dst.deploy or dst.deploy not in scenario.groups:
        return None
    src = scenario.gear(wire.src.gear)
    if src is not None and wire.src.rack in (None, "", rack):
        return None
    return dst.deploy
