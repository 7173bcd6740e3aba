"""Data-plane abuse on the TCP server gears (issue 13 item 5): finite default timeouts
(slowloris), a per-source-IP connection cap, log lines rate-limited per connection and gear
with an "N suppressed" summary, PAN masked in the raw bytes of an ISO 8583 frame a sink logs
before any codec decoded it, and card numbers masked in any log text. Real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import logging

from helpers import free_port, running

from fluxrig.iso8583.masking import luhn_valid, mask_card_numbers
from fluxrig.msg import FluxMsg
from fluxrig.net import tcp as T
from fluxrig.redact import log_view
from fluxrig.wire import meta as M


def echo(port, extra=""):
    return f"""
meta: {{version: '1'}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}", delimiter_append: true{extra}}}
  - name: sink
    type: sink
    config: {{mode: "null"}}
wires:
  - {{from: gw.out, to: sink.in}}
"""


async def test_io_tcp_timeouts_are_finite_by_default():
    port = free_port()
    async with running(echo(port)) as rt:
        ep = rt.gears["gw"].endpoint
        assert ep.read_timeout == 30.0 and ep.idle_timeout == 300.0
        assert ep.max_connections_per_ip == 64


async def test_slowloris_trickle_is_closed_by_the_read_timeout():
    port = free_port()
    async with running(echo(port, ", read_timeout: 400ms, idle_timeout: 5m")) as rt:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        closed = False
        for _ in range(40):  # one byte every 100 ms, never a newline
            try:
                w.write(b"x")
                await w.drain()
            except (ConnectionError, OSError):
                closed = True
                break
            try:
                if await asyncio.wait_for(r.read(1), 0.1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and loop.time() - start < 2.5
        assert rt.gears["gw"].endpoint.counters["idle_closed"] == 1
        w.close()


async def test_per_ip_cap():
    port = free_port()
    async with running(echo(port, ", max_connections_per_ip: 2")) as rt:
        a = await asyncio.open_connection("127.0.0.1", port)
        b = await asyncio.open_connection("127.0.0.1", port)
        c_r, c_w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(c_r.read(), 3) == b""  # the third one is closed at once
        ep = rt.gears["gw"].endpoint
        assert ep.counters["connections_rejected_per_ip"] == 1 and len(ep.connections) == 2
        a[1].close()
        await asyncio.sleep(0.2)
        d_r, d_w = await asyncio.open_connection("127.0.0.1", port)
        d_w.write(b"ok\n")
        await d_w.drain()
        await asyncio.sleep(0.2)
        assert len(ep.connections) == 2 and ep.per_ip == {"127.0.0.1": 2}
        for w in (b[1], c_w, d_w):
            w.close()


async def test_refusal_logs_are_rate_limited_with_a_suppressed_summary(caplog, monkeypatch):
    monkeypatch.setattr(T, "LOG_WINDOW", 0.5)
    port = free_port()
    with caplog.at_level(logging.INFO):
        async with running(echo(port, ", max_connections_per_ip: 1, idle_timeout: 100ms")) as rt:
            keep = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(120):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
            await asyncio.sleep(0.3)
            ep = rt.gears["gw"].endpoint
            assert ep.counters["connections_rejected_per_ip"] >= 50  # some close before the accept
            await asyncio.sleep(0.8)  # the window closes; the sweep reports what it held back
            keep[1].close()
    refusals = [r for r in caplog.records if "refusing connection" in r.getMessage()]
    assert len(refusals) <= T.LOG_BURST_PER_CONN + 1
    assert "suppressed" in caplog.text
    assert ep.metrics()["log_lines_suppressed"] >= 40


def iso_sink(port, path):
    return f"""
meta: {{version: '1'}}
gears:
  - name: acq
    type: io_iso8583
    config: {{mode: server, bind: "127.0.0.1:{port}"}}
  - name: tap
    type: sink
    config: {{mode: file, path: "{path}"}}
wires:
  - {{from: acq.out, to: tap.in}}
"""


async def test_pan_masked_in_raw_before_any_codec(tmp_path):
    from fluxrig.iso8583 import load_spec

    spec = load_spec("moov:spec87ascii")
    frame = spec.encode({0: "0200", 2: "4111111111111111", 3: "000000", 11: "000001"})
    port = free_port()
    out = tmp_path / "tap.jsonl"
    async with running(iso_sink(port, out)):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(len(frame).to_bytes(2, "big") + frame)
        await w.drain()
        for _ in range(50):
            if out.exists() and out.read_text().strip():
                break
            await asyncio.sleep(0.05)
        w.close()
    text = out.read_text()
    assert "4111111111111111" not in text and "411111" not in text
    assert "masked until a codec decodes them" in json.loads(text.splitlines()[0])["raw"]


def test_log_view_masks_card_numbers_in_other_raw_and_data():
    msg = FluxMsg(raw=b"PAN=4111111111111111;", meta={M.SOURCE: "io_tcp"}, data={"note": "card 5500005555555559"})
    view = log_view(msg)
    assert view["raw"] == "PAN=411111******1111;"
    assert view["data"]["note"] == "card 550000******5559"


def test_card_numbers_masked_in_log_text(caplog):
    not_a_card = "12345678901234"
    assert not luhn_valid(not_a_card) and luhn_valid("4111111111111111")
    with caplog.at_level(logging.WARNING):
        logging.getLogger("fluxrig.test").warning("declined %s ref %s stan 123456", "4111111111111111", not_a_card)
    line = caplog.records[-1].getMessage()
    assert line == f"declined 411111******1111 ref {not_a_card} stan 123456"
    # a run inside a longer digit string (a timestamp with a card-looking tail) is left alone
    assert mask_card_numbers("x" + "9" * 25 + "x") == "x" + "9" * 25 + "x"


async def test_bad_frame_logs_are_rate_limited_per_connection_with_a_suppressed_count(caplog):
    """A peer sending garbage frames provokes one decode-error line each: at most the burst per
    connection gets through in a window, the rest are counted; another connection has a burst
    of its own."""
    port = free_port()
    scenario = f"""
meta: {{version: '1'}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}", framing: length_prefix2}}
  - name: dec
    type: codec_iso8583
    config: {{spec: "moov:spec87ascii", direction: decode, on_error: drop}}
  - name: sink
    type: sink
    config: {{mode: "null"}}
wires:
  - {{from: gw.out, to: dec.in}}
  - {{from: dec.out, to: sink.in}}
"""
    junk = b"\x00\x10" + b"ZZZZ-not-iso8583"  # a whole frame, not an ISO 8583 message

    async def flood(n: int, dec) -> None:
        before = dec.counters.dropped
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(junk * n)
        await w.drain()
        for _ in range(200):
            if dec.counters.dropped >= before + n:
                break
            await asyncio.sleep(0.02)
        assert dec.counters.dropped == before + n
        w.close()

    with caplog.at_level(logging.WARNING):
        async with running(scenario) as rt:
            dec = rt.gears["dec"]
            await flood(100, dec)
            first = [r.getMessage() for r in caplog.records if "decode_error" in r.getMessage()]
            await flood(10, dec)
    lines = [r.getMessage() for r in caplog.records if "decode_error" in r.getMessage()]
    burst = dec._limiter.burst
    assert len(first) == burst, first  # 100 bad frames, 5 lines
    assert len(lines) == 2 * burst, lines  # the second connection: 5 more
    assert dec._limiter.suppressed_total == 110 - 2 * burst  # every line not written is counted
