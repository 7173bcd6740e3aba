"""Durable small-file writes shared by the passport store and the kill-switch state."""

from __future__ import annotations

import os

__all__ = ["write_private_atomic"]


def write_private_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the first byte, atomically and durably: a temp
    file is fsynced, renamed over `path`, then the directory is fsynced, so after a crash or a
    power cut the file holds either the old or the new bytes, never a mix, never world-readable."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
