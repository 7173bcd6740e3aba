"""The authorizer scenario end to end, driven by pyiso8583 (an independent implementation)."""

import asyncio
import copy

import iso8583
import pytest
from helpers import ROOT, free_port, running
from iso8583.specs import default_ascii

from fluxrig.gears.iso_responder import response_mti
from fluxrig.iso8583 import load_spec

SPEC = copy.deepcopy(default_ascii)


def authorizer_text(port: int) -> str:
    with open(f"{ROOT}/scenarios/iso8583-authorizer.yaml") as fh:
        return fh.read().replace("${FLUXRIG_ISO_BIND:-0.0.0.0:8583}", f"127.0.0.1:{port}")


def request(mti: str, stan: str, **fields) -> bytes:
    doc = {"t": mti, "7": "1127120000", "11": stan, "41": "TERM0001"}
    if mti[1] != "8":
        doc.update(
            {
                "2": "4111111111111111",
                "3": "000000",
                "4": "000000010000",
                "12": "120000",
                "13": "1127",
                "37": "RRN000000001",
                "42": "MERCHANT0000001",
                "49": "978",
            }
        )
    doc.update(fields)
    raw, _ = iso8583.encode(doc, SPEC)
    return len(raw).to_bytes(2, "big") + bytes(raw)


async def exchange(port: int, frames: list[bytes]) -> list[dict]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"".join(frames))
    out = []
    for _ in frames:
        n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 5), "big")
        doc, _ = iso8583.decode(await r.readexactly(n), SPEC)
        out.append(doc)
    w.close()
    return out


async def test_0800_and_0200_answered_by_an_independent_client():
    port = free_port()
    async with running(authorizer_text(port)):
        net, ok, big, bad_pan = await exchange(
            port,
            [
                request("0800", "000001", **{"70": "301"}),
                request("0200", "000002"),
                request("0200", "000003", **{"4": "000000500000"}),
                request("0200", "000004", **{"2": "9991234567890"}),
            ],
        )
        assert net["t"] == "0810" and net["39"] == "00" and net["11"] == "000001" and net["70"] == "301"
        assert ok["t"] == "0210" and ok["39"] == "00" and ok["11"] == "000002" and len(ok["38"]) == 6
        assert ok["2"] == "4111111111111111" and ok["4"] == "000000010000" and ok["41"] == "TERM0001"
        assert big["39"] == "51" and "38" not in big
        assert bad_pan["39"] == "14"


async def test_pipelined_requests_all_matched_by_stan():
    port = free_port()
    async with running(authorizer_text(port)):
        frames = [request("0200", "%06d" % i) for i in range(1, 501)]
        replies = await exchange(port, frames)
        assert [r["11"] for r in replies] == ["%06d" % i for i in range(1, 501)]


async def test_malformed_iso_is_killed_not_hung(caplog):
    port = free_port()
    async with running(authorizer_text(port)) as rt:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        body = b"0200" + bytes.fromhex("7000000000000000") + b"16411111111111111100"  # DE 4 truncated
        w.write(len(body).to_bytes(2, "big") + body)
        assert await asyncio.wait_for(r.read(), 5) == b""  # on_error: kill closes the peer
        assert rt.gears["decode"].counters.errors == 1
        assert "4111111111111111" not in caplog.text
        # a healthy peer is still served
        (ok,) = await exchange(port, [request("0200", "000009")])
        assert ok["39"] == "00"


def test_response_mti():
    assert [response_mti(m) for m in ("0100", "0200", "0220", "0800", "0400")] == [
        "0110",
        "0210",
        "0230",
        "0810",
        "0410",
    ]
    with pytest.raises(Exception, match="already a response"):
        response_mti("0210")


def test_spec_round_trip_matches_pyiso8583():
    spec = load_spec("moov:spec87ascii")
    frame = request("0200", "000123")[2:]
    ours = spec.decode(frame)
    theirs, _ = iso8583.decode(frame, SPEC)
    assert ours[0] == theirs["t"] and ours[11] == theirs["11"] and ours[2] == theirs["2"]
    assert spec.encode(ours) == frame


async def test_logged_messages_never_show_the_pan(caplog, tmp_path):
    import logging

    caplog.set_level(logging.INFO)
    port = free_port()
    out = tmp_path / "audit.jsonl"
    text = (
        authorizer_text(port).replace(
            "wires:",
            f"  - {{name: audit, type: sink, config: {{mode: log}}}}\n"
            f"  - {{name: file, type: sink, config: {{mode: file, path: '{out}'}}}}\nwires:",
        )
        + "  - {from: decode.out, to: audit.in}\n  - {from: decode.out, to: file.in}\n"
    )
    async with running(text):
        (ok,) = await exchange(port, [request("0200", "000001", **{"35": "4111111111111111=25121010000012300000"})])
        assert ok["39"] == "00"
    logged = caplog.text + out.read_text()
    assert "4111111111111111" not in logged
    assert "411111******1111" in logged
    assert "bytes, masked>" in logged
