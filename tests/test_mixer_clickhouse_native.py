"""clickhouse_native: Native column encoding (against a pure-Python reference) and inserts
of the encoded blocks into a real clickhouse-server (Debian's, tests/clickhouse_server.py),
read back value for value."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
from clickhouse_server import USER, fresh_database
from fluxrig_mixer.clickhouse_native import (
    NativeBlocks,
    NativeClient,
    NativeSchemaMismatch,
    blocks_from_result,
    columns_sql,
    encode_fixed,
    encode_strings,
    finish_strings,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _reference(values: list[bytes]) -> bytes:
    return b"".join(_leb128(len(v)) + v for v in values)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [b""],
        [b"", b"", b"a"],
        [b"x" * 127, b"y" * 128, b"", b"z" * 16383, b"w" * 16384, b"q"],
        ["héllo ✓ 😀".encode()] * 3,
        [b"\x00\xff\n\t", b"x" * 300_000],
    ],
)
def test_strings_encode_like_the_reference(values):
    lengths = np.array([len(v) for v in values], dtype=np.int64)
    assert encode_strings(b"".join(values), lengths) == _reference(values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=40))
def test_strings_encode_like_the_reference_for_any_bytes(values):
    lengths = np.array([len(v) for v in values], dtype=np.int64)
    assert encode_strings(b"".join(values), lengths) == _reference(values)


def _prefixed_short(values: list[bytes]) -> bytes:
    """What columns_sql hands over: a one-byte length before each string under 128 bytes."""
    return b"".join((bytes([len(v)]) + v) if len(v) < 128 else v for v in values)


# Long strings (two-byte varints) built from a short seed: drawn whole they exceed Hypothesis's
# data budget (FailedHealthCheck data_too_large in a fresh CI run).
_LONG = st.tuples(st.binary(min_size=1, max_size=8), st.integers(min_value=16380, max_value=16390)).map(
    lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=140), _LONG), max_size=12))
def test_strings_prefixed_by_duckdb_below_128_bytes_finish_like_the_reference(values):
    lengths = np.array([len(v) for v in values], dtype=np.int64)
    assert finish_strings(_prefixed_short(values), lengths) == _reference(values)


def test_finish_strings_refuses_data_that_does_not_match_its_lengths():
    with pytest.raises(ValueError, match="add up"):
        finish_strings(b"\x03abc", np.array([2], dtype=np.int64))


def test_lengths_that_do_not_add_up_are_refused():
    with pytest.raises(ValueError, match="add up"):
        encode_strings(b"abc", np.array([1, 1], dtype=np.int64))


def test_fixed_width_is_little_endian():
    assert encode_fixed(np.array([1, -2], dtype=np.int64), "<i8") == (1).to_bytes(8, "little") + (-2).to_bytes(
        8, "little", signed=True
    )
    assert encode_fixed(np.array([258], dtype=np.int16), "<i2") == b"\x02\x01"


_TYPES = {
    "s": "VARCHAR",
    "u": "UBIGINT",
    "i": "BIGINT",
    "h": "SMALLINT",
    "f": "DOUBLE",
    "ns": "VARCHAR",
    "nf": "DOUBLE",
}
_NULLABLE = {"ns", "nf", "h"}
_ROWS = [
    ("a", 0, -(2**63), -32768, 5e-324, None, None),
    ("héllo ✓ 😀", 2**64 - 1, 2**63 - 1, 32767, 0.1 + 0.2, "x" * 200, 1.7976931348623157e308),
    ("", 42, 0, None, -0.0, "", float("inf")),
    ("tab\tnew\nline\\", 7, -1, 1, 123456789.12345679, "z" * 20_000, -1e-300),
]


def _duck_blocks(rows, block_rows):
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE t (s VARCHAR, u UBIGINT, i BIGINT, h SMALLINT, f DOUBLE, ns VARCHAR, nf DOUBLE, o INTEGER)"
    )
    con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(*r, k) for k, r in enumerate(rows)])
    names = list(_TYPES)
    arrays = con.execute(f"SELECT {columns_sql(names, _TYPES, _NULLABLE)} FROM t ORDER BY o").fetchnumpy()
    return blocks_from_result(arrays, names, _TYPES, _NULLABLE, block_rows)


@pytest.fixture
def table(clickhouse):
    db = fresh_database("native")
    c = NativeClient(host="127.0.0.1", port=clickhouse.port, user=USER, password=clickhouse.password)
    c.execute(f"CREATE DATABASE {db}")
    c.execute(
        f"CREATE TABLE {db}.t (s String, u UInt64, i Int64, h Nullable(Int16), f Float64, ns Nullable(String), "
        "nf Nullable(Float64), extra DateTime DEFAULT now()) ENGINE = MergeTree() ORDER BY u"
    )
    try:
        yield c, f"{db}.t"
    finally:
        c.execute(f"DROP DATABASE IF EXISTS {db}")
        c.disconnect()


@pytest.mark.parametrize("block_rows", [1, 3, 100])
def test_native_blocks_round_trip_every_value_through_a_real_server(table, block_rows):
    c, t = table
    blocks = _duck_blocks(_ROWS, block_rows)
    assert len(blocks) == -(-len(_ROWS) // block_rows) and blocks.rows == len(_ROWS)
    assert c.execute(f"INSERT INTO {t} (s, u, i, h, f, ns, nf) VALUES", blocks) == len(_ROWS)
    got = c.execute(f"SELECT s, u, i, h, f, ns, nf FROM {t} ORDER BY i")
    want = sorted(_ROWS, key=lambda r: r[2])
    assert got == want  # exact: floats travel as their bits, strings as their bytes
    assert c.execute(f"SELECT count() FROM {t} WHERE extra > 0")[0][0] == len(_ROWS)  # defaults filled


def test_a_table_whose_columns_changed_is_refused_before_any_row(table):
    c, t = table
    c.execute(f"ALTER TABLE {t} MODIFY COLUMN h Nullable(Int32)")
    with pytest.raises(NativeSchemaMismatch, match="clickhouse.database"):
        c.execute(f"INSERT INTO {t} (s, u, i, h, f, ns, nf) VALUES", _duck_blocks(_ROWS, 100))
    assert c.execute(f"SELECT count() FROM {t}")[0][0] == 0
    # the client reconnects and goes on (the driver's own path still works)
    assert c.execute(f"INSERT INTO {t} (s, u, i, f) VALUES", [("a", 1, 2, 0.5)]) == 1


def test_empty_blocks_have_no_rows():
    assert NativeBlocks([("s", "String")]).rows == 0
