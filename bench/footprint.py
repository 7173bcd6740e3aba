"""Footprint of the frozen Rack: binary size, start to ready, idle RSS (native x86-64).

    bench/footprint.py [--json] [--binary dist/fluxrig] [--runs 5] [--scenario iso8583-authorizer]

Start to ready = from the exec of the binary to the scenario's listening port answering a
connect (polled every 5 ms), median of `--runs` cold starts. Idle RSS = VmRSS summed over the
process tree (the one-file bootloader parent plus its Python child) after 2 s idle with the
scenario loaded. The one-file bundle unpacks into $TMPDIR on every start, so start time is
measured with TMPDIR on the disk file system (as the systemd unit does: /var/lib/fluxrig/tmp)
and on tmpfs (/dev/shm), and the unpacked size is reported.

Baseline in the same run: the same scenario started from source by this interpreter
(`python -m fluxrig.cli.main run`), so the ratios show what freezing costs or saves.
Targets (issue 8): binary <= 15 MB, idle RSS <= 40 MB, start to ready <= 0.5 s on x86-64.

The measuring helpers (`start_until_ready`, `tree_rss_mb`, `iso_smoke`, `echo_smoke`) are also
used by firmware-tests/smoke.py for the emulated arm64/armhf runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, emit, free_port  # noqa: E402

READY_POLL_S = 0.005
IDLE_SETTLE_S = 2.0
TARGETS = {"binary_bytes": 15 * 1024 * 1024, "idle_rss_mb": 40.0, "start_to_ready_s": 0.5}


# --- process tree measurement -------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: ppid is the 2nd field after ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mb(pid: int) -> tuple[float, list[float]]:
    """(total MB, per-process MB in tree order: bootloader first)."""
    parts = [rss_mb(p) for p in process_tree(pid)]
    return sum(parts), parts


def start_until_ready(cmd: list[str], env: dict, port: int, timeout: float) -> tuple[subprocess.Popen, float]:
    """Exec `cmd`, poll 127.0.0.1:port until a connect succeeds; (process, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = t0 + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode} before listening: {proc.stderr.read()[-2000:]}")
        if time.perf_counter() > deadline:
            stop(proc)
            raise TimeoutError(f"{cmd[0]} not listening on {port} after {timeout}s")
        time.sleep(READY_POLL_S)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM to the main PID only (as KillMode=mixed does); the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()
    return proc.returncode


# --- what the smoke scenarios answer ---------------------------------------------------------


def echo_smoke(port: int, timeout: float = 10.0) -> bool:
    async def go() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"smoke\n")
        line = await asyncio.wait_for(r.readline(), timeout)
        w.close()
        return line

    return asyncio.run(go()) == b"SMOKE\n"


def iso_smoke(port: int, timeout: float = 10.0) -> tuple[bool, str]:
    """An 0800 and an 0200 from an independent ISO 8583 implementation (pyiso8583)."""
    try:
        import iso8583
        from iso8583.specs import default_ascii
    except ImportError:
        return False, "pyiso8583 is not installed in the host venv"
    import copy

    spec = copy.deepcopy(default_ascii)

    def frame(doc: dict) -> bytes:
        raw, _ = iso8583.encode(doc, spec)
        return len(raw).to_bytes(2, "big") + bytes(raw)

    net = {"t": "0800", "7": "1127120000", "11": "000001", "41": "SMOKE001", "70": "301"}
    auth = {
        "t": "0200",
        "2": "4111111111111111",
        "3": "000000",
        "4": "000000010000",
        "7": "1127120000",
        "11": "000002",
        "12": "120000",
        "13": "1127",
        "37": "RRN000000001",
        "41": "SMOKE001",
        "42": "MERCHANT0000001",
        "49": "978",
    }

    async def go() -> list[dict]:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(frame(net) + frame(auth))
        out = []
        for _ in range(2):
            n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), timeout), "big")
            out.append(iso8583.decode(await asyncio.wait_for(r.readexactly(n), timeout), spec)[0])
        w.close()
        return out

    try:
        a, b = asyncio.run(go())
    except Exception as exc:  # the smoke result is a verdict, not a crash of the harness
        return False, f"{type(exc).__name__}: {exc}"
    ok = (
        a.get("t") == "0810"
        and a.get("39") == "00"
        and a.get("11") == "000001"
        and b.get("t") == "0210"
        and b.get("39") == "00"
        and b.get("11") == "000002"
    )
    return ok, f"{a.get('t')}/{a.get('39')} {b.get('t')}/{b.get('39')}"


# --- native x86-64 run --------------------------------------------------------------------------


def _scenario_path(name: str) -> str:
    return os.path.join(ROOT, "scenarios", f"{name}.yaml")


def _bind_env(scenario: str, port: int) -> dict:
    key = "FLUXRIG_ISO_BIND" if scenario.startswith("iso8583") else "FLUXRIG_ECHO_BIND"
    return {key: f"127.0.0.1:{port}"}


def measure(cmd: list[str], scenario: str, runs: int, tmpdir: str, timeout: float = 30.0) -> dict:
    starts, rss, parts, unpacked, exits, smoke = [], 0.0, [], 0, [], None
    for i in range(runs):
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="fp-state-") as state:
            env = dict(os.environ, TMPDIR=tmpdir, FLUXRIG_BASE_STATE_DIR=state, **_bind_env(scenario, port))
            env.pop("NOTIFY_SOCKET", None)
            proc, t = start_until_ready(cmd + ["run", "--scenario", _scenario_path(scenario)], env, port, timeout)
            starts.append(t)
            if i == 0:
                time.sleep(IDLE_SETTLE_S)
                rss, parts = tree_rss_mb(proc.pid)
                unpacked = _unpacked_bytes(tmpdir)
                smoke = iso_smoke(port)[0] if scenario.startswith("iso8583") else echo_smoke(port)
            exits.append(stop(proc))
    return {
        "start_to_ready_s": round(statistics.median(starts), 3),
        "start_min_s": round(min(starts), 3),
        "idle_rss_mb": round(rss, 1),
        "rss_parts_mb": [round(p, 1) for p in parts],
        "unpacked_bytes": unpacked,
        "smoke": smoke,
        "exit_codes_ok": all(c == 0 for c in exits),
    }


def _unpacked_bytes(tmpdir: str) -> int:
    total = 0
    for d in os.listdir(tmpdir):
        if d.startswith("_MEI"):
            for base, _dirs, files in os.walk(os.path.join(tmpdir, d)):
                total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--binary", default=os.path.join(ROOT, "dist", "fluxrig"), help="frozen Rack (make binary)")
    ap.add_argument("--runs", type=int, default=5, help="cold starts per measurement (median reported)")
    ap.add_argument("--scenario", default="iso8583-authorizer", help="scenario name under scenarios/")
    args = ap.parse_args(argv)

    if not os.path.exists(args.binary):
        print(f"{args.binary} missing: run `make binary` first", file=sys.stderr)
        return 2
    scenario, note = args.scenario, None
    if not os.path.exists(_scenario_path(scenario)):
        note = f"{scenario}.yaml not found; measured with tcp-echo"
        scenario = "tcp-echo"

    disk_tmp = os.path.join(ROOT, "build", "footprint-tmp")  # same file system as /var/lib
    os.makedirs(disk_tmp, exist_ok=True)
    frozen = measure([args.binary], scenario, args.runs, disk_tmp)
    tmpfs = None
    if os.path.isdir("/dev/shm"):
        shm = tempfile.mkdtemp(prefix="fp-", dir="/dev/shm")
        try:
            tmpfs = measure([args.binary], scenario, args.runs, shm)
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    source = measure([sys.executable, "-m", "fluxrig.cli.main"], scenario, args.runs, disk_tmp)

    result = {
        "bench": "footprint",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "scenario": scenario,
        "binary_bytes": os.path.getsize(args.binary),
        "start_to_ready_s": frozen["start_to_ready_s"],
        "idle_rss_mb": frozen["idle_rss_mb"],
        "rss_parts_mb": frozen["rss_parts_mb"],
        "unpacked_bytes": frozen["unpacked_bytes"],
        "start_to_ready_tmpfs_s": tmpfs["start_to_ready_s"] if tmpfs else None,
        "smoke_ok": frozen["smoke"],
        "sigterm_exit_0": frozen["exit_codes_ok"],
        "baseline_source_start_to_ready_s": source["start_to_ready_s"],
        "baseline_source_idle_rss_mb": source["idle_rss_mb"],
        "start_ratio_vs_source": round(frozen["start_to_ready_s"] / source["start_to_ready_s"], 2),
        "rss_ratio_vs_source": round(frozen["idle_rss_mb"] / source["idle_rss_mb"], 2),
        "within_targets": {
            "binary_bytes": os.path.getsize(args.binary) <= TARGETS["binary_bytes"],
            "idle_rss_mb": frozen["idle_rss_mb"] <= TARGETS["idle_rss_mb"],
            "start_to_ready_s": frozen["start_to_ready_s"] <= TARGETS["start_to_ready_s"],
        },
        "runs": args.runs,
    }
    if note:
        result["note"] = note
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
