"""The Rack runtime: one graph running, and one way to change it, `Runtime.swap`.

A Runtime always runs a graph, at first the empty one (`EMPTY`). Cold start is a swap from
the empty graph, a reload a swap from the running one, the kill switch a swap to the empty
graph without drain (`stop_all`). `await runtime.swap(scenario)` does four steps:

1. Build beside the running graph; nothing touches the network. The diff (reload.py) keeps
   unchanged gears as the same objects, with their sockets, connections and in-flight state;
   rebuilt and added gears are constructed and wired into the new graph. A rebuilt gear is
   given the running version it replaces (`Gear.handover_from`): a server whose bind address
   is unchanged takes a duplicate of the listening socket, which is never closed and
   re-bound, so no connection attempt is refused. Lanes that still feed the same gear object
   are reused, so nothing queued in them is lost.
2. Start the new lanes, then the new gears, consumers before producers (gears with an
   incoming wire first), so an I/O gear that accepts traffic finds its pipeline ready. A gear
   whose start() raises: every gear the swap started is stopped again, the new lanes are
   closed, GearStartError is raised, and the running graph is untouched (it never ran
   half-built).
3. Cut over: every kept gear's output ports are pointed at the new targets, and the new
   graph replaces the old one, in one synchronous step, i.e. between two messages.
4. Retire: old versions and removed gears drain (stop accepting, finish what they hold,
   their outputs still wired to the graph they came from) while the lanes that fed them are
   quiesced; then they stop and those lanes close. With `drain=False` (the kill switch) they
   stop at once. An old version its successor asked to linger (`Gear.linger`: an I/O gear
   whose `on_reload: drain` leaves it serving its own connections) is retired in the
   background instead: the swap does not wait for it, its outputs follow its successor's
   (at this and every later cut-over), and it drains with a deadline `linger` seconds away,
   then stops. The kill switch and shutdown end lingering gears too.

A joined Rack's bus (bus.py) is held for the whole swap: nothing is fetched while a new
input and the old one it replaces are both registered.

Wires: a 1:1 joint becomes a `DirectTarget` (fused call chain) when `rack.fuse_sync_chains`
is on, any other joint a bounded `Lane` (lane.py). Gears on other Racks (`deploy`) are
skipped; wires to or from them, and wires marked `lane: guaranteed`, go through the bus,
which only a Rack joined to a Mixer has: standalone, they are refused with a clear error.

The runtime's state and each gear's lifecycle move only through the tables of states.py.
Swaps, `stop_gear`, `drain` and `stop` take one lock, so they never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import FluxError
from ..ids import uuid7
from ..scenario.groups import shared_input
from ..scenario.model import GearSpec, Scenario
from ..wire import subjects as S
from .bus import Bus
from .control import ControlBus
from .gear import Conduit, Gear, GearContext, HotTarget, OutPort
from .lane import DirectTarget, Lane
from .registry import get_gear_class
from .reload import GearStartError, ReloadError, ReloadReport, diff_gears
from .states import GearEvent, GearState, IllegalTransition, RuntimeEvent, RuntimeState, next_runtime_state

__all__ = ["Runtime", "Graph", "EMPTY", "GearStartError"]

log = logging.getLogger("fluxrig.runtime")
reload_log = logging.getLogger("fluxrig.reload")

# The graph a runtime runs before its first swap and after `stop_all`. Its lists are tuples:
# it is shared, so nothing may append to it.
EMPTY = Scenario(name="", version="none", gears=(), wires=(), racks=(), doc={})  # type: ignore[arg-type]


class _Defaults:
    lane_queue_size = 1024
    lane_send_timeout = 5.0
    fuse_sync_chains = True
    drain_timeout = 35.0
    cleanup_timeout = 2.0


@dataclass(frozen=True, slots=True)
class Graph:
    """One graph: the scenario it runs, its gears by name, and the conduits (lanes, bus
    inputs and outputs) it starts and closes. Replaced as a whole at a cut-over."""

    scenario: Scenario
    gears: dict[str, Gear]
    lanes: tuple[Conduit, ...]


@dataclass(slots=True)
class _Plan:
    """A swap, built and not yet started."""

    old: Graph  # what it was planned against
    graph: Graph  # what runs after the cut-over
    fresh: list[Gear]  # rebuilt and added gears, in start order
    handed: frozenset[str]  # the rebuilt ones: handover_from gave them part of a running gear
    kept: dict[str, Gear]
    targets: dict[tuple[str, str], list[HotTarget]]
    new_lanes: list[Conduit]  # started before the fresh gears
    retired: list[Gear]  # old versions and removed gears, in stop order
    retired_lanes: list[Conduit]


def _start_order(scenario: Scenario, gears: Iterable[Gear]) -> list[Gear]:
    # Sources (gears with no incoming wire) last, so pipelines are ready before traffic.
    has_input = {w.dst.gear for w in scenario.wires}
    gears = list(gears)
    return [g for g in gears if g.name in has_input] + [g for g in gears if g.name not in has_input]


class Runtime:
    """The running graph of one Rack. `await swap(scenario)` moves it to another scenario
    (cold start, reload), `await stop_all()` empties it at once (kill), `await shutdown()`
    drains and stops it for good. `start()` is `swap` of the constructor's scenario."""

    EMPTY = EMPTY

    def __init__(
        self,
        scenario: Scenario | None = None,
        rack_name: str = "",
        rack_config=None,
        control: ControlBus | None = None,
        bus: Bus | None = None,
        state_dir: str = "",
    ):
        self._initial = scenario if scenario is not None else EMPTY  # what start() swaps in
        self.rack_name = rack_name
        self.state_dir = state_dir  # where gears keep durable state (the conductor's saga journal)
        self.rack_config = rack_config or _Defaults()
        self.control = control or ControlBus()
        # The guaranteed lane (fluxrig.runtime.bus); None for a standalone Rack.
        self.bus = bus
        self._graph = Graph(EMPTY, {}, ())
        self._staged: _Plan | None = None  # build() before start(): the graph start() will run
        self._state = RuntimeState.RUNNING
        self._lock = asyncio.Lock()
        # retired versions still serving what they hold (Gear.linger), and their drain tasks
        self._lingering: dict[Gear, asyncio.Task] = {}

    # -- what runs ------------------------------------------------------------------------
    @property
    def state(self) -> RuntimeState:
        return self._state

    # Before start(), what `build()` staged is shown (its gears not started), as it always was.
    @property
    def scenario(self) -> Scenario:
        return (self._staged.graph if self._staged is not None else self._graph).scenario

    @property
    def gears(self) -> dict[str, Gear]:
        return (self._staged.graph if self._staged is not None else self._graph).gears

    @property
    def lanes(self) -> tuple[Conduit, ...]:
        return (self._staged.graph if self._staged is not None else self._graph).lanes

    def metrics(self) -> dict[str, dict]:
        return {name: g.metrics() for name, g in self._graph.gears.items()}

    def _transition(self, event: RuntimeEvent) -> None:
        self._state = next_runtime_state(self.rack_name, self._state, event)

    # -- building ---------------------------------------------------------------------------
    def _local(self, spec: GearSpec, groups: frozenset = frozenset()) -> bool:
        # A gear deployed to a group this Rack is a member of (issue 17) runs here too.
        return not spec.deploy or not self.rack_name or spec.deploy == self.rack_name or spec.deploy in groups

    def local_specs(self, scenario: Scenario) -> list[GearSpec]:
        return [spec for spec in scenario.gears if self._local(spec, scenario.groups)]

    def make_gear(self, spec: GearSpec, scenario: Scenario) -> Gear:
        """Construct one gear of `scenario` (not started) with its output ports."""
        scenario_dir = os.path.dirname(os.path.abspath(scenario.source)) if scenario.source else os.getcwd()
        cls = get_gear_class(spec.type)
        ctx = GearContext(
            self.rack_name,
            self.control,
            self.rack_config,
            logging.getLogger(f"fluxrig.gear.{spec.name}"),
            scenario_dir,
            state_dir=self.state_dir,
            bus=self.bus,
        )
        gear = cls(spec.name, spec.config, ctx)
        _ins, outs = cls.MANIFEST.ports(spec.config)
        gear.outputs = {p: OutPort(gear, p, uuid7()) for p in outs}
        return gear

    def plan_wiring(self, scenario: Scenario, gears: dict[str, Gear], reuse: dict | None = None):
        """Targets per output port and the conduits they need, for `gears` wired as `scenario`
        says. `reuse` maps a conduit key to a running conduit: kept when it still feeds the
        same gear object, so messages queued in it survive a reload. A local wire into a
        stopped gear (the kill switch's) is not wired again: senders count what they would
        send it as dropped, as `stop_gear` left them."""
        rc = self.rack_config
        reuse = reuse or {}
        local = [w for w in scenario.wires if w.src.gear in gears and w.dst.gear in gears and w.lane != "guaranteed"]
        targets: dict[tuple[str, str], list[HotTarget]] = {}
        lanes: dict[tuple, Conduit] = {}
        self._plan_guaranteed(scenario, gears, local, targets, lanes, reuse)
        fan_out = Counter((w.src.gear, w.src.port) for w in local)
        fan_in = Counter((w.dst.gear, w.dst.port) for w in local)
        for w in local:
            dst_gear = gears[w.dst.gear]
            if dst_gear.state is GearState.STOPPED:
                continue
            key = (w.dst.gear, w.dst.port)
            if rc.fuse_sync_chains and fan_out[(w.src.gear, w.src.port)] == 1 and fan_in[key] == 1:
                target = DirectTarget(dst_gear, w.dst.port)
            else:
                target = lanes.get(key)
                if target is None:
                    old = reuse.get(key)
                    if old is not None and old.gear is dst_gear:
                        target = old
                    else:
                        target = Lane(dst_gear, w.dst.port, rc.lane_queue_size, rc.lane_send_timeout)
                    lanes[key] = target
            targets.setdefault((w.src.gear, w.src.port), []).append(target)
        return targets, lanes

    def _rack_of(self, scenario: Scenario, ep) -> str:
        if ep.rack:
            return ep.rack
        spec = scenario.gear(ep.gear)
        if spec is not None and spec.deploy in scenario.groups:
            return self.rack_name or "local"  # a member publishes a group gear's output as its own
        return (spec.deploy if spec and spec.deploy else None) or self.rack_name or "local"

    def _plan_guaranteed(self, scenario, gears, local, targets, lanes, reuse) -> None:
        """Wires to or from another Rack, or marked `lane: guaranteed`, go through the bus:
        an outbound target per source subject, an inbound source per (subject, input port)."""
        for w in scenario.wires:
            if w in local or (w.src.gear not in gears and w.dst.gear not in gears):
                continue
            if self.bus is None:
                raise FluxError(
                    f"wire {w.src} -> {w.dst} needs the guaranteed lane (another Rack, or lane: guaranteed): "
                    "join this Rack to a Mixer (snake.url) to run it"
                )
            subject = S.msg(self._rack_of(scenario, w.src), w.src.gear, w.src.port)
            if w.src.gear in gears:
                key = ("bus-out", subject)
                target = lanes.get(key) or reuse.get(key) or self.bus.outbound(subject)
                lanes[key] = target
                bucket = targets.setdefault((w.src.gear, w.src.port), [])
                if target not in bucket:
                    bucket.append(target)
            if w.dst.gear in gears:
                consumer = f"{self._rack_of(scenario, w.dst)}.{w.dst.gear}.{w.dst.port}.{w.src.gear}.{w.src.port}"
                key = ("bus-in", consumer)
                old = reuse.get(key)
                dst_gear = gears[w.dst.gear]
                # Same subject too: the source Rack renamed (issue 13) keeps the consumer key
                # (gear and port names) but publishes on its new name's subject; the old source
                # would route nothing of it (parked as "no input").
                if old is not None and old.gear is dst_gear and old.subject == subject:
                    lanes[key] = old
                else:
                    # A group gear's input from outside the group is one consumer shared by
                    # the members (issue 17: fluxrig.scenario.groups.shared_input).
                    shared = shared_input(scenario, w, self.rack_name)
                    extra = {"shared": S.group_consumer(shared)} if shared else {}
                    lanes[key] = self.bus.inbound(subject, consumer, dst_gear, w.dst.port, **extra)

    @staticmethod
    def apply_wiring(gears: Iterable[Gear], targets: dict) -> None:
        """Point every output port at its new targets: synchronous, so atomic between messages."""
        for gear in gears:
            for port, out in gear.outputs.items():
                out.targets = targets.get((gear.name, port), [])

    def _diff(self, old: Graph, new: Scenario) -> tuple[list[str], list[str], list[str], list[str]]:
        # The old side is what runs, not what the old scenario would place here now: the
        # Rack's name may have changed since (a joined Rack learns it from the Mixer).
        specs = {s.name: s for s in old.scenario.gears}
        return diff_gears([specs[name] for name in old.gears], self.local_specs(new))

    def _plan(self, old: Graph, new: Scenario) -> _Plan:
        """Step 1: the new graph beside `old` (see the module docstring). Raises what the
        build raised; fresh gears that were handed something are not started."""
        kept, rebuilt, _added, removed = self._diff(old, new)
        new_specs = self.local_specs(new)
        fresh = {s.name: self.make_gear(s, new) for s in new_specs if s.name not in kept}
        gears = {s.name: old.gears[s.name] if s.name in kept else fresh[s.name] for s in new_specs}
        targets, lanes = self.plan_wiring(new, gears, reuse={lane.key: lane for lane in old.lanes})
        # Fresh gears are wired now; kept gears keep their current outputs until the cut-over.
        self.apply_wiring(fresh.values(), targets)
        for name in rebuilt:
            fresh[name].handover_from(old.gears[name])
        running = set(old.lanes)
        conduits = tuple(lanes.values())
        in_use = set(conduits)
        retiring = set(rebuilt) | set(removed)
        return _Plan(
            old=old,
            graph=Graph(new, gears, conduits),
            fresh=_start_order(new, fresh.values()),
            handed=frozenset(rebuilt),
            kept={name: gears[name] for name in kept},
            targets=targets,
            new_lanes=[lane for lane in conduits if lane not in running],
            retired=[g for g in reversed(_start_order(old.scenario, old.gears.values())) if g.name in retiring],
            retired_lanes=[lane for lane in old.lanes if lane not in in_use],
        )

    def build(self) -> Graph:
        """Build (not start) the graph of the constructor's scenario beside the running one
        and return it: raises what a swap to it would be refused for (a guaranteed wire on a
        standalone Rack). The next `start()` swaps in exactly these gears; until then
        `gears`, `lanes` and `scenario` show them (how callers inspected a graph before
        starting it). Building never touches the network."""
        self._staged = self._plan(self._graph, self._initial)
        return self._staged.graph

    # -- the lifecycle --------------------------------------------------------------------------
    async def swap(self, new: Scenario, *, drain: bool = True, timeout: float | None = None) -> ReloadReport:
        """Move the running graph to `new` (see the module docstring). Retired gears drain
        for up to `timeout` (default `rack.drain_timeout`) unless `drain` is False. Returns
        the ReloadReport; raises ReloadError (GearStartError when a gear refused to start)
        with the running graph unchanged."""
        async with self._lock, self._held():
            return await self._swap(new, drain, timeout)

    async def start(self) -> ReloadReport:
        """Swap in the scenario given to the constructor (again: nothing changes)."""
        return await self.swap(self._initial)

    async def stop_all(self) -> ReloadReport:
        """The kill switch: stop every gear now, without drain (connections and listeners
        close at once), and run the empty graph; the runtime carries on and takes the next
        swap. A gear that cannot be stopped cleanly is logged, never raised."""
        return await self.swap(EMPTY, drain=False)

    def _held(self):
        # One hold for the whole swap: the bus fetches nothing while old and new inputs overlap.
        return self.bus.hold() if self.bus is not None else contextlib.nullcontext()

    async def _swap(self, new: Scenario, drain: bool, timeout: float | None) -> ReloadReport:
        t0 = time.perf_counter()
        old = self._graph
        report = ReloadReport(old.scenario.version, new.version)

        def refused(reason: str) -> str:
            report.reason = reason
            report.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
            reload_log.error("reload to %s refused, running graph unchanged: %s", new.version, reason)
            return reason

        try:
            self._transition(RuntimeEvent.SWAP)
        except IllegalTransition as exc:
            raise ReloadError(refused(f"the graph is {exc.state}, not running"), report) from exc
        cut = False
        staged, self._staged = self._staged, None
        try:
            report.kept, report.rebuilt, report.added, report.removed = self._diff(old, new)
            try:
                if staged is not None and staged.old is old and staged.graph.scenario is new:
                    plan = staged
                else:
                    plan = self._plan(old, new)
            except Exception as exc:
                raise ReloadError(refused(f"cannot build the new graph: {exc}"), report) from exc
            try:
                await self._start_fresh(plan, report)
            except GearStartError as exc:
                refused(exc.reason)
                raise
            # what each rebuilt gear did with the connections it was handed (issue 18)
            report.handover = {
                g.name: dict(g.handover) for g in plan.fresh if g.name in plan.handed and getattr(g, "handover", None)
            }
            # 3. cut over, synchronously
            c0 = time.perf_counter()
            self.apply_wiring(plan.kept.values(), plan.targets)
            self.apply_wiring(self._lingering, plan.targets)
            self._graph = plan.graph
            cut = True
            report.cutover_ms = round((time.perf_counter() - c0) * 1000, 3)
            # 4. retire
            if drain:
                self._linger([g for g in plan.retired if g.linger > 0 and g.state is GearState.STARTED], plan.targets)
            else:
                await self._end_lingering(None)
            await self._retire(
                [g for g in plan.retired if g not in self._lingering], plan.retired_lanes, drain, timeout
            )
        finally:
            self._transition(RuntimeEvent.SWAPPED if cut else RuntimeEvent.ROLLED_BACK)
        report.ok = True
        report.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
        self._log_swap(old, report, drain)
        return report

    async def _start_fresh(self, plan: _Plan, report: ReloadReport) -> None:
        """Step 2, with its rollback: the new graph's own lanes, then its fresh gears."""
        for lane in plan.new_lanes:
            lane.start()
        started: list[Gear] = []
        for i, gear in enumerate(plan.fresh):
            try:
                await gear.start()
            except BaseException as exc:
                log.error("gear %s failed to start: %s; rolling back", gear.name, exc)
                # A rebuilt gear that never started is stopped too: stop() is how it gives back
                # what handover_from gave it (a serial endpoint would otherwise stay the running
                # gear's successor). An added gear that never started holds nothing.
                unstarted = [g for g in plan.fresh[i + 1 :] if g.name in plan.handed]
                await self._halt([*reversed(started), gear, *unstarted], plan.new_lanes)
                if isinstance(exc, Exception):
                    raise GearStartError(gear.name, exc, report) from exc
                raise
            gear.transition(GearEvent.START)
            started.append(gear)

    def _log_swap(self, old: Graph, report: ReloadReport, drain: bool) -> None:
        scenario = self._graph.scenario
        if scenario is EMPTY and old.gears:
            log.info("graph emptied (%s): %d gears stopped in %.1f ms", "drained" if drain else "no drain",
                     len(report.removed), report.duration_ms)  # fmt: skip
        elif not old.gears:
            log.info("scenario %s %s running: %d gears, %d wires (%.1f ms)", scenario.name or "-", scenario.version,
                     len(self._graph.gears), len(scenario.wires), report.duration_ms)  # fmt: skip
        else:
            reload_log.info(
                "reloaded %s -> %s: kept %d, rebuilt %d, added %d, removed %d; cut-over %.3f ms, total %.1f ms",
                report.old_version, report.new_version, len(report.kept), len(report.rebuilt), len(report.added),
                len(report.removed), report.cutover_ms, report.duration_ms,
            )  # fmt: skip

    def _linger(self, gears: list[Gear], targets: dict) -> None:
        """Retire `gears` in the background (module docstring, step 4)."""
        loop = asyncio.get_running_loop()
        for gear in gears:
            self.apply_wiring([gear], targets)  # its successor's targets: the new graph
            gear.transition(GearEvent.DRAIN)
            deadline = loop.time() + gear.linger
            task = loop.create_task(self._linger_then_stop(gear, deadline), name=f"linger:{gear.name}")
            self._lingering[gear] = task

    async def _linger_then_stop(self, gear: Gear, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(gear.drain(deadline), max(0.0, deadline - loop.time()) + 1.0)
        except asyncio.CancelledError:
            raise  # _end_lingering stops it
        except Exception as exc:
            log.warning("retired gear %s did not drain in time: %s", gear.name, type(exc).__name__)
        self._lingering.pop(gear, None)
        await self._stop_gear(gear)

    async def _end_lingering(self, deadline: float | None) -> None:
        """Cut lingering gears short: drain them by `deadline` (None: not at all), stop them."""
        lingering, self._lingering = self._lingering, {}
        for task in lingering.values():
            task.cancel()
        for gear, task in lingering.items():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            gear.linger = 0.0  # no more serving on: finish what was read, then stop
            if deadline is not None:
                loop = asyncio.get_running_loop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(gear.drain(deadline), max(0.0, deadline - loop.time()))
            await self._stop_gear(gear)

    async def _retire(self, gears: list[Gear], lanes: list[Conduit], drain: bool, timeout: float | None) -> bool:
        clean = await self._drain(gears, lanes, timeout) if drain else True
        await self._halt(gears, lanes)
        return clean

    async def _drain(self, gears: list[Gear], lanes: Iterable[Conduit], timeout: float | None) -> bool:
        """Stop accepting and finish in-flight work within `timeout`: the gears first (they
        stop reading while lanes keep delivering to them), then the lanes are quiesced.
        True when everything finished before the deadline."""
        timeout = self.rack_config.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        draining = [g for g in gears if g.state is GearState.STARTED]
        for g in draining:
            g.transition(GearEvent.DRAIN)
        results = await asyncio.gather(
            *(asyncio.wait_for(g.drain(deadline), max(0.0, deadline - loop.time())) for g in draining),
            return_exceptions=True,
        )
        clean = True
        for g, r in zip(draining, results, strict=True):
            if isinstance(r, BaseException):
                clean = False
                log.warning("gear %s did not drain in time: %s", g.name, type(r).__name__)
        lanes = list(lanes)
        try:
            await asyncio.wait_for(asyncio.gather(*(lane.join() for lane in lanes)), max(0.0, deadline - loop.time()))
        except TimeoutError:
            clean = False
            log.warning("hot lanes still held %d messages at the drain deadline", sum(lane.depth() for lane in lanes))
        return clean

    async def _halt(self, gears: Iterable[Gear], lanes: Iterable[Conduit]) -> None:
        for gear in gears:
            await self._stop_gear(gear)
        for lane in lanes:
            lane.close()

    async def _stop_gear(self, gear: Gear) -> None:
        if gear.state is GearState.STOPPED:
            return
        # Stopped first: wait_for runs stop() in a task of its own, and an input (a bus source,
        # a lane) that ran meanwhile would otherwise hand a message to a gear whose sockets and
        # files are already closed, where it fails and is lost. A stopped gear takes nothing:
        # the guaranteed lane gives its messages back to JetStream instead.
        gear.transition(GearEvent.STOP)
        try:
            await asyncio.wait_for(gear.stop(), self.rack_config.cleanup_timeout)
        except Exception as exc:
            log.warning("gear %s did not stop cleanly: %s", gear.name, exc)

    async def stop_gear(self, name: str) -> bool:
        """Stop one gear now, the rest of the graph running on (the kill switch). Every port
        feeding it is unwired first, so senders count what they would send it as dropped
        instead of calling a stopped gear; it stays unwired across swaps that keep it.
        Idempotent; False when no such gear runs here. An old version of it still lingering
        (on_reload: drain) is stopped too: the kill switch leaves none of its connections."""
        async with self._lock:
            for old in [g for g in self._lingering if g.name == name]:
                self._lingering.pop(old).cancel()
                await self._stop_gear(old)
            gear = self._graph.gears.get(name)
            if gear is None:
                return False
            for g in self._graph.gears.values():
                for out in g.outputs.values():
                    if any(t.gear is gear for t in out.targets):
                        out.targets = [t for t in out.targets if t.gear is not gear]
            await self._stop_gear(gear)
            return True

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish in-flight work within `timeout`; True if everything
        finished (and when there is nothing to drain: not running)."""
        async with self._lock:
            return await self._drain_all(timeout)

    async def _drain_all(self, timeout: float | None) -> bool:
        if self._state is not RuntimeState.RUNNING:
            return True
        self._transition(RuntimeEvent.DRAIN)
        graph = self._graph
        timeout = self.rack_config.drain_timeout if timeout is None else timeout
        if self._lingering:  # within the same deadline as the rest
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            await self._end_lingering(deadline)
            timeout = max(0.0, deadline - loop.time())
        return await self._drain(_start_order(graph.scenario, graph.gears.values()), graph.lanes, timeout)

    async def stop(self) -> None:
        """Stop every gear and close every lane; final (the gears stay visible, stopped)."""
        async with self._lock:
            await self._stop_all_parts()

    async def _stop_all_parts(self) -> None:
        if self._state is RuntimeState.STOPPED:
            return
        self._transition(RuntimeEvent.STOP)
        graph = self._graph
        await self._end_lingering(None)
        await self._halt(reversed(_start_order(graph.scenario, graph.gears.values())), graph.lanes)

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Drain then stop, for good; True when the drain finished within its deadline."""
        async with self._lock:
            clean = await self._drain_all(timeout)
            await self._stop_all_parts()
            return clean
