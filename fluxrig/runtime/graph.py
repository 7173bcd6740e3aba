"""The Rack runtime: build a scenario's gears and wires, start them, drain and stop them.

Building never touches the network: gears are constructed and wired first, then started in
order (consumers before producers, so an I/O gear that accepts traffic finds its pipeline
ready). A gear that fails to start stops every gear started before it and the error
propagates: the graph never runs half-built.

Wires: a 1:1 joint becomes a `DirectTarget` (fused call chain) when `rack.fuse_sync_chains`
is on, any other joint a bounded `Lane` (see lane.py). Gears on other Racks (`deploy`) are
skipped; wires to or from them, and wires marked `lane: guaranteed`, go through the bus
(see bus.py), which only a Rack joined to a Mixer has: standalone, they are refused with a
clear error.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter

from ..errors import FluxError
from ..ids import uuid7
from ..scenario.model import Scenario
from .control import ControlBus
from .gear import Gear, GearContext
from .lane import DirectTarget, Lane, OutPort
from .registry import get_gear_class

__all__ = ["Runtime", "GearStartError"]

log = logging.getLogger("fluxrig.runtime")


class GearStartError(FluxError):
    """A gear's start() failed; the graph was rolled back."""

    def __init__(self, gear: str, cause: BaseException):
        self.gear = gear
        self.cause = cause
        super().__init__(f"gear {gear} failed to start: {type(cause).__name__}: {cause}")


class _Defaults:
    lane_queue_size = 1024
    lane_send_timeout = 5.0
    fuse_sync_chains = True
    drain_timeout = 35.0
    cleanup_timeout = 2.0


class Runtime:
    """One running graph. `await build()`, `await start()`, later `await shutdown()`."""

    def __init__(self, scenario: Scenario, rack_name: str = "", rack_config=None, control: ControlBus | None = None,
                 bus=None):
        self.scenario = scenario
        self.rack_name = rack_name
        self.rack_config = rack_config or _Defaults()
        self.control = control or ControlBus()
        # The guaranteed lane (fluxrig.runtime.bus); None for a standalone Rack.
        self.bus = bus
        self.gears: dict[str, Gear] = {}
        self.lanes: list = []
        self.state = "new"

    def _local(self, spec) -> bool:
        return not spec.deploy or not self.rack_name or spec.deploy == self.rack_name

    def make_gear(self, spec) -> Gear:
        """Construct one gear (not started) with its output ports."""
        scenario_dir = os.path.dirname(os.path.abspath(self.scenario.source)) if self.scenario.source else os.getcwd()
        cls = get_gear_class(spec.type)
        ctx = GearContext(self.rack_name, self.control, self.rack_config,
                          logging.getLogger(f"fluxrig.gear.{spec.name}"), scenario_dir)
        gear = cls(spec.name, spec.config, ctx)
        _ins, outs = cls.MANIFEST.ports(spec.config)
        gear.outputs = {p: OutPort(gear, p, uuid7()) for p in outs}
        return gear

    def local_specs(self, scenario: Scenario) -> list:
        return [spec for spec in scenario.gears if self._local(spec)]

    def plan_wiring(self, scenario: Scenario, gears: dict[str, Gear], reuse: dict | None = None):
        """Targets per output port and the lanes they need, for `gears` wired as `scenario` says.

        `reuse` maps (gear, port) to a running Lane: kept when it still feeds the same gear
        object, so messages queued in it survive a reload.
        """
        rc = self.rack_config
        local = [w for w in scenario.wires
                 if w.src.gear in gears and w.dst.gear in gears and w.lane != "guaranteed"]
        targets: dict[tuple[str, str], list] = {}
        lanes: dict[tuple, object] = {}
        self._plan_guaranteed(scenario, gears, local, targets, lanes, reuse or {})
        fan_out = Counter((w.src.gear, w.src.port) for w in local)
        fan_in = Counter((w.dst.gear, w.dst.port) for w in local)
        for w in local:
            dst_gear = gears[w.dst.gear]
            key = (w.dst.gear, w.dst.port)
            if rc.fuse_sync_chains and fan_out[(w.src.gear, w.src.port)] == 1 and fan_in[key] == 1:
                target = DirectTarget(dst_gear, w.dst.port)
            else:
                target = lanes.get(key)
                if target is None:
                    old = (reuse or {}).get(key)
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
            subject = f"flux.msg.{self._rack_of(scenario, w.src)}.{w.src.gear}.{w.src.port}"
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
                lanes[key] = old if old is not None and old.gear is dst_gear else \
                    self.bus.inbound(subject, consumer, dst_gear, w.dst.port)

    @staticmethod
    def apply_wiring(gears: dict[str, Gear], targets: dict) -> None:
        """Point every output port at its new targets: synchronous, so atomic between messages."""
        for gear in gears.values():
            for port, out in gear.outputs.items():
                out.targets = targets.get((gear.name, port), [])

    def build(self) -> None:
        """Construct every local gear and wire them; nothing starts yet."""
        for spec in self.local_specs(self.scenario):
            self.gears[spec.name] = self.make_gear(spec)
        targets, lanes = self.plan_wiring(self.scenario, self.gears)
        self.apply_wiring(self.gears, targets)
        self.lanes = list(lanes.values())
        self.state = "built"

    def _start_order(self) -> list[Gear]:
        # Sources (gears with no incoming wire) last, so pipelines are ready before traffic.
        has_input = {w.dst.gear for w in self.scenario.wires}
        gears = list(self.gears.values())
        return [g for g in gears if g.name in has_input] + [g for g in gears if g.name not in has_input]

    async def start(self) -> None:
        """Start lanes then gears; on any failure stop what started and raise GearStartError."""
        if self.state == "new":
            self.build()
        for lane in self.lanes:
            lane.start()
        started: list[Gear] = []
        for gear in self._start_order():
            try:
                await gear.start()
                gear.transition("started")
                started.append(gear)
            except Exception as exc:
                log.error("gear %s failed to start: %s; rolling back", gear.name, exc)
                for g in reversed(started):
                    await self._stop_gear(g)
                await self._stop_gear(gear)
                for lane in self.lanes:
                    lane.close()
                self.state = "failed"
                raise GearStartError(gear.name, exc) from exc
        self.state = "running"
        log.info("scenario %s %s running: %d gears, %d wires", self.scenario.name or "-", self.scenario.version,
                 len(self.gears), len(self.scenario.wires))

    async def _stop_gear(self, gear: Gear) -> None:
        if gear.state == "stopped":
            return
        try:
            await asyncio.wait_for(gear.stop(), self.rack_config.cleanup_timeout)
        except Exception as exc:
            log.warning("gear %s did not stop cleanly: %s", gear.name, exc)
        gear.state = "stopped"

    async def stop_gear(self, name: str) -> bool:
        """Stop one gear now, the rest of the graph running on (the kill switch). Every port
        feeding it is unwired first, so senders count what they would send it as dropped
        instead of calling a stopped gear. Idempotent; False when no such gear runs here."""
        gear = self.gears.get(name)
        if gear is None:
            return False
        for g in self.gears.values():
            for out in g.outputs.values():
                if any(getattr(t, "gear", None) is gear for t in out.targets):
                    out.targets = [t for t in out.targets if getattr(t, "gear", None) is not gear]
        await self._stop_gear(gear)
        return True

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish in-flight work within `timeout`; True if everything finished."""
        if self.state != "running":
            return True
        self.state = "draining"
        timeout = self.rack_config.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for g in self.gears.values():
            if g.state == "started":
                g.transition("draining")
        results = await asyncio.gather(
            *(asyncio.wait_for(g.drain(deadline), max(0.0, deadline - loop.time())) for g in self.gears.values()),
            return_exceptions=True,
        )
        clean = True
        for g, r in zip(self.gears.values(), results):
            if isinstance(r, BaseException):
                clean = False
                log.warning("gear %s did not drain in time: %s", g.name, type(r).__name__)
        try:
            await asyncio.wait_for(asyncio.gather(*(lane.join() for lane in self.lanes)), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            clean = False
            log.warning("hot lanes still held %d messages at the drain deadline", sum(lane.depth() for lane in self.lanes))
        return clean

    async def stop(self) -> None:
        for gear in reversed(self._start_order()):
            await self._stop_gear(gear)
        for lane in self.lanes:
            lane.close()
        self.state = "stopped"

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Drain then stop; True when the drain finished within its deadline."""
        clean = await self.drain(timeout)
        await self.stop()
        return clean

    def metrics(self) -> dict[str, dict]:
        return {name: g.metrics() for name, g in self.gears.items()}
