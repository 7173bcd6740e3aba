"""On-disk names and small encodings of the WAL's file layer (no I/O here).

* Segment files are named `wal-<base seq as 16 hex digits>.seg` (`segment_name`,
  `parse_segment_name`), so a plain sort orders them.
* A log record's payload is the CBOR array `[seq, body]` with the body a byte string
  (`wrap_payload`, `unwrap_payload`, and `payload_seq`, which reads only the seq -- recovery's hot
  path). The seq inside every record is what keeps a record's identity when damage removes a
  neighbour; see fluxrig/wal/log.py.
* `decode_indexed` reads the records at offsets the Wal's index already knows (its read path):
  each record's length and CRC-32C are checked and its payload must be `[seq, body]` with the
  seq the index expects, without rescanning for record boundaries.
* The cursor file holds `b"FLUXCUR\\0" | seq u64 BE | crc32c u32 BE` (20 bytes)
  (`encode_cursor`, `decode_cursor`, which returns None for anything damaged).

Parsers raise ValueError (payloads) or return None (cursor) on any malformed input; nothing
here can raise anything else on arbitrary bytes.
"""

from __future__ import annotations

import struct

from fluxrig.wal.crc32c import crc32c
from fluxrig.wal.record import RECORD_HEADER_BYTES

_RECORD_HEADER = struct.Struct(">II")
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from

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
    "decode_indexed",
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


def decode_indexed(data: bytes, base: int, offsets, seqs, make) -> tuple[list, list]:
    """The records at known offsets of `data` (file bytes starting at file offset `base`).

    `offsets` and `seqs` are the index's entries (ascending) for records inside `data`. Returns
    ([make(seq, body), ...], [seq, ...]): the records that are intact, and the seqs whose bytes
    no longer hold their record (length, CRC-32C, payload shape or seq differ: changed on disk
    since the index was built). Never raises on any bytes.

    Cost: one struct unpack, one CRC over the payload (compiled twin) and one body slice per
    record. The previous path fed the span through RecordReader (a copy per record, a Record
    per record, a dict of wanted offsets). bench/wal.py read_from_us_per_record, 256-byte
    bodies: 7.2 -> 4.8 us, of which the CRC call is ~1 us (mostly its fixed per-call cost)."""
    out: list = []
    lost: list = []
    size = len(data)
    view = memoryview(data)
    unpack = _RECORD_HEADER.unpack_from
    append = out.append
    hdr = RECORD_HEADER_BYTES
    for off, seq in zip(offsets, seqs):
        p = off - base
        if p < 0 or p + hdr > size:
            lost.append(seq)
            continue
        length, crc = unpack(data, p)
        q = p + hdr
        e = q + length
        if length < 3 or e > size or data[q] != 0x82 or crc32c(view[q:e]) != crc:
            lost.append(seq)
            continue
        try:  # the heads below may claim more bytes than the record holds
            h = data[q + 1]
            if h < 24:
                rseq, i = h, q + 2
            elif h == 0x1A:
                rseq, i = _U32(data, q + 2)[0], q + 6
            elif h == 0x18:
                rseq, i = data[q + 2], q + 3
            elif h == 0x19:
                rseq, i = _U16(data, q + 2)[0], q + 4
            elif h == 0x1B:
                rseq, i = _U64(data, q + 2)[0], q + 10
            else:
                rseq, i = -1, e
            b = data[i] if i < e else 0
            if b < 0x58:  # a byte string, its length in the head byte (anything below: not one)
                n, j = b - 0x40, i + 1
            elif b == 0x58:
                n, j = data[i + 1], i + 2
            elif b == 0x59:
                n, j = _U16(data, i + 1)[0], i + 3
            elif b == 0x5A:
                n, j = _U32(data, i + 1)[0], i + 5
            else:
                n, j = -1, 0
        except (IndexError, struct.error):
            rseq, n, j = -1, -1, 0
        if rseq != seq or n < 0 or j + n != e:
            lost.append(seq)
            continue
        append(make(seq, data[j:e]))
    view.release()
    return out, lost


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
