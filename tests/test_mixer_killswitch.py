"""Kill switch end to end: a real Rack process (`fluxrig run`) joined to a real Mixer.

Unsigned, forged (unpinned key and bad signature) and expired kill commands are ignored and
counted; a signed conn-close closes one connection, gear-stop stops one gear, kill stops the
whole Rack and refuses new connections, also after a Rack restart, until revived; a revive
and a kill captured on the bus and replayed later (after a restart) are refused (the nonces
are kept on disk); the CLI speaks to the same routes."""

from __future__ import annotations

import asyncio
import os
import time

import cbor2
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import run_cli, snake_toml, start_rack_process, stop_rack_process, wait_for

from fluxrig import ctrl as C
from fluxrig.passport import ClusterKey
from fluxrig.wire.messages import CtrlMessage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RACK = "ks-rack"

SCENARIO = """
meta: {name: ks, version: "%s"}
gears:
  - name: gateway
    type: io_tcp
    config: {mode: server, bind: "127.0.0.1:%d", framing: delimiter, delimiter_append: true}
  - name: whoami
    type: map
    config:
      ops:
        - {set: raw, value: "OK {{ meta.conn.id }}"}
wires:
  - {from: gateway.out, to: whoami.in}
  - {from: whoami.out, to: gateway.in}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Conn:
    """One persistent client connection; `ask()` returns the conn id the Rack answers with."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2))

    async def ask(self) -> str:
        self.writer.write(b"who\n")
        await self.writer.drain()
        line = await asyncio.wait_for(self.reader.readline(), 3)
        assert line.startswith(b"OK "), line
        return line[3:].strip().decode()

    async def closed_by_peer(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 3) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.writer.close()


async def _refused(port: int) -> bool:
    try:
        c = await Conn.open(port)
    except (ConnectionRefusedError, OSError):
        return True
    c.close()
    return False


async def _serving(port: int) -> bool:
    try:
        c = await Conn.open(port)
        try:
            return bool(await c.ask())
        finally:
            c.close()
    except (TimeoutError, OSError, AssertionError):
        return False


async def test_kill_switch_with_real_rack(mixer, api, tmp_path):
    port = _free_port()
    conf = tmp_path / "fluxrig.toml"
    conf.write_text(
        f'[base]\nname = "{RACK}"\nstate_dir = "{tmp_path / "rack"}"\n'
        f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "2s"\n[telemetry]\nbatch_interval = "500ms"\n'
        + snake_toml(mixer)
        + 'reconnect_wait = "200ms"\n'
    )
    seen: list[tuple[str, bytes]] = []

    async def record(msg):
        seen.append((msg.subject, msg.data))

    sub = await mixer.nc.subscribe(f"flux.ctrl.{RACK}.>", cb=record)

    async def rack():
        return (await api.get(f"/api/v1/racks/{RACK}")).json()

    async def ctrl():
        return (await rack()).get("stats", {}).get("ctrl") or {}

    proc = await start_rack_process(str(conf))
    errs = []
    try:
        await wait_for(lambda: _ok(api.get(f"/api/v1/racks/{RACK}")), timeout=20, what="the Rack enrolled")
        assert (await api.post(f"/api/v1/racks/{RACK}/approve", json={})).status_code == 200
        r = await api.post("/api/v1/scenarios/import", params={"activate": "true"}, content=SCENARIO % ("1", port))
        assert r.status_code == 200, r.text
        await wait_for(lambda: _serving(port), timeout=20, what="scenario running on the Rack")
        rack_id = (await rack())["id"]
        a, b = await Conn.open(port), await Conn.open(port)
        id_a, id_b = await a.ask(), await b.ask()
        assert id_a != id_b

        # -- refused: unsigned, unpinned key, bad signature, expired ------------------------------
        other = ClusterKey.generate()
        unpinned = C.sign_command(other, C.new_command(C.CMD_KILL, rack_id, RACK, reason="forged"))
        env = cbor2.loads(C.sign_command(mixer.key, C.new_command(C.CMD_KILL, rack_id, RACK, reason="tamper")))
        body = cbor2.loads(env["payload"])
        body["args"]["reason"] = "tampered"
        bad_sig = cbor2.dumps({"payload": cbor2.dumps(body), "signature": env["signature"]})
        expired = C.sign_command(
            mixer.key, C.new_command(C.CMD_KILL, rack_id, RACK, reason="late", now=time.time() - 120, ttl=60)
        )
        for data in (CtrlMessage(reason="kill me").encode(), unpinned, bad_sig, expired):
            await mixer.nc.publish(f"flux.ctrl.{RACK}.kill", data)
        await mixer.nc.flush()

        async def four_refused():
            c = await ctrl()
            return c.get("refused") == 4 and c

        c = await wait_for(four_refused, timeout=10, what="4 refusals reported")
        assert c["refused_by"] == {"unsigned": 1, "pin": 1, "signature": 1, "expired": 1}
        assert c["accepted"] == 0 and not c["killed"]
        assert await a.ask() == id_a and await b.ask() == id_b  # nothing happened

        # -- one connection ------------------------------------------------------------------------
        r = await api.post(
            f"/api/v1/racks/{RACK}/connections/{id_a}/close", json={"gear": "gateway", "reason": "fraud on terminal"}
        )
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        assert await a.closed_by_peer()
        assert await b.ask() == id_b

        # -- one gear ------------------------------------------------------------------------------
        r = await api.post(f"/api/v1/racks/{RACK}/gears/gateway/stop", json={"reason": "maintenance"})
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        assert r.json()["killswitch"]["stopped_gears"] == ["gateway"]
        assert await b.closed_by_peer()
        assert await _refused(port)
        r = await api.post(f"/api/v1/racks/{RACK}/gears/nosuch/stop", json={})
        assert r.json()["status"] == "applied" and "no gear" in r.json()["outcome"]["detail"]

        # -- revive (its bytes are kept for the replay below) --------------------------------------
        r = await api.post(f"/api/v1/racks/{RACK}/revive", json={})
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        revive_nonce = r.json()["command"]["nonce"]
        await wait_for(lambda: _serving(port), timeout=10, what="serving after revive")

        # -- the whole Rack, through a restart ------------------------------------------------------
        r = await api.post(f"/api/v1/racks/{RACK}/kill", json={"reason": "incident 42"})
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        assert r.json()["killswitch"]["killed"] and r.json()["killswitch"]["reason"] == "incident 42"
        assert await _refused(port)
        errs.append(await stop_rack_process(proc))
        assert proc.returncode == 0, errs[-1].decode()[-2000:]
        proc = await start_rack_process(str(conf))

        async def restarted_killed():
            c = await ctrl()
            return c.get("killed") and c.get("accepted") == 0 and c.get("refused") == 0  # a fresh process

        await wait_for(restarted_killed, timeout=20, what="restarted Rack reports killed")
        assert await _refused(port)
        s = (await rack())["scenario"]
        assert s["apply_state"] == "rejected" and "kill" in s["reason"], s

        # -- replay of the earlier, genuine revive: refused even after the restart -----------------
        old_revive = [
            d for subj, d in seen if subj.endswith(".revive") and _payload(d).get("nonce", b"").hex() == revive_nonce
        ]
        assert len(old_revive) == 1
        await mixer.nc.publish(f"flux.ctrl.{RACK}.revive", old_revive[0])
        await mixer.nc.flush()

        async def replay_refused():
            return (await ctrl()).get("refused_by", {}).get("replayed") == 1

        await wait_for(replay_refused, timeout=10, what="replayed revive refused")
        await asyncio.sleep(0.5)
        assert await _refused(port) and (await ctrl())["killed"]

        # -- the CLI shows it, and revives ---------------------------------------------------------
        code, out = await run_cli(mixer, "admin", "racks", "show", RACK)
        assert code == 0 and "KILLED since" in out and "incident 42" in out, out
        code, out = await run_cli(mixer, "admin", "racks", "revive", RACK, "--reason", "all clear")
        assert code == 0 and "revive applied" in out, out
        await wait_for(lambda: _serving(port), timeout=10, what="serving after the CLI revive")
        s = (await rack())["scenario"]
        await wait_for(lambda: _applied(api), timeout=10, what="apply state back to applied")
        # -- replay of the earlier, genuine kill: refused, the Rack keeps serving -------------------
        old_kill = [
            d
            for subj, d in seen
            if subj.endswith(".kill") and (_payload(d).get("args") or {}).get("reason") == "incident 42"
        ]
        assert len(old_kill) == 1
        await mixer.nc.publish(f"flux.ctrl.{RACK}.kill", old_kill[0])
        await mixer.nc.flush()

        async def kill_replay_refused():
            return (await ctrl()).get("refused_by", {}).get("replayed") == 2

        await wait_for(kill_replay_refused, timeout=10, what="replayed kill refused")
        assert await _serving(port) and not (await ctrl())["killed"]
        events = [e["event"] for e in (await rack())["events"]]
        assert {"ctrl.kill", "ctrl.revive", "ctrl.gear-stop", "ctrl.conn-close"} <= set(events)
    finally:
        await sub.unsubscribe()
        errs.append(await stop_rack_process(proc))
    assert proc.returncode == 0, errs[-1].decode()[-2000:]
    if os.environ.get("KS_DEBUG"):
        print(b"\n=====\n".join(errs).decode())


def _payload(data: bytes) -> dict:
    """The signed payload of a command seen on the bus ({} for anything else)."""
    env = cbor2.loads(data)
    return cbor2.loads(env["payload"]) if isinstance(env, dict) and isinstance(env.get("payload"), bytes) else {}


async def _ok(coro) -> bool:
    r = await coro
    return r.status_code == 200


async def _applied(api) -> bool:
    s = (await api.get(f"/api/v1/racks/{RACK}")).json()["scenario"]
    return s["apply_state"] == "applied"


def test_big_heartbeat_stats_keep_the_kill_switch_section():
    """Stats over the Mixer's cap used to be cut mid-JSON (the heartbeat then failed to parse);
    now whole sections are dropped, in order, and named."""
    import json

    from fluxrig_mixer.registry import MAX_STATS_BYTES, _bounded_stats_json

    stats = {
        "ctrl": {"killed": True, "recent": [{"detail": "x" * 200}] * 8},
        "gears": {f"gear-{i}": {"messages_in": i, "pad": "y" * 100} for i in range(300)},
        "telemetry": {"backlog": 7},
    }
    text = _bounded_stats_json(stats)
    doc = json.loads(text)
    assert len(text) <= MAX_STATS_BYTES
    assert doc["ctrl"]["killed"] and doc["telemetry"] == {"backlog": 7} and doc["_truncated"] == ["gears"]
    small = {"ctrl": {"killed": False}}
    assert json.loads(_bounded_stats_json(small)) == small
