"""Telemetry batches on `flux.telemetry.<rack>.logs|metrics|traces`: the wire format, sans-IO.

One bus message carries one batch of records of one kind as newline-delimited JSON (one
object per record, each line ending in "\\n"), plus two NATS headers:

    Flux-Src: <the source's incarnation, e.g. the Rack's WAL id>
    Nats-Msg-Id: <src>-<rack>.<kind>.<first id>.<count>   (JetStream's duplicate window)

Why NDJSON and not CBOR: the Mixer hands a whole fetch of batches to DuckDB's own JSON
reader (C++, parallel), which stores ~3x more rows per second than any Python-side decode
followed by the appender; the Rack pays one json.dumps per record, which it can afford at
telemetry rates. The kind and the rack come from the subject (the bus permissions vouch for
it), never from the payload.

Every line carries `id`: the record's dedup id within its source, the WAL sequence number
(< 2**40). The Mixer maps each (rack, Flux-Src) to its own id range, so a record re-sent with
the same (src, id) is stored once and a wiped WAL (new src, seqs from 1) never collides with
its predecessor. Lines without an integer `id` are dropped; a value of the wrong type becomes
NULL.

Fields per kind (OTel data model, flattened; times are unix nanoseconds; `attrs` a JSON
object):

    logs     ts, severity (OTel number 1-24), severity_text, body, attrs, trace_id, span_id
    metrics  ts, name, type (gauge|counter|histogram|updown), value (float), unit, attrs
    traces   trace_id, span_id, parent_span_id, name, kind, start, end, status, attrs
"""

from __future__ import annotations

import json

from ..errors import RemoteProtocolError
from .vocab import TelemetryKind

__all__ = [
    "COLUMNS",
    "SEVERITY",
    "MAX_BATCH_RECORDS",
    "MAX_RECORD_ID",
    "SRC_HEADER",
    "TelemetryFormatError",
    "encode_batch",
    "decode_batch",
    "batch_msg_id",
    "severity_number",
]

# One bus message stays well under the Snake's max_payload (8 MiB set by the Mixer).
MAX_BATCH_RECORDS = 10_000
# Dedup ids are WAL sequence numbers below this; the Mixer puts the incarnation above it.
MAX_RECORD_ID = 1 << 40
SRC_HEADER = "Flux-Src"
COLUMNS: dict[str, tuple[str, ...]] = {
    TelemetryKind.LOGS: ("ts", "severity", "severity_text", "body", "attrs", "trace_id", "span_id"),
    TelemetryKind.METRICS: ("ts", "name", "type", "value", "unit", "attrs"),
    TelemetryKind.TRACES: ("trace_id", "span_id", "parent_span_id", "name", "kind", "start", "end", "status", "attrs"),
}
# OTel severity numbers of the start of each range.
SEVERITY = {"trace": 1, "debug": 5, "info": 9, "warn": 13, "warning": 13, "error": 17, "fatal": 21, "critical": 21}

_dumps = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False).encode


class TelemetryFormatError(RemoteProtocolError):
    """A telemetry batch is malformed; `key` names the field at fault and `offset` the line."""

    def __init__(self, message: str, key: str | None = None, offset: int | None = None):
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key else message, offset)


def severity_number(level) -> int:
    """OTel severity number of a level name or number (unknown names map to info)."""
    if isinstance(level, int) and not isinstance(level, bool):
        return max(1, min(24, level))
    return SEVERITY.get(str(level).strip().lower(), 9)


def encode_batch(kind: str, rack: str, records: list[dict], limit: int = MAX_BATCH_RECORDS, src: str = "") -> bytes:
    """NDJSON bytes for row dicts (each with "id" and any of the kind's fields; `attrs` a
    dict or JSON text, `severity` a number or level name). `rack` and `src` are not part of
    the payload (the subject and the Flux-Src header carry them); they are accepted so the
    call reads like what it publishes."""
    if kind not in COLUMNS:
        raise ValueError(f"unknown telemetry kind {kind!r}; use one of {', '.join(COLUMNS)}")
    if len(records) > limit:
        raise ValueError(f"{len(records)} records exceed the batch limit {limit}")
    fields = COLUMNS[kind]
    lines = []
    for r in records:
        rid = r["id"]
        if not isinstance(rid, int) or not 0 <= rid < MAX_RECORD_ID:
            raise ValueError(f"record id {rid!r} is not an integer in [0, 2**40)")
        row = {"id": rid}
        for f in fields:
            v = r.get(f)
            if v is None:
                continue
            if f == "attrs" and isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError:
                    v = {"text": v}
            elif f == "severity":
                v = severity_number(v)
            row[f] = v
        lines.append(_dumps(row))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def decode_batch(data: bytes, kind: str, limit: int = MAX_BATCH_RECORDS) -> tuple[list, list[dict]]:
    """(ids, rows) of a batch, checked line by line: for tests and tools. The Mixer does not
    call this; DuckDB reads the bytes itself."""
    if kind not in COLUMNS:
        raise TelemetryFormatError(f"unknown kind {kind!r}", "kind")
    ids, rows = [], []
    for n, line in enumerate(bytes(data).splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TelemetryFormatError(f"line {n + 1} is not JSON: {exc}", offset=n) from None
        if not isinstance(row, dict):
            raise TelemetryFormatError(f"line {n + 1} is not an object", offset=n)
        rid = row.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < MAX_RECORD_ID:
            raise TelemetryFormatError(f"line {n + 1}: id must be an integer in [0, 2**40)", "id", n)
        ids.append(rid)
        rows.append({f: row.get(f) for f in COLUMNS[kind]})
        if len(ids) > limit:
            raise TelemetryFormatError(f"more than {limit} records", "id", n)
    return ids, rows


def batch_msg_id(rack: str, kind: str, first_id: int, count: int) -> str:
    """The Nats-Msg-Id for a batch: identical for an identical re-send, so JetStream drops it."""
    return f"{rack}.{kind}.{first_id}.{count}"
