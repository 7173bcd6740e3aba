"""CRC-32C (Castagnoli), the checksum of every WAL record and segment header.

Job: `crc32c(data, crc=0)` computes the reflected CRC-32C (polynomial 0x1EDC6F41, reversed
0x82F63B78, init and final XOR 0xFFFFFFFF) -- the same value as iSCSI, ext4, Kafka and
Google's `crc32c` package (`crc32c(b"123456789") == 0xE3069283`). Passing a previous result as
`crc` continues it: `crc32c(b, crc32c(a)) == crc32c(a + b)`.

This file is ONE source compiled twice: imported as is (`fluxrig.wal.crc32c_py`), it is the
pure-Python original; setup.py compiles it again as `fluxrig.wal.crc32c_c` with `crc32c_c.pxd`
beside it adding C types (the table becomes a C array, the loops C loops over a typed
memoryview). Code here must stay valid for both, so it avoids Python-only tricks in the hot
loops. `fluxrig.wal.crc32c` binds the public names to the active backend.

Besides the plain checksum, the record scanner needs two things to resynchronise after damage
in linear time (see fluxrig/wal/record.py):
  * `crc32c_prefix(data, out, crc)` writes the running CRC after every byte into `out`, so the
    CRC of any slice `[a, b)` of a long region can be had without rereading it, and
  * `crc32c_shift(crc, n)` / `crc32c_combine(crc1, crc2, len2)`: the effect of `n` more bytes on
    a CRC in O(log n) table lookups (zlib's crc32_combine idea, with byte-sliced operator tables),
    giving `crc(data[a:b]) == prefix[b] ^ crc32c_shift(prefix[a], b - a)`.

Accepts any object exporting a byte buffer (bytes, bytearray, memoryview); raises TypeError
otherwise. No I/O, no state besides the import-time tables.
"""

from __future__ import annotations

import struct

__all__ = ["crc32c", "crc32c_sliced", "crc32c_prefix", "crc32c_shift", "crc32c_combine", "POLYNOMIAL"]

#: Reflected Castagnoli polynomial.
POLYNOMIAL = 0x82F63B78
_MASK = 0xFFFFFFFF


def _make_table():
    table = []
    for i in range(256):
        c = i
        for _k in range(8):
            if c & 1:
                c = (c >> 1) ^ POLYNOMIAL
            else:
                c = c >> 1
        table.append(c)
    return table


# A C array in the compiled twin (see the .pxd); a list here.
_TABLE = _make_table()


def _byte_view(data):
    # A flat unsigned-byte view of any contiguous buffer (the compiled twin needs format "B").
    return memoryview(data).cast("B")


def crc32c(data, crc=0):
    """CRC-32C of `data`, continuing from `crc` (the result for the bytes before it)."""
    view = _byte_view(data)
    c = (crc & _MASK) ^ _MASK
    n = len(view)
    for i in range(n):
        c = _TABLE[(c ^ view[i]) & 0xFF] ^ (c >> 8)
    return c ^ _MASK


def _make_slices():
    # Slicing-by-8 tables: slices[k][b] is the CRC register after byte b then k zero bytes.
    slices = [list(_TABLE)]
    for _k in range(1, 8):
        prev = slices[len(slices) - 1]
        slices.append([(prev[i] >> 8) ^ _TABLE[prev[i] & 0xFF] for i in range(256)])
    return tuple(tuple(t) for t in slices)


_SLICES = _make_slices()


def crc32c_sliced(data, crc=0, _slices=_SLICES):
    """Same result as crc32c(); the pure path's choice: slicing-by-8 over 32-bit words read
    with one struct call is about twice the speed of the byte loop in CPython. (The compiled
    twin keeps the byte loop, which in C is faster still.)"""
    t0, t1, t2, t3, t4, t5, t6, t7 = _slices
    view = _byte_view(data)
    n = len(view)
    n8 = n >> 3
    c = (crc & _MASK) ^ _MASK
    words = iter(struct.unpack_from("<%dI" % (2 * n8), view))
    for lo in words:
        hi = next(words)
        c ^= lo
        c = (
            t7[c & 0xFF] ^ t6[(c >> 8) & 0xFF] ^ t5[(c >> 16) & 0xFF] ^ t4[c >> 24]
            ^ t3[hi & 0xFF] ^ t2[(hi >> 8) & 0xFF] ^ t1[(hi >> 16) & 0xFF] ^ t0[hi >> 24]
        )  # fmt: skip
    for i in range(n8 << 3, n):
        c = t0[(c ^ view[i]) & 0xFF] ^ (c >> 8)
    return c ^ _MASK


def crc32c_prefix(data, out, crc=0):
    """Write into `out[i]` the CRC-32C of everything before plus `data[: i + 1]`; return the last.

    `out` is a writable buffer of unsigned 32-bit ints (e.g. a memoryview of an array('I')) at
    least as long as `data`. `crc` is the CRC of the bytes before `data`.
    """
    view = _byte_view(data)
    outv = out
    n = len(view)
    if len(outv) < n:
        raise ValueError(f"out holds {len(out)} values, data has {n} bytes")
    c = (crc & _MASK) ^ _MASK
    for i in range(n):
        c = _TABLE[(c ^ view[i]) & 0xFF] ^ (c >> 8)
        outv[i] = c ^ _MASK
    return c ^ _MASK


# Operator tables for "feed 2**j zero bytes": level j holds four 256-entry tables, one per byte
# of the 32-bit register, so applying the (GF(2)-linear) operator costs four lookups. Built on
# first use, one level at a time; 32 levels cover any length below 4 GiB.
_ZERO_OPS = []


def _apply_op(tables, x):
    return tables[0][x & 0xFF] ^ tables[1][(x >> 8) & 0xFF] ^ tables[2][(x >> 16) & 0xFF] ^ tables[3][(x >> 24) & 0xFF]


def _zero_op(level):
    while len(_ZERO_OPS) <= level:
        if not _ZERO_OPS:
            # One zero byte through the raw register: r -> T[r & 0xFF] ^ (r >> 8), linear in r.
            first = []
            for k in range(4):
                row = []
                for b in range(256):
                    r = b << (8 * k)
                    row.append(_TABLE[r & 0xFF] ^ (r >> 8))
                first.append(row)
            _ZERO_OPS.append(first)
        else:
            # No negative index: the compiled twin is built with wraparound=False.
            prev = _ZERO_OPS[len(_ZERO_OPS) - 1]
            nxt = []
            for k in range(4):
                row = []
                for b in range(256):
                    row.append(_apply_op(prev, _apply_op(prev, b << (8 * k))))
                nxt.append(row)
            _ZERO_OPS.append(nxt)
    return _ZERO_OPS[level]


def crc32c_shift(crc, nbytes):
    """The part of crc32c(A + B) that depends on A: `crc32c(A)` pushed through `nbytes` bytes.

    For standard (pre/post-inverted) CRC values: crc32c(A + B) == crc32c_shift(crc32c(A), len(B))
    ^ crc32c(B). Costs O(log nbytes) lookups.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    x = crc & _MASK
    level = 0
    while nbytes and x:
        if nbytes & 1:
            x = _apply_op(_zero_op(level), x)
        nbytes >>= 1
        level += 1
    return x


def crc32c_combine(crc1, crc2, len2):
    """crc32c(A + B) from crc1 = crc32c(A), crc2 = crc32c(B) and len2 = len(B)."""
    return crc32c_shift(crc1, len2) ^ (crc2 & _MASK)
