"""On-disk names and small encodings of the WAL's file layer (no I/O here).

* Segment files are named `wal-<base seq as 16 hex digits>.seg` (`segment_name`,
  `parse_segment_name`), so a plain sort orders them.
* A log record's payload is the CBOR array `[seq, body]` with the body a byte string
  (`wrap_payload`, `unwrap_payload`, and `payload_seq`, which reads only the seq -- recovery's hot
  path). The seq inside every record is what keeps a record's identity when damage removes a
  neighbour; see fluxrig/wal/log.py.
* The cursor file holds `b"FLUXCUR\\0" | seq u64 BE | crc32c u32 BE` (20 bytes)
  (`encode_cursor`, `decode_cursor`, which returns None for anything damaged).

Parsers raise ValueError (payloads) or return None (cursor) on any malformed input; nothing
here can raise anything else on arbitrary bytes.
"""

from __future__ import annotations

import struct

from fluxrig.wal.checksum import crc32c
from fluxrig.wal.record import RECORD_HEADER_BYTES

__all__ = [
    "SEGMENT_PREFIX",
    "SEGMENT_SUFFIX",
    "CURSOR_FILE",
    "LOCK_FILE",
    "CURSOR_BYTES",
    "MIN_RECORD_BYTES",
    "segment_name",
    "parse_segment_name",
    "wrap_payload",
    "unwrap_payload",
    "payload_seq",
    "encode_cursor",
    "decode_cursor",
]

SEGMENT_PREFIX, SEGMENT_SUFFIX = "wal-", ".seg"
CURSOR_FILE, LOCK_FILE = "wal.cursor", "wal.lock"
_CURSOR = struct.Struct(">8sQI")
_CURSOR_MAGIC = b"FLUXCUR\x00"
CURSOR_BYTES = _CURSOR.size
#: Smallest record on disk: header + [seq, b""] (3 bytes); bounds how many seqs a damaged
#: tail could have held.
MIN_RECORD_BYTES = RECORD_HEADER_BYTES + 3


def segment_name(base_seq: int) -> str:
    return f"{SEGMENT_PREFIX}{base_seq:016x}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str):
    if not (name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)):
        return None
    digits = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
    if len(digits) != 16:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


def _read_head(p: bytes, i: int):
    """(major, value, next index) of the CBOR head at p[i]; ValueError if malformed."""
    if i >= len(p):
        raise ValueError("truncated CBOR head")
    ib = p[i]
    major, info = ib >> 5, ib & 31
    if info < 24:
        return major, info, i + 1
    if info > 27:
        raise ValueError("indefinite or reserved CBOR length")
    size = 1 << (info - 24)
    if i + 1 + size > len(p):
        raise ValueError("truncated CBOR head")
    return major, int.from_bytes(p[i + 1 : i + 1 + size], "big"), i + 1 + size


def wrap_payload(seq: int, body: bytes) -> bytes:
    """The record payload the log writes: CBOR [seq, body-as-byte-string]."""
    return b"\x82" + _cbor_head(0, seq) + _cbor_head(2, len(body)) + body


def unwrap_payload(payload: bytes):
    """(seq, body) from a log record payload; ValueError if it is not [uint, bytes]."""
    if len(payload) < 3 or payload[0] != 0x82:
        raise ValueError("not a WAL log payload")
    major, seq, i = _read_head(payload, 1)
    if major != 0:
        raise ValueError("seq is not an unsigned integer")
    major, n, i = _read_head(payload, i)
    if major != 2 or i + n != len(payload):
        raise ValueError("body is not one byte string filling the record")
    return seq, payload[i:]


def payload_seq(payload: bytes) -> int:
    """The seq of a log record payload without copying its body (recovery's hot path);
    ValueError if the payload is not [uint, bytes filling the record]."""
    if len(payload) < 3 or payload[0] != 0x82:
        raise ValueError("not a WAL log payload")
    head = payload[1]
    if head < 24:  # small seq: one byte
        seq, i = head, 2
    else:
        major, seq, i = _read_head(payload, 1)
        if major != 0:
            raise ValueError("seq is not an unsigned integer")
    major, n, i = _read_head(payload, i)
    if major != 2 or i + n != len(payload):
        raise ValueError("body is not one byte string filling the record")
    return seq


def encode_cursor(seq: int) -> bytes:
    head = _CURSOR.pack(_CURSOR_MAGIC, seq, 0)[:-4]
    return head + struct.pack(">I", crc32c(head))


def decode_cursor(data: bytes):
    """The seq in a cursor file's bytes, or None if they are not exactly a valid cursor."""
    if len(data) != CURSOR_BYTES:
        return None
    magic, seq, crc = _CURSOR.unpack(data)
    if magic != _CURSOR_MAGIC or crc32c(data[:-4]) != crc:
        return None
    return seq
