"""The ISO 8583 codec, bound once to the active backend (the iso8583 twin's binding module).

Job: `codec_py.py` is the pure-Python original of the codec's hot loop and the one source of the
compiled twin `fluxrig.iso8583.codec_c` (setup.py builds it from `codec_py.py` + `codec_c.pxd`,
beside them). This module asks `fluxrig._backend.twin("iso8583")` for the twin once, at import,
and binds `CodecPy` (pure, always importable), `CodecC` (compiled; None on a pure build or under
FLUXRIG_PURE_PYTHON=1), `Codec` (the active one) and `BACKEND` ("cython" or "pure").

A codec runs on a field table built with its own module's `FieldPlan`, so callers that build
one (fluxrig.iso8583.spec) ask `codec_module(impl)` for the module rather than the class:
None -> the active one, "py" -> the original, "c" -> the twin (ImportError when not built).
"""

from __future__ import annotations

from types import ModuleType

from fluxrig._backend import twin
from fluxrig.iso8583 import codec_py

__all__ = ["BACKEND", "Codec", "CodecPy", "CodecC", "codec_module"]

_c = twin("iso8583")

#: "cython" when `Codec` is the compiled class, else "pure".
BACKEND = "cython" if _c is not None else "pure"

CodecPy = codec_py.Codec
CodecC = _c.Codec if _c is not None else None
Codec = CodecC or CodecPy


def codec_module(impl: str | None = None) -> ModuleType:
    """The codec module for `impl`: None (the active one), "py" or "c"."""
    if impl is None:
        return _c if _c is not None else codec_py
    if impl == "py":
        return codec_py
    if impl == "c":
        if _c is None:
            raise ImportError("fluxrig.iso8583.codec_c is not built (or FLUXRIG_PURE_PYTHON is set)")
        return _c
    raise ValueError(f"impl must be None, 'py' or 'c', not {impl!r}")
