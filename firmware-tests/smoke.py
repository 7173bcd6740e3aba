"""Smoke-test a frozen Rack for arm64/armhf inside its rootfs under QEMU user mode.

Run on the host by firmware-tests/run.sh with the project's .venv Python:

    smoke.py --arch arm64 --rootfs cache/rootfs-arm64 --binary /usr/local/bin/fluxrig \
             --scenarios /opt/fluxrig-smoke --host-binary cache/bin-arm64/fluxrig

The Rack runs as `chroot <rootfs> <binary> run --scenario ...` (binfmt_misc hands every target
ELF to qemu-<arch>-static), shares the host's network namespace, and is driven from the host:
  * tcp-echo: a line comes back upper-cased;
  * iso8583-authorizer: an 0800 and an 0200 from pyiso8583 come back 0810/00 and 0210/00;
  * serial echo: a pty pair made on the host; the Rack opens the slave through the rootfs's
    bind-mounted /dev/pts (needs the io_serial gear and scenarios/serial-echo.yaml here).
Prints one JSON line; exits 1 unless all three smoke tests passed. start_to_ready_s and idle_rss_mb come from the authorizer run (tcp-echo if
that scenario is missing) and are *emulated* figures: RSS is that of the qemu processes that
host the bootloader and its Python child, so it includes the emulator; guest_rss_estimate_mb
leaves out QEMU's own mappings (binary, host heap, translated-code buffer; see
guest_rss_estimate_mb) and qemu_baseline_rss_mb is qemu running `sleep`, for scale. Never read them as
native ARM numbers (anchors.md §8: performance is measured on real ARM hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tty

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
from _common import free_port  # noqa: E402
from footprint import echo_smoke, iso_smoke, process_tree, start_until_ready, stop, tree_rss_mb  # noqa: E402

START_TIMEOUT_S = 120.0  # an emulated one-file unpack + interpreter start on a busy 2-core box
IDLE_SETTLE_S = 3.0
SERIAL_TIMEOUT_S = 20.0


class Target:
    def __init__(self, rootfs: str, binary: str, scenarios: str):
        self.rootfs, self.binary, self.scenarios = rootfs, binary, scenarios
        self.state = "/var/lib/fluxrig-smoke"
        os.makedirs(os.path.join(rootfs, self.state.lstrip("/"), "tmp"), exist_ok=True)

    def has_scenario(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.rootfs, self.scenarios.lstrip("/"), f"{name}.yaml"))

    def cmd(self, *args: str, env: dict | None = None) -> list[str]:
        base = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TMPDIR": f"{self.state}/tmp",
            "FLUXRIG_BASE_STATE_DIR": f"{self.state}/data",
        }
        base.update(env or {})
        return ["chroot", self.rootfs, "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in base.items()), self.binary, *args]

    def run_scenario(self, name: str, bind_env: dict, port: int):
        path = f"{self.scenarios}/{name}.yaml"
        return start_until_ready(
            self.cmd("run", "--scenario", path, env=bind_env), dict(os.environ), port, START_TIMEOUT_S
        )

    def gears(self) -> set[str]:
        out = subprocess.run(self.cmd("gears", "list", "--json"), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            return set()
        data = json.loads(out.stdout)
        items = data if isinstance(data, list) else data.get("gears", data)
        return {g["type"] if isinstance(g, dict) else g for g in items}


HOST_ONLY_MAPPINGS = ("[heap]", "[stack]", "[vvar]", "[vdso]", "[vsyscall]")


def guest_rss_estimate_mb(pid: int) -> float:
    """RSS of one emulated process minus what is visibly QEMU's own: its binary, its host heap and
    stack, and the translated-code buffer (the one anonymous rwx mapping; 20-30 MB once a Python
    program has run). What is left is the guest's memory plus small QEMU allocations, so it is
    an upper estimate of what the same binary would use natively."""
    total = 0
    name = perms = ""
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    perms, name = head[1], (head[5] if len(head) > 5 else "")
                elif head[0] == "Rss:":
                    qemu = (
                        ("qemu-" in name and name.endswith("-static"))
                        or name in HOST_ONLY_MAPPINGS
                        or (perms == "rwxp" and not name)
                    )
                    if not qemu:
                        total += int(head[1])
    except OSError:
        return 0.0
    return total / 1024


def qemu_baseline_mb(rootfs: str) -> float:
    proc = subprocess.Popen(["chroot", rootfs, "/bin/sleep", "30"])
    try:
        time.sleep(1.0)
        return round(tree_rss_mb(proc.pid)[0], 1)
    finally:
        proc.kill()
        proc.wait()


def smoke_serial(t: Target, gears: set[str], notes: dict) -> bool:
    if "io_serial" not in gears:
        notes["serial"] = "io_serial gear not in this build"
        return False
    if not t.has_scenario("serial-echo"):
        notes["serial"] = "no serial-echo.yaml scenario"
        return False
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo of our own bytes before the Rack has opened and configured the line
    dev = os.ttyname(slave)  # /dev/pts/N, the same node inside the rootfs (bind-mounted /dev/pts)
    # The probe port only proves the Rack is up; the serial path is what is tested.
    port = free_port()
    proc = None
    try:
        proc, _t = t.run_scenario(
            "serial-echo", {"FLUXRIG_SERIAL_DEVICE": dev, "FLUXRIG_ECHO_BIND": f"127.0.0.1:{port}"}, port
        )
        # io_serial opens its device in the background: resend until the echo comes back.
        os.set_blocking(master, False)
        got, deadline, next_send = b"", time.monotonic() + SERIAL_TIMEOUT_S, 0.0
        while b"SERIAL SMOKE\n" not in got and time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                os.write(master, b"serial smoke\n")
                next_send = time.monotonic() + 3.0
            try:
                got += os.read(master, 256)
            except BlockingIOError:
                time.sleep(0.05)
        ok = b"SERIAL SMOKE\n" in got
        if not ok:
            notes["serial"] = f"read {got[-200:]!r}"
        return ok
    except Exception as exc:
        notes["serial"] = f"{type(exc).__name__}: {exc}"
        return False
    finally:
        if proc:
            stop(proc)
        os.close(master)
        os.close(slave)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, choices=["arm64", "armhf"])
    ap.add_argument("--rootfs", required=True)
    ap.add_argument("--binary", required=True, help="path of the binary inside the rootfs")
    ap.add_argument("--scenarios", required=True, help="scenario folder inside the rootfs")
    ap.add_argument("--host-binary", required=True, help="the same binary seen from the host (for its size)")
    args = ap.parse_args(argv)

    t = Target(args.rootfs, args.binary, args.scenarios)
    notes: dict[str, str] = {}
    result = {
        "arch": args.arch,
        "binary_bytes": os.path.getsize(args.host_binary),
        "start_to_ready_s": None,
        "idle_rss_mb": None,
        "smoke_tcp_echo": False,
        "smoke_iso8583": False,
        "smoke_serial": False,
    }

    version = subprocess.run(t.cmd("version", "--json"), capture_output=True, text=True, timeout=120)
    if version.returncode == 0:
        info = json.loads(version.stdout)
        result["version"] = {k: info.get(k) for k in ("version", "commit", "build_date", "backend", "backends")}
    else:
        notes["version"] = version.stderr.strip()[-300:]

    # tcp-echo
    port = free_port()
    try:
        proc, echo_start = t.run_scenario("tcp-echo", {"FLUXRIG_ECHO_BIND": f"127.0.0.1:{port}"}, port)
        try:
            result["smoke_tcp_echo"] = echo_smoke(port, timeout=30)
        finally:
            result["tcp_echo_exit_code"] = stop(proc, timeout=60)
        result["tcp_echo_start_to_ready_s"] = round(echo_start, 2)
    except Exception as exc:
        notes["tcp_echo"] = f"{type(exc).__name__}: {exc}"[-400:]

    # ISO 8583 authorizer; its run also gives the start and idle figures
    if t.has_scenario("iso8583-authorizer"):
        port = free_port()
        try:
            proc, start = t.run_scenario("iso8583-authorizer", {"FLUXRIG_ISO_BIND": f"127.0.0.1:{port}"}, port)
            try:
                time.sleep(IDLE_SETTLE_S)
                total, parts = tree_rss_mb(proc.pid)
                guest = sum(guest_rss_estimate_mb(p) for p in process_tree(proc.pid))
                result.update(
                    start_to_ready_s=round(start, 2),
                    idle_rss_mb=round(total, 1),
                    rss_parts_mb=[round(p, 1) for p in parts],
                    guest_rss_estimate_mb=round(guest, 1),
                    figures_scenario="iso8583-authorizer",
                )
                result["smoke_iso8583"], detail = iso_smoke(port, timeout=30)
                if not result["smoke_iso8583"]:
                    notes["iso8583"] = detail
            finally:
                result["iso8583_exit_code"] = stop(proc, timeout=60)
        except Exception as exc:
            notes["iso8583"] = f"{type(exc).__name__}: {exc}"[-400:]
    else:
        notes["iso8583"] = "scenarios/iso8583-authorizer.yaml does not exist in this tree"
    if result["start_to_ready_s"] is None and "tcp_echo_start_to_ready_s" in result:
        result.update(start_to_ready_s=result["tcp_echo_start_to_ready_s"], figures_scenario="tcp-echo")

    result["smoke_serial"] = smoke_serial(t, t.gears(), notes)
    result["emulated"] = True
    result["qemu_baseline_rss_mb"] = qemu_baseline_mb(args.rootfs)
    if notes:
        result["notes"] = notes
    print(json.dumps(result), flush=True)
    return 0 if all(result[k] for k in ("smoke_tcp_echo", "smoke_iso8583", "smoke_serial")) else 1


if __name__ == "__main__":
    sys.exit(main())
