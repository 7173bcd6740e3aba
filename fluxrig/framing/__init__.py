"""The framer family shared by io_tcp, io_iso8583 and io_serial (sans-IO).

The stream framers have a Cython twin (see fluxrig/_backend.py for the naming):
`fluxrig.framing.core` binds `DelimiterFramer` to the active class and keeps both importable,
`DelimiterFramerPy` (pure) and `DelimiterFramerC` (compiled; None on a pure build), and so on
for every stream framer; `BACKEND` says which is active ("cython" or "pure"). The time-based
serial framers (`IdleGapFramer`, `ModbusRtuFramer`) are pure Python only: serial lines are slow.

Gears build framers from their config with `make_framer(config)` and put
`framing_schema()` into their manifest's config schema.
"""

from __future__ import annotations

from fluxrig.framing.config import (
    FRAMINGS,
    ISO_PRESETS,
    STREAM_FRAMINGS,
    framing_schema,
    make_framer,
)
from fluxrig.framing.core import (
    BACKEND,
    DEFAULT_MAX_FRAME_BYTES,
    PREFIX_KINDS,
    DelimiterFramer,
    DelimiterFramerC,
    DelimiterFramerPy,
    FixedFramer,
    FixedFramerC,
    FixedFramerPy,
    LengthPrefixFramer,
    LengthPrefixFramerC,
    LengthPrefixFramerPy,
    RawFramer,
    RawFramerC,
    RawFramerPy,
    SlipFramer,
    SlipFramerC,
    SlipFramerPy,
)
from fluxrig.framing.errors import (
    BadEscape,
    BadFrame,
    BadLengthPrefix,
    CrcMismatch,
    EncodeError,
    PayloadTooLarge,
)
from fluxrig.framing.serial import (
    MODBUS_MAX_ADU,
    IdleGapFramer,
    ModbusRtuFramer,
    char_time,
    crc16_modbus,
)

__all__ = [
    "BACKEND",
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
