"""make_framer (gear config -> framer) and the framing schema fragment."""

from __future__ import annotations

import pytest

import fluxrig.framing as F
from fluxrig.errors import ConfigError
from fluxrig.framing.config import parse_delimiter


def test_default_is_newline_delimiter_bound_to_the_active_backend():
    fr = F.make_framer({})
    assert type(fr) is F.DelimiterFramer
    assert fr.delimiter == b"\n" and fr.position == "suffix" and not fr.include_delimiter and not fr.append
    assert fr.max_frame_bytes == F.DEFAULT_MAX_FRAME_BYTES
    assert type(F.make_framer({}, pure=True)) is F.DelimiterFramerPy


def test_other_gear_keys_are_ignored():
    fr = F.make_framer({"mode": "server", "bind": "127.0.0.1:9000", "framing": "len2_be", "idle_timeout": "60s"})
    assert fr.feed(b"\x00\x02hi") == [b"hi"]


def test_delimiter_keys():
    fr = F.make_framer(
        {
            "framing": "delimiter",
            "delimiter": "\\x03",
            "delimiter_position": "prefix",
            "delimiter_include": True,
            "delimiter_append": True,
            "max_frame_bytes": 100,
        }
    )
    assert (fr.delimiter, fr.position, fr.include_delimiter, fr.append, fr.max_frame_bytes) == (
        b"\x03",
        "prefix",
        True,
        True,
        100,
    )
    assert fr.encode(b"a") == b"\x03a"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("", b"\n"),
        ("\r\n", b"\r\n"),
        ("\\r\\n", b"\r\n"),
        ("hex:0d0a", b"\r\n"),
        ("END", b"END"),
        ("\\x02", b"\x02"),
        ("é", "é".encode()),
        (b"\x00", b"\x00"),
    ],
)
def test_delimiter_values(value, expected):
    assert F.make_framer({"delimiter": value}).delimiter == expected
    if value:
        assert parse_delimiter(value) == expected


@pytest.mark.parametrize(
    "config,size,endian,kind,includes",
    [
        ({"framing": "length_prefix"}, 2, "big", "binary", False),
        (
            {"framing": "length_prefix", "length_size": 4, "length_endian": "little", "length_includes_header": True},
            4,
            "little",
            "binary",
            True,
        ),
        ({"framing": "length_prefix2"}, 2, "big", "binary", False),
        ({"framing": "length_prefix4"}, 4, "big", "binary", False),
        ({"framing": "length_prefix2", "length_endian": "little"}, 2, "little", "binary", False),
        ({"framing": "len2_be"}, 2, "big", "binary", False),
        ({"framing": "len2_le"}, 2, "little", "binary", False),
        ({"framing": "len4_be", "length_includes_header": True}, 4, "big", "binary", True),
        ({"framing": "len2_be", "length_endian": "little"}, 2, "big", "binary", False),  # preset wins
        ({"framing": "ascii4"}, 4, "big", "ascii4", False),
        ({"framing": "bcd2"}, 2, "big", "bcd2", False),
        ({"framing": "vap"}, 4, "big", "vap", False),
    ],
)
def test_length_prefix_keys_and_presets(config, size, endian, kind, includes):
    fr = F.make_framer(config)
    assert type(fr) is F.LengthPrefixFramer
    assert (fr.size, fr.endian, fr.kind, fr.includes_header) == (size, endian, kind, includes)


def test_fixed_slip_none():
    assert F.make_framer({"framing": "fixed", "fixed_size": 5}).size == 5
    assert F.make_framer({"framing": "slip", "slip_leading_end": False}).leading_end is False
    assert F.make_framer({"framing": "none"}).feed(b"abc") == [b"abc"]


def test_serial_framings_read_the_line_settings():
    idle = F.make_framer({"framing": "idle_gap", "baudrate": 9600, "bytesize": 8, "parity": "E", "stopbits": 1})
    assert isinstance(idle, F.IdleGapFramer)
    assert idle.gap == pytest.approx(3.5 * 11 / 9600)
    chars = F.make_framer({"framing": "idle_gap", "baudrate": 1200, "idle_gap_chars": 2})
    assert chars.gap == pytest.approx(2 * 10 / 1200)
    explicit = F.make_framer({"framing": "idle_gap", "baudrate": 115200, "idle_gap_ms": 15})
    assert explicit.gap == pytest.approx(0.015)
    rtu = F.make_framer({"framing": "modbus_rtu", "baudrate": 115200, "modbus_keep_crc": True})
    assert isinstance(rtu, F.ModbusRtuFramer)
    assert rtu.gap == 0.00175 and rtu.keep_crc and rtu.max_frame_bytes == F.MODBUS_MAX_ADU
    assert F.make_framer({"framing": "modbus_rtu", "idle_gap_ms": 20}).gap == pytest.approx(0.02)


@pytest.mark.parametrize(
    "config,key",
    [
        ({"framing": "morse"}, "framing"),
        ({"delimiter_position": "middle"}, "delimiter_position"),
        ({"delimiter_include": "yes"}, "delimiter_include"),
        ({"delimiter": "hex:zz"}, "delimiter"),
        ({"delimiter": 7}, "delimiter"),
        ({"framing": "length_prefix", "length_size": 3}, "length_size"),
        ({"framing": "length_prefix", "length_endian": "middle"}, "length_endian"),
        ({"framing": "len2_be", "length_includes_header": 1}, "length_includes_header"),
        ({"framing": "fixed"}, "fixed_size"),
        ({"framing": "fixed", "fixed_size": 0}, "fixed_size"),
        ({"max_frame_bytes": 0}, "max_frame_bytes"),
        ({"max_frame_bytes": "1MiB"}, "max_frame_bytes"),
        ({"framing": "idle_gap", "baudrate": 0}, "baudrate"),
        ({"framing": "idle_gap", "parity": "X"}, "parity"),
        ({"framing": "idle_gap", "stopbits": 3}, "stopbits"),
        ({"framing": "idle_gap", "idle_gap_chars": 0}, "idle_gap_chars"),
        ({"framing": "modbus_rtu", "idle_gap_ms": -1}, "idle_gap_ms"),
    ],
)
def test_bad_config_names_the_key(config, key):
    with pytest.raises(ConfigError) as info:
        F.make_framer(config)
    assert info.value.key == key
    assert str(info.value).startswith(key + ":")


def test_schema_fragment_shape():
    schema = F.framing_schema()
    assert set(schema["framing"]["enum"]) == set(F.FRAMINGS)
    for name in (
        "delimiter",
        "length_prefix",
        "length_prefix2",
        "length_prefix4",
        "len2_be",
        "len2_le",
        "len4_be",
        "ascii4",
        "bcd2",
        "vap",
        "fixed",
        "slip",
        "idle_gap",
        "modbus_rtu",
        "none",
    ):
        assert name in F.FRAMINGS
    for key, prop in schema.items():
        assert set(prop) <= {"type", "enum", "default", "description"}, key
        assert prop["type"] in ("string", "integer", "number", "boolean"), key
        assert prop["description"], key
        assert "default" in prop, key
    assert schema["framing"]["default"] == "delimiter"
    assert schema["max_frame_bytes"]["default"] == F.DEFAULT_MAX_FRAME_BYTES


def test_schema_defaults_are_what_make_framer_does():
    schema = F.framing_schema()
    defaults = {k: p["default"] for k, p in schema.items() if p["default"] is not None}
    a = F.make_framer(defaults)
    b = F.make_framer({})
    assert (a.delimiter, a.position, a.include_delimiter, a.append, a.max_frame_bytes) == (
        b.delimiter,
        b.position,
        b.include_delimiter,
        b.append,
        b.max_frame_bytes,
    )


def test_schema_restricted_to_stream_framings():
    schema = F.framing_schema(F.STREAM_FRAMINGS)
    assert "idle_gap" not in schema["framing"]["enum"]
    assert "idle_gap_ms" not in schema and "modbus_keep_crc" not in schema
    iso = F.framing_schema(list(F.ISO_PRESETS))
    assert iso["framing"]["default"] == "len2_be"
    assert F.framing_schema() is not F.framing_schema()  # a fresh copy each time
    with pytest.raises(ValueError):
        F.framing_schema(["morse"])
