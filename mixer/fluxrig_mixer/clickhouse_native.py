"""ClickHouse Native blocks built from DuckDB's columns, sent through clickhouse-driver.

Job. Turn the rows DuckDB parsed from a fetch's NDJSON (clickhouse_store) into ClickHouse
Native-format column bytes with no Python object per value where it can be helped, and
send them as the data of an ordinary `INSERT INTO t (cols) VALUES` over the native protocol.

Why. The driver's own columnar insert serialises Python values one by one: fed from lists it
ran at 91-187 k rows/s for the 9-column log table on this box, which capped the ingest far
below ClickHouse's own speed. The first ingest (one hex-encoded text blob per block, split
and decoded by a materialized view) moved that work into the server, where `splitByChar` /
`unhex` per field cost even more (32-60 k rows/s). Native column bytes are what the server
stores: it only checks and writes them.

Encoding (the Native format, unchanged from 18.x to current releases):
- a fixed-width column is its values little-endian (UInt64, Int64, Int16, Float64): numpy's
  `tobytes` of the array DuckDB hands over (`fetchnumpy`, no Python object per value);
- a String column is, per row, a LEB128 varint of the byte length, then the bytes. DuckDB
  puts the one-byte length in front of every string shorter than 128 bytes itself and hands
  strings over as Python objects (the one per-value cost left); they are joined into one
  buffer, and the longer rows' varints inserted with one vectorised `numpy.insert`;
- Nullable(T) is a null map (one byte per row, 1 = NULL) followed by T with a default value
  where NULL.

Contract.
- `NATIVE_TYPES`: the column types this module encodes (DuckDB type -> ClickHouse type).
- `columns_sql(names, types, nullable)` is the SELECT list that gives DuckDB's result the shape
  `blocks_from_result` reads; `blocks_from_result(result, columns, block_rows)` returns
  `NativeBlocks`: the column (name, type) list and blocks of at most `block_rows` rows.
- `NativeClient.execute("INSERT INTO t (cols) VALUES", blocks)` sends them. The server's
  sample block must name the same columns with the same types, else `NativeSchemaMismatch`
  (nothing sent: a schema drift must not be papered over by the server's conversions).
- Any other `execute` is clickhouse-driver's own.

What it relies on in clickhouse-driver (pinned in constraints.txt, exercised by
tests/test_mixer_clickhouse_native.py against a real server): `Client.send_data(sample_block,
data, ...)` being the insert's data step, and a connection's `fout`, `block_out.fout`,
`block_out.finalize()` and `server_info.used_revision`, as its own `Connection.send_data`
uses them. Compression (when the client enables it) goes through `block_out` as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from clickhouse_driver import Client
from clickhouse_driver import defines as _defines
from clickhouse_driver.block import BlockInfo, ColumnOrientedBlock
from clickhouse_driver.protocol import ClientPacketTypes
from clickhouse_driver.varint import write_varint
from clickhouse_driver.writer import write_binary_str, write_binary_uint8

__all__ = [
    "NATIVE_TYPES",
    "NativeBlock",
    "NativeBlocks",
    "NativeClient",
    "NativeSchemaMismatch",
    "columns_sql",
    "blocks_from_result",
    "encode_strings",
    "finish_strings",
    "SHORT_STRING",
    "encode_fixed",
    "MAX_VARINT_BYTES",
]

# DuckDB type -> (ClickHouse type, numpy little-endian dtype; None for strings).
NATIVE_TYPES: dict[str, tuple[str, str | None]] = {
    "VARCHAR": ("String", None),
    "UBIGINT": ("UInt64", "<u8"),
    "BIGINT": ("Int64", "<i8"),
    "SMALLINT": ("Int16", "<i2"),
    "DOUBLE": ("Float64", "<f8"),
}
# A LEB128 length of up to 5 bytes covers 2**35 bytes, far past any telemetry value (the
# NDJSON reader's maximum_object_size bounds a whole record).
MAX_VARINT_BYTES = 5
# Strings shorter than this get their (one-byte) length from DuckDB (columns_sql).
SHORT_STRING = 0x80
_SHIFTS = np.arange(MAX_VARINT_BYTES, dtype=np.int64) * 7


class NativeSchemaMismatch(Exception):
    """The table's columns are not the ones the block was built for (`expected`, `got`)."""

    def __init__(self, table_columns, block_columns):
        self.got, self.expected = list(table_columns), list(block_columns)
        super().__init__(
            f"ClickHouse table columns {self.got} differ from what this Mixer writes {self.expected}: "
            "the schema was changed outside the Mixer; restore it or use another clickhouse.database"
        )


@dataclass(frozen=True, slots=True)
class NativeBlock:
    """One Native block: its row count and one encoded payload per column."""

    rows: int
    payloads: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.payloads)


class NativeBlocks(list):
    """Blocks of one table's columns, given to `NativeClient.execute` as an INSERT's data (a
    list, so the driver takes the insert path)."""

    def __init__(self, columns: list[tuple[str, str]], blocks=()):
        super().__init__(blocks)
        self.columns = list(columns)

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self)


def encode_fixed(values: np.ndarray, dtype: str) -> bytes:
    """A fixed-width column: the values little-endian."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def encode_strings(data: bytes, lengths: np.ndarray) -> bytes:
    """A String column: each row's LEB128 byte length, then its bytes. `data` is every row's
    bytes joined, `lengths` their byte lengths (they must add up to len(data))."""
    lens = np.asarray(lengths, dtype=np.int64)
    if int(lens.sum()) != len(data):
        raise ValueError(f"string lengths add up to {int(lens.sum())}, the data has {len(data)} bytes")
    return _insert_varints(data, lens, np.ones(len(lens), dtype=bool))


def finish_strings(data: bytes, lengths: np.ndarray) -> bytes:
    """A String column from `columns_sql`'s string: each row's bytes, a row shorter than
    SHORT_STRING bytes already preceded by its one-byte length, a longer one not; `lengths`
    are the rows' byte lengths without prefix. Inserts the longer rows' LEB128 lengths (none,
    usually: then `data` is the column as it is)."""
    lens = np.asarray(lengths, dtype=np.int64)
    short = lens < SHORT_STRING
    expected = int(lens.sum()) + int(np.count_nonzero(short))
    if expected != len(data):
        raise ValueError(f"string lengths and prefixes add up to {expected}, the data has {len(data)} bytes")
    return _insert_varints(data, lens, ~short)


def _insert_varints(data: bytes, lens: np.ndarray, missing: np.ndarray) -> bytes:
    """`data` with the LEB128 length inserted before each row where `missing` (the rows that
    are not missing one carry a single byte already)."""
    if not missing.any():
        return bytes(data)
    sizes = lens + ~missing  # what each row takes in `data`
    offsets = np.empty(len(lens), dtype=np.int64)
    offsets[0] = 0
    np.cumsum(sizes[:-1], out=offsets[1:])
    raw = np.frombuffer(data, dtype=np.uint8)
    lens, offsets = lens[missing], offsets[missing]
    if int(lens.max()) < 0x80:  # every inserted length is one byte
        return np.insert(raw, offsets, lens.astype(np.uint8)).tobytes()
    nbytes = np.ones(len(lens), dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        nbytes += lens >= (1 << (7 * k))
    digits = (lens[:, None] >> _SHIFTS[None, :]) & 0x7F
    more = np.arange(MAX_VARINT_BYTES)[None, :] < (nbytes[:, None] - 1)
    keep = np.arange(MAX_VARINT_BYTES)[None, :] < nbytes[:, None]
    prefix = (digits | (more * 0x80)).astype(np.uint8)[keep]  # row-major: each row's bytes in order
    at = np.repeat(offsets, nbytes)  # numpy.insert keeps the order of equal indices
    return np.insert(raw, at, prefix).tobytes()


def columns_sql(names: list[str], types: dict[str, str], nullable: set[str]) -> str:
    """The SELECT list over DuckDB rows (columns `names`) that `blocks_from_result` reads:
    each value with NULL replaced by the type's default, a `<name>__n` null flag for the
    nullable ones, and a `<name>__l` byte length for strings. A string shorter than
    SHORT_STRING bytes comes with its one-byte varint length in front (`chr` of it: ASCII,
    one UTF-8 byte), built by DuckDB, so its Native bytes need no insertion afterwards
    (numpy.insert's masked copy was 14 % of the writer threads' samples in the ingest)."""
    out = []
    for n in names:
        q = f'"{n}"'
        if types[n] == "VARCHAR":
            v, n_len = f"coalesce({q}, '')", f'"{n}__l"'
            length = f"strlen({v})"
            out.append(f"CASE WHEN {length} < {SHORT_STRING} THEN chr({length}::INTEGER) || {v} ELSE {v} END AS {q}")
            out.append(f"{length} AS {n_len}")
        elif n in nullable:
            out.append(f"coalesce({q}, 0) AS {q}")
        else:
            out.append(q)
        if n in nullable:
            out.append(f'({q} IS NULL)::UTINYINT AS "{n}__n"')
    return ", ".join(out)


def blocks_from_result(
    arrays: dict[str, np.ndarray], names: list[str], types: dict[str, str], nullable: set[str], block_rows: int
) -> NativeBlocks:
    """NativeBlocks of at most `block_rows` rows from DuckDB's `fetchnumpy()` of a query whose
    SELECT list is `columns_sql(names, types, nullable)`."""
    columns = []
    for n in names:
        ch = NATIVE_TYPES[types[n]][0]
        columns.append((n, f"Nullable({ch})" if n in nullable else ch))
    total = len(arrays[names[0]]) if names else 0
    step = max(1, int(block_rows))
    out = NativeBlocks(columns)
    for a in range(0, total, step):
        b = min(total, a + step)
        payloads = []
        for n in names:
            ch, dtype = NATIVE_TYPES[types[n]]
            head = _null_map(arrays[f"{n}__n"][a:b]) if n in nullable else b""
            if dtype is None:
                text = "".join(arrays[n][a:b].tolist()).encode("utf-8")
                payloads.append(head + finish_strings(text, _plain(arrays[f"{n}__l"][a:b])))
            else:
                payloads.append(head + encode_fixed(_plain(arrays[n][a:b]), dtype))
        out.append(NativeBlock(b - a, tuple(payloads)))
    return out


def _plain(values) -> np.ndarray:
    """A numpy array without a mask (the SQL replaced NULLs already; a masked array from
    DuckDB then has no masked value, but is still a MaskedArray)."""
    return np.ma.getdata(values) if isinstance(values, np.ma.MaskedArray) else values


def _null_map(flags) -> bytes:
    return np.ascontiguousarray(_plain(flags), dtype=np.uint8).tobytes()


class NativeClient(Client):
    """clickhouse-driver's Client, which also takes `NativeBlocks` as an INSERT's data."""

    def send_data(self, sample_block, data, types_check=False, columnar=False):
        if not isinstance(data, NativeBlocks):
            return super().send_data(sample_block, data, types_check=types_check, columnar=columnar)
        table = [(n, t) for n, t in sample_block.columns_with_types]
        if table != data.columns:
            raise NativeSchemaMismatch(table, data.columns)
        conn = self.connection
        for block in data:
            _write_block(conn, data.columns, block)
            self.receive_profile_events()
        conn.send_data(ColumnOrientedBlock())  # an empty block ends the data
        self.receive_profile_events()
        return data.rows


def _write_block(conn, columns: list[tuple[str, str]], block: NativeBlock) -> None:
    """One Data packet, exactly as clickhouse-driver's Connection.send_data writes one, with
    the column bytes already encoded."""
    revision = conn.server_info.used_revision
    write_varint(ClientPacketTypes.DATA, conn.fout)
    if revision >= _defines.DBMS_MIN_REVISION_WITH_TEMPORARY_TABLES:
        write_binary_str("", conn.fout)
    out = conn.block_out.fout  # the compressing buffer when compression is on
    if revision >= _defines.DBMS_MIN_REVISION_WITH_BLOCK_INFO:
        BlockInfo().write(out)
    write_varint(len(columns), out)
    write_varint(block.rows, out)
    for (name, ch_type), payload in zip(columns, block.payloads, strict=True):
        write_binary_str(name, out)
        write_binary_str(ch_type, out)
        if revision >= _defines.DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION:
            write_binary_uint8(0, out)  # plain (not sparse) serialization
        out.write(payload)
    conn.block_out.finalize()
