"""The gear contract: manifest, lifecycle, counters, output ports and what they deliver to.

A gear is an object with `start()`, `process(port, msg)` (a message on an input port; emits
zero or more messages on output ports with `await self.emit(port, msg)`), `drain(deadline)`
and `stop()`. Every gear has the conventional output port `error`: `emit_error` puts the
message there with `error.reason` (and `error.gear`) in its metadata, or counts and logs it
when nothing is wired to `error`.

The lifecycle is the table in states.py: `gear.state` is read-only and moves only through
`transition(event)` (the runtime calls it), so an illegal move raises `IllegalTransition`.
Gears register themselves with `@register` from `fluxrig.runtime.registry`.

Each output port is an `OutPort`, which sends every message to its targets: the first target
gets the message itself, every further target an independent copy (fan-out). A target is
anything of the `HotTarget` shape: a fused `DirectTarget` or a bounded `Lane` (lane.py), or a
bus's outbound target (bus.py). Declaring the shape here, on the sending side, is what keeps
this module free of imports from lane.py and bus.py (they import it, never the reverse).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..errors import GearError
from ..ids import uuid7
from ..msg import FluxMsg
from ..wire import meta as M
from .states import GearEvent, GearState, IllegalTransition, next_gear_state

if TYPE_CHECKING:  # pragma: no cover
    from .control import ControlBus

__all__ = [
    "Manifest",
    "Gear",
    "GearContext",
    "Counters",
    "OutPort",
    "Conduit",
    "HotTarget",
    "IllegalTransition",
    "ERROR_PORT",
]

log = logging.getLogger("fluxrig.lane")  # the sending half of the hot lane logs with the receiving half

ERROR_PORT = "error"


class Conduit(Protocol):
    """What the runtime starts, quiesces and closes along with a graph: a Lane, a
    DirectTarget, a bus's outbound target or inbound source. `key` identifies it across a
    reload (a conduit with the same key still feeding the same gear object is reused, with
    what it holds); `gear` is the gear it feeds, None when it leaves the Rack."""

    @property
    def key(self) -> tuple: ...

    @property
    def gear(self) -> Gear | None: ...

    def start(self) -> None: ...

    def depth(self) -> int: ...

    async def join(self) -> None: ...

    def close(self) -> None: ...


class HotTarget(Conduit, Protocol):
    """What an OutPort delivers to. `put` returns when the message is taken: processed (a
    fused call), queued (a lane), or safe on its way off the Rack (a bus outbound)."""

    async def put(self, msg: FluxMsg) -> None: ...

    #: True when put_many does better than a put per message (a bus outbound makes a batch
    #: durable in one WAL commit): senders with several messages at once batch only then.
    batches: bool

    async def put_many(self, msgs: list[FluxMsg]) -> None:
        """`put` each of `msgs` in order; returns when all are taken."""
        ...


class Manifest:
    """What a gear type offers: ports, config schema, one-line summary, category, terminus.

    `dynamic_outputs(config) -> list[str]` adds output ports named by the config (a router's
    `out_<rule>` ports); `dynamic_inputs` likewise. `terminus` is `io` for gears that own
    sockets or devices, `transparent` for 1:1 transformers, `opaque` otherwise.
    """

    __slots__ = (
        "type",
        "summary",
        "category",
        "inputs",
        "outputs",
        "schema",
        "dynamic_outputs",
        "dynamic_inputs",
        "terminus",
        "doc",
    )

    def __init__(
        self,
        type: str,
        summary: str,
        *,
        category: str = "logic",
        inputs: tuple[str, ...] = ("in",),
        outputs: tuple[str, ...] = ("out",),
        schema: dict | None = None,
        dynamic_outputs: Callable[[dict], list[str]] | None = None,
        dynamic_inputs: Callable[[dict], list[str]] | None = None,
        terminus: str = "opaque",
        doc: str = "",
    ):
        self.type = type
        self.summary = summary
        self.category = category
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.schema = schema or {"type": "object", "properties": {}, "additionalProperties": False}
        self.dynamic_outputs = dynamic_outputs
        self.dynamic_inputs = dynamic_inputs
        self.terminus = terminus
        self.doc = doc

    def ports(self, config: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(inputs, outputs) for this config; `error` is always an output."""
        ins = list(self.inputs)
        outs = list(self.outputs)
        if self.dynamic_inputs:
            ins += [p for p in self.dynamic_inputs(config) if p not in ins]
        if self.dynamic_outputs:
            outs += [p for p in self.dynamic_outputs(config) if p not in outs]
        if ERROR_PORT not in outs:
            outs.append(ERROR_PORT)
        return tuple(ins), tuple(outs)

    def as_dict(self) -> dict:
        return {
            "type": self.type,
            "summary": self.summary,
            "category": self.category,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs) + ([ERROR_PORT] if ERROR_PORT not in self.outputs else []),
            "dynamic_ports": bool(self.dynamic_outputs or self.dynamic_inputs),
            "terminus": self.terminus,
            "config_schema": self.schema,
        }


class Counters:
    """Per-gear message counters, exported as flux.gear.* metrics."""

    __slots__ = ("messages_in", "messages_out", "errors", "dropped")

    def __init__(self):
        self.messages_in = 0
        self.messages_out = 0
        self.errors = 0
        self.dropped = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "errors": self.errors,
            "dropped": self.dropped,
        }


class GearContext:
    """What the runtime hands a gear: its Rack's name, control bus, limits, logger, and the
    Rack's state directory ("" when the runtime runs outside a Rack, e.g. in tests)."""

    __slots__ = ("rack_name", "control", "rack_config", "log", "gear_id", "scenario_dir", "state_dir", "bus")

    def __init__(
        self,
        rack_name: str,
        control: ControlBus,
        rack_config,
        log: logging.Logger,
        scenario_dir: str = ".",
        state_dir: str = "",
        bus=None,
    ):
        self.rack_name = rack_name
        self.control = control
        self.rack_config = rack_config
        self.log = log
        self.gear_id = uuid7()
        self.scenario_dir = scenario_dir
        self.state_dir = state_dir
        #: The Rack's bus (runtime/bus.py) when joined, else None: gears that talk to the other
        #: members of their group (fluxrig.gears.group_relay, issue 17) use its relay_* calls.
        self.bus = bus


class Gear:
    """Base class of every gear. Subclasses set MANIFEST and override what they need."""

    MANIFEST: Manifest

    def __init__(self, name: str, config: dict, ctx: GearContext):
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = ctx.log
        self.counters = Counters()
        self._state = GearState.CREATED
        self.outputs: dict[str, OutPort] = {}
        #: Seconds this version may go on serving what it holds once retired by a reload
        #: (set by its successor's start(): on_reload drain). 0: it drains with the swap.
        #: Otherwise the runtime retires it in the background: its outputs follow its
        #: successor's, and drain() gets a deadline `linger` seconds away.
        self.linger = 0.0

    # -- lifecycle (the runtime drives it: start, then transition) --------------------------
    @property
    def state(self) -> GearState:
        return self._state

    def transition(self, event: GearEvent) -> GearState:
        """Move through the lifecycle table; IllegalTransition (state unchanged) when the
        table has no move for `event` from the current state."""
        self._state = next_gear_state(self.name, self._state, event)
        return self._state

    def handover_from(self, old: Gear) -> None:
        """Called on a rebuilt gear before start, with the running version it replaces: take
        over what must not be closed and re-opened (a listening socket). Default: nothing.
        Changes to the running version itself wait for start() (and are undone by stop()
        when the swap is rolled back), e.g. setting its `linger`."""

    async def start(self) -> None:
        """Begin work (open sockets, start timers). Raise to refuse the scenario."""

    async def process(self, port: str, msg: FluxMsg) -> None:
        """Handle a message arriving on input `port`."""
        raise GearError("no_input", f"gear {self.name} ({self.MANIFEST.type}) takes no input on {port!r}")

    async def drain(self, deadline: float) -> None:
        """Stop accepting new work; finish in-flight work before `deadline` (loop.time())."""

    async def stop(self) -> None:
        """Release sockets and tasks. Must be idempotent."""

    # -- emitting ---------------------------------------------------------------------------
    def wired(self, port: str) -> bool:
        out = self.outputs.get(port)
        return bool(out and out.targets)

    async def emit(self, port: str, msg: FluxMsg) -> None:
        """Send `msg` on output `port` (a port with no wire counts the message as dropped)."""
        out = self.outputs.get(port)
        if out is None:
            raise GearError("no_port", f"gear {self.name} has no output port {port!r}")
        await out.send(msg)

    def batches_on(self, port: str) -> bool:
        """True when output `port` takes a batch better than one message at a time (one
        target, which batches: a guaranteed wire): then `emit_many` is worth building a list."""
        out = self.outputs.get(port)
        return out is not None and len(out.targets) == 1 and out.targets[0].batches

    async def emit_many(self, port: str, msgs: list[FluxMsg]) -> None:
        """Send `msgs` in order on output `port`, as `emit` each would, returning when all are
        taken: a gear that has several messages at once (the frames of one TCP read) lets a
        guaranteed wire make them durable in one WAL commit instead of one per message."""
        out = self.outputs.get(port)
        if out is None:
            raise GearError("no_port", f"gear {self.name} has no output port {port!r}")
        await out.send_many(msgs)

    async def emit_error(self, msg: FluxMsg, reason: str, detail: str = "") -> None:
        """The error-port convention: `error.reason` in meta, then out on `error`."""
        self.counters.errors += 1
        msg.meta[M.ERROR_REASON] = reason
        msg.meta[M.ERROR_GEAR] = self.name
        if detail:
            msg.meta[M.ERROR_DETAIL] = detail
        out = self.outputs.get(ERROR_PORT)
        if out is not None and out.targets:
            await out.send(msg, count_drop=False)
        else:
            self.log.warning(
                "gear %s: %s%s (no error wire; message %s dropped)",
                self.name,
                reason,
                f": {detail}" if detail else "",
                msg.id.hex(),
            )

    def io_binding(self, port: str, _depth: int = 0) -> str | None:
        """The I/O gear this output port ends in, walking through transparent gears (codecs):
        the gear whose link events say whether the port can deliver. None when the port fans
        out, ends in a logic gear, or the walk exceeds 32 steps."""
        out = self.outputs.get(port)
        if out is None or len(out.targets) != 1 or _depth > 32:
            return None
        nxt = out.targets[0].gear
        if nxt is None:  # the guaranteed lane: another Rack's gear, always "available" here
            return None
        terminus = nxt.MANIFEST.terminus
        if terminus == "io":
            return nxt.name
        if terminus == "transparent":
            return nxt.io_binding("out", _depth + 1)
        return None

    def metrics(self) -> dict:
        """Counters plus whatever a gear adds (connections, queue depth...)."""
        return self.counters.as_dict()


class OutPort:
    """One output port of one gear and the targets wired to it. The runtime replaces
    `targets` as a whole (one assignment, between two messages) at a cut-over."""

    __slots__ = ("gear", "name", "port_id", "targets")

    def __init__(self, gear: Gear, name: str, port_id: bytes):
        self.gear = gear
        self.name = name
        self.port_id = port_id
        self.targets: list[HotTarget] = []

    async def send(self, msg: FluxMsg, count_drop: bool = True) -> None:
        gear = self.gear
        msg.hop(gear.ctx.gear_id, self.port_id)
        targets = self.targets
        n = len(targets)
        if n == 1:
            gear.counters.messages_out += 1
            await targets[0].put(msg)
        elif n == 0:
            if count_drop:
                gear.counters.dropped += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("gear %s port %s has no wire; message %s dropped", gear.name, self.name, msg.id.hex())
        else:
            gear.counters.messages_out += 1
            # Copy before any delivery: a fused receiver may change the original in place.
            copies = [msg] + [msg.copy() for _ in range(n - 1)]
            for target, m in zip(targets, copies, strict=True):
                await target.put(m)

    async def send_many(self, msgs: list[FluxMsg]) -> None:
        """`send` each of `msgs`, in order. With one target the batch goes to its `put_many`;
        a fan-out, or a target that does not batch, gets one message at a time, as `send`."""
        targets = self.targets
        if len(targets) != 1 or len(msgs) == 1 or not targets[0].batches:
            for msg in msgs:
                await self.send(msg)
            return
        gear = self.gear
        gear_id, port_id = gear.ctx.gear_id, self.port_id
        for msg in msgs:
            msg.hop(gear_id, port_id)
        gear.counters.messages_out += len(msgs)
        await targets[0].put_many(msgs)
