"""The Rack runtime: gear contract, registry, hot-lane wiring, the running graph."""

from .control import ControlBus
from .gear import ERROR_PORT, Counters, Gear, GearContext, Manifest
from .graph import GearStartError, Runtime
from .registry import UnknownGearType, gear_types, get_gear_class, register

__all__ = [
    "ControlBus",
    "ERROR_PORT",
    "Counters",
    "Gear",
    "GearContext",
    "Manifest",
    "GearStartError",
    "Runtime",
    "UnknownGearType",
    "gear_types",
    "get_gear_class",
    "register",
]
