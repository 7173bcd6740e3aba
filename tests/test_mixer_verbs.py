"""Signed control verbs end to end (issue 12.5, 13.2): real Rack processes (`fluxrig run`), a
real Mixer and nats-server, an outsider with nats-py, the Rack's clock moved with libfaketime.

- an unsigned, foreign-key or replayed `shutdown` / `log-level` is ignored and counted; the
  genuine ones work, and a captured one replayed after the restart is refused;
- a Rack whose clock is 10 min fast or slow accepts a fresh `kill` and refuses a stale one
  (it judges by the Mixer's signed time from its heartbeat replies);
- a Rack cut off from the Snake while `kill` is sent is killed by the first heartbeat reply
  once it reconnects (level-triggered kill state);
- a stored passport 31 days expired, and a clock at 1970, still run the last verified
  scenario (also with no Mixer reachable); passports are ordered by serial.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import os
import socket
import time

import cbor2
import nats
import pytest
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import snake_toml, start_rack_process, stop_rack_process, wait_for

from fluxrig import ctrl as C
from fluxrig.passport import ClusterKey, sign_passport, verify_passport
from fluxrig.wire.messages import CtrlMessage

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), "libfaketime.so.1")
RACK = "verbs-rack"

SCENARIO = """
meta: {name: verbs, version: "%s"}
gears:
  - name: gateway
    type: io_tcp
    config: {mode: server, bind: "127.0.0.1:%d", framing: delimiter, delimiter_append: true}
  - name: hello
    type: map
    config:
      ops:
        - {set: raw, value: "OK"}
wires:
  - {from: gateway.out, to: hello.in}
  - {from: hello.out, to: gateway.in}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _faketime(offset: str) -> dict:
    """The environment of a Rack whose clock is moved by `offset` (libfaketime syntax)."""
    if not os.path.exists(LIBFAKETIME):
        pytest.fail(f"{LIBFAKETIME} is missing: run systemd/install-test-tools.sh (Debian package libfaketime)")
    return dict(os.environ, LD_PRELOAD=LIBFAKETIME, FAKETIME=offset)


async def _serving(port: int) -> bool:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    try:
        w.write(b"hi\n")
        await w.drain()
        return (await asyncio.wait_for(r.readline(), 3)).startswith(b"OK")
    except (OSError, TimeoutError):
        return False
    finally:
        w.close()


async def _refused(port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return True
    w.close()
    return False


def _conf(tmp_path, snake_url: str, mixer, name: str = "fluxrig.toml") -> str:
    conf = tmp_path / name
    conf.write_text(
        f'[base]\nname = "{RACK}"\nstate_dir = "{tmp_path / "rack"}"\n'
        f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "2s"\n[telemetry]\nbatch_interval = "500ms"\n'
        + snake_toml(mixer, url=snake_url)
        + 'reconnect_wait = "200ms"\n'
    )
    return str(conf)


class Racks:
    """The Rack under test: enrolled, approved, serving the scenario on `port`."""

    def __init__(self, mixer, api, tmp_path):
        self.mixer, self.api, self.tmp_path = mixer, api, tmp_path
        self.port = _free_port()
        self.proc = None
        self.errs: list[bytes] = []

    async def row(self) -> dict:
        return (await self.api.get(f"/api/v1/racks/{RACK}")).json()

    async def ctrl(self) -> dict:
        return (await self.row()).get("stats", {}).get("ctrl") or {}

    async def start(self, conf: str, env: dict | None = None) -> None:
        self.proc = await start_rack_process(conf, env)

    async def stop(self) -> int:
        if self.proc is not None:
            self.errs.append(await stop_rack_process(self.proc))
            return self.proc.returncode
        return 0

    async def enroll_and_serve(self, conf: str, env: dict | None = None) -> None:
        await self.start(conf, env)

        async def known():
            return (await self.api.get(f"/api/v1/racks/{RACK}")).status_code == 200

        await wait_for(known, timeout=40, what="the Rack enrolled")
        assert (await self.api.post(f"/api/v1/racks/{RACK}/approve", json={})).status_code == 200
        r = await self.api.post(
            "/api/v1/scenarios/import", params={"activate": "true"}, content=SCENARIO % ("1", self.port)
        )
        assert r.status_code == 200, r.text
        try:
            await wait_for(lambda: _serving(self.port), timeout=40, what="the scenario running on the Rack")
        except AssertionError:
            await self.stop()
            raise AssertionError(f"the scenario did not run on the Rack: {await self.row()}\n{self.log()[-4000:]}")

    def log(self) -> str:
        return b"\n=====\n".join(self.errs).decode(errors="replace")


async def _outsider(mixer):
    """A nats-py client of its own on the Snake with publish rights on flux.ctrl.> (the Mixer's)."""
    return await nats.connect(mixer.snake.url, **mixer.snake.client_options())


async def test_unsigned_or_replayed_shutdown_and_log_level_are_ignored_and_counted(mixer, api, tmp_path):
    racks = Racks(mixer, api, tmp_path)
    conf = _conf(tmp_path, mixer.snake.url, mixer)
    outsider = await _outsider(mixer)
    seen: list[tuple[str, bytes]] = []

    async def record(msg):
        seen.append((msg.subject, msg.data))

    sub = await outsider.subscribe(f"flux.ctrl.{RACK}.>", cb=record)
    try:
        await racks.enroll_and_serve(conf)
        rack_id = (await racks.row())["id"]
        forged = C.sign_command(ClusterKey.generate(), C.new_command(C.CMD_SHUTDOWN, rack_id, RACK))
        for verb, data in (
            ("shutdown", CtrlMessage(reason="hand-made").encode()),  # what made a Rack exit 0
            ("log-level", cbor2.dumps({"v": 1, "level": "debug"})),
            ("shutdown", forged),
        ):
            await outsider.publish(f"flux.ctrl.{RACK}.{verb}", data)
        await outsider.flush()

        async def three_refused():
            c = await racks.ctrl()
            return c.get("refused") == 3 and c

        c = await wait_for(three_refused, timeout=10, what="3 refusals reported")
        assert c["refused_by"] == {"unsigned": 2, "pin": 1}, c
        assert c["metrics"]["commands_refused"] == 3
        # reload / passport carry a signed passport: without one, or a forged one, refused too.
        forged_passport = sign_passport(ClusterKey.generate(), verify_passport(
            (tmp_path / "rack" / "rack.flux").read_bytes(), [mixer.key.public_key], check_expiry=False))  # fmt: skip
        for verb, data in (
            ("reload", CtrlMessage(reason="hand-made").encode()),
            ("passport", CtrlMessage(forged_passport).encode()),
            ("reload", b"\xff garbage"),
        ):
            await outsider.publish(f"flux.ctrl.{RACK}.{verb}", data)
        await outsider.flush()

        async def passports_refused():
            p = (await racks.ctrl()).get("passports") or {}
            return p.get("refused") == 3 and p

        p = await wait_for(passports_refused, timeout=10, what="3 refused passport pushes reported")
        assert p["refused_by"] == {"unsigned": 1, "pin": 1, "malformed": 1}, p
        await asyncio.sleep(0.5)
        assert racks.proc.returncode is None and await _serving(racks.port)

        # The genuine log-level works; the same bytes replayed are refused.
        assert (await api.post(f"/api/v1/racks/{RACK}/log-level", json={"level": "debug"})).status_code == 200

        async def level_applied():
            recent = (await racks.ctrl()).get("recent") or []
            return any(o["cmd"] == "log-level" and o["ok"] for o in recent)

        await wait_for(level_applied, timeout=10, what="log-level applied")
        level = [d for s, d in seen if s.endswith(".log-level")][-1]
        await outsider.publish(f"flux.ctrl.{RACK}.log-level", level)
        await outsider.flush()

        async def replay_refused():
            return (await racks.ctrl()).get("refused_by", {}).get("replayed") == 1

        await wait_for(replay_refused, timeout=10, what="the replayed log-level refused")
        events = [e for e in (await racks.row())["events"] if e["event"] == "ctrl.log-level"]
        assert events and "by=" in events[0]["detail"] and "level=debug" in events[0]["detail"]

        # The genuine shutdown: the Rack drains and exits 0.
        assert (await api.post(f"/api/v1/racks/{RACK}/shutdown", json={"reason": "maint"})).status_code == 200
        await asyncio.wait_for(racks.proc.wait(), 20)
        assert racks.proc.returncode == 0
        shutdown = [d for s, d in seen if s.endswith(".shutdown")][-1]
        # Started again, the captured shutdown replayed: refused (the nonce was on disk first).
        await racks.start(conf)
        await wait_for(lambda: _serving(racks.port), timeout=20, what="serving after the restart")

        async def fresh_process():
            c = await racks.ctrl()
            return c.get("accepted") == 0 and c.get("refused") == 0

        await wait_for(fresh_process, timeout=10, what="the restarted Rack's first heartbeat")
        await outsider.publish(f"flux.ctrl.{RACK}.shutdown", shutdown)
        await outsider.flush()

        async def shutdown_replay_refused():
            return (await racks.ctrl()).get("refused_by", {}).get("replayed") == 1

        await wait_for(shutdown_replay_refused, timeout=10, what="the replayed shutdown refused")
        await asyncio.sleep(0.5)
        assert racks.proc.returncode is None and await _serving(racks.port)
    finally:
        await sub.unsubscribe()
        await outsider.close()
        code = await racks.stop()
    assert code == 0, racks.log()[-3000:]


@pytest.mark.parametrize("offset", ["+600s", "-600s"])
async def test_rack_clock_ten_minutes_off_accepts_fresh_kill_refuses_stale(mixer, api, tmp_path, offset):
    racks = Racks(mixer, api, tmp_path)
    conf = _conf(tmp_path, mixer.snake.url, mixer)
    try:
        await racks.enroll_and_serve(conf, _faketime(offset))

        async def synced():
            clock = (await racks.ctrl()).get("clock") or {}
            return clock.get("source") == "mixer" and clock

        clock = await wait_for(synced, timeout=10, what="the Rack synced to the Mixer's time")
        expected = -600.0 if offset.startswith("+") else 600.0
        assert abs(clock["offset_s"] - expected) < 5, clock
        rack_id = (await racks.row())["id"]
        stale = C.sign_command(
            mixer.key, C.new_command(C.CMD_KILL, rack_id, RACK, reason="stale", now=time.time() - 120, ttl=60)
        )
        await mixer.nc.publish(f"flux.ctrl.{RACK}.kill", stale)
        await mixer.nc.flush()

        async def stale_refused():
            return (await racks.ctrl()).get("refused_by", {}).get("expired") == 1

        await wait_for(stale_refused, timeout=10, what="the stale kill refused")
        assert await _serving(racks.port)
        r = await api.post(f"/api/v1/racks/{RACK}/kill", json={"reason": "fresh"})
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        assert await _refused(racks.port)
    finally:
        code = await racks.stop()
    assert code == 0, racks.log()[-3000:]


async def _healthcheck(conf: str) -> dict:
    import json
    import sys

    from helpers import ROOT

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fluxrig.cli.main", "healthcheck", "-c", conf, "--json",
        env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    return json.loads(out)


class Proxy:
    """A TCP relay in front of nats-server that can cut the Rack off (real sockets)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = _free_port()
        self.server = None
        self.pairs: set = set()
        self.accepted_at: list[float] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader, writer) -> None:
        self.accepted_at.append(time.monotonic())
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pair = (writer, uw)
        self.pairs.add(pair)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        finally:
            self.pairs.discard(pair)

    async def cut(self) -> None:
        """Stop listening and drop every relayed connection."""
        self.server.close()
        for a, b in list(self.pairs):
            a.transport.abort()
            b.transport.abort()
        await self.server.wait_closed()


async def test_rack_disconnected_while_killed_is_killed_on_reconnect(mixer, api, tmp_path):
    proxy = Proxy(int(mixer.snake.url.rsplit(":", 1)[1]))
    await proxy.start()
    racks = Racks(mixer, api, tmp_path)
    conf = _conf(tmp_path, f"tls://127.0.0.1:{proxy.port}", mixer)
    try:
        await racks.enroll_and_serve(conf)
        await proxy.cut()

        async def offline_for_the_mixer():
            return not any(w.transport.is_closing() is False for w, _ in proxy.pairs)

        await wait_for(offline_for_the_mixer, timeout=5, what="the Rack cut off")
        r = await api.post(f"/api/v1/racks/{RACK}/kill", json={"reason": "while away", "wait": 0.5})
        assert r.status_code == 200 and r.json()["status"] == "sent", r.text  # nobody confirmed
        assert r.json()["kill_state"] == {"serial": 1, "killed": True}
        await asyncio.sleep(1.0)
        assert await _serving(racks.port)  # the Rack never heard it
        cut_at = len(proxy.accepted_at)
        await proxy.start()
        await wait_for(lambda: len(proxy.accepted_at) > cut_at, timeout=30, what="the Rack reconnecting")
        reconnected = proxy.accepted_at[cut_at]
        await wait_for(lambda: _refused(racks.port), timeout=10, interval=0.02, what="the Rack killed")
        took = time.monotonic() - reconnected
        # The first heartbeat after the reconnect carries the kill (heartbeat interval 0.2 s).
        assert took < 2.0, f"killed {took:.2f}s after reconnecting"

        async def reported_killed():
            c = await racks.ctrl()
            return c.get("killed") and c

        c = await wait_for(reported_killed, timeout=5, what="the kill reported")
        assert c["serial"] == 1 and c["reason"] == "while away"
        print(f"killed {took * 1000:.0f} ms after the Rack reconnected")
        # A revive converges the same way, and the Rack serves again.
        r = await api.post(f"/api/v1/racks/{RACK}/revive", json={})
        assert r.json()["status"] == "applied", r.text
        await wait_for(lambda: _serving(racks.port), timeout=10, what="serving after revive")
    finally:
        code = await racks.stop()
        proxy.server.close()
    assert code == 0, racks.log()[-3000:]


async def test_expired_passport_and_clock_at_1970_still_run_the_last_scenario(mixer, api, tmp_path):
    racks = Racks(mixer, api, tmp_path)
    conf = _conf(tmp_path, mixer.snake.url, mixer)
    dead = _conf(tmp_path, f"tls://127.0.0.1:{_free_port()}", mixer, "offline.toml")  # no Mixer there
    try:
        await racks.enroll_and_serve(conf)
        assert await racks.stop() == 0
        path = tmp_path / "rack" / "rack.flux"
        genuine = path.read_bytes()
        current = verify_passport(genuine, [mixer.key.public_key], check_expiry=False)

        # 1. Offline for 61 days: the passport expired 31 days ago; nobody to renew it.
        now = time.time()
        old = dataclasses.replace(current, issued_at=now - 61 * 86400, expires_at=now - 31 * 86400)
        path.write_bytes(sign_passport(mixer.key, old))
        await racks.start(dead)
        await wait_for(lambda: _serving(racks.port), timeout=20, what="the expired passport's scenario running")
        assert await racks.stop() == 0
        assert "expired" in racks.errs[-1].decode() and "still running" in racks.errs[-1].decode()

        # 2. A clock at 1970 (no RTC), no Mixer: the genuine passport still runs.
        path.write_bytes(genuine)
        await racks.start(dead, _faketime("-20400d"))
        await wait_for(lambda: _serving(racks.port), timeout=20, what="the scenario running at 1970")
        health = await _healthcheck(dead)  # the state is reported offline too
        assert health["status"] == "running" and health["passport"]["state"] == "unknown", health
        assert health["passport"]["clock"] == "unknown"
        assert await racks.stop() == 0
        assert "clock is unset" in racks.errs[-1].decode()

        # 3. At 1970 with the Mixer: it runs, syncs, and reports the passport valid by the Mixer's time.
        await racks.start(conf, _faketime("-20400d"))
        await wait_for(lambda: _serving(racks.port), timeout=20, what="the scenario running at 1970, joined")

        seen: list[dict] = []

        async def rechecked():
            c = await racks.ctrl()
            seen.append(c)
            p = c.get("passport") or {}
            # The Mixer's row keeps the last heartbeat's stats: until this process's first one it
            # is the enrolled run's (real clock: clock mixer, valid, offset 0.0). That stale row is
            # what sessions 4 and 11 saw fail: wait for this run's report, with its offset.
            offset = (c.get("clock") or {}).get("offset_s") or 0
            return p.get("clock") == "mixer" and p.get("state") == "valid" and offset > 50 * 365 * 86400 and c

        try:
            c = await wait_for(rechecked, timeout=15, what="the passport re-checked by the Mixer's time")
        except (AssertionError, TimeoutError) as exc:
            last = seen[-1] if seen else {}
            raise AssertionError(f"{exc}: last status {{'clock': {last.get('clock')}, "
                                 f"'passport': {last.get('passport')}}}") from None  # fmt: skip
        # 4. Passports by serial: an older serial with a later time stamp is refused.
        rack_id = (await racks.row())["id"]
        have = c["passport"]["serial"]
        older = dataclasses.replace(
            current, rack_id=rack_id, serial=have - 1, issued_at=time.time() + 60, expires_at=time.time() + 86400
        )
        older = dataclasses.replace(older, scenario={"meta": {"name": "evil", "version": "9"}, "gears": []},
                                    scenario_version="9@evil")  # fmt: skip
        await mixer.nc.publish(f"flux.ctrl.{RACK}.passport", CtrlMessage(sign_passport(mixer.key, older)).encode())
        await mixer.nc.flush()
        await asyncio.sleep(1.0)
        assert await _serving(racks.port)
        stored = verify_passport(path.read_bytes(), [mixer.key.public_key], check_expiry=False)
        assert stored.serial == have and stored.scenario_version != "9@evil"

        async def stale_counted():
            return ((await racks.ctrl()).get("passports") or {}).get("refused_by", {}).get("stale") == 1

        await wait_for(stale_counted, timeout=10, what="the older serial counted as stale")
    finally:
        code = await racks.stop()
    assert code == 0, racks.log()[-3000:]
