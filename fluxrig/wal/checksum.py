"""The CRC-32C names the WAL uses, bound once to the best backend.

`fluxrig.wal.crc32c` is the pure-Python original and the one source of the compiled twin
`fluxrig._speedups.crc32c`; this module asks `fluxrig._backend.speedup("crc32c")` for the twin
and binds the public names to it, else to the originals. Both stay importable for differential
tests and benchmarks: `crc32c_py` / `crc32c_c` (None on a pure build), and so on.
"""

from __future__ import annotations

from fluxrig._backend import speedup
from fluxrig.wal import crc32c as _py

__all__ = [
    "crc32c",
    "crc32c_prefix",
    "crc32c_shift",
    "crc32c_combine",
    "crc32c_py",
    "crc32c_bytewise_py",
    "crc32c_c",
    "crc32c_prefix_py",
    "crc32c_prefix_c",
    "COMPILED",
    "BACKEND",
]

# The pure path uses the slicing-by-8 variant (same results, about twice as fast in CPython);
# `crc32c_bytewise_py` is the byte loop that the compiled twin is built from.
crc32c_py = _py.crc32c_sliced
crc32c_bytewise_py = _py.crc32c
crc32c_prefix_py = _py.crc32c_prefix

_c = speedup("crc32c")
crc32c_c = _c.crc32c if _c is not None else None
crc32c_prefix_c = _c.crc32c_prefix if _c is not None else None

#: True when the public names are the compiled functions.
COMPILED = _c is not None
#: "cython" or "pure": what `crc32c` below runs on.
BACKEND = "cython" if COMPILED else "pure"

crc32c = crc32c_c or crc32c_py
crc32c_prefix = crc32c_prefix_c or crc32c_prefix_py
# O(log n) table walks, called a few times per resync: the same either way, keep one.
crc32c_shift = _c.crc32c_shift if _c is not None else _py.crc32c_shift
crc32c_combine = _c.crc32c_combine if _c is not None else _py.crc32c_combine
