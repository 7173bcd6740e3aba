"""The Rack's two WALs on a full disk, end to end against a real Mixer (nats-server child,
DuckDB), with ENOSPC from the kernel (a small tmpfs, tests/smallfs.py): the telemetry WAL and
the guaranteed lane's WAL fail, say so once (ERROR, metrics, the heartbeat's storage flag),
heal by themselves once space returns, and every record they acknowledged reaches its
destination exactly once. On the code before, both stayed failed until a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time

import pytest
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import make_mixer, snake_toml, wait_for
from smallfs import fill, small_fs
from test_mixer_lanes import RackRunner, activate, sink_lines

from fluxrig.agent.shipper import TelemetryShipper
from fluxrig.config import load_config
from fluxrig.wal import AsyncWal, WalFailed
from fluxrig.wal.log import MIN_SEGMENT_BYTES
from fluxrig.wire import messages as W

pytestmark = pytest.mark.timeout(150)


def log_record(i: int, now: int) -> dict:
    return {"kind": "logs", "ts": now + i, "severity": "info", "severity_text": "INFO",
            "body": f"enospc record {i:06d} " + "x" * 400, "attrs": {"i": i}}  # fmt: skip


async def test_telemetry_wal_full_disk_heals_and_ships_every_accepted_record_once(tmp_path, agent_factory, mixer,
                                                                                  api, caplog):  # fmt: skip
    caplog.set_level(logging.ERROR, logger="fluxrig.wal")
    agent = await agent_factory("tele-1")
    await wait_for(lambda: agent.passport is not None, what="enrolled")
    assert (await api.post("/api/v1/racks/tele-1/approve", json={})).status_code == 200
    with small_fs(tmp_path / "fs", "1m") as fs:
        ballast = fill(fs, leave=200 * 1024)
        wal = await AsyncWal.open(os.path.join(fs, "wal"), fsync="batch", batch_window_ms=5,
                                  segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None, heal_interval=0.1)  # fmt: skip
        shipper = None
        try:
            now = time.time_ns()
            accepted, refused, i = [], 0, 0
            while refused < 50:  # the shipper is not running yet: the disk fills
                try:
                    await wal.append(log_record(i, now))
                    accepted.append(i)
                except WalFailed:
                    refused += 1
                i += 1
            assert not wal.healthy and len(accepted) > 100
            # The failure is reported from the loop once the writer thread's outcome lands there,
            # which can be after the refused append has already returned.
            await wait_for(lambda: any("failed" in r.getMessage() for r in caplog.records), timeout=5,
                           what="one ERROR line for the failed WAL")  # fmt: skip
            assert W.Heartbeat.decode(W.Heartbeat(1, storage_failed=("telemetry",)).encode()).storage_failed == (
                "telemetry",
            )
            os.unlink(ballast)
            assert await wal.wait_healthy(5.0)
            for k in range(i, i + 300):
                await wal.append(log_record(k, now))
                accepted.append(k)
            shipper = TelemetryShipper(wal, agent, batch_records=200, retry_wait=0.2, idle_wait=0.1)
            await shipper.start()
            await wait_for(lambda: wal.cursor == wal.committed_seq, timeout=30, what="telemetry WAL shipped")
            await wait_for(lambda: mixer.ingest.stats["rows"].get("logs", 0) >= len(accepted), timeout=30,
                           what="rows stored")  # fmt: skip
        finally:
            if shipper is not None:
                await shipper.stop()
            await wal.close()
    cur = mixer.db.cursor()
    rows = cur.execute("SELECT body FROM telemetry_logs WHERE body LIKE 'enospc record %'").fetchall()
    got = sorted(int(b.split()[2]) for (b,) in rows)
    assert got == sorted(accepted), "a record the WAL acknowledged was lost or doubled"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("failed (" in e for e in errors) == 1 and sum("healed" in e for e in errors) == 1, errors


LANE = """
meta: {{name: lane-enospc, version: "{version}"}}
racks: [{{name: edge}}, {{name: hub}}]
gears:
  - {{name: gen, type: generator, deploy: edge,
     config: {{count: {count}, interval: 10ms, template: {{raw: "m{{{{ seq }}}}-{filler}"}}}}}}
  - {{name: store, type: sink, deploy: hub, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: gen.out, to: store.in}}
"""


def rack_config(tmp_path, name: str, state, mixer, telemetry: bool = False):
    conf = tmp_path / f"{name}.toml"
    conf.write_text(
        f'[base]\nname = "{name}"\nstate_dir = "{state}"\n'
        f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "3s"\nlane_send_timeout = "60s"\n'
        f"[telemetry]\ndisabled = {'false' if telemetry else 'true'}\n"
        + snake_toml(mixer)
        + 'reconnect_wait = "200ms"\n'
    )
    return load_config(str(conf), environ={})


async def test_lane_wal_full_disk_holds_the_emitter_heals_and_delivers_everything_once(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fluxrig.wal")
    mixer = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    out = tmp_path / "store.jsonl"
    n = 400
    try:
        with small_fs(tmp_path / "rack-edge", "8m") as edge_state:
            edge = RackRunner(rack_config(tmp_path, "edge", edge_state, mixer))
            hub = RackRunner(rack_config(tmp_path, "hub", tmp_path / "rack-hub", mixer))
            try:
                await edge.start()
                await hub.start()
                await activate(mixer, LANE.format(version=1, count=n, filler="x" * 500, path=out), [edge, hub])
                await wait_for(lambda: len(sink_lines(out)) >= 50, timeout=30, what="first messages at the hub")
                ballast = fill(edge_state)
                bus = edge.rack.bus
                await wait_for(lambda: bus.metrics()["storage_waits"] > 0, timeout=30, what="the emitter held back")
                storage = edge.rack.link.storage_stats()
                assert storage["failed"] == ["lanes"] and storage["lanes"]["failures"] == 1
                held = len(sink_lines(out))
                await asyncio.sleep(1.0)

                def flagged():
                    row = next((r for r in mixer.registry.list() if r.name == "edge"), None)
                    return row is not None and "lanes" in ((row.stats or {}).get("storage") or {}).get("failed", [])

                await wait_for(flagged, timeout=10, what="the Mixer sees the storage flag in the heartbeat")
                assert len(sink_lines(out)) <= held + 5  # the generator waits: nothing new is accepted
                os.unlink(ballast)
                await wait_for(lambda: len(sink_lines(out)) >= n, timeout=60, what="all messages at the hub")
                await asyncio.sleep(0.5)
                lines = sink_lines(out)
                raws = [line["raw"].split("-", 1)[0] for line in lines]
                assert len({line["id"] for line in lines}) == len(lines) == n, "a message lost or doubled"
                assert raws == [f"m{i}" for i in range(1, n + 1)]
                assert edge.rack.link.storage_stats()["failed"] == []
                # and the Mixer sees it healed: the next heartbeats carry no flag
                await wait_for(lambda: not flagged(), timeout=10, what="the Mixer sees the flag cleared")
                m = bus.metrics()
                assert m["storage_refused"] == 0 and edge.rack.link.lane_wal.metrics()["heals"] == 1
            finally:
                await hub.stop()
                await edge.stop()
    finally:
        await mixer.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("failed (" in e for e in errors) == 1 and sum("healed" in e for e in errors) == 1, errors


async def test_a_telemetry_wal_that_cannot_open_does_not_stop_the_rack(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    mixer = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    try:
        with small_fs(tmp_path / "rack-edge", "8m") as state:
            config = rack_config(tmp_path, "edge", state, mixer, telemetry=True)
            edge = RackRunner(config)
            await edge.start()
            await edge.stop()
            shutil.rmtree(os.path.join(config.store_dir, "wal"))  # the telemetry WAL must be created again
            ballast = fill(state)
            edge = RackRunner(config)
            try:
                await edge.start()  # runs (session, lanes, gears) although the disk is full
                link = edge.rack.link
                assert link.wal is None and "telemetry" in link.storage_stats()["failed"]
                assert any("telemetry WAL not opened" in r.getMessage() for r in caplog.records)
                os.unlink(ballast)
                await wait_for(
                    lambda: link.wal is not None, timeout=15, what="telemetry WAL opened once space returned"
                )
                assert link.storage_stats()["failed"] == []
                assert link.wal.append_nowait({"kind": "logs", "ts": time.time_ns(), "body": "back"}) is not None
            finally:
                await edge.stop()
    finally:
        await mixer.stop()


SPLIT = """
meta: {{name: lane-open, version: "1"}}
racks: [{{name: edge}}, {{name: hub}}]
gears:
  - {{name: gen, type: generator, deploy: edge,
     config: {{count: 100000, interval: 20ms, template: {{raw: "g{{{{ seq }}}}"}}}}}}
  - {{name: tick, type: generator, deploy: edge,
     config: {{count: 100000, interval: 20ms, template: {{raw: "t{{{{ seq }}}}"}}}}}}
  - {{name: local, type: sink, deploy: edge, config: {{mode: file, path: "{local}"}}}}
  - {{name: store, type: sink, deploy: hub, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: gen.out, to: store.in}}
  - {{from: tick.out, to: local.in}}
"""


async def test_a_lane_wal_that_cannot_open_does_not_stop_the_rack(tmp_path, caplog):
    """The edge starts on a full disk with its lane WAL gone: it runs (the hot lane too), the
    lane says its storage failed (metrics, heartbeat flag), the guaranteed sender waits; once
    space returns the lane WAL opens by itself and the guaranteed wire flows again. On the
    code before, the Rack exited at start with WalOpenFailed."""
    caplog.set_level(logging.ERROR)
    mixer = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    out, local = tmp_path / "store.jsonl", tmp_path / "local.jsonl"
    try:
        with small_fs(tmp_path / "rack-edge", "8m") as state:
            config = rack_config(tmp_path, "edge", state, mixer)
            edge = RackRunner(config)
            hub = RackRunner(rack_config(tmp_path, "hub", tmp_path / "rack-hub", mixer))
            try:
                await edge.start()
                await hub.start()
                await activate(mixer, SPLIT.format(local=local, path=out), [edge, hub])
                await wait_for(lambda: len(sink_lines(out)) >= 20, timeout=30, what="first messages at the hub")
                await edge.stop()
                shutil.rmtree(os.path.join(config.store_dir, "lanes"))  # the lane WAL must be created again
                ballast = fill(state)
                edge = RackRunner(config)
                await edge.start()  # runs its stored scenario although the lane WAL cannot open
                link = edge.rack.link
                assert link.lane_wal is None and "lanes" in link.storage_stats()["failed"]
                assert link.bus.metrics()["storage_failed"]
                assert any("lane WAL not opened" in r.getMessage() for r in caplog.records)
                ticks = len(sink_lines(local))
                await wait_for(lambda: len(sink_lines(local)) >= ticks + 20, timeout=15, what="the hot lane runs")
                held = len(sink_lines(out))
                await asyncio.sleep(1.0)
                assert len(sink_lines(out)) == held  # the guaranteed sender waits for its WAL
                assert edge.rack.runtime.gears["gen"].state == "started"
                os.unlink(ballast)
                await wait_for(lambda: link.lane_wal is not None, timeout=20, what="the lane WAL opened")
                await wait_for(lambda: len(sink_lines(out)) >= held + 20, timeout=20, what="the wire flows again")
                assert link.storage_stats()["failed"] == [] and not link.bus.metrics()["storage_failed"]
                lines = sink_lines(out)
                assert len({line["id"] for line in lines}) == len(lines), "a message doubled"
            finally:
                await hub.stop()
                await edge.stop()
    finally:
        await mixer.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "lane WAL" in r.getMessage()]
    assert sum("not opened" in e for e in errors) == 1 and sum("opened after" in e for e in errors) == 1, errors
