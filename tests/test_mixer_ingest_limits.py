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
import time

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


def test_per_rack_quotas_defer_only_the_rack_over_them_and_drop_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxrig.mixer.ingest")
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_rows=50, rack_max_bytes=1_000_000, quota_window=3600)
    msgs = [_msg("chatty", "w", i * 10) for i in range(8)] + [_msg("quiet", "w", 0)]
    admitted, deferred = ingest._over_quota(msgs)
    assert [m.subject for m in deferred] == ["flux.telemetry.chatty.logs"] * 3  # left in JetStream, not dropped
    ingest._write_groups(ingest._decode(admitted))
    assert _count(db, "chatty") == 50 and _count(db, "quiet") == 10
    assert ingest.stats["quota_deferred"] == {"chatty": 3} and ingest.stats["quota_deferred_rows"] == {"chatty": 30}
    assert ingest.stats["quota_state"] == {"chatty": "over"}
    big = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_bytes=5_000, quota_window=3600)
    admitted, deferred = big._over_quota([_msg("fat", "w", i * 10, pad=200) for i in range(4)])
    assert len(admitted) == 2 and len(deferred) == 2  # two messages of ~2.3 kB fit in 5 kB
    # one message larger than a whole quota still passes, alone, at the start of a window
    huge = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_bytes=100, quota_window=3600)
    assert len(huge._over_quota([_msg("h", "w", 0), _msg("h", "w", 10)])[0]) == 1
    text = [r.getMessage() for r in caplog.records if "quota" in r.getMessage()]
    assert any("chatty" in t and "used 80%" in t for t in text)  # the alert, then the push-back
    assert any("chatty" in t and "waits in JetStream" in t for t in text)
    db.close()


def test_the_quota_window_resets(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxrig.mixer.ingest")
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path), rack_max_rows=10, quota_window=0.2)
    assert len(ingest._over_quota([_msg("r", "w", 0), _msg("r", "w", 10)])[1]) == 1
    assert 0 < ingest._quotas.defer_for("r", time.monotonic()) <= 0.5  # NAKed until the window ends
    time.sleep(0.25)
    assert len(ingest._over_quota([_msg("r", "w", 10)])[0]) == 1 and ingest._quotas.state.get("r") != "over"
    assert "within its quota again" in caplog.text
    db.close()


def test_the_quota_is_on_by_default():
    from fluxrig_mixer.config import load_config
    from fluxrig_mixer.ingest import RACK_MAX_BYTES, RACK_MAX_ROWS

    t = load_config(None, environ={}).telemetry
    assert (t.rack_max_rows, t.rack_max_bytes, t.quota_window) == (RACK_MAX_ROWS, RACK_MAX_BYTES, 60.0)
    assert RACK_MAX_ROWS > 0 and RACK_MAX_BYTES > 0
