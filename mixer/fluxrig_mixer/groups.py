"""Rack groups at the Mixer: the shared durable consumers of group inputs, and their bus rights.

Job (issue 17 item 2). A gear deployed to a group runs on every active member (fluxrig.scenario.
groups). Its guaranteed-lane inputs from outside the group must be processed once by the group,
not once per member, so they do not go into the members' own `in-<rack>` consumers: each group
with such inputs gets one durable consumer `grp-<group>` on stream flux-msg (created and kept in
step by fluxrig_mixer.lanes.LaneConsumers, like the Racks' own), from which every member pulls.
JetStream hands each message to one puller; a member that dies holding a message has it
redelivered to another member after `ack_wait`.

Contract:
  * `group_inputs(doc)` -> {group: sorted source subjects}: the bus wires into a gear deployed
    to a group whose source gear is deployed to a named Rack (`flux.msg.<rack>.<gear>.<port>`).
  * `group_problems(doc)` -> ScenarioProblems for what is not built yet: a bus wire whose source
    is a group gear and whose destination is outside the group (its subject would be one per
    member, `flux.msg.*.<gear>.<port>`, which neither the projection nor the Rack's routing
    handle today). Activation refuses such a scenario with that message.
  * `GroupConsumerPolicy` -> the consumer settings: `ack_wait` above the members' processing
    deadline, an explicit back-off for redeliveries, bounded deliveries (`max_deliver`): the
    Rack parks a message at its `max_deliver - 1`-th delivery as poison (ERROR, counted,
    acknowledged: fluxrig.agent.lanes GROUP_MAX_DELIVERIES), JetStream's own limit is one more
    so that last delivery reaches a Rack; `max_ack_pending` bounds what the group holds.
  * `stan_overlaps(doc, racks)` -> the pairs of members of a group whose conductor (a gear of
    the group) reports overlapping `saf.stan_range`s in its heartbeat metrics (`saf_stan_lo/hi`):
    their reversal STANs and RRNs could collide at the host. Each member must be given its own
    range (README: Rack groups); the controller logs an ERROR while any overlap stands.
  * `member_rights(doc, labels)` -> the groups whose shared consumer a Rack's bus user may pull
    from and ack, and whose relay subjects it may publish and subscribe (item 3:
    fluxrig.gears.group_relay) (fluxrig_mixer.snake.rack_permissions(groups=...)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fluxrig.errors import ScenarioProblem
from fluxrig.scenario.groups import group_labels, member_groups
from fluxrig.wire import subjects as S

__all__ = [
    "GROUP_CONSUMER_PREFIX",
    "DEFAULT_GROUP_ACK_WAIT_S",
    "DEFAULT_GROUP_BACKOFF_S",
    "DEFAULT_GROUP_MAX_DELIVER",
    "DEFAULT_GROUP_MAX_ACK_PENDING",
    "GroupConsumerPolicy",
    "group_inputs",
    "group_problems",
    "member_rights",
    "StanOverlap",
    "stan_overlaps",
    "group_conductors",
]

GROUP_CONSUMER_PREFIX = "grp-"
#: Above any member's processing deadline for one message (a gear's timeouts are seconds).
DEFAULT_GROUP_ACK_WAIT_S = 30.0
#: Waits before the 2nd, 3rd, ... delivery of a message nobody acknowledged (JetStream `backoff`).
DEFAULT_GROUP_BACKOFF_S = (30.0, 60.0, 120.0, 240.0)
#: JetStream stops after this many deliveries; the Rack parks at the one before (poison).
DEFAULT_GROUP_MAX_DELIVER = 6
DEFAULT_GROUP_MAX_ACK_PENDING = 4096


@dataclass(frozen=True)
class GroupConsumerPolicy:
    """Settings of every `grp-<group>` consumer (see the module docstring)."""

    ack_wait: float = DEFAULT_GROUP_ACK_WAIT_S
    backoff: tuple[float, ...] = field(default=DEFAULT_GROUP_BACKOFF_S)
    max_deliver: int = DEFAULT_GROUP_MAX_DELIVER
    max_ack_pending: int = DEFAULT_GROUP_MAX_ACK_PENDING

    def __post_init__(self):
        if self.ack_wait <= 0 or self.max_deliver < 2 or self.max_ack_pending < 1:
            raise ValueError("group consumer: ack_wait > 0, max_deliver >= 2, max_ack_pending >= 1")
        if self.backoff and (len(self.backoff) >= self.max_deliver or self.backoff[0] < self.ack_wait):
            # JetStream: max_deliver must exceed the back-off steps; the first step replaces ack_wait.
            raise ValueError("group consumer: fewer back-off steps than max_deliver, the first >= ack_wait")


def _deploys(doc: dict) -> dict[str, str | None]:
    return {g["name"]: g.get("deploy") for g in doc.get("gears") or [] if isinstance(g, dict) and g.get("name")}


def _ends(w: dict) -> tuple[list[str], list[str]]:
    return str(w.get("from", "")).split("."), str(w.get("to", "")).split(".")


def group_inputs(doc: dict) -> dict[str, list[str]]:
    """{group: sorted source subjects of its inputs from named Racks} (see the module docstring)."""
    groups = set(group_labels(doc))
    deploy = _deploys(doc)
    out: dict[str, set[str]] = {}
    for w in doc.get("wires") or []:
        if not isinstance(w, dict):
            continue
        src, dst = _ends(w)
        if len(src) < 2 or len(dst) < 2:
            continue
        dst_group = deploy.get(dst[-2])
        if dst_group not in groups:
            continue
        src_rack = src[0] if len(src) == 3 else deploy.get(src[-2])
        if not src_rack or src_rack in groups or not S.RACK_NAME_RE.match(src_rack):
            continue  # a global gear (runs on the member too) or a group gear: not a shared input
        out.setdefault(dst_group, set()).add(S.msg(src_rack, src[-2], src[-1]))
    return {g: sorted(subjects) for g, subjects in sorted(out.items())}


def group_problems(doc: dict) -> list[ScenarioProblem]:
    """What activation must refuse: what is not built yet (see the module docstring), and a
    conductor sharing its reversals with a group it is not deployed to (fluxrig.saga.mirror)."""
    groups = set(group_labels(doc))
    deploy = _deploys(doc)
    problems = []
    for i, w in enumerate(doc.get("wires") or []):
        if not isinstance(w, dict):
            continue
        src, dst = _ends(w)
        if len(src) < 2 or len(dst) < 2:
            continue
        g = deploy.get(src[-2])
        if g in groups and deploy.get(dst[-2]) != g and deploy.get(dst[-2]) is not None:
            problems.append(
                ScenarioProblem(
                    f"wires[{i}]",
                    f"a wire from group {g}'s gear {src[-2]} to a gear outside the group is not supported yet "
                    "(issue 17: its subject would differ per member); keep group outputs inside the group "
                    "(a client gear of the group dials the next hop)",
                )
            )
    for i, g in enumerate(doc.get("gears") or []):
        if not isinstance(g, dict) or g.get("type") != "conductor":
            continue
        saf = (g.get("config") or {}).get("saf") or {}
        named = saf.get("group") if isinstance(saf, dict) else None
        if named and named != g.get("deploy"):
            problems.append(ScenarioProblem(
                f"gears[{i}].config.saf.group",
                f"conductor {g.get('name')} shares its reversals with group {named} but is deployed to "
                f"{g.get('deploy') or 'no group'}: saf.group must name the group the gear is deployed to",
            ))  # fmt: skip
    return problems


def member_rights(doc: dict | None, labels: dict | None) -> list[str]:
    """The groups whose shared consumer a Rack with `labels` may pull from and whose relay
    subjects (`flux.grp.<group>.>`, fluxrig.gears.group_relay) it may use."""
    if not doc:
        return []
    return member_groups(doc, labels)


@dataclass(frozen=True)
class StanOverlap:
    group: str
    gear: str
    racks: tuple[str, str]
    ranges: tuple[tuple[int, int], tuple[int, int]]

    def __str__(self) -> str:
        (a, b), (ra, rb) = self.racks, self.ranges
        return (f"group {self.group}: conductor {self.gear} on {a} ({ra[0]}-{ra[1]}) and {b} ({rb[0]}-{rb[1]}) "
                "originate overlapping reversal STANs: give each member its own saf.stan_range")  # fmt: skip


def group_conductors(doc: dict | None) -> list[tuple[str, str]]:
    """(gear, group) of every conductor deployed to a group."""
    if not doc:
        return []
    groups = group_labels(doc)
    return [
        (g["name"], g["deploy"])
        for g in doc.get("gears") or []
        if isinstance(g, dict) and g.get("type") == "conductor" and g.get("deploy") in groups
    ]


def stan_overlaps(doc: dict | None, racks) -> list[StanOverlap]:
    """Overlapping reversal STAN ranges between members of a group (see the module docstring).
    `racks`: RackRow-like (name, labels, status, stats with the heartbeat's `gears` metrics)."""
    out = []
    for gear, group in group_conductors(doc):
        ranges = []
        for r in racks:
            if str(getattr(r, "status", "")) not in ("active", "offline") or group not in member_groups(doc, r.labels):
                continue
            m = ((getattr(r, "stats", None) or {}).get("gears") or {}).get(gear) or {}
            lo, hi = m.get("saf_stan_lo"), m.get("saf_stan_hi")
            if isinstance(lo, int) and isinstance(hi, int):
                ranges.append((r.name, (lo, hi)))
        ranges.sort(key=lambda x: x[1])
        for i, (a, ra) in enumerate(ranges):
            for b, rb in ranges[i + 1 :]:
                if rb[0] > ra[1]:
                    break
                out.append(StanOverlap(group, gear, (a, b), (ra, rb)))
    return out
