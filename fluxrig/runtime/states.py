"""The two lifecycles of the Rack runtime as transition tables (STYLE §6): a gear's and the
runtime's. Nothing sets a state directly: `Gear.transition(event)` and the runtime's own
driver look the move up here, and an illegal move raises `IllegalTransition`, naming the
machine, the object, the state it was in and the event it was given.

A gear:

    created ──start──▶ started ──drain──▶ draining
       │                  │                  │
       └──────stop────────┴──────stop────────┴──▶ stopped

`created --stop--> stopped` is a gear that never started: the one whose start() raised, and
the gears of a swap rolled back before their turn. `stopped` is final; stopping a stopped
gear is not a transition (the runtime's stop is idempotent and checks first).

The runtime (one object for the life of the Rack process):

    running ──swap──▶ swapping ──swapped────▶ running
                         └──────rolled_back──▶ running
    running ──drain──▶ draining ──stop──▶ stopped
    running ──stop───▶ stopped

`running` means a graph is in place and serving, the empty graph included: a new runtime
runs the empty graph, and cold start is a swap from it. `swapping` covers build, start,
cut-over and retirement; a swap that fails before the cut-over is `rolled_back` and leaves
the running graph as it was. `stopped` is final.
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import FluxError

__all__ = [
    "GearState",
    "GearEvent",
    "GEAR_TRANSITIONS",
    "RuntimeState",
    "RuntimeEvent",
    "RUNTIME_TRANSITIONS",
    "IllegalTransition",
    "next_gear_state",
    "next_runtime_state",
]


class GearState(StrEnum):
    CREATED = "created"
    STARTED = "started"
    DRAINING = "draining"
    STOPPED = "stopped"


class GearEvent(StrEnum):
    START = "start"
    DRAIN = "drain"
    STOP = "stop"


GEAR_TRANSITIONS: dict[tuple[GearState, GearEvent], GearState] = {
    (GearState.CREATED, GearEvent.START): GearState.STARTED,
    (GearState.CREATED, GearEvent.STOP): GearState.STOPPED,
    (GearState.STARTED, GearEvent.DRAIN): GearState.DRAINING,
    (GearState.STARTED, GearEvent.STOP): GearState.STOPPED,
    (GearState.DRAINING, GearEvent.STOP): GearState.STOPPED,
}


class RuntimeState(StrEnum):
    RUNNING = "running"
    SWAPPING = "swapping"
    DRAINING = "draining"
    STOPPED = "stopped"


class RuntimeEvent(StrEnum):
    SWAP = "swap"
    SWAPPED = "swapped"
    ROLLED_BACK = "rolled_back"
    DRAIN = "drain"
    STOP = "stop"


RUNTIME_TRANSITIONS: dict[tuple[RuntimeState, RuntimeEvent], RuntimeState] = {
    (RuntimeState.RUNNING, RuntimeEvent.SWAP): RuntimeState.SWAPPING,
    (RuntimeState.SWAPPING, RuntimeEvent.SWAPPED): RuntimeState.RUNNING,
    (RuntimeState.SWAPPING, RuntimeEvent.ROLLED_BACK): RuntimeState.RUNNING,
    (RuntimeState.RUNNING, RuntimeEvent.DRAIN): RuntimeState.DRAINING,
    (RuntimeState.RUNNING, RuntimeEvent.STOP): RuntimeState.STOPPED,
    (RuntimeState.DRAINING, RuntimeEvent.STOP): RuntimeState.STOPPED,
}


class IllegalTransition(FluxError):
    """`event` is not allowed in `state` for `name`, a `machine` ("gear" or "runtime");
    `allowed` lists the events that are."""

    def __init__(self, machine: str, name: str, state: str, event: str, allowed: list[str]):
        self.machine = machine
        self.name = name
        self.state = state
        self.event = event
        self.allowed = allowed
        label = f"{machine} {name}" if name else machine
        super().__init__(f"{label} is {state}: cannot {event} (allowed: {', '.join(allowed) or 'nothing'})")


def _next(table: dict, machine: str, name: str, state, event):
    try:
        return table[(state, event)]
    except KeyError:
        allowed = [str(e) for (s, e) in table if s == state]
        raise IllegalTransition(machine, name, str(state), str(event), allowed) from None


def next_gear_state(name: str, state: GearState, event: GearEvent) -> GearState:
    """The state gear `name` moves to on `event`; IllegalTransition when the table has no move."""
    return _next(GEAR_TRANSITIONS, "gear", name, state, event)


def next_runtime_state(name: str, state: RuntimeState, event: RuntimeEvent) -> RuntimeState:
    """The state the runtime of Rack `name` moves to on `event`; IllegalTransition otherwise."""
    return _next(RUNTIME_TRANSITIONS, "runtime", name, state, event)
