"""Composites (BER-TLV with unknown_tags preserve/drop/reject, positional, repeating) and the
field/offset every decode error carries. Both codec twins."""

from __future__ import annotations

import pytest
from iso8583_support import IMPLS, bitmap_for, spec_of

from fluxrig.iso8583 import Iso8583DecodeError, Iso8583EncodeError, SpecError

BM55 = bytes([0, 0, 0, 0, 0, 0, 0x02, 0])  # field 55 only


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def tlv_spec(impl, unknown="reject"):
    return spec_of(
        {
            55: {
                "type": "Composite",
                "length": 999,
                "prefix": "ASCII.LLL",
                "subfields": {
                    "layout": "tlv",
                    "unknown_tags": unknown,
                    "parts": [
                        {"tag": "9F02", "type": "Numeric", "enc": "BCD", "length": 12},
                        {"tag": "82", "type": "Binary"},
                        {"tag": "5F2A", "type": "Numeric", "enc": "BCD", "length": 4},
                        {"tag": "50", "type": "String"},
                        {"tag": "9F10", "type": "Hex"},
                    ],
                },
            }
        },
        impl,
    )


KNOWN = bytes.fromhex("9F020600000000100082021980")
UNKNOWN = bytes.fromhex("9F3602008A")  # ATC, not declared


def msg55(content: bytes) -> bytes:
    return b"0100" + BM55 + b"%03d" % len(content) + content


@pytest.mark.parametrize("unknown", ["preserve", "drop", "reject"])
def test_tlv_known_tags_round_trip(impl, unknown):
    spec = tlv_spec(impl, unknown)
    value = {"9F02": "000000001000", "82": b"\x19\x80"}
    raw = spec.encode({0: "0100", 55: value})
    assert raw == msg55(KNOWN)
    assert spec.decode(raw) == {0: "0100", 55: value}


def test_tlv_unknown_preserve_keeps_tag_and_wire_order(impl):
    spec = tlv_spec(impl, "preserve")
    content = bytes.fromhex("82021980") + UNKNOWN + bytes.fromhex("9F0206000000001000")
    fields = spec.decode(msg55(content))
    assert fields[55] == {"82": b"\x19\x80", "9F36": b"\x00\x8a", "9F02": "000000001000"}
    assert list(fields[55]) == ["82", "9F36", "9F02"]
    assert spec.encode(fields) == msg55(content)  # re-encoded byte for byte, order kept


def test_tlv_unknown_drop_discards(impl):
    spec = tlv_spec(impl, "drop")
    fields = spec.decode(msg55(KNOWN + UNKNOWN))
    assert fields[55] == {"9F02": "000000001000", "82": b"\x19\x80"}
    assert spec.encode({0: "0100", 55: {**fields[55], "9F36": b"\x00\x8a"}}) == msg55(KNOWN)


def test_tlv_unknown_reject_names_field_and_offset(impl):
    spec = tlv_spec(impl, "reject")
    with pytest.raises(Iso8583DecodeError) as ei:
        spec.decode(msg55(KNOWN + UNKNOWN))
    err = ei.value
    assert (err.field, err.reason) == (55, "unknown_tag")
    assert err.offset == 4 + 8 + 3 + len(KNOWN)
    assert err.partial == {0: "0100"}
    with pytest.raises(Iso8583EncodeError) as ei:
        spec.encode({0: "0100", 55: {"9F36": b"\x00\x8a"}})
    assert (ei.value.field, ei.value.reason, ei.value.offset) == (55, "unknown_tag", 12)


def test_tlv_long_form_length_and_multibyte_tags(impl):
    spec = tlv_spec(impl, "preserve")
    text = "N" * 200
    raw = spec.encode({0: "0100", 55: {"50": text, "9F8101": b"\x01"}})
    content = b"\x50\x81\xc8" + text.encode() + bytes.fromhex("9F81010101")
    assert raw == msg55(content)
    assert spec.decode(raw)[55] == {"50": text, "9F8101": b"\x01"}
    hexval = spec.encode({0: "0100", 55: {"9F10": "0A0B"}})
    assert hexval == msg55(bytes.fromhex("9F10020A0B"))


@pytest.mark.parametrize(
    "content,where",
    [
        (bytes.fromhex("9F"), 0),  # tag cut short
        (bytes.fromhex("9F02"), 0),  # no length
        (bytes.fromhex("9F0280"), 2),  # indefinite length
        (bytes.fromhex("9F028500000000010000"), 2),  # five length bytes
        (bytes.fromhex("9F020600"), 0),  # value runs past the end
        (bytes.fromhex("9F0281"), 2),  # long form cut short
        (bytes.fromhex("8202198082021980"), 4),  # duplicate tag
        (bytes.fromhex("9F0206000000001A00"), 3),  # invalid BCD in a declared part
        (bytes.fromhex("9F818181010100"), 0),  # tag longer than 4 bytes
    ],
)
def test_tlv_malformed_is_a_typed_error_at_the_right_offset(impl, content, where):
    spec = tlv_spec(impl, "preserve")
    with pytest.raises(Iso8583DecodeError) as ei:
        spec.decode(msg55(content))
    assert ei.value.field == 55
    assert ei.value.offset == 15 + where


def positional_spec(impl):
    return spec_of(
        {
            3: {
                "type": "Numeric",
                "length": 6,
                "enc": "ASCII",
                "prefix": "ASCII.Fixed",
                "subfields": {
                    "layout": "positional",
                    "parts": [{"from": 1, "to": 2}, {"from": 3, "to": 4}, {"from": 5, "to": 6}],
                },
            },
            48: {
                "type": "Composite",
                "length": 99,
                "enc": "ASCII",
                "prefix": "ASCII.LL",
                "subfields": {
                    "1": {"type": "String", "length": 2, "enc": "ASCII", "prefix": "ASCII.Fixed"},
                    "2": {"type": "Numeric", "length": 10, "enc": "ASCII", "prefix": "ASCII.LL"},
                },
            },
            54: {
                "type": "String",
                "length": 120,
                "enc": "ASCII",
                "prefix": "ASCII.LLL",
                "subfields": {
                    "layout": "positional",
                    "repeat": {"length": 20, "max": 6},
                    "parts": [
                        {"from": 1, "to": 2},
                        {"from": 3, "to": 4},
                        {"from": 5, "to": 7},
                        {"from": 8, "to": 8},
                        {"from": 9, "to": 20},
                    ],
                },
            },
        },
        impl,
    )


def test_positional_and_moov_map_form(impl):
    spec = positional_spec(impl)
    raw = spec.encode({0: "0200", 3: {"1": "01", "2": "20", "3": "30"}, 48: {"1": "AB", "2": "12345"}})
    assert raw == b"0200" + bitmap_for(3, 48) + b"012030" + b"09AB0512345"
    assert spec.decode(raw) == {0: "0200", 3: {"1": "01", "2": "20", "3": "30"}, 48: {"1": "AB", "2": "12345"}}
    assert spec.encode({0: "0200", 3: "012030", 48: b"AB0512345"}) == raw  # raw content accepted


def test_positional_repeat(impl):
    spec = positional_spec(impl)
    groups = [
        {"1": "10", "2": "01", "3": "858", "4": "C", "5": "000000001000"},
        {"1": "20", "2": "02", "3": "840", "4": "D", "5": "000000000500"},
    ]
    raw = spec.encode({0: "0200", 54: groups})
    assert (
        raw == b"0200" + bytes([0, 0, 0, 0, 0, 0, 0x04, 0]) + b"040" + b"1001858C000000001000" + b"2002840D000000000500"
    )
    assert spec.decode(raw) == {0: "0200", 54: groups}
    with pytest.raises(Iso8583DecodeError) as ei:
        spec.decode(b"0200" + bytes([0, 0, 0, 0, 0, 0, 0x04, 0]) + b"021" + b"1001858C000000001000X")
    assert (ei.value.field, ei.value.reason, ei.value.offset) == (54, "repeat", 15)
    with pytest.raises(Iso8583EncodeError) as ei:
        spec.encode({0: "0200", 54: groups * 4})
    assert (ei.value.field, ei.value.reason) == (54, "repeat")


def test_positional_part_errors_name_the_subfield(impl):
    spec = positional_spec(impl)
    bad = b"0200" + bitmap_for(48) + b"09AB05123X5"
    with pytest.raises(Iso8583DecodeError) as ei:
        spec.decode(bad)
    assert (ei.value.field, ei.value.subfield, ei.value.reason, ei.value.offset) == (48, "2", "numeric", 16)
    with pytest.raises(Iso8583EncodeError) as ei:
        spec.encode({0: "0200", 3: {"1": "01", "2": "20"}})
    assert (ei.value.field, ei.value.subfield, ei.value.reason) == (3, "3", "missing")


def test_composite_layout_problems_fail_the_load(impl):
    with pytest.raises(SpecError) as ei:
        spec_of(
            {
                3: {
                    "type": "Numeric",
                    "length": 6,
                    "enc": "ASCII",
                    "prefix": "ASCII.Fixed",
                    "subfields": {"layout": "positional", "parts": [{"from": 1, "to": 2}, {"from": 4, "to": 6}]},
                },
                55: {
                    "type": "Composite",
                    "length": 999,
                    "prefix": "ASCII.LLL",
                    "subfields": {"layout": "tlv", "parts": [{"tag": "9F"}]},
                },
            },
            impl,
        )
    text = "\n".join(ei.value.problems)
    assert "contiguous" in text and "9F" in text


def test_decode_errors_carry_field_offset_and_partial(impl):
    spec = spec_of(
        {
            2: {"type": "String", "length": 19, "enc": "ASCII", "prefix": "ASCII.LL"},
            3: {"type": "Numeric", "length": 6, "enc": "ASCII", "prefix": "ASCII.Fixed"},
            4: {"type": "String", "length": 12, "enc": "ASCII", "prefix": "ASCII.Fixed"},
        },
        impl,
    )
    bm = bytes([0x70, 0, 0, 0, 0, 0, 0, 0])
    good = b"0200" + bm + b"044111" + b"000000" + b"000000001000"
    assert spec.decode(good) == {0: "0200", 2: "4111", 3: "000000", 4: "000000001000"}
    cases = [
        (good[:3], 0, 0, "short"),
        (good[:10], 1, 4, "short"),
        (b"0200" + bm + b"0A4111" + good[18:], 2, 13, "prefix"),
        (b"0200" + bm + b"204111" + good[18:], 2, 12, "length"),
        (b"0200" + bm + b"04\xff111" + good[18:], 2, 12, "charset"),
        (good[:18] + b"00000X" + good[24:], 3, 18, "numeric"),
        (good[:24] + b"00000000\xe9000", 4, 24, "charset"),
        (good + b"!", None, 36, "trailing"),
        (b"0200" + bytes([0x78, 0, 0, 0, 0, 0, 0, 0]) + good[12:], 5, 36, "unknown_field"),
    ]
    for raw, field, offset, reason in cases:
        with pytest.raises(Iso8583DecodeError) as ei:
            spec.decode(raw)
        err = ei.value
        assert (err.field, err.offset, err.reason) == (field, offset, reason), raw
        assert isinstance(err.partial, dict)
    with pytest.raises(Iso8583DecodeError) as ei:
        spec.decode(good[:24] + b"00000000\xe9000")
    assert ei.value.partial == {0: "0200", 2: "4111", 3: "000000"}


def test_max_message_bytes_is_a_parameter(impl):
    from fluxrig.iso8583 import load_spec

    spec = load_spec("moov:spec87ascii", impl=impl, max_message_bytes=64)
    raw = spec.encode({0: "0200", 43: "X" * 40, 48: "Y" * 30})
    with pytest.raises(Iso8583DecodeError) as ei:
        spec.decode(raw)
    assert ei.value.reason == "too_large"
