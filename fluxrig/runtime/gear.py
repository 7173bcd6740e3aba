"""The gear contract: manifest, lifecycle, counters, emit.

A gear is an object with `start()`, `process(port, msg)` (a message on an input port; emits
zero or more messages on output ports with `await self.emit(port, msg)`), `drain(deadline)`
and `stop()`. Every gear has the conventional output port `error`: `emit_error` puts the
message there with `error.reason` (and `error.gear`) in its metadata, or counts and logs it
when nothing is wired to `error`.

The lifecycle is a table (`TRANSITIONS`); an illegal transition raises `IllegalTransition`.
Gears register themselves with `@register` from `fluxrig.runtime.registry`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from ..errors import FluxError, GearError
from ..ids import uuid7
from ..msg import FluxMsg

if TYPE_CHECKING:  # pragma: no cover
    from .control import ControlBus
    from .lane import OutPort

__all__ = ["Manifest", "Gear", "GearContext", "Counters", "IllegalTransition", "ERROR_PORT"]

ERROR_PORT = "error"

# state -> states it may move to
TRANSITIONS: dict[str, frozenset[str]] = {
    "created": frozenset({"started", "stopped"}),
    "started": frozenset({"draining", "stopped"}),
    "draining": frozenset({"stopped"}),
    "stopped": frozenset(),
}


class IllegalTransition(FluxError):
    """A gear was asked to move between lifecycle states the table does not allow."""

    def __init__(self, gear: str, src: str, dst: str):
        self.gear, self.src, self.dst = gear, src, dst
        super().__init__(f"gear {gear}: cannot go from {src} to {dst}")


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
    """What the runtime hands a gear: its Rack's name, control bus, limits, logger."""

    __slots__ = ("rack_name", "control", "rack_config", "log", "gear_id", "scenario_dir")

    def __init__(self, rack_name: str, control: "ControlBus", rack_config, log: logging.Logger, scenario_dir: str = "."):
        self.rack_name = rack_name
        self.control = control
        self.rack_config = rack_config
        self.log = log
        self.gear_id = uuid7()
        self.scenario_dir = scenario_dir


class Gear:
    """Base class of every gear. Subclasses set MANIFEST and override what they need."""

    MANIFEST: Manifest

    def __init__(self, name: str, config: dict, ctx: GearContext):
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = ctx.log
        self.counters = Counters()
        self.state = "created"
        self.outputs: dict[str, "OutPort"] = {}

    # -- lifecycle (the runtime calls these through `transition`) ---------------------------
    def transition(self, dst: str) -> None:
        if dst not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.name, self.state, dst)
        self.state = dst

    def handover_from(self, old: "Gear") -> None:
        """Called on a rebuilt gear before start, with the running version it replaces: take
        over what must not be closed and re-opened (a listening socket). Default: nothing."""

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

    async def emit_error(self, msg: FluxMsg, reason: str, detail: str = "") -> None:
        """The error-port convention: `error.reason` in meta, then out on `error`."""
        self.counters.errors += 1
        msg.meta["error.reason"] = reason
        msg.meta["error.gear"] = self.name
        if detail:
            msg.meta["error.detail"] = detail
        out = self.outputs.get(ERROR_PORT)
        if out is not None and out.targets:
            await out.send(msg, count_drop=False)
        else:
            self.log.warning("gear %s: %s%s (no error wire; message %s dropped)", self.name, reason,
                             f": {detail}" if detail else "", msg.id.hex())

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


def now() -> float:
    return time.monotonic()
