"""Golden vectors: every type, encoding and length prefix against hand-computed bytes.

Each vector is one data element (field 2) in a message with an ASCII MTI "0100" and a binary
bitmap (0x40 00.. for field 2 alone). The expected bytes are written out by hand from the
moov vocabulary: a prefix carries the value's length in units (characters, digits, bytes).
"""

from __future__ import annotations

import pytest
from iso8583_support import BITMAP_HEX, IMPLS, bitmap_for, spec_of

from fluxrig.iso8583 import Iso8583DecodeError, Iso8583EncodeError, load_spec

BM2 = b"\x40" + b"\x00" * 7  # field 2 only

S = "String"
# (id, definition, value, wire bytes of the element)
VECTORS = [
    ("ascii-fixed", dict(type=S, length=4, enc="ASCII", prefix="ASCII.Fixed"), "AB12", b"AB12"),
    ("ascii-L", dict(type=S, length=9, enc="ASCII", prefix="ASCII.L"), "ABC", b"3ABC"),
    ("ascii-LL", dict(type=S, length=19, enc="ASCII", prefix="ASCII.LL"), "4111", b"044111"),
    ("ascii-LLL", dict(type=S, length=999, enc="ASCII", prefix="ASCII.LLL"), "HELLO", b"005HELLO"),
    ("ascii-LLLL", dict(type=S, length=9999, enc="ASCII", prefix="ASCII.LLLL"), "X", b"0001X"),
    ("ascii-LL-empty", dict(type=S, length=19, enc="ASCII", prefix="ASCII.LL"), "", b"00"),
    ("ebcdic-LL", dict(type=S, length=20, enc="EBCDIC", prefix="EBCDIC.LL"), "AB1", b"\xf0\xf3\xc1\xc2\xf1"),
    ("ebcdic-fixed", dict(type=S, length=3, enc="EBCDIC", prefix="EBCDIC.Fixed"), "a b", b"\x81\x40\x82"),
    ("ebcdic-L-ascii-data", dict(type=S, length=9, enc="ASCII", prefix="EBCDIC.L"), "AB", b"\xf2AB"),
    ("ebcdic-LLLL", dict(type=S, length=9999, enc="EBCDIC", prefix="EBCDIC.LLLL"), "Z", b"\xf0\xf0\xf0\xf1\xe9"),
    ("bcd-L", dict(type="Numeric", length=9, enc="BCD", prefix="BCD.L"), "7", b"\x01\x07"),
    ("bcd-LL-odd", dict(type="Numeric", length=19, enc="BCD", prefix="BCD.LL"), "12345", b"\x05\x01\x23\x45"),
    ("bcd-LL-even", dict(type="Numeric", length=19, enc="BCD", prefix="BCD.LL"), "4111", b"\x04\x41\x11"),
    ("bcd-LLL", dict(type="Numeric", length=999, enc="BCD", prefix="BCD.LLL"), "123", b"\x00\x03\x01\x23"),
    ("bcd-LLLL", dict(type="Numeric", length=9999, enc="BCD", prefix="BCD.LLLL"), "12", b"\x00\x02\x12"),
    ("bcd-fixed", dict(type="Numeric", length=6, enc="BCD", prefix="BCD.Fixed"), "001234", b"\x00\x12\x34"),
    ("bcd-fixed-odd", dict(type=S, length=3, enc="BCD", prefix="BCD.Fixed"), "987", b"\x09\x87"),
    ("bcd-len-ascii-data", dict(type=S, length=99, enc="ASCII", prefix="BCD.LL"), "HI", b"\x02HI"),
    ("binary-L", dict(type="Binary", length=255, enc="Binary", prefix="Binary.L"), b"\x00\xff", b"\x02\x00\xff"),
    ("binary-LL", dict(type="Binary", length=999, enc="Binary", prefix="Binary.LL"), b"\x01", b"\x00\x01\x01"),
    ("binary-LLL", dict(type="Binary", length=999, enc="Binary", prefix="Binary.LLL"), b"abc", b"\x00\x00\x03abc"),
    (
        "binary-LLLL",
        dict(type="Binary", length=999, enc="Binary", prefix="Binary.LLLL"),
        b"\x80",
        b"\x00\x00\x00\x01\x80",
    ),
    (
        "binary-fixed",
        dict(type="Binary", length=3, enc="Binary", prefix="Binary.Fixed"),
        b"\x01\x02\x03",
        b"\x01\x02\x03",
    ),
    ("binary-len-ascii-text", dict(type=S, length=99, enc="ASCII", prefix="Binary.L"), "HI", b"\x02HI"),
    (
        "binary-hextoascii-fixed",
        dict(type="Binary", length=2, enc="HexToASCII", prefix="Hex.Fixed"),
        b"\xab\x01",
        b"AB01",
    ),
    ("binary-ascii-enc", dict(type="Binary", length=9, enc="ASCII", prefix="ASCII.LL"), b"abc", b"03abc"),
    ("hex-L", dict(type=S, length=99, enc="ASCII", prefix="Hex.L"), "ABC", b"03ABC"),
    ("hex-LL", dict(type=S, length=999, enc="ASCII", prefix="Hex.LL"), "ABC", b"0003ABC"),
    ("hex-LL-300", dict(type=S, length=999, enc="ASCII", prefix="Hex.LL"), "x" * 300, b"012C" + b"x" * 300),
    ("hex-LLL-bytes", dict(type="Binary", length=999, enc="HexToASCII", prefix="Hex.LLL"), b"\x01\x02", b"0000020102"),
    ("hextoascii-string", dict(type=S, length=4, enc="HexToASCII", prefix="Hex.Fixed"), "0200", b"30323030"),
    ("hextoascii-string-LL", dict(type=S, length=19, enc="HexToASCII", prefix="Hex.LL"), "41", b"00023431"),
    (
        "hex-type-binary",
        dict(type="Hex", length=4, enc="Binary", prefix="Binary.Fixed"),
        "DEADBEEF",
        b"\xde\xad\xbe\xef",
    ),
    ("hex-type-hextoascii", dict(type="Hex", length=2, enc="HexToASCII", prefix="Hex.Fixed"), "ABCD", b"ABCD"),
    ("hex-type-LL", dict(type="Hex", length=99, enc="Binary", prefix="ASCII.LL"), "0A0B0C", b"03\x0a\x0b\x0c"),
    ("string-binary-latin1", dict(type=S, length=9, enc="Binary", prefix="Binary.L"), "\xe9t\xe9", b"\x03\xe9t\xe9"),
    (
        "track2-ascii",
        dict(type="Track2", length=37, enc="ASCII", prefix="ASCII.LL"),
        "4111111111111111=2512101123",
        b"274111111111111111=2512101123",
    ),
    (
        "track2-bcd-odd",
        dict(type="Track2", length=37, enc="BCD", prefix="BCD.LL"),
        "411111111111111=2512101",
        b"\x23" + bytes.fromhex("411111111111111D2512101F"),
    ),
    (
        "padding-left",
        dict(type=S, length=6, enc="ASCII", prefix="ASCII.Fixed", padding=dict(type="Left", pad="0")),
        "000042",
        b"000042",
    ),
    (
        "padding-right",
        dict(type=S, length=6, enc="ASCII", prefix="ASCII.Fixed", padding=dict(type="Right", pad=" ")),
        "AB    ",
        b"AB    ",
    ),
    (
        "numeric-ascii",
        dict(type="Numeric", length=12, enc="ASCII", prefix="ASCII.Fixed"),
        "000000001000",
        b"000000001000",
    ),
]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.mark.parametrize("name,definition,value,wire", VECTORS, ids=[v[0] for v in VECTORS])
def test_vector_encodes_and_decodes(impl, name, definition, value, wire):
    spec = spec_of({2: definition}, impl)
    message = b"0100" + BM2 + wire
    assert spec.encode({0: "0100", 2: value}) == message
    assert spec.decode(message) == {0: "0100", 2: value}


def test_padding_fills_short_values_and_decode_keeps_it(impl):
    spec = spec_of(
        {
            2: dict(type=S, length=6, enc="ASCII", prefix="ASCII.Fixed", padding=dict(type="Left", pad="0")),
            3: dict(type="Numeric", length=6, enc="BCD", prefix="BCD.Fixed", padding=dict(type="Left", pad="0")),
            4: dict(type=S, length=5, enc="EBCDIC", prefix="EBCDIC.Fixed", padding=dict(type="Right", pad=" ")),
        },
        impl,
    )
    raw = spec.encode({0: "0100", 2: "42", 3: 7, 4: "AB"})
    assert raw == b"0100" + b"\x70" + b"\x00" * 7 + b"000042" + b"\x00\x00\x07" + b"\xc1\xc2\x40\x40\x40"
    assert spec.decode(raw) == {0: "0100", 2: "000042", 3: "000007", 4: "AB   "}


def test_bcd_mti_and_hex_bitmap(impl):
    spec = spec_of(
        {3: dict(type="Numeric", length=6, enc="ASCII", prefix="ASCII.Fixed")},
        impl,
        bitmap=BITMAP_HEX,
        mti=dict(type="String", length=4, enc="BCD", prefix="BCD.Fixed"),
    )
    raw = spec.encode({0: "0200", 3: "000000"})
    assert raw == b"\x02\x00" + b"2000000000000000" + b"000000"
    assert spec.decode(raw) == {0: "0200", 3: "000000"}
    assert spec.decode(b"\x02\x00" + b"2000000000000000".lower() + b"000000") == {0: "0200", 3: "000000"}


def test_secondary_and_tertiary_bitmaps(impl):
    fixed = dict(type=S, length=3, enc="ASCII", prefix="ASCII.Fixed")
    spec = spec_of({2: fixed, 64: fixed, 70: fixed, 128: fixed, 130: fixed, 192: fixed, 65: {"type": "Bitmap"}}, impl)
    fields = {0: "0800", 2: "AAA", 64: "BBB", 70: "301", 128: "CCC", 130: "DDD", 192: "EEE"}
    raw = spec.encode(fields)
    primary = bytes([0xC0, 0, 0, 0, 0, 0, 0, 0x01])  # bits 1 (secondary), 2 and 64
    secondary = bytes([0x84, 0, 0, 0, 0, 0, 0, 0x01])  # bits 65 (tertiary), 70 and 128
    tertiary = bytes([0x40, 0, 0, 0, 0, 0, 0, 0x01])  # bits 130 and 192
    assert raw == b"0800" + primary + secondary + tertiary + b"AAABBB301CCCDDDEEE"
    assert bitmap_for(2, 64, 70, 128, 130, 192) == primary + secondary + tertiary
    assert spec.decode(raw) == fields
    only_secondary = spec.encode({0: "0800", 70: "301"})
    assert only_secondary == b"0800" + bytes([0x80] + [0] * 7) + bytes([0x04] + [0] * 7) + b"301"
    only_tertiary = spec.encode({0: "0800", 130: "DDD"})
    assert (
        only_tertiary == b"0800" + bytes([0x80] + [0] * 7) + bytes([0x80] + [0] * 7) + bytes([0x40] + [0] * 7) + b"DDD"
    )
    assert spec.decode(only_tertiary) == {0: "0800", 130: "DDD"}


def test_spec87ascii_golden_0200(impl):
    spec = load_spec("moov:spec87ascii", impl=impl)
    fields = {
        0: "0200",
        2: "4111111111111111",
        3: "000000",
        4: "000000001000",
        11: "000001",
        41: "TERM0001",
        52: bytes.fromhex("0123456789ABCDEF"),
    }
    # bits 2, 3, 4 -> 0x70; 11 -> 0x00 0x20; 41 -> byte 5 0x80; 52 -> byte 6 0x10
    raw = (
        b"0200"
        + b"7020000000801000"
        + b"164111111111111111"
        + b"000000"
        + b"000000001000"
        + b"000001"
        + b"TERM0001"
        + b"0123456789ABCDEF"
    )
    assert spec.encode(fields) == raw
    assert spec.decode(raw) == fields
    # padding declared by the base fills amounts; numeric ints are accepted for Numeric
    assert spec.encode({**fields, 3: 0, 4: "1000"}) == raw


def test_spec87hex_golden(impl):
    spec = load_spec("moov:spec87hex", impl=impl)
    raw = spec.encode({0: "0200", 2: "4111", 4: "1000"})
    # MTI and values are the upper-case hex of their ASCII bytes; Hex.LL carries the length
    # as 4 hex characters; DE 4 is left-padded with "0" to 12 characters first.
    assert raw == b"30323030" + b"5000000000000000" + b"0004" + b"34313131" + b"303030303030303031303030"
    assert spec.decode(raw) == {0: "0200", 2: "4111", 4: "000000001000"}


def test_field_one_key_is_ignored_and_none_is_absent(impl):
    spec = load_spec("moov:spec87ascii", impl=impl)
    assert spec.encode({0: "0800", 1: "whatever", 11: "000001", 70: None}) == spec.encode({0: "0800", 11: "000001"})


def test_decode_accepts_bytearray_and_memoryview(impl):
    spec = load_spec("moov:spec87ascii", impl=impl)
    raw = spec.encode({0: "0800", 11: "000001"})
    assert spec.decode(bytearray(raw)) == spec.decode(memoryview(raw)) == {0: "0800", 11: "000001"}
    with pytest.raises(TypeError):
        spec.decode("0800")


@pytest.mark.parametrize(
    "name,definition,value,wire",
    [v for v in VECTORS if "fixed" not in v[0]][:6],
    ids=[v[0] for v in VECTORS if "fixed" not in v[0]][:6],
)
def test_vector_truncated_is_a_typed_error(impl, name, definition, value, wire):
    spec = spec_of({2: definition}, impl)
    message = b"0100" + BM2 + wire
    for cut in range(12, len(message)):
        with pytest.raises(Iso8583DecodeError) as ei:
            spec.decode(message[:cut])
        assert ei.value.field == 2 and ei.value.offset == 12


def test_encode_rejects_what_the_wire_cannot_carry(impl):
    spec = spec_of(
        {
            2: dict(type=S, length=4, enc="ASCII", prefix="ASCII.LL"),
            3: dict(type="Numeric", length=6, enc="ASCII", prefix="ASCII.Fixed"),
            4: dict(type="Binary", length=2, enc="Binary", prefix="Binary.Fixed"),
            5: dict(type=S, length=4, enc="BCD", prefix="BCD.LL"),
            6: dict(type="Hex", length=2, enc="Binary", prefix="Binary.Fixed"),
            7: dict(type="Track2", length=37, enc="ASCII", prefix="ASCII.LL"),
        },
        impl,
    )
    cases = [
        ({2: "ABCDE"}, 2, "length"),
        ({3: "12345"}, 3, "length"),
        ({3: "12345X"}, 3, "numeric"),
        ({3: 12.5}, 3, "type"),
        ({4: "ab"}, 4, "type"),
        ({4: b"abc"}, 4, "length"),
        ({5: "12A"}, 5, "bcd"),
        ({6: "XYZW"}, 6, "hex"),
        ({7: "not track data"}, 7, "track2"),
        ({2: "\u00e9"}, 2, "charset"),
        ({9: "x"}, 9, "unknown_field"),
        ({65: "x"}, 65, "unknown_field"),
    ]
    for extra, field, reason in cases:
        with pytest.raises(Iso8583EncodeError) as ei:
            spec.encode({0: "0100", **extra})
        assert (ei.value.field, ei.value.reason) == (field, reason), extra
    with pytest.raises(Iso8583EncodeError) as ei:
        spec.encode({2: "AB"})
    assert ei.value.field == 0 and ei.value.reason == "missing"
    with pytest.raises(Iso8583EncodeError) as ei:
        spec.encode({0: "0100", "2": "AB"})
    assert ei.value.reason == "key"
