"""How the ingest sizes what it hands its store (ingest._fetch): pulls sized to the store's
`batch_max_rows`, the tail of a drain stored at once, steady state bounded by flush_interval.

Before: every pull asked for `batch_max_messages` whatever their size (64 messages of 5000
rows made 320k-row fetches for a 100k-row store), and the last fetch of a drain waited out
flush_interval for rows that were not coming (one second on the end of every backlog, a third
of bench/telemetry_ingest.py's 1M-row run).

Real parts: nats-server through the Mixer's Snake with the Mixer's streams, the real DuckDB
store in a temp dir; its batch_max_rows (a TelemetryStore attribute, 0 for DuckDB) is set as
the ClickHouse store sets it, and its writes are recorded by a subclass.
"""

from __future__ import annotations

import json
import time

import pytest
from fluxrig_mixer.duckdb_store import DuckDBStore
from fluxrig_mixer.ingest import TelemetryIngest
from fluxrig_mixer.registry import Database
from mixer_fixtures import snake_streams, wait_for

from fluxrig.wire.telemetry import SRC_HEADER

LINES = 100  # rows per bus message
MAX_ROWS = 1000  # the store's rows per write
FLUSH_S = 2.0


class RecordingStore(DuckDBStore):
    """The DuckDB store, noting the rows of each write and when it was made."""

    def __init__(self, db, **kw):
        super().__init__(db, **kw)
        self.batch_max_rows = MAX_ROWS
        self.writes: list[tuple[float, int]] = []

    def write(self, parts, sources, prepared=None):
        self.writes.append((time.monotonic(), sum(p.lines for p in parts)))
        return super().write(parts, sources)


@pytest.fixture
async def bus(tmp_path):
    async with snake_streams(tmp_path) as (_snake, js):
        yield js


async def _publish(js, first: int, messages: int) -> None:
    for k in range(messages):
        base = (first + k) * LINES
        data = "".join(json.dumps({"id": base + i, "ts": 1, "body": f"m {base + i}"}) + "\n" for i in range(LINES))
        await js.publish("flux.telemetry.r1.logs", data.encode(), headers={SRC_HEADER: "w"})


async def test_pulls_fill_the_row_bound_the_drain_tail_goes_at_once_steady_state_waits(bus, tmp_path):
    db = Database(str(tmp_path / "mixer.duckdb"))
    store = RecordingStore(db, spool_dir=str(tmp_path))
    ingest = TelemetryIngest(store, batch_max_messages=64, flush_interval=FLUSH_S, drain_min_rows=500)
    await _publish(bus, 0, 25)  # a backlog: 2500 rows
    started = time.monotonic()
    await ingest.start(bus)
    try:
        await wait_for(lambda: ingest.rows["logs"] >= 2500, timeout=10, what="the backlog stored")
        drained = time.monotonic() - started
        # Fetches of the store's size, the 500-row tail stored as soon as the stream was empty
        # (old code: one fetch of all 25 messages, made after flush_interval).
        assert [n for _t, n in store.writes] == [1000, 1000, 500]
        assert drained < FLUSH_S * 0.75, drained
        # Steady state: 600 rows arrive after the drain; the fetch waits out flush_interval
        # (from its start, just after the drain) and stores them in one write.
        sent = time.monotonic()
        await _publish(bus, 25, 6)
        await wait_for(lambda: ingest.rows["logs"] >= 3100, timeout=10, what="the steady-state rows stored")
        assert [n for _t, n in store.writes][3:] == [600]
        assert store.writes[3][0] - sent >= FLUSH_S * 0.5
        assert ingest.duplicates["logs"] == 0
    finally:
        await ingest.stop()
        db.close()
