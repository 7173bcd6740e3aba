"""TelemetryShipper: the Rack's telemetry WAL -> `flux.telemetry.<rack>.<kind>` on JetStream,
at least once, deduplicated at the Mixer, never losing what the WAL acknowledged.

Record convention. The runtime appends telemetry to its AsyncWal as CBOR maps
`{"kind": "logs"|"metrics"|"traces", <the kind's columns>}` (columns in
fluxrig.wire.telemetry.COLUMNS; `ts`/`start`/`end` in unix ns; `attrs` a dict or JSON text;
a span's own kind, since `kind` is taken, goes in `span_kind`). The WAL seq is the record's
dedup id and the WAL id its source incarnation (the `Flux-Src` header).

The pump is fluxrig/agent/publisher.py's `WalPublisher` with `TelemetryCodec`: each record
becomes one NDJSON line of the batch format of fluxrig.wire.telemetry when it is read (so the
per-record work is spread over the pump's small read steps, never one long stretch of the
event loop); a batch is the consecutive lines of one kind (order kept per kind), published
with `Nats-Msg-Id = <wal id>-<rack>.<kind>.<first seq>.<count>`, and its records are acked
in the WAL, which may then delete their segment, once JetStream acknowledged it (on disk,
`sync_interval: always`). A failure restarts from the first unacknowledged record; the
Mixer's ingest stores each (src, id) once, so a re-send can duplicate nothing. Records that
do not decode are counted and acknowledged (they never will decode).

It ships only while the session is usable (connected, passport active or offline); pending
and suspended Racks keep their telemetry in the WAL.

Drain speed. By default (`telemetry.ship_rate = 0`) a backlog drains as fast as live traffic
allows: the pump's window grows while the event loop's lag stays under
`telemetry.ship_lag_budget` and the publish round trip under `telemetry.ship_rtt_budget`, and
halves when either is exceeded (AIMD, see publisher.py). `ship_rate > 0` adds a fixed cap in
records/s.
"""

from __future__ import annotations

import dataclasses
import json

import cbor2

from ..wire import subjects as S
from ..wire.telemetry import COLUMNS, MAX_BATCH_RECORDS, MAX_RECORD_ID, SRC_HEADER, batch_msg_id, severity_number
from .publisher import WalPublisher
from .pump import Batch, DropReason, Entry, Pacing, PumpLimits

__all__ = [
    "TelemetryShipper",
    "TelemetryCodec",
    "TELEMETRY_LIMITS",
    "TELEMETRY_PACING",
    "pacing_from_config",
    "encode_line",
]

DEFAULT_BATCH_RECORDS = 1000
DEFAULT_MAX_BYTES = 1 << 20
#: 1000 records (about 220 kB of NDJSON) per batch; up to 16 batches' worth unacknowledged.
TELEMETRY_LIMITS = PumpLimits(
    max_batch_records=DEFAULT_BATCH_RECORDS, max_batch_bytes=DEFAULT_MAX_BYTES, max_inflight_bytes=16 << 20
)
#: The drain yields to live traffic: 5 ms of loop lag (a live request waits that long) halves
#: the window; the round-trip budget catches a Snake that is falling behind.
TELEMETRY_PACING = Pacing(
    rate=0.0, initial_window=2.0, min_window=0.1, max_window=16, rtt_budget=0.25, lag_budget=0.005
)

# One C encoder built once: json.JSONEncoder(...).encode builds a new one per call, which was
# a third of the cost of a line (10 -> 6.5 us measured on the bench machine).
_encode = json.encoder.c_make_encoder(
    None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True
) if json.encoder.c_make_encoder is not None else None  # fmt: skip
_dumps = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False).encode
# Where each column comes from in a WAL record: "kind" names the record type there, so a
# span's own kind is stored as span_kind.
_SOURCE_KEYS = {
    k: tuple((f, "span_kind" if k == "traces" and f == "kind" else f) for f in cols) for k, cols in COLUMNS.items()
}


def encode_line(kind: str, body: dict, record_id: int) -> bytes:
    """One record as the NDJSON line (with its "\\n") that fluxrig.wire.telemetry.encode_batch
    writes for it: the same fields in the same order, the same conversions (attrs text parsed
    as JSON, severity names as OTel numbers, a span's `span_kind` as its `kind`, missing values
    left out). Raises ValueError for an unknown kind or an id outside [0, 2**40)."""
    pairs = _SOURCE_KEYS.get(kind)
    if pairs is None:
        raise ValueError(f"unknown telemetry kind {kind!r}")
    if type(record_id) is not int or not 0 <= record_id < MAX_RECORD_ID:
        raise ValueError(f"record id {record_id!r} is not an integer in [0, 2**40)")
    row = {"id": record_id}
    get = body.get
    for f, key in pairs:
        v = get(key)
        if v is not None:
            row[f] = v
    v = row.get("attrs")
    if type(v) is str:
        try:
            row["attrs"] = json.loads(v)
        except ValueError:
            row["attrs"] = {"text": v}
    v = row.get("severity")
    if v is not None and not (type(v) is int and 1 <= v <= 24):
        row["severity"] = severity_number(v)
    text = "".join(_encode(row, 0)) if _encode is not None else _dumps(row)
    return (text + "\n").encode()


class TelemetryCodec:
    """Telemetry WAL records -> NDJSON batches per kind; pure."""

    def __init__(self):
        self._subjects: dict[tuple[str, str], str] = {}

    def parse(self, seq: int, payload: bytes, rack: str) -> Entry | DropReason:
        try:
            body = cbor2.loads(payload)
            kind = body.get("kind")
            line = encode_line(kind, body, seq)
        except Exception:  # not CBOR, not a map, unknown kind, a value JSON cannot hold
            return DropReason.UNDECODABLE
        key = (rack, kind)
        subject = self._subjects.get(key)
        if subject is None:
            subject = self._subjects[key] = S.telemetry(rack, kind)
        return Entry(seq, subject, len(line), line)

    def encode(self, batch: Batch, rack: str, wal_id: str) -> tuple[bytes, dict[str, str]]:
        kind = batch.subject.rsplit(".", 1)[1]
        payload = b"".join(e.item for e in batch.entries)
        msg_id = f"{wal_id}-" + batch_msg_id(rack, kind, batch.first, len(batch))
        return payload, {"Nats-Msg-Id": msg_id, SRC_HEADER: wal_id}


def pacing_from_config(config) -> Pacing:
    """TELEMETRY_PACING with the `telemetry.ship_*` keys of a fluxrig Config."""
    t = config.telemetry
    return Pacing(
        rate=max(0.0, float(t.ship_rate)),
        initial_window=min(TELEMETRY_PACING.initial_window, float(t.ship_max_inflight)),
        min_window=TELEMETRY_PACING.min_window,
        max_window=int(t.ship_max_inflight),
        rtt_budget=float(t.ship_rtt_budget),
        lag_budget=float(t.ship_lag_budget),
    )


class TelemetryShipper:
    """The telemetry pump of a joined Rack (see the module docstring): `await start()`,
    `await stop()`; `stats` for the heartbeat."""

    def __init__(
        self,
        wal,
        session,
        *,
        rate: float | None = None,
        pacing: Pacing | None = None,
        batch_records: int = DEFAULT_BATCH_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        idle_wait: float = 0.5,
        retry_wait: float = 1.0,
        publish_timeout: float = 5.0,
    ):
        if not 0 < batch_records <= MAX_BATCH_RECORDS:
            raise ValueError(f"batch_records must be in 1..{MAX_BATCH_RECORDS}")
        pacing = pacing or TELEMETRY_PACING
        if rate:
            pacing = dataclasses.replace(pacing, rate=float(rate))
        limits = PumpLimits(
            max_batch_records=batch_records, max_batch_bytes=max_bytes, max_inflight_bytes=max(16 << 20, max_bytes)
        )
        self.wal = wal
        self.session = session
        self.publisher = WalPublisher(
            wal, session, TelemetryCodec(), name="telemetry-shipper", limits=limits, pacing=pacing,
            publish_timeout=publish_timeout, retry_wait=retry_wait, idle_wait=idle_wait,
        )  # fmt: skip

    @classmethod
    def from_config(cls, wal, session, config) -> TelemetryShipper:
        """A shipper with the `telemetry.*` keys of a fluxrig Config."""
        return cls(
            wal, session, pacing=pacing_from_config(config), batch_records=int(config.telemetry.ship_batch_records)
        )

    @property
    def shipped(self) -> int:
        return self.publisher.m["published"]

    @property
    def undecodable(self) -> int:
        return self.publisher.dropped[DropReason.UNDECODABLE]

    @property
    def stats(self) -> dict:
        p = self.publisher.metrics()
        return {
            "shipped": p["published"],
            "batches": p["batches"],
            "records_per_batch": p["records_per_batch"],
            "undecodable": p["dropped"][DropReason.UNDECODABLE],
            "publish_failures": p["publish_failures"],
            "backlog": p["backlog_records"],
            "window": p["window"],
            "rtt_ms": p["rtt_ms"],
            "loop_lag_max_ms": p["loop_lag_max_ms"],
            "rate_cap": p["rate_cap"],
            "last_error": self.publisher.last_error,
        }

    async def start(self) -> None:
        self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.close()
