"""Recovery of a WAL directory on open: scan, repair, count -- never ask a human.

`recover(wal)` runs once from `Wal.__init__` (it fills the Wal's index and state; it is the
Wal's own code kept in a module of its own). It:

* takes the directory lock (writers only; `readonly` inspection neither locks nor repairs);
* reads the cursor (`read_cursor`; a damaged one restarts from the oldest record, which is then
  re-sent and deduplicated upstream by id);
* deletes, unscanned, every segment whose records all lie at or below the cursor;
* scans every other segment with the sans-IO RecordReader (`scan_segment`): valid records whose
  seq is in order are indexed; damaged ranges and out-of-order records are counted and skipped;
  whatever follows the last valid record (a torn tail, a zero-filled tail, damage) is truncated;
* rewrites the header of a last segment whose creation was interrupted and removes an earlier
  one (neither can hold a record);
* sets the next seq past everything that existed, including what a damaged tail could have held
  (its bytes / the smallest record size), so no seq is ever reused for a different record.

The outcome is a `RecoverySummary`.
"""

from __future__ import annotations

import fcntl
import os
import time
from array import array
from typing import NamedTuple

from fluxrig.wal.errors import WalError, WalLocked
from fluxrig.wal.health import PROBE_FILE
from fluxrig.wal.layout import (
    CURSOR_BYTES,
    CURSOR_FILE,
    LOCK_FILE,
    MIN_RECORD_BYTES,
    decode_cursor,
    parse_segment_name,
    payload_seq,
)
from fluxrig.wal.record import (
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    Corrupt,
    Record,
    RecordReader,
    SegmentHeaderError,
    TornTail,
    parse_segment_header,
)

__all__ = [
    "RecoverySummary",
    "SegmentIndex",
    "recover",
    "scan_segment",
    "read_cursor",
    "RECOVERY_CHUNK_BYTES",
    "FIRST_SEQ",
]

#: Segments are read in chunks of this size (memory stays flat whatever the segment size).
RECOVERY_CHUNK_BYTES = 1024 * 1024
#: Seqs start here; a cursor of FIRST_SEQ - 1 means nothing is acknowledged.
FIRST_SEQ = 1


class RecoverySummary(NamedTuple):
    segments: int
    records_ok: int
    torn_bytes_truncated: int
    corrupt_records_skipped: int
    corrupt_bytes_skipped: int
    segments_deleted: int
    segments_repaired: int
    headers_damaged: int
    cursor: int
    cursor_reset: bool
    next_seq: int
    wal_id: str
    readonly: bool
    seconds: float

    def as_dict(self) -> dict:
        return self._asdict()


class SegmentIndex:
    """One segment file's committed size and the (seq, offset) of each valid record in it."""

    __slots__ = ("base", "path", "size", "seqs", "offsets")

    def __init__(self, base: int, path: str, size: int):
        self.base = base
        self.path = path
        self.size = size  # committed bytes, header included
        self.seqs = array("Q")
        self.offsets = array("Q")


def recover(wal) -> RecoverySummary:
    """Scan and repair `wal.directory`, filling the Wal's index and counters (see above)."""
    t0 = time.monotonic()
    d = wal.directory
    if wal.readonly:
        if not os.path.isdir(d):
            raise WalError(f"WAL directory {d} does not exist")
    else:
        os.makedirs(d, exist_ok=True)
        wal._lock_fd = os.open(os.path.join(d, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(wal._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WalLocked(os.path.join(d, LOCK_FILE)) from None
        for stale in (CURSOR_FILE + ".tmp", PROBE_FILE):  # a crash mid-write left it
            try:
                os.unlink(os.path.join(d, stale))
            except FileNotFoundError:
                pass
    cursor, cursor_reset = read_cursor(wal.directory)
    names = sorted((b, n) for n in os.listdir(d) if (b := parse_segment_name(n)) is not None)
    c = dict.fromkeys(("records", "torn", "corrupt", "corrupt_bytes", "deleted", "repaired", "headers"), 0)
    wal_id = None
    tail_damage = 0
    rewrite_last_header = False
    for idx, (base, name) in enumerate(names):
        last = idx == len(names) - 1
        next_base = None if last else names[idx + 1][0]
        path = os.path.join(d, name)
        if not last and cursor is not None and next_base - 1 <= cursor and not wal.readonly:
            os.unlink(path)  # every record in it is below the cursor
            c["deleted"] += 1
            continue
        with open(path, "rb") as fh:
            head = fh.read(SEGMENT_HEADER_BYTES)
            try:
                h = parse_segment_header(head, name)
                wal_id = h.wal_id
                if h.base_seq != base:
                    c["headers"] += 1
            except SegmentHeaderError:
                c["headers"] += 1
                if len(head) < SEGMENT_HEADER_BYTES:  # creation interrupted: holds no record
                    c["repaired"] += 1
                    if last:
                        rewrite_last_header = True
                    elif not wal.readonly:
                        os.unlink(path)
                        continue
            seg = SegmentIndex(base, path, SEGMENT_HEADER_BYTES)
            valid_end, size = scan_segment(fh, seg, next_base, wal.max_record_bytes, c)
        if last:
            tail_damage = max(size - valid_end, 0)
        if size > valid_end and not wal.readonly and not rewrite_last_header:
            with open(path, "r+b") as fh:
                fh.truncate(valid_end)
                fh.flush()
                os.fsync(fh.fileno())
        seg.size = valid_end
        wal._segments.append(seg)
        wal._bases.append(base)
        wal._size += valid_end
    wal.wal_id = wal_id or os.urandom(16)
    max_seen = FIRST_SEQ - 1
    for seg in wal._segments:
        max_seen = max(max_seen, seg.seqs[-1] if seg.seqs else seg.base - 1)
    bump = -(-tail_damage // MIN_RECORD_BYTES)  # seqs the damaged tail could have held
    first_base = wal._segments[0].base if wal._segments else FIRST_SEQ
    if cursor is None:
        cursor = max(first_base - 1, FIRST_SEQ - 1)
    wal._cursor = wal._persisted = cursor
    wal._next_seq = max(max_seen + 1 + bump, cursor + 1, FIRST_SEQ)
    if wal._segments:
        wal._next_seq = max(wal._next_seq, wal._segments[-1].base)
    wal._committed = wal._next_seq - 1
    if not wal.readonly:
        wal._open_active(rewrite_last_header)
        before = wal._m["deleted_segments"]
        wal._delete_acked()
        c["deleted"] += wal._m["deleted_segments"] - before
        wal._m["deleted_segments"] = before
        if wal.max_size_bytes is not None and wal._size > wal.max_size_bytes:
            wal._enforce_cap()
    return RecoverySummary(
        segments=len(wal._segments),
        records_ok=c["records"],
        torn_bytes_truncated=c["torn"],
        corrupt_records_skipped=c["corrupt"],
        corrupt_bytes_skipped=c["corrupt_bytes"],
        segments_deleted=c["deleted"],
        segments_repaired=c["repaired"],
        headers_damaged=c["headers"],
        cursor=wal._cursor,
        cursor_reset=cursor_reset,
        next_seq=wal._next_seq,
        wal_id=wal.wal_id.hex(),
        readonly=wal.readonly,
        seconds=round(time.monotonic() - t0, 6),
    )


def scan_segment(fh, seg: SegmentIndex, next_base, max_record_bytes: int, c: dict):
    """Index one segment's valid records; returns (end of the last valid record, size)."""
    reader = RecordReader(SEGMENT_HEADER_BYTES, max_record_bytes=max_record_bytes)
    prev = seg.base - 1
    valid_end = SEGMENT_HEADER_BYTES
    size = SEGMENT_HEADER_BYTES
    while True:
        chunk = fh.read(RECOVERY_CHUNK_BYTES)
        size += len(chunk)
        for ev in reader.feed(chunk) if chunk else reader.end():
            kind = type(ev)
            if kind is Record:
                try:
                    seq = payload_seq(ev.payload)
                except ValueError:
                    seq = None
                if seq is None or seq <= prev or (next_base is not None and seq >= next_base):
                    c["corrupt"] += 1  # CRC-valid but not ours or out of order
                    c["corrupt_bytes"] += RECORD_HEADER_BYTES + len(ev.payload)
                    continue
                seg.seqs.append(seq)
                seg.offsets.append(ev.offset)
                prev = seq
                valid_end = ev.offset + RECORD_HEADER_BYTES + len(ev.payload)
                c["records"] += 1
            elif kind is Corrupt:
                c["corrupt"] += 1
                c["corrupt_bytes"] += ev.length
            elif kind is TornTail:
                c["torn"] += ev.length
        if not chunk:
            return valid_end, size


def read_cursor(directory: str):
    try:
        with open(os.path.join(directory, CURSOR_FILE), "rb") as fh:
            data = fh.read(CURSOR_BYTES + 1)
    except FileNotFoundError:
        return None, False
    seq = decode_cursor(data)
    # damaged: start from the oldest record (re-sent, deduplicated upstream by id)
    return seq, seq is None
