"""The one backend switch: compiled Cython twins or their pure-Python originals.

`FLUXRIG_PURE_PYTHON` is read once, here. Each hot module asks `speedup(name)` for its
compiled twin and binds its public names to it, else to the pure versions, which stay
importable under their `...Py` names for tests and benchmarks.

`FLUXRIG_REQUIRE_ACCELERATED=1` turns a missing twin into an ImportError, so a test run or a
frozen binary that promised the accelerated build can never run the slow path unknowingly.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["PURE_PYTHON", "speedup", "backend_name", "loaded_speedups"]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


PURE_PYTHON: bool = _truthy(os.environ.get("FLUXRIG_PURE_PYTHON"))
_REQUIRED: bool = _truthy(os.environ.get("FLUXRIG_REQUIRE_ACCELERATED")) and not PURE_PYTHON
_loaded: dict[str, bool] = {}


def speedup(name: str) -> ModuleType | None:
    """Return the compiled module `fluxrig._speedups.<name>`, or None for the pure path."""
    if PURE_PYTHON:
        _loaded[name] = False
        return None
    try:
        module = importlib.import_module(f"fluxrig._speedups.{name}")
    except ImportError as exc:
        if _REQUIRED:
            raise ImportError(
                f"compiled twin fluxrig._speedups.{name} is missing but FLUXRIG_REQUIRE_ACCELERATED=1; "
                "rebuild with `make build` (needs a C compiler and Cython)"
            ) from exc
        _loaded[name] = False
        return None
    # A staged .py left beside the tree must not pass for a compiled module.
    if not (module.__file__ or "").endswith((".so", ".pyd")):
        if _REQUIRED:
            raise ImportError(f"fluxrig._speedups.{name} is not a compiled extension: {module.__file__}")
        _loaded[name] = False
        return None
    _loaded[name] = True
    return module


def loaded_speedups() -> dict[str, bool]:
    """Which twins were asked for so far, and whether each is compiled."""
    return dict(_loaded)


def backend_name() -> str:
    """'cython' when every speedup asked for is compiled, 'pure' when none is, else 'mixed'."""
    if PURE_PYTHON:
        return "pure"
    # Import the hot modules so the answer reflects them, not just what happened to load.
    for mod in ("fluxrig.framing", "fluxrig.iso8583", "fluxrig.wal.checksum"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    states = set(_loaded.values())
    if states == {True}:
        return "cython"
    if states == {False} or not states:
        return "pure"
    return "mixed"
