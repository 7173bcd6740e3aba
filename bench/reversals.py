"""Reversals: how fast owed reversals reach an issuer that answers them, how soon after the
deadline the first attempt leaves, and what reversals cost the switch's normal traffic.

Three runs against real `fluxrig run` processes on loopback:

1. **Cost** (`tps_on` / `tps_off`, `p99_ms_on` / `p99_ms_off`): the switch scenario
   (scenarios/iso8583-switch.yaml) in front of the authorizer scenario as its issuer, loaded by
   fluxrig's ISO 8583 load generator at full speed and at a held rate, once with reversals on
   (every 0200 journaled before it is sent and closed before its reply goes back: two fsync'd
   group commits per transaction) and once with `reversal: {enabled: false}`. `cost_tps` and
   `cost_p99` are the relative losses (target <= 0.10).
2. **First attempt** (`first_attempt_p99_ms`): an issuer written here (pyiso8583) that approves
   and never answers 0200s but answers every reversal at once, fed `--steady-tps` requests/s:
   each request's deadline (its arrival at the issuer + the switch's TTL) to the arrival of its
   first 0400 (target <= 1000 ms).
3. **Drain** (`reversals_per_s`): `--burst` requests at once to that issuer; from the first
   reversal's arrival to the last one's (target >= 500/s), window 32.

Wall-clock figures need a quiet box. So that a run on a shared one still says something, the
bench also reports what does not depend on how much of the CPU the switch got: the switch
process's CPU per transaction with reversals on and off (`cpu_us_per_txn_on/off`, from
/proc/<pid>/stat over the peak run) and per reversal attempt sent (`cpu_us_per_attempt`, over
the drain), the disk's fsync latency (`fsync_p50_ms`/`fsync_p99_ms`, 50 small fsync'd writes in
the bench's directory: the journal pays one per group commit) and the load average at the start
and the end (`load_1m`).

    python bench/reversals.py --json            # --skip-cost: only the first-attempt and drain runs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import iso8583  # noqa: E402
from _common import PY, ROOT, backend, emit, free_port, stop, wait_port  # noqa: E402
from iso8583.specs import default_ascii  # noqa: E402

from fluxrig.tools.iso_load import run_load  # noqa: E402

TTL_S = 0.5
SPEC = default_ascii


def spawn(args: list[str], env: dict) -> subprocess.Popen:
    """A Rack process whose log goes to a file in its state dir: a stderr pipe nobody reads
    fills after 64 KiB of warnings (a burst of timeouts writes that much) and then blocks the
    Rack's event loop, which stalled whole drain runs."""
    log_path = os.path.join(env.get("FLUXRIG_BASE_STATE_DIR") or tempfile.mkdtemp(), "rack.log")
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file)


def _switch_scenario(d: str, port: int, issuer: int, reversals: bool) -> str:
    with open(os.path.join(ROOT, "scenarios", "iso8583-switch.yaml")) as fh:
        text = fh.read()
    text = (
        text.replace("${FLUXRIG_ISO_BIND:-0.0.0.0:8583}", f"127.0.0.1:{port}")
        .replace("${FLUXRIG_ISSUER_A:-127.0.0.1:8590}", f"127.0.0.1:{issuer}")
        .replace("${FLUXRIG_ISSUER_B:-127.0.0.1:8591}", f"127.0.0.1:{free_port()}")
        .replace("${FLUXRIG_SWITCH_TTL:-10s}", f"{TTL_S}s")
    )
    if not reversals:
        text = text.replace(
            'reversal: {mti: "0400", when: [timeout, late_approval, link_lost]}', "reversal: {enabled: false}"
        )
        assert "enabled: false" in text
    path = os.path.join(d, f"switch-{'on' if reversals else 'off'}.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    return path


def _switch(d: str, port: int, issuer: int, reversals: bool, base: dict):
    scen = _switch_scenario(d, port, issuer, reversals)
    env = dict(base, FLUXRIG_BASE_STATE_DIR=tempfile.mkdtemp(prefix="fluxrig-rev-switch-", dir=d))
    return spawn([PY, "-m", "fluxrig.cli.main", "run", "--scenario", scen], env)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def fsync_probe(d: str, n: int = 50) -> tuple[float, float]:
    """p50, p99 ms of a 64-byte write + fsync in `d` (what one group commit costs at least)."""
    path = os.path.join(d, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 64)
            os.fsync(fd)
            out.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return round(statistics.median(out), 2), round(_pct(out, 0.99), 2)


async def _loads(port: int, seconds: float, rate: float, concurrency: int, pid: int):
    target = f"127.0.0.1:{port}"
    await run_load(target, duration=0.5, concurrency=1, timeout=10)  # the issuer leg comes up
    await run_load(target, duration=1.0, concurrency=concurrency)  # warm-up
    c0 = cpu_s(pid)
    peak = await run_load(target, duration=seconds, concurrency=concurrency)
    cpu_per_txn = (cpu_s(pid) - c0) / max(1, peak.tps * seconds) * 1e6
    held = await run_load(target, duration=seconds, rate=rate, concurrency=1000)
    return peak, held, cpu_per_txn


def cost(d: str, base: dict, args) -> dict:
    host = free_port()
    issuer = spawn(
        [PY, "-m", "fluxrig.cli.main", "run", "--scenario", "scenarios/iso8583-authorizer.yaml"],
        dict(
            base,
            FLUXRIG_BASE_STATE_DIR=tempfile.mkdtemp(prefix="fluxrig-rev-host-", dir=d),
            FLUXRIG_ISO_BIND=f"127.0.0.1:{host}",
        ),
    )
    out = {}
    try:
        wait_port(host, 90.0)
        for label, on in (("off", False), ("on", True)):
            port = free_port()
            sw = _switch(d, port, host, on, base)
            try:
                wait_port(port, 90.0)
                peak, held, cpu_per_txn = asyncio.run(_loads(port, args.seconds, args.rate, args.concurrency, sw.pid))
            finally:
                stop(sw)
            out[f"tps_{label}"] = round(peak.tps)
            out[f"peak_p99_ms_{label}"] = peak.p99_ms
            out[f"p99_ms_{label}"] = held.p99_ms
            out[f"held_tps_{label}"] = round(held.tps)
            out[f"timeouts_{label}"] = peak.timeouts + held.timeouts
            out[f"cpu_us_per_txn_{label}"] = round(cpu_per_txn)
    finally:
        stop(issuer)
    out["cost_tps"] = round(1 - out["tps_on"] / out["tps_off"], 3) if out["tps_off"] else None
    out["cost_p99"] = round(out["p99_ms_on"] / out["p99_ms_off"] - 1, 3) if out["p99_ms_off"] else None
    out["cost_cpu"] = round(out["cpu_us_per_txn_on"] / out["cpu_us_per_txn_off"] - 1, 3)
    return out


class SilentIssuer:
    """Approves 0200s without answering; answers each reversal at once. Times what it sees."""

    def __init__(self):
        self.arrived: dict[str, float] = {}
        self.first_reversal: dict[str, float] = {}
        self.reversal_times: list[float] = []

    async def serve(self, reader, writer):
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                body = await reader.readexactly(n)
                now = time.monotonic()
                doc, _ = iso8583.decode(body, SPEC)
                if doc["t"] in ("0200", "0100"):
                    self.arrived.setdefault(doc["11"], now)
                elif doc["t"] in ("0400", "0401"):
                    self.reversal_times.append(now)
                    self.first_reversal.setdefault(doc.get("90", "")[4:10], now)
                    reply = {k: v for k, v in doc.items() if k not in ("p", "1", "b")}
                    reply.update({"t": "0410", "39": "00"})
                    raw, _ = iso8583.encode(reply, SPEC)
                    writer.write(len(raw).to_bytes(2, "big") + bytes(raw))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p * (len(values) - 1))))]


async def _saga_runs(d: str, base: dict, args) -> dict:
    issuer = SilentIssuer()
    host = free_port()
    server = await asyncio.start_server(issuer.serve, "127.0.0.1", host)
    port = free_port()
    sw = _switch(d, port, host, True, base)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, wait_port, port, 90.0)
        target = f"127.0.0.1:{port}"
        await run_load(target, duration=0.5, concurrency=1, timeout=10, mix=("0800",))
        # steady: deadline -> first attempt
        await run_load(target, duration=args.steady_seconds, rate=args.steady_tps, concurrency=1000, mix=("0200",))
        await _settle(issuer, len(issuer.arrived))
        late = [
            (issuer.first_reversal[s] - (t + TTL_S)) * 1000
            for s, t in issuer.arrived.items()
            if s in issuer.first_reversal
        ]
        steady_missing = len(issuer.arrived) - len(late)
        # burst: drain rate
        issuer.reversal_times.clear()
        issuer.arrived.clear()
        issuer.first_reversal.clear()
        await run_load(target, duration=0.2, concurrency=args.burst, mix=("0200",), timeout=TTL_S + 5)
        sent = len(issuer.arrived)
        c0 = cpu_s(sw.pid)
        await _settle(issuer, sent, timeout=120)
        drain_cpu = cpu_s(sw.pid) - c0
        times = issuer.reversal_times
        span = (times[-1] - times[0]) if len(times) > 1 else 0.0
        return {
            "first_attempt_p50_ms": round(_pct(late, 0.5), 1),
            "first_attempt_p99_ms": round(_pct(late, 0.99), 1),
            "steady_requests": len(late) + steady_missing,
            "steady_unreversed": steady_missing,
            "burst_requests": sent,
            "burst_reversed": len(set(issuer.arrived) & set(issuer.first_reversal)),
            "reversals_per_s": round((len(times) - 1) / span) if span else None,
            "burst_attempts": len(times),
            "cpu_us_per_attempt": round(drain_cpu / max(1, len(times)) * 1e6),
        }
    finally:
        await loop.run_in_executor(None, stop, sw)
        server.close()


async def _settle(issuer: SilentIssuer, expected: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and len(set(issuer.arrived) & set(issuer.first_reversal)) < expected:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each cost load run")
    ap.add_argument("--rate", type=float, default=1000, help="held rate of the cost runs (requests/s)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight in the peak cost runs")
    ap.add_argument("--steady-tps", type=float, default=200, help="requests/s never answered (first-attempt run)")
    ap.add_argument("--steady-seconds", type=float, default=4.0)
    ap.add_argument("--burst", type=int, default=2000, help="requests sent at once (drain run)")
    ap.add_argument("--skip-cost", action="store_true", help="only the first-attempt and drain runs")
    args = ap.parse_args(argv)
    base = dict(os.environ, FLUXRIG_LOGGING_LEVEL="warning", PYTHONPATH=ROOT)
    d = tempfile.mkdtemp(prefix="fluxrig-bench-reversals-")
    load0 = os.getloadavg()[0]
    out = {"fsync_p50_ms": None, "fsync_p99_ms": None}
    out["fsync_p50_ms"], out["fsync_p99_ms"] = fsync_probe(d)
    if not args.skip_cost:
        out.update(cost(d, base, args))
    out.update(asyncio.run(_saga_runs(d, base, args)))
    out["load_1m"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
    out["ttl_s"] = TTL_S
    out["backend"] = backend()
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
