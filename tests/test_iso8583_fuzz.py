"""Hypothesis fuzzing of decode: random bytes and mutated valid messages only ever produce a
dict or an Iso8583DecodeError (never another exception, never a hang), the compiled and pure
twins agree on every input (same fields, or the same error type/field/offset/reason), and
every decoded message re-encodes and decodes to the same fields. Also: the fast paths agree
with the generic path they shortcut.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iso8583_support import HAVE_C, IMPLS
from test_iso8583_pyiso_diff import MIXED

from fluxrig.iso8583 import Iso8583DecodeError, Iso8583EncodeError, load_spec
from fluxrig.iso8583 import codec_py as C

COMPOSITE = {
    "name": "composite",
    "fields": {
        0: {"type": "String", "length": 4, "enc": "ASCII", "prefix": "ASCII.Fixed"},
        1: {"type": "Bitmap", "length": 8, "enc": "Binary", "prefix": "Binary.Fixed"},
        2: {"type": "Track2", "length": 37, "enc": "BCD", "prefix": "BCD.LL"},
        3: {
            "type": "Numeric",
            "length": 6,
            "enc": "ASCII",
            "prefix": "ASCII.Fixed",
            "subfields": {"layout": "positional", "parts": [{"from": 1, "to": 2}, {"from": 3, "to": 6}]},
        },
        4: {"type": "Hex", "length": 99, "enc": "HexToASCII", "prefix": "Hex.L"},
        35: {"type": "Track2", "length": 37, "enc": "ASCII", "prefix": "ASCII.LL"},
        54: {
            "type": "String",
            "length": 120,
            "enc": "ASCII",
            "prefix": "ASCII.LLL",
            "subfields": {
                "layout": "positional",
                "repeat": {"length": 4, "max": 3},
                "parts": [{"from": 1, "to": 2}, {"from": 3, "to": 4}],
            },
        },
        55: {
            "type": "Composite",
            "length": 255,
            "prefix": "Binary.L",
            "subfields": {
                "layout": "tlv",
                "unknown_tags": "preserve",
                "parts": [
                    {"tag": "9F02", "type": "Numeric", "enc": "BCD", "length": 12},
                    {"tag": "82", "type": "Binary"},
                    {"tag": "50", "type": "String"},
                ],
            },
        },
        104: {
            "type": "Composite",
            "length": 999,
            "prefix": "ASCII.LLL",
            "subfields": {
                "layout": "tlv",
                "unknown_tags": "reject",
                "parts": [{"tag": "01", "type": "String"}, {"tag": "1A", "type": "Hex"}],
            },
        },
        130: {"type": "String", "length": 5, "enc": "EBCDIC", "prefix": "EBCDIC.LL"},
    },
}
SPECS = {"spec87ascii": "moov:spec87ascii", "spec87hex": "moov:spec87hex", "mixed": MIXED, "composite": COMPOSITE}
SEEDS = {
    "spec87ascii": [
        {
            0: "0200",
            2: "4761739001010119",
            3: "000000",
            4: "000000010000",
            11: "123456",
            35: "4761739001010119=25122011143804400000",
            41: "TERM0001",
            48: "ABC",
            52: bytes(8),
            70: "301",
            102: "ACCT",
        }
    ],
    "spec87hex": [{0: "0200", 2: "4111", 11: "000001", 48: "XYZ", 64: "ABCDEFGH", 100: "12345"}],
    "mixed": [{0: "0100", 2: "12345", 3: "001234", 4: "EBCDIC", 8: "0A0B", 9: "FF", 11: "caf\xe9", 100: "00" * 8}],
    "composite": [
        {
            0: "0100",
            2: "411111111111111=2512101",
            3: {"1": "01", "2": "0000"},
            4: "0AFF",
            35: "4111111111111111=25121010000",
            54: [{"1": "10", "2": "20"}],
            55: {"9F02": "000000001000", "82": b"\x19\x80", "9F36": b"\x00\x01"},
            104: {"01": "hello", "1A": "00FF"},
            130: "AB",
        }
    ],
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(spec, raw):
    """What decode does with raw: ('ok', fields) or ('err', type, field, offset, reason)."""
    try:
        return ("ok", spec.decode(raw))
    except Iso8583DecodeError as err:
        assert isinstance(err.offset, int) and 0 <= err.offset <= max(len(raw), 1)
        assert isinstance(err.partial, dict)
        return ("err", type(err), err.field, err.offset, err.reason, err.subfield)


def check_properties(specs, raw):
    results = [outcome(s, raw) for s in specs]
    assert all(r == results[0] for r in results), "compiled and pure twins disagree"
    if results[0][0] == "ok":
        fields = results[0][1]
        for s in specs:
            again = s.encode(fields)
            assert s.decode(again) == fields


@st.composite
def mutated(draw, seeds):
    raw = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "bitmap"]))
        if not raw:
            break
        i = draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[i : i + draw(st.integers(1, 8))]
        else:  # set or clear a bitmap bit (bytes 4..19 cover binary and hex bitmaps)
            j = min(len(raw) - 1, 4 + draw(st.integers(0, 15)))
            raw[j] |= 1 << draw(st.integers(0, 7))
    return bytes(raw)


def specs_for(name):
    impls = ["py", "c"] if HAVE_C else ["py"]
    return [load_spec(SPECS[name], impl=i) for i in impls]


@pytest.mark.parametrize("name", list(SPECS))
def test_fuzz_random_bytes(name):
    specs = specs_for(name)
    prefix = specs[0].encode({0: "0200"})[:4]

    @FUZZ
    @given(st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: prefix + b)))
    def check(raw):
        check_properties(specs, raw)

    check()


@pytest.mark.parametrize("name", list(SPECS))
def test_fuzz_mutated_messages(name):
    specs = specs_for(name)
    seeds = [specs[0].encode(f) for f in SEEDS[name]]
    for s in specs:
        assert [s.decode(r) for r in seeds] == SEEDS[name]

    @FUZZ
    @given(mutated(seeds))
    def check(raw):
        check_properties(specs, raw)

    check()


@pytest.mark.parametrize("impl", IMPLS)
def test_fast_paths_match_the_generic_path(impl):
    fast = load_spec("moov:spec87ascii", impl=impl)
    slow = load_spec("moov:spec87ascii", impl=impl)
    for p in slow.codec.plans:
        if p is not None:
            p.kind = C.K_GENERIC
    assert sum(p is not None and p.kind != C.K_GENERIC for p in fast.codec.plans) > 100

    text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=14)
    anything = st.one_of(text, st.text(max_size=4), st.integers(0, 10**6), st.binary(max_size=8))

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.sampled_from([2, 3, 4, 11, 12, 32, 41, 43, 48, 70, 102, 104]), anything, max_size=6))
    def check(values):
        fields = {0: "0200", **values}
        results = []
        for s in (fast, slow):
            try:
                results.append(("ok", s.encode(fields)))
            except Iso8583EncodeError as err:
                results.append(("err", err.field, err.reason, err.offset))
        assert results[0] == results[1]
        if results[0][0] == "ok":
            assert fast.decode(results[0][1]) == slow.decode(results[0][1])

    check()
