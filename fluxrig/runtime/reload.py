"""Shadow swap: reload a running graph, touching only what changed, rolling back on failure.

1. Diff: a gear whose type, config and placement are unchanged is *kept* (the same object,
   with its sockets, connections and in-flight state); a gear whose spec changed is
   *rebuilt*; new names are *added*; missing names are *removed*.
2. Build beside the running graph: rebuilt and added gears are constructed and wired into
   the new graph. A rebuilt server whose bind address is unchanged inherits a duplicate of
   the running listening socket (`Gear.handover_from`): the socket is never closed and
   re-bound, so no connection attempt is refused. Then they start. Any failure stops what
   was started and leaves the running graph untouched.
3. Cut over: every kept gear's output ports are pointed at the new targets in one
   synchronous step, i.e. between two messages. Lanes that still feed the same gear object
   are reused, so nothing queued is lost.
4. Retire: old versions and removed gears drain (finishing messages already in them, their
   outputs still wired to the graph they came from) and stop; their lanes are joined first.

Every reload produces a `ReloadReport` (versions, kept/rebuilt/added/removed, durations).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field

from ..errors import FluxError
from ..scenario.model import Scenario
from .gear import Gear
from .graph import Runtime

__all__ = ["ReloadReport", "ReloadError", "shadow_swap", "diff_gears"]

log = logging.getLogger("fluxrig.reload")


class ReloadError(FluxError):
    """A reload was refused or rolled back; the running graph is unchanged."""

    def __init__(self, reason: str, report: "ReloadReport"):
        self.reason = reason
        self.report = report
        super().__init__(reason)


@dataclass
class ReloadReport:
    old_version: str
    new_version: str
    kept: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    ok: bool = False
    reason: str = ""
    cutover_ms: float = 0.0
    duration_ms: float = 0.0

    def as_dict(self) -> dict:
        return {"event": "reload", **asdict(self)}


def _same(a, b) -> bool:
    return a.type == b.type and a.config == b.config and (a.deploy or "") == (b.deploy or "")


def diff_gears(rt: Runtime, new: Scenario) -> tuple[list[str], list[str], list[str], list[str]]:
    """(kept, rebuilt, added, removed) gear names for this Rack."""
    old_specs = {s.name: s for s in rt.local_specs(rt.scenario)}
    new_specs = {s.name: s for s in rt.local_specs(new)}
    kept = [n for n, s in new_specs.items() if n in old_specs and _same(old_specs[n], s)]
    rebuilt = [n for n, s in new_specs.items() if n in old_specs and not _same(old_specs[n], s)]
    added = [n for n in new_specs if n not in old_specs]
    removed = [n for n in old_specs if n not in new_specs]
    return kept, rebuilt, added, removed


async def _stop_quietly(rt: Runtime, gears: list[Gear]) -> None:
    for g in gears:
        await rt._stop_gear(g)


async def shadow_swap(rt: Runtime, new: Scenario) -> ReloadReport:
    """Reload `rt` to `new` in place; raises ReloadError (graph unchanged) on failure."""
    t0 = time.perf_counter()
    kept, rebuilt, added, removed = diff_gears(rt, new)
    report = ReloadReport(rt.scenario.version, new.version, kept, rebuilt, added, removed)

    def fail(reason: str) -> ReloadError:
        report.reason = reason
        report.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
        log.error("reload to %s refused, running graph unchanged: %s", new.version, reason)
        return ReloadError(reason, report)

    if rt.state != "running":
        raise fail(f"the graph is {rt.state}, not running")

    # 2. build beside the running graph
    fresh: dict[str, Gear] = {}
    specs = {s.name: s for s in rt.local_specs(new)}
    try:
        for name in rebuilt + added:
            fresh[name] = rt.make_gear(specs[name])
        gears = {name: (rt.gears[name] if name in kept else fresh[name]) for name in specs}
        old_lanes = {lane.key: lane for lane in rt.lanes}
        targets, lanes = rt.plan_wiring(new, gears, reuse=old_lanes)
    except Exception as exc:
        raise fail(f"cannot build the new graph: {exc}") from exc

    # New gears are wired now; kept gears keep their current outputs until the cut-over.
    for gear in fresh.values():
        for port, out in gear.outputs.items():
            out.targets = targets.get((gear.name, port), [])
        if gear.name in rt.gears:
            gear.handover_from(rt.gears[gear.name])
    new_lanes = [lane for lane in lanes.values() if lane not in rt.lanes]
    for lane in new_lanes:
        lane.start()
    started: list[Gear] = []
    has_input = {w.dst.gear for w in new.wires}
    order = [g for g in fresh.values() if g.name in has_input] + [g for g in fresh.values() if g.name not in has_input]
    for gear in order:
        try:
            await gear.start()
            gear.transition("started")
            started.append(gear)
        except Exception as exc:
            await _stop_quietly(rt, list(reversed(started)) + [gear])
            for lane in new_lanes:
                lane.close()
            raise fail(f"gear {gear.name} failed to start: {type(exc).__name__}: {exc}") from exc

    # 3. cut over, synchronously
    c0 = time.perf_counter()
    retired = [rt.gears[n] for n in rebuilt + removed]
    retired_lanes = [lane for lane in rt.lanes if lane not in lanes.values()]
    rt.apply_wiring({n: rt.gears[n] for n in kept}, targets)
    rt.gears = gears
    rt.lanes = list(lanes.values())
    rt.scenario = new
    report.cutover_ms = round((time.perf_counter() - c0) * 1000, 3)

    # 4. retire the old versions: finish what they hold, then stop them
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rt.rack_config.drain_timeout
    for gear in retired:
        if gear.state == "started":
            gear.transition("draining")
    if retired_lanes:
        try:
            await asyncio.wait_for(asyncio.gather(*(lane.join() for lane in retired_lanes)),
                                   max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            log.warning("reload: retired lanes still held messages at the drain deadline")
    results = await asyncio.gather(
        *(asyncio.wait_for(g.drain(deadline), max(0.0, deadline - loop.time())) for g in retired),
        return_exceptions=True,
    )
    for g, r in zip(retired, results):
        if isinstance(r, BaseException):
            log.warning("reload: old gear %s did not drain: %s", g.name, type(r).__name__)
    for lane in retired_lanes:
        lane.close()
    await _stop_quietly(rt, retired)
    report.ok = True
    report.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
    log.info("reloaded %s -> %s: kept %d, rebuilt %d, added %d, removed %d; cut-over %.3f ms, total %.1f ms",
             report.old_version, report.new_version, len(kept), len(rebuilt), len(added), len(removed),
             report.cutover_ms, report.duration_ms)
    return report
