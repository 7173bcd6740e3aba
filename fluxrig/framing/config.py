"""Build a framer from gear config keys, and the JSON-schema fragment describing those keys.

`make_framer(config)` reads only the framing keys of a gear's config dict (other keys are the
gear's business) and returns a ready framer, compiled when available. A bad value raises
`fluxrig.errors.ConfigError` naming the key. `framing_schema()` returns the matching schema
properties for a gear manifest (each `{"type", "enum"?, "default", "description"}`).

`framing` values: delimiter, length_prefix (length_size / length_endian / ...), the Go
original's aliases length_prefix2 / length_prefix4 (2 / 4 bytes, big-endian unless
length_endian says otherwise), the ISO presets len2_be, len2_le, len4_be, ascii4, bcd2, vap,
fixed, slip, idle_gap, modbus_rtu and none. Serial framings read the line settings
(baudrate, bytesize, parity, stopbits: keys owned by io_serial) from the same dict.
"""

from __future__ import annotations

import codecs
import copy

from fluxrig.errors import ConfigError
from fluxrig.framing import core
from fluxrig.framing.serial import MODBUS_MAX_ADU, IdleGapFramer, ModbusRtuFramer, char_time

__all__ = [
    "FRAMINGS",
    "STREAM_FRAMINGS",
    "ISO_PRESETS",
    "DEFAULT_IDLE_GAP_CHARS",
    "make_framer",
    "framing_schema",
    "parse_delimiter",
]

#: ISO 8583 presets: name -> (prefix kind, prefix size, endian). jPOS channel in the comment.
ISO_PRESETS = {
    "len2_be": ("binary", 2, "big"),  # NACChannel / PostChannel
    "len2_le": ("binary", 2, "little"),
    "len4_be": ("binary", 4, "big"),  # RawChannel
    "ascii4": ("ascii4", 4, "big"),  # ASCIIChannel
    "bcd2": ("bcd2", 2, "big"),  # NCCChannel
    "vap": ("vap", 4, "big"),  # VAPChannel (CS/VAP)
}
_ALIASES = {"length_prefix2": 2, "length_prefix4": 4}

STREAM_FRAMINGS = (
    "delimiter",
    "length_prefix",
    "length_prefix2",
    "length_prefix4",
    *ISO_PRESETS,
    "fixed",
    "slip",
    "none",
)
FRAMINGS = STREAM_FRAMINGS + ("idle_gap", "modbus_rtu")

#: Default gap for `idle_gap`, in character times (the Modbus t3.5 rule is a safe default).
DEFAULT_IDLE_GAP_CHARS = 3.5

_SCHEMA = {
    "framing": {
        "type": "string",
        "enum": list(FRAMINGS),
        "default": "delimiter",
        "description": "How the byte stream is cut into messages. length_prefix2/4 are the Go "
        "original's names (2/4-byte big-endian); len2_be, len2_le, len4_be, ascii4, bcd2, vap are "
        "ISO 8583 presets (jPOS NAC, -, Raw, ASCII, NCC, VAP channels); none passes bytes through.",
    },
    "delimiter": {
        "type": "string",
        "default": "",
        "description": "Delimiter for framing=delimiter. Empty = newline (CR LF or LF, CR stripped). "
        "Backslash escapes (\\r, \\n, \\x03) are understood; 'hex:0d0a' gives raw bytes.",
    },
    "delimiter_position": {
        "type": "string",
        "enum": ["suffix", "prefix"],
        "default": "suffix",
        "description": "suffix: the delimiter ends each message; prefix: it starts each message.",
    },
    "delimiter_include": {
        "type": "boolean",
        "default": False,
        "description": "Keep the delimiter in the received payload.",
    },
    "delimiter_append": {
        "type": "boolean",
        "default": False,
        "description": "Add the delimiter to each payload written (a payload holding it is refused).",
    },
    "length_size": {
        "type": "integer",
        "enum": [2, 4],
        "default": 2,
        "description": "Bytes of the binary length prefix (framing=length_prefix).",
    },
    "length_endian": {
        "type": "string",
        "enum": ["big", "little"],
        "default": "big",
        "description": "Byte order of the binary length prefix.",
    },
    "length_includes_header": {
        "type": "boolean",
        "default": False,
        "description": "The length value counts the prefix's own bytes.",
    },
    "length_allow_empty": {
        "type": "boolean",
        "default": False,
        "description": "Accept a zero length as an empty message (some hosts' keep-alive) "
        "instead of closing the connection.",
    },
    "length_keep_header": {
        "type": "boolean",
        "default": False,
        "description": "Deliver each message with its length prefix (pass-through bridges).",
    },
    "fixed_size": {
        "type": "integer",
        "default": None,
        "description": "Message size in bytes for framing=fixed (required there).",
    },
    "slip_leading_end": {
        "type": "boolean",
        "default": True,
        "description": "SLIP: also send END before each frame, flushing line noise at the receiver.",
    },
    "idle_gap_chars": {
        "type": "number",
        "default": DEFAULT_IDLE_GAP_CHARS,
        "description": "idle_gap: silence, in character times at the line settings, that ends a message.",
    },
    "idle_gap_ms": {
        "type": "number",
        "default": None,
        "description": "idle_gap / modbus_rtu: silence in milliseconds that ends a message; overrides "
        "the computed gap (USB adapters deliver in bursts: 5-20 ms is often needed).",
    },
    "modbus_keep_crc": {
        "type": "boolean",
        "default": False,
        "description": "modbus_rtu: deliver frames with their 2 CRC bytes (checked either way).",
    },
    "max_frame_bytes": {
        "type": "integer",
        "default": 1 << 20,
        "description": "Largest message accepted; a larger one closes the connection (modbus_rtu: 256).",
    },
}


def framing_schema(framings=None) -> dict:
    """The schema properties of the framing keys, as a fresh dict. `framings` restricts the
    `framing` enum (e.g. STREAM_FRAMINGS for a TCP gear); the serial keys are dropped when
    no serial framing is allowed."""
    props = copy.deepcopy(_SCHEMA)
    if framings is not None:
        allowed = list(framings)
        unknown = [f for f in allowed if f not in FRAMINGS]
        if unknown:
            raise ValueError(f"unknown framings {unknown}; known: {', '.join(FRAMINGS)}")
        props["framing"]["enum"] = allowed
        if props["framing"]["default"] not in allowed:
            props["framing"]["default"] = allowed[0]
        if "idle_gap" not in allowed and "modbus_rtu" not in allowed:
            for key in ("idle_gap_chars", "idle_gap_ms", "modbus_keep_crc"):
                del props[key]
    return props


def parse_delimiter(value) -> bytes:
    """Delimiter config value -> bytes: bytes as is; 'hex:..' as hex; a str with backslash
    escapes decoded (YAML single quotes keep '\\n' literal, operators mean a newline)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ConfigError(f"must be a string, got {type(value).__name__}", key="delimiter")
    if value.startswith("hex:"):
        try:
            return bytes.fromhex(value[4:])
        except ValueError as exc:
            raise ConfigError(f"bad hex {value!r}: {exc}", key="delimiter") from None
    raw = value.encode("utf-8")
    if b"\\" in raw:
        try:
            raw = codecs.escape_decode(raw)[0]
        except ValueError as exc:
            raise ConfigError(f"bad escape in {value!r}: {exc}", key="delimiter") from None
    return raw


def _get(config: dict, key: str, kind, default):
    value = config.get(key, default)
    if value is None:
        return default
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", key=key)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {value!r}", key=key)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {value!r}", key=key)
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string, got {value!r}", key=key)
    return value


def _choice(config: dict, key: str, choices, default):
    value = _get(config, key, type(default), default)
    if value not in choices:
        raise ConfigError(f"must be one of {', '.join(map(str, choices))}, got {value!r}", key=key)
    return value


def make_framer(config: dict, pure: bool = False):
    """Build the framer a gear config asks for. `pure=True` forces the pure-Python classes
    (tests, benchmarks). Raises ConfigError naming the offending key."""
    framing = _choice(config, "framing", FRAMINGS, "delimiter")
    default_max = MODBUS_MAX_ADU if framing == "modbus_rtu" else core.DEFAULT_MAX_FRAME_BYTES
    max_frame_bytes = _get(config, "max_frame_bytes", int, default_max)
    if max_frame_bytes < 1:
        raise ConfigError(f"must be >= 1, got {max_frame_bytes}", key="max_frame_bytes")

    def cls(name):
        return getattr(core, name + "Py") if pure else getattr(core, name)

    if framing == "delimiter":
        return cls("DelimiterFramer")(
            delimiter=parse_delimiter(config.get("delimiter") or ""),
            position=_choice(config, "delimiter_position", ("suffix", "prefix"), "suffix"),
            include_delimiter=_get(config, "delimiter_include", bool, False),
            append=_get(config, "delimiter_append", bool, False),
            max_frame_bytes=max_frame_bytes,
        )
    if framing == "length_prefix" or framing in _ALIASES or framing in ISO_PRESETS:
        endian = _choice(config, "length_endian", ("big", "little"), "big")
        if framing == "length_prefix":
            kind, size = "binary", _choice(config, "length_size", (2, 4), 2)
        elif framing in _ALIASES:
            kind, size = "binary", _ALIASES[framing]
        else:
            kind, size, endian = ISO_PRESETS[framing]
        return cls("LengthPrefixFramer")(
            size=size,
            endian=endian,
            kind=kind,
            includes_header=_get(config, "length_includes_header", bool, False),
            allow_empty=_get(config, "length_allow_empty", bool, False),
            keep_header=_get(config, "length_keep_header", bool, False),
            max_frame_bytes=max_frame_bytes,
        )
    if framing == "fixed":
        size = _get(config, "fixed_size", int, None)
        if size is None or size < 1 or size > max_frame_bytes:
            raise ConfigError(f"framing=fixed needs fixed_size in 1..{max_frame_bytes}, got {size!r}", key="fixed_size")
        return cls("FixedFramer")(size, max_frame_bytes=max_frame_bytes)
    if framing == "slip":
        return cls("SlipFramer")(
            max_frame_bytes=max_frame_bytes, leading_end=_get(config, "slip_leading_end", bool, True)
        )
    if framing == "none":
        return cls("RawFramer")(max_frame_bytes=max_frame_bytes)
    return _serial_framer(config, framing, max_frame_bytes)


def _serial_framer(config: dict, framing: str, max_frame_bytes: int):
    baudrate = _get(config, "baudrate", int, 9600)
    bytesize = _choice(config, "bytesize", (5, 6, 7, 8), 8)
    parity = _choice(config, "parity", ("N", "E", "O", "M", "S"), "N")
    stopbits = config.get("stopbits", 1)
    if stopbits not in (1, 1.5, 2):
        raise ConfigError(f"must be 1, 1.5 or 2, got {stopbits!r}", key="stopbits")
    if baudrate < 1:
        raise ConfigError(f"must be >= 1, got {baudrate}", key="baudrate")
    gap_ms = _get(config, "idle_gap_ms", float, None)
    if gap_ms is not None and gap_ms <= 0:
        raise ConfigError(f"must be > 0, got {gap_ms}", key="idle_gap_ms")
    if framing == "modbus_rtu":
        framer = ModbusRtuFramer(
            baudrate,
            bytesize=bytesize,
            parity=parity,
            stopbits=stopbits,
            keep_crc=_get(config, "modbus_keep_crc", bool, False),
            max_frame_bytes=max_frame_bytes,
            gap=None if gap_ms is None else gap_ms / 1000.0,
        )
        return framer
    chars = _get(config, "idle_gap_chars", float, DEFAULT_IDLE_GAP_CHARS)
    if chars <= 0:
        raise ConfigError(f"must be > 0, got {chars}", key="idle_gap_chars")
    gap = gap_ms / 1000.0 if gap_ms is not None else chars * char_time(baudrate, bytesize, parity, stopbits)
    return IdleGapFramer(gap, max_frame_bytes=max_frame_bytes)
