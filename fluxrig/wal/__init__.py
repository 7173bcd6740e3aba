"""The Rack's write-ahead log: record format (sans-IO), file layer, asyncio group commit.

See fluxrig/wal/record.py (bytes on disk, scanning and resynchronisation), fluxrig/wal/log.py
(segments, fsync policies, cursor, recovery, size cap) and fluxrig/wal/aio.py (AsyncWal).
"""

from fluxrig.wal.aio import DEFAULT_CURSOR_SYNC_MS, AsyncWal
from fluxrig.wal.crc32c import BACKEND
from fluxrig.wal.errors import WalClosed, WalFailed, WalFull, WalLocked, WalOpenFailed, WalReadOnly
from fluxrig.wal.log import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_SIZE_BYTES,
    DEFAULT_SEGMENT_BYTES,
    FSYNC_ALWAYS,
    FSYNC_BATCH,
    FSYNC_NEVER,
    FSYNC_POLICIES,
    Wal,
    WalRecord,
    options_from_config,
)
from fluxrig.wal.record import (
    DEFAULT_MAX_RECORD_BYTES,
    Corrupt,
    Record,
    RecordReader,
    RecordSizeError,
    SegmentHeaderError,
    TornTail,
    WalError,
    encode_record,
    scan,
)
from fluxrig.wal.recovery import RecoverySummary

__all__ = [
    "AsyncWal",
    "Wal",
    "WalRecord",
    "RecoverySummary",
    "WalError",
    "WalFailed",
    "WalOpenFailed",
    "WalFull",
    "WalClosed",
    "WalLocked",
    "WalReadOnly",
    "RecordSizeError",
    "SegmentHeaderError",
    "Record",
    "Corrupt",
    "TornTail",
    "RecordReader",
    "encode_record",
    "scan",
    "options_from_config",
    "FSYNC_ALWAYS",
    "FSYNC_BATCH",
    "FSYNC_NEVER",
    "FSYNC_POLICIES",
    "DEFAULT_BATCH_WINDOW_MS",
    "DEFAULT_MAX_SIZE_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_CURSOR_SYNC_MS",
    "BACKEND",
]
