"""The stream framers, bound once to the active backend (the framing twin's binding module).

Job: `core_py.py` is the pure-Python original of the stream framers and the one source of the
compiled twin `fluxrig.framing.core_c` (setup.py builds it from `core_py.py` + `core_c.pxd`,
beside them). This module asks `fluxrig._backend.twin("framing")` for the twin once, at import,
and binds for every stream framer `XxxFramerPy` (pure, always importable), `XxxFramerC` (the
compiled class; None on a pure build or under FLUXRIG_PURE_PYTHON=1) and `XxxFramer` (the
active one), plus `BACKEND`: "cython" or "pure". `fluxrig.framing` re-exports all of it.

Contract: both classes of a pair accept the same arguments, return the same frames and raise
the same error classes (`fluxrig.framing.errors`); tests/test_framing*.py run both.
"""

from __future__ import annotations

from fluxrig._backend import twin
from fluxrig.framing import core_py as _py

__all__ = [
    "BACKEND",
    "DEFAULT_MAX_FRAME_BYTES",
    "PREFIX_KINDS",
    "DelimiterFramer",
    "LengthPrefixFramer",
    "FixedFramer",
    "SlipFramer",
    "RawFramer",
    "DelimiterFramerPy",
    "LengthPrefixFramerPy",
    "FixedFramerPy",
    "SlipFramerPy",
    "RawFramerPy",
    "DelimiterFramerC",
    "LengthPrefixFramerC",
    "FixedFramerC",
    "SlipFramerC",
    "RawFramerC",
]

DEFAULT_MAX_FRAME_BYTES = _py.DEFAULT_MAX_FRAME_BYTES
PREFIX_KINDS = _py.PREFIX_KINDS

_c = twin("framing")

#: "cython" when the public framer names are the compiled classes, else "pure".
BACKEND = "cython" if _c is not None else "pure"

DelimiterFramerPy = _py.DelimiterFramer
LengthPrefixFramerPy = _py.LengthPrefixFramer
FixedFramerPy = _py.FixedFramer
SlipFramerPy = _py.SlipFramer
RawFramerPy = _py.RawFramer

DelimiterFramerC = _c.DelimiterFramer if _c is not None else None
LengthPrefixFramerC = _c.LengthPrefixFramer if _c is not None else None
FixedFramerC = _c.FixedFramer if _c is not None else None
SlipFramerC = _c.SlipFramer if _c is not None else None
RawFramerC = _c.RawFramer if _c is not None else None

DelimiterFramer = DelimiterFramerC or DelimiterFramerPy
LengthPrefixFramer = LengthPrefixFramerC or LengthPrefixFramerPy
FixedFramer = FixedFramerC or FixedFramerPy
SlipFramer = SlipFramerC or SlipFramerPy
RawFramer = RawFramerC or RawFramerPy
