"""Failure and healing of a Wal's write side (full disk, quota, I/O error), without a restart.

Job. When a write or fsync fails the Wal turns *failed* (fluxrig/wal/log.py): every append is
refused with WalFailed, because after a failed fsync the kernel may have dropped dirty pages and
nothing written since the last good fsync can be trusted. This module is the way back while
the process runs: `heal(wal)` (under the Wal's commit lock) re-probes the filesystem and, when
space is back, reopens the write side exactly where the last good commit left it:

1. `free_bytes()` (statvfs) must show at least `probe_bytes` available, else it stays failed
   (cheap: this is what runs every re-probe while the disk is still full);
2. segment files the index does not know (a rotation interrupted by the failure: its header
   may be torn) are removed; none can hold an acknowledged record;
3. the active segment is truncated to its committed size (what a failed write or an untrusted
   fsync left beyond it goes: those appends were failed to their callers) and fsynced, and a
   fresh descriptor is opened on it;
4. a probe file of `probe_bytes` is written, fsynced and removed: the filesystem really takes
   writes again (statvfs can promise space a quota or reserved blocks refuse).

Only then is the failure cleared. Seqs keep growing across a failure (the refused ones are a
gap: never reused for another record), the cursor and every acknowledgement are kept (they are
memory, untouched by a failed write), so a shipper reading the Wal carries on where it was.

Returns True when healed; on an OSError it returns False and keeps the error text in
`wal.heal_error` (the caller retries later: AsyncWal every `heal_interval`). Never raises for
an I/O error. `SPACE_ERRNOS` are the errors a freed disk cures.
"""

from __future__ import annotations

import errno
import os

from fluxrig.wal.layout import parse_segment_name

__all__ = ["heal", "free_bytes", "PROBE_BYTES", "PROBE_FILE", "SPACE_ERRNOS"]

#: Bytes the probe writes (and statvfs must show free): room for a commit group to start.
PROBE_BYTES = 64 * 1024
PROBE_FILE = "wal.probe"
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_datasync = getattr(os, "fdatasync", os.fsync)


def free_bytes(directory: str) -> int | None:
    """Bytes available to this process on the filesystem of `directory` (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def heal(wal, probe_bytes: int = PROBE_BYTES) -> bool:
    """Leave the failed state if the filesystem takes writes again (see the module docstring).
    The caller holds `wal._commit_lock`."""
    d = wal.directory
    try:
        free = free_bytes(d)
        if free is not None and free < probe_bytes:
            raise OSError(errno.ENOSPC, f"{free} bytes free, {probe_bytes} needed", d)
        _remove_strays(wal)
        _reopen_active(wal)
        _probe(d, probe_bytes)
    except OSError as exc:
        wal.heal_error = f"{exc.strerror or exc}"
        return False
    wal.heal_error = ""
    return True


def _remove_strays(wal) -> None:
    last_base = wal._bases[-1] if wal._bases else -1
    for name in os.listdir(wal.directory):
        base = parse_segment_name(name)
        if base is not None and base > last_base:
            try:
                os.unlink(os.path.join(wal.directory, name))
            except FileNotFoundError:
                pass


def _reopen_active(wal) -> None:
    if not wal._segments:  # never happens after recovery; a fresh segment like recovery would make
        wal._open_active(False)
        return
    seg = wal._segments[-1]
    fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
    try:
        os.ftruncate(fd, seg.size)
        _datasync(fd)
    except BaseException:
        os.close(fd)
        raise
    old, wal._fd = wal._fd, fd
    if old is not None:
        try:
            os.close(old)
        except OSError:
            pass


def _probe(directory: str, probe_bytes: int) -> None:
    path = os.path.join(directory, PROBE_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(bytes(probe_bytes))
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
