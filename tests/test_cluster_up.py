"""`fluxrig-mixer up --cluster 3` (issue 14 item 7): three nodes and a local Rack on loopback; the
banner names every node's API, Snake and route and the kill command; killing the node it names
leaves the API answering (CLI with the comma list) and the Rack's echo serving; `up` restarts the
node, which catches up; SIGTERM stops everything (no nats-server left)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from cluster_fixtures import ROOT, needs_shared_state

# The local Rack enrolls through whichever node's Mixer takes its Hello (a queue group across
# the cluster): it needs the shared token store and registry (issue 14 item 2).
pytestmark = [pytest.mark.mixer, pytest.mark.timeout(400), needs_shared_state]


def _wait_banner(proc, out_path, timeout=240.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out_path.read_text(errors="replace") if out_path.exists() else ""
        if "fluxrig-mixer up: ready" in text:
            return text
        assert proc.poll() is None, f"up exited {proc.returncode}"
        time.sleep(0.5)
    raise AssertionError("no ready banner")


def _echo(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"hello\n")
        return s.recv(100)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def test_up_cluster_3(tmp_path):
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
    argv = [sys.executable, "-m", "fluxrig_mixer.cli", "up", "--cluster", "3", "--state-dir", str(tmp_path / "s")]
    argv += ["--api-port", "0", "--snake-port", "0", "--echo-port", "0", "--iso-port", "0"]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e, env=env, cwd=ROOT)
    nats_pids = []
    try:
        text = _wait_banner(proc, out)
        assert "Institutional tier is running (3-node Mixer cluster)" in text
        nodes = re.findall(
            r"node-(\d)  API (\S+)  Snake (\S+)  route (\S+)  Mixer (this process|pid \d+), nats-server pid (\d+)", text
        )
        assert [n[0] for n in nodes] == ["1", "2", "3"], text
        nats_pids = [int(n[5]) for n in nodes]
        apis = [n[1] for n in nodes]
        token = (tmp_path / "s" / "node-1" / "api-token").read_text().strip()
        for api in apis:
            st = httpx.get(api + "/api/v1/cluster", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
            assert st["clustered"] and st["streams"]["flux-msg"]["replicas"] == 3, st
        echo = re.search(r"TCP echo\s+(\S+):(\d+)", text)
        host = "127.0.0.1" if echo.group(1) == "0.0.0.0" else echo.group(1)
        assert _echo(host, int(echo.group(2))) == b"HELLO\n"
        kill = re.search(r"kill -9 (\d+) (\d+)", text)
        assert kill and f"FLUXRIG_API_URL={','.join(apis)}" in text
        for pid in map(int, kill.groups()):
            os.kill(pid, signal.SIGKILL)
        cli = subprocess.run(
            [sys.executable, "-m", "fluxrig.cli.main", "admin", "racks", "list", "--json"],
            env=dict(env, FLUXRIG_API_URL=",".join(reversed(apis)), FLUXRIG_API_TOKEN=token),
            capture_output=True,
            timeout=60,
        )
        assert cli.returncode == 0 and b'"local"' in cli.stdout, cli.stderr
        assert _echo(host, int(echo.group(2))) == b"HELLO\n"
        # `up` restarts node-3; it answers again and its replicas catch up.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                st = httpx.get(apis[2] + "/api/v1/cluster", headers={"Authorization": f"Bearer {token}"}, timeout=3)
                peers = st.json()["streams"]["flux-msg"]["peers"]
                if st.status_code == 200 and len(peers) == 3 and all(p["current"] for p in peers):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("node-3 did not come back current")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, err.read_text()[-3000:]
    time.sleep(0.5)
    survivors = [p for p in nats_pids if _alive(p)]
    snake_pids = []
    for k in (1, 2, 3):
        try:
            snake_pids.append(int((tmp_path / "s" / f"node-{k}" / "snake" / "nats-server.pid").read_text().split()[0]))
        except (OSError, ValueError):
            pass
    assert not survivors and not [p for p in snake_pids if _alive(p)], "nats-server left running"
