"""Telemetry ingest: `flux.telemetry.<rack>.logs|metrics|traces` from JetStream into a store.

Job. A durable pull consumer on the `flux-telemetry` stream fetches bus messages (each an
NDJSON batch, fluxrig.wire.telemetry), turns each into a `Part` (kind and rack from the
subject, never from the payload; the id base of its (rack, Flux-Src) incarnation; the Snake's
receive time) and hands a whole fetch to the `TelemetryStore` (telemetry_store.py: DuckDB or
ClickHouse) in the writer thread, then acknowledges each stored message (AckPolicy.EXPLICIT:
a message deferred by a quota stays unacked while later ones are acked; AckPolicy.ALL, used
before, would have acked it with them).
A fetch is gathered until `batch_max_bytes`, the store's `batch_max_rows` or `flush_interval`
since its first pull: that is how ClickHouse gets its 10k-100k row blocks about once a second.
Each pull asks for about the messages that fill `batch_max_rows` (at most `batch_max_messages`),
and the last fetch of a drain (the fetch before it left a backlog) is stored as soon as the
stream is empty once it holds DRAIN_MIN_ROWS, instead of waiting out flush_interval.

Ids. The stored id is `incarnation << 40 | seq`: each (rack, src) pair, src being the
Flux-Src header (the Rack's WAL id), gets its own incarnation number (the store's sources
table), so a Rack whose WAL was wiped and restarted at seq 1 is not mistaken for a re-send of
its old records. A Rack may open at most `max_incarnations` of them (a Rack that makes a new
WAL per message would otherwise grow the table without bound); past that its messages from
new WALs are dropped with an ERROR and a counter.

Nothing acked is lost. A message is acked only after the store has it. Three rules keep that:

- A write that fails because the store cannot write (disk full, server down: the store's
  `classify` says UNAVAILABLE) acks nothing: the fetch and those queued behind it are
  nak'ed with a delay, fetching pauses, one ERROR is logged, `store_up` turns 0 (metric
  `fluxrig_mixer_telemetry_store_up`), and the store is probed with back-off (0.5 s doubling
  to `outage_backoff_max`). When it answers, `_recover` stores everything delivered above the
  ack floor and fetching resumes (one WARNING says how long it was down). The backlog waits
  in JetStream meanwhile (bounded by snake.telemetry_max_age / telemetry_max_bytes).
- What was acked is purged from the stream (`_purge_loop`, the ack floor and below), never
  what was not: flux-telemetry is discard NEW (streams.py), so a backlog larger than
  snake.telemetry_max_bytes waits in the Racks' WALs (they retry) instead of evicting
  telemetry not yet stored. Un-ingested messages still expire after snake.telemetry_max_age
  (24 h by default; 0 = never): the longest store outage that costs nothing.
- `stop()` lets the writer finish the fetches in hand and ack them (bounded by
  `stop_timeout`), and on timeout abandons them unacked; it never cancels a write and acks past.
- `_run` first stores, from the stream by sequence (an ephemeral consumer from the ack floor),
  every message the durable consumer delivered above its ack floor: what a stopped, killed or
  naked predecessor had in hand. Only then does it fetch, so its first ack covers stored rows.

A record stored twice this way lands once (the store's idempotence). A payload that is not
NDJSON, or that the store says can never load (DATA), is counted, logged at ERROR and acked;
lines without a valid id are dropped (counted).

Quotas push back, never drop. Each Rack may have `rack_max_rows` rows and `rack_max_bytes`
bytes stored per `quota_window` (RACK_MAX_ROWS / RACK_MAX_BYTES per QUOTA_WINDOW_S by default:
10k rows/s, about 4 MiB/s, sustained; 0 = none). A message of a Rack over it is NAKed with a
delay until its window ends (telemetry_store.RackQuotas), before anything of its fetch is
stored: it waits in flux-telemetry and is stored, once, when the Rack is within its quota
again; the other Racks' messages of the same fetch are stored and acked meanwhile (explicit
acks; max_ack_pending unbounded and max_deliver unlimited, so the deferred messages of one
Rack neither block the consumer nor run out of redeliveries). A Rack flooding longer holds
its backlog in flux-telemetry (discard NEW, snake.telemetry_max_bytes) and past that in its
own WAL. Counted per Rack (`quota_deferred`, metric fluxrig_mixer_telemetry_quota_deferred_total),
state per Rack (`quota_state`: alert at 80 %, over; a WARNING / ERROR / INFO per change).
What it costs: a deferred message is redelivered once per window it stays over (a NAK and a
redelivery each), and while the ack floor waits on a deferred message the purge (below)
removes nothing above it, so flux-telemetry holds the other Racks' stored messages meanwhile.
So that one Rack over its quota cannot fill the stream and push every Rack back, quotas
yield under pressure: once flux-telemetry is QUOTA_YIELD_RATIO full (read by the purge pass),
nothing more is deferred until it is back under QUOTA_RESUME_RATIO (a WARNING and an INFO,
`quota_yielding`). What was NAKed before comes back within its window (at most
`quota_window`), is stored, and the floor moves on: the stall is bounded by one window.

Threads. `_decode` runs on the event loop and owns the (rack, src) -> incarnation maps; a new
pair crosses to the writer thread through `PendingSources` (one lock; the loop puts, the
writer takes). The writer stores the pairs it took in the same write as the rows of its fetch
(before them) and gives them back when that write fails, so a pair is stored when rows using
it can be: a failed write loses no assignment, and a restarted Mixer numbers every WAL as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from fluxrig.wire import subjects as S
from fluxrig.wire.telemetry import MAX_RECORD_ID, SRC_HEADER

from .duckdb_store import TELEMETRY_DDL, DuckDBStore, ensure_tables
from .ingest_cluster import purge_floor
from .telemetry_store import (
    STAGE_COLUMNS,
    TIME_COLUMN,
    Clamp,
    Failure,
    Part,
    PendingSources,
    RackQuotas,
    Source,
    TelemetryStore,
    recv_ns,
)

__all__ = [
    "TelemetryIngest",
    "PendingSources",
    "Source",
    "TELEMETRY_DDL",
    "STAGE_COLUMNS",
    "TIME_COLUMN",
    "ensure_tables",
    "CONSUMER",
    "PIPELINE_DEPTH",
    "MIN_PULL_S",
    "DRAIN_MIN_ROWS",
    "STOP_TIMEOUT_S",
    "MAX_INCARNATIONS",
    "OUTAGE_BACKOFF_S",
    "OUTAGE_BACKOFF_MAX_S",
    "QUOTA_WINDOW_S",
    "RACK_MAX_ROWS",
    "RACK_MAX_BYTES",
]

log = logging.getLogger("fluxrig.mixer.ingest")

try:  # only to count lines faster (_lines)
    import numpy as _np
except ImportError:  # pragma: no cover - the DuckDB-only install
    _np = None
# Below this a payload's newlines are counted by bytes.count (numpy's per-call cost dominates).
_NP_COUNT_MIN_BYTES = 16 * 1024

CONSUMER = "mixer-ingest"
# Decoded fetches waiting for the writer; bounds memory while overlapping fetch and write.
PIPELINE_DEPTH = 2
# nats-py refuses a pull that expires in less than ~0.1 ms; keep pulls above this.
MIN_PULL_S = 0.01
# With a backlog in the stream a fetch goes on past flush_interval up to its size bounds
# (measured: a 60 s outage drained at 2.4x the steady rate in fetches of ~13k rows), but
# never longer than this; each further pull waits at most MIN_BACKLOG_PULL_S.
MAX_GATHER_S = 5.0
MIN_BACKLOG_PULL_S = 0.1
#: The end of a drain: a fetch that follows one which left a backlog stops gathering as soon
#: as the stream has nothing more for it, instead of waiting out flush_interval, once it holds
#: this many rows (the bottom of ClickHouse's 10k-100k block range; fewer wait as usual). At
#: steady state (the previous fetch left nothing pending) fetches stay time-bounded, so the
#: ~1 insert/s per table rule holds; a drain saves one flush_interval on its last batch.
DRAIN_MIN_ROWS = 10_000
# How long stop() lets the writer finish the fetches in hand (and ack them) before it gives
# up on them unacked; the next incarnation's _recover stores what was given up.
STOP_TIMEOUT_S = 5.0
# WALs (Flux-Src values) one Rack may open; ids leave 24 bits for it (2**64 / 2**40).
MAX_INCARNATIONS = 10_000
_INCARNATION_LIMIT = 1 << 24
OUTAGE_BACKOFF_S = 0.5
OUTAGE_BACKOFF_MAX_S = 30.0
QUOTA_WINDOW_S = 60.0
#: Default per-Rack telemetry quota per QUOTA_WINDOW_S: 10k rows/s and 4 MiB/s sustained, well
#: above a busy Rack (a 1000 TPS payment gateway logging and tracing each message) and a
#: fraction of what one DuckDB Mixer ingests, so a few flooding Racks cannot starve the rest.
RACK_MAX_ROWS = 600_000
RACK_MAX_BYTES = 256 * 1024 * 1024
# The durable's ack wait; a nak during an outage delays redelivery by the longest back-off.
ACK_WAIT_S = 60.0
# How often what the ingest acked is purged from flux-telemetry (discard NEW: see streams.py).
PURGE_INTERVAL_S = 5.0
#: flux-telemetry this full (bytes): quotas stop deferring (module docstring); and back at.
QUOTA_YIELD_RATIO = 0.5
QUOTA_RESUME_RATIO = 0.3


def _lines(data: bytes) -> int:
    """NDJSON lines in a payload (a last line without its newline counts). Counted once per
    message per fetch and passed along, on the event loop: `bytes.count` runs at ~1.4 GB/s
    here (three passes per fetch cost a third of a second per million log rows); numpy's
    count of a comparison at ~8 GB/s, used when it is installed (the ClickHouse archive
    needs it; a DuckDB-only Mixer may not have it, and counts the same, slower)."""
    if _np is not None and len(data) >= _NP_COUNT_MIN_BYTES:
        newlines = int(_np.count_nonzero(_np.frombuffer(data, dtype=_np.uint8) == 10))
    else:
        newlines = data.count(b"\n")
    return newlines + (0 if data.endswith(b"\n") else 1)


def _pending(m) -> int:
    try:
        return m.metadata.num_pending
    except Exception:
        return 0


class TelemetryIngest:
    """Consumes the telemetry stream into a store. `start(js)`, `stop()`, `stats`."""

    def __init__(
        self,
        store,
        batch_max_messages: int = 64,
        batch_max_bytes: int = 32 * 1024 * 1024,
        flush_interval: float | None = None,
        retention: float = 7 * 86400.0,
        retention_interval: float = 300.0,
        durable: str = CONSUMER,
        spool_dir: str | None = None,
        stop_timeout: float = STOP_TIMEOUT_S,
        before_write: Callable[[], None] | None = None,
        clamp: Clamp | None = None,
        max_incarnations: int = MAX_INCARNATIONS,
        rack_max_rows: int = RACK_MAX_ROWS,
        rack_max_bytes: int = RACK_MAX_BYTES,
        quota_window: float = QUOTA_WINDOW_S,
        outage_backoff_max: float = OUTAGE_BACKOFF_MAX_S,
        purge_interval: float = PURGE_INTERVAL_S,
        shared: bool = False,
        ack_wait: float = ACK_WAIT_S,
        drain_min_rows: int = DRAIN_MIN_ROWS,
    ):
        """`store` is a TelemetryStore, or a registry.Database (then a DuckDBStore on it).
        `before_write`, when given, is called in the writer thread before a write: a test
        holds a store there to stop the ingest with a write in flight. `rack_max_rows` /
        `rack_max_bytes` per `quota_window` (0 = no quota). `shared`: several cluster nodes
        pull this one durable (ingest_cluster.py: explicit acks, WALs numbered in KV)."""
        if not hasattr(store, "write"):
            store = DuckDBStore(store, clamp=clamp, spool_dir=spool_dir, flush_interval=flush_interval or 0.2)
        self.store: TelemetryStore = store
        if before_write is not None:
            store.before_write = before_write
        self.stop_timeout = stop_timeout
        self.batch_max_messages = batch_max_messages
        self.batch_max_bytes = batch_max_bytes
        self.flush_interval = flush_interval if flush_interval is not None else store.flush_interval
        self.retention = retention
        self.retention_interval = retention_interval
        self.durable = durable
        self.max_incarnations = min(max_incarnations, _INCARNATION_LIMIT)
        self.rack_max_rows = rack_max_rows
        self.rack_max_bytes = rack_max_bytes
        self.quota_window = quota_window
        self.outage_backoff_max = outage_backoff_max
        self.purge_interval = purge_interval
        self.drain_min_rows = drain_min_rows
        self._lines_per_msg = 0  # NDJSON lines per bus message, as last seen (sizes the pulls)
        self.shared = shared
        self.ack_wait = ack_wait  # shared: how soon a dead node's fetch goes to another node
        self._shared_sources = None  # ingest_cluster.SharedSources, opened by start() when shared
        self._purged = 0  # stream seq up to which acked messages were purged
        self.rows: dict[str, int] = defaultdict(int)
        self.duplicates: dict[str, int] = defaultdict(int)  # lines not stored: re-sends, lines without an id
        self.messages = 0
        self.rejected = 0
        self.write_errors = 0
        self.deleted_by_retention = 0
        self.recovered = 0  # messages a predecessor (or an outage) left unacked, stored by _recover
        self.write_seconds = 0.0  # time spent inside store writes (for the benchmark and /metrics)
        self.last_error = ""
        self.store_up = True
        self.outages = 0
        self.outage_seconds = 0.0
        self.naks = 0
        self.backlog = 0  # messages waiting in the stream for this consumer (last known)
        self.incarnations_refused: dict[str, int] = defaultdict(int)  # rack -> messages from WALs past the cap
        self._quotas = RackQuotas(rack_max_rows, rack_max_bytes, quota_window)
        self.quota_yielding = False  # flux-telemetry under pressure: nothing is deferred (_pressure)
        self.quota_yields = 0  # times it started yielding
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        self._js = None
        self._wake = asyncio.Event()
        self._down_since = 0.0
        # (rack, src) -> incarnation; rack -> next incarnation number. New pairs are written
        # to the sources table by the writer before the rows that use them.
        self._sources: dict[tuple[str, str], int] = {}
        self._next_incarnation: dict[str, int] = {}
        self._pending = PendingSources()  # loop -> writer thread (see the module docstring)
        for rack, src, inc in store.load_sources():
            self._sources[(rack, src)] = inc
            self._next_incarnation[rack] = max(self._next_incarnation.get(rack, 0), inc + 1)
        self._stopping = False

    @property
    def stats(self) -> dict:
        return {
            "backend": self.store.name,
            "rows": dict(self.rows),
            "duplicates": dict(self.duplicates),
            "messages": self.messages,
            "rejected_batches": self.rejected,
            "write_errors": self.write_errors,
            "deleted_by_retention": self.deleted_by_retention,
            "recovered": self.recovered,
            "write_seconds": round(self.write_seconds, 3),
            "last_error": self.last_error,
            "store_up": self.store_up,
            "outages": self.outages,
            "outage_seconds": round(
                self.outage_seconds + (time.monotonic() - self._down_since if not self.store_up else 0), 3
            ),
            "naks": self.naks,
            "backlog": self.backlog,
            "quota_yielding": self.quota_yielding,
            "quota_yields": self.quota_yields,
            "quota_deferred": dict(self._quotas.deferred),
            "quota_deferred_rows": dict(self._quotas.deferred_rows),
            "quota_state": dict(self._quotas.state),
            "quota_used": {r: round(self._quotas.used(r, time.monotonic()), 4) for r in self._quotas.state},
            "incarnations_refused": dict(self.incarnations_refused),
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, js) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self._stopping = False
        self._wake = asyncio.Event()
        self._js = js
        if self.shared:
            from .ingest_cluster import SharedSources

            self._shared_sources = await SharedSources.open(js, self.max_incarnations)
        start_seq = await self._reset_durable(js)
        config = ConsumerConfig(
            durable_name=self.durable,
            **({"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq} if start_seq else {}),
            # Explicit: a cumulative ack would cover another node's fetch (shared) and the
            # messages a quota deferred (see the module docstring).
            ack_policy=AckPolicy.EXPLICIT,
            **({} if start_seq else {"deliver_policy": DeliverPolicy.ALL}),
            max_ack_pending=-1,
            ack_wait=self.ack_wait,
            filter_subject=S.telemetry_all(),
        )
        self._sub = await js.pull_subscribe(
            S.telemetry_all(), durable=self.durable, stream=S.STREAM_TELEMETRY, config=config
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="telemetry-ingest"),
            loop.create_task(self._retention_loop(), name="telemetry-retention"),
            loop.create_task(self._purge_loop(), name="telemetry-purge"),
        ]

    async def _reset_durable(self, js) -> int:
        """A durable made by an older Mixer acks cumulatively (AckPolicy.ALL), which JetStream
        cannot change in place: delete it, so it is made again from the stream's start. A
        durable a predecessor left with messages delivered and unacked (stopped or killed with a
        fetch in hand, or messages a quota deferred) is made again from its ack floor, so they
        come at once instead of after ack_wait, and are acked once stored (returns that start
        seq, else 0). Safe: the stream holds only what is not yet purged, and what is stored
        twice lands once (the store's idempotence). Not when shared: other nodes hold fetches."""
        import nats.js.errors
        from nats.js.api import AckPolicy

        try:
            info = await js.consumer_info(S.STREAM_TELEMETRY, self.durable)
        except nats.js.errors.NotFoundError:
            return
        if info.config.ack_policy != AckPolicy.EXPLICIT:
            log.warning(
                "telemetry ingest: consumer %s acks cumulatively (made by an older Mixer); recreating it with "
                "explicit acks (what it holds is read again from the stream and stored once)",
                self.durable,
            )
            await js.delete_consumer(S.STREAM_TELEMETRY, self.durable)
            return 0
        if self.shared or not info.num_ack_pending:
            return 0
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        log.info("telemetry ingest: %d messages delivered and never acked before; reading again from seq %d",
                 info.num_ack_pending, floor + 1)  # fmt: skip
        await js.delete_consumer(S.STREAM_TELEMETRY, self.durable)
        return floor + 1

    async def stop(self) -> None:
        """Stop fetching; store and ack the fetches in hand, waiting at most `stop_timeout`;
        past that, leave them unacked (the next start() stores them) and cancel."""
        self._stopping = True
        self._wake.set()
        run = [t for t in self._tasks if t.get_name() == "telemetry-ingest"]
        for t in self._tasks:
            if t not in run:
                t.cancel()  # retention: nothing to finish
        if run:
            done, _ = await asyncio.wait(run, timeout=self.stop_timeout)
            if not done:
                log.warning(
                    "telemetry ingest: a store took more than %.1fs at stop; its fetch is left "
                    "unacked for the next start",
                    self.stop_timeout,
                )
        for t in self._tasks:
            t.cancel()  # a no-op for a task that finished
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
        self.store.close()

    # -- fetching --------------------------------------------------------------------------

    async def _fetch(self, timeout: float | None = None):
        """Pull until `batch_max_bytes`, the store's `batch_max_rows` or `flush_interval`
        since the first pull: (messages, parts) or None when idle. Each pull asks for at most
        `batch_max_messages` (bounds what the server buffers for us)."""
        import nats.errors

        wait = timeout or self.flush_interval
        started = time.monotonic()
        deadline = started + wait
        max_rows = self.store.batch_max_rows
        draining = self.backlog > 0  # the last fetch (or _recover) left messages in the stream
        msgs: list = []
        lines: list[int] = []
        size = rows = 0
        while not self._stopping:
            ask = self.batch_max_messages
            if max_rows and not self._lines_per_msg:
                ask = 1  # the first pull of this ingest: learn how many rows a message holds
            elif max_rows:
                # Ask for about what fills the row bound, not batch_max_messages whatever
                # their size: a fetch of ~batch_max_rows keeps the pipeline's stages short
                # (measured: 64 messages of 5000 rows made 320k-row fetches, 3 per 1M rows,
                # and the first insert could only start after a third of the run).
                ask = max(1, min(ask, -(-(max_rows - rows) // self._lines_per_msg)))
            try:
                got = await self._sub.fetch(ask, timeout=max(wait, MIN_PULL_S))
            except (TimeoutError, nats.errors.TimeoutError):
                break
            msgs.extend(got)
            for m in got:
                n = _lines(m.data or b"")
                lines.append(n)
                size += len(m.data or b"")
                rows += n
            if got:
                self._lines_per_msg = max(1, rows // len(msgs))
            wait = deadline - time.monotonic()
            if size >= self.batch_max_bytes or (max_rows and rows >= max_rows):
                break
            if draining and got and _pending(got[-1]) <= 0 and rows >= self.drain_min_rows:
                break  # the drain is over: store its tail now (DRAIN_MIN_ROWS)
            if wait <= 0:
                # A backlog waits in the stream (a drain after an outage): gather up to the
                # size bounds instead of inserting small batches of what is already there.
                if not got or _pending(got[-1]) <= 0 or time.monotonic() - started > MAX_GATHER_S:
                    break
                wait = MIN_BACKLOG_PULL_S
        if not msgs:
            return None
        msgs, lines = await self._defer_over_quota(msgs, lines)
        if not msgs:
            return None
        try:
            self.backlog = msgs[-1].metadata.num_pending
        except Exception:
            pass
        if self._shared_sources is not None:
            from .ingest_cluster import number_sources

            try:
                await number_sources(self._shared_sources, msgs, self._sources, self._next_incarnation, self._pending)
            except Exception:
                await self._nak(msgs, delay=OUTAGE_BACKOFF_S)  # the bus is down: another node may take them
                raise
        return msgs, self._decode(msgs, lines=lines)

    def _over_quota(self, msgs) -> tuple[list, list]:
        """(admitted, deferred) by the per-Rack quotas (RackQuotas); a message that is no
        telemetry batch is admitted (_decode counts and drops it)."""
        admitted, deferred, _lines_kept = self._admit(msgs, [_lines(m.data or b"") for m in msgs])
        return admitted, deferred

    def _admit(self, msgs, lines: list[int]) -> tuple[list, list, list[int]]:
        """`_over_quota` for messages whose `_lines` the caller counted already: (admitted,
        deferred, the admitted messages' line counts)."""
        if not self._quotas.enabled or self.quota_yielding:
            return msgs, [], lines
        now = time.monotonic()
        admitted, deferred, kept = [], [], []
        for m, n in zip(msgs, lines, strict=True):
            rack = S.rack_of_subject(m.subject)
            if rack is None or self._quotas.admit(rack, n, len(m.data or b""), now):
                admitted.append(m)
                kept.append(n)
            else:
                deferred.append(m)
        return admitted, deferred, kept

    async def _defer_over_quota(self, msgs, lines: list[int]) -> tuple[list, list[int]]:
        """Give back (a NAK delayed until its Rack's window ends) what is over a quota; the
        rest and their line counts."""
        admitted, deferred, kept = self._admit(msgs, lines)
        now = time.monotonic()
        for m in deferred:
            try:
                await m.nak(delay=self._quotas.defer_for(S.rack_of_subject(m.subject), now))
            except Exception:
                pass  # the bus is down: redelivered after ack_wait anyway
        return admitted, kept

    def _decode(self, msgs, count: bool = True, lines: list[int] | None = None) -> list[Part]:
        """One Part per message, without parsing the payload (the store will); `lines` are
        the messages' `_lines` when counted already."""
        parts: list[Part] = []
        for index, m in enumerate(msgs):
            rack = S.rack_of_subject(m.subject)
            kind = m.subject.rsplit(".", 1)[-1]
            data = m.data or b""
            if rack is None or kind not in STAGE_COLUMNS or not data.lstrip()[:1] == b"{":
                if count:
                    self.rejected += 1
                    self.last_error = f"{m.subject}: not an NDJSON telemetry batch"
                    log.error("telemetry message on %s dropped: not an NDJSON telemetry batch", m.subject)
                continue
            n = _lines(data) if lines is None else lines[index]
            if not data.endswith(b"\n"):
                data = data + b"\n"
            src = (m.headers or {}).get(SRC_HEADER, "")[:128]
            inc = self._sources.get((rack, src))
            if inc is None:
                inc = self._next_incarnation.get(rack, 0)
                if inc >= self.max_incarnations:
                    if not self.incarnations_refused[rack]:
                        log.error(
                            "telemetry from rack %r dropped: it opened %d WALs (telemetry.max_incarnations); "
                            "messages from new WALs are dropped until an operator raises the cap",
                            rack,
                            inc,
                        )
                    self.incarnations_refused[rack] += 1
                    continue
                self._next_incarnation[rack] = inc + 1
                self._sources[(rack, src)] = inc
                self._pending.put((rack, src, inc))
            parts.append(Part(kind, rack, inc * MAX_RECORD_ID, recv_ns(m), data, n, index))
        return parts

    # -- writing ---------------------------------------------------------------------------

    def _write_groups(self, parts: list[Part], prepared=None) -> None:
        """One store write (in the writer thread), with the pending sources before the rows;
        `prepared` is what the store's `prepare` made of these parts, when it has one."""
        started = time.perf_counter()
        new = self._pending.take()
        try:
            if prepared is not None:
                inserted = self.store.write(parts, new, prepared)
            else:
                inserted = self.store.write(parts, new) if (parts or new) else {}
        except BaseException:
            self._pending.give_back(new)  # stored by the next write, ahead of the rows that need them
            raise
        finally:
            self.write_seconds += time.perf_counter() - started
        lines: dict[str, int] = defaultdict(int)
        for p in parts:
            lines[p.kind] += p.lines
        for kind, n in lines.items():
            stored = n if inserted is None else inserted.get(kind, 0)
            self.rows[kind] += stored
            self.duplicates[kind] += max(0, n - stored)

    async def _prepare(self, parts: list[Part], after: asyncio.Future | None = None):
        """The store's CPU work for a fetch (ClickHouse: parse and encode), done while the
        writer inserts the previous fetch, once `after` (the previous prepare) is done; None
        when the store has none or it failed (the write then does it, and a bad payload is
        found message by message there)."""
        prepare = getattr(self.store, "prepare", None)
        if prepare is None or not parts:
            return None
        if after is not None:
            await asyncio.wait([after])  # never raises; its result is the writer's
        try:
            return await asyncio.to_thread(prepare, parts)
        except Exception:
            return None

    async def _write_fetch(self, msgs, parts: list[Part], prepared=None) -> bool:
        """Store one decoded fetch: True when every message is stored (or can never be, and
        is counted), False when the store is unavailable (nothing may be acked)."""
        try:
            await asyncio.to_thread(self._write_groups, parts, prepared)
            return True
        except Exception as exc:
            self.write_errors += 1
            self.last_error = str(exc)[:500]
            if self.store.classify(exc) is Failure.UNAVAILABLE:
                self._went_down(exc)
                return False
            log.warning("telemetry write failed (%s); retrying message by message", exc)
        by_msg: dict[int, list[Part]] = defaultdict(list)
        for p in parts:
            by_msg[p.msg].append(p)
        for index, single in by_msg.items():
            try:
                await asyncio.to_thread(self._write_groups, single)
            except Exception as exc2:
                self.last_error = str(exc2)[:500]
                if self.store.classify(exc2) is Failure.UNAVAILABLE:
                    self._went_down(exc2)
                    return False
                self.rejected += 1
                log.error("telemetry batch on %s rejected (it can never load): %s", msgs[index].subject, exc2)
        return True

    async def _store(self, msgs, parts, prepared=None) -> bool:
        """Write one decoded fetch, then acknowledge each of its messages (AckPolicy.EXPLICIT).
        Stopping, the ack waits for the server's reply, so it is there before stop returns."""
        if not await self._write_fetch(msgs, parts, prepared):
            return False
        for m in msgs:
            if self._stopping:
                await m.ack_sync()
            else:
                await m.ack()
        self.messages += len(msgs)
        return True

    # -- outages and recovery --------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> None:
        if self.store_up:
            self.store_up = False
            self.outages += 1
            self._down_since = time.monotonic()
            log.error(
                "telemetry store (%s) cannot write: %s; nothing is acked, the backlog waits in JetStream "
                "and is stored when it returns",
                self.store.name,
                exc,
            )

    async def _nak(self, msgs, delay: float | None = None) -> None:
        for m in msgs:
            try:
                await m.nak(delay=self.outage_backoff_max if delay is None else delay)
                self.naks += 1
            except Exception:
                pass  # the bus is down too: the server redelivers after ack_wait anyway

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    async def _heal(self) -> bool:
        """Store what was delivered and not acked (`_recover`), probing the store with
        back-off while it cannot write. True once done; False when stopping first."""
        delay = OUTAGE_BACKOFF_S
        while not self._stopping:
            if not self.store_up:
                await self._sleep(delay)
                delay = min(delay * 2, self.outage_backoff_max)
                if self._stopping:
                    return False
                try:
                    await asyncio.to_thread(self.store.probe)
                except Exception as exc:
                    self.last_error = str(exc)[:500]
                    await self._refresh_backlog()
                    continue
            try:
                if await self._recover():
                    break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus itself (Snake restarting): wait and retry
                self.last_error = str(exc)[:500]
                log.debug("telemetry recovery failed: %s", exc)
                await self._sleep(delay)
        else:
            return False
        if not self.store_up:
            down = time.monotonic() - self._down_since
            self.outage_seconds += down
            self.store_up = True
            log.warning("telemetry store (%s) writes again after %.1fs; storing the backlog", self.store.name, down)
        return True

    async def _refresh_backlog(self) -> None:
        try:
            info = await self._sub.consumer_info()
            self.backlog = info.num_pending + info.num_ack_pending
        except Exception:
            pass

    async def _recover(self) -> bool:
        """Store every message the durable consumer delivered above its ack floor, read from
        the stream by sequence through an ephemeral consumer (its messages carry the same
        receive times as the first delivery). True when done, False when the store went down.
        They are not acked here: JetStream redelivers them to the durable, and the store keeps
        each record once. What a quota defers is left to those redeliveries."""
        import nats.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        info = await self._sub.consumer_info()
        self.backlog = info.num_pending + info.num_ack_pending
        if self.shared:  # what a node left unacked is redelivered by JetStream, to any node
            return True
        first, last = info.ack_floor.stream_seq + 1, info.delivered.stream_seq
        if not info.num_ack_pending or last < first:
            return True
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            filter_subject=S.telemetry_all(),
        )
        reader = await self._js.pull_subscribe(S.telemetry_all(), stream=S.STREAM_TELEMETRY, config=config)
        found = 0
        writing = None  # the previous batch's write, overlapping this fetch (no ack here: order is free)
        try:
            done = False
            while not done and not self._stopping:
                msgs: list = []
                lines: list[int] = []
                size = rows = 0
                while len(msgs) < 100_000:
                    try:
                        got = await reader.fetch(self.batch_max_messages, timeout=1.0)
                    except (TimeoutError, nats.errors.TimeoutError):
                        done = True
                        break
                    for m in got:
                        if m.metadata.sequence.stream > last:
                            done = True
                            break
                        msgs.append(m)
                        lines.append(_lines(m.data or b""))
                        size += len(m.data or b"")
                        rows += lines[-1]
                    if done or size >= self.batch_max_bytes or rows >= max(self.store.batch_max_rows, 1):
                        break
                msgs, _deferred, lines = self._admit(msgs, lines)
                if msgs:
                    if writing is not None and not await writing:
                        return False
                    writing = asyncio.ensure_future(self._write_fetch(msgs, self._decode(msgs, lines=lines)))
                    found += len(msgs)
            if writing is not None:
                w, writing = writing, None
                if not await w:
                    return False
        finally:
            if writing is not None:
                try:
                    await writing
                except Exception:
                    pass
            try:
                await reader.unsubscribe()
                await self._js.delete_consumer(S.STREAM_TELEMETRY, (await reader.consumer_info()).name)
            except Exception:
                pass
        if self._stopping:
            return False
        self.recovered += found
        if found:
            log.info(
                "telemetry ingest: stored %d messages fetched but never acked before (seq %d..%d)", found, first, last
            )
        return True

    async def drain_once(self, timeout: float | None = None) -> int:
        """Fetch one batch and store it; the number of bus messages handled (0 when idle)."""
        got = await self._fetch(timeout)
        if got is None:
            return 0
        await self._store(*got)
        return len(got[0])

    async def _run(self) -> None:
        """Recover, then three stages: fetching and decoding the next batch (the loop)
        overlaps with the store preparing the one before (ClickHouse: parse and encode, in a
        thread) and writing the one before that (in a thread). The queue of PIPELINE_DEPTH
        decoded fetches bounds memory; order (and so the ack-all semantics) is kept because
        there is exactly one writer, which takes the batches in fetch order."""
        if not await self._heal():  # before the first fetch: its ack would cover them
            return
        queue: asyncio.Queue = asyncio.Queue(PIPELINE_DEPTH)
        resumed = asyncio.Event()
        resumed.set()
        writer = asyncio.get_running_loop().create_task(self._write_loop(queue, resumed), name="telemetry-writer")
        preparing = None
        try:
            while not self._stopping and not writer.done():
                if not resumed.is_set():
                    waiter = asyncio.ensure_future(resumed.wait())
                    await asyncio.wait([waiter, writer], return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                try:
                    got = await self._fetch()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # bus down (Snake restarting): wait and go on
                    self.last_error = str(exc)[:500]
                    log.debug("telemetry fetch failed: %s", exc)
                    await self._sleep(0.5)
                    continue
                if got is not None:
                    # Prepared in a thread while this loop fetches the next batch and the
                    # writer inserts the previous one: three stages, one of each at a time
                    # (a prepare starts when the one before it ended: several at once only
                    # fought over the two cores and the GIL), so the order stays the writer's.
                    preparing = asyncio.ensure_future(self._prepare(got[1], after=preparing))
                    await queue.put((*got, preparing))
            await queue.put(None)  # stopping: the writer stores what is queued, then ends
            await writer
        finally:
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, Exception):
                pass

    async def _write_loop(self, queue: asyncio.Queue, resumed: asyncio.Event) -> None:
        while (got := await queue.get()) is not None:
            msgs, parts, preparing = got
            prepared = await preparing  # never raises: None means the write prepares itself
            try:
                if await self._store(msgs, parts, prepared):
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ack failed (bus down): redelivered, the store dedups it
                self.last_error = str(exc)[:500]
                log.debug("telemetry ack failed: %s", exc)
                continue
            # The store is down: pause fetching, give back what is in hand, heal.
            resumed.clear()
            await self._nak(msgs)
            stop_after = False
            while not queue.empty():
                queued = queue.get_nowait()
                if queued is None:
                    stop_after = True
                else:
                    await self._nak(queued[0])
            if stop_after or not await self._heal():
                return
            resumed.set()

    # -- retention -------------------------------------------------------------------------

    def apply_retention(self, now: float | None = None) -> int:
        """Delete rows older than the retention window; returns rows deleted."""
        cutoff_ns = int(((time.time() if now is None else now) - self.retention) * 1e9)
        total = self.store.apply_retention(cutoff_ns)
        self.deleted_by_retention += total
        return total

    async def _purge_loop(self) -> None:
        """Remove from the stream what every ingest consumer acked (the lowest ack floor and
        below: in a cluster each DuckDB node has its own, ingest_cluster.purge_floor): the
        stream is discard NEW, so it must not fill with stored rows; a full stream then means
        a real backlog, which waits in the Racks' WALs instead of evicting older telemetry."""
        while not self._stopping:
            await self._sleep(self.purge_interval)
            try:
                floor = await purge_floor(self._js, self.durable)  # every ingest consumer's, not only ours
                if floor is not None and floor > self._purged:
                    await self._js.purge_stream(S.STREAM_TELEMETRY, seq=floor + 1)
                    self._purged = floor
                if self._quotas.enabled:
                    self._pressure(await self._js.stream_info(S.STREAM_TELEMETRY))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("telemetry purge failed: %s", exc)

    def _pressure(self, info) -> None:
        """Quotas yield while flux-telemetry is QUOTA_YIELD_RATIO full (module docstring)."""
        cap = info.config.max_bytes or 0
        if cap <= 0:
            return
        full = (info.state.bytes or 0) / cap
        if not self.quota_yielding and full >= QUOTA_YIELD_RATIO:
            self.quota_yielding = True
            self.quota_yields += 1
            over = sorted(r for r, st in self._quotas.state.items() if st == "over")
            log.warning("flux-telemetry is %.0f%% full while Racks over their quota (%s) hold its purge back: "
                        "quotas yield (their rows are stored now) so that no Rack is pushed back for them",
                        full * 100, ", ".join(over[:10]) or "none now")  # fmt: skip
        elif self.quota_yielding and full < QUOTA_RESUME_RATIO:
            self.quota_yielding = False
            log.info("flux-telemetry is %.0f%% full again: telemetry quotas apply", full * 100)

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
