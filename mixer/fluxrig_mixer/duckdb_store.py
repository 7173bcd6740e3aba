"""Telemetry in the Mixer's own DuckDB file (the Standard tier's store; telemetry_store contract).

Job. Store fetched NDJSON parts into `telemetry_logs|metrics|traces` and the (rack, src) ->
incarnation table `telemetry_sources`, in ONE transaction per write, and let DuckDB's own JSON
reader do the parsing:

    INSERT INTO telemetry_<kind> SELECT m.rack, j.id + m.base, <clamped time>, ...
    FROM read_json([<spool files>], columns=..., filename=true) j JOIN (<file -> rack, base, recv>) m

Bulk and in C++, never row by row in Python. The parts of a write go to one spool file per kind (RAM-backed
/dev/shm when present) that lives only for the duration of one write.

Exactly once: the primary key (rack, id). A write that hits it (a re-send, or a fetch replayed
after a crash between commit and ack) is redone with INSERT OR IGNORE, so each record is stored
once and the duplicates are counted. Plain INSERT first because OR IGNORE costs ~40 % more.

Failures. `classify` calls an error DATA only when DuckDB says the input is wrong (invalid
input, conversion, out of range): those payloads never load. Everything else (I/O, a commit
that failed on a full disk, a catalog error) is UNAVAILABLE: the ingest acks nothing and
retries with back-off; DuckDB rolls the transaction back, so a retry stores each row once.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
import threading

import duckdb

from .registry import transaction
from .telemetry_store import STAGE_COLUMNS, TIME_COLUMN, Clamp, Failure, Part, Source

__all__ = [
    "DuckDBStore",
    "TELEMETRY_DDL",
    "TELEMETRY_MIGRATIONS",
    "SOURCES_INSERT",
    "ensure_tables",
    "load_ndjson",
    "spool_root",
    "MAX_OBJECT_BYTES",
    "select_parts",
    "Spool",
]

# Largest single NDJSON line read_json accepts (a Rack's batch line is far smaller).
MAX_OBJECT_BYTES = 16 * 1024 * 1024
# Ids above this would reach into the next incarnation's range (fluxrig.wire.telemetry).
_MAX_ID = 1 << 40


def _q(col: str) -> str:
    return f'"{col}"'


TELEMETRY_DDL: list[str] = []
for _kind, _cols in STAGE_COLUMNS.items():
    _defs = ", ".join(f"{_q(c)} {t}" for c, t in _cols)
    TELEMETRY_DDL.append(
        f"CREATE TABLE IF NOT EXISTS telemetry_{_kind}({_defs}, received_at TIMESTAMPTZ DEFAULT now(), "
        "sent_ts BIGINT, recv_ts BIGINT, PRIMARY KEY(rack, id))"
    )
TELEMETRY_DDL.append(
    "CREATE TABLE IF NOT EXISTS telemetry_sources(rack VARCHAR, src VARCHAR, incarnation BIGINT, "
    "first_seen TIMESTAMPTZ DEFAULT now(), PRIMARY KEY(rack, src))"
)
# Files made before the timestamp clamp: the Rack's time and the receive time as columns.
TELEMETRY_MIGRATIONS: list[str] = [
    f"ALTER TABLE telemetry_{k} ADD COLUMN IF NOT EXISTS {c} BIGINT"
    for k in STAGE_COLUMNS
    for c in ("sent_ts", "recv_ts")
]

SOURCES_INSERT = "INSERT OR IGNORE INTO telemetry_sources(rack, src, incarnation) VALUES (?, ?, ?)"


def ensure_tables(db) -> None:
    db.ensure(TELEMETRY_DDL + TELEMETRY_MIGRATIONS)


# The key a spool line's part number goes under (Spool): random per process, so no payload can
# carry it (a duplicate key would let a Rack's line claim another part).
PART_TAG = f"_fluxrig_part_{secrets.token_hex(8)}"


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _json_columns(kind: str) -> str:
    """The read_json `columns` struct: every field but rack (from the subject)."""
    return "{" + ", ".join(f"{_sql_str(c)}: {_sql_str(t)}" for c, t in STAGE_COLUMNS[kind][1:]) + "}"


def select_parts(kind: str, files: list[tuple[str, Part, int | None]], clamp: Clamp) -> tuple[list[str], str]:
    """(stored column names, SELECT over the spool files) for one kind: the parsed, clamped
    rows, ready to INSERT into a table (DuckDB) or to hand to another store (ClickHouse).

    `files` is what Spool.write made: parts in the combined file (index = their tag) and parts
    in files of their own (index None, mapped by file name). The time of each row is clamped
    to [recv - max_age, recv + max_skew]; a missing one is the receive time. Traces keep their
    duration: `end` moves with `start`."""
    names = [c for c, _t in STAGE_COLUMNS[kind]]
    tcol = TIME_COLUMN[kind]
    raw_t = f"coalesce(j.{_q(tcol)}, m.recv)"
    clamped = f"greatest(least({raw_t}, m.recv + {int(clamp.max_skew_ns)}), m.recv - {int(clamp.max_age_ns)})"
    exprs = ["m.rack", "j.id + m.base"]
    for c in names[2:]:
        if c == tcol:
            exprs.append(clamped)
        elif c == "end":
            exprs.append(f'j."end" + ({clamped} - {raw_t})')
        else:
            exprs.append("j." + _q(c))
    exprs += [f"j.{_q(tcol)}", "m.recv"]
    out = names + ["sent_ts", "recv_ts"]
    exprs = [f"{e} AS {_q(n)}" for e, n in zip(exprs, out, strict=True)]
    where = f"WHERE j.id IS NOT NULL AND j.id < {_MAX_ID}"
    common = f"ignore_errors=true, maximum_object_size={MAX_OBJECT_BYTES}"
    selects = []
    own = [(p, part) for p, part, idx in files if idx is None]
    tagged = [(p, part, idx) for p, part, idx in files if idx is not None]
    if own:
        paths = "[" + ", ".join(_sql_str(p) for p, _part in own) + "]"
        mapping = ", ".join(
            f"({_sql_str(p)}, {_sql_str(part.rack)}, {int(part.base)}, {int(part.recv_ns)})" for p, part in own
        )
        selects.append(
            f"SELECT {', '.join(exprs)} FROM read_json({paths}, format='newline_delimited', "
            f"columns={_json_columns(kind)}, filename=true, {common}) j "
            f"JOIN (VALUES {mapping}) m(f, rack, base, recv) ON j.filename = m.f {where}"
        )
    if tagged:
        path = tagged[0][0]
        columns = _json_columns(kind)[:-1] + f", {_sql_str(PART_TAG)}: 'BIGINT'}}"
        mapping = ", ".join(
            f"({int(idx)}, {_sql_str(part.rack)}, {int(part.base)}, {int(part.recv_ns)})" for _p, part, idx in tagged
        )
        selects.append(
            f"SELECT {', '.join(exprs)} FROM read_json({_sql_str(path)}, format='newline_delimited', "
            f"columns={columns}, {common}) j "
            f"JOIN (VALUES {mapping}) m(t, rack, base, recv) ON j.{_q(PART_TAG)} = m.t {where}"
        )
    return out, " UNION ALL ".join(selects)


def load_ndjson(
    cur, kind: str, files: list[tuple[str, Part, int | None]], ignore_duplicates: bool, clamp: Clamp
) -> int:
    """Load spool files [(path, part)] of one kind into telemetry_<kind> with ONE statement
    (inside the caller's transaction); returns the rows inserted. One statement per write,
    not per file: DuckDB then writes large row groups straight to the database file instead
    of through its WAL, several times faster for a file-backed database."""
    names, select = select_parts(kind, files, clamp)
    verb = "INSERT OR IGNORE INTO" if ignore_duplicates else "INSERT INTO"
    return cur.execute(f"{verb} telemetry_{kind}({', '.join(_q(c) for c in names)}) {select}").fetchone()[0]


def spool_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class Spool:
    """Spool files of one write, removed when the write ends.

    DuckDB's JSON reader pays per file (measured: 100k log rows as 500 files of 200 rows took
    5x as long as 20 files of 5000), and Racks send small batches. So the parts of a write are
    appended to ONE file per kind, each line tagged with its part's number under a key no
    Rack can know (PART_TAG, random per process: a Rack cannot claim another part, so another
    rack). The tag goes right after the opening brace of each line, which is only safe when
    every line of the part starts with `{`; a part with any other line (leading blanks, say)
    keeps a file of its own, mapped by file name as before.

    `own_file_bytes` (0 = never): a part at least this large also keeps a file of its own, for
    the opposite reason: past a few hundred lines DuckDB's per-file cost is smaller than the
    tagging rewrite (a Python `bytes.replace` holding the GIL, plus a copy). Measured on the
    2-core box, 320k log rows parsed into columns: 64 parts of 5000 lines 0.39 s tagged vs
    0.22 s in own files; 640 of 500 lines 0.40 vs 0.28; 1600 of 200 lines 0.43 vs 0.56."""

    def __init__(self, root: str | None, own_file_bytes: int = 0):
        self.dir = tempfile.mkdtemp(prefix="fluxrig-ingest-", dir=root or spool_root())
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.own_file_bytes = own_file_bytes

    def _path(self) -> str:
        with self._lock:
            n = next(self._seq)
        return os.path.join(self.dir, f"{n}.ndjson")

    def write(self, parts: list[Part]) -> dict[str, list[tuple[str, Part, int | None]]]:
        by_kind: dict[str, list[tuple[str, Part, int | None]]] = {}
        combined: dict[str, tuple[str, object]] = {}
        try:
            for tag, part in enumerate(parts):
                data = part.data
                body = None
                big = self.own_file_bytes and len(data) >= self.own_file_bytes
                if not big and data[:1] == b"{" and data.endswith(b"\n"):
                    head = b'{"%s":%d,' % (PART_TAG.encode(), tag)
                    body = data.replace(b"\n{", b"\n" + head)
                    # Every line starts with `{` iff each newline but the last is followed by
                    # one, i.e. the rewrite grew by one tag per line (no separate count pass).
                    if len(body) - len(data) != (part.lines - 1) * (len(head) - 1):
                        body = None
                if body is not None:
                    if part.kind not in combined:
                        path = self._path()
                        combined[part.kind] = (path, open(path, "wb"))
                    path, fh = combined[part.kind]
                    fh.write(head)
                    fh.write(memoryview(body)[1:])
                    by_kind.setdefault(part.kind, []).append((path, part, tag))
                else:
                    path = self._path()
                    with open(path, "wb") as fh:
                        fh.write(data)
                    by_kind.setdefault(part.kind, []).append((path, part, None))
        finally:
            for _path, fh in combined.values():
                fh.close()
        return by_kind

    @staticmethod
    def remove(by_kind: dict[str, list[tuple[str, Part, int | None]]]) -> None:
        for path in {entry[0] for files in by_kind.values() for entry in files}:
            try:
                os.unlink(path)
            except OSError:
                pass

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


_DATA_ERRORS = (duckdb.InvalidInputException, duckdb.ConversionException, duckdb.OutOfRangeException)


class DuckDBStore:
    """Telemetry tables in the Mixer's DuckDB file (`registry.Database`)."""

    name = "duckdb"

    def __init__(self, db, clamp: Clamp | None = None, spool_dir: str | None = None, flush_interval: float = 0.2):
        self.db = db
        self.clamp = clamp or Clamp()
        self.flush_interval = flush_interval
        self.batch_max_rows = 0  # no row bound: DuckDB takes whatever one fetch gathered
        self.spool = Spool(spool_dir)
        self.before_write = None  # test hook: called in the writer thread before the transaction
        ensure_tables(db)
        from .queries import TelemetryQueries

        self._queries = TelemetryQueries(db)

    @property
    def queries(self):
        return self._queries

    def load_sources(self) -> list[Source]:
        return [
            tuple(r) for r in self.db.conn.execute("SELECT rack, src, incarnation FROM telemetry_sources").fetchall()
        ]

    def classify(self, exc: BaseException) -> Failure:
        return Failure.DATA if isinstance(exc, _DATA_ERRORS) else Failure.UNAVAILABLE

    def probe(self) -> None:
        """Nothing to dial: the next write is the probe (a full disk fails it again)."""

    def write(self, parts: list[Part], sources: list[Source]) -> dict[str, int]:
        cur = self.db.cursor()
        by_kind = self.spool.write(parts)
        try:
            if self.before_write is not None:
                self.before_write()
            for ignore in (False, True):
                try:
                    with transaction(cur):
                        if sources:  # before the rows that use them, in the same commit
                            cur.executemany(SOURCES_INSERT, sources)
                        return {
                            kind: load_ndjson(cur, kind, files, ignore, self.clamp) for kind, files in by_kind.items()
                        }
                except duckdb.ConstraintException:
                    if ignore:  # a re-send in this write: redo it once, skipping what is stored
                        raise
        finally:
            self.spool.remove(by_kind)
        raise AssertionError("unreachable")

    def apply_retention(self, cutoff_ns: int) -> int:
        cur = self.db.cursor()
        total = 0
        for kind, col in TIME_COLUMN.items():
            total += cur.execute(f'DELETE FROM telemetry_{kind} WHERE "{col}" < ?', [cutoff_ns]).fetchone()[0]
        return total

    def close(self) -> None:
        self.spool.close()
