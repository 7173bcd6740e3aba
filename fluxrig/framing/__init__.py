"""The framer family shared by io_tcp, io_iso8583 and io_serial (sans-IO).

Public names are bound once, here, to the compiled twin `fluxrig._speedups.framing` when
`fluxrig._backend.speedup("framing")` finds it, else to the pure-Python originals in
`fluxrig.framing.core`. Both stay importable: `DelimiterFramerPy` / `DelimiterFramerC`
(the C name is None on a pure build), and so on for every stream framer. The time-based serial
framers (`IdleGapFramer`, `ModbusRtuFramer`) are pure Python only: serial lines are slow.

Gears build framers from their config with `make_framer(config)` and put
`framing_schema()` into their manifest's config schema.
"""

from __future__ import annotations

from fluxrig._backend import speedup
from fluxrig.framing import core as _py
from fluxrig.framing.errors import (
    BadEscape,
    BadFrame,
    BadLengthPrefix,
    CrcMismatch,
    EncodeError,
    PayloadTooLarge,
)

DEFAULT_MAX_FRAME_BYTES = _py.DEFAULT_MAX_FRAME_BYTES
PREFIX_KINDS = _py.PREFIX_KINDS

DelimiterFramerPy = _py.DelimiterFramer
LengthPrefixFramerPy = _py.LengthPrefixFramer
FixedFramerPy = _py.FixedFramer
SlipFramerPy = _py.SlipFramer
RawFramerPy = _py.RawFramer

_c = speedup("framing")
if _c is not None:
    DelimiterFramerC = _c.DelimiterFramer
    LengthPrefixFramerC = _c.LengthPrefixFramer
    FixedFramerC = _c.FixedFramer
    SlipFramerC = _c.SlipFramer
    RawFramerC = _c.RawFramer
else:
    DelimiterFramerC = LengthPrefixFramerC = FixedFramerC = SlipFramerC = RawFramerC = None

#: True when the public framer names are the compiled classes.
COMPILED = _c is not None

DelimiterFramer = DelimiterFramerC or DelimiterFramerPy
LengthPrefixFramer = LengthPrefixFramerC or LengthPrefixFramerPy
FixedFramer = FixedFramerC or FixedFramerPy
SlipFramer = SlipFramerC or SlipFramerPy
RawFramer = RawFramerC or RawFramerPy

# After the bindings: config and serial use the names bound above.
from fluxrig.framing.serial import (  # noqa: E402
    MODBUS_MAX_ADU,
    IdleGapFramer,
    ModbusRtuFramer,
    char_time,
    crc16_modbus,
)
from fluxrig.framing.config import (  # noqa: E402
    FRAMINGS,
    ISO_PRESETS,
    STREAM_FRAMINGS,
    framing_schema,
    make_framer,
)

__all__ = [
    "COMPILED",
    "DEFAULT_MAX_FRAME_BYTES",
    "PREFIX_KINDS",
    "MODBUS_MAX_ADU",
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
    "IdleGapFramer",
    "ModbusRtuFramer",
    "char_time",
    "crc16_modbus",
    "FRAMINGS",
    "STREAM_FRAMINGS",
    "ISO_PRESETS",
    "make_framer",
    "framing_schema",
    "BadLengthPrefix",
    "BadFrame",
    "CrcMismatch",
    "BadEscape",
    "EncodeError",
    "PayloadTooLarge",
]
