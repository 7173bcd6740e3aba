"""The registry of gear types: type name -> Gear class (with its Manifest).

Built-in gears are imported lazily from `fluxrig.gears` the first time the registry is read,
so importing the runtime has no side effects. Third parties call `register(cls)`.
"""

from __future__ import annotations

import importlib

from ..errors import FluxError

__all__ = ["register", "get_gear_class", "gear_types", "UnknownGearType"]

_TYPES: dict[str, type] = {}
_loaded = False

BUILTIN_MODULES = (
    "fluxrig.gears.io_tcp",
    "fluxrig.gears.generator",
    "fluxrig.gears.sink",
    "fluxrig.gears.map",
    "fluxrig.gears.router",
    "fluxrig.gears.group_relay",
)
OPTIONAL_MODULES = (
    "fluxrig.gears.io_iso8583",
    "fluxrig.gears.codec_iso8583",
    "fluxrig.gears.iso_responder",
    "fluxrig.gears.conductor",
    "fluxrig.gears.io_serial",
)


class UnknownGearType(FluxError):
    def __init__(self, type_name: str):
        self.type_name = type_name
        super().__init__(f"unknown gear type: {type_name} (see `fluxrig gears list`)")


def register(cls):
    """Class decorator: make `cls.MANIFEST.type` available to scenarios."""
    _TYPES[cls.MANIFEST.type] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for mod in OPTIONAL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # the module exists but one of its imports is broken: say so
                raise


def get_gear_class(type_name: str):
    _load_builtins()
    try:
        return _TYPES[type_name]
    except KeyError:
        raise UnknownGearType(type_name) from None


def gear_types() -> dict[str, type]:
    _load_builtins()
    return dict(sorted(_TYPES.items()))
