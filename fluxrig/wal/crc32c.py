"""The CRC-32C names the WAL uses, bound once to the active backend (the wal twin's binding module).

Job: `crc32c_py.py` is the pure-Python original and the one source of the compiled twin
`fluxrig.wal.crc32c_c` (setup.py builds it from `crc32c_py.py` + `crc32c_c.pxd`, beside them).
This module asks `fluxrig._backend.twin("wal")` for the twin once, at import, and binds, in the
snake-case form of the twins' naming: `crc32c_py` / `crc32c_c` / `crc32c` (pure, compiled or
None when not built, active) and the same for `crc32c_prefix`, plus `BACKEND` ("cython" or
"pure"), which `fluxrig.wal` re-exports.

The pure path uses the slicing-by-8 variant (same results, about twice as fast in CPython);
`crc32c_bytewise_py` is the byte loop the compiled twin is built from. `crc32c_shift` and
`crc32c_combine` are O(log n) table walks called a few times per resync: one binding each.
"""

from __future__ import annotations

from fluxrig._backend import twin
from fluxrig.wal import crc32c_py as _py

__all__ = [
    "BACKEND",
    "crc32c",
    "crc32c_prefix",
    "crc32c_shift",
    "crc32c_combine",
    "crc32c_py",
    "crc32c_bytewise_py",
    "crc32c_c",
    "crc32c_prefix_py",
    "crc32c_prefix_c",
]

_c = twin("wal")

#: "cython" or "pure": what `crc32c` below runs on.
BACKEND = "cython" if _c is not None else "pure"

crc32c_py = _py.crc32c_sliced
crc32c_bytewise_py = _py.crc32c
crc32c_prefix_py = _py.crc32c_prefix

crc32c_c = _c.crc32c if _c is not None else None
crc32c_prefix_c = _c.crc32c_prefix if _c is not None else None

crc32c = crc32c_c or crc32c_py
crc32c_prefix = crc32c_prefix_c or crc32c_prefix_py
crc32c_shift = _c.crc32c_shift if _c is not None else _py.crc32c_shift
crc32c_combine = _c.crc32c_combine if _c is not None else _py.crc32c_combine
