"""The frozen Rack (dist/fluxrig from `make binary`) answers an echo."""

import asyncio
import json
import os
import subprocess

import pytest
from helpers import ROOT, free_port, tcp_lines, wait_port

BINARY = os.path.join(ROOT, "dist", "fluxrig")

pytestmark = [pytest.mark.binary, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def binary():
    if not os.path.exists(BINARY) or os.environ.get("FLUXRIG_REBUILD_BINARY") == "1":
        subprocess.run(
            [os.path.join(ROOT, "packaging", "build.sh"), "fluxrig"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return BINARY


def test_frozen_binary_echoes_and_drains(binary, start_rack, rack_env, tmp_path):
    info = json.loads(subprocess.run([binary, "version", "--json"], capture_output=True, text=True, check=True).stdout)
    assert info["backend"] == "cython", info
    # every twin frozen compiled (the specs name them as hidden imports)
    assert info["backends"] == {"framing": "cython", "iso8583": "cython", "wal": "cython"}, info
    assert info["commit"] != "unknown"
    port = free_port()
    rack_env["FLUXRIG_ECHO_BIND"] = f"127.0.0.1:{port}"
    rack_env["TMPDIR"] = str(tmp_path)  # where the one-file bundle unpacks
    rack = start_rack("run", "--scenario", os.path.join(ROOT, "scenarios", "tcp-echo.yaml"), cmd=[binary])
    wait_port(port, timeout=20)
    assert asyncio.run(tcp_lines(port, [b"frozen"])) == [b"FROZEN"]
    code, _out, err = rack.stop()
    assert code == 0, err
    print(f"dist/fluxrig: {os.path.getsize(binary)} bytes")
