"""Fleet load: N simulated Racks enroll over the Snake and heartbeat; API latency under load.

Setup: `fluxrig-mixer serve` as a real subprocess (auto-adopt, heartbeat 1s, loopback ports,
temp state dir). N Racks enroll through the shared enroll user (real Hello, sealed passport
verified against the Mixer key), then each opens its own bus connection with its own
credentials and heartbeats once per interval (real request/reply).

Measured: latency of the control API (GET /api/v1/racks with all N Racks, GET one Rack,
GET /api/v1/health, GET /metrics) from a client thread, while the fleet heartbeats; the
same probe with the fleet silent is the baseline in the same run.

    python bench/fleet.py --json  ->  {"racks", "api_p50_ms", "api_p99_ms", ...}
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402

import nats  # noqa: E402

from fluxrig.agent import protocol as P  # noqa: E402
from fluxrig.agent import subjects as S  # noqa: E402
from fluxrig.passport import parse_public_key, verify_passport  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(port: int, token: str, names: list[str], seconds: float) -> dict[str, list[float]]:
    """Sequential GETs on one keep-alive connection; latencies per route in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"}
    routes = ["/api/v1/racks", "/api/v1/racks/{name}", "/api/v1/health", "/metrics"]
    out: dict[str, list[float]] = {r: [] for r in routes}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        route = routes[i % len(routes)]
        path = route.replace("{name}", random.choice(names))
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        out[route].append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        i += 1
        time.sleep(0.005)
    conn.close()
    return out


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * (len(values) - 1)))))
    return round(values[k], 2)


class Fleet:
    def __init__(self, url: str, token: str, mixer_pub: bytes, n: int, interval: float):
        self.url, self.token, self.pub, self.n, self.interval = url, token, mixer_pub, n, interval
        self.racks: list[dict] = []
        self.beats = 0
        self.beat_errors = 0
        self.running = False
        self.conns = []

    async def enroll(self, concurrency: int = 25) -> None:
        nc = await nats.connect(self.url, user=S.ENROLL_USER, password=S.ENROLL_PASSWORD, inbox_prefix=S.ENROLL_INBOX)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int):
            async with sem:
                sk, pk = P.new_reply_keypair()
                msg = await nc.request(S.HELLO, P.encode_hello(self.token, f"sim-{i:04d}", pk, "bench"), timeout=30)
                reply = P.decode_hello_reply(msg.data)
                passport = verify_passport(P.unseal(sk, reply["sealed"]), [self.pub])
                self.racks.append({"name": passport.rack_name, "user": passport.bus_user,
                                   "password": passport.bus_password, "serial": passport.serial})

        await asyncio.gather(*(one(i) for i in range(self.n)))
        await nc.close()

    async def connect(self, concurrency: int = 25) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(r):
            async with sem:
                for attempt in range(20):
                    try:
                        r["nc"] = await nats.connect(self.url, user=r["user"], password=r["password"],
                                                     inbox_prefix=S.inbox_prefix(r["name"]), allow_reconnect=True,
                                                     max_reconnect_attempts=5, reconnect_time_wait=0.2)
                        return
                    except Exception:
                        await asyncio.sleep(0.2)  # the Snake may still be reloading its users
                raise RuntimeError(f"{r['name']} could not connect")

        await asyncio.gather(*(one(r) for r in self.racks))

    async def beat_forever(self, r) -> None:
        await asyncio.sleep(random.random() * self.interval)
        start = time.monotonic()
        while self.running:
            try:
                msg = await r["nc"].request(S.heartbeat(r["name"]),
                                            P.encode_heartbeat(r["serial"], apply="none", uptime=time.monotonic() - start,
                                                               stats={"tasks": 12}), timeout=5)
                reply = P.decode_heartbeat_reply(msg.data)
                if reply["passport"]:
                    r["serial"] = verify_passport(reply["passport"], [self.pub]).serial
                self.beats += 1
            except Exception:
                self.beat_errors += 1
            await asyncio.sleep(self.interval)


async def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="fluxrig-fleet-bench-")
    api_port, snake_port = free_port(), free_port()
    conf = os.path.join(tmp, "fluxrig-mixer.toml")
    with open(conf, "w") as fh:
        fh.write(f'[base]\nstate_dir = "{tmp}/data"\n[api]\nhost = "127.0.0.1"\nport = {api_port}\n'
                 f'[snake]\nhost = "127.0.0.1"\nport = {snake_port}\n'
                 f'[enrollment]\nauto_adopt = true\nheartbeat_interval = "{args.interval}s"\n'
                 '[logging]\nlevel = "warning"\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
    prof = ["-m", "cProfile", "-o", os.environ["FLEET_PROFILE"]] if os.environ.get("FLEET_PROFILE") else []
    proc = subprocess.Popen([sys.executable, *prof, "-m", "fluxrig_mixer.cli", "serve", "-c", conf], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fleet = None
    try:
        token_path = os.path.join(tmp, "data", "api-token")
        deadline = time.monotonic() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", api_port, timeout=1)
                c.request("GET", "/api/v1/health")
                if c.getresponse().status == 200 and os.path.exists(token_path):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the Mixer did not start")
            await asyncio.sleep(0.2)
        token = open(token_path).read().strip()
        bootstrap = open(os.path.join(tmp, "data", "bootstrap-token")).read().strip()
        pub = parse_public_key(open(os.path.join(tmp, "data", "cluster.key.pub")).read())
        fleet = Fleet(f"nats://127.0.0.1:{snake_port}", bootstrap, pub, args.racks, args.interval)
        t0 = time.perf_counter()
        await fleet.enroll()
        enroll_s = time.perf_counter() - t0
        await fleet.connect()
        names = [r["name"] for r in fleet.racks]
        # Baseline: the same probe with the fleet registered but silent.
        idle = await asyncio.to_thread(probe, api_port, token, names, args.seconds / 2)
        fleet.running = True
        beaters = [asyncio.get_running_loop().create_task(fleet.beat_forever(r)) for r in fleet.racks]
        await asyncio.sleep(args.interval * 2)
        beats0, t1 = fleet.beats, time.perf_counter()
        loaded = await asyncio.to_thread(probe, api_port, token, names, args.seconds)
        hb_rate = (fleet.beats - beats0) / (time.perf_counter() - t1)
        c = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
        c.request("GET", "/api/v1/racks", headers={"Authorization": f"Bearer {token}"})
        racks = json.loads(c.getresponse().read())
        fleet.running = False
        for t in beaters:
            t.cancel()
        all_loaded = [v for vs in loaded.values() for v in vs]
        all_idle = [v for vs in idle.values() for v in vs]
        return {
            "racks": len(racks),
            "racks_active": sum(1 for r in racks if r["status"] == "active"),
            "api_p50_ms": pct(all_loaded, 50),
            "api_p99_ms": pct(all_loaded, 99),
            "idle_api_p50_ms": pct(all_idle, 50),
            "idle_api_p99_ms": pct(all_idle, 99),
            "api_requests": len(all_loaded),
            "per_route_p99_ms": {k: pct(v, 99) for k, v in loaded.items()},
            "heartbeats_per_s": round(hb_rate, 1),
            "heartbeat_errors": fleet.beat_errors,
            "enroll_s": round(enroll_s, 2),
            "enroll_per_s": round(args.racks / enroll_s, 1),
        }
    finally:
        if fleet is not None:
            for r in fleet.racks:
                if r.get("nc") is not None:
                    try:
                        await r["nc"].close()
                    except Exception:
                        pass
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--racks", type=int, default=500)
    p.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, seconds")
    p.add_argument("--seconds", type=float, default=10.0, help="probe duration under load")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
