"""Telemetry batches on `flux.telemetry.<rack>.logs|metrics|traces`: the wire format, sans-IO.

One bus message carries one *columnar* batch of records of one kind, CBOR-encoded:

    {"v": 1, "kind": "logs", "rack": "<rack>", "src": "<wal id>", "ids": [u64, ...],
     "cols": {<column>: [...], ...}}

Columnar, because the Mixer appends whole columns to DuckDB: decoding lists of scalars is
~20x cheaper than decoding one map per record, and it keeps ingest above 500k rows/s.

`ids[i]` is record i's dedup id within its source: the WAL sequence number (< 2**40). `src`
names the source's incarnation (the WAL id, which changes when a WAL is wiped and its seqs
restart at 1); the Mixer maps each (rack, src) to a distinct id range, so a record re-sent
with the same (src, id) is stored once and a wiped WAL never collides with its predecessor.
JetStream's own dedup window (`Nats-Msg-Id`, see `batch_msg_id`) catches quick re-sends
before they reach DuckDB.

Columns (OTel data model, flattened; `attrs` is a JSON object as text or None; times are
unix nanoseconds):

    logs     ts, severity (OTel number 1-24), severity_text, body, attrs, trace_id, span_id
    metrics  ts, name, type (gauge|counter|histogram|updown), value (float), unit, attrs
    traces   trace_id, span_id, parent_span_id, name, kind, start, end, status, attrs
"""

from __future__ import annotations

import json

import cbor2

from ..errors import RemoteProtocolError

__all__ = [
    "BATCH_VERSION",
    "COLUMNS",
    "SEVERITY",
    "MAX_BATCH_RECORDS",
    "MAX_RECORD_ID",
    "TelemetryFormatError",
    "encode_batch",
    "decode_batch",
    "batch_msg_id",
    "severity_number",
]

BATCH_VERSION = 1
# One bus message stays well under the Snake's max_payload (8 MiB set by the Mixer).
MAX_BATCH_RECORDS = 10_000
# Dedup ids are WAL sequence numbers below this; the Mixer puts the incarnation above it.
MAX_RECORD_ID = 1 << 40
COLUMNS: dict[str, tuple[str, ...]] = {
    "logs": ("ts", "severity", "severity_text", "body", "attrs", "trace_id", "span_id"),
    "metrics": ("ts", "name", "type", "value", "unit", "attrs"),
    "traces": ("trace_id", "span_id", "parent_span_id", "name", "kind", "start", "end", "status", "attrs"),
}
# OTel severity numbers of the start of each range.
SEVERITY = {"trace": 1, "debug": 5, "info": 9, "warn": 13, "warning": 13, "error": 17, "fatal": 21, "critical": 21}


class TelemetryFormatError(RemoteProtocolError):
    """A telemetry batch is malformed; `key` names the column or field at fault."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key else message)


def severity_number(level) -> int:
    """OTel severity number of a level name or number (unknown names map to info)."""
    if isinstance(level, int) and not isinstance(level, bool):
        return max(1, min(24, level))
    return SEVERITY.get(str(level).strip().lower(), 9)


def encode_batch(kind: str, rack: str, records: list[dict], limit: int = MAX_BATCH_RECORDS, src: str = "") -> bytes:
    """Encode row dicts (each with "id" and the kind's columns; `attrs` may be a dict) as one
    columnar batch. Missing columns become None."""
    if kind not in COLUMNS:
        raise ValueError(f"unknown telemetry kind {kind!r}; use one of {', '.join(COLUMNS)}")
    if len(records) > limit:
        raise ValueError(f"{len(records)} records exceed the batch limit {limit}")
    cols: dict[str, list] = {c: [] for c in COLUMNS[kind]}
    ids = []
    for r in records:
        ids.append(int(r["id"]))
        for c, out in cols.items():
            v = r.get(c)
            if c == "attrs" and v is not None and not isinstance(v, str):
                v = json.dumps(v, separators=(",", ":"), default=str)
            elif c == "severity" and v is not None:
                v = severity_number(v)
            out.append(v)
    return cbor2.dumps({"v": BATCH_VERSION, "kind": kind, "rack": rack, "src": src, "ids": ids, "cols": cols})


def decode_batch(data: bytes, limit: int = MAX_BATCH_RECORDS) -> tuple[str, str, str, list, dict[str, list]]:
    """(kind, rack, src, ids, columns) of a batch. Column lists all have len(ids) entries; values
    are not checked one by one (DuckDB's appender checks types at the flush)."""
    try:
        doc = cbor2.loads(data)
    except Exception as exc:
        raise TelemetryFormatError(f"not CBOR: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != BATCH_VERSION:
        raise TelemetryFormatError("not a telemetry batch (v != 1)", "v")
    kind, rack, ids, cols = doc.get("kind"), doc.get("rack"), doc.get("ids"), doc.get("cols")
    if kind not in COLUMNS:
        raise TelemetryFormatError(f"unknown kind {kind!r}", "kind")
    if not isinstance(rack, str) or not rack:
        raise TelemetryFormatError("missing rack", "rack")
    if not isinstance(ids, list) or not isinstance(cols, dict):
        raise TelemetryFormatError("ids must be a list and cols a map", "cols")
    src = doc.get("src") or ""
    if not isinstance(src, str) or len(src) > 128:
        raise TelemetryFormatError("src must be a short text", "src")
    n = len(ids)
    if n > limit:
        raise TelemetryFormatError(f"{n} records exceed the batch limit {limit}", "ids")
    if n and (not isinstance(ids[0], int) or not isinstance(ids[-1], int) or max(ids) >= MAX_RECORD_ID or min(ids) < 0):
        raise TelemetryFormatError(f"ids must be integers in [0, 2**40)", "ids")
    out = {}
    for c in COLUMNS[kind]:
        col = cols.get(c)
        if col is None:
            col = [None] * n
        elif not isinstance(col, list) or len(col) != n:
            raise TelemetryFormatError(f"column must be a list of {n} values", c)
        out[c] = col
    return kind, rack, src, ids, out


def batch_msg_id(rack: str, kind: str, first_id: int, count: int) -> str:
    """The Nats-Msg-Id for a batch: identical for an identical re-send, so JetStream drops it."""
    return f"{rack}.{kind}.{first_id}.{count}"
