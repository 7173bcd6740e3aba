"""A Rack over its telemetry quota is pushed back, never dropped: a real nats-server (the
Mixer's SnakeSupervisor), the Mixer's real ingest and a real DuckDB file.

Before (issue 13 item 5), rows over `telemetry.rack_max_rows` were acked and dropped, so "every
log line arrives later exactly once" did not hold for a chatty Rack. Now its messages are NAKed
with a delay until its window ends and stay in flux-telemetry; the ingest acks each stored
message (explicit acks), so the flooding Rack's deferred messages neither block another Rack's
telemetry nor are acked with it. The flood here is 3 windows' worth, sent at once.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fluxrig_mixer.ingest import CONSUMER, TelemetryIngest
from fluxrig_mixer.registry import Database
from mixer_fixtures import snake_streams, wait_for
from nats.js.api import AckPolicy, ConsumerConfig

from fluxrig.wire import subjects as S
from fluxrig.wire.telemetry import SRC_HEADER

pytestmark = pytest.mark.timeout(60)

LINES = 200  # records per bus message
QUOTA_ROWS = 2000  # per window, per Rack
WINDOW_S = 1.0
FLOOD_BATCHES = 30  # 6000 rows: three windows' worth, published at once


@pytest.fixture
async def bus(tmp_path):
    async with snake_streams(tmp_path) as (_snake, js):
        yield js


def _body(rack: str, first: int) -> bytes:
    return "".join(
        json.dumps({"id": first + i, "ts": time.time_ns(), "severity": 9, "body": f"{rack} {first + i}"}) + "\n"
        for i in range(LINES)
    ).encode()


async def _publish(js, rack: str, batch: int) -> None:
    await js.publish(S.telemetry(rack, "logs"), _body(rack, batch * LINES), headers={SRC_HEADER: "wal-0"})


def _rows(db, rack: str) -> tuple[int, int]:
    return db.conn.execute("SELECT count(*), count(DISTINCT id) FROM telemetry_logs WHERE rack = ?", [rack]).fetchone()


async def test_a_flooding_rack_loses_nothing_doubles_nothing_and_does_not_stall_another(bus, tmp_path):
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_rows=QUOTA_ROWS, rack_max_bytes=0,
                             quota_window=WINDOW_S, flush_interval=0.05)  # fmt: skip
    await ingest.start(bus)
    try:
        for b in range(FLOOD_BATCHES):
            await _publish(bus, "flood", b)
        for b in range(5):  # the calm Rack sends after the flood, while it is deferred
            await _publish(bus, "calm", b)
        started = time.monotonic()
        await wait_for(lambda: _rows(db, "calm")[0] == 5 * LINES, timeout=10, what="calm's telemetry stored")
        calm_s = time.monotonic() - started
        flood_then = _rows(db, "flood")[0]
        assert flood_then < FLOOD_BATCHES * LINES, "the flood was not held back at all"
        assert ingest.stats["quota_state"].get("flood") == "over"
        assert "calm" not in ingest.stats["quota_deferred"]
        assert calm_s < 2 * WINDOW_S, f"calm's telemetry waited {calm_s:.2f}s behind the flood"
        # The flood arrives later, at about one window's quota per window, every row exactly once.
        await wait_for(lambda: _rows(db, "flood")[0] >= FLOOD_BATCHES * LINES, timeout=20, what="the flood stored")
        await asyncio.sleep(2 * WINDOW_S)  # anything redelivered late would land now
        assert _rows(db, "flood") == (FLOOD_BATCHES * LINES, FLOOD_BATCHES * LINES), "flood rows lost or doubled"
        assert _rows(db, "calm") == (5 * LINES, 5 * LINES)
        assert ids(db, "flood") == list(range(FLOOD_BATCHES * LINES))
        assert ingest.stats["quota_deferred"]["flood"] > 0
        # Nothing is left unacknowledged in the durable once the flood is through.
        info = await bus.consumer_info(S.STREAM_TELEMETRY, CONSUMER)
        assert info.config.ack_policy == AckPolicy.EXPLICIT
        await wait_for(lambda: ingest.stats["quota_state"].get("flood") != "over", timeout=5, what="flood back")
    finally:
        await ingest.stop()
    info = await bus.consumer_info(S.STREAM_TELEMETRY, CONSUMER)
    assert info.num_ack_pending == 0 and info.num_pending == 0, info


def ids(db, rack: str) -> list[int]:
    return [r[0] & ((1 << 40) - 1) for r in db.conn.execute(
        "SELECT id FROM telemetry_logs WHERE rack = ? ORDER BY id", [rack]).fetchall()]  # fmt: skip


async def test_an_older_ack_all_durable_is_replaced_and_its_backlog_stored_once(bus, tmp_path):
    """An older Mixer's durable acked cumulatively; JetStream cannot change that in place."""
    await bus.add_consumer(S.STREAM_TELEMETRY, ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.ALL,
                                                              filter_subject=S.telemetry_all()))  # fmt: skip
    for b in range(3):
        await _publish(bus, "old", b)
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), flush_interval=0.05)
    await ingest.start(bus)
    try:
        await wait_for(lambda: _rows(db, "old")[0] == 3 * LINES, timeout=10, what="the backlog stored")
        assert _rows(db, "old") == (3 * LINES, 3 * LINES)
        info = await bus.consumer_info(S.STREAM_TELEMETRY, CONSUMER)
        assert info.config.ack_policy == AckPolicy.EXPLICIT
    finally:
        await ingest.stop()


async def test_a_rack_over_its_quota_for_long_cannot_fill_the_stream_for_the_others(tmp_path):
    """A Rack flooding over its quota for many windows holds the purge floor with what it
    deferred, so flux-telemetry fills with the other Racks' stored rows until it refuses them
    too. Quotas yield once the stream is half full: the calm Rack is never refused, and every
    row of both lands exactly once."""
    from fluxrig.agent.publisher import is_quota_full

    async with snake_streams(tmp_path, telemetry_max_bytes=4 << 20) as (_snake, js):
        await _flood_beside_a_calm_rack(js, tmp_path, is_quota_full)


async def _flood_beside_a_calm_rack(js, tmp_path, is_quota_full) -> None:
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_rows=QUOTA_ROWS, rack_max_bytes=0,
                             quota_window=WINDOW_S, flush_interval=0.05, purge_interval=0.2)  # fmt: skip
    await ingest.start(js)
    refused = {"flood": [], "calm": []}
    sent = {"flood": 0, "calm": 0}

    async def send(rack: str, batch: int) -> None:
        try:
            await _publish(js, rack, batch)
        except Exception as exc:
            assert is_quota_full(exc), exc
            refused[rack].append(batch)  # what the Rack's WAL would hold and send again

    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 8.0  # eight windows, the flood at five times its quota throughout
        tick = 0
        while loop.time() < end:
            await send("flood", sent["flood"])  # 50 batches/s: 10,000 rows/s against 2,000
            sent["flood"] += 1
            if tick % 25 == 0:  # 2 batches/s: 400 rows/s, well inside its quota
                await send("calm", sent["calm"])
                sent["calm"] += 1
            tick += 1
            await asyncio.sleep(0.02)
        assert not refused["calm"], f"the calm Rack was pushed back {len(refused['calm'])} times by the flood"
        assert ingest.stats["quota_deferred"].get("flood", 0) > 0  # the quota did hold the flood first
        assert ingest.stats["quota_yields"] >= 1, "the quotas never yielded"
        for rack in ("flood", "calm"):  # the WALs' retries of what was refused
            for batch in refused[rack]:
                while True:
                    try:
                        await _publish(js, rack, batch)
                        break
                    except Exception:
                        await asyncio.sleep(0.2)
        for rack in ("flood", "calm"):
            n = sent[rack] * LINES
            await wait_for(lambda r=rack, n=n: _rows(db, r)[0] >= n, timeout=30, what=f"{rack}'s rows stored")
        await asyncio.sleep(1.0)
        for rack in ("flood", "calm"):
            assert _rows(db, rack) == (sent[rack] * LINES, sent[rack] * LINES), f"{rack}: rows lost or doubled"
    finally:
        await ingest.stop()
