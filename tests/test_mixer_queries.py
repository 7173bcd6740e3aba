"""Telemetry stores and their queries, the same tests against both backends: the Mixer's DuckDB
file and a real ClickHouse server (Debian's clickhouse-server, one per session, a database of
its own per test).

What must hold for either: `q` is a literal, case-insensitive substring (`_`, `%`, `\\` are no
wildcards: DuckDB's ILIKE had no ESCAPE clause); a look-back longer than the epoch reads from
the epoch (`since=99999999999d` was a 500); cursor pages read every row exactly once, ties
included; a replayed part shows each record once; a Rack's forged times are clamped to the
receive time's window with both times kept; a time range exports as Parquet.
"""

from __future__ import annotations

import json
import time

import duckdb
import pytest
from fluxrig_mixer.duckdb_store import DuckDBStore
from fluxrig_mixer.queries import QueryError
from fluxrig_mixer.registry import Database
from fluxrig_mixer.telemetry_store import Clamp, Part

NOW = time.time_ns()
S = 1_000_000_000
CLAMP = Clamp(max_age_ns=3600 * S, max_skew_ns=60 * S)


@pytest.fixture(params=["duckdb", "clickhouse"])
def store(request, tmp_path):
    if request.param == "duckdb":
        db = Database(str(tmp_path / "mixer.duckdb"))
        s = DuckDBStore(db, clamp=CLAMP, spool_dir=str(tmp_path))
        yield s
        s.close()
        db.close()
    else:
        from clickhouse_server import USER, fresh_database
        from fluxrig_mixer.clickhouse_store import ClickHouseSettings, ClickHouseStore

        server = request.getfixturevalue("clickhouse")
        settings = ClickHouseSettings(
            port=server.port, user=USER, password=server.password, database=fresh_database(), flush_interval=0.05
        )
        s = ClickHouseStore(settings, clamp=CLAMP, spool_dir=str(tmp_path))
        yield s
        try:
            s._client().execute(f"DROP DATABASE IF EXISTS {settings.database}")
        finally:
            s.close()


def part(kind: str, rack: str, records: list[dict], recv: int = NOW, base: int = 0) -> Part:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    return Part(kind, rack, base, recv, data, len(records))


def logs(store, **kw):
    kw.setdefault("since", "2h")
    return store.queries.logs(**kw)


def test_q_is_a_literal_substring_even_with_underscore_percent_and_backslash(store):
    bodies = ["disk a_b full", "disk axb full", "100% done", "1000 done", "C:\\path\\x", "C:path", "Upper CASE"]
    store.write([part("logs", "r1", [{"id": i, "ts": NOW - i, "body": b} for i, b in enumerate(bodies)])], [])
    found = {q: sorted(r["body"] for r in logs(store, q=q)) for q in ("a_b", "100%", "C:\\p", "case", "_", "%")}
    assert found["a_b"] == ["disk a_b full"]
    assert found["100%"] == ["100% done"]
    assert found["C:\\p"] == ["C:\\path\\x"]
    assert found["case"] == ["Upper CASE"]
    assert found["_"] == ["disk a_b full"]
    assert found["%"] == ["100% done"]


def test_a_look_back_longer_than_the_epoch_reads_from_the_epoch(store):
    store.write([part("logs", "r1", [{"id": 1, "ts": NOW, "body": "now"}])], [])
    for since in ("99999999999d", "9" * 400 + "h", "99999999999999999999h"):
        assert [r["body"] for r in store.queries.logs(since=since)] == ["now"], since
    assert store.queries.logs(since="99999999999d", until="99999999999d") == []
    with pytest.raises(QueryError) as err:
        store.queries.logs(since="last tuesday")
    assert err.value.key == "since"


def test_filters_mean_the_same_in_every_backend(store):
    store.write(
        [
            part(
                "logs",
                "r1",
                [
                    {"id": 1, "ts": NOW - 3 * S, "severity": 9, "severity_text": "INFO", "body": "started"},
                    {
                        "id": 2,
                        "ts": NOW - 2 * S,
                        "severity": 13,
                        "severity_text": "WARN",
                        "body": "slow",
                        "attrs": '{"gear":"g1"}',
                    },
                    {"id": 3, "ts": NOW - 1 * S, "severity": 17, "severity_text": "ERROR", "body": "failed"},
                ],
            ),
            part("logs", "r2", [{"id": 1, "ts": NOW, "severity": 21, "body": "fatal"}]),
            part(
                "metrics",
                "r1",
                [
                    {"id": 10 + i, "ts": NOW - 10 * S + i * S, "name": n, "type": "gauge", "value": float(i)}
                    for i, n in enumerate(["cpu.user", "cpu.sys", "mem.rss", "cpu.user", "cpu.user"])
                ],
            ),
            part(
                "traces",
                "r1",
                [
                    {
                        "id": 20,
                        "trace_id": "t1",
                        "span_id": "s1",
                        "name": "auth",
                        "start": NOW - 5 * S,
                        "end": NOW - 4 * S,
                    },
                    {
                        "id": 21,
                        "trace_id": "t2",
                        "span_id": "s2",
                        "name": "auth",
                        "start": NOW - 3 * S,
                        "end": NOW - 3 * S + 5_000_000,
                    },
                ],
            ),
        ],
        [],
    )
    q = store.queries
    assert [r["body"] for r in logs(store)] == ["fatal", "failed", "slow", "started"]
    assert [r["body"] for r in logs(store, min_level="warn", rack="r1")] == ["failed", "slow"]
    assert [r["body"] for r in logs(store, q="GEAR")] == ["slow"]
    assert [r["level"] for r in logs(store, min_level="17")] == [None, "ERROR"]
    with pytest.raises(QueryError):
        logs(store, min_level="loud")
    cpu = q.metrics(name="cpu.*", since="1h")
    assert [(m["name"], m["value"]) for m in cpu] == [
        ("cpu.user", 4.0),
        ("cpu.user", 3.0),
        ("cpu.sys", 1.0),
        ("cpu.user", 0.0),
    ]
    assert len(q.metrics(name="cpu.user", since="1h")) == 3
    buckets = q.metrics(name="cpu.user", since="1h", bucket="1h")
    assert len(buckets) in (1, 2) and sum(b["count"] for b in buckets) == 3
    assert max(b["max"] for b in buckets) == 4.0 and min(b["min"] for b in buckets) == 0.0
    one = q.metrics(name="cpu.user", since="1h", bucket="1ms")
    assert [b["last"] for b in one] == [4.0, 3.0, 0.0]
    traces = q.traces(since="1h")
    assert [t["trace_id"] for t in traces] == ["t2", "t1"]
    assert traces[0]["duration_ms"] == pytest.approx(5.0) and traces[1]["duration_ms"] == pytest.approx(1000.0)
    assert [t["span_id"] for t in q.traces(trace_id="t1", since="1h")] == ["s1"]


def test_cursor_pages_read_every_row_exactly_once(store):
    # 25 records on two racks, many sharing a timestamp: the order must still be total.
    records = {"r1": [], "r2": []}
    for i in range(25):
        records["r1" if i % 2 else "r2"].append({"id": i, "ts": NOW - (i // 4) * S, "body": f"rec {i}"})
    store.write([part("logs", r, recs) for r, recs in records.items()], [])
    seen, cursor, pages = [], None, 0
    while True:
        page = logs(store, limit=10, cursor=cursor)
        pages += 1
        seen += [(r["rack"], r["id"]) for r in page]
        cursor = page.next_cursor
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3 and len(seen) == 25 and len(set(seen)) == 25
    times = [r["timestamp"] for r in logs(store, limit=100)]
    assert times == sorted(times, reverse=True)
    with pytest.raises(QueryError) as err:
        logs(store, cursor="not-a-cursor")
    assert err.value.key == "cursor"


def test_a_replayed_part_shows_each_record_once(store):
    parts = [part("logs", "r1", [{"id": i, "ts": NOW - i, "body": f"b{i}"} for i in range(50)])]
    store.write(parts, [("r1", "wal-a", 0)])
    store.write(parts, [("r1", "wal-a", 0)])  # the crash between insert and ack, replayed
    rows = logs(store, limit=1000)
    assert sorted(r["id"] for r in rows) == list(range(50))
    assert store.load_sources() == [("r1", "wal-a", 0)]


def test_forged_rack_times_are_clamped_to_the_receive_window_and_both_kept(store):
    year_2076 = 3_345_062_400 * S
    store.write(
        [
            part(
                "logs",
                "evil",
                [
                    {"id": 1, "ts": year_2076, "body": "future"},
                    {"id": 2, "ts": 1, "body": "1970"},
                    {"id": 3, "body": "no time"},
                    {"id": 4, "ts": NOW - 5 * S, "body": "honest"},
                ],
            ),
            part(
                "traces", "evil", [{"id": 5, "trace_id": "t", "span_id": "s", "start": year_2076, "end": year_2076 + S}]
            ),
        ],
        [],
    )
    rows = {r["body"]: r for r in store.queries.logs(since="99999999999d", limit=100)}
    assert rows["future"]["rack_timestamp"].startswith("2076-")
    assert rows["future"]["timestamp"] == _iso(NOW + CLAMP.max_skew_ns)
    assert rows["1970"]["timestamp"] == _iso(NOW - CLAMP.max_age_ns)
    assert rows["1970"]["rack_timestamp"].startswith("1970-")
    assert rows["no time"]["timestamp"] == _iso(NOW) and rows["no time"]["rack_timestamp"] is None
    assert rows["honest"]["timestamp"] == _iso(NOW - 5 * S) == rows["honest"]["rack_timestamp"]
    assert all(r["received"] == _iso(NOW) for r in rows.values())
    (trace,) = store.queries.traces(since="99999999999d")
    assert trace["start"] == _iso(NOW + CLAMP.max_skew_ns) and trace["duration_ms"] == pytest.approx(1000.0)
    # Retention can now reach them: nothing sorts years ahead of the present.
    assert store.queries.logs(since="99999999999d", until=_iso(NOW + 2 * CLAMP.max_skew_ns), limit=100)


def _iso(ns: int) -> str:
    import datetime as dt

    return (dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=ns // 1000)).isoformat() + "Z"


def test_a_time_range_exports_as_parquet(store, tmp_path):
    store.write([part("logs", "r1", [{"id": i, "ts": NOW - i * S, "body": f"b{i}"} for i in range(30)])], [])
    path = str(tmp_path / "out.parquet")
    n = store.queries.export_parquet("logs", path, since=_iso(NOW - 9 * S - S // 2), until=_iso(NOW + S))
    con = duckdb.connect()
    rows = con.execute(f"SELECT rack, id, body, ts FROM read_parquet('{path}') ORDER BY ts").fetchall()
    assert n == len(rows) == 10  # ts NOW-0s .. NOW-9s
    assert [r[1] for r in rows] == list(range(9, -1, -1))
    with pytest.raises(QueryError):
        store.queries.export_parquet("spans", path)


def test_every_value_reads_back_as_it_was_sent(store):
    """Strings of any bytes (tabs, newlines, quotes, backslashes, non-ASCII, control characters),
    big integers and NULLs come back unchanged: the ClickHouse path hex-stages its blocks."""
    bodies = ["tab\there", "new\nline", 'quote " and \\ back', "é ü 漢字 🙂", "\x01\x1f ctl", "", "N", "v", "\t\n"]
    records = [
        {"id": i, "ts": NOW - i, "severity": 24, "severity_text": b, "body": b, "attrs": '{"k":"' + str(i) + '"}'}
        for i, b in enumerate(bodies)
    ]
    records.append({"id": (1 << 40) - 1, "ts": NOW - 100, "body": None})  # the largest id, a NULL body
    store.write([part("logs", "r\t1", records)], [])
    rows = {r["id"]: r for r in logs(store, limit=100)}
    assert [rows[i]["body"] for i in range(len(bodies))] == bodies
    assert [rows[i]["level"] for i in range(len(bodies))] == bodies
    assert rows[(1 << 40) - 1]["body"] is None and rows[(1 << 40) - 1]["severity"] is None
    assert {r["rack"] for r in rows.values()} == {"r\t1"}
    store.write(
        [
            part(
                "metrics",
                "r1",
                [{"id": 1, "ts": NOW, "name": "m", "value": 0.1}, {"id": 2, "ts": NOW - 1, "name": "m"}],
            )
        ],
        [],
    )
    assert [m["value"] for m in store.queries.metrics(name="m", since="1h")] == [0.1, None]
