"""Telemetry in ClickHouse: the Institutional tier's OLAP archive (telemetry_store contract).

Job. Store fetched NDJSON parts into `<prefix>logs|metrics|traces` and the (rack, src) ->
incarnation table `<prefix>sources` of a ClickHouse database over the native protocol
(`clickhouse-driver`, which negotiates the protocol revision with 18.x as with current
releases, where `clickhouse-connect` fails on old servers); answer the API's queries from it
with the same parameters and semantics as DuckDB (queries.py builds the Filter, this module
the SQL). Supported: 18.16 and later; the schema and SQL keep to what 18.16 has. Tested: 18.16
end to end (tests/clickhouse_server.py); ClickHouse 26.x's own engine (chdb-core) reads our
Native blocks and runs this schema and these statements (tests/test_mixer_clickhouse_current.py);
the native handshake with a current server is untested (none installable on the test box).

Exactly once: a table engine that collapses duplicates, plus a query path that never shows
one. Each table is a ReplacingMergeTree ORDER BY (rack, <time>, id), partitioned by day of
<time>. A record re-sent, or a fetch replayed after a crash between the insert and the
JetStream ack, is the same (rack, id) with the same clamped time (the clamp is relative to
the Snake's receive time carried by the message, not to the Mixer's clock), so it has the
same sorting key in the same partition; merges keep one, and every query reads `FINAL`, which
collapses what is not merged yet. Why not idempotent blocks: `insert_deduplication_token`
(22.2+) and `non_replicated_deduplication_window` (20.x+) do not exist on 18.16, replicated
block hashes need ZooKeeper, and a replay after a crash is regrouped into different blocks by
the consumer anyway (what was delivered above the ack floor, fetched in another grouping), so
a block hash would not match. The engine's key does not care how rows were grouped. In a
cluster (ingest_cluster.py) the nodes share one consumer with explicit acks, so a block is not
even a contiguous sequence range, and a dead node's messages come back to another node in
other blocks: a block token could not match there at all. The cost is FINAL at query time (a
merge on read of the parts in range). Measured (bench/telemetry_ingest.py --backend clickhouse
--rows 500000, 18.16, the table after a full replay: 1M physical rows for 500k records, 5
parts, shared 2-core box, median of 5): newest 1000 rows 1192 ms with FINAL vs 432 ms
without, one Rack's page 181 vs 73 ms, text search 1075 vs 332 ms, count() 299 vs 7 ms. So
2.5-3x on a page, paid on every read; kept because it is the only exactly-once the 18.16
server and the shared consumer both allow (tokens need 22.2+ and a deterministic grouping).

Sources are stored (their own ReplacingMergeTree on (rack, src)) before the rows that use
them; a crash between the two leaves an assignment without rows, which is harmless. One
Mixer ingest per database: two Mixers numbering WALs into one database would need a shared
allocator (the Institutional cluster's KV), which is not built here.

Batching: the ingest gathers a fetch until `batch_max_rows` (100,000) or `flush_interval`
(1 s) (the tail of a backlog drain at once, ingest.DRAIN_MIN_ROWS), and each write is one
INSERT per table with rows, never a row at a time.

Parsing and encoding: the NDJSON is parsed by an in-memory DuckDB (its C++ JSON reader, the
same SELECT as the DuckDB store, clamp included) into numpy columns, which clickhouse_native
encodes as ClickHouse Native column bytes (little-endian numbers, varint-prefixed strings, null
maps) and sends as the data of one `INSERT INTO <table> (cols) VALUES` per table: the server
only checks and stores them. Exact for every value (a float travels as its IEEE bits). Earlier
paths and their rates on this box (bench/telemetry_ingest.py, 500k log rows): a columnar insert
of Python values about 0.15 of the raw driver's rate; one hex-encoded text blob per block split
by a materialized view (schema v1) 32-60 k rows/s, 0.32-0.35 of the driver; Native blocks: see
the commit that made them and bench/telemetry_ingest.py.

Schema: `<prefix>schema` holds the version; the Mixer creates what is missing, refuses to
start (exit 2) when the version is newer than SCHEMA_VERSION or the server is unreachable
at first start. Retention: whole day partitions older than the TTL are dropped
(ALTER TABLE ... DROP PARTITION works on every version; table TTL needs 19.6+).

Failures: every ClickHouse error is UNAVAILABLE (the rows are typed by us, so a server that
refuses them is a server problem: nothing is acked, the ingest retries). Only a payload DuckDB
cannot parse is DATA.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
import urllib.parse

import duckdb

from fluxrig.errors import ConfigError
from fluxrig.net.addr import is_loopback

from .clickhouse_native import NATIVE_TYPES, NativeBlocks, blocks_from_result, columns_sql
from .duckdb_store import Spool, select_parts
from .queries import (
    SELECT_COLUMNS,
    TIME_OF,
    Filter,
    Page,
    export_filter,
    log_filter,
    metric_filter,
    shape_rows,
    trace_filter,
)
from .telemetry_store import STAGE_COLUMNS, TIME_COLUMN, Clamp, Failure, Part, SchemaError, Source, StoreUnavailable

__all__ = [
    "ClickHouseStore",
    "ClickHouseSettings",
    "SCHEMA_VERSION",
    "settings_from_config",
    "ddl",
    "StoreStartError",
    "SchemaStartError",
    "clickhouse_sql",
    "ClickHouseQueries",
]

log = logging.getLogger("fluxrig.mixer.clickhouse")

# A fetched part this large is spooled as a file of its own instead of tagged line by line into
# the fetch's combined file (duckdb_store.Spool: the rewrite costs more than DuckDB's per-file
# overhead past a few hundred lines).
SPOOL_OWN_FILE_BYTES = 64 * 1024
# v1 wrote through staging tables decoded by materialized views; v2 inserts Native blocks.
SCHEMA_VERSION = 2

_CH_TYPES = {t: ch for t, (ch, _dtype) in NATIVE_TYPES.items()}
# Never NULL (sorting key or always set by the clamp); every other column is Nullable.
_NOT_NULL = {"rack", "id", "ts", "start"}
# What a write sends per kind: the parsed columns, the Rack's own time and the receive time.
_TYPES = {k: dict(cols) | {"sent_ts": "BIGINT", "recv_ts": "BIGINT"} for k, cols in STAGE_COLUMNS.items()}
_NULLABLE = {k: {c for c in types if c not in _NOT_NULL | {"recv_ts"}} for k, types in _TYPES.items()}


class ClickHouseSettings:
    """Where and how to reach the server (from `[clickhouse]`, `settings_from_config`)."""

    def __init__(
        self,
        host="127.0.0.1",
        port=9000,
        database="fluxrig",
        user="default",
        password="",
        secure=False,
        ca_file="",
        prefix="telemetry_",
        ttl=0.0,
        batch_max_rows=100_000,
        flush_interval=1.0,
        connect_timeout=5.0,
        timeout=30.0,
    ):
        self.host, self.port, self.database, self.user = host, port, database, user
        self.password, self.secure, self.ca_file, self.prefix = password, secure, ca_file, prefix
        self.ttl, self.batch_max_rows, self.flush_interval = ttl, batch_max_rows, flush_interval
        self.connect_timeout, self.timeout = connect_timeout, timeout

    def __repr__(self) -> str:  # never the password
        return f"ClickHouseSettings({self.user}@{self.host}:{self.port}/{self.database}, tls={self.secure})"


def _read_password(path: str) -> str:
    if not path:
        return ""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", "clickhouse.password_file") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is readable by group or others; chmod 600 it", "clickhouse.password_file")
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def settings_from_config(cfg) -> ClickHouseSettings:
    """`[clickhouse]` (and telemetry.retention as the default TTL) as settings; ConfigError
    naming the key for a bad URL, a password in the URL, a readable password file, or plain
    text to a host that is not loopback without clickhouse.insecure_plaintext."""
    c = cfg.clickhouse
    host, port, database, secure = c.host, c.port, c.database, bool(c.tls or c.tls_ca_file)
    if c.url:
        u = urllib.parse.urlsplit(c.url)
        if u.scheme not in ("clickhouse", "clickhouses"):
            raise ConfigError("use clickhouse://host:port/database or clickhouses://...", "clickhouse.url")
        if u.password:
            raise ConfigError(
                "no password in the URL; put it in clickhouse.password_file (mode 0600)", "clickhouse.url"
            )
        host = u.hostname or host
        port = u.port or (9440 if u.scheme == "clickhouses" else 9000)
        database = u.path.strip("/") or database
        secure = secure or u.scheme == "clickhouses"
    if not database.replace("_", "").isalnum():
        raise ConfigError("letters, digits and _ only", "clickhouse.database")
    if not secure and not is_loopback(host):
        if not c.insecure_plaintext:
            raise ConfigError(
                f"{host} is not loopback: use TLS (clickhouses:// or clickhouse.tls_ca_file), or set "
                "clickhouse.insecure_plaintext = true to send telemetry and the password in clear",
                "clickhouse.url",
            )
        log.warning("clickhouse.insecure_plaintext: telemetry and the password go to %s in clear", host)
    return ClickHouseSettings(
        host=host,
        port=port,
        database=database,
        user=c.user,
        password=_read_password(c.password_file),
        secure=secure,
        ca_file=c.tls_ca_file,
        prefix=c.table_prefix,
        ttl=c.ttl or cfg.telemetry.retention,
        batch_max_rows=c.batch_max_rows,
        flush_interval=c.flush_interval,
        connect_timeout=c.connect_timeout,
        timeout=c.timeout,
    )


def ddl(db: str, prefix: str) -> list[str]:
    """CREATE TABLE IF NOT EXISTS for the current schema, then what upgrades an older one
    (v1's staging tables and views, which v2 no longer writes through, are dropped)."""
    out = []
    for kind, cols in STAGE_COLUMNS.items():
        tcol = TIME_COLUMN[kind]
        defs = []
        for c, t in cols:
            ch = _CH_TYPES[t]
            defs.append(f"`{c}` {ch if c in _NOT_NULL else f'Nullable({ch})'}")
        defs += ["`sent_ts` Nullable(Int64)", "`recv_ts` Int64", "`received_at` DateTime DEFAULT now()"]
        out.append(
            f"CREATE TABLE IF NOT EXISTS {db}.{prefix}{kind} ({', '.join(defs)}) "
            f"ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMMDD(toDateTime(intDiv(`{tcol}`, 1000000000))) "
            f"ORDER BY (rack, `{tcol}`, id)"
        )
    out.append(
        f"CREATE TABLE IF NOT EXISTS {db}.{prefix}sources (rack String, src String, incarnation UInt32, "
        "first_seen DateTime DEFAULT now()) ENGINE = ReplacingMergeTree() ORDER BY (rack, src)"
    )
    for kind in STAGE_COLUMNS:  # v1 -> v2: the views first, then the tables they read
        out.append(f"DROP TABLE IF EXISTS {db}.{prefix}{kind}_mv")
        out.append(f"DROP TABLE IF EXISTS {db}.{prefix}{kind}_stage")
    return out


class ClickHouseStore:
    """Telemetry tables in a ClickHouse database; see the module docstring."""

    name = "clickhouse"

    def __init__(self, settings: ClickHouseSettings, clamp: Clamp | None = None, spool_dir: str | None = None):
        self.settings = settings
        self.clamp = clamp or Clamp()
        self.batch_max_rows = settings.batch_max_rows
        self.flush_interval = settings.flush_interval
        self.before_write = None
        self.db = None  # not a DuckDB registry
        self.inserts: dict[str, int] = dict.fromkeys(STAGE_COLUMNS, 0)  # INSERTs with rows, per table
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._parse_lock = threading.Lock()
        self._duck = duckdb.connect()  # in-memory: parses NDJSON into typed columns
        self.spool = Spool(spool_dir, own_file_bytes=SPOOL_OWN_FILE_BYTES)
        self._t = {k: f"{settings.database}.{settings.prefix}{k}" for k in (*STAGE_COLUMNS, "sources", "schema")}
        try:
            self.server_version = self._client().execute("SELECT version()")[0][0]
        except Exception as exc:
            self.close()
            raise StoreStartError(
                f"ClickHouse at {settings.host}:{settings.port} is unreachable at start: {exc}", "clickhouse.url"
            ) from None
        try:
            self._ensure_schema()
        except BaseException:
            self.close()
            raise
        self._queries = ClickHouseQueries(self)
        log.info("telemetry archive: ClickHouse %s at %s (schema v%d)", self.server_version, settings, SCHEMA_VERSION)

    # -- connections -------------------------------------------------------------------------

    def _client(self):
        """This thread's own client (the driver's Client is not thread-safe)."""
        client = getattr(self._local, "client", None)
        if client is None:
            from .clickhouse_native import NativeClient

            s = self.settings
            kw = {}
            if s.secure:
                kw.update(secure=True, verify=True)
                if s.ca_file:
                    kw["ca_certs"] = s.ca_file
            client = NativeClient(
                host=s.host,
                port=s.port,
                user=s.user,
                password=s.password,
                connect_timeout=s.connect_timeout,
                send_receive_timeout=s.timeout,
                sync_request_timeout=s.timeout,
                client_name="fluxrig-mixer",
                settings={"max_block_size": 65536},
                **kw,
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _ensure_schema(self) -> None:
        c = self._client()
        s = self.settings
        c.execute(f"CREATE DATABASE IF NOT EXISTS {s.database}")
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {self._t['schema']} (version UInt32, applied_at DateTime DEFAULT now()) "
            "ENGINE = TinyLog"
        )
        version = c.execute(f"SELECT max(version) FROM {self._t['schema']}")[0][0] or 0
        if version > SCHEMA_VERSION:
            raise SchemaStartError(
                f"ClickHouse database {s.database} has telemetry schema v{version}, newer than this Mixer knows "
                f"(v{SCHEMA_VERSION}); upgrade the Mixer, or use another clickhouse.database",
                "clickhouse.database",
            )
        for stmt in ddl(s.database, s.prefix):
            c.execute(stmt)
        if version < SCHEMA_VERSION:
            c.execute(f"INSERT INTO {self._t['schema']} (version) VALUES", [(SCHEMA_VERSION,)])

    # -- the contract --------------------------------------------------------------------------

    @property
    def queries(self):
        return self._queries

    def load_sources(self) -> list[Source]:
        rows = self._client().execute(f"SELECT rack, src, incarnation FROM {self._t['sources']} FINAL")
        return [(r, s, int(i)) for r, s, i in rows]

    def classify(self, exc: BaseException) -> Failure:
        return Failure.DATA if isinstance(exc, _ParseError) else Failure.UNAVAILABLE

    def probe(self) -> None:
        self._client().execute("SELECT 1")

    def _stage(self, parts: list[Part]) -> dict[str, NativeBlocks]:
        """kind -> NativeBlocks: the parts parsed and clamped by DuckDB, encoded as Native
        column bytes in blocks of at most batch_max_rows (clickhouse_native)."""
        by_kind = self.spool.write(parts)
        try:
            out = {}
            with self._parse_lock:
                for kind, files in by_kind.items():
                    names, select = select_parts(kind, files, self.clamp)
                    types = _TYPES[kind]
                    sql = f"SELECT {columns_sql(names, types, _NULLABLE[kind])} FROM ({select})"
                    try:
                        arrays = self._duck.execute(sql).fetchnumpy()
                    except duckdb.Error as exc:
                        raise _ParseError(str(exc)) from exc
                    out[kind] = blocks_from_result(arrays, names, types, _NULLABLE[kind], self.batch_max_rows)
            return out
        finally:
            self.spool.remove(by_kind)

    def prepare(self, parts: list[Part]) -> dict[str, NativeBlocks]:
        """The CPU half of a write (DuckDB parses, numpy encodes), run by the ingest while the
        previous write's INSERTs are on the wire."""
        return self._stage(parts)

    def write(self, parts: list[Part], sources: list[Source], prepared=None) -> dict[str, int]:
        staged = prepared if prepared is not None else (self._stage(parts) if parts else {})
        if self.before_write is not None:
            self.before_write()
        c = self._client()
        try:
            if sources:
                c.execute(f"INSERT INTO {self._t['sources']} (rack, src, incarnation) VALUES", sources)
            for kind, blocks in staged.items():
                if blocks.rows:  # one INSERT per table, its blocks of <= batch_max_rows each a part
                    cols = ", ".join(f"`{n}`" for n, _t in blocks.columns)
                    c.execute(f"INSERT INTO {self._t[kind]} ({cols}) VALUES", blocks)
                    self.inserts[kind] += 1
        except Exception:
            try:
                c.disconnect()  # a half-sent insert must not leave the connection mid-protocol
            except Exception:
                pass
            raise
        return {kind: blocks.rows for kind, blocks in staged.items()}

    def apply_retention(self, cutoff_ns: int) -> int:
        """Drop day partitions wholly older than clickhouse.ttl (which defaults to
        telemetry.retention, the `cutoff_ns` the ingest passes)."""
        import time

        cut = time.time_ns() - int(self.settings.ttl * 1e9) if self.settings.ttl else cutoff_ns
        day = int(time.strftime("%Y%m%d", time.gmtime(cut // 1_000_000_000)))
        c = self._client()
        dropped = 0
        for kind in STAGE_COLUMNS:
            table = f"{self.settings.prefix}{kind}"
            parts = c.execute(
                "SELECT partition, sum(rows) FROM system.parts WHERE database = %(db)s AND table = %(t)s AND active "
                "GROUP BY partition",
                {"db": self.settings.database, "t": table},
            )
            for partition, rows in parts:
                p = str(partition).strip("'")
                if p.isdigit() and int(p) < day:
                    c.execute(f"ALTER TABLE {self._t[kind]} DROP PARTITION {int(p)}")
                    dropped += int(rows)
        return dropped

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.disconnect()
            except Exception:
                pass
        try:
            self._duck.close()
        except Exception:
            pass
        self.spool.close()


class _ParseError(Exception):
    """DuckDB could not parse a payload (DATA: it never will)."""


class StoreStartError(ConfigError, StoreUnavailable):
    """The archive cannot be used at start (exit 2): unreachable server."""


class SchemaStartError(ConfigError, SchemaError):
    """The archive's schema is newer than this Mixer knows (exit 2)."""


def clickhouse_sql(store: ClickHouseStore, f: Filter) -> tuple[str, dict]:
    """ClickHouse statement and parameters for a Filter (same semantics as duckdb_sql)."""
    tcol = TIME_OF[f.kind]
    where, args = [f"`{tcol}` >= %(t0)s"], {"t0": f.t0}
    if f.t1 is not None:
        where.append(f"`{tcol}` <= %(t1)s")
        args["t1"] = f.t1
    for i, (col, value) in enumerate(f.equal.items()):
        where.append(f"`{col}` = %(eq{i})s")
        args[f"eq{i}"] = value
    if f.min_severity is not None:
        where.append("severity >= %(sev)s")
        args["sev"] = f.min_severity
    if f.text:
        # A literal, case-insensitive substring: no pattern language to escape.
        where.append("(positionCaseInsensitiveUTF8(body, %(q)s) > 0 OR positionCaseInsensitiveUTF8(attrs, %(q)s) > 0)")
        args["q"] = f.text
    if f.prefix is not None:
        where.append("substring(name, 1, length(%(p)s)) = %(p)s")
        args["p"] = f.prefix
    if f.cursor is not None:
        t, rack, rid = f.cursor
        where.append(
            f"(`{tcol}` < %(ct)s OR (`{tcol}` = %(ct)s AND (rack < %(cr)s OR (rack = %(cr)s AND id < %(ci)s))))"
        )
        args.update(ct=t, cr=rack, ci=rid)
    cond = " AND ".join(where)
    table = store._t[f.kind]
    args["lim"] = f.limit
    if f.bucket_us:
        args["bns"] = f.bucket_us * 1000
        sql = (
            "SELECT intDiv(ts, %(bns)s) * %(bns)s AS b, rack, name, count(), avg(value), min(value), max(value), "
            f"sum(value), argMax(value, ts) FROM {table} FINAL WHERE {cond} GROUP BY b, rack, name "
            "ORDER BY b DESC, rack, name LIMIT %(lim)s"
        )
        return sql, args
    cols = ", ".join(f"`{c}`" for c in SELECT_COLUMNS[f.kind])
    sql = f"SELECT {cols} FROM {table} FINAL WHERE {cond} ORDER BY `{tcol}` DESC, rack DESC, id DESC LIMIT %(lim)s"
    return sql, args


class ClickHouseQueries:
    """The API's telemetry reads from ClickHouse (each thread on its own client)."""

    backend = "clickhouse"

    def __init__(self, store: ClickHouseStore):
        self._store = store

    def _run(self, f: Filter) -> Page:
        sql, args = clickhouse_sql(self._store, f)
        return shape_rows(f, self._store._client().execute(sql, args))

    def logs(self, **kw) -> Page:
        return self._run(log_filter(**kw))

    def metrics(self, **kw) -> Page:
        return self._run(metric_filter(**kw))

    def traces(self, **kw) -> Page:
        return self._run(trace_filter(**kw))

    def export_parquet(self, kind: str, path: str, since=None, until=None) -> int:
        """Every row of `kind` in the window as Parquet at `path`; the row count. Rows stream
        from ClickHouse in blocks through an NDJSON spool into DuckDB, which writes the
        Parquet file (18.16 has no Parquet output format of its own)."""
        f = export_filter(kind, since, until)
        tcol = TIME_OF[kind]
        names = [c for c, _t in STAGE_COLUMNS[kind]] + ["sent_ts", "recv_ts"]
        cond, args = f"`{tcol}` >= %(t0)s", {"t0": f.t0}
        if f.t1 is not None:
            cond += f" AND `{tcol}` <= %(t1)s"
            args["t1"] = f.t1
        sql = (
            f"SELECT {', '.join(f'`{n}`' for n in names)} FROM {self._store._t[kind]} FINAL WHERE {cond} "
            f"ORDER BY `{tcol}`, rack, id"
        )
        fd, spool = tempfile.mkstemp(prefix="fluxrig-export-", suffix=".ndjson")
        n = 0
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for row in self._store._client().execute_iter(sql, args, settings={"max_block_size": 65536}):
                    fh.write(json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False))
                    fh.write("\n")
                    n += 1
            types = dict(STAGE_COLUMNS[kind]) | {"sent_ts": "BIGINT", "recv_ts": "BIGINT"}
            columns = "{" + ", ".join(f"'{c}': '{types[c]}'" for c in names) + "}"
            con = duckdb.connect()
            try:
                q_spool, q_path = spool.replace("'", "''"), path.replace("'", "''")
                con.execute(
                    f"COPY (SELECT * FROM read_json('{q_spool}', format='newline_delimited', columns={columns})) "
                    f"TO '{q_path}' (FORMAT parquet)"
                )
            finally:
                con.close()
        finally:
            os.unlink(spool)
        return n
