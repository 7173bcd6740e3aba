"""Network management on io_iso8583 client legs (issue 17 item 5): sign-on, echo, sign-off.

The issuer hosts here are written with pyiso8583 (an independent implementation, not our codec)
over real loopback sockets: they log every message they get, answer 0800 with 0810/00 (DE 7,
11, 70 echoed) and 0200 with 0210/00, and can be told to stop answering echo tests or sign-ons.
"""

import asyncio
import os
import subprocess
import sys

import iso8583
import pytest
from helpers import free_port, scenario_from_yaml
from iso8583.specs import default_ascii

from fluxrig.errors import ScenarioError
from fluxrig.iso8583 import load_spec
from fluxrig.iso8583.netmgmt import Down, LegNetMgmt, NetMgmtSettings, Send, Up
from fluxrig.runtime import ControlBus, Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 10.0  # seconds any single condition may take on a loaded 2-core box


def frame(doc: dict) -> bytes:
    raw, _ = iso8583.encode(dict(doc), default_ascii)
    return len(raw).to_bytes(2, "big") + bytes(raw)


async def read_frame(reader) -> dict:
    n = int.from_bytes(await reader.readexactly(2), "big")
    doc, _ = iso8583.decode(bytearray(await reader.readexactly(n)), default_ascii)
    return doc


class Host:
    """An issuer host: pyiso8583 default_ascii, 2-byte big-endian length headers."""

    def __init__(self, name: str):
        self.name = name
        self.log: list[tuple] = []  # (loop time, "in"/"out", MTI, DE 70, DE 11)
        self.answer_sign_on = True
        self.answer_echo = True
        self.sign_on_delay = 0.0
        self.connections = 0
        self.server = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)

    async def stop(self) -> None:
        self.server.close()

    def seen(self, mti: str, de70: str | None = None, way: str = "in") -> list[tuple]:
        return [e for e in self.log if e[1] == way and e[2] == mti and (de70 is None or e[3] == de70)]

    async def _handle(self, reader, writer) -> None:
        self.connections += 1
        loop = asyncio.get_running_loop()
        try:
            while True:
                doc = await read_frame(reader)
                self.log.append((loop.time(), "in", doc["t"], doc.get("70"), doc.get("11")))
                if doc["t"] == "0800":
                    code = doc.get("70")
                    if (code == "001" and not self.answer_sign_on) or (code == "301" and not self.answer_echo):
                        continue
                    if code == "001" and self.sign_on_delay:
                        await asyncio.sleep(self.sign_on_delay)
                    reply = {"t": "0810", "7": doc["7"], "11": doc["11"], "39": "00", "70": code}
                elif doc["t"] == "0200":
                    reply = {"t": "0210", **{k: doc[k] for k in ("3", "4", "11", "41") if k in doc}, "39": "00"}
                else:
                    continue
                self.log.append((loop.time(), "out", reply["t"], reply.get("70"), reply.get("11")))
                writer.write(frame(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def until(cond, timeout: float = WAIT, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def leg(name: str, port: int, nm: str) -> str:
    return (
        f"  - name: {name}\n    type: io_iso8583\n    config: {{mode: client, connect: '127.0.0.1:{port}', "
        f"framing: len2_be, idle_timeout: 0s, reconnect_wait: 100ms, reconnect_max: 200ms, "
        f"network_management: {nm}}}\n"
    )


# -- the state machine alone -----------------------------------------------------------------------
def _answer(nm: LegNetMgmt, sent: bytes, code: str = "00", now: float = 0.0):
    doc, _ = iso8583.decode(bytearray(sent), default_ascii)
    raw, _ = iso8583.encode({"t": "0810", "7": doc["7"], "11": doc["11"], "39": code, "70": doc["70"]}, default_ascii)
    return nm.feed(bytes(raw), now)


def test_state_machine_sign_on_echo_failures_sign_off():
    spec = load_spec("moov:spec87ascii")
    s = NetMgmtSettings(echo_interval=10.0, echo_timeout=2.0, echo_max_failures=2)
    nm = LegNetMgmt(s, spec)
    (first,) = nm.connected(0.0)
    assert isinstance(first, Send) and nm.state == "signing_on"
    assert iso8583.decode(bytearray(first.body), default_ascii)[0]["70"] == "001"
    assert nm.tick(1.0) == []  # no echo before the sign-on is answered
    assert _answer(nm, first.body, now=1.0) == [Up()] and nm.state == "up"
    assert nm.feed(frame({"t": "0210", "11": "000001", "39": "00"})[2:], 1.5) is None  # not ours: passed on
    (echo,) = nm.tick(11.0)
    assert iso8583.decode(bytearray(echo.body), default_ascii)[0]["70"] == "301"
    assert _answer(nm, echo.body, "05", 11.5) == []  # one failure: still up
    (echo2,) = nm.tick(21.0)
    assert echo2.body != echo.body  # a new STAN
    assert nm.tick(23.5) == [Down("2 echo tests in a row failed (last: echo not answered in 2s)")]
    assert nm.state == "down" and nm.stats["echoes_failed"] == 2
    # a fresh connection signs on again; a refused sign-on closes it, an unanswered one too
    (again,) = nm.connected(30.0)
    assert _answer(nm, again.body, "91", 30.1) == [Down("sign-on refused (DE 39 '91')")]
    nm.connected(40.0)
    assert nm.tick(42.5) == [Down("sign-on not answered in 2s")]
    (on,) = nm.connected(50.0)
    _answer(nm, on.body, now=50.1)
    off = nm.sign_off(51.0)
    assert iso8583.decode(bytearray(off), default_ascii)[0]["70"] == "002"
    assert nm.sign_off(51.0) is None  # once
    # the host's own echo is answered 0810/00 with DE 7, 11, 70 echoed
    (reply,) = nm.feed(frame({"t": "0800", "7": "1202080000", "11": "424242", "70": "301"})[2:], 52.0)
    back, _ = iso8583.decode(bytearray(reply.body), default_ascii)
    assert (back["t"], back["11"], back["39"], back["70"]) == ("0810", "424242", "00", "301")


# -- a leg against a pyiso8583 host ------------------------------------------------------------------
async def test_sign_on_is_seen_before_any_financial_message_and_sign_off_on_stop():
    host_port, acq_port = free_port(), free_port()
    host = Host("a")
    host.sign_on_delay = 0.5  # the 0200 is written long before the leg is signed on
    await host.start(host_port)
    text = (
        "meta: {version: '1'}\ngears:\n"
        f"  - {{name: acquirer, type: io_iso8583, config: {{mode: server, bind: '127.0.0.1:{acq_port}'}}}}\n"
        + leg("issuer", host_port, "{echo_interval: 0s}")
        + "  - {name: sink, type: sink, config: {mode: 'null'}}\n"
        "wires:\n  - {from: acquirer.out, to: issuer.in}\n  - {from: issuer.out, to: sink.in}\n"
    )
    control = ControlBus()
    events = []
    loop = asyncio.get_running_loop()
    control.subscribe("link.issuer", lambda c: events.append((loop.time(), c["cmd"])))
    rt = Runtime(scenario_from_yaml(text), control=control)
    await rt.start()
    try:
        _r, w = await asyncio.open_connection("127.0.0.1", acq_port)
        w.write(frame({"t": "0200", "3": "000000", "4": "000000001000", "11": "000001", "41": "TERM0001"}))
        await w.drain()
        await until(lambda: host.seen("0200"), what="the 0200 at the host")
        first = next(e for e in host.log if e[1] == "in")
        assert first[2:4] == ("0800", "001"), host.log  # the sign-on comes first
        (answered,) = host.seen("0810", "001", "out")
        assert host.seen("0200")[0][0] >= answered[0]  # traffic waited for the 0810/00
        assert [e for _t, e in events] == ["conn.up"] and events[0][0] >= answered[0]
        assert rt.gears["sink"].counters.messages_in == 1  # the 0210; the 0810 never reached the graph
        w.close()
    finally:
        await rt.shutdown(3)
        await host.stop()
    assert host.seen("0800", "002"), host.log  # signed off before closing


async def test_echo_failures_take_the_leg_down_the_route_fails_over_and_it_comes_back_signed_on():
    pa, pb, acq = free_port(), free_port(), free_port()
    a, b = Host("a"), Host("b")
    await a.start(pa)
    await b.start(pb)
    nm = "{echo_interval: 400ms, echo_timeout: 300ms, echo_max_failures: 2}"
    text = (
        "meta: {version: '1'}\ngears:\n"
        f"  - {{name: acquirer, type: io_iso8583, config: {{mode: server, bind: '127.0.0.1:{acq}'}}}}\n"
        "  - {name: acq_decode, type: codec_iso8583, config: {direction: decode}}\n"
        "  - name: switch\n    type: conductor\n    config:\n      ttl: 5s\n"
        "      routes: [{name: issuer, destination: {failover: [out_a, out_b]}}]\n"
        "  - {name: a_enc, type: codec_iso8583, config: {direction: encode}}\n"
        + leg("issuer_a", pa, nm)
        + "  - {name: a_dec, type: codec_iso8583, config: {direction: decode}}\n"
        "  - {name: b_enc, type: codec_iso8583, config: {direction: encode}}\n"
        + leg("issuer_b", pb, nm)
        + "  - {name: b_dec, type: codec_iso8583, config: {direction: decode}}\n"
        "  - {name: acq_encode, type: codec_iso8583, config: {direction: encode}}\n"
        "  - {name: problems, type: sink, config: {mode: 'null'}}\n"
        "wires:\n"
        "  - {from: acquirer.out, to: acq_decode.in}\n  - {from: acq_decode.out, to: switch.in}\n"
        "  - {from: switch.out_a, to: a_enc.in}\n  - {from: a_enc.out, to: issuer_a.in}\n"
        "  - {from: issuer_a.out, to: a_dec.in}\n  - {from: a_dec.out, to: switch.in_reply}\n"
        "  - {from: switch.out_b, to: b_enc.in}\n  - {from: b_enc.out, to: issuer_b.in}\n"
        "  - {from: issuer_b.out, to: b_dec.in}\n  - {from: b_dec.out, to: switch.in_reply}\n"
        "  - {from: switch.out_response, to: acq_encode.in}\n  - {from: acq_encode.out, to: acquirer.in}\n"
        "  - {from: switch.error, to: problems.in}\n"
    )
    control = ControlBus()
    events = {"issuer_a": [], "issuer_b": []}
    for g, evs in events.items():
        control.subscribe(f"link.{g}", lambda c, evs=evs: evs.append(c["cmd"]))
    rt = Runtime(scenario_from_yaml(text), control=control)
    await rt.start()
    switch = rt.gears["switch"]
    stan = 0

    async def pay(reader, writer) -> dict:
        nonlocal stan
        stan += 1
        writer.write(frame({"t": "0200", "3": "000000", "4": "000000001000", "11": f"{stan:06d}", "41": "TERM0001"}))
        await writer.drain()
        return await asyncio.wait_for(read_frame(reader), WAIT)

    try:
        await until(lambda: switch.metrics()["links_up"] == 2, what="both legs signed on")
        for h in (a, b):
            assert [e[2:4] for e in h.log if e[1] == "in"][0] == ("0800", "001")
        r, w = await asyncio.open_connection("127.0.0.1", acq)
        reply = await pay(r, w)
        assert (reply["t"], reply["39"]) == ("0210", "00") and len(a.seen("0200")) == 1 and not b.seen("0200")

        # echo every interval, on each leg
        await until(lambda: len(a.seen("0800", "301")) >= 3, what="three echoes")
        times = [e[0] for e in a.seen("0800", "301")]
        gaps = [y - x for x, y in zip(times, times[1:])]
        assert all(0.3 <= g <= 2.0 for g in gaps), gaps
        assert b.seen("0800", "301")

        # host A stops answering echoes (and sign-ons, so it stays down): the leg is closed
        a.answer_echo = a.answer_sign_on = False
        await until(lambda: "conn.down" in events["issuer_a"], what="leg A marked down")
        assert rt.gears["issuer_a"].metrics()["echoes_failed"] >= 2
        await until(lambda: a.connections >= 2, what="leg A redialing")
        assert switch.metrics()["links_up"] == 1
        reply = await pay(r, w)
        assert reply["39"] == "00" and len(b.seen("0200")) == 1 and len(a.seen("0200")) == 1  # failed over to B

        # host A answers again: the leg signs on on a new connection and carries traffic again
        a.answer_echo = a.answer_sign_on = True
        await until(lambda: events["issuer_a"].count("conn.up") >= 2, what="leg A signed on again")
        assert switch.metrics()["links_up"] == 2
        ups = a.seen("0810", "001", "out")
        assert len(ups) >= 2
        reply = await pay(r, w)
        assert reply["39"] == "00" and len(a.seen("0200")) == 2 and len(b.seen("0200")) == 1
        assert a.seen("0200")[-1][0] > ups[-1][0]
        w.close()
    finally:
        await rt.shutdown(3)
        await a.stop()
        await b.stop()


async def test_every_member_signs_on_its_own_legs_round_robin():
    """Two members (two runtimes: a group's Racks) with legs to the same two hosts: each member
    signs on each of its legs itself, and its round robin uses only its own signed-on legs."""
    pa, pb = free_port(), free_port()
    a, b = Host("a"), Host("b")
    b.answer_sign_on = False  # B never signs anyone on: no member may route to it
    await a.start(pa)
    await b.start(pb)
    nm = "{echo_interval: 0s, echo_timeout: 300ms}"
    members = []
    for _ in range(2):
        acq = free_port()
        text = (
            "meta: {version: '1'}\ngears:\n"
            f"  - {{name: acquirer, type: io_iso8583, config: {{mode: server, bind: '127.0.0.1:{acq}'}}}}\n"
            "  - {name: acq_decode, type: codec_iso8583, config: {direction: decode}}\n"
            "  - name: switch\n    type: conductor\n    config:\n      ttl: 5s\n"
            "      routes: [{name: issuer, destination: {round_robin: [out_a, out_b]}}]\n"
            "  - {name: a_enc, type: codec_iso8583, config: {direction: encode}}\n"
            + leg("issuer_a", pa, nm)
            + "  - {name: a_dec, type: codec_iso8583, config: {direction: decode}}\n"
            "  - {name: b_enc, type: codec_iso8583, config: {direction: encode}}\n"
            + leg("issuer_b", pb, nm)
            + "  - {name: b_dec, type: codec_iso8583, config: {direction: decode}}\n"
            "  - {name: acq_encode, type: codec_iso8583, config: {direction: encode}}\n"
            "wires:\n"
            "  - {from: acquirer.out, to: acq_decode.in}\n  - {from: acq_decode.out, to: switch.in}\n"
            "  - {from: switch.out_a, to: a_enc.in}\n  - {from: a_enc.out, to: issuer_a.in}\n"
            "  - {from: issuer_a.out, to: a_dec.in}\n  - {from: a_dec.out, to: switch.in_reply}\n"
            "  - {from: switch.out_b, to: b_enc.in}\n  - {from: b_enc.out, to: issuer_b.in}\n"
            "  - {from: issuer_b.out, to: b_dec.in}\n  - {from: b_dec.out, to: switch.in_reply}\n"
            "  - {from: switch.out_response, to: acq_encode.in}\n  - {from: acq_encode.out, to: acquirer.in}\n"
        )
        rt = Runtime(scenario_from_yaml(text), control=ControlBus())
        await rt.start()
        members.append((rt, acq))
    try:
        await until(lambda: len(a.seen("0810", "001", "out")) == 2, what="both members signed on at A")
        await until(lambda: len(b.seen("0800", "001")) >= 2, what="both members tried B")
        assert a.connections >= 2
        for i, (rt, acq) in enumerate(members):
            sw = rt.gears["switch"]
            await until(lambda sw=sw: sw.metrics()["links_up"] == 1, what=f"member {i}: leg A up")  # A on, B never
            r, w = await asyncio.open_connection("127.0.0.1", acq)
            for n in range(4):  # round robin over [A, B]: B is not signed on, so all go to A
                w.write(frame({"t": "0200", "3": "000000", "4": "000000000100", "11": f"{i}{n:05d}", "41": "T0000001"}))
                await w.drain()
                reply = await asyncio.wait_for(read_frame(r), WAIT)
                assert reply["39"] == "00"
            w.close()
        assert len(a.seen("0200")) == 8 and not b.seen("0200")
    finally:
        for rt, _ in members:
            await rt.shutdown(3)
        await a.stop()
        await b.stop()


def _problems(block: str, mode: str = "client") -> str:
    where = "connect: '127.0.0.1:9'" if mode == "client" else "bind: '127.0.0.1:0'"
    text = (
        "meta: {version: '1'}\ngears:\n"
        f"  - {{name: leg, type: io_iso8583, config: {{mode: {mode}, {where}, network_management: {block}}}}}\n"
    )
    with pytest.raises(ScenarioError) as info:
        scenario_from_yaml(text)
    return str(info.value)


@pytest.mark.parametrize(
    "block,key",
    [
        ("{echo_timeout: 0s}", "network_management.echo_timeout"),
        ("{echo_interval: soon}", "network_management.echo_interval"),
        ("{echo_interval: 1s, echo_timeout: 5s}", "network_management.echo_interval"),
        ("{echo_max_failures: 0}", "network_management.echo_max_failures"),
        ("{sign_on: yes_please}", "network_management.sign_on"),
        ("{echo_every: 30s}", "network_management.echo_every"),
        ("{spec: 'moov:nope'}", "network_management.spec"),
        ("{header: xyz}", "network_management.header"),
    ],
)
def test_bad_network_management_config_names_the_key(block, key):
    assert f"config.{key}" in _problems(block)


def test_a_server_leg_does_not_take_network_management():
    text = _problems("{}", mode="server")
    assert "config.network_management" in text and "client" in text


def test_bad_network_management_config_exits_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "meta: {version: '1'}\ngears:\n"
        "  - {name: leg, type: io_iso8583, config: {mode: client, connect: '127.0.0.1:9', "
        "network_management: {echo_timeout: 0s}}}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "scenario", "validate", str(p)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "leg).config.network_management.echo_timeout: must be above 0s" in r.stderr, r.stderr


async def test_our_iso_responder_answers_a_legs_sign_on_and_echoes():
    """The issuer simulator (iso_responder behind our codec) answers 0800 0810/00, DE 70 echoed,
    so a signed-on leg against it stays up."""
    iss = free_port()
    issuer = Runtime(
        scenario_from_yaml(
            "meta: {version: '1'}\ngears:\n"
            f"  - {{name: srv, type: io_iso8583, config: {{mode: server, bind: '127.0.0.1:{iss}'}}}}\n"
            "  - {name: dec, type: codec_iso8583, config: {direction: decode}}\n"
            "  - {name: responder, type: iso_responder, config: {}}\n"
            "  - {name: enc, type: codec_iso8583, config: {direction: encode}}\n"
            "wires:\n  - {from: srv.out, to: dec.in}\n  - {from: dec.out, to: responder.in}\n"
            "  - {from: responder.out, to: enc.in}\n  - {from: enc.out, to: srv.in}\n"
        ),
        control=ControlBus(),
    )
    await issuer.start()
    rt = None
    try:
        # what it answers, read by pyiso8583
        r, w = await asyncio.open_connection("127.0.0.1", iss)
        w.write(frame({"t": "0800", "7": "1202080000", "11": "000777", "70": "001"}))
        await w.drain()
        doc = await asyncio.wait_for(read_frame(r), WAIT)
        assert (doc["t"], doc["11"], doc["39"], doc["70"]) == ("0810", "000777", "00", "001")
        w.close()
        rt = Runtime(
            scenario_from_yaml(
                "meta: {version: '1'}\ngears:\n"
                + leg("issuer", iss, "{echo_interval: 300ms, echo_timeout: 250ms, echo_max_failures: 1}")
                + "  - {name: sink, type: sink, config: {mode: 'null'}}\nwires:\n  - {from: issuer.out, to: sink.in}\n"
            ),
            control=ControlBus(),
        )
        await rt.start()
        g = rt.gears["issuer"]
        await until(lambda: g.metrics()["echoes_answered"] >= 3, what="three echoes answered")
        m = g.metrics()
        assert m["sign_ons_answered"] == 1 and m["echoes_failed"] == 0 and m["links_dropped"] == 0
        assert m["netmgmt_state"] == "up" and rt.gears["sink"].counters.messages_in == 0
    finally:
        if rt is not None:
            await rt.shutdown(3)
        await issuer.shutdown(2)


async def test_a_reload_hands_the_signed_on_leg_over_without_signing_on_again():
    port = free_port()
    host = Host("a")
    await host.start(port)

    def scenario(n: int, interval: str):
        return scenario_from_yaml(
            f"meta: {{version: '{n}'}}\ngears:\n"
            + leg("issuer", port, f"{{echo_interval: {interval}, echo_timeout: 200ms}}")
            + "  - {name: sink, type: sink, config: {mode: 'null'}}\nwires:\n  - {from: issuer.out, to: sink.in}\n"
        )

    control = ControlBus()
    events = []
    control.subscribe("link.issuer", lambda c: events.append(c["cmd"]))
    rt = Runtime(scenario(0, "300ms"), control=control)
    await rt.start()
    try:
        await until(lambda: events == ["conn.up"], what="signed on")
        for n in range(1, 4):
            report = await rt.swap(scenario(n, "250ms" if n % 2 else "300ms"))
            assert report.handover["issuer"]["connections"] == "handover"
            before = len(host.seen("0800", "301"))
            await until(lambda b=before: len(host.seen("0800", "301")) >= b + 2, what=f"echoes after reload {n}")
            assert rt.gears["issuer"].metrics()["netmgmt_state"] == "up"
        assert host.connections == 1 and len(host.seen("0800", "001")) == 1  # never signed on again
        assert not host.seen("0800", "002") and events == ["conn.up"]  # nor off, nor down
    finally:
        await rt.shutdown(3)
        await host.stop()
    assert len(host.seen("0800", "002")) == 1
