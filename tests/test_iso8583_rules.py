"""Spec rules enforced (fluxrig.iso8583.rules, codec_iso8583 `validation`, iso_responder 30):
per-MTI mandatory / conditional / forbidden fields, `unlisted: forbidden`, `when`, closed value
sets, PAN format, named value checks and asserts; load-time errors with positions; the
authorizer scenario with strict validation answering 30 to a request that breaks the spec,
driven by pyiso8583 (an independent client)."""

from __future__ import annotations

import asyncio
import copy
import logging

import iso8583
import pytest
from helpers import free_port, running
from iso8583.specs import default_ascii

from fluxrig.iso8583 import SpecError, load_spec
from fluxrig.iso8583.rules import ExprError, compile_expr, luhn_ok

DOC = {
    "spec": {
        "id": "acme-auth",
        "name": "ACME",
        "version": "1.0.0",
        "wire": {"source": "moov:spec87ascii"},
        "messages": {
            "catalog": {
                "0100": {"flow": "request", "pairs_with": "0110"},
                "0110": {"flow": "response"},
                "0200": {"flow": "request", "pairs_with": "0210"},
                "0210": {"flow": "response"},
                "0800": {"flow": "request", "class": "network", "pairs_with": "0810"},
                "0810": {"flow": "response", "class": "network"},
            }
        },
        "enums": {"pos_condition": {"closed": True, "values": {"00": {"name": "normal"}, "08": {"name": "mail"}}}},
        "fields": {
            "2": {
                "alias": "card.pan",
                "format": {"kind": "pan"},
                "messages": [{"mti": ["0100", "0200"], "usage": "mandatory"}, {"mti": "0800", "usage": "forbidden"}],
            },
            "3": {"messages": [{"mti": ["0100", "0200"], "usage": "mandatory"}]},
            "4": {"messages": [{"mti": ["0100", "0200"], "usage": "mandatory"}]},
            "11": {"messages": [{"mti": ["01xx", "02xx", "08xx"], "usage": "mandatory"}]},
            "14": {
                "messages": [
                    {"mti": "0100", "usage": "mandatory", "when": 'field(22) == "012" || field(22) == "010"'},
                    {"mti": "0100", "usage": "optional"},
                ]
            },
            "22": {"messages": [{"mti": ["0100", "0200"], "usage": "optional"}]},
            "25": {"values_ref": "pos_condition", "messages": [{"mti": ["0100", "0200"], "usage": "optional"}]},
            "39": {"messages": [{"mti": ["0110", "0210", "0810"], "usage": "mandatory"}]},
            "41": {"messages": [{"mti": ["01xx", "02xx", "08xx"], "usage": "optional"}]},
            "70": {"messages": [{"mti": "0800", "usage": "mandatory"}]},
        },
        "validation_policy": {"unlisted": "forbidden"},
        "checks": [
            {"name": "amount_range", "mti": ["0100", "0200"], "field": 4, "min": 1, "max": 500000},
            {"name": "terminal_charset", "field": 41, "charset": "alnum", "severity": "warn"},
            {"name": "echo_code", "mti": "0800", "assert": 'field(70) == "301" || field(70) == "001"'},
        ],
    }
}

GOOD_0100 = {0: "0100", 2: "4111111111111111", 3: "000000", 4: "000000010000", 11: "000001", 41: "TERM0001"}


def rules_of(doc=DOC):
    return load_spec(copy.deepcopy(doc)).rules


def names(violations):
    return sorted((v.rule, v.field) for v in violations)


def test_a_valid_message_has_no_violations():
    assert rules_of().check(GOOD_0100) == []
    assert rules_of().check({0: "0800", 11: "000001", 70: "301"}) == []


def test_mandatory_forbidden_and_unlisted_per_mti():
    r = rules_of()
    m = dict(GOOD_0100)
    del m[2]
    assert names(r.check(m)) == [("usage.mandatory", 2)]
    assert names(r.check({0: "0800", 2: "4111111111111111", 11: "1", 70: "301"})) == [("usage.forbidden", 2)]
    # DE 48 is listed for no MTI: unlisted forbidden
    assert names(r.check({**GOOD_0100, 48: "x"})) == [("usage.unlisted", 48)]
    # DE 39 is listed, but not for 0100
    assert names(r.check({**GOOD_0100, 39: "00"})) == [("usage.unlisted", 39)]
    assert names(r.check({0: "0110", 11: "000001"})) == [("usage.mandatory", 39)]


def test_conditional_mandatory_with_when():
    r = rules_of()
    chip = {**GOOD_0100, 22: "012"}
    assert names(r.check(chip)) == [("usage.mandatory", 14)]
    assert r.check({**chip, 14: "2512"}) == []
    assert r.check({**GOOD_0100, 22: "051"}) == []  # the default entry: optional


def test_values_pan_and_checks():
    r = rules_of()
    assert names(r.check({**GOOD_0100, 25: "99"})) == [("values.pos_condition", 25)]
    assert names(r.check({**GOOD_0100, 2: "4111111111111112"})) == [("pan", 2)]
    assert names(r.check({**GOOD_0100, 4: "000000000000"})) == [("amount_range", 4)]
    v = r.check({**GOOD_0100, 41: "TERM-01 "})
    assert names(v) == [("terminal_charset", 41)] and v[0].severity == "warn"
    assert names(r.check({0: "0800", 11: "1", 70: "999"})) == [("echo_code", None)]
    assert all("4111" not in str(x) for x in r.check({**GOOD_0100, 2: "4111111111111112"}))  # never the value


def test_expressions():
    fn, refs = compile_expr('present(55.9F02) && len(field(2)) >= 13 && luhn(field(2)) && mti == "0100"')
    assert refs == [55, 2, 2]
    assert fn({2: "4111111111111111", 55: {"9F02": "000000001000"}}, "0100")
    assert not fn({2: "4111111111111111", 55: {"82": b"\x19\x80"}}, "0100")
    num, _ = compile_expr("field(4) > 100000")
    assert num({4: "000000200000"}, "0200") and not num({4: "000000050000"}, "0200")
    s, _ = compile_expr('!(field(41) == "T1") && matches(field(42), "M[0-9]+")')
    assert s({41: "T2", 42: "M42"}, "") and not s({41: "T1", 42: "M42"}, "")
    with pytest.raises(ExprError) as ei:
        compile_expr('field(2) == "x" &&', {2})
    assert ei.value.pos == len('field(2) == "x" &&')
    with pytest.raises(ExprError, match="field 9 is not declared"):
        compile_expr("present(9)", {2})
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")


def test_load_time_problems_are_listed_with_the_rule():
    doc = copy.deepcopy(DOC)
    f = doc["spec"]["fields"]
    f["14"]["messages"][0]["when"] = "field(22) === 1"
    f["3"]["messages"][0]["usage"] = "required"
    f["4"]["messages"].append({"mti": "0300", "usage": "mandatory"})
    doc["spec"]["checks"].append({"name": "bad", "field": 193, "min": 1})
    doc["spec"]["validation_policy"] = {"unlisted": "nope"}
    with pytest.raises(SpecError) as ei:
        load_spec(doc)
    text = "\n".join(ei.value.problems)
    assert "spec.fields.14.messages[0].when: at " in text
    assert "spec.fields.3.messages[0].usage: 'required'" in text
    assert "spec.fields.4.messages[1].mti: '0300' is not in spec.messages.catalog" in text
    assert "spec.checks[3].field" in text
    assert "spec.validation_policy.unlisted" in text


# -- the gear and the authorizer --------------------------------------------------------------

SPEC_ASCII = copy.deepcopy(default_ascii)


def authorizer(port, spec_path, validation="strict"):
    return f"""
meta: {{version: '1'}}
gears:
  - name: acquirer
    type: io_iso8583
    config: {{mode: server, bind: "127.0.0.1:{port}"}}
  - name: decode
    type: codec_iso8583
    config: {{spec: "{spec_path}", direction: decode, validation: {validation}}}
  - name: authorizer
    type: iso_responder
    config: {{echo_fields: [2, 3, 4, 11, 41]}}
  - name: encode
    type: codec_iso8583
    config: {{spec: "moov:spec87ascii", direction: encode, validation: off}}
wires:
  - {{from: acquirer.out, to: decode.in}}
  - {{from: decode.out, to: authorizer.in}}
  - {{from: decode.error, to: authorizer.in}}
  - {{from: authorizer.out, to: encode.in}}
  - {{from: encode.out, to: acquirer.in}}
"""


def frame(doc):
    raw, _ = iso8583.encode(dict(doc), SPEC_ASCII)
    return len(raw).to_bytes(2, "big") + bytes(raw)


async def exchange(port, docs):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"".join(frame(d) for d in docs))
    out = []
    for _ in docs:
        n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 5), "big")
        out.append(iso8583.decode(await r.readexactly(n), SPEC_ASCII)[0])
    w.close()
    return out


@pytest.fixture
def spec_file(tmp_path):
    import yaml

    p = tmp_path / "acme.yaml"
    p.write_text(yaml.safe_dump(DOC))
    return str(p)


GOOD = {"t": "0100", "2": "4111111111111111", "3": "000000", "4": "000000010000", "11": "000001", "41": "TERM0001"}


async def test_authorizer_answers_30_to_a_request_failing_strict_validation(spec_file, caplog):
    port = free_port()
    no_pan = {k: v for k, v in GOOD.items() if k != "2"}
    bad_luhn = {**GOOD, "2": "4111111111111112", "11": "000003"}
    with caplog.at_level(logging.WARNING):
        async with running(authorizer(port, spec_file)) as rt:
            ok, missing, luhn = await exchange(port, [GOOD, {**no_pan, "11": "000002"}, bad_luhn])
            m = rt.gears["decode"].metrics()
    assert (ok["t"], ok["39"]) == ("0110", "00") and "38" in ok
    assert (missing["t"], missing["39"], missing["11"]) == ("0110", "30", "000002") and "38" not in missing
    assert luhn["39"] == "30"
    assert m["rejected_invalid"] == 2 and m["violations"] == 2
    assert "usage.mandatory (field 2)" in caplog.text
    assert "4111111111111112" not in caplog.text


async def test_warn_mode_passes_and_marks_the_message(spec_file):
    port = free_port()
    async with running(authorizer(port, spec_file, validation="warn")) as rt:
        (resp,) = await exchange(port, [{k: v for k, v in GOOD.items() if k != "2"}])
        assert resp["39"] == "00"
        assert rt.gears["decode"].metrics()["violations"] == 1
        assert rt.gears["decode"].metrics()["rejected_invalid"] == 0


async def test_off_mode_runs_no_rule(spec_file):
    port = free_port()
    async with running(authorizer(port, spec_file, validation="off")) as rt:
        (resp,) = await exchange(port, [{k: v for k, v in GOOD.items() if k != "2"}])
        assert resp["39"] == "00"
        assert rt.gears["decode"].metrics()["violations"] == 0
