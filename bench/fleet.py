"""Fleet load: N simulated Racks enroll over the Snake and heartbeat; API latency under load.

Setup: `fluxrig-mixer serve` as a real subprocess (auto-adopt, heartbeat 1s, loopback ports,
temp state dir). N Racks enroll through the shared enroll user (real Hello, sealed passport
verified against the Mixer key; 256 Hellos in flight at once, as a fleet powered on together
sends them, with one token of N uses), then each opens its own bus connection with its own
credentials and heartbeats once per interval (real request/reply).

Measured: latency of the control API (GET /api/v1/racks with all N Racks, GET one Rack,
GET /api/v1/health, GET /metrics) from a client thread, while the fleet heartbeats; the
same probe with the fleet silent is the baseline in the same run.

    python bench/fleet.py --json  ->  {"racks", "api_p50_ms", "api_p99_ms", ...}

Cluster (issue 14): `--cluster N` runs the same load against N `fluxrig-mixer serve` nodes
routed together (tests/cluster_fixtures.MixerCluster: R3 shared state, TLS routes), the
simulated Racks spread over the nodes' Snake URLs (Hello and heartbeats then land on any
node through the queue group), the API probe going round the nodes (each node's own API
token), and prints the single-node figures of the same run size beside it:

    python bench/fleet.py --cluster 3 --racks 10000 --json -> {"cluster": {...}, "single": {...}}
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
import nats  # noqa: E402
from _common import emit  # noqa: E402

from fluxrig.passport import verify_passport  # noqa: E402
from fluxrig.wire import identity as I  # noqa: E402
from fluxrig.wire import messages as W  # noqa: E402
from fluxrig.wire import subjects as S  # noqa: E402
from fluxrig.wire.bundle import read_bundle  # noqa: E402

HELLO_TIMEOUT_S = 5.0  # a Rack waits this long for the answer to a Hello, then sends another
HELLO_ATTEMPTS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(port, token, names: list[str], seconds: float) -> dict[str, list[float]]:
    """Sequential GETs on one keep-alive connection per node (`port`/`token` may be lists:
    request i goes to node i % N); latencies per route in ms."""
    ports, tokens = (port, token) if isinstance(port, list) else ([port], [token])
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=10) for p in ports]
    routes = ["/api/v1/racks", "/api/v1/racks/{name}", "/api/v1/health", "/metrics"]
    out: dict[str, list[float]] = {r: [] for r in routes}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        route = routes[i % len(routes)]
        path = route.replace("{name}", random.choice(names))
        k = (i // len(routes)) % len(conns)
        t0 = time.perf_counter()
        conns[k].request("GET", path, headers={"Authorization": f"Bearer {tokens[k]}"})
        resp = conns[k].getresponse()
        resp.read()
        out[route].append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise RuntimeError(f"GET {path} on node {k}: HTTP {resp.status}")
        i += 1
        time.sleep(0.005)
    for c in conns:
        c.close()
    return out


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * (len(values) - 1)))))
    return round(values[k], 2)


class Fleet:
    def __init__(self, bundle, n: int, interval: float, urls: list[str] | None = None):
        # The enrollment bundle (one multi-use token for the simulated fleet); TLS against its CA.
        self.url, self.token, self.pub = list(bundle.urls), bundle.token, bundle.mixer_key_bytes[0]
        self.urls = urls or self.url  # a cluster: Rack i uses node i % N (Hello and its connection)
        self.tls = bundle.ssl_context()
        self.n, self.interval = n, interval
        self.racks: list[dict] = []
        self.beats = 0
        self.beat_errors = 0
        self.hello_retries = 0  # Hellos sent again after no answer (dropped past enrollment.hello_rate)
        self.running = False
        self.conns = []

    async def enroll(self, concurrency: int = 256) -> None:
        ncs = [await nats.connect([u], tls=self.tls, inbox_prefix=S.ENROLL_INBOX) for u in self.urls]
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int):
            nc = ncs[i % len(ncs)]
            async with sem:
                sk, pk = W.new_reply_keypair()
                seed = I.new_user_seed()
                hello = W.Hello(
                    self.token, f"sim-{i:04d}", pk, "bench", nkey=I.public_key(seed), nkey_sig=I.prove(seed, pk)
                )
                for _attempt in range(HELLO_ATTEMPTS):  # as a Rack does: a Hello the Mixer dropped is sent again
                    try:
                        msg = await nc.request(S.HELLO, hello.encode(), timeout=HELLO_TIMEOUT_S)
                        break
                    except nats.errors.TimeoutError:
                        self.hello_retries += 1
                else:
                    raise RuntimeError(f"hello {i}: no answer to {HELLO_ATTEMPTS} Hellos")
                reply = W.HelloReply.decode(msg.data)
                if not reply.sealed:
                    raise RuntimeError(f"hello {i} refused: {reply.status} {reply.message}")
                passport = verify_passport(W.unseal(sk, reply.sealed), [self.pub])
                self.racks.append({"name": passport.rack_name, "seed": seed, "serial": passport.serial,
                                   "url": self.urls[i % len(self.urls)]})  # fmt: skip

        await asyncio.gather(*(one(i) for i in range(self.n)))
        for nc in ncs:
            await nc.close()

    async def connect(self, concurrency: int = 25) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(r):
            async with sem:
                for _attempt in range(20):
                    try:
                        r["nc"] = await nats.connect(
                            [r.get("url") or self.url[0]],
                            nkeys_seed_str=r["seed"],
                            tls=self.tls,
                            inbox_prefix=S.inbox_prefix(r["name"]),
                            allow_reconnect=True,
                            max_reconnect_attempts=5,
                            reconnect_time_wait=0.2,
                        )
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
                msg = await r["nc"].request(
                    S.heartbeat(r["name"]),
                    W.Heartbeat(r["serial"], uptime=time.monotonic() - start, stats={"tasks": 12}).encode(),
                    timeout=5,
                )
                reply = W.HeartbeatReply.decode(msg.data)
                if reply.passport:
                    r["serial"] = verify_passport(reply.passport, [self.pub]).serial
                self.beats += 1
            except Exception:
                self.beat_errors += 1
            await asyncio.sleep(self.interval)


async def run(args) -> dict:
    if getattr(args, "cluster", 0):
        single = await run_single(args)
        return {"cluster": await run_cluster(args), "single": single}
    return await run_single(args)


async def measure(args, fleet: Fleet, api_ports, tokens) -> dict:
    """Enroll, connect, probe idle, beat, probe loaded: the figures (one node or several)."""
    t0 = time.perf_counter()
    await fleet.enroll()
    enroll_s = time.perf_counter() - t0
    await fleet.connect()
    names = [r["name"] for r in fleet.racks]
    idle = await asyncio.to_thread(probe, api_ports, tokens, names, args.seconds / 2)
    fleet.running = True
    beaters = [asyncio.get_running_loop().create_task(fleet.beat_forever(r)) for r in fleet.racks]
    await asyncio.sleep(args.interval * 2)
    beats0, t1 = fleet.beats, time.perf_counter()
    loaded = await asyncio.to_thread(probe, api_ports, tokens, names, args.seconds)
    hb_rate = (fleet.beats - beats0) / (time.perf_counter() - t1)
    racks_seen = []
    for port, token in zip(api_ports, tokens, strict=True):  # every node knows every Rack
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/api/v1/racks", headers={"Authorization": f"Bearer {token}"})
        racks_seen.append(json.loads(c.getresponse().read()))
    fleet.running = False
    for t in beaters:
        t.cancel()
    racks = racks_seen[0]
    all_loaded = [v for vs in loaded.values() for v in vs]
    all_idle = [v for vs in idle.values() for v in vs]
    return {
        "nodes": len(api_ports),
        "racks": len(racks),
        "racks_per_node": [len(r) for r in racks_seen],
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
        "hello_retries": fleet.hello_retries,
    }


async def run_cluster(args) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.join(ROOT, "mixer"))
    from cluster_fixtures import MixerCluster

    tmp = tempfile.mkdtemp(prefix="fluxrig-fleet-cluster-")
    cluster = MixerCluster(
        tmp, args.cluster, replicas=min(3, args.cluster), enrollment_toml="auto_adopt = true",
        extra_toml='[logging]\nlevel = "warning"\n',
    )  # fmt: skip
    if args.interval != 1.0:
        raise SystemExit("--cluster runs with the fixture's 1 s heartbeat interval")
    fleet = None
    try:
        await asyncio.to_thread(cluster.start)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
        bundle_path = os.path.join(tmp, "fleet.bundle")
        subprocess.run(
            [sys.executable, "-m", "fluxrig_mixer.cli", "tokens", "create", "-c", str(cluster.nodes[0].conf),
             "--uses", str(args.racks), "--bundle", bundle_path],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(2.0)  # node 1's Mixer pushes its token file to the shared state (tokens.POLL_S)
        fleet = Fleet(read_bundle(bundle_path), args.racks, args.interval, cluster.snake_urls)
        ports = [n.api_port for n in cluster.nodes]
        return await measure(args, fleet, ports, [n.token for n in cluster.nodes])
    finally:
        if fleet is not None:
            for r in fleet.racks:
                if r.get("nc") is not None:
                    try:
                        await r["nc"].close()
                    except Exception:
                        pass
        await asyncio.to_thread(cluster.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def run_single(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="fluxrig-fleet-bench-")
    api_port, snake_port = free_port(), free_port()
    conf = os.path.join(tmp, "fluxrig-mixer.toml")
    with open(conf, "w") as fh:
        fh.write(
            f'[base]\nstate_dir = "{tmp}/data"\n[api]\nhost = "127.0.0.1"\nport = {api_port}\n'
            f'[snake]\nhost = "127.0.0.1"\nport = {snake_port}\n'
            f'[enrollment]\nauto_adopt = true\nheartbeat_interval = "{args.interval}s"\n'
            '[logging]\nlevel = "warning"\n'
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
    prof = ["-m", "cProfile", "-o", os.environ["FLEET_PROFILE"]] if os.environ.get("FLEET_PROFILE") else []
    log_path = os.environ.get("FLEET_MIXER_LOG")  # the Mixer's log, to see why a Hello failed
    proc = subprocess.Popen(
        [sys.executable, *prof, "-m", "fluxrig_mixer.cli", "serve", "-c", conf],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w") if log_path else subprocess.DEVNULL,  # noqa: SIM115
    )
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
        bundle_path = os.path.join(tmp, "fleet.bundle")
        subprocess.run(
            [sys.executable, "-m", "fluxrig_mixer.cli", "tokens", "create", "-c", conf, "--uses", str(args.racks),
             "--bundle", bundle_path],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        fleet = Fleet(read_bundle(bundle_path), args.racks, args.interval)
        return await measure(args, fleet, [api_port], [token])
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
    p.add_argument("--cluster", type=int, default=0, help="also run N clustered nodes (issue 14) beside one node")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
