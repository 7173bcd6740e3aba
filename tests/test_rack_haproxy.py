"""A Rack group behind HAProxy (issue 17 item 6): the balancer health endpoint (sans-IO units and
a live server), the documented configuration (the shipped example is what `haproxy_config`
renders, and `haproxy -c` accepts it), and the configuration live: a real Mixer, three Rack
processes enrolled in group `pos`, Debian's haproxy in front. Connections spread over the
members; SIGKILL one: new connections are still served, none fails, and the balancer marks it
down; suspend one: it answers 503 on /health/pos, leaves the rotation, and comes back when
activated."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest
from cluster_group import HAPROXY, Haproxy, RackProcess, http_get, line_roundtrip
from mixer_fixtures import make_mixer, snake_toml, wait_for

from fluxrig.balancer import (
    MAX_REQUEST_BYTES,
    BalancerHealth,
    HaproxyMember,
    answer,
    haproxy_config,
    parse_listen,
    parse_request,
    ready,
)
from fluxrig.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "systemd", "haproxy-fluxrig-group.cfg.example")

RUNNING = {"status": "running", "name": "pos-1", "rack_status": "active", "groups": ["pos"], "gears": 2,
           "scenario_version": "1@abc"}  # fmt: skip

POS_ECHO = """
meta: {name: pos-echo, version: "1"}
racks:
  - {group: pos, match: {labels: {role: pos}}}
gears:
  - {name: gateway, type: io_tcp, deploy: pos,
     config: {mode: server, bind: "${POS_BIND:-127.0.0.1:9000}", framing: delimiter, delimiter_append: true}}
  - {name: tag, type: map, deploy: pos, config: {ops: [{set: raw, value: "${MEMBER:-x}:{{ raw }}"}]}}
wires:
  - {from: gateway.out, to: tag.in}
  - {from: tag.out, to: gateway.in}
"""


# -- the endpoint, sans-IO -------------------------------------------------------------------------


def test_ready_rule():
    assert ready(RUNNING) == (True, "")
    assert ready(RUNNING, "pos") == (True, "")
    assert ready(RUNNING, "atm") == (False, "not a member of group atm")
    for status in ("starting", "stopping", "killed"):
        assert ready(dict(RUNNING, status=status))[0] is False
    assert ready(dict(RUNNING, rack_status="suspended")) == (False, "rack status is suspended")
    assert ready(dict(RUNNING, rack_status="offline"))[0] is True  # cut off from the Mixer: still serves
    assert ready(dict(RUNNING, rack_status=None))[0] is True  # standalone
    # cut off from the group's saga stream: it declines reversible requests, send them elsewhere
    cut = dict(RUNNING, unshared_groups=["pos"])
    assert ready(cut, "pos") == (False, "group pos's saga stream is unreachable: reversible requests are declined here")
    assert ready(cut) == (True, "")


def test_requests_and_answers():
    assert parse_request(b"GET /health HTTP/1.0\r\n\r\n") == (0, "GET", "/health")
    assert parse_request(b"HEAD /health/pos HTTP/1.1\r\nHost: x\r\n\r\n") == (0, "HEAD", "/health/pos")
    assert parse_request(b"POST /health HTTP/1.0\r\n\r\n")[0] == 405
    assert parse_request(b"\x16\x03\x01garbage")[0] == 400
    assert parse_request(b"")[0] == 400
    status, data = answer(RUNNING, "GET", "/health/pos")
    head, _, body = data.partition(b"\r\n\r\n")
    assert status == 200 and head.startswith(b"HTTP/1.0 200 OK")
    doc = json.loads(body)
    assert doc["ok"] is True and doc["groups"] == ["pos"] and "passport" not in doc
    status, data = answer(dict(RUNNING, rack_status="suspended"), "GET", "/health/pos")
    assert status == 503 and json.loads(data.partition(b"\r\n\r\n")[2])["reason"] == "rack status is suspended"
    assert answer(RUNNING, "GET", "/metrics")[0] == 404
    assert answer(RUNNING, "GET", "/health/" + "a" * 65)[0] == 404
    assert answer(RUNNING, "HEAD", "/health")[1].endswith(b"\r\n\r\n")
    # Bounded: nothing but the listed fields, whatever the snapshot holds.
    _, data = answer(dict(RUNNING, secret="s3cr3t", groups=[f"g{i}" for i in range(100)]), "GET", "/health")
    assert b"s3cr3t" not in data and len(data) < 1024


def test_listen_parsing():
    assert parse_listen("") is None
    assert parse_listen("0.0.0.0:8591") == ("0.0.0.0", 8591)
    assert parse_listen(":0") == ("0.0.0.0", 0)
    assert parse_listen("[::1]:8591") == ("::1", 8591)
    for bad in ("8591", "host:", "host:99999", "host:x"):
        with pytest.raises(ConfigError) as exc:
            parse_listen(bad)
        assert exc.value.key == "rack.health_listen"


async def test_the_endpoint_answers_over_tcp_and_bounds_requests():
    state = {"snap": dict(RUNNING)}
    server = BalancerHealth("127.0.0.1", 0, lambda: state["snap"], timeout=0.5)
    assert await server.start()
    try:
        assert (await http_get(server.port, "/health/pos"))[0] == 200
        state["snap"] = dict(RUNNING, status="stopping")
        status, body = await http_get(server.port, "/health/pos")
        assert status == 503 and json.loads(body)["reason"] == "rack is stopping"
        # An oversized request head gets 400, a silent client is dropped within the timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /" + b"a" * (MAX_REQUEST_BYTES * 2))
        data = await asyncio.wait_for(reader.read(), 2)
        assert data.startswith(b"HTTP/1.0 400")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert time.monotonic() - t0 < 2
        writer.close()
    finally:
        await server.close()


# -- the documented configuration --------------------------------------------------------------------


def _example_members():
    return [HaproxyMember(f"pos-{i}", f"10.0.0.1{i}", 8583, 8591) for i in (1, 2, 3)]


def test_the_shipped_example_is_what_haproxy_config_renders():
    with open(EXAMPLE, encoding="utf-8") as fh:
        text = fh.read()
    rendered = haproxy_config("pos", "0.0.0.0:8583", _example_members(), stats_socket="/run/haproxy/fluxrig-pos.sock")
    body = text[text.index("# fluxrig Rack group behind HAProxy") :]
    assert body == rendered


def test_cli_prints_the_configuration_and_refuses_bad_input(tmp_path):
    import sys

    args = [sys.executable, "-m", "fluxrig.cli.main", "haproxy-config", "--group", "pos", "--bind", "0.0.0.0:8583"]
    members = [f"--member=pos-{i}=10.0.0.1{i}:8583,8591" for i in (1, 2, 3)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    ok = subprocess.run(args + members + ["--stats-socket", "/run/haproxy/fluxrig-pos.sock"], capture_output=True,
                        text=True, timeout=60, env=env, cwd=ROOT)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == haproxy_config("pos", "0.0.0.0:8583", _example_members(),
                                       stats_socket="/run/haproxy/fluxrig-pos.sock")  # fmt: skip
    base = [sys.executable, "-m", "fluxrig.cli.main", "haproxy-config"]
    one = "--member=pos-1=10.0.0.11:8583,8591"
    cases = (
        (["--group=pos", "--bind=0.0.0.0:8583", "--member=pos-1=10.0.0.11:8583"], "--member"),
        (["--group=pos", "--bind=8583", one], "--bind"),
        (["--group=POS!", "--bind=0.0.0.0:8583", one], "--group"),
        (["--group=pos", "--bind=0.0.0.0:8583", one, one], "unique"),
    )
    for argv, what in cases:
        out = subprocess.run(base + argv, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert out.returncode == 2 and what in out.stderr, (argv, out.returncode, out.stderr)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy missing: run systemd/install-test-tools.sh")
def test_haproxy_accepts_the_configuration():
    out = subprocess.run([HAPROXY, "-c", "-f", EXAMPLE], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr


# -- live: three members behind haproxy ------------------------------------------------------------


@pytest.fixture
async def pos_mixer(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    try:
        yield m
    finally:
        await m.stop()


async def _member_counts(port: int, n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(n):
        reply = await line_roundtrip(port, f"c{i}".encode(), timeout=2)
        assert reply is not None and reply.endswith(f":c{i}".encode()), reply
        member = reply.split(b":", 1)[0].decode()
        counts[member] = counts.get(member, 0) + 1
    return counts


@pytest.mark.mixer
@pytest.mark.chaos  # make chaos-test: three Rack processes and a SIGKILL
@pytest.mark.timeout(180)
@pytest.mark.skipif(HAPROXY is None, reason="haproxy missing: run systemd/install-test-tools.sh")
async def test_three_members_behind_haproxy_sigkill_and_suspend(tmp_path, pos_mixer):
    stored, _ = pos_mixer.scenarios.import_text(POS_ECHO)
    await pos_mixer.controller.activate_scenario(stored)
    racks = [
        RackProcess(tmp_path, f"pos-{i}", snake_toml(pos_mixer, labels={"role": "pos"}, rack_name=f"pos-{i}")).start()
        for i in (1, 2, 3)
    ]
    lb = None
    try:
        for r in racks:
            await wait_for(lambda r=r: _ok(http_get(r.health_port, "/health/pos")), timeout=60, what=f"{r.name} ready")
        lb = Haproxy(tmp_path, "pos", [r.member() for r in racks]).start()
        await lb.wait_status({r.name: "UP" for r in racks})

        # Spread: sequential new connections reach every member.
        counts = await _member_counts(lb.port, 30)
        assert set(counts) == {"pos-1", "pos-2", "pos-3"}, counts

        # SIGKILL pos-1 while a client opens a new connection every 20 ms.
        results: list[tuple[float, bytes | None]] = []
        stop = asyncio.Event()

        async def client():
            i = 0
            while not stop.is_set():
                t = time.monotonic()
                results.append((t, await line_roundtrip(lb.port, f"k{i}".encode(), timeout=1.0)))
                i += 1
                await asyncio.sleep(0.02)

        task = asyncio.get_running_loop().create_task(client())
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        racks[0].kill()
        await lb.wait_status({"pos-1": "DOWN"}, timeout=5)
        marked_down_s = time.monotonic() - killed_at
        await asyncio.sleep(1.0)
        stop.set()
        await task
        after = [(t, r) for t, r in results if t >= killed_at]
        failed = [t - killed_at for t, r in after if r is None]
        served = [r.split(b":", 1)[0] for _t, r in after if r is not None]
        assert len(after) >= 20, f"only {len(after)} connections after the kill"
        assert failed == [], f"{len(failed)} new connections failed after the kill, at {failed[:5]} s"
        assert b"pos-1" not in served
        assert marked_down_s < 3.0, marked_down_s

        # Suspend pos-2: /health/pos says 503, haproxy takes it out, pos-3 serves everything.
        await pos_mixer.controller.suspend("pos-2")
        await wait_for(lambda: _status(http_get(racks[1].health_port, "/health/pos"), 503), timeout=20,
                       what="pos-2 answers 503")  # fmt: skip
        await lb.wait_status({"pos-2": "DOWN"}, timeout=10)
        counts = await _member_counts(lb.port, 10)
        assert counts == {"pos-3": 10}, counts
        # Activated again, it takes work again.
        await pos_mixer.controller.activate("pos-2")
        await lb.wait_status({"pos-2": "UP"}, timeout=20)
        counts = await _member_counts(lb.port, 12)
        assert counts.get("pos-2", 0) >= 3, counts
    finally:
        if lb is not None:
            lb.stop()
        for r in racks:
            r.stop()


async def _ok(coro) -> bool:
    return (await coro)[0] == 200


async def _status(coro, want: int) -> bool:
    return (await coro)[0] == want
