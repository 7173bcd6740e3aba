"""A real small filesystem for storage-failure tests: a tmpfs of a given size mounted on a
temp directory (root only; the tests that use it skip elsewhere, saying why), unmounted in
teardown. `fill(path)` writes a ballast file until the filesystem refuses (ENOSPC) and returns
it; deleting it gives the space back. Nothing here fakes an error: ENOSPC comes from the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import pytest

__all__ = ["small_fs", "fill", "free_bytes"]


@contextlib.contextmanager
def small_fs(path, size: str):
    """Mount a tmpfs of `size` (e.g. "2m") on `path` for the duration of the block."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (ENOSPC for real)")
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=10)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(directory, name: str = "ballast", leave: int = 0) -> str:
    """Write `directory/name` until the filesystem is full (or only `leave` bytes are left);
    returns its path."""
    path = os.path.join(str(directory), name)
    chunk = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while not leave or free_bytes(directory) > leave + len(chunk):
            os.write(fd, chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        try:  # the last partial block too: a small write must fail as well
            while True:
                os.write(fd, b"\0" * 512)
        except OSError as exc2:
            if exc2.errno != errno.ENOSPC:
                raise
    finally:
        os.close(fd)
    return path


def free_bytes(directory) -> int:
    st = os.statvfs(str(directory))
    return st.f_bavail * st.f_frsize
