"""The one backend switch: compiled Cython twins or their pure-Python originals.

Job: decide, once per process, whether each hot module runs compiled or pure, and say which.

One naming for every twin. For twin `<name>` of package `<pkg>` (TWINS below):
  <pkg>/<name>_py.py   the pure-Python original, and the one source of the compiled twin
  <pkg>/<name>_c.pxd   the C declarations Cython adds when setup.py compiles that source again
  <pkg>.<name>_c       the compiled extension module, built beside the source
  <pkg>/<name>.py      binds the public names: `XxxPy` (pure), `XxxC` (compiled; None when not
                       built or FLUXRIG_PURE_PYTHON=1) and `Xxx` (the active one), plus
                       `BACKEND` ("cython" or "pure"); `<pkg>/__init__.py` re-exports them.
(Functions follow the same scheme in snake case: `crc32c_py` / `crc32c_c` / `crc32c`.)

Environment, read once, here; setup.py reads the same two names at build time:
  FLUXRIG_PURE_PYTHON=1          the pure originals, whatever is built.
  FLUXRIG_REQUIRE_ACCELERATED=1  the accelerated build is required: a missing twin, or a `.py`
                                 posing as one, is an ImportError at import (and a failed
                                 compile a build error), so a test run or a frozen binary that
                                 promised the accelerated build never runs the slow path
                                 unknowingly. FLUXRIG_PURE_PYTHON wins over it.

Contract: `twin(package)` returns the compiled module or None, raising ImportError only in
required mode; `backends()` imports the binding modules and returns each package's BACKEND;
`backend_name()` sums that up as "cython", "pure" or "mixed". No import-time side effect
besides reading the two variables.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from types import ModuleType

__all__ = [
    "PURE_ENV",
    "REQUIRE_ENV",
    "PURE_PYTHON",
    "REQUIRE_ACCELERATED",
    "TWINS",
    "twin",
    "backends",
    "backend_name",
]

PURE_ENV = "FLUXRIG_PURE_PYTHON"
REQUIRE_ENV = "FLUXRIG_REQUIRE_ACCELERATED"

#: package key -> the binding module `<pkg>.<name>`; the twin is "<module>_c", the original
#: "<module>_py". Keep in step with setup.py's TWINS (tests/test_backend.py checks).
TWINS: dict[str, str] = {
    "framing": "fluxrig.framing.core",
    "iso8583": "fluxrig.iso8583.codec",
    "wal": "fluxrig.wal.crc32c",
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


PURE_PYTHON: bool = _truthy(os.environ.get(PURE_ENV))
REQUIRE_ACCELERATED: bool = _truthy(os.environ.get(REQUIRE_ENV)) and not PURE_PYTHON


def twin(package: str) -> ModuleType | None:
    """The compiled twin of `package` (a TWINS key), or None for the pure path.

    Raises ImportError when it is missing or not an extension module and FLUXRIG_REQUIRE_ACCELERATED
    is set; KeyError for a package that has no twin."""
    name = TWINS[package] + "_c"
    if PURE_PYTHON:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if REQUIRE_ACCELERATED:
            raise ImportError(
                f"compiled twin {name} is missing but {REQUIRE_ENV}=1; rebuild with `make build` "
                "(needs a C compiler and Cython)",
                name=name,
            ) from exc
        return None
    # A .py left beside the source (a stray staging copy) must not pass for the compiled module.
    if not (module.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        if REQUIRE_ACCELERATED:
            raise ImportError(f"{name} is not a compiled extension: {module.__file__}", name=name)
        return None
    return module


def backends() -> dict[str, str]:
    """Each twin's package and the backend it runs on: {"framing": "cython", ...}.

    Imports the binding modules, so the answer is what they bound, not what happened to load
    so far. In required mode a missing twin raises ImportError here too."""
    return {package: importlib.import_module(module).BACKEND for package, module in TWINS.items()}


def backend_name() -> str:
    """'cython' when every twin runs compiled, 'pure' when none does, else 'mixed'."""
    states = set(backends().values())
    if states == {"cython"}:
        return "cython"
    if states == {"pure"}:
        return "pure"
    return "mixed"
