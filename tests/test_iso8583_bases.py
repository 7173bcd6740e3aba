"""The ISO 8583:1993 and :2003 bases (moov:spec93ascii, moov:spec93binary, moov:spec2003binary):
golden messages in both twins, the MTI version digit checked by the rules, and the jPOS tie of
a bitmapped composite's subfield 1 to its secondary bitmap (2003's DE 49)."""

from __future__ import annotations

import pytest
from iso8583_support import IMPLS

from fluxrig.iso8583 import BASES, Iso8583EncodeError, load_spec


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def test_bases_are_listed_and_load():
    for name in ("moov:spec93ascii", "moov:spec93binary", "moov:spec2003binary"):
        assert name in BASES
        assert load_spec(name).mti_version == ("2" if "2003" in name else "1")
    assert load_spec("moov:spec87ascii").mti_version is None


def test_93_ascii_golden(impl):
    s = load_spec("moov:spec93ascii", impl=impl)
    m = {0: "1200", 2: "4111111111111111", 3: "000000", 4: "000000010000", 11: "000001", 24: "200", 43: "ACME"}
    raw = s.encode(m)
    # 1993: DE 12 is n12 (YYMMDDhhmmss), DE 24 the function code, DE 43 LL..99
    assert raw == (
        b"1200"
        + b"7020010000200000"
        + b"164111111111111111"
        + b"000000"
        + b"000000010000"
        + b"000001"
        + b"200"
        + b"04ACME"
    )
    assert s.decode(raw) == m


def test_2003_binary_golden(impl):
    s = load_spec("moov:spec2003binary", impl=impl)
    m = {0: "2100", 2: "4111111111111", 3: "000000", 4: "0000000000010000", 11: "000000000001"}
    raw = s.encode(m)
    assert raw == (
        bytes.fromhex("2100")
        + bytes.fromhex("7020000000000000")
        + bytes.fromhex("13" + "4111111111111" + "0")  # LBCD: odd digit count padded on the right
        + b"000000"  # DE 3 is ans6 in the 2003 layout
        + bytes.fromhex("0000000000010000")
        + bytes.fromhex("000000000001")
    )
    assert s.decode(raw) == m


def test_mti_version_digit_is_a_rule():
    s = load_spec("moov:spec93ascii")
    assert [v.rule for v in s.rules.check({0: "0200"})] == ["mti.version"]
    assert s.rules.check({0: "1200"}) == []


def test_2003_de49_subfield_1_rides_on_the_secondary_bitmap(impl):
    s = load_spec("moov:spec2003binary", impl=impl)
    value = {"1": "1", "2": "1234"}
    raw = s.encode({0: "2100", 49: value})
    content = raw[raw.index(bytes.fromhex("0000"), 10) :]
    # 16-byte bitmap (bit 1: secondary + subfield 1), then 1 digit and 4 digits in LBCD
    assert bytes.fromhex("C0000000000000000000000000000000" + "10" + "1234") in raw, content
    assert s.decode(raw)[49] == value
    only2 = s.encode({0: "2100", 49: {"2": "1234"}})
    assert bytes.fromhex("4000000000000000" + "1234") in only2
    assert s.decode(only2)[49] == {"2": "1234"}


def test_tied_subfield_1_missing_with_a_high_subfield_is_an_encode_error(impl):
    spec = {
        "name": "t",
        "fields": {
            0: {"type": "String", "length": 4, "enc": "ASCII", "prefix": "ASCII.Fixed"},
            1: {"type": "Bitmap", "length": 8, "enc": "Binary", "prefix": "Binary.Fixed"},
            48: {
                "type": "Composite",
                "length": 999,
                "prefix": "ASCII.LLL",
                "bitmap": {"length": 16, "enc": "Binary"},
                "subfields": {
                    "1": {"type": "String", "length": 1, "enc": "ASCII", "prefix": "ASCII.Fixed"},
                    "70": {"type": "String", "length": 2, "enc": "ASCII", "prefix": "ASCII.Fixed"},
                },
            },
        },
    }
    s = load_spec(spec, impl=impl)
    assert s.decode(s.encode({0: "0100", 48: {"1": "A", "70": "ZZ"}}))[48] == {"1": "A", "70": "ZZ"}
    with pytest.raises(Iso8583EncodeError) as ei:
        s.encode({0: "0100", 48: {"70": "ZZ"}})
    assert ei.value.field == 48 and "tied to the secondary bitmap" in str(ei.value)
