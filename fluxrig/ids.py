"""UUIDv7 identifiers (RFC 9562), monotonic within one process.

The layout follows RFC 9562 §6.2 method 1: a 48-bit Unix millisecond timestamp, then a
12-bit counter (rand_a) seeded randomly each millisecond and incremented within it, then 62
random bits drawn once per process and mixed with the counter. This keeps ids time-ordered
and unique without an os.urandom call per message on the hot path. The counter's seed each
millisecond comes from a PRNG seeded from os.urandom once per process (and again after a
fork): os.urandom releases the GIL, and a call per millisecond on the event-loop thread cost
6.5 % of a busy switch's samples (py-spy, bench/reversals.py load), most of it waiting to get
the GIL back from the WAL writer and socket threads. The seed only spreads ids within a
millisecond; uniqueness comes from the counter and the process's random tail.
"""

from __future__ import annotations

import os
import random
import time
import uuid

__all__ = ["uuid7", "uuid7_str", "NIL"]

NIL = bytes(16)

_last_ms = 0
_counter = 0
_rand_b = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
_rng = random.Random(os.urandom(16))


def _reseed_after_fork() -> None:
    """A forked child never shares the random tail or the counter seeds with its parent."""
    global _rand_b
    _rand_b = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    _rng.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed_after_fork)


def uuid7() -> bytes:
    """A new UUIDv7 as 16 raw bytes (the CBOR form of FluxMsg ids)."""
    global _last_ms, _counter, _rand_b
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _last_ms = ms
        _counter = _rng.getrandbits(11)  # leave headroom to count up
    else:
        _counter += 1
        if _counter > 0xFFF:  # counter exhausted in this millisecond: borrow the next one
            _last_ms += 1
            _counter = 0
        ms = _last_ms
    _rand_b = (_rand_b + 0x9E37_79B9_7F4A_7C15) & 0x3FFF_FFFF_FFFF_FFFF
    hi = (ms << 16) | 0x7000 | _counter
    lo = 0x8000_0000_0000_0000 | _rand_b
    return hi.to_bytes(8, "big") + lo.to_bytes(8, "big")


def uuid7_str() -> str:
    """A new UUIDv7 in canonical text form."""
    return str(uuid.UUID(bytes=uuid7()))
