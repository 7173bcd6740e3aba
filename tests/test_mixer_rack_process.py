"""The real Rack process (`fluxrig run` with snake.url) under a real Mixer: enroll -> approve
-> activate tcp-echo -> traffic through the Rack -> its logs and gear metrics queryable
through the API -> a new version reaches it; then the Rack restarts with the Mixer gone and
still serves (passport)."""

from __future__ import annotations

import asyncio
import os
import socket

from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import snake_toml, start_rack_process, stop_rack_process, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _echo(port: int, line: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(line + b"\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()


async def test_real_rack_process(mixer, api, tmp_path):
    echo_port = _free_port()
    conf = tmp_path / "fluxrig.toml"
    conf.write_text(
        f'[base]\nname = "edge-proc"\nstate_dir = "{tmp_path / "rack"}"\n'
        f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "2s"\n[telemetry]\nbatch_interval = "200ms"\n'
        + snake_toml(mixer)
    )
    env = dict(os.environ, PYTHONPATH=ROOT, FLUXRIG_ECHO_BIND=f"127.0.0.1:{echo_port}")
    proc = await start_rack_process(str(conf), env)
    err = b""
    try:

        async def registered():
            racks = (await api.get("/api/v1/racks")).json()
            return racks and racks[0]["status"] == "pending"

        await wait_for(registered, timeout=20, what="the Rack process enrolled")
        assert (await api.post("/api/v1/racks/edge-proc/approve", json={})).status_code == 200
        with open(os.path.join(ROOT, "scenarios", "tcp-echo.yaml")) as fh:
            text = fh.read()
        r = await api.post("/api/v1/scenarios/import", params={"activate": "true"}, content=text)
        assert r.status_code == 200, r.text
        version = r.json()["version"]

        async def applied():
            s = (await api.get("/api/v1/racks/edge-proc")).json()["scenario"]
            return s["version"] == version and s["apply_state"] == "applied"

        await wait_for(applied, timeout=20, what="tcp-echo applied by the Rack")
        assert await _echo(echo_port, b"hello mixer") == b"HELLO MIXER\n"

        # The Rack's own telemetry (WAL -> shipper -> JetStream -> DuckDB) is queryable.
        async def rack_logs():
            return (await api.get("/api/v1/telemetry/logs", params={"rack": "edge-proc", "limit": 500})).json()

        await wait_for(rack_logs, timeout=20, what="Rack logs in DuckDB")

        async def gear_metrics():
            rows = (
                await api.get(
                    "/api/v1/telemetry/metrics", params={"rack": "edge-proc", "name": "flux.gear.*", "limit": 1000}
                )
            ).json()
            return [r for r in rows if r["value"] and r["value"] > 0]

        await wait_for(gear_metrics, timeout=20, what="gear metrics counting the echoed line")

        # A scenario the Rack cannot run is rejected and reported; the old one keeps serving.
        bad = text.replace("version: 1.0.0", "version: 1.0.1").replace(
            'value: "{{ raw | upper }}"', 'value: "{{ raw | nosuchfilter }}"'
        )
        r = await api.post("/api/v1/scenarios/import", params={"activate": "true"}, content=bad)
        if r.status_code == 200:
            v2 = r.json()["version"]

            async def reported():
                s = (await api.get("/api/v1/racks/edge-proc")).json()["scenario"]
                return s["version"] == v2 and s["apply_state"] in ("applied", "rejected")

            await wait_for(reported, timeout=20, what="second version reported")
        assert await _echo(echo_port, b"still here") == b"STILL HERE\n"
    finally:
        err = await stop_rack_process(proc)
    assert proc.returncode == 0, err.decode()[-2000:]

    # Mixer gone (stop it), Rack restarts: it runs the scenario from its stored passport.
    await mixer.stop()
    proc = await start_rack_process(str(conf), env)
    try:

        async def serving():
            try:
                return await _echo(echo_port, b"offline", timeout=1.0) == b"OFFLINE\n"
            except (TimeoutError, OSError):
                return False

        await wait_for(serving, timeout=20, what="offline start from the passport")
    finally:
        await stop_rack_process(proc)
