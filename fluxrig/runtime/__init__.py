"""The Rack runtime: gear contract, registry, hot-lane wiring, the running graph and its one swap."""

from .bus import Bus
from .control import ControlBus
from .gear import ERROR_PORT, Conduit, Counters, Gear, GearContext, HotTarget, Manifest
from .graph import EMPTY, Graph, Runtime
from .registry import UnknownGearType, gear_types, get_gear_class, register
from .reload import GearStartError, ReloadError, ReloadReport
from .states import GearEvent, GearState, IllegalTransition, RuntimeEvent, RuntimeState

__all__ = [
    "Bus",
    "Conduit",
    "ControlBus",
    "EMPTY",
    "ERROR_PORT",
    "Counters",
    "Gear",
    "GearContext",
    "GearEvent",
    "GearStartError",
    "GearState",
    "Graph",
    "HotTarget",
    "IllegalTransition",
    "Manifest",
    "ReloadError",
    "ReloadReport",
    "Runtime",
    "RuntimeEvent",
    "RuntimeState",
    "UnknownGearType",
    "gear_types",
    "get_gear_class",
    "register",
]
