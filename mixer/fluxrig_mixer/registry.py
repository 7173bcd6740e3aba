"""The registry: the node's read cache of the Racks, their status history and liveness,
in one DuckDB file.

Job. Own `<state_dir>/mixer.duckdb`: the schema (append-only migrations), Racks (identity,
bus credentials, status, versions, apply state) and the status state machine as a table.
Since issue 14 the source of truth is the shared state in JetStream KV (rackstate.py): the
Mixer writes Racks only through `SharedRegistry`, which brings every acknowledged value here
with `apply()` (its own writes at once, other nodes' by a watch). This file is telemetry's
neighbour and a read cache, never the truth.

Contract.
- `Database` wraps the DuckDB file. The owning (event-loop) thread uses `db.conn`; any other
  thread takes `db.cursor()` (a thread-local cursor): DuckDB connections are not shared
  across threads.
- Every multi-statement write is one `transaction()` block: BEGIN, COMMIT when the block ends,
  ROLLBACK when it raises (the exception goes on). No other code calls begin/commit/rollback.
- `apply(records)` upserts KV values newer than the cached row (by KV revision, column
  kv_revision) in one transaction and appends each record's event to `rack_events`.
- `create()`/`transition()` write the file directly (an UPDATE joined with
  `rack_status_transitions`: zero rows means IllegalTransition). They remain for unit tests
  of the file and of bus-less API code; the Mixer process never calls them.
- Heartbeats are kept in memory (`heard()`, `heard_at()` for another node's): 500 Racks
  beating must not mean 500 writes per interval. `take_liveness()` + `write_liveness()`
  persist last_seen/stats into table `rack_liveness` (apart from `racks`, so the sweeper's
  writer thread never meets the loop's upserts), and `silent_racks()` names Racks silent for
  `offline_after` intervals.
- The owning thread reads Racks from an in-memory cache, so a heartbeat or an API list costs
  no query; other threads read the file.
- No bus secret is stored: `bus_user` is the Rack's NKey public key (it generated the key pair;
  the column `bus_password` of schema 1 is blanked by migration 2 and never read). A removed
  Rack's key goes to `denied_identities` (from the shared state's `nkey.<key>` claim), so it
  can neither connect (it leaves the users list) nor enroll again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb

from fluxrig.errors import FluxError
from fluxrig.ids import uuid7_str
from fluxrig.wire import subjects as S
from fluxrig.wire.vocab import RackStatus

from .states import BUS_STATUSES, TRANSITIONS, IllegalTransition

__all__ = [
    "Database",
    "Registry",
    "RackRow",
    "RackNotFound",
    "NameConflict",
    "InvalidRackName",
    "SCHEMA_VERSION",
    "transaction",
    "MAX_LABELS",
    "MAX_STATS_BYTES",
]

log = logging.getLogger("fluxrig.mixer.registry")

SCHEMA_VERSION = 3
MAX_LABELS = 64

_MIGRATIONS: list[list[str]] = [
    [  # 1: registry core
        "CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)",
        """CREATE TABLE IF NOT EXISTS rack_status_transitions(
               from_status VARCHAR NOT NULL, event VARCHAR NOT NULL, to_status VARCHAR NOT NULL,
               PRIMARY KEY(from_status, event))""",
        """CREATE TABLE IF NOT EXISTS racks(
               rack_id VARCHAR PRIMARY KEY,
               name VARCHAR NOT NULL,
               status VARCHAR NOT NULL,
               bus_user VARCHAR NOT NULL,
               bus_password VARCHAR NOT NULL,
               host VARCHAR, version VARCHAR, labels VARCHAR,
               first_seen TIMESTAMPTZ, last_seen TIMESTAMPTZ, status_since TIMESTAMPTZ,
               passport_serial BIGINT NOT NULL DEFAULT 0,
               passport_expires DOUBLE NOT NULL DEFAULT 0,
               scenario_version VARCHAR NOT NULL DEFAULT '',
               target_version VARCHAR NOT NULL DEFAULT '',
               apply_state VARCHAR NOT NULL DEFAULT 'none',
               apply_reason VARCHAR NOT NULL DEFAULT '',
               apply_at TIMESTAMPTZ,
               stats VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS rack_events(
               ts TIMESTAMPTZ NOT NULL, rack_id VARCHAR NOT NULL, event VARCHAR NOT NULL,
               from_status VARCHAR, to_status VARCHAR, detail VARCHAR)""",
        "CREATE TABLE IF NOT EXISTS settings(key VARCHAR PRIMARY KEY, value VARCHAR)",
        "CREATE TABLE IF NOT EXISTS passports(rack_id VARCHAR PRIMARY KEY, serial BIGINT, data BLOB)",
    ],
    [  # 2: NKey identities (issue 12): no bus secret is stored any more; removed identities denied
        "UPDATE racks SET bus_password = ''",
        """CREATE TABLE IF NOT EXISTS denied_identities(
               nkey VARCHAR PRIMARY KEY, rack_id VARCHAR NOT NULL, name VARCHAR NOT NULL,
               denied_at TIMESTAMPTZ NOT NULL, reason VARCHAR)""",
    ],
    [  # 3: the file is a read cache of the shared state (issue 14): the KV revision of each row
        "ALTER TABLE racks ADD COLUMN IF NOT EXISTS kv_revision BIGINT DEFAULT 0",
        # Liveness apart from the rows the shared state rewrites: the sweeper's writer thread
        # and the loop's cache updates never touch the same row (DuckDB would refuse one).
        """CREATE TABLE IF NOT EXISTS rack_liveness(
               rack_id VARCHAR PRIMARY KEY, last_seen TIMESTAMPTZ, stats VARCHAR)""",
    ],
]


class RackNotFound(FluxError):
    """No Rack has this id or name; `key` is what was looked up."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(f"no rack with id or name {key!r}")


class NameConflict(FluxError):
    """Another (not removed) Rack already has this name; `name` is the name."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"rack name {name!r} is taken by another rack")


class InvalidRackName(FluxError):
    """A new Rack name the subject rules refuse; `field` is the request field that carried it,
    `name` the name."""

    def __init__(self, name: str, field: str = "name"):
        self.name = name
        self.field = field
        super().__init__(
            f"{field}: invalid rack name {name!r}: use 1-{S.MAX_RACK_NAME} of a-z, 0-9, _ and - "
            "(it becomes part of the Rack's bus subjects)"
        )


@contextlib.contextmanager
def transaction(cur: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on `cur` (a connection or a cursor): BEGIN, then COMMIT when the block
    ends, ROLLBACK when it raises; the exception goes on to the caller."""
    cur.begin()
    try:
        yield cur
    except BaseException:
        cur.rollback()
        raise
    cur.commit()


class Database:
    """The Mixer's DuckDB file plus migrations. Extra migrations (scenarios, telemetry) are
    registered by their modules with `ensure(statements)` (idempotent DDL)."""

    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.conn = duckdb.connect(path)
        self._owner = threading.get_ident()
        self._local = threading.local()
        self._cursors: list = []
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        c = self.conn
        c.execute("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)")
        row = c.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for version, statements in enumerate(_MIGRATIONS, start=1):
            if version <= current:
                continue
            with transaction(c):
                for stmt in statements:
                    c.execute(stmt)
                c.execute("INSERT INTO schema_version VALUES (?)", [version])
        # The state machine is data: rewrite it every start so code and table never drift.
        with transaction(c):
            c.execute("DELETE FROM rack_status_transitions")
            c.executemany(
                "INSERT INTO rack_status_transitions VALUES (?, ?, ?)",
                [(f, e, t) for (f, e), t in TRANSITIONS.items()],
            )

    def ensure(self, statements: list[str]) -> None:
        for stmt in statements:
            self.conn.execute(stmt)

    def transaction(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """`transaction()` on this thread's handle (`cur()`): `with db.transaction() as c: ...`."""
        return transaction(self.cur())

    def cur(self):
        """The owner thread's connection, or this thread's own cursor."""
        return self.conn if threading.get_ident() == self._owner else self.cursor()

    def cursor(self):
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self.conn.cursor()
            self._local.cursor = cur
            with self._lock:
                self._cursors.append(cur)
        return cur

    def close(self) -> None:
        with self._lock:
            for cur in self._cursors:
                try:
                    cur.close()
                except Exception:
                    pass
            self._cursors.clear()
        self.conn.close()


@dataclass
class RackRow:
    rack_id: str
    name: str
    status: str
    bus_user: str
    host: str = ""
    version: str = ""
    labels: dict = field(default_factory=dict)
    first_seen: object = None
    last_seen: object = None
    status_since: object = None
    passport_serial: int = 0
    passport_expires: float = 0.0
    scenario_version: str = ""
    target_version: str = ""
    apply_state: str = "none"
    apply_reason: str = ""
    apply_at: object = None
    stats: dict = field(default_factory=dict)
    revision: int = 0  # the KV revision this row was read at (0: never written to the KV)

    COLUMNS = (
        "r.rack_id, r.name, r.status, r.bus_user, r.host, r.version, r.labels, r.first_seen, "
        "coalesce(l.last_seen, r.last_seen), r.status_since, r.passport_serial, r.passport_expires, "
        "r.scenario_version, r.target_version, r.apply_state, r.apply_reason, r.apply_at, "
        "coalesce(l.stats, r.stats), r.kv_revision"
    )
    FROM = "racks r LEFT JOIN rack_liveness l ON l.rack_id = r.rack_id"
    # What the shared state holds of a Rack (rackstate.py); last_seen and stats are liveness,
    # shared between nodes on the bus, not written to the KV on every heartbeat.
    RECORD_TIMES = ("first_seen", "status_since", "apply_at")
    RECORD_FIELDS = (
        "name", "status", "bus_user", "host", "version", "labels", "passport_serial", "passport_expires",
        "scenario_version", "target_version", "apply_state", "apply_reason",
    )  # fmt: skip

    def to_record(self, event: dict | None = None) -> dict:
        """The KV value of this Rack; `event` is the change that produced it (its history)."""
        rec = {"id": self.rack_id}
        for f in self.RECORD_FIELDS:
            rec[f] = getattr(self, f)
        for f in self.RECORD_TIMES:
            v = getattr(self, f)
            rec[f] = v.timestamp() if v is not None else None
        rec["event"] = event
        return rec

    @classmethod
    def from_record(cls, rec: dict, revision: int, live: RackRow | None = None) -> RackRow:
        """A row from a KV value; liveness (last_seen, stats) from `live`, the cached row."""
        kw = {f: rec[f] for f in cls.RECORD_FIELDS if f in rec}
        for f in cls.RECORD_TIMES:
            v = rec.get(f)
            kw[f] = dt.datetime.fromtimestamp(v, dt.UTC) if v is not None else None
        row = cls(rec["id"], **kw, revision=revision)
        if live is not None:
            row.last_seen, row.stats = live.last_seen, live.stats
        return row

    @classmethod
    def from_row(cls, r) -> RackRow:
        return cls(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4] or "",
            r[5] or "",
            json.loads(r[6] or "{}"),
            r[7],
            r[8],
            r[9],
            r[10],
            r[11],
            r[12],
            r[13],
            r[14],
            r[15],
            r[16],
            json.loads(r[17] or "{}"),
            r[18] or 0,
        )

    def public(self) -> dict:
        """The API view (the bus identity is a public key)."""

        def ts(v):
            return v.isoformat() if v is not None else None

        return {
            "id": self.rack_id,
            "name": self.name,
            "status": self.status,
            "bus_user": self.bus_user,
            "host": self.host,
            "version": self.version,
            "labels": self.labels,
            "first_seen": ts(self.first_seen),
            "last_seen": ts(self.last_seen),
            "status_since": ts(self.status_since),
            "passport_serial": self.passport_serial,
            "scenario": {
                "version": self.scenario_version,
                "target": self.target_version,
                "apply_state": self.apply_state,
                "reason": self.apply_reason,
                "at": ts(self.apply_at),
            },
            "stats": self.stats,
        }


# Heartbeat stats kept per Rack (memory and the racks.stats column).
MAX_STATS_BYTES = 8192


def _bounded_stats_json(stats: dict, limit: int = MAX_STATS_BYTES) -> str:
    """JSON of `stats`, at most `limit` bytes and always valid JSON: whole top-level sections
    are kept in order while they fit (a Rack puts its small, important ones first, e.g. the
    kill switch state), the others are named under "_truncated". Cutting the text instead
    would leave JSON that no longer parses."""
    text = json.dumps(stats, default=str)
    if len(text) <= limit:
        return text
    names = [str(k)[:64] for k in stats][:50]  # what may be listed as dropped: bounded
    kept: dict = {}
    dropped: list = []
    size = len(json.dumps({"_truncated": names}))  # room for the list, whatever ends up in it
    for key, value in stats.items():
        part = json.dumps({key: value}, default=str)
        if size + len(part) <= limit:
            kept[key] = value
            size += len(part)
        elif len(dropped) < len(names):
            dropped.append(str(key)[:64])
    kept["_truncated"] = dropped
    text = json.dumps(kept, default=str)
    return text if len(text) <= limit else '{"_truncated": ["*"]}'


class Registry:
    """Racks in the DuckDB file. Methods run on the owning thread unless they say otherwise."""

    def __init__(self, db: Database, heartbeat_interval: float = 30.0, offline_after: int = 3):
        self.db = db
        self.heartbeat_interval = heartbeat_interval
        self.offline_after = offline_after
        self._heard: dict[str, float] = {}  # rack_id -> monotonic time of the last heartbeat
        self._heard_wall: dict[str, float] = {}  # rack_id -> wall time (to persist)
        self._dirty: set[str] = set()
        self._stats: dict[str, str] = {}  # rack_id -> JSON stats not yet persisted
        self._rows: dict[str, RackRow] | None = None  # owner-thread cache, by id
        self._names: dict[str, str] = {}  # name -> id of the Rack (not removed) holding it
        self._denied: set[str] | None = None  # denied NKeys (owner-thread cache of the table)
        # The file's writer thread (apply, passports): queue, lock, busy flag, executor.
        self._wq: list = []
        self._wlock = threading.Lock()
        self._wbusy = False
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._wfuture = None

    # -- reads ---------------------------------------------------------------------------------

    def _cur(self):
        return self.db.cur()

    def _owner(self) -> bool:
        return threading.get_ident() == self.db._owner

    def _cache(self) -> dict[str, RackRow]:
        if self._rows is None:
            self._rows, self._names = {}, {}
            for r in self.db.conn.execute(f"SELECT {RackRow.COLUMNS} FROM {RackRow.FROM}").fetchall():
                self._put(RackRow.from_row(r))
        return self._rows

    def _put(self, row: RackRow) -> None:
        old = self._rows.get(row.rack_id)
        if old is not None and self._names.get(old.name) == old.rack_id:
            del self._names[old.name]
        wall = self._heard_wall.get(row.rack_id)
        if wall is not None:  # heard since the last flush: memory is newer than the file
            row.last_seen = dt.datetime.fromtimestamp(wall, dt.UTC)
        if row.rack_id in self._stats:
            row.stats = json.loads(self._stats[row.rack_id])
        self._rows[row.rack_id] = row
        if row.status != RackStatus.REMOVED:
            self._names[row.name] = row.rack_id

    def _refresh(self, rack_id: str) -> RackRow:
        r = self.db.conn.execute(
            f"SELECT {RackRow.COLUMNS} FROM {RackRow.FROM} WHERE r.rack_id = ?", [rack_id]
        ).fetchone()
        if r is None:
            raise RackNotFound(rack_id)
        row = RackRow.from_row(r)
        if self._rows is not None:
            self._put(row)
        return row

    def get(self, key: str, include_removed: bool = False) -> RackRow:
        """By id or name; a name resolves to the Rack that is not removed. RackNotFound."""
        if self._owner():
            rows = self._cache()
            row = rows.get(key)
            if row is None and key in self._names:
                row = rows[self._names[key]]
            if row is None or (row.status == RackStatus.REMOVED and not include_removed):
                raise RackNotFound(key)
            return row
        rows = (
            self._cur()
            .execute(
                f"SELECT {RackRow.COLUMNS} FROM {RackRow.FROM} WHERE r.rack_id = ? OR (r.name = ? AND r.status <> 'removed') "
                "ORDER BY r.status = 'removed'",
                [key, key],
            )
            .fetchall()
        )
        rows = [r for r in rows if include_removed or r[2] != RackStatus.REMOVED]
        if not rows:
            raise RackNotFound(key)
        return RackRow.from_row(rows[0])

    def find(self, key: str) -> RackRow | None:
        try:
            return self.get(key)
        except RackNotFound:
            return None

    def list(self, status: str | None = None, include_removed: bool = False) -> list[RackRow]:
        if self._owner():
            rows = self._cache().values()
        else:
            rows = [
                RackRow.from_row(r)
                for r in self._cur().execute(f"SELECT {RackRow.COLUMNS} FROM {RackRow.FROM}").fetchall()
            ]
        if status:
            rows = [r for r in rows if r.status == status]
        elif not include_removed:
            rows = [r for r in rows if r.status != RackStatus.REMOVED]
        return sorted(rows, key=lambda r: (r.name, r.rack_id))

    def events(self, rack_id: str, limit: int = 100) -> list[dict]:
        rows = (
            self._cur()
            .execute(
                "SELECT ts, event, from_status, to_status, detail FROM rack_events WHERE rack_id = ? ORDER BY ts DESC LIMIT ?",
                [rack_id, limit],
            )
            .fetchall()
        )
        return [{"ts": r[0].isoformat(), "event": r[1], "from": r[2], "to": r[3], "detail": r[4]} for r in rows]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.list(include_removed=True):
            out[r.status] = out.get(r.status, 0) + 1
        return out

    # -- writes ----------------------------------------------------------------------------------

    def _name_taken(self, name: str, except_id: str | None = None) -> bool:
        row = self.db.conn.execute(
            "SELECT count(*) FROM racks WHERE name = ? AND status <> 'removed' AND rack_id <> ?",
            [name, except_id or ""],
        ).fetchone()
        return row[0] > 0

    def unique_name(self, wanted: str) -> str:
        base = S.sanitize_rack_name(wanted)
        name, n = base, 1
        while self._name_taken(name):
            n += 1
            suffix = f"-{n}"
            name = base[: S.MAX_RACK_NAME - len(suffix)] + suffix
        return name

    def create(
        self,
        name: str,
        host: str = "",
        version: str = "",
        labels: dict | None = None,
        adopted: bool = False,
        *,
        nkey: str,
        detail: str = "",
    ) -> RackRow:
        """Register a new Rack (`pending`, or `active` when adopted) whose bus identity is the
        NKey public key it generated. The name is made unique by a numeric suffix. FluxError
        when the key is denied (removed) or already held by another Rack."""
        if self.is_denied(nkey):
            raise FluxError("this bus identity was removed; it cannot enroll again")
        if self.find_by_nkey(nkey) is not None:
            raise FluxError("this bus identity already belongs to another rack")
        rack_id = uuid7_str()
        name = self.unique_name(name)
        event = "enroll_adopted" if adopted else "enroll"
        status = TRANSITIONS[("new", event)]
        labels = dict(list((labels or {}).items())[:MAX_LABELS])
        with transaction(self.db.conn) as c:
            c.execute(
                "INSERT INTO racks(rack_id, name, status, bus_user, bus_password, host, version, labels, "
                "first_seen, last_seen, status_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, now(), now(), now())",
                [rack_id, name, status, nkey, "", host, version, json.dumps(labels)],
            )
            c.execute(
                "INSERT INTO rack_events VALUES (now(), ?, ?, 'new', ?, ?)",
                [rack_id, event, status, f"name={name}" + (f" {detail}" if detail else "")],
            )
        self._heard[rack_id] = time.monotonic()
        return self._refresh(rack_id)

    def transition(self, key: str, event: str, detail: str = "") -> RackRow:
        """Apply `event` through the transition table; IllegalTransition when not allowed."""
        rack = self.get(key, include_removed=True)
        with transaction(self.db.conn) as c:
            row = c.execute(
                "UPDATE racks SET status = t.to_status, status_since = now() FROM rack_status_transitions t "
                "WHERE racks.rack_id = ? AND t.from_status = racks.status AND t.event = ? RETURNING racks.status",
                [rack.rack_id, event],
            ).fetchone()
            if row is None:  # zero rows: the table has no such move (rolled back on the way out)
                raise IllegalTransition(rack.name, rack.status, event)
            c.execute(
                "INSERT INTO rack_events VALUES (now(), ?, ?, ?, ?, ?)",
                [rack.rack_id, event, rack.status, row[0], detail],
            )
            if row[0] == RackStatus.REMOVED and rack.bus_user:
                c.execute(
                    "INSERT OR REPLACE INTO denied_identities VALUES (?, ?, ?, now(), ?)",
                    [rack.bus_user, rack.rack_id, rack.name, detail or event],
                )
        if row[0] == RackStatus.REMOVED:
            self._heard.pop(rack.rack_id, None)
            self._denied = None
        log.info("rack %s (%s): %s -> %s [%s]", rack.name, rack.rack_id, rack.status, row[0], event)
        return self._refresh(rack.rack_id)

    # -- the read cache of the shared state (rackstate.py) ----------------------------------------

    _UPSERT = (
        "INSERT INTO racks(rack_id, name, status, bus_user, bus_password, host, version, labels, first_seen, "
        "status_since, passport_serial, passport_expires, scenario_version, target_version, apply_state, "
        "apply_reason, apply_at, kv_revision) VALUES (?, ?, ?, ?, '', ?, ?, ?, to_timestamp(?), to_timestamp(?), "
        "?, ?, ?, ?, ?, ?, to_timestamp(?), ?) ON CONFLICT (rack_id) DO UPDATE SET name = excluded.name, "
        "status = excluded.status, bus_user = excluded.bus_user, host = excluded.host, version = excluded.version, "
        "labels = excluded.labels, first_seen = excluded.first_seen, status_since = excluded.status_since, "
        "passport_serial = excluded.passport_serial, passport_expires = excluded.passport_expires, "
        "scenario_version = excluded.scenario_version, target_version = excluded.target_version, "
        "apply_state = excluded.apply_state, apply_reason = excluded.apply_reason, apply_at = excluded.apply_at, "
        "kv_revision = excluded.kv_revision"
    )

    def apply(self, changes: list[tuple[dict, int]]) -> list[tuple[RackRow | None, RackRow]]:
        """Bring KV values (record, revision) into the cache and the file, in ONE transaction;
        a value not newer than the cached row is skipped (a node's own write comes back by the
        watch). Each record's `event` goes to rack_events. Returns (old, new) per Rack changed."""
        cache = self._cache()
        latest: dict[str, tuple[dict, int]] = {}
        events = []
        for rec, revision in sorted(changes, key=lambda c: c[1]):
            old = cache.get(rec["id"])
            if old is not None and old.revision >= revision:
                continue
            latest[rec["id"]] = (rec, revision)
            ev = rec.get("event")
            if ev:
                events.append((ev.get("ts") or time.time(), rec["id"], ev.get("event", ""), ev.get("from"),
                               ev.get("to"), ev.get("detail", "")))  # fmt: skip
        if not latest:
            return []
        out = [(cache.get(i), RackRow.from_record(rec, rev, cache.get(i))) for i, (rec, rev) in latest.items()]
        ts = lambda v: v.timestamp() if v is not None else None  # noqa: E731
        rows = [
            [row.rack_id, row.name, row.status, row.bus_user, row.host, row.version, json.dumps(row.labels),
             ts(row.first_seen), ts(row.status_since), row.passport_serial, row.passport_expires,
             row.scenario_version, row.target_version, row.apply_state, row.apply_reason, ts(row.apply_at),
             row.revision]
            for _old, row in out
        ]  # fmt: skip
        self._persist(rows, events)
        for old, row in out:
            self._put(row)
            if row.status == RackStatus.REMOVED:
                self._heard.pop(row.rack_id, None)
            elif old is None and row.rack_id not in self._heard:
                self._heard[row.rack_id] = time.monotonic()  # a full window from now
        return out

    def _persist(self, rows: list, events: list, passports: list | None = None) -> None:
        """Write cache rows to the file: in ONE background writer thread when an event loop
        runs (a DuckDB upsert took 27 ms on the loop under load: 200 Racks heard again held
        heartbeats for seconds), batched with whatever else is queued; else at once."""
        with self._wlock:
            self._wq.append((rows, events, passports or []))
            if self._wbusy:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._wbusy = loop is not None
        if loop is None:
            self._drain_writes()
            return
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry-writer")
        self._wfuture = loop.run_in_executor(self._writer, self._drain_writes)

    def _drain_writes(self) -> None:
        while True:
            with self._wlock:
                batch, self._wq = self._wq, []
                if not batch:
                    self._wbusy = False
                    return
            try:
                with transaction(self.db.cur()) as c:
                    for rows, events, passports in batch:
                        for r in rows:
                            c.execute(self._UPSERT, r)
                        if events:
                            c.executemany("INSERT INTO rack_events VALUES (to_timestamp(?), ?, ?, ?, ?, ?)", events)
                        for p in passports:
                            c.execute("INSERT OR REPLACE INTO passports VALUES (?, ?, ?)", p)
            except Exception as exc:  # the cache holds it; the next start replays the KV
                log.error("registry file not written (%d batch(es)): %s", len(batch), exc)

    def store_passport(self, rack_id: str, serial: int, data: bytes) -> None:
        """The passport last signed, in the file (a restarted node answers from it)."""
        self._persist([], [], [(rack_id, serial, data)])

    def close_writer(self, timeout: float = 10.0) -> None:
        """Wait for queued file writes (before the Database closes)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        with self._wlock:
            pending = bool(self._wq)
            self._wbusy = False
        if pending:
            self._drain_writes()

    def apply_denied(self, entries: list[dict]) -> int:
        """Denied identities from the shared state ({"nkey", "rack", "name", "at", "reason"})."""
        new = [e for e in entries if not self.is_denied(e["nkey"])]
        if new:
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO denied_identities VALUES (?, ?, ?, to_timestamp(?), ?)",
                [(e["nkey"], e.get("rack", ""), e.get("name", ""), e.get("at") or time.time(), e.get("reason", ""))
                 for e in new],
            )  # fmt: skip
            self._denied = None
        return len(new)

    def heard_at(self, rack_id: str, wall: float) -> None:
        """Another Mixer node heard this Rack at wall time `wall` (liveness shared on the bus)."""
        now_wall, now_mono = time.time(), time.monotonic()
        mono = now_mono - max(0.0, now_wall - wall)
        if mono > self._heard.get(rack_id, 0.0):
            self._heard[rack_id] = mono
            if wall > self._heard_wall.get(rack_id, 0.0):
                self._heard_wall[rack_id] = wall
                self._dirty.add(rack_id)
            if self._rows is not None and rack_id in self._rows:
                self._rows[rack_id].last_seen = dt.datetime.fromtimestamp(wall, dt.UTC)

    def record_event(self, rack: RackRow, event: str, detail: str = "") -> None:
        """An audit row in rack_events that moves no status (a kill switch command sent)."""
        self.db.conn.execute(
            "INSERT INTO rack_events VALUES (now(), ?, ?, ?, ?, ?)",
            [rack.rack_id, event, rack.status, rack.status, detail],
        )

    def update_info(
        self, rack_id: str, host: str | None = None, version: str | None = None, stats: dict | None = None
    ) -> None:
        """Host and version are written at once; stats (every heartbeat) are kept in memory and
        persisted by flush_liveness."""
        if stats is not None:
            text = _bounded_stats_json(stats)
            self._stats[rack_id] = text
            self._dirty.add(rack_id)
            if self._rows is not None and rack_id in self._rows:
                self._rows[rack_id].stats = json.loads(text)
        sets, args = [], []
        for col, value in (("host", host), ("version", version)):
            if value is not None:
                sets.append(f"{col} = ?")
                args.append(value)
        if sets:
            self.db.conn.execute(f"UPDATE racks SET {', '.join(sets)} WHERE rack_id = ?", [*args, rack_id])
            self._refresh(rack_id)

    # -- liveness ----------------------------------------------------------------------------------

    def heard(self, rack_id: str) -> None:
        """A heartbeat arrived (memory only; see flush_liveness)."""
        now = time.time()
        self._heard[rack_id] = time.monotonic()
        self._heard_wall[rack_id] = now
        self._dirty.add(rack_id)
        if self._rows is not None and rack_id in self._rows:
            self._rows[rack_id].last_seen = dt.datetime.fromtimestamp(now, dt.UTC)

    def take_liveness(self) -> tuple[list[tuple[float, str]], list[tuple[str, str]]]:
        """(last_seen, stats) of every Rack heard since the last call, for write_liveness."""
        if not self._dirty:
            return [], []
        ids = list(self._dirty)
        self._dirty.clear()
        seen = [(self._heard_wall.pop(i), i) for i in ids if i in self._heard_wall]
        stats = [(self._stats.pop(i), i) for i in ids if i in self._stats]
        return seen, stats

    def write_liveness(self, seen: list[tuple[float, str]], stats: list[tuple[str, str]]) -> None:
        """Persist what take_liveness gave, on ANY thread (the sweeper runs it off the event
        loop: a fleet's liveness in DuckDB held the loop 265 ms at 0.2 s heartbeats, issue 13).
        Table rack_liveness only, so it never meets the loop's writes to `racks`."""
        if not seen and not stats:
            return
        # One statement per column over unnested lists: DuckDB's executemany runs one
        # statement per row, far too slow for a fleet beating every few seconds.
        with transaction(self.db.cur()) as c:
            ids = sorted({i for _t, i in seen} | {i for _s, i in stats})
            c.execute("INSERT INTO rack_liveness(rack_id) SELECT unnest(?::VARCHAR[]) ON CONFLICT DO NOTHING", [ids])
            if seen:
                c.execute(
                    "UPDATE rack_liveness SET last_seen = to_timestamp(v.t) FROM "
                    "(SELECT unnest(?::DOUBLE[]) AS t, unnest(?::VARCHAR[]) AS id) v WHERE rack_liveness.rack_id = v.id",
                    [[t for t, _i in seen], [i for _t, i in seen]],
                )
            if stats:
                c.execute(
                    "UPDATE rack_liveness SET stats = v.s FROM "
                    "(SELECT unnest(?::VARCHAR[]) AS s, unnest(?::VARCHAR[]) AS id) v WHERE rack_liveness.rack_id = v.id",
                    [[t for t, _i in stats], [i for _t, i in stats]],
                )

    def flush_liveness(self) -> int:
        """take_liveness + write_liveness on this thread (a stopping Mixer, unit tests)."""
        seen, stats = self.take_liveness()
        self.write_liveness(seen, stats)
        return len(seen)

    def silent_racks(self, now: float | None = None) -> list[str]:
        """Ids of active Racks not heard for offline_after heartbeat intervals."""
        now = time.monotonic() if now is None else now
        limit = self.offline_after * self.heartbeat_interval
        out = []
        for rack_id in [r.rack_id for r in self.list(status=RackStatus.ACTIVE)]:
            last = self._heard.get(rack_id)
            if last is None:
                # Not heard since this Mixer started: give it a full window from now.
                self._heard[rack_id] = now
                continue
            if now - last > limit:
                out.append(rack_id)
        return out

    def bus_identities(self) -> list[tuple[str, str, str]]:
        """(rack name, NKey public key, status) of every Rack allowed on the bus."""
        return [
            (r.name, r.bus_user, r.status)
            for r in self.list(include_removed=True)
            if r.status in BUS_STATUSES and r.bus_user.startswith("U") and not self.is_denied(r.bus_user)
        ]

    # -- identities ------------------------------------------------------------------------------

    def find_by_nkey(self, nkey: str) -> RackRow | None:
        """The Rack (not removed) whose bus identity is `nkey`, or None."""
        for r in self.list():
            if r.bus_user == nkey:
                return r
        return None

    def is_denied(self, nkey: str) -> bool:
        if self._owner():  # a set, not a query per Rack: bus_identities() asks for every one
            if self._denied is None:
                self._denied = {r[0] for r in self.db.conn.execute("SELECT nkey FROM denied_identities").fetchall()}
            return nkey in self._denied
        row = self._cur().execute("SELECT count(*) FROM denied_identities WHERE nkey = ?", [nkey]).fetchone()
        return row[0] > 0

    def denied(self) -> list[dict]:
        rows = (
            self._cur()
            .execute("SELECT nkey, rack_id, name, denied_at, reason FROM denied_identities ORDER BY denied_at")
            .fetchall()
        )
        return [{"nkey": r[0], "rack_id": r[1], "name": r[2], "at": r[3].isoformat(), "reason": r[4]} for r in rows]

    def name_released_at(self, name: str) -> dt.datetime | None:
        """When a Rack of this name was last removed (a later Rack with the name is another
        identity: nothing addressed to the old one may reach it), or None."""
        row = (
            self._cur()
            .execute("SELECT max(status_since) FROM racks WHERE name = ? AND status = 'removed'", [name])
            .fetchone()
        )
        return row[0] if row else None

    # -- settings ------------------------------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        row = self.db.conn.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.db.conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", [key, value])
