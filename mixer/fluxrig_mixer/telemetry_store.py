"""The telemetry backend contract: what the ingest hands a store, and what the API reads back.

Job. `ingest.TelemetryIngest` owns the bus side (durable pull consumer, acks, recovery,
quotas, outages); a `TelemetryStore` owns one database. Two implementations keep the same
contract: `duckdb_store.DuckDBStore` (the Mixer's own file, Standard tier, the default) and
`clickhouse_store.ClickHouseStore` (the Institutional tier's OLAP archive). Choosing one is
`telemetry.backend` (`open_store`).

Contract of a store:

- `write(parts, sources)` runs in the ingest's writer thread and stores every line of every
  `Part` (NDJSON of one kind, rack and source incarnation, with the JetStream time the Snake
  received it) plus the new `sources` assignments, or raises. It is idempotent per record
  id: writing the same part twice leaves each (rack, id) once as the queries see it (how is
  the store's business and is stated in its docstring). It returns the rows it inserted per
  kind when it knows them (None when the engine collapses duplicates later).
- `classify(exc)`: DATA when the exception means these payloads can never load (the ingest
  then stores message by message and drops, counted and logged, only what never will),
  UNAVAILABLE for everything else (disk full, server down, timeout): the ingest then acks
  nothing, backs off and retries, because nothing may be acked that is not stored.
- optional `prepare(parts)`: the CPU half of a write, run by the ingest while the previous
  write is in flight; its result goes back as `write(parts, sources, prepared)`.
- `probe()` raises while the store cannot take writes; cheap (called with back-off).
- `load_sources()` returns every stored (rack, src, incarnation), so a restarted Mixer numbers
  each Rack WAL as before.
- `apply_retention(cutoff_ns)` deletes what is older; `queries` answers the API's reads with
  the parameters and semantics of queries.py; `close()`.
- `batch_max_rows` and `flush_interval` tell the ingest how the store wants its writes sized
  (ClickHouse wants 10k-100k row blocks about once a second; DuckDB wants big writes too but
  is local, so a short interval keeps telemetry fresh).

Timestamps. A Rack's clock is not trusted: each stored time is clamped to the JetStream
receive time of its message minus `max_age` / plus `max_skew` (both kept: the Rack's own value
in `sent_ts`, the receive time in `recv_ts`). The receive time is the Snake's, carried by the
message, so a message replayed after a crash clamps to the same value: a replay stays
byte-identical, which the ClickHouse path's exactly-once design needs.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fluxrig.errors import FluxError
from fluxrig.wire.vocab import TelemetryKind

__all__ = [
    "Part",
    "Source",
    "Clamp",
    "Failure",
    "TelemetryStore",
    "StoreUnavailable",
    "SchemaError",
    "STAGE_COLUMNS",
    "TIME_COLUMN",
    "KINDS",
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_SKEW_S",
    "open_store",
    "PendingSources",
    "RackQuotas",
    "recv_ns",
]

_log = logging.getLogger("fluxrig.mixer.ingest")

KINDS = (TelemetryKind.LOGS, TelemetryKind.METRICS, TelemetryKind.TRACES)

# (column, type) per kind as it arrives (the NDJSON fields; rack comes from the subject). Times
# are unix nanoseconds (BIGINT) as sent; the queries convert only the rows they return.
STAGE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    TelemetryKind.LOGS: [
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
    TelemetryKind.METRICS: [
        ("rack", "VARCHAR"),
        ("id", "UBIGINT"),
        ("ts", "BIGINT"),
        ("name", "VARCHAR"),
        ("type", "VARCHAR"),
        ("value", "DOUBLE"),
        ("unit", "VARCHAR"),
        ("attrs", "VARCHAR"),
    ],
    TelemetryKind.TRACES: [
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
# The clamped time of each kind (the one queries filter and sort on).
TIME_COLUMN = {TelemetryKind.LOGS: "ts", TelemetryKind.METRICS: "ts", TelemetryKind.TRACES: "start"}

# A Rack may ship what it buffered through a long outage (its WAL holds days), so the past
# bound is generous; the future bound is clock skew, not a business need.
DEFAULT_MAX_AGE_S = 30 * 86400.0
DEFAULT_MAX_SKEW_S = 300.0

# (rack, src, incarnation): one WAL of one Rack and the number its record ids are based on.
Source = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class Clamp:
    """The accepted window around the receive time, in nanoseconds."""

    max_age_ns: int = int(DEFAULT_MAX_AGE_S * 1e9)
    max_skew_ns: int = int(DEFAULT_MAX_SKEW_S * 1e9)


@dataclass(slots=True)
class Part:
    """NDJSON lines of one bus message: kind, rack, id base (incarnation << 40), the Snake's
    receive time (unix ns), the payload (ends in a newline), its line count, and the index of
    its message in the fetch (so a failed write can be retried message by message)."""

    kind: str
    rack: str
    base: int
    recv_ns: int
    data: bytes
    lines: int
    msg: int = 0


def recv_ns(m) -> int:
    """The time the Snake stored a message (unix ns), exact, from its JetStream reply subject
    (`$JS.ACK.[domain.hash.]stream.consumer.delivered.sseq.cseq.ts.pending`): the same value
    for every delivery of the message, which keeps a replay byte-identical. A message that
    carries none (not from JetStream) gets the local clock."""
    reply = getattr(m, "reply", None) or ""
    tokens = reply.split(".")
    if len(tokens) >= 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        try:
            return int(tokens[7] if len(tokens) == 9 else tokens[9])
        except ValueError:
            pass
    return time.time_ns()


class PendingSources:
    """New source assignments on their way from the event loop to the writer thread.

    `put` on the loop, `take` and `give_back` on the writer; each holds the lock for one list
    operation. Order is kept (what is given back goes first) and nothing is taken twice."""

    __slots__ = ("_items", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Source] = []

    def put(self, item: Source) -> None:
        with self._lock:
            self._items.append(item)

    def take(self) -> list[Source]:
        """Everything pending, oldest first; the hand-off is empty afterwards."""
        with self._lock:
            items, self._items = self._items, []
        return items

    def give_back(self, items: Iterable[Source]) -> None:
        """Return what a failed write took: it goes before anything put since."""
        items = list(items)
        if items:
            with self._lock:
                self._items[:0] = items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


#: A Rack's quota use at which the Mixer warns (one WARNING when it crosses it in a window).
QUOTA_ALERT_RATIO = 0.8
#: Shortest delay a deferred telemetry message is given back to JetStream for (a window
#: about to end must not make the ingest spin on redeliveries).
QUOTA_MIN_DEFER_S = 0.5


class RackQuotas:
    """Rows and bytes each Rack may have stored per `window` seconds (fixed windows, reset
    when one passes; 0 = no bound). `admit` says whether a message fits; one that does not is
    *deferred*, never dropped: the ingest leaves it in JetStream (a NAK delayed until
    `defer_for` says the window ends) and stores it when the Rack is within its quota again.
    Counted per Rack in `deferred` (messages) and `deferred_rows`; `state` is "ok", "alert"
    (QUOTA_ALERT_RATIO of a bound used) or "over"; each change of state is logged once
    (WARNING at alert, ERROR at over, INFO when back). A message larger than a whole quota is
    admitted alone at the start of a window, so it cannot be deferred for ever."""

    __slots__ = ("max_rows", "max_bytes", "window", "deferred", "deferred_rows", "state", "_windows")

    def __init__(self, max_rows: int, max_bytes: int, window: float):
        self.max_rows, self.max_bytes, self.window = max_rows, max_bytes, window
        self.deferred: dict[str, int] = {}
        self.deferred_rows: dict[str, int] = {}
        self.state: dict[str, str] = {}  # rack -> "alert" | "over" (absent = ok)
        self._windows: dict[str, list] = {}  # rack -> [start, rows, bytes]

    @property
    def enabled(self) -> bool:
        return bool(self.max_rows or self.max_bytes)

    def used(self, rack: str, now: float) -> float:
        """The larger share of its row or byte bound `rack` used in its current window."""
        w = self._windows.get(rack)
        if w is None or now - w[0] >= self.window:
            return 0.0
        return max(w[1] / self.max_rows if self.max_rows else 0.0, w[2] / self.max_bytes if self.max_bytes else 0.0)

    def admit(self, rack: str, rows: int, size: int, now: float) -> bool:
        if not self.enabled:
            return True
        w = self._windows.get(rack)
        if w is None or now - w[0] >= self.window:
            w = self._windows[rack] = [now, 0, 0]
            if self.state.get(rack) == "over" or self.state.get(rack) == "alert":
                self._move(rack, None)
        empty = not w[1] and not w[2]
        if not empty and (
            (self.max_rows and w[1] + rows > self.max_rows) or (self.max_bytes and w[2] + size > self.max_bytes)
        ):
            self.deferred[rack] = self.deferred.get(rack, 0) + 1
            self.deferred_rows[rack] = self.deferred_rows.get(rack, 0) + rows
            self._move(rack, "over")
            return False
        w[1] += rows
        w[2] += size
        if self.state.get(rack) is None and self.used(rack, now) >= QUOTA_ALERT_RATIO:
            self._move(rack, "alert")
        return True

    def defer_for(self, rack: str, now: float) -> float:
        """Seconds until `rack`'s window ends (the NAK delay of what `admit` refused)."""
        w = self._windows.get(rack)
        left = (w[0] + self.window - now) if w is not None else 0.0
        return max(QUOTA_MIN_DEFER_S, left)

    def _move(self, rack: str, new: str | None) -> None:
        was = self.state.get(rack)
        if was == new:
            return
        if new is None:
            del self.state[rack]
            if was == "over":
                _log.info("telemetry from rack %r is within its quota again; its deferred telemetry flows", rack)
            return
        if len(self.state) >= MAX_QUOTA_STATES and was is None:
            return  # bounded: a flood of Rack names cannot grow this without limit
        self.state[rack] = new
        if new == "alert":
            _log.warning(
                "telemetry from rack %r used %d%% of its quota (%d rows / %d bytes per %gs: "
                "telemetry.rack_max_rows / rack_max_bytes)",
                rack,
                int(QUOTA_ALERT_RATIO * 100),
                self.max_rows,
                self.max_bytes,
                self.window,
            )
        else:
            _log.error(
                "telemetry from rack %r over its quota (%d rows / %d bytes per %gs: telemetry.rack_max_rows / "
                "rack_max_bytes); its telemetry waits in JetStream (nothing dropped) until the window ends",
                rack,
                self.max_rows,
                self.max_bytes,
                self.window,
            )


#: Racks whose quota state (alert / over) is kept at once.
MAX_QUOTA_STATES = 100_000


class Failure(enum.Enum):
    DATA = "data"  # these payloads never load: store message by message, drop what fails
    UNAVAILABLE = "unavailable"  # the store cannot write now: ack nothing, back off, retry


class StoreUnavailable(FluxError):
    """The telemetry store cannot be reached or written (server down, disk full)."""


class SchemaError(FluxError):
    """The store's schema is not one this Mixer knows (newer, or not ours)."""


class TelemetryStore(Protocol):
    name: str
    batch_max_rows: int
    flush_interval: float

    def write(self, parts: list[Part], sources: list[Source]) -> dict[str, int] | None: ...

    def classify(self, exc: BaseException) -> Failure: ...

    def probe(self) -> None: ...

    def load_sources(self) -> list[Source]: ...

    def apply_retention(self, cutoff_ns: int) -> int: ...

    @property
    def queries(self): ...

    def close(self) -> None: ...


def open_store(cfg, db, spool_dir: str | None = None) -> TelemetryStore:
    """The store `telemetry.backend` names: DuckDB on the registry's file `db`, or ClickHouse
    from `[clickhouse]` (raises a ConfigError, exit 2, when unreachable or its schema is newer)."""
    t = cfg.telemetry
    clamp = Clamp(max_age_ns=int(t.max_record_age * 1e9), max_skew_ns=int(t.max_clock_skew * 1e9))
    if t.backend == "clickhouse":
        from .clickhouse_store import ClickHouseStore, settings_from_config

        return ClickHouseStore(settings_from_config(cfg), clamp=clamp, spool_dir=spool_dir)
    from .duckdb_store import DuckDBStore

    return DuckDBStore(db, clamp=clamp, spool_dir=spool_dir, flush_interval=t.flush_interval)
