"""Errors of the WAL's file layer (the record layer's live in fluxrig/wal/record.py).

All derive from `WalError` (a fluxrig.errors.FluxError) and carry structured fields: the failed
operation and path, the limit that was hit.
"""

from __future__ import annotations

from fluxrig.wal.record import WalError

__all__ = ["WalError", "WalFailed", "WalFull", "WalClosed", "WalReadOnly", "WalLocked"]


class WalFailed(WalError):
    """A write or fsync failed; the Wal accepts nothing more until reopened. `op`, `path`."""

    def __init__(self, op: str, path: str, cause: BaseException):
        self.op = op
        self.path = path
        self.cause = cause
        super().__init__(f"WAL {op} failed on {path}: {cause}; reopen the WAL (recovery repairs it)")


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
