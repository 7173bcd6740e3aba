"""`fluxrig healthcheck` against a real Rack process and its health socket (fluxrig/health.py).

* A running Rack (tcp-echo) answers: exit 0, `--json` says running, the socket is 0600, and the
  socket is gone after the Rack stops (SIGTERM, exit 0).
* No Rack, a stale socket a dead Rack left (nobody listening), a listener that never answers
  (a wedged event loop): exit 1 with the reason, within the timeout; a new Rack replaces the
  stale socket.
* Bad input (--timeout) exits 2.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT, free_port, wait_port

from fluxrig import health

pytestmark = pytest.mark.timeout(120)

SCENARIO = os.path.join(ROOT, "scenarios", "tcp-echo.yaml")


def _check(env, *args, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "healthcheck", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_healthy(env, deadline_s=30.0):
    deadline = time.monotonic() + deadline_s
    while True:
        res = _check(env, "--json")
        if res.returncode == 0 or time.monotonic() > deadline:
            return res
        time.sleep(0.2)


def test_running_rack_is_healthy_and_socket_goes_with_it(start_rack, rack_env):
    port = free_port()
    rack_env["FLUXRIG_ECHO_BIND"] = f"127.0.0.1:{port}"
    rack = start_rack("run", "--scenario", SCENARIO)
    wait_port(port, timeout=30)
    res = _wait_healthy(rack_env)
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["ok"] is True and answer["status"] == "running", answer
    assert answer["pid"] == rack.proc.pid
    assert answer["gears"] >= 1 and answer["joined"] is False
    path = health.socket_path(rack_env["FLUXRIG_BASE_STATE_DIR"])
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    human = _check(rack_env)
    assert human.returncode == 0 and human.stdout.startswith("healthy: running"), human
    # the protocol from any client: one line in, one JSON line out; garbage gets ok=false
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"status please\n")
        bad = json.loads(s.makefile("rb").readline())
    assert bad["ok"] is False and "send 'health'" in bad["error"]
    code, _out, err = rack.stop()
    assert code == 0, err
    assert not os.path.exists(path)
    gone = _check(rack_env)
    assert gone.returncode == 1 and "no such socket" in gone.stderr, gone


def test_stale_socket_is_unhealthy_then_replaced(start_rack, rack_env):
    state = rack_env["FLUXRIG_BASE_STATE_DIR"]
    os.makedirs(state)
    path = health.socket_path(state)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a SIGKILLed Rack leaves
    res = _check(rack_env)
    assert res.returncode == 1 and "connection refused" in res.stderr, res
    port = free_port()
    rack_env["FLUXRIG_ECHO_BIND"] = f"127.0.0.1:{port}"
    rack = start_rack("run", "--scenario", SCENARIO)
    wait_port(port, timeout=30)
    assert _wait_healthy(rack_env).returncode == 0
    assert rack.stop()[0] == 0


def test_listener_that_never_answers_times_out(tmp_path, rack_env):
    path = str(tmp_path / "wedged.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    held = []
    stop = threading.Event()

    def accept_and_hold():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # never answered, like a wedged event loop
            except TimeoutError:
                continue

    t = threading.Thread(target=accept_and_hold, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        res = _check(rack_env, "--socket", path, "--timeout", "500ms")
        took = time.monotonic() - t0
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()
    assert res.returncode == 1 and "no answer within 0.5s" in res.stderr, res
    assert took < 20, took


def test_bad_input_exits_2(rack_env):
    res = _check(rack_env, "--timeout", "soon")
    assert res.returncode == 2 and "--timeout" in res.stderr, res
    res = _check(rack_env, "--timeout", "0s")
    assert res.returncode == 2, res


def test_too_long_state_dir_is_refused_clearly(tmp_path):
    path = str(tmp_path / ("d" * 120) / "health.sock")
    with pytest.raises(health.HealthcheckFailed, match="AF_UNIX limit"):
        health.check(path, 1.0)
