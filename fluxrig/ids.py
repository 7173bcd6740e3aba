"""UUIDv7 identifiers (RFC 9562), monotonic within one process.

The layout follows RFC 9562 §6.2 method 1: a 48-bit Unix millisecond timestamp, then a
12-bit counter (rand_a) seeded randomly each millisecond and incremented within it, then 62
random bits drawn once per process and mixed with the counter. This keeps ids time-ordered
and unique without an os.urandom call per message on the hot path.
"""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["uuid7", "uuid7_str", "NIL"]

NIL = bytes(16)

_last_ms = 0
_counter = 0
_rand_b = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
_pid = os.getpid()


def uuid7() -> bytes:
    """A new UUIDv7 as 16 raw bytes (the CBOR form of FluxMsg ids)."""
    global _last_ms, _counter, _rand_b, _pid
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _last_ms = ms
        _counter = int.from_bytes(os.urandom(2), "big") & 0x7FF  # leave headroom to count up
    else:
        _counter += 1
        if _counter > 0xFFF:  # counter exhausted in this millisecond: borrow the next one
            _last_ms += 1
            _counter = 0
        ms = _last_ms
    if os.getpid() != _pid:  # forked: never share the random tail with the parent
        _pid = os.getpid()
        _rand_b = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    _rand_b = (_rand_b + 0x9E37_79B9_7F4A_7C15) & 0x3FFF_FFFF_FFFF_FFFF
    hi = (ms << 16) | 0x7000 | _counter
    lo = 0x8000_0000_0000_0000 | _rand_b
    return hi.to_bytes(8, "big") + lo.to_bytes(8, "big")


def uuid7_str() -> str:
    """A new UUIDv7 in canonical text form."""
    return str(uuid.UUID(bytes=uuid7()))
