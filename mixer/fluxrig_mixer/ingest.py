"""Telemetry ingest: `flux.telemetry.<rack>.logs|metrics|traces` from JetStream into DuckDB.

Job. A durable pull consumer on the `flux-telemetry` stream fetches up to
`batch_max_messages` bus messages (each an NDJSON batch, fluxrig.agent.telemetry), groups
their payloads by (kind, rack, source), writes each group's bytes to one spool file, and in
one transaction per fetch lets DuckDB's own JSON reader load them:

    INSERT INTO telemetry_<kind> SELECT m.rack, j.id + m.base, ...
    FROM read_json([<spool files>], columns=..., filename=true) j JOIN (<file -> rack, base>) m

Bulk and in C++, never row by row in Python: this is what keeps ingest above the Python
appender's rate. A fetch that hits the primary key (a re-send) is redone with INSERT OR
IGNORE. Then the whole fetch is acknowledged with one ack (AckPolicy.ALL, in
order). A crash between the commit and the ack re-delivers the fetch; the primary key
(rack, id) drops the rows already stored, so a record re-sent lands once. The stored id is
`incarnation << 40 | seq`: each (rack, src) pair, src being the Flux-Src header (the Rack's
WAL id), gets its own incarnation number (table `telemetry_sources`), so a Rack whose WAL was
wiped and restarted at seq 1 is not mistaken for a re-send of its old records. The kind and
the `<rack>` come from the subject (the bus permissions guarantee who may publish there),
never from the payload.

A payload that is not NDJSON is counted and acknowledged (it never will load); values of the
wrong type are loaded as NULL (DuckDB's ignore_errors) and lines without an id are dropped
(counted in `dropped`). A fetch whose write fails is retried message by message so one bad
batch cannot block the others. Retention deletes rows older than `telemetry.retention`
every `retention_interval`. Spool files live in `spool_dir` (RAM-backed /dev/shm when
present) only for the duration of one write.

DuckDB work runs in a worker thread with its own cursor, so the event loop (API, heartbeats)
keeps running while a batch is written.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict

import duckdb

from fluxrig.agent import subjects as S
from fluxrig.agent.telemetry import MAX_RECORD_ID, SRC_HEADER

__all__ = ["TelemetryIngest", "TELEMETRY_DDL", "STAGE_COLUMNS", "TIME_COLUMN", "load_ndjson", "ensure_tables"]

log = logging.getLogger("fluxrig.mixer.ingest")

CONSUMER = "mixer-ingest"
# Decoded fetches waiting for the writer; bounds memory while overlapping fetch and write.
PIPELINE_DEPTH = 2
# nats-py refuses a pull that expires in less than ~0.1 ms; keep pulls above this.
MIN_PULL_S = 0.01

# (column, type) per kind. Times are unix nanoseconds (BIGINT) as sent: the appender takes the
# batch's columns unchanged, and the queries convert only the rows they return.
STAGE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "logs": [
        ("rack", "VARCHAR"),
        ("id", "UBIGINT"),
        ("ts", "BIGINT"),
        ("severity", "SMALLINT"),
        ("severity_text", "VARCHAR"),
        ("body", "VARCHAR"),
        ("attrs", "VARCHAR"),
        ("trace_id", "VARCHAR"),
        ("span_id", "VARCHAR"),
    ],
    "metrics": [
        ("rack", "VARCHAR"),
        ("id", "UBIGINT"),
        ("ts", "BIGINT"),
        ("name", "VARCHAR"),
        ("type", "VARCHAR"),
        ("value", "DOUBLE"),
        ("unit", "VARCHAR"),
        ("attrs", "VARCHAR"),
    ],
    "traces": [
        ("rack", "VARCHAR"),
        ("id", "UBIGINT"),
        ("trace_id", "VARCHAR"),
        ("span_id", "VARCHAR"),
        ("parent_span_id", "VARCHAR"),
        ("name", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("start", "BIGINT"),
        ("end", "BIGINT"),
        ("status", "VARCHAR"),
        ("attrs", "VARCHAR"),
    ],
}
TIME_COLUMN = {"logs": "ts", "metrics": "ts", "traces": "start"}


def _q(col: str) -> str:
    return f'"{col}"'


TELEMETRY_DDL: list[str] = []
for _kind, _cols in STAGE_COLUMNS.items():
    _defs = ", ".join(f"{_q(c)} {t}" for c, t in _cols)
    TELEMETRY_DDL.append(
        f"CREATE TABLE IF NOT EXISTS telemetry_{_kind}({_defs}, received_at TIMESTAMPTZ DEFAULT now(), PRIMARY KEY(rack, id))"
    )
TELEMETRY_DDL.append(
    "CREATE TABLE IF NOT EXISTS telemetry_sources(rack VARCHAR, src VARCHAR, incarnation BIGINT, "
    "first_seen TIMESTAMPTZ DEFAULT now(), PRIMARY KEY(rack, src))"
)


def ensure_tables(db) -> None:
    db.ensure(TELEMETRY_DDL)


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _json_columns(kind: str) -> str:
    """The read_json `columns` struct: every field but rack (from the subject)."""
    return "{" + ", ".join(f"{_sql_str(c)}: {_sql_str(t)}" for c, t in STAGE_COLUMNS[kind][1:]) + "}"


_SELECT_EXPR = {
    # A missing or unparsable time becomes the time the Mixer stored the row.
    "ts": "coalesce(j.ts, epoch_ns(current_timestamp))",
    "start": "coalesce(j.start, epoch_ns(current_timestamp))",
}


def load_ndjson(cur, kind: str, files: list[tuple[str, str, int]], ignore_duplicates: bool) -> int:
    """Load spool files [(path, rack, id base)] of one kind into telemetry_<kind> with ONE
    statement (inside the caller's transaction); returns the rows inserted.

    One statement per fetch, not per file: DuckDB then writes large row groups straight to
    the database file instead of through its WAL, several times faster for a file-backed
    database. Plain INSERT unless `ignore_duplicates`: INSERT OR IGNORE costs ~40% more, so it
    is only used to redo a fetch that hit the primary key (a re-send)."""
    names = [c for c, _t in STAGE_COLUMNS[kind]]
    exprs = ["m.rack", "j.id + m.base"] + [_SELECT_EXPR.get(c, "j." + _q(c)) for c in names[2:]]
    paths = "[" + ", ".join(_sql_str(p) for p, _r, _b in files) + "]"
    mapping = ", ".join(f"({_sql_str(p)}, {_sql_str(r)}, {int(b)})" for p, r, b in files)
    verb = "INSERT OR IGNORE INTO" if ignore_duplicates else "INSERT INTO"
    sql = (
        f"{verb} telemetry_{kind}({', '.join(_q(c) for c in names)}) "
        f"SELECT {', '.join(exprs)} FROM read_json({paths}, format='newline_delimited', columns={_json_columns(kind)}, "
        "ignore_errors=true, filename=true, maximum_object_size=16777216) j "
        f"JOIN (VALUES {mapping}) m(f, rack, base) ON j.filename = m.f WHERE j.id IS NOT NULL"
    )
    return cur.execute(sql).fetchone()[0]


def _spool_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class TelemetryIngest:
    """Consumes the telemetry stream into DuckDB. `start(js)`, `stop()`, `stats`."""

    def __init__(
        self,
        db,
        batch_max_messages: int = 64,
        batch_max_bytes: int = 32 * 1024 * 1024,
        flush_interval: float = 0.2,
        retention: float = 7 * 86400.0,
        retention_interval: float = 300.0,
        durable: str = CONSUMER,
        spool_dir: str | None = None,
    ):
        self.db = db
        self.batch_max_messages = batch_max_messages
        self.batch_max_bytes = batch_max_bytes
        self.flush_interval = flush_interval
        self.retention = retention
        self.retention_interval = retention_interval
        self.durable = durable
        ensure_tables(db)
        self.rows: dict[str, int] = defaultdict(int)
        self.duplicates: dict[str, int] = defaultdict(int)  # lines not stored: re-sends and lines without an id
        self.spool_dir = tempfile.mkdtemp(prefix="fluxrig-ingest-", dir=spool_dir or _spool_root())
        self._spool_seq = itertools.count()
        self.messages = 0
        self.rejected = 0
        self.write_errors = 0
        self.deleted_by_retention = 0
        self.write_seconds = 0.0  # time spent inside DuckDB writes (for the benchmark and /metrics)
        self.last_error = ""
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        # (rack, src) -> incarnation; racks -> next incarnation number. New pairs are written
        # to telemetry_sources by the writer before the rows that use them.
        self._sources: dict[tuple[str, str], int] = {}
        self._next_incarnation: dict[str, int] = {}
        self._new_sources: list[tuple[str, str, int]] = []
        for rack, src, inc in db.conn.execute("SELECT rack, src, incarnation FROM telemetry_sources").fetchall():
            self._sources[(rack, src)] = inc
            self._next_incarnation[rack] = max(self._next_incarnation.get(rack, 0), inc + 1)
        self._stopping = False

    @property
    def stats(self) -> dict:
        return {
            "rows": dict(self.rows),
            "duplicates": dict(self.duplicates),
            "messages": self.messages,
            "rejected_batches": self.rejected,
            "write_errors": self.write_errors,
            "deleted_by_retention": self.deleted_by_retention,
            "write_seconds": round(self.write_seconds, 3),
            "last_error": self.last_error,
        }

    async def start(self, js) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self._stopping = False
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            ack_wait=60.0,
            filter_subject="flux.telemetry.>",
        )
        self._sub = await js.pull_subscribe("flux.telemetry.>", durable=self.durable, stream=S.STREAM_TELEMETRY, config=config)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="telemetry-ingest"),
            loop.create_task(self._retention_loop(), name="telemetry-retention"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    async def _fetch(self, timeout: float | None = None):
        """Pull until `batch_max_bytes` are gathered or `flush_interval` has passed since the
        first pull: (messages, groups) or None when idle. Each pull asks for at most
        `batch_max_messages` (bounds what the server buffers for us); gathering several pulls
        into one write matters because DuckDB stores a large INSERT several times faster per
        row than a small one (big row groups go straight to the file, not through its WAL)."""
        import nats.errors

        wait = timeout or self.flush_interval
        deadline = time.monotonic() + wait
        msgs: list = []
        size = 0
        while True:
            try:
                got = await self._sub.fetch(self.batch_max_messages, timeout=max(wait, MIN_PULL_S))
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                break
            msgs.extend(got)
            size += sum(len(m.data) for m in got)
            wait = deadline - time.monotonic()
            if size >= self.batch_max_bytes or wait <= 0:
                break
        if not msgs:
            return None
        return msgs, self._decode(msgs)

    async def _store(self, msgs, groups) -> None:
        """Write one decoded fetch, then acknowledge it (AckPolicy.ALL: one ack for all)."""
        if groups:
            try:
                await asyncio.to_thread(self._write_groups, groups)
            except Exception as exc:  # one bad batch: retry one message at a time
                self.write_errors += 1
                self.last_error = str(exc)[:500]
                log.warning("telemetry write failed (%s); retrying message by message", exc)
                for m in msgs:
                    single = self._decode([m], count=False)
                    if not single:
                        continue
                    try:
                        await asyncio.to_thread(self._write_groups, single)
                    except Exception as exc2:
                        self.rejected += 1
                        self.last_error = str(exc2)[:500]
                        log.error("telemetry batch on %s rejected: %s", m.subject, exc2)
        await msgs[-1].ack()
        self.messages += len(msgs)

    async def drain_once(self, timeout: float | None = None) -> int:
        """Fetch one batch and store it; the number of bus messages handled (0 when idle)."""
        got = await self._fetch(timeout)
        if got is None:
            return 0
        await self._store(*got)
        return len(got[0])

    def _decode(self, msgs, count: bool = True) -> dict:
        """Group payloads by (kind, rack, id base) without parsing them: DuckDB will."""
        groups: dict[tuple[str, str, int], list[bytes]] = {}
        for m in msgs:
            rack = S.rack_of_subject(m.subject)
            kind = m.subject.rsplit(".", 1)[-1]
            data = m.data
            if rack is None or kind not in STAGE_COLUMNS or not data.lstrip()[:1] == b"{":
                if count:
                    self.rejected += 1
                    self.last_error = f"{m.subject}: not an NDJSON telemetry batch"
                continue
            src = (m.headers or {}).get(SRC_HEADER, "")[:128]
            inc = self._sources.get((rack, src))
            if inc is None:
                inc = self._next_incarnation.get(rack, 0)
                self._next_incarnation[rack] = inc + 1
                self._sources[(rack, src)] = inc
                self._new_sources.append((rack, src, inc))
            if not data.endswith(b"\n"):
                data = data + b"\n"
            groups.setdefault((kind, rack, inc * MAX_RECORD_ID), []).append(data)
        return groups

    def _write_groups(self, groups: dict) -> None:
        """One transaction per fetch: a spool file per group, one INSERT per kind."""
        started = time.perf_counter()
        try:
            self._write_groups_timed(groups)
        finally:
            self.write_seconds += time.perf_counter() - started

    def _write_groups_timed(self, groups: dict) -> None:
        cur = self.db.cursor()
        if self._new_sources:
            new, self._new_sources = self._new_sources, []
            cur.executemany("INSERT OR IGNORE INTO telemetry_sources(rack, src, incarnation) VALUES (?, ?, ?)", new)
        by_kind: dict[str, list[tuple[str, str, int]]] = {}
        lines: dict[str, int] = defaultdict(int)
        paths = []
        try:
            for (kind, rack, base), payloads in groups.items():
                path = os.path.join(self.spool_dir, f"{next(self._spool_seq)}.ndjson")
                with open(path, "wb") as fh:
                    fh.writelines(payloads)
                paths.append(path)
                by_kind.setdefault(kind, []).append((path, rack, base))
                lines[kind] += sum(p.count(b"\n") for p in payloads)
            for ignore in (False, True):
                cur.begin()
                try:
                    inserted = {kind: load_ndjson(cur, kind, files, ignore) for kind, files in by_kind.items()}
                    cur.commit()
                    break
                except duckdb.ConstraintException:
                    cur.rollback()  # a re-send in this fetch: redo it skipping what is stored
                    if ignore:
                        raise
                except Exception:
                    cur.rollback()
                    raise
        finally:
            for p in paths:
                try:
                    os.unlink(p)
                except OSError:
                    pass
        for kind, n in inserted.items():
            self.rows[kind] += n
            self.duplicates[kind] += max(0, lines[kind] - n)

    async def _run(self) -> None:
        """Two stages: fetching and decoding the next batch overlaps with DuckDB writing the
        previous one (the write runs in a thread and releases the GIL inside DuckDB). The
        queue of PIPELINE_DEPTH decoded fetches bounds memory; order (and so the ack-all
        semantics) is kept because there is exactly one writer."""
        queue: asyncio.Queue = asyncio.Queue(PIPELINE_DEPTH)
        writer = asyncio.get_running_loop().create_task(self._write_loop(queue), name="telemetry-writer")
        try:
            while not self._stopping:
                try:
                    got = await self._fetch()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # bus down (Snake restarting): wait and go on
                    self.last_error = str(exc)[:500]
                    log.debug("telemetry fetch failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                if got is not None:
                    await queue.put(got)
        finally:
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, Exception):
                pass

    async def _write_loop(self, queue: asyncio.Queue) -> None:
        while True:
            msgs, groups = await queue.get()
            try:
                await self._store(msgs, groups)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ack failed (bus down): the batch is redelivered, the key dedups it
                self.last_error = str(exc)[:500]
                log.debug("telemetry store/ack failed: %s", exc)

    def apply_retention(self, now: float | None = None) -> int:
        """Delete rows older than the retention window; returns rows deleted."""
        cutoff_ns = int(((time.time() if now is None else now) - self.retention) * 1e9)
        cur = self.db.cursor()
        total = 0
        for kind, col in TIME_COLUMN.items():
            total += cur.execute(f'DELETE FROM telemetry_{kind} WHERE "{col}" < ?', [cutoff_ns]).fetchone()[0]
        self.deleted_by_retention += total
        return total

    async def _retention_loop(self) -> None:
        while not self._stopping:
            try:
                n = await asyncio.to_thread(self.apply_retention)
                if n:
                    log.info("telemetry retention: deleted %d rows older than %.0fs", n, self.retention)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("telemetry retention failed: %s", exc)
            await asyncio.sleep(self.retention_interval)
