"""Spec loading: built-in bases, the v2 spec document (wire.source + per-field merge, semantic
fields, message catalog), moov wire documents, pyiso8583 dicts, load-time problems, masking."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from iso8583_support import IMPLS

from fluxrig.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from fluxrig.iso8583 import Iso8583DecodeError, Iso8583EncodeError, SpecError, from_pyiso8583, load_spec, mask_pan

V2 = """\
# An acquirer dialect over the 1987 ASCII base (test fixture).
spec:
  id: "acme-v87"
  name: "ACME dialect"
  version: "1.4.0"
  wire:
    source: "moov:spec87ascii"
    format: moov
    fields:
      7: {padding: {type: Left, pad: "0"}}
      11: {padding: {type: Left, pad: "0"}}
      3:
        subfields:
          layout: positional
          parts: [{from: 1, to: 2}, {from: 3, to: 4}, {from: 5, to: 6}]
      35: {type: Track2}
      55:
        type: Composite
        subfields:
          layout: tlv
          unknown_tags: preserve
          parts:
            - {tag: 9F02, type: Numeric, length: 12}
            - {tag: 9F36, type: Binary, length: 2}
      70: {type: String, length: 3, enc: ASCII, prefix: ASCII.Fixed, padding: {type: Left, pad: '0'}}
      0: {padding: {type: Left, pad: "0"}}
      54:
        subfields:
          layout: positional
          repeat: {length: 20, max: 6}
          parts:
            - {from: 1, to: 2}
            - {from: 3, to: 4}
            - {from: 5, to: 7}
            - {from: 8, to: 8}
            - {from: 9, to: 20}
      104:
        type: Composite
        length: 999
        enc: ASCII
        prefix: ASCII.LLL
        subfields:
          layout: tlv
          unknown_tags: preserve
          parts:
            - {tag: '01', type: String, length: 20}
            - {tag: 1A, type: String, length: 99}
  messages:
    catalog:
      "0200": {name: Financial Request, flow: request, pairs_with: "0210", response_timeout: 30s}
      "0210": {name: Financial Response, flow: response, pairs_with: "0200"}
      "0800": {name: Network Request, flow: request, pairs_with: "0810", class: network}
      "0810": {name: Network Response, flow: response, pairs_with: "0800", class: network}
    transitions:
      - {from: "0200", to: "0210", trigger: answer}
    correlate_on: [stan, terminal_id]
  enums:
    resp: {closed: false, values: {"00": {name: Approved}}}
  fields:
    0: {alias: mti, values_ref: "@messages"}
    2: {alias: pan, sensitivity: pan, log_mask: true}
    11: {alias: stan, name: "Trace number"}
    35: {alias: track2}
    39: {alias: resp_code, values_ref: resp}
    41: {alias: terminal_id}
    43: {alias: merchant_name, sensitivity: pii}
    4:
      name: "Amount, Transaction"
      alias: txn_amount
      format: {kind: amount, currency_field: 49}
      messages:
        - {mti: ["0200"], usage: mandatory}
        - {mti: ["0210"], usage: mandatory, response_value: modified}
    14: {sensitivity: chd, format: {kind: date, layout: YYMM}, scope: public}
    52: {scope: private, log_mask: true, sensitivity: sad, crypto: {role: pin_block}}
    54:
      meaning: "Repeating amount groups."
      subfields:
        layout: positional
        parts:
          - {name: Account type}
          - {name: Amount type}
          - {name: Currency code}
          - name: Sign
            validValues: {closed: true, values: {C: {name: Credit}, D: {name: Debit}}}
          - {name: Amount}
    104: {alias: txn_specific, subfields: {layout: tlv, parts: [{tag: '01', name: Customer}, {tag: 1A, name: Fleet}]}}
    55:
      alias: icc
      subfields:
        layout: tlv
        parts: [{tag: 9F02, name: Amount, alias: icc_amount}]
  validation_policy: {unlisted: optional}
  checks:
    - {mti: ["0200"], name: "credential", assert: "present(2) || present(35)", severity: reject}
  x-fluxrig-simulation:
    mix: [{use: "0200", weight: 1}]
  x-fluxrig-observability:
    dimensions: [mti, resp_code]
"""


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def v2_path(tmp_path):
    p = tmp_path / "acme.yaml"
    p.write_text(V2)
    return p


def test_bases_load_with_identity_and_default_sensitivity(impl):
    for name in ("moov:spec87ascii", "moov:spec87hex"):
        spec = load_spec(name, impl=impl)
        assert spec.id == name.split(":")[1]
        assert len(spec.hash) == 12 and int(spec.hash, 16) >= 0
        assert spec.sensitivity[2] == "pan" and spec.sensitivity[35] == "sad" and spec.sensitivity[45] == "sad"
        assert spec.backend == ("pure" if impl == "py" else "cython")
        assert spec.labels[2] == "Primary Account Number"
        assert 65 not in [n for n, p in enumerate(spec.codec.plans) if p is not None]


def test_v2_document_merges_wire_fields_over_the_base(impl, v2_path):
    spec = load_spec(str(v2_path), impl=impl)
    assert (spec.id, spec.version, spec.name) == ("acme-v87", "1.4.0", "ACME dialect")
    assert spec.hash == hashlib.sha256(V2.encode()).hexdigest()[:12]
    assert spec.aliases[2] == "pan" and spec.fields_by_alias["stan"] == 11
    assert spec.field_number("terminal_id") == 41 and spec.field_number("41") == 41
    assert spec.part_aliases["icc_amount"] == (55, "9F02")
    assert spec.sensitivity[2] == "pan" and spec.sensitivity[43] == "pii" and spec.sensitivity[35] == "sad"
    assert spec.labels[11] == "Trace number" and spec.labels[41] == "Card Acceptor Terminal Identification"
    assert set(spec.catalog) == {"0200", "0210", "0800", "0810"}
    assert spec.catalog["0800"]["class"] == "network" and spec.correlate_on == ["stan", "terminal_id"]

    fields = {
        0: "0200",
        2: "4111111111111111",
        3: {"1": "00", "2": "10", "3": "20"},
        7: "521123045",
        11: "42",
        35: "4111111111111111=25121010000000000000",
        55: {"9F02": "000000001000", "9F36": b"\x00\x8a", "5F2A": b"\x08\x58"},
        70: "1",
    }
    raw = spec.encode(fields)
    back = spec.decode(raw)
    assert back[7] == "0521123045" and back[11] == "000042" and back[70] == "001"  # merged padding
    assert back[3] == {"1": "00", "2": "10", "3": "20"}  # positional upgrade
    assert back[55] == {"9F02": "000000001000", "9F36": b"\x00\x8a", "5F2A": b"\x08\x58"}  # unknown kept
    assert b"9F02" not in raw and bytes.fromhex("9F020C") + b"000000001000" in raw  # tags binary, values ASCII
    groups = [{"1": "10", "2": "01", "3": "858", "4": "C", "5": "000000001000"}]
    extra = spec.decode(spec.encode({0: "200", 54: groups, 104: {"01": "CUST", "1A": "FLEET", "C1": b"?"}}))
    assert extra == {0: "0200", 54: groups, 104: {"01": "CUST", "1A": "FLEET", "C1": b"?"}}
    assert spec.sensitivity[14] == "chd" and spec.sensitivity[52] == "sad" and spec.aliases[4] == "txn_amount"
    with pytest.raises(Iso8583EncodeError) as ei:
        spec.encode({0: "0200", 35: "not a track"})
    assert ei.value.field == 35 and ei.value.reason == "track2"

    safe = spec.log_safe(back)
    assert safe[2] == "411111******1111" and safe[35].startswith("411111******1111=")
    assert set(safe[35][17:]) == {"*"} and spec.masked[43] == "pii"
    assert safe[11] == "000042" and back[2] == "4111111111111111"  # input untouched


def test_v2_document_as_json_behaves_the_same(impl, tmp_path):
    p = tmp_path / "acme.json"
    text = json.dumps(yaml.safe_load(V2))
    p.write_text(text)
    spec = load_spec(p, impl=impl)
    assert spec.id == "acme-v87" and spec.hash == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert spec.decode(spec.encode({0: "0800", 11: "7", 70: "301"})) == {0: "0800", 11: "000007", 70: "301"}


def test_wire_source_file_beside_the_spec(impl, tmp_path):
    (tmp_path / "wire").mkdir()
    (tmp_path / "wire" / "tiny.yaml").write_text(
        "name: tiny\nfields:\n"
        "  0: {type: String, length: 4, enc: BCD, prefix: BCD.Fixed}\n"
        "  1: {type: Bitmap, length: 8, enc: Binary, prefix: Binary.Fixed}\n"
        "  2: {type: String, length: 19, enc: BCD, prefix: BCD.LL}\n"
        "  11: {type: String, length: 6, enc: BCD, prefix: BCD.Fixed}\n"
    )
    (tmp_path / "spec.yaml").write_text(
        'spec:\n  id: tiny-bcd\n  version: "0.1.0"\n  wire:\n    source: wire/tiny.yaml\n'
        "    fields:\n      41: {type: String, length: 8, enc: ASCII, prefix: ASCII.Fixed}\n"
        "  fields:\n    41: {alias: tid}\n"
    )
    spec = load_spec(tmp_path / "spec.yaml", impl=impl)
    raw = spec.encode({0: "0100", 2: "4111111111111111", 11: "000001", 41: "TERM0001"})
    assert raw[:2] == b"\x01\x00" and raw.endswith(b"TERM0001")
    assert spec.decode(raw)[41] == "TERM0001" and spec.aliases == {41: "tid"}


def test_v2_problems_are_reported_all_at_once(tmp_path):
    bad = """\
spec:
  id: "Bad Id"
  version: "one"
  protocol: http
  wire:
    source: "../outside.yaml"
    fields:
      2: {prefix: ASCII.LLLLL}
  enums: {}
  fields:
    2: {alias: pan, sensitivity: pan, log_mask: false, length: 19}
    3: {alias: pan, description: "x", sensitivity: secret, values_ref: nope}
  messages:
    catalog:
      "0100": {pairs_with: "0110", flow: sideways}
    correlate_on: [stan]
"""
    p = tmp_path / "bad.yaml"
    p.write_text(bad)
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    err = ei.value
    assert isinstance(err, ConfigError) and err.source == str(p)
    text = "\n".join(err.problems)
    for needle in (
        "spec.id",
        "spec.version",
        "spec.protocol",
        "outside the spec's directory",
        "spec.fields.2.length: wire key",
        "log_mask: cannot be false",
        "already the alias",
        "spec.fields.3.description",
        "sensitivity",
        "enum 'nope'",
        "pairs_with",
        "flow",
        "correlate_on",
    ):
        assert needle in text, needle
    assert len(err.problems) >= 12


@pytest.mark.parametrize(
    "source,needle",
    [
        ("moov:spec99", "unknown base"),
        ({"spec": {"id": "x", "version": "1.0.0", "wire": {"source": "wire.yaml"}}}, "has no directory"),
        ({"spec": {"id": "x", "version": "1.0.0", "wire": {"source": "acme:1.2"}}}, "stored artefact"),
        ({"spec": {"id": "x", "version": "1.0.0", "wire": {"format": "jpos", "source": "moov:spec87ascii"}}}, "jpos"),
        ({"fields": {0: {"type": "String", "length": 4, "enc": "ASCII", "prefix": "ASCII.Fixed"}}}, "bitmap"),
        (
            {
                "fields": {
                    0: {"type": "String", "length": 4, "enc": "Latin9", "prefix": "ASCII.Fixed"},
                    1: {"type": "Bitmap", "enc": "Binary"},
                }
            },
            "unknown encoding",
        ),
        (
            {
                "fields": {
                    0: {"type": "String", "length": 4, "enc": "ASCII", "prefix": "ASCII.Fixed"},
                    1: {"type": "Bitmap", "enc": "Binary"},
                    2: {"type": "String", "length": 100, "enc": "ASCII", "prefix": "ASCII.LL"},
                }
            },
            "does not fit",
        ),
        (
            {
                "fields": {
                    0: {"type": "String", "length": 4, "enc": "ASCII", "prefix": "ASCII.Fixed"},
                    1: {"type": "Bitmap", "enc": "Binary"},
                    2: {"type": "Hex", "length": 4, "enc": "BCD", "prefix": "BCD.Fixed"},
                }
            },
            "cannot use encoding",
        ),
        (
            {
                "fields": {
                    0: {"type": "String", "length": 4, "enc": "ASCII", "prefix": "ASCII.Fixed"},
                    1: {"type": "Bitmap", "enc": "Binary"},
                    2: {
                        "type": "Numeric",
                        "length": 4,
                        "enc": "ASCII",
                        "prefix": "ASCII.Fixed",
                        "padding": {"type": "Left", "pad": "X"},
                    },
                }
            },
            "pads with a digit",
        ),
        ("/nonexistent/spec.yaml", "cannot read"),
        ({"hello": 1}, "not a spec document"),
    ],
)
def test_load_problems(source, needle):
    with pytest.raises(SpecError) as ei:
        load_spec(source)
    assert needle in str(ei.value)


def test_error_classes_say_whose_fault():
    assert issubclass(Iso8583DecodeError, RemoteProtocolError)
    assert issubclass(Iso8583EncodeError, LocalProtocolError)
    assert issubclass(SpecError, ConfigError)


def test_pyiso8583_dicts_import():
    from iso8583.specs import default, default_ascii

    doc = from_pyiso8583(default)
    wire = doc["fields"]
    assert load_spec(doc).decode(load_spec(default).encode({0: "0800", 70: "301"})) == {0: "0800", 70: "301"}
    assert wire[1] == {"type": "Bitmap", "length": 8, "enc": "Binary", "prefix": "Binary.Fixed"}
    assert wire[2]["type"] == "String" and wire[2]["enc"] == "ASCII" and wire[2]["prefix"] == "ASCII.LL"
    assert wire[52] == {"length": 8, "description": "PIN", "type": "Hex", "enc": "Binary", "prefix": "ASCII.Fixed"}
    assert 65 not in wire
    assert from_pyiso8583(default_ascii)["fields"][1]["enc"] == "HexToASCII"
    spec = load_spec(default)
    assert spec.id == "pyiso8583" and len(spec.hash) == 12
    custom = dict(default, h={"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 5})
    with pytest.raises(SpecError, match="headers belong to the I/O layer"):
        from_pyiso8583(custom)


def test_mask_pan():
    assert mask_pan("4111111111111111") == "411111******1111"
    assert mask_pan("4111111111111") == "411111***1111"
    assert mask_pan("5500000000000000004") == "550000*********0004"
    assert mask_pan("123456789") == "*****6789"
    assert mask_pan("1234") == "****"
    assert mask_pan(b"4111111111111111") == b"411111******1111"


def test_log_safe_on_a_base(impl):
    spec = load_spec("moov:spec87ascii", impl=impl)
    fields = {
        0: "0200",
        2: "5500000000000004",
        11: "000001",
        35: "5500000000000004D2512101",
        45: "B5500000000000004^DOE/JOHN^2512101",
        52: b"\x01\x02\x03\x04\x05\x06\x07\x08",
    }
    safe = spec.log_safe(fields)
    assert safe[2] == "550000******0004" and safe[11] == "000001" and safe[0] == "0200"
    assert safe[35] == "550000******0004D*******"
    assert safe[45] == "*550000******0004^" + "*" * 16
    assert safe[52] == b"********"
    assert spec.mask(2, "4111111111111111") == "411111******1111" and spec.mask(11, "1") == "1"


def test_with_impl_and_loaded_spec_passthrough():
    spec = load_spec("moov:spec87ascii")
    assert load_spec(spec) is spec
    pure = load_spec(spec, impl="py")
    assert pure.backend == "pure" and pure.hash == spec.hash
    assert pure.encode({0: "0800", 11: "000001"}) == spec.encode({0: "0800", 11: "000001"})
