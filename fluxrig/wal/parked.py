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

Provenance: `info` (a small JSON-able dict: the subject a message came on, its stream
sequence, message id, why it was parked) goes to `<key>.<reason>.json` beside the record,
written and fsynced before it (the `.rec` is what makes a record parked), capped at
MAX_INFO_BYTES; `list_parked` gives it as `info` (absent for a record parked without one).

Raises OSError (full disk, permissions) and ParkFull; the caller decides what stays unacked.
"""

from __future__ import annotations

import json
import os
import re
import time

from fluxrig.wal.record import WalError

__all__ = ["park", "list_parked", "ParkFull", "PARKED_DIR", "MAX_PARKED_FILES", "MAX_INFO_BYTES"]

PARKED_DIR = "parked"
MAX_PARKED_FILES = 100_000
MAX_INFO_BYTES = 4096  # a record's provenance (see the module docstring); longer values are cut
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


def _write_durably(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _info_bytes(info: dict) -> bytes:
    doc = {str(k): v if isinstance(v, (int, float, bool)) or v is None else str(v)[:1024] for k, v in info.items()}
    data = json.dumps(doc, sort_keys=True).encode()
    return (
        data
        if len(data) <= MAX_INFO_BYTES
        else json.dumps({"truncated": data[:1024].decode("utf-8", "replace")}).encode()
    )


def park(
    wal_dir: str, key: str, payload: bytes, reason: str, limit: int = MAX_PARKED_FILES, info: dict | None = None
) -> str:
    """Write a durable copy of `payload` (and its `info`); returns its path (see the module
    docstring)."""
    d = os.path.join(wal_dir, PARKED_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    stem = f"{_SAFE.sub('_', key)}.{_SAFE.sub('_', reason)}"
    path = os.path.join(d, stem + ".rec")
    if os.path.exists(path):
        return path  # parked before (a restart re-read it before its ack was persisted)
    if sum(1 for n in os.listdir(d) if n.endswith(".rec")) >= limit:
        raise ParkFull(d, limit)
    if info:
        _write_durably(os.path.join(d, stem + ".json"), _info_bytes(info))
    _write_durably(path, bytes(payload))
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
        entry = {
            "file": os.path.join(d, n),
            "key": key or rest,
            "reason": rest if key else "",
            "bytes": st.st_size,
            "parked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
        }
        try:
            with open(os.path.join(d, n[: -len(".rec")] + ".json"), "rb") as fh:
                entry["info"] = json.loads(fh.read(MAX_INFO_BYTES + 1))
        except FileNotFoundError:
            pass
        except ValueError as exc:  # damaged by hand: say so, the record itself is still listed
            entry["info_error"] = str(exc)
        out.append(entry)
    return out
