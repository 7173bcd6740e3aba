"""The Rack's write-ahead log on disk: segments, group commit, cursor, recovery, size cap.

Job: hold telemetry (and guaranteed-lane messages) on local disk until the shipper has them
acknowledged upstream, survive any crash without a human, and say precisely when a record is
safe. Blocking file I/O lives here; `fluxrig.wal.aio.AsyncWal` drives it from asyncio.

Directory layout::

    wal-<base seq, 16 hex digits>.seg   segment: 40-byte header + records (fluxrig/wal/record.py)
    wal.cursor                          highest contiguously acknowledged seq (20 bytes incl. CRC)
    wal.lock                            flock held while a writer has the WAL open

(names and small codecs: fluxrig/wal/layout.py; the scan and repair on open:
fluxrig/wal/recovery.py; acknowledgements and the cursor: fluxrig/wal/acks.py; the read path: fluxrig/wal/reads.py; healing after a write
failure: fluxrig/wal/health.py; errors: fluxrig/wal/errors.py.)

Sequence numbers start at 1 and only grow. Each record's payload is the CBOR array
`[seq, body]` (body a byte string), so a record keeps its number even if damage elsewhere in
its segment removes a neighbour -- numbering by position would silently renumber every later
record, breaking dedup ids and the cursor. The segment's base seq (file name and header) is the
seq of its first record. `wal_id` (16 random bytes in every segment header, kept across
restarts) names this WAL's incarnation: the shipper's dedup id is `<wal_id>-<seq>`, so a wiped
directory can never collide with ids the Mixer already holds.

Fsync policy (`store.wal_fsync`), i.e. when an append is *acknowledged* (the AsyncWal future
resolves, `committed_seq` covers it, `read_from` shows it):

* `always` -- after an fdatasync covering the record. Appends that arrive while an fsync is in
  flight share the next one (group commit), so concurrent appenders pay one fsync per batch.
* `batch` (default) -- records are written and fdatasync-ed once per window
  (`batch_window_ms`, default 50, at most 100) counted from the first record waiting; each is
  acknowledged after that batch's fsync. A crash loses only unacknowledged records.
* `never` -- acknowledged once written to the OS (no fsync): survives a process crash or
  SIGKILL, not a power cut or kernel crash. For disposable telemetry only.

An fsync or write error is never retried or guessed around (after a failed fsync the kernel
may have dropped the dirty pages): the Wal turns failed, every pending and later append raises
WalFailed (records of the failed group already written before it stand: `WalFailed.committed`),
and `heal()` is the way back without a restart (fluxrig/wal/health.py: re-probe the
filesystem, cut the active segment back to its last good commit, reopen; AsyncWal calls it
every `heal_interval` while failed). Opening on a full disk raises WalOpenFailed, never a bare
OSError. A cursor write refused for lack of space still frees space: fully acknowledged
segments are deleted on the in-memory cursor (safe: the active segment, always kept, holds the
seq high-water mark, and a stale cursor only re-sends records, deduplicated upstream).

The cursor advances only on `ack(seq)`, `ack_range(first, last)` or `ack_many(seqs)`; acks
may come in any order and the cursor is the highest seq such that every existing record up to
it is acknowledged (seqs that no longer exist -- damaged or dropped -- do not hold it back).
Acknowledged seqs above the cursor are held as ranges (fluxrig/wal/acks.py), so acking a batch
of consecutive seqs costs a few bisects, not a set insert per record (5 us -> 0.15 us/record). It is persisted atomically (temp file + fsync +
rename + directory fsync) by `persist_cursor()`, and only then are fully acknowledged segments
deleted, so a crash can leave a stale cursor (records re-sent, deduplicated upstream by id) but
never a cursor ahead of the acknowledgements or a segment lost before its cursor was durable.

Recovery on open never needs a human: every segment is scanned, a torn tail (an interrupted
write, or a zero-filled tail) is truncated, damaged ranges are skipped and counted, a record
whose seq is out of order is counted as corrupt, a segment whose creation was interrupted is
rewritten or removed, and the next seq skips past anything the damaged tail could have held.
`recovery` (a RecoverySummary) says what was found.

Size cap `max_size_bytes` (`store.wal_max_size_mb`): after a commit, while the segments exceed
it, the oldest segment is deleted even if unacknowledged and its unacknowledged records are
counted in `dropped_records` (and logged at ERROR, one line per segment). The cap may be overshot by one batch; segments are clamped to at
most a quarter of the cap so dropping stays fine-grained.

Threads: every method is thread-safe. In-memory state sits behind one short lock; file writes,
fsyncs and rotation run under a separate commit lock, so `stage()` and `ack()` never wait on a
disk. Raises: WalError subclasses (WalFailed, WalFull, WalClosed, WalReadOnly, WalLocked),
RecordSizeError, ConfigError for bad parameters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_left, bisect_right
from typing import NamedTuple

import cbor2

from fluxrig.errors import ConfigError
from fluxrig.wal.acks import AckIndex, AckRanges
from fluxrig.wal.crc32c import BACKEND
from fluxrig.wal.errors import WalClosed, WalFailed, WalFull, WalLocked, WalOpenFailed, WalReadOnly
from fluxrig.wal.health import PROBE_BYTES, SPACE_ERRNOS, heal
from fluxrig.wal.layout import CURSOR_FILE, encode_cursor, segment_name, wrap_payload
from fluxrig.wal.reads import DEFAULT_READ_MAX_BYTES, ReadPath
from fluxrig.wal.record import (
    DEFAULT_MAX_RECORD_BYTES,
    SEGMENT_HEADER_BYTES,
    check_max_record_bytes,
    encode_record,
    encode_segment_header,
)
from fluxrig.wal.recovery import FIRST_SEQ, RecoverySummary, SegmentIndex, recover

__all__ = [
    "FSYNC_ALWAYS",
    "FSYNC_BATCH",
    "FSYNC_NEVER",
    "FSYNC_POLICIES",
    "DEFAULT_BATCH_WINDOW_MS",
    "MAX_BATCH_WINDOW_MS",
    "DEFAULT_SEGMENT_BYTES",
    "MIN_SEGMENT_BYTES",
    "DEFAULT_MAX_SIZE_BYTES",
    "DEFAULT_MAX_PENDING_BYTES",
    "DEFAULT_READ_MAX_BYTES",
    "FIRST_SEQ",
    "WalFailed",
    "WalOpenFailed",
    "WalFull",
    "WalClosed",
    "WalReadOnly",
    "WalLocked",
    "WalRecord",
    "RecoverySummary",
    "Wal",
    "segment_name",
    "options_from_config",
]

FSYNC_ALWAYS, FSYNC_BATCH, FSYNC_NEVER = "always", "batch", "never"
FSYNC_POLICIES = (FSYNC_ALWAYS, FSYNC_BATCH, FSYNC_NEVER)
DEFAULT_BATCH_WINDOW_MS = 50
MAX_BATCH_WINDOW_MS = 100
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
MIN_SEGMENT_BYTES = 64 * 1024
DEFAULT_MAX_SIZE_BYTES = 500 * 1024 * 1024  # store.wal_max_size_mb default
#: Staged (accepted, not yet written) bytes; past it stage() raises WalFull (backpressure).
DEFAULT_MAX_PENDING_BYTES = 16 * 1024 * 1024
log = logging.getLogger("fluxrig.wal")
_datasync = getattr(os, "fdatasync", os.fsync)


class WalRecord(NamedTuple):
    """One record as the shipper sees it: its seq and the body bytes that were appended."""

    seq: int
    payload: bytes

    def decode(self):
        """The body as a Python object (it is CBOR when append() was given an object)."""
        return cbor2.loads(self.payload)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_options(fsync, batch_window_ms, segment_max_bytes, max_size_bytes, max_pending_bytes):
    if fsync not in FSYNC_POLICIES:
        raise ConfigError(f"must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}", "store.wal_fsync")
    if not 0 < batch_window_ms <= MAX_BATCH_WINDOW_MS:
        raise ConfigError(
            f"must be above 0 and at most {MAX_BATCH_WINDOW_MS} ms, got {batch_window_ms!r}", "store.wal_fsync_window"
        )
    if segment_max_bytes < MIN_SEGMENT_BYTES:
        raise ConfigError(f"must be at least {MIN_SEGMENT_BYTES} bytes", "segment_max_bytes")
    if max_size_bytes is not None and max_size_bytes < 4 * MIN_SEGMENT_BYTES:
        raise ConfigError(f"must be at least {4 * MIN_SEGMENT_BYTES} bytes", "store.wal_max_size_mb")
    if max_pending_bytes < 1:
        raise ConfigError("must be positive", "max_pending_bytes")


def options_from_config(config) -> dict:
    """Wal keyword arguments from a fluxrig Config's [store] section (directory not included:
    the Rack uses <store_dir>/wal)."""
    store = config.store
    mb = store.wal_max_size_mb
    return {
        "fsync": store.wal_fsync,
        "batch_window_ms": store.wal_fsync_window * 1000.0,
        "max_size_bytes": None if mb <= 0 else mb * 1024 * 1024,
    }


class Wal(AckIndex, ReadPath):
    """A write-ahead log directory, opened (and recovered) by the constructor.

    Write path: `append(payload) -> seq` (stage + commit per policy), or `stage()` and
    `commit()` separately (what AsyncWal does). Read path: `read_from(seq, max_n)`. Acks:
    `ack(seq)`, `persist_cursor()`. `readonly=True` inspects without locking or repairing.
    """

    def __init__(
        self,
        directory: str,
        *,
        fsync: str = FSYNC_BATCH,
        batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
        segment_max_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_size_bytes: int | None = DEFAULT_MAX_SIZE_BYTES,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        readonly: bool = False,
        probe_bytes: int = PROBE_BYTES,
    ):
        _check_options(fsync, batch_window_ms, segment_max_bytes, max_size_bytes, max_pending_bytes)
        self.directory = os.path.abspath(directory)
        self.fsync = fsync
        self.batch_window = batch_window_ms / 1000.0
        if max_size_bytes is not None:
            segment_max_bytes = min(segment_max_bytes, max(MIN_SEGMENT_BYTES, max_size_bytes // 4))
        self.segment_max_bytes = segment_max_bytes
        self.max_size_bytes = max_size_bytes
        self.max_record_bytes = check_max_record_bytes(max_record_bytes)
        self.max_pending_bytes = max_pending_bytes
        self.readonly = readonly
        self.probe_bytes = probe_bytes
        self.heal_error = ""
        self.failed_at: float | None = None  # wall clock of the current failure
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._read_lock = threading.Lock()  # the read descriptors below
        self._read_fds: dict[str, int] = {}
        self._segments_gone = 0  # segments deleted or dropped so far (read_from prunes its fds)
        self._read_fds_gone = 0
        self._segments: list[SegmentIndex] = []
        self._bases: list[int] = []
        self._size = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._staged: list = []
        self._staged_bytes = 0
        self.first_staged_at: float | None = None
        self._next_seq = FIRST_SEQ
        self._committed = FIRST_SEQ - 1
        self._cursor = FIRST_SEQ - 1
        self._persisted = FIRST_SEQ - 1
        self._acked = AckRanges()  # acknowledged seqs above the cursor
        self._failed: WalFailed | None = None
        self._closed = False
        self.wal_id = b""
        self._m = dict.fromkeys(
            (
                "appended_records", "appended_bytes", "commits", "fsyncs", "dropped_records",
                "dropped_segments", "deleted_segments", "acks_ignored", "read_lost_records",
                "wal_full", "cursor_writes", "failures", "heals", "refused_records", "cursor_failures",
                "emergency_deleted_segments",
            ),
            0,
        )  # fmt: skip
        self._m["fsync_seconds"] = 0.0
        try:
            self.recovery = recover(self)
        except OSError as exc:  # a full disk, permissions, a read-only mount: typed, with the path
            self._release_files()
            raise WalOpenFailed(exc.filename or self.directory, exc) from exc
        except BaseException:
            self._release_files()
            raise

    # -- properties -----------------------------------------------------------------------

    @property
    def committed_seq(self) -> int:
        """Highest seq acknowledged per the fsync policy (visible to read_from)."""
        return self._committed

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def cursor(self) -> int:
        """Highest seq such that every existing record up to it is acknowledged."""
        return self._cursor

    @property
    def persisted_cursor(self) -> int:
        return self._persisted

    @property
    def pending_records(self) -> int:
        return len(self._staged)

    @property
    def pending_bytes(self) -> int:
        return self._staged_bytes

    @property
    def failed(self) -> WalFailed | None:
        return self._failed

    @property
    def record_type(self):
        return WalRecord

    @property
    def wal_id_hex(self) -> str:
        return self.wal_id.hex()

    # -- write path -----------------------------------------------------------------------

    def stage(self, payload) -> int:
        """Accept a record (bytes verbatim, else CBOR-encoded) and give it the next seq. It is
        not written yet: commit() writes it. Raises WalFull, RecordSizeError, WalFailed, ..."""
        body = bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else cbor2.dumps(payload)
        with self._lock:
            if self._failed is not None:
                self._m["refused_records"] += 1
            self._check_writable()
            seq = self._next_seq
            rec = encode_record(wrap_payload(seq, body), self.max_record_bytes)
            if self._staged_bytes + len(rec) > self.max_pending_bytes and self._staged:
                self._m["wal_full"] += 1
                raise WalFull(self._staged_bytes + len(rec), self.max_pending_bytes)
            self._staged.append((seq, rec))
            self._staged_bytes += len(rec)
            self._next_seq = seq + 1
            if self.first_staged_at is None:
                self.first_staged_at = time.monotonic()
            self._m["appended_records"] += 1
            self._m["appended_bytes"] += len(body)
        return seq

    def append(self, payload) -> int:
        """stage() then commit per policy: `always` and `never` commit now (so the record is
        acknowledged when this returns); `batch` commits once the window since the first staged
        record has passed -- call commit() (or use AsyncWal) so the last batch is not left
        waiting. Acknowledged means `committed_seq >= seq`."""
        seq = self.stage(payload)
        if self.fsync != FSYNC_BATCH or time.monotonic() - (self.first_staged_at or 0) >= self.batch_window:
            self.commit()
        return seq

    def commit(self) -> int:
        """Write every staged record (rotating segments by size), fsync per policy, apply the
        size cap. Returns committed_seq. Raises WalFailed (and stays failed) on an I/O error."""
        with self._commit_lock:
            with self._lock:
                if self._failed is not None:
                    self._refuse_staged_locked()
                self._check_writable(allow_closed=True)
                batch, self._staged = self._staged, []
                self._staged_bytes = 0
                self.first_staged_at = None
            if batch:
                try:
                    self._write_batch(batch)
                except OSError as exc:
                    with self._lock:
                        self._failed = WalFailed("write", self._segments[-1].path, exc, self._committed)
                        self.failed_at = time.time()
                        self._m["failures"] += 1
                        # The group's records past the last good commit, and whatever was
                        # staged meanwhile, are failed to their appenders: never written later.
                        self._m["refused_records"] += sum(1 for seq, _r in batch if seq > self._committed)
                        self._refuse_staged_locked()
                    raise self._failed from exc
                if self.max_size_bytes is not None and self._size > self.max_size_bytes:
                    self._enforce_cap()
            return self._committed

    def _refuse_staged_locked(self) -> None:
        self._m["refused_records"] += len(self._staged)
        self._staged = []
        self._staged_bytes = 0
        self.first_staged_at = None

    def heal(self) -> bool:
        """Leave the failed state once the filesystem takes writes again (fluxrig/wal/health.py).
        True when the Wal is (now) writable; False while it is not (`heal_error` says why)."""
        if self._failed is None:
            return True
        if self.readonly or self._closed:
            return False
        with self._commit_lock:
            if not heal(self, self.probe_bytes):
                return False
            with self._lock:
                self._refuse_staged_locked()
                self._failed = None
                self.failed_at = None
                self._m["heals"] += 1
        return True

    def _check_writable(self, allow_closed: bool = False) -> None:
        if self.readonly:
            raise WalReadOnly(f"WAL {self.directory} is open read-only")
        if self._failed is not None:
            raise self._failed
        if self._closed and not allow_closed:
            raise WalClosed(f"WAL {self.directory} is closed")

    def _write_batch(self, batch: list) -> None:
        seg = self._segments[-1]
        sync = self.fsync != FSYNC_NEVER
        chunk: list[bytes] = []
        index: list[tuple[int, int]] = []
        offset = seg.size
        for seq, rec in batch:
            if (seg.seqs or chunk) and offset + len(rec) > self.segment_max_bytes:
                self._flush(seg, chunk, index, offset, sync)
                seg = self._rotate(seq, sync)
                chunk, index, offset = [], [], seg.size
            chunk.append(rec)
            index.append((seq, offset))
            offset += len(rec)
        self._flush(seg, chunk, index, offset, sync)

    def _flush(self, seg: SegmentIndex, chunk: list, index: list, end: int, sync: bool) -> None:
        if not chunk:
            return
        _write_all(self._fd, b"".join(chunk))
        if sync:
            t0 = time.perf_counter()
            _datasync(self._fd)
            self._m["fsync_seconds"] += time.perf_counter() - t0
            self._m["fsyncs"] += 1
        with self._lock:
            for seq, off in index:
                seg.seqs.append(seq)
                seg.offsets.append(off)
            self._size += end - seg.size
            seg.size = end
            self._committed = index[-1][0]
            self._m["commits"] += 1

    def _rotate(self, base: int, sync: bool) -> SegmentIndex:
        path = os.path.join(self.directory, segment_name(base))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all(fd, encode_segment_header(base, self.wal_id))
            if sync:
                os.fsync(fd)
                _fsync_dir(self.directory)  # the new name must survive for its records to
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)
        seg = SegmentIndex(base, path, SEGMENT_HEADER_BYTES)
        with self._lock:
            self._segments.append(seg)
            self._bases.append(base)
            self._size += SEGMENT_HEADER_BYTES
        return seg

    def _enforce_cap(self) -> None:
        victims = []
        with self._lock:
            while self._size > self.max_size_bytes and len(self._segments) > 1:
                seg = self._segments.pop(0)
                self._bases.pop(0)
                self._size -= seg.size
                lost = len(seg.seqs) - bisect_right(seg.seqs, self._cursor)
                if lost and self._acked:
                    last = seg.seqs[-1]
                    for lo, hi in self._acked.ranges():
                        if lo > last:
                            break
                        lost -= bisect_right(seg.seqs, hi) - bisect_left(seg.seqs, lo)
                    self._acked.trim_through(last)
                self._m["dropped_records"] += lost
                self._m["dropped_segments"] += 1
                self._segments_gone += 1
                victims.append((seg, lost))
        for seg, lost in victims:
            if lost:
                log.error(
                    "WAL %s over its size cap (%d bytes): segment %s deleted with %d unacknowledged records "
                    "(counted in dropped_records); raise store.wal_max_size_mb or restore the link upstream",
                    self.directory, self.max_size_bytes, os.path.basename(seg.path), lost,
                )  # fmt: skip
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass

    # -- acknowledgements -----------------------------------------------------------------

    def persist_cursor(self) -> bool:
        """Write the cursor atomically if it moved, then delete fully acknowledged segments.
        Returns True if it wrote. Raises WalFailed(op="cursor") on an I/O error (appends go on)."""
        if self.readonly:
            raise WalReadOnly(f"WAL {self.directory} is open read-only")
        with self._commit_lock:
            cursor = self._cursor
            if cursor == self._persisted:
                return False
            path = os.path.join(self.directory, CURSOR_FILE)
            tmp = path + ".tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _write_all(fd, encode_cursor(cursor))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                _fsync_dir(self.directory)
            except OSError as exc:
                self._m["cursor_failures"] += 1
                if exc.errno in SPACE_ERRNOS:
                    # No room for 20 bytes of cursor: free what is acknowledged anyway, or a
                    # disk full of shipped segments could never drain (see the module docstring).
                    before = self._m["deleted_segments"]
                    self._delete_acked(cursor)
                    self._m["emergency_deleted_segments"] += self._m["deleted_segments"] - before
                raise WalFailed("cursor", path, exc, self._committed) from exc
            self._persisted = cursor
            self._m["cursor_writes"] += 1
            self._delete_acked()
            return True

    def _delete_acked(self, upto: int | None = None) -> None:
        """Delete leading segments whose every record is at or below `upto` (default: the
        persisted cursor); the active segment always stays."""
        victims = []
        with self._lock:
            limit = self._persisted if upto is None else upto
            while len(self._segments) > 1:
                seg = self._segments[0]
                if seg.seqs and seg.seqs[-1] > limit:
                    break
                self._segments.pop(0)
                self._bases.pop(0)
                self._size -= seg.size
                self._m["deleted_segments"] += 1
                self._segments_gone += 1
                victims.append(seg)
        for seg in victims:
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass

    # -- recovery -------------------------------------------------------------------------

    def _open_active(self, rewrite_header: bool) -> None:
        if not self._segments:
            self._rotate(self._next_seq, sync=True)
            return
        seg = self._segments[-1]
        if rewrite_header:
            with open(seg.path, "wb") as fh:
                fh.write(encode_segment_header(seg.base, self.wal_id))
                fh.flush()
                os.fsync(fh.fileno())
            self._size += SEGMENT_HEADER_BYTES - seg.size
            seg.size = SEGMENT_HEADER_BYTES
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)

    # -- lifecycle ------------------------------------------------------------------------

    def metrics(self) -> dict:
        """Counters and gauges for telemetry (cheap; safe from any thread)."""
        with self._lock:
            m = dict(self._m)
            m.update(
                committed_seq=self._committed,
                next_seq=self._next_seq,
                cursor=self._cursor,
                persisted_cursor=self._persisted,
                pending_records=len(self._staged),
                pending_bytes=self._staged_bytes,
                segments=len(self._segments),
                size_bytes=self._size,
                max_size_bytes=self.max_size_bytes,
                unacked_records=self._unacked_locked(),
                fsync_policy=self.fsync,
                failed=self._failed is not None,
                failed_since=self.failed_at or 0.0,
                last_failure=str(self._failed.cause) if self._failed is not None else "",
                backend=BACKEND,
            )
        return m

    def close(self) -> None:
        """Commit what is staged, persist the cursor, release the directory. Idempotent."""
        if self._closed:
            return
        try:
            if not self.readonly and self._failed is None:
                self.commit()
                self.persist_cursor()
        finally:
            self._closed = True
            self._release_files()

    def _release_files(self) -> None:
        with self._read_lock:
            fds, self._read_fds = list(self._read_fds.values()), {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Wal {self.directory} fsync={self.fsync} next_seq={self._next_seq} cursor={self._cursor}>"
