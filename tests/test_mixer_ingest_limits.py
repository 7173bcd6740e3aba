"""Telemetry abuse limits at the Mixer's ingest (issue 13 item 5): per-Rack row and byte quotas,
and a cap on the WAL incarnations one Rack may open. Both used to be unlimited: a Rack that
sends a new Flux-Src per message grew `telemetry_sources` without bound (and would have run
its ids into another incarnation's range), and one chatty Rack could fill the store.

Real DuckDB file and the ingest's real decode/write path; messages are real nats-py Msg
objects (the bus is not what is tested here). Timestamps clamping: tests/test_mixer_queries.py.
"""

from __future__ import annotations

import json
import logging

from fluxrig_mixer.ingest import TelemetryIngest
from fluxrig_mixer.registry import Database
from nats.aio.msg import Msg

from fluxrig.wire.telemetry import SRC_HEADER


def _msg(rack: str, src: str, first: int, n: int = 10, pad: int = 0) -> Msg:
    lines = "".join(json.dumps({"id": first + i, "ts": 1, "body": "x" * pad}) + "\n" for i in range(n))
    return Msg(_client=None, subject=f"flux.telemetry.{rack}.logs", data=lines.encode(), headers={SRC_HEADER: src})


def _count(db, rack: str) -> int:
    return db.conn.execute("SELECT count(*) FROM telemetry_logs WHERE rack = ?", [rack]).fetchone()[0]


def test_a_rack_cannot_open_more_wals_than_the_cap(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fluxrig.mixer.ingest")
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), max_incarnations=3)
    msgs = [_msg("greedy", f"wal-{i}", 0) for i in range(10)] + [_msg("calm", "wal-0", 0)]
    ingest._write_groups(ingest._decode(msgs))
    assert _count(db, "greedy") == 30 and _count(db, "calm") == 10
    assert ingest.incarnations_refused == {"greedy": 7}
    assert db.conn.execute("SELECT count(*) FROM telemetry_sources WHERE rack = 'greedy'").fetchone()[0] == 3
    # A WAL it already has keeps working past the cap.
    ingest._write_groups(ingest._decode([_msg("greedy", "wal-1", 100)]))
    assert _count(db, "greedy") == 40
    errors = [r for r in caplog.records if "max_incarnations" in r.getMessage()]
    assert len(errors) == 1 and "greedy" in errors[0].getMessage()
    db.close()


def test_per_rack_row_and_byte_quotas_drop_only_the_rack_over_them(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fluxrig.mixer.ingest")
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_rows=50, rack_max_bytes=1_000_000, quota_window=3600)
    msgs = [_msg("chatty", "w", i * 10) for i in range(8)] + [_msg("quiet", "w", 0)]
    ingest._write_groups(ingest._decode(msgs))
    assert _count(db, "chatty") == 50 and _count(db, "quiet") == 10
    assert ingest.stats["quota_dropped_rows"] == {"chatty": 30}
    big = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_bytes=5_000, quota_window=3600)
    big._write_groups(big._decode([_msg("fat", "w", i * 10, pad=200) for i in range(4)]))
    assert _count(db, "fat") == 20  # two messages of ~2.3 kB fit in 5 kB, the others do not
    assert big.quota_dropped == {"fat": 20}
    over = [r for r in caplog.records if "over its quota" in r.getMessage()]
    assert [("chatty" in r.getMessage()) for r in over] == [True, False] and "fat" in over[1].getMessage()
    db.close()


def test_the_quota_window_resets(tmp_path):
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_rows=10, quota_window=0.0)
    for i in range(5):  # a zero window: every message starts a new one
        ingest._write_groups(ingest._decode([_msg("r", "w", i * 10)]))
    assert _count(db, "r") == 50 and not ingest.quota_dropped
    db.close()
