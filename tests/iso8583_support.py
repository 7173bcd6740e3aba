"""Shared helpers for the tests/test_iso8583_*.py suites: backend parametrization, small specs."""

from __future__ import annotations

import pytest

from fluxrig.iso8583 import codec_module, load_spec

try:
    codec_module("c")
    HAVE_C = True
except ImportError:
    HAVE_C = False

# Every codec test runs over both twins; under FLUXRIG_PURE_PYTHON=1 the compiled one is skipped.
IMPLS = ["py", pytest.param("c", marks=pytest.mark.skipif(not HAVE_C, reason="compiled twin not built"))]

MTI_ASCII = {"type": "String", "length": 4, "enc": "ASCII", "prefix": "ASCII.Fixed"}
BITMAP_BIN = {"type": "Bitmap", "length": 8, "enc": "Binary", "prefix": "Binary.Fixed"}
BITMAP_HEX = {"type": "Bitmap", "length": 8, "enc": "HexToASCII", "prefix": "Hex.Fixed"}


def spec_of(fields: dict, impl: str, bitmap=BITMAP_BIN, mti=MTI_ASCII):
    """A spec with an ASCII MTI, a bitmap, and `fields` ({num: moov definition})."""
    return load_spec({"name": "test", "fields": {0: mti, 1: bitmap, **fields}}, impl=impl)


def bitmap_for(*nums: int) -> bytes:
    """Binary primary (and secondary/tertiary) bitmaps for field numbers, computed bit by bit."""
    maps = [bytearray(8)]
    if any(n > 64 for n in nums):
        maps.append(bytearray(8))
    if any(n > 128 for n in nums):
        maps.append(bytearray(8))
    bits = set(nums)
    if len(maps) > 1:
        bits.add(1)
    if len(maps) > 2:
        bits.add(65)
    for n in bits:
        m, pos = divmod(n - 1, 64)
        maps[m][pos // 8] |= 0x80 >> (pos % 8)
    return b"".join(bytes(m) for m in maps)
