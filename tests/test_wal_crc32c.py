"""CRC-32C (fluxrig.wal.crc32c_py and its compiled twin crc32c_c, bound by fluxrig.wal.crc32c):
golden vectors, continuation, prefix tables and combine, run against both backends (`py`, `c`)
plus a differential corpus."""

from __future__ import annotations

import importlib
import os
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fluxrig.wal
from fluxrig.wal import crc32c as bound
from fluxrig.wal import crc32c_py as pure

BACKENDS = ["py", "c"]


@pytest.fixture(params=BACKENDS)
def mod(request):
    if request.param == "c":
        if bound.BACKEND != "cython":
            pytest.skip("compiled twin not loaded (pure build or FLUXRIG_PURE_PYTHON=1)")
        return importlib.import_module("fluxrig.wal.crc32c_c")
    return pure


# RFC 3720 (iSCSI) appendix B.4 vectors plus the customary check value.
GOLDEN = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", GOLDEN)
def test_golden_vectors(mod, data, expected):
    assert mod.crc32c(data) == expected
    assert mod.crc32c(bytearray(data)) == expected
    assert mod.crc32c(memoryview(data)) == expected


def test_public_binding_matches_backend_flag():
    assert bound.crc32c(b"123456789") == 0xE3069283
    assert fluxrig.wal.BACKEND == bound.BACKEND
    if bound.BACKEND == "cython":
        assert bound.crc32c is bound.crc32c_c
        assert bound.crc32c_prefix is bound.crc32c_prefix_c
    else:
        assert bound.BACKEND == "pure"
        assert bound.crc32c is bound.crc32c_py and bound.crc32c_c is None


def test_continuation(mod):
    a, b = b"hello, ", b"write-ahead log"
    assert mod.crc32c(b, mod.crc32c(a)) == mod.crc32c(a + b)
    assert mod.crc32c(b"", 0x12345678) == 0x12345678


def test_non_contiguous_and_wide_views(mod):
    data = os.urandom(64)
    assert mod.crc32c(memoryview(data)[3:40]) == pure.crc32c(data[3:40])
    wide = array("I", range(10))
    assert mod.crc32c(wide) == pure.crc32c(wide.tobytes())


@pytest.mark.parametrize("bad", ["text", None, 5, 1.5])
def test_rejects_non_buffers(mod, bad):
    with pytest.raises(TypeError):
        mod.crc32c(bad)


def test_prefix_table(mod):
    data = os.urandom(3000)
    out = array("I", bytes(4 * len(data)))
    last = mod.crc32c_prefix(data, memoryview(out), 0)
    assert last == pure.crc32c(data)
    for i in (0, 1, 255, 1024, 2999):
        assert out[i] == pure.crc32c(data[: i + 1])
    # continuing from an earlier CRC
    out2 = array("I", bytes(4 * 10))
    mod.crc32c_prefix(data[100:110], memoryview(out2), pure.crc32c(data[:100]))
    assert out2[9] == pure.crc32c(data[:110])


def test_prefix_table_too_small(mod):
    with pytest.raises(ValueError):
        mod.crc32c_prefix(b"abc", memoryview(array("I", [0, 0])), 0)


def test_differential_corpus():
    """Both backends agree on a fixed corpus of sizes and contents."""
    if bound.BACKEND != "cython":
        pytest.skip("compiled twin not loaded")
    rnd = __import__("random").Random(8583)
    for n in list(range(0, 70)) + [255, 256, 257, 4095, 4096, 65537]:
        data = bytes(rnd.getrandbits(8) for _ in range(n))
        seed = rnd.getrandbits(32)
        assert bound.crc32c_c(data, seed) == bound.crc32c_py(data, seed)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_combine_and_shift(a, b):
    for m in (pure, bound):
        assert m.crc32c_combine(pure.crc32c(a), pure.crc32c(b), len(b)) == pure.crc32c(a + b)
    # the slice identity the scanner relies on: crc(x[i:j]) from two prefix values
    x = a + b
    i, j = len(a) // 2, len(a) + len(b) // 2
    ci, cj = pure.crc32c(x[:i]), pure.crc32c(x[:j])
    assert cj ^ pure.crc32c_shift(ci, j - i) == pure.crc32c(x[i:j])


def test_shift_large_lengths():
    # operator tables for long distances (past 16 MiB) agree with the identity on zeros
    assert pure.crc32c_shift(0, 1 << 30) == 0
    c = pure.crc32c(b"x")
    assert pure.crc32c_combine(c, pure.crc32c(bytes(1000)), 1000) == pure.crc32c(b"x" + bytes(1000))
    with pytest.raises(ValueError):
        pure.crc32c_shift(1, -1)


@pytest.mark.parametrize("data,expected", GOLDEN)
def test_sliced_pure_variant_golden(data, expected):
    # the pure path's slicing-by-8 variant (crc32c.crc32c_py) against the same vectors
    assert pure.crc32c_sliced(data) == expected
    assert bound.crc32c_py(bytearray(data)) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.integers(0, 2**32 - 1), st.integers(0, 7))
def test_sliced_equals_bytewise(data, seed, skip):
    assert pure.crc32c_sliced(data, seed) == pure.crc32c(data, seed)
    assert pure.crc32c_sliced(memoryview(data)[skip:], seed) == pure.crc32c(data[skip:], seed)
