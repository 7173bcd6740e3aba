"""jPOS GenericPackager XML import (fluxrig.iso8583.jpos), both codec twins.

The packager files under tests/packagers/ are written for these tests in jPOS's real format
(`isopackager`, `isofield`, `isofieldpackager`, `class` naming the field packager). Checked:
an ISO 87 ASCII packager encodes byte for byte like the moov base; a binary/EBCDIC packager
against pyiso8583 on an equivalent spec (both directions); golden bytes for every composite
form (bitmapped, tagged 2/3 characters, positional, BER-TLV, IFB_AMOUNT); refused classes
and malformed files give one SpecError naming field and class.
"""

from __future__ import annotations

import os

import iso8583
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iso8583_support import IMPLS, bitmap_for

from fluxrig.iso8583 import SpecError, load_spec
from fluxrig.iso8583.jpos import CLASSES, REFUSED

DATA = os.path.join(os.path.dirname(__file__), "packagers")


def path(name):
    return os.path.join(DATA, name)


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


MSG87 = {
    0: "0200",
    2: "4761739001010119",
    3: "000000",
    4: "000000010000",
    7: "0521123045",
    11: "123456",
    12: "123045",
    13: "0521",
    22: "051",
    28: "C00000100",
    32: "123456",
    35: "4761739001010119=2512201",
    37: "123456789012",
    41: "TERM0001",
    42: "MERCHANT0000001",
    43: "ACME STORE 42           MONTEVIDEO    UY",
    48: "ADDL DATA1",
    49: "858",
    52: bytes.fromhex("0123456789ABCDEF"),
    70: "301",
    102: "ACCOUNT-1",
    128: bytes.fromhex("0102030405060708"),
}


def test_iso87ascii_packager_encodes_like_the_moov_base(impl):
    jp = load_spec(path("iso87ascii.xml"), impl=impl)
    moov = load_spec("moov:spec87ascii", impl=impl)
    raw = jp.encode(MSG87)
    assert raw == moov.encode(MSG87)
    assert jp.decode(raw) == MSG87 == moov.decode(raw)
    # every data element 2..128 but 65 (the tertiary-bitmap flag here) is declared
    assert [n for n in range(2, 129) if jp.codec.plans[n] is None] == [65]


def test_iso87ascii_padding_follows_the_jpos_classes(impl):
    jp = load_spec(path("iso87ascii.xml"), impl=impl)
    out = jp.decode(jp.encode({0: "0800", 11: "42", 41: "T1", 70: "1"}))
    assert out == {0: "0800", 11: "000042", 41: "T1      ", 70: "001"}  # IFA_NUMERIC 0-left, IF_CHAR space-right


# pyiso8583's view of tests/packagers/iso87binary-mixed.xml, field by field
PYISO_MIXED = {
    "h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0},
    "t": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 2},
    "p": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8},
    "1": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8},
    "2": {"data_enc": "b", "len_enc": "bcd", "len_type": 1, "max_len": 19, "len_count": "nibbles", "left_pad": "0"},
    "3": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 3},
    "4": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 6},
    "11": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 3},
    "32": {"data_enc": "b", "len_enc": "bcd", "len_type": 1, "max_len": 11, "len_count": "nibbles", "right_pad": "0"},
    "33": {"data_enc": "b", "len_enc": "bcd", "len_type": 1, "max_len": 11, "len_count": "nibbles", "right_pad": "F"},
    "37": {"data_enc": "latin-1", "len_enc": "ascii", "len_type": 0, "max_len": 12},
    "41": {"data_enc": "latin-1", "len_enc": "ascii", "len_type": 0, "max_len": 8},
    "43": {"data_enc": "cp037", "len_enc": "ascii", "len_type": 0, "max_len": 40},
    "44": {"data_enc": "cp037", "len_enc": "b", "len_type": 1, "max_len": 25},
    "48": {"data_enc": "latin-1", "len_enc": "bcd", "len_type": 2, "max_len": 999},
    "49": {"data_enc": "latin-1", "len_enc": "ascii", "len_type": 0, "max_len": 3},
    "52": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8},
    "55": {"data_enc": "b", "len_enc": "b", "len_type": 1, "max_len": 255},
    "56": {"data_enc": "b", "len_enc": "b", "len_type": 2, "max_len": 999},
    "60": {"data_enc": "cp037", "len_enc": "cp037", "len_type": 2, "max_len": 99},
    "61": {"data_enc": "latin-1", "len_enc": "cp037", "len_type": 2, "max_len": 99},
    "62": {"data_enc": "cp037", "len_enc": "ascii", "len_type": 2, "max_len": 99},
    "63": {"data_enc": "cp037", "len_enc": "cp037", "len_type": 3, "max_len": 999},
    "70": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 3, "len_count": "nibbles", "right_pad": "0"},
    "100": {"data_enc": "b", "len_enc": "bcd", "len_type": 1, "max_len": 11, "len_count": "nibbles", "left_pad": "0"},
    "102": {"data_enc": "latin-1", "len_enc": "ascii", "len_type": 2, "max_len": 28},
    "128": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8},
}
_BIN = {"52", "55", "56", "128"}  # bytes for us, upper-case hex for pyiso8583

digits = st.text(alphabet="0123456789", min_size=1, max_size=11)
text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20)


def _ours(doc):
    out = {0: doc["t"]}
    for k, v in doc.items():
        if k.isdigit() and k not in ("1", "65"):
            out[int(k)] = bytes.fromhex(v) if k in _BIN else v
    return out


@st.composite
def mixed_messages(draw):
    doc = {"t": draw(st.sampled_from(["0200", "0800", "0110"]))}
    pick = draw(st.sets(st.sampled_from(sorted(set(PYISO_MIXED) - {"h", "t", "p", "1"}, key=int)), min_size=1))
    for k in pick:
        spec = PYISO_MIXED[k]
        if k in _BIN:
            n = spec["max_len"] if spec["len_type"] == 0 else draw(st.integers(0, 30))
            doc[k] = draw(st.binary(min_size=n, max_size=n)).hex().upper()
        elif spec["data_enc"] == "b":
            n = spec["max_len"] * 2 if spec["len_type"] == 0 and spec.get("len_count") != "nibbles" else None
            if n is None and spec["len_type"] == 0:
                n = spec["max_len"]
            doc[k] = draw(st.text(alphabet="0123456789", min_size=n, max_size=n)) if n else draw(digits)
        elif spec["len_type"] == 0:
            doc[k] = draw(st.text(alphabet="ABCXYZ 0189", min_size=spec["max_len"], max_size=spec["max_len"]))
        elif k == "63":
            doc[k] = draw(digits)
        else:
            doc[k] = draw(text)
    return doc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=mixed_messages())
def test_binary_ebcdic_packager_matches_pyiso8583(impl, doc):
    jp = load_spec(path("iso87binary-mixed.xml"), impl=impl)
    theirs, _ = iso8583.encode(dict(doc), PYISO_MIXED)
    ours = _ours(doc)
    assert jp.encode(ours) == bytes(theirs)
    assert jp.decode(bytes(theirs)) == ours
    back, _ = iso8583.decode(jp.encode(ours), PYISO_MIXED)
    assert {k: v for k, v in back.items() if k.isdigit() and k != "1"} == {k: v for k, v in doc.items() if k != "t"}


def test_lbcd_pad_nibbles_golden(impl):
    jp = load_spec(path("iso87binary-mixed.xml"), impl=impl)
    raw = jp.encode({0: "0800", 32: "12345", 33: "12345", 70: "301", 2: "123"})
    # 2: pad="true" -> 0 nibble before; 32 IFB_LLNUM -> 0 nibble after; 33 IFB_FLLNUM -> F after
    assert raw[2:10] == bytes.fromhex("C000000180000000")  # bits 1 (secondary), 2, 32, 33
    assert bytes.fromhex("030123") in raw
    assert bytes.fromhex("05123450") in raw and bytes.fromhex("0512345F") in raw
    assert raw.endswith(bytes.fromhex("3010"))  # DE 70 "301" left-aligned


COMPOSITE_MSG = {
    0: "0100",
    2: "4111111111111111",
    28: {"1": "C", "2": "00000100"},
    30: "D00000250",
    43: {"2": "ACME", "5": "MO ", "7": "858"},
    48: {"1": "12345 MAIN ST", "20": "APPLE"},
    55: {"9F02": bytes.fromhex("000000001000"), "82": b"\x19\x80"},
    60: {"1": "POSDATA", "2": "TERM"},
    126: {"1": "JOHN DOE".ljust(25), "6": bytes(range(17))},
    127: {"1": "A", "2": "4111111111111111", "3": "2512"},
}


def test_composites_golden(impl):
    jp = load_spec(path("composites.xml"), impl=impl)
    raw = jp.encode(COMPOSITE_MSG)
    assert raw.startswith(b"0100" + b"C000001400210210" + b"0000000000000006")
    assert b"164111111111111111" + bytes.fromhex("4300000100") + b"D00000250" in raw  # IFB_AMOUNT: sign byte + BCD
    # bitmapped 43: 8-byte bitmap (bits 2, 5, 7) then the parts present
    assert b"020" + bytes.fromhex("4A00000000000000") + b"04ACMEMO 858" in raw
    # tagged 48: DecimalTagMapper tags "01", token "WI"; 2-character tags, then each LL value
    assert b"02601" + b"13" + b"12345 MAIN ST" + b"WI05APPLE" in raw
    # BER-TLV 55 kept as bytes per tag
    assert b"013" + bytes.fromhex("9F0206000000001000820219 80".replace(" ", "")) in raw
    # 3-character tags, LLL values
    assert b"023001007POSDATAT02004TERM" in raw
    # Base1 126: bit 1 is subfield 1 (no secondary flag), EBCDIC name, binary certificate
    assert bytes.fromhex("328400000000000000") + "JOHN DOE".ljust(25).encode("cp037") + bytes(range(17)) in raw
    assert raw.endswith(b"023A1641111111111111112512")  # positional 127, 127.0 placeholder skipped
    assert jp.decode(raw) == COMPOSITE_MSG


def test_bitmapped_composite_secondary_bitmap(impl):
    jp = load_spec(path("composites.xml"), impl=impl)
    value = {"2": "ACME", "70": "EXTENSION!"}
    raw = jp.encode({0: "0100", 43: value})
    assert b"032" + bytes.fromhex("C000000000000000" + "0400000000000000") + b"04ACMEEXTENSION!" in raw
    assert jp.decode(raw)[43] == value


def test_composite_subfield_keys_may_be_ints(impl):
    jp = load_spec(path("composites.xml"), impl=impl)
    as_int = {0: "0100", 43: {2: "ACME", 7: "858"}, 48: {1: "X"}, 127: {1: "A", 2: "41", 3: "2512"}}
    as_str = {0: "0100", 43: {"2": "ACME", "7": "858"}, 48: {"1": "X"}, 127: {"1": "A", "2": "41", "3": "2512"}}
    assert jp.encode(as_int) == jp.encode(as_str)
    assert jp.decode(jp.encode(as_int)) == as_str  # decode keys are str


def test_tagged_unknown_tag_is_a_typed_error(impl):
    jp = load_spec(path("composites.xml"), impl=impl)
    raw = jp.encode({0: "0100", 48: {"1": "X"}})
    bad = raw.replace(b"01" + b"01X", b"99" + b"01X")
    from fluxrig.iso8583 import Iso8583DecodeError

    with pytest.raises(Iso8583DecodeError) as ei:
        jp.decode(bad)
    assert (ei.value.field, ei.value.reason) == (48, "unknown_tag")


def _packager(body: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<isopackager>\n'
        '  <isofield id="0" length="4" name="MTI" class="org.jpos.iso.IFA_NUMERIC"/>\n'
        '  <isofield id="1" length="16" name="BITMAP" class="org.jpos.iso.IFA_BITMAP"/>\n' + body + "</isopackager>\n"
    )


def test_refused_and_unknown_classes_are_listed_together(tmp_path):
    f = tmp_path / "bad.xml"
    f.write_text(
        _packager(
            '  <isofield id="2" length="19" name="PAN" class="org.jpos.iso.IFB_LLHEX"/>\n'
            '  <isofield id="3" length="6" name="X" class="com.acme.IFX_MAGIC"/>\n'
            '  <isofieldpackager id="48" length="999" name="Y" class="org.jpos.iso.IFA_LLLCHAR"'
            ' packager="com.acme.MySubPackager"><isofield id="1" length="2" class="org.jpos.iso.IF_CHAR"/>'
            "</isofieldpackager>\n"
        )
    )
    with pytest.raises(SpecError) as ei:
        load_spec(str(f))
    text = "\n".join(ei.value.problems)
    assert "bad.xml.2: class IFB_LLHEX is refused" in text
    assert "bad.xml.3: class IFX_MAGIC is not a jPOS field packager" in text
    assert "bad.xml.48: packager MySubPackager is not supported" in text
    assert len(ei.value.problems) == 3


def test_entities_and_malformed_xml_are_refused(tmp_path):
    bomb = tmp_path / "bomb.xml"
    bomb.write_text('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><isopackager>&a;</isopackager>')
    with pytest.raises(SpecError, match="entity declarations are refused"):
        load_spec(str(bomb))
    broken = tmp_path / "broken.xml"
    broken.write_text(_packager('  <isofield id="2" length="19" class="org.jpos.iso.IFA_LLNUM">\n'))
    with pytest.raises(SpecError, match=r"broken.xml:\d+:\d+: not well-formed XML"):
        load_spec(str(broken))


def test_mapping_tables_do_not_overlap():
    assert not set(CLASSES) & set(REFUSED)
    assert "IFA_LLNUM" in CLASSES and "IFB_AMOUNT" not in REFUSED


def test_ebcdic_packager_golden_and_pyiso8583(impl):
    jp = load_spec(path("iso87ebcdic.xml"), impl=impl)
    m = {
        0: "0200",
        2: "4111111111111111",
        3: "000000",
        4: "000000010000",
        11: "000001",
        28: "D00000100",
        41: "TERM0001",
        43: "ACME [1]".ljust(40),
        48: "X",
        52: bytes.fromhex("0123456789ABCDEF"),
        55: b"\x9f\x02",
        70: "301",
    }
    raw = jp.encode(m)
    e = lambda t: t.encode("cp037")  # noqa: E731
    bitmap = bitmap_for(*[n for n in m if n]).hex().upper()  # 32 hex characters, in EBCDIC
    assert raw[:4] == e("0200") and raw[4:36] == e(bitmap)
    assert e("164111111111111111") in raw and e("0123456789ABCDEF") in raw
    assert e("002") + b"\x9f\x02" in raw
    assert jp.decode(raw) == m
    spec = {
        "h": {"data_enc": "cp037", "len_enc": "ascii", "len_type": 0, "max_len": 0},
        "t": {"data_enc": "cp037", "len_enc": "ascii", "len_type": 0, "max_len": 4},
        "p": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8},
    }
    # pyiso8583 has no EBCDIC-hex bitmap; compare everything after the bitmaps field by field
    body = raw[36:]
    py = {
        "2": {"data_enc": "cp037", "len_enc": "cp037", "len_type": 2, "max_len": 19},
        "3": {"data_enc": "cp037", "len_enc": "ascii", "len_type": 0, "max_len": 6},
    }
    theirs, _ = iso8583.encode({**{"t": "0200"}, "2": m[2], "3": m[3]}, {**spec, **py})
    assert bytes(theirs)[4 + 8 :] == body[: len(bytes(theirs)) - 12]


def test_track2_in_num_classes_stays_decodable(impl, tmp_path):
    f = tmp_path / "t2.xml"
    f.write_text(
        _packager(
            '  <isofield id="35" length="37" name="TRACK 2 DATA" class="org.jpos.iso.IFB_LLNUM"/>\n'
            '  <isofield id="36" length="104" name="TRACK 3 DATA" class="org.jpos.iso.IFA_LLLNUM"/>\n'
        )
    )
    jp = load_spec(str(f), impl=impl)
    t2 = "4111111111111111=2512201"  # 24 characters; '=' is nibble D in BCD
    t3 = "011234567890=724724000000"
    raw = jp.encode({0: "0200", 35: t2, 36: t3})
    assert bytes.fromhex("24" + t2.replace("=", "D")) in raw
    assert b"025" + t3.encode() in raw
    assert jp.decode(raw) == {0: "0200", 35: t2, 36: t3}
    odd = "411111111111111=2512201"  # 23: LBCD pads the last nibble with 0 (jPOS RIGHT_PADDED)
    raw = jp.encode({0: "0200", 35: odd})
    assert bytes.fromhex("23" + odd.replace("=", "D") + "0") in raw
    assert jp.decode(raw)[35] == odd


def test_cli_packager_converts_to_an_equivalent_yaml_spec(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "spec.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "iso8583", "packager", path("composites.xml"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "&id" not in out.read_text()
    assert load_spec(str(out)).encode(COMPOSITE_MSG) == load_spec(path("composites.xml")).encode(COMPOSITE_MSG)
    bad = tmp_path / "bad.xml"
    bad.write_text(_packager('  <isofield id="2" length="19" class="org.jpos.iso.IFB_LLHEX"/>\n'))
    r = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "iso8583", "packager", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "IFB_LLHEX is refused" in r.stderr
