"""The systemd units in systemd/ and the Rack's side of the sd_notify protocol.

* `systemd-analyze verify` accepts both units (and the Rack with its serial drop-in) without a
  single warning. The only change made before verifying is the path of the executable: the
  units name the installed location, the test points it at an executable that exists here.
* A real Rack (from source, and the frozen one-file binary) under a real AF_UNIX datagram
  NOTIFY_SOCKET with WATCHDOG_USEC/WATCHDOG_PID set the way systemd sets them: READY=1 once the
  scenario answers, WATCHDOG=1 keep-alives, SIGHUP to the main PID (ExecReload=) gives
  RELOADING=1 then READY=1, and SIGTERM to the main PID only (KillMode=mixed) gives STOPPING=1
  and exit 0.

`systemd-analyze` comes from Debian's `systemd` package; `systemd/install-test-tools.sh`
installs it (run by `make test` before the suite).
"""

from __future__ import annotations

import array
import asyncio
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from helpers import ROOT, free_port, tcp_lines

UNITS = os.path.join(ROOT, "systemd")
RACK_UNIT = os.path.join(UNITS, "fluxrig.service")
MIXER_UNIT = os.path.join(UNITS, "fluxrig-mixer.service")
SERIAL_DROPIN = os.path.join(UNITS, "fluxrig.service.d", "serial-example.conf")
RACK_EXEC = "/usr/local/bin/fluxrig"
MIXER_EXEC = "/opt/fluxrig-mixer/fluxrig-mixer"
BINARY = os.path.join(ROOT, "dist", "fluxrig")

# Keep-alive period asked of the Rack in the notify tests (WATCHDOG_USEC/2 = 0.15 s).
WATCHDOG_USEC = 300_000
NOTIFY_TIMEOUT = 20.0  # generous: the one-file binary unpacks itself first


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if not path:
        pytest.fail("systemd-analyze not found: run systemd/install-test-tools.sh (make test does)")
    return path


def _verify(tmp_path, unit_src: str, exec_from: str, exec_to: str, dropins=()) -> None:
    text = open(unit_src, encoding="utf-8").read()
    assert exec_from in text
    name = os.path.basename(unit_src)
    (tmp_path / name).write_text(text.replace(exec_from, exec_to), encoding="utf-8")
    if dropins:
        d = tmp_path / f"{name}.d"
        d.mkdir()
        for src in dropins:
            shutil.copy(src, d / os.path.basename(src))
    res = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(tmp_path / name)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    # verify reports unknown keys and bad values as warnings with exit 0: none are allowed.
    assert res.stderr.strip() == "", res.stderr


def _an_executable(name: str) -> str:
    for cand in (os.path.join(os.path.dirname(sys.executable), name), shutil.which(name), "/bin/true"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise AssertionError("no executable to stand in for the unit's ExecStart")


def test_rack_unit_verifies(tmp_path):
    _verify(tmp_path, RACK_UNIT, RACK_EXEC, _an_executable("fluxrig"))


def test_rack_unit_with_serial_dropin_verifies(tmp_path):
    _verify(tmp_path, RACK_UNIT, RACK_EXEC, _an_executable("fluxrig"), dropins=[SERIAL_DROPIN])


def test_mixer_unit_verifies(tmp_path):
    _verify(tmp_path, MIXER_UNIT, MIXER_EXEC, _an_executable("fluxrig-mixer"))


def _unit_values(path: str, key: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^{key}=(.*)$", open(path).read(), re.M)]


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m.group(2)]


def test_rack_unit_stop_timeout_exceeds_drain_timeout():
    from fluxrig.config import load_config

    drain = load_config(None, environ={}).rack.drain_timeout
    (stop,) = _unit_values(RACK_UNIT, "TimeoutStopSec")
    assert _seconds(stop) > drain, (stop, drain)
    # The things the one-file layout depends on (see the comments in the unit).
    assert _unit_values(RACK_UNIT, "NotifyAccess") == ["all"]
    assert _unit_values(RACK_UNIT, "KillMode") == ["mixed"]
    assert "TMPDIR=/var/lib/fluxrig/tmp" in _unit_values(RACK_UNIT, "Environment")
    assert _unit_values(RACK_UNIT, "StateDirectory") == ["fluxrig fluxrig/tmp"]


# --- sd_notify -------------------------------------------------------------------------------------


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's: AF_UNIX datagrams, sender credentials attached."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[tuple[int, dict[str, str]]] = []  # (sender pid, fields)

    def next(self, timeout: float) -> tuple[int, dict[str, str]]:
        self.sock.settimeout(timeout)
        data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", payload[: struct.calcsize("3i")])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.received.append((pid, fields))
        return pid, fields

    def wait_for(self, key: str, timeout: float) -> tuple[int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key}=1 within {timeout}s; got {[f for _p, f in self.received]}")
            try:
                pid, fields = self.next(left)
            except TimeoutError:
                continue
            if fields.get(key) == "1":
                return pid, fields

    def close(self) -> None:
        self.sock.close()


def _run_under_notify(tmp_path, cmd: list[str], rack_env: dict) -> tuple[int, int]:
    port = free_port()
    env = dict(rack_env)
    env.update(
        FLUXRIG_ECHO_BIND=f"127.0.0.1:{port}",
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC=str(WATCHDOG_USEC),
        TMPDIR=str(tmp_path),
    )
    listener = NotifyListener(env["NOTIFY_SOCKET"])
    # systemd sets WATCHDOG_PID to the main PID, known only after the fork: a shell that
    # exports its own PID and then execs the Rack reproduces that exactly.
    shell = 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"'
    proc = subprocess.Popen(
        ["/bin/sh", "-c", shell, "sh", *cmd, "run", "--scenario", os.path.join(ROOT, "scenarios", "tcp-echo.yaml")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready_pid, ready = listener.wait_for("READY", NOTIFY_TIMEOUT)
        assert ready.get("STATUS", "").startswith("running"), ready
        # READY=1 promises a running scenario: the port answers now, without polling for it.
        assert asyncio.run(tcp_lines(port, [b"ready"])) == [b"READY"]
        for _ in range(2):
            wd_pid, _fields = listener.wait_for("WATCHDOG", WATCHDOG_USEC / 1e6 * 5)
            assert wd_pid == ready_pid
        # ExecReload= sends SIGHUP to the main PID: RELOADING=1, then READY=1 again.
        proc.send_signal(signal.SIGHUP)
        listener.wait_for("RELOADING", 10)
        listener.wait_for("READY", 10)
        # KillMode=mixed: SIGTERM to the main PID only.
        proc.send_signal(signal.SIGTERM)
        stop_pid, _fields = listener.wait_for("STOPPING", 10)
        assert stop_pid == ready_pid
        _out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        listener.close()
    return proc.pid, ready_pid  # (main PID, PID that sent READY=1)


def test_rack_from_source_notifies_ready_watchdog_stopping(tmp_path, rack_env):
    main_pid, sender = _run_under_notify(tmp_path, [sys.executable, "-m", "fluxrig.cli.main"], rack_env)
    assert sender == main_pid


@pytest.mark.binary
@pytest.mark.slow
@pytest.mark.timeout(900)  # builds dist/fluxrig first when it is missing
def test_frozen_rack_notifies_from_its_child(tmp_path, rack_env):
    if not os.path.exists(BINARY) or os.environ.get("FLUXRIG_REBUILD_BINARY") == "1":
        subprocess.run(
            [os.path.join(ROOT, "packaging", "build.sh"), "fluxrig"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=600,
        )
    main_pid, sender = _run_under_notify(tmp_path, [BINARY], rack_env)
    # The one-file bootloader is the main PID; Python runs in its child. This is why the unit
    # needs NotifyAccess=all, and why the keep-alive must accept WATCHDOG_PID = parent PID.
    assert sender != main_pid
    # The bootloader removed its unpacked bundle from TMPDIR on the way out.
    assert not [p for p in os.listdir(tmp_path) if p.startswith("_MEI")]


@pytest.mark.mixer
def test_mixer_notifies_ready_and_stops_on_sigterm(tmp_path):
    pytest.importorskip("fluxrig_mixer")
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]),
    )
    listener = NotifyListener(env["NOTIFY_SOCKET"])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fluxrig_mixer.cli",
            "serve",
            "--api-port",
            "0",
            "--snake-port",
            "0",
            "--state-dir",
            str(tmp_path / "mixer"),
        ],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listener.wait_for("READY", 20)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        listener.close()
