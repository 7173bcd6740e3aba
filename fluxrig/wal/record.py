"""WAL record and segment-header format (sans-IO): encode records, scan bytes back into them.

Record on disk::

    length  u32 big-endian   payload length in bytes, 1 <= length <= max_record_bytes
    crc     u32 big-endian   CRC-32C (Castagnoli) of the payload
    payload length bytes     one CBOR data item

`encode_record(payload)` returns those bytes: a bytes-like payload is taken verbatim (the caller
already encoded it as CBOR -- the file layer always does), anything else is `cbor2.dumps`-ed.
A zero length is never written, so zero-filled space (what a crash often leaves past the end of
a file) can never pass for a record.

Segment file header (`SEGMENT_HEADER_BYTES` = 40 bytes, at offset 0 of every segment)::

    magic b"FLUXWAL\\0" | version u16 | flags u16 | base_seq u64 | wal_id 16 bytes | crc32c u32

all big-endian; the CRC covers the 36 bytes before it. `base_seq` is the sequence number of the
segment's first record; `wal_id` names the WAL incarnation (see fluxrig/wal/log.py).

Reading: `RecordReader` takes bytes in any chunking (`feed(data) -> events`, then `end()` at end
of input) and yields, in offset order:

* `Record(offset, payload)` -- a record whose CRC matches; `offset` is where its header starts.
* `Corrupt(offset, length, reason)` -- a damaged byte range that valid records follow (or that
  ends the input): a bad CRC, an absurd length (0 or > max_record_bytes), or a length that runs
  past the data. One event per damaged range: how many records it held is unknowable.
* `TornTail(offset, length)` -- the input ends inside a record (an incomplete header or
  payload, or a zero-filled tail): what an interrupted write leaves.

`scan(buffer, base_offset)` does the same over one buffer. The results do not depend on how the
bytes were chunked (tests feed whole, byte at a time and with trailing bytes).

Resynchronising after damage scans forward for the next position holding a valid record. It is
built so that garbage can neither crash it, hang it nor make it quadratic:

* every length is bounded by `max_record_bytes` (at most `MAX_RECORD_BYTES_CEILING` = 16 MiB - 1,
  so the top length byte of any valid header is zero), which also bounds the buffered bytes;
* candidate header positions are found by a compiled regular expression (a zero byte followed
  by a plausible second length byte, not by three more zeros), so non-candidates are skipped at
  C speed and zero-filled space costs nothing;
* a candidate's CRC over up to `max_record_bytes` is not recomputed per candidate: checks longer
  than `direct_check_bytes` read a prefix table of running CRCs (each byte enters it once) and
  combine two entries in O(log n) (`crc32c_shift`). Total work is O(input) CRC bytes plus
  O(log max_record_bytes) per candidate plus at most `direct_check_bytes` per damaged range.

A false positive -- garbage that happens to carry a matching CRC-32C -- has probability 2**-32
per plausible candidate; the file layer adds a second check (sequence numbers inside payloads).

Raises: `RecordSizeError` (encode: empty or over the limit), `SegmentHeaderError` (parse), and
ConfigError for a limit outside its allowed range. Never raises on any input bytes when reading.
"""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Iterator
from typing import NamedTuple, Union

import cbor2

from fluxrig.errors import ConfigError, FluxError, LocalProtocolError, RemoteProtocolError
from fluxrig.wal.crc32c import crc32c, crc32c_prefix, crc32c_shift

__all__ = [
    "RECORD_HEADER_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "MAX_RECORD_BYTES_CEILING",
    "DEFAULT_DIRECT_CHECK_BYTES",
    "SCAN_SLICE_BYTES",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "SEGMENT_HEADER_BYTES",
    "REASON_BAD_LENGTH",
    "REASON_BAD_CRC",
    "REASON_OVERRUN",
    "Record",
    "Corrupt",
    "TornTail",
    "Event",
    "SegmentHeader",
    "WalError",
    "RecordSizeError",
    "SegmentHeaderError",
    "encode_record",
    "encode_segment_header",
    "parse_segment_header",
    "check_max_record_bytes",
    "RecordReader",
    "scan",
]

RECORD_HEADER_BYTES = 8
#: Default bound on one record's payload: a 2 MiB FluxMsg plus its envelope fits with room.
DEFAULT_MAX_RECORD_BYTES = 4 * 1024 * 1024
#: Hard ceiling for max_record_bytes: keeps the top length byte zero (see the module docstring).
MAX_RECORD_BYTES_CEILING = 0xFFFFFF
#: CRC checks of at most this many payload bytes are computed directly; longer ones go through
#: the prefix table so that overlapping candidates never reread the same bytes.
DEFAULT_DIRECT_CHECK_BYTES = 1024
#: scan() feeds the reader this much at a time, so one huge buffer is not copied whole.
SCAN_SLICE_BYTES = 1024 * 1024
#: The reader drops consumed bytes (and prefix-table entries) once this many have piled up.
_COMPACT_BYTES = 64 * 1024

SEGMENT_MAGIC = b"FLUXWAL\x00"
SEGMENT_VERSION = 1
_SEGMENT = struct.Struct(">8sHHQ16sI")
SEGMENT_HEADER_BYTES = _SEGMENT.size  # 40
_HEADER = struct.Struct(">II")

REASON_BAD_LENGTH = "bad_length"  # length 0 or above max_record_bytes
REASON_BAD_CRC = "bad_crc"  # complete record whose CRC-32C does not match
REASON_OVERRUN = "overrun"  # length runs past the data, yet valid records follow

_NONZERO = re.compile(rb"[^\x00]")


class WalError(FluxError):
    """Base of the write-ahead log's errors."""


class RecordSizeError(WalError, LocalProtocolError):
    """A payload to encode is empty or larger than `limit` (`size` says how large)."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        if size < 1:
            msg = "a WAL record payload must not be empty"
        else:
            msg = f"WAL record payload of {size} bytes exceeds max_record_bytes={limit}"
        LocalProtocolError.__init__(self, msg)


class SegmentHeaderError(WalError, RemoteProtocolError):
    """A segment file's header is short, has the wrong magic/version or a bad CRC."""

    def __init__(self, reason: str, where: str | None = None, offset: int = 0):
        self.reason = reason
        self.where = where
        msg = f"segment header of {where}: {reason}" if where else f"segment header: {reason}"
        RemoteProtocolError.__init__(self, msg, offset)


class Record(NamedTuple):
    """A record whose CRC matched: header offset and payload bytes."""

    offset: int
    payload: bytes


class Corrupt(NamedTuple):
    """A damaged byte range [offset, offset + length) skipped while scanning."""

    offset: int
    length: int
    reason: str


class TornTail(NamedTuple):
    """The input ends inside a record: [offset, offset + length) is an interrupted write."""

    offset: int
    length: int


Event = Union[Record, Corrupt, TornTail]


class SegmentHeader(NamedTuple):
    version: int
    flags: int
    base_seq: int
    wal_id: bytes


def check_max_record_bytes(value: int) -> int:
    """Validate a max_record_bytes parameter; returns it. Raises ConfigError."""
    if not isinstance(value, int) or not 1 <= value <= MAX_RECORD_BYTES_CEILING:
        raise ConfigError(
            f"must be an integer between 1 and {MAX_RECORD_BYTES_CEILING}, got {value!r}", "max_record_bytes"
        )
    return value


def encode_record(payload, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> bytes:
    """Header + payload. Bytes-like payloads are taken verbatim (already CBOR); others are
    CBOR-encoded. Raises RecordSizeError for an empty or oversized payload."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        body = bytes(payload)
    else:
        body = cbor2.dumps(payload)
    n = len(body)
    if n < 1 or n > max_record_bytes:
        raise RecordSizeError(n, max_record_bytes)
    return _HEADER.pack(n, crc32c(body)) + body


def encode_segment_header(base_seq: int, wal_id: bytes, flags: int = 0) -> bytes:
    if len(wal_id) != 16:
        raise ValueError("wal_id must be 16 bytes")
    head = _SEGMENT.pack(SEGMENT_MAGIC, SEGMENT_VERSION, flags, base_seq, bytes(wal_id), 0)[:-4]
    return head + struct.pack(">I", crc32c(head))


def parse_segment_header(data, where: str | None = None) -> SegmentHeader:
    """Parse the first SEGMENT_HEADER_BYTES of `data`. Raises SegmentHeaderError."""
    if len(data) < SEGMENT_HEADER_BYTES:
        raise SegmentHeaderError(f"only {len(data)} of {SEGMENT_HEADER_BYTES} header bytes", where)
    magic, version, flags, base, wal_id, crc = _SEGMENT.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise SegmentHeaderError(f"bad magic {magic!r}", where)
    if crc32c(memoryview(data)[: SEGMENT_HEADER_BYTES - 4]) != crc:
        raise SegmentHeaderError("header CRC mismatch", where, SEGMENT_HEADER_BYTES - 4)
    if version != SEGMENT_VERSION:
        raise SegmentHeaderError(f"unsupported version {version} (this build reads {SEGMENT_VERSION})", where, 8)
    return SegmentHeader(version, flags, base, wal_id)


def _candidate_regex(max_record_bytes: int):
    # A valid header starts with a zero byte (length < 2**24), its second byte is at most
    # max >> 16, and its length is not zero. Exact bounds are checked after the match.
    hi = max_record_bytes >> 16
    return re.compile(rb"\x00(?=[\x00-\x%02x])(?!\x00\x00\x00)" % hi)


class _PrefixTable:
    """Running CRC-32Cs over one stretch of the input, by absolute offset.

    values[k] is the CRC of input[origin : head + k]; so the CRC of [a, e) inside the stretch
    is values[e - head] ^ crc32c_shift(values[a - head], e - a)."""

    __slots__ = ("origin", "head", "values")

    def __init__(self):
        self.origin = 0
        self.head = 0
        self.values = array("I")

    def crc(self, buf: bytearray, buf_start: int, a: int, e: int) -> int:
        vals = self.values
        last = self.head + len(vals) - 1
        if not vals or a < self.head or a > last:
            self.origin = self.head = a
            vals = self.values = array("I", [0])
            last = a
        if e > last:
            old = len(vals)
            vals.frombytes(bytes(4 * (e - last)))
            with memoryview(buf) as whole, memoryview(vals) as out:
                crc32c_prefix(whole[last - buf_start : e - buf_start], out[old:], vals[old - 1])
        head = self.head
        return vals[e - head] ^ crc32c_shift(vals[a - head], e - a)

    def trim(self, keep_from: int) -> None:
        drop = keep_from - self.head
        if drop >= _COMPACT_BYTES and drop < len(self.values):
            del self.values[:drop]
            self.head = keep_from
        elif drop >= len(self.values) and self.values:
            self.values = array("I")


class RecordReader:
    """Incremental scanner: feed(data) -> [events]; end() -> [events] at end of input.

    `base_offset` is the absolute offset of the first byte fed (e.g. SEGMENT_HEADER_BYTES when
    feeding a segment file after its header). Buffered bytes never exceed about
    max_record_bytes + header + the last chunk fed.
    """

    __slots__ = (
        "max_record_bytes",
        "direct_check_bytes",
        "_buf",
        "_start",
        "_pos",
        "_resync",
        "_cand",
        "_region_nonzero",
        "_ended",
        "_prefix",
        "_cand_re",
        "records",
        "corrupt_ranges",
        "corrupt_bytes",
        "torn_bytes",
    )

    def __init__(
        self,
        base_offset: int = 0,
        *,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        direct_check_bytes: int = DEFAULT_DIRECT_CHECK_BYTES,
    ):
        self.max_record_bytes = check_max_record_bytes(max_record_bytes)
        self.direct_check_bytes = max(0, int(direct_check_bytes))
        self._buf = bytearray()
        self._start = base_offset  # absolute offset of _buf[0]
        self._pos = base_offset  # next record start; while resyncing, start of the damage
        self._resync: str | None = None  # reason while resynchronising, else None
        self._cand = base_offset  # next candidate position while resynchronising
        self._region_nonzero = False  # a dropped byte of the current damaged range was nonzero
        self._ended = False
        self._prefix = _PrefixTable()
        self._cand_re = _candidate_regex(self.max_record_bytes)
        self.records = 0
        self.corrupt_ranges = 0
        self.corrupt_bytes = 0
        self.torn_bytes = 0

    @property
    def offset(self) -> int:
        """Absolute offset of the first byte not yet resolved into an event."""
        return self._pos

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    @property
    def stats(self) -> dict:
        return {
            "records": self.records,
            "corrupt_ranges": self.corrupt_ranges,
            "corrupt_bytes": self.corrupt_bytes,
            "torn_bytes": self.torn_bytes,
        }

    def feed(self, data) -> list:
        """Add bytes; return the events they complete (possibly none)."""
        if self._ended:
            raise RuntimeError("RecordReader.feed() after end()")
        if data:
            self._buf += data
        return self._advance(False)

    def end(self) -> list:
        """End of input: resolve what is left into records, Corrupt and/or a TornTail."""
        if self._ended:
            return []
        self._ended = True
        return self._advance(True)

    # -- internals ---------------------------------------------------------------------------

    def _payload_if_valid(self, a: int, e: int, crc: int):
        """The payload bytes [a, e) if their CRC-32C is `crc`, else None."""
        s = self._start
        if e - a <= self.direct_check_bytes:
            payload = bytes(self._buf[a - s : e - s])
            return payload if crc32c(payload) == crc else None
        if self._prefix.crc(self._buf, s, a, e) != crc:
            return None
        return bytes(self._buf[a - s : e - s])

    def _enter_resync(self, reason: str) -> None:
        self._resync = reason
        self._cand = self._pos + 1
        self._region_nonzero = False

    def _advance(self, final: bool) -> list:
        events: list = []
        buf = self._buf
        maxlen = self.max_record_bytes
        unpack = _HEADER.unpack_from
        while True:
            start = self._start
            end = start + len(buf)
            if self._resync is None:
                p = self._pos
                avail = end - p
                if avail < RECORD_HEADER_BYTES:
                    if final and avail > 0:
                        self._torn(events, p, avail)
                        self._pos = end
                    break
                length, crc = unpack(buf, p - start)
                if length < 1 or length > maxlen:
                    self._enter_resync(REASON_BAD_LENGTH)
                    continue
                stop = p + RECORD_HEADER_BYTES + length
                if stop > end:
                    if not final:
                        break
                    self._enter_resync(REASON_OVERRUN)
                    continue
                payload = self._payload_if_valid(p + RECORD_HEADER_BYTES, stop, crc)
                if payload is None:
                    self._enter_resync(REASON_BAD_CRC)
                    continue
                events.append(Record(p, payload))
                self.records += 1
                self._pos = stop
                continue
            # Resynchronising: look for the next position holding a valid record.
            m = self._cand_re.search(buf, self._cand - start)
            if m is None:
                if final:
                    self._damaged_tail(events, end)
                    break
                # The last 3 bytes may still begin a header once more bytes arrive.
                self._cand = max(self._cand, end - 3)
                break
            q = start + m.start()
            self._cand = q
            if end - q < RECORD_HEADER_BYTES:
                if final:
                    self._cand = q + 1
                    continue
                break
            length, crc = unpack(buf, q - start)
            if length < 1 or length > maxlen:
                self._cand = q + 1
                continue
            stop = q + RECORD_HEADER_BYTES + length
            if stop > end:
                if final:
                    self._cand = q + 1
                    continue
                break
            payload = self._payload_if_valid(q + RECORD_HEADER_BYTES, stop, crc)
            if payload is None:
                self._cand = q + 1
                continue
            events.append(Corrupt(self._pos, q - self._pos, self._resync))
            self.corrupt_ranges += 1
            self.corrupt_bytes += q - self._pos
            self._resync = None
            events.append(Record(q, payload))
            self.records += 1
            self._pos = stop
        self._compact()
        return events

    def _torn(self, events: list, offset: int, length: int) -> None:
        events.append(TornTail(offset, length))
        self.torn_bytes += length

    def _damaged_tail(self, events: list, end: int) -> None:
        # Nothing valid follows the damage. A range that overran the input, or holds only zero
        # bytes, is what an interrupted write leaves (torn); anything else is corruption.
        p = self._pos
        length = end - p
        s = self._start
        nonzero = self._region_nonzero or _NONZERO.search(self._buf, max(p - s, 0)) is not None
        if self._resync == REASON_OVERRUN or not nonzero:
            self._torn(events, p, length)
        else:
            events.append(Corrupt(p, length, self._resync))
            self.corrupt_ranges += 1
            self.corrupt_bytes += length
        self._resync = None
        self._pos = end

    def _compact(self) -> None:
        keep = self._cand if self._resync is not None else self._pos
        drop = keep - self._start
        if drop <= 0:
            return
        buf = self._buf
        if drop >= len(buf) or drop >= _COMPACT_BYTES:
            if self._resync is not None and not self._region_nonzero:
                lo = max(self._pos - self._start, 0)
                if lo < drop and _NONZERO.search(buf, lo, drop) is not None:
                    self._region_nonzero = True
            del buf[:drop]
            self._start = keep
        self._prefix.trim(keep)


def scan(
    buffer,
    base_offset: int = 0,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    final: bool = True,
) -> Iterator[Event]:
    """Yield the events of one buffer. With final=False, an incomplete last record is simply
    not reported (more bytes may follow); with final=True it becomes a TornTail."""
    reader = RecordReader(base_offset, max_record_bytes=max_record_bytes)
    view = memoryview(buffer).cast("B")
    try:
        for i in range(0, len(view), SCAN_SLICE_BYTES):
            yield from reader.feed(view[i : i + SCAN_SLICE_BYTES])
        if final:
            yield from reader.end()
    finally:
        view.release()
