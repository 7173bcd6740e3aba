"""Backlog drain after an outage, and live traffic latency while it drains.

Real processes on loopback: a Mixer (`fluxrig-mixer serve`: nats-server with JetStream
`sync_interval: always`, DuckDB ingest) and a joined Rack (`fluxrig run`) serving tcp-echo.
Per run:

1. Mixer and Rack start; the Rack enrolls (auto-adopt) and runs tcp-echo.
2. Outage: the Mixer (and its Snake) stops, the Rack stops; --records log records (about
   200 bytes each) are appended to the Rack's own telemetry WAL, as if written while the Snake
   was away. The Rack starts again with the Mixer still gone (offline start from its
   passport) and live traffic begins: tcp-echo at --live-rate requests/s on one connection,
   from this process.
3. The Mixer comes back. The Rack rejoins and its shipper drains the backlog through
   JetStream into DuckDB. Timed from the Rack's heartbeats (every 200 ms: shipped count and
   backlog) from the first one after the rejoin until the backlog is under DRAINED_BELOW:
   drain_records_per_s (shipped = acknowledged by JetStream, on disk; timed on the Rack's
   clock). landed_in_duckdb_per_s: the same records until the Mixer's row count has them
   (timed here, from the first heartbeat, so slightly pessimistic). live_p99_ms is the p99 of
   the live requests sent in the drain window; baseline_live_p99_ms the p99 of the same
   traffic for BASELINE_S once drained (same run).
4. lost / duplicated: the Rack stops; what its WAL still holds is shipped by the Rack's own
   agent and shipper code; the Mixer stops; the ids in its DuckDB file are compared with the
   WAL's seqs 1..N: lost = seqs not in DuckDB, duplicated = rows beyond one per seq.

Configurations. The top-level figures are the Rack's DEFAULT configuration (no telemetry key
written: since issue 11 the drain adapts, AIMD on the shipper's window against the event
loop's lag and the publish round trip, see fluxrig/agent/publisher.py). `--ship-rates` adds
runs with a fixed `telemetry.ship_rate` cap (records/s; 0 = the default again) under
`ship_rate_<N>`. Each run says what it measured with (`config`).

`--mixer-nice N` runs the Mixer and its nats-server at nice N: deployed, the hub is not the
gateway's machine, and on one 2-core box the Mixer's ingest (tens of thousands of rows/s)
otherwise competes with the Rack for the CPU while the backlog drains, which live_p99_ms then
measures too. The headline figures are at the same priority (0).

    python bench/outage.py --json [--ship-rates 5000] [--mixer-nice 10]
    -> {"drain_records_per_s", "live_p99_ms", "lost", "duplicated", "config",
        "baseline_live_p99_ms", "shipper": {the shipper figures the heartbeat carries}, ...}

State lives in a fresh directory under the current one (not /tmp, often tmpfs where fsync is
free: JetStream's fsync per write is part of what is measured); `fs` names its filesystem.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "mixer"))
sys.path.insert(0, HERE)

from _common import PY, emit, free_port  # noqa: E402
from wal import fs_type  # noqa: E402

RACK = "outage-bench"
#: The Rack's heartbeat figures of its shipper quoted under "shipper" (fluxrig/mixer_link.py).
SHIPPER_KEYS = ("window", "records_per_batch", "rtt_ms", "loop_lag_max_ms", "publish_failures")
DRAINED_BELOW = 500  # backlog (records) under which the drain counts as done: live telemetry keeps coming
BASELINE_S = 5.0
OFFLINE_S = 3.0
POLL_S = 0.1
BODY = "gear gateway: connection 01a2b3c4d5e6f708 from 10.1.2.3:45678 closed by peer after 312 frames (idle)"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))


class Proc:
    def __init__(self, args: list[str], env: dict, log_path: str):
        self.log = open(log_path, "ab")
        self.p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def stop(self, timeout: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode


class Setup:
    """Paths, ports and configuration files of one run."""

    def __init__(self, base: str, ship_rate: float | None):
        self.dir = tempfile.mkdtemp(prefix="outage-", dir=base)
        self.mixer_dir = os.path.join(self.dir, "mixer")
        self.rack_dir = os.path.join(self.dir, "rack")
        self.api_port, self.snake_port, self.echo_port = free_port(), free_port(), free_port()
        self.ship_rate = ship_rate
        self.mixer_conf = os.path.join(self.dir, "mixer.toml")
        with open(self.mixer_conf, "w") as fh:
            fh.write(
                f'[base]\nstate_dir = "{self.mixer_dir}"\n[api]\nhost = "127.0.0.1"\nport = {self.api_port}\n'
                f'[snake]\nhost = "127.0.0.1"\nport = {self.snake_port}\n'
                f'[enrollment]\nauto_adopt = true\nheartbeat_interval = "200ms"\n'
            )
        self.rack_conf = os.path.join(self.dir, "fluxrig.toml")

    @property
    def bundle(self) -> str:
        """The Mixer's first-start enrollment bundle (Snake URL, CA, key, single-use token)."""
        return os.path.join(self.mixer_dir, "enroll-bundle")

    def write_rack_conf(self) -> None:
        telemetry = f"[telemetry]\nship_rate = {self.ship_rate}\n" if self.ship_rate is not None else ""
        with open(self.rack_conf, "w") as fh:
            fh.write(f'[base]\nname = "{RACK}"\nstate_dir = "{self.rack_dir}"\n'
                     f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "2s"\n'
                     f'{telemetry}'
                     f'[snake]\nenrollment_bundle = "{self.bundle}"\nreconnect_wait = "200ms"\n')  # fmt: skip

    def secret(self, name: str) -> str:
        with open(os.path.join(self.mixer_dir, name)) as fh:
            return fh.read().strip()

    def start_mixer(self, scenario: bool) -> Proc:
        args = [PY, "-m", "fluxrig_mixer.cli", "serve", "-c", self.mixer_conf]
        if MIXER_NICE:  # --mixer-nice: the hub's machine is not the gateway's (see main)
            args = ["nice", "-n", str(MIXER_NICE), *args]
        if scenario:
            args += ["--scenario", os.path.join(ROOT, "scenarios", "tcp-echo.yaml")]
        return Proc(args, _env(), os.path.join(self.dir, "mixer.log"))

    def start_rack(self) -> Proc:
        env = _env()
        env["FLUXRIG_ECHO_BIND"] = f"127.0.0.1:{self.echo_port}"
        return Proc(
            [PY, "-m", "fluxrig.cli.main", "run", "-c", self.rack_conf], env, os.path.join(self.dir, "rack.log")
        )

    def api(self, path: str):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", headers={"Authorization": f"Bearer {self.secret('api-token')}"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()


async def _until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await asyncio.to_thread(pred)
            if value:
                return value
        except Exception:
            pass
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


class Live:
    """tcp-echo at `rate` requests/s on one connection; (send time, latency ms) per reply."""

    def __init__(self, port: int, rate: float):
        self.port, self.rate = port, rate
        self.samples: list[tuple[float, float]] = []
        self.sent = self.errors = 0
        self._stop = asyncio.Event()
        self._task = None

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        pending = []
        loop = asyncio.get_running_loop()

        async def replies():
            i = 0
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("closed")
                t0 = pending[i]
                pending[i] = None
                i += 1
                self.samples.append((t0, (time.monotonic() - t0) * 1000))

        reading = asyncio.ensure_future(replies())
        t0 = loop.time()
        try:
            while not self._stop.is_set() and not reading.done():
                due = int((loop.time() - t0) * self.rate)
                while self.sent < due:
                    pending.append(time.monotonic())
                    self.writer.write(b"live %d\n" % self.sent)
                    self.sent += 1
                await self.writer.drain()
                await asyncio.sleep(0.002)
            await asyncio.sleep(1.0)  # the last replies
        finally:
            if reading.done() and reading.exception() is not None:
                self.errors += 1
            reading.cancel()
            self.writer.close()

    async def stop(self) -> None:
        self._stop.set()
        await self._task

    def p99(self, t_from: float, t_to: float) -> float | None:
        lat = sorted(ms for t, ms in self.samples if t_from <= t <= t_to)
        return round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None


async def _prefill(wal_dir: str, n: int) -> None:
    from fluxrig.wal import AsyncWal

    wal = await AsyncWal.open(wal_dir)
    try:
        now = time.time_ns()
        for i in range(n):
            wal.append_nowait(
                {
                    "kind": "logs",
                    "ts": now + i,
                    "severity": 9,
                    "severity_text": "INFO",
                    "body": BODY,
                    "attrs": {"gear": "gateway", "i": i},
                }
            )
            if i % 20_000 == 19_999:
                await wal.flush()
        await wal.flush()
    finally:
        await wal.close()


async def _ship_rest(s: Setup, key: bytes) -> int:
    """The Rack stopped: ship what its WAL still holds with the Rack's own agent and shipper."""
    from fluxrig.agent.agent import AgentConfig, RackAgent
    from fluxrig.agent.shipper import TelemetryShipper
    from fluxrig.rack_requests import RequestQueue
    from fluxrig.wal import AsyncWal

    # Nobody serves the request queue: only the shipper's work matters here.
    agent = RackAgent(
        AgentConfig(
            snake_url="",
            enrollment_bundle=s.bundle,  # enrolled already: its CA, URL and key
            state_dir=s.rack_dir,
            name=RACK,
            heartbeat_interval=0.2,
            reconnect_wait=0.2,
        ),
        RequestQueue(),
    )
    await agent.start()
    wal = await AsyncWal.open(os.path.join(s.rack_dir, "wal"))
    shipper = TelemetryShipper(wal, agent, idle_wait=0.1, retry_wait=0.2)
    await shipper.start()
    try:
        deadline = time.monotonic() + 60
        while wal.cursor < wal.committed_seq and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return wal.committed_seq
    finally:
        await shipper.stop()
        await wal.close()
        await agent.stop()


def _count(s: Setup, produced: int) -> dict:
    import duckdb

    con = duckdb.connect(os.path.join(s.mixer_dir, "mixer.duckdb"), read_only=True)
    try:
        q = " UNION ALL ".join(f"SELECT id FROM telemetry_{k} WHERE rack = ?" for k in ("logs", "metrics", "traces"))
        seqs = [r[0] & ((1 << 40) - 1) for r in con.execute(q, [RACK] * 3).fetchall()]
    finally:
        con.close()
    unique = set(seqs)
    return {
        "lost": len(set(range(1, produced + 1)) - unique),
        "duplicated": len(seqs) - len(unique),
        "stored": len(seqs),
        "produced": produced,
    }


def _rows(s: Setup) -> float:
    return _metric(s.api("/metrics"), "fluxrig_mixer_telemetry_rows_total")


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def run_once(base: str, ship_rate: float | None, records: int, live_rate: float, keep: bool = False) -> dict:
    s = Setup(base, ship_rate)
    mixer = s.start_mixer(scenario=True)
    rack = None
    try:
        await _until(lambda: s.api("/api/v1/health")["status"] == "ok", 30, "the Mixer")
        s.write_rack_conf()
        key = bytes.fromhex(s.secret("cluster.key.pub"))
        rack = s.start_rack()
        await _until(
            lambda: s.api(f"/api/v1/racks/{RACK}")["scenario"]["apply_state"] == "applied",
            30,
            "the Rack running tcp-echo",
        )
        # -- outage: the Mixer and its Snake go away; the backlog is written into the Rack's WAL
        mixer.stop()
        rack.stop()
        await _prefill(os.path.join(s.rack_dir, "wal"), records)
        rack = s.start_rack()
        live = Live(s.echo_port, live_rate)
        await _until(lambda: _can_connect(s.echo_port), 30, "the Rack serving offline")
        await live.start()
        await asyncio.sleep(OFFLINE_S)
        # -- the Mixer returns: drain
        mixer = s.start_mixer(scenario=False)
        samples = []  # (local time, telemetry stats) from each new heartbeat

        def tele():
            return s.api(f"/api/v1/racks/{RACK}")["stats"].get("telemetry") or {}

        t_wait = time.monotonic()
        while time.monotonic() - t_wait < 600:
            try:
                t = await asyncio.to_thread(tele)
            except Exception:
                t = {}
            now = time.monotonic()
            if t and (not samples or t != samples[-1][1]):
                # The first answers are the stats the Mixer persisted before the outage (the old
                # process): a heartbeat of the new process is the first with a backlog.
                if samples or t.get("backlog", 0) > DRAINED_BELOW:
                    if not samples:
                        rows0 = await asyncio.to_thread(_rows, s)
                    samples.append((now, t))
            if samples and samples[-1][1].get("backlog", 1e12) < DRAINED_BELOW:
                break
            await asyncio.sleep(POLL_S)
        else:
            raise TimeoutError("the backlog did not drain within 600 s")
        (t0, first), (t1, last) = samples[0], samples[-1]
        # Timed on the Rack's own clock: `at` is when each heartbeat's figures were taken.
        drain_s = max(last["at"] - first["at"], 1e-9)
        drained = last["shipped"] - first["shipped"]
        # Landed in DuckDB: the Mixer's stored rows catch up with what the Rack shipped.
        t_land = await _until(lambda: _rows(s) >= rows0 + drained and time.monotonic(), 120, "ingest", 0.05)
        await asyncio.sleep(1.0)
        b0 = time.monotonic()
        await asyncio.sleep(BASELINE_S)
        b1 = time.monotonic()
        await live.stop()
        resends = _metric(s.api("/metrics"), "fluxrig_mixer_telemetry_duplicates_total")
        # -- exactly once
        rack.stop()
        rack = None
        produced = await _ship_rest(s, key)
        await asyncio.sleep(1.0)  # ingest flush
        mixer.stop()
        counts = _count(s, produced)
        return {
            "config": "default (adaptive drain)" if ship_rate is None else f"telemetry.ship_rate = {ship_rate:g}",
            "drain_records_per_s": round(drained / drain_s),
            "drain_s": round(drain_s, 2),
            "landed_in_duckdb_per_s": round(drained / max(t_land - t0, 1e-9)),
            "backlog_at_rejoin": first["backlog"],
            "live_p99_ms": live.p99(t0, t1),
            "baseline_live_p99_ms": live.p99(b0, b1),
            "live_sent": live.sent,
            "live_answered": len(live.samples),
            "live_errors": live.errors,
            "lost": counts["lost"],
            "duplicated": counts["duplicated"],
            "records_produced": counts["produced"],
            "resends_dropped_by_ingest": int(resends),
            "shipper": {k: last.get(k) for k in SHIPPER_KEYS if k in last},
        }
    finally:
        if rack is not None:
            rack.stop()
        mixer.stop()
        if not keep:
            shutil.rmtree(s.dir, ignore_errors=True)


def _can_connect(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


MIXER_NICE = 0  # set by --mixer-nice


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--records", type=int, default=150_000, help="backlog written during the outage (default 150000)")
    ap.add_argument(
        "--live-rate", type=float, default=1000.0, help="tcp-echo requests/s during the drain (default 1000)"
    )
    ap.add_argument("--dir", default=None, help="where the temporary state goes (default: a fresh dir under .)")
    ap.add_argument("--keep", action="store_true", help="keep each run's state and logs (mixer.log, rack.log) in --dir")
    ap.add_argument(
        "--mixer-nice",
        type=int,
        default=0,
        help="run the Mixer (and its nats-server) at this nice level: deployed, the hub is another "
        "machine than the gateway; on one 2-core box its ingest otherwise takes the Rack's CPU during "
        "the drain (default 0: same priority, the headline figures)",
    )
    ap.add_argument(
        "--ship-rates",
        default="",
        help="extra runs with a fixed telemetry.ship_rate, records/s, comma-separated (e.g. '5000'); "
        "the top level is always the default configuration",
    )
    args = ap.parse_args(argv)
    global MIXER_NICE
    MIXER_NICE = args.mixer_nice
    base = args.dir or tempfile.mkdtemp(prefix="bench-outage-", dir=os.getcwd())
    os.makedirs(base, exist_ok=True)
    rates = [float(r) for r in args.ship_rates.split(",") if r.strip()]
    try:
        first = asyncio.run(run_once(base, None, args.records, args.live_rate, args.keep))
        result = {
            **first,
            "records": args.records,
            "live_rate": args.live_rate,
            "fs": fs_type(base),
            "mixer_nice": args.mixer_nice,
            "targets": {"drain_records_per_s": ">= 30000", "live_p99_ms": "<= 10"},
        }
        for rate in rates:
            result[f"ship_rate_{rate:g}"] = asyncio.run(run_once(base, rate, args.records, args.live_rate, args.keep))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
