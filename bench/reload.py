"""Hot reload under load: tcp-echo with a `map` whose config alternates between two versions,
reloaded N times with SIGHUP while clients send at a fixed rate.

Every request carries a sequence number; the reply says which map version answered. Prints
{"reloads", "lost", "duplicated", "resets", "max_gap_ms", "p99_added_latency_ms", ...}:
lost = requests never answered, duplicated = answered twice, resets = connections that
broke, max_gap_ms = longest silence between replies while reloading, p99_added_latency_ms =
p99 latency during the reloads minus p99 in a quiet phase just before.
Targets: 0, 0, 0, max_gap_ms <= 100, p99_added_latency_ms <= 50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PY, ROOT, backend, emit, free_port, spawn, stop, wait_port  # noqa: E402

SCENARIO = """
meta: {{name: reload-bench, version: "{version}"}}
gears:
  - name: gateway
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}", framing: delimiter, delimiter_append: true}}
  - name: xf
    type: map
    config:
      ops:
        - {{set: raw, value: "{tag}:{{{{ raw }}}}"}}
wires:
  - {{from: gateway.out, to: xf.in}}
  - {{from: xf.out, to: gateway.in}}
"""


def write_scenario(path: str, port: int, n: int) -> None:
    tag = "A" if n % 2 == 0 else "B"
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(SCENARIO.format(version=f"1.0.{n}", port=port, tag=tag))
    os.replace(tmp, path)  # the Rack never reads a half-written file


class Stats:
    def __init__(self):
        self.sent: dict[int, float] = {}
        self.answered: dict[int, int] = {}
        self.latency: list[tuple[float, float]] = []  # (arrival time, latency)
        self.arrivals: list[float] = []
        self.resets = 0


async def client(port: int, cid: int, rate_per_client: float, until: float, stats: Stats) -> None:
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats.resets += 1
        return

    async def read_loop():
        while True:
            line = await reader.readline()
            if not line:
                return
            now = loop.time()
            m = re.match(rb"[AB]:(\d+)\n", line)
            if not m:
                continue
            seq = int(m.group(1))
            stats.answered[seq] = stats.answered.get(seq, 0) + 1
            stats.arrivals.append(now)
            stats.latency.append((now, now - stats.sent[seq]))

    rt = loop.create_task(read_loop())
    interval = 1.0 / rate_per_client
    next_at = loop.time()
    seq = cid * 10_000_000
    try:
        while loop.time() < until:
            seq += 1
            stats.sent[seq] = loop.time()
            writer.write(b"%d\n" % seq)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await writer.drain()
        # wait for the tail
        deadline = loop.time() + 3
        while loop.time() < deadline and any(s not in stats.answered for s in range(cid * 10_000_000 + 1, seq + 1)):
            await asyncio.sleep(0.05)
    except (ConnectionError, OSError):
        stats.resets += 1
    finally:
        if rt.done() and rt.exception():
            stats.resets += 1
        rt.cancel()
        writer.close()


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


async def drive(port: int, pid: int, scenario: str, reloads: int, rate: int, clients: int, quiet: float,
                period: float) -> tuple[Stats, float, float]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    start = loop.time()
    reload_from = start + quiet
    until = reload_from + reloads * period + 0.3
    tasks = [loop.create_task(client(port, i + 1, rate / clients, until, stats)) for i in range(clients)]
    await asyncio.sleep(max(0.0, reload_from - loop.time()))
    for n in range(1, reloads + 1):
        write_scenario(scenario, port, n)
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(period)
    await asyncio.gather(*tasks)
    return stats, reload_from, reload_from + reloads * period


def run(reloads: int = 100, rate: int = 1000, clients: int = 4, quiet: float = 2.0, period: float = 0.1) -> dict:
    tmp = tempfile.mkdtemp(prefix="fluxrig-reload-")
    port = free_port()
    scenario = os.path.join(tmp, "reload.yaml")
    write_scenario(scenario, port, 0)
    env = dict(os.environ, FLUXRIG_BASE_STATE_DIR=tmp, PYTHONPATH=ROOT)
    rack = spawn([PY, "-m", "fluxrig.cli.main", "run", "--scenario", scenario], env)
    try:
        wait_port(port)
        stats, r0, r1 = asyncio.run(drive(port, rack.pid, scenario, reloads, rate, clients, quiet, period))
    finally:
        stop(rack)
        err = rack.stderr.read() if rack.stderr else ""
    done = len(re.findall(r"reloaded 1\.0\.\d+ -> 1\.0\.\d+", err))
    lost = sum(1 for s in stats.sent if s not in stats.answered)
    dup = sum(1 for c in stats.answered.values() if c > 1)
    arrivals = sorted(t for t in stats.arrivals if r0 <= t <= r1)
    max_gap = max((b - a for a, b in zip(arrivals, arrivals[1:])), default=0.0)
    base = p99([lat for t, lat in stats.latency if t < r0 - 0.2 and t > r0 - quiet + 0.5])
    during = p99([lat for t, lat in stats.latency if r0 <= t <= r1])
    return {
        "reloads": done,
        "reloads_requested": reloads,
        "sent": len(stats.sent),
        "lost": lost,
        "duplicated": dup,
        "resets": stats.resets,
        "max_gap_ms": round(max_gap * 1000, 2),
        "p99_added_latency_ms": round(max(0.0, during - base) * 1000, 2),
        "p99_quiet_ms": round(base * 1000, 2),
        "p99_reloading_ms": round(during * 1000, 2),
        "rate_msgs_per_s": rate,
        "backend": backend(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--reloads", type=int, default=100, help="number of reloads (default 100)")
    ap.add_argument("--rate", type=int, default=1000, help="requests per second in total (default 1000)")
    ap.add_argument("--clients", type=int, default=4, help="client connections (default 4)")
    args = ap.parse_args(argv)
    emit(run(args.reloads, args.rate, args.clients), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
