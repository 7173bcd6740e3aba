"""The encodings and composite layouts added for real networks, in the moov vocabulary, both
twins: LBCD / LBCDF, EBCDIC 1047, ASCIIToHex, tagged (non-BER) composites with 2- and 3-character
tags, bitmapped composites, EBCDIC hex (EBCDICHex); int or str subfield keys; errors that name the missing key; and a
seeded mutation fuzz of the new decoders (only Iso8583DecodeError, never anything else)."""

from __future__ import annotations

import random

import pytest
from iso8583_support import IMPLS, bitmap_for, spec_of

from fluxrig.iso8583 import Iso8583DecodeError, Iso8583EncodeError, SpecError
from fluxrig.iso8583.codec_py import EBCDIC1047_DECODE, EBCDIC1047_ENCODE


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def one(num, definition, impl):
    return spec_of({num: definition}, impl)


def msg(num, body):
    return b"0100" + bitmap_for(num) + body


def lll(content: bytes) -> bytes:
    return b"%03d" % len(content) + content


def test_lbcd_golden(impl):
    s = one(2, {"type": "Numeric", "length": 19, "enc": "LBCD", "prefix": "BCD.LL"}, impl)
    assert s.encode({0: "0100", 2: "12345"}) == msg(2, bytes.fromhex("05123450"))
    assert s.decode(msg(2, bytes.fromhex("05123450")))[2] == "12345"
    assert s.decode(msg(2, bytes.fromhex("0512345F")))[2] == "12345"  # F pad accepted on input
    assert s.encode({0: "0100", 2: "1234"}) == msg(2, bytes.fromhex("041234"))
    with pytest.raises(Iso8583DecodeError) as ei:
        s.decode(msg(2, bytes.fromhex("05123457")))
    assert (ei.value.field, ei.value.reason) == (2, "bcd")


def test_lbcdf_golden(impl):
    s = one(3, {"type": "Numeric", "length": 3, "enc": "LBCDF", "prefix": "BCD.Fixed"}, impl)
    assert s.encode({0: "0100", 3: "301"}) == msg(3, bytes.fromhex("301F"))
    assert s.decode(msg(3, bytes.fromhex("301F")))[3] == "301"


def test_ebcdic1047_golden(impl):
    s = one(43, {"type": "String", "length": 20, "enc": "EBCDIC1047", "prefix": "EBCDIC.LL"}, impl)
    # the six positions where 1047 differs from 037: [ ] ^ ¬ Ý ¨
    value = "[A]^¬Ý¨"
    wire = bytes.fromhex("F0F7" + "AD" + "C1" + "BD" + "5F" + "B0" + "BA" + "BB")
    assert s.encode({0: "0100", 43: value}) == msg(43, wire)
    assert s.decode(msg(43, wire))[43] == value
    s037 = one(43, {"type": "String", "length": 20, "enc": "EBCDIC", "prefix": "EBCDIC.LL"}, impl)
    assert s037.decode(msg(43, wire))[43] == "Ý A ¨ ¬ ^ [ ]".replace(" ", "")
    with pytest.raises(Iso8583EncodeError) as ei:
        s.encode({0: "0100", 43: "€"})
    assert (ei.value.field, ei.value.reason) == (43, "charset")


def test_ebcdic1047_table_is_a_permutation_matching_iconv_differences():
    assert sorted(EBCDIC1047_DECODE) == list(range(256))
    assert bytes(EBCDIC1047_DECODE[b] for b in EBCDIC1047_ENCODE) == bytes(range(256))
    cp037 = bytes(range(256)).decode("cp037")
    cp1047 = EBCDIC1047_DECODE.decode("latin-1")
    assert [i for i in range(256) if cp037[i] != cp1047[i]] == [0x5F, 0xAD, 0xB0, 0xBA, 0xBB, 0xBD]


def test_ascii_to_hex_golden(impl):
    s = one(52, {"type": "String", "length": 8, "enc": "ASCIIToHex", "prefix": "Binary.Fixed"}, impl)
    assert s.encode({0: "0100", 52: "0123456789abcdef"}) == msg(52, bytes.fromhex("0123456789ABCDEF"))
    assert s.decode(msg(52, bytes.fromhex("0123456789ABCDEF")))[52] == "0123456789ABCDEF"
    v = one(55, {"type": "Hex", "length": 99, "enc": "ASCIIToHex", "prefix": "ASCII.LL"}, impl)
    assert v.encode({0: "0100", 55: "9F02"}) == msg(55, b"02" + bytes.fromhex("9F02"))  # prefix counts bytes
    with pytest.raises(SpecError, match="ASCIIToHex carries a hex string"):
        one(2, {"type": "Numeric", "length": 4, "enc": "ASCIIToHex", "prefix": "ASCII.Fixed"}, impl)


TAGGED_MOOV = {
    "type": "Composite",
    "length": 999,
    "prefix": "ASCII.LLL",
    "tag": {"length": 2, "enc": "ASCII", "padding": {"type": "Left", "pad": "0"}},
    "subfields": {
        "1": {"type": "String", "length": 20, "enc": "ASCII", "prefix": "ASCII.LL"},
        "2": {"type": "Numeric", "length": 3, "enc": "ASCII", "prefix": "ASCII.Fixed"},
        "AB": {"type": "String", "length": 99, "enc": "ASCII", "prefix": "ASCII.LL"},
    },
}


def test_tagged_moov_form_golden(impl):
    s = one(48, TAGGED_MOOV, impl)
    value = {"1": "HELLO", "2": "007", "AB": "x"}
    wire = lll(b"01" + b"05HELLO" + b"02" + b"007" + b"AB" + b"01x")
    assert s.encode({0: "0100", 48: value}) == msg(48, wire)
    assert s.decode(msg(48, wire))[48] == value
    # tags in any order on the wire; decoded in wire order
    other = lll(b"AB" + b"01x" + b"01" + b"05HELLO" + b"02" + b"007")
    assert list(s.decode(msg(48, other))[48]) == ["AB", "1", "2"]
    with pytest.raises(Iso8583DecodeError) as ei:
        s.decode(msg(48, b"010" + b"01" + b"02AB" + b"01" + b"02CD"))
    assert ei.value.reason == "tag"  # a tag twice


def test_tagged_three_characters_and_unknown_preserved(impl):
    d = {
        "type": "Composite",
        "length": 999,
        "prefix": "ASCII.LLL",
        "subfields": {
            "layout": "tagged",
            "tag": {"length": 3},
            "unknown_tags": "preserve",
            "unknown_prefix": "ASCII.LLL",
            "parts": [
                {"tag": "T01", "key": "pos", "type": "String", "length": 50, "prefix": "ASCII.LLL", "enc": "ASCII"}
            ],
        },
    }
    s = one(60, d, impl)
    wire = lll(b"T01" + b"004DATA" + b"ZZZ" + b"003abc" + b"T99" + b"000")
    out = s.decode(msg(60, wire))[60]
    assert out == {"pos": "DATA", "ZZZ": b"abc", "T99": b""}
    assert s.encode({0: "0100", 60: out}) == msg(60, wire)


def test_bitmapped_moov_form_golden(impl):
    d = {
        "type": "Composite",
        "length": 999,
        "prefix": "ASCII.LLL",
        "bitmap": {"length": 8, "enc": "HexToASCII"},
        "disableAutoExpand": True,
        "subfields": {
            "1": {"type": "String", "length": 2, "enc": "ASCII", "prefix": "ASCII.Fixed"},
            "3": {"type": "Numeric", "length": 10, "enc": "ASCII", "prefix": "ASCII.LL"},
            "64": {"type": "String", "length": 1, "enc": "ASCII", "prefix": "ASCII.Fixed"},
        },
    }
    s = one(62, d, impl)
    value = {"1": "AB", "3": "42", "64": "Z"}
    wire = b"023" + b"A000000000000001" + b"AB" + b"0242" + b"Z"
    assert s.encode({0: "0100", 62: value}) == msg(62, wire)
    assert s.decode(msg(62, wire))[62] == value
    with pytest.raises(Iso8583DecodeError) as ei:
        s.decode(msg(62, b"016" + b"2000000000000000"))  # bit 3... no: bit 3 set, value missing
    assert ei.value.field == 62
    with pytest.raises(Iso8583DecodeError) as ei:
        s.decode(msg(62, b"017" + b"4000000000000000" + b"X"))  # bit 2 is not declared
    assert ei.value.reason == "unknown_field"


POSITIONAL = {
    "type": "Composite",
    "length": 9,
    "prefix": "ASCII.Fixed",
    "subfields": {
        "1": {"type": "String", "length": 4, "enc": "ASCII"},
        "2": {"type": "Numeric", "length": 5, "enc": "ASCII"},
    },
}


def test_positional_keys_int_or_str_and_missing_key_named(impl):
    s = one(54, POSITIONAL, impl)
    assert s.encode({0: "0100", 54: {1: "ABCD", 2: "12345"}}) == s.encode({0: "0100", 54: {"1": "ABCD", "2": "12345"}})
    assert s.decode(s.encode({0: "0100", 54: {1: "ABCD", 2: "12345"}}))[54] == {"1": "ABCD", "2": "12345"}
    with pytest.raises(Iso8583EncodeError) as ei:
        s.encode({0: "0100", 54: {1: "ABCD"}})
    assert ei.value.reason == "missing" and ei.value.subfield == "2"
    assert "give it under key '2'" in str(ei.value) and "'1', '2'" in str(ei.value)
    with pytest.raises(Iso8583EncodeError) as ei:
        s.encode({0: "0100", 54: {1: "ABCD", "1": "WXYZ", 2: "12345"}})
    assert ei.value.reason == "duplicate_part"
    with pytest.raises(Iso8583EncodeError) as ei:
        s.encode({0: "0100", 54: {1: "ABCD", 2: "12345", 3: "x"}})
    assert ei.value.reason == "unknown_part" and "3" in str(ei.value)


FUZZ_SPECS = {
    2: {"type": "Numeric", "length": 19, "enc": "LBCD", "prefix": "BCD.LL"},
    43: {"type": "String", "length": 40, "enc": "EBCDIC1047", "prefix": "EBCDIC.LL"},
    48: TAGGED_MOOV,
    52: {"type": "String", "length": 8, "enc": "ASCIIToHex", "prefix": "Binary.Fixed"},
    64: {"type": "Binary", "length": 8, "enc": "EBCDICHex", "prefix": "EBCDIC.Fixed"},
    62: {
        "type": "Composite",
        "length": 999,
        "prefix": "ASCII.LLL",
        "bitmap": {"length": 16, "enc": "Binary"},
        "subfields": {
            "2": {"type": "String", "length": 9, "enc": "ASCII", "prefix": "ASCII.LL"},
            "70": {"type": "Numeric", "length": 3, "enc": "LBCD", "prefix": "BCD.Fixed"},
        },
    },
}


def test_mutation_fuzz_only_typed_errors(impl):
    s = spec_of(FUZZ_SPECS, impl)
    seed = s.encode(
        {
            0: "0100",
            2: "4111111111111",
            43: "ACME [1]",
            48: {"1": "HI", "2": "001", "AB": "z"},
            52: "00112233AABBCCDD",
            64: bytes.fromhex("0102030405060708"),
            62: {"2": "abc", "70": "123"},
        }
    )
    rng = random.Random(21)
    ok = bad = 0
    for _ in range(3000):
        b = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(b))
            if op < 0.6:
                b[i] = rng.randrange(256)
            elif op < 0.8:
                del b[i]
            else:
                b.insert(i, rng.randrange(256))
        try:
            s.decode(bytes(b))
            ok += 1
        except Iso8583DecodeError:
            bad += 1
    assert ok + bad == 3000 and bad > 100
