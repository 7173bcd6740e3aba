"""Read-side telemetry queries for the API: logs, metrics (optionally bucketed), traces.

Parameters and semantics are the same for every backend: this module parses and checks them
once (`log_filter`, `metric_filter`, `trace_filter` -> `Filter`) and shapes result rows; a
store turns a Filter into its own SQL (DuckDB here, ClickHouse in clickhouse_store.py).
No value is ever formatted into SQL: statements are parameterised.

Time filters accept RFC 3339 / ISO 8601 timestamps or a look-back duration ("15m", "24h",
"30d") meaning "that long before now"; a look-back longer than the Unix epoch means "from the
epoch" (stored times are Unix nanoseconds). The default window is the last 24 hours.
`min_level` is a threshold (warn returns warn, error and fatal). `q` is a case-insensitive
substring of body or attributes, taken literally (`_`, `%` and `\\` are not wildcards).

Pagination. Results are newest first, ordered by (time, rack, id) descending, a total order.
A page of `limit` rows is a `Page` (a list) whose `next_cursor` is an opaque token for the
rows after its last one (None when the page is not full); passing it back as `cursor` with the
same filters reads on, however many rows there are. Rows stored after the first page that sort
before the cursor are not shown (a cursor reads a snapshot's order, not new arrivals).

`TelemetryQueries(db)` is what the API holds for DuckDB: each call on the calling thread's own
cursor (`db.cursor()`), so API routes may run them in the thread pool.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from fluxrig.durations import parse_duration
from fluxrig.errors import FluxError
from fluxrig.wire.telemetry import SEVERITY, severity_number

__all__ = [
    "QueryError",
    "Filter",
    "Page",
    "TelemetryQueries",
    "CursorSource",
    "parse_time",
    "log_filter",
    "metric_filter",
    "trace_filter",
    "encode_cursor",
    "decode_cursor",
    "query_logs",
    "query_metrics",
    "query_traces",
    "DEFAULT_WINDOW_S",
    "MAX_LIMIT",
    "BUCKET_MIN_S",
    "EXPORT_KINDS",
    "shape_rows",
    "duckdb_sql",
    "export_filter",
]

DEFAULT_WINDOW_S = 24 * 3600.0
MAX_LIMIT = 10_000
BUCKET_MIN_S = 0.001
MAX_CURSOR_CHARS = 1024
EXPORT_KINDS = ("logs", "metrics", "traces")
_NS = 1_000_000_000
_EPOCH = dt.datetime(1970, 1, 1)


class QueryError(FluxError):
    """A query parameter is wrong; `key` names it (e.g. `since`)."""

    def __init__(self, message: str, key: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class Page(list):
    """One page of result rows; `next_cursor` reads the rows after it (None: no more)."""

    next_cursor: str | None = None


def _now_ns() -> int:
    return time.time_ns()


def parse_time(value: str | None, key: str, now_ns: int | None = None) -> int | None:
    """Unix nanoseconds from an ISO timestamp or a look-back duration ("30d", "15m")."""
    if value is None or value == "":
        return None
    now_ns = _now_ns() if now_ns is None else now_ns
    text = value.strip()
    back: float | None = None
    if text[:-1].isdigit() and text.endswith("d"):
        back = int(text[:-1]) * 86400.0
    else:
        try:
            back = parse_duration(text)
        except ValueError:
            back = None
    if back is not None:
        if not math.isfinite(back) or back * _NS >= now_ns:
            return 0  # further back than the epoch: from the beginning
        return now_ns - int(back * _NS)
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"{value!r} is neither an ISO 8601 time nor a duration like 15m", key) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return max(0, int(t.timestamp() * 1_000_000) * 1000)


def _limit(limit: int | None) -> int:
    if limit is None:
        return 100
    if limit < 1 or limit > MAX_LIMIT:
        raise QueryError(f"must be between 1 and {MAX_LIMIT}", "limit")
    return int(limit)


def encode_cursor(t_ns: int, rack: str, rid: int) -> str:
    raw = json.dumps([int(t_ns), rack, int(rid)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str | None) -> tuple[int, str, int] | None:
    if not text:
        return None
    if len(text) > MAX_CURSOR_CHARS:
        raise QueryError("too long; pass back the next_cursor of a previous page", "cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        t, rack, rid = json.loads(raw)
        if not (isinstance(t, int) and isinstance(rack, str) and isinstance(rid, int)) or rid < 0:
            raise ValueError
        return t, rack, rid
    except (ValueError, TypeError, UnicodeDecodeError):
        raise QueryError(
            "not a cursor this Mixer issued; pass back the next_cursor of a previous page", "cursor"
        ) from None


@dataclass
class Filter:
    """A checked query: the time column's window (ns, inclusive), equality filters,
    optional substring / prefix / severity, the page size and where the page starts."""

    kind: str
    t0: int
    t1: int | None
    limit: int
    equal: dict[str, str] = field(default_factory=dict)
    min_severity: int | None = None
    text: str | None = None  # case-insensitive substring of body or attrs
    prefix: str | None = None  # name prefix
    bucket_us: int | None = None
    cursor: tuple[int, str, int] | None = None


def _window(since, until) -> tuple[int, int | None]:
    t0 = parse_time(since, "since")
    t1 = parse_time(until, "until")
    if t0 is None:
        t0 = _now_ns() - int(DEFAULT_WINDOW_S * _NS)
    return t0, t1


def log_filter(*, since=None, until=None, rack=None, min_level=None, q=None, limit=None, cursor=None) -> Filter:
    t0, t1 = _window(since, until)
    f = Filter("logs", t0, t1, _limit(limit), cursor=decode_cursor(cursor))
    if rack:
        f.equal["rack"] = rack
    if min_level:
        if str(min_level).lower() not in SEVERITY and not str(min_level).isdigit():
            raise QueryError(f"unknown level {min_level!r} (use {', '.join(sorted(set(SEVERITY)))})", "min_level")
        f.min_severity = severity_number(int(min_level) if str(min_level).isdigit() else min_level)
    if q:
        f.text = q
    return f


def metric_filter(*, name=None, rack=None, since=None, until=None, bucket=None, limit=None, cursor=None) -> Filter:
    t0, t1 = _window(since, until)
    f = Filter("metrics", t0, t1, _limit(limit), cursor=decode_cursor(cursor))
    if name:
        if name.endswith("*"):
            f.prefix = name[:-1]
        else:
            f.equal["name"] = name
    if rack:
        f.equal["rack"] = rack
    if bucket:
        try:
            seconds = parse_duration(bucket)
        except ValueError as exc:
            raise QueryError(str(exc), "bucket") from None
        if seconds < BUCKET_MIN_S or not math.isfinite(seconds) or seconds > 366 * 86400:
            raise QueryError("bucket must be between 1ms and 366 days", "bucket")
        if f.cursor is not None:
            raise QueryError("pagination of bucketed metrics is not supported; narrow since/until instead", "cursor")
        f.bucket_us = int(seconds * 1e6)
    return f


def trace_filter(*, rack=None, trace_id=None, name=None, since=None, until=None, limit=None, cursor=None) -> Filter:
    t0, t1 = _window(since, until)
    f = Filter("traces", t0, t1, _limit(limit), cursor=decode_cursor(cursor))
    for col, value in (("rack", rack), ("trace_id", trace_id), ("name", name)):
        if value:
            f.equal[col] = value
    return f


def _iso_ns(ns) -> str | None:
    if ns is None:
        return None
    return (_EPOCH + dt.timedelta(microseconds=ns // 1000)).isoformat() + "Z"


def shape_rows(f: Filter, rows) -> Page:
    """Result tuples (in the column order of the SELECTs below) as JSON-ready dicts."""
    page = Page()
    if f.kind == "metrics" and f.bucket_us:
        for r in rows:
            page.append(
                {
                    "bucket": _iso_ns(r[0]),
                    "rack": r[1],
                    "name": r[2],
                    "count": r[3],
                    "avg": r[4],
                    "min": r[5],
                    "max": r[6],
                    "sum": r[7],
                    "last": r[8],
                }
            )
        return page
    for r in rows:
        if f.kind == "logs":
            t, rack, sev, lvl, body, attrs, tid, sid, rid, sent, recv = r
            page.append(
                {
                    "timestamp": _iso_ns(t),
                    "rack": rack,
                    "severity": sev,
                    "level": lvl,
                    "body": body,
                    "attributes": attrs,
                    "trace_id": tid,
                    "span_id": sid,
                    "id": rid,
                    "rack_timestamp": _iso_ns(sent),
                    "received": _iso_ns(recv),
                }
            )
        elif f.kind == "metrics":
            t, rack, name, typ, value, unit, attrs, rid, sent, recv = r
            page.append(
                {
                    "timestamp": _iso_ns(t),
                    "rack": rack,
                    "name": name,
                    "type": typ,
                    "value": value,
                    "unit": unit,
                    "attributes": attrs,
                    "id": rid,
                    "rack_timestamp": _iso_ns(sent),
                    "received": _iso_ns(recv),
                }
            )
        else:
            t, end, rack, tid, sid, psid, name, kind, status, attrs, rid, sent, recv = r
            page.append(
                {
                    "start": _iso_ns(t),
                    "end": _iso_ns(end),
                    "duration_ms": (end - t) / 1e6 if end is not None and t is not None else None,
                    "rack": rack,
                    "trace_id": tid,
                    "span_id": sid,
                    "parent_span_id": psid,
                    "name": name,
                    "kind": kind,
                    "status": status,
                    "attributes": attrs,
                    "id": rid,
                    "rack_timestamp": _iso_ns(sent),
                    "received": _iso_ns(recv),
                }
            )
    if len(rows) == f.limit and rows:
        last = rows[-1]
        page.next_cursor = encode_cursor(last[0], last[2] if f.kind == "traces" else last[1], last[-3])
    return page


# What each kind's SELECT returns (shape_rows reads them in this order); `t` is the time column.
SELECT_COLUMNS = {
    "logs": [
        "ts",
        "rack",
        "severity",
        "severity_text",
        "body",
        "attrs",
        "trace_id",
        "span_id",
        "id",
        "sent_ts",
        "recv_ts",
    ],
    "metrics": ["ts", "rack", "name", "type", "value", "unit", "attrs", "id", "sent_ts", "recv_ts"],
    "traces": [
        "start",
        "end",
        "rack",
        "trace_id",
        "span_id",
        "parent_span_id",
        "name",
        "kind",
        "status",
        "attrs",
        "id",
        "sent_ts",
        "recv_ts",
    ],
}
TIME_OF = {"logs": "ts", "metrics": "ts", "traces": "start"}


def duckdb_sql(f: Filter) -> tuple[str, list]:
    """DuckDB statement and arguments for a Filter."""
    tcol = TIME_OF[f.kind]
    where, args = [f'"{tcol}" >= ?'], [f.t0]
    if f.t1 is not None:
        where.append(f'"{tcol}" <= ?')
        args.append(f.t1)
    for col, value in f.equal.items():
        where.append(f'"{col}" = ?')
        args.append(value)
    if f.min_severity is not None:
        where.append("severity >= ?")
        args.append(f.min_severity)
    if f.text:
        where.append("(body ILIKE ? ESCAPE '\\' OR attrs ILIKE ? ESCAPE '\\')")
        pattern = "%" + f.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args += [pattern, pattern]
    if f.prefix is not None:
        where.append("starts_with(name, ?)")
        args.append(f.prefix)
    if f.cursor is not None:
        t, rack, rid = f.cursor
        where.append(f'("{tcol}" < ? OR ("{tcol}" = ? AND (rack < ? OR (rack = ? AND id < ?))))')
        args += [t, t, rack, rack, rid]
    cond = " AND ".join(where)
    if f.bucket_us:
        # Buckets aligned on the Unix epoch (the same integer arithmetic in every backend).
        sql = (
            "SELECT (ts // ?) * ? AS b, rack, name, count(*), avg(value), min(value), max(value), sum(value), "
            f"arg_max(value, ts) FROM telemetry_metrics WHERE {cond} GROUP BY b, rack, name "
            "ORDER BY b DESC, rack, name LIMIT ?"
        )
        bns = f.bucket_us * 1000
        return sql, [bns, bns, *args, f.limit]
    cols = ", ".join(f'"{c}"' for c in SELECT_COLUMNS[f.kind])
    sql = f'SELECT {cols} FROM telemetry_{f.kind} WHERE {cond} ORDER BY "{tcol}" DESC, rack DESC, id DESC LIMIT ?'
    return sql, [*args, f.limit]


def _run(cur, f: Filter) -> Page:
    sql, args = duckdb_sql(f)
    return shape_rows(f, cur.execute(sql, args).fetchall())


def query_logs(cur, **kw) -> Page:
    return _run(cur, log_filter(**kw))


def query_metrics(cur, **kw) -> Page:
    return _run(cur, metric_filter(**kw))


def query_traces(cur, **kw) -> Page:
    return _run(cur, trace_filter(**kw))


def export_filter(kind: str, since=None, until=None) -> Filter:
    if kind not in EXPORT_KINDS:
        raise QueryError(f"unknown kind {kind!r} (use {', '.join(EXPORT_KINDS)})", "kind")
    t0, t1 = _window(since, until)
    return Filter(kind, t0, t1, MAX_LIMIT)


class CursorSource(Protocol):
    """What TelemetryQueries needs of the database: a cursor owned by the calling thread."""

    def cursor(self): ...


class TelemetryQueries:
    """The API's telemetry reads from DuckDB; every call takes the calling thread's own cursor."""

    __slots__ = ("_db",)

    backend = "duckdb"

    def __init__(self, db: CursorSource):
        self._db = db

    def logs(self, **kw) -> Page:
        return query_logs(self._db.cursor(), **kw)

    def metrics(self, **kw) -> Page:
        return query_metrics(self._db.cursor(), **kw)

    def traces(self, **kw) -> Page:
        return query_traces(self._db.cursor(), **kw)

    def export_parquet(self, kind: str, path: str, since=None, until=None) -> int:
        """Write every row of `kind` in the window to a Parquet file at `path`; the row count."""
        f = export_filter(kind, since, until)
        tcol = TIME_OF[kind]
        where, args = f'"{tcol}" >= ?', [f.t0]
        if f.t1 is not None:
            where += f' AND "{tcol}" <= ?'
            args.append(f.t1)
        cur = self._db.cursor()
        quoted = path.replace("'", "''")
        cur.execute(
            f'COPY (SELECT * EXCLUDE (received_at) FROM telemetry_{kind} WHERE {where} ORDER BY "{tcol}", rack, id) '
            f"TO '{quoted}' (FORMAT parquet)",
            args,
        )
        return cur.execute(f"SELECT count(*) FROM read_parquet('{quoted}')").fetchone()[0]
