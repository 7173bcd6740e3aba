"""The switch scenario end to end: acquirer -> conductor -> issuer hosts (the authorizer), with
failover, a host that never answers, late replies and retransmissions."""

import asyncio
import tempfile

import iso8583
from helpers import ROOT, free_port, running
from test_iso_authorizer import SPEC, authorizer_text, exchange, request

from fluxrig.gears.conductor import mti_class


def switch_text(port, a, b, ttl="10s", saga_dir=None, backoff="1s"):
    with open(f"{ROOT}/scenarios/iso8583-switch.yaml") as fh:
        text = fh.read()
    return (
        text.replace("${FLUXRIG_ISO_BIND:-0.0.0.0:8583}", f"127.0.0.1:{port}")
        .replace("${FLUXRIG_ISSUER_A:-127.0.0.1:8590}", f"127.0.0.1:{a}")
        .replace("${FLUXRIG_ISSUER_B:-127.0.0.1:8591}", f"127.0.0.1:{b}")
        .replace("${FLUXRIG_SWITCH_TTL:-10s}", ttl)
        .replace("${FLUXRIG_SAGA_DIR:-}", saga_dir or tempfile.mkdtemp(prefix="fluxrig-saga-"))
        .replace("${FLUXRIG_SAF_BACKOFF:-1s}", backoff)
        .replace("reconnect_wait", "reconnect_wait")
    )


async def wait_links(rt, n):
    for _ in range(300):
        if rt.gears["switch"].metrics()["links_up"] >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("issuer links did not come up")


async def test_switch_routes_to_the_authorizer_and_back():
    port, a, b = free_port(), free_port(), free_port()
    async with running(authorizer_text(a)) as host, running(switch_text(port, a, b)) as sw:
        await wait_links(sw, 1)
        frames = [request("0200", "%06d" % i) for i in range(1, 201)] + [request("0800", "000999", **{"70": "301"})]
        replies = await exchange(port, frames)
        # Replies are matched by key, not by position: an 0810 (never journaled) may overtake
        # 0210s whose tickets are being closed on disk.
        assert sorted(r["11"] for r in replies) == ["%06d" % i for i in range(1, 201)] + ["000999"]
        assert all(r["39"] == "00" for r in replies)
        assert {r["11"]: r["t"] for r in replies}["000999"] == "0810"
        assert sw.gears["switch"].stats["matched"] == 201
        assert host.gears["authorizer"].counters.messages_in == 201


async def test_failover_to_the_second_issuer():
    port, a, b = free_port(), free_port(), free_port()
    async with running(authorizer_text(b)) as host_b, running(switch_text(port, a, b)) as sw:
        await wait_links(sw, 1)  # only B listens
        (r,) = await exchange(port, [request("0200", "000001")])
        assert r["39"] == "00"
        assert host_b.gears["authorizer"].counters.messages_in == 1


async def test_host_that_never_answers_gets_a_91_decline():
    port, a, b = free_port(), free_port(), free_port()
    silent_conns = []

    async def silent(reader, writer):
        silent_conns.append(writer)
        await reader.read()  # swallow everything, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", a)
    try:
        async with running(switch_text(port, a, b, ttl="300ms")) as sw:
            await wait_links(sw, 1)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            (r,) = await exchange(port, [request("0200", "000042")])
            assert r["t"] == "0210" and r["39"] == "91" and r["11"] == "000042"
            assert 0.25 < loop.time() - t0 < 3
            assert sw.gears["switch"].stats["timeouts"] == 1
    finally:
        server.close()


async def test_no_destination_when_every_link_is_down():
    port, a, b = free_port(), free_port(), free_port()
    async with running(switch_text(port, a, b)) as sw:
        (r,) = await exchange(port, [request("0200", "000007")])
        assert r["39"] == "91"
        assert sw.gears["switch"].metrics()["links_up"] == 0


async def test_retransmission_absorbed_and_late_reply_unmatched():
    port, a, b = free_port(), free_port(), free_port()
    got_requests = []
    host_writers = []

    async def slow_host(reader, writer):
        host_writers.append(writer)
        while True:
            hdr = await reader.readexactly(2)
            body = await reader.readexactly(int.from_bytes(hdr, "big"))
            got_requests.append(body)

    server = await asyncio.start_server(slow_host, "127.0.0.1", a)
    try:
        async with running(switch_text(port, a, b, ttl="2s")) as sw:
            await wait_links(sw, 1)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            req = request("0200", "000100")
            w.write(req + req)  # the terminal retransmits before any answer
            for _ in range(100):
                if got_requests:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            assert len(got_requests) == 1  # the duplicate was absorbed, not forwarded
            assert sw.gears["switch"].stats["absorbed"] == 1
            doc, _ = iso8583.decode(got_requests[0], SPEC)
            doc["t"] = "0210"
            doc["39"] = "00"
            raw, _ = iso8583.encode(doc, SPEC)
            host_writers[0].write(len(raw).to_bytes(2, "big") + bytes(raw))
            n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 3), "big")
            reply, _ = iso8583.decode(await r.readexactly(n), SPEC)
            assert reply["t"] == "0210" and reply["11"] == "000100"
            # the same reply again is late: unmatched, never delivered twice
            host_writers[0].write(len(raw).to_bytes(2, "big") + bytes(raw))
            for _ in range(100):
                if sw.gears["switch"].stats["unmatched"]:
                    break
                await asyncio.sleep(0.02)
            assert sw.gears["switch"].stats["unmatched"] == 1
            # a retransmission after the answer is answered from the retained reply
            w.write(req)
            n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 3), "big")
            again, _ = iso8583.decode(await r.readexactly(n), SPEC)
            assert again["11"] == "000100" and sw.gears["switch"].stats["replayed"] == 1
            assert len(got_requests) == 1
            w.close()
    finally:
        server.close()


def test_mti_class():
    assert mti_class("0200") == mti_class("0210") == "0200"
    assert mti_class("0220") == mti_class("0230") == "0220"
    assert mti_class("0800") == mti_class("0810")
