"""The `fluxrig` command line, run as a real subprocess."""

import asyncio
import json
import os
import subprocess
import sys

from helpers import ROOT, free_port, tcp_lines, wait_port


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


def test_run_tcp_echo_then_sigterm_exits_zero(start_rack, rack_env):
    port = free_port()
    rack_env["FLUXRIG_ECHO_BIND"] = f"127.0.0.1:{port}"
    rack = start_rack("run", "--scenario", "scenarios/tcp-echo.yaml")
    wait_port(port)
    assert asyncio.run(tcp_lines(port, [b"hello", b"world"])) == [b"HELLO", b"WORLD"]
    code, _out, err = rack.stop()
    assert code == 0, err
    assert "fluxrig ready" in err and "stopped (drained)" in err


def test_getting_started_runs_generator_into_sink(start_rack, rack_env, tmp_path):
    import time

    log = tmp_path / "rack.log"
    rack_env.update(FLUXRIG_TICKS="3", FLUXRIG_LOGGING_FILENAME=str(log))
    rack = start_rack("run", "--scenario", "scenarios/getting-started.yaml")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count('"raw":"tick') >= 3:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # a fourth tick would show up now if count were ignored
    code, _out, err = rack.stop()
    assert code == 0
    assert err.count('"raw":"tick') == 3, err


def test_second_instance_refused_by_lock(start_rack, rack_env):
    port = free_port()
    rack_env["FLUXRIG_ECHO_BIND"] = f"127.0.0.1:{port}"
    first = start_rack("run", "--scenario", "scenarios/tcp-echo.yaml")
    wait_port(port)
    second = cli("run", "--scenario", "scenarios/getting-started.yaml", env=rack_env)
    assert second.returncode == 2
    assert "another fluxrig Rack holds" in second.stderr
    assert first.stop()[0] == 0


def test_config_error_stops_startup(tmp_path, rack_env):
    cfg = tmp_path / "fluxrig.toml"
    cfg.write_text('[rack]\ndrain_timeout = "forever"\n')
    r = cli("run", "-c", str(cfg), "--scenario", "scenarios/tcp-echo.yaml", env=rack_env)
    assert r.returncode == 2
    assert "rack.drain_timeout" in r.stderr


def test_check_names_what_failed(tmp_path, rack_env):
    port = free_port()
    env = dict(rack_env, FLUXRIG_ECHO_BIND=f"127.0.0.1:{port}")
    ok = cli("check", "--scenario", "scenarios/tcp-echo.yaml", env=env)
    assert ok.returncode == 0, ok.stdout
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        busy = cli("check", "--scenario", "scenarios/tcp-echo.yaml", env=env)
    assert busy.returncode == 1
    assert f"FAIL port of gear gateway: 127.0.0.1:{port}: cannot bind" in busy.stdout
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    env2 = dict(env, FLUXRIG_BASE_STATE_DIR=str(ro / "sub"))
    r = cli("check", "--scenario", "scenarios/tcp-echo.yaml", env=env2)
    if os.geteuid() != 0:  # root writes anywhere
        assert r.returncode == 1 and "state dir" in r.stdout


def test_version_names_backend():
    r = cli("version", "--json")
    info = json.loads(r.stdout)
    assert info["version"] and info["commit"]
    expected = "pure" if os.environ.get("FLUXRIG_PURE_PYTHON") == "1" else info["backend"]
    assert info["backend"] == expected
    if os.environ.get("FLUXRIG_REQUIRE_ACCELERATED") == "1":
        assert info["backend"] == "cython"
    pure = cli("version", "--json", env=dict(os.environ, FLUXRIG_PURE_PYTHON="1"))
    assert json.loads(pure.stdout)["backend"] == "pure"


def test_every_command_has_help():
    top = cli("--help")
    assert top.returncode == 0
    for cmd in ("run", "version", "check", "scenario", "gears"):
        r = cli(cmd, "--help")
        assert r.returncode == 0 and len(r.stdout) > 100, cmd
    assert cli("scenario", "validate", "--help").returncode == 0


def test_gears_list_and_doc():
    r = cli("gears", "list")
    for t in ("io_tcp", "map", "router", "generator", "sink"):
        assert t in r.stdout
    d = cli("gears", "doc", "io_tcp")
    assert "| `max_connections` |" in d.stdout and "inputs: in" in d.stdout
    assert cli("gears", "doc", "nope").returncode == 2
