"""Hot reload under load: tcp-echo with a `map` whose config alternates between two versions,
reloaded N times with SIGHUP while clients send at a fixed rate.

Every request carries a sequence number; the reply says which map version answered. Prints
{"reloads", "lost", "duplicated", "resets", "max_gap_ms", "p99_added_latency_ms", ...}:
lost = requests never answered, duplicated = answered twice, resets = connections that
broke, max_gap_ms = longest silence between replies while reloading, p99_added_latency_ms =
p99 latency during the reloads minus p99 in a quiet phase just before.
Targets: 0, 0, 0, max_gap_ms <= 100, p99_added_latency_ms <= 50.

--rebuild-io (issue 18): the same clients and Rack go through two phases of N reloads each: a
baseline that changes only the map (the server gear is kept), then one that also changes the
server gear's idle_timeout, so every reload rebuilds the I/O gear and hands its live
connections over. Per phase: reload latency as the Rack logs it (total and cut-over, p50/p99/
max over the reloads), lost, duplicated, max_gap_ms and p99 reply latency; `resets` and `lost`
are for the whole run. Targets: resets 0, lost 0, rebuild-phase max_gap_ms <= 20.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PY, ROOT, backend, emit, free_port, spawn, stop, wait_port  # noqa: E402

SCENARIO = """
meta: {{name: reload-bench, version: "{version}"}}
gears:
  - name: gateway
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}", framing: delimiter, delimiter_append: true{gw_extra}}}
  - name: xf
    type: map
    config:
      ops:
        - {{set: raw, value: "{tag}:{{{{ raw }}}}"}}
wires:
  - {{from: gateway.out, to: xf.in}}
  - {{from: xf.out, to: gateway.in}}
"""


def write_scenario(path: str, port: int, n: int, rebuild_io: bool = False, phase: int = 1) -> None:
    tag = "A" if n % 2 == 0 else "B"
    gw_extra = f", idle_timeout: {300 + n % 2}s" if rebuild_io else ""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(SCENARIO.format(version=f"{phase}.0.{n}", port=port, tag=tag, gw_extra=gw_extra))
    os.replace(tmp, path)  # the Rack never reads a half-written file


class Stats:
    def __init__(self):
        self.sent: dict[int, float] = {}
        self.answered: dict[int, int] = {}
        self.latency: list[tuple[float, float]] = []  # (arrival time, latency)
        self.arrivals: list[float] = []
        self.resets = 0
        self.until = float("inf")  # client(until=None): run while loop.time() < this
        self.cpu: dict = {}  # window -> (Rack CPU seconds, wall seconds)


async def client(
    port: int, cid: int, rate_per_client: float, until: float | None, stats: Stats, offset: float = 0.0
) -> None:
    """One connection sending `rate_per_client` lines/s, its first `offset` s late: the clients
    are staggered, or they would all send in the same loop turn and the replies arrive in
    bursts 1/rate_per_client apart (16 ms for 16 clients at 1,000 lines/s), a gap the Rack
    does not cause that max_gap_ms would measure."""
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
    next_at = loop.time() + offset
    await asyncio.sleep(offset)
    seq = cid * 10_000_000
    try:
        while loop.time() < (stats.until if until is None else until):
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


async def drive(
    port: int, pid: int, scenario: str, reloads: int, rate: int, clients: int, quiet: float, period: float
) -> tuple[Stats, float, float]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    start = loop.time()
    reload_from = start + quiet
    until = reload_from + reloads * period + 0.3
    tasks = [loop.create_task(client(port, i + 1, rate / clients, until, stats, i / rate)) for i in range(clients)]
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
    max_gap = max((b - a for a, b in zip(arrivals, arrivals[1:], strict=False)), default=0.0)
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


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def drive_phases(port, pid, scenario, reloads, rate, clients, quiet, period):
    """Quiet, then the baseline phase (map only), a pause, then the rebuild-io phase. Also
    the Rack's CPU seconds per window: on a shared box wall-clock figures stretch with the
    load, the CPU a reload costs much less."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    start = loop.time()
    windows = {"quiet": (start + 0.5, start + quiet - 0.2)}
    cpu: dict[str, tuple[float, float]] = {}
    # the clients run until the last reload is done (a loaded box stretches the phases)
    tasks = [loop.create_task(client(port, i + 1, rate / clients, None, stats, i / rate)) for i in range(clients)]
    await asyncio.sleep(0.5)
    c0, q0 = cpu_seconds(pid), loop.time()
    await asyncio.sleep(quiet - 0.5)
    cpu["quiet"] = (cpu_seconds(pid) - c0, loop.time() - q0)
    for phase, rebuild in ((1, False), (2, True)):
        t0, c0 = loop.time(), cpu_seconds(pid)
        for n in range(1, reloads + 1):
            # phase 2's first file already differs from phase 1's last in the server gear
            write_scenario(scenario, port, n, rebuild_io=rebuild, phase=phase)
            os.kill(pid, signal.SIGHUP)
            await asyncio.sleep(period)
        key = "baseline" if phase == 1 else "rebuild_io"
        windows[key] = (t0, loop.time())
        cpu[key] = (cpu_seconds(pid) - c0, loop.time() - t0)
        await asyncio.sleep(1.0)
    stats.until = loop.time()
    await asyncio.gather(*tasks)
    stats.cpu = cpu
    return stats, windows


def window_figures(stats: Stats, w: tuple[float, float]) -> dict:
    lo, hi = w
    arrivals = sorted(t for t in stats.arrivals if lo <= t <= hi)
    gap = max((b - a for a, b in zip(arrivals, arrivals[1:], strict=False)), default=0.0)
    lat = [x for t, x in stats.latency if lo <= t <= hi]
    sent = [s for s, t in stats.sent.items() if lo <= t <= hi]
    return {
        "sent": len(sent),
        "lost": sum(1 for s in sent if s not in stats.answered),
        "duplicated": sum(1 for s in sent if stats.answered.get(s, 0) > 1),
        "max_gap_ms": round(gap * 1000, 2),
        "p50_ms": round(pct(lat, 0.5) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
    }


def run_rebuild_io(reloads: int = 100, rate: int = 1000, clients: int = 16, quiet: float = 2.0, period: float = 0.1):
    tmp = tempfile.mkdtemp(prefix="fluxrig-reload-io-")
    port = free_port()
    scenario = os.path.join(tmp, "reload.yaml")
    write_scenario(scenario, port, 0)
    env = dict(os.environ, FLUXRIG_BASE_STATE_DIR=tmp, PYTHONPATH=ROOT)
    log_path = os.path.join(tmp, "rack.log")
    # the Rack's log goes to a file: a pipe nobody reads during the run would fill and block it
    with open(log_path, "w") as log_file:
        rack = subprocess.Popen(
            [PY, "-m", "fluxrig.cli.main", "run", "--scenario", scenario],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True,
        )  # fmt: skip
        try:
            wait_port(port)
            stats, windows = asyncio.run(drive_phases(port, rack.pid, scenario, reloads, rate, clients, quiet, period))
        finally:
            stop(rack)
    with open(log_path) as fh:
        err = fh.read()
    per_phase: dict[str, dict[str, list]] = {p: {"total": [], "cut": [], "io": [], "handed": []} for p in "12"}
    for line in err.splitlines():
        at = line.find('event {"event":"reload"')
        if at < 0:
            continue
        ev = json.loads(line[at + len("event ") :])
        if not ev.get("ok") or ev.get("old_version") == ev.get("new_version"):
            continue
        bucket = per_phase.get(ev["new_version"].split(".", 1)[0])
        if bucket is None:
            continue
        bucket["total"].append(ev["duration_ms"])
        bucket["cut"].append(ev["cutover_ms"])
        if "gateway" in ev.get("rebuilt", ()):
            bucket["io"].append(ev["duration_ms"])
            bucket["handed"].append((ev.get("handover") or {}).get("gateway", {}))
    result: dict = {"mode": "rebuild_io", "reloads_requested": reloads, "clients": clients, "rate_msgs_per_s": rate}
    result["sent"] = len(stats.sent)
    result["lost"] = sum(1 for s in stats.sent if s not in stats.answered)
    result["duplicated"] = sum(1 for c in stats.answered.values() if c > 1)
    result["resets"] = stats.resets
    quiet_fig = window_figures(stats, windows["quiet"])
    q_cpu, q_wall = stats.cpu["quiet"]
    result["quiet"] = {
        "p50_ms": quiet_fig["p50_ms"],
        "p99_ms": quiet_fig["p99_ms"],
        "max_gap_ms": quiet_fig["max_gap_ms"],  # what the box and the clients cost with no reload
        "rack_cpu_pct": round(100 * q_cpu / q_wall, 1) if q_wall else 0.0,
    }
    for phase, key in (("1", "baseline"), ("2", "rebuild_io")):
        fig = window_figures(stats, windows[key])
        times = per_phase[phase]
        fig["reloads"] = len(times["total"])  # SIGHUPs that found a changed file (some coalesce under load)
        fig["reloads_rebuilding_io"] = len(times["io"])
        if times["handed"]:
            fig["connections_handed_over"] = sum(
                h.get("count", 0) for h in times["handed"] if h.get("connections") == "handover"
            )
            fig["connections_not_handed_over"] = sum(
                h.get("count", 0) for h in times["handed"] if h.get("connections") != "handover"
            )
        fig["reload_ms_p50"] = round(pct(times["total"], 0.5), 2)
        fig["reload_ms_p99"] = round(pct(times["total"], 0.99), 2)
        fig["reload_ms_max"] = round(max(times["total"], default=0.0), 2)
        fig["cutover_ms_max"] = round(max(times["cut"], default=0.0), 3)
        fig["p99_added_ms"] = round(max(0.0, fig["p99_ms"] - quiet_fig["p99_ms"]), 2)
        # the Rack's CPU beyond what the same traffic costs without reloads, per reload
        (q_cpu, q_wall), (p_cpu, p_wall) = stats.cpu["quiet"], stats.cpu[key]
        extra = p_cpu - (q_cpu / q_wall if q_wall else 0.0) * p_wall
        fig["rack_cpu_ms_per_reload"] = round(max(0.0, extra) * 1000 / max(1, fig["reloads"]), 2)
        fig["rack_cpu_pct"] = round(100 * p_cpu / p_wall, 1) if p_wall else 0.0  # noisy on a shared box
        result[key] = fig
    result["max_gap_ms"] = result["rebuild_io"]["max_gap_ms"]
    result["backend"] = backend()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--reloads", type=int, default=100, help="number of reloads (default 100)")
    ap.add_argument("--rate", type=int, default=1000, help="requests per second in total (default 1000)")
    ap.add_argument("--clients", type=int, default=None, help="client connections (default 4; 16 with --rebuild-io)")
    ap.add_argument(
        "--rebuild-io",
        action="store_true",
        help="a baseline phase of map-only reloads, then one where every reload also rebuilds the server gear",
    )
    args = ap.parse_args(argv)
    if args.rebuild_io:
        emit(run_rebuild_io(args.reloads, args.rate, args.clients or 16), args.json)
    else:
        emit(run(args.reloads, args.rate, args.clients or 4), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
