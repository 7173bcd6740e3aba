"""The operators' audit trail shared by every node of a cluster: each node's rows, on every node.

Job. Make GET /api/v1/audit (and the console's audit pages) answer the same on every Mixer
node (issues 14 and 19). Before, each node's `api_audit` table held only the calls that node
served: an operator who killed a Rack through node 1 found no trace of it on node 2.

Contract.
- The shared trail is the replicated stream `fluxrig-audit` (subjects.STREAM_AUDIT, subject
  subjects.MIXER_AUDIT, the cluster's replica count; streams.audit_stream_config). Its limits
  are `api.audit_max_age` and `api.audit_max_bytes`, discard OLD: past them the oldest rows
  leave the shared trail, and each node's DuckDB keeps the rows it has.
- A row is written first to this node's `api_audit` (AuditLog.record), unshared: a call is
  audited even with the bus down. The table is the outbox: the pump publishes this node's
  unshared rows in order, each with its id as Nats-Msg-Id (a re-send within the duplicate
  window is dropped by JetStream), and marks them shared once JetStream acked them. Without
  quorum the rows wait in the table and go when it returns; a restart included, nothing is
  lost.
- The follower reads the stream in order from this node's cursor (`api_audit_cursor`, written
  in the same DuckDB transaction as the rows it inserts, so a node killed mid-batch resumes
  where its file says) and inserts each row whose id the table lacks: a row is in a node's
  table once, whatever was re-sent or replayed. A node's own rows come back and are skipped
  by the same rule.
- A message that is not a well-formed row is logged at ERROR with its stream sequence and
  skipped; only Mixer nodes may publish the subject (Racks' bus users cannot).
- A stream found behind the cursor (recreated: its last sequence is lower) is read again
  from its start; ids keep that from doubling anything.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fluxrig.aiotools import cancel_all_and_wait, finish_within, next_within, wait_event
from fluxrig.wire import subjects as S

from .auth import AUDIT_COLUMNS, AUDIT_PATH_CHARS, AuditLog

__all__ = ["SharedAudit", "PUBLISH_BATCH", "APPLY_BATCH", "MAX_ROW_BYTES"]

log = logging.getLogger("fluxrig.mixer.audit")

PUBLISH_BATCH = 256  # unshared rows read from the table at once
APPLY_BATCH = 512  # rows from the stream inserted in one DuckDB transaction
MAX_ROW_BYTES = 4096  # a row is well under 1 KiB; anything larger is not one of ours
PUBLISH_TIMEOUT_S = 3.0
RETRY_S = 0.5  # doubled per failed attempt, up to RETRY_MAX_S
RETRY_MAX_S = 5.0
IDLE_RESCAN_S = 30.0  # the pump looks at the table this often even when nobody woke it
STOP_WAIT_S = 2.0  # at stop, this long at most to share what is still unshared
READY_WAIT_S = 5.0  # start waits this long at most for the replay of the trail

_CURSOR_TABLE = [
    "CREATE TABLE IF NOT EXISTS api_audit_cursor(stream VARCHAR PRIMARY KEY, seq BIGINT NOT NULL)",
]
_TEXT_FIELDS = ("principal", "role", "via", "method", "path", "client", "id", "node")
# One statement per batch, not one per row: each row's own INSERT ... WHERE NOT EXISTS cost
# ~1 ms of the event loop on a quiet box and 3-4 ms under load, and a node reads back every row
# it shares, so a burst of API calls (14 hostile imports) stalled heartbeats 40-60 ms per batch
# (tests/test_mixer_guard.py, its p99 over 100 ms); as one SELECT of the ids and one INSERT: ~2 ms.
_INSERT_HEAD = f"INSERT INTO api_audit ({', '.join(AUDIT_COLUMNS)}) VALUES "
_INSERT_ROW = "(make_timestamptz(?::BIGINT), ?, ?, ?, ?, ?, ?, ?, ?, ?, true)"
_ID = 8  # the id's place in a row of _row_of


def _row_of(data: bytes) -> tuple | None:
    """The INSERT arguments of one stream message, or None when it is not a well-formed row."""
    if len(data) > MAX_ROW_BYTES:
        return None
    try:
        v = json.loads(data)
        ts = int(v["ts_us"])
        status = int(v["status"])
        text = {k: v.get(k) for k in _TEXT_FIELDS}
    except (ValueError, TypeError, KeyError):
        return None
    if not all(t is None or isinstance(t, str) for t in text.values()) or not text["id"] or not text["method"]:
        return None
    path = (text["path"] or "")[:AUDIT_PATH_CHARS]
    return (ts, text["principal"], text["role"], text["via"], text["method"], path, status, text["client"],
            text["id"], text["node"])  # fmt: skip


class SharedAudit:
    """Shares `audit`'s rows through the stream and brings the other nodes' rows into its
    table. `start(js, stream_config)` once the bus is up, `stop()` before it closes."""

    def __init__(self, audit: AuditLog, node: str):
        self.audit = audit
        self.node = node
        self.db = audit.db
        self.published = 0  # rows this node shared since start
        self.applied = 0  # rows of other nodes (or earlier lives of this one) inserted here
        self.malformed = 0
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._js = None

    async def start(self, js, stream_config, wait: float = READY_WAIT_S) -> None:
        from ..streams import ensure_stream

        self._js = js
        self.db.ensure(_CURSOR_TABLE)
        self.audit.node = self.node
        self.db.cur().execute("UPDATE api_audit SET node = ? WHERE node IS NULL OR node = ''", [self.node])
        await ensure_stream(js, stream_config)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(), name="audit-follow"),
            loop.create_task(self._pump(), name="audit-pump"),
        ]
        self.audit.on_record = self._wake.set
        self._wake.set()  # rows left unshared by an earlier run (or made before the sharing)
        if not await wait_event(self._ready, wait):
            log.warning("the shared audit trail is still replaying after %.0f s: GET /api/v1/audit on this node "
                        "lacks some of the other nodes' rows until it is done", wait)  # fmt: skip

    async def stop(self) -> None:
        self.audit.on_record = None
        if self._tasks:
            await finish_within(self._drained(), STOP_WAIT_S, "sharing the last audit rows")
        await cancel_all_and_wait(self._tasks)
        self._tasks = []

    # -- this node's rows out -------------------------------------------------------------------

    def unshared(self) -> int:
        return self.db.cur().execute("SELECT count(*) FROM api_audit WHERE NOT shared").fetchone()[0]

    async def _drained(self) -> None:
        while self.unshared():
            self._wake.set()
            await asyncio.sleep(0.05)

    async def _pump(self) -> None:
        delay, failing = RETRY_S, False
        while True:
            await wait_event(self._wake, IDLE_RESCAN_S)
            self._wake.clear()
            try:
                while await self._publish_batch():
                    pass
                if failing:
                    log.info("audit rows are shared with the cluster again")
                delay, failing = RETRY_S, False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("audit rows not shared with the other nodes yet (%s: %s): they wait in this "
                                "node's table and go when the stream answers", type(exc).__name__, exc)  # fmt: skip
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                self._wake.set()

    async def _publish_batch(self) -> bool:
        """Publish up to PUBLISH_BATCH unshared rows, oldest first; True when there may be more."""
        rows = (
            self.db.cur()
            .execute(
                "SELECT epoch_us(ts), principal, role, via, method, path, status, client, id, node FROM api_audit "
                "WHERE NOT shared ORDER BY ts, id LIMIT ?",
                [PUBLISH_BATCH],
            )
            .fetchall()
        )
        if not rows:
            return False
        keys = ("ts_us", "principal", "role", "via", "method", "path", "status", "client", "id", "node")
        done: list[str] = []
        try:
            for row in rows:
                value = dict(zip(keys, row))
                await self._js.publish(
                    S.MIXER_AUDIT,
                    json.dumps(value, separators=(",", ":")).encode(),
                    timeout=PUBLISH_TIMEOUT_S,
                    stream=S.STREAM_AUDIT,
                    headers={"Nats-Msg-Id": value["id"]},
                )
                done.append(value["id"])
        finally:  # what JetStream acked is shared, even if a later row of the batch failed
            if done:
                self.db.cur().execute(
                    f"UPDATE api_audit SET shared = true WHERE id IN ({', '.join('?' * len(done))})", done
                )
                self.published += len(done)
        return len(rows) == PUBLISH_BATCH

    # -- the other nodes' rows in ---------------------------------------------------------------

    def cursor(self) -> int:
        row = self.db.cur().execute("SELECT seq FROM api_audit_cursor WHERE stream = ?", [S.STREAM_AUDIT]).fetchone()
        return int(row[0]) if row else 0

    async def _follow(self) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        failing = False
        while True:
            sub = None
            try:
                cursor = self.cursor()
                info = await self._js.stream_info(S.STREAM_AUDIT)
                last = info.state.last_seq
                if last < cursor:
                    log.warning("the shared audit stream ends at %d, before this node's cursor %d (recreated?): "
                                "reading it again from its start", last, cursor)  # fmt: skip
                    cursor = 0
                if cursor >= last:
                    self._ready.set()
                config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
                if cursor:
                    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=cursor + 1)
                sub = await self._js.subscribe(
                    S.MIXER_AUDIT, stream=S.STREAM_AUDIT, ordered_consumer=True, config=config
                )
                if failing:
                    log.info("reading the shared audit stream again from %d", cursor + 1)
                    failing = False
                batch: list[tuple[int, bytes]] = []
                while True:
                    try:
                        msg = await next_within(sub.messages, 0.05 if batch else 3600)
                    except TimeoutError:
                        msg = None
                    if msg is not None:
                        batch.append((msg.metadata.sequence.stream, msg.data))
                    if batch and (msg is None or len(batch) >= APPLY_BATCH):
                        self._apply(batch)
                        if batch[-1][0] >= last:
                            self._ready.set()
                        batch = []
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage, not every RETRY_S
                    log.warning("reading the shared audit stream failed (%s: %s): retrying every %.1f s",
                                type(exc).__name__, exc, RETRY_S)  # fmt: skip
                failing = True
                await asyncio.sleep(RETRY_S)
            finally:
                if sub is not None:
                    await finish_within(sub.unsubscribe(), STOP_WAIT_S, "stopping the audit stream's reader")

    def _apply(self, batch: list[tuple[int, bytes]]) -> None:
        """Insert the rows of `batch` this table lacks and move the cursor, in one transaction
        of three statements (the ids present, the new rows, the cursor) whatever its size."""
        rows = []
        for seq, data in batch:
            args = _row_of(data)
            if args is None:
                self.malformed += 1
                log.error("shared audit stream: message %d is not an audit row (%d bytes): skipped",
                          seq, len(data))  # fmt: skip
                continue
            rows.append(args)
        with self.db.transaction() as c:
            fresh: dict[str, tuple] = {}
            if rows:
                ids = list(dict.fromkeys(r[_ID] for r in rows))
                found = c.execute(f"SELECT id FROM api_audit WHERE id IN ({', '.join('?' * len(ids))})", ids)
                have = {row[0] for row in found.fetchall()}
                for r in rows:  # a row once: not if the table has it, nor twice from this batch
                    if r[_ID] not in have:
                        fresh.setdefault(r[_ID], r)
            if fresh:
                c.execute(_INSERT_HEAD + ", ".join([_INSERT_ROW] * len(fresh)), [v for r in fresh.values() for v in r])
            c.execute("INSERT OR REPLACE INTO api_audit_cursor VALUES (?, ?)", [S.STREAM_AUDIT, batch[-1][0]])
        self.applied += len(fresh)
