"""Read-side telemetry queries for the API: logs, metrics (optionally bucketed), traces.

Every function takes a DuckDB cursor (the calling thread's own) and plain filter values,
builds one parameterised statement (no value is ever formatted into SQL), and returns JSON-
ready dicts, newest first. Time filters accept RFC 3339 / ISO 8601 timestamps or a duration
("15m", "24h") meaning "that long before now". The default window is the last 24 hours.
`min_level` is a threshold (warn returns warn, error and fatal), unlike the Go original.
"""

from __future__ import annotations

import datetime as dt

from fluxrig.agent.telemetry import SEVERITY, severity_number
from fluxrig.durations import parse_duration
from fluxrig.errors import FluxError

__all__ = ["QueryError", "parse_time", "query_logs", "query_metrics", "query_traces", "DEFAULT_WINDOW_S", "MAX_LIMIT"]

DEFAULT_WINDOW_S = 24 * 3600.0
MAX_LIMIT = 10_000
BUCKET_MIN_S = 0.001


class QueryError(FluxError):
    """A query parameter is wrong; `key` names it (e.g. `since`)."""

    def __init__(self, message: str, key: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def parse_time(value: str | None, key: str, now: dt.datetime | None = None) -> dt.datetime | None:
    """A naive UTC datetime from an ISO timestamp or a look-back duration."""
    if value is None or value == "":
        return None
    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    text = value.strip()
    if text[:-1].isdigit() and text.endswith("d"):
        return now - dt.timedelta(days=int(text[:-1]))
    try:
        return now - dt.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"{value!r} is neither an ISO 8601 time nor a duration like 15m", key) from None
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return t


def _limit(limit: int | None) -> int:
    if limit is None:
        return 100
    if limit < 1 or limit > MAX_LIMIT:
        raise QueryError(f"must be between 1 and {MAX_LIMIT}", "limit")
    return int(limit)


def _ns(t: dt.datetime) -> int:
    return int(t.replace(tzinfo=dt.timezone.utc).timestamp() * 1_000_000) * 1000


def _window(since, until, col: str, where: list, args: list) -> None:
    """Times are stored as unix nanoseconds: compare with the bounds converted once, so the
    filter stays a plain integer range (zone maps apply)."""
    t0 = parse_time(since, "since")
    t1 = parse_time(until, "until")
    if t0 is None:
        t0 = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(seconds=DEFAULT_WINDOW_S)
    where.append(f'"{col}" >= ?')
    args.append(_ns(t0))
    if t1 is not None:
        where.append(f'"{col}" <= ?')
        args.append(_ns(t1))


def _iso(v) -> str | None:
    return v.isoformat() + "Z" if v is not None else None


def query_logs(cur, *, since=None, until=None, rack=None, min_level=None, q=None, limit=None) -> list[dict]:
    where, args = [], []
    _window(since, until, "ts", where, args)
    if rack:
        where.append("rack = ?")
        args.append(rack)
    if min_level:
        if str(min_level).lower() not in SEVERITY and not str(min_level).isdigit():
            raise QueryError(f"unknown level {min_level!r} (use {', '.join(sorted(set(SEVERITY)))})", "min_level")
        where.append("severity >= ?")
        args.append(severity_number(int(min_level) if str(min_level).isdigit() else min_level))
    if q:
        where.append("(body ILIKE ? OR attrs ILIKE ?)")
        pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args += [pattern, pattern]
    sql = (
        "SELECT make_timestamp(ts // 1000), rack, severity, severity_text, body, attrs, trace_id, span_id, id "
        "FROM telemetry_logs "
        f"WHERE {' AND '.join(where)} ORDER BY ts DESC, id DESC LIMIT ?"
    )
    rows = cur.execute(sql, [*args, _limit(limit)]).fetchall()
    return [
        {
            "timestamp": _iso(r[0]),
            "rack": r[1],
            "severity": r[2],
            "level": r[3],
            "body": r[4],
            "attributes": r[5],
            "trace_id": r[6],
            "span_id": r[7],
            "id": r[8],
        }
        for r in rows
    ]


def query_metrics(cur, *, name=None, rack=None, since=None, until=None, bucket=None, limit=None) -> list[dict]:
    where, args = [], []
    _window(since, until, "ts", where, args)
    if name:
        if name.endswith("*"):
            where.append("starts_with(name, ?)")
            args.append(name[:-1])
        else:
            where.append("name = ?")
            args.append(name)
    if rack:
        where.append("rack = ?")
        args.append(rack)
    cond = " AND ".join(where)
    if bucket:
        try:
            seconds = parse_duration(bucket)
        except ValueError as exc:
            raise QueryError(str(exc), "bucket") from None
        if seconds < BUCKET_MIN_S:
            raise QueryError("bucket must be at least 1ms", "bucket")
        micros = int(seconds * 1e6)
        sql = (
            "SELECT time_bucket(to_microseconds(?), make_timestamp(ts // 1000)) AS b, rack, name, count(*), avg(value), "
            "min(value), max(value), "
            f"sum(value), arg_max(value, ts) FROM telemetry_metrics WHERE {cond} GROUP BY b, rack, name "
            "ORDER BY b DESC, rack, name LIMIT ?"
        )
        rows = cur.execute(sql, [micros, *args, _limit(limit)]).fetchall()
        return [
            {
                "bucket": _iso(r[0]),
                "rack": r[1],
                "name": r[2],
                "count": r[3],
                "avg": r[4],
                "min": r[5],
                "max": r[6],
                "sum": r[7],
                "last": r[8],
            }
            for r in rows
        ]
    sql = (
        "SELECT make_timestamp(ts // 1000), rack, name, type, value, unit, attrs FROM telemetry_metrics "
        f"WHERE {cond} ORDER BY ts DESC, id DESC LIMIT ?"
    )
    rows = cur.execute(sql, [*args, _limit(limit)]).fetchall()
    return [
        {"timestamp": _iso(r[0]), "rack": r[1], "name": r[2], "type": r[3], "value": r[4], "unit": r[5], "attributes": r[6]}
        for r in rows
    ]


def query_traces(cur, *, rack=None, trace_id=None, name=None, since=None, until=None, limit=None) -> list[dict]:
    where, args = [], []
    _window(since, until, "start", where, args)
    for col, value in (("rack", rack), ("trace_id", trace_id), ("name", name)):
        if value:
            where.append(f"{col} = ?")
            args.append(value)
    sql = (
        'SELECT make_timestamp(start // 1000), make_timestamp("end" // 1000), rack, trace_id, span_id, parent_span_id, '
        "name, kind, status, attrs, (\"end\" - start) / 1e6 FROM telemetry_traces "
        f"WHERE {' AND '.join(where)} ORDER BY start DESC LIMIT ?"
    )
    rows = cur.execute(sql, [*args, _limit(limit)]).fetchall()
    return [
        {
            "start": _iso(r[0]),
            "end": _iso(r[1]),
            "duration_ms": r[10],
            "rack": r[2],
            "trace_id": r[3],
            "span_id": r[4],
            "parent_span_id": r[5],
            "name": r[6],
            "kind": r[7],
            "status": r[8],
            "attributes": r[9],
        }
        for r in rows
    ]
