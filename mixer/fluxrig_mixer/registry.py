"""The registry: Racks, their status history and liveness, in one DuckDB file.

Job. Own `<state_dir>/mixer.duckdb`: the schema (append-only migrations), Racks (identity,
bus credentials, status, versions, apply state) and the status state machine as a table.

Contract.
- `Database` wraps the DuckDB file. The owning (event-loop) thread uses `db.conn`; any other
  thread takes `db.cursor()` (a thread-local cursor): DuckDB connections are not shared
  across threads.
- Every status change goes through `transition()`, an UPDATE joined with
  `rack_status_transitions`; zero rows means the move is illegal and IllegalTransition is
  raised. Each change is recorded in `rack_events`.
- Heartbeats are kept in memory (`heard()`): 500 Racks beating must not mean 500 writes per
  interval. `flush_liveness()` persists `last_seen` in one statement, and `sweep_silent()`
  moves Racks silent for `offline_after` intervals to `offline`.
- The owning thread reads Racks from an in-memory cache (every write refreshes the row it
  touched), so a heartbeat or an API list costs no query; other threads read the file.
- Secrets (bus passwords) never leave through `RackRow.public()`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

import duckdb

from fluxrig.agent import subjects as S
from fluxrig.errors import FluxError
from fluxrig.ids import uuid7_str

from .states import BUS_STATUSES, TRANSITIONS, IllegalTransition

__all__ = ["Database", "Registry", "RackRow", "RackNotFound", "NameConflict", "SCHEMA_VERSION"]

log = logging.getLogger("fluxrig.mixer.registry")

SCHEMA_VERSION = 1
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
            c.begin()
            for stmt in statements:
                c.execute(stmt)
            c.execute("INSERT INTO schema_version VALUES (?)", [version])
            c.commit()
        # The state machine is data: rewrite it every start so code and table never drift.
        c.begin()
        c.execute("DELETE FROM rack_status_transitions")
        c.executemany("INSERT INTO rack_status_transitions VALUES (?, ?, ?)", [(f, e, t) for (f, e), t in TRANSITIONS.items()])
        c.commit()

    def ensure(self, statements: list[str]) -> None:
        for stmt in statements:
            self.conn.execute(stmt)

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
    bus_password: str = field(repr=False)
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

    COLUMNS = (
        "rack_id, name, status, bus_user, bus_password, host, version, labels, first_seen, last_seen, "
        "status_since, passport_serial, passport_expires, scenario_version, target_version, apply_state, "
        "apply_reason, apply_at, stats"
    )

    @classmethod
    def from_row(cls, r) -> "RackRow":
        return cls(
            r[0], r[1], r[2], r[3], r[4], r[5] or "", r[6] or "", json.loads(r[7] or "{}"), r[8], r[9], r[10],
            r[11], r[12], r[13], r[14], r[15], r[16], r[17], json.loads(r[18] or "{}"),
        )

    def public(self) -> dict:
        """The API view: no bus password."""

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

    # -- reads ---------------------------------------------------------------------------------

    def _cur(self):
        return self.db.cur()

    def _owner(self) -> bool:
        return threading.get_ident() == self.db._owner

    def _cache(self) -> dict[str, RackRow]:
        if self._rows is None:
            self._rows, self._names = {}, {}
            for r in self.db.conn.execute(f"SELECT {RackRow.COLUMNS} FROM racks").fetchall():
                self._put(RackRow.from_row(r))
        return self._rows

    def _put(self, row: RackRow) -> None:
        old = self._rows.get(row.rack_id)
        if old is not None and self._names.get(old.name) == old.rack_id:
            del self._names[old.name]
        wall = self._heard_wall.get(row.rack_id)
        if wall is not None:  # heard since the last flush: memory is newer than the file
            row.last_seen = dt.datetime.fromtimestamp(wall, dt.timezone.utc)
        if row.rack_id in self._stats:
            row.stats = json.loads(self._stats[row.rack_id])
        self._rows[row.rack_id] = row
        if row.status != "removed":
            self._names[row.name] = row.rack_id

    def _refresh(self, rack_id: str) -> RackRow:
        r = self.db.conn.execute(f"SELECT {RackRow.COLUMNS} FROM racks WHERE rack_id = ?", [rack_id]).fetchone()
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
            if row is None or (row.status == "removed" and not include_removed):
                raise RackNotFound(key)
            return row
        rows = self._cur().execute(
            f"SELECT {RackRow.COLUMNS} FROM racks WHERE rack_id = ? OR (name = ? AND status <> 'removed') "
            "ORDER BY status = 'removed'",
            [key, key],
        ).fetchall()
        rows = [r for r in rows if include_removed or r[2] != "removed"]
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
            rows = [RackRow.from_row(r) for r in self._cur().execute(f"SELECT {RackRow.COLUMNS} FROM racks").fetchall()]
        if status:
            rows = [r for r in rows if r.status == status]
        elif not include_removed:
            rows = [r for r in rows if r.status != "removed"]
        return sorted(rows, key=lambda r: (r.name, r.rack_id))

    def events(self, rack_id: str, limit: int = 100) -> list[dict]:
        rows = self._cur().execute(
            "SELECT ts, event, from_status, to_status, detail FROM rack_events WHERE rack_id = ? ORDER BY ts DESC LIMIT ?",
            [rack_id, limit],
        ).fetchall()
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

    def create(self, name: str, host: str = "", version: str = "", labels: dict | None = None, adopted: bool = False) -> RackRow:
        """Register a new Rack (`pending`, or `active` when adopted) with fresh bus credentials.
        The name is made unique by a numeric suffix."""
        rack_id = uuid7_str()
        name = self.unique_name(name)
        event = "enroll_adopted" if adopted else "enroll"
        status = TRANSITIONS[("new", event)]
        labels = dict(list((labels or {}).items())[:MAX_LABELS])
        c = self.db.conn
        c.begin()
        try:
            c.execute(
                "INSERT INTO racks(rack_id, name, status, bus_user, bus_password, host, version, labels, "
                "first_seen, last_seen, status_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, now(), now(), now())",
                [rack_id, name, status, f"rack-{rack_id}", secrets.token_hex(32), host, version, json.dumps(labels)],
            )
            c.execute(
                "INSERT INTO rack_events VALUES (now(), ?, ?, 'new', ?, ?)", [rack_id, event, status, f"name={name}"]
            )
            c.commit()
        except Exception:
            c.rollback()
            raise
        self._heard[rack_id] = time.monotonic()
        return self._refresh(rack_id)

    def transition(self, key: str, event: str, detail: str = "") -> RackRow:
        """Apply `event` through the transition table; IllegalTransition when not allowed."""
        rack = self.get(key, include_removed=True)
        c = self.db.conn
        c.begin()
        try:
            row = c.execute(
                "UPDATE racks SET status = t.to_status, status_since = now() FROM rack_status_transitions t "
                "WHERE racks.rack_id = ? AND t.from_status = racks.status AND t.event = ? RETURNING racks.status",
                [rack.rack_id, event],
            ).fetchone()
            if row is None:
                c.rollback()
                raise IllegalTransition(rack.name, rack.status, event)
            c.execute(
                "INSERT INTO rack_events VALUES (now(), ?, ?, ?, ?, ?)", [rack.rack_id, event, rack.status, row[0], detail]
            )
            c.commit()
        except IllegalTransition:
            raise
        except Exception:
            c.rollback()
            raise
        if row[0] == "removed":
            self._heard.pop(rack.rack_id, None)
        log.info("rack %s (%s): %s -> %s [%s]", rack.name, rack.rack_id, rack.status, row[0], event)
        return self._refresh(rack.rack_id)

    def transition_many(self, rack_ids: list[str], event: str, detail: str = "") -> list[RackRow]:
        """Apply `event` to many Racks in ONE transaction (one fsync); Racks for which the
        move is not allowed (any more) are left alone. Returns the Racks that moved."""
        if not rack_ids:
            return []
        before = {}
        for rid in rack_ids:
            try:
                before[rid] = self.get(rid, include_removed=True).status
            except RackNotFound:
                pass
        ids = list(before)
        c = self.db.conn
        c.begin()
        try:
            moved = c.execute(
                "UPDATE racks SET status = t.to_status, status_since = now() FROM rack_status_transitions t "
                "WHERE racks.rack_id IN (SELECT unnest(?::VARCHAR[])) AND t.from_status = racks.status AND t.event = ? "
                "RETURNING racks.rack_id, racks.status",
                [ids, event],
            ).fetchall()
            if moved:
                c.execute(
                    "INSERT INTO rack_events SELECT now(), v.id, ?, v.f, v.t, ? FROM "
                    "(SELECT unnest(?::VARCHAR[]) AS id, unnest(?::VARCHAR[]) AS f, unnest(?::VARCHAR[]) AS t) v",
                    [event, detail, [m[0] for m in moved], [before[m[0]] for m in moved], [m[1] for m in moved]],
                )
            c.commit()
        except Exception:
            c.rollback()
            raise
        out = []
        for rid in ids:  # refresh every one: a refused move must drop any optimistic cache state
            out.append(self._refresh(rid))
        moved_ids = {m[0] for m in moved}
        if moved:
            log.info("%d rack(s) %s [%s]", len(moved), event, ", ".join(r.name for r in out if r.rack_id in moved_ids)[:300])
        return [r for r in out if r.rack_id in moved_ids]

    def rename(self, key: str, new_name: str) -> RackRow:
        rack = self.get(key)
        if not S.RACK_NAME_RE.match(new_name) or len(new_name) > S.MAX_RACK_NAME:
            raise FluxError(f"invalid rack name {new_name!r}: use a-z, 0-9, _ and - (at most {S.MAX_RACK_NAME})")
        if new_name == rack.name:
            return rack
        if self._name_taken(new_name, except_id=rack.rack_id):
            raise NameConflict(new_name)
        self.db.conn.execute("UPDATE racks SET name = ? WHERE rack_id = ?", [new_name, rack.rack_id])
        self.db.conn.execute(
            "INSERT INTO rack_events VALUES (now(), ?, 'rename', ?, ?, ?)",
            [rack.rack_id, rack.status, rack.status, f"{rack.name} -> {new_name}"],
        )
        return self._refresh(rack.rack_id)

    def next_serial(self, rack_id: str, expires_at: float) -> int:
        """Reserve the next passport serial (kept in memory until `record_passport`)."""
        row = self.get(rack_id, include_removed=True)
        return row.passport_serial + 1

    def record_passport(self, rack_id: str, serial: int, expires_at: float, data: bytes, target_version: str = "") -> None:
        """Store a signed passport, its serial and the scenario it carries: one transaction."""
        c = self.db.conn
        c.begin()
        try:
            c.execute(
                "UPDATE racks SET passport_serial = ?, passport_expires = ? WHERE rack_id = ?", [serial, expires_at, rack_id]
            )
            c.execute("INSERT OR REPLACE INTO passports VALUES (?, ?, ?)", [rack_id, serial, data])
            if target_version:
                c.execute(
                    "UPDATE racks SET target_version = ?, apply_state = CASE WHEN ? = scenario_version AND "
                    "apply_state = 'applied' THEN 'applied' ELSE 'applying' END, apply_reason = '' WHERE rack_id = ?",
                    [target_version, target_version, rack_id],
                )
            c.commit()
        except Exception:
            c.rollback()
            raise
        if target_version:
            self._refresh(rack_id)
        elif self._rows is not None and rack_id in self._rows:
            self._rows[rack_id].passport_serial = serial
            self._rows[rack_id].passport_expires = expires_at

    def set_target(self, rack_id: str, version: str) -> None:
        """The scenario version the Mixer has just sent this Rack (apply state: applying)."""
        self.db.conn.execute(
            "UPDATE racks SET target_version = ?, apply_state = CASE WHEN ? = scenario_version AND apply_state = 'applied' "
            "THEN 'applied' ELSE 'applying' END, apply_reason = '' WHERE rack_id = ?",
            [version, version, rack_id],
        )
        self._refresh(rack_id)

    def report_apply(self, rack_id: str, version: str, state: str, reason: str) -> bool:
        """Store what the Rack reports about its scenario; True when it changed something."""
        row = self.get(rack_id, include_removed=True)
        if (row.scenario_version, row.apply_state, row.apply_reason) == (version, state, reason):
            return False
        self.db.conn.execute(
            "UPDATE racks SET scenario_version = ?, apply_state = ?, apply_reason = ?, apply_at = now() WHERE rack_id = ?",
            [version, state, reason, rack_id],
        )
        self._refresh(rack_id)
        return True

    def update_info(self, rack_id: str, host: str | None = None, version: str | None = None, stats: dict | None = None) -> None:
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
            self._rows[rack_id].last_seen = dt.datetime.fromtimestamp(now, dt.timezone.utc)

    def flush_liveness(self) -> int:
        """Persist last_seen and stats of every Rack heard since the last flush (two statements)."""
        if not self._dirty:
            return 0
        ids = list(self._dirty)
        self._dirty.clear()
        seen = [(self._heard_wall[i], i) for i in ids if i in self._heard_wall]
        stats = [(self._stats.pop(i), i) for i in ids if i in self._stats]
        c = self.db.conn
        c.begin()
        try:
            # One statement per column over unnested lists: DuckDB's executemany runs one
            # statement per row, far too slow for a fleet beating every few seconds.
            if seen:
                c.execute(
                    "UPDATE racks SET last_seen = to_timestamp(v.t) FROM "
                    "(SELECT unnest(?::DOUBLE[]) AS t, unnest(?::VARCHAR[]) AS id) v WHERE racks.rack_id = v.id",
                    [[t for t, _i in seen], [i for _t, i in seen]],
                )
            if stats:
                c.execute(
                    "UPDATE racks SET stats = v.s FROM "
                    "(SELECT unnest(?::VARCHAR[]) AS s, unnest(?::VARCHAR[]) AS id) v WHERE racks.rack_id = v.id",
                    [[t for t, _i in stats], [i for _t, i in stats]],
                )
            c.commit()
        except Exception:
            c.rollback()
            raise
        for _t, i in seen:
            self._heard_wall.pop(i, None)
        return len(seen)

    def silent_racks(self, now: float | None = None) -> list[str]:
        """Ids of active Racks not heard for offline_after heartbeat intervals."""
        now = time.monotonic() if now is None else now
        limit = self.offline_after * self.heartbeat_interval
        out = []
        for rack_id in [r.rack_id for r in self.list(status="active")]:
            last = self._heard.get(rack_id)
            if last is None:
                # Not heard since this Mixer started: give it a full window from now.
                self._heard[rack_id] = now
                continue
            if now - last > limit:
                out.append(rack_id)
        return out

    def bus_credentials(self) -> list[tuple[str, str, str, str]]:
        """(rack name, bus user, password, status) of every Rack that has a bus user."""
        return [(r.name, r.bus_user, r.bus_password, r.status) for r in self.list(include_removed=True)
                if r.status in BUS_STATUSES]

    # -- settings ------------------------------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        row = self.db.conn.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.db.conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", [key, value])
