"""Guaranteed-lane batches on `flux.msg.<rack>.<gear>.<port>`: the wire format, sans-IO.

One JetStream message carries many lane records of one subject (the pump in
fluxrig/agent/publisher.py cuts them), so the Snake's one-fsync-per-publish ceiling is paid
once per batch instead of once per message. The payload is one CBOR array:

    [LANE_BATCH_VERSION, [record id, FluxMsg CBOR], [record id, FluxMsg CBOR], ...]

    version      unsigned integer, 1 today; a receiver refuses any other (LaneBatchError)
    record id    text, 1..MAX_RECORD_ID_LEN bytes: the message's dedup id
                 (fluxrig.runtime.bus.dedup_id). The receiver remembers processed ids, so a
                 record that arrives again, in a re-sent batch or in a batch cut with other
                 boundaries after a crash, is processed once.
    FluxMsg      a byte string holding the message's own CBOR (FluxMsg.to_cbor), carried as
                 bytes so the sender copies it from its lane WAL without decoding it.

Batch headers (set by the publisher, not part of the payload): `Nats-Msg-Id` = `batch_msg_id`
(identical for an identical re-send, so JetStream's duplicate window drops it).

A message that is not an array (a CBOR map) is a single FluxMsg as sent before batching:
`is_lane_batch` tells them apart, so a receiver reads a stream that holds both.

Limits: at most `max_records` records (MAX_BATCH_RECORDS) per batch and MAX_BATCH_BYTES per
payload (under the Snake's max_payload, 8 MiB, with room for headers). Decode errors are
`LaneBatchError` (a RemoteProtocolError) naming the byte offset of the item at fault and
its record index; encode refuses what a receiver would refuse with `LaneBatchLimit`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import cbor2

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "LANE_BATCH_VERSION",
    "MAX_BATCH_RECORDS",
    "MAX_BATCH_BYTES",
    "MAX_RECORD_ID_LEN",
    "LaneBatchError",
    "LaneBatchLimit",
    "encode_lane_batch",
    "decode_lane_batch",
    "is_lane_batch",
    "batch_msg_id",
    "record_overhead",
]

LANE_BATCH_VERSION = 1
#: Records per batch a receiver accepts (the sender's own cap is lower, see publisher.py).
MAX_BATCH_RECORDS = 8192
#: Payload bytes per batch: the Snake's max_payload is 8 MiB; headers and slack stay under it.
MAX_BATCH_BYTES = 7 * 1024 * 1024
MAX_RECORD_ID_LEN = 256
_ARRAY = 4  # CBOR major type of an array


class LaneBatchError(RemoteProtocolError):
    """A lane batch that does not decode: `offset` is the byte offset of the item at fault,
    `index` the record's position (None for the batch itself), `limit` the limit exceeded."""

    def __init__(self, message: str, offset: int | None = None, index: int | None = None, limit: int | None = None):
        self.index = index
        self.limit = limit
        where = f"record {index}: " if index is not None else ""
        super().__init__(where + message, offset)


class LaneBatchLimit(LocalProtocolError):
    """Asked to encode a batch a receiver would refuse; `limit` and `size` say which and by how much."""

    def __init__(self, what: str, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(f"lane batch {what} {size} exceeds {limit}")


def record_overhead(record_id: str) -> int:
    """Bytes a record adds to a batch beyond its message CBOR (headers of the pair, id, body):
    what the publisher adds up to keep a batch under its byte cap."""
    return len(record_id) + 12


def is_lane_batch(data: bytes) -> bool:
    """True when `data` is a batch (a CBOR array); False for a single FluxMsg (a CBOR map)."""
    return bool(data) and data[0] >> 5 == _ARRAY


def encode_lane_batch(records: Sequence[tuple[str, bytes]], max_records: int = MAX_BATCH_RECORDS) -> bytes:
    """The payload of one batch: `records` are (record id, FluxMsg CBOR) in order.
    Raises LaneBatchLimit for an empty batch, too many records or too many bytes."""
    n = len(records)
    if not 0 < n <= max_records:
        raise LaneBatchLimit("record count", n, max_records)
    data = cbor2.dumps([LANE_BATCH_VERSION, *records])
    if len(data) > MAX_BATCH_BYTES:
        raise LaneBatchLimit("size in bytes", len(data), MAX_BATCH_BYTES)
    return data


def decode_lane_batch(data: bytes, max_records: int = MAX_BATCH_RECORDS) -> list[tuple[str, bytes]]:
    """(record id, FluxMsg CBOR) pairs of a batch, in order. Raises LaneBatchError (with the
    offset of the item at fault) for bytes that are not a version-1 batch: not CBOR, not an
    array, trailing bytes, an unknown version, a record that is not [text id, bytes], or past
    `max_records` / MAX_BATCH_BYTES."""
    data = bytes(data)
    if len(data) > MAX_BATCH_BYTES:
        raise LaneBatchError(f"batch of {len(data)} bytes", 0, limit=MAX_BATCH_BYTES)
    if not is_lane_batch(data):
        raise LaneBatchError("a lane batch is a CBOR array", 0)
    fp = io.BytesIO(data)
    try:
        items = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises several types for bad bytes: find the item at fault
        raise _locate(data, f"not CBOR ({exc})") from None
    if fp.tell() != len(data):
        raise LaneBatchError(f"{len(data) - fp.tell()} trailing bytes after the batch", fp.tell())
    if not items:
        raise LaneBatchError("empty array (no version)", 0)
    version = items[0]
    if type(version) is not int or version != LANE_BATCH_VERSION:
        raise LaneBatchError(f"version {version!r} is not {LANE_BATCH_VERSION}", _offsets(data)[0])
    n = len(items) - 1
    if n > max_records:
        raise LaneBatchError(f"{n} records", _offsets(data)[max_records + 1], max_records, max_records)
    out = []
    for i in range(1, len(items)):
        rec = items[i]
        if (
            type(rec) is not list
            or len(rec) != 2
            or type(rec[0]) is not str
            or type(rec[1]) is not bytes
            or not 0 < len(rec[0]) <= MAX_RECORD_ID_LEN
        ):
            raise LaneBatchError(
                f"a record is [id text of 1..{MAX_RECORD_ID_LEN}, FluxMsg bytes], got {_shape(rec)}",
                _offsets(data)[i],
                i - 1,
            )
        out.append((rec[0], rec[1]))
    return out


def batch_msg_id(wal_id: str, first_seq: int, last_seq: int, count: int) -> str:
    """The Nats-Msg-Id of a batch of lane-WAL records: the same records always give the same
    id (a re-send is dropped by JetStream's duplicate window). Seqs are unique within the WAL
    and a batch holds one subject's consecutive unacknowledged records, so (first, last,
    count) names its members."""
    return f"L-{wal_id}-{first_seq}-{last_seq}-{count}"


# -- error location (only on the error path: the fast path is one C decode) ------------------


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the CBOR item at `pos`."""
    if pos >= len(data):
        raise LaneBatchError("truncated", pos)
    ib = data[pos]
    major, info = ib >> 5, ib & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info > 27:
        raise LaneBatchError("indefinite or reserved length", pos)
    size = 1 << (info - 24)
    if pos + 1 + size > len(data):
        raise LaneBatchError("truncated head", pos)
    return major, int.from_bytes(data[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


def _offsets(data: bytes) -> list[int]:
    """Byte offset of each element of the top-level array (decoding them one by one)."""
    major, count, pos = _head(data, 0)
    if major != _ARRAY:
        raise LaneBatchError("a lane batch is a CBOR array", 0)
    fp = io.BytesIO(data)
    fp.seek(pos)
    dec = cbor2.CBORDecoder(fp)
    offsets = []
    for i in range(count):
        start = fp.tell()
        offsets.append(start)
        try:
            dec.decode()
        except Exception as exc:
            raise LaneBatchError(f"not CBOR ({exc})", start, i - 1 if i else None) from None
    return offsets


def _locate(data: bytes, message: str) -> LaneBatchError:
    try:
        _offsets(data)
    except LaneBatchError as exc:
        return exc
    return LaneBatchError(message, 0)


def _shape(value) -> str:
    if type(value) is list:
        return "[" + ", ".join(type(v).__name__ for v in value[:3]) + (", ..." if len(value) > 3 else "") + "]"
    return type(value).__name__
