"""Parked records: a durable copy of what a WAL's consumer could not use, for an operator.

Job. A record that can never be shipped or delivered (it does not decode, it names a subject
that cannot be published, a message arrived for an input this Rack does not have) is not
dropped silently: before the WAL acknowledges it (which lets the segment go), a copy is written
here, the drop is counted and logged at ERROR by the caller. `fluxrig inspect-wal DIR --parked`
lists them (fluxrig/cli/cmd_wal.py).

Layout: `<wal dir>/parked/<key>.<reason>.rec`, one file per record, the record's bytes
verbatim, mode 0600 (a parked guaranteed-lane message can carry a payment's data), written to
a temp name, fsynced, renamed, and the directory fsynced: a record is acknowledged only after
its copy is durable. `key` is the WAL seq (16 hex digits, `out-` prefix) for a record of the
WAL itself, or what the caller names (`in-<stream seq>` for a message received from the Snake).
The recovery scan ignores the subdirectory. Parked files are never deleted by fluxrig: the
operator removes them once dealt with; `MAX_PARKED_FILES` bounds how many a directory takes
(past it `park` raises ParkFull: the caller keeps the record unacknowledged instead).

Raises OSError (full disk, permissions) and ParkFull; the caller decides what stays unacked.
"""

from __future__ import annotations

import os
import re
import time

from fluxrig.wal.record import WalError

__all__ = ["park", "list_parked", "ParkFull", "PARKED_DIR", "MAX_PARKED_FILES"]

PARKED_DIR = "parked"
MAX_PARKED_FILES = 100_000
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ParkFull(WalError):
    """`limit` parked files are already in `directory`: an operator has to look at them."""

    def __init__(self, directory: str, limit: int):
        self.directory = directory
        self.limit = limit
        super().__init__(f"{directory} already holds {limit} parked records; inspect and remove them")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def park(wal_dir: str, key: str, payload: bytes, reason: str, limit: int = MAX_PARKED_FILES) -> str:
    """Write a durable copy of `payload`; returns its path (see the module docstring)."""
    d = os.path.join(wal_dir, PARKED_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    name = f"{_SAFE.sub('_', key)}.{_SAFE.sub('_', reason)}.rec"
    path = os.path.join(d, name)
    if os.path.exists(path):
        return path  # parked before (a restart re-read it before its ack was persisted)
    if len(os.listdir(d)) >= limit:
        raise ParkFull(d, limit)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(bytes(payload))
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(d)
    return path


def list_parked(wal_dir: str) -> list[dict]:
    """The parked records of a WAL directory: {file, key, reason, bytes, parked_at}, by name."""
    d = os.path.join(wal_dir, PARKED_DIR)
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".rec"))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        key, _, rest = n[: -len(".rec")].rpartition(".")
        try:
            st = os.stat(os.path.join(d, n))
        except FileNotFoundError:
            continue
        out.append({
            "file": os.path.join(d, n),
            "key": key or rest,
            "reason": rest if key else "",
            "bytes": st.st_size,
            "parked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
        })  # fmt: skip
    return out
