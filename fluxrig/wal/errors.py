"""Errors of the WAL's file layer (the record layer's live in fluxrig/wal/record.py).

All derive from `WalError` (a fluxrig.errors.FluxError) and carry structured fields: the failed
operation and path, the limit that was hit.
"""

from __future__ import annotations

from fluxrig.wal.record import WalError

__all__ = ["WalError", "WalFailed", "WalOpenFailed", "WalFull", "WalClosed", "WalReadOnly", "WalLocked"]


class WalFailed(WalError):
    """A write or fsync failed: the Wal refuses appends until it heals (`Wal.heal()`, which
    AsyncWal retries by itself once space returns). `op` ("write", "cursor", "open"), `path`,
    `errno` (of the OSError, or None), `committed` (the committed seq when it failed: appends
    at or below it were written before the failure and stand)."""

    def __init__(self, op: str, path: str, cause: BaseException, committed: int | None = None):
        self.op = op
        self.path = path
        self.cause = cause
        self.errno = getattr(cause, "errno", None)
        self.committed = committed
        super().__init__(
            f"WAL {op} failed on {path}: {cause}; appends are refused until it heals "
            "(free space on that filesystem: the WAL re-probes and reopens by itself)"
        )


class WalOpenFailed(WalFailed):
    """Opening (recovering) a WAL directory failed with an OS error (full disk, permissions,
    read-only filesystem). `path` is the file or directory that failed, `errno` the error."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__("open", path, cause)
        self.args = (
            f"cannot open WAL at {path}: {getattr(cause, 'strerror', None) or cause}; "
            "free space or fix permissions on that filesystem, then start again",
        )


class WalFull(WalError):
    """More than `limit` bytes are staged and not yet written (`size` is what was asked)."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(f"WAL pending bytes would reach {size}, above max_pending_bytes={limit}; wait for a commit")


class WalClosed(WalError):
    """The Wal was closed."""


class WalReadOnly(WalError):
    """The Wal was opened read-only (inspection) and cannot be written."""


class WalLocked(WalError):
    """Another process holds the WAL directory open for writing; `path` is its lock file."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(f"WAL {path} is locked by another process (is a Rack already running on it?)")
