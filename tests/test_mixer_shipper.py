"""WAL -> Snake -> DuckDB: the Rack's telemetry shipper against a real Mixer. Every record
acknowledged by the WAL lands exactly once, across a Snake restart and a shipper restart."""

from __future__ import annotations

import os
import signal
import time

from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import wait_for

from fluxrig.agent.shipper import TelemetryShipper
from fluxrig.wal import AsyncWal


async def test_wal_records_land_once(mixer, api, agent_factory, tmp_path):
    agent = await agent_factory("shipper-1")
    await wait_for(lambda: agent.passport is not None, what="enrolled")
    wal = await AsyncWal.open(str(tmp_path / "wal"), fsync="batch")
    try:
        now = time.time_ns()
        # append_nowait + one flush: a group commit, not one fsync window per record.
        for i in range(1500):
            wal.append_nowait(
                {
                    "kind": "logs",
                    "ts": now + i,
                    "severity": "info",
                    "severity_text": "INFO",
                    "body": f"record {i}",
                    "attrs": {"i": i},
                }
            )
        wal.append_nowait(b"\xff not cbor")
        for i in range(200):
            wal.append_nowait(
                {"kind": "metrics", "ts": now + i, "name": "flux.wire.messages_sent", "type": "counter", "value": 1.0}
            )
        await wal.flush()
        shipper = TelemetryShipper(wal, agent, batch_records=400, retry_wait=0.2, idle_wait=0.1)
        await shipper.start()
        # Pending: nothing is shipped, it waits in the WAL.
        await asyncio_sleep(0.5)
        assert shipper.shipped == 0 and mixer.ingest.stats["rows"].get("logs", 0) == 0
        assert (await api.post("/api/v1/racks/shipper-1/approve", json={})).status_code == 200
        await wait_for(
            lambda: mixer.ingest.stats["rows"].get("logs") == 1500 and mixer.ingest.stats["rows"].get("metrics") == 200,
            timeout=20,
            what="all rows stored",
        )
        assert shipper.undecodable == 1
        await wait_for(lambda: wal.cursor == wal.committed_seq, what="WAL fully acknowledged")
        # Snake dies mid-stream: records appended meanwhile still arrive, once.
        os.kill(mixer.snake.pid, signal.SIGKILL)
        for i in range(1500, 2000):
            wal.append_nowait({"kind": "logs", "ts": now + i, "severity": 13, "body": f"record {i}"})
        await wal.flush()
        await wait_for(lambda: mixer.ingest.stats["rows"].get("logs") == 2000, timeout=30, what="rows after restart")
        await shipper.stop()
        # A new shipper over the same WAL starts after the cursor: nothing is sent twice.
        shipper2 = TelemetryShipper(wal, agent, retry_wait=0.2, idle_wait=0.1)
        await shipper2.start()
        await asyncio_sleep(0.5)
        await shipper2.stop()
        assert shipper2.shipped == 0
        cur = mixer.db.cursor()
        assert cur.execute("SELECT count(*), count(DISTINCT id) FROM telemetry_logs").fetchone() == (2000, 2000)
        rows = (await api.get("/api/v1/telemetry/logs", params={"rack": "shipper-1", "q": "record 1999"})).json()
        assert len(rows) == 1 and rows[0]["severity"] == 13
    finally:
        await wal.close()


async def asyncio_sleep(s):
    import asyncio

    await asyncio.sleep(s)
