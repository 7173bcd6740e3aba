"""Sovereign continuity under load, with a real Rack process joined to a real Mixer.

1. The Snake (the Mixer's nats-server) is SIGKILLed and comes back 3 times while tcp-echo
   and the ISO 8583 authorizer each take 1,000 requests/s: every request is answered on the
   same TCP connections (the gears are never restarted, their connection counters say so),
   and every telemetry record the Rack wrote to its WAL lands in DuckDB exactly once: the
   WAL's seqs 1..N compared with the ids in DuckDB (what the WAL still held when the Rack
   stopped is first shipped by the Rack's own agent and shipper over the same WAL).
2. The whole Mixer (API, ingest, Snake) is down for 60 s under the same load: the Rack
   serves throughout, rejoins by itself, drains the backlog (the drain rate is printed), and
   the same exactly-once check holds.

Slow (about two minutes together); CI runs slow tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import deque

import httpx
import pytest
import yaml
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import bundle_for, make_mixer, snake_toml, wait_for

from fluxrig.tools.iso_load import run_load
from fluxrig.wal.log import Wal

pytestmark = [pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 1000  # requests/s on each scenario
SEQ_BITS = 40  # the Mixer stores incarnation << 40 | WAL seq


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario_text() -> str:
    """tcp-echo and iso8583-authorizer, side by side in one scenario for one Rack."""
    with open(os.path.join(ROOT, "scenarios", "tcp-echo.yaml")) as fh:
        echo = yaml.safe_load(fh)
    with open(os.path.join(ROOT, "scenarios", "iso8583-authorizer.yaml")) as fh:
        iso = yaml.safe_load(fh)
    doc = {
        "meta": {"name": "continuity", "version": "1.0.0"},
        "gears": echo["gears"] + iso["gears"],
        "wires": echo["wires"] + iso["wires"],
    }
    return yaml.safe_dump(doc, sort_keys=False)


class JoinedRack:
    """`fluxrig run` joined to the Mixer at `snake_url`, serving tcp-echo and the authorizer."""

    def __init__(self, tmp_path, name: str, snake_url: str, mixer, batch_interval: str):
        self.name = name
        self.state_dir = tmp_path / "rack"
        self.echo_port, self.iso_port = _free_port(), _free_port()
        self.conf = tmp_path / "fluxrig.toml"
        self.conf.write_text(
            f'[base]\nname = "{name}"\nstate_dir = "{self.state_dir}"\n'
            f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "2s"\n'
            f'[telemetry]\nbatch_interval = "{batch_interval}"\n'
            + snake_toml(mixer, url=snake_url)
            + 'reconnect_wait = "200ms"\n'
        )
        self.proc = None

    @property
    def wal_dir(self) -> str:
        return str(self.state_dir / "wal")

    async def start(self) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=ROOT,
            FLUXRIG_ECHO_BIND=f"127.0.0.1:{self.echo_port}",
            FLUXRIG_ISO_BIND=f"127.0.0.1:{self.iso_port}",
        )
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fluxrig.cli.main",
            "run",
            "-c",
            str(self.conf),
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )

    async def join(self, api) -> None:
        async def enrolled():
            return (await api.get(f"/api/v1/racks/{self.name}")).status_code == 200

        await wait_for(enrolled, timeout=20, what="the Rack enrolled")
        assert (await api.post(f"/api/v1/racks/{self.name}/approve", json={})).status_code == 200
        r = await api.post("/api/v1/scenarios/import", params={"activate": "true"}, content=_scenario_text())
        assert r.status_code == 200, r.text

        last = {}

        async def applied():
            s = (await api.get(f"/api/v1/racks/{self.name}")).json()["scenario"]
            last.update(s)
            return s["apply_state"] == "applied"

        try:
            await wait_for(applied, timeout=40, what="scenario applied by the Rack")
        except AssertionError:
            err = b""
            if self.proc and self.proc.returncode is not None:
                err = await self.proc.stderr.read()
            raise AssertionError(
                f"scenario not applied: {last}; rack exit {self.proc.returncode}: {err.decode()[-1500:]}"
            ) from None

    async def stop(self) -> bytes:
        proc = self.proc
        if proc is None:
            return b""
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
        assert proc.returncode == 0, (err or b"").decode()[-3000:]
        return err or b""


class EchoLoad:
    """One persistent connection to tcp-echo at `rate` lines/s; replies checked in order."""

    def __init__(self, port: int, rate: int):
        self.port, self.rate = port, rate
        self.sent = self.answered = self.wrong = self.errors = 0
        self.latencies: list[float] = []

    async def run(self, duration: float) -> EchoLoad:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        pending: deque = deque()

        async def replies():
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("tcp-echo closed the connection")
                i, t0 = pending.popleft()
                self.answered += 1
                self.latencies.append((time.perf_counter() - t0) * 1000)
                if line != b"LINE %d\n" % i:
                    self.wrong += 1

        reading = asyncio.ensure_future(replies())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            while loop.time() - t0 < duration and not reading.done():
                due = int((loop.time() - t0) * self.rate)
                while self.sent < due:
                    pending.append((self.sent, time.perf_counter()))
                    writer.write(b"line %d\n" % self.sent)
                    self.sent += 1
                await writer.drain()
                await asyncio.sleep(0.005)
            deadline = loop.time() + 10
            while pending and not reading.done() and loop.time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            if reading.done() and reading.exception() is not None:
                self.errors += 1
            reading.cancel()
            writer.close()
        return self

    def p99(self) -> float:
        lat = sorted(self.latencies)
        return round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else 0.0


async def _load(rack: JoinedRack, duration: float):
    echo = EchoLoad(rack.echo_port, RATE)
    e, iso = await asyncio.gather(
        echo.run(duration),
        run_load(f"127.0.0.1:{rack.iso_port}", rate=RATE, concurrency=64, connections=1, duration=duration, timeout=5),
    )
    return e, iso


def _check_traffic(echo: EchoLoad, iso, duration: float) -> None:
    assert echo.errors == 0 and echo.wrong == 0, vars(echo) | {"latencies": len(echo.latencies)}
    assert echo.answered == echo.sent >= RATE * duration * 0.95, (echo.sent, echo.answered)
    assert iso.errors == 0 and iso.mismatched == 0 and iso.timeouts == 0, iso
    assert iso.answered == iso.sent >= RATE * duration * 0.95, iso


async def _rack_stats(api, name: str) -> dict:
    return (await api.get(f"/api/v1/racks/{name}")).json().get("stats") or {}


async def _connections(api, name: str) -> tuple[int, int]:
    """connections_total of the two server gears: a restarted gear would count from zero, a
    dropped client would count again."""
    await asyncio.sleep(0.5)  # a heartbeat (200 ms) later than the last connection
    gears = (await _rack_stats(api, name))["gears"]
    return gears["gateway"]["connections_total"], gears["acquirer"]["connections_total"]


async def _verify_exactly_once(mixer, rack: JoinedRack) -> dict:
    """After the Rack stopped: what its WAL still holds (written while it shut down, or not yet
    acknowledged) is shipped by the Rack's own agent and shipper code over the same WAL and
    passport; then the ids in DuckDB must be exactly the seqs the WAL ever committed, once each."""
    from fluxrig.agent.agent import AgentConfig, RackAgent
    from fluxrig.agent.shipper import TelemetryShipper
    from fluxrig.rack_requests import RequestQueue
    from fluxrig.wal import AsyncWal

    wal = Wal(rack.wal_dir, readonly=True)
    try:
        left_at_stop = max(wal.committed_seq, wal.cursor) - wal.cursor
    finally:
        wal.close()

    # Nobody serves the request queue: the agent's passport scenario is posted and never applied,
    # which is what this check wants (only the shipper's work matters here).
    agent = RackAgent(
        AgentConfig(
            snake_url="",
            enrollment_bundle=bundle_for(mixer, token=""),  # enrolled already: CA and key only
            state_dir=str(rack.state_dir),
            name=rack.name,
            heartbeat_interval=0.2,
            reconnect_wait=0.2,
        ),
        RequestQueue(),
    )
    await agent.start()
    awal = await AsyncWal.open(rack.wal_dir)
    shipper = TelemetryShipper(awal, agent, idle_wait=0.1, retry_wait=0.2)
    await shipper.start()
    try:
        await wait_for(lambda: awal.cursor >= awal.committed_seq, timeout=30, what="the rest of the WAL shipped")
        produced = set(range(1, awal.committed_seq + 1))
    finally:
        await shipper.stop()
        await awal.close()
        await agent.stop()
    assert shipper.undecodable == 0
    cur = mixer.db.cursor()
    q = " UNION ALL ".join(f"SELECT id FROM telemetry_{k} WHERE rack = ?" for k in ("logs", "metrics", "traces"))

    def stored():
        return [r[0] for r in cur.execute(q, [rack.name] * 3).fetchall()]

    await wait_for(lambda: len(stored()) >= len(produced), timeout=30, what="every record in DuckDB")
    await asyncio.sleep(0.5)  # anything extra (a duplicate) would land now
    ids = stored()
    seqs = [i & ((1 << SEQ_BITS) - 1) for i in ids]
    assert len({i >> SEQ_BITS for i in ids}) == 1, "one WAL incarnation"
    assert len(seqs) == len(set(seqs)), "a record stored twice"
    assert set(seqs) == produced, (sorted(produced - set(seqs))[:10], sorted(set(seqs) - produced)[:10])
    return {
        "produced": len(produced),
        "in_duckdb_once": len(seqs),
        "left_in_wal_at_stop": left_at_stop,
        "resends_dropped_by_ingest": sum(mixer.ingest.stats["duplicates"].values()),
    }


@pytest.mark.timeout(150)
async def test_snake_sigkilled_three_times_under_load(mixer, api, tmp_path, capsys):
    rack = JoinedRack(tmp_path, "cont-a", mixer.snake.url, mixer, batch_interval="100ms")
    await rack.start()
    try:
        await rack.join(api)
        await wait_for(lambda: _probe(rack.echo_port), timeout=10, what="tcp-echo serving")
        echo_conns, iso_conns = await _connections(api, rack.name)
        duration = 21.0
        load = asyncio.ensure_future(_load(rack, duration))
        for k in (1, 2, 3):
            await asyncio.sleep(3.0)
            os.kill(mixer.snake.pid, signal.SIGKILL)
            await wait_for(
                lambda k=k: mixer.snake.restarts == k and mixer.snake.running, timeout=15, what=f"Snake restart {k}"
            )
        echo, iso = await load
        _check_traffic(echo, iso, duration)

        async def caught_up():  # rejoined and shipping: heartbeats flow and the backlog is small
            t = (await _rack_stats(api, rack.name)).get("telemetry") or {}
            return t.get("backlog", 1e9) < 500 and t

        await wait_for(caught_up, timeout=30, what="the Rack caught up after the last Snake restart")
        assert await _connections(api, rack.name) == (echo_conns + 1, iso_conns + 1)
    finally:
        await rack.stop()
    counts = await _verify_exactly_once(mixer, rack)
    with capsys.disabled():
        print(
            f"\n[snake x3] echo {echo.answered}/{echo.sent} (p99 {echo.p99()} ms), "
            f"iso {iso.answered}/{iso.sent} (p99 {iso.p99_ms} ms); telemetry {counts}"
        )


@pytest.mark.timeout(170)
async def test_mixer_down_60s_under_load_then_drains(tmp_path, capsys):
    ports = {"snake.port": _free_port(), "api.port": _free_port()}
    state = tmp_path / "mixer"
    mixer = await make_mixer(state, **ports)
    rack = JoinedRack(tmp_path, "cont-b", mixer.snake.url, mixer, batch_interval="200ms")
    outage = 60.0
    try:
        async with httpx.AsyncClient(
            base_url=mixer.api_url, headers={"Authorization": f"Bearer {mixer.api_token}"}, timeout=10
        ) as api:
            await rack.start()
            await rack.join(api)
            await wait_for(lambda: _probe(rack.echo_port), timeout=10, what="tcp-echo serving")
            echo_conns, iso_conns = await _connections(api, rack.name)
        duration = 3.0 + outage + 15.0
        load = asyncio.ensure_future(_load(rack, duration))
        await asyncio.sleep(3.0)
        await mixer.stop()
        await asyncio.sleep(outage)
        assert not load.done(), "the load ended during the outage"
        mixer = await make_mixer(state, **ports)
        t_up = time.monotonic()
        backlog0 = rows0 = t0 = None
        while time.monotonic() - t_up < 60:
            # Only once a heartbeat reached this Mixer: before, the stats are the old, persisted ones.
            stats = (mixer.registry.get("cont-b").stats or {}) if mixer.controller.counters["heartbeats"] else {}
            tele = stats.get("telemetry") or {}
            rows = sum(mixer.ingest.stats["rows"].values())
            if backlog0 is None and tele:
                backlog0, rows0, t0 = tele["backlog"], rows, time.monotonic()
            elif backlog0 is not None and tele.get("backlog", 1e9) < 500:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the Rack did not drain its backlog within 60 s of the Mixer's return")
        drained_s = time.monotonic() - t0
        landed = sum(mixer.ingest.stats["rows"].values()) - rows0
        rejoin_s = t0 - t_up
        echo, iso = await load
        _check_traffic(echo, iso, duration)
        async with httpx.AsyncClient(
            base_url=mixer.api_url, headers={"Authorization": f"Bearer {mixer.api_token}"}, timeout=10
        ) as api:
            assert await _connections(api, rack.name) == (echo_conns + 1, iso_conns + 1)
        await rack.stop()
        counts = await _verify_exactly_once(mixer, rack)
        assert backlog0 > outage * 50, f"backlog at rejoin {backlog0}: the outage should have built one"
        with capsys.disabled():
            print(
                f"\n[mixer down {outage:.0f}s] rejoined {rejoin_s:.1f}s after the Mixer came back with "
                f"{backlog0} records in its WAL; drained in {drained_s:.1f}s = "
                f"{landed / max(drained_s, 1e-9):.0f} records/s landed in DuckDB "
                f"(shipper pacing: adaptive by default); echo p99 {echo.p99()} ms, iso p99 {iso.p99_ms} ms "
                f"over the whole run; telemetry {counts}"
            )
    finally:
        if rack.proc is not None and rack.proc.returncode is None:
            rack.proc.kill()
            await rack.proc.communicate()
        await mixer.stop()


async def _probe(port: int) -> bool:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (TimeoutError, OSError):
        return False
    try:
        w.write(b"probe\n")
        await w.drain()
        return await asyncio.wait_for(r.readline(), 2) == b"PROBE\n"
    except (TimeoutError, OSError):
        return False
    finally:
        w.close()
